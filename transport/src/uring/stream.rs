//! A connected TCP stream driven through its own io_uring.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use io_uring::{opcode, squeue, types};

use super::probe::{errno_text, probe};
use super::ring::{Outcome, Ring};
use super::stats::{bump, COUNTERS};
use crate::buffers::{PinnedBuf, PinnedPool};
use crate::frame::{DataHeader, HEADER_BYTES};
use crate::{Result, TransportError};

/// Builds an operation on the stream's socket: its registered index (`IORING_REGISTER_FILES`,
/// which spares the kernel a descriptor lookup and reference count per operation) where the
/// registration worked, else the descriptor.
macro_rules! on_socket {
    ($stream:expr, $target:ident => $op:expr) => {
        if $stream.fixed_file {
            let $target = types::Fixed(0);
            $op
        } else {
            let $target = types::Fd($stream.fd);
            $op
        }
    };
}

/// Most bytes one submission asks for (results are `i32`; keep far from the edge).
const MAX_OP_BYTES: usize = 1 << 30;
/// `IORING_SEND_ZC_REPORT_USAGE` (Linux 6.2): the notification says whether the kernel copied.
const SEND_ZC_REPORT_USAGE: u16 = 1 << 3;
/// `IORING_NOTIF_USAGE_ZC_COPIED`: set in a notification's result when the data was copied.
const NOTIF_USAGE_ZC_COPIED: i32 = 1 << 31;

/// Transfers of at most this many bytes skip the ring: a read of that size, or a frame whose
/// payload is that size (its header comes on top, so that a small collective's smallest
/// sub-chunk, 64 KiB, takes the same path on both ends). Such a frame first tries one plain
/// non-blocking `sendmsg(2)` (the ring sends only what did not fit); a read uses non-blocking
/// `recv(2)` calls and waits in `poll(2)`. A synchronous ring round trip (the operation, its
/// linked timeout, the wait) costs more than the syscall it replaces, and a small collective is
/// a chain of tiny frames: 4 KiB all-reduces took 61 us through the ring against 43 us on plain
/// sockets (2 peers, the development VM, medians of 8 interleaved rounds). Everything larger
/// is carried by io_uring; [`UringStats`](super::UringStats) counts both.
pub const DIRECT_MAX_BYTES: usize = 64 * 1024;

/// Zero-copy sends are off unless asked for: over loopback the kernel copies anyway and the
/// extra notification makes them slower (see `benches/benches/transport.rs`).
pub const DEFAULT_ZERO_COPY: bool = false;

/// The socket, shared with the [`ShutdownHandle`]s so that its descriptor stays open (and cannot
/// be reused for another file) while any handle lives.
#[derive(Debug)]
struct Shared {
    stream: TcpStream,
    /// Set by [`ShutdownHandle::shutdown`]: errors after it are reported as a local abort.
    shut: AtomicBool,
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
    ring: Ring,
    shared: Arc<Shared>,
    fd: RawFd,
    io_timeout: Option<Duration>,
    zero_copy: bool,
    zc_supported: bool,
    zc_flags: u16,
    /// The pool registered as this ring's fixed buffers; holding it keeps the memory mapped for
    /// as long as the ring (and the kernel's registration) lives.
    fixed: Option<PinnedPool>,
    fixed_reason: Option<String>,
    read_fixed_supported: bool,
    send_waitall: bool,
    /// Frames and reads up to this size skip the ring ([`DIRECT_MAX_BYTES`]).
    direct_max: usize,
    /// The socket is the ring's registered file 0 (operations name it by index).
    fixed_file: bool,
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

    /// Writes a frame header and its payload in one submission (`SENDMSG` with two iovecs, or
    /// `SENDMSG_ZC` when zero-copy is on), resubmitting the remainder after a short send.
    pub fn write_frame(&mut self, header: &DataHeader, payload: &[u8]) -> io::Result<()> {
        assert_eq!(
            header.len as usize,
            payload.len(),
            "header announces the payload's length"
        );
        let head = header.encode();
        self.send_all(&head, payload)
    }

