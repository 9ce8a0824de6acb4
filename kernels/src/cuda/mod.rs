//! The same reductions as CUDA kernels, compiled at run time by NVRTC.
//!
//! The kernel source ([`kernel_source`]) is plain CUDA C++ with no headers; it is always
//! available, so CI can compile it to PTX and run `ptxas` on it without a GPU
//! (`ci/cuda-compile.sh`). Running it needs the `cuda` cargo feature, which brings in
//! [`cudarc`](https://docs.rs/cudarc) with dynamic loading: the crate builds and runs on hosts
//! without CUDA, and [`probe`] says (without panicking) whether a driver, NVRTC and a device are
//! there before anything touches them.
//!
//! Kernels (one per dtype, short names `f32` ... `u64`):
//! * `concord_reduce_{sum,prod,max,min}_{dt}(dst, a, b, n)`: `dst[i] = a[i] op b[i]`
//!   (Avg reduces with `sum`);
//! * `concord_reduce_finish_avg_{dt}(dst, a, b, n, world)`: the fused Avg;
//! * `concord_finish_avg_{dt}(dst, n, world)`: `dst[i] /= world`.
//!
//! Every result has the same bits as the CPU paths (see the crate docs for the rules).
//!
//! With the `cuda` feature this module also holds the raw CUDA the engine's device pipeline
//! needs, each dangerous primitive behind one helper and each with an emulated twin (device
//! memory is host memory, queues run each operation at once) so the pipeline runs in tests
//! without a GPU: `DeviceContext` (a context with its kernels), `Queue` and `Event` (a stream,
//! its copies and events), `HostMem` (page-locked host memory) and `DevMem` (device memory),
//! plus `read_ptr`/`write_ptr` and `download`/`upload` for the user's `CudaSlice`s. They are
//! hidden from the rendered docs: plumbing, not a stable API.

use crate::{DType, ReduceOp};

#[cfg(feature = "cuda")]
mod context;
#[cfg(feature = "cuda")]
mod device;
#[cfg(feature = "cuda")]
mod device_mem;
#[cfg(feature = "cuda")]
mod host_mem;
#[cfg(feature = "cuda")]
mod queue;

/// The `cudarc` this crate was built against (device buffers handed to Concord are its types).
#[cfg(feature = "cuda")]
pub use cudarc;
#[cfg(feature = "cuda")]
pub use device::CudaKernels;

// The raw device plumbing of the engine's pipeline: hidden, as its shape follows that pipeline
// (raw `u64` device pointers, an emulated twin for tests) rather than a general-purpose API.
#[cfg(feature = "cuda")]
#[doc(hidden)]
pub use context::DeviceContext;
#[cfg(feature = "cuda")]
#[doc(hidden)]
pub use device_mem::{download, read_ptr, upload, write_ptr, DevMem};
#[cfg(feature = "cuda")]
#[doc(hidden)]
pub use host_mem::HostMem;
#[cfg(feature = "cuda")]
#[doc(hidden)]
pub use queue::{Event, Queue};

const TEMPLATE_SOURCE: &str = include_str!("kernels.cu");

/// The name of the element struct in `kernels.cu` for `dtype`.
fn struct_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "F32",
        DType::F64 => "F64",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        DType::I8 => "I8",
        DType::I16 => "I16",
        DType::I32 => "I32",
        DType::I64 => "I64",
        DType::U8 => "U8",
        DType::U16 => "U16",
        DType::U32 => "U32",
        DType::U64 => "U64",
    }
}

/// The kernel's name for a reduction op (`Avg` reduces as `sum`).
fn op_kernel_name(op: ReduceOp) -> &'static str {
    match op {
        ReduceOp::Sum | ReduceOp::Avg => "sum",
        ReduceOp::Prod => "prod",
        ReduceOp::Max => "max",
        ReduceOp::Min => "min",
    }
}

/// Name of the kernel computing `dst = a op b` for `dtype`.
pub fn reduce_kernel_name(dtype: DType, op: ReduceOp) -> String {
    format!(
        "concord_reduce_{}_{}",
        op_kernel_name(op),
        dtype.short_name()
    )
}

