//! A one-way ring of data frames in a shared segment: one writer process, one reader process.
//!
//! The writer copies each frame (the 32-byte [`DataHeader`], then the payload) in at `head`
//! and publishes `head` with a release store; the reader reads at `tail`, hands a payload that
//! lies in one piece to its consumer in place (a reduction reads it there, no staging copy),
//! and publishes `tail` once done with the bytes, which only then may be written again. Every
//! frame starts 64-byte aligned; a frame of at most half the ring that would wrap is moved to
//! the ring's start behind a pad word, so that such frames are always in one piece.
//!
//! Waiting: a brief poll of the other end's position, then sleep on the TCP connection the
//! ring was negotiated over, which stays open as the **doorbell and liveness channel**: a
//! sleeper counts itself in the control block, and the other end, after each publish that finds
//! a sleeper, writes one byte to the socket. An idle end therefore sleeps in `poll` and uses no
//! CPU; a neighbour that dies (SIGKILL included) closes its socket, which ends every wait at
//! once with an error, as on TCP; a stopped one lets waits run into their timeout. Both
//! positions are checked on every read (never backwards, never more than the ring apart), so a
//! neighbour that scribbles on the control block fails the connection instead of confusing it.

use std::io;
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::segment::Segment;
use crate::frame::{DataHeader, HEADER_BYTES};

/// Word that fills the end of the ring when a frame moved to its start ("CPAD").
const PAD_MAGIC: u32 = 0x4441_5043;
/// Alignment of every frame in the ring.
const FRAME_ALIGN: u64 = 64;
/// How long a wait polls the other end's position before it sleeps on the doorbell.
const SPIN: Duration = Duration::from_micros(20);

/// What both ends of one process's side of a ring share: the mapping, the doorbell socket, and
/// whether the connection was stopped.
struct End {
    segment: Segment,
    bell: TcpStream,
    stopped: AtomicBool,
    /// How long one wait may last (the connection's I/O timeout).
    timeout: Option<Duration>,
}

impl End {
    fn capacity(&self) -> u64 {
        self.segment.capacity() as u64
    }

    fn check_stopped(&self) -> io::Result<()> {
        if self.stopped.load(Ordering::Acquire) {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the shared-memory connection was shut down",
            ));
        }
        Ok(())
    }

    /// Rings the other end's doorbell: one byte, never blocking (a full socket already holds
    /// enough rings to wake it; a closed one is found by the other end's own waits).
    fn ring(&self) {
        // SAFETY: sends one byte from a live local on a socket we own; errors are ignored.
        unsafe {
            libc::send(
                self.bell.as_raw_fd(),
                [1u8].as_ptr().cast(),
                1,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            );
        }
    }

    /// Sleeps until the doorbell rings or `left` passes, counted in `sleepers` (which the other
    /// end reads after each publish). `ready` is checked after counting in, so no ring is
    /// missed. Rings are drained; the other end's close is an error.
    fn sleep(
        &self,
        sleepers: &AtomicU32,
        left: Duration,
        ready: impl Fn() -> bool,
    ) -> io::Result<()> {
        sleepers.fetch_add(1, Ordering::SeqCst);
        let r = if ready() {
            Ok(())
        } else {
            self.wait_bell(left)
        };
        sleepers.fetch_sub(1, Ordering::SeqCst);
        // Stopping shuts the socket down too: say which it was.
        self.check_stopped()?;
        // A neighbour that wrote its last frames and left: what it wrote is still read.
        if r.is_err() && ready() {
            return Ok(());
        }
        r
    }

    fn wait_bell(&self, left: Duration) -> io::Result<()> {
        let fd = self.bell.as_raw_fd();
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the length given.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(())
            } else {
                Err(e)
            };
        }
        if r == 0 {
            return Ok(());
        }
        let mut sink = [0u8; 256];
        loop {
            // SAFETY: receives into a live local buffer of the length given.
            let n =
                unsafe { libc::recv(fd, sink.as_mut_ptr().cast(), sink.len(), libc::MSG_DONTWAIT) };
            match n {
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the neighbour closed the shared-memory connection",
                    ))
                }
                n if n > 0 => continue,
                _ => {
                    let e = io::Error::last_os_error();
                    match e.kind() {
                        io::ErrorKind::WouldBlock => return Ok(()),
                        io::ErrorKind::Interrupted => continue,
                        _ => return Err(e),
                    }
                }
            }
        }
    }
}

