//! One device for the engine's pipeline: a CUDA context with the reduction kernels compiled for
//! it, or the emulated device that stands in for it in tests.
//!
//! The emulated device keeps the pipeline's every step (staging, lanes, events, restore) but
//! runs it on the host: device memory is host memory, each queue runs its operations at once,
//! and the CPU kernels reduce. It exists so that the engine's device code is exercised on
//! machines without a GPU; users only reach it through a hidden test entry point.

use std::sync::Arc;

use cudarc::driver::CudaContext;

use super::device::CudaKernels;
use super::host_mem::HostMem;
use super::queue::{driver, Queue};
use crate::{DType, KernelError, ReduceOp};

/// A CUDA context and its compiled kernels, or the emulated device.
#[doc(hidden)]
#[derive(Debug)]
pub struct DeviceContext {
    /// `None`: the emulated device.
    cuda: Option<Cuda>,
}

#[derive(Debug)]
struct Cuda {
    ctx: Arc<CudaContext>,
    kernels: CudaKernels,
}

impl DeviceContext {
    /// The GPU of `ctx`, with every kernel compiled for it (NVRTC, a fraction of a second).
    pub fn open(ctx: Arc<CudaContext>) -> Result<DeviceContext, KernelError> {
        let kernels = CudaKernels::with_context(Arc::clone(&ctx))?;
        Ok(DeviceContext {
            cuda: Some(Cuda { ctx, kernels }),
        })
    }

    /// The emulated device: host memory, immediate operations, CPU kernels.
    pub fn emulated() -> DeviceContext {
        DeviceContext { cuda: None }
    }

    /// The CUDA context, `None` on the emulated device.
    pub fn cuda_context(&self) -> Option<&Arc<CudaContext>> {
        self.cuda.as_ref().map(|c| &c.ctx)
    }

    /// The device, in words.
    pub fn name(&self) -> &str {
        self.cuda
            .as_ref()
            .map_or("an emulated device (host memory)", |c| c.kernels.device())
    }

    /// Whether buffers of `ctx` belong to this device (never on the emulated one).
    pub fn owns(&self, ctx: &CudaContext) -> bool {
        self.cuda_context()
            .is_some_and(|c| c.cu_ctx() == ctx.cu_ctx())
    }

    /// Makes the context current on the calling thread (driver calls outside cudarc's safe
    /// wrappers need it).
    pub fn bind(&self) -> Result<(), KernelError> {
        match self.cuda_context() {
            Some(ctx) => ctx.bind_to_thread().map_err(driver("binding the context")),
            None => Ok(()),
        }
    }

    /// A new queue: a fresh CUDA stream of this context, or an emulated queue.
    pub fn new_queue(&self) -> Result<Queue, KernelError> {
        match self.cuda_context() {
            Some(ctx) => ctx
                .new_stream()
                .map(Queue::cuda)
                .map_err(driver("creating a stream")),
            None => Ok(Queue::emulated()),
        }
    }

    /// `len` bytes of host memory for this device's copies: page-locked on a GPU, plain on the
    /// emulated device.
    pub fn host_mem(&self, len: usize) -> Result<HostMem, KernelError> {
        match self.cuda_context() {
            Some(ctx) => HostMem::pinned(ctx, len),
            None => Ok(HostMem::plain(len)),
        }
    }

    /// Blocks until every stream of the context is done, the user's streams included (at once
    /// on the emulated device).
    pub fn synchronize(&self, during: &'static str) -> Result<(), KernelError> {
        match self.cuda_context() {
            Some(ctx) => ctx.synchronize().map_err(driver(during)),
            None => Ok(()),
        }
    }

