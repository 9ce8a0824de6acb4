//! Async broadcasts, reduces, all-gathers, reduce-scatters and barriers: launched by the
//! [`Collectives`] handle like async all-reduces, under the same threading rules, in-flight
//! limit and bounded threads. Each handle owns its buffers and gives the output back.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use concord_kernels::{DType, ReduceOp};

use super::blocking::raw_vec;
use super::collectives::Collectives;
use super::handle::{Buffers, Handle};
use super::layout::layout;
use crate::collective::Spec;
use crate::raw_buf::RawBuf;
use crate::{CollKind, Element};

fn spec_of(kind: CollKind, root: usize, dtype: DType, op: ReduceOp) -> Spec {
    Spec {
        kind,
        root,
        ..Spec::all_reduce(dtype, op, 0)
    }
}

impl<'c> Collectives<'c> {
    /// Starts a broadcast of the root's `buf` (see [`crate::Communicator::broadcast`]); the
    /// handle gives `buf` back holding the root's data.
    pub fn broadcast_async<T: Element>(&self, buf: Vec<T>, root: usize, tag: u64) -> Handle<'c, T> {
        let spec = spec_of(CollKind::Broadcast, root, T::DTYPE, ReduceOp::Sum);
        self.launch_shaped(spec, None, buf, tag, None)
    }

    /// Starts an in-place reduce to `root` (see [`crate::Communicator::reduce_in_place`]); the
    /// handle gives `buf` back: the reduction on the root, untouched elsewhere.
    pub fn reduce_async<T: Element>(
        &self,
        buf: Vec<T>,
        op: ReduceOp,
        root: usize,
        tag: u64,
    ) -> Handle<'c, T> {
        let spec = spec_of(CollKind::Reduce, root, T::DTYPE, op);
        self.launch_shaped(spec, None, buf, tag, None)
    }

    /// Starts an all-gather of `src` into `dst` (world × `src.len()` elements; see
    /// [`crate::Communicator::all_gather`]); the handle gives `dst` back.
    pub fn all_gather_async<T: Element>(
        &self,
        src: Vec<T>,
        dst: Vec<T>,
        tag: u64,
    ) -> Handle<'c, T> {
        let spec = spec_of(CollKind::AllGather, 0, T::DTYPE, ReduceOp::Sum);
        self.launch_shaped(spec, Some(src), dst, tag, None)
    }

    /// Starts a reduce-scatter of `src` into `dst` (`src.len()` / world elements; see
    /// [`crate::Communicator::reduce_scatter`]); the handle gives `dst` back.
    pub fn reduce_scatter_async<T: Element>(
        &self,
        src: Vec<T>,
        dst: Vec<T>,
        op: ReduceOp,
        tag: u64,
    ) -> Handle<'c, T> {
        let spec = spec_of(CollKind::ReduceScatter, 0, T::DTYPE, op);
        self.launch_shaped(spec, Some(src), dst, tag, None)
    }

    /// Starts a barrier (see [`crate::Communicator::barrier`]); the handle's buffer is empty.
    pub fn barrier_async(&self, tag: u64) -> Handle<'c, u8> {
        let spec = spec_of(CollKind::Barrier, 0, DType::U8, ReduceOp::Sum);
        self.launch_shaped(spec, None, Vec::new(), tag, None)
    }

    /// Any collective, with a deadline of its own: `src == None` means in place (`out` is then
    /// the one buffer).
    pub(super) fn launch_shaped<T: Element>(
        &self,
        mut spec: Spec,
        mut src: Option<Vec<T>>,
        mut out: Vec<T>,
        tag: u64,
        timeout: Option<Duration>,
    ) -> Handle<'c, T> {
        let inner = self.inner();
        let (rank, world) = inner.position();
        let src_view = src.as_mut().map(|s| raw_vec(bytemuck::cast_slice_mut(s)));
        let out_view = raw_vec(bytemuck::cast_slice_mut(&mut out));
        let mut pooled = Vec::new();
        let launched = layout(&mut spec, rank, world, src_view, out_view).and_then(|l| {
            let mut bufs = l.bufs;
            let mut take = |n: Option<usize>| -> Option<RawBuf> {
                let mut b = inner.take_backup(n?);
                let view = raw_vec(&mut b);
                pooled.push(b); // Moving the Vec does not move its heap memory.
                Some(view)
            };
            bufs.backup = take(l.backup);
            bufs.work = take(l.work);
            let timeout = timeout.unwrap_or(inner.config.op_timeout);
            // SAFETY: the handle owns `src`, `out` and the pooled buffers (their heap memory
            // does not move when the handle moves) until `complete` released them; a leaked
            // handle leaks them.
            unsafe { inner.launch(spec, bufs, None, tag, timeout) }?;
            // SAFETY: the handle owns the buffers; the data plane never touches an
            // all-gather's own slot of the output.
            unsafe { l.copy_own_slot() };
            Ok(())
        });
        Handle {
            inner: Arc::clone(inner),
            tag,
            buffers: Some(Buffers::Shaped {
                _src: src,
                out,
                pooled,
            }),
            launch_error: launched.err(),
            _borrow: PhantomData,
        }
    }
}
