//! The exchange that turns an accepted data connection into a shared-memory one.
//!
//! Right after the hello, the accepting side (the receiver of the connection's frames) sends an
//! [`Offer`]: its host identity and, when it allows shared memory, the segment it created (pid,
//! descriptor, capacity, cookie). The dialler compares the host identity with its own, maps the
//! segment if both match and it allows shared memory too, and answers with an [`Answer`]. Both
//! sides then know which transport the connection uses; the TCP connection stays open either
//! way (the data path itself, or the doorbell and liveness channel of the ring).
//!
//! Offer layout (little endian, 112 bytes): `magic u32 | version u32 | flags u32 | pid u32 |
//! fd i32 | reserved u32 | capacity u64 | cookie [u8; 16] | host [u8; 64]` (flags bit 0: a
//! segment is offered; `host` zero-padded). Answer (16 bytes): `magic u32 | version u32 |
//! status u32 | errno u32`.

use std::io::{Read, Write};

use crate::{Result, TransportError, PROTOCOL_VERSION};

/// Magic of an offer ("CDO1").
const OFFER_MAGIC: u32 = 0x314f_4443;
/// Magic of an answer ("CDA1").
const ANSWER_MAGIC: u32 = 0x3141_4443;
/// Bytes of an offer on the wire.
pub const OFFER_BYTES: usize = 112;
/// Bytes of an answer on the wire.
pub const ANSWER_BYTES: usize = 16;
/// Longest host identity.
pub const HOST_ID_BYTES: usize = 64;
/// Environment variable that overrides the host identity (peers that share memory must have
/// the same one; distinct values keep peers of one machine on TCP).
pub const HOST_ID_ENV: &str = "CONCORD_HOST_ID";

/// What the receiving side says about itself and the segment it made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offer {
    /// The receiver's host identity ([`host_id`]), zero-padded.
    pub host: [u8; HOST_ID_BYTES],
    /// The segment, when the receiver allows shared memory.
    pub segment: Option<OfferedSegment>,
}

/// Where the dialler finds the offered segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OfferedSegment {
    /// The receiver's process id.
    pub pid: u32,
    /// The memfd's descriptor number in that process.
    pub fd: i32,
    /// Ring bytes.
    pub capacity: u64,
    /// The cookie written in the segment.
    pub cookie: [u8; 16],
}

/// The dialler's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Mapped: the connection runs over the ring.
    Mapped,
    /// The dialler does not allow shared memory (its transport is `socket` or `uring`).
    Disabled,
    /// The two ends are on different hosts (or one has no identity).
    OtherHost,
    /// Same host, but the segment could not be mapped; `errno` says why (0: not an OS error).
    Failed {
        /// The OS error of the attempt, if any.
        errno: i32,
    },
}

impl Offer {
    /// The offer on the wire.
    pub fn encode(&self) -> [u8; OFFER_BYTES] {
        let mut out = [0u8; OFFER_BYTES];
        out[0..4].copy_from_slice(&OFFER_MAGIC.to_le_bytes());
        out[4..8].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        if let Some(s) = &self.segment {
            out[8..12].copy_from_slice(&1u32.to_le_bytes());
            out[12..16].copy_from_slice(&s.pid.to_le_bytes());
            out[16..20].copy_from_slice(&s.fd.to_le_bytes());
            out[24..32].copy_from_slice(&s.capacity.to_le_bytes());
            out[32..48].copy_from_slice(&s.cookie);
        }
        out[48..].copy_from_slice(&self.host);
        out
    }

    /// Decodes an offer (total: any bytes give an offer or an error).
    pub fn decode(b: &[u8; OFFER_BYTES]) -> Result<Offer> {
        check_head(b[..8].try_into().expect("8 bytes"), OFFER_MAGIC, "offer")?;
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let segment = (u32_at(8) & 1 == 1).then(|| OfferedSegment {
            pid: u32_at(12),
            fd: u32_at(16) as i32,
            capacity: u64::from_le_bytes(b[24..32].try_into().expect("8 bytes")),
            cookie: b[32..48].try_into().expect("16 bytes"),
        });
        Ok(Offer {
            host: b[48..].try_into().expect("64 bytes"),
            segment,
        })
    }

    /// Sends the offer.
    pub fn send(&self, stream: &mut impl Write) -> Result<()> {
        stream
            .write_all(&self.encode())
            .map_err(|e| TransportError::io("sending the shared-memory offer", e))
    }