    /// Queues `d = a op b` for `n` elements of `dtype` on `queue` (fused with the Avg division
    /// by `finish` when given): the CUDA kernel on a GPU, the CPU kernel at once when emulated.
    ///
    /// # Safety
    /// `d`, `a` and `b` are device memory of this device (host memory when emulated), each valid
    /// for `n` elements of `dtype`; `d` overlaps neither `a` nor `b`; nothing else writes them
    /// until the work is done (`queue` synchronised or an event recorded after it completed).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn reduce(
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
        match (&self.cuda, queue.stream()) {
            (Some(c), Some(stream)) => {
                // SAFETY: the caller's contract (pointers of this context, valid for `n`
                // elements, not written by anyone else meanwhile).
                unsafe {
                    c.kernels
                        .reduce_raw(stream, d, a, b, n as u64, dtype, op, finish)
                }
            }
            (None, None) => {
                let bytes = n * dtype.size_bytes();
                // SAFETY: emulated device memory is host memory; the caller's contract makes
                // each pointer valid for `bytes` bytes and `d` disjoint from `a` and `b`.
                let (d, a, b) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(d as *mut u8, bytes),
                        std::slice::from_raw_parts(a as *const u8, bytes),
                        std::slice::from_raw_parts(b as *const u8, bytes),
                    )
                };
                match finish {
                    Some(w) => crate::reduce_out_finish(d, a, b, dtype, op, w),
                    None => crate::reduce_out(d, a, b, dtype, op),
                }
            }
            _ => Err(KernelError::CudaUnavailable {
                reason: "a reduction was queued on a queue of another device \
                         (a CUDA stream on the emulated device, or the reverse)"
                    .to_owned(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::DevMem;

    /// The emulated twin runs the pipeline's steps at once, on host memory, with the CPU bits:
    /// host → device, a reduction, device → device and device → host, with events and syncs.
    #[test]
    fn emulated_device_copies_and_reduces_like_the_cpu() {
        let device = DeviceContext::emulated();
        assert!(device.cuda_context().is_none());
        device.bind().unwrap();
        let queue = device.new_queue().unwrap();
        assert!(queue.stream().is_none());
        let a: Vec<u8> = [1.5f32, -2.0, 3.25]
            .iter()
            .flat_map(|x| x.to_ne_bytes())
            .collect();
        let b: Vec<u8> = [0.5f32, 4.0, -1.0]
            .iter()
            .flat_map(|x| x.to_ne_bytes())
            .collect();
        let (mut da, mut db) = (
            DevMem::alloc(&queue, 12, "a").unwrap(),
            DevMem::alloc(&queue, 12, "b").unwrap(),
        );
        let (mut dd, mut dc) = (
            DevMem::alloc(&queue, 12, "d").unwrap(),
            DevMem::alloc(&queue, 12, "c").unwrap(),
        );
        let (pa, pb, pd, pc) = (
            da.ptr(&queue),
            db.ptr(&queue),
            dd.ptr(&queue),
            dc.ptr(&queue),
        );
        // SAFETY: every pointer is an emulated allocation of 12 bytes, used by this thread only.
        unsafe {
            queue.h2d(pa, &a, "a").unwrap();
            queue.h2d(pb, &b, "b").unwrap();
            device
                .reduce(&queue, pd, pa, pb, 3, DType::F32, ReduceOp::Avg, Some(2))
                .unwrap();
            queue.d2d(pc, pd, 12, "c").unwrap();
        }
        let event = queue.record().unwrap();
        queue.wait(&event).unwrap();
        event.synchronize("reducing").unwrap();
        let mut out = device.host_mem(12).unwrap();
        assert!(!out.is_pinned());
        // SAFETY: `pc` holds 12 bytes; `out` is exclusively borrowed for the (immediate) copy.
        unsafe { queue.d2h(out.as_mut_slice(), pc, "out").unwrap() };
        queue.sync("finishing").unwrap();
        device.synchronize("finishing").unwrap();
        let mut expect = a.clone();
        crate::reduce_into_finish(&mut expect, &b, DType::F32, ReduceOp::Avg, 2).unwrap();
        assert_eq!(out.as_slice(), &expect[..]);
    }
}
