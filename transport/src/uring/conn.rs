//! The io_uring connection type: a connected TCP stream with its own ring, how it is built,
//! configured (timeouts, zero copy, fixed buffers) and torn down, and the [`ShutdownHandle`]
//! that stops it from another thread. Its transfers live beside it: through the ring in
//! `ring_io.rs`, small ones by plain syscalls in `direct.rs`.

use std::fmt;
use std::io;
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::probe::{errno_text, probe};
use super::ring::Ring;
use crate::buffers::PinnedPool;

/// Most bytes one submission asks for (results are `i32`; keep far from the edge).
pub(super) const MAX_OP_BYTES: usize = 1 << 30;
/// `IORING_SEND_ZC_REPORT_USAGE` (Linux 6.2): the notification says whether the kernel copied.
const SEND_ZC_REPORT_USAGE: u16 = 1 << 3;
/// `IORING_NOTIF_USAGE_ZC_COPIED`: set in a notification's result when the data was copied.
pub(super) const NOTIF_USAGE_ZC_COPIED: i32 = 1 << 31;

/// Transfers of at most this many bytes skip the ring: a read of that size, or a frame whose
/// payload is that size (its header comes on top, so that a small collective's smallest
/// sub-chunk, 64 KiB, takes the same path on both ends). Such a frame first tries one plain
/// non-blocking `sendmsg(2)` (the ring sends only what did not fit); a read uses non-blocking
/// `recv(2)` calls and waits in `poll(2)`. A synchronous ring round trip (the operation, its
/// linked timeout, the wait) costs more than the syscall it replaces, and a small collective is
/// a chain of tiny frames: 4 KiB all-reduces took 61 us through the ring against 43 us on plain
/// sockets (2 peers on a 2 vCPU Intel Xeon, medians of 8 interleaved rounds). Everything
/// larger is carried by io_uring; [`UringStats`](super::UringStats) counts both.
pub const DIRECT_MAX_BYTES: usize = 64 * 1024;

/// Zero-copy sends are off unless asked for: over loopback the kernel copies anyway and the
/// extra notification makes them slower (see `benches/benches/transport.rs`).
pub const DEFAULT_ZERO_COPY: bool = false;

/// The socket, shared with the [`ShutdownHandle`]s so that its descriptor stays open (and cannot
/// be reused for another file) while any handle lives.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) stream: TcpStream,
    /// Set by [`ShutdownHandle::shutdown`]: errors after it are reported as a local abort.
    pub(super) shut: AtomicBool,
}

/// A connected TCP stream whose reads and writes go through a private io_uring.
///
/// One ring per stream, so each stream is driven by one thread at a time (`&mut self`) while
/// other threads drive other streams; the stream may move between threads (`Send`). Every method
/// waits for its operation to complete before returning, so the buffers passed in are free again
/// on return. A silent peer gives [`io::ErrorKind::TimedOut`] after the stream's I/O timeout
/// (io_uring ignores `SO_RCVTIMEO`, so the timeout is that of the wait for the operation, which
/// is then cancelled, or a linked `IORING_OP_LINK_TIMEOUT` on kernels before 5.11, or the
/// `poll(2)` timeout for transfers of at most [`DIRECT_MAX_BYTES`], which skip the ring); a
/// [`ShutdownHandle`] stops a blocked call from any thread.
///
/// ```no_run
/// use concord_transport::frame::DataHeader;
/// use concord_transport::uring::UringStream;
/// let tcp = std::net::TcpStream::connect("127.0.0.1:7000")?;
/// let mut stream = UringStream::new(tcp)?;
/// let payload = vec![7u8; 4096];
/// let header = DataHeader { len: 4096, tag: 1, seq: 1, step: 0, sub: 0 };
/// stream.write_frame(&header, &payload)?;
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct UringStream {
    /// Declared first so it is dropped first: the ring (and the kernel's registration of the
    /// pool in `fixed`) goes before the pool clone that keeps the memory mapped.
    pub(super) ring: Ring,
    pub(super) shared: Arc<Shared>,
    pub(super) fd: RawFd,
    pub(super) io_timeout: Option<Duration>,
    pub(super) zero_copy: bool,
    pub(super) zc_supported: bool,
    pub(super) zc_flags: u16,
    /// The pool registered as this ring's fixed buffers; holding it keeps the memory mapped for
    /// as long as the ring (and the kernel's registration) lives.
    pub(super) fixed: Option<PinnedPool>,
    pub(super) fixed_reason: Option<String>,
    pub(super) read_fixed_supported: bool,
    pub(super) send_waitall: bool,
    /// Frames and reads up to this size skip the ring ([`DIRECT_MAX_BYTES`]).
    pub(super) direct_max: usize,
    /// The socket is the ring's registered file 0 (operations name it by index).
    pub(super) fixed_file: bool,
}

