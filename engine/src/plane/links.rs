//! Data-plane connections to the ring neighbours, built once per ring epoch.
//!
//! Each peer dials its successor `conns` times and accepts `conns` connections from its
//! predecessor, concurrently (with two peers, successor and predecessor are the same peer, one
//! pool each way). Every connection opens with a [`DataHello`] signed with the epoch's key
//! (derived from the run token and the master's salt of the epoch), which the acceptor checks
//! with who is calling and the connection's index. Anything else is refused and closed, so a
//! stale or unauthorised dialler never feeds a collective.
//!
//! A predecessor that passes those checks but opens another number of connections per
//! neighbour is told so ([`HelloStatus::ConnsMismatch`]), and both ends fail the round with an
//! error naming both values: a misconfiguration, not something to wait out. Either direction
//! failing stops the other at once, so that the round's outcome reaches the master promptly.

use std::collections::VecDeque;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use concord_master::proto::{PeerId, RingMember};
use concord_transport::handshake::{read_reply, write_reply, DataHello, HelloStatus, HELLO_BYTES};
use concord_transport::socket::{connect_until, resolve};
use concord_transport::PROTOCOL_VERSION;
use socket2::SockRef;

use super::link_setup::{read_exact_until, stopped, ShmEnds, Stop};
pub(crate) use super::link_setup::{LinkError, RingSetup};

/// The connections of one ring epoch.
#[derive(Debug)]
pub(crate) struct Links {
    /// To the successor, by connection index.
    pub(crate) next: Vec<TcpStream>,
    /// From the predecessor, by connection index.
    pub(crate) prev: Vec<TcpStream>,
    /// Ids of the successor and the predecessor (for error messages).
    pub(crate) next_id: PeerId,
    pub(crate) prev_id: PeerId,
    /// The connections that run over shared memory (`shm_links`).
    pub(crate) shm: ShmEnds,
}

