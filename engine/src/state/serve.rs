//! A holder serving the entries it has in the elected version to the peers that pull them.
//!
//! One thread accepts; each connection gets a thread of its own, at most [`MAX_HANDLERS`] at
//! once, that reads its requests, each with its own deadline ([`REQUEST_WAIT`]). A connection
//! waiting for its next request is idle: when every handler is taken, the connection idle the
//! longest is closed to make room, so idle connections never keep a puller out; while all of
//! them are serving, new connections wait in the listen backlog.
//!
//! The caller stops the server with a flag. Every wait here checks it at an interval that grows
//! with the time the sync has run ([`poll_interval`]: 1 ms at first, a sixteenth of the time
//! so far, at most 50 ms), so a sync of a few small entries ends within a millisecond of being
//! told, and a long one costs at most a few wake-ups a second per thread.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use concord_transport::auth::EpochKey;
use socket2::SockRef;

use super::request::{PullRequest, HEAD_BYTES};
use super::MAX_SOURCES;

/// Most connections served at once, one thread each (every puller opens at most two to a
/// holder).
const MAX_HANDLERS: usize = 4 * MAX_SOURCES;
/// How long a connection may stay silent before (or between) requests; then it is closed.
const REQUEST_WAIT: Duration = Duration::from_secs(10);
/// How long a puller may stop reading an answer before it is dropped.
const WRITE_WAIT: Duration = Duration::from_secs(30);
/// Bounds of the interval at which waits check the stop flag.
const POLL_MIN: Duration = Duration::from_millis(1);
const POLL_MAX: Duration = Duration::from_millis(50);

/// Serves clean entries on `listener` until `stop` is set. Returns the bytes served.
pub(crate) fn serve(
    listener: &TcpListener,
    clean: &HashMap<&str, &[u8]>,
    key: &EpochKey,
    revision: u64,
    stop: &AtomicBool,
) -> u64 {
    let started = Instant::now();
    let served = AtomicU64::new(0);
    let slots = Slots::new();
    let job = Job {
        clean,
        key,
        revision,
        stop,
        started,
        served: &served,
        slots: &slots,
    };
    std::thread::scope(|s| {
        while !stop.load(Ordering::Acquire) {
            let _ = SockRef::from(listener).set_read_timeout(Some(poll_interval(started)));
            let stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    continue
                }
                Err(e) => {
                    // (Out of descriptors, say: wait a little rather than spin.)
                    tracing::debug!("accepting a shared-state pull: {e}");
                    std::thread::sleep(poll_interval(started));
                    continue;
                }
            };
            let Some(slot) = slots.claim(&stream, &job) else {
                continue; // Stopped while every handler was serving, or the stream is unusable.
            };
            let job = &job;
            s.spawn(move || {
                if let Err(e) = serve_one(stream, slot, job) {
                    tracing::debug!("shared-state pull connection ended: {e}");
                }
                job.slots.release(slot);
            });
        }
    });
    served.load(Ordering::Relaxed)
}

/// How often a wait checks the stop flag, `started` being when the server started.
fn poll_interval(started: Instant) -> Duration {
    (started.elapsed() / 16).clamp(POLL_MIN, POLL_MAX)
}

/// What every handler shares.
struct Job<'a> {
    clean: &'a HashMap<&'a str, &'a [u8]>,
    key: &'a EpochKey,
    revision: u64,
    stop: &'a AtomicBool,
    started: Instant,
    served: &'a AtomicU64,
    slots: &'a Slots,
}

/// What a handler is doing.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for a request since then: may be closed to make room.
    Idle(Instant),
    /// Reading or answering a request.
    Busy,
    /// Closed to make room; its handler is about to free the slot.
    Closing,
}

struct Slot {
    /// A handle on the connection, to close it when it is idle and the room is needed.
    conn: TcpStream,
    phase: Phase,
}

/// The handlers running, by slot.
struct Slots {
    slots: Mutex<Vec<Option<Slot>>>,
    freed: Condvar,
}

