//! Inputs and the reference each peer computes on its own, for `concord bench -c 1` and the tests.
//!
//! Inputs vary with rank, element index and iteration (a constant input hides indexing bugs).
//! They are chosen so that the exact result does not depend on the order of the reduction:
//! integers use wrapping arithmetic (associative); floats use small integers for sum, avg, max
//! and min, and powers of two in {±0.5, ±1, ±2} for prod (exact up to 14 peers in f16). The
//! reference is then computed in f64 (or wrapping integers), divided for avg, and rounded once;
//! the ring's result must match it bit for bit.

use crate::{DType, ReduceOp};
use half::{bf16, f16};

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn code(rank: usize, i: usize, iter: u64) -> u64 {
    mix((i as u64) ^ ((rank as u64) << 40) ^ iter.wrapping_mul(0xD1B5_4A32_D192_ED03))
}

/// The float value of input element `i` of `rank`.
fn float_value(op: ReduceOp, c: u64) -> f64 {
    match op {
        ReduceOp::Prod => {
            const SET: [f64; 6] = [-2.0, -1.0, -0.5, 0.5, 1.0, 2.0];
            SET[(c % 6) as usize]
        }
        _ => (c % 17) as f64 - 8.0,
    }
}

macro_rules! ints {
    ($dtype:expr, $op:expr, $world:expr, $rank:expr, $iter:expr, $out:expr, $fill:expr, $($d:ident => $t:ty),*) => {
        match $dtype {
            $(DType::$d => {
                let n = $out.len() / std::mem::size_of::<$t>();
                for i in 0..n {
                    let v: $t = if $fill {
                        code($rank, i, $iter) as $t
                    } else {
                        let mut acc = code(0, i, $iter) as $t;
                        for r in 1..$world {
                            let x = code(r, i, $iter) as $t;
                            acc = match $op {
                                ReduceOp::Sum | ReduceOp::Avg => acc.wrapping_add(x),
                                ReduceOp::Prod => acc.wrapping_mul(x),
                                ReduceOp::Max => acc.max(x),
                                _ => acc.min(x),
                            };
                        }
                        if $op == ReduceOp::Avg { acc / ($world as $t) } else { acc }
                    };
                    let size = std::mem::size_of::<$t>();
                    $out[i * size..(i + 1) * size].copy_from_slice(&v.to_le_bytes());
                }
                return;
            })*
            _ => {}
        }
    };
}

/// Writes `rank`'s input for iteration `iter` into `out`.
pub fn fill(dtype: DType, op: ReduceOp, rank: usize, iter: u64, out: &mut [u8]) {
    let one_peer = 1usize;
    ints!(dtype, op, one_peer, rank, iter, out, true, I8 => i8, I16 => i16, I32 => i32, I64 => i64, U8 => u8, U16 => u16, U32 => u32, U64 => u64);
    floats(dtype, out, |i| float_value(op, code(rank, i, iter)));
}

/// Writes the expected result over `world` peers for iteration `iter` into `out`.
pub fn reference(dtype: DType, op: ReduceOp, world: usize, iter: u64, out: &mut [u8]) {
    ints!(dtype, op, world, 0, iter, out, false, I8 => i8, I16 => i16, I32 => i32, I64 => i64, U8 => u8, U16 => u16, U32 => u32, U64 => u64);
    floats(dtype, out, |i| {
        let mut acc = float_value(op, code(0, i, iter));
        for r in 1..world {
            let x = float_value(op, code(r, i, iter));
            acc = match op {
                ReduceOp::Sum | ReduceOp::Avg => acc + x,
                ReduceOp::Prod => acc * x,
                ReduceOp::Max => acc.max(x),
                _ => acc.min(x),
            };
        }
        if op == ReduceOp::Avg {
            acc / world as f64
        } else {
            acc
        }
    });
}

fn floats(dtype: DType, out: &mut [u8], value: impl Fn(usize) -> f64) {
    let size = dtype.size_bytes();
    for (i, slot) in out.chunks_exact_mut(size).enumerate() {
        let v = value(i);
        match dtype {
            DType::F32 => slot.copy_from_slice(&(v as f32).to_le_bytes()),
            DType::F64 => slot.copy_from_slice(&v.to_le_bytes()),
            DType::F16 => slot.copy_from_slice(&f16::from_f64(v).to_le_bytes()),
            DType::BF16 => slot.copy_from_slice(&bf16::from_f64(v).to_le_bytes()),
            other => unreachable!("{other} is an integer type"),
        }
    }
}

/// Counts elements of `got` whose bits differ from `want`.
pub fn count_wrong(dtype: DType, got: &[u8], want: &[u8]) -> u64 {
    let size = dtype.size_bytes();
    got.chunks_exact(size)
        .zip(want.chunks_exact(size))
        .filter(|(a, b)| a != b)
        .count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference equals a plain fold of the inputs, for a world of one (the input itself).
    #[test]
    fn reference_of_one_peer_is_its_input() {
        for dtype in DType::ALL {
            for op in [
                ReduceOp::Sum,
                ReduceOp::Prod,
                ReduceOp::Max,
                ReduceOp::Min,
                ReduceOp::Avg,
            ] {
                let mut a = vec![0u8; 64 * dtype.size_bytes()];
                let mut b = a.clone();
                fill(dtype, op, 0, 3, &mut a);
                reference(dtype, op, 1, 3, &mut b);
                assert_eq!(count_wrong(dtype, &a, &b), 0, "{dtype} {op}");
            }
        }
    }

    #[test]
    fn inputs_vary_with_rank_index_and_iteration() {
        let mut a = vec![0u8; 256];
        let mut b = vec![0u8; 256];
        fill(DType::F32, ReduceOp::Sum, 0, 0, &mut a);
        fill(DType::F32, ReduceOp::Sum, 1, 0, &mut b);
        assert_ne!(a, b);
        fill(DType::F32, ReduceOp::Sum, 0, 1, &mut b);
        assert_ne!(a, b);
        assert!(a.chunks(4).collect::<std::collections::HashSet<_>>().len() > 8);
    }
}
