//! Pulling outdated entries: pieces spread over every up-to-date holder, re-fetched elsewhere
//! when a holder dies, each entry verified against its elected hash.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use concord_master::proto::Pull;
use concord_transport::auth::EpochKey;
use concord_transport::socket::{connect_until, resolve, SocketOptions};

use super::request::PullRequest;
use super::{hash, MAX_SOURCES, PIECE_BYTES};

struct Piece<'b> {
    entry: usize,
    offset: usize,
    buf: &'b mut [u8],
    /// The worker that takes it first (spreads the pieces over every holder).
    home: usize,
}

/// The pieces still to fetch, and the entries of those being fetched right now (a worker that
/// could serve one of those must wait: if its holder dies, the piece comes back).
struct Work<'b> {
    queued: Vec<Piece<'b>>,
    in_flight: Vec<usize>,
    /// Per worker: connected and asking for pieces, or finished. Until then (or until
    /// `steal_after`) its home pieces are left to it, so that a worker that connected first does
    /// not take every piece before the other holders' workers are up.
    ready: Vec<bool>,
    steal_after: Instant,
}

/// How long a worker's home pieces wait for it to connect before others may take them (only a
/// holder that is slow to answer, or unreachable, costs this).
const STEAL_GRACE: Duration = Duration::from_secs(1);

/// Pulls every dirty entry from its holders, several at once; verifies the hashes.
/// Returns the bytes received.
pub(crate) fn pull_all(
    mut dirty: Vec<(&Pull, &mut [u8])>,
    key: &EpochKey,
    revision: u64,
    timeout: Duration,
) -> Result<u64, String> {
    let mut sources: Vec<(u64, String)> = Vec::new();
    let known = |sources: &Vec<(u64, String)>, id: u64| sources.iter().any(|(s, _)| *s == id);
    // Every entry needs one of its holders among the sources (past the cap if it must: the
    // master names few holders per entry, usually the same few for all of a puller's)...
    for (pull, _) in &dirty {
        let Some(first) = pull.sources.first() else {
            return Err(format!(
                "no peer holds the elected version of {:?}",
                pull.key
            ));
        };
        if !pull.sources.iter().any(|s| known(&sources, s.peer_id)) {
            sources.push((first.peer_id, first.data_addr.clone()));
        }
    }
    // ...then more holders, up to the cap, to pull from several at once.
    for (pull, _) in &dirty {
        for s in &pull.sources {
            if !known(&sources, s.peer_id) && sources.len() < MAX_SOURCES {
                sources.push((s.peer_id, s.data_addr.clone()));
            }
        }
    }
    let keys: Vec<(String, u64, Vec<u64>)> = dirty
        .iter()
        .map(|(p, _)| {
            (
                p.key.clone(),
                p.hash,
                p.sources.iter().map(|s| s.peer_id).collect(),
            )
        })
        .collect();
    // With few holders, two connections each: one TCP stream is bound by one core.
    let streams = if sources.len() < 4 { 2 } else { 1 };
    let workers: Vec<&(u64, String)> = sources
        .iter()
        .flat_map(|s| std::iter::repeat_n(s, streams))
        .collect();
    let mut pieces = Vec::new();
    for (i, (pull, buf)) in dirty.iter_mut().enumerate() {
        // Homes go round the workers whose holder has this entry (anyone's if none of them).
        let servers: Vec<usize> = (0..workers.len())
            .filter(|&k| pull.sources.iter().any(|s| s.peer_id == workers[k].0))
            .collect();
        for (j, chunk) in buf.chunks_mut(PIECE_BYTES).enumerate() {
            let home = if servers.is_empty() {
                usize::MAX
            } else {
                servers[pieces.len() % servers.len()]
            };
            pieces.push(Piece {
                entry: i,
                offset: j * PIECE_BYTES,
                buf: chunk,
                home,
            });
        }
    }
    let work = (
        Mutex::new(Work {
            queued: pieces,
            in_flight: Vec::new(),
            ready: vec![false; workers.len()],
            steal_after: Instant::now() + STEAL_GRACE,
        }),
        Condvar::new(),
    );
    let received = AtomicU64::new(0);
    let deadline = Instant::now() + timeout;
    std::thread::scope(|s| {
        for (w, (id, addr)) in workers.iter().enumerate() {
            let (work, keys, received) = (&work, &keys, &received);
            s.spawn(move || {
                let job = Job {
                    worker: w,
                    id: *id,
                    work,
                    keys,
                    key,
                    revision,
                    deadline,
                };
                if let Err(e) = pull_from(&job, addr, received) {
                    tracing::info!("stopped pulling shared state from peer {id}: {e}");
                }
                // Done or failed: whatever is still homed here is anyone's.
                job.set_ready();
            });
        }
    });
    let left = work
        .0
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .queued;
    if let Some(p) = left.first() {
        return Err(format!(
            "{} piece(s) of {:?} could not be fetched from any holder",
            left.len(),
            keys[p.entry].0
        ));
    }
    drop(left);
    // Verify what arrived (the pieces, and their borrows of the entries, are gone), on two
    // threads.
    let verify = |entries: &[(&Pull, &mut [u8])]| -> Result<(), String> {
        for (pull, bytes) in entries {
            let got = hash(bytes);
            if got != pull.hash {
                return Err(format!(
                    "shared-state entry {:?} arrived with hash {got:016x}, expected {:016x}",
                    pull.key, pull.hash
                ));
            }
        }
        Ok(())
    };
    let (a, b) = dirty.split_at(dirty.len() / 2);
    std::thread::scope(|s| {
        let other = s.spawn(|| verify(a));
        let mine = verify(b);
        other
            .join()
            .unwrap_or_else(|_| Err("hash verification panicked".into()))
            .and(mine)
    })?;
    Ok(received.load(Ordering::Relaxed))
}