impl Slots {
    fn new() -> Self {
        Slots {
            slots: Mutex::new((0..MAX_HANDLERS).map(|_| None).collect()),
            freed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Option<Slot>>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for a new connection: a free one, else one an idle connection is closed to free.
    /// Waits while every handler is serving; `None` once stopped.
    fn claim(&self, stream: &TcpStream, job: &Job<'_>) -> Option<usize> {
        let conn = stream.try_clone().ok()?;
        let mut slots = self.lock();
        loop {
            if let Some(i) = slots.iter().position(Option::is_none) {
                slots[i] = Some(Slot {
                    conn,
                    phase: Phase::Idle(Instant::now()),
                });
                return Some(i);
            }
            let longest_idle = slots
                .iter_mut()
                .flatten()
                .filter_map(|s| match s.phase {
                    Phase::Idle(since) => Some((since, s)),
                    Phase::Busy | Phase::Closing => None,
                })
                .min_by_key(|(since, _)| *since);
            if let Some((_, idle)) = longest_idle {
                let _ = idle.conn.shutdown(Shutdown::Both);
                idle.phase = Phase::Closing;
            }
            if job.stop.load(Ordering::Acquire) {
                return None;
            }
            slots = self
                .freed
                .wait_timeout(slots, poll_interval(job.started))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Marks a handler idle (waiting for a request) or busy; a closing one stays closing.
    fn set_idle(&self, slot: usize, idle: bool) {
        let mut slots = self.lock();
        let s = slots[slot].as_mut().expect("a handler owns its slot");
        if s.phase != Phase::Closing {
            s.phase = if idle {
                Phase::Idle(Instant::now())
            } else {
                Phase::Busy
            };
        }
    }

    fn release(&self, slot: usize) {
        let mut slots = self.lock();
        assert!(slots[slot].is_some(), "a slot is released once");
        slots[slot] = None;
        self.freed.notify_all();
    }
}

fn serve_one(mut stream: TcpStream, slot: usize, job: &Job<'_>) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(WRITE_WAIT))?;
    loop {
        let mut request = vec![0u8; HEAD_BYTES];
        job.slots.set_idle(slot, true);
        if !read_within(&mut stream, &mut request, job)? {
            return Ok(()); // Closed between requests, or stopped.
        }
        job.slots.set_idle(slot, false);
        let head: &[u8; HEAD_BYTES] = request[..].try_into().expect("the head");
        let rest = PullRequest::rest_bytes(head).map_err(std::io::Error::other)?;
        request.resize(HEAD_BYTES + rest, 0);
        if !read_within(&mut stream, &mut request[HEAD_BYTES..], job)? {
            return Err(std::io::Error::other("a pull request cut short"));
        }
        let req = match PullRequest::decode(&request, job.key) {
            Ok(req) => req,
            Err(why) => {
                let peer = stream
                    .peer_addr()
                    .map_or_else(|_| "?".into(), |a| a.to_string());
                tracing::warn!(%peer, "refused a shared-state pull: {why}");
                stream.write_all(&1u32.to_le_bytes())?;
                return Err(std::io::Error::other(why));
            }
        };
        let range = usize::try_from(req.offset)
            .ok()
            .zip(usize::try_from(req.len).ok())
            .and_then(|(offset, len)| Some(offset..offset.checked_add(len)?));
        let data = job
            .clean
            .get(req.key.as_str())
            .filter(|_| req.revision == job.revision)
            .zip(range)
            .and_then(|(d, range)| d.get(range));
        match data {
            Some(d) => {
                stream.write_all(&0u32.to_le_bytes())?;
                stream.write_all(d)?;
                job.served.fetch_add(d.len() as u64, Ordering::Relaxed);
                crate::fault::kill_point("serve", Some(job.revision));
            }
            None => {
                stream.write_all(&1u32.to_le_bytes())?;
                return Err(std::io::Error::other(format!(
                    "refused a pull of {:?} (revision {}, {} bytes at {}): not served here",
                    req.key, req.revision, req.len, req.offset
                )));
            }
        }
    }
}

/// Fills `buf` within [`REQUEST_WAIT`], checking the stop flag meanwhile. `Ok(false)`: the
/// puller closed the connection before sending anything, or the server was stopped.
fn read_within(stream: &mut TcpStream, buf: &mut [u8], job: &Job<'_>) -> std::io::Result<bool> {
    let deadline = Instant::now() + REQUEST_WAIT;
    let mut got = 0;
    while got < buf.len() {
        if job.stop.load(Ordering::Acquire) {
            return Ok(false);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "no pull request within {} s: closed",
                    REQUEST_WAIT.as_secs()
                ),
            ));
        }
        stream.set_read_timeout(Some(poll_interval(job.started).min(left)))?;
        match stream.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use concord_transport::auth::{KeyPurpose, RunToken};

    fn key(token: &str) -> EpochKey {
        let token = RunToken::new(token).unwrap();
        EpochKey::derive(Some(&token), KeyPurpose::SharedState, 4, 11)
    }

    /// Asks for 4 bytes of "w" signed with `signer`; the holder's answer status and bytes.
    fn pull(addr: std::net::SocketAddr, signer: &EpochKey, revision: u64) -> (u32, Vec<u8>) {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let req = PullRequest {
            revision,
            offset: 2,
            len: 4,
            key: "w".into(),
        };
        s.write_all(&req.encode(signer)).unwrap();
        let mut status = [0u8; 4];
        s.read_exact(&mut status).unwrap();
        let status = u32::from_le_bytes(status);
        let mut data = vec![0u8; if status == 0 { 4 } else { 0 }];
        s.read_exact(&mut data).unwrap();
        (status, data)
    }

    /// A holder serves the members of its sync and refuses a pull signed with another run's
    /// token, or asking for another revision, without serving a byte.
    #[test]
    fn serves_only_pulls_signed_with_the_sync_key() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let bytes: Vec<u8> = (0..16).collect();
        let clean: HashMap<&str, &[u8]> = [("w", &bytes[..])].into_iter().collect();
        let ours = key("the run's token 0123");
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let server = s.spawn(|| serve(&listener, &clean, &ours, 4, &stop));
            assert_eq!(pull(addr, &key("another run's token"), 4), (1, vec![]));
            assert_eq!(pull(addr, &ours, 5), (1, vec![]));
            assert_eq!(pull(addr, &ours, 4), (0, vec![2, 3, 4, 5]));
            stop.store(true, Ordering::Release);
            assert_eq!(
                server.join().unwrap(),
                4,
                "only the member's pull was served"
            );
        });
    }
}
