//! The hello that opens every data connection between ring neighbours.
//!
//! The connecting side (a peer dialling its ring successor) sends a [`DataHello`] signed with
//! the ring epoch's [`EpochKey`] (derived from the run token and the salt the master handed to
//! the members of the ring); the accepting side checks the version, the ring epoch, who is
//! calling and the signature, then answers with a 16-byte reply (magic, version,
//! [`HelloStatus`]; see [`write_reply`]). A connection that fails any check is answered with the
//! reason code and closed, so an unauthorised or stale dialler can never feed data into a
//! collective. The key itself never travels.
//!
//! The hello also carries the dialler's connections per neighbour (`conn_count`): an
//! authenticated dialler whose pool size differs from the acceptor's is answered with
//! [`HelloStatus::ConnsMismatch`] and the acceptor's own count, so that both ends can name the
//! misconfiguration instead of waiting for connections that will never come.
//!
//! Hello layout (little endian, 72 bytes; magic and version first, so that a peer of another
//! protocol version is told so whatever the rest holds):
//! `magic u32 | version u32 | epoch u64 | from u64 | to u64 | conn_index u32 | conn_count u32 |
//! tag [u8; 32]`, the tag the epoch key's HMAC of the 40 bytes before it.
//! Reply layout (16 bytes): `magic u32 | version u32 | status u32 | detail u32` (status 0: ok,
//! 1: refused, 2: connections per neighbour differ, detail the acceptor's).

use std::io::{Read, Write};

use crate::auth::{EpochKey, Proof, AUTH_BYTES};
use crate::{Result, TransportError, PROTOCOL_VERSION};

/// Magic of the data-connection hello ("CDH1").
pub const HELLO_MAGIC: u32 = 0x3148_4443;
/// Magic of the reply ("CDR1").
pub const REPLY_MAGIC: u32 = 0x3152_4443;
/// Bytes of a data hello on the wire.
pub const HELLO_BYTES: usize = FIELD_BYTES + AUTH_BYTES;
/// Bytes of the hello the tag covers.
const FIELD_BYTES: usize = 40;
const REPLY_BYTES: usize = 16;

/// What a dialler says when it opens a data connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataHello {
    /// Ring epoch the dialler is building.
    pub epoch: u64,
    /// Peer id of the dialler.
    pub from: u64,
    /// Peer id the dialler believes it is calling.
    pub to: u64,
    /// Index of this connection in the pool towards `to`.
    pub conn_index: u32,
    /// Size of the pool: the dialler's connections per neighbour, which the acceptor checks
    /// against its own.
    pub conn_count: u32,
}

/// A hello as received: what it says, and the tag that proves who may say it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SignedHello {
    /// What the dialler says.
    pub hello: DataHello,
    /// The epoch key's tag of the hello's fields.
    pub tag: Proof,
}

impl SignedHello {
    /// Whether the hello was signed with `key` (the acceptor's key of the hello's epoch).
    pub fn verify(&self, key: &EpochKey) -> bool {
        key.verify(&self.hello.fields(), &self.tag)
    }
}

/// Answer of the accepting side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HelloStatus {
    /// Accepted.
    Ok,
    /// Wrong epoch, peer, index or signature.
    Refused,
    /// The dialler is the expected one, but the acceptor opens another number of connections
    /// per neighbour: a configuration mismatch that no retry mends.
    ConnsMismatch {
        /// The acceptor's connections per neighbour.
        acceptor_conns: u32,
    },
}

impl DataHello {
    /// The bytes the tag covers: everything before it.
    fn fields(&self) -> [u8; FIELD_BYTES] {
        let mut out = [0u8; FIELD_BYTES];
        out[0..4].copy_from_slice(&HELLO_MAGIC.to_le_bytes());
        out[4..8].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        out[8..16].copy_from_slice(&self.epoch.to_le_bytes());
        out[16..24].copy_from_slice(&self.from.to_le_bytes());
        out[24..32].copy_from_slice(&self.to.to_le_bytes());
        out[32..36].copy_from_slice(&self.conn_index.to_le_bytes());
        out[36..40].copy_from_slice(&self.conn_count.to_le_bytes());
        out
    }

