//! Blocking all-gathers and reduce-scatters of host buffers, typed and raw: the two halves of
//! the ring all-reduce (see `collective/ring.rs`). Slot `r` of the whole buffer (its `r`-th
//! `1 / world`) belongs to the peer of rank `r`.

use std::time::Duration;

use concord_kernels::{DType, ReduceOp};

use super::communicator::Communicator;
use crate::collective::Spec;
use crate::results::ReduceInfo;
use crate::{CollKind, Element, Error};

fn sliced(kind: CollKind, dtype: DType, op: ReduceOp) -> Spec {
    Spec {
        kind,
        ..Spec::all_reduce(dtype, op, 0)
    }
}

impl Communicator {
    /// All-gather: `dst` (world × `src.len()` elements) ends with every peer's `src`, rank `r`'s
    /// in slot `r`. Every peer ends with the same bits.
    pub fn all_gather<T: Element>(
        &self,
        src: &[T],
        dst: &mut [T],
        tag: u64,
    ) -> Result<ReduceInfo, Error> {
        let spec = sliced(CollKind::AllGather, T::DTYPE, ReduceOp::Sum);
        self.run_host(
            spec,
            Some(bytemuck::cast_slice(src)),
            bytemuck::cast_slice_mut(dst),
            tag,
            None,
        )
    }

    /// In-place all-gather: this peer's input is already in its slot of `buf`; the other slots
    /// are filled. On failure the own slot is intact; the others may hold part of the data.
    pub fn all_gather_in_place<T: Element>(
        &self,
        buf: &mut [T],
        tag: u64,
    ) -> Result<ReduceInfo, Error> {
        let spec = sliced(CollKind::AllGather, T::DTYPE, ReduceOp::Sum);
        self.run_host(spec, None, bytemuck::cast_slice_mut(buf), tag, None)
    }

    /// Reduce-scatter: `dst` (`src.len()` / world elements) ends as slot `rank` of `op` over
    /// every peer's `src`.
    pub fn reduce_scatter<T: Element>(
        &self,
        src: &[T],
        dst: &mut [T],
        op: ReduceOp,
        tag: u64,
    ) -> Result<ReduceInfo, Error> {
        let spec = sliced(CollKind::ReduceScatter, T::DTYPE, op);
        self.run_host(
            spec,
            Some(bytemuck::cast_slice(src)),
            bytemuck::cast_slice_mut(dst),
            tag,
            None,
        )
    }

    /// In-place reduce-scatter: this peer's slot of `buf` ends as its slot of the reduction;
    /// the other slots are left as they were. On failure `buf` holds its input again.
    pub fn reduce_scatter_in_place<T: Element>(
        &self,
        buf: &mut [T],
        op: ReduceOp,
        tag: u64,
    ) -> Result<ReduceInfo, Error> {
        let spec = sliced(CollKind::ReduceScatter, T::DTYPE, op);
        self.run_host(spec, None, bytemuck::cast_slice_mut(buf), tag, None)
    }

    /// The untyped all-gather: `src == None` means in place (`dst` is then the one buffer).
    pub fn all_gather_raw(
        &self,
        src: Option<&[u8]>,
        dst: &mut [u8],
        dtype: DType,
        tag: u64,
        timeout: Option<Duration>,
    ) -> Result<ReduceInfo, Error> {
        let spec = sliced(CollKind::AllGather, dtype, ReduceOp::Sum);
        self.run_host(spec, src, dst, tag, timeout)
    }

    /// The untyped reduce-scatter: `src == None` means in place (`dst` is then the one buffer).
    pub fn reduce_scatter_raw(
        &self,
        src: Option<&[u8]>,
        dst: &mut [u8],
        dtype: DType,
        op: ReduceOp,
        tag: u64,
        timeout: Option<Duration>,
    ) -> Result<ReduceInfo, Error> {
        let spec = sliced(CollKind::ReduceScatter, dtype, op);
        self.run_host(spec, src, dst, tag, timeout)
    }
}
