//! `concord bench --device cuda`: the benchmark's buffers in GPU memory.

use std::sync::Arc;
use std::time::Duration;

use concord::gpu::cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use concord::{Communicator, DType, ReduceInfo, ReduceOp};

/// Opens GPU `ordinal`, or when none is given the one of this process's local rank
/// (`LOCAL_RANK` from torchrun-style launchers, else Slurm's `SLURM_LOCALID`) modulo the GPUs
/// present, else GPU 0. Called after `concord::cuda_status` said CUDA is there.
pub(crate) fn open(ordinal: Option<usize>) -> Result<Arc<CudaContext>, String> {
    let count = CudaContext::device_count().map_err(|e| format!("cuDeviceGetCount: {e}"))?;
    let local_rank = || {
        ["LOCAL_RANK", "SLURM_LOCALID"]
            .iter()
            .find_map(|v| std::env::var(v).ok()?.trim().parse::<usize>().ok())
    };
    let ordinal = match ordinal {
        Some(o) => o,
        None => local_rank().map_or(0, |r| r % count.max(1) as usize),
    };
    if ordinal >= count.max(0) as usize {
        return Err(format!(
            "--cuda-device {ordinal}: this host has {count} CUDA device(s)"
        ));
    }
    CudaContext::new(ordinal).map_err(|e| format!("opening CUDA device {ordinal}: {e}"))
}

/// The device, in words.
pub(crate) fn describe(ctx: &CudaContext) -> String {
    let name = ctx
        .name()
        .unwrap_or_else(|e| format!("(name unknown: {e})"));
    format!("CUDA device {}: {name}", ctx.ordinal())
}

/// One size's input and output in device memory.
pub(crate) struct Buffers {
    stream: Arc<CudaStream>,
    src: CudaSlice<u8>,
    dst: CudaSlice<u8>,
}

fn err(during: &'static str) -> impl Fn(concord::gpu::cudarc::driver::DriverError) -> String {
    move |e| format!("CUDA error while {during}: {e}")
}

impl Buffers {
    pub(crate) fn new(ctx: &Arc<CudaContext>, bytes: usize) -> Result<Self, String> {
        let stream = ctx.new_stream().map_err(err("creating a stream"))?;
        let src = stream
            .alloc_zeros::<u8>(bytes)
            .map_err(err("allocating device memory"))?;
        let dst = stream
            .alloc_zeros::<u8>(bytes)
            .map_err(err("allocating device memory"))?;
        Ok(Buffers { stream, src, dst })
    }

    /// Copies the host input and a poisoned output to the device.
    pub(crate) fn upload(&mut self, src: &[u8], dst: &[u8]) -> Result<(), String> {
        self.stream
            .memcpy_htod(src, &mut self.src)
            .map_err(err("copying the input to the device"))?;
        self.stream
            .memcpy_htod(dst, &mut self.dst)
            .map_err(err("copying the output to the device"))?;
        self.stream.synchronize().map_err(err("uploading"))
    }

    /// In place: the output buffer starts as the input.
    pub(crate) fn copy_src_to_dst(&mut self) -> Result<(), String> {
        self.stream
            .memcpy_dtod(&self.src, &mut self.dst)
            .map_err(err("copying on the device"))?;
        self.stream
            .synchronize()
            .map_err(err("copying on the device"))
    }

    pub(crate) fn all_reduce(
        &mut self,
        comm: &Communicator,
        in_place: bool,
        dtype: DType,
        op: ReduceOp,
        tag: u64,
    ) -> Result<ReduceInfo, concord::Error> {
        let src = (!in_place).then_some(&self.src);
        comm.all_reduce_device_raw(src, &mut self.dst, dtype, op, tag)
    }

    /// Copies the result back to the host.
    pub(crate) fn download(&self, dst: &mut [u8]) -> Result<(), String> {
        self.stream
            .memcpy_dtoh(&self.dst, dst)
            .map_err(err("copying the result to the host"))?;
        self.stream.synchronize().map_err(err("downloading"))
    }
}

/// Per-stage times of the timed iterations on this peer (`ReduceInfo::device`), summed.
#[derive(Debug, Default)]
pub(crate) struct StageSums {
    iters: u32,
    wall: Duration,
    input_wait: Duration,
    gpu_reduce: Duration,
    reduce_frames: u64,
    gather: Duration,
    copy_frames: u64,
}

impl StageSums {
    pub(crate) fn add(&mut self, wall: Duration, stages: Option<concord::gpu::DeviceStages>) {
        let Some(s) = stages else { return };
        self.iters += 1;
        self.wall += wall;
        self.input_wait += s.input_wait;
        self.gpu_reduce += s.gpu_reduce;
        self.reduce_frames += s.reduce_frames;
        self.gather += s.gather_copies;
        self.copy_frames += s.copy_frames;
    }

    /// One comment line: per-iteration means on this peer. GPU stages summed over its threads
    /// that are well below the wall time ran hidden behind the network.
    pub(crate) fn line(&self) -> String {
        let n = self.iters.max(1);
        let us = |d: Duration| d.as_secs_f64() * 1e6 / f64::from(n);
        format!(
            "#   stages on rank 0, mean per iteration: wall {:.1} us | TX waiting for the input \
             (device -> host) {:.1} us | RX waiting for the GPU on reduce-scatter frames {:.1} us \
             ({} frames) | all-gather copies to the device {:.1} us ({} frames)",
            us(self.wall),
            us(self.input_wait),
            us(self.gpu_reduce),
            self.reduce_frames / u64::from(n),
            us(self.gather),
            self.copy_frames / u64::from(n),
        )
    }
}