    /// Reads an offer.
    pub fn receive(stream: &mut impl Read) -> Result<Offer> {
        let mut b = [0u8; OFFER_BYTES];
        stream
            .read_exact(&mut b)
            .map_err(|e| TransportError::io("reading the shared-memory offer", e))?;
        Offer::decode(&b)
    }
}

impl Answer {
    /// The answer on the wire.
    pub fn encode(&self) -> [u8; ANSWER_BYTES] {
        let (status, errno) = match *self {
            Answer::Mapped => (0u32, 0i32),
            Answer::Disabled => (1, 0),
            Answer::OtherHost => (2, 0),
            Answer::Failed { errno } => (3, errno),
        };
        let mut out = [0u8; ANSWER_BYTES];
        out[0..4].copy_from_slice(&ANSWER_MAGIC.to_le_bytes());
        out[4..8].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        out[8..12].copy_from_slice(&status.to_le_bytes());
        out[12..16].copy_from_slice(&errno.to_le_bytes());
        out
    }

    /// Decodes an answer; an unknown status reads as a failure.
    pub fn decode(b: &[u8; ANSWER_BYTES]) -> Result<Answer> {
        check_head(b[..8].try_into().expect("8 bytes"), ANSWER_MAGIC, "answer")?;
        let errno = i32::from_le_bytes(b[12..16].try_into().expect("4 bytes"));
        Ok(
            match u32::from_le_bytes(b[8..12].try_into().expect("4 bytes")) {
                0 => Answer::Mapped,
                1 => Answer::Disabled,
                2 => Answer::OtherHost,
                _ => Answer::Failed { errno },
            },
        )
    }

    /// Sends the answer.
    pub fn send(&self, stream: &mut impl Write) -> Result<()> {
        stream
            .write_all(&self.encode())
            .map_err(|e| TransportError::io("answering the shared-memory offer", e))
    }

    /// Reads an answer.
    pub fn receive(stream: &mut impl Read) -> Result<Answer> {
        let mut b = [0u8; ANSWER_BYTES];
        stream
            .read_exact(&mut b)
            .map_err(|e| TransportError::io("reading the shared-memory answer", e))?;
        Answer::decode(&b)
    }
}

fn check_head(head: &[u8; 8], magic: u32, what: &str) -> Result<()> {
    let m = u32::from_le_bytes(head[0..4].try_into().expect("4 bytes"));
    let v = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
    if m != magic {
        return Err(TransportError::Protocol(format!(
            "shared-memory {what} with magic {m:#010x}: the neighbour is not a Concord peer of this version"
        )));
    }
    if v != PROTOCOL_VERSION {
        return Err(TransportError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: v,
            what: "the ring neighbour".into(),
        });
    }
    Ok(())
}

/// This machine's identity, zero-padded: `CONCORD_HOST_ID` when set and not empty (at most 64
/// bytes), else the kernel's boot id, which two processes share exactly when they run on one
/// kernel. `None`: neither is available (shared memory is then never used).
pub fn host_id() -> Option<[u8; HOST_ID_BYTES]> {
    let raw = match std::env::var(HOST_ID_ENV) {
        Ok(v) if !v.trim().is_empty() => v.trim().to_string(),
        _ => std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()?
            .trim()
            .to_string(),
    };
    let bytes = raw.as_bytes();
    if bytes.is_empty() || bytes.len() > HOST_ID_BYTES {
        return None;
    }
    let mut out = [0u8; HOST_ID_BYTES];
    out[..bytes.len()].copy_from_slice(bytes);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offers_and_answers_round_trip() {
        let host = host_id().expect("a Linux kernel has a boot id");
        for segment in [
            None,
            Some(OfferedSegment {
                pid: 4242,
                fd: 17,
                capacity: 1 << 22,
                cookie: [9; 16],
            }),
        ] {
            let o = Offer { host, segment };
            assert_eq!(Offer::decode(&o.encode()).unwrap(), o);
        }
        for a in [
            Answer::Mapped,
            Answer::Disabled,
            Answer::OtherHost,
            Answer::Failed { errno: 13 },
        ] {
            assert_eq!(Answer::decode(&a.encode()).unwrap(), a);
        }
        let mut b = Answer::Mapped.encode();
        b[4..8].copy_from_slice(&(PROTOCOL_VERSION + 1).to_le_bytes());
        let e = Answer::decode(&b).unwrap_err().to_string();
        assert!(e.contains(&(PROTOCOL_VERSION + 1).to_string()), "{e}");
        let mut b = Offer {
            host,
            segment: None,
        }
        .encode();
        b[0] ^= 0xff;
        assert!(Offer::decode(&b).is_err());
    }
}
