//! Test helpers: a deterministic generator, element codecs and the f64-accumulating oracle.
#![allow(dead_code, unreachable_pub)]

// Skips are written straight to stderr, past the test harness's capture, so they show.
use std::io::Write as _;

use concord_kernels::{CpuPath, DType, Kernels, ReduceOp};
use half::{bf16, f16};

/// Every path this CPU runs; the others are reported on stderr (once per test binary) so a
/// skip is never silent.
pub fn paths() -> Vec<Kernels> {
    static SAID: std::sync::Once = std::sync::Once::new();
    let mut skipped = Vec::new();
    let runnable = CpuPath::ALL
        .into_iter()
        .filter_map(|p| match Kernels::new(p) {
            Ok(k) => Some(k),
            Err(e) => {
                skipped.push(format!("SKIPPED: path {p}: {e}"));
                None
            }
        })
        .collect();
    SAID.call_once(|| {
        for line in skipped {
            let _ = writeln!(std::io::stderr(), "{line}");
        }
    });
    runnable
}

/// xorshift64*: small, deterministic, good enough for test data.
#[derive(Clone, Debug)]
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> XorShift {
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A float drawn mostly from a moderate range, sometimes special (0, -0, inf, NaN with a
/// random payload, subnormal, largest finite), encoded into `dtype`'s bytes.
pub fn push_value(out: &mut Vec<u8>, dtype: DType, rng: &mut XorShift) {
    let r = rng.next();
    if !dtype.is_float() {
        out.extend_from_slice(&r.to_ne_bytes()[..dtype.size_bytes()]);
        return;
    }
    let special = rng.below(100) < 12;
    let x: f64 = if special {
        match rng.below(8) {
            0 => 0.0,
            1 => -0.0,
            2 => f64::INFINITY,
            3 => f64::NEG_INFINITY,
            4 => f64::NAN, // payloads are exercised by the raw-bytes property tests
            5 => min_subnormal(dtype) * (1 + rng.below(5)) as f64,
            6 => max_finite(dtype) * if r & 1 == 0 { 1.0 } else { -0.75 },
            _ => -min_subnormal(dtype) * 3.0,
        }
    } else {
        let mant = (r >> 11) as f64 / (1u64 << 53) as f64 + 0.5;
        let exp = rng.below(17) as i32 - 8;
        let sign = if r & 1 == 0 { 1.0 } else { -1.0 };
        sign * mant * 2f64.powi(exp)
    };
    encode(out, dtype, x);
}

/// Append `x` rounded to `dtype` (floats only).
pub fn encode(out: &mut Vec<u8>, dtype: DType, x: f64) {
    match dtype {
        DType::F32 => out.extend_from_slice(&(x as f32).to_ne_bytes()),
        DType::F64 => out.extend_from_slice(&x.to_ne_bytes()),
        DType::F16 => out.extend_from_slice(&f16::from_f64(x).to_ne_bytes()),
        DType::BF16 => out.extend_from_slice(&bf16::from_f64(x).to_ne_bytes()),
        _ => unreachable!("floats only"),
    }
}

pub fn gen(dtype: DType, len: usize, rng: &mut XorShift) -> Vec<u8> {
    let mut v = Vec::with_capacity(len * dtype.size_bytes());
    for _ in 0..len {
        push_value(&mut v, dtype, rng);
    }
    v
}

pub fn min_subnormal(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => f64::from(f32::from_bits(1)),
        DType::F64 => f64::from_bits(1),
        DType::F16 => 2f64.powi(-24),
        DType::BF16 => 2f64.powi(-133),
        _ => 0.0,
    }
}

pub fn max_finite(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => f64::from(f32::MAX),
        DType::F64 => f64::MAX,
        DType::F16 => 65504.0,
        DType::BF16 => bf16::MAX.to_f64(),
        _ => 0.0,
    }
}

