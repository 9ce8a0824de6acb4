//! What collectives report back to the caller.

use std::time::Instant;

use crate::collective::Traffic;
use crate::Error;

/// What one all-reduce did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReduceInfo {
    /// Peers that took part.
    pub world: usize,
    /// Sequence number the master gave the attempt.
    pub seq: u64,
    /// Ring epoch it ran on ([`Communicator::ring_members`](crate::Communicator::ring_members) lists who took part).
    pub epoch: u64,
    /// Bytes this peer sent and received on the ring.
    pub traffic: Traffic,
    /// For device buffers: where this peer's time went, stage by stage.
    pub device: Option<crate::gpu::DeviceStages>,
}

/// Tagged buffers, as [`Communicator::all_reduce_many_with_retry`](crate::Communicator::all_reduce_many_with_retry) takes and gives back.
pub type Batch<T> = Vec<(u64, Vec<T>)>;

/// What [`Communicator::all_reduce_many_with_retry`](crate::Communicator::all_reduce_many_with_retry) did.
#[derive(Debug)]
#[non_exhaustive]
pub struct RetryReport<T> {
    /// Every collective of the batch, in batch order: tag, reduced buffer, what its successful
    /// attempt did.
    pub results: Vec<(u64, Vec<T>, ReduceInfo)>,
    /// How many times failed collectives were re-run after rebuilding the ring.
    pub retries: usize,
    /// When and how the first attempt failed, if one did.
    pub first_failure: Option<(Instant, Error)>,
}
