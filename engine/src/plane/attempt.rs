//! One attempt of a collective as the data plane sees it: its schedule, its buffers and its
//! progress.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use concord_kernels::{DType, ReduceOp, Stores};

use std::sync::Arc;

use super::atomics::{AtomicBool, AtomicU64, AtomicUsize, Condvar, Mutex};
use crate::collective::ring::{CollKind, Place, RingPlan};
use crate::collective::Traffic;
use crate::gpu::DeviceAttempt;
use crate::raw_buf::RawBuf;

/// Collectives with fewer sends per step than this (on average) use one connection: below
/// about four sub-chunks per step, striping cost more in wake-ups than it gained (measured with
/// `concord bench --local 2`: at 1 MiB one connection took 516 µs, two 630 µs; at 64 MiB two
/// gave 1.91-1.97 GB/s, one 1.37-1.57).
pub(crate) const STRIPE_MIN_SENDS_PER_STEP: usize = 4;

/// Host collectives of at least this many bytes ([`Stores::STREAMING_MIN_BYTES`] by default;
/// `CONCORD_STREAM_MIN_BYTES` overrides it, `0` streams always, a huge value never) write their reduce-scatter results out of place
/// with streaming (non-temporal) stores: no read of each destination line before it is written
/// (one memory transfer per line instead of two), but the TX thread then sends those bytes from
/// memory rather than from the cache, so the gain end to end is a few per cent. Measured with `concord bench --local 2|4 -b 256M` (see
/// README.md); smaller collectives keep their results in the cache, where the TX thread and
/// the caller read them soon.
pub(crate) const STREAM_MIN_BYTES: usize = Stores::STREAMING_MIN_BYTES;

/// In-place collectives of at least this many bytes write the originals they save to the
/// backup with streaming stores (only a failure reads them, so they need not take cache space
/// nor cost a read of each backup line). Below, the whole collective sits in the cache anyway:
/// 64 KiB in-place all-reduces of 2 peers took 53.5 µs with cached backups against 57.3
/// streamed (medians of 5 interleaved rounds; 4 KiB and 1 MiB within noise of each other).
pub(crate) const BACKUP_STREAM_MIN_BYTES: usize = 256 << 10;

/// [`STREAM_MIN_BYTES`], or `CONCORD_STREAM_MIN_BYTES` when set to a number of bytes (read once).
pub(crate) fn stream_min_bytes() -> usize {
    static MIN: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MIN.get_or_init(|| match std::env::var("CONCORD_STREAM_MIN_BYTES") {
        Ok(v) => v.trim().parse().unwrap_or_else(|_| {
            tracing::warn!(
                "CONCORD_STREAM_MIN_BYTES={v:?} is not a number of bytes; using {STREAM_MIN_BYTES}"
            );
            STREAM_MIN_BYTES
        }),
        Err(_) => STREAM_MIN_BYTES,
    })
}

#[derive(Debug, Default)]
struct Gate {
    retired: bool,
    busy: usize,
}

