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
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use concord_kernels::{DType, ReduceOp};

use crate::communicator::{check_same_len, pending_vote, ReduceInfo};
use crate::core::Inner;
use crate::dataplane::RawBuf;
use crate::gpu::cudarc::driver::CudaSlice;
use crate::gpu::{DeviceElement, DeviceOp};
use crate::protocol::CANCEL_MARK;
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
        pending_vote(&self.inner)
    }
}

/// The buffers of one async collective, owned by its handle until it is over.
#[derive(Debug)]
enum Buffers<T> {
    /// `backup` (from the communicator's pool) receives each range's original just before the
    /// data plane first writes it; a failure puts the saved ranges back (in the core).
    InPlace {
        buf: Vec<T>,
        backup: Vec<u8>,
    },
    OutOfPlace {
        src: Vec<T>,
        dst: Vec<T>,
    },
}

/// An async collective in flight. It owns its buffers until the operation is over and gives them
/// back with the outcome.
///
/// Dropping a handle before it completed **blocks until the operation is over** (bounded by its
/// deadline, which the communicator's watchdog enforces): the I/O never writes into memory that
/// was freed or reused. Call [`Handle::cancel`] first to make that quick. Leaking a handle
/// (`mem::forget`) leaks its buffers, which stay valid for the I/O.
#[must_use = "a handle must be waited on (dropping it blocks until the operation is over)"]
pub struct Handle<'c, T: Element> {
    inner: Arc<Inner>,
    tag: u64,
    buffers: Option<Buffers<T>>,
    launch_error: Option<Error>,
    _borrow: PhantomData<&'c mut crate::Communicator>,
}

impl<T: Element> std::fmt::Debug for Handle<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("tag", &self.tag)
            .finish_non_exhaustive()
    }
}

/// What a finished async collective gives back: the output buffer (the reduced data, or the
/// original input again when it failed) and the outcome.
pub type Completion<T> = (Vec<T>, Result<ReduceInfo, Error>);

impl<'c> Collectives<'c> {
    pub(crate) fn new(inner: Arc<Inner>) -> Self {
        Collectives {
            inner,
            _borrow: PhantomData,
            _not_sync: PhantomData,
        }
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
        };
        let launch_error = if let Err(e) = check_same_len(src.len, dst.len, "bytes") {
            Some(e)
        } else {
            let timeout = timeout.unwrap_or(self.inner.config.op_timeout);
            // SAFETY: the vectors' heap memory does not move when the handle moves; the handle
            // keeps them until `complete` released them, and a leaked handle leaks them.
            unsafe {
                self.inner
                    .launch(src, dst, backup, None, dtype, op, tag, timeout)
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
            DeviceOp::new(g, None, d, len, T::DTYPE, op)
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
                        mirror,
                        mirror,
                        None,
                        Some(Arc::clone(&device)),
                        T::DTYPE,
                        op,
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

impl<T: Element> Handle<'_, T> {
    /// The tag of this collective.
    pub fn tag(&self) -> u64 {
        self.tag
    }

    /// Blocks until the collective is over; gives the output buffer back with the outcome.
    pub fn wait(mut self) -> Completion<T> {
        let result = self.outcome().wait();
        self.finish(result)
    }

    /// The outcome if the collective is over, or the handle back if not.
    #[allow(clippy::result_large_err)] // Giving the handle back is the point.
    pub fn try_wait(mut self) -> Result<Completion<T>, Self> {
        match self.outcome().try_wait() {
            Some(result) => Ok(self.finish(result)),
            None => Err(self),
        }
    }

    /// Asks every peer to abort this collective; each gets [`Error::Cancelled`] naming the tag,
    /// in-place inputs are restored, and the ring stays usable.
    pub fn cancel(&self) {
        if self.launch_error.is_none() {
            request_cancel(&self.inner, self.tag);
        }
    }

    fn outcome(&mut self) -> Outcome<'_> {
        Outcome {
            inner: &self.inner,
            tag: self.tag,
            launch_error: &mut self.launch_error,
        }
    }

    fn finish(&mut self, result: Result<ReduceInfo, Error>) -> Completion<T> {
        let buffers = self.buffers.take().expect("finished once");
        let out = match buffers {
            Buffers::InPlace { buf, backup } => {
                // On failure the core already put the input back.
                self.inner.give_backup(backup);
                buf
            }
            Buffers::OutOfPlace { dst, .. } => dst,
        };
        (out, result)
    }
}

impl<T: Element> Drop for Handle<'_, T> {
    fn drop(&mut self) {
        if self.buffers.is_some() && self.launch_error.is_none() {
            // The I/O may still use the buffers: wait for it to let go.
            let _ = self.inner.complete(self.tag);
        }
    }
}

impl<T: Element> Future for Handle<'_, T> {
    type Output = Completion<T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.buffers.is_none() {
            panic!("a concord Handle polled after it completed");
        }
        self.outcome().poll(cx).map(|result| self.finish(result))
    }
}