/// A wait's bounds: it polls for [`SPIN`], then sleeps until its timeout.
struct Wait {
    start: Instant,
    timeout: Option<Duration>,
}

impl Wait {
    fn new(end: &End) -> Wait {
        Wait {
            start: Instant::now(),
            timeout: end.timeout,
        }
    }

    fn spinning(&self) -> bool {
        self.start.elapsed() < SPIN
    }

    /// How long it may still sleep, or a timeout error.
    fn left(&self, what: &str) -> io::Result<Duration> {
        let Some(t) = self.timeout else {
            return Ok(Duration::from_secs(3600));
        };
        let left = t.saturating_sub(self.start.elapsed());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{what} for {} ms", t.as_millis()),
            ));
        }
        Ok(left)
    }
}

fn corrupt(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "the shared-memory ring's {what} is corrupt (the neighbour wrote outside the protocol)"
        ),
    )
}

fn align_up(x: u64) -> u64 {
    x.div_ceil(FRAME_ALIGN) * FRAME_ALIGN
}

/// The writing end: the sender's side of a ring connection.
pub struct ShmWriter {
    end: Arc<End>,
    /// Next byte to write (published up to `published`).
    head: u64,
    published: u64,
    /// The reader's tail as last read.
    tail: u64,
}

/// The reading end: the receiver's side of a ring connection.
pub struct ShmReader {
    end: Arc<End>,
    /// Next byte to read (published up to `published`).
    tail: u64,
    published: u64,
    /// Payload bytes of the current frame not yet consumed.
    frame_left: u64,
}

/// Shuts a ring connection down from another thread: every wait on it returns an error, and
/// the neighbour sees the socket close.
#[derive(Clone)]
pub struct ShmStopper(Arc<End>);

/// Looks at a reader's ring without holding the reader: whether a frame waits, and a sleep
/// until one may.
#[derive(Clone)]
pub struct ShmProbe(Arc<End>);

macro_rules! debug_end {
    ($t:ty) => {
        impl std::fmt::Debug for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($t)).finish_non_exhaustive()
            }
        }
    };
}
debug_end!(ShmWriter);
debug_end!(ShmReader);
debug_end!(ShmStopper);
debug_end!(ShmProbe);

/// The two ends of a ring in one process, for tests and for peers that cannot share memory
/// with themselves otherwise.
pub fn pair(
    segment_for_writer: Segment,
    writer_bell: TcpStream,
    segment_for_reader: Segment,
    reader_bell: TcpStream,
    timeout: Option<Duration>,
) -> (ShmWriter, ShmReader) {
    (
        ShmWriter::new(segment_for_writer, writer_bell, timeout),
        ShmReader::new(segment_for_reader, reader_bell, timeout),
    )
}

fn end(segment: Segment, bell: TcpStream, timeout: Option<Duration>) -> Arc<End> {
    Arc::new(End {
        segment,
        bell,
        stopped: AtomicBool::new(false),
        timeout,
    })
}

impl ShmStopper {
    /// Stops the connection: waits on it fail, the doorbell socket is shut down.
    pub fn stop(&self) {
        self.0.stopped.store(true, Ordering::Release);
        let _ = self.0.bell.shutdown(Shutdown::Both);
    }
}

impl ShmWriter {
    /// The writing end over a mapped segment; `bell` is the connection's TCP socket.
    pub fn new(segment: Segment, bell: TcpStream, timeout: Option<Duration>) -> ShmWriter {
        let ctl = segment.control();
        let head = ctl.writer.0.head.load(Ordering::Acquire);
        let tail = ctl.reader.0.tail.load(Ordering::Acquire);
        ShmWriter {
            end: end(segment, bell, timeout),
            head,
            published: head,
            tail,
        }
    }

    /// A handle that stops this connection from another thread.
    pub fn stopper(&self) -> ShmStopper {
        ShmStopper(Arc::clone(&self.end))
    }

    /// The doorbell socket.
    pub fn socket(&self) -> &TcpStream {
        &self.end.bell
    }