    /// Reads exactly `buf.len()` bytes (`RECV` with `MSG_WAITALL`, looping on short reads; at
    /// most [`DIRECT_MAX_BYTES`]: plain `recv(2)`, see there). End of stream first is
    /// `UnexpectedEof`.
    pub fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        if buf.len() <= self.direct_max {
            return self.read_exact_direct(buf);
        }
        let mut done = 0usize;
        while done < buf.len() {
            let ask = (buf.len() - done).min(MAX_OP_BYTES);
            let rest = &mut buf[done..];
            let op = on_socket!(self, t => opcode::Recv::new(t, rest.as_mut_ptr(), ask as u32)
                .flags(libc::MSG_WAITALL)
                .build());
            // SAFETY: `rest` is exclusively borrowed for the call and `run` returns only after
            // the kernel is done writing into it.
            let out = unsafe { self.ring.run(op, self.io_timeout, self.fd) }?;
            done += self.received(out, ask, "receive")?;
        }
        Ok(())
    }

    /// Reads exactly `len` bytes into the start of `buf`. When `buf`'s pool is registered with
    /// this stream ([`UringStream::register_pool`]) and `len` is over [`DIRECT_MAX_BYTES`],
    /// this uses `IORING_OP_READ_FIXED`; otherwise it is [`UringStream::read_exact`].
    pub fn read_exact_fixed(&mut self, buf: &mut PinnedBuf, len: usize) -> io::Result<()> {
        assert!(
            len <= buf.len(),
            "reading {len} B into a {} B buffer",
            buf.len()
        );
        let registered = self.fixed.as_ref().is_some_and(|p| p.id() == buf.pool_id());
        if !registered || len <= self.direct_max {
            return self.read_exact(&mut buf[..len]);
        }
        let index =
            u16::try_from(buf.index()).expect("registered pools have at most u16::MAX buffers");
        let mut done = 0usize;
        while done < len {
            let ask = len - done;
            let rest = &mut buf[done..len];
            let op = on_socket!(self, t => opcode::ReadFixed::new(t, rest.as_mut_ptr(), ask as u32, index)
                    .build());
            // SAFETY: `rest` lies inside fixed buffer `index`, is exclusively borrowed for the
            // call, and `run` returns only after the kernel is done writing into it.
            let out = unsafe { self.ring.run(op, self.io_timeout, self.fd) }?;
            done += self.received(out, ask, "fixed-buffer receive")?;
            bump(&COUNTERS.fixed_reads, 1);
        }
        Ok(())
    }

    /// Reads and decodes one frame header.
    pub fn read_header(&mut self) -> Result<DataHeader> {
        let mut head = [0u8; HEADER_BYTES];
        self.read_exact(&mut head)
            .map_err(|e| TransportError::io("reading a data frame header", e))?;
        DataHeader::decode(&head)
    }

    /// Reads and throws away `len` bytes (leftovers of an aborted attempt).
    pub fn discard(&mut self, len: usize) -> io::Result<()> {
        let mut scratch = [0u8; 16 * 1024];
        let mut left = len;
        while left > 0 {
            let n = left.min(scratch.len());
            self.read_exact(&mut scratch[..n])?;
            left -= n;
        }
        Ok(())
    }

    /// Sends `a` then `b`, resubmitting whatever a completion leaves unsent.
    fn send_all(&mut self, a: &[u8], b: &[u8]) -> io::Result<()> {
        let total = a.len() + b.len();
        let mut done = self.direct_send(a, b)?;
        while done < total {
            let sent = self.send_once(a, b, done)?;
            if sent == 0 {
                return Err(self.error(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the peer stopped reading",
                )));
            }
            done += sent;
        }
        Ok(())
    }

    /// One send submission of `a ++ b` from byte `done` on; returns the bytes sent.
    fn send_once(&mut self, a: &[u8], b: &[u8], done: usize) -> io::Result<usize> {
        let (ra, rb) = if done < a.len() {
            (&a[done..], b)
        } else {
            (&a[a.len()..], &b[done - a.len()..])
        };
        let mut iov = [iovec(ra), iovec(rb)];
        // Cap one submission; the loop in send_all sends the rest.
        let room = MAX_OP_BYTES.saturating_sub(iov[0].iov_len);
        iov[1].iov_len = iov[1].iov_len.min(room);
        let first = usize::from(iov[0].iov_len == 0);
        let ask = iov[0].iov_len + iov[1].iov_len;
        // SAFETY: msghdr is plain old data; all-zero is "no address, no control data".
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov[first..].as_mut_ptr();
        msg.msg_iovlen = (2 - first) as _;
        let mut flags = libc::MSG_NOSIGNAL as u32;
        if self.send_waitall {
            flags |= libc::MSG_WAITALL as u32;
        }
        let zc = self.zero_copy;
        let op: squeue::Entry = if zc {
            on_socket!(self, t => opcode::SendMsgZc::new(t, &msg)
                .flags(flags)
                .ioprio(self.zc_flags)
                .build())
        } else {
            on_socket!(self, t => opcode::SendMsg::new(t, &msg)
                .flags(flags)
                .build())
        };
        // SAFETY: `msg`, `iov` and the bytes they point to (borrowed from the caller) live on
        // this frame or beyond until `run` returns, which is after the kernel's last use of them
        // (for zero-copy, after the notification that it released the pages).
        let out = unsafe { self.ring.run(op, self.io_timeout, self.fd) }?;
        if zc && out.res == -libc::EINVAL && self.zc_flags != 0 {
            // Linux 6.0/6.1 know SENDMSG_ZC but not the usage report: retry without it.
            self.zc_flags = 0;
            return self.send_once(a, b, done);
        }
        if zc && out.res >= 0 {
            bump(&COUNTERS.zc_sends, 1);
            if out.notif.is_some_and(|n| n & NOTIF_USAGE_ZC_COPIED != 0) {
                bump(&COUNTERS.zc_copied, 1);
            }
        }
        let sent = self.progress(out, "send")?;
        bump(&COUNTERS.bytes_sent, sent as u64);
        if sent < ask {
            bump(&COUNTERS.short_sends, 1);
        }
        Ok(sent)
    }

    /// For a frame (header `a`, payload `b`) whose payload is at most `direct_max` bytes (and no
    /// zero copy; `direct_max` 0 turns this off): one non-blocking `sendmsg(2)` of `a ++ b`.
    /// Returns the bytes it moved, 0 where the socket buffer was full.
    fn direct_send(&mut self, a: &[u8], b: &[u8]) -> io::Result<usize> {
        if self.zero_copy || self.direct_max == 0 || b.len() > self.direct_max {
            return Ok(0);
        }
        let mut iov = [iovec(a), iovec(b)];
        // SAFETY: msghdr is plain old data; all-zero is "no address, no control data".
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = 2;
        // SAFETY: `msg` points to two iovecs over `a` and `b`, borrowed for the call; the
        // kernel copies what it takes before returning.
        let res = unsafe { libc::sendmsg(self.fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        let sent = self.direct_result(res, "send")?;
        bump(&COUNTERS.direct_bytes_sent, sent as u64);
        Ok(sent)
    }

    /// A small read without the ring: non-blocking `recv(2)` calls, waiting in `poll(2)` while
    /// nothing has arrived, for at most the I/O timeout at a time (the ring's rule: no progress
    /// for `io_timeout` is `TimedOut`). A shutdown from another thread wakes the poll; the
    /// `recv` then sees the end of the stream.
    fn read_exact_direct(&mut self, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            match self.try_recv(&mut buf[done..])? {
                Some(0) => {
                    return Err(self.error(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed the connection",
                    )))
                }
                Some(got) => done += got,
                None => self.wait_readable()?,
            }
        }
        Ok(())
    }

    /// One non-blocking `recv(2)`: `Some(bytes)` (0 at the end of the stream), `None` where
    /// nothing had arrived.
    fn try_recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: `buf` is exclusively borrowed and valid for `buf.len()` bytes of writes.
        let res = unsafe {
            libc::recv(
                self.fd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if res == 0 {
            return Ok(Some(0));
        }
        let got = self.direct_result(res, "receive")?;
        bump(&COUNTERS.direct_bytes_received, got as u64);
        Ok((got > 0).then_some(got))
    }

    /// Waits in `poll(2)` until the socket is readable (or hung up), for at most the I/O
    /// timeout; `TimedOut` after that.
    fn wait_readable(&self) -> io::Result<()> {
        if crate::spin::wait_readable(self.fd, self.io_timeout) {
            return Ok(());
        }
        bump(&COUNTERS.timeouts, 1);
        let waited_ms = self.io_timeout.map_or(0, |t| t.as_millis());
        Err(self.error(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("receive made no progress for {waited_ms} ms (the peer is silent or stalled)"),
        )))
    }

    /// A plain syscall's result: bytes moved, 0 for "would block" (or a signal), else the error.
    fn direct_result(&self, res: isize, what: &str) -> io::Result<usize> {
        if res >= 0 {
            return Ok(res as usize);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
            _ => Err(self.error(io::Error::new(e.kind(), format!("{what}: {e}")))),
        }
    }

    /// Bytes a receive moved; end of stream is an error.
    fn received(&mut self, out: Outcome, ask: usize, what: &str) -> io::Result<usize> {
        let got = self.progress(out, what)?;
        if got == 0 {
            return Err(self.error(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the peer closed the connection",
            )));
        }
        bump(&COUNTERS.bytes_received, got as u64);
        if got < ask {
            bump(&COUNTERS.short_recvs, 1);
        }
        Ok(got)
    }

    /// Bytes an operation moved, or the error it ended with (a timeout with no progress is
    /// `TimedOut`; a timeout after some progress is progress, and the caller asks again).
    fn progress(&mut self, out: Outcome, what: &str) -> io::Result<usize> {
        if out.res >= 0 {
            return Ok(out.res as usize);
        }
        if out.timed_out {
            bump(&COUNTERS.timeouts, 1);
            let waited_ms = self.io_timeout.map_or(0, |t| t.as_millis());
            return Err(self.error(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "{what} made no progress for {waited_ms} ms (the peer is silent or stalled)"
                ),
            )));
        }
        Err(self.error(io::Error::from_raw_os_error(-out.res)))
    }

    /// Reports an error as a local abort when the stream was shut down on purpose.
    fn error(&self, e: io::Error) -> io::Error {
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

fn iovec(bytes: &[u8]) -> libc::iovec {
    libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
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

/// One receive of up to `buf.len()` bytes (no `MSG_WAITALL`), so generic code (handshakes,
/// frame headers) can use the stream; at most [`DIRECT_MAX_BYTES`] without the ring. End of
/// stream is `Ok(0)`.
impl Read for UringStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if buf.len() <= self.direct_max {
            loop {
                match self.try_recv(buf)? {
                    Some(got) => return Ok(got),
                    None => self.wait_readable()?,
                }
            }
        }
        let ask = buf.len().min(MAX_OP_BYTES);
        let op = on_socket!(self, t => opcode::Recv::new(t, buf.as_mut_ptr(), ask as u32).build());
        // SAFETY: `buf` is exclusively borrowed and `run` returns after the kernel's last write.
        let out = unsafe { self.ring.run(op, self.io_timeout, self.fd) }?;
        let got = self.progress(out, "receive")?;
        bump(&COUNTERS.bytes_received, got as u64);
        Ok(got)
    }
}

/// One send submission of `buf` (all of it unless the timeout or an error interrupts).
impl Write for UringStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        self.send_once(&[], buf, 0)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
