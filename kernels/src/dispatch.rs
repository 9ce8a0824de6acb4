//! Path selection: which CPU implementation runs, detected once and cached.

use std::fmt;
use std::num::NonZeroUsize;
use std::str::FromStr;
use std::sync::OnceLock;

use crate::cpu;
use crate::{DType, KernelError, ReduceOp};

/// Environment variable that forces a CPU path (`scalar`, `avx2`, `avx512`; empty or `auto`
/// means detect).
pub const PATH_ENV: &str = "CONCORD_KERNELS";

/// One reduction over raw element pointers, as the path functions receive it.
///
/// Contract (established by the safe entry points in `lib.rs`): `a`, `b` and `dst` each point to
/// `len` elements of `dtype` (any alignment); `a` and `b` are readable, `dst` writable; `a` may
/// be equal to `dst` (in-place reduction) but no other overlap exists. With `stream`, the caller
/// issues a store fence (`stores::fence_after`) before anything may read `dst` from another thread.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Job {
    pub(crate) dst: *mut u8,
    pub(crate) a: *const u8,
    pub(crate) b: *const u8,
    /// Number of elements (not bytes).
    pub(crate) len: usize,
    pub(crate) dtype: DType,
    pub(crate) op: ReduceOp,
    /// `Some(world)` when the result is to be rounded, then divided by `world` (fused Avg).
    pub(crate) divisor: Option<NonZeroUsize>,
    /// Write `dst` with non-temporal stores where the path can (the SIMD loops of f32, f16 and
    /// bf16 over an aligned `dst`); the bits are the same either way. (Only x86-64 has such
    /// paths.)
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) stream: bool,
}

// The SIMD paths (x86-64) split and align jobs; the scalar path takes them whole.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
impl Job {
    /// The first `mid` elements and the rest, as two jobs with the same contract.
    pub(crate) fn split_at(&self, mid: usize) -> (Job, Job) {
        assert!(
            mid <= self.len,
            "split point {mid} beyond {} elements",
            self.len
        );
        let off = mid * self.dtype.size_bytes();
        let head = Job { len: mid, ..*self };
        let tail = Job {
            dst: self.dst.wrapping_add(off),
            a: self.a.wrapping_add(off),
            b: self.b.wrapping_add(off),
            len: self.len - mid,
            ..*self
        };
        (head, tail)
    }

    /// Whether the loop writes `dst` with non-temporal stores: asked for, and `dst` aligned to
    /// `align` bytes as those stores need (the paths align it first where the element size
    /// allows).
    pub(crate) fn streams(&self, align: usize) -> bool {
        self.stream && (self.dst as usize).is_multiple_of(align)
    }

    /// How many leading elements to handle one by one so that `dst` becomes `align`-byte
    /// aligned (0 when it already is, or when no whole number of elements gets it there).
    pub(crate) fn head_to_align(&self, align: usize) -> usize {
        let size = self.dtype.size_bytes();
        let misalign = self.dst as usize % align;
        if misalign == 0 || !misalign.is_multiple_of(size) {
            return 0;
        }
        ((align - misalign) / size).min(self.len)
    }
}

/// The functions that make up one path.
#[derive(Debug)]
pub(crate) struct PathFns {
    /// Performs a whole [`Job`].
    ///
    /// Safety contract: the job satisfies the [`Job`] contract.
    pub(crate) combine: unsafe fn(&Job),
    /// `dst[i] /= world` over `len` elements of the dtype.
    ///
    /// Safety contract: `dst` is valid for reads and writes of `len` elements.
    pub(crate) finish: unsafe fn(*mut u8, usize, DType, NonZeroUsize),
}

/// A CPU implementation of the kernels.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CpuPath {
    /// Portable scalar code (the reference).
    Scalar,
    /// x86-64 AVX2 with F16C.
    Avx2,
    /// x86-64 AVX-512 F/BW/VL.
    Avx512,
    /// The AVX-512 path narrowing bf16 with AVX512-BF16 (`vcvtne2ps2bf16`; needs AVX512-DQ
    /// too): bf16 sums 15-20 % faster in L2 than the integer rounding of `avx512` on the
    /// Intel Xeon (Sapphire Rapids). Chosen automatically where the CPU has AVX512-BF16 but not FP16.
    Avx512Bf16,
    /// The AVX-512 path computing f16 sums and products natively with AVX512-FP16 (32 lanes per
    /// instruction, the same bits), and bf16 as `avx512bf16` where the CPU also has AVX512-BF16;
    /// chosen automatically where the CPU has AVX512-FP16.
    Avx512Fp16,
}

impl CpuPath {
    /// Every path, from the most portable to the widest.
    pub const ALL: [CpuPath; 5] = [
        CpuPath::Scalar,
        CpuPath::Avx2,
        CpuPath::Avx512,
        CpuPath::Avx512Bf16,
        CpuPath::Avx512Fp16,
    ];

