//! The engine's error type.

use concord_master::proto::PeerId;

/// Everything that can go wrong in a [`crate::Communicator`].
///
/// Errors are `Clone` so that one failure (say, the master going away) can end every wait.
/// [`Error::is_retryable`] tells the failures a retry with the survivors can fix.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A bad argument; nothing was sent.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// An API call made in a state where it is not allowed (the threading and one-kind rules).
    #[error("usage error: {0}")]
    Usage(String),
    /// Peers disagreed on count, dtype or op for a tag; nothing was reduced.
    #[error("collective {tag} refused: {reason}")]
    Mismatch {
        /// The tag.
        tag: u64,
        /// Which peer asked for what.
        reason: String,
    },
    /// The collective was aborted (a peer died, failed or the ring is broken). In-place inputs
    /// were restored; call `update_topology()` and retry.
    #[error("collective {tag} aborted: {reason}{}", lost_suffix(.lost))]
    Aborted {
        /// The tag.
        tag: u64,
        /// Why.
        reason: String,
        /// The peers lost, if any.
        lost: Vec<PeerId>,
    },
    /// The collective was cancelled (by this peer or another); in-place inputs were restored and
    /// the ring is intact.
    #[error("collective {tag} cancelled: {reason}")]
    Cancelled {
        /// The tag.
        tag: u64,
        /// Who cancelled it.
        reason: String,
    },
    /// A shared-state sync failed (a peer could not fetch an entry); revisions did not change.
    #[error("shared-state sync failed: {0}")]
    SyncFailed(String),
    /// Could not reach the master, or it went away.
    #[error("master connection lost: {0}")]
    MasterLost(String),
    /// The master refused this peer.
    #[error("the master refused this peer: {0}")]
    Refused(String),
    /// The master removed this peer from the group.
    #[error("removed from the group by the master: {0}")]
    Kicked(String),
    /// The master or a neighbour speaks another protocol version.
    #[error("protocol version mismatch: this peer speaks version {ours}, the master speaks {theirs}; run the same Concord release on every machine")]
    VersionMismatch {
        /// Our version.
        ours: u32,
        /// Theirs.
        theirs: u32,
    },
    /// The master or a neighbour broke the protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// CUDA is missing here, or a CUDA call failed.
    #[error("CUDA: {0}")]
    Cuda(String),
    /// A bounded wait ran out.
    #[error("timed out: {0}")]
    Timeout(String),
    /// An I/O error outside a collective (binding the data port, for example).
    #[error("{0}")]
    Io(String),
}

fn lost_suffix(lost: &[PeerId]) -> String {
    if lost.is_empty() {
        String::new()
    } else {
        let ids: Vec<String> = lost.iter().map(|p| p.to_string()).collect();
        format!(" (lost peer {})", ids.join(", "))
    }
}

impl Error {
    /// Whether retrying after `update_topology()` may succeed (the group lost or is losing a
    /// peer), as opposed to a bug in the call or a dead master.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Aborted { .. })
    }
}

impl From<concord_transport::TransportError> for Error {
    fn from(e: concord_transport::TransportError) -> Self {
        match e {
            concord_transport::TransportError::VersionMismatch { ours, theirs, .. } => {
                Error::VersionMismatch { ours, theirs }
            }
            concord_transport::TransportError::Timeout { .. } => Error::Timeout(e.to_string()),
            other => Error::Io(other.to_string()),
        }
    }
}
