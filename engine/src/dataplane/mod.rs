//! The data plane of one ring epoch: fixed TX/RX threads per connection serving every operation
//! in flight (see README.md beside this file).

mod op;
mod stream;

use op::BusyOwned;
pub(crate) use crate::raw_buf::RawBuf;
pub(crate) use op::Op;
use stream::{DataStream, Stopper};

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use concord_master::proto::PeerId;
use concord_transport::frame::{DataHeader, HEADER_BYTES};
use concord_transport::{BackendKind, PinnedBuf, PinnedPool};

use crate::collective::ring::RecvKind;
use crate::collective::Traffic;
use crate::core::Pace;
use crate::gpu::DeviceFrame;
use crate::links::Links;

/// How many finished (tag, seq) pairs are remembered, to drop their leftover frames.
const RETIRED_MEMORY: usize = 4096;

/// Data-plane threads poll (for at most the communicator's spin window) before they block only
/// while every collective in flight here is at most this large: there an answer is microseconds
/// away and a blocking wake-up would be most of the collective's time; larger ones keep every
/// core for moving bytes.
pub const SPIN_MAX_COLLECTIVE_BYTES: usize = 4 << 20;

/// While the collectives here total at most this many bytes (host memory, one connection),
/// the thread that makes a frame ready (the one that registered the collective, or the one that
/// reduced a sub-chunk) sends it itself on the first connection when that connection is free,
/// instead of handing it to the TX thread, and a caller waiting for a blocking collective may
/// receive on the first connection itself ([`DataPlane::driver`]): on a small machine every
/// hand-off between threads is a scheduling delay of tens of microseconds. The bound keeps such
/// writes from blocking: every frame in flight on a connection then fits in the receiver's
/// initial socket buffer (128 KiB by default on Linux) at once, so no two threads can wait on
/// each other's full buffers.
pub(crate) const INLINE_MAX_TOTAL_BYTES: usize = 64 << 10;

const POLL_NONE: u8 = 0;
const POLL_FIRST: u8 = 1;
const POLL_ALL: u8 = 2;

/// What the plane tells its owner.
#[derive(Debug)]
pub(crate) enum PlaneEvent {
    /// An operation finished its part here (or failed).
    Finished {
        /// User tag.
        tag: u64,
        /// Attempt.
        seq: u64,
        /// Bytes moved, or why it failed.
        result: Result<Traffic, String>,
        /// Whether the connections survived the failure (a failed reduction, not a broken link):
        /// the collective can be aborted alone.
        ring_intact: bool,
    },
}

type Events = Arc<dyn Fn(PlaneEvent) + Send + Sync>;

#[derive(Default)]
struct Registry {
    ops: Vec<Arc<Op>>,
    retired: VecDeque<(u64, u64)>,
    generation: u64,
    failure: Option<String>,
}

impl Registry {
    /// The operation of a frame: `Some(Some)` registered, `Some(None)` retired (drop the
    /// frame), `None` not registered yet; `Err` once the plane failed.
    fn find(&self, tag: u64, seq: u64) -> Result<Option<Option<Arc<Op>>>, String> {
        if let Some(op) = self.ops.iter().find(|o| o.tag == tag && o.seq == seq) {
            return Ok(Some(Some(Arc::clone(op))));
        }
        if self.retired.contains(&(tag, seq)) {
            return Ok(Some(None));
        }
        match &self.failure {
            Some(why) => Err(why.clone()),
            None => Ok(None),
        }
    }
}

