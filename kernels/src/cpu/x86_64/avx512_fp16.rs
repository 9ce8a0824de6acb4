//! The AVX-512 path on CPUs with AVX512-FP16: f16 sums and products computed natively, 32 lanes
//! per instruction (`vaddph`, `vmulph`), with no widening or narrowing.
//!
//! The bits are the scalar path's: for `+` and `*`, rounding the exact result to f16 once (what
//! `vaddph`/`vmulph` do) and rounding it to f32 first, then to f16 (what the other paths do) give
//! the same value whenever the wider format has at least `2p + 2` significand bits for a `p`-bit
//! narrow format (Figueroa, "When is double rounding innocuous?", 1995): 24 ≥ 2·11 + 2. f16
//! operands never underflow in f32, and the overflow threshold behaves like any other rounding
//! boundary. NaN results are replaced by the canonical f16 NaN, as everywhere. The `f16`
//! intrinsics are not stable Rust yet, so the three instructions are inline assembly.
//! bf16 goes to the AVX512-BF16 path where the CPU has it (every CPU with AVX512-FP16 sold as
//! such does; some Alder Lake parts with AVX-512 unlocked do not). Everything else (other
//! dtypes, max/min, Avg's division) is the plain AVX-512 path.

use std::arch::asm;
use std::arch::x86_64::*;
use std::num::NonZeroUsize;

use super::avx512::{self, store_line, PREFETCH_BYTES};
use super::avx512_bf16;
use super::common::{op_code, scalar_part, PROD, SUM};
use crate::convert::F16_NAN;
use crate::job::{Job, PathFns};
use crate::DType;

/// The function table: the AVX-512 one, with f16 sums and products in native FP16.
pub(crate) static FNS: PathFns = PathFns { combine, finish };

/// f16 elements per loop step (one 64-byte vector).
const BLOCK: usize = 32;

/// # Safety
/// The [`Job`] contract holds and the CPU supports AVX-512 F/BW/VL, AVX512-FP16 and F16C.
unsafe fn combine(job: &Job) {
    // SAFETY: every arm forwards our caller's guarantees (job contract, CPU features); the
    // AVX512-BF16 path's two further features are checked first.
    unsafe {
        if job.dtype == DType::BF16 && has_bf16() {
            return avx512_bf16::combine(job);
        }
        if job.dtype != DType::F16 || job.divisor.is_some() {
            return avx512::combine(job);
        }
        match op_code(job.op) {
            SUM => run::<SUM>(job),
            PROD => run::<PROD>(job),
            _ => avx512::combine(job),
        }
    }
}

/// True when the CPU also has what the AVX512-BF16 path needs beyond this path's features
/// (std caches the detection: two relaxed loads).
fn has_bf16() -> bool {
    std::arch::is_x86_feature_detected!("avx512bf16")
        && std::arch::is_x86_feature_detected!("avx512dq")
}

/// # Safety
/// As `avx512::finish`.
unsafe fn finish(dst: *mut u8, len: usize, dtype: DType, world: NonZeroUsize) {
    // SAFETY: forwarded from our caller.
    unsafe { avx512::finish(dst, len, dtype, world) }
}

/// # Safety
/// The [`Job`] contract holds for an f16 job without divisor; CPU features as above.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512fp16,f16c")]
unsafe fn run<const OP: u8>(job: &Job) {
    let (head, body) = job.split_at(job.head_to_align(64));
    // SAFETY: the head is a prefix of the job, so the contract holds for it.
    unsafe { scalar_part::<OP>(&head, 0) };
    let nan = _mm512_set1_epi16(F16_NAN as i16);
    let full = body.len - body.len % BLOCK;
    let stream = body.streams(64);
    let mut i = 0;
    while i < full {
        let off = i * 2;
        // SAFETY: i + BLOCK <= len: every access stays inside the operands (Job contract).
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(body.a.wrapping_add(off + PREFETCH_BYTES).cast());
            _mm_prefetch::<_MM_HINT_T0>(body.b.wrapping_add(off + PREFETCH_BYTES).cast());
            let a = _mm512_loadu_si512(body.a.add(off).cast());
            let b = _mm512_loadu_si512(body.b.add(off).cast());
            store_line(body.dst.add(off), apply::<OP>(a, b, nan), stream);
        }
        i += BLOCK;
    }
    // SAFETY: the tail `full..len` lies inside the operands; scalar code has the same bits.
    unsafe { scalar_part::<OP>(&body, full) }
}

/// `a op b` on 32 f16 lanes, NaN results replaced by `nan`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512fp16,f16c")]
fn apply<const OP: u8>(a: __m512i, b: __m512i, nan: __m512i) -> __m512i {
    /// The op, then `vcmpph` (unordered: a NaN lane) and a masked move of the canonical NaN.
    macro_rules! op_then_canonical_nan {
        ($op:literal) => {{
            let r: __m512i;
            // SAFETY: register-only instructions of AVX512-FP16 and AVX512-BW, which this
            // function's target features guarantee; `r` is an output distinct from every input.
            unsafe {
                asm!(
                    concat!($op, " {r}, {a}, {b}"),
                    "vcmpph {k}, {r}, {r}, 3",
                    "vmovdqu16 {r}{{{k}}}, {nan}",
                    r = out(zmm_reg) r,
                    a = in(zmm_reg) a,
                    b = in(zmm_reg) b,
                    nan = in(zmm_reg) nan,
                    k = out(kreg) _,
                    options(pure, nomem, nostack),
                )
            };
            r
        }};
    }
    if OP == SUM {
        op_then_canonical_nan!("vaddph")
    } else {
        op_then_canonical_nan!("vmulph")
    }
}
