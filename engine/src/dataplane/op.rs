//! One all-reduce attempt as the data plane sees it: its schedule, its buffers and its progress.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use concord_kernels::{DType, ReduceOp};

use std::sync::Arc;

use crate::collective::ring::RingPlan;
use crate::collective::Traffic;
use crate::gpu::DeviceOp;
use crate::sync::{AtomicBool, AtomicU64, AtomicUsize, Condvar, Mutex};

/// A raw view of a buffer that outlives the operation (its owner waits for `busy == 0` before
/// reusing it; see [`Op::retire_and_wait`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct RawBuf {
    pub(crate) ptr: *mut u8,
    pub(crate) len: usize,
}

// SAFETY: a RawBuf is only dereferenced inside an `Op::enter` guard, for disjoint ranges handed
// between threads by the release/acquire flags of `Op`; the owner keeps the memory alive and
// untouched until the operation is retired and idle.
unsafe impl Send for RawBuf {}
// SAFETY: as above.
unsafe impl Sync for RawBuf {}

impl RawBuf {
    /// # Safety
    /// The range must be in bounds of a live buffer that nobody writes while the slice lives.
    pub(crate) unsafe fn slice(&self, range: std::ops::Range<usize>) -> &[u8] {
        assert!(range.start <= range.end && range.end <= self.len);
        // SAFETY: bounds checked above; liveness and absence of writers are the caller's promise.
        unsafe { std::slice::from_raw_parts(self.ptr.add(range.start), range.len()) }
    }

    /// # Safety
    /// The range must be in bounds of a live buffer that no other thread accesses while the slice
    /// lives.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice_mut(&self, range: std::ops::Range<usize>) -> &mut [u8] {
        assert!(range.start <= range.end && range.end <= self.len);
        // SAFETY: bounds checked above; exclusivity is the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.len()) }
    }
}

#[derive(Debug, Default)]
struct Gate {
    retired: bool,
    busy: usize,
}

/// An attempt of a collective running on the data plane.
#[derive(Debug)]
pub(crate) struct Op {
    pub(crate) tag: u64,
    pub(crate) seq: u64,
    pub(crate) plan: RingPlan,
    pub(crate) dtype: DType,
    pub(crate) op: ReduceOp,
    pub(crate) src: RawBuf,
    pub(crate) dst: RawBuf,
    /// Device buffers: `src` and `dst` are then both the pinned mirror, and the device side
    /// does the reductions (see `crate::gpu`).
    pub(crate) device: Option<Arc<DeviceOp>>,
    conns: usize,
    send_prefix: Vec<usize>,
    pub(crate) recv_prefix: Vec<usize>,
    pub(crate) recv_done: Box<[AtomicBool]>,
    send_next: Box<[AtomicUsize]>,
    recv_next: Box<[AtomicUsize]>,
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
pub(crate) struct Busy<'a>(&'a Op);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        let mut g = self.0.gate.lock().unwrap_or_else(|p| p.into_inner());
        g.busy -= 1;
        if g.busy == 0 {
            self.0.gate_cv.notify_all();
        }
    }
}

impl Op {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        tag: u64,
        seq: u64,
        plan: RingPlan,
        dtype: DType,
        op: ReduceOp,
        src: RawBuf,
        dst: RawBuf,
        conns: usize,
    ) -> Self {
        assert!(conns >= 1);
        assert_eq!(src.len, plan.count * plan.elem_bytes);
        assert_eq!(dst.len, src.len);
        let steps = plan.steps();
        let send_prefix: Vec<usize> = std::iter::once(0)
            .chain((0..steps).scan(0, |acc, t| {
                *acc += plan.subs(plan.send_chunk(t));
                Some(*acc)
            }))
            .collect();
        let recv_prefix: Vec<usize> = (0..=steps).map(|t| plan.recv_subs_before(t)).collect();
        let (sends, recvs) = (send_prefix[steps], recv_prefix[steps]);
        Op {
            tag,
            seq,
            plan,
            dtype,
            op,
            src,
            dst,
            device: None,
            conns,
            recv_done: (0..recvs).map(|_| AtomicBool::new(false)).collect(),
            send_next: (0..conns).map(AtomicUsize::new).collect(),
            recv_next: (0..conns).map(AtomicUsize::new).collect(),
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

    /// Marks the collective as one on device buffers (`src` and `dst` are its mirror).
    pub(crate) fn with_device(mut self, device: Option<Arc<DeviceOp>>) -> Self {
        self.device = device;
        self
    }

    /// Whether receive `m` on connection `conn` is that connection's last of the operation.
    pub(crate) fn last_recv_on(&self, m: usize) -> bool {
        m + self.conns >= *self.recv_prefix.last().expect("non-empty")
    }

    /// Whether there is nothing to move (one peer, or no elements).
    pub(crate) fn is_empty(&self) -> bool {
        self.left.load(Ordering::Acquire) == 0
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

    /// The next send on connection `conn`: `Some((k, step, sub))`, or `None` when all are sent.
    pub(crate) fn next_send(&self, conn: usize) -> Option<(usize, usize, usize)> {
        let k = self.send_next[conn].load(Ordering::Relaxed);
        if k >= *self.send_prefix.last().expect("non-empty") {
            return None;
        }
        let (t, j) = Self::locate(&self.send_prefix, k);
        Some((k, t, j))
    }

    /// Whether send `(t, j)` has its input: always at step 0, else once the matching receive of
    /// step `t - 1` is reduced.
    pub(crate) fn send_ready(&self, t: usize, j: usize) -> bool {
        t == 0 || self.recv_done[self.recv_prefix[t - 1] + j].load(Ordering::Acquire)
    }

    /// Records that send `k` on `conn` went out. Returns true when this finished the operation.
    pub(crate) fn sent(&self, conn: usize, k: usize, bytes: u64) -> bool {
        self.send_next[conn].store(k + self.conns, Ordering::Relaxed);
        self.sent.fetch_add(bytes, Ordering::Relaxed);
        self.left.fetch_sub(1, Ordering::AcqRel) == 1
    }

    /// The receive number expected next on `conn`.
    pub(crate) fn expected_recv(&self, conn: usize) -> usize {
        self.recv_next[conn].load(Ordering::Relaxed)
    }

    /// Records receive `m` on `conn`. Returns true when this finished the operation.
    pub(crate) fn received(&self, conn: usize, m: usize, bytes: u64) -> bool {
        self.recv_done[m].store(true, Ordering::Release);
        self.recv_next[conn].store(m + self.conns, Ordering::Relaxed);
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

    fn op(buf: &mut [u8; 8]) -> Op {
        // Two peers, two f32 elements: step 0 reduces chunk 0, step 1 sends it on.
        let plan = RingPlan::new(2, 1, 2, 4, 4);
        let raw = RawBuf {
            ptr: buf.as_mut_ptr(),
            len: 8,
        };
        Op::new(1, 1, plan, DType::F32, ReduceOp::Sum, raw, raw, 1)
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
                op2.received(0, 0, 4);
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