struct Shared {
    /// One per connection, to wake its owner thread from another.
    stoppers: Vec<Stopper>,
    /// The successor connections. Each TX thread locks its own to send; inline senders (see
    /// [`INLINE_MAX_TOTAL_BYTES`]) only ever `try_lock` the first.
    tx: Vec<Mutex<DataStream>>,
    /// The predecessor connections with their receive state. Each RX thread locks its own to
    /// receive; a driving caller only ever `try_lock`s the first.
    rx: Vec<Mutex<RxConn>>,
    /// Raw descriptors of `rx`, to wait for bytes without holding the lock.
    rx_fds: Vec<std::os::fd::RawFd>,
    /// Whether frames may be sent inline now: the collectives here are small enough, unstriped
    /// and in host memory (the first TX thread then need not poll for them).
    inline: AtomicBool,
    /// Callers receiving on the first connection now; its RX thread stays aside meanwhile.
    aside: crate::aside::Aside,
    next_id: PeerId,
    prev_id: PeerId,
    registry: Mutex<Registry>,
    registry_cv: Condvar,
    tx_threads: OnceLock<Vec<Thread>>,
    failed: AtomicBool,
    events: Events,
    /// How long an RX thread waits for the operation of a frame to be registered here.
    register_timeout: Duration,
    /// Whether the communicator's small collectives are under way (see [`Shared::polling`]).
    pace: Arc<Pace>,
    /// Which threads may poll: [`POLL_FIRST`] (the collectives here are all small enough and
    /// unstriped, or there are none: only the first connection carries them), [`POLL_ALL`]
    /// (small, some striped) or [`POLL_NONE`] (a large one is here).
    small: AtomicU8,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the thread of connection `conn` should poll rather than block now.
    fn polling(&self, conn: usize) -> bool {
        let poll = match self.small.load(Ordering::Relaxed) {
            POLL_ALL => true,
            POLL_FIRST => conn == 0,
            _ => false,
        };
        poll && !self.failed.load(Ordering::Relaxed) && self.pace.polling()
    }

    /// Recomputes [`Shared::small`] after the set of operations changed (registry lock held).
    fn update_small(&self, r: &Registry) {
        let small = r
            .ops
            .iter()
            .all(|op| op.plan.count * op.plan.elem_bytes <= SPIN_MAX_COLLECTIVE_BYTES);
        let total: usize = r
            .ops
            .iter()
            .map(|op| op.plan.count * op.plan.elem_bytes)
            .sum();
        let inline = total <= INLINE_MAX_TOTAL_BYTES
            && r.ops.iter().all(|op| !op.striped && op.device.is_none());
        self.inline.store(inline, Ordering::Relaxed);
        let state = match (small, r.ops.iter().any(|op| op.striped)) {
            (false, _) => POLL_NONE,
            (true, false) => POLL_FIRST,
            (true, true) => POLL_ALL,
        };
        self.small.store(state, Ordering::Relaxed);
    }

    fn stop_all(&self) {
        for s in &self.stoppers {
            s.stop();
        }
    }

    fn wake_tx(&self) {
        for t in self.tx_threads.get().into_iter().flatten() {
            t.unpark();
        }
    }

    /// Sends `op`'s ready frames now, from this thread, if they may go inline (see
    /// [`INLINE_MAX_TOTAL_BYTES`]) and the first connection is free; else wakes the TX threads.
    /// Never call it holding the communicator's lock: a send may finish the operation.
    fn send_ready(&self, op: &Op) {
        if op.striped || op.device.is_some() || !self.inline.load(Ordering::Relaxed) {
            return self.wake_tx_for(op);
        }
        let Some(Ok(mut stream)) = self.tx.first().map(Mutex::try_lock) else {
            // Its TX thread is sending: it may be about to park without seeing this frame.
            return self.wake_tx_for(op);
        };
        loop {
            match send_one(self, op, 0, &mut stream) {
                Ok(TrySend::Sent) => {}
                Ok(TrySend::Idle) => return,
                Err(e) => {
                    drop(stream);
                    return self.fail(e);
                }
            }
        }
    }

    /// Wakes the TX threads that may send `op`'s frames (only the first for an unstriped one).
    fn wake_tx_for(&self, op: &Op) {
        if op.striped {
            self.wake_tx();
        } else if let Some(t) = self.tx_threads.get().and_then(|v| v.first()) {
            t.unpark();
        }
    }

    fn finish(&self, op: &Op, result: Result<Traffic, String>) {
        self.report(op, result, false);
    }

