//! What building one ring epoch's connections needs and can fail with, shared by `links` (TCP
//! hellos) and `shm_links` (the shared-memory offer that follows them).

use std::net::TcpStream;
use std::time::{Duration, Instant};

use concord_master::proto::{PeerId, RingMember};
use concord_transport::auth::EpochKey;
use concord_transport::shm::{ShmReader, ShmWriter};
use concord_transport::socket::SocketOptions;
use concord_transport::BackendChoice;

/// What building one epoch's ring needs.
pub(crate) struct RingSetup<'a> {
    pub(crate) me: PeerId,
    pub(crate) epoch: u64,
    /// Signs and checks this epoch's hellos (derived from the run token and the master's salt).
    pub(crate) key: EpochKey,
    pub(crate) ring: &'a [RingMember],
    pub(crate) conns: usize,
    pub(crate) options: SocketOptions,
    pub(crate) timeout: Duration,
    /// Read/write timeout set on every data socket: how long a neighbour may stay silent.
    pub(crate) io_timeout: Option<Duration>,
    /// Whether connections to neighbours on this host may run over shared memory.
    pub(crate) shm: ShmUse,
    /// Ring bytes of each shared-memory connection this peer receives on.
    pub(crate) shm_ring_bytes: usize,
    /// Returns true once the master called the round off: stop waiting for neighbours.
    pub(crate) cancelled: &'a (dyn Fn() -> bool + Sync),
}

impl std::fmt::Debug for RingSetup<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingSetup")
            .field("epoch", &self.epoch)
            .field("conns", &self.conns)
            .finish_non_exhaustive()
    }
}

/// Why a ring epoch's connections could not be built.
#[derive(Clone, Debug)]
pub(crate) enum LinkError {
    /// The two ends are configured differently (say, `--conns`): no retry can succeed.
    Misconfigured(String),
    /// Anything else (a neighbour lost, a deadline, a stale hello refused): a new round may
    /// succeed.
    Failed(String),
}

impl From<String> for LinkError {
    fn from(why: String) -> Self {
        LinkError::Failed(why)
    }
}

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkError::Misconfigured(why) | LinkError::Failed(why) => f.write_str(why),
        }
    }
}

/// Whether a peer's connections may run over shared memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ShmUse {
    /// Never (`socket` or `io_uring` chosen).
    Off,
    /// With neighbours on this host where it works; TCP otherwise (`auto`).
    Prefer,
    /// With neighbours on this host, or an error naming why not (`shm`).
    Require,
}

impl ShmUse {
    pub(crate) fn of(choice: BackendChoice) -> ShmUse {
        match choice {
            BackendChoice::Auto => ShmUse::Prefer,
            BackendChoice::Shm => ShmUse::Require,
            BackendChoice::Uring | BackendChoice::Socket => ShmUse::Off,
        }
    }
}

/// The shared-memory ends of a ring epoch's connections (`None`: the connection stays TCP).
#[derive(Debug, Default)]
pub(crate) struct ShmEnds {
    /// To the successor, by connection index.
    pub(crate) next: Vec<Option<ShmWriter>>,
    /// From the predecessor, by connection index.
    pub(crate) prev: Vec<Option<ShmReader>>,
}

/// Whether to give up waiting: the master called the round off, or the other direction failed.
pub(super) type Stop<'a> = dyn Fn() -> bool + Sync + 'a;

/// Why a direction gave up when told to stop (the other direction's failure, if any, is what
/// the round reports instead).
pub(super) fn stopped(setup: &RingSetup<'_>) -> String {
    if (setup.cancelled)() {
        "the master called the connection round off".into()
    } else {
        "stopped: the other direction of the ring failed".into()
    }
}

/// Reads exactly `buf` in short slices, so that `stop()` (the master calling the round off, or
/// the other direction failing) or the deadline ends the wait.
pub(super) fn read_exact_until(
    mut stream: &TcpStream,
    buf: &mut [u8],
    setup: &RingSetup<'_>,
    deadline: Instant,
    stop: &Stop<'_>,
) -> Result<(), String> {
    use std::io::Read;
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .map_err(|e| e.to_string())?;
    let mut got = 0;
    while got < buf.len() {
        match stream.read(&mut buf[got..]) {
            Ok(0) => return Err("the connection closed".into()),
            Ok(n) => got += n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if stop() {
                    return Err(stopped(setup));
                }
                if Instant::now() >= deadline {
                    return Err("nothing arrived before the deadline".into());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(())
}
