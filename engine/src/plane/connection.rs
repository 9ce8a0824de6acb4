//! One data connection as a TX or RX thread drives it: plain socket, io_uring, or one end of a
//! shared-memory ring.

use std::io::{self, Read};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use concord_transport::frame::{DataHeader, HEADER_BYTES};
use concord_transport::shm::{ShmProbe, ShmReader, ShmStopper, ShmWriter};
use concord_transport::socket::write_frame;
use concord_transport::uring::ShutdownHandle;
use concord_transport::{BackendKind, PinnedBuf, PinnedPool, UringStream};

/// A connection owned by the thread that drives it.
pub(crate) enum Connection {
    Socket(TcpStream),
    Uring(Box<UringStream>),
    /// The sending end of a ring to a neighbour on this host.
    ShmTx(ShmWriter),
    /// The receiving end of a ring from a neighbour on this host.
    ShmRx(ShmReader),
}

/// What another thread keeps to tear a connection down (waking its blocked owner).
pub(crate) enum Stopper {
    Socket(TcpStream),
    Uring(ShutdownHandle),
    Shm(ShmStopper),
}

impl Stopper {
    pub(crate) fn stop(&self) {
        match self {
            Stopper::Socket(s) => {
                let _ = s.shutdown(Shutdown::Both);
            }
            Stopper::Uring(h) => h.shutdown(),
            Stopper::Shm(s) => s.stop(),
        }
    }
}

/// Looks for incoming bytes on a receiving connection without holding it.
pub(crate) enum Probe {
    Fd(RawFd),
    Shm(ShmProbe),
}

impl Probe {
    /// Whether a read would find bytes now.
    pub(crate) fn readable(&self) -> bool {
        match self {
            Probe::Fd(fd) => concord_transport::spin::readable(*fd),
            Probe::Shm(p) => p.readable(),
        }
    }

    /// Sleeps until bytes may be there (or the connection hung up): true; or `timeout` passed.
    pub(crate) fn wait(&self, timeout: Duration) -> bool {
        match self {
            Probe::Fd(fd) => concord_transport::spin::wait_readable(*fd, Some(timeout)),
            Probe::Shm(p) => p.wait(timeout),
        }
    }
}

fn not_this_way() -> io::Error {
    io::Error::other("a shared-memory ring carries frames one way only")
}

impl Connection {
    /// Wraps a connected socket for `backend`; returns the stream and its stopper.
    pub(crate) fn new(
        stream: TcpStream,
        backend: BackendKind,
    ) -> Result<(Connection, Stopper), String> {
        let stopper = stream
            .try_clone()
            .map_err(|e| format!("cloning a data socket: {e}"))?;
        match backend {
            BackendKind::Socket => Ok((Connection::Socket(stream), Stopper::Socket(stopper))),
            BackendKind::Uring => {
                let u = UringStream::new(stream).map_err(|e| format!("io_uring stream: {e}"))?;
                let handle = u.shutdown_handle();
                Ok((Connection::Uring(Box::new(u)), Stopper::Uring(handle)))
            }
            BackendKind::Shm => Err("a shared-memory connection is made from its ring end".into()),
        }
    }

    /// The sending end of a shared-memory ring, and its stopper.
    pub(crate) fn shm_tx(w: ShmWriter) -> (Connection, Stopper) {
        let stop = Stopper::Shm(w.stopper());
        (Connection::ShmTx(w), stop)
    }

    /// The receiving end of a shared-memory ring, and its stopper.
    pub(crate) fn shm_rx(r: ShmReader) -> (Connection, Stopper) {
        let stop = Stopper::Shm(r.stopper());
        (Connection::ShmRx(r), stop)
    }

    /// What the connection runs on.
    pub(crate) fn kind(&self) -> BackendKind {
        match self {
            Connection::Socket(_) => BackendKind::Socket,
            Connection::Uring(_) => BackendKind::Uring,
            Connection::ShmTx(_) | Connection::ShmRx(_) => BackendKind::Shm,
        }
    }