impl Links {
    /// Tears every connection down; blocked reads and writes on other threads return at once.
    pub(crate) fn shutdown(&self) {
        for s in self.next.iter().chain(&self.prev) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Links {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Builds the connections of a ring epoch. A ring of one needs none.
pub(crate) fn establish(listener: &TcpListener, setup: &RingSetup<'_>) -> Result<Links, LinkError> {
    let n = setup.ring.len();
    let pos = setup
        .ring
        .iter()
        .position(|m| m.peer_id == setup.me)
        .ok_or_else(|| LinkError::Failed("this peer is not in the ring it was given".into()))?;
    let succ = &setup.ring[(pos + 1) % n];
    let pred = &setup.ring[(pos + n - 1) % n];
    if n == 1 {
        return Ok(Links {
            next: Vec::new(),
            prev: Vec::new(),
            next_id: setup.me,
            prev_id: setup.me,
            shm: ShmEnds::default(),
        });
    }
    let deadline = Instant::now() + setup.timeout;
    // The first failure of either direction: it stops the other one, and is the round's error.
    let failed: OnceLock<LinkError> = OnceLock::new();
    let stop = || (setup.cancelled)() || failed.get().is_some();
    let record = |r: Result<Vec<TcpStream>, LinkError>| {
        if let Err(e) = &r {
            let _ = failed.set(e.clone());
        }
        r
    };
    let (dialled, accepted) = std::thread::scope(|s| {
        let acceptor =
            s.spawn(|| record(accept_from(listener, setup, pred.peer_id, deadline, &stop)));
        let dialled = record(dial(setup, succ, deadline, &stop));
        (
            dialled,
            acceptor
                .join()
                .unwrap_or_else(|_| Err(LinkError::Failed("the accepting thread panicked".into()))),
        )
    });
    if let Some(first) = failed.into_inner() {
        return Err(first);
    }
    let (next, prev) = (dialled?, accepted?);
    let shm =
        super::shm_links::negotiate(&next, &prev, setup, succ.peer_id, pred.peer_id, deadline)?;
    for s in next.iter().chain(&prev) {
        s.set_read_timeout(setup.io_timeout)
            .map_err(|e| LinkError::Failed(format!("setting SO_RCVTIMEO: {e}")))?;
        s.set_write_timeout(setup.io_timeout)
            .map_err(|e| LinkError::Failed(format!("setting SO_SNDTIMEO: {e}")))?;
    }
    Ok(Links {
        next,
        prev,
        next_id: succ.peer_id,
        prev_id: pred.peer_id,
        shm,
    })
}

fn dial(
    setup: &RingSetup<'_>,
    succ: &RingMember,
    deadline: Instant,
    stop: &Stop<'_>,
) -> Result<Vec<TcpStream>, LinkError> {
    let addr: SocketAddr = resolve(&succ.data_addr).map_err(|e| e.to_string())?;
    let what = format!("ring successor {}", succ.peer_id);
    (0..setup.conns)
        .map(|i| {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut stream = connect_until(addr, &setup.options, left, &what, stop)
                .map_err(|e| e.to_string())?;
            let hello = DataHello {
                epoch: setup.epoch,
                from: setup.me,
                to: succ.peer_id,
                conn_index: i as u32,
                conn_count: setup.conns as u32,
            };
            hello
                .send(&setup.key, &mut stream)
                .map_err(|e| e.to_string())?;
            let reply = read_reply_until(&stream, setup, deadline, stop)
                .map_err(|e| format!("{what} at {addr}: {e}"))?;
            match read_reply(&mut &reply[..]).map_err(|e| format!("{what} at {addr}: {e}"))? {
                HelloStatus::Ok => Ok(stream),
                HelloStatus::Refused => Err(LinkError::Failed(format!(
                    "{what} at {addr} refused data connection {i} of epoch {}",
                    setup.epoch
                ))),
                HelloStatus::ConnsMismatch { acceptor_conns } => {
                    let why = format!(
                        "{what} expects {acceptor_conns} connection(s) per neighbour (--conns \
                         {acceptor_conns} / conns_per_neighbour), this peer opens {} (--conns \
                         {}): give every peer the same value",
                        setup.conns, setup.conns
                    );
                    log_mismatch(&why);
                    Err(LinkError::Misconfigured(why))
                }
            }
        })
        .collect()
}

/// Reads the 16-byte hello reply in short slices, so that a round the master called off (or
/// the deadline) ends the wait: a successor that left its accept loop never answers.
fn read_reply_until(
    stream: &TcpStream,
    setup: &RingSetup<'_>,
    deadline: Instant,
    stop: &Stop<'_>,
) -> Result<[u8; 16], String> {
    let mut reply = [0u8; 16];
    read_exact_until(stream, &mut reply, setup, deadline, stop)
        .map_err(|e| format!("reading data hello reply: {e}"))?;
    Ok(reply)
}

/// Most accepted connections whose hello has not arrived yet; past it the oldest is dropped.
const MAX_WAITING_HELLOS: usize = 64;

/// How long one accepted connection may take to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether an accepted connection's hello is all there (or enough of it to answer).
enum HelloState {
    Arrived,
    Pending,
    Gone,
}

/// Looks at what an accepted (non-blocking) connection has sent, without taking it.
fn hello_state(stream: &TcpStream) -> HelloState {
    let mut buf = [0u8; HELLO_BYTES];
    match stream.peek(&mut buf) {
        Ok(0) => HelloState::Gone,
        Ok(n) if n == HELLO_BYTES => HelloState::Arrived,
        // Another version's hello may be shorter: the first 8 bytes say so, and are answered.
        Ok(n) if n >= 8 && buf[4..8] != PROTOCOL_VERSION.to_le_bytes() => HelloState::Arrived,
        Ok(_) => HelloState::Pending,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => HelloState::Pending,
        Err(_) => HelloState::Gone,
    }
}

/// Accepts the predecessor's connections. Hellos are read concurrently, each connection with
/// a deadline of its own, so that idle or slow strangers on the data port delay nobody.
fn accept_from(
    listener: &TcpListener,
    setup: &RingSetup<'_>,
    pred: PeerId,
    deadline: Instant,
    stop: &Stop<'_>,
) -> Result<Vec<TcpStream>, LinkError> {
    let mut slots: Vec<Option<TcpStream>> = (0..setup.conns).map(|_| None).collect();
    let mut waiting: VecDeque<(TcpStream, Instant)> = VecDeque::new();
    while slots.iter().any(Option::is_none) {
        let now = Instant::now();
        let left = deadline.saturating_duration_since(now);
        if stop() {
            return Err(stopped(setup).into());
        }
        if left.is_zero() {
            let got = slots.iter().filter(|s| s.is_some()).count();
            return Err(LinkError::Failed(format!(
                "ring predecessor {pred} opened {got} of {} data connections within {} ms (is the data port reachable from it?)",
                setup.conns,
                setup.timeout.as_millis()
            )));
        }
        let mut i = 0;
        while i < waiting.len() {
            match hello_state(&waiting[i].0) {
                HelloState::Arrived => {
                    let (stream, _) = waiting.remove(i).expect("in range");
                    take_hello(stream, setup, pred, &mut slots)?;
                }
                HelloState::Gone => drop(waiting.remove(i)),
                HelloState::Pending if waiting[i].1 <= now => {
                    tracing::debug!("dropped a data connection that sent no hello in time");
                    drop(waiting.remove(i));
                }
                HelloState::Pending => i += 1,
            }
        }
        if slots.iter().all(Option::is_some) {
            break;
        }
        // Linux honours SO_RCVTIMEO on accept(): a bounded wait without polling while nothing
        // is pending, a short one while hellos are awaited.
        let wait = if waiting.is_empty() {
            Duration::from_millis(100)
        } else {
            Duration::from_millis(2)
        };
        SockRef::from(listener)
            .set_read_timeout(Some(left.min(wait)))
            .map_err(|e| e.to_string())?;
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("accepting data connections: {e}").into()),
        };
        stream
            .set_nonblocking(true)
            .map_err(|e| format!("making a data connection non-blocking: {e}"))?;
        waiting.push_back((stream, now + HELLO_TIMEOUT.min(left)));
        if waiting.len() > MAX_WAITING_HELLOS {
            tracing::warn!(
                "more than {MAX_WAITING_HELLOS} data connections without a hello; dropping the oldest"
            );
            waiting.pop_front();
        }
    }
    Ok(slots.into_iter().map(|s| s.expect("all filled")).collect())
}

/// Reads an arrived hello and, if it is one of this epoch's predecessor's connections, puts
/// the connection in its slot; anything else is refused (and the round goes on), except a
/// misconfiguration, which fails it.
fn take_hello(
    mut stream: TcpStream,
    setup: &RingSetup<'_>,
    pred: PeerId,
    slots: &mut [Option<TcpStream>],
) -> Result<(), LinkError> {
    stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(Duration::from_millis(100))))
        .map_err(|e| format!("setting up a data connection: {e}"))?;
    let signed = match DataHello::receive(&mut stream) {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!("refused a data connection: {e}");
            return Ok(());
        }
    };
    let hello = signed.hello;
    if !signed.verify(&setup.key) {
        tracing::warn!(
            peer = %stream.peer_addr().map_or_else(|_| "?".into(), |a| a.to_string()),
            epoch = hello.epoch,
            "refused a data connection whose hello is not signed with this epoch's key \
             (a stranger, another run's token, or another epoch)"
        );
        let _ = write_reply(&mut stream, HelloStatus::Refused);
        return Ok(());
    }
    let index = hello.conn_index as usize;
    let expected = hello.epoch == setup.epoch && hello.from == pred && hello.to == setup.me;
    if expected && hello.conn_count as usize != setup.conns {
        let _ = write_reply(
            &mut stream,
            HelloStatus::ConnsMismatch {
                acceptor_conns: setup.conns as u32,
            },
        );
        let why = conns_mismatch(pred, hello.conn_count, setup.conns);
        log_mismatch(&why);
        return Err(LinkError::Misconfigured(why));
    }
    let valid = expected && index < setup.conns && slots[index].is_none();
    if !valid {
        tracing::warn!(
            epoch = hello.epoch,
            from = hello.from,
            to = hello.to,
            conn_index = hello.conn_index,
            "refused a data connection that is not from this epoch's predecessor"
        );
        let _ = write_reply(&mut stream, HelloStatus::Refused);
        return Ok(());
    }
    setup.options.apply(&stream).map_err(|e| e.to_string())?;
    write_reply(&mut stream, HelloStatus::Ok).map_err(|e| e.to_string())?;
    slots[index] = Some(stream);
    Ok(())
}

