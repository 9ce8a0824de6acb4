//! The AVX2 path (with F16C): two vectors of 8 f32 lanes per step.
//!
//! f32, f16 and bf16 are written by hand; f16 and bf16 are widened to f32, computed there and
//! narrowed once with round-to-nearest-even, exactly as `cpu::scalar` does. Every other dtype
//! runs the scalar code compiled with AVX2 enabled (the compiler vectorises it), so its bits
//! are the scalar path's by construction. Tails shorter than a vector go to the scalar code.

use std::arch::x86_64::*;
use std::num::NonZeroUsize;

use super::common::{
    entry_points, op_code, scalar_part, BF16, F16, F32, KEEP, MAX, MIN, PROD, SUM,
};
use crate::cpu::scalar::{self, by_dtype, Elem};
use crate::job::{Job, PathFns};
use crate::DType;

/// The AVX2 path's function table.
pub(crate) static FNS: PathFns = PathFns { combine, finish };

/// Elements per loop step: two vectors of 8 f32 lanes.
const BLOCK: usize = 16;

entry_points!("avx2,f16c");

/// Two vectors of f32 lanes holding one block of 16 elements. For f32 and f16 the first holds
/// elements 0..8; for bf16 it holds the even elements and the second the odd ones (widening and
/// narrowing are then shifts and masks, no shuffles). Elementwise ops do not care.
type Pair = (__m256, __m256);

/// How far ahead of the loads the loop prefetches.
const PREFETCH_BYTES: usize = 2048;

/// The main loop: `dst = a op b` (`dst = a` for KEEP), then `/ world` when DIV.
///
/// # Safety
/// The [`Job`] contract holds, `KIND` matches `job.dtype`, DIV implies `job.divisor` is set;
/// CPU features as above.
#[target_feature(enable = "avx2,f16c")]
unsafe fn run<const KIND: u8, const OP: u8, const DIV: bool>(job: &Job) {
    // Align `dst` to 32 bytes first: unaligned 32-byte accesses may straddle two lines.
    let (head, body) = job.split_at(job.head_to_align(32));
    // SAFETY: the head is a prefix of the job, so the contract holds for it.
    unsafe { scalar_part::<OP>(&head, 0) };
    // SAFETY: the body is the rest of the job; forwarded from our caller.
    unsafe { run_aligned::<KIND, OP, DIV>(&body) }
}

/// The vector loop over whole blocks, then the tail.
///
/// # Safety
/// As [`run`].
#[target_feature(enable = "avx2,f16c")]
unsafe fn run_aligned<const KIND: u8, const OP: u8, const DIV: bool>(job: &Job) {
    let size = job.dtype.size_bytes();
    let world = job.divisor.map_or(1, NonZeroUsize::get);
    let world_v = _mm256_set1_ps(world as f32);
    let full = job.len - job.len % BLOCK;
    let stream = job.streams(32);
    let mut i = 0;
    while i < full {
        let off = i * size;
        // SAFETY: i + BLOCK <= len, so every access stays inside the operands (Job contract).
        unsafe {
            // Software prefetch a fixed distance ahead (see the AVX-512 path); one line per
            // 64 bytes of each operand. Prefetching past the end is harmless.
            if KIND == F32 || i % (2 * BLOCK) == 0 {
                let ahead = off + PREFETCH_BYTES;
                _mm_prefetch::<_MM_HINT_T0>(job.a.wrapping_add(ahead).cast());
                _mm_prefetch::<_MM_HINT_T0>(job.b.wrapping_add(ahead).cast());
            }
            let a = load::<KIND>(job.a.add(off));
            let mut r = if OP == KEEP {
                a
            } else {
                let b = load::<KIND>(job.b.add(off));
                (apply::<OP>(a.0, b.0), apply::<OP>(a.1, b.1))
            };
            if DIV {
                if OP != KEEP {
                    r = round::<KIND>(r);
                }
                r.0 = canon(_mm256_div_ps(r.0, world_v));
                r.1 = canon(_mm256_div_ps(r.1, world_v));
            }
            store::<KIND>(job.dst.add(off), r, stream);
        }
        i += BLOCK;
    }
    // SAFETY: the tail `full..len` lies inside the operands; scalar code has the same bits.
    unsafe { scalar_part::<OP>(job, full) }
}

/// Load 16 elements of `KIND` from `p` (any alignment) as f32.
///
/// # Safety
/// `p` is readable for 16 elements; CPU features as above.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn load<const KIND: u8>(p: *const u8) -> Pair {
    // SAFETY: forwarded from our caller; the loads are unaligned.
    unsafe {
        match KIND {
            F32 => (_mm256_loadu_ps(p.cast()), _mm256_loadu_ps(p.add(32).cast())),
            F16 => (
                _mm256_cvtph_ps(_mm_loadu_si128(p.cast())),
                _mm256_cvtph_ps(_mm_loadu_si128(p.add(16).cast())),
            ),
            _ => widen_bf16(_mm256_loadu_si256(p.cast())),
        }
    }
}

