//! Every CPU path against the f64 oracle: lengths 0..=300 plus large ones, every misalignment
//! of each buffer, every dtype and op.
//!
//! Tolerance table (relative error per rounding, plus the type's smallest subnormal per
//! rounding as absolute slack; see `common::close`):
//!
//! | dtype | per rounding | Sum/Prod | fused Avg (sum rounded, divided, rounded) |
//! |-------|--------------|----------|-------------------------------------------|
//! | f64   | 2^-53        | 1        | 2                                         |
//! | f32   | 2^-24        | 1        | 2                                         |
//! | f16   | 2^-11        | 1        | 3 (f32 division in between)               |
//! | bf16  | 2^-8         | 1        | 3                                         |
//! | ints  | exact (wrapping, truncating Avg)                                     |
//!
//! Max and Min are exact selections and are compared bit for bit with the documented NaN and
//! signed-zero rules. Bit-equality *between* paths is in `paths.rs`.

mod common;

use common::*;
use concord_kernels::{DType, Kernels, ReduceOp};

const MAX_LEN: usize = 300;
const LARGE: [usize; 3] = [1023, 4096 + 37, 65_536 + 13];

/// The expected raw bits of `a op b` (then `/ world` when `world` is Some) for integer dtypes.
fn int_expected(dtype: DType, op: ReduceOp, a: i128, b: i128, world: Option<usize>) -> u64 {
    let r = match op {
        ReduceOp::Sum | ReduceOp::Avg => a.wrapping_add(b),
        ReduceOp::Prod => a.wrapping_mul(b),
        ReduceOp::Max => a.max(b),
        ReduceOp::Min => a.min(b),
        _ => unreachable!(),
    };
    let wrapped = wrap_bits(r, dtype);
    match world {
        Some(w) => {
            // Re-read the wrapped value with the dtype's signedness, then truncate-divide.
            let v = int_at(&wrapped.to_ne_bytes(), dtype, 0);
            wrap_bits(v / w as i128, dtype)
        }
        None => wrapped,
    }
}

/// The expected raw bits of max/min for floats, by the documented rule.
fn minmax_expected(dtype: DType, op: ReduceOp, a: &[u8], b: &[u8], i: usize) -> u64 {
    let (x, y) = (float_at(a, dtype, i), float_at(b, dtype, i));
    let (xb, yb) = (bits(a, dtype, i), bits(b, dtype, i));
    if x.is_nan() || y.is_nan() {
        return canonical_nan(dtype);
    }
    let max = op == ReduceOp::Max;
    if x == y {
        return if max { xb & yb } else { xb | yb };
    }
    if (x > y) == max {
        xb
    } else {
        yb
    }
}

fn check(
    k: &Kernels,
    dtype: DType,
    op: ReduceOp,
    a: &[u8],
    b: &[u8],
    got: &[u8],
    world: Option<usize>,
) {
    let n = got.len() / dtype.size_bytes();
    for i in 0..n {
        let g = bits(got, dtype, i);
        let ok = if !dtype.is_float() {
            g == int_expected(dtype, op, int_at(a, dtype, i), int_at(b, dtype, i), world)
        } else if matches!(op, ReduceOp::Max | ReduceOp::Min) {
            g == minmax_expected(dtype, op, a, b, i)
        } else {
            let mut want = reference(op, float_at(a, dtype, i), float_at(b, dtype, i));
            let mut roundings = 1;
            if let Some(w) = world {
                // The sum is rounded to the dtype before the division: it may overflow there.
                let mut rounded = Vec::new();
                encode(&mut rounded, dtype, want);
                if float_at(&rounded, dtype, 0).is_infinite() {
                    want = float_at(&rounded, dtype, 0);
                }
                want /= w as f64;
                roundings = if matches!(dtype, DType::F16 | DType::BF16) {
                    3
                } else {
                    2
                };
            }
            close(dtype, g, want, roundings)
        };
        assert!(
            ok,
            "path {} {dtype} {op} world {world:?}: element {i} of {n}: a={:#x} b={:#x} got={g:#x}",
            k.path(),
            bits(a, dtype, i),
            bits(b, dtype, i)
        );
    }
}

