//! A [`UringStream`]'s transfers through its ring: frame writes in one `SENDMSG` (or
//! `SENDMSG_ZC`) submission, exact and fixed-buffer reads, and the `Read`/`Write` impls. Each
//! waits in [`Ring::run`](super::ring::Ring::run) until the kernel is done with the caller's
//! memory, with the stream's I/O timeout; results turn into bytes moved or a named error here.

use std::io::{self, Read, Write};

use io_uring::{opcode, squeue, types};

use super::conn::{iovec, msghdr, UringStream, MAX_OP_BYTES, NOTIF_USAGE_ZC_COPIED};
use super::ring::Outcome;
use super::stats::{bump, COUNTERS};
use crate::buffers::PinnedBuf;
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

impl UringStream {
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
    /// most [`DIRECT_MAX_BYTES`](super::DIRECT_MAX_BYTES): plain `recv(2)`, see there). End of
    /// stream first is `UnexpectedEof`.
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
    /// this stream ([`UringStream::register_pool`]) and `len` is over
    /// [`DIRECT_MAX_BYTES`](super::DIRECT_MAX_BYTES), this uses `IORING_OP_READ_FIXED`;
    /// otherwise it is [`UringStream::read_exact`].
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
        let msg = msghdr(&mut iov[first..]);
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
}

/// One receive of up to `buf.len()` bytes (no `MSG_WAITALL`), so generic code (handshakes,
/// frame headers) can use the stream; at most [`DIRECT_MAX_BYTES`](super::DIRECT_MAX_BYTES)
/// without the ring. End of stream is `Ok(0)`.
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
