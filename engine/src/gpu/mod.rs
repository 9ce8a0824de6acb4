//! CUDA device buffers: all-reduce GPU memory through pinned host staging, reduced on the GPU.
//!
//! A collective on device buffers runs the same ring as host buffers; only the ends of each
//! sub-chunk's journey change (see `plane/README.md`, "Device buffers"):
//!
//! * **Input.** When the master lets the collective go, the chunk this peer sends at step 0 is
//!   copied device → *mirror* (page-locked host memory of the buffer's size, from a pool) on the
//!   communicator's staging stream. TX threads wait for that copy's event before step 0.
//! * **Reduce steps.** The RX thread of connection `i` reads the frame into its *lane's* pinned
//!   host buffer, then on the lane's own CUDA stream: host → device scratch, the reduction kernel
//!   (`dst = src op scratch`, fused with the Avg division on the last step), and device → mirror
//!   of the result, which the TX thread forwards. Each connection has its own lane, so copies,
//!   kernels and network transfers of different sub-chunks overlap.
//! * **All-gather steps.** The frame is read straight into the mirror (TX forwards it from
//!   there) and copied mirror → device asynchronously; a lane waits for its stream only at its
//!   last receive of the collective.
//! * **In place**, the input is first copied device → device into a backup (the reduction reads
//!   it; a failure copies it back). No host copy is made beyond the staging.
//!
//! The files: `device.rs` is the communicator's GPU (`Gpu`: its context, staging stream, lanes
//! and mirror pool) and the pointers of user buffers; `attempt.rs` is one attempt of a collective (`DeviceAttempt`:
//! input staging, reduce and all-gather steps, settle and restore, `conclude`); `lane.rs` holds
//! a connection's lane and the frames queued on it; `buffer.rs` says which buffers qualify
//! ([`DeviceElement`]) and moves shared-state entries (`DeviceBytes`). The raw CUDA under them
//! (pinned memory, device memory, streams, copies, events) is `concord_kernels::cuda`'s, each
//! primitive behind one helper there; its errors (`KernelError`, the driver's error kept as the
//! source) reach the user as `Error::Cuda`.
//!
//! Everything here needs a CUDA driver; [`cuda_status`] says whether there is one, and why not.
//! The same code also runs against an *emulated* device (device memory is host memory, streams
//! run each operation at once, the CPU kernels reduce), which the tests use to exercise the
//! pipeline on machines without a GPU; users never get it by accident (it is a hidden entry point).

mod attempt;
mod buffer;
mod device;
mod lane;

/// The `cudarc` whose buffers Concord accepts (use this one, or the same version, to allocate).
pub use concord_kernels::cuda::cudarc;

pub use attempt::DeviceStages;
pub(crate) use attempt::{conclude, DeviceAttempt};
pub(crate) use buffer::DeviceBytes;
pub use buffer::DeviceElement;
pub(crate) use device::{device_ptr, device_ptr_mut, Gpu};
pub(crate) use lane::DeviceFrame;

/// Whether CUDA can be used here: `Ok(the device)` or `Err(why not)`. Never panics, also on hosts
/// without a driver.
pub fn cuda_status() -> Result<String, String> {
    concord_kernels::cuda::probe()
}
