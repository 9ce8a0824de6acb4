//! Handles of async collectives in flight: each owns its buffers until the operation is over
//! and gives them back with the outcome; a future, or waited on.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::gpu::cudarc::driver::CudaSlice;
use crate::gpu::{DeviceAttempt, DeviceElement};
use crate::peer::Inner;
use concord_master::proto::AbortKind;

use crate::results::ReduceInfo;
use crate::{Element, Error};

/// The buffers of one async collective, owned by its handle until it is over.
#[derive(Debug)]
pub(super) enum Buffers<T> {
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
    /// Any collective, laid out by `layout.rs`: `out` is what the handle gives back (the one
    /// buffer in place), `pooled` the backup and scratch it took from the communicator's pool.
    Shaped {
        /// The input, owned only so that the I/O may read it until the end.
        _src: Option<Vec<T>>,
        out: Vec<T>,
        pooled: Vec<Vec<u8>>,
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
    pub(super) inner: Arc<Inner>,
    pub(super) tag: u64,
    pub(super) buffers: Option<Buffers<T>>,
    pub(super) launch_error: Option<Error>,
    pub(super) _borrow: PhantomData<&'c mut crate::Communicator>,
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
            Buffers::Shaped { out, pooled, .. } => {
                for b in pooled {
                    self.inner.give_backup(b);
                }
                out
            }
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

/// An async all-reduce of GPU memory in flight (see [`Collectives::all_reduce_device_async`](crate::Collectives::all_reduce_device_async)).
/// It owns the device buffer until the operation is over; dropping it blocks until then, as
/// [`Handle`] does.
#[must_use = "a handle must be waited on (dropping it blocks until the operation is over)"]
pub struct DeviceHandle<'c, T: DeviceElement> {
    pub(super) inner: Arc<Inner>,
    pub(super) tag: u64,
    pub(super) buf: Option<CudaSlice<T>>,
    pub(super) device: Option<Arc<DeviceAttempt>>,
    pub(super) launch_error: Option<Error>,
    pub(super) _borrow: PhantomData<&'c mut crate::Communicator>,
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
    inner.cancel(tag, AbortKind::Cancelled, format!("cancelled by peer {me}"));
}
