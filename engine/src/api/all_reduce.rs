//! Blocking all-reduces: host and device buffers, typed and raw.

use std::sync::Arc;
use std::time::Duration;

use concord_kernels::{DType, ReduceOp};

use super::communicator::Communicator;
use crate::collective::Spec;
use crate::gpu::cudarc::driver::CudaSlice;
use crate::gpu::{self, DeviceAttempt, DeviceElement};
use crate::raw_buf::Bufs;
use crate::results::ReduceInfo;
use crate::{Element, Error};

/// Out-of-place buffers must have as many elements (`unit`s) each.
pub(crate) fn check_same_len(src: usize, dst: usize, unit: &str) -> Result<(), Error> {
    if src == dst {
        return Ok(());
    }
    Err(Error::InvalidArgument(format!(
        "src has {src} {unit} and dst {dst}: they must match"
    )))
}

/// The untyped entry points' check: `dst_len` bytes (and `src_len`, when out of place) hold
/// whole, equal numbers of `dtype` elements.
fn check_raw(src_len: Option<usize>, dst_len: usize, dtype: DType) -> Result<(), Error> {
    if dst_len.is_multiple_of(dtype.size_bytes()) && src_len.is_none_or(|s| s == dst_len) {
        return Ok(());
    }
    Err(Error::InvalidArgument(format!(
        "buffers of {} and {dst_len} bytes do not hold whole, equal numbers of {dtype} elements",
        src_len.unwrap_or(dst_len)
    )))
}

impl Communicator {
    /// Out-of-place all-reduce: `dst = op over all peers of their src`. Blocks until every peer
    /// is done. `tag` tells concurrent collectives apart (unique among those in flight).
    pub fn all_reduce<T: Element>(
        &self,
        src: &[T],
        dst: &mut [T],
        op: ReduceOp,
        tag: u64,
    ) -> Result<ReduceInfo, Error> {
        check_same_len(src.len(), dst.len(), "elements")?;
        self.blocking(
            Some(bytemuck::cast_slice(src)),
            bytemuck::cast_slice_mut(dst),
            T::DTYPE,
            op,
            tag,
            None,
        )
    }

    /// In-place all-reduce. On failure `buf` holds its original contents again.
    pub fn all_reduce_in_place<T: Element>(
        &self,
        buf: &mut [T],
        op: ReduceOp,
        tag: u64,
    ) -> Result<ReduceInfo, Error> {
        self.blocking(None, bytemuck::cast_slice_mut(buf), T::DTYPE, op, tag, None)
    }

    /// The untyped form, with an optional deadline of its own: `src == None` means in place.
    /// Lengths in bytes.
    pub fn all_reduce_raw(
        &self,
        src: Option<&[u8]>,
        dst: &mut [u8],
        dtype: DType,
        op: ReduceOp,
        tag: u64,
        timeout: Option<Duration>,
    ) -> Result<ReduceInfo, Error> {
        check_raw(src.map(<[u8]>::len), dst.len(), dtype)?;
        self.blocking(src, dst, dtype, op, tag, timeout)
    }

    /// Out-of-place all-reduce of GPU memory: `dst = op over all peers of their src`, reduced
    /// on the GPU (see [`crate::gpu`]). Blocks until every peer is done; work the buffers'
    /// owners queued on their streams is waited for on the GPU, not on the host. Needs CUDA:
    /// without it no `CudaSlice` can exist, and [`crate::cuda_status`] says why.
    pub fn all_reduce_device<T: DeviceElement>(
        &self,
        src: &CudaSlice<T>,
        dst: &mut CudaSlice<T>,
        op: ReduceOp,
        tag: u64,
    ) -> Result<ReduceInfo, Error> {
        check_same_len(src.len(), dst.len(), "elements")?;
        let gpu = self.inner.gpu(dst.context())?;
        let s = gpu::device_ptr(&gpu, src).map_err(Error::Cuda)?;
        let d = gpu::device_ptr_mut(&gpu, dst).map_err(Error::Cuda)?;
        let len = std::mem::size_of::<T>() * dst.len();
        self.blocking_device(gpu, Some(s), d, len, T::DTYPE, op, tag)
    }