/// Stops a [`UringStream`] from any thread: `shutdown(2)` on its socket, which makes a read or
/// write blocked on the owning thread return an error at once.
#[derive(Clone, Debug)]
pub struct ShutdownHandle {
    shared: Arc<Shared>,
}

impl ShutdownHandle {
    /// Shuts the connection down both ways. Idempotent; errors (already closed) are ignored.
    pub fn shutdown(&self) {
        self.shared.shut.store(true, Ordering::Release);
        let _ = self.shared.stream.shutdown(Shutdown::Both);
    }

    /// Whether [`ShutdownHandle::shutdown`] was called on this stream.
    pub fn is_shut_down(&self) -> bool {
        self.shared.shut.load(Ordering::Acquire)
    }
}

impl UringStream {
    /// Wraps a connected stream. The I/O timeout starts as the socket's read timeout
    /// (`SO_RCVTIMEO`, as set by `TcpStream::set_read_timeout`). Fails with
    /// [`io::ErrorKind::Unsupported`] and the probe's reason when io_uring cannot run here.
    pub fn new(stream: TcpStream) -> io::Result<UringStream> {
        let info = probe().map_err(|why| io::Error::new(io::ErrorKind::Unsupported, why))?;
        let mut ring = Ring::new(info.coop_taskrun)?;
        let io_timeout = stream.read_timeout()?;
        // Registered files are not counted against RLIMIT_MEMLOCK; where the kernel refuses
        // anyway, operations name the descriptor.
        let fixed_file = ring.register_file(stream.as_raw_fd()).is_ok();
        // The ring polls the socket itself; blocking mode only matters to code that reads the
        // TcpStream directly, which we leave as the caller set it.
        Ok(UringStream {
            ring,
            fd: stream.as_raw_fd(),
            shared: Arc::new(Shared {
                stream,
                shut: AtomicBool::new(false),
            }),
            io_timeout,
            zero_copy: DEFAULT_ZERO_COPY && info.send_zc,
            zc_supported: info.send_zc,
            zc_flags: SEND_ZC_REPORT_USAGE,
            fixed: None,
            fixed_reason: None,
            read_fixed_supported: info.read_fixed,
            send_waitall: true,
            direct_max: DIRECT_MAX_BYTES,
            fixed_file,
        })
    }

    /// The largest read or frame payload that first tries a plain non-blocking syscall
    /// ([`DIRECT_MAX_BYTES`] by default; 0 sends everything through the ring). Exposed for tests
    /// that count the ring's work on small transfers.
    #[doc(hidden)]
    pub fn set_direct_max(&mut self, bytes: usize) {
        self.direct_max = bytes;
    }

    /// Whether a wait's timeout is the wait's own (`IORING_ENTER_EXT_ARG`, Linux 5.11) rather
    /// than an `IORING_OP_LINK_TIMEOUT` submitted with every operation.
    pub fn wait_timeouts(&self) -> bool {
        self.ring.wait_timeouts()
    }

    /// Whether operations name the socket by its registered index (`IORING_REGISTER_FILES`)
    /// rather than by descriptor.
    pub fn has_fixed_file(&self) -> bool {
        self.fixed_file
    }

    /// Names the socket by descriptor in every operation from now on, as where registering it
    /// failed. Exposed for tests of that path.
    #[doc(hidden)]
    pub fn use_descriptor(&mut self) {
        self.fixed_file = false;
    }

    /// Submits a linked timeout with every operation even where the kernel has wait timeouts
    /// (what kernels before 5.11 get). Exposed for tests of that path.
    #[doc(hidden)]
    pub fn force_linked_timeouts(&mut self) {
        self.ring.force_linked_timeouts();
    }

    /// The socket (for addresses and options; do not read or write it directly while frames
    /// flow through the ring).
    pub fn as_tcp(&self) -> &TcpStream {
        &self.shared.stream
    }

    /// How long one wait may last without progress before it fails with `TimedOut`; `None`
    /// waits forever (a [`ShutdownHandle`] still ends it).
    pub fn set_io_timeout(&mut self, timeout: Option<Duration>) {
        assert!(
            timeout != Some(Duration::ZERO),
            "a zero I/O timeout means no timeout: pass None"
        );
        self.io_timeout = timeout;
    }

    /// The current I/O timeout.
    pub fn io_timeout(&self) -> Option<Duration> {
        self.io_timeout
    }

