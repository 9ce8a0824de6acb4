//! CUDA device buffers: all-reduce GPU memory through pinned host staging, reduced on the GPU.
//!
//! A collective on device buffers runs the same ring as host buffers; only the ends of each
//! sub-chunk's journey change (see `dataplane/README.md`, "Device buffers"):
//!
//! * **Input.** When the master lets the collective go, the chunk this peer sends at step 0 is
//!   copied device → *mirror* (page-locked host memory of the buffer's size, from a pool) on the
//!   communicator's staging stream. TX threads wait for that copy's event before step 0.
//! * **Reduce steps.** The RX thread of connection `i` reads the frame into its *lane's* pinned
//!   host buffer, then on the lane's own CUDA stream: host → device scratch, the reduction kernel
//!   (`dst = src op scratch`, fused with the Avg division on the last step), and device → mirror
//!   of the result, which the TX thread forwards. Each connection has its own lane, so copies,
//!   kernels and network transfers of different sub-chunks overlap.
//! * **All-gather steps.** The frame is read straight into the mirror (TX forwards it from
//!   there) and copied mirror → device asynchronously; a lane waits for its stream only at its
//!   last receive of the collective.
//! * **In place**, the input is first copied device → device into a backup (the reduction reads
//!   it; a failure copies it back). No host copy is made beyond the staging.
//!
//! Pinned memory comes from `cuMemHostAlloc` without `WRITECOMBINED` (the CPU reads it to send),
//! which the driver pins itself: `RLIMIT_MEMLOCK` does not apply.
//!
//! Everything here needs a CUDA driver; [`cuda_status`] says whether there is one, and why not.
//! The same code also runs against an *emulated* device (device memory is host memory, streams
//! run each operation at once, the CPU kernels reduce), which the tests use to exercise the
//! pipeline on machines without a GPU; users never get it by accident (it is a hidden entry point).

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use concord_kernels::cuda::cudarc::driver::{
    result, CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr,
};
use concord_kernels::cuda::CudaKernels;
use concord_kernels::{DType, ReduceOp};

use crate::raw_buf::RawBuf;
use crate::Element;

/// The `cudarc` whose buffers Concord accepts (use this one, or the same version, to allocate).
pub use concord_kernels::cuda::cudarc;

/// An element type that can be all-reduced in device memory: every [`Element`] (f32, f64, f16,
/// bf16 and the integers) that `cudarc` can hold.
pub trait DeviceElement: Element + DeviceRepr {}
impl<T: Element + DeviceRepr> DeviceElement for T {}

/// Whether CUDA can be used here: `Ok(the device)` or `Err(why not)`. Never panics, also on hosts
/// without a driver.
pub fn cuda_status() -> Result<String, String> {
    concord_kernels::cuda::probe()
}

/// Most bytes of idle pinned mirrors a communicator keeps for reuse (allocating pinned memory
/// costs milliseconds per hundred MiB).
const MIRROR_POOL_BYTES: usize = 1 << 30;

fn cuda(during: &str) -> impl Fn(result::DriverError) -> String + '_ {
    move |e| format!("CUDA error while {during}: {e}")
}

/// Host memory the GPU copies to and from: page-locked by `cuMemHostAlloc` (not write-combined)
/// on a real GPU, a plain allocation on the emulated one.
struct HostMem {
    ptr: *mut u8,
    len: usize,
    /// `Some`: freed with cuMemFreeHost in this context; `None`: the memory is `_plain`.
    ctx: Option<Arc<CudaContext>>,
    _plain: Vec<u8>,
}

// SAFETY: the allocation is plain host memory owned by this value; access is synchronised by
// its users (the data plane's flags, or the lane mutex).
unsafe impl Send for HostMem {}
// SAFETY: as above.
unsafe impl Sync for HostMem {}