    pub(crate) fn write_frame(&mut self, header: &DataHeader, payload: &[u8]) -> io::Result<()> {
        match self {
            Connection::Socket(s) => write_frame(s, header, payload),
            Connection::Uring(u) => u.write_frame(header, payload),
            Connection::ShmTx(w) => w.write_frame(header, payload),
            Connection::ShmRx(_) => Err(not_this_way()),
        }
    }

    /// Reads the next header. While `idle()` says no collective expects data, a read timeout is
    /// only a quiet connection: keep waiting. Bytes are never lost: a timeout that interrupts a
    /// header mid-way is retried for the rest.
    pub(crate) fn read_header(&mut self, idle: impl Fn() -> bool) -> io::Result<DataHeader> {
        match self {
            Connection::ShmRx(r) => return r.read_header(idle),
            Connection::ShmTx(_) => return Err(not_this_way()),
            Connection::Socket(_) | Connection::Uring(_) => {}
        }
        let mut head = [0u8; HEADER_BYTES];
        let mut got = 0;
        while got < HEADER_BYTES {
            let r = match self {
                Connection::Socket(s) => s.read(&mut head[got..]),
                Connection::Uring(u) => u.read(&mut head[got..]),
                Connection::ShmTx(_) | Connection::ShmRx(_) => unreachable!("returned above"),
            };
            match r {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) && (got > 0 || idle()) => {}
                Err(e) => return Err(e),
            }
        }
        DataHeader::decode(&head)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
    }

    pub(crate) fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        match self {
            Connection::Socket(s) => s.read_exact(buf),
            Connection::Uring(u) => u.read_exact(buf),
            Connection::ShmRx(r) => r.read_exact(buf),
            Connection::ShmTx(_) => Err(not_this_way()),
        }
    }

    /// Hands the next `len` payload bytes to `f`: read into the staging buffer (a registered
    /// fixed buffer under io_uring), or in place in a shared-memory ring (no copy).
    pub(crate) fn with_payload<R>(
        &mut self,
        staging: &mut PinnedBuf,
        len: usize,
        f: impl FnOnce(&[u8]) -> R,
    ) -> io::Result<R> {
        match self {
            Connection::Socket(s) => s.read_exact(&mut staging[..len])?,
            Connection::Uring(u) => u.read_exact_fixed(staging, len)?,
            Connection::ShmRx(r) => return r.with_payload(len, &mut staging[..], f),
            Connection::ShmTx(_) => return Err(not_this_way()),
        }
        Ok(f(&staging[..len]))
    }

    pub(crate) fn discard(&mut self, len: usize) -> io::Result<()> {
        match self {
            Connection::Socket(s) => concord_transport::socket::discard(s, len),
            Connection::Uring(u) => u.discard(len),
            Connection::ShmRx(r) => r.discard(len),
            Connection::ShmTx(_) => Err(not_this_way()),
        }
    }

    /// Looks for incoming bytes without the connection (its RX thread, waiting unlocked).
    pub(crate) fn probe(&self) -> Probe {
        match self {
            Connection::Socket(s) => Probe::Fd(s.as_raw_fd()),
            Connection::Uring(u) => Probe::Fd(u.as_tcp().as_raw_fd()),
            Connection::ShmRx(r) => Probe::Shm(r.probe()),
            Connection::ShmTx(w) => Probe::Fd(w.socket().as_raw_fd()),
        }
    }

    /// Whether bytes are waiting to be read (a read would not block).
    pub(crate) fn readable_now(&self) -> bool {
        match self {
            Connection::ShmRx(r) => r.readable(),
            _ => self.probe().readable(),
        }
    }

    /// Registers `pool` as fixed buffers (io_uring); returns why not, if it could not.
    pub(crate) fn register(&mut self, pool: &PinnedPool) -> Option<String> {
        match self {
            Connection::Socket(_) | Connection::ShmTx(_) | Connection::ShmRx(_) => None,
            Connection::Uring(u) => {
                if u.register_pool(pool) {
                    None
                } else {
                    u.fixed_buffers_reason().map(str::to_string)
                }
            }
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}
