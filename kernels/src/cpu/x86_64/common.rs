//! Small pieces shared by the x86-64 paths.

use crate::cpu::scalar;
use crate::job::Job;
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

/// The entry points an x86-64 path shares with the others, for the target features
/// `$features`: `combine` and `finish` (the path's [`crate::job::PathFns`]), the dispatch
/// of f32/f16/bf16 jobs to the path's own `run::<KIND, OP, DIV>`, and the scalar code compiled
/// with the path's features for every other dtype (LLVM vectorises it; same code, same bits).
/// The expanding module must import `Job`, `DType`, `NonZeroUsize`, `op_code`, the kind and op
/// codes, `scalar`, `by_dtype` and `Elem`, and define `run`.
macro_rules! entry_points {
    ($features:literal) => {
        /// # Safety
        /// The [`Job`] contract holds and the CPU has this path's features (checked by
        /// `Kernels::new` before the path's table can be reached).
        pub(super) unsafe fn combine(job: &Job) {
            let op = op_code(job.op);
            // SAFETY: forwarded from our caller (job contract, CPU features).
            unsafe { dispatch(job, op) }
        }

        /// # Safety
        /// `dst` is valid for reads and writes of `len` elements of `dtype`; CPU features as
        /// for [`combine`].
        pub(super) unsafe fn finish(dst: *mut u8, len: usize, dtype: DType, world: NonZeroUsize) {
            let job = Job {
                dst,
                a: dst.cast_const(),
                b: dst.cast_const(),
                len,
                dtype,
                op: crate::ReduceOp::Avg,
                divisor: Some(world),
                stream: false,
            };
            // SAFETY: a == b == dst, all valid for `len` elements; CPU features as above.
            unsafe { dispatch(&job, KEEP) }
        }

        /// # Safety
        /// As [`combine`]; with `op == KEEP` only `a` is read.
        unsafe fn dispatch(job: &Job, op: u8) {
            macro_rules! go {
                ($kind:expr) => {
                    match (op, job.divisor.is_some()) {
                        (SUM, false) => run::<$kind, SUM, false>(job),
                        (SUM, true) => run::<$kind, SUM, true>(job),
                        (PROD, false) => run::<$kind, PROD, false>(job),
                        (PROD, true) => run::<$kind, PROD, true>(job),
                        (MAX, false) => run::<$kind, MAX, false>(job),
                        (MAX, true) => run::<$kind, MAX, true>(job),
                        (MIN, false) => run::<$kind, MIN, false>(job),
                        (MIN, true) => run::<$kind, MIN, true>(job),
                        _ => run::<$kind, KEEP, true>(job),
                    }
                };
            }
            // SAFETY: every arm forwards our caller's guarantees.
            unsafe {
                match job.dtype {
                    DType::F32 => go!(F32),
                    DType::F16 => go!(F16),
                    DType::BF16 => go!(BF16),
                    other if op == KEEP => by_dtype!(other, generic_finish(job)),
                    other => by_dtype!(other, generic_combine(job)),
                }
            }
        }

        /// # Safety
        /// The [`Job`] contract holds; CPU features as for [`combine`].
        #[target_feature(enable = $features)]
        unsafe fn generic_combine<E: Elem>(job: &Job) {
            // SAFETY: forwarded from our caller.
            unsafe { scalar::combine_elems::<E>(job, 0) }
        }

        /// # Safety
        /// `job.dst` is valid for `job.len` elements and `job.divisor` is set; CPU features as
        /// for [`combine`].
        #[target_feature(enable = $features)]
        unsafe fn generic_finish<E: Elem>(job: &Job) {
            let world = job.divisor.map_or(1, NonZeroUsize::get);
            // SAFETY: forwarded from our caller.
            unsafe { scalar::finish_elems::<E>(job.dst, job.len, world) }
        }
    };
}
pub(crate) use entry_points;
