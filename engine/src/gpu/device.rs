//! A communicator's GPU: one context with its compiled kernels, the staging stream, one lane per
//! connection, and a pool of pinned mirrors; and the raw pointers of the user's buffers, ordered
//! after the streams their owners queued work on.

use concord_kernels::KernelError;
use std::sync::{Arc, Mutex};

use concord_kernels::cuda::cudarc::driver::{CudaContext, CudaSlice};
use concord_kernels::cuda::{DevMem, DeviceContext, HostMem, Queue};
use concord_kernels::{DType, ReduceOp};

use super::buffer::DeviceElement;
use super::lane::Lane;

/// Most bytes of idle pinned mirrors a communicator keeps for reuse (allocating pinned memory
/// costs milliseconds per hundred MiB).
const MIRROR_POOL_BYTES: usize = 1 << 30;

/// A communicator's GPU: one context, the compiled kernels, the staging stream, the lanes.
pub(crate) struct Gpu {
    /// The context and kernels, or the emulated device.
    device: DeviceContext,
    /// Input staging and in-place backups, in launch order.
    pub(super) stage: Queue,
    lanes: Mutex<Vec<Arc<Mutex<Lane>>>>,
    /// The lanes' queues, to wait for without taking a lane (an RX thread may hold its lane
    /// while it blocks on its socket).
    lane_queues: Mutex<Vec<Queue>>,
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
    pub(crate) fn new(ctx: Arc<CudaContext>, lane_bytes: usize) -> Result<Self, KernelError> {
        let device = DeviceContext::open(ctx)?;
        let stage = device.new_queue()?;
        Ok(Gpu::with(device, stage, lane_bytes))
    }

    /// The emulated device: host memory, immediate operations, CPU kernels (tests only).
    pub(crate) fn emulated(lane_bytes: usize) -> Self {
        Gpu::with(DeviceContext::emulated(), Queue::emulated(), lane_bytes)
    }

    fn with(device: DeviceContext, stage: Queue, lane_bytes: usize) -> Self {
        Gpu {
            device,
            stage,
            lanes: Mutex::new(Vec::new()),
            lane_queues: Mutex::new(Vec::new()),
            lane_bytes,
            mirrors: Mutex::new(Vec::new()),
        }
    }

    /// Makes the context current on the calling thread.
    pub(super) fn bind(&self) -> Result<(), KernelError> {
        self.device.bind()
    }

    /// The device, in words.
    pub(crate) fn device(&self) -> &str {
        self.device.name()
    }

    /// The lane of connection `i`, made (with the lanes before it) on first use.
    pub(super) fn lane(&self, i: usize) -> Result<Arc<Mutex<Lane>>, KernelError> {
        let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
        while lanes.len() <= i {
            let queue = self.device.new_queue()?;
            self.lane_queues
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(queue.clone());
            let lane = Lane::new(&self.device, queue, self.lane_bytes)?;
            lanes.push(Arc::new(Mutex::new(lane)));
        }
        Ok(Arc::clone(&lanes[i]))
    }

    /// Waits for every lane's stream.
    pub(super) fn sync_lanes(&self) -> Result<(), KernelError> {
        let queues = self
            .lane_queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for q in queues {
            q.sync("copying received chunks to the device")?;
        }
        Ok(())
    }

    /// Device memory of `len` bytes on the staging stream (an in-place backup).
    pub(super) fn alloc(&self, len: usize) -> Result<DevMem, KernelError> {
        DevMem::alloc(&self.stage, len, "allocating device memory")
    }

    /// A mirror of `len` bytes: an idle one of that size from the pool, or a new one.
    pub(super) fn take_mirror(&self, len: usize) -> Result<HostMem, KernelError> {
        let mut pool = self.mirrors.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = pool.iter().position(|m| m.len() == len) {
            return Ok(pool.swap_remove(i));
        }
        drop(pool);
        self.device.host_mem(len)
    }

    /// Gives a mirror no copy uses any more back to the pool (or frees it when the pool is
    /// full).
    pub(super) fn give_mirror(&self, m: HostMem) {
        let mut pool = self.mirrors.lock().unwrap_or_else(|p| p.into_inner());
        let held: usize = pool.iter().map(HostMem::len).sum();
        if held + m.len() <= MIRROR_POOL_BYTES {
            pool.push(m);
        }
    }

    /// Waits for every stream of this context (the failure path; the user's streams included).
    pub(super) fn synchronize_all(&self) -> Result<(), KernelError> {
        self.device.synchronize("waiting for the GPU to finish")
    }

    /// `d = a op b` for `n` elements (finished with the Avg division by `finish` when given).
    ///
    /// # Safety
    /// `d`, `a`, `b` are device memory valid for `n` elements of `dtype`; `d` overlaps neither
    /// and nothing else writes them until `queue` is synchronised.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn reduce(
        &self,
        queue: &Queue,
        d: u64,
        a: u64,
        b: u64,
        n: usize,
        dtype: DType,
        op: ReduceOp,
        finish: Option<usize>,
    ) -> Result<(), KernelError> {
        // SAFETY: the caller's contract, passed on unchanged.
        unsafe { self.device.reduce(queue, d, a, b, n, dtype, op, finish) }
    }

    /// The staging stream, once `slice` is known to be this GPU's buffer.
    fn stage_for<T>(&self, slice: &CudaSlice<T>) -> Result<&Queue, KernelError> {
        if self.stage.stream().is_some() && self.device.owns(slice.context()) {
            return Ok(&self.stage);
        }
        Err(KernelError::Device(format!(
            "this buffer lives on CUDA device {}, but this communicator already works with \
             {}; use one communicator per GPU",
            slice.ordinal(),
            self.device()
        )))
    }
}

/// The raw pointer of a user slice the collective reads, after making the staging stream wait
/// for what its owner queued on its own stream (say, the backward pass).
pub(crate) fn device_ptr<T: DeviceElement>(
    gpu: &Gpu,
    slice: &CudaSlice<T>,
) -> Result<u64, KernelError> {
    let stage = gpu.stage_for(slice)?;
    concord_kernels::cuda::read_ptr(stage, slice)
}

/// As [`device_ptr`], for a slice the collective writes.
pub(crate) fn device_ptr_mut<T: DeviceElement>(
    gpu: &Gpu,
    slice: &mut CudaSlice<T>,
) -> Result<u64, KernelError> {
    let stage = gpu.stage_for(slice)?;
    concord_kernels::cuda::write_ptr(stage, slice)
}