    fn report(&self, op: &Op, result: Result<Traffic, String>, ring_intact: bool) {
        if op.claim_report() {
            let (tag, seq) = (op.tag, op.seq);
            (self.events)(PlaneEvent::Finished {
                tag,
                seq,
                result,
                ring_intact,
            });
        }
    }

    /// Fails the plane: every operation on it fails, sockets are shut down, threads wake.
    fn fail(&self, why: String) {
        if self.failed.swap(true, Ordering::AcqRel) {
            return;
        }
        let ops = {
            let mut r = self.lock();
            r.failure = Some(why.clone());
            let ops = std::mem::take(&mut r.ops);
            self.update_small(&r);
            ops
        };
        // A neighbour leaving between collectives is ordinary; losing one mid-collective is not.
        // (A collective finished here but not yet retired does not count.)
        let unfinished = ops.iter().filter(|op| !op.is_reported()).count();
        if unfinished == 0 {
            tracing::debug!("data plane closed: {why}");
        } else {
            tracing::warn!("data plane failed with {unfinished} collective(s) in flight: {why}");
        }
        self.registry_cv.notify_all();
        self.stop_all();
        self.wake_tx();
        for op in ops {
            op.failed.store(true, Ordering::Release);
            self.finish(&op, Err(why.clone()));
        }
    }
}

/// The first frames of a just-registered operation, to send (inline, or by waking a TX thread)
/// once no lock is held. Dropping it unsent wakes the TX threads instead.
#[must_use = "send() the first frames once the communicator's lock is released"]
pub(crate) struct FirstSends(Option<(Arc<Shared>, Arc<Op>)>);

impl FirstSends {
    pub(crate) fn send(mut self) {
        if let Some((shared, op)) = self.0.take() {
            shared.send_ready(&op);
        }
    }
}

impl Drop for FirstSends {
    fn drop(&mut self) {
        if let Some((shared, op)) = self.0.take() {
            shared.wake_tx_for(&op);
        }
    }
}

impl std::fmt::Debug for FirstSends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FirstSends").finish_non_exhaustive()
    }
}

/// A caller receiving on the first connection while it waits for a small blocking collective:
/// the frame goes from the socket through the reduction to the next send on one thread, and the
/// RX thread stays aside. Dropping it hands the connection back.
pub(crate) struct Driver(Arc<Shared>);

impl Driver {
    /// Receives one frame if one is waiting, the collectives here are small enough and nobody
    /// else is receiving.
    pub(crate) fn step(&self) {
        let s = &*self.0;
        if !s.inline.load(Ordering::Relaxed) || s.failed.load(Ordering::Acquire) {
            return;
        }
        // A ring of one has no connections.
        let Some(Ok(mut c)) = s.rx.first().map(Mutex::try_lock) else {
            return;
        };
        if c.held.is_none() && !c.stream.readable_now() {
            return;
        }
        if let Err(e) = recv_one(s, 0, &mut c, false) {
            drop(c);
            s.fail(e);
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let s = &*self.0;
        s.aside.leave(!s.pace.polling());
    }
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver").finish_non_exhaustive()
    }
}

/// A predecessor connection with what its receiver keeps between frames.
struct RxConn {
    stream: DataStream,
    staging: PinnedBuf,
    /// A device frame whose GPU work is still running.
    pending: Option<Pending>,
    /// A header read by a driving caller before its collective was registered here.
    held: Option<DataHeader>,
}

/// The connections and threads of one ring epoch.
pub(crate) struct DataPlane {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for DataPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPlane")
            .field("threads", &self.threads.len())
            .finish_non_exhaustive()
    }
}

