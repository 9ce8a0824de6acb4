//! Concord's data-plane transport: moves framed chunks between ring neighbours.
//!
//! This crate knows nothing of collectives. It provides
//! - [`auth`]: the run token, the challenge-response proofs and the per-epoch keys of hellos;
//! - [`frame`]: the fixed 32-byte header of every data frame, checked on both ends;
//! - [`handshake`]: the versioned hello that opens every data connection;
//! - [`socket`]: TCP through socket2 (no Nagle, sized buffers), connect with a bounded retry,
//!   and vectored frame writes;
//! - [`uring`]: the io_uring backend (one ring per connection, timed waits, cross-thread
//!   shutdown), its probe, and the choice between it and sockets;
//! - [`buffers`]: a bounded pool of page-aligned staging buffers, locked in memory when
//!   `RLIMIT_MEMLOCK` allows;
//! - [`shm`]: the shared-memory path between neighbours on one host (a memfd ring per
//!   connection, the TCP connection kept as doorbell and liveness channel);
//! - [`spin`]: bounded polling before a blocking wait, where an answer is microseconds away.
//!
//! Every wire structure starts with a magic number and the protocol version, so that a peer of
//! another version is refused with a message naming both versions.

#![warn(missing_docs)]

pub mod auth;
pub mod buffers;
pub mod frame;
pub mod handshake;
pub mod shm;
pub mod socket;
pub mod spin;
pub mod uring;

pub use buffers::{PinnedBuf, PinnedPool, PoolConfig};
pub use uring::{resolve_backend, BackendChoice, BackendKind, UringStream};

use std::io;

/// Version of Concord's wire protocol (control and data plane). Bumped on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 5;

/// Errors of the transport layer.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// An operating-system I/O error, with what we were doing.
    #[error("{context}: {source}")]
    Io {
        /// What the transport was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The other end speaks another protocol version.
    #[error(
        "protocol version mismatch: this side speaks version {ours}, the other side ({what}) speaks {theirs}; run the same Concord release everywhere"
    )]
    VersionMismatch {
        /// Our version.
        ours: u32,
        /// Their version.
        theirs: u32,
        /// Who the other side is.
        what: String,
    },
    /// The bytes received are not a valid Concord frame or handshake.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// A setting cannot be used (for example a run token too short to be secret).
    #[error("{0}")]
    Config(String),
    /// A bounded wait ran out.
    #[error("timed out after {waited_ms} ms: {what}")]
    Timeout {
        /// What we were waiting for.
        what: String,
        /// How long we waited.
        waited_ms: u64,
    },
}

impl TransportError {
    /// Wraps an I/O error with context.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        TransportError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = TransportError> = std::result::Result<T, E>;