impl HostMem {
    fn new(ctx: Option<&Arc<CudaContext>>, len: usize) -> Result<Self, String> {
        let Some(ctx) = ctx.filter(|_| len > 0) else {
            let mut plain = vec![0u8; len];
            return Ok(HostMem {
                ptr: plain.as_mut_ptr(),
                len,
                ctx: None,
                _plain: plain,
            });
        };
        ctx.bind_to_thread().map_err(cuda("binding the context"))?;
        // SAFETY: a plain allocation of `len` bytes, freed in Drop with cuMemFreeHost.
        let ptr = unsafe { result::malloc_host(len, 0) }.map_err(|e| {
            format!(
                "CUDA could not allocate {len} bytes of page-locked host memory \
                 (cuMemHostAlloc: {e}); use smaller buffers or free host memory"
            )
        })?;
        Ok(HostMem {
            ptr: ptr.cast(),
            len,
            ctx: Some(Arc::clone(ctx)),
            _plain: Vec::new(),
        })
    }

    fn raw(&self) -> RawBuf {
        RawBuf {
            ptr: self.ptr,
            len: self.len,
        }
    }
}

impl Drop for HostMem {
    fn drop(&mut self) {
        if let Some(ctx) = &self.ctx {
            let _ = ctx.bind_to_thread();
            // SAFETY: allocated by cuMemHostAlloc in `new`; no copy uses it any more (every
            // user synchronises its streams before giving it back).
            let _ = unsafe { result::free_host(self.ptr.cast()) };
        }
    }
}

/// Device memory Concord owns (scratch, backups): a `CudaSlice`, or host memory when emulated.
enum DevMem {
    Cuda(CudaSlice<u8>),
    Emulated(Vec<u8>),
}

impl DevMem {
    fn ptr(&mut self, queue: &Queue) -> u64 {
        match (self, &queue.0) {
            (DevMem::Cuda(s), Some(stream)) => s.device_ptr(stream).0,
            (DevMem::Emulated(v), _) => v.as_mut_ptr() as u64,
            (DevMem::Cuda(_), None) => unreachable!("CUDA memory is used on CUDA streams"),
        }
    }
}

/// A CUDA stream, or (emulated device) nothing: every operation is done when it returns.
struct Queue(Option<Arc<CudaStream>>);

impl Queue {
    /// # Safety
    /// `src` is device memory valid for `dst.len()` bytes; `dst` stays alive and unused by
    /// others until the queue is synchronised.
    unsafe fn d2h(&self, dst: &mut [u8], src: u64, during: &str) -> Result<(), String> {
        match &self.0 {
            Some(s) => {
                // SAFETY: the caller's contract.
                unsafe { result::memcpy_dtoh_async(dst, src, s.cu_stream()) }.map_err(cuda(during))
            }
            None => {
                // SAFETY: emulated device memory is host memory; the caller's contract.
                unsafe {
                    std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len())
                };
                Ok(())
            }
        }
    }

    /// # Safety
    /// `dst` is device memory valid for `src.len()` bytes; `src` stays alive and unchanged
    /// until the queue is synchronised.
    unsafe fn h2d(&self, dst: u64, src: &[u8], during: &str) -> Result<(), String> {
        match &self.0 {
            Some(s) => {
                // SAFETY: the caller's contract.
                unsafe { result::memcpy_htod_async(dst, src, s.cu_stream()) }.map_err(cuda(during))
            }
            None => {
                // SAFETY: as in `d2h`.
                unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
                Ok(())
            }
        }
    }

    /// # Safety
    /// Both are device memory valid for `len` bytes, not overlapping.
    unsafe fn d2d(&self, dst: u64, src: u64, len: usize, during: &str) -> Result<(), String> {
        if len == 0 {
            return Ok(());
        }
        match &self.0 {
            // SAFETY: the caller's contract.
            Some(s) => unsafe { result::memcpy_dtod_async(dst, src, len, s.cu_stream()) }
                .map_err(cuda(during)),
            None => {
                // SAFETY: as in `d2h`.
                unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, len) };
                Ok(())
            }
        }
    }

    fn sync(&self, during: &str) -> Result<(), String> {
        match &self.0 {
            Some(s) => s.synchronize().map_err(cuda(during)),
            None => Ok(()),
        }
    }

    fn record(&self) -> Result<Option<CudaEvent>, String> {
        self.0
            .as_ref()
            .map(|s| s.record_event(None).map_err(cuda("recording an event")))
            .transpose()
    }

    fn wait(&self, event: Option<&CudaEvent>) -> Result<(), String> {
        match (&self.0, event) {
            (Some(s), Some(ev)) => s.wait(ev).map_err(cuda("ordering streams")),
            _ => Ok(()),
        }
    }
}