// Handles hold `Vec<T>` with `T: Send` and an `Arc<Inner>`; they are Send, so another thread
// may await them. `Unpin` lets them be `.await`ed and polled by hand.
impl<T: Element> Unpin for Handle<'_, T> {}

/// An async all-reduce of GPU memory in flight (see [`Collectives::all_reduce_device_async`]).
/// It owns the device buffer until the operation is over; dropping it blocks until then, as
/// [`Handle`] does.
#[must_use = "a handle must be waited on (dropping it blocks until the operation is over)"]
pub struct DeviceHandle<'c, T: DeviceElement> {
    inner: Arc<Inner>,
    tag: u64,
    buf: Option<CudaSlice<T>>,
    device: Option<Arc<DeviceOp>>,
    launch_error: Option<Error>,
    _borrow: PhantomData<&'c mut crate::Communicator>,
}

/// What a finished device collective gives back: the buffer and the outcome.
pub type DeviceCompletion<T> = (CudaSlice<T>, Result<ReduceInfo, Error>);

impl<T: DeviceElement> std::fmt::Debug for DeviceHandle<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceHandle")
            .field("tag", &self.tag)
            .finish_non_exhaustive()
    }
}

impl<T: DeviceElement> DeviceHandle<'_, T> {
    /// The tag of this collective.
    pub fn tag(&self) -> u64 {
        self.tag
    }

    /// Blocks until the collective is over; gives the buffer back with the outcome.
    pub fn wait(mut self) -> DeviceCompletion<T> {
        let result = self.outcome().wait();
        self.finish(result)
    }

    /// The outcome if the collective is over, or the handle back if not.
    #[allow(clippy::result_large_err)] // Giving the handle back is the point.
    pub fn try_wait(mut self) -> Result<DeviceCompletion<T>, Self> {
        match self.outcome().try_wait() {
            Some(result) => Ok(self.finish(result)),
            None => Err(self),
        }
    }

    /// Asks every peer to abort this collective (see [`Handle::cancel`]).
    pub fn cancel(&self) {
        if self.launch_error.is_none() {
            request_cancel(&self.inner, self.tag);
        }
    }

    fn outcome(&mut self) -> Outcome<'_> {
        Outcome {
            inner: &self.inner,
            tag: self.tag,
            launch_error: &mut self.launch_error,
        }
    }

    fn finish(&mut self, result: Result<ReduceInfo, Error>) -> DeviceCompletion<T> {
        let buf = self.buf.take().expect("finished once");
        let result = match self.device.take() {
            Some(device) => crate::gpu::conclude(&device, result),
            None => result,
        };
        (buf, result)
    }
}

impl<T: DeviceElement> Drop for DeviceHandle<'_, T> {
    fn drop(&mut self) {
        if self.buf.is_some() && self.launch_error.is_none() {
            // The copies and kernels may still use the buffer: wait for the collective to end.
            let result = self.inner.complete(self.tag);
            if let Some(device) = self.device.take() {
                let _ = crate::gpu::conclude(&device, result);
            }
        }
    }
}

impl<T: DeviceElement> Future for DeviceHandle<'_, T> {
    type Output = DeviceCompletion<T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.buf.is_none() {
            panic!("a concord DeviceHandle polled after it completed");
        }
        self.outcome().poll(cx).map(|result| self.finish(result))
    }
}

impl<T: DeviceElement> Unpin for DeviceHandle<'_, T> {}

/// What both handle kinds share: the collective's outcome, blocking, non-blocking or polled.
/// `launch_error` is the launch's own failure (taken once).
struct Outcome<'a> {
    inner: &'a Inner,
    tag: u64,
    launch_error: &'a mut Option<Error>,
}

impl Outcome<'_> {
    fn wait(self) -> Result<ReduceInfo, Error> {
        match self.launch_error.take() {
            Some(e) => Err(e),
            None => self.inner.complete(self.tag),
        }
    }

    fn try_wait(self) -> Option<Result<ReduceInfo, Error>> {
        match self.launch_error.take() {
            Some(e) => Some(Err(e)),
            None => self.inner.try_complete(self.tag),
        }
    }

    fn poll(self, cx: &mut Context<'_>) -> Poll<Result<ReduceInfo, Error>> {
        if let Some(e) = self.launch_error.take() {
            return Poll::Ready(Err(e));
        }
        if let Some(result) = self.inner.try_complete(self.tag) {
            return Poll::Ready(result);
        }
        self.inner.register_waker(self.tag, cx.waker());
        // The outcome may have landed between the check and the registration: check again.
        match self.inner.try_complete(self.tag) {
            Some(result) => Poll::Ready(result),
            None => Poll::Pending,
        }
    }
}

/// Asks the master to abort `tag` everywhere, naming this peer.
fn request_cancel(inner: &Inner, tag: u64) {
    let me = inner.lock().proto.peer_id().unwrap_or(0);
    inner.cancel(tag, format!("{CANCEL_MARK} by peer {me}"));
}