/// The raw bits of element `i` (zero-extended).
pub fn bits(b: &[u8], dtype: DType, i: usize) -> u64 {
    let n = dtype.size_bytes();
    let mut raw = [0u8; 8];
    raw[..n].copy_from_slice(&b[i * n..(i + 1) * n]);
    u64::from_ne_bytes(raw)
}

/// Element `i` of a float buffer, exactly, as f64.
pub fn float_at(b: &[u8], dtype: DType, i: usize) -> f64 {
    let raw = bits(b, dtype, i);
    match dtype {
        DType::F32 => f64::from(f32::from_bits(raw as u32)),
        DType::F64 => f64::from_bits(raw),
        DType::F16 => f16::from_bits(raw as u16).to_f64(),
        DType::BF16 => bf16::from_bits(raw as u16).to_f64(),
        _ => unreachable!("floats only"),
    }
}

/// Element `i` of an integer buffer, sign- or zero-extended.
pub fn int_at(b: &[u8], dtype: DType, i: usize) -> i128 {
    let raw = bits(b, dtype, i);
    match dtype {
        DType::I8 => i128::from(raw as u8 as i8),
        DType::I16 => i128::from(raw as u16 as i16),
        DType::I32 => i128::from(raw as u32 as i32),
        DType::I64 => i128::from(raw as i64),
        _ => i128::from(raw),
    }
}

/// Wrap an integer to `dtype`'s width, as the raw bits the kernels store.
pub fn wrap_bits(v: i128, dtype: DType) -> u64 {
    let width = 8 * dtype.size_bytes() as u32;
    (v as u128 & (u128::MAX >> (128 - width))) as u64
}

/// The canonical NaN's bits for `dtype`.
pub fn canonical_nan(dtype: DType) -> u64 {
    match dtype {
        DType::F32 => 0x7FC0_0000,
        DType::F64 => 0x7FF8_0000_0000_0000,
        DType::F16 => 0x7E00,
        DType::BF16 => 0x7FC0,
        _ => unreachable!("floats only"),
    }
}

/// Relative tolerance of one rounding to `dtype` (half an ulp), as written in the tests'
/// tolerance table: f64 2^-53, f32 2^-24, f16 2^-11, bf16 2^-8.
pub fn unit_roundoff(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 2f64.powi(-53),
        DType::F32 => 2f64.powi(-24),
        DType::F16 => 2f64.powi(-11),
        DType::BF16 => 2f64.powi(-8),
        _ => 0.0,
    }
}

/// The elementwise reference for ops other than Max/Min: exact in f64 (sum and product of two
/// elements of at most 24 significant bits are exact; for f64 inputs it is one rounding).
pub fn reference(op: ReduceOp, a: f64, b: f64) -> f64 {
    match op {
        ReduceOp::Sum | ReduceOp::Avg => a + b,
        ReduceOp::Prod => a * b,
        ReduceOp::Max => a.max(b),
        ReduceOp::Min => a.min(b),
        _ => unreachable!("all ops are covered"),
    }
}

/// Is `got` (bits of `dtype`) within `roundings` roundings of the f64 reference `want`?
pub fn close(dtype: DType, got_bits: u64, want: f64, roundings: u32) -> bool {
    let got = {
        let mut v = Vec::new();
        v.extend_from_slice(&got_bits.to_ne_bytes()[..dtype.size_bytes()]);
        float_at(&v, dtype, 0)
    };
    if want.is_nan() {
        return got_bits == canonical_nan(dtype);
    }
    if got.is_infinite() || want.is_infinite() {
        // Overflow to infinity is allowed once the reference is at or beyond the largest finite.
        return got.signum() == want.signum()
            && (got == want || (got.is_infinite() && want.abs() >= max_finite(dtype)));
    }
    let tol = f64::from(roundings) * (unit_roundoff(dtype) * want.abs() + min_subnormal(dtype));
    (got - want).abs() <= tol
}
