//! An ordered queue of device work: a CUDA stream, or its emulated twin that runs each operation
//! at once.
//!
//! The engine's device pipeline is written once against [`Queue`] and [`Event`], and runs on a
//! GPU or, for tests on machines without one, on an emulated device whose "device memory" is
//! host memory. Every asynchronous copy goes through one of the three `unsafe` copy helpers
//! here, each stating what the caller must keep alive until the queue is synchronised.

use std::sync::Arc;

use cudarc::driver::{result, CudaEvent, CudaStream};

use crate::KernelError;

/// The `map_err` of every driver call in this module: what was being done, and the driver's
/// error as the source.
pub(super) fn driver(during: &'static str) -> impl Fn(result::DriverError) -> KernelError {
    move |source| KernelError::Driver { during, source }
}

/// An ordered queue of device work: a CUDA stream, or (emulated device) nothing, where every
/// operation is done when its call returns.
///
/// Cloning gives another handle to the same stream (the engine keeps its lanes' streams apart,
/// to wait for them without taking a lane).
#[doc(hidden)]
#[derive(Clone, Debug)]
pub struct Queue {
    stream: Option<Arc<CudaStream>>,
}

/// A point in a [`Queue`]'s work: a recorded CUDA event, or (emulated device) nothing, which is
/// complete at once.
#[doc(hidden)]
#[derive(Debug)]
pub struct Event {
    event: Option<CudaEvent>,
}

impl Queue {
    /// A queue on `stream`.
    pub fn cuda(stream: Arc<CudaStream>) -> Queue {
        Queue {
            stream: Some(stream),
        }
    }

    /// The emulated queue: every operation runs on the calling thread before its call returns.
    pub fn emulated() -> Queue {
        Queue { stream: None }
    }

    /// The CUDA stream, `None` on the emulated device.
    pub fn stream(&self) -> Option<&Arc<CudaStream>> {
        self.stream.as_ref()
    }

    /// Queues the copy of `dst.len()` bytes from device memory at `src` into `dst`.
    ///
    /// # Safety
    /// `src` is device memory of this queue's context (host memory on the emulated device)
    /// valid for `dst.len()` bytes of reads; `dst` stays alive, and nobody else reads or writes
    /// it, until the queue is synchronised (or an event recorded after this call completed).
    pub unsafe fn d2h(
        &self,
        dst: &mut [u8],
        src: u64,
        during: &'static str,
    ) -> Result<(), KernelError> {
        match &self.stream {
            // SAFETY: the caller's contract: `src` is valid for `dst.len()` bytes and `dst`
            // outlives the copy.
            Some(s) => unsafe { result::memcpy_dtoh_async(dst, src, s.cu_stream()) }
                .map_err(driver(during)),
            None => {
                // SAFETY: emulated device memory is host memory; the caller's contract makes
                // `src` valid for `dst.len()` bytes, and an exclusive `dst` cannot overlap it.
                unsafe {
                    std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len())
                };
                Ok(())
            }
        }
    }

    /// Queues the copy of `src` into device memory at `dst`.
    ///
    /// # Safety
    /// `dst` is device memory of this queue's context (host memory on the emulated device)
    /// valid for `src.len()` bytes of writes that nobody else touches until the copy is done;
    /// `src` stays alive and unchanged until the queue is synchronised.
    pub unsafe fn h2d(
        &self,
        dst: u64,
        src: &[u8],
        during: &'static str,
    ) -> Result<(), KernelError> {
        match &self.stream {
            // SAFETY: the caller's contract: `dst` is valid for `src.len()` bytes and `src`
            // outlives the copy unchanged.
            Some(s) => unsafe { result::memcpy_htod_async(dst, src, s.cu_stream()) }
                .map_err(driver(during)),
            None => {
                // SAFETY: as in `d2h`: host memory, valid for `src.len()` bytes, not
                // overlapping the caller's `src` (nobody else touches `dst`).
                unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
                Ok(())
            }
        }
    }

    /// Queues the copy of `len` bytes from device memory at `src` to device memory at `dst`.
    ///
    /// # Safety
    /// Both are device memory of this queue's context (host memory on the emulated device),
    /// valid for `len` bytes, not overlapping; nobody else writes `dst` or `src` until the copy
    /// is done.
    pub unsafe fn d2d(
        &self,
        dst: u64,
        src: u64,
        len: usize,
        during: &'static str,
    ) -> Result<(), KernelError> {
        if len == 0 {
            return Ok(());
        }
        match &self.stream {
            // SAFETY: the caller's contract.
            Some(s) => unsafe { result::memcpy_dtod_async(dst, src, len, s.cu_stream()) }
                .map_err(driver(during)),
            None => {
                // SAFETY: as in `d2h`: host memory valid for `len` bytes, not overlapping.
                unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, len) };
                Ok(())
            }
        }
    }

    /// Blocks until everything queued so far is done.
    pub fn sync(&self, during: &'static str) -> Result<(), KernelError> {
        match &self.stream {
            Some(s) => s.synchronize().map_err(driver(during)),
            None => Ok(()),
        }
    }

    /// Marks the current end of the queue: the event completes once everything queued so far
    /// did.
    pub fn record(&self) -> Result<Event, KernelError> {
        let event = self
            .stream
            .as_ref()
            .map(|s| s.record_event(None).map_err(driver("recording an event")))
            .transpose()?;
        Ok(Event { event })
    }

    /// Makes everything queued from now on wait for `event` (on the GPU; the calling thread
    /// does not block).
    pub fn wait(&self, event: &Event) -> Result<(), KernelError> {
        match (&self.stream, &event.event) {
            (Some(s), Some(ev)) => s.wait(ev).map_err(driver("ordering streams")),
            _ => Ok(()),
        }
    }

    /// Makes everything queued from now on wait for what `other` has queued so far (say, the
    /// owner of a user buffer finishing its backward pass on its own stream).
    pub fn wait_for_stream(&self, other: &CudaStream) -> Result<(), KernelError> {
        let Some(s) = &self.stream else {
            return Ok(());
        };
        let ev = other
            .record_event(None)
            .map_err(driver("recording an event"))?;
        s.wait(&ev).map_err(driver("ordering streams"))
    }
}

impl Event {
    /// Blocks until the work before the event is done (at once on the emulated device).
    pub fn synchronize(&self, during: &'static str) -> Result<(), KernelError> {
        match &self.event {
            Some(ev) => ev.synchronize().map_err(driver(during)),
            None => Ok(()),
        }
    }
}