/// The error of an acceptor whose predecessor opens another number of connections.
fn conns_mismatch(pred: PeerId, theirs: u32, ours: usize) -> String {
    format!(
        "ring predecessor {pred} opens {theirs} connection(s) per neighbour (--conns {theirs} / \
         conns_per_neighbour), this peer expects {ours} (--conns {ours}): give every peer the \
         same value"
    )
}

/// Logs a connections-per-neighbour mismatch as an error once per process (every round the
/// group retries hits it again, both ways: the repeats go to debug).
fn log_mismatch(why: &str) {
    static LOGGED: AtomicBool = AtomicBool::new(false);
    if LOGGED.swap(true, Ordering::Relaxed) {
        tracing::debug!("{why}");
    } else {
        tracing::error!("{why}");
    }
}

#[cfg(test)]
mod tests {
    use super::super::link_setup::ShmUse;
    use super::*;
    use concord_transport::auth::EpochKey;
    use concord_transport::auth::{KeyPurpose, RunToken};
    use concord_transport::socket::SocketOptions;

    fn key(token: &str, epoch: u64) -> EpochKey {
        let token = RunToken::new(token).unwrap();
        EpochKey::derive(Some(&token), KeyPurpose::Ring, epoch, 99)
    }

    fn two_members(addr: SocketAddr) -> [RingMember; 2] {
        [1, 2].map(|peer_id| RingMember {
            peer_id,
            data_addr: addr.to_string(),
        })
    }