    /// The hello on the wire, signed with the epoch's key.
    pub fn encode(&self, key: &EpochKey) -> [u8; HELLO_BYTES] {
        let fields = self.fields();
        let mut out = [0u8; HELLO_BYTES];
        out[..FIELD_BYTES].copy_from_slice(&fields);
        out[FIELD_BYTES..].copy_from_slice(&key.sign(&fields));
        out
    }

    /// Writes the hello, signed with the epoch's key.
    pub fn send(&self, key: &EpochKey, stream: &mut impl Write) -> Result<()> {
        stream
            .write_all(&self.encode(key))
            .map_err(|e| TransportError::io("sending data hello", e))
    }

    /// Reads a hello; a version mismatch is answered before the error is returned. The caller
    /// checks the tag ([`SignedHello::verify`]) before believing anything it says.
    pub fn receive(stream: &mut (impl Read + Write)) -> Result<SignedHello> {
        let mut head = [0u8; 8];
        stream
            .read_exact(&mut head)
            .map_err(|e| TransportError::io("reading data hello", e))?;
        if let Err(e) = check_head(&head) {
            if matches!(e, TransportError::VersionMismatch { .. }) {
                // Best effort: tell the dialler our version so that it can print both.
                let _ = write_reply(stream, HelloStatus::Refused);
            }
            return Err(e);
        }
        let mut all = [0u8; HELLO_BYTES];
        all[..8].copy_from_slice(&head);
        stream
            .read_exact(&mut all[8..])
            .map_err(|e| TransportError::io("reading data hello", e))?;
        Self::decode(&all)
    }

    /// Decodes a whole hello (total: any bytes give a hello or an error).
    pub fn decode(all: &[u8; HELLO_BYTES]) -> Result<SignedHello> {
        let head: &[u8; 8] = all[..8].try_into().expect("8 bytes");
        check_head(head)?;
        let u64_at = |i: usize| u64::from_le_bytes(all[i..i + 8].try_into().expect("8 bytes"));
        let u32_at = |i: usize| u32::from_le_bytes(all[i..i + 4].try_into().expect("4 bytes"));
        Ok(SignedHello {
            hello: DataHello {
                epoch: u64_at(8),
                from: u64_at(16),
                to: u64_at(24),
                conn_index: u32_at(32),
                conn_count: u32_at(36),
            },
            tag: all[FIELD_BYTES..].try_into().expect("32 bytes"),
        })
    }
}

/// Checks a hello's magic and version.
fn check_head(head: &[u8; 8]) -> Result<()> {
    let magic = u32::from_le_bytes(head[0..4].try_into().expect("4 bytes"));
    let version = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
    if magic != HELLO_MAGIC {
        return Err(TransportError::Protocol(format!(
            "data connection opened with magic {magic:#010x}, not a Concord peer"
        )));
    }
    if version != PROTOCOL_VERSION {
        return Err(TransportError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: version,
            what: "a dialling peer".into(),
        });
    }
    Ok(())
}

/// Writes the accepting side's answer.
pub fn write_reply(stream: &mut impl Write, status: HelloStatus) -> Result<()> {
    let mut out = [0u8; REPLY_BYTES];
    out[0..4].copy_from_slice(&REPLY_MAGIC.to_le_bytes());
    out[4..8].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    let (code, detail): (u32, u32) = match status {
        HelloStatus::Ok => (0, 0),
        HelloStatus::Refused => (1, 0),
        HelloStatus::ConnsMismatch { acceptor_conns } => (2, acceptor_conns),
    };
    out[8..12].copy_from_slice(&code.to_le_bytes());
    out[12..16].copy_from_slice(&detail.to_le_bytes());
    stream
        .write_all(&out)
        .map_err(|e| TransportError::io("answering data hello", e))
}

