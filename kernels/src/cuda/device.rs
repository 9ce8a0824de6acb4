//! Running the kernels: NVRTC compilation and launches through `cudarc` (dynamic loading).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DevicePtrMut,
    LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};

use super::NVRTC_OPTIONS;
use super::{finish_kernel_name, kernel_source, reduce_finish_kernel_name, reduce_kernel_name};
use crate::{DType, KernelError, ReduceOp};

/// Threads per block of every launch.
const BLOCK_THREADS: u32 = 256;
/// Upper bound on blocks per launch; the kernels stride over longer buffers.
const MAX_BLOCKS: u64 = 1 << 16;

/// Runs `f`, turning a panic inside the bindings into an error string.
fn contained<T>(what: &str, f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "unknown panic".to_owned());
            Err(format!("{what} panicked: {msg}"))
        }
    }
}

/// Checks for the libraries first (dlopen, no calls), then initialises device 0.
fn libraries_present() -> Result<(), String> {
    // SAFETY: these only try to dlopen the libraries (and close them again); no symbol is
    // called.
    let (driver, nvrtc) = unsafe {
        (
            cudarc::driver::sys::is_culib_present(),
            cudarc::nvrtc::sys::is_culib_present(),
        )
    };
    if !driver {
        return Err("no CUDA driver library (libcuda.so) could be loaded".to_owned());
    }
    if !nvrtc {
        return Err(
            "no NVRTC library (libnvrtc.so) could be loaded; install the CUDA \
                    toolkit or the nvidia-cuda-nvrtc wheel and add it to LD_LIBRARY_PATH"
                .to_owned(),
        );
    }
    Ok(())
}

pub(super) fn probe() -> Result<String, String> {
    libraries_present()?;
    contained("CUDA probe", || {
        let count = CudaContext::device_count().map_err(|e| format!("cuDeviceGetCount: {e}"))?;
        if count < 1 {
            return Err("the CUDA driver reports no devices".to_owned());
        }
        let ctx =
            CudaContext::new(0).map_err(|e| format!("creating a context on device 0: {e}"))?;
        describe(&ctx)
    })
}

fn describe(ctx: &Arc<CudaContext>) -> Result<String, String> {
    let name = ctx.name().map_err(|e| e.to_string())?;
    let (major, minor) = ctx.compute_capability().map_err(|e| e.to_string())?;
    let mem = ctx.total_mem().map_err(|e| e.to_string())?;
    Ok(format!(
        "device {}: {name}, compute capability {major}.{minor}, {:.1} GiB",
        ctx.ordinal(),
        mem as f64 / f64::from(1u32 << 30)
    ))
}

fn cuda_err(during: &'static str) -> impl Fn(String) -> KernelError {
    move |message| KernelError::Cuda { during, message }
}

/// The reduction kernels compiled for one GPU, with the stream they are launched on.
///
/// Buffers are `CudaSlice<u8>` (bytes, as on the CPU); lengths must be whole elements and equal.
/// Launches are asynchronous on [`CudaKernels::stream`]; `cudarc` orders them against copies
/// made through the same stream.
pub struct CudaKernels {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    module: Arc<CudaModule>,
    description: String,
}

impl std::fmt::Debug for CudaKernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaKernels")
            .field("device", &self.description)
            .finish_non_exhaustive()
    }
}

impl CudaKernels {
    /// Probes for CUDA, opens device `ordinal` and compiles every kernel for its architecture
    /// with NVRTC (a fraction of a second, once).
    pub fn new(ordinal: usize) -> Result<CudaKernels, KernelError> {
        let unavailable = |reason: String| KernelError::CudaUnavailable { reason };
        libraries_present().map_err(unavailable)?;
        let ctx = contained("CUDA initialisation", || {
            CudaContext::new(ordinal).map_err(|e| format!("device {ordinal}: {e}"))
        })
        .map_err(unavailable)?;
        Self::with_context(ctx)
    }

