//! Wire quantisation codecs: one chunk of f32, f16 or bf16 values in, one or two bytes per
//! element out, and back.
//!
//! A chunk is encoded as a 12-byte header (`codec u8 | 0 u8 x3 | p0 f32 | p1 f32`, little
//! endian) and one code per element:
//!
//! | codec | code | parameters | value of code `q` | error of one round trip |
//! |---|---|---|---|---|
//! | `minmax-u8` / `minmax-u16` | `u8` / `u16` | min, max | `min + q * (max - min) / L`, `L` = 255 / 65535 | at most `(max - min) / (2 L)`, plus f32 rounding |
//! | `zeropoint-u8` | `u8` | scale, zero point | `(q - zp) * scale`, `scale` = the range widened to hold 0, / 255 | at most one step (the zero point is rounded); zero is exact |
//! | `fp8-e4m3` / `fp8-e5m2` | OCP FP8 | scale `s = amax / FP8_MAX` | `fp8(q) * s` | relative `2^-4` / `2^-3` of the value, or `s * 2^-9` / `s * 2^-16` absolute near zero |
//!
//! All-negative, all-positive, constant (exact: every code 0), tiny and huge ranges need
//! nothing special. **Non-finite values:** a chunk holding a NaN or an infinity is sent
//! **raw** (header codec [`RAW`], then the elements' own bits): nothing is silently turned into
//! a finite value, and such chunks cost their full size. A range whose width overflows f32
//! (say `-3e38..3e38`) is sent raw too, and so is one whose step or fp8 scale would be an f32
//! subnormal (fp8: largest magnitude below about 5e-36), which would lose its own precision.
//!
//! **Parity.** Encoding is a pure function of the input bits (no path-dependent rounding), so
//! every peer that holds the same bytes decodes the same values. Decoded f16/bf16 values are
//! rounded to the type once, to nearest even.
//!
//! **Error of a quantised all-reduce** (documented bound; `world` peers, the ring quantising
//! each hop's running sum and the owner's final chunk once more for the all-gather): with `R_k`
//! the range of the running sum after `k` inputs (at most `k` times the inputs' largest range),
//! the error of an element is at most `sum_{k=1}^{world} R_k / (2 L)` for the min-max codecs,
//! that is at most `world (world + 1) / 2 * R / (2 L)`; for fp8, `world` relative steps of the
//! format of the running sums' magnitudes.

use crate::convert::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};
use crate::{DType, KernelError};

/// Bytes of a chunk's header.
pub const HEADER_BYTES: usize = 12;
/// Header codec byte of a chunk sent unquantised (it held a NaN or an infinity).
pub const RAW: u8 = 0xFF;

/// A quantisation codec.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Codec {
    /// Min-max to 8 bits.
    MinMaxU8,
    /// Min-max to 16 bits.
    MinMaxU16,
    /// Scale and zero point to 8 bits (zero is exact).
    ZeroPointU8,
    /// OCP FP8 E4M3 (max 448, no infinities), scaled per chunk.
    Fp8E4M3,
    /// OCP FP8 E5M2 (max 57344), scaled per chunk.
    Fp8E5M2,
}

impl Codec {
    /// Every codec.
    pub const ALL: [Codec; 5] = [
        Codec::MinMaxU8,
        Codec::MinMaxU16,
        Codec::ZeroPointU8,
        Codec::Fp8E4M3,
        Codec::Fp8E5M2,
    ];

    /// The name `concord bench --quant` takes.
    pub fn name(self) -> &'static str {
        match self {
            Codec::MinMaxU8 => "minmax-u8",
            Codec::MinMaxU16 => "minmax-u16",
            Codec::ZeroPointU8 => "zeropoint-u8",
            Codec::Fp8E4M3 => "fp8-e4m3",
            Codec::Fp8E5M2 => "fp8-e5m2",
        }
    }

    fn wire(self) -> u8 {
        match self {
            Codec::MinMaxU8 => 1,
            Codec::MinMaxU16 => 2,
            Codec::ZeroPointU8 => 3,
            Codec::Fp8E4M3 => 4,
            Codec::Fp8E5M2 => 5,
        }
    }

    fn from_wire(b: u8) -> Option<Codec> {
        Codec::ALL.into_iter().find(|c| c.wire() == b)
    }

    /// Bytes of one code.
    pub fn code_bytes(self) -> usize {
        match self {
            Codec::MinMaxU16 => 2,
            _ => 1,
        }
    }

    /// Bytes of an encoded chunk of `count` finite elements.
    pub fn encoded_len(self, count: usize) -> usize {
        HEADER_BYTES + count * self.code_bytes()
    }

    /// The most bytes an encoded chunk of `count` elements of `dtype` may take (sent raw).
    pub fn max_encoded_len(self, dtype: DType, count: usize) -> usize {
        HEADER_BYTES + count * dtype.size_bytes().max(self.code_bytes())
    }

    /// Whether `dtype` can be quantised (f32, f16, bf16).
    pub fn supports(dtype: DType) -> bool {
        matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
    }
}

