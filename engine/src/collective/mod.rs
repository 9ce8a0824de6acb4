//! Collectives: the ring schedule, as a sans-IO plan that the data plane executes.

pub mod ring;
pub(crate) mod sizing;

/// Bytes moved by one operation on this peer (frame headers included).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Bytes written to the ring successor.
    pub bytes_sent: u64,
    /// Bytes read from the ring predecessor.
    pub bytes_received: u64,
}