impl DataPlane {
    /// Takes over the links and starts one TX thread per successor connection and one RX thread
    /// per predecessor connection.
    pub(crate) fn start(
        mut links: Links,
        backend: BackendKind,
        sub_bytes: usize,
        register_timeout: Duration,
        pace: Arc<Pace>,
        events: Events,
    ) -> Result<Self, String> {
        let mut stoppers = Vec::new();
        let mut wrap = |v: Vec<std::net::TcpStream>| -> Result<Vec<DataStream>, String> {
            v.into_iter()
                .map(|t| {
                    let (d, stop) = DataStream::new(t, backend)?;
                    stoppers.push(stop);
                    Ok(d)
                })
                .collect()
        };
        let next = wrap(std::mem::take(&mut links.next))?;
        let prev = wrap(std::mem::take(&mut links.prev))?;
        let rx_fds = prev.iter().map(DataStream::raw_fd).collect();
        let rx = prev
            .into_iter()
            .map(|mut stream| {
                let staging = staging_for(&mut stream, sub_bytes);
                Mutex::new(RxConn {
                    stream,
                    staging,
                    pending: None,
                    held: None,
                })
            })
            .collect();
        let shared = Arc::new(Shared {
            tx: next.into_iter().map(Mutex::new).collect(),
            rx,
            rx_fds,
            inline: AtomicBool::new(true),
            aside: Default::default(),
            stoppers,
            next_id: links.next_id,
            prev_id: links.prev_id,
            registry: Mutex::new(Registry::default()),
            registry_cv: Condvar::new(),
            tx_threads: OnceLock::new(),
            failed: AtomicBool::new(false),
            events,
            register_timeout,
            pace,
            small: AtomicU8::new(POLL_FIRST),
        });
        let mut threads = Vec::new();
        let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name)
                .spawn(f)
                .map_err(|e| format!("spawning a data thread: {e}"))
        };
        for i in 0..shared.tx.len() {
            let s = Arc::clone(&shared);
            threads.push(spawn(
                format!("concord-tx-{i}"),
                Box::new(move || tx_loop(&s, i)),
            )?);
        }
        let _ = shared
            .tx_threads
            .set(threads.iter().map(|t| t.thread().clone()).collect());
        for i in 0..shared.rx.len() {
            let s = Arc::clone(&shared);
            threads.push(spawn(
                format!("concord-rx-{i}"),
                Box::new(move || rx_loop(&s, i)),
            )?);
        }
        Ok(DataPlane { shared, threads })
    }

    /// Adds an operation. Its first frames go out when the returned [`FirstSends`] is sent,
    /// which the caller does once it no longer holds the communicator's lock (sending may
    /// finish the operation, whose report takes that lock).
    pub(crate) fn register(&self, op: Arc<Op>) -> Result<FirstSends, String> {
        if op.is_empty() {
            self.shared.finish(&op, Ok(Traffic::default()));
            return Ok(FirstSends(None));
        }
        {
            let mut r = self.shared.lock();
            if let Some(why) = &r.failure {
                return Err(why.clone());
            }
            r.ops.push(Arc::clone(&op));
            r.generation += 1;
            self.shared.update_small(&r);
        }
        self.shared.registry_cv.notify_all();
        Ok(FirstSends(Some((Arc::clone(&self.shared), op))))
    }

    /// What a caller needs to receive on this plane while it waits (see [`Driver`]).
    pub(crate) fn driver(&self) -> Driver {
        self.shared.aside.enter();
        Driver(Arc::clone(&self.shared))
    }

    /// Shuts the connections down without waiting: every thread blocked on them returns, and
    /// fails the plane from its own thread (never the caller's, which may hold the
    /// communicator's lock).
    pub(crate) fn break_links(&self) {
        self.shared.stop_all();
    }

    /// Removes an operation (done or aborted): its later frames are dropped on receipt.
    pub(crate) fn retire(&self, tag: u64, seq: u64) {
        let mut r = self.shared.lock();
        if let Some(i) = r.ops.iter().position(|o| o.tag == tag && o.seq == seq) {
            let op = r.ops.swap_remove(i);
            op.retire();
            r.generation += 1;
            self.shared.update_small(&r);
        }
        if r.retired.len() == RETIRED_MEMORY {
            r.retired.pop_front();
        }
        r.retired.push_back((tag, seq));
        drop(r);
        // RX threads waiting for a registration learn it is retired. TX threads need no wake-up:
        // a parked one holds no operation, and a busy one skips a retired operation's frames.
        self.shared.registry_cv.notify_all();
    }
}

