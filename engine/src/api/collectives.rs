//! Async collectives and the types that enforce the threading rules.
//!
//! The rules we inherit (one operation kind at a time; many async collectives may be in flight;
//! the owner's thread may only ask whether peers are pending while another thread launches and
//! awaits them) map onto types:
//!
//! * [`crate::Communicator`] is `Send + !Sync`: one thread owns it.
//! * [`crate::Communicator::split`] borrows it mutably and yields a [`Collectives`] (`Send`,
//!   `!Sync`: it may move to one other thread) and a [`PeerProbe`] (`!Send`: it stays with the
//!   owner and can only ask [`PeerProbe::are_new_peers_pending`]).
//! * Every [`Handle`] carries that borrow's lifetime, so `update_topology` cannot be called until
//!   all handles are gone. Handles are `Send`: they may be awaited on any thread.
//!
//! What the types cannot see (a duplicate tag, a topology vote racing a collective on another
//! peer) is checked at run time with a clear error.

use std::cell::Cell;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use concord_kernels::{DType, ReduceOp};

use super::all_reduce::check_same_len;
use super::handle::Completion;
use super::handle::{Buffers, DeviceHandle, Handle};
use crate::collective::Spec;
use crate::gpu::cudarc::driver::CudaSlice;
use crate::gpu::{DeviceAttempt, DeviceElement};
use crate::peer::Inner;
use crate::raw_buf::{Bufs, RawBuf};
use crate::{Element, Error};

/// Launches and awaits async collectives; may be moved to one other thread.
///
/// ```compile_fail
/// # fn f(comm: &mut concord::Communicator) {
/// let (collectives, _probe) = comm.split();
/// // Not Sync: two threads cannot share one launcher.
/// std::thread::scope(|s| { s.spawn(|| drop(&collectives)); s.spawn(|| drop(&collectives)); });
/// # }
/// ```
pub struct Collectives<'c> {
    inner: Arc<Inner>,
    _borrow: PhantomData<&'c mut crate::Communicator>,
    _not_sync: PhantomData<Cell<()>>,
}

/// What the owner's thread keeps while a [`Collectives`] is out: the pending-peers vote only.
pub struct PeerProbe<'c> {
    inner: Arc<Inner>,
    _borrow: PhantomData<&'c crate::Communicator>,
    _not_send: PhantomData<*const ()>,
}

impl std::fmt::Debug for Collectives<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Collectives").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for PeerProbe<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerProbe").finish_non_exhaustive()
    }
}

impl PeerProbe<'_> {
    pub(crate) fn new(inner: Arc<Inner>) -> Self {
        PeerProbe {
            inner,
            _borrow: PhantomData,
            _not_send: PhantomData,
        }
    }

    /// Whether peers are waiting to join (a unanimous vote; every member must ask).
    pub fn are_new_peers_pending(&self) -> Result<bool, Error> {
        self.inner.pending_vote()
    }
}

impl<'c> Collectives<'c> {
    pub(crate) fn new(inner: Arc<Inner>) -> Self {
        Collectives {
            inner,
            _borrow: PhantomData,
            _not_sync: PhantomData,
        }
    }