    /// Compiles every kernel for the device of `ctx` (a context the caller already holds, for
    /// example the one its buffers were allocated in).
    pub fn with_context(ctx: Arc<CudaContext>) -> Result<CudaKernels, KernelError> {
        let unavailable = |reason: String| KernelError::CudaUnavailable { reason };
        libraries_present().map_err(unavailable)?;
        contained("CUDA initialisation", || {
            let description = describe(&ctx)?;
            let (major, minor) = ctx.compute_capability().map_err(|e| e.to_string())?;
            let mut options: Vec<String> = NVRTC_OPTIONS.iter().map(|s| (*s).to_owned()).collect();
            options.push(format!("--gpu-architecture=compute_{major}{minor}"));
            let opts = CompileOptions {
                options,
                name: Some("concord_kernels.cu".to_owned()),
                ..Default::default()
            };
            let ptx = compile_ptx_with_opts(kernel_source(), opts)
                .map_err(|e| format!("NVRTC compilation failed: {e:?}"))?;
            let module = ctx
                .load_module(ptx)
                .map_err(|e| format!("loading the PTX: {e}"))?;
            let stream = ctx.default_stream();
            Ok(CudaKernels {
                ctx,
                stream,
                module,
                description,
            })
        })
        .map_err(unavailable)
    }

    /// The device, in words.
    pub fn device(&self) -> &str {
        &self.description
    }

