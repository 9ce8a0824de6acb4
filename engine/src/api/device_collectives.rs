//! Broadcasts, reduces, all-gathers and reduce-scatters of GPU memory. Each is staged through
//! host memory on the buffers' own streams (so it is ordered after the work their owners queued
//! there): the input is copied to the host, the host collective runs (reductions with the CPU
//! kernels), and the output is copied back. All-reduces of GPU memory have their own pipeline
//! with reductions on the GPU (`gpu/`).

use concord_kernels::cuda::{download, upload};
use concord_kernels::ReduceOp;

use super::communicator::Communicator;
use crate::gpu::cudarc::driver::CudaSlice;
use crate::gpu::DeviceElement;
use crate::results::ReduceInfo;
use crate::Error;

fn to_host<T: DeviceElement>(buf: &CudaSlice<T>) -> Result<Vec<u8>, Error> {
    let mut host = Vec::new();
    download(buf, &mut host, "copying a collective's input to the host").map_err(Error::Cuda)?;
    Ok(host)
}

fn to_device<T: DeviceElement>(buf: &mut CudaSlice<T>, host: &[u8]) -> Result<(), Error> {
    upload(buf, host, "copying a collective's output to the device").map_err(Error::Cuda)
}

impl Communicator {
    /// [`Communicator::broadcast`] of GPU memory: every peer's `buf` ends as the root's.
    pub fn broadcast_device<T: DeviceElement>(
        &self,
        buf: &mut CudaSlice<T>,
        root: usize,
        tag: u64,
    ) -> Result<ReduceInfo, Error> {
        let mut host = if self.rank() == root {
            to_host(buf)?
        } else {
            vec![0u8; buf.num_bytes()]
        };
        let info = self.broadcast_raw(&mut host, T::DTYPE, root, tag, None)?;
        if self.rank() != root {
            to_device(buf, &host)?;
        }
        Ok(info)
    }

    /// [`Communicator::reduce`] of GPU memory: the root's `dst` ends as `op` over every peer's
    /// `src`; elsewhere `dst` is left untouched.
    pub fn reduce_device<T: DeviceElement>(
        &self,
        src: &CudaSlice<T>,
        dst: &mut CudaSlice<T>,
        op: ReduceOp,
        root: usize,
        tag: u64,
    ) -> Result<ReduceInfo, Error> {
        let input = to_host(src)?;
        let on_root = self.rank() == root;
        let mut out = vec![0u8; if on_root { dst.num_bytes() } else { 0 }];
        let info = self.reduce_raw(Some(&input), &mut out, T::DTYPE, op, root, tag, None)?;
        if on_root {
            to_device(dst, &out)?;
        }
        Ok(info)
    }

    /// [`Communicator::all_gather`] of GPU memory: `dst` (world × `src.len()` elements) ends
    /// with every peer's `src` in rank order.
    pub fn all_gather_device<T: DeviceElement>(
        &self,
        src: &CudaSlice<T>,
        dst: &mut CudaSlice<T>,
        tag: u64,
    ) -> Result<ReduceInfo, Error> {
        let input = to_host(src)?;
        let mut out = vec![0u8; dst.num_bytes()];
        let info = self.all_gather_raw(Some(&input), &mut out, T::DTYPE, tag, None)?;
        to_device(dst, &out)?;
        Ok(info)
    }

    /// [`Communicator::reduce_scatter`] of GPU memory: `dst` (`src.len()` / world elements)
    /// ends as slot `rank` of `op` over every peer's `src`.
    pub fn reduce_scatter_device<T: DeviceElement>(
        &self,
        src: &CudaSlice<T>,
        dst: &mut CudaSlice<T>,
        op: ReduceOp,
        tag: u64,
    ) -> Result<ReduceInfo, Error> {
        let input = to_host(src)?;
        let mut out = vec![0u8; dst.num_bytes()];
        let info = self.reduce_scatter_raw(Some(&input), &mut out, T::DTYPE, op, tag, None)?;
        to_device(dst, &out)?;
        Ok(info)
    }
}
