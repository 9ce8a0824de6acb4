//! One collective on device buffers: the input staged into a pinned mirror, reduce-scatter
//! frames reduced on their lane's stream, all-gather frames copied back to the device, and the
//! end (settle on success, restore an in-place input on failure).
//!
//! A [`DeviceAttempt`] is shared by the caller, the data plane's TX and RX threads and the handle;
//! it owns the mirror and the in-place backup until every copy that uses them has completed.

use concord_kernels::KernelError;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use concord_kernels::cuda::{DevMem, Event, HostMem, Queue};
use concord_kernels::{DType, ReduceOp};

use super::device::Gpu;
use super::lane::{DeviceFrame, LaneGuard};
use crate::raw_buf::RawBuf;

/// The device side of one collective on device buffers (shared by the caller, the data plane
/// threads and the handle).
pub(crate) struct DeviceAttempt {
    gpu: Arc<Gpu>,
    /// What the reduction reads: the user's `src`, or the in-place backup.
    src: u64,
    /// The user's output buffer.
    dst: u64,
    len: usize,
    dtype: DType,
    reduce: ReduceOp,
    backup: Option<DevMem>,
    mirror: Option<HostMem>,
    /// Set once the copy of step 0's input into the mirror is queued, with its event.
    ready: OnceLock<Event>,
    /// All-gather frames still to copy to the device; the one that brings it to zero waits for
    /// every lane's stream (frames go to whichever connection is free, so to any lane).
    copies_left: AtomicUsize,
    /// Lanes (bit = connection index) whose stream already waits for `ready`.
    lanes_ordered: AtomicU64,
    /// Every copy this collective queued has completed (nothing may touch the mirror).
    settled: AtomicBool,
    /// Per-stage time, summed over the threads (see [`DeviceStages`]).
    input_wait_ns: AtomicU64,
    reduce_ns: AtomicU64,
    reduce_frames: AtomicU64,
    copy_ns: AtomicU64,
    copy_frames: AtomicU64,
}

/// Where a device collective's time went on this peer, summed over its threads: compare each
/// with the collective's wall time to see how much of the GPU work hid behind the network.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeviceStages {
    /// TX threads waiting for step 0's input to arrive in host memory (device → mirror).
    pub input_wait: Duration,
    /// RX threads waiting for the GPU on reduce-scatter frames (host → device, reduction,
    /// device → mirror), and how many frames.
    pub gpu_reduce: Duration,
    /// Reduce-scatter frames reduced on the GPU.
    pub reduce_frames: u64,
    /// RX threads queueing all-gather frames to the device and waiting for them at the end.
    pub gather_copies: Duration,
    /// All-gather frames copied to the device.
    pub copy_frames: u64,
}

fn add_ns(counter: &AtomicU64, since: Instant) {
    counter.fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
}

impl std::fmt::Debug for DeviceAttempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceAttempt")
            .field("len", &self.len)
            .field("dtype", &self.dtype)
            .field("in_place", &self.backup.is_some())
            .finish_non_exhaustive()
    }
}

impl DeviceAttempt {
    /// Prepares a collective of `len` bytes from `src` (or, in place, from a backup of `dst`)
    /// into `dst`: the backup is queued on the staging stream after the owner's work.
    ///
    /// `src` and `dst` must be device memory of `gpu` valid for `len` bytes until the collective
    /// is concluded (the launch contract of the callers).
    pub(crate) fn new(
        gpu: Arc<Gpu>,
        src: Option<u64>,
        dst: u64,
        len: usize,
        dtype: DType,
        op: ReduceOp,
    ) -> Result<Self, KernelError> {
        gpu.bind()?;
        let mirror = gpu.take_mirror(len)?;
        let (src, backup) = match src {
            Some(src) => (src, None),
            None => {
                let mut backup = gpu.alloc(len)?;
                let b = backup.ptr(&gpu.stage);
                // SAFETY: both are valid for `len` bytes: `dst` by the caller's contract, the
                // backup just allocated; ordered on the staging stream.
                unsafe { gpu.stage.d2d(b, dst, len, "backing up the input") }?;
                (b, Some(backup))
            }
        };
        Ok(DeviceAttempt {
            gpu,
            src,
            dst,
            len,
            dtype,
            reduce: op,
            backup,
            mirror: Some(mirror),
            ready: OnceLock::new(),
            copies_left: AtomicUsize::new(usize::MAX),
            lanes_ordered: AtomicU64::new(0),
            settled: AtomicBool::new(false),
            input_wait_ns: AtomicU64::new(0),
            reduce_ns: AtomicU64::new(0),
            reduce_frames: AtomicU64::new(0),
            copy_ns: AtomicU64::new(0),
            copy_frames: AtomicU64::new(0),
        })
    }

