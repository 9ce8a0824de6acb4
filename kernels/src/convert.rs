//! Bit-exact conversions between f32 and the 16-bit float types, as every path performs them.
//!
//! * Widening (`f16_to_f32`, `bf16_to_f32`) is exact for every non-NaN value, subnormals
//!   included.
//! * Narrowing (`f32_to_f16`, `f32_to_bf16`) rounds to nearest, ties to even, keeps subnormal
//!   results (no flush to zero), overflows to infinity, and maps every NaN to the canonical quiet
//!   NaN of the narrow type ([`F16_NAN`], [`BF16_NAN`]).
//!
//! The SIMD and CUDA paths use hardware conversions where those give these same bits (F16C
//! `vcvtps2ph` does; AVX512-BF16 `vcvtne2ps2bf16` flushes subnormals, so the AVX-512 path
//! only uses it on vectors without f32 subnormals).

/// The canonical f32 NaN every float operation returns instead of any other NaN.
pub const F32_NAN_BITS: u32 = 0x7FC0_0000;
/// The canonical f64 NaN every float operation returns instead of any other NaN.
pub const F64_NAN_BITS: u64 = 0x7FF8_0000_0000_0000;
/// The canonical f16 NaN (positive, quiet, zero payload).
pub const F16_NAN: u16 = 0x7E00;
/// The canonical bf16 NaN (positive, quiet, zero payload).
pub const BF16_NAN: u16 = 0x7FC0;

/// Widen an IEEE binary16 (given as its bits) to f32, exactly.
#[inline]
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exp = u32::from((h >> 10) & 0x1F);
    let man = u32::from(h & 0x03FF);
    if exp == 0x1F {
        // Infinity, or NaN (payload kept; results are canonicalised later anyway).
        return f32::from_bits(sign | 0x7F80_0000 | (man << 13));
    }
    if exp == 0 {
        // Zero or subnormal: man * 2^-24, exact in f32.
        let magnitude = man as f32 * f32::from_bits(0x3380_0000);
        return f32::from_bits(sign | magnitude.to_bits());
    }
    f32::from_bits(sign | ((exp + 112) << 23) | (man << 13))
}

/// Narrow an f32 to IEEE binary16 bits: round to nearest even, subnormals kept, NaN canonical.
#[inline]
pub fn f32_to_f16(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let abs = bits & 0x7FFF_FFFF;
    if abs > 0x7F80_0000 {
        return F16_NAN;
    }
    if abs >= 0x477F_F000 {
        // At or above 65520 (halfway between 65504 and 65536): rounds to infinity.
        return sign | 0x7C00;
    }
    if abs >= 0x3880_0000 {
        // Normal f16 result (>= 2^-14): rebias the exponent, round the 13 dropped bits.
        let rebiased = abs - (112 << 23);
        let lsb = (rebiased >> 13) & 1;
        return sign | ((rebiased + 0x0FFF + lsb) >> 13) as u16;
    }
    let exp = abs >> 23;
    if exp < 102 {
        // Below 2^-25: rounds to zero (exactly 2^-25 is a tie that also goes to even zero).
        return sign;
    }
    // Subnormal f16: the value in units of 2^-24 is mantissa >> (126 - exp), rounded to even.
    let man = (abs & 0x007F_FFFF) | 0x0080_0000;
    let shift = 126 - exp;
    let mut r = man >> shift;
    let rem = man & ((1 << shift) - 1);
    let half = 1 << (shift - 1);
    if rem > half || (rem == half && r & 1 == 1) {
        r += 1;
    }
    sign | r as u16
}

/// Widen a bfloat16 (given as its bits) to f32, exactly.
#[inline]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// Narrow an f32 to bfloat16 bits: round to nearest even, subnormals kept, NaN canonical.
#[inline]
pub fn f32_to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if bits & 0x7FFF_FFFF > 0x7F80_0000 {
        return BF16_NAN;
    }
    let lsb = (bits >> 16) & 1;
    ((bits + 0x7FFF + lsb) >> 16) as u16
}

/// Replace any NaN by the canonical f32 NaN.
#[inline]
pub fn canon_f32(x: f32) -> f32 {
    if x.is_nan() {
        f32::from_bits(F32_NAN_BITS)
    } else {
        x
    }
}

/// Replace any NaN by the canonical f64 NaN.
#[inline]
pub fn canon_f64(x: f64) -> f64 {
    if x.is_nan() {
        f64::from_bits(F64_NAN_BITS)
    } else {
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_widen_matches_half_for_every_value() {
        for h in 0..=u16::MAX {
            let ours = f16_to_f32(h);
            let theirs = half::f16::from_bits(h).to_f32();
            if theirs.is_nan() {
                assert!(ours.is_nan(), "{h:#06x}");
            } else {
                assert_eq!(ours.to_bits(), theirs.to_bits(), "{h:#06x}");
            }
        }
    }

    #[test]
    fn f16_narrow_matches_half_on_a_sample() {
        // Every 4099th f32 bit pattern plus every f16 value and its neighbours.
        let strided = (0..=u32::MAX).step_by(4099);
        let near = (0..=u16::MAX).flat_map(|h| {
            let b = f16_to_f32(h).to_bits();
            [
                b.wrapping_sub(1),
                b,
                b.wrapping_add(1),
                b.wrapping_add(0x1000),
            ]
        });
        for bits in strided.chain(near) {
            let x = f32::from_bits(bits);
            let ours = f32_to_f16(x);
            if x.is_nan() {
                assert_eq!(ours, F16_NAN);
            } else {
                assert_eq!(ours, half::f16::from_f32(x).to_bits(), "{bits:#010x}");
            }
        }
    }

    #[test]
    fn bf16_narrow_matches_half_on_a_sample() {
        for bits in (0..=u32::MAX).step_by(65_521).chain(0..70_000) {
            let x = f32::from_bits(bits);
            let ours = f32_to_bf16(x);
            if x.is_nan() {
                assert_eq!(ours, BF16_NAN);
            } else {
                assert_eq!(ours, half::bf16::from_f32(x).to_bits(), "{bits:#010x}");
            }
            assert_eq!(bf16_to_f32(ours).to_bits() >> 16, u32::from(ours));
        }
    }
}