/// Runs the four entry points with `dst`, `a` and `b` at the given byte offsets.
fn run_case(
    k: &Kernels,
    dtype: DType,
    op: ReduceOp,
    len: usize,
    offs: [usize; 3],
    rng: &mut XorShift,
) {
    let bytes = len * dtype.size_bytes();
    let a = gen(dtype, len, rng);
    let b = gen(dtype, len, rng);
    let world = 1 + (len % 7);
    let mut bufs = [
        vec![0u8; bytes + 8],
        vec![0u8; bytes + 8],
        vec![0u8; bytes + 8],
    ];
    bufs[1][offs[1]..offs[1] + bytes].copy_from_slice(&a);
    bufs[2][offs[2]..offs[2] + bytes].copy_from_slice(&b);
    let [d, sa, sb] = &mut bufs;
    let (sa, sb) = (&sa[offs[1]..offs[1] + bytes], &sb[offs[2]..offs[2] + bytes]);
    let dst = &mut d[offs[0]..offs[0] + bytes];

    k.reduce_out(dst, sa, sb, dtype, op)
        .expect("valid arguments");
    check(k, dtype, op, &a, &b, dst, None);
    k.reduce_out_finish(dst, sa, sb, dtype, op, world)
        .expect("valid arguments");
    let fused = (op == ReduceOp::Avg).then_some(world);
    check(k, dtype, op, &a, &b, dst, fused);

    dst.copy_from_slice(&a);
    k.reduce_into(dst, sb, dtype, op).expect("valid arguments");
    check(k, dtype, op, &a, &b, dst, None);
    k.finish(dst, dtype, op, world).expect("valid arguments");
    check(k, dtype, op, &a, &b, dst, fused);
}

fn sweep(dtype: DType) {
    let mut rng = XorShift::new(u64::from(dtype.to_wire()) + 1);
    for k in paths() {
        for op in ReduceOp::ALL {
            for len in 0..=MAX_LEN {
                // Over any 8 consecutive lengths every (dst, a, b) misalignment pair appears.
                let m = len % 8;
                for s in 0..8 {
                    let offs = [m, s, (s + 3 * m + 1) % 8];
                    run_case(&k, dtype, op, len, offs, &mut rng);
                }
            }
            for len in LARGE {
                run_case(&k, dtype, op, len, [len % 8, 7 - len % 8, 3], &mut rng);
            }
        }
    }
}

#[test]
fn oracle_f32() {
    sweep(DType::F32);
}
#[test]
fn oracle_f64() {
    sweep(DType::F64);
}
#[test]
fn oracle_f16() {
    sweep(DType::F16);
}
#[test]
fn oracle_bf16() {
    sweep(DType::BF16);
}
#[test]
fn oracle_signed_ints() {
    for d in [DType::I8, DType::I16, DType::I32, DType::I64] {
        sweep(d);
    }
}
#[test]
fn oracle_unsigned_ints() {
    for d in [DType::U8, DType::U16, DType::U32, DType::U64] {
        sweep(d);
    }
}

/// The ring's use: peers reduced one after another, the last step fused with the division;
/// compared with the f64 sum of all peers (error bound grows with the number of roundings).
#[test]
fn ring_accumulation_against_f64() {
    let mut rng = XorShift::new(99);
    for k in paths() {
        for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
            for world in 2..=8usize {
                let len = 257;
                let peers: Vec<Vec<f64>> = (0..world)
                    .map(|_| {
                        (0..len)
                            .map(|_| (rng.below(2001) as f64 - 1000.0) / 64.0)
                            .collect()
                    })
                    .collect();
                let enc = |v: &[f64]| {
                    let mut out = Vec::new();
                    v.iter().for_each(|x| encode(&mut out, dtype, *x));
                    out
                };
                let mut acc = enc(&peers[0]);
                for (j, p) in peers.iter().enumerate().skip(1) {
                    if j + 1 == world {
                        k.reduce_into_finish(&mut acc, &enc(p), dtype, ReduceOp::Avg, world)
                            .unwrap();
                    } else {
                        k.reduce_into(&mut acc, &enc(p), dtype, ReduceOp::Avg)
                            .unwrap();
                    }
                }
                let input = enc(&peers[0]);
                for i in 0..len {
                    let exact: f64 = (0..world)
                        .map(|j| float_at(&enc(&peers[j][i..=i]), dtype, 0))
                        .sum();
                    let magnitude: f64 = (0..world).map(|j| peers[j][i].abs()).sum::<f64>();
                    let got = float_at(&acc, dtype, i);
                    let tol = (world as f64 + 1.0) * unit_roundoff(dtype) * magnitude
                        / world as f64
                        + unit_roundoff(dtype) * (exact / world as f64).abs();
                    assert!(
                        (got - exact / world as f64).abs() <= tol,
                        "{} {dtype} world {world} element {i}: got {got}, want {}",
                        k.path(),
                        exact / world as f64
                    );
                }
                drop(input);
            }
        }
    }
}