    /// Bytes free for writing, re-reading the reader's tail.
    fn free(&mut self) -> io::Result<u64> {
        let cap = self.end.capacity();
        let tail = self
            .end
            .segment
            .control()
            .reader
            .0
            .tail
            .load(Ordering::Acquire);
        if tail < self.tail || tail > self.head || self.head - tail > cap {
            return Err(corrupt("read position"));
        }
        self.tail = tail;
        Ok(cap - (self.head - tail))
    }

    fn publish(&mut self) {
        if self.head == self.published {
            return;
        }
        let ctl = self.end.segment.control();
        ctl.writer.0.head.store(self.head, Ordering::SeqCst);
        self.published = self.head;
        if ctl.writer.0.reader_sleeps.load(Ordering::SeqCst) > 0 {
            self.end.ring();
        }
    }

    /// Waits until `need` bytes are free (publishing what is written first, so that the reader
    /// is never left waiting for bytes that are already there).
    fn wait_space(&mut self, need: u64) -> io::Result<()> {
        self.publish();
        let wait = Wait::new(&self.end);
        loop {
            self.end.check_stopped()?;
            if self.free()? >= need {
                return Ok(());
            }
            if wait.spinning() {
                std::thread::yield_now();
                continue;
            }
            let left = wait.left("the ring's reader freed no space")?;
            let end = Arc::clone(&self.end);
            let ctl = end.segment.control();
            let (head, cap) = (self.head, end.capacity());
            end.sleep(&ctl.reader.0.writer_sleeps, left, || {
                let tail = ctl.reader.0.tail.load(Ordering::SeqCst);
                cap.saturating_sub(head.saturating_sub(tail)) >= need
            })?;
        }
    }

    fn copy_in(&mut self, bytes: &[u8]) {
        let cap = self.end.capacity();
        let off = (self.head % cap) as usize;
        debug_assert!(off + bytes.len() <= cap as usize);
        // SAFETY: `off..off + len` lies in the ring (checked by the callers' contiguity), and
        // is free: the reader published a tail past it, so nobody reads it until `head` is
        // published beyond it.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.end.segment.data().add(off),
                bytes.len(),
            )
        };
        self.head += bytes.len() as u64;
    }

    /// Writes one frame, waiting for room as the reader frees it.
    pub fn write_frame(&mut self, header: &DataHeader, payload: &[u8]) -> io::Result<()> {
        let cap = self.end.capacity();
        // Frames start aligned: skip to the boundary after the previous one (the reader does
        // the same before each header).
        let gap = align_up(self.head) - self.head;
        if gap > 0 {
            self.wait_space(gap)?;
            self.head += gap;
        }
        let total = (HEADER_BYTES + payload.len()) as u64;
        let off = self.head % cap;
        if off + total > cap && total <= cap / 2 {
            // Start the frame at the ring's beginning, so that it lies in one piece.
            self.wait_space(cap - off)?;
            self.copy_in(&PAD_MAGIC.to_le_bytes());
            self.head += cap - off - 4;
        }
        self.wait_space(HEADER_BYTES as u64)?;
        self.copy_in(&header.encode());
        // A frame that lies in one piece is published whole: its reader, which reduces it in
        // place, needs all of it anyway, and would otherwise wait (and maybe sleep) on a
        // partial one. A larger frame streams, published piece by piece.
        let whole = total <= cap / 2;
        let piece = (cap / 8).min(128 << 10);
        let mut rest = payload;
        while !rest.is_empty() {
            let free = self.free()?;
            if free == 0 {
                self.wait_space((rest.len() as u64).min(cap / 4))?;
                continue;
            }
            let contiguous = cap - self.head % cap;
            let n = (rest.len() as u64).min(free).min(contiguous) as usize;
            let (now, later) = rest.split_at(n);
            self.copy_in(now);
            rest = later;
            if !whole && self.head - self.published >= piece {
                self.publish();
            }
        }
        self.publish();
        Ok(())
    }
}

impl ShmReader {
    /// The reading end over a mapped segment; `bell` is the connection's TCP socket.
    pub fn new(segment: Segment, bell: TcpStream, timeout: Option<Duration>) -> ShmReader {
        let tail = segment.control().reader.0.tail.load(Ordering::Acquire);
        ShmReader {
            end: end(segment, bell, timeout),
            tail,
            published: tail,
            frame_left: 0,
        }
    }

    /// A handle that stops this connection from another thread.
    pub fn stopper(&self) -> ShmStopper {
        ShmStopper(Arc::clone(&self.end))
    }