impl std::fmt::Display for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Codec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim().to_ascii_lowercase();
        Codec::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown quantisation {s:?}: use none, {}",
                    Codec::ALL.map(Codec::name).join(", ")
                )
            })
    }
}

fn unsupported(dtype: DType) -> KernelError {
    KernelError::Quantisation(format!(
        "quantisation of {dtype}: only float, half and bfloat16 can be quantised"
    ))
}

/// The elements of `src` as f32 (exact for every type it accepts).
fn widen(dtype: DType, src: &[u8]) -> Result<Vec<f32>, KernelError> {
    let size = dtype.size_bytes();
    if !src.len().is_multiple_of(size) {
        return Err(KernelError::Quantisation(format!(
            "{} bytes are not whole {dtype} elements",
            src.len()
        )));
    }
    let at = |c: &[u8]| u16::from_le_bytes([c[0], c[1]]);
    Ok(match dtype {
        DType::F32 => src
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::F16 => src.chunks_exact(2).map(|c| f16_to_f32(at(c))).collect(),
        DType::BF16 => src.chunks_exact(2).map(|c| bf16_to_f32(at(c))).collect(),
        other => return Err(unsupported(other)),
    })
}

fn narrow(dtype: DType, v: f32, out: &mut [u8]) {
    match dtype {
        DType::F32 => out.copy_from_slice(&v.to_le_bytes()),
        DType::F16 => out.copy_from_slice(&f32_to_f16(v).to_le_bytes()),
        _ => out.copy_from_slice(&f32_to_bf16(v).to_le_bytes()),
    }
}

/// Largest finite value of each fp8 format.
const E4M3_MAX: f32 = 448.0;
const E5M2_MAX: f32 = 57344.0;

/// The two parameters of a chunk, or `None` when it must go raw.
fn parameters(codec: Codec, v: &[f32]) -> Option<(f32, f32)> {
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for &x in v {
        if !x.is_finite() {
            return None;
        }
        lo = lo.min(x);
        hi = hi.max(x);
    }
    if v.is_empty() {
        return Some((0.0, 0.0));
    }
    if !(hi - lo).is_finite() {
        return None;
    }
    Some(match codec {
        Codec::MinMaxU8 | Codec::MinMaxU16 => (lo, hi),
        Codec::ZeroPointU8 => {
            // The range is widened to hold zero, which the zero point then represents exactly.
            let (lo, hi) = (lo.min(0.0), hi.max(0.0));
            let scale = (hi - lo) / 255.0;
            if scale != 0.0 && scale < f32::MIN_POSITIVE {
                return None; // A subnormal step loses its own precision: send raw.
            }
            let zp = if scale > 0.0 {
                (f64::from(-lo) / f64::from(scale))
                    .round()
                    .clamp(0.0, 255.0) as f32
            } else {
                0.0
            };
            (scale, zp)
        }
        Codec::Fp8E4M3 | Codec::Fp8E5M2 => {
            let max = if codec == Codec::Fp8E4M3 {
                E4M3_MAX
            } else {
                E5M2_MAX
            };
            let amax = lo.abs().max(hi.abs());
            let s = if amax > 0.0 { amax / max } else { 1.0 };
            // A subnormal scale loses its own precision: such a chunk (largest magnitude below
            // about 5e-36) goes raw.
            if s < f32::MIN_POSITIVE || !s.is_finite() {
                return None;
            }
            (s, 0.0)
        }
    })
}

