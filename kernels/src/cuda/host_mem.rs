//! Host memory the GPU copies to and from: page-locked by `cuMemHostAlloc` on a real GPU, a plain
//! allocation on the emulated device.
//!
//! Page-locked memory is what lets a device copy run asynchronously (the driver DMAs straight
//! from it, with no bounce through its own staging), so every host end of a queued copy should
//! be one of these. It is allocated without `CU_MEMHOSTALLOC_WRITECOMBINED`: the CPU reads it
//! (to send it over the network), and write-combined memory is very slow to read. The driver
//! pins it itself, so `RLIMIT_MEMLOCK` does not apply. Allocating it costs milliseconds per
//! hundred MiB: keep and reuse it.

use std::sync::Arc;

use cudarc::driver::{result, CudaContext};

use super::queue::driver;
use crate::KernelError;

/// Page-locked host memory of one context (or, on the emulated device, a plain allocation),
/// freed on drop.
///
/// The bytes start zeroed on the emulated device and undefined on a GPU: write before reading.
/// Whoever queues a copy from or to it must keep it alive until that copy is done (the unsafe
/// copy helpers of [`Queue`](super::Queue) say so).
#[doc(hidden)]
pub struct HostMem {
    ptr: *mut u8,
    len: usize,
    /// `Some`: freed with `cuMemFreeHost` in this context; `None`: the memory is `_plain`.
    ctx: Option<Arc<CudaContext>>,
    /// Owns the emulated device's memory (`ptr` points into it; never touched otherwise).
    _plain: Vec<u8>,
}

// SAFETY: the allocation is plain host memory owned by this value, not tied to the thread
// that made it (`cuMemFreeHost` only needs the context, which `Drop` binds).
unsafe impl Send for HostMem {}
// SAFETY: shared access only hands out `&[u8]` and the raw pointer; writes through the pointer
// are synchronised by its users (the engine's data-plane flags or its lane mutex).
unsafe impl Sync for HostMem {}

impl HostMem {
    /// `len` bytes of page-locked memory in `ctx`: a plain allocation for `len == 0` (which
    /// `cuMemHostAlloc` refuses).
    pub fn pinned(ctx: &Arc<CudaContext>, len: usize) -> Result<HostMem, KernelError> {
        if len == 0 {
            return Ok(HostMem::plain(0));
        }
        ctx.bind_to_thread()
            .map_err(driver("binding the context"))?;
        // SAFETY: a plain allocation of `len` bytes with no flags; freed in Drop with
        // cuMemFreeHost, in the same context.
        let ptr =
            unsafe { result::malloc_host(len, 0) }.map_err(|source| KernelError::HostAlloc {
                len_bytes: len,
                source,
            })?;
        Ok(HostMem {
            ptr: ptr.cast(),
            len,
            ctx: Some(Arc::clone(ctx)),
            _plain: Vec::new(),
        })
    }

    /// `len` zeroed bytes of ordinary host memory (the emulated device's staging).
    pub fn plain(len: usize) -> HostMem {
        let mut plain = vec![0u8; len];
        HostMem {
            ptr: plain.as_mut_ptr(),
            len,
            ctx: None,
            _plain: plain,
        }
    }

    /// Its size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether it is page-locked (a GPU's) rather than plain (the emulated device's).
    pub fn is_pinned(&self) -> bool {
        self.ctx.is_some()
    }

    /// The first byte, for views shared between threads that synchronise their writes
    /// themselves. Valid for `len()` bytes while `self` lives.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// The bytes, to read (nobody may write them meanwhile, through [`HostMem::as_ptr`] or a
    /// queued copy).
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `len` bytes while `self` lives (allocated in a
        // constructor, freed in Drop); writers through the raw pointer or a device copy are
        // excluded by the users' synchronisation, as documented above.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The bytes, to write (no queued copy may still read or write them).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` excludes every other Rust access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for HostMem {
    fn drop(&mut self) {
        if let Some(ctx) = &self.ctx {
            let _ = ctx.bind_to_thread();
            // SAFETY: allocated by cuMemHostAlloc in `pinned`, freed once; no copy uses it any
            // more (every user synchronises its queues before dropping it).
            let _ = unsafe { result::free_host(self.ptr.cast()) };
        }
    }
}

impl std::fmt::Debug for HostMem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostMem")
            .field("len", &self.len)
            .field("pinned", &self.is_pinned())
            .finish()
    }
}
