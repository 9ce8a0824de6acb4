//! Blocking broadcasts and reduces of host buffers, typed and raw: pipelined chains along the
//! ring from and to the root (see `collective/ring.rs`).

use std::time::Duration;

use concord_kernels::{DType, ReduceOp};

use super::communicator::Communicator;
use crate::collective::Spec;
use crate::results::ReduceInfo;
use crate::{CollKind, Element, Error};

fn rooted(kind: CollKind, root: usize, dtype: DType, op: ReduceOp) -> Spec {
    Spec {
        kind,
        root,
        ..Spec::all_reduce(dtype, op, 0)
    }
}

impl Communicator {
    /// Broadcast: every peer's `buf` ends as the root's (`root` is a ring position, see
    /// [`Communicator::rank_of`]). Blocks until this peer's part is done. On failure the root's
    /// buffer is intact; elsewhere `buf` may hold part of the root's data.
    pub fn broadcast<T: Element>(
        &self,
        buf: &mut [T],
        root: usize,
        tag: u64,
    ) -> Result<ReduceInfo, Error> {
        let spec = rooted(CollKind::Broadcast, root, T::DTYPE, ReduceOp::Sum);
        self.run_host(spec, None, bytemuck::cast_slice_mut(buf), tag, None)
    }

    /// Reduce: the root's `dst` ends as `op` over every peer's `src`. Off the root `dst` is left
    /// untouched and may be empty (`&mut []`).
    pub fn reduce<T: Element>(
        &self,
        src: &[T],
        dst: &mut [T],
        op: ReduceOp,
        root: usize,
        tag: u64,
    ) -> Result<ReduceInfo, Error> {
        let spec = rooted(CollKind::Reduce, root, T::DTYPE, op);
        self.run_host(
            spec,
            Some(bytemuck::cast_slice(src)),
            bytemuck::cast_slice_mut(dst),
            tag,
            None,
        )
    }

    /// In-place reduce: the root's `buf` ends as the reduction; the others' is left untouched.
    /// On failure the root's `buf` holds its input again.
    pub fn reduce_in_place<T: Element>(
        &self,
        buf: &mut [T],
        op: ReduceOp,
        root: usize,
        tag: u64,
    ) -> Result<ReduceInfo, Error> {
        let spec = rooted(CollKind::Reduce, root, T::DTYPE, op);
        self.run_host(spec, None, bytemuck::cast_slice_mut(buf), tag, None)
    }

    /// The untyped broadcast: `buf` holds `dtype` elements; an optional deadline of its own.
    pub fn broadcast_raw(
        &self,
        buf: &mut [u8],
        dtype: DType,
        root: usize,
        tag: u64,
        timeout: Option<Duration>,
    ) -> Result<ReduceInfo, Error> {
        let spec = rooted(CollKind::Broadcast, root, dtype, ReduceOp::Sum);
        self.run_host(spec, None, buf, tag, timeout)
    }

    /// The untyped reduce: `src == None` means in place (`dst` is then the one buffer).
    #[allow(clippy::too_many_arguments)]
    pub fn reduce_raw(
        &self,
        src: Option<&[u8]>,
        dst: &mut [u8],
        dtype: DType,
        op: ReduceOp,
        root: usize,
        tag: u64,
        timeout: Option<Duration>,
    ) -> Result<ReduceInfo, Error> {
        let spec = rooted(CollKind::Reduce, root, dtype, op);
        self.run_host(spec, src, dst, tag, timeout)
    }
}