/// An attempt of a collective running on the data plane.
#[derive(Debug)]
pub(crate) struct Attempt {
    pub(crate) tag: u64,
    pub(crate) seq: u64,
    pub(crate) plan: RingPlan,
    pub(crate) dtype: DType,
    pub(crate) reduce: ReduceOp,
    pub(crate) src: RawBuf,
    pub(crate) dst: RawBuf,
    /// Scratch for partial sums that are sent on and not kept ([`Place::Work`]).
    pub(crate) work: Option<RawBuf>,
    /// Device buffers: `src` and `dst` are then both the pinned mirror, and the device side
    /// does the reductions (see `crate::gpu`).
    pub(crate) device: Option<Arc<DeviceAttempt>>,
    /// In place: each range of `dst` goes here before its first write.
    pub(crate) backup: Option<RawBuf>,
    /// Per (chunk, sub-chunk) range of `dst`: its original is in `backup`.
    saved: Box<[AtomicBool]>,
    /// How reduce-scatter results are written: streamed past the cache for large collectives
    /// out of place (see [`STREAM_MIN_BYTES`]), cached in place.
    pub(crate) stores: Stores,
    /// How in-place originals are written to `backup`: streamed for collectives of at least
    /// [`BACKUP_STREAM_MIN_BYTES`] (only a failure reads them), cached below.
    pub(crate) backup_stores: Stores,
    /// Ranges before chunk `c`, to index `saved`.
    chunk_prefix: Vec<usize>,
    /// Sends before each of this peer's send steps (from the first, [`RingPlan::send_steps`]).
    send_prefix: Vec<usize>,
    /// Receives before each of this peer's receive steps (from [`RingPlan::recv_steps`]).
    pub(crate) recv_prefix: Vec<usize>,
    pub(crate) recv_done: Box<[AtomicBool]>,
    /// Receives whose frame arrived (on whichever connection): a second copy is refused.
    recv_claimed: Box<[AtomicBool]>,
    /// The next send, claimed by whichever TX thread is free (dynamic striping).
    send_next: AtomicUsize,
    /// Whether the sends are striped over every connection, or (a small collective, for which
    /// more threads only add wake-ups) all go over the first.
    pub(crate) striped: bool,
    left: AtomicUsize,
    reported: AtomicBool,
    pub(crate) failed: AtomicBool,
    sent: AtomicU64,
    received: AtomicU64,
    gate: Mutex<Gate>,
    gate_cv: Condvar,
}

/// Proof that a thread may touch an operation's buffers; dropping it releases them.
#[derive(Debug)]
pub(crate) struct Busy<'a>(&'a Attempt);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.leave();
    }
}

impl Busy<'_> {
    /// The same guard, owning its operation (an RX thread keeps it across frames while the
    /// GPU finishes one).
    pub(crate) fn into_owned(self, attempt: &Arc<Attempt>) -> BusyOwned {
        assert!(std::ptr::eq(self.0, &**attempt), "a guard of this attempt");
        std::mem::forget(self);
        BusyOwned(Arc::clone(attempt))
    }
}

/// A busy guard that owns its operation.
#[derive(Debug)]
pub(crate) struct BusyOwned(Arc<Attempt>);

impl Drop for BusyOwned {
    fn drop(&mut self) {
        self.0.leave();
    }
}