/// Name of the kernel computing the fused Avg (`dst = (a + b) / world`, rounded in between).
pub fn reduce_finish_kernel_name(dtype: DType) -> String {
    format!("concord_reduce_finish_avg_{}", dtype.short_name())
}

/// Name of the kernel computing `dst /= world`.
pub fn finish_kernel_name(dtype: DType) -> String {
    format!("concord_finish_avg_{}", dtype.short_name())
}

/// Every kernel [`kernel_source`] defines.
pub fn kernel_names() -> Vec<String> {
    let mut names = Vec::new();
    for dtype in DType::ALL {
        for op in [ReduceOp::Sum, ReduceOp::Prod, ReduceOp::Max, ReduceOp::Min] {
            names.push(reduce_kernel_name(dtype, op));
        }
        names.push(reduce_finish_kernel_name(dtype));
        names.push(finish_kernel_name(dtype));
    }
    names
}

/// The complete CUDA source: the templates plus one instantiation of every kernel for every
/// dtype. Compile it with `--ftz=false --prec-div=true --fmad=false` (see [`NVRTC_OPTIONS`]).
///
/// ```
/// use concord_kernels::{cuda, DType, ReduceOp};
/// let src = cuda::kernel_source();
/// assert!(src.contains("CONCORD_REDUCE(sum, OpSum, bf16, BF16)"));
/// assert_eq!(cuda::reduce_kernel_name(DType::BF16, ReduceOp::Avg), "concord_reduce_sum_bf16");
/// ```
pub fn kernel_source() -> String {
    // First line: the options, for tools that compile this file outside the crate.
    let mut src = format!("// nvrtc-options: {}\n", NVRTC_OPTIONS.join(" "));
    src.push_str(TEMPLATE_SOURCE);
    for dtype in DType::ALL {
        let (dt, e) = (dtype.short_name(), struct_name(dtype));
        for op in ["sum", "prod", "max", "min"] {
            let functor = format!("Op{}{}", op[..1].to_uppercase(), &op[1..]);
            src.push_str(&format!("CONCORD_REDUCE({op}, {functor}, {dt}, {e})\n"));
        }
        src.push_str(&format!("CONCORD_AVG({dt}, {e})\n"));
    }
    src
}

/// NVRTC options every compilation of [`kernel_source`] uses (plus the target architecture):
/// IEEE division, no flush to zero, no FMA contraction — the CPU paths' arithmetic.
pub const NVRTC_OPTIONS: [&str; 4] = [
    "--ftz=false",
    "--prec-div=true",
    "--prec-sqrt=true",
    "--fmad=false",
];

/// Is CUDA usable here? `Ok(description of device 0)` or `Err(the reason it is not)`.
///
/// Never panics: it looks for the driver and NVRTC libraries before calling into them, and
/// contains any panic from the bindings. Without the `cuda` feature it always says so.
pub fn probe() -> Result<String, String> {
    #[cfg(feature = "cuda")]
    {
        device::probe()
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err("concord-kernels was built without the `cuda` feature".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_defines_every_kernel_once() {
        let src = kernel_source();
        for name in kernel_names() {
            // Each name appears as the macro expands it: as "OPNAME_DT" arguments.
            let suffix = name.trim_start_matches("concord_");
            let parts: Vec<&str> = suffix.rsplitn(2, '_').collect();
            assert_eq!(parts.len(), 2, "{name}");
        }
        assert_eq!(src.matches("CONCORD_REDUCE(").count(), 4 * 12 + 1);
        assert_eq!(src.matches("CONCORD_AVG(").count(), 12 + 1);
        assert_eq!(kernel_names().len(), 72);
    }

    #[test]
    fn probe_never_panics() {
        match probe() {
            Ok(device) => eprintln!("CUDA available: {device}"),
            Err(reason) => eprintln!("CUDA not available: {reason}"),
        }
    }
}