/// One connection's device resources: a stream, a pinned receive buffer and device scratch.
struct Lane {
    queue: Queue,
    /// Two receive buffers: the next frame is read into one while the GPU copies the other.
    host: [HostMem; 2],
    /// Which of `host` the next frame goes to.
    slot: usize,
    scratch: DevMem,
}

/// The CUDA side of a [`Gpu`].
struct Cuda {
    ctx: Arc<CudaContext>,
    kernels: CudaKernels,
}

/// A communicator's GPU: one context, the compiled kernels, the staging stream, the lanes.
pub(crate) struct Gpu {
    /// `None`: the emulated device.
    cuda: Option<Cuda>,
    /// Input staging and in-place backups, in launch order.
    stage: Queue,
    lanes: Mutex<Vec<Arc<Mutex<Lane>>>>,
    /// The lanes' streams, to wait for without taking a lane (an RX thread may hold its lane
    /// while it blocks on its socket).
    lane_streams: Mutex<Vec<Arc<CudaStream>>>,
    lane_bytes: usize,
    mirrors: Mutex<Vec<HostMem>>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("device", &self.device())
            .finish_non_exhaustive()
    }
}

impl Gpu {
    /// Opens the GPU of `ctx`: compiles the kernels (NVRTC, once) and makes the staging stream.
    pub(crate) fn new(ctx: Arc<CudaContext>, lane_bytes: usize) -> Result<Self, String> {
        let kernels = CudaKernels::with_context(Arc::clone(&ctx)).map_err(|e| e.to_string())?;
        let stage = ctx.new_stream().map_err(cuda("creating a stream"))?;
        Ok(Gpu {
            cuda: Some(Cuda { ctx, kernels }),
            stage: Queue(Some(stage)),
            lanes: Mutex::new(Vec::new()),
            lane_streams: Mutex::new(Vec::new()),
            lane_bytes,
            mirrors: Mutex::new(Vec::new()),
        })
    }

    /// The emulated device: host memory, immediate operations, CPU kernels (tests only).
    pub(crate) fn emulated(lane_bytes: usize) -> Self {
        Gpu {
            cuda: None,
            stage: Queue(None),
            lanes: Mutex::new(Vec::new()),
            lane_streams: Mutex::new(Vec::new()),
            lane_bytes,
            mirrors: Mutex::new(Vec::new()),
        }
    }

    fn ctx(&self) -> Option<&Arc<CudaContext>> {
        self.cuda.as_ref().map(|c| &c.ctx)
    }

    fn bind(&self) -> Result<(), String> {
        match self.ctx() {
            Some(ctx) => ctx.bind_to_thread().map_err(cuda("binding the context")),
            None => Ok(()),
        }
    }

    /// Whether buffers of `ctx` belong to this GPU.
    fn same_context(&self, ctx: &CudaContext) -> bool {
        self.ctx().is_some_and(|c| c.cu_ctx() == ctx.cu_ctx())
    }

    pub(crate) fn device(&self) -> &str {
        self.cuda
            .as_ref()
            .map_or("an emulated device (host memory)", |c| c.kernels.device())
    }

