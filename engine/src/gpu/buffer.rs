//! Which device buffers Concord takes, and a device buffer seen as raw bytes (shared-state
//! entries, downloaded and uploaded whole).

use concord_kernels::cuda::cudarc::driver::{CudaSlice, DeviceRepr};
use concord_kernels::KernelError;

use crate::Element;

/// An element type that can be all-reduced in device memory: every [`Element`] (f32, f64, f16,
/// bf16 and the integers) that `cudarc` can hold.
pub trait DeviceElement: Element + DeviceRepr {}
impl<T: Element + DeviceRepr> DeviceElement for T {}

/// A device buffer as raw bytes, for shared-state entries (downloaded and uploaded whole on the
/// buffer's own stream, so they are ordered after whatever its owner queued there).
pub(crate) trait DeviceBytes: Send {
    /// Replaces `out` with the buffer's bytes.
    fn download(&self, out: &mut Vec<u8>) -> Result<(), KernelError>;
    /// Overwrites the buffer with `bytes`, which must be exactly its size.
    fn upload(&mut self, bytes: &[u8]) -> Result<(), KernelError>;
}

impl<T: DeviceElement> DeviceBytes for CudaSlice<T> {
    fn download(&self, out: &mut Vec<u8>) -> Result<(), KernelError> {
        concord_kernels::cuda::download(self, out, "copying a shared-state entry to the host")
    }

    fn upload(&mut self, bytes: &[u8]) -> Result<(), KernelError> {
        if bytes.len() != self.num_bytes() {
            return Err(KernelError::Device(format!(
                "a shared-state entry of {} bytes cannot take {} bytes",
                self.num_bytes(),
                bytes.len()
            )));
        }
        concord_kernels::cuda::upload(self, bytes, "copying a shared-state entry to the device")
    }
}
