//! The data frame header.
//!
//! Every sub-chunk on a ring connection travels as a 32-byte header followed by `len` payload
//! bytes. The header names the operation (`tag`, `seq`), the ring step and the sub-chunk index, so
//! the receiver can check it is reading exactly what it expects, and can drop leftovers of an
//! aborted attempt (a `seq` lower than the one it expects) without touching its buffers.
//!
//! Layout (little endian): `magic u32 | len u32 | tag u64 | seq u64 | step u32 | sub u32`.

use crate::{Result, TransportError};

/// Magic number opening every data frame ("CDF1").
pub const DATA_MAGIC: u32 = 0x3146_4443;
/// Size of the encoded header in bytes.
pub const HEADER_BYTES: usize = 32;
/// Largest payload one frame may carry (bounds what a receiver will accept).
pub const MAX_PAYLOAD_BYTES: u32 = 64 << 20;

/// Header of one data frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataHeader {
    /// Payload length in bytes.
    pub len: u32,
    /// The user's tag of the collective.
    pub tag: u64,
    /// The master-assigned sequence number of this attempt.
    pub seq: u64,
    /// Ring step (0-based over reduce-scatter then all-gather).
    pub step: u32,
    /// Sub-chunk index within the step.
    pub sub: u32,
}

impl DataHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        assert!(
            self.len <= MAX_PAYLOAD_BYTES,
            "frame payload {} over the limit",
            self.len
        );
        let mut out = [0u8; HEADER_BYTES];
        out[0..4].copy_from_slice(&DATA_MAGIC.to_le_bytes());
        out[4..8].copy_from_slice(&self.len.to_le_bytes());
        out[8..16].copy_from_slice(&self.tag.to_le_bytes());
        out[16..24].copy_from_slice(&self.seq.to_le_bytes());
        out[24..28].copy_from_slice(&self.step.to_le_bytes());
        out[28..32].copy_from_slice(&self.sub.to_le_bytes());
        out
    }

    /// Decodes and checks a header: magic and payload bound.
    pub fn decode(bytes: &[u8; HEADER_BYTES]) -> Result<Self> {
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
        let magic = u32_at(0);
        if magic != DATA_MAGIC {
            return Err(TransportError::Protocol(format!(
                "bad data frame magic {magic:#010x} (expected {DATA_MAGIC:#010x}): the stream is out of sync or not from a Concord peer"
            )));
        }
        let header = DataHeader {
            len: u32_at(4),
            tag: u64_at(8),
            seq: u64_at(16),
            step: u32_at(24),
            sub: u32_at(28),
        };
        if header.len > MAX_PAYLOAD_BYTES {
            return Err(TransportError::Protocol(format!(
                "data frame announces {} payload bytes, over the limit of {MAX_PAYLOAD_BYTES}",
                header.len
            )));
        }
        Ok(header)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let h = DataHeader {
            len: 4096,
            tag: 7,
            seq: 99,
            step: 3,
            sub: 11,
        };
        assert_eq!(DataHeader::decode(&h.encode()).unwrap(), h);
    }

    #[test]
    fn bad_magic_and_oversize_are_refused() {
        let h = DataHeader {
            len: 1,
            tag: 0,
            seq: 0,
            step: 0,
            sub: 0,
        };
        let mut bytes = h.encode();
        bytes[0] ^= 0xff;
        assert!(DataHeader::decode(&bytes)
            .unwrap_err()
            .to_string()
            .contains("magic"));
        let mut bytes = h.encode();
        bytes[4..8].copy_from_slice(&(MAX_PAYLOAD_BYTES + 1).to_le_bytes());
        assert!(DataHeader::decode(&bytes)
            .unwrap_err()
            .to_string()
            .contains("limit"));
    }
}