    fn lane(&self, i: usize) -> Result<Arc<Mutex<Lane>>, String> {
        let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
        while lanes.len() <= i {
            let lane = match self.ctx() {
                Some(ctx) => {
                    let stream = ctx.new_stream().map_err(cuda("creating a stream"))?;
                    self.lane_streams
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(Arc::clone(&stream));
                    // SAFETY: scratch is always written (host → device) before it is read.
                    let scratch = unsafe { stream.alloc::<u8>(self.lane_bytes.max(1)) }
                        .map_err(cuda("allocating device scratch"))?;
                    Lane {
                        queue: Queue(Some(stream)),
                        host: [
                            HostMem::new(Some(ctx), self.lane_bytes)?,
                            HostMem::new(Some(ctx), self.lane_bytes)?,
                        ],
                        slot: 0,
                        scratch: DevMem::Cuda(scratch),
                    }
                }
                None => Lane {
                    queue: Queue(None),
                    host: [
                        HostMem::new(None, self.lane_bytes)?,
                        HostMem::new(None, self.lane_bytes)?,
                    ],
                    slot: 0,
                    scratch: DevMem::Emulated(vec![0; self.lane_bytes.max(1)]),
                },
            };
            lanes.push(Arc::new(Mutex::new(lane)));
        }
        Ok(Arc::clone(&lanes[i]))
    }

    /// Waits for every lane's stream.
    fn sync_lanes(&self) -> Result<(), String> {
        let streams = self
            .lane_streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for s in streams {
            s.synchronize()
                .map_err(cuda("copying received chunks to the device"))?;
        }
        Ok(())
    }

    fn alloc(&self, len: usize) -> Result<DevMem, String> {
        match &self.stage.0 {
            // SAFETY: the callers write the memory before reading it.
            Some(s) => unsafe { s.alloc::<u8>(len.max(1)) }
                .map(DevMem::Cuda)
                .map_err(cuda("allocating device memory")),
            None => Ok(DevMem::Emulated(vec![0; len.max(1)])),
        }
    }

    fn take_mirror(&self, len: usize) -> Result<HostMem, String> {
        let mut pool = self.mirrors.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = pool.iter().position(|m| m.len == len) {
            return Ok(pool.swap_remove(i));
        }
        drop(pool);
        HostMem::new(self.ctx(), len)
    }

    fn give_mirror(&self, m: HostMem) {
        let mut pool = self.mirrors.lock().unwrap_or_else(|p| p.into_inner());
        let held: usize = pool.iter().map(|m| m.len).sum();
        if held + m.len <= MIRROR_POOL_BYTES {
            pool.push(m);
        }
    }

    /// Waits for every stream of this context (the failure path; the user's streams included).
    fn synchronize_all(&self) -> Result<(), String> {
        match self.ctx() {
            Some(ctx) => ctx
                .synchronize()
                .map_err(cuda("waiting for the GPU to finish")),
            None => Ok(()),
        }
    }

    /// `d = a op b` for `n` elements (finished with the Avg division by `finish` when given).
    ///
    /// # Safety
    /// `d`, `a`, `b` are device memory valid for `n` elements of `dtype`; `d` overlaps neither
    /// and nothing else writes them until `queue` is synchronised.
    #[allow(clippy::too_many_arguments)]
    unsafe fn reduce(
        &self,
        queue: &Queue,
        d: u64,
        a: u64,
        b: u64,
        n: usize,
        dtype: DType,
        op: ReduceOp,
        finish: Option<usize>,
    ) -> Result<(), String> {
        match (&self.cuda, &queue.0) {
            (Some(c), Some(stream)) => {
                // SAFETY: the caller's contract.
                unsafe {
                    c.kernels
                        .reduce_raw(stream, d, a, b, n as u64, dtype, op, finish)
                }
                .map_err(|e| e.to_string())
            }
            _ => {
                let bytes = n * dtype.size_bytes();
                // SAFETY: emulated device memory is host memory; the caller's contract.
                let (d, a, b) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(d as *mut u8, bytes),
                        std::slice::from_raw_parts(a as *const u8, bytes),
                        std::slice::from_raw_parts(b as *const u8, bytes),
                    )
                };
                match finish {
                    Some(w) => concord_kernels::reduce_out_finish(d, a, b, dtype, op, w),
                    None => concord_kernels::reduce_out(d, a, b, dtype, op),
                }
                .map_err(|e| e.to_string())
            }
        }
    }
}