impl Drop for DataPlane {
    fn drop(&mut self) {
        self.shared.fail("the ring was torn down".into());
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

enum TrySend {
    Sent,
    Idle,
}

fn tx_loop(s: &Shared, conn: usize) {
    let mut cache: Vec<Arc<Op>> = Vec::new();
    let mut cache_gen = u64::MAX;
    let mut turn = 0usize;
    while !s.failed.load(Ordering::Acquire) {
        {
            let r = s.lock();
            if r.generation != cache_gen {
                cache.clone_from(&r.ops);
                cache_gen = r.generation;
            }
        }
        let n = cache.len();
        let mut progressed = false;
        let mut stream = s.tx[conn].lock().unwrap_or_else(|p| p.into_inner());
        for off in 0..n {
            let op = &cache[(turn + off) % n];
            match send_one(s, op, conn, &mut stream) {
                Ok(TrySend::Sent) => {
                    turn = (turn + off + 1) % n.max(1);
                    progressed = true;
                    break;
                }
                Ok(TrySend::Idle) => {}
                Err(e) => {
                    drop(stream);
                    return s.fail(e);
                }
            }
        }
        drop(stream);
        if progressed {
            continue;
        }
        // Inline sends carry small collectives: no need to poll for them here.
        if s.polling(conn) && !(conn == 0 && s.inline.load(Ordering::Relaxed)) {
            // A small collective is under way: its next sub-chunk is microseconds away.
            std::thread::yield_now();
            continue;
        }
        // Hold no operation while parked (a retired one's memory goes back at once).
        cache.clear();
        cache_gen = u64::MAX;
        std::thread::park();
    }
}

fn send_one(s: &Shared, op: &Op, conn: usize, stream: &mut DataStream) -> Result<TrySend, String> {
    if conn > 0 && !op.striped {
        return Ok(TrySend::Idle);
    }
    let Some(busy) = op.enter() else {
        return Ok(TrySend::Idle);
    };
    // Dynamic striping: whichever TX thread is free claims the next ready send, so a slow
    // connection carries fewer frames instead of setting the pace.
    let (t, j) = loop {
        let Some((k, t, j)) = op.next_send() else {
            return Ok(TrySend::Idle);
        };
        if !op.send_ready(t, j) {
            return Ok(TrySend::Idle);
        }
        if op.claim_send(k) {
            break (t, j);
        }
    };
    if let (0, Some(device)) = (t, &op.device) {
        // Step 0 sends the input, which is on its way from the device to the mirror.
        if let Err(why) = device.input_ready() {
            op.failed.store(true, Ordering::Release);
            drop(busy);
            s.report(op, Err(why), true);
            return Ok(TrySend::Idle);
        }
    }
    let plan = &op.plan;
    let range = plan.sub_bytes(plan.send_chunk(t), j);
    // SAFETY: inside a busy guard the buffers are alive. Step 0 reads the caller's input, which
    // nobody writes; later steps read a range the RX thread finished (flag acquired in
    // `send_ready`) and writes again only after this frame reached the successor (ring.rs).
    let payload = unsafe {
        if t == 0 {
            op.src.slice(range)
        } else {
            op.dst.slice(range)
        }
    };
    let header = DataHeader {
        len: payload.len() as u32,
        tag: op.tag,
        seq: op.seq,
        step: t as u32,
        sub: j as u32,
    };
    stream
        .write_frame(&header, payload)
        .map_err(|e| format!("sending to ring successor {}: {e}", s.next_id))?;
    drop(busy);
    if op.sent((HEADER_BYTES + header.len as usize) as u64) {
        s.finish(op, Ok(op.traffic()));
    }
    Ok(TrySend::Sent)
}

/// Finds the operation of a frame, waiting a bounded time for its registration (the frame may
/// overtake the master's go-ahead). `Ok(None)`: a retired operation, drop the frame.
fn lookup(s: &Shared, tag: u64, seq: u64) -> Result<Option<Arc<Op>>, String> {
    let deadline = Instant::now() + s.register_timeout;
    let mut r = s.lock();
    loop {
        if let Some(found) = r.find(tag, seq)? {
            return Ok(found);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "ring predecessor {} sent a frame of collective {tag} (seq {seq}), which this peer never started",
                s.prev_id
            ));
        }
        if s.pace.polling() {
            // The master's go-ahead is usually microseconds behind the frame.
            drop(r);
            std::thread::yield_now();
            r = s.lock();
            continue;
        }
        r = s
            .registry_cv
            .wait_timeout(r, left)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
}

/// A device reduce-scatter frame whose GPU work is still running. Its RX thread receives the
/// next frame meanwhile (the GPU and the socket overlap), and finishes this one (publishes the
/// result for TX, counts it) right after, or before it would block on an empty socket: a frame
/// whose result is unpublished may be what the rest of the ring waits for.
struct Pending {
    op: Arc<Op>,
    busy: BusyOwned,
    m: usize,
    bytes: u64,
    frame: DeviceFrame,
}

fn finish_pending(s: &Shared, p: Pending) {
    let Pending {
        op,
        busy,
        m,
        bytes,
        frame,
    } = p;
    let result = op
        .device
        .as_ref()
        .expect("a device collective")
        .reduce_done(frame);
    drop(busy);
    match result {
        Err(why) => {
            op.failed.store(true, Ordering::Release);
            s.report(&op, Err(why), true);
        }
        Ok(()) => {
            let done = op.received(m, bytes);
            s.wake_tx_for(&op);
            if done {
                s.finish(&op, Ok(op.traffic()));
            }
        }
    }
}

fn rx_loop(s: &Shared, conn: usize) {
    // Since when the first connection has been quiet while waiting without its lock: after a
    // whole `register_timeout` with collectives expecting data, the blocking read below (with
    // its timeout) takes over, so a silent predecessor is still an error, as on the others.
    let mut quiet_since: Option<Instant> = None;
    while !s.failed.load(Ordering::Acquire) {
        if conn == 0 && s.aside.driving() {
            // A caller receives here itself for now.
            quiet_since = None;
            s.aside.wait();
            continue;
        }
        let mut c = s.rx[conn].lock().unwrap_or_else(|p| p.into_inner());
        if c.pending.is_some() && !c.stream.readable_now() {
            let p = c.pending.take().expect("checked");
            finish_pending(s, p);
        }
        // Only where a caller may drive (small collectives) does this thread wait for bytes
        // without the lock; otherwise it blocks in the read, one syscall per frame as before.
        let drivable = conn == 0 && s.inline.load(Ordering::Relaxed);
        let silent_too_long = quiet_since
            .is_some_and(|q| q.elapsed() >= s.register_timeout && !s.lock().ops.is_empty());
        if drivable && c.held.is_none() && !c.stream.readable_now() && !silent_too_long {
            drop(c);
            quiet_since.get_or_insert_with(Instant::now);
            let fd = s.rx_fds[0];
            if s.polling(conn) {
                // A small collective is under way: its next frame is microseconds away.
                concord_transport::spin::spin_until(Duration::MAX, || {
                    concord_transport::spin::readable(fd) || !s.polling(conn) || s.aside.driving()
                });
                continue;
            }
            // Bounded, to notice the plane failing, a driver, or a long silence.
            if !concord_transport::spin::wait_readable(fd, Some(Duration::from_millis(100)))
                || s.aside.driving()
            {
                continue;
            }
            c = s.rx[conn].lock().unwrap_or_else(|p| p.into_inner());
        }
        quiet_since = None;
        if let Err(e) = recv_one(s, conn, &mut c, true) {
            if let Some(p) = c.pending.take() {
                finish_pending(s, p);
            }
            drop(c);
            return s.fail(e);
        }
    }
    let mut c = s.rx[conn].lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = c.pending.take() {
        finish_pending(s, p);
    }
}

/// Receives one frame on `conn`. `may_wait`: wait for the frame's collective to be registered
/// here; else (a driving caller, who registers collectives itself) keep the header for later.
fn recv_one(s: &Shared, conn: usize, c: &mut RxConn, may_wait: bool) -> Result<(), String> {
    let RxConn {
        stream,
        staging,
        pending,
        held,
    } = c;
    let from = s.prev_id;
    let io = |e: std::io::Error| format!("receiving from ring predecessor {from}: {e}");
    let idle = || s.lock().ops.is_empty();
    if held.is_none() && s.polling(conn) {
        // A small collective is under way: its next frame is microseconds away.
        concord_transport::spin::spin_until(Duration::MAX, || {
            stream.readable_now() || !s.polling(conn)
        });
    }
    let h = match held.take() {
        Some(h) => h,
        None => stream
            .read_header(idle)
            .map_err(|e| format!("receiving from ring predecessor {from}: {e}"))?,
    };
    s.pace.moved();
    let found = if may_wait {
        lookup(s, h.tag, h.seq)?
    } else {
        let now = s.lock().find(h.tag, h.seq)?; // The registry lock ends here.
        match now {
            Some(found) => found,
            None => {
                *held = Some(h);
                return Ok(());
            }
        }
    };
    let op = match found {
        // Failed here (its abort is on its way) or retired: drop what is still in flight.
        Some(op) if !op.failed.load(Ordering::Acquire) => op,
        _ => return stream.discard(h.len as usize).map_err(io),
    };
    let plan = &op.plan;
    let (t, j) = (h.step as usize, h.sub as usize);
    let valid = t < plan.steps() && j < plan.subs(plan.recv_chunk(t));
    let m = if valid {
        op.recv_prefix[t] + j
    } else {
        usize::MAX
    };
    let range = if valid {
        plan.sub_bytes(plan.recv_chunk(t), j)
    } else {
        0..0
    };
    if !valid || h.len as usize != range.len() {
        return Err(format!(
            "ring predecessor {from} sent step {t} sub-chunk {j} ({} bytes) of collective {}, which has no such frame of that size",
            h.len,
            h.tag,
        ));
    }
    if !op.claim_recv(m) {
        return Err(format!(
            "ring predecessor {from} sent step {t} sub-chunk {j} of collective {} twice",
            h.tag
        ));
    }
    let Some(busy) = op.enter() else {
        return stream.discard(h.len as usize).map_err(io);
    };
    // SAFETY: inside a busy guard; this RX thread is the only writer of receive `m`'s range, and
    // the TX thread reads it only after the flag set below.
    let out = unsafe { op.dst.slice_mut(range.clone()) };
    let kind = plan.recv_kind(t);
    if j == 0 && (t == 0 || t + 1 == plan.world) {
        let phase = if kind == RecvKind::Copy {
            "all-gather"
        } else {
            "reduce-scatter"
        };
        crate::fault::kill_point(phase, Some(op.tag));
    }
    // Only a device reduce-scatter frame may overtake the pending one.
    if op.device.is_none() || kind == RecvKind::Copy {
        if let Some(p) = pending.take() {
            finish_pending(s, p);
        }
    }
    if let Some(device) = &op.device {
        let len = range.len();
        let finish = (kind == RecvKind::ReduceFinish).then_some(plan.world);
        let outcome = match device.lane(conn) {
            Err(why) => {
                stream.discard(len).map_err(io)?;
                Err(why)
            }
            Ok(lane) if kind == RecvKind::Copy => {
                stream.read_exact(out).map_err(io)?;
                device.copy_in(&lane, range.clone())
            }
            Ok(lane) => {
                lane.receive(len, |buf| stream.read_exact(buf))
                    .map_err(io)?;
                match device.reduce_async(&lane, range.clone(), finish) {
                    Ok(frame) => {
                        // The previous frame's host buffer takes the lane's next frame: finish
                        // it now, while this one's copies and kernel run.
                        if let Some(p) = pending.take() {
                            finish_pending(s, p);
                        }
                        *pending = Some(Pending {
                            busy: busy.into_owned(&op),
                            op: Arc::clone(&op),
                            m,
                            bytes: (HEADER_BYTES + len) as u64,
                            frame,
                        });
                        return Ok(());
                    }
                    Err(why) => Err(why),
                }
            }
        };
        if let Err(why) = outcome {
            // This operation fails; the connection and the other operations carry on.
            op.failed.store(true, Ordering::Release);
            drop(busy);
            s.report(&op, Err(why), true);
            return Ok(());
        }
    } else if kind == RecvKind::Copy {
        // In place, the range's original goes to the backup before the first write (a failure
        // puts it back; `op.backup_stores` streams large backups, which only a failure reads).
        // Device collectives keep their own backup.
        // SAFETY: inside a busy guard; this RX thread is the only writer of the range now.
        if let Some(save) = unsafe { op.claim_save(plan.recv_chunk(t), j) } {
            concord_kernels::copy(save, out, op.backup_stores).map_err(|e| e.to_string())?;
        }
        stream.read_exact(out).map_err(io)?;
    } else {
        stream.read_staged(staging, range.len()).map_err(io)?;
        let staged = &staging[..range.len()];
        let finish = (kind == RecvKind::ReduceFinish).then_some(plan.world);
        let c = plan.recv_chunk(t);
        let reduce = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if injected_panic_tag() == Some(op.tag) {
                panic!("injected fault: CONCORD_FAULT_PANIC_TAG={}", op.tag);
            }
            // SAFETY: inside a busy guard; this RX thread is the only writer of the range now,
            // and the backup range is claimed only right before it is filled.
            match unsafe { op.claim_save(c, j) } {
                // In place, first write: save each block of the original while reducing it.
                Some(save) => concord_kernels::reduce_into_saving(
                    out,
                    staged,
                    save,
                    op.backup_stores,
                    op.dtype,
                    op.op,
                    finish,
                ),
                None => {
                    // SAFETY: inside a busy guard, by the range's writer; in place, saved by an
                    // earlier writer (the claim above found it done).
                    let mine = unsafe { op.original(c, j) };
                    concord_kernels::reduce_out_with(
                        out, mine, staged, op.dtype, op.op, finish, op.stores,
                    )
                }
            }
        }));
        let failure = match reduce {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(panic) => Some(format!("the reduction panicked: {}", panic_message(&panic))),
        };
        if let Some(why) = failure {
            // This operation fails; the connection and the other operations carry on.
            op.failed.store(true, Ordering::Release);
            drop(busy);
            s.report(&op, Err(why), true);
            return Ok(());
        }
    }
    drop(busy);
    let done = op.received(m, (HEADER_BYTES + range.len()) as u64);
    s.send_ready(&op);
    if done {
        s.finish(&op, Ok(op.traffic()));
    }
    Ok(())
}