    /// A handle that looks for frames without holding the reader.
    pub fn probe(&self) -> ShmProbe {
        ShmProbe(Arc::clone(&self.end))
    }

    /// The doorbell socket.
    pub fn socket(&self) -> &TcpStream {
        &self.end.bell
    }

    /// Ring bytes.
    pub fn capacity(&self) -> usize {
        self.end.segment.capacity()
    }

    /// Whether bytes wait in the ring (a read would not wait).
    pub fn readable(&self) -> bool {
        let head = self
            .end
            .segment
            .control()
            .writer
            .0
            .head
            .load(Ordering::Acquire);
        head != self.tail
    }

    /// Bytes ready to read, re-reading the writer's head.
    fn available(&self) -> io::Result<u64> {
        let head = self
            .end
            .segment
            .control()
            .writer
            .0
            .head
            .load(Ordering::Acquire);
        if head < self.tail || head - self.tail > self.end.capacity() {
            return Err(corrupt("write position"));
        }
        Ok(head - self.tail)
    }

    fn publish(&mut self) {
        if self.tail == self.published {
            return;
        }
        let ctl = self.end.segment.control();
        ctl.reader.0.tail.store(self.tail, Ordering::SeqCst);
        self.published = self.tail;
        if ctl.reader.0.writer_sleeps.load(Ordering::SeqCst) > 0 {
            self.end.ring();
        }
    }

    /// Waits until `need` bytes are ready; returns how many are (publishing what was read
    /// first, so that the writer is never left waiting for space that is already free).
    fn wait_bytes(&mut self, need: u64) -> io::Result<u64> {
        self.publish();
        let wait = Wait::new(&self.end);
        loop {
            self.end.check_stopped()?;
            let ready = self.available()?;
            if ready >= need {
                return Ok(ready);
            }
            if wait.spinning() {
                std::thread::yield_now();
                continue;
            }
            let left = wait.left("no data arrived")?;
            let end = Arc::clone(&self.end);
            let ctl = end.segment.control();
            let tail = self.tail;
            end.sleep(&ctl.writer.0.reader_sleeps, left, || {
                ctl.writer
                    .0
                    .head
                    .load(Ordering::SeqCst)
                    .saturating_sub(tail)
                    >= need
            })?;
        }
    }

    /// [`Self::wait_bytes`], where a timeout is only a quiet connection while `retry()` says so.
    fn wait_bytes_or(&mut self, need: u64, retry: impl Fn() -> bool) -> io::Result<u64> {
        loop {
            match self.wait_bytes(need) {
                Err(e) if e.kind() == io::ErrorKind::TimedOut && retry() => {}
                r => return r,
            }
        }
    }

    fn at(&self) -> *const u8 {
        let off = (self.tail % self.end.capacity()) as usize;
        // SAFETY: `off` is inside the ring.
        unsafe { self.end.segment.data().add(off) }
    }

    /// Publishes the tail once the current frame is all read.
    fn consumed(&mut self) {
        if self.frame_left == 0 {
            self.publish();
        }
    }

    /// Reads the next frame's header. While `idle()` says no collective expects data, a timeout
    /// is only a quiet connection: keep waiting.
    pub fn read_header(&mut self, idle: impl Fn() -> bool) -> io::Result<DataHeader> {
        let cap = self.end.capacity();
        loop {
            // Frames start aligned: the next one begins at the boundary after the last byte
            // read (the writer publishes nothing in between).
            let gap = align_up(self.tail) - self.tail;
            self.wait_bytes_or(gap + 4, &idle)?;
            self.tail += gap;
            let mut word = [0u8; 4];
            // SAFETY: 4 ready bytes at the (64-aligned) tail, inside the ring.
            unsafe { std::ptr::copy_nonoverlapping(self.at(), word.as_mut_ptr(), 4) };
            if u32::from_le_bytes(word) != PAD_MAGIC {
                break;
            }
            let off = self.tail % cap;
            self.tail += cap - off;
        }
        // The writer publishes a header whole; a partial one is waited for.
        self.wait_bytes_or(HEADER_BYTES as u64, || true)?;
        let mut head = [0u8; HEADER_BYTES];
        // SAFETY: HEADER_BYTES ready bytes at the tail; a 64-aligned offset leaves at least 64
        // bytes before the ring's end.
        unsafe { std::ptr::copy_nonoverlapping(self.at(), head.as_mut_ptr(), HEADER_BYTES) };
        let h = DataHeader::decode(&head)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        self.tail += HEADER_BYTES as u64;
        self.frame_left = u64::from(h.len);
        if h.len == 0 {
            self.consumed();
        }
        Ok(h)
    }

