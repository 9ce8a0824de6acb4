//! The crate's one error type.

use crate::{CpuPath, DType};

/// Everything that can go wrong in `concord-kernels`.
///
/// A failed call never touches the destination buffer: every check happens before any element
/// is written.
#[non_exhaustive]
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum KernelError {
    /// A buffer's length in bytes is not a whole number of elements.
    #[error(
        "buffer `{operand}` is {len_bytes} bytes, not a multiple of the {dtype} element size \
         ({elem_bytes} bytes); pass whole elements"
    )]
    NotWholeElements {
        /// Which argument (`"dst"`, `"src"`, `"a"`, `"b"`).
        operand: &'static str,
        /// Its length in bytes.
        len_bytes: usize,
        /// The element type.
        dtype: DType,
        /// Bytes per element of `dtype`.
        elem_bytes: usize,
    },
    /// Two operands have different lengths.
    #[error(
        "operand `{operand}` is {len_bytes} bytes but `dst` is {dst_bytes} bytes; \
         every operand of a reduction must have the same length"
    )]
    LengthMismatch {
        /// Which argument differs from `dst`.
        operand: &'static str,
        /// Its length in bytes.
        len_bytes: usize,
        /// The length of `dst` in bytes.
        dst_bytes: usize,
    },
    /// `finish` (or a fused `*_finish`) was called with a world size of zero.
    #[error("world size is 0; `finish` divides by the number of peers, which must be at least 1")]
    ZeroWorld,
    /// A CPU path was requested that this CPU cannot run.
    #[error(
        "CPU kernel path `{path}` is not supported on this CPU (missing: {missing}); \
         unset CONCORD_KERNELS or choose one of: {available}"
    )]
    PathUnsupported {
        /// The requested path.
        path: CpuPath,
        /// The CPU features it needs that are missing.
        missing: String,
        /// The paths this CPU can run, comma separated.
        available: String,
    },
    /// `CONCORD_KERNELS` (or a path name given to `CpuPath::from_str`) is not a known path.
    #[error("unknown CPU kernel path {input:?} (from {source_name}); valid values: scalar, avx2, avx512, avx512bf16, avx512fp16")]
    UnknownPath {
        /// What was given.
        input: String,
        /// Where it came from (`"CONCORD_KERNELS"` or `"argument"`).
        source_name: &'static str,
    },
    /// A quantisation request or chunk that does not fit: a type that cannot be quantised, or
    /// a chunk whose length or codec byte is not what it should be (`quant`).
    #[error("quantisation: {0}")]
    Quantisation(String),
    /// A dtype name could not be parsed.
    #[error("unknown dtype {input:?}; valid names: {}", valid_dtype_names())]
    UnknownDType {
        /// What was given.
        input: String,
    },
    /// A reduction operator name could not be parsed.
    #[error("unknown reduction op {input:?}; valid names: sum, avg, prod, max, min")]
    UnknownOp {
        /// What was given.
        input: String,
    },
    /// The CUDA path is not available (no driver, no device, feature off, or NVRTC failed).
    #[error("CUDA kernels unavailable: {reason}")]
    CudaUnavailable {
        /// Why, in words.
        reason: String,
    },
    /// A device buffer cannot be used the way it was handed over (another GPU's buffer, a
    /// size that does not match); says what and why.
    #[error("{0}")]
    Device(String),
    /// A CUDA call failed.
    #[error("CUDA error during {during}: {message}")]
    Cuda {
        /// What was being done.
        during: &'static str,
        /// The driver's or NVRTC's message.
        message: String,
    },
    /// A CUDA driver call of the device plumbing (streams, copies, events, allocations) failed;
    /// the driver's error is kept as the source so that callers can tell, say, an out-of-memory
    /// from a broken context.
    #[cfg(feature = "cuda")]
    #[error("CUDA error while {during}: {source}")]
    Driver {
        /// What was being done, in words ("copying the input to the host").
        during: &'static str,
        /// The driver's error.
        source: cudarc::driver::DriverError,
    },
    /// `cuMemHostAlloc` refused page-locked host memory (the driver pins it itself:
    /// `RLIMIT_MEMLOCK` does not apply, the host's free memory does).
    #[cfg(feature = "cuda")]
    #[error(
        "CUDA could not allocate {len_bytes} bytes of page-locked host memory \
         (cuMemHostAlloc: {source}); use smaller buffers or free host memory"
    )]
    HostAlloc {
        /// The size asked for.
        len_bytes: usize,
        /// The driver's error.
        source: cudarc::driver::DriverError,
    },
}

fn valid_dtype_names() -> String {
    DType::ALL
        .iter()
        .map(|d| format!("{} ({})", d.name(), d.short_name()))
        .collect::<Vec<_>>()
        .join(", ")
}