    pub(super) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    /// Starts an in-place all-reduce of `buf` and returns at once (after backpressure: with
    /// `max_in_flight` collectives already out, it blocks until one completes or its deadline
    /// passes). The handle gives `buf` back when it is over.
    pub fn all_reduce_async<T: Element>(
        &self,
        buf: Vec<T>,
        op: ReduceOp,
        tag: u64,
    ) -> Handle<'c, T> {
        self.launch(self.in_place(buf), op, tag, None)
    }

    /// The untyped form of [`Collectives::all_reduce_async`]: `buf` holds `dtype` elements.
    pub fn all_reduce_async_raw(
        &self,
        buf: Vec<u8>,
        dtype: DType,
        op: ReduceOp,
        tag: u64,
    ) -> Handle<'c, u8> {
        let buffers = self.in_place(buf);
        if !buffers_len(&buffers).is_multiple_of(dtype.size_bytes()) {
            let e = Error::InvalidArgument(format!(
                "{} bytes are not a whole number of {dtype} elements",
                buffers_len(&buffers)
            ));
            let inner = Arc::clone(&self.inner);
            return Handle {
                inner,
                tag,
                buffers: Some(buffers),
                launch_error: Some(e),
                _borrow: PhantomData,
            };
        }
        self.launch_as(buffers, dtype, op, tag, None)
    }

    /// Starts an out-of-place all-reduce; the handle gives `dst` back (and drops `src`).
    pub fn all_reduce_async_into<T: Element>(
        &self,
        src: Vec<T>,
        dst: Vec<T>,
        op: ReduceOp,
        tag: u64,
    ) -> Handle<'c, T> {
        self.launch(Buffers::OutOfPlace { src, dst }, op, tag, None)
    }

    /// As [`Collectives::all_reduce_async`], with a deadline of its own.
    pub fn all_reduce_async_timeout<T: Element>(
        &self,
        buf: Vec<T>,
        op: ReduceOp,
        tag: u64,
        timeout: Duration,
    ) -> Handle<'c, T> {
        self.launch(self.in_place(buf), op, tag, Some(timeout))
    }

    /// The in-place buffers of `buf`, with a pooled backup (filled lazily by the data plane).
    fn in_place<T: Element>(&self, buf: Vec<T>) -> Buffers<T> {
        let backup = self
            .inner
            .take_backup(std::mem::size_of_val(buf.as_slice()));
        Buffers::InPlace { buf, backup }
    }

    fn launch<T: Element>(
        &self,
        buffers: Buffers<T>,
        op: ReduceOp,
        tag: u64,
        timeout: Option<Duration>,
    ) -> Handle<'c, T> {
        self.launch_as(buffers, T::DTYPE, op, tag, timeout)
    }

    fn launch_as<T: Element>(
        &self,
        mut buffers: Buffers<T>,
        dtype: DType,
        op: ReduceOp,
        tag: u64,
        timeout: Option<Duration>,
    ) -> Handle<'c, T> {
        let (src, dst, backup) = match &mut buffers {
            Buffers::InPlace { buf, backup } => {
                let dst = raw_mut(buf);
                (dst, dst, Some(raw_mut(backup)))
            }
            Buffers::OutOfPlace { src, dst } => (raw(src), raw_mut(dst), None),
            Buffers::Shaped { .. } => unreachable!("shaped buffers launch through launch_shaped"),
        };
        let launch_error = if let Err(e) = check_same_len(src.len, dst.len, "bytes") {
            Some(e)
        } else {
            let timeout = timeout.unwrap_or(self.inner.config.op_timeout);
            // SAFETY: the vectors' heap memory does not move when the handle moves; the handle
            // keeps them until `complete` released them, and a leaked handle leaks them.
            unsafe {
                self.inner.launch(
                    Spec::all_reduce(dtype, op, dst.len / dtype.size_bytes()),
                    Bufs::new(src, dst, backup),
                    None,
                    tag,
                    timeout,
                )
            }
            .err()
        };
        Handle {
            inner: Arc::clone(&self.inner),
            tag,
            buffers: Some(buffers),
            launch_error,
            _borrow: PhantomData,
        }
    }

    /// Starts an in-place all-reduce of GPU memory and returns at once (after the same
    /// backpressure as [`Collectives::all_reduce_async`]). The handle owns `buf` until it is
    /// over and gives it back, reduced, or restored on failure. `timeout` overrides the
    /// communicator's deadline.
    pub fn all_reduce_device_async<T: DeviceElement>(
        &self,
        mut buf: CudaSlice<T>,
        op: ReduceOp,
        tag: u64,
        timeout: Option<Duration>,
    ) -> DeviceHandle<'c, T> {
        let len = std::mem::size_of::<T>() * buf.len();
        let prepared = self.inner.gpu(buf.context()).and_then(|g| {
            let d = crate::gpu::device_ptr_mut(&g, &mut buf).map_err(Error::Cuda)?;
            DeviceAttempt::new(g, None, d, len, T::DTYPE, op)
                .map(Arc::new)
                .map_err(Error::Cuda)
        });
        let (device, launch_error) = match prepared {
            Err(e) => (None, Some(e)),
            Ok(device) => {
                let mirror = device.mirror();
                let timeout = timeout.unwrap_or(self.inner.config.op_timeout);
                // SAFETY: the handle owns `buf` (its device memory does not move) and `device`
                // (which owns the mirror) until `complete` released them; a leaked handle leaks
                // them.
                let launched = unsafe {
                    self.inner.launch(
                        Spec::all_reduce(T::DTYPE, op, len / T::DTYPE.size_bytes()),
                        Bufs::new(mirror, mirror, None),
                        Some(Arc::clone(&device)),
                        tag,
                        timeout,
                    )
                };
                (Some(device), launched.err())
            }
        };
        DeviceHandle {
            inner: Arc::clone(&self.inner),
            tag,
            buf: Some(buf),
            device,
            launch_error,
            _borrow: PhantomData,
        }
    }

    /// Runs a batch of tagged in-place all-reduces with at most `max_in_flight` in flight, and
    /// returns every buffer with its outcome, in the batch's order.
    pub fn all_reduce_many<T: Element>(
        &self,
        batch: Vec<(u64, Vec<T>)>,
        op: ReduceOp,
        max_in_flight: usize,
    ) -> Vec<(u64, Completion<T>)> {
        let k = max_in_flight.max(1);
        let mut pending = std::collections::VecDeque::new();
        let mut done = Vec::with_capacity(batch.len());
        for (tag, buf) in batch {
            if pending.len() == k {
                let h: Handle<'c, T> = pending.pop_front().expect("non-empty");
                done.push((h.tag, h.wait()));
            }
            pending.push_back(self.all_reduce_async(buf, op, tag));
        }
        done.extend(pending.into_iter().map(|h| (h.tag, h.wait())));
        done
    }
}

fn buffers_len<T: Element>(b: &Buffers<T>) -> usize {
    match b {
        Buffers::InPlace { buf, .. } => std::mem::size_of_val(buf.as_slice()),
        Buffers::OutOfPlace { dst, .. } => std::mem::size_of_val(dst.as_slice()),
        Buffers::Shaped { out, .. } => std::mem::size_of_val(out.as_slice()),
    }
}

fn raw<T: Element>(v: &[T]) -> RawBuf {
    let bytes: &[u8] = bytemuck::cast_slice(v);
    RawBuf {
        ptr: bytes.as_ptr() as *mut u8,
        len: bytes.len(),
    }
}

fn raw_mut<T: Element>(v: &mut [T]) -> RawBuf {
    let bytes: &mut [u8] = bytemuck::cast_slice_mut(v);
    RawBuf {
        ptr: bytes.as_mut_ptr(),
        len: bytes.len(),
    }
}
