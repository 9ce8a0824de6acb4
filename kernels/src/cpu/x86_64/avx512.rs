//! The AVX-512 path (F, BW, VL, plus F16C): two vectors of 16 f32 lanes per step.
//!
//! f32, f16 and bf16 are written by hand; f16 and bf16 are widened to f32, computed there and
//! narrowed once with round-to-nearest-even, exactly as `cpu::scalar` does. Every other dtype
//! runs the scalar code compiled with AVX-512 enabled (the compiler vectorises it), so its bits
//! are the scalar path's by construction. Tails shorter than a vector go to the scalar code.

use std::arch::x86_64::*;
use std::num::NonZeroUsize;

use super::common::{
    entry_points, op_code, scalar_part, BF16, F16, F32, KEEP, MAX, MIN, PROD, SUM,
};
use crate::cpu::scalar::{self, by_dtype, Elem};
use crate::job::{Job, PathFns};
use crate::DType;

/// The AVX-512 path's function table (bf16 narrowed with integer arithmetic).
pub(crate) static FNS: PathFns = PathFns { combine, finish };

/// Elements per loop step: two vectors of 16 f32 lanes.
pub(super) const BLOCK: usize = 32;

entry_points!("avx512f,avx512bw,avx512vl,f16c");

/// Two vectors of f32 lanes holding one block of 32 elements. For f32 and f16 the first holds
/// elements 0..16; for bf16 it holds the even elements and the second the odd ones (widening and
/// narrowing are then shifts and masks, no shuffles). Elementwise ops do not care.
pub(super) type Pair = (__m512, __m512);

/// How far ahead of the loads the loop prefetches.
pub(super) const PREFETCH_BYTES: usize = 2048;

/// The main loop: `dst = a op b` (`dst = a` for KEEP), then `/ world` when DIV.
///
/// # Safety
/// The [`Job`] contract holds, `KIND` matches `job.dtype`, DIV implies `job.divisor` is set;
/// CPU features as above.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn run<const KIND: u8, const OP: u8, const DIV: bool>(job: &Job) {
    // Align `dst` to a cache line first: unaligned 64-byte accesses straddle two lines.
    let (head, body) = job.split_at(job.head_to_align(64));
    // SAFETY: the head is a prefix of the job, so the contract holds for it.
    unsafe { scalar_part::<OP>(&head, 0) };
    // SAFETY: the body is the rest of the job; forwarded from our caller.
    unsafe { run_aligned::<KIND, OP, DIV>(&body) }
}

/// The vector loop over whole blocks, then the tail.
///
/// # Safety
/// As [`run`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn run_aligned<const KIND: u8, const OP: u8, const DIV: bool>(job: &Job) {
    let size = job.dtype.size_bytes();
    let world = job.divisor.map_or(1, NonZeroUsize::get);
    let world_v = _mm512_set1_ps(world as f32);
    let full = job.len - job.len % BLOCK;
    let stream = job.streams(64);
    let mut i = 0;
    while i < full {
        let off = i * size;
        // SAFETY: i + BLOCK <= len, so every access stays inside the operands (Job contract).
        unsafe {
            // Software prefetch a fixed distance ahead: it keeps more misses in flight than
            // the hardware prefetcher alone when the buffers come from DRAM. Prefetching past
            // the end is harmless (no fault, and the address is never dereferenced).
            let ahead = off + PREFETCH_BYTES;
            _mm_prefetch::<_MM_HINT_T0>(job.a.wrapping_add(ahead).cast());
            _mm_prefetch::<_MM_HINT_T0>(job.b.wrapping_add(ahead).cast());
            if KIND == F32 {
                // A block of f32 spans two cache lines.
                _mm_prefetch::<_MM_HINT_T0>(job.a.wrapping_add(ahead + 64).cast());
                _mm_prefetch::<_MM_HINT_T0>(job.b.wrapping_add(ahead + 64).cast());
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
                r.0 = canon(_mm512_div_ps(r.0, world_v));
                r.1 = canon(_mm512_div_ps(r.1, world_v));
            }
            store::<KIND>(job.dst.add(off), r, stream);
        }
        i += BLOCK;
    }
    // SAFETY: the tail `full..len` lies inside the operands; scalar code has the same bits.
    unsafe { scalar_part::<OP>(job, full) }
}