/// The raw pointer of a user slice the collective reads, after making the staging stream wait
/// for what its owner queued on its own stream (say, the backward pass).
pub(crate) fn device_ptr<T: DeviceElement>(gpu: &Gpu, slice: &CudaSlice<T>) -> Result<u64, String> {
    let stage = order_after_owner(gpu, slice)?;
    let (ptr, _record) = slice.device_ptr(stage);
    Ok(ptr)
}

/// As [`device_ptr`], for a slice the collective writes.
pub(crate) fn device_ptr_mut<T: DeviceElement>(
    gpu: &Gpu,
    slice: &mut CudaSlice<T>,
) -> Result<u64, String> {
    let stage = order_after_owner(gpu, slice)?;
    let (ptr, _record) = slice.device_ptr_mut(stage);
    Ok(ptr)
}

fn order_after_owner<'g, T>(gpu: &'g Gpu, slice: &CudaSlice<T>) -> Result<&'g CudaStream, String> {
    let stage = match (&gpu.stage.0, gpu.same_context(slice.context())) {
        (Some(stage), true) => stage,
        _ => {
            return Err(format!(
                "this buffer lives on CUDA device {}, but this communicator already works with \
                 {}; use one communicator per GPU",
                slice.ordinal(),
                gpu.device()
            ))
        }
    };
    let ev = slice
        .stream()
        .record_event(None)
        .map_err(cuda("recording an event"))?;
    stage.wait(&ev).map_err(cuda("ordering streams"))?;
    Ok(stage)
}

/// The device side of one collective on device buffers (shared by the caller, the data plane
/// threads and the handle).
pub(crate) struct DeviceOp {
    gpu: Arc<Gpu>,
    /// What the reduction reads: the user's `src`, or the in-place backup.
    src: u64,
    /// The user's output buffer.
    dst: u64,
    len: usize,
    dtype: DType,
    op: ReduceOp,
    backup: Option<DevMem>,
    mirror: Option<HostMem>,
    /// Set once the copy of step 0's input into the mirror is queued (with its event on a GPU).
    ready: OnceLock<Option<CudaEvent>>,
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

impl std::fmt::Debug for DeviceOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceOp")
            .field("len", &self.len)
            .field("dtype", &self.dtype)
            .field("in_place", &self.backup.is_some())
            .finish_non_exhaustive()
    }
}