/// Reads the accepting side's answer (dialler side).
pub fn read_reply(stream: &mut impl Read) -> Result<HelloStatus> {
    let mut buf = [0u8; REPLY_BYTES];
    stream
        .read_exact(&mut buf)
        .map_err(|e| TransportError::io("reading data hello reply", e))?;
    let magic = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes"));
    let version = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"));
    if magic != REPLY_MAGIC {
        return Err(TransportError::Protocol(format!(
            "data hello answered with magic {magic:#010x}, not a Concord peer"
        )));
    }
    if version != PROTOCOL_VERSION {
        return Err(TransportError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: version,
            what: "the ring neighbour".into(),
        });
    }
    let detail = u32::from_le_bytes(buf[12..16].try_into().expect("4 bytes"));
    match u32::from_le_bytes(buf[8..12].try_into().expect("4 bytes")) {
        0 => Ok(HelloStatus::Ok),
        2 => Ok(HelloStatus::ConnsMismatch {
            acceptor_conns: detail,
        }),
        _ => Ok(HelloStatus::Refused),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{KeyPurpose, RunToken};
    use std::io::Cursor;

    fn key(epoch: u64) -> EpochKey {
        let token = RunToken::new("0123456789abcdef").unwrap();
        EpochKey::derive(Some(&token), KeyPurpose::Ring, epoch, 7)
    }

    /// An in-memory duplex for the tests: reads from `input`, writes to `output`.
    struct Duplex {
        input: Cursor<Vec<u8>>,
        output: Vec<u8>,
    }
    impl Read for Duplex {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.input.read(buf)
        }
    }
    impl Write for Duplex {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.output.write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn hello_round_trip() {
        let hello = DataHello {
            epoch: 3,
            from: 1,
            to: 2,
            conn_index: 1,
            conn_count: 2,
        };
        let mut bytes = Vec::new();
        hello.send(&key(3), &mut bytes).unwrap();
        assert_eq!(bytes.len(), HELLO_BYTES);
        let mut d = Duplex {
            input: Cursor::new(bytes),
            output: Vec::new(),
        };
        let got = DataHello::receive(&mut d).unwrap();
        assert_eq!(got.hello, hello);
        assert!(got.verify(&key(3)));
        // Another epoch's key, or a hello changed after signing, does not verify.
        assert!(!got.verify(&key(4)));
        let mut forged = got;
        forged.hello.from = 9;
        assert!(!forged.verify(&key(3)));
    }

    #[test]
    fn other_version_is_refused_with_both_versions() {
        let hello = DataHello {
            epoch: 3,
            from: 1,
            to: 2,
            conn_index: 0,
            conn_count: 1,
        };
        let mut bytes = Vec::new();
        hello.send(&key(3), &mut bytes).unwrap();
        bytes[4..8].copy_from_slice(&(PROTOCOL_VERSION + 1).to_le_bytes());
        let mut d = Duplex {
            input: Cursor::new(bytes),
            output: Vec::new(),
        };
        let err = DataHello::receive(&mut d).unwrap_err().to_string();
        assert!(err.contains(&PROTOCOL_VERSION.to_string()), "{err}");
        assert!(err.contains(&(PROTOCOL_VERSION + 1).to_string()), "{err}");
        assert_eq!(
            read_reply(&mut Cursor::new(d.output)).unwrap(),
            HelloStatus::Refused
        );
    }

    #[test]
    fn every_reply_round_trips_with_its_detail() {
        for status in [
            HelloStatus::Ok,
            HelloStatus::Refused,
            HelloStatus::ConnsMismatch { acceptor_conns: 3 },
        ] {
            let mut bytes = Vec::new();
            write_reply(&mut bytes, status).unwrap();
            assert_eq!(bytes.len(), REPLY_BYTES);
            assert_eq!(read_reply(&mut Cursor::new(bytes)).unwrap(), status);
        }
    }

    #[test]
    fn an_unknown_status_reads_as_refused() {
        let mut bytes = Vec::new();
        write_reply(&mut bytes, HelloStatus::Ok).unwrap();
        bytes[8..12].copy_from_slice(&7u32.to_le_bytes());
        assert_eq!(
            read_reply(&mut Cursor::new(bytes)).unwrap(),
            HelloStatus::Refused
        );
    }
}
