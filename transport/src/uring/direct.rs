//! A [`UringStream`]'s small transfers without the ring (at most
//! [`DIRECT_MAX_BYTES`](super::DIRECT_MAX_BYTES), see there for why): one non-blocking
//! `sendmsg(2)` for a small frame, non-blocking `recv(2)` calls waiting in `poll(2)` for a small
//! read. Timeouts and shutdowns follow the ring's rules, so callers cannot tell the paths apart.

use std::io;

use super::conn::{iovec, msghdr, UringStream};
use super::stats::{bump, COUNTERS};

impl UringStream {
    /// For a frame (header `a`, payload `b`) whose payload is at most `direct_max` bytes (and no
    /// zero copy; `direct_max` 0 turns this off): one non-blocking `sendmsg(2)` of `a ++ b`.
    /// Returns the bytes it moved, 0 where the socket buffer was full.
    pub(super) fn direct_send(&mut self, a: &[u8], b: &[u8]) -> io::Result<usize> {
        if self.zero_copy || self.direct_max == 0 || b.len() > self.direct_max {
            return Ok(0);
        }
        let mut iov = [iovec(a), iovec(b)];
        let msg = msghdr(&mut iov);
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
    pub(super) fn read_exact_direct(&mut self, buf: &mut [u8]) -> io::Result<()> {
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
    pub(super) fn try_recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
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
    pub(super) fn wait_readable(&self) -> io::Result<()> {
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
}