    /// `"scalar"`, `"avx2"`, `"avx512"`, `"avx512bf16"` or `"avx512fp16"`.
    pub fn name(self) -> &'static str {
        match self {
            CpuPath::Scalar => "scalar",
            CpuPath::Avx2 => "avx2",
            CpuPath::Avx512 => "avx512",
            CpuPath::Avx512Bf16 => "avx512bf16",
            CpuPath::Avx512Fp16 => "avx512fp16",
        }
    }

    /// The CPU features this path needs that this CPU lacks (empty: it can run here).
    pub fn missing_features(self) -> Vec<&'static str> {
        match self {
            CpuPath::Scalar => Vec::new(),
            CpuPath::Avx2 => cpu::avx2_missing(),
            CpuPath::Avx512 => cpu::avx512_missing(),
            CpuPath::Avx512Bf16 => cpu::avx512_bf16_missing(),
            CpuPath::Avx512Fp16 => cpu::avx512_fp16_missing(),
        }
    }

    /// True when this CPU can run the path.
    pub fn is_supported(self) -> bool {
        self.missing_features().is_empty()
    }

    /// Every path this CPU can run.
    pub fn available() -> Vec<CpuPath> {
        CpuPath::ALL
            .into_iter()
            .filter(|p| p.is_supported())
            .collect()
    }

    /// The path chosen when none is forced: the widest of `avx512fp16`, `avx512bf16`, `avx512`,
    /// `avx2`, `scalar` this CPU can run.
    pub fn best() -> CpuPath {
        [
            CpuPath::Avx512Fp16,
            CpuPath::Avx512Bf16,
            CpuPath::Avx512,
            CpuPath::Avx2,
        ]
        .into_iter()
        .find(|p| p.is_supported())
        .unwrap_or(CpuPath::Scalar)
    }

    fn parse_from(input: &str, source_name: &'static str) -> Result<Self, KernelError> {
        let wanted = input.trim().to_ascii_lowercase();
        CpuPath::ALL
            .into_iter()
            .find(|p| p.name() == wanted || (wanted == "avx-512" && *p == CpuPath::Avx512))
            .ok_or(KernelError::UnknownPath {
                input: input.to_owned(),
                source_name,
            })
    }
}

impl fmt::Display for CpuPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for CpuPath {
    type Err = KernelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CpuPath::parse_from(s, "argument")
    }
}

/// A handle on one CPU path; construction checks that the CPU supports it.
///
/// The free functions ([`reduce_into`](crate::reduce_into), ...) use [`Kernels::default_path`];
/// tests and benchmarks build a `Kernels` for each path to compare them.
///
/// ```
/// use concord_kernels::{CpuPath, DType, Kernels, ReduceOp};
/// let k = Kernels::new(CpuPath::Scalar)?;
/// let mut dst = 1.5f32.to_ne_bytes();
/// k.reduce_into(&mut dst, &2.0f32.to_ne_bytes(), DType::F32, ReduceOp::Sum)?;
/// assert_eq!(f32::from_ne_bytes(dst), 3.5);
/// # Ok::<(), concord_kernels::KernelError>(())
/// ```
#[derive(Clone, Copy, Debug)]
pub struct Kernels {
    pub(crate) path: CpuPath,
    pub(crate) fns: &'static PathFns,
}

impl Kernels {
    /// The kernels of `path`, or [`KernelError::PathUnsupported`] if this CPU cannot run it.
    pub fn new(path: CpuPath) -> Result<Kernels, KernelError> {
        let missing = path.missing_features();
        if !missing.is_empty() {
            return Err(KernelError::PathUnsupported {
                path,
                missing: missing.join(", "),
                available: CpuPath::available()
                    .iter()
                    .map(|p| p.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        Ok(Kernels {
            path,
            fns: cpu::fns(path),
        })
    }

    /// The process-wide path: `CONCORD_KERNELS` if set, otherwise the widest supported path.
    /// Decided on the first call and cached; an invalid or unsupported `CONCORD_KERNELS` is an
    /// error on every call.
    pub fn default_path() -> Result<Kernels, KernelError> {
        static SELECTED: OnceLock<Result<Kernels, KernelError>> = OnceLock::new();
        SELECTED
            .get_or_init(|| {
                let forced = std::env::var(PATH_ENV).unwrap_or_default();
                match forced.trim() {
                    "" | "auto" => Kernels::new(CpuPath::best()),
                    name => Kernels::new(CpuPath::parse_from(name, PATH_ENV)?),
                }
            })
            .clone()
    }

    /// Which path these kernels run.
    pub fn path(&self) -> CpuPath {
        self.path
    }
}