/// Encodes the elements of `src` (of `dtype`) with `codec`, appending to `out`.
pub fn encode(
    codec: Codec,
    dtype: DType,
    src: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), KernelError> {
    let v = widen(dtype, src)?;
    let start = out.len();
    out.resize(start + HEADER_BYTES, 0);
    let Some((p0, p1)) = parameters(codec, &v) else {
        out[start] = RAW;
        out.extend_from_slice(src);
        return Ok(());
    };
    out[start] = codec.wire();
    out[start + 4..start + 8].copy_from_slice(&p0.to_le_bytes());
    out[start + 8..start + 12].copy_from_slice(&p1.to_le_bytes());
    match codec {
        Codec::MinMaxU8 | Codec::MinMaxU16 => {
            // In f64: exact differences, and no overflow of the inverse step for tiny ranges.
            let levels = if codec == Codec::MinMaxU8 {
                255.0
            } else {
                65535.0
            };
            let (lo, hi) = (f64::from(p0), f64::from(p1));
            let inv = if hi > lo { levels / (hi - lo) } else { 0.0 };
            for &x in &v {
                let q = ((f64::from(x) - lo) * inv + 0.5).floor().clamp(0.0, levels);
                if codec == Codec::MinMaxU8 {
                    out.push(q as u8);
                } else {
                    out.extend_from_slice(&(q as u16).to_le_bytes());
                }
            }
        }
        Codec::ZeroPointU8 => {
            for &x in &v {
                let q = if p0 > 0.0 {
                    ((f64::from(x) / f64::from(p0)).round() + f64::from(p1)).clamp(0.0, 255.0)
                } else {
                    0.0
                };
                out.push(q as u8);
            }
        }
        Codec::Fp8E4M3 => out.extend(
            v.iter()
                .map(|&x| to_fp8(f64::from(x) / f64::from(p0), 3, 7, 0x7E)),
        ),
        Codec::Fp8E5M2 => out.extend(
            v.iter()
                .map(|&x| to_fp8(f64::from(x) / f64::from(p0), 2, 15, 0x7B)),
        ),
    }
    Ok(())
}

/// Decodes an encoded chunk into `dst` (elements of `dtype`, as many as were encoded). The
/// error says what does not fit: a length, a codec byte, or a chunk another type encoded.
pub fn decode(dtype: DType, enc: &[u8], dst: &mut [u8]) -> Result<(), KernelError> {
    if !Codec::supports(dtype) {
        return Err(unsupported(dtype));
    }
    let size = dtype.size_bytes();
    if enc.len() < HEADER_BYTES || !dst.len().is_multiple_of(size) {
        return Err(KernelError::Quantisation(format!(
            "a quantised chunk of {} bytes into {} bytes of {dtype}",
            enc.len(),
            dst.len()
        )));
    }
    let count = dst.len() / size;
    let body = &enc[HEADER_BYTES..];
    if enc[0] == RAW {
        if body.len() != dst.len() {
            return Err(KernelError::Quantisation(format!(
                "a raw chunk of {} bytes into {} bytes",
                body.len(),
                dst.len()
            )));
        }
        dst.copy_from_slice(body);
        return Ok(());
    }
    let codec = Codec::from_wire(enc[0]).ok_or_else(|| {
        KernelError::Quantisation(format!("unknown quantisation codec byte {:#04x}", enc[0]))
    })?;
    if body.len() != count * codec.code_bytes() {
        return Err(KernelError::Quantisation(format!(
            "a {codec} chunk of {} code bytes for {count} elements",
            body.len()
        )));
    }
    let f = |i: usize| {
        f64::from(f32::from_le_bytes(
            enc[i..i + 4].try_into().expect("4 bytes"),
        ))
    };
    let (p0, p1) = (f(4), f(8));
    // In f64, rounded once to f32 (then once more to a 16-bit type).
    for (i, out) in dst.chunks_exact_mut(size).enumerate() {
        let v = match codec {
            Codec::MinMaxU8 => p0 + f64::from(body[i]) * ((p1 - p0) / 255.0),
            Codec::MinMaxU16 => {
                let q = u16::from_le_bytes([body[2 * i], body[2 * i + 1]]);
                p0 + f64::from(q) * ((p1 - p0) / 65535.0)
            }
            Codec::ZeroPointU8 => (f64::from(body[i]) - p1) * p0,
            Codec::Fp8E4M3 => from_fp8(body[i], 3, 7, true) * p0,
            Codec::Fp8E5M2 => from_fp8(body[i], 2, 15, false) * p0,
        };
        narrow(dtype, v as f32, out);
    }
    Ok(())
}

