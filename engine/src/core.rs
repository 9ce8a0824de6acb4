//! The communicator's shared core: state under one mutex, the master-reader thread, the deadline
//! watchdog, and the launch/complete steps every collective goes through (blocking or not).

use std::collections::HashMap;
use std::io::{BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::task::Waker;
use std::time::{Duration, Instant};

use concord_kernels::{DType, ReduceOp};
use concord_master::proto::{
    decode_master, encode_peer, CollectiveDesc, MasterMsg, ProtoError, MAX_MESSAGE_BYTES,
};

use crate::collective::ring::RingPlan;
use crate::collective::Traffic;
use crate::communicator::{Config, ReduceInfo};
use crate::dataplane::{DataPlane, FirstSends, Op, PlaneEvent, RawBuf};
use crate::gpu::{DeviceOp, Gpu};
use crate::protocol::{CollPhase, Effect, PeerProto, TIMEOUT_MARK};
use crate::Error;

/// A collective launched by this peer, from its vote to its outcome.
#[derive(Debug)]
pub(crate) struct Launch {
    src: RawBuf,
    dst: RawBuf,
    /// In place (`src` is `dst`): where each range's original goes before its first write.
    backup: Option<RawBuf>,
    /// Device buffers: `src` and `dst` are the device side's pinned mirror.
    device: Option<Arc<DeviceOp>>,
    dtype: DType,
    op: ReduceOp,
    count: usize,
    deadline: Instant,
    timeout: Duration,
    /// When this peer asked the master to abort it (deadline passed or user cancel).
    cancelled_at: Option<Instant>,
    /// (seq, world, epoch, op) once the master let it go.
    running: Option<(u64, usize, u64, Arc<Op>)>,
    traffic: Traffic,
    /// When it was launched, let go by the master, and finished by the data plane here (for
    /// the debug log of where a collective's time went).
    launched_at: Instant,
    commenced_at: Option<Instant>,
    moved_at: Option<Instant>,
}

pub(crate) struct Shared {
    pub(crate) proto: PeerProto,
    pub(crate) plane: Option<DataPlane>,
    pub(crate) master: TcpStream,
    launched: HashMap<u64, Launch>,
    wakers: Vec<(u64, Waker)>,
    /// When the watchdog wakes next (`None`: only when told): a launch whose deadline is later
    /// need not wake it (a thread wake-up per collective costs on small machines).
    watch_at: Option<Instant>,
    /// First frames of collectives registered under the lock, sent by whoever releases it
    /// (see [`crate::dataplane::FirstSends`]).
    first_sends: Vec<FirstSends>,
}

pub(crate) struct Inner {
    pub(crate) state: Mutex<Shared>,
    pub(crate) cond: Condvar,
    /// The watchdog's own wake-up: new deadlines, cancels, shutdown (not every message).
    watch: Condvar,
    pub(crate) listener: TcpListener,
    pub(crate) config: Config,
    pub(crate) backend: concord_transport::BackendKind,
    closing: std::sync::atomic::AtomicBool,
    /// Backups of async in-place inputs, reused so that a collective costs a copy, not an
    /// allocation and its page faults; at most `BACKUP_POOL_BYTES` are kept.
    backups: Mutex<Vec<Vec<u8>>>,
    /// The GPU of the device buffers handed to this communicator, opened at the first one.
    gpu: Mutex<Option<Arc<Gpu>>>,
    /// The emulated device of the tests' hidden entry point.
    emulated: Mutex<Option<Arc<Gpu>>>,
    /// Whether threads waiting on this peer's collectives poll before they block.
    pub(crate) pace: Arc<Pace>,
    /// The master connection's read side (reader thread, or a driving caller).
    master_in: MasterIn,
    /// Bumped by every [`Inner::notify`]: what a polling caller watches.
    notified: std::sync::atomic::AtomicU64,
}

/// Most bytes of idle in-place backups a communicator keeps for reuse.
const BACKUP_POOL_BYTES: usize = 1 << 30;

/// How long a peer waits for the master's answer to a cancel before failing the operation alone.
const CANCEL_GRACE: Duration = Duration::from_secs(5);

impl Inner {
    pub(crate) fn new(
        proto: PeerProto,
        master: TcpStream,
        master_read: TcpStream,
        listener: TcpListener,
        config: Config,
        backend: concord_transport::BackendKind,
    ) -> Self {
        let pace = Arc::new(Pace {
            large_in_flight: Default::default(),
            activity: Default::default(),
            spin: config.spin,
        });
        Inner {
            state: Mutex::new(Shared {
                proto,
                plane: None,
                master,
                launched: HashMap::new(),
                wakers: Vec::new(),
                first_sends: Vec::new(),
                watch_at: None,
            }),
            cond: Condvar::new(),
            watch: Condvar::new(),
            listener,
            config,
            backend,
            closing: std::sync::atomic::AtomicBool::new(false),
            backups: Mutex::new(Vec::new()),
            gpu: Mutex::new(None),
            emulated: Mutex::new(None),
            pace,
            master_in: MasterIn::new(master_read),
            notified: Default::default(),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Shared> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes blocked callers, the watchdog and pending futures.
    pub(crate) fn notify(&self, g: &mut Shared) {
        self.notified
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        for (_, w) in g.wakers.drain(..) {
            w.wake();
        }
        self.cond.notify_all();
    }

    /// Waits until `f` yields, the master goes away, or `deadline` passes.
    pub(crate) fn wait<T>(
        &self,
        deadline: Instant,
        what: &str,
        mut f: impl FnMut(&mut Shared) -> Option<Result<T, Error>>,
    ) -> Result<T, Error> {
        let mut g = self.lock();
        loop {
            if let Some(r) = f(&mut g) {
                return r;
            }
            if let Some(e) = g.proto.fatal() {
                return Err(e.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout(what.to_string()));
            }
            g = self
                .cond
                .wait_timeout(g, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Starts a collective: backpressure on the in-flight limit, then the vote.
    ///
    /// In place, `src` is `dst` and `backup` a buffer of the same size (contents unspecified)
    /// that receives each range's original just before its first write; a failure puts the
    /// saved ranges back, so the caller gets its input again.
    ///
    /// # Safety
    /// `src`, `dst`, `backup` (and the device buffers of `device`) must stay alive, and
    /// untouched by the caller, until [`Inner::complete`] returned for this tag (or forever, if
    /// it never does).
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn launch(
        &self,
        src: RawBuf,
        dst: RawBuf,
        backup: Option<RawBuf>,
        device: Option<Arc<DeviceOp>>,
        dtype: DType,
        op: ReduceOp,
        tag: u64,
        timeout: Duration,
    ) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        let limit = self.config.max_in_flight;
        let mut g = self
            .wait(
                deadline,
                &format!("all_reduce(tag {tag}): {limit} collectives already in flight"),
                |s| (s.launched.len() < limit).then_some(Ok(())),
            )
            .map(|()| self.lock())?;
        let count = dst.len / dtype.size_bytes();
        let desc = CollectiveDesc {
            count: count as u64,
            dtype: dtype.name().into(),
            op: op.name().into(),
        };
        g.proto.start_collective(tag, desc)?;
        let launch = Launch {
            src,
            dst,
            backup,
            device,
            dtype,
            op,
            count,
            deadline,
            timeout,
            cancelled_at: None,
            running: None,
            traffic: Traffic::default(),
            launched_at: Instant::now(),
            commenced_at: None,
            moved_at: None,
        };
        self.pace.launched(launch.dst.len);
        g.launched.insert(tag, launch);
        flush(&mut g);
        crate::fault::kill_point("vote", Some(tag));
        if g.watch_at.is_none_or(|at| deadline < at) {
            self.watch.notify_all(); // The watchdog learns the earlier deadline.
        }
        Ok(())
    }

    /// The outcome of `tag`, if it has one: `Some` only once, after which the buffers are free.
    pub(crate) fn try_complete(&self, tag: u64) -> Option<Result<ReduceInfo, Error>> {
        let mut g = self.lock();
        let outcome = match g.proto.take_collective(tag) {
            Some(r) => r,
            None => {
                let e = g.proto.fatal().cloned()?;
                g.proto.forget(tag);
                Err(e)
            }
        };
        let was_full = g.launched.len() >= self.config.max_in_flight;
        let launch = g
            .launched
            .remove(&tag)
            .expect("a launched tag has a launch");
        self.pace.completed(launch.dst.len);
        if let (Some((seq, _, _, _)), Some(plane)) = (&launch.running, &g.plane) {
            plane.retire(tag, *seq);
        }
        if was_full {
            self.notify(&mut g); // A slot is free: wake a launch waiting on the limit.
        }
        drop(g);
        Some(self.release(launch, outcome))
    }

    /// Blocks until `tag` has its outcome (the watchdog bounds the wait by the deadline).
    pub(crate) fn complete(&self, tag: u64) -> Result<ReduceInfo, Error> {
        use std::sync::atomic::Ordering;
        let pending = |g: &Shared| {
            g.proto
                .collective(tag)
                .is_some_and(|p| !matches!(p, CollPhase::Done | CollPhase::Failed(_)))
                && g.proto.fatal().is_none()
        };
        {
            let mut g = self.lock();
            while pending(&g) {
                // Poll while collectives are moving: the outcome is likely microseconds away,
                // and a blocking wake-up would cost more than the rest of a small collective.
                let seen = self.notified.load(Ordering::Acquire);
                if self.pace.polling() {
                    // A small host collective: this thread reads the master connection and the
                    // first ring connection itself (see `MasterIn`).
                    let drive = g.launched.get(&tag).is_some_and(|l| {
                        l.device.is_none() && l.dst.len <= crate::dataplane::INLINE_MAX_TOTAL_BYTES
                    });
                    let plane = g.plane.as_ref().filter(|_| drive).map(DataPlane::driver);
                    drop(g);
                    let master = drive.then(|| MasterDriver::start(self));
                    // Each poll re-reads the window: every event of the collective extends it.
                    concord_transport::spin::spin_until(Duration::MAX, || {
                        if self.notified.load(Ordering::Acquire) != seen || !self.pace.polling() {
                            return true;
                        }
                        if let Some(m) = &master {
                            m.step();
                        }
                        if let Some(p) = &plane {
                            p.step();
                        }
                        self.notified.load(Ordering::Acquire) != seen
                    });
                    drop(master);
                    drop(plane);
                    g = self.lock();
                    if self.notified.load(Ordering::Acquire) != seen || self.pace.polling() {
                        continue;
                    }
                }
                g = self.cond.wait(g).unwrap_or_else(|p| p.into_inner());
            }
        }
        self.try_complete(tag).expect("finished above")
    }

    /// Registers a waker for `tag` (futures).
    pub(crate) fn register_waker(&self, tag: u64, waker: &Waker) {
        let mut g = self.lock();
        let done = g
            .proto
            .collective(tag)
            .is_none_or(|p| matches!(p, CollPhase::Done | CollPhase::Failed(_)))
            || g.proto.fatal().is_some();
        if done {
            waker.wake_by_ref();
        } else {
            g.wakers.push((tag, waker.clone()));
        }
    }

    /// Asks every peer to abort `tag`.
    pub(crate) fn cancel(&self, tag: u64, reason: String) {
        let mut guard = self.lock();
        let g = &mut *guard;
        if let Some(l) = g.launched.get_mut(&tag) {
            if l.cancelled_at.is_none() && g.proto.cancel(tag, reason) {
                l.cancelled_at = Some(Instant::now());
                flush(g);
                self.notify(g);
                self.watch.notify_all();
            }
        }
    }

    /// Waits until no thread touches the launch's buffers, then turns the outcome into a result.
    fn release(&self, launch: Launch, outcome: Result<(), Error>) -> Result<ReduceInfo, Error> {
        if tracing::enabled!(tracing::Level::DEBUG) {
            let us = |a: Instant, b: Option<Instant>| {
                b.map_or(-1.0, |b| b.saturating_duration_since(a).as_secs_f64() * 1e6)
            };
            let c = launch.commenced_at;
            tracing::debug!(
                "collective {}: start vote {:.1} us, data {:.1} us, completion vote {:.1} us",
                launch.count,
                us(launch.launched_at, c),
                c.map_or(-1.0, |c| us(c, launch.moved_at)),
                launch
                    .moved_at
                    .map_or(-1.0, |m| us(m, Some(Instant::now()))),
            );
        }
        let (seq, world, epoch) = launch
            .running
            .as_ref()
            .map_or((0, 0, 0), |(s, w, e, _)| (*s, *w, *e));
        if let Some((_, _, _, op)) = &launch.running {
            if !op.retire_and_wait(self.config.op_timeout) {
                // A thread is stuck in a socket call: break the ring so that it returns.
                let plane = self.lock().plane.take();
                drop(plane);
                op.retire_and_wait(Duration::from_secs(3600));
            }
            if outcome.is_err() {
                // SAFETY: retired and idle: no data-plane thread touches the buffers any more,
                // and the caller's contract keeps them alive until this returns.
                unsafe { op.restore_saved() };
            }
        }
        outcome.map(|()| ReduceInfo {
            world,
            seq,
            epoch,
            traffic: launch.traffic,
            device: None,
        })
    }

    /// Starts the data movement of an attempt the master let go (reader thread, lock held).
    fn run(&self, g: &mut Shared, tag: u64, seq: u64) {
        let (epoch, ring) = g.proto.ring().expect("collectives run on a ring").clone();
        let me = g.proto.peer_id();
        let rank = ring
            .iter()
            .position(|m| Some(m.peer_id) == me)
            .expect("this peer is in its ring");
        let world = ring.len();
        let Some(l) = g.launched.get_mut(&tag) else {
            return;
        };
        l.commenced_at = Some(Instant::now());
        let plan = RingPlan::new(
            world,
            rank,
            l.count,
            l.dtype.size_bytes(),
            sub_bytes_for(
                l.count,
                l.dtype.size_bytes(),
                world,
                self.config.sub_chunk_bytes,
            ),
        );
        let op = Arc::new(
            Op::new(tag, seq, plan, l.dtype, l.op, l.src, l.dst)
                .with_device(l.device.clone())
                .with_backup(l.backup),
        );
        l.running = Some((seq, world, epoch, Arc::clone(&op)));
        if let Some(device) = &l.device {
            let staged = if world == 1 || l.count == 0 {
                device.copy_all()
            } else {
                // Step 0 sends this peer's own chunk: only that one needs the host.
                let c = op.plan.chunk_bytes(op.plan.send_chunk(0));
                device.stage_input(c, op.copy_recvs())
            };
            if let Err(e) = staged {
                g.proto.collective_finished(tag, seq, Err(e));
                return;
            }
            if world == 1 || l.count == 0 {
                g.proto.collective_finished(tag, seq, Ok(()));
                return;
            }
        }
        if world == 1 || l.count == 0 {
            // Nothing to move: the result is the input (divided by one for avg).
            let _busy = op.enter();
            // SAFETY: the launch's buffers are alive (launch contract) and no other thread has
            // this op; src and dst are distinct buffers, or the same one (in place: no copy).
            let dst = unsafe {
                if l.src.ptr != l.dst.ptr {
                    l.dst
                        .slice_mut(0..l.dst.len)
                        .copy_from_slice(l.src.slice(0..l.src.len));
                }
                l.dst.slice_mut(0..l.dst.len)
            };
            let r = concord_kernels::finish(dst, l.dtype, l.op, 1).map_err(|e| e.to_string());
            g.proto.collective_finished(tag, seq, r);
            return;
        }
        let registered = match &g.plane {
            Some(plane) => plane.register(op),
            None => Err("this peer has no ring connections; call update_topology()".into()),
        };
        match registered {
            Ok(first) => g.first_sends.push(first),
            Err(e) => g.proto.collective_finished(tag, seq, Err(e)),
        }
    }

    fn apply(&self, g: &mut Shared, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::Run { tag, seq } => self.run(g, tag, seq),
                Effect::Retire { tag, seq } => {
                    if let Some(plane) = &g.plane {
                        plane.retire(tag, seq);
                    }
                }
                Effect::BreakRing => {
                    if let Some(plane) = &g.plane {
                        plane.break_links();
                    }
                }
            }
        }
    }

    /// A plane's report that an attempt finished here (TX or RX thread; no lock held).
    pub(crate) fn on_plane_event(&self, event: PlaneEvent) {
        let PlaneEvent::Finished {
            tag,
            seq,
            result,
            ring_intact,
        } = event;
        let mut g = self.lock();
        if let (Ok(t), Some(l)) = (&result, g.launched.get_mut(&tag)) {
            l.traffic = *t;
            l.moved_at = Some(Instant::now());
        }
        self.pace.moved();
        // Success only moves the collective to its completion vote: nobody waits for that, so
        // nobody is woken (on two cores every spurious wake-up shows in small-message latency).
        let wake = result.is_err();
        match result {
            // Only this collective failed: abort it everywhere, keep the ring.
            Err(why) if ring_intact => {
                g.proto.cancel(tag, why);
            }
            result => g.proto.collective_finished(tag, seq, result.map(drop)),
        }
        flush(&mut g);
        if wake {
            self.notify(&mut g);
        }
    }

    /// A buffer of exactly `bytes` for an in-place backup (contents unspecified).
    pub(crate) fn take_backup(&self, bytes: usize) -> Vec<u8> {
        let mut pool = self.backups.lock().unwrap_or_else(|p| p.into_inner());
        match pool.iter().position(|b| b.capacity() >= bytes) {
            Some(i) => {
                let mut b = pool.swap_remove(i);
                b.resize(bytes, 0);
                b
            }
            None => vec![0u8; bytes],
        }
    }

    /// Returns a backup to the pool (dropped if the pool is full).
    pub(crate) fn give_backup(&self, backup: Vec<u8>) {
        let mut pool = self.backups.lock().unwrap_or_else(|p| p.into_inner());
        let held: usize = pool.iter().map(Vec::capacity).sum();
        if held + backup.capacity() <= BACKUP_POOL_BYTES {
            pool.push(backup);
        }
    }

    /// The GPU for buffers of `ctx`: opened (kernels compiled) at the first device buffer.
    pub(crate) fn gpu(
        &self,
        ctx: &Arc<crate::gpu::cudarc::driver::CudaContext>,
    ) -> Result<Arc<Gpu>, Error> {
        let mut slot = self.gpu.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(gpu) = slot.as_ref() {
            return Ok(Arc::clone(gpu));
        }
        let gpu =
            Arc::new(Gpu::new(Arc::clone(ctx), self.config.sub_chunk_bytes).map_err(Error::Cuda)?);
        tracing::info!("device buffers on {}", gpu.device());
        *slot = Some(Arc::clone(&gpu));
        Ok(gpu)
    }

    /// The emulated device (host memory standing in for GPU memory; tests only).
    pub(crate) fn emulated_gpu(&self) -> Arc<Gpu> {
        let mut slot = self.emulated.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(slot.get_or_insert_with(|| Arc::new(Gpu::emulated(self.config.sub_chunk_bytes))))
    }

    pub(crate) fn shutting_down(&self) -> bool {
        self.closing.load(std::sync::atomic::Ordering::Acquire)
    }

    pub(crate) fn begin_shutdown(&self) {
        self.closing
            .store(true, std::sync::atomic::Ordering::Release);
        let mut g = self.lock();
        self.notify(&mut g);
        self.watch.notify_all();
    }
}

/// Sub-chunks per ring step that a small collective is cut into, so that receiving, reducing
/// and sending still overlap within each step (a step of one sub-chunk cannot). Three keeps
/// such collectives on one connection (striping starts at
/// `dataplane::STRIPE_MIN_SENDS_PER_STEP`, four), which is faster at these sizes. Measured
/// with `concord bench --local 2 -b 1M -e 1M -n 300`, three interleaved rounds: 668-758 us
/// against 735-885 us with one 512 KiB sub-chunk per step, 809-932 us with four (striped).
const SMALL_SUBS_PER_STEP: usize = 3;

/// The smallest sub-chunk that cutting a small collective produces: below it, per-frame costs
/// outweigh the overlap.
const MIN_SMALL_SUB_BYTES: usize = 64 << 10;

/// The sub-chunk size of a collective of `count` elements of `elem_bytes` on a ring of
/// `world`: the configured size, or less where a ring step's chunk would be fewer than
/// [`SMALL_SUBS_PER_STEP`] sub-chunks (never under [`MIN_SMALL_SUB_BYTES`]). Every peer computes
/// the same from the same inputs.
fn sub_bytes_for(count: usize, elem_bytes: usize, world: usize, configured: usize) -> usize {
    let chunk_elems = count.div_ceil(world.max(1));
    let sub_elems = chunk_elems
        .div_ceil(SMALL_SUBS_PER_STEP)
        .max(MIN_SMALL_SUB_BYTES.div_ceil(elem_bytes));
    (sub_elems * elem_bytes).min(configured)
}

/// When the threads waiting on a peer's collectives poll before they block.
///
/// Small collectives are chains of events (the master's answer to a vote, frames, the outcome)
/// each microseconds after the last, and a blocking wake-up costs tens of microseconds on a
/// virtual machine. So for `spin` after any event of this peer's collectives (one launched, a
/// master message, a frame, one finished here) the master reader, a waiting caller and the
/// data plane's first connection poll before they block (see [`concord_transport::spin`]); the
/// window covers the gap to the next collective of a loop too. Never while a collective larger
/// than [`SPIN_MAX_COLLECTIVE_BYTES`](crate::SPIN_MAX_COLLECTIVE_BYTES) is in flight: its
/// events are far apart and every core is busy moving its bytes.
#[derive(Debug)]
pub(crate) struct Pace {
    large_in_flight: std::sync::atomic::AtomicUsize,
    activity: concord_transport::spin::Stamp,
    spin: Duration,
}

impl Pace {
    fn launched(&self, bytes: usize) {
        if bytes > crate::SPIN_MAX_COLLECTIVE_BYTES {
            self.large_in_flight
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        self.moved();
    }

    fn completed(&self, bytes: usize) {
        if bytes > crate::SPIN_MAX_COLLECTIVE_BYTES {
            self.large_in_flight
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
        self.moved();
    }

    /// A collective moved: the polling window starts again.
    pub(crate) fn moved(&self) {
        if !self.spin.is_zero() {
            self.activity.touch();
        }
    }

    /// Whether a waiting thread should poll rather than block now.
    pub(crate) fn polling(&self) -> bool {
        !self.spin.is_zero()
            && self
                .large_in_flight
                .load(std::sync::atomic::Ordering::Relaxed)
                == 0
            && !self.activity.left(self.spin).is_zero()
    }
}

/// Sends what the protocol queued for the master. A write error means the master is gone.
pub(crate) fn flush(g: &mut Shared) {
    while let Some(msg) = g.proto.poll_transmit() {
        if let Err(e) = g.master.write_all(&encode_peer(&msg)) {
            // Not the verdict: the master may have said why it closed (a kick, after a stall)
            // in bytes still waiting to be read. Stop sending; the reader thread reads what is
            // left and ends every wait with the master's reason, or the end of the stream.
            tracing::debug!("writing to the master failed ({e}); the reader thread will say why");
            while g.proto.poll_transmit().is_some() {}
            let _ = g.master.shutdown(std::net::Shutdown::Write);
            return;
        }
    }
}

/// The read side of the master connection.
///
/// The reader thread (`concord-master-rx`) reads it, except while a caller waits for a small
/// blocking collective with polling on: then the caller reads it itself ("drives", together
/// with the first ring connection, see [`crate::dataplane::Driver`]) and the reader thread
/// steps aside, so that the go-ahead, the frames and the outcome reach the caller without a
/// hand-off between threads. Whoever holds `reader` reads one whole message and handles it as
/// the reader thread would ([`handle_master`]).
pub(crate) struct MasterIn {
    fd: std::os::fd::RawFd,
    reader: Mutex<BufReader<TcpStream>>,
    /// Callers driving now; the reader thread stays aside while there are any.
    aside: crate::aside::Aside,
    /// The connection ended (or broke the protocol) and the protocol was told: read no more.
    ended: std::sync::atomic::AtomicBool,
}

impl MasterIn {
    pub(crate) fn new(stream: TcpStream) -> Self {
        use std::os::fd::AsRawFd;
        MasterIn {
            fd: stream.as_raw_fd(),
            reader: Mutex::new(BufReader::new(stream)),
            aside: Default::default(),
            ended: Default::default(),
        }
    }

    fn reader(&self) -> MutexGuard<'_, BufReader<TcpStream>> {
        self.reader.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl std::fmt::Debug for MasterIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasterIn").finish_non_exhaustive()
    }
}

/// A caller driving the master connection (see [`MasterIn`]); dropping it stops.
struct MasterDriver<'a> {
    inner: &'a Inner,
}

impl<'a> MasterDriver<'a> {
    fn start(inner: &'a Inner) -> Self {
        inner.master_in.aside.enter();
        MasterDriver { inner }
    }

    /// Reads and handles one message if one is waiting and nobody else is reading.
    fn step(&self) {
        let mi = &self.inner.master_in;
        if mi.ended.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let Ok(mut r) = mi.reader.try_lock() else {
            return;
        };
        if r.buffer().is_empty() && !concord_transport::spin::readable(mi.fd) {
            return;
        }
        let msg = read_message(&mut *r);
        drop(r);
        if let Err(e) = msg.and_then(|m| handle_master(self.inner, m)) {
            master_ended(self.inner, e);
        }
    }
}

impl Drop for MasterDriver<'_> {
    fn drop(&mut self) {
        let gave_up = !self.inner.pace.polling();
        self.inner.master_in.aside.leave(gave_up);
    }
}

/// One master message into the protocol (reader thread or driving caller; no lock held).
/// `Err`: the connection is unusable (the master broke the protocol).
fn handle_master(inner: &Inner, msg: MasterMsg) -> Result<(), Error> {
    if !matches!(msg, MasterMsg::Ping) {
        inner.pace.moved();
    }
    // A go-ahead (unless the collective ended at once) and a ping change nothing a caller
    // waits for: wake nobody.
    let quiet = match &msg {
        MasterMsg::Ping => Some(None),
        MasterMsg::CollCommence { tag, .. } => Some(Some(*tag)),
        _ => None,
    };
    let mut g = inner.lock();
    let effects = g.proto.handle(msg)?;
    inner.apply(&mut g, effects);
    flush(&mut g);
    let quiet = match quiet {
        Some(None) => true,
        Some(Some(tag)) => {
            matches!(
                g.proto.collective(tag),
                Some(CollPhase::Run { .. } | CollPhase::Voting)
            ) && g.proto.fatal().is_none()
        }
        None => false,
    };
    if !quiet {
        inner.notify(&mut g);
    }
    let first = std::mem::take(&mut g.first_sends);
    drop(g);
    for f in first {
        f.send();
    }
    Ok(())
}

/// The master connection ended (or broke the protocol): every wait ends with why. Once.
fn master_ended(inner: &Inner, error: Error) {
    if inner
        .master_in
        .ended
        .swap(true, std::sync::atomic::Ordering::AcqRel)
    {
        return;
    }
    let mut g = inner.lock();
    let error = if inner.shutting_down() {
        Error::MasterLost("the communicator was dropped".into())
    } else {
        error
    };
    let effects = g.proto.master_lost(error);
    inner.apply(&mut g, effects);
    inner.notify(&mut g);
    let first = std::mem::take(&mut g.first_sends);
    drop(g);
    drop(first); // Unsent: wakes the TX threads, which find the plane failed.
}

/// The reader thread: master messages into the protocol, until the connection ends.
pub(crate) fn read_master(inner: Arc<Inner>) {
    let mi = &inner.master_in;
    loop {
        if mi.ended.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        if mi.aside.driving() && !inner.shutting_down() {
            mi.aside.wait();
            continue;
        }
        if mi.reader().buffer().is_empty() {
            if inner.pace.polling() {
                // A vote's answer is likely on its way: poll rather than pay a wake-up.
                concord_transport::spin::spin_until(Duration::MAX, || {
                    concord_transport::spin::readable(mi.fd)
                        || !inner.pace.polling()
                        || mi.aside.driving()
                });
                if mi.aside.driving() {
                    continue;
                }
            }
            concord_transport::spin::wait_readable(mi.fd, None);
            if mi.aside.driving() && !inner.shutting_down() {
                continue; // The driver reads what came.
            }
        }
        // May block (holding the reader) if a driver took the bytes meanwhile: then this
        // thread handles the next message, and the driver sees it through `notified`.
        let msg = read_message(&mut *mi.reader());
        if let Err(e) = msg.and_then(|m| handle_master(&inner, m)) {
            return master_ended(&inner, e);
        }
    }
}

fn read_message(r: &mut impl Read) -> Result<MasterMsg, Error> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => {
            Error::MasterLost("the master closed the connection".into())
        }
        _ => Error::MasterLost(format!("reading from the master: {e}")),
    })?;
    let len = u32::from_le_bytes(len) as usize;
    if len == 0 || len > MAX_MESSAGE_BYTES {
        return Err(Error::Protocol(format!(
            "the master sent a message of {len} bytes"
        )));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)
        .map_err(|e| Error::MasterLost(format!("reading from the master: {e}")))?;
    decode_master(&body).map_err(|e| match e {
        ProtoError::Version { ours, theirs } => Error::VersionMismatch { ours, theirs },
        other => Error::Protocol(other.to_string()),
    })
}