    /// Peer 2 of `ring`, in epoch 7, holding the run's token, one connection per neighbour.
    fn member_two(ring: &[RingMember]) -> RingSetup<'_> {
        RingSetup {
            me: 2,
            epoch: 7,
            key: key("the run's token 0123", 7),
            ring,
            conns: 1,
            options: SocketOptions::default(),
            timeout: Duration::from_secs(20),
            io_timeout: None,
            shm: ShmUse::Off,
            shm_ring_bytes: 1 << 20,
            cancelled: &|| false,
        }
    }

    fn hello(epoch: u64) -> DataHello {
        DataHello {
            epoch,
            from: 1,
            to: 2,
            conn_index: 0,
            conn_count: 1,
        }
    }

    /// A dialler whose hello is signed with another run's token, or with another epoch's key,
    /// is refused even when it names the right epoch and peers; the predecessor that holds the
    /// token is then accepted.
    #[test]
    fn hellos_signed_without_the_run_token_are_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let ring = two_members(addr);
        let setup = member_two(&ring);
        let dialler = std::thread::spawn(move || {
            let mut replies = Vec::new();
            for k in [
                key("another run's token", 7),
                key("the run's token 0123", 6),
                EpochKey::derive(None, KeyPurpose::Ring, 7, 99),
                key("the run's token 0123", 7),
            ] {
                let mut s = TcpStream::connect(addr).unwrap();
                hello(7).send(&k, &mut s).unwrap();
                replies.push(read_reply(&mut s).unwrap());
            }
            replies
        });
        let deadline = Instant::now() + setup.timeout;
        let accepted = accept_from(&listener, &setup, 1, deadline, &|| false).unwrap();
        assert_eq!(accepted.len(), 1);
        use HelloStatus::{Ok as Accepted, Refused};
        assert_eq!(
            dialler.join().unwrap(),
            [Refused, Refused, Refused, Accepted]
        );
    }

    /// Strangers that connect to a data port and say nothing (or half a hello) cost the ring
    /// nothing: the predecessor's connection, arriving after them, is taken at once.
    #[test]
    fn idle_connections_do_not_delay_the_predecessor() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let idle: Vec<TcpStream> = (0..10)
            .map(|i| {
                let mut s = TcpStream::connect(addr).unwrap();
                if i % 2 == 0 {
                    std::io::Write::write_all(&mut s, &[0x43, 0x44, 0x48]).unwrap();
                }
                s
            })
            .collect();
        let ring = two_members(addr);
        let setup = member_two(&ring);
        let start = Instant::now();
        let dialler = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            let mut s = TcpStream::connect(addr).unwrap();
            hello(7)
                .send(&key("the run's token 0123", 7), &mut s)
                .unwrap();
            read_reply(&mut s).unwrap()
        });
        let deadline = start + setup.timeout;
        let accepted = accept_from(&listener, &setup, 1, deadline, &|| false).unwrap();
        assert_eq!(accepted.len(), 1);
        assert_eq!(dialler.join().unwrap(), HelloStatus::Ok);
        let took = start.elapsed();
        assert!(
            took < Duration::from_secs(4),
            "the predecessor waited {took:?} behind idle connections (each may take 5 s)"
        );
        drop(idle);
    }
}