    /// In-place all-reduce of GPU memory. On failure `buf` holds its original contents again
    /// (restored from a device-side backup).
    pub fn all_reduce_device_in_place<T: DeviceElement>(
        &self,
        buf: &mut CudaSlice<T>,
        op: ReduceOp,
        tag: u64,
    ) -> Result<ReduceInfo, Error> {
        let gpu = self.inner.gpu(buf.context())?;
        let d = gpu::device_ptr_mut(&gpu, buf).map_err(Error::Cuda)?;
        let len = std::mem::size_of::<T>() * buf.len();
        self.blocking_device(gpu, None, d, len, T::DTYPE, op, tag)
    }

    /// The untyped form: `dst` holds `dtype` elements; `src == None` means in place.
    pub fn all_reduce_device_raw(
        &self,
        src: Option<&CudaSlice<u8>>,
        dst: &mut CudaSlice<u8>,
        dtype: DType,
        op: ReduceOp,
        tag: u64,
    ) -> Result<ReduceInfo, Error> {
        check_raw(src.map(CudaSlice::len), dst.len(), dtype)?;
        let gpu = self.inner.gpu(dst.context())?;
        let s = src
            .map(|s| gpu::device_ptr(&gpu, s))
            .transpose()
            .map_err(Error::Cuda)?;
        let d = gpu::device_ptr_mut(&gpu, dst).map_err(Error::Cuda)?;
        let len = dst.len();
        self.blocking_device(gpu, s, d, len, dtype, op, tag)
    }

    /// **For tests, not for users.** Runs the device-buffer pipeline (mirror, lanes, staging,
    /// backup and restore) against an *emulated* device whose memory is host memory: `dst` (and
    /// `src`; `None` means in place) stand in for device buffers. It lets machines without a
    /// GPU test everything of the device path but the CUDA calls themselves.
    #[doc(hidden)]
    pub fn all_reduce_emulated_device(
        &self,
        src: Option<&[u8]>,
        dst: &mut [u8],
        dtype: DType,
        op: ReduceOp,
        tag: u64,
    ) -> Result<ReduceInfo, Error> {
        check_raw(src.map(<[u8]>::len), dst.len(), dtype)?;
        let gpu = self.inner.emulated_gpu();
        let s = src.map(|s| s.as_ptr() as u64);
        let len = dst.len();
        self.blocking_device(gpu, s, dst.as_mut_ptr() as u64, len, dtype, op, tag)
    }

    #[allow(clippy::too_many_arguments)]
    fn blocking_device(
        &self,
        gpu: Arc<gpu::Gpu>,
        src: Option<u64>,
        dst: u64,
        len: usize,
        dtype: DType,
        op: ReduceOp,
        tag: u64,
    ) -> Result<ReduceInfo, Error> {
        let timeout = self.inner.config.op_timeout;
        let device =
            Arc::new(DeviceAttempt::new(gpu, src, dst, len, dtype, op).map_err(Error::Cuda)?);
        let mirror = device.mirror();
        // SAFETY: the device buffers are borrowed for this whole call, and the mirror belongs to
        // `device`; the call returns only through `complete`, after the data plane let go.
        unsafe {
            self.inner.launch(
                Spec::all_reduce(dtype, op, len / dtype.size_bytes()),
                Bufs::new(mirror, mirror, None),
                Some(Arc::clone(&device)),
                tag,
                timeout,
            )?
        };
        gpu::conclude(&device, self.inner.complete(tag))
    }

    fn blocking(
        &self,
        src: Option<&[u8]>,
        dst: &mut [u8],
        dtype: DType,
        op: ReduceOp,
        tag: u64,
        timeout: Option<Duration>,
    ) -> Result<ReduceInfo, Error> {
        self.run_host(Spec::all_reduce(dtype, op, 0), src, dst, tag, timeout)
    }
}
