//! Small pieces shared by the x86-64 paths.

use crate::cpu::scalar;
use crate::dispatch::Job;
use crate::ReduceOp;

/// Kinds of element the hand-written loops handle (all computed in f32 lanes).
pub(crate) const F32: u8 = 0;
pub(crate) const F16: u8 = 1;
pub(crate) const BF16: u8 = 2;

/// Operation codes for the loops' const generic (KEEP: `dst = a`, used by `finish`).
pub(crate) const SUM: u8 = 0;
pub(crate) const PROD: u8 = 1;
pub(crate) const MAX: u8 = 2;
pub(crate) const MIN: u8 = 3;
pub(crate) const KEEP: u8 = 4;

/// The loop code of a reduction operator (`Avg` reduces as `Sum`).
pub(crate) fn op_code(op: ReduceOp) -> u8 {
    match op {
        ReduceOp::Sum | ReduceOp::Avg => SUM,
        ReduceOp::Prod => PROD,
        ReduceOp::Max => MAX,
        ReduceOp::Min => MIN,
    }
}

/// Elements `start..` of `job` on the scalar path (the same bits as the vector loop).
///
/// # Safety
/// The [`Job`] contract holds; `start <= job.len`.
pub(crate) unsafe fn scalar_part<const OP: u8>(job: &Job, start: usize) {
    let size = job.dtype.size_bytes();
    // SAFETY: `start..len` lies inside the operands (Job contract).
    unsafe {
        if OP == KEEP {
            if let Some(w) = job.divisor {
                scalar::finish_in_place(job.dst.add(start * size), job.len - start, job.dtype, w);
            }
        } else {
            scalar::combine_from(job, start);
        }
    }
}