    /// The context the buffers must belong to.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every launch goes to.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    fn function(&self, name: &str) -> Result<CudaFunction, KernelError> {
        self.module
            .load_function(name)
            .map_err(|e| cuda_err("looking up a kernel")(format!("{name}: {e}")))
    }

    /// `dst[i] = dst[i] op src[i]` on the GPU.
    pub fn reduce_into(
        &self,
        dst: &mut CudaSlice<u8>,
        src: &CudaSlice<u8>,
        dtype: DType,
        op: ReduceOp,
    ) -> Result<(), KernelError> {
        self.launch_into(dst, src, dtype, op, None)
    }

    /// [`CudaKernels::reduce_into`] then [`CudaKernels::finish`], fused (same bits).
    pub fn reduce_into_finish(
        &self,
        dst: &mut CudaSlice<u8>,
        src: &CudaSlice<u8>,
        dtype: DType,
        op: ReduceOp,
        world: usize,
    ) -> Result<(), KernelError> {
        let world = crate::check_world(world)?.get();
        self.launch_into(dst, src, dtype, op, (op == ReduceOp::Avg).then_some(world))
    }

    /// `dst[i] = a[i] op b[i]` on the GPU.
    pub fn reduce_out(
        &self,
        dst: &mut CudaSlice<u8>,
        a: &CudaSlice<u8>,
        b: &CudaSlice<u8>,
        dtype: DType,
        op: ReduceOp,
    ) -> Result<(), KernelError> {
        self.launch_out(dst, a, b, dtype, op, None)
    }

    /// [`CudaKernels::reduce_out`] then [`CudaKernels::finish`], fused (same bits).
    pub fn reduce_out_finish(
        &self,
        dst: &mut CudaSlice<u8>,
        a: &CudaSlice<u8>,
        b: &CudaSlice<u8>,
        dtype: DType,
        op: ReduceOp,
        world: usize,
    ) -> Result<(), KernelError> {
        let world = crate::check_world(world)?.get();
        self.launch_out(dst, a, b, dtype, op, (op == ReduceOp::Avg).then_some(world))
    }

    /// For `Avg`: `dst[i] /= world` on the GPU; otherwise nothing.
    pub fn finish(
        &self,
        dst: &mut CudaSlice<u8>,
        dtype: DType,
        op: ReduceOp,
        world: usize,
    ) -> Result<(), KernelError> {
        let n = crate::check_len("dst", dst.len(), dtype)? as u64;
        let world = crate::check_world(world)?.get() as u64;
        if op != ReduceOp::Avg || n == 0 {
            return Ok(());
        }
        let f = self.function(&finish_kernel_name(dtype))?;
        let (d, _sync) = dst.device_ptr_mut(&self.stream);
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(&d).arg(&n).arg(&world);
        // SAFETY: the kernel takes (T*, u64, u64); `d` points to `n` elements of `dtype`
        // (checked above), alive until `_sync` drops after the launch is enqueued.
        unsafe { launch.launch(config(n)) }
            .map(drop)
            .map_err(|e| cuda_err("launching finish")(e.to_string()))
    }

    fn launch_into(
        &self,
        dst: &mut CudaSlice<u8>,
        src: &CudaSlice<u8>,
        dtype: DType,
        op: ReduceOp,
        world: Option<usize>,
    ) -> Result<(), KernelError> {
        crate::check_same("src", src.len(), dst.len())?;
        let n = crate::check_len("dst", dst.len(), dtype)? as u64;
        let (s, _sync_src) = src.device_ptr(&self.stream);
        let (d, _sync_dst) = dst.device_ptr_mut(&self.stream);
        self.launch_raw(d, d, s, n, dtype, op, world)
    }

    fn launch_out(
        &self,
        dst: &mut CudaSlice<u8>,
        a: &CudaSlice<u8>,
        b: &CudaSlice<u8>,
        dtype: DType,
        op: ReduceOp,
        world: Option<usize>,
    ) -> Result<(), KernelError> {
        crate::check_same("a", a.len(), dst.len())?;
        crate::check_same("b", b.len(), dst.len())?;
        let n = crate::check_len("dst", dst.len(), dtype)? as u64;
        let (pa, _sync_a) = a.device_ptr(&self.stream);
        let (pb, _sync_b) = b.device_ptr(&self.stream);
        let (d, _sync_dst) = dst.device_ptr_mut(&self.stream);
        self.launch_raw(d, pa, pb, n, dtype, op, world)
    }

    /// Launches the reduce kernel on raw device pointers (each valid for `n` elements).
    #[allow(clippy::too_many_arguments)]
    fn launch_raw(
        &self,
        d: u64,
        a: u64,
        b: u64,
        n: u64,
        dtype: DType,
        op: ReduceOp,
        world: Option<usize>,
    ) -> Result<(), KernelError> {
        // SAFETY: the callers checked every pointer is valid for `n` elements.
        unsafe { self.reduce_raw(&self.stream, d, a, b, n, dtype, op, world) }
    }

    /// `d[i] = a[i] op b[i]` for `n` elements of `dtype` on raw device pointers, enqueued on
    /// `stream` (fused with the division by `world` when given and `op` is Avg). `d` may equal
    /// `a` or `b`.
    ///
    /// # Safety
    /// `d`, `a` and `b` must be device pointers of this context, each valid for `n` elements of
    /// `dtype` until the launch has run (order later frees after it on `stream`), and nothing
    /// else may write them meanwhile.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn reduce_raw(
        &self,
        stream: &CudaStream,
        d: u64,
        a: u64,
        b: u64,
        n: u64,
        dtype: DType,
        op: ReduceOp,
        world: Option<usize>,
    ) -> Result<(), KernelError> {
        if n == 0 {
            return Ok(());
        }
        let (f, world) = match world {
            Some(w) if op == ReduceOp::Avg => (
                self.function(&reduce_finish_kernel_name(dtype))?,
                crate::check_world(w)?.get() as u64,
            ),
            _ => (self.function(&reduce_kernel_name(dtype, op))?, 0),
        };
        let mut launch = stream.launch_builder(&f);
        launch.arg(&d).arg(&a).arg(&b).arg(&n);
        if world != 0 {
            launch.arg(&world);
        }
        // SAFETY: the kernel's parameters are (T*, const T*, const T*, u64[, u64]) as pushed;
        // every pointer is valid for `n` elements of `dtype` (checked by the callers), and the
        // buffers outlive the enqueue (their sync guards drop after this returns).
        unsafe { launch.launch(config(n)) }
            .map(drop)
            .map_err(|e| cuda_err("launching a reduction")(e.to_string()))
    }

    /// Convenience for tests and tools: copies `a` and `b` to the GPU, computes `a op b`
    /// (fused with the division by `world` when given and `op` is Avg), copies the result back.
    pub fn reduce_host(
        &self,
        a: &[u8],
        b: &[u8],
        dtype: DType,
        op: ReduceOp,
        world: Option<usize>,
    ) -> Result<Vec<u8>, KernelError> {
        crate::check_same("b", b.len(), a.len())?;
        crate::check_len("a", a.len(), dtype)?;
        if a.is_empty() {
            return Ok(Vec::new());
        }
        let copy = cuda_err("copying to the device");
        let da = self.stream.clone_htod(a).map_err(|e| copy(e.to_string()))?;
        let db = self.stream.clone_htod(b).map_err(|e| copy(e.to_string()))?;
        let mut dd = self
            .stream
            .alloc_zeros::<u8>(a.len())
            .map_err(|e| copy(e.to_string()))?;
        match world {
            Some(w) => self.reduce_out_finish(&mut dd, &da, &db, dtype, op, w)?,
            None => self.reduce_out(&mut dd, &da, &db, dtype, op)?,
        }
        self.stream
            .clone_dtoh(&dd)
            .map_err(|e| cuda_err("copying from the device")(e.to_string()))
    }
}

/// Grid-stride launch shape for `n` elements.
fn config(n: u64) -> LaunchConfig {
    let blocks = n.div_ceil(u64::from(BLOCK_THREADS)).clamp(1, MAX_BLOCKS) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}