/// The watchdog thread: sleeps until the next deadline, then asks the master to abort what is
/// late; fails alone what the master does not answer for within a grace period.
pub(crate) fn watchdog(inner: Weak<Inner>) {
    loop {
        let Some(inner) = inner.upgrade() else { return };
        if inner.shutting_down() {
            return;
        }
        let mut g = inner.lock();
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        let mut late = Vec::new();
        let mut unanswered = Vec::new();
        for (tag, l) in &g.launched {
            match l.cancelled_at {
                None if l.deadline <= now => late.push((*tag, l.timeout)),
                None => next = Some(next.map_or(l.deadline, |n| n.min(l.deadline))),
                Some(at) if at + CANCEL_GRACE <= now => unanswered.push(*tag),
                Some(at) => {
                    next = Some(next.map_or(at + CANCEL_GRACE, |n| n.min(at + CANCEL_GRACE)))
                }
            }
        }
        let acted = !late.is_empty() || !unanswered.is_empty();
        let me = g.proto.peer_id().unwrap_or(0);
        for (tag, timeout) in late {
            let reason = format!(
                "{TIMEOUT_MARK} after {} ms (deadline of peer {me})",
                timeout.as_millis()
            );
            if let Some(l) = g.launched.get_mut(&tag) {
                l.cancelled_at = Some(now);
            }
            if !g.proto.cancel(tag, reason) {
                continue;
            }
            next = Some(next.map_or(now + CANCEL_GRACE, |n| n.min(now + CANCEL_GRACE)));
        }
        for tag in unanswered {
            // The master did not answer: fail it here, alone.
            g.proto.fail_locally(
                tag,
                Error::Timeout(format!(
                    "collective {tag}: the master did not answer a cancel within {} s",
                    CANCEL_GRACE.as_secs()
                )),
            );
        }
        flush(&mut g);
        if acted {
            inner.notify(&mut g);
        }
        let cond = &inner.watch;
        g.watch_at = next;
        match next {
            Some(at) => {
                let wait = at
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1));
                drop(
                    cond.wait_timeout(g, wait)
                        .unwrap_or_else(|p| p.into_inner()),
                );
            }
            None => drop(cond.wait(g).unwrap_or_else(|p| p.into_inner())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_collectives_are_cut_into_three_sub_chunks_per_step() {
        let plan = |count: usize, elem: usize, world: usize| {
            RingPlan::new(
                world,
                0,
                count,
                elem,
                sub_bytes_for(count, elem, world, 512 << 10),
            )
        };
        // 1 MiB of f32 on 2 peers: 512 KiB chunks in three sub-chunks, not one.
        let p = plan(1 << 18, 4, 2);
        assert!((0..2).all(|c| p.subs(c) == 3), "{p:?}");
        // Uneven chunks and odd element sizes never give a fourth (striped) sub-chunk.
        for (count, elem, world) in [(1_000_003, 4, 3), (777_777, 2, 4), (123_457, 8, 2)] {
            let p = plan(count, elem, world);
            assert!(
                (0..world).all(|c| (1..=3).contains(&p.subs(c))),
                "{count} {elem} {world}: {p:?}"
            );
        }
        // Large collectives keep the configured size; tiny ones are one sub-chunk.
        assert_eq!(sub_bytes_for(64 << 20, 1, 2, 512 << 10), 512 << 10);
        assert_eq!(plan(1024, 4, 2).subs(0), 1);
        // Never below the floor.
        assert_eq!(sub_bytes_for(3 << 16, 1, 2, 512 << 10), MIN_SMALL_SUB_BYTES);
    }
}