    /// Copies the next `buf.len()` payload bytes out, piece by piece as they arrive.
    pub fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.take(buf.len(), |src, at| {
            // SAFETY: `src` is ready ring memory of the piece's length; `buf[at..]` is large
            // enough (pieces add up to `buf.len()`).
            unsafe {
                std::ptr::copy_nonoverlapping(src.as_ptr(), buf.as_mut_ptr().add(at), src.len())
            }
        })
    }

    /// Skips the next `len` payload bytes.
    pub fn discard(&mut self, len: usize) -> io::Result<()> {
        self.take(len, |_, _| {})
    }

    fn take(&mut self, len: usize, mut piece: impl FnMut(&[u8], usize)) -> io::Result<()> {
        let cap = self.end.capacity();
        let publish_every = (cap / 8).min(128 << 10);
        let mut done = 0;
        while done < len {
            let ready = self.wait_bytes(1)?;
            let contiguous = cap - self.tail % cap;
            let n = ((len - done) as u64).min(ready).min(contiguous) as usize;
            // SAFETY: `n` ready bytes at the tail, in one piece; the writer does not touch them
            // until the tail is published past them.
            let src = unsafe { std::slice::from_raw_parts(self.at(), n) };
            piece(src, done);
            done += n;
            self.tail += n as u64;
            self.frame_left = self.frame_left.saturating_sub(n as u64);
            if self.tail - self.published >= publish_every {
                self.publish();
            }
        }
        self.consumed();
        Ok(())
    }

    /// Hands the next `len` payload bytes to `f`: in place when they lie in one piece (no copy),
    /// else copied into `staging` first.
    pub fn with_payload<R>(
        &mut self,
        len: usize,
        staging: &mut [u8],
        f: impl FnOnce(&[u8]) -> R,
    ) -> io::Result<R> {
        let cap = self.end.capacity();
        if len as u64 > cap || self.tail % cap + len as u64 > cap {
            self.read_exact(&mut staging[..len])?;
            return Ok(f(&staging[..len]));
        }
        self.wait_bytes(len as u64)?;
        // SAFETY: `len` ready bytes at the tail, in one piece; the writer does not touch them
        // until the tail is published past them, which happens after `f` returns.
        let src = unsafe { std::slice::from_raw_parts(self.at(), len) };
        let r = f(src);
        self.tail += len as u64;
        self.frame_left = self.frame_left.saturating_sub(len as u64);
        self.consumed();
        Ok(r)
    }
}

impl ShmProbe {
    /// Whether bytes wait in the ring.
    pub fn readable(&self) -> bool {
        let ctl = self.0.segment.control();
        ctl.writer.0.head.load(Ordering::Acquire) != ctl.reader.0.tail.load(Ordering::Acquire)
    }

    /// Sleeps until bytes may wait in the ring (true) or `timeout` passed (false). Leaves the
    /// doorbell's bytes for the reader, which drains them in its own waits.
    pub fn wait(&self, timeout: Duration) -> bool {
        if self.readable() {
            return true;
        }
        let ctl = self.0.segment.control();
        ctl.writer.0.reader_sleeps.fetch_add(1, Ordering::SeqCst);
        let woke =
            self.readable() || crate::spin::wait_readable(self.0.bell.as_raw_fd(), Some(timeout));
        ctl.writer.0.reader_sleeps.fetch_sub(1, Ordering::SeqCst);
        woke || self.readable()
    }
}

#[cfg(test)]
mod tests {
    use super::super::segment::Segment;
    use super::*;
    use std::net::TcpListener;

    fn sockets() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    fn ends(cap: usize, timeout: Option<Duration>) -> (ShmWriter, ShmReader) {
        let created = Segment::create(cap).unwrap();
        let other = Segment::open(
            std::process::id(),
            created.fd.as_raw_fd(),
            cap,
            &created.cookie,
        )
        .unwrap();
        let (a, b) = sockets();
        pair(other, a, created.segment, b, timeout)
    }