    /// Sends payloads with `IORING_OP_SENDMSG_ZC` (the kernel pins the pages instead of copying;
    /// each send then waits for a second completion saying the pages are released). Pays off
    /// only on real NICs with large payloads; over loopback it is slower. Fails with
    /// `Unsupported` when the kernel lacks it (Linux 6.1+).
    pub fn set_zero_copy(&mut self, on: bool) -> io::Result<()> {
        if on && !self.zc_supported {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "this kernel's io_uring has no IORING_OP_SENDMSG_ZC (Linux 6.1 or newer)",
            ));
        }
        self.zero_copy = on;
        Ok(())
    }

    /// Whether zero-copy sends are on.
    pub fn zero_copy(&self) -> bool {
        self.zero_copy
    }

    /// Whether one send submission asks the kernel to send everything (`MSG_WAITALL`, the
    /// default) or returns after whatever fits the socket buffer, leaving the resubmission of the
    /// remainder to us. Exposed for tests of the short-send path.
    #[doc(hidden)]
    pub fn set_send_waitall(&mut self, on: bool) {
        self.send_waitall = on;
    }

    /// A handle that shuts this stream down from any thread.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Registers `pool` as this ring's fixed buffers so that [`UringStream::read_exact_fixed`]
    /// receives with `IORING_OP_READ_FIXED` (no page pinning per receive). Returns whether that
    /// worked; when not (old kernel, the registration refused by `RLIMIT_MEMLOCK`, another pool
    /// already registered) the stream keeps using plain receives and
    /// [`UringStream::fixed_buffers_reason`] says why. Each registration pins the pool again
    /// and is counted against `RLIMIT_MEMLOCK` again (for users without `CAP_IPC_LOCK`):
    /// register it only on the streams that receive.
    pub fn register_pool(&mut self, pool: &PinnedPool) -> bool {
        if let Some(current) = &self.fixed {
            if current.id() == pool.id() {
                return true;
            }
            self.fixed_reason =
                Some("another pool is already registered with this stream's ring".into());
            return false;
        }
        if !self.read_fixed_supported {
            self.fixed_reason = Some("this kernel's io_uring has no IORING_OP_READ_FIXED".into());
            return false;
        }
        if pool.buffers() > usize::from(u16::MAX) || pool.buffer_bytes() > MAX_OP_BYTES {
            self.fixed_reason = Some(format!(
                "a pool of {} x {} B is too large to register as fixed buffers",
                pool.buffers(),
                pool.buffer_bytes()
            ));
            return false;
        }
        let iovecs = pool.iovecs();
        // SAFETY: we keep a clone of `pool` in `self.fixed` for as long as the ring lives (the
        // ring is dropped first, see the field order), so the memory stays mapped.
        match unsafe { self.ring.register_buffers(&iovecs) } {
            Ok(()) => {
                self.fixed = Some(pool.clone());
                self.fixed_reason = None;
                true
            }
            Err(e) => {
                let hint = if e.raw_os_error() == Some(libc::ENOMEM) {
                    " (over RLIMIT_MEMLOCK: raise `ulimit -l` or grant CAP_IPC_LOCK)"
                } else {
                    ""
                };
                self.fixed_reason = Some(format!(
                    "registering {} x {} KiB staging buffers with io_uring failed: {}{hint}; receiving without fixed buffers",
                    pool.buffers(),
                    pool.buffer_bytes() / 1024,
                    errno_text(&e)
                ));
                false
            }
        }
    }

    /// Why fixed-buffer receives are off, if [`UringStream::register_pool`] failed.
    pub fn fixed_buffers_reason(&self) -> Option<&str> {
        self.fixed_reason.as_deref()
    }

    /// Whether a pool is registered as this ring's fixed buffers.
    pub fn has_fixed_buffers(&self) -> bool {
        self.fixed.is_some()
    }

    /// Reports an error as a local abort when the stream was shut down on purpose.
    pub(super) fn error(&self, e: io::Error) -> io::Error {
        if self.shared.shut.load(Ordering::Acquire) {
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("the stream was shut down by this process ({e})"),
            )
        } else {
            e
        }
    }
}

impl Drop for UringStream {
    fn drop(&mut self) {
        // Handles may keep the descriptor open; the peer must still see the connection end.
        let _ = self.shared.stream.shutdown(Shutdown::Both);
    }
}

impl fmt::Debug for UringStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UringStream")
            .field("fd", &self.fd)
            .field("io_timeout", &self.io_timeout)
            .field("zero_copy", &self.zero_copy)
            .field("fixed_buffers", &self.fixed.is_some())
            .finish()
    }
}

/// An iovec over `bytes`, for sends (the kernel only reads through it).
pub(super) fn iovec(bytes: &[u8]) -> libc::iovec {
    libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    }
}

/// A message header with no address and no control data over `iov`, shared by both send paths
/// (the ring's `SENDMSG` and the direct `sendmsg(2)`). It points into `iov`: keep `iov` alive
/// and unmoved until the kernel is done with the message.
pub(super) fn msghdr(iov: &mut [libc::iovec]) -> libc::msghdr {
    // SAFETY: msghdr is plain old data; all-zero is "no address, no control data".
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = iov.len() as _;
    msg
}
