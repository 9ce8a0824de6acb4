//! The AVX-512 path on CPUs that also have AVX512-BF16 and AVX512-DQ: bf16 reductions narrow
//! with `vcvtne2ps2bf16` (32 results in one instruction) instead of integer rounding.
//!
//! That instruction rounds to nearest even like `convert::f32_to_bf16`, and turns the canonical
//! NaN into the canonical bf16 NaN, but it flushes f32 *subnormal* inputs to zero, which the
//! bf16 format does not require. Each block therefore checks its results with `vfpclassps` and
//! takes the integer rounding for a block that has a subnormal (or a NaN, canonicalised first),
//! so the bits stay the scalar path's. Everything else (other dtypes, Avg's division) is the plain AVX-512 path.

use std::arch::x86_64::*;
use std::num::NonZeroUsize;

use super::avx512::{self, apply, load, round_bf16, store_line, Pair, BLOCK, PREFETCH_BYTES};
use super::common::{op_code, scalar_part, BF16, MAX, MIN, PROD, SUM};
use crate::job::{Job, PathFns};
use crate::DType;

/// The function table: the AVX-512 one, with bf16 reductions narrowed by AVX512-BF16.
pub(crate) static FNS: PathFns = PathFns { combine, finish };

/// # Safety
/// The [`Job`] contract holds and the CPU supports AVX-512 F/BW/VL/DQ/BF16 and F16C.
pub(super) unsafe fn combine(job: &Job) {
    // SAFETY: both arms forward our caller's guarantees (job contract, CPU features).
    unsafe {
        if job.dtype != DType::BF16 || job.divisor.is_some() {
            return avx512::combine(job);
        }
        match op_code(job.op) {
            SUM => run::<SUM>(job),
            PROD => run::<PROD>(job),
            MAX => run::<MAX>(job),
            _ => run::<MIN>(job),
        }
    }
}

/// # Safety
/// As `avx512::finish`.
unsafe fn finish(dst: *mut u8, len: usize, dtype: DType, world: NonZeroUsize) {
    // SAFETY: forwarded from our caller.
    unsafe { avx512::finish(dst, len, dtype, world) }
}

/// # Safety
/// The [`Job`] contract holds for a bf16 job without divisor; CPU features as above.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,f16c")]
unsafe fn run<const OP: u8>(job: &Job) {
    let (head, body) = job.split_at(job.head_to_align(64));
    // SAFETY: the head is a prefix of the job, so the contract holds for it.
    unsafe { scalar_part::<OP>(&head, 0) };
    let full = body.len - body.len % BLOCK;
    let stream = body.streams(64);
    let mut i = 0;
    while i < full {
        let off = i * 2;
        // SAFETY: i + BLOCK <= len: every access stays inside the operands (Job contract).
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(body.a.wrapping_add(off + PREFETCH_BYTES).cast());
            _mm_prefetch::<_MM_HINT_T0>(body.b.wrapping_add(off + PREFETCH_BYTES).cast());
            let a = load::<BF16>(body.a.add(off));
            let b = load::<BF16>(body.b.add(off));
            let r = (raw::<OP>(a.0, b.0), raw::<OP>(a.1, b.1));
            store_line(body.dst.add(off), narrow(r), stream);
        }
        i += BLOCK;
    }
    // SAFETY: the tail `full..len` lies inside the operands; scalar code has the same bits.
    unsafe { scalar_part::<OP>(&body, full) }
}

/// `a op b` for the narrowing below: Sum and Prod leave NaN payloads as the hardware makes them
/// (`narrow` canonicalises the rare block that has a NaN); Max and Min are already canonical.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,f16c")]
fn raw<const OP: u8>(a: __m512, b: __m512) -> __m512 {
    match OP {
        SUM => _mm512_add_ps(a, b),
        PROD => _mm512_mul_ps(a, b),
        _ => apply::<OP>(a, b),
    }
}

/// Even/odd f32 results to 32 bf16 in element order.
///
/// The common block has neither NaN nor subnormal results: `vcvtne2ps2bf16` and one `vpermw`.
/// One `vfpclassps` per vector finds the others (NaN or subnormal, in one test), which take the
/// canonical NaN and, where a result is subnormal, the integer rounding. Skipping the NaN
/// fix-up on the common block saves two of the loop's eleven vector instructions.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,f16c")]
fn narrow(r: Pair) -> __m512i {
    const QNAN: i32 = 0x01;
    const DENORMAL: i32 = 0x20;
    const SNAN: i32 = 0x80;
    let rare = _mm512_fpclass_ps_mask::<{ QNAN | DENORMAL | SNAN }>(r.0)
        | _mm512_fpclass_ps_mask::<{ QNAN | DENORMAL | SNAN }>(r.1);
    if rare != 0 {
        return narrow_rare((avx512::canon(r.0), avx512::canon(r.1)));
    }
    // Words 0..16 hold the even elements, 16..32 the odd ones: interleave them.
    let halves = _mm512_cvtne2ps_pbh(r.1, r.0);
    // SAFETY: both are 64-byte vectors of plain bits; every bit pattern is valid for either.
    let halves = unsafe { std::mem::transmute::<__m512bh, __m512i>(halves) };
    _mm512_permutexvar_epi16(interleave_index(), halves)
}

/// `narrow` for a block with a NaN or a subnormal result (`r` is NaN-canonical): the integer
/// rounding of the plain AVX-512 path, which keeps subnormals.
#[cold]
#[inline(never)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,f16c")]
fn narrow_rare(r: Pair) -> __m512i {
    let packed = _mm512_srli_epi32::<16>(round_bf16(r.0));
    let high = _mm512_set1_epi32(0xFFFF_0000_u32 as i32);
    _mm512_ternarylogic_epi32::<0xEA>(round_bf16(r.1), high, packed)
}

/// `vpermw` indices taking word `j/2` for even `j` and word `16 + j/2` for odd `j`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,f16c")]
fn interleave_index() -> __m512i {
    const INDEX: [u16; 32] = {
        let mut idx = [0u16; 32];
        let mut j = 0;
        while j < 32 {
            idx[j] = if j % 2 == 0 {
                (j / 2) as u16
            } else {
                16 + (j / 2) as u16
            };
            j += 1;
        }
        idx
    };
    // SAFETY: INDEX is 64 readable bytes; the load is unaligned.
    unsafe { _mm512_loadu_si512(INDEX.as_ptr().cast()) }
}