/// Load 32 elements of `KIND` from `p` (any alignment) as f32.
///
/// # Safety
/// `p` is readable for 32 elements; CPU features as above.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
pub(super) unsafe fn load<const KIND: u8>(p: *const u8) -> Pair {
    // SAFETY: forwarded from our caller; the loads are unaligned.
    unsafe {
        match KIND {
            F32 => (_mm512_loadu_ps(p.cast()), _mm512_loadu_ps(p.add(64).cast())),
            F16 => (
                _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())),
                _mm512_cvtph_ps(_mm256_loadu_si256(p.add(32).cast())),
            ),
            _ => widen_bf16(_mm512_loadu_si512(p.cast())),
        }
    }
}

/// Store 32 f32 to `p` as `KIND`, rounding to nearest even (the values are NaN-canonical);
/// non-temporal stores when `stream`.
///
/// # Safety
/// `p` is writable for 32 elements, and 64-byte aligned when `stream`; CPU features as above.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
pub(super) unsafe fn store<const KIND: u8>(p: *mut u8, v: Pair, stream: bool) {
    // SAFETY: forwarded from our caller; the ordinary stores are unaligned, the non-temporal
    // ones aligned (the caller's promise when `stream`).
    unsafe {
        match KIND {
            F32 => {
                store_line(p, _mm512_castps_si512(v.0), stream);
                store_line(p.add(64), _mm512_castps_si512(v.1), stream);
            }
            F16 => {
                let (lo, hi) = (to_f16(v.0), to_f16(v.1));
                if stream {
                    _mm512_stream_si512(
                        p.cast(),
                        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi),
                    );
                } else {
                    _mm256_storeu_si256(p.cast(), lo);
                    _mm256_storeu_si256(p.add(32).cast(), hi);
                }
            }
            _ => {
                // Even results go to the low halves of the 32-bit lanes, odd to the high.
                let (even, odd) = (round_bf16(v.0), round_bf16(v.1));
                let packed = _mm512_ternarylogic_epi32::<0xEA>(
                    odd,
                    _mm512_set1_epi32(0xFFFF_0000_u32 as i32),
                    _mm512_srli_epi32::<16>(even),
                );
                store_line(p, packed, stream);
            }
        }
    }
}

/// Store one 64-byte line at `p`: non-temporal when `stream`.
///
/// # Safety
/// `p` is writable for 64 bytes, and 64-byte aligned when `stream`; CPU features as above.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
pub(super) unsafe fn store_line(p: *mut u8, v: __m512i, stream: bool) {
    // SAFETY: forwarded from our caller.
    unsafe {
        if stream {
            _mm512_stream_si512(p.cast(), v);
        } else {
            _mm512_storeu_si512(p.cast(), v);
        }
    }
}

/// What a store followed by a load gives.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
fn round<const KIND: u8>(v: Pair) -> Pair {
    match KIND {
        F32 => v,
        F16 => (_mm512_cvtph_ps(to_f16(v.0)), _mm512_cvtph_ps(to_f16(v.1))),
        _ => {
            let mask = _mm512_set1_epi32(0xFFFF_0000_u32 as i32);
            (
                _mm512_castsi512_ps(_mm512_and_si512(round_bf16(v.0), mask)),
                _mm512_castsi512_ps(_mm512_and_si512(round_bf16(v.1), mask)),
            )
        }
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
fn to_f16(v: __m512) -> __m256i {
    _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v)
}

/// 32 bf16 (one 512-bit load) as f32: even elements, odd elements.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
pub(super) fn widen_bf16(raw: __m512i) -> Pair {
    let even = _mm512_slli_epi32::<16>(raw);
    let odd = _mm512_and_si512(raw, _mm512_set1_epi32(0xFFFF_0000_u32 as i32));
    (_mm512_castsi512_ps(even), _mm512_castsi512_ps(odd))
}

/// Round each lane to bf16 precision, nearest even, with integer arithmetic; the bf16 result
/// is in the high 16 bits (low bits are garbage). Subnormals are kept; the canonical NaN stays
/// canonical because its low 16 bits are zero (so no carry can reach the sign).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
pub(super) fn round_bf16(v: __m512) -> __m512i {
    let bits = _mm512_castps_si512(v);
    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
    _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), lsb)
}

