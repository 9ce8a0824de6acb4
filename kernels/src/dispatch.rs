//! Path selection: which CPU implementation runs, detected once and cached.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use crate::cpu;
use crate::job::PathFns;
use crate::KernelError;

/// Environment variable that forces a CPU path (`scalar`, `avx2`, `avx512`; empty or `auto`
/// means detect).
pub const PATH_ENV: &str = "CONCORD_KERNELS";

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
            fns: fns(path),
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

/// The function table of `path`. The caller has checked that the CPU supports it.
fn fns(path: CpuPath) -> &'static PathFns {
    match path {
        CpuPath::Scalar => cpu::SCALAR,
        #[cfg(target_arch = "x86_64")]
        CpuPath::Avx2 => cpu::AVX2,
        #[cfg(target_arch = "x86_64")]
        CpuPath::Avx512 => cpu::AVX512,
        #[cfg(target_arch = "x86_64")]
        CpuPath::Avx512Bf16 => cpu::AVX512_BF16,
        #[cfg(target_arch = "x86_64")]
        CpuPath::Avx512Fp16 => cpu::AVX512_FP16,
        #[cfg(not(target_arch = "x86_64"))]
        CpuPath::Avx2 | CpuPath::Avx512 | CpuPath::Avx512Bf16 | CpuPath::Avx512Fp16 => cpu::SCALAR,
    }
}