/// What one pull worker needs.
struct Job<'a, 'b> {
    worker: usize,
    id: u64,
    work: &'a (Mutex<Work<'b>>, Condvar),
    keys: &'a [(String, u64, Vec<u64>)],
    key: &'a EpochKey,
    revision: u64,
    deadline: Instant,
}

impl<'b> Job<'_, 'b> {
    fn serves(&self, entry: usize) -> bool {
        self.keys[entry].2.contains(&self.id)
    }

    /// The next piece for this worker: its own first, then any its holder has; waits while a
    /// piece it could serve is in flight elsewhere. `None`: nothing left for it.
    ///
    /// Another worker's home piece is taken only once that worker is up (then it is simply
    /// faster) or after [`STEAL_GRACE`] (its holder may be unreachable).
    fn next(&self) -> Option<Piece<'b>> {
        let (lock, cv) = self.work;
        let mut w = lock.lock().unwrap_or_else(|p| p.into_inner());
        if !w.ready[self.worker] {
            w.ready[self.worker] = true;
            cv.notify_all();
        }
        loop {
            let now = Instant::now();
            let own = w
                .queued
                .iter()
                .position(|p| p.home == self.worker && self.serves(p.entry));
            let open = |p: &Piece<'_>| {
                p.home == self.worker
                    || w.ready.get(p.home).is_none_or(|r| *r)
                    || now >= w.steal_after
            };
            let any = || {
                w.queued
                    .iter()
                    .position(|p| self.serves(p.entry) && open(p))
            };
            if let Some(i) = own.or_else(any) {
                let piece = w.queued.swap_remove(i);
                w.in_flight.push(piece.entry);
                return Some(piece);
            }
            let waiting_on = self.left_for_me(&w);
            let left = self.deadline.saturating_duration_since(now);
            if !waiting_on || left.is_zero() {
                return None;
            }
            let until_open = w.steal_after.saturating_duration_since(now);
            let wait = if until_open.is_zero() {
                left
            } else {
                left.min(until_open)
            };
            w = cv
                .wait_timeout(w, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Whether a piece this worker's holder could serve is still queued or in flight.
    fn has_work(&self) -> bool {
        let w = self.work.0.lock().unwrap_or_else(|p| p.into_inner());
        self.left_for_me(&w)
    }

    /// [`Job::has_work`] under the lock already held.
    fn left_for_me(&self, w: &Work<'_>) -> bool {
        w.queued.iter().any(|p| self.serves(p.entry)) || w.in_flight.iter().any(|e| self.serves(*e))
    }

    /// Marks this worker up (or finished), so others may take its home pieces.
    fn set_ready(&self) {
        let (lock, cv) = self.work;
        let mut w = lock.lock().unwrap_or_else(|p| p.into_inner());
        w.ready[self.worker] = true;
        cv.notify_all();
    }
}

fn pull_from(job: &Job<'_, '_>, addr: &str, received: &AtomicU64) -> Result<(), String> {
    let addr: SocketAddr = resolve(addr).map_err(|e| e.to_string())?;
    let left = job.deadline.saturating_duration_since(Instant::now());
    let mut stream = connect_until(
        addr,
        &SocketOptions::default(),
        left.min(Duration::from_secs(10)),
        "a shared-state holder",
        // A holder that does not answer (it died) is retried only while something is left
        // that it could serve: once the others fetched everything, this worker stops.
        &|| !job.has_work(),
    )
    .map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let (lock, cv) = job.work;
    while let Some(mut piece) = job.next() {
        let result = fetch(
            &mut stream,
            &job.keys[piece.entry].0,
            piece.offset,
            &mut *piece.buf,
            job.key,
            job.revision,
        );
        let mut w = lock.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = w.in_flight.iter().position(|e| *e == piece.entry) {
            w.in_flight.swap_remove(k);
        }
        match result {
            Ok(()) => {
                received.fetch_add(piece.buf.len() as u64, Ordering::Relaxed);
                cv.notify_all();
            }
            Err(e) => {
                // Hand the piece to another holder.
                piece.home = usize::MAX;
                w.queued.push(piece);
                cv.notify_all();
                return Err(e);
            }
        }
    }
    Ok(())
}

fn fetch(
    stream: &mut TcpStream,
    key: &str,
    offset: usize,
    buf: &mut [u8],
    sync_key: &EpochKey,
    revision: u64,
) -> Result<(), String> {
    let req = PullRequest {
        revision,
        offset: offset as u64,
        len: buf.len() as u64,
        key: key.to_string(),
    }
    .encode(sync_key);
    stream.write_all(&req).map_err(|e| e.to_string())?;
    let mut status = [0u8; 4];
    stream.read_exact(&mut status).map_err(|e| e.to_string())?;
    if u32::from_le_bytes(status) != 0 {
        return Err(format!("the holder refused to serve {key:?}"));
    }
    stream.read_exact(buf).map_err(|e| e.to_string())
}