/// Replace NaN lanes by the canonical NaN: `vfixupimmps` classifies each lane of `v`; the
/// table answers "take the destination" (the canonical NaN) for QNaN and SNaN and "take the
/// source" for every other class. One instruction, no mask register.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
pub(super) fn canon(v: __m512) -> __m512 {
    let nan = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FC0_0000));
    _mm512_fixupimm_ps::<0>(nan, v, _mm512_set1_epi32(0x1111_1100))
}

/// `a op b` with the crate's NaN and signed-zero rules.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
pub(super) fn apply<const OP: u8>(a: __m512, b: __m512) -> __m512 {
    match OP {
        SUM => canon(_mm512_add_ps(a, b)),
        PROD => canon(_mm512_mul_ps(a, b)),
        _ => {
            let (ai, bi) = (_mm512_castps_si512(a), _mm512_castps_si512(b));
            // Equal operands differ at most in the sign of zero: AND keeps +0, OR keeps -0.
            let (m, tie) = if OP == MAX {
                (_mm512_max_ps(a, b), _mm512_and_si512(ai, bi))
            } else {
                (_mm512_min_ps(a, b), _mm512_or_si512(ai, bi))
            };
            let eq = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(a, b);
            let m = _mm512_mask_mov_ps(m, eq, _mm512_castsi512_ps(tie));
            let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(a, b);
            _mm512_mask_mov_ps(m, nan, _mm512_castsi512_ps(_mm512_set1_epi32(0x7FC0_0000)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::{f32_to_bf16, f32_to_f16};

    /// Every f32 bit pattern through the vector narrowing (NaN canonicalised first, as the
    /// loop does) against the scalar conversion. Slow in debug builds: run with
    /// `cargo test --release -p concord-kernels --lib -- --ignored exhaustive`.
    #[test]
    #[ignore = "2^32 inputs; run on purpose in release mode"]
    fn exhaustive_narrowing_matches_scalar() {
        if !crate::CpuPath::Avx512.is_supported() {
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: exhaustive AVX-512 narrowing: CPU lacks AVX-512"
            );
            return;
        }
        // SAFETY: the CPU supports AVX-512 F/BW/VL and F16C (checked above).
        let mismatches = unsafe { narrow_all() };
        assert_eq!(mismatches, 0);
    }

    /// # Safety
    /// The CPU supports AVX-512 F/BW/VL and F16C.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    unsafe fn narrow_all() -> u64 {
        let mut mismatches = 0u64;
        let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let mut base = 0u64;
        while base <= u64::from(u32::MAX) {
            let v = canon(_mm512_castsi512_ps(_mm512_add_epi32(
                _mm512_set1_epi32(base as u32 as i32),
                lanes,
            )));
            let mut h = [0u16; 16];
            let mut b = [0u32; 16];
            // SAFETY: both arrays hold 16 lanes; the stores are unaligned.
            unsafe {
                _mm256_storeu_si256(h.as_mut_ptr().cast(), to_f16(v));
                _mm512_storeu_si512(b.as_mut_ptr().cast(), round_bf16(v));
            }
            for lane in 0..16 {
                let x = f32::from_bits((base as u32).wrapping_add(lane));
                let x = if x.is_nan() { f32::NAN } else { x };
                let bf = (b[lane as usize] >> 16) as u16;
                if h[lane as usize] != f32_to_f16(x) || bf != f32_to_bf16(x) {
                    mismatches += 1;
                }
            }
            base += 16;
        }
        mismatches
    }
}
