//! The engine's error type.

use std::sync::Arc;

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
    /// The run token did not prove out: the master asks for one this peer lacks, or runs without
    /// one while this peer has one, or could not prove it holds this peer's.
    #[error("not authenticated: {0}")]
    Unauthenticated(String),
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
    /// CUDA is missing here, or a CUDA call failed (the kernels crate's error, which keeps the
    /// driver's as its source).
    #[error("CUDA: {0}")]
    Cuda(#[source] concord_kernels::KernelError),
    /// A bounded wait ran out.
    #[error("timed out: {0}")]
    Timeout(String),
    /// An I/O error outside a collective (binding the data port, for example).
    #[error("{during}: {source}")]
    Io {
        /// What this peer was doing.
        during: String,
        /// The operating system's error.
        #[source]
        source: IoError,
    },
}

/// An [`std::io::Error`] that [`Error`] can carry: shared, since errors are `Clone` (one failure
/// ends every wait) and `io::Error` is not. Two compare equal when their kinds and messages do.
#[derive(Clone, Debug)]
pub struct IoError(Arc<std::io::Error>);

impl IoError {
    /// The error's kind.
    pub fn kind(&self) -> std::io::ErrorKind {
        self.0.kind()
    }

    /// The error itself.
    pub fn get(&self) -> &std::io::Error {
        &self.0
    }
}

impl From<std::io::Error> for IoError {
    fn from(e: std::io::Error) -> Self {
        IoError(Arc::new(e))
    }
}

impl std::fmt::Display for IoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for IoError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl PartialEq for IoError {
    fn eq(&self, other: &Self) -> bool {
        self.kind() == other.kind() && self.0.to_string() == other.0.to_string()
    }
}

impl Eq for IoError {}

fn lost_suffix(lost: &[PeerId]) -> String {
    if lost.is_empty() {
        String::new()
    } else {
        let ids: Vec<String> = lost.iter().map(|p| p.to_string()).collect();
        format!(" (lost peer {})", ids.join(", "))
    }
}

impl Error {
    /// An I/O error, with what this peer was doing.
    pub(crate) fn io(during: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            during: during.into(),
            source: source.into(),
        }
    }

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
            concord_transport::TransportError::Io { context, source } => Error::io(context, source),
            concord_transport::TransportError::Config(why) => Error::InvalidArgument(why),
            other => Error::Protocol(other.to_string()),
        }
    }
}