impl DeviceOp {
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
    ) -> Result<Self, String> {
        gpu.bind()?;
        let mirror = gpu.take_mirror(len)?;
        let (src, backup) = match src {
            Some(src) => (src, None),
            None => {
                let mut backup = gpu.alloc(len)?;
                let b = backup.ptr(&gpu.stage);
                // SAFETY: both are valid for `len` bytes: `dst` by the caller's contract, the
                // backup just allocated; ordered on the staging stream.
                unsafe { gpu.stage.d2d(b, dst, len, "backing up the input")? };
                (b, Some(backup))
            }
        };
        Ok(DeviceOp {
            gpu,
            src,
            dst,
            len,
            dtype,
            op,
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
        self.mirror.as_ref().expect("held until drop").raw()
    }

    /// Queues the copy of the input's `range` (bytes) into the mirror and records `ready`;
    /// `copies` all-gather frames will follow. Called once the ring plan is known; never
    /// blocks on a GPU.
    pub(crate) fn stage_input(&self, range: Range<usize>, copies: usize) -> Result<(), String> {
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
                )?
            };
        }
        let ev = self.gpu.stage.record()?;
        self.ready
            .set(ev)
            .map_err(|_| "internal error: a device collective's input was staged twice".to_string())
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
    pub(crate) fn input_ready(&self) -> Result<(), String> {
        let start = Instant::now();
        let r = self.wait_input();
        add_ns(&self.input_wait_ns, start);
        r
    }

    fn wait_input(&self) -> Result<(), String> {
        match self.ready.get() {
            Some(Some(ev)) => ev
                .synchronize()
                .map_err(cuda("copying the input to the host")),
            Some(None) => Ok(()),
            None => Err("internal error: the input of a device collective was not staged".into()),
        }
    }

    /// Orders the lane's stream after the staged input and the in-place backup: once per lane
    /// and collective (the stream keeps that order for everything queued later).
    fn after_ready(&self, lane: &LaneGuard, queue: &Queue) -> Result<(), String> {
        let bit = 1u64 << (lane.index % 64);
        if self.lanes_ordered.fetch_or(bit, Ordering::AcqRel) & bit != 0 {
            return Ok(());
        }
        queue.wait(self.ready.get().and_then(Option::as_ref))
    }

    /// The lane of connection `conn`, locked for one frame.
    pub(crate) fn lane(&self, conn: usize) -> Result<LaneGuard, String> {
        Ok(LaneGuard {
            lane: self.gpu.lane(conn)?,
            index: conn,
        })
    }

    /// All-gather: `mirror[range]` holds final bytes; queues their copy to the device. The
    /// collective's last such frame waits for every lane, so that when the data plane reports
    /// the collective done, every copy is.
    pub(crate) fn copy_in(&self, lane: &LaneGuard, range: Range<usize>) -> Result<(), String> {
        let start = Instant::now();
        let r = self.copy_in_timed(lane, range);
        add_ns(&self.copy_ns, start);
        self.copy_frames.fetch_add(1, Ordering::Relaxed);
        r
    }

    fn copy_in_timed(&self, guard: &LaneGuard, range: Range<usize>) -> Result<(), String> {
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
            )?
        };
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
    /// the result, the host buffer is free) once [`DeviceOp::reduce_done`] returned for it; the
    /// caller must do that before receiving the lane's next-but-one frame.
    pub(crate) fn reduce_async(
        &self,
        lane: &LaneGuard,
        range: Range<usize>,
        finish: Option<usize>,
    ) -> Result<DeviceFrame, String> {
        let start = Instant::now();
        let r = self.enqueue_reduce(lane, range, finish);
        add_ns(&self.reduce_ns, start);
        self.reduce_frames.fetch_add(1, Ordering::Relaxed);
        r.map(|event| DeviceFrame { event })
    }

    /// Waits for a frame queued by [`DeviceOp::reduce_async`].
    pub(crate) fn reduce_done(&self, frame: DeviceFrame) -> Result<(), String> {
        let start = Instant::now();
        let r = match &frame.event {
            Some(ev) => ev
                .synchronize()
                .map_err(cuda("reducing a received chunk on the GPU")),
            None => Ok(()),
        };
        add_ns(&self.reduce_ns, start);
        r
    }

    fn enqueue_reduce(
        &self,
        lane: &LaneGuard,
        range: Range<usize>,
        finish: Option<usize>,
    ) -> Result<Option<CudaEvent>, String> {
        let lane_guard = lane;
        let mut guard = lane_guard.lock();
        let lane = &mut *guard;
        let len = range.len();
        let host = &lane.host[lane.slot];
        assert!(len <= host.len, "a sub-chunk fits the lane buffer");
        self.gpu.bind()?;
        self.after_ready(lane_guard, &lane.queue)?;
        let scratch = lane.scratch.ptr(&lane.queue);
        // SAFETY: the host buffer holds `len` received bytes and is not written again until this
        // frame is done (the next frame goes to the other buffer, and the caller finishes this
        // one before the one after); scratch holds at least `len` bytes and the stream orders
        // this copy after the previous frame's kernel.
        unsafe {
            let frame = std::slice::from_raw_parts(host.ptr, len);
            lane.queue
                .h2d(scratch, frame, "copying a received chunk to the device")?;
        }
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
                self.op,
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
                .d2h(out, self.dst + off, "copying a reduced chunk to the host")?
        };
        let event = lane.queue.record()?;
        lane.slot ^= 1;
        Ok(event)
    }

    /// One peer, or nothing to move: `dst = src` on the device.
    pub(crate) fn copy_all(&self) -> Result<(), String> {
        if self.src != self.dst {
            // SAFETY: both valid for `len` bytes (caller's contract; the backup by construction).
            unsafe {
                self.gpu.stage.d2d(
                    self.dst,
                    self.src,
                    self.len,
                    "copying the input to the output",
                )?
            };
        }
        self.settle()
    }

    /// After success: waits for the staging stream, so the mirror and backup may be reused.
    pub(crate) fn settle(&self) -> Result<(), String> {
        let r = self.gpu.stage.sync("finishing the collective");
        self.settled.store(r.is_ok(), Ordering::Release);
        r
    }

    /// After a failure: waits for every copy in flight, then puts an in-place input back.
    pub(crate) fn restore(&self) -> Result<(), String> {
        self.gpu.synchronize_all()?;
        if self.backup.is_some() {
            // SAFETY: both valid for `len` bytes; nothing else uses them any more.
            unsafe {
                self.gpu
                    .stage
                    .d2d(self.dst, self.src, self.len, "restoring the input")?
            };
        }
        self.settle()
    }
}