/// The bound of one round trip's error per element, for a chunk whose values span `lo..=hi`
/// (min-max and zero-point codecs: half a step, with f32 rounding; fp8: the relative step of the
/// largest magnitude, which bounds every element's absolute error).
pub fn error_bound(codec: Codec, lo: f32, hi: f32) -> f64 {
    let (lo, hi) = (f64::from(lo), f64::from(hi));
    let amax = lo.abs().max(hi.abs());
    // The final rounding to f32: half an ulp of the largest magnitude, or of the subnormals.
    let eps = f64::from(f32::EPSILON) * amax + f64::from(f32::from_bits(1));
    match codec {
        Codec::MinMaxU8 => (hi - lo) / 510.0 * 1.0001 + eps,
        // A full step: the zero point is rounded, which may shift the grid by half of one.
        Codec::ZeroPointU8 => (hi.max(0.0) - lo.min(0.0)) / 255.0 * 1.0001 + eps,
        Codec::MinMaxU16 => (hi - lo) / 131_070.0 * 1.0001 + eps,
        Codec::Fp8E4M3 => amax / 16.0 + eps,
        Codec::Fp8E5M2 => amax / 8.0 + eps,
    }
}

/// `x` (finite) in an fp8 format with `m` mantissa bits and exponent bias `bias`, rounded to
/// nearest even, saturating at the largest finite code `max_code` (of the positive half).
fn to_fp8(x: f64, m: u32, bias: i32, max_code: u8) -> u8 {
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    let a = x.abs();
    if a == 0.0 {
        return sign;
    }
    let emin = 1 - bias;
    let e = (a.log2().floor() as i32).max(emin);
    // Exact: a power-of-two scaling, then one rounding.
    let quantum = 2f64.powi(e - m as i32);
    let mut q = (a / quantum).round_ties_even() as u32;
    let mut e = e;
    if q >= 1 << (m + 1) {
        q >>= 1;
        e += 1;
    }
    let code = if q < 1 << m {
        // Subnormal (exponent field 0).
        q
    } else {
        (((e + bias) as u32) << m) | (q - (1 << m))
    };
    sign | code.min(u32::from(max_code)) as u8
}

