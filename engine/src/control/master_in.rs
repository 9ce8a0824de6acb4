//! The read side of the master connection, and reading one message from it.

use std::io::{BufReader, Read};
use std::net::TcpStream;
use std::sync::{Mutex, MutexGuard};

use concord_master::proto::{decode_master, MasterMsg, ProtoError, MAX_MESSAGE_BYTES};

use crate::Error;

/// The read side of the master connection.
///
/// The reader thread (`concord-master-rx`) reads it, except while a caller waits for a small
/// blocking collective with polling on: then the caller reads it itself ("drives", together
/// with the first ring connection, see [`crate::plane::Driver`]) and the reader thread
/// steps aside, so that the go-ahead, the frames and the outcome reach the caller without a
/// hand-off between threads. Whoever holds `reader` reads one whole message and handles it as
/// the reader thread would ([`handle_master`]).
pub(crate) struct MasterIn {
    pub(crate) fd: std::os::fd::RawFd,
    pub(crate) reader: Mutex<BufReader<TcpStream>>,
    /// Callers driving now; the reader thread stays aside while there are any.
    pub(crate) aside: crate::aside::Aside,
    /// The connection ended (or broke the protocol) and the protocol was told: read no more.
    pub(crate) ended: std::sync::atomic::AtomicBool,
}

impl MasterIn {
    pub(crate) fn new(stream: TcpStream) -> Self {
        use std::os::fd::AsRawFd;
        MasterIn {
            fd: stream.as_raw_fd(),
            reader: Mutex::new(BufReader::new(stream)),
            aside: Default::default(),
            ended: Default::default(),
        }
    }

    pub(crate) fn reader(&self) -> MutexGuard<'_, BufReader<TcpStream>> {
        self.reader.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl std::fmt::Debug for MasterIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasterIn").finish_non_exhaustive()
    }
}

/// Reads one length-prefixed message.
pub(crate) fn read_message(r: &mut impl Read) -> Result<MasterMsg, Error> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => {
            Error::MasterLost("the master closed the connection".into())
        }
        _ => Error::MasterLost(format!("reading from the master: {e}")),
    })?;
    let len = u32::from_le_bytes(len) as usize;
    if len == 0 || len > MAX_MESSAGE_BYTES {
        return Err(Error::Protocol(format!(
            "the master sent a message of {len} bytes"
        )));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)
        .map_err(|e| Error::MasterLost(format!("reading from the master: {e}")))?;
    decode_master(&body).map_err(|e| match e {
        ProtoError::Version { ours, theirs } => Error::VersionMismatch { ours, theirs },
        other => Error::Protocol(other.to_string()),
    })
}