/// Store 16 f32 to `p` as `KIND`, rounding to nearest even (the values are NaN-canonical);
/// non-temporal stores when `stream`.
///
/// # Safety
/// `p` is writable for 16 elements, and 32-byte aligned when `stream`; CPU features as above.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn store<const KIND: u8>(p: *mut u8, v: Pair, stream: bool) {
    // SAFETY: forwarded from our caller; the ordinary stores are unaligned, the non-temporal
    // ones aligned (the caller's promise when `stream`).
    unsafe {
        match KIND {
            F32 if stream => {
                _mm256_stream_ps(p.cast(), v.0);
                _mm256_stream_ps(p.add(32).cast(), v.1);
            }
            F32 => {
                _mm256_storeu_ps(p.cast(), v.0);
                _mm256_storeu_ps(p.add(32).cast(), v.1);
            }
            F16 if stream => {
                _mm_stream_si128(p.cast(), to_f16(v.0));
                _mm_stream_si128(p.add(16).cast(), to_f16(v.1));
            }
            F16 => {
                _mm_storeu_si128(p.cast(), to_f16(v.0));
                _mm_storeu_si128(p.add(16).cast(), to_f16(v.1));
            }
            _ => {
                // Even results go to the low halves of the 32-bit lanes, odd to the high.
                let (even, odd) = (round_bf16(v.0), round_bf16(v.1));
                let packed = _mm256_blend_epi16::<0b1010_1010>(_mm256_srli_epi32::<16>(even), odd);
                if stream {
                    _mm256_stream_si256(p.cast(), packed);
                } else {
                    _mm256_storeu_si256(p.cast(), packed);
                }
            }
        }
    }
}

/// What a store followed by a load gives.
#[inline]
#[target_feature(enable = "avx2,f16c")]
fn round<const KIND: u8>(v: Pair) -> Pair {
    match KIND {
        F32 => v,
        F16 => (_mm256_cvtph_ps(to_f16(v.0)), _mm256_cvtph_ps(to_f16(v.1))),
        _ => {
            let mask = _mm256_set1_epi32(0xFFFF_0000_u32 as i32);
            (
                _mm256_castsi256_ps(_mm256_and_si256(round_bf16(v.0), mask)),
                _mm256_castsi256_ps(_mm256_and_si256(round_bf16(v.1), mask)),
            )
        }
    }
}

#[inline]
#[target_feature(enable = "avx2,f16c")]
fn to_f16(v: __m256) -> __m128i {
    _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v)
}

/// 16 bf16 (one 256-bit load) as f32: even elements, odd elements.
#[inline]
#[target_feature(enable = "avx2,f16c")]
fn widen_bf16(raw: __m256i) -> Pair {
    let even = _mm256_slli_epi32::<16>(raw);
    let odd = _mm256_and_si256(raw, _mm256_set1_epi32(0xFFFF_0000_u32 as i32));
    (_mm256_castsi256_ps(even), _mm256_castsi256_ps(odd))
}

/// Round each lane to bf16 precision, nearest even, with integer arithmetic; the bf16 result
/// is in the high 16 bits. Subnormals are kept; the canonical NaN stays canonical.
#[inline]
#[target_feature(enable = "avx2,f16c")]
fn round_bf16(v: __m256) -> __m256i {
    let bits = _mm256_castps_si256(v);
    let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(1));
    _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), lsb)
}

/// The canonical NaN in every lane.
#[inline]
#[target_feature(enable = "avx2,f16c")]
fn nan_v() -> __m256 {
    _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC0_0000))
}

/// Replace NaN lanes by the canonical NaN.
#[inline]
#[target_feature(enable = "avx2,f16c")]
fn canon(v: __m256) -> __m256 {
    _mm256_blendv_ps(v, nan_v(), _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v))
}

/// `a op b` with the crate's NaN and signed-zero rules.
#[inline]
#[target_feature(enable = "avx2,f16c")]
fn apply<const OP: u8>(a: __m256, b: __m256) -> __m256 {
    match OP {
        SUM => canon(_mm256_add_ps(a, b)),
        PROD => canon(_mm256_mul_ps(a, b)),
        _ => {
            // Equal operands differ at most in the sign of zero: AND keeps +0, OR keeps -0.
            let (m, tie) = if OP == MAX {
                (_mm256_max_ps(a, b), _mm256_and_ps(a, b))
            } else {
                (_mm256_min_ps(a, b), _mm256_or_ps(a, b))
            };
            let m = _mm256_blendv_ps(m, tie, _mm256_cmp_ps::<_CMP_EQ_OQ>(a, b));
            _mm256_blendv_ps(m, nan_v(), _mm256_cmp_ps::<_CMP_UNORD_Q>(a, b))
        }
    }
}