/// The text of a panic payload.
pub(crate) fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-text panic".into())
}

/// Testing hook: `CONCORD_FAULT_PANIC_TAG=N` makes the reduction of collective `N` panic on this
/// peer, to prove that a worker panic fails only that collective. Read once.
fn injected_panic_tag() -> Option<u64> {
    static TAG: OnceLock<Option<u64>> = OnceLock::new();
    *TAG.get_or_init(|| {
        std::env::var("CONCORD_FAULT_PANIC_TAG")
            .ok()
            .and_then(|v| v.parse().ok())
    })
}

/// The RX staging buffer of one connection: page-locked and registered with io_uring where the
/// limits allow (one buffer per connection, so registration never multiplies against
/// `RLIMIT_MEMLOCK`); otherwise ordinary memory, said once.
fn staging_for(stream: &mut DataStream, sub_bytes: usize) -> PinnedBuf {
    static SAID: std::sync::Once = std::sync::Once::new();
    let pool = PinnedPool::new(1, sub_bytes)
        .or_else(|_| {
            PinnedPool::with_config(
                concord_transport::PoolConfig::new(1, sub_bytes).with_lock(false),
            )
        })
        .expect("one staging buffer of at most 64 MiB can be allocated");
    let mut why: Vec<String> = pool
        .degraded_reason()
        .map(str::to_string)
        .into_iter()
        .collect();
    why.extend(stream.register(&pool));
    if !why.is_empty() {
        SAID.call_once(|| {
            tracing::warn!(
                "receive staging degraded, still working: {}",
                why.join("; ")
            )
        });
    }
    pool.acquire()
}