impl Drop for DeviceOp {
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

/// A reduce-scatter frame whose GPU work is queued (see [`DeviceOp::reduce_async`]).
#[derive(Debug)]
pub(crate) struct DeviceFrame {
    /// Recorded after the copy back to the mirror; `None` on the emulated device (done at once).
    event: Option<CudaEvent>,
}

/// A connection's lane, reserved for one received frame.
pub(crate) struct LaneGuard {
    lane: Arc<Mutex<Lane>>,
    /// The connection index it serves.
    index: usize,
}

impl LaneGuard {
    fn lock(&self) -> MutexGuard<'_, Lane> {
        self.lane.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads a frame's payload of `len` bytes into the lane's pinned buffer with `read`.
    pub(crate) fn receive<E>(
        &self,
        len: usize,
        read: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let lane = self.lock();
        let host = &lane.host[lane.slot];
        assert!(len <= host.len, "a sub-chunk fits the lane buffer");
        // SAFETY: the lane is locked, and the last frame received into this buffer is done
        // (the caller finishes each frame before receiving the lane's next-but-one).
        let buf = unsafe { std::slice::from_raw_parts_mut(host.ptr, len) };
        read(buf)
    }
}

/// Ends a device collective: on success waits for its last copies; on failure restores an
/// in-place input. A CUDA error on the way wins over success and joins a failure's message.
pub(crate) fn conclude(
    device: &DeviceOp,
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

/// A device buffer as raw bytes, for shared-state entries (downloaded and uploaded whole on the
/// buffer's own stream).
pub(crate) trait DeviceBytes: Send {
    fn download(&self, out: &mut Vec<u8>) -> Result<(), String>;
    fn upload(&mut self, bytes: &[u8]) -> Result<(), String>;
}

impl<T: DeviceElement> DeviceBytes for CudaSlice<T> {
    fn download(&self, out: &mut Vec<u8>) -> Result<(), String> {
        let stream = Arc::clone(self.stream());
        out.resize(self.num_bytes(), 0);
        if out.is_empty() {
            return Ok(());
        }
        let (ptr, _record) = self.device_ptr(&stream);
        // SAFETY: `ptr` is valid for `num_bytes` (this slice); `out` has that size and lives
        // until the synchronisation below.
        unsafe { result::memcpy_dtoh_async(out.as_mut_slice(), ptr, stream.cu_stream()) }
            .map_err(cuda("copying a shared-state entry to the host"))?;
        stream
            .synchronize()
            .map_err(cuda("copying a shared-state entry to the host"))
    }

    fn upload(&mut self, bytes: &[u8]) -> Result<(), String> {
        let stream = Arc::clone(self.stream());
        if bytes.len() != self.num_bytes() {
            return Err(format!(
                "a shared-state entry of {} bytes cannot take {} bytes",
                self.num_bytes(),
                bytes.len()
            ));
        }
        if bytes.is_empty() {
            return Ok(());
        }
        let (ptr, _record) = self.device_ptr_mut(&stream);
        // SAFETY: `ptr` is valid for `bytes.len()` bytes; `bytes` lives until the
        // synchronisation below.
        unsafe { result::memcpy_htod_async(ptr, bytes, stream.cu_stream()) }
            .map_err(cuda("copying a shared-state entry to the device"))?;
        stream
            .synchronize()
            .map_err(cuda("copying a shared-state entry to the device"))
    }
}