/// The value of an fp8 code; `e4m3`: no infinities, `0x7F` is NaN; else E5M2's infinities and
/// NaNs (which the encoder never produces) decode as such.
fn from_fp8(c: u8, m: u32, bias: i32, e4m3: bool) -> f64 {
    let sign = if c & 0x80 != 0 { -1.0 } else { 1.0 };
    let mag = c & 0x7F;
    let exp = i32::from(mag >> m);
    let man = f64::from(mag & ((1 << m) - 1));
    let top = (1 << (7 - m)) - 1;
    if e4m3 && mag == 0x7F {
        return f64::NAN;
    }
    if !e4m3 && exp == top {
        return if man == 0.0 {
            sign * f64::INFINITY
        } else {
            f64::NAN
        };
    }
    let v = if exp == 0 {
        man * 2f64.powi(1 - bias - m as i32)
    } else {
        (1.0 + man / f64::from(1u32 << m)) * 2f64.powi(exp - bias)
    };
    sign * v
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn round_trip(codec: Codec, v: &[f32]) -> (Vec<f32>, usize) {
        let mut enc = Vec::new();
        encode(codec, DType::F32, &f32s(v), &mut enc).unwrap();
        let mut out = vec![0u8; v.len() * 4];
        decode(DType::F32, &enc, &mut out).unwrap();
        (
            out.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            enc.len(),
        )
    }

    fn check_bound(codec: Codec, v: &[f32]) {
        let (back, len) = round_trip(codec, v);
        if len != codec.encoded_len(v.len()) {
            // Sent raw (a subnormal step or scale): then exactly.
            assert_eq!(len, HEADER_BYTES + 4 * v.len(), "{codec}: {v:?}");
            assert_eq!(f32s(&back), f32s(v), "{codec}: a raw chunk is exact");
            return;
        }
        let lo = v.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let bound = error_bound(codec, lo, hi);
        for (x, y) in v.iter().zip(&back) {
            let err = (f64::from(*x) - f64::from(*y)).abs();
            assert!(
                err <= bound,
                "{codec}: {x} came back {y}, error {err} over {bound} ({lo}..{hi})"
            );
        }
    }

    #[test]
    fn every_corner_stays_within_its_bound() {
        let corners: Vec<Vec<f32>> = vec![
            vec![-5.0, -3.25, -1.0, -0.5],   // all negative (PCCL's bug)
            vec![0.5, 1.0, 2.0, 1000.0],     // all positive
            vec![3.0; 17],                   // constant
            vec![1e-30, 2e-30, -1e-30],      // tiny
            vec![1e30, -2e30, 3e30],         // huge
            vec![1e-42, -3e-41, 5e-40, 0.0], // subnormal
            vec![0.0, -0.0],
            (0..1000).map(|i| (i as f32 * 0.37).sin() * 10.0).collect(),
        ];
        for codec in Codec::ALL {
            for v in &corners {
                check_bound(codec, v);
            }
        }
        // A constant chunk comes back exactly.
        for codec in [Codec::MinMaxU8, Codec::MinMaxU16] {
            assert_eq!(round_trip(codec, &[3.0; 5]).0, vec![3.0; 5]);
        }
        // Zero point: zero is exact.
        let (back, _) = round_trip(Codec::ZeroPointU8, &[-1.7, 0.0, 2.9]);
        assert_eq!(back[1], 0.0);
    }

    #[test]
    fn non_finite_chunks_go_raw_and_come_back_bit_exact() {
        for codec in Codec::ALL {
            for v in [
                vec![1.0, f32::NAN, 2.0],
                vec![f32::INFINITY, 0.0],
                vec![-3e38, 3e38], // a range wider than f32
            ] {
                let (back, len) = round_trip(codec, &v);
                assert_eq!(len, HEADER_BYTES + 4 * v.len(), "{codec} {v:?}");
                assert_eq!(f32s(&back), f32s(&v), "{codec}: bits kept");
            }
        }
    }

    #[test]
    fn fp8_codes_match_the_formats() {
        // Exactly representable values survive; the largest finite saturates.
        for (m, bias, max_code, e4m3, samples) in [
            (
                3,
                7,
                0x7E,
                true,
                vec![448.0, 1.0, 0.5, -0.001953125, 240.0, 0.015625],
            ),
            (
                2,
                15,
                0x7B,
                false,
                vec![57344.0, 1.0, -0.25, 1.52587890625e-5],
            ),
        ] {
            for x in samples {
                let c = to_fp8(x, m, bias, max_code);
                assert_eq!(from_fp8(c, m, bias, e4m3), x, "{x} -> {c:#04x}");
            }
            let c = to_fp8(1e9, m, bias, max_code);
            assert_eq!(c, max_code, "saturates");
        }
        // Round to nearest even: 1 + 1/16 lies halfway between E4M3's 1 and 1.125.
        assert_eq!(from_fp8(to_fp8(1.0625, 3, 7, 0x7E), 3, 7, true), 1.0);
        assert_eq!(from_fp8(to_fp8(1.1875, 3, 7, 0x7E), 3, 7, true), 1.25);
        assert!(from_fp8(0x7F, 3, 7, true).is_nan());
        assert_eq!(from_fp8(0x7C, 2, 15, false), f64::INFINITY);
    }

    #[test]
    fn half_types_round_trip_and_others_are_refused() {
        let v: Vec<f32> = vec![-2.0, 0.5, 1.25, 3.0];
        for (dtype, bytes) in [
            (
                DType::F16,
                v.iter()
                    .flat_map(|x| f32_to_f16(*x).to_le_bytes())
                    .collect::<Vec<u8>>(),
            ),
            (
                DType::BF16,
                v.iter()
                    .flat_map(|x| f32_to_bf16(*x).to_le_bytes())
                    .collect(),
            ),
        ] {
            let mut enc = Vec::new();
            encode(Codec::MinMaxU16, dtype, &bytes, &mut enc).unwrap();
            let mut out = vec![0u8; bytes.len()];
            decode(dtype, &enc, &mut out).unwrap();
            assert_eq!(
                out, bytes,
                "{dtype}: values representable in 16 bits come back"
            );
        }
        let mut enc = Vec::new();
        let e = encode(Codec::MinMaxU8, DType::F64, &[0u8; 8], &mut enc).unwrap_err();
        assert!(
            e.to_string().contains("only float, half and bfloat16"),
            "{e}"
        );
        assert!(decode(DType::I32, &[0u8; 16], &mut [0u8; 4]).is_err());
        // Malformed chunks are errors, never panics.
        for bad in [&[][..], &[9u8; 12][..], &[1u8; 13][..]] {
            assert!(decode(DType::F32, bad, &mut [0u8; 8]).is_err());
        }
    }

    proptest! {
        #[test]
        fn random_chunks_stay_within_their_bound(
            v in proptest::collection::vec(-1e6f32..1e6, 1..300),
            scale in -30i32..30,
        ) {
            let s = 2f32.powi(scale);
            let v: Vec<f32> = v.iter().map(|x| x * s).collect();
            for codec in Codec::ALL {
                check_bound(codec, &v);
            }
        }

        #[test]
        fn decoding_any_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut out = vec![0u8; 16];
            let _ = decode(DType::F32, &bytes, &mut out);
        }
    }
}