    /// The host view of the collective: the pinned mirror (TX sends from it, RX receives the
    /// all-gather into it).
    pub(crate) fn mirror(&self) -> RawBuf {
        let mirror = self.mirror.as_ref().expect("held until drop");
        RawBuf {
            ptr: mirror.as_ptr(),
            len: mirror.len(),
        }
    }

    /// Queues the copy of the input's `range` (bytes) into the mirror and records `ready`;
    /// `copies` all-gather frames will follow. Called once the ring plan is known; never
    /// blocks on a GPU.
    pub(crate) fn stage_input(
        &self,
        range: Range<usize>,
        copies: usize,
    ) -> Result<(), KernelError> {
        self.copies_left.store(copies, Ordering::Release);
        self.gpu.bind()?;
        if !range.is_empty() {
            let mirror = self.mirror();
            // SAFETY: the range is in bounds of the mirror; no thread touches it until `ready`
            // completed (TX waits for it, RX writes other ranges).
            let out = unsafe { mirror.slice_mut(range.clone()) };
            // SAFETY: `src + range` is valid device memory (caller's contract); the mirror
            // outlives the copy (it is only freed after `settle`/`restore`).
            unsafe {
                self.gpu.stage.d2h(
                    out,
                    self.src + range.start as u64,
                    "copying the input to the host",
                )
            }?;
        }
        let ev = self.gpu.stage.record()?;
        self.ready.set(ev).map_err(|_| {
            KernelError::Device(
                "internal error: a device collective's input was staged twice".into(),
            )
        })
    }

    /// Where this collective's time went so far.
    pub(crate) fn stages(&self) -> DeviceStages {
        let ns = |c: &AtomicU64| Duration::from_nanos(c.load(Ordering::Relaxed));
        DeviceStages {
            input_wait: ns(&self.input_wait_ns),
            gpu_reduce: ns(&self.reduce_ns),
            reduce_frames: self.reduce_frames.load(Ordering::Relaxed),
            gather_copies: ns(&self.copy_ns),
            copy_frames: self.copy_frames.load(Ordering::Relaxed),
        }
    }

    /// Blocks until the staged input is in the mirror (TX, before step 0).
    pub(crate) fn input_ready(&self) -> Result<(), KernelError> {
        let start = Instant::now();
        let r = self.wait_input();
        add_ns(&self.input_wait_ns, start);
        r
    }

    fn wait_input(&self) -> Result<(), KernelError> {
        match self.ready.get() {
            Some(ev) => ev.synchronize("copying the input to the host"),
            None => Err(KernelError::Device(
                "internal error: the input of a device collective was not staged".into(),
            )),
        }
    }

    /// Orders the lane's stream after the staged input and the in-place backup: once per lane
    /// and collective (the stream keeps that order for everything queued later).
    fn after_ready(&self, lane: &LaneGuard, queue: &Queue) -> Result<(), KernelError> {
        let bit = 1u64 << (lane.index % 64);
        if self.lanes_ordered.fetch_or(bit, Ordering::AcqRel) & bit != 0 {
            return Ok(());
        }
        match self.ready.get() {
            Some(ev) => queue.wait(ev),
            None => Ok(()),
        }
    }

