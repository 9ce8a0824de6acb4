//! A connection's lane (its CUDA stream, two pinned receive buffers and device scratch), the
//! guard an RX thread holds on it for one frame, and a frame whose GPU work is queued.
//!
//! One lane per connection index, so that frames of different connections are copied, reduced
//! and sent in parallel. A lane is double-buffered: its RX thread reads the next frame into one
//! host buffer while the GPU still copies the other, and publishes a frame only after that
//! frame's event completed.

use concord_kernels::KernelError;
use std::sync::{Arc, Mutex, MutexGuard};

use concord_kernels::cuda::{DevMem, DeviceContext, Event, HostMem, Queue};

/// One connection's device resources: a stream, two pinned receive buffers and device scratch.
pub(super) struct Lane {
    pub(super) queue: Queue,
    /// Two receive buffers: the next frame is read into one while the GPU copies the other.
    pub(super) host: [HostMem; 2],
    /// Which of `host` the next frame goes to.
    pub(super) slot: usize,
    /// Where a received frame is copied on the device before the reduction reads it.
    pub(super) scratch: DevMem,
}

impl Lane {
    /// A lane on `queue` (a new stream of `device`) whose buffers hold `bytes` (one sub-chunk).
    pub(super) fn new(
        device: &DeviceContext,
        queue: Queue,
        bytes: usize,
    ) -> Result<Lane, KernelError> {
        let scratch = DevMem::alloc(&queue, bytes, "allocating device scratch")?;
        Ok(Lane {
            queue,
            host: [device.host_mem(bytes)?, device.host_mem(bytes)?],
            slot: 0,
            scratch,
        })
    }
}

/// A connection's lane, reserved for one received frame.
pub(crate) struct LaneGuard {
    pub(super) lane: Arc<Mutex<Lane>>,
    /// The connection index it serves.
    pub(super) index: usize,
}

impl LaneGuard {
    pub(super) fn lock(&self) -> MutexGuard<'_, Lane> {
        self.lane.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads a frame's payload of `len` bytes into the lane's pinned buffer with `read`.
    pub(crate) fn receive<E>(
        &self,
        len: usize,
        read: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut lane = self.lock();
        let slot = lane.slot;
        let host = &mut lane.host[slot];
        assert!(len <= host.len(), "a sub-chunk fits the lane buffer");
        // No copy still reads this buffer: the lane is locked, and the last frame received into
        // it is done (the caller finishes each frame before receiving the lane's next-but-one).
        read(&mut host.as_mut_slice()[..len])
    }
}

/// A reduce-scatter frame whose GPU work is queued (see [`DeviceAttempt::reduce_async`]).
///
/// [`DeviceAttempt::reduce_async`]: super::DeviceAttempt::reduce_async
#[derive(Debug)]
pub(crate) struct DeviceFrame {
    /// Recorded after the copy back to the mirror; complete at once on the emulated device.
    pub(super) event: Event,
}
