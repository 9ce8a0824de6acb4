//! One data connection as a TX or RX thread drives it: plain socket or io_uring.

use std::io::{self, Read};
use std::net::{Shutdown, TcpStream};

use concord_transport::frame::{DataHeader, HEADER_BYTES};
use concord_transport::socket::write_frame;
use concord_transport::uring::ShutdownHandle;
use concord_transport::{BackendKind, PinnedBuf, PinnedPool, UringStream};

/// A connection owned by the thread that drives it.
pub(crate) enum Connection {
    Socket(TcpStream),
    Uring(Box<UringStream>),
}

/// What another thread keeps to tear a connection down (waking its blocked owner).
pub(crate) enum Stopper {
    Socket(TcpStream),
    Uring(ShutdownHandle),
}

impl Stopper {
    pub(crate) fn stop(&self) {
        match self {
            Stopper::Socket(s) => {
                let _ = s.shutdown(Shutdown::Both);
            }
            Stopper::Uring(h) => h.shutdown(),
        }
    }
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
        }
    }

    pub(crate) fn write_frame(&mut self, header: &DataHeader, payload: &[u8]) -> io::Result<()> {
        match self {
            Connection::Socket(s) => write_frame(s, header, payload),
            Connection::Uring(u) => u.write_frame(header, payload),
        }
    }

    /// Reads the next header. While `idle()` says no collective expects data, a read timeout is
    /// only a quiet connection: keep waiting. Bytes are never lost: a timeout that interrupts a
    /// header mid-way is retried for the rest.
    pub(crate) fn read_header(&mut self, idle: impl Fn() -> bool) -> io::Result<DataHeader> {
        let mut head = [0u8; HEADER_BYTES];
        let mut got = 0;
        while got < HEADER_BYTES {
            let r = match self {
                Connection::Socket(s) => s.read(&mut head[got..]),
                Connection::Uring(u) => u.read(&mut head[got..]),
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
        }
    }

    /// Reads `len` bytes into the staging buffer (a registered fixed buffer under io_uring).
    pub(crate) fn read_staged(&mut self, staging: &mut PinnedBuf, len: usize) -> io::Result<()> {
        match self {
            Connection::Socket(s) => s.read_exact(&mut staging[..len]),
            Connection::Uring(u) => u.read_exact_fixed(staging, len),
        }
    }

    pub(crate) fn discard(&mut self, len: usize) -> io::Result<()> {
        match self {
            Connection::Socket(s) => concord_transport::socket::discard(s, len),
            Connection::Uring(u) => u.discard(len),
        }
    }

    /// The socket's descriptor (to wait on it without the stream).
    pub(crate) fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        match self {
            Connection::Socket(s) => s.as_raw_fd(),
            Connection::Uring(u) => u.as_tcp().as_raw_fd(),
        }
    }

    /// Whether bytes are waiting in the socket's receive queue (a read would not block).
    pub(crate) fn readable_now(&self) -> bool {
        concord_transport::spin::readable(self.raw_fd())
    }

    /// Registers `pool` as fixed buffers (io_uring); returns why not, if it could not.
    pub(crate) fn register(&mut self, pool: &PinnedPool) -> Option<String> {
        match self {
            Connection::Socket(_) => None,
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
