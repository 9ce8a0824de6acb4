//! Device memory: what Concord allocates for itself ([`DevMem`]: lane scratch, in-place
//! backups), and the user's own buffers (`CudaSlice`), reached as raw pointers ordered after
//! their owner's stream or copied whole to and from the host.
//!
//! The device pipeline works on raw device pointers (`u64`) so that one collective can span a
//! user's buffer, Concord's scratch and several streams; these helpers are where those pointers
//! come from, and where a user's stream and Concord's are put in order.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};

use super::queue::{driver, Queue};
use crate::KernelError;

/// Device memory Concord owns: a `CudaSlice`, or host memory on the emulated device. Freed on
/// drop (cudarc orders the free after the work of the stream it was allocated on).
#[doc(hidden)]
#[derive(Debug)]
pub struct DevMem {
    mem: Mem,
}

#[derive(Debug)]
enum Mem {
    Cuda(CudaSlice<u8>),
    Emulated(Vec<u8>),
}

impl DevMem {
    /// At least `len` bytes (at least one: CUDA refuses empty allocations), allocated on
    /// `queue`'s stream; uninitialised on a GPU (zeroed when emulated): write before reading.
    /// `during` names the allocation in an error.
    pub fn alloc(queue: &Queue, len: usize, during: &'static str) -> Result<DevMem, KernelError> {
        let mem = match queue.stream() {
            // SAFETY: uninitialised device memory is never a Rust value: it is only reached
            // through raw pointers by the unsafe copies and launches, whose callers write it
            // before they read it.
            Some(s) => unsafe { s.alloc::<u8>(len.max(1)) }
                .map(Mem::Cuda)
                .map_err(driver(during))?,
            None => Mem::Emulated(vec![0; len.max(1)]),
        };
        Ok(DevMem { mem })
    }

    /// Its size in bytes (at least 1).
    pub fn len(&self) -> usize {
        match &self.mem {
            Mem::Cuda(s) => s.len(),
            Mem::Emulated(v) => v.len(),
        }
    }

    /// Never: an allocation holds at least one byte (kept for the `len` convention).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Its raw device pointer, for work queued on `queue` (a queue of the same device: the
    /// emulated memory on the emulated queue, CUDA memory on a CUDA one).
    pub fn ptr(&mut self, queue: &Queue) -> u64 {
        match (&mut self.mem, queue.stream()) {
            (Mem::Cuda(s), Some(stream)) => s.device_ptr(stream).0,
            (Mem::Emulated(v), _) => v.as_mut_ptr() as u64,
            (Mem::Cuda(_), None) => unreachable!("CUDA memory is used on CUDA streams"),
        }
    }
}

/// The raw pointer of a user buffer that work on `queue` will read, after making `queue` wait
/// for what the buffer's own stream has queued so far (say, the backward pass writing it).
/// `queue` must be a CUDA queue of the buffer's context.
pub fn read_ptr<T>(queue: &Queue, slice: &CudaSlice<T>) -> Result<u64, KernelError> {
    let stream = cuda_stream(queue)?;
    queue.wait_for_stream(slice.stream())?;
    let (ptr, _record) = slice.device_ptr(stream);
    Ok(ptr)
}

/// As [`read_ptr`], for a user buffer that work on `queue` will write.
pub fn write_ptr<T>(queue: &Queue, slice: &mut CudaSlice<T>) -> Result<u64, KernelError> {
    let stream = cuda_stream(queue)?;
    queue.wait_for_stream(slice.stream())?;
    let (ptr, _record) = slice.device_ptr_mut(stream);
    Ok(ptr)
}

fn cuda_stream(queue: &Queue) -> Result<&Arc<cudarc::driver::CudaStream>, KernelError> {
    queue.stream().ok_or_else(|| KernelError::CudaUnavailable {
        reason: "a CUDA buffer cannot be used on the emulated device".to_owned(),
    })
}

/// Copies all of `slice` into `out` (resized to its size) on the slice's own stream, and waits
/// for the copy. `during` names the work in an error.
pub fn download<T>(
    slice: &CudaSlice<T>,
    out: &mut Vec<u8>,
    during: &'static str,
) -> Result<(), KernelError> {
    let stream = slice.stream();
    out.resize(slice.num_bytes(), 0);
    if out.is_empty() {
        return Ok(());
    }
    let queue = Queue::cuda(Arc::clone(stream));
    let (ptr, _record) = slice.device_ptr(stream);
    // SAFETY: `ptr` is this slice's memory, valid for `num_bytes` = `out.len()` bytes while the
    // slice is borrowed; `out` is exclusively borrowed until the synchronisation below.
    unsafe { queue.d2h(out.as_mut_slice(), ptr, during) }?;
    queue.sync(during)
}

/// Copies `bytes` over all of `slice` on the slice's own stream, and waits for the copy;
/// `bytes` must be exactly the slice's size. `during` names the work in an error.
pub fn upload<T>(
    slice: &mut CudaSlice<T>,
    bytes: &[u8],
    during: &'static str,
) -> Result<(), KernelError> {
    crate::check_same("bytes", bytes.len(), slice.num_bytes())?;
    if bytes.is_empty() {
        return Ok(());
    }
    let stream = Arc::clone(slice.stream());
    let queue = Queue::cuda(Arc::clone(&stream));
    let (ptr, _record) = slice.device_ptr_mut(&stream);
    // SAFETY: `ptr` is this slice's memory, valid for `bytes.len()` bytes (checked above) and
    // exclusively borrowed; `bytes` lives unchanged until the synchronisation below.
    unsafe { queue.h2d(ptr, bytes, during) }?;
    queue.sync(during)
}