    fn header(len: usize, sub: u32) -> DataHeader {
        DataHeader {
            len: len as u32,
            tag: 7,
            seq: 1,
            step: 0,
            sub,
        }
    }

    /// Frames of every size (some larger than the ring, some wrapping) arrive whole and in
    /// order, read in every way, while the writer runs ahead and the reader lags.
    #[test]
    fn frames_of_every_size_arrive_in_order() {
        let cap = super::super::segment::MIN_CAPACITY;
        let (mut w, mut r) = ends(cap, Some(Duration::from_secs(20)));
        let sizes: Vec<usize> = (0..200)
            .map(|i| match i % 7 {
                0 => 0,
                1 => 1,
                2 => cap / 2 - 40,
                3 => cap + 12345,
                4 => 4096 * 3 + 5,
                5 => 64 << 10,
                _ => 1000 + i * 37,
            })
            .collect();
        let data = |i: usize, len: usize| -> Vec<u8> {
            (0..len).map(|k| (k * 31 + i * 7) as u8).collect()
        };
        let sent = sizes.clone();
        let writer = std::thread::spawn(move || {
            for (i, &len) in sent.iter().enumerate() {
                w.write_frame(&header(len, i as u32), &data(i, len))
                    .unwrap();
            }
        });
        let mut staging = vec![0u8; 2 * cap];
        for (i, &len) in sizes.iter().enumerate() {
            if i % 11 == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
            let h = r.read_header(|| false).unwrap();
            assert_eq!((h.len as usize, h.sub), (len, i as u32));
            let want = data(i, len);
            match i % 3 {
                0 => {
                    let mut got = vec![0u8; len];
                    r.read_exact(&mut got).unwrap();
                    assert_eq!(got, want, "frame {i}");
                }
                1 => {
                    let same = r.with_payload(len, &mut staging, |p| p == want).unwrap();
                    assert!(same, "frame {i}");
                }
                _ => r.discard(len).unwrap(),
            }
        }
        writer.join().unwrap();
        assert!(!r.readable());
    }

    /// A reader waits in `poll` (no CPU) and wakes for the frame; a writer closing its end ends
    /// the reader's wait with an error, and a stopper ends it at once.
    #[test]
    fn waits_end_on_data_close_and_stop() {
        let (mut w, mut r) = ends(super::super::segment::MIN_CAPACITY, None);
        let probe = r.probe();
        assert!(!probe.wait(Duration::from_millis(20)));
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            w.write_frame(&header(10, 0), &[5; 10]).unwrap();
            w
        });
        let h = r.read_header(|| false).unwrap();
        assert_eq!(h.len, 10);
        let mut got = [0u8; 10];
        r.read_exact(&mut got).unwrap();
        assert_eq!(got, [5; 10]);
        let w = t.join().unwrap();
        drop(w);
        let e = r.read_header(|| false).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");

        let (_w, mut r) = ends(super::super::segment::MIN_CAPACITY, None);
        let stop = r.stopper();
        let t = std::thread::spawn(move || r.read_header(|| false).unwrap_err().kind());
        std::thread::sleep(Duration::from_millis(30));
        stop.stop();
        assert_eq!(t.join().unwrap(), io::ErrorKind::ConnectionAborted);
    }

    /// A quiet connection times out while data is expected, and keeps waiting while idle.
    #[test]
    fn timeouts_are_errors_unless_idle() {
        let (mut w, mut r) = ends(
            super::super::segment::MIN_CAPACITY,
            Some(Duration::from_millis(30)),
        );
        let e = r.read_header(|| false).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            w.write_frame(&header(1, 3), &[9]).unwrap();
            w
        });
        assert_eq!(r.read_header(|| true).unwrap().sub, 3);
        let _w = t.join().unwrap();
    }

    /// Positions the other end could not have written fail the connection.
    #[test]
    fn a_scribbled_control_block_is_an_error() {
        let (mut w, mut r) = ends(super::super::segment::MIN_CAPACITY, None);
        w.write_frame(&header(4, 0), &[1; 4]).unwrap();
        let ctl = r.end.segment.control();
        ctl.writer.0.head.store(u64::MAX / 2, Ordering::SeqCst);
        let e = r.read_header(|| false).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        assert!(e.to_string().contains("corrupt"), "{e}");
    }
}