impl Attempt {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        tag: u64,
        seq: u64,
        plan: RingPlan,
        dtype: DType,
        reduce: ReduceOp,
        src: RawBuf,
        dst: RawBuf,
    ) -> Self {
        assert_eq!(src.len, plan.place_len(Place::Src), "{:?}", plan.kind);
        let dst_unused = plan.kind == CollKind::Reduce && plan.rank != plan.root;
        assert!(
            dst.len == plan.place_len(Place::Dst) || dst_unused,
            "{:?}",
            plan.kind
        );
        let (sends, recvs) = (plan.send_steps(), plan.recv_steps());
        let send_prefix: Vec<usize> = std::iter::once(0)
            .chain(sends.clone().scan(0, |acc, t| {
                *acc += plan.subs(plan.send_chunk(t));
                Some(*acc)
            }))
            .collect();
        let recv_prefix: Vec<usize> = (recvs.start..=recvs.end)
            .map(|t| plan.recv_subs_before(t))
            .collect();
        let (send_steps, steps) = (sends.len(), recvs.len());
        let (sends, recvs) = (send_prefix[send_steps], recv_prefix[steps]);
        Attempt {
            tag,
            seq,
            plan,
            dtype,
            reduce,
            src,
            dst,
            work: None,
            device: None,
            backup: None,
            saved: Box::new([]),
            // Sized by the whole collective, as an all-reduce of the same buffer would be.
            stores: if plan.count * plan.elem_bytes >= stream_min_bytes() {
                Stores::Streaming
            } else {
                Stores::Cached
            },
            backup_stores: if dst.len >= BACKUP_STREAM_MIN_BYTES {
                Stores::Streaming
            } else {
                Stores::Cached
            },
            chunk_prefix: (0..=plan.chunks())
                .map(|c| (0..c).map(|d| plan.subs(d)).sum())
                .collect(),
            recv_done: (0..recvs).map(|_| AtomicBool::new(false)).collect(),
            recv_claimed: (0..recvs).map(|_| AtomicBool::new(false)).collect(),
            send_next: AtomicUsize::new(0),
            striped: sends >= STRIPE_MIN_SENDS_PER_STEP * send_steps.max(1),
            left: AtomicUsize::new(sends + recvs),
            send_prefix,
            recv_prefix,
            reported: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            gate: Mutex::new(Gate::default()),
            gate_cv: Condvar::new(),
        }
    }

    /// Gives the collective its scratch buffer (as long as the whole buffer), which the plan
    /// needs where it lands anything in [`Place::Work`].
    pub(crate) fn with_work(mut self, work: Option<RawBuf>) -> Self {
        if let Some(w) = work {
            assert_eq!(w.len, self.plan.count * self.plan.elem_bytes);
        }
        self.work = work;
        self
    }

    /// The buffer of `place`.
    pub(crate) fn buf(&self, place: Place) -> &RawBuf {
        match place {
            Place::Src => &self.src,
            Place::Dst => &self.dst,
            Place::Work => self
                .work
                .as_ref()
                .expect("a collective with partial sums has a work buffer"),
        }
    }

    /// Marks the collective as one on device buffers (`src` and `dst` are its mirror).
    pub(crate) fn with_device(mut self, device: Option<Arc<DeviceAttempt>>) -> Self {
        self.device = device;
        self
    }

    /// In place: `backup` (as long as `dst`) receives each range of `dst` before the range is
    /// first written, and [`Attempt::restore_saved`] puts the saved ranges back.
    pub(crate) fn with_backup(mut self, backup: Option<RawBuf>) -> Self {
        if let Some(b) = backup {
            assert_eq!(b.len, self.dst.len);
            let ranges = *self.chunk_prefix.last().expect("non-empty");
            self.saved = (0..ranges).map(|_| AtomicBool::new(false)).collect();
            self.backup = Some(b);
            // A range is reduced right after its original was read for the backup: it is in
            // the cache, where streaming stores would have to evict it first.
            self.stores = Stores::Cached;
        }
        self
    }

    /// In place, for the thread about to write sub-chunk `j` of chunk `c` for the first time:
    /// the backup range it must fill with the range's original before writing (the flag is
    /// claimed here). `None` out of place, or when an earlier writer saved the range already.
    ///
    /// # Safety
    /// Inside a busy guard, by the one thread about to write that range; nobody writes it
    /// meanwhile (the ring schedule hands each range to one receive at a time).
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn claim_save(&self, c: usize, j: usize) -> Option<&mut [u8]> {
        let backup = self.backup.as_ref()?;
        if self.plan.out_place(c) != Place::Dst {
            return None;
        }
        let i = self.chunk_prefix[c] + j;
        if self.saved[i].swap(true, Ordering::AcqRel) {
            return None;
        }
        // SAFETY: the flag was clear, so this thread is the range's first writer and the only
        // one touching its backup range (the caller's contract).
        Some(unsafe { backup.slice_mut(self.plan.place_bytes(Place::Dst, c, j)) })
    }

    /// The original bytes of sub-chunk `j` of chunk `c`: the backup's copy in place (saved by
    /// an earlier writer, see [`Attempt::claim_save`]), the input itself out of place.
    ///
    /// # Safety
    /// Inside a busy guard, by the thread about to write that range; in place, the range was
    /// saved already.
    pub(crate) unsafe fn original(&self, c: usize, j: usize) -> &[u8] {
        match &self.backup {
            Some(backup) if self.plan.out_place(c) == Place::Dst => {
                debug_assert!(self.saved[self.chunk_prefix[c] + j].load(Ordering::Acquire));
                // SAFETY: saved by an earlier writer; never written again during the attempt.
                unsafe { backup.slice(self.plan.place_bytes(Place::Dst, c, j)) }
            }
            // SAFETY: nobody writes the input where the output does not overlap it.
            _ => unsafe { self.src.slice(self.plan.place_bytes(Place::Src, c, j)) },
        }
    }

    /// With nothing to move (one peer, no elements, a barrier): the result is the input, copied
    /// where the output is elsewhere and finished (divided by one for `avg`).
    ///
    /// # Safety
    /// Inside a busy guard of the only thread that has this attempt; the buffers are alive.
    pub(crate) unsafe fn alone(&self) -> Result<(), String> {
        let plan = &self.plan;
        let idle = plan.count == 0
            || matches!(plan.kind, CollKind::Broadcast | CollKind::Barrier)
            || (plan.kind == CollKind::Reduce && plan.rank != plan.root);
        if idle {
            return Ok(());
        }
        debug_assert_eq!(plan.world, 1, "a ring of more peers moves its elements");
        // SAFETY: the caller's contract; src and dst are the same buffer (no copy) or distinct.
        let dst = unsafe {
            if self.src.ptr != self.dst.ptr {
                self.dst
                    .slice_mut(0..self.dst.len)
                    .copy_from_slice(self.src.slice(0..self.src.len));
            }
            self.dst.slice_mut(0..self.dst.len)
        };
        if !plan.kind.reduces() {
            return Ok(());
        }
        concord_kernels::finish(dst, self.dtype, self.reduce, 1).map_err(|e| e.to_string())
    }

    /// After a failure: puts every saved range back. Ranges never saved were never written.
    ///
    /// # Safety
    /// The operation is retired and idle (no thread touches its buffers), and they are alive.
    pub(crate) unsafe fn restore_saved(&self) {
        let Some(backup) = &self.backup else { return };
        for c in 0..self.plan.chunks() {
            for j in 0..self.plan.subs(c) {
                if self.saved[self.chunk_prefix[c] + j].load(Ordering::Acquire) {
                    let range = self.plan.place_bytes(Place::Dst, c, j);
                    // SAFETY: the caller's contract; backup and dst are distinct buffers.
                    unsafe {
                        self.dst
                            .slice_mut(range.clone())
                            .copy_from_slice(backup.slice(range))
                    };
                }
            }
        }
    }

    /// How many receives of an all-reduce are all-gather copies (steps `world - 1` and later).
    pub(crate) fn copy_recvs(&self) -> usize {
        let world = self.plan.world;
        self.recv_prefix[self.plan.steps()] - self.recv_prefix[world.saturating_sub(1)]
    }

    /// The index of receive `(t, j)` among this peer's receives (its claim and ready flag).
    pub(crate) fn recv_index(&self, t: usize, j: usize) -> usize {
        self.recv_prefix[t - self.plan.recv_steps().start] + j
    }

    /// Whether there is nothing to move (one peer, or no elements).
    pub(crate) fn is_empty(&self) -> bool {
        self.left.load(Ordering::Acquire) == 0
    }

    fn leave(&self) {
        let mut g = self.gate.lock().unwrap_or_else(|p| p.into_inner());
        g.busy -= 1;
        if g.busy == 0 {
            self.gate_cv.notify_all();
        }
    }

    /// Takes a busy guard unless the operation is retired or failed.
    pub(crate) fn enter(&self) -> Option<Busy<'_>> {
        let mut g = self.gate.lock().unwrap_or_else(|p| p.into_inner());
        if g.retired || self.failed.load(Ordering::Acquire) {
            return None;
        }
        g.busy += 1;
        Some(Busy(self))
    }

    /// Stops every thread from touching the buffers from now on, and waits (at most `timeout`)
    /// for those that are. Returns whether the buffers are free.
    pub(crate) fn retire_and_wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut g = self.gate.lock().unwrap_or_else(|p| p.into_inner());
        g.retired = true;
        while g.busy > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            g = self
                .gate_cv
                .wait_timeout(g, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// Marks the operation retired without waiting.
    pub(crate) fn retire(&self) {
        self.gate.lock().unwrap_or_else(|p| p.into_inner()).retired = true;
    }

    /// (step, sub-chunk) of send number `k`.
    fn locate(prefix: &[usize], k: usize) -> (usize, usize) {
        let t = prefix.partition_point(|&p| p <= k) - 1;
        (t, k - prefix[t])
    }

    /// The next send not yet claimed: `Some((k, step, sub))`, or `None` when all are taken.
    pub(crate) fn next_send(&self) -> Option<(usize, usize, usize)> {
        let k = self.send_next.load(Ordering::Acquire);
        if k >= *self.send_prefix.last().expect("non-empty") {
            return None;
        }
        let (t, j) = Self::locate(&self.send_prefix, k);
        Some((k, self.plan.send_steps().start + t, j))
    }

    /// Claims send `k` for the calling TX thread; false if another one took it first.
    pub(crate) fn claim_send(&self, k: usize) -> bool {
        self.send_next
            .compare_exchange(k, k + 1, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Whether send `(t, j)` has its input: the matching receive of step `t - 1` has landed,
    /// or this peer received nothing then (it sends its input).
    pub(crate) fn send_ready(&self, t: usize, j: usize) -> bool {
        if t == 0 || !self.plan.recv_steps().contains(&(t - 1)) {
            return true;
        }
        self.recv_done[self.recv_index(t - 1, j)].load(Ordering::Acquire)
    }

    /// Records that a claimed send went out. Returns true when this finished the operation.
    pub(crate) fn sent(&self, bytes: u64) -> bool {
        self.sent.fetch_add(bytes, Ordering::Relaxed);
        self.left.fetch_sub(1, Ordering::AcqRel) == 1
    }

    /// Claims receive `m` for the frame that just arrived; false if it arrived before.
    pub(crate) fn claim_recv(&self, m: usize) -> bool {
        !self.recv_claimed[m].swap(true, Ordering::AcqRel)
    }

    /// Records receive `m`. Returns true when this finished the operation.
    pub(crate) fn received(&self, m: usize, bytes: u64) -> bool {
        self.recv_done[m].store(true, Ordering::Release);
        self.received.fetch_add(bytes, Ordering::Relaxed);
        self.left.fetch_sub(1, Ordering::AcqRel) == 1
    }

    /// Whether the outcome was reported already.
    pub(crate) fn is_reported(&self) -> bool {
        self.reported.load(Ordering::Acquire)
    }

    /// True for exactly one caller: the one that reports the outcome.
    pub(crate) fn claim_report(&self) -> bool {
        !self.reported.swap(true, Ordering::AcqRel)
    }

    /// Bytes moved so far.
    pub(crate) fn traffic(&self) -> Traffic {
        Traffic {
            bytes_sent: self.sent.load(Ordering::Relaxed),
            bytes_received: self.received.load(Ordering::Relaxed),
        }
    }
}

/// Loom models of the two hand-offs the data plane relies on. Run with
/// `RUSTFLAGS="--cfg loom" cargo test -p concord --lib --release loom` (`engine/tests/loom.rs`
/// does it as part of the suite).
#[cfg(loom)]
mod loom_models {
    use super::*;
    use loom::cell::UnsafeCell;
    use loom::sync::Arc;

    fn op(buf: &mut [u8; 8]) -> Attempt {
        // Two peers, two f32 elements: step 0 reduces chunk 0, step 1 sends it on.
        let plan = RingPlan::new(2, 1, 2, 4, 4);
        let raw = RawBuf {
            ptr: buf.as_mut_ptr(),
            len: 8,
        };
        Attempt::new(1, 1, plan, DType::F32, ReduceOp::Sum, raw, raw)
    }

    /// A thread inside a busy guard never overlaps the owner's use after `retire_and_wait`.
    #[test]
    fn retire_waits_for_busy_threads() {
        loom::model(|| {
            let mut backing = [0u8; 8];
            let op = Arc::new(op(&mut backing));
            let cell = Arc::new(UnsafeCell::new(0u32));
            let (op2, cell2) = (Arc::clone(&op), Arc::clone(&cell));
            let worker = loom::thread::spawn(move || {
                if let Some(busy) = op2.enter() {
                    // SAFETY (model): the busy guard is what this test proves sufficient.
                    cell2.with_mut(|p| unsafe { *p += 1 });
                    drop(busy);
                }
            });
            assert!(op.retire_and_wait(Duration::from_secs(60)));
            // The owner takes the buffer back: no worker may touch it any more.
            // SAFETY (model): loom reports a data race if the gate let the worker overlap.
            cell.with_mut(|p| unsafe { *p = 7 });
            worker.join().unwrap();
            // After the owner's write, a late `enter` must have been refused.
            assert!(op.enter().is_none());
        });
    }

    /// What RX wrote before setting a receive flag is visible to TX once it sees the flag.
    #[test]
    fn received_flag_publishes_the_data() {
        loom::model(|| {
            let mut backing = [0u8; 8];
            let op = Arc::new(op(&mut backing));
            let cell = Arc::new(UnsafeCell::new(0u32));
            let (op2, cell2) = (Arc::clone(&op), Arc::clone(&cell));
            let rx = loom::thread::spawn(move || {
                // SAFETY (model): written before the release store of the flag.
                cell2.with_mut(|p| unsafe { *p = 42 });
                op2.received(0, 4);
            });
            if op.send_ready(1, 0) {
                // SAFETY (model): the acquire load in send_ready orders this after RX's write.
                let v = cell.with(|p| unsafe { *p });
                assert_eq!(v, 42);
            }
            rx.join().unwrap();
        });
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn op_over(buf: &mut [u8]) -> Attempt {
        // Two peers, 64 f32 in sub-chunks of 4: step 0 sends 8 sub-chunks of this peer's chunk.
        let plan = RingPlan::new(2, 0, 64, 4, 16);
        let raw = RawBuf {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
        };
        Attempt::new(1, 1, plan, DType::F32, ReduceOp::Sum, raw, raw)
    }

    /// Striping is dynamic: a TX thread stuck on send 0 (a slow connection) does not hold back
    /// the others, which claim every later ready send, each exactly once.
    #[test]
    fn a_stuck_sender_does_not_hold_the_other_connections_back() {
        let mut buf = vec![0u8; 256];
        let op = op_over(&mut buf);
        let (k0, t0, _) = op.next_send().expect("a first send");
        assert!(
            op.send_ready(t0, 0) && op.claim_send(k0),
            "the slow thread takes send 0"
        );
        // The fast thread takes everything step 0 has left; the slow one never finishes.
        let mut fast = Vec::new();
        while let Some((k, t, j)) = op.next_send() {
            if !op.send_ready(t, j) {
                break;
            }
            assert!(op.claim_send(k));
            assert!(!op.claim_send(k), "a send is claimed once");
            fast.push(k);
        }
        assert_eq!(fast, (1..8).collect::<Vec<_>>());
        // Step 1 waits for the matching receives of step 0, from whichever connection.
        let (_, t, j) = op.next_send().expect("step 1 remains");
        assert_eq!((t, j), (1, 0));
        assert!(!op.send_ready(t, j));
        assert!(
            op.claim_recv(0) && !op.claim_recv(0),
            "a frame is received once"
        );
        op.received(0, 16);
        assert!(op.send_ready(1, 0));
    }
}