    /// The lane of connection `conn`, locked for one frame.
    pub(crate) fn lane(&self, conn: usize) -> Result<LaneGuard, KernelError> {
        Ok(LaneGuard {
            lane: self.gpu.lane(conn)?,
            index: conn,
        })
    }

    /// All-gather: `mirror[range]` holds final bytes; queues their copy to the device. The
    /// collective's last such frame waits for every lane, so that when the data plane reports
    /// the collective done, every copy is.
    pub(crate) fn copy_in(&self, lane: &LaneGuard, range: Range<usize>) -> Result<(), KernelError> {
        let start = Instant::now();
        let r = self.copy_in_timed(lane, range);
        add_ns(&self.copy_ns, start);
        self.copy_frames.fetch_add(1, Ordering::Relaxed);
        r
    }

    fn copy_in_timed(&self, guard: &LaneGuard, range: Range<usize>) -> Result<(), KernelError> {
        let lane = guard.lock();
        self.gpu.bind()?;
        // An in-place destination is written only after its backup was taken.
        self.after_ready(guard, &lane.queue)?;
        let mirror = self.mirror();
        // SAFETY: in bounds; RX wrote this range and nobody writes it again during the
        // collective (TX only reads it).
        let bytes = unsafe { mirror.slice(range.clone()) };
        // SAFETY: `dst + range` is valid device memory (caller's contract); the mirror stays
        // alive and unchanged until the stream is synchronised (below, at `last`, or in
        // `restore`/drop).
        unsafe {
            lane.queue.h2d(
                self.dst + range.start as u64,
                bytes,
                "copying a received chunk to the device",
            )
        }?;
        drop(lane);
        if self.copies_left.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.gpu.sync_lanes()?;
        }
        Ok(())
    }

    /// Reduce-scatter: the frame was just received into the lane's current host buffer
    /// (`range.len()` bytes); queues host → device, `dst[range] = src[range] op frame` (divided
    /// by `finish` for Avg when given) and device → `mirror[range]` on the lane's stream, and
    /// switches the lane to its other host buffer. The returned frame is done (the mirror holds
    /// the result, the host buffer is free) once [`DeviceAttempt::reduce_done`] returned for it; the
    /// caller must do that before receiving the lane's next-but-one frame.
    pub(crate) fn reduce_async(
        &self,
        lane: &LaneGuard,
        range: Range<usize>,
        finish: Option<usize>,
    ) -> Result<DeviceFrame, KernelError> {
        let start = Instant::now();
        let r = self.enqueue_reduce(lane, range, finish);
        add_ns(&self.reduce_ns, start);
        self.reduce_frames.fetch_add(1, Ordering::Relaxed);
        r.map(|event| DeviceFrame { event })
    }

    /// Waits for a frame queued by [`DeviceAttempt::reduce_async`].
    pub(crate) fn reduce_done(&self, frame: DeviceFrame) -> Result<(), KernelError> {
        let start = Instant::now();
        let r = frame
            .event
            .synchronize("reducing a received chunk on the GPU");
        add_ns(&self.reduce_ns, start);
        r
    }

    fn enqueue_reduce(
        &self,
        lane: &LaneGuard,
        range: Range<usize>,
        finish: Option<usize>,
    ) -> Result<Event, KernelError> {
        let lane_guard = lane;
        let mut guard = lane_guard.lock();
        let lane = &mut *guard;
        let len = range.len();
        let host = &lane.host[lane.slot];
        assert!(len <= host.len(), "a sub-chunk fits the lane buffer");
        self.gpu.bind()?;
        self.after_ready(lane_guard, &lane.queue)?;
        let scratch = lane.scratch.ptr(&lane.queue);
        let frame = &host.as_slice()[..len];
        // SAFETY: the host buffer holds `len` received bytes and is not written again until this
        // frame is done (the next frame goes to the other buffer, and the caller finishes this
        // one before the one after); scratch holds at least `len` bytes and the stream orders
        // this copy after the previous frame's kernel.
        unsafe {
            lane.queue
                .h2d(scratch, frame, "copying a received chunk to the device")
        }?;
        let n = len / self.dtype.size_bytes();
        let off = range.start as u64;
        // SAFETY: `dst + off` and `src + off` are valid for `n` elements (caller's contract,
        // bounds from the ring plan); scratch for `len` bytes; no other stream writes this range
        // during the collective (the ring schedule hands each range to one receive).
        unsafe {
            self.gpu.reduce(
                &lane.queue,
                self.dst + off,
                self.src + off,
                scratch,
                n,
                self.dtype,
                self.reduce,
                finish,
            )?
        };
        let mirror = self.mirror();
        // SAFETY: in bounds; this RX thread is the only writer of the range, and TX reads it
        // only after the flag the caller sets once the frame is done.
        let out = unsafe { mirror.slice_mut(range) };
        // SAFETY: `dst + off` holds `len` bytes; the mirror outlives the copy (the frame is
        // waited for before the collective can end, and a failure waits for the whole context).
        unsafe {
            lane.queue
                .d2h(out, self.dst + off, "copying a reduced chunk to the host")
        }?;
        let event = lane.queue.record()?;
        lane.slot ^= 1;
        Ok(event)
    }

    /// One peer, or nothing to move: `dst = src` on the device.
    pub(crate) fn copy_all(&self) -> Result<(), KernelError> {
        if self.src != self.dst {
            // SAFETY: both valid for `len` bytes (caller's contract; the backup by construction).
            unsafe {
                self.gpu.stage.d2d(
                    self.dst,
                    self.src,
                    self.len,
                    "copying the input to the output",
                )
            }?;
        }
        self.settle()
    }

    /// After success: waits for the staging stream, so the mirror and backup may be reused.
    pub(crate) fn settle(&self) -> Result<(), KernelError> {
        let r = self.gpu.stage.sync("finishing the collective");
        self.settled.store(r.is_ok(), Ordering::Release);
        r
    }

    /// After a failure: waits for every copy in flight, then puts an in-place input back.
    pub(crate) fn restore(&self) -> Result<(), KernelError> {
        self.gpu.synchronize_all()?;
        if self.backup.is_some() {
            // SAFETY: both valid for `len` bytes; nothing else uses them any more.
            unsafe {
                self.gpu
                    .stage
                    .d2d(self.dst, self.src, self.len, "restoring the input")
            }?;
        }
        self.settle()
    }
}

impl Drop for DeviceAttempt {
    fn drop(&mut self) {
        if !self.settled.load(Ordering::Acquire) {
            // Copies may still target the mirror: let them end before it is reused or freed.
            if self.gpu.synchronize_all().is_err() {
                // The context is broken; leak the mirror rather than free memory a copy uses.
                std::mem::forget(self.mirror.take());
                return;
            }
        }
        if let Some(m) = self.mirror.take() {
            self.gpu.give_mirror(m);
        }
    }
}

/// Ends a device collective: on success waits for its last copies; on failure restores an
/// in-place input. A CUDA error on the way wins over success and joins a failure's message.
pub(crate) fn conclude(
    device: &DeviceAttempt,
    result: Result<crate::ReduceInfo, crate::Error>,
) -> Result<crate::ReduceInfo, crate::Error> {
    match result {
        Ok(mut info) => {
            device.settle().map_err(crate::Error::Cuda)?;
            info.device = Some(device.stages());
            Ok(info)
        }
        Err(e) => match device.restore() {
            Ok(()) => Err(e),
            Err(cuda) => {
                tracing::error!("after {e}: restoring the device buffer failed: {cuda}");
                Err(e)
            }
        },
    }
}
