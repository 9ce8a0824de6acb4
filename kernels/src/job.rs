//! What a CPU path is handed: one reduction over raw element pointers ([`Job`]), and the table
//! of functions that make up a path ([`PathFns`]). The bottom of the crate's CPU side: the
//! paths and the dispatch both build on it.

use std::num::NonZeroUsize;

use crate::{DType, ReduceOp};

/// One reduction over raw element pointers, as the path functions receive it.
///
/// Contract (established by the safe entry points in `lib.rs`): `a`, `b` and `dst` each point to
/// `len` elements of `dtype` (any alignment); `a` and `b` are readable, `dst` writable; `a` may
/// be equal to `dst` (in-place reduction) but no other overlap exists. With `stream`, the caller
/// issues a store fence (`stores::fence_after`) before anything may read `dst` from another thread.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Job {
    pub(crate) dst: *mut u8,
    pub(crate) a: *const u8,
    pub(crate) b: *const u8,
    /// Number of elements (not bytes).
    pub(crate) len: usize,
    pub(crate) dtype: DType,
    pub(crate) op: ReduceOp,
    /// `Some(world)` when the result is to be rounded, then divided by `world` (fused Avg).
    pub(crate) divisor: Option<NonZeroUsize>,
    /// Write `dst` with non-temporal stores where the path can (the SIMD loops of f32, f16 and
    /// bf16 over an aligned `dst`); the bits are the same either way. (Only x86-64 has such
    /// paths.)
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) stream: bool,
}

// The SIMD paths (x86-64) split and align jobs; the scalar path takes them whole.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
impl Job {
    /// The first `mid` elements and the rest, as two jobs with the same contract.
    pub(crate) fn split_at(&self, mid: usize) -> (Job, Job) {
        assert!(
            mid <= self.len,
            "split point {mid} beyond {} elements",
            self.len
        );
        let off = mid * self.dtype.size_bytes();
        let head = Job { len: mid, ..*self };
        let tail = Job {
            dst: self.dst.wrapping_add(off),
            a: self.a.wrapping_add(off),
            b: self.b.wrapping_add(off),
            len: self.len - mid,
            ..*self
        };
        (head, tail)
    }

    /// Whether the loop writes `dst` with non-temporal stores: asked for, and `dst` aligned to
    /// `align` bytes as those stores need (the paths align it first where the element size
    /// allows).
    pub(crate) fn streams(&self, align: usize) -> bool {
        self.stream && (self.dst as usize).is_multiple_of(align)
    }

    /// How many leading elements to handle one by one so that `dst` becomes `align`-byte
    /// aligned (0 when it already is, or when no whole number of elements gets it there).
    pub(crate) fn head_to_align(&self, align: usize) -> usize {
        let size = self.dtype.size_bytes();
        let misalign = self.dst as usize % align;
        if misalign == 0 || !misalign.is_multiple_of(size) {
            return 0;
        }
        ((align - misalign) / size).min(self.len)
    }
}

/// The functions that make up one path.
#[derive(Debug)]
pub(crate) struct PathFns {
    /// Performs a whole [`Job`].
    ///
    /// Safety contract: the job satisfies the [`Job`] contract.
    pub(crate) combine: unsafe fn(&Job),
    /// `dst[i] /= world` over `len` elements of the dtype.
    ///
    /// Safety contract: `dst` is valid for reads and writes of `len` elements.
    pub(crate) finish: unsafe fn(*mut u8, usize, DType, NonZeroUsize),
}
