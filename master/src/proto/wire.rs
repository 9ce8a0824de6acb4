//! The wire primitives every control message is built from: a writer that lays fields down in
//! order and fills in the length prefix, a reader whose every read is bounds-checked, and the
//! framing that splits a message off a byte stream.
//!
//! Both message directions use only these, so the limits ([`MAX_MESSAGE_BYTES`],
//! [`MAX_STRING_BYTES`]) and the opening `magic | version` are checked in one place.

use super::{
    malformed, ProtoError, CONTROL_MAGIC, MAX_MESSAGE_BYTES, MAX_STRING_BYTES, PROTOCOL_VERSION,
};

/// Writes fields in order.
pub(super) struct Enc(Vec<u8>);

impl Enc {
    pub(super) fn new(kind: u8) -> Self {
        let mut v = Vec::with_capacity(64);
        v.extend_from_slice(&[0, 0, 0, 0, kind]);
        Enc(v)
    }
    pub(super) fn u8(&mut self, x: u8) -> &mut Self {
        self.0.push(x);
        self
    }
    pub(super) fn u16(&mut self, x: u16) -> &mut Self {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    pub(super) fn u32(&mut self, x: u32) -> &mut Self {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    pub(super) fn u64(&mut self, x: u64) -> &mut Self {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    pub(super) fn bytes32(&mut self, x: &[u8; 32]) -> &mut Self {
        self.0.extend_from_slice(x);
        self
    }
    pub(super) fn str(&mut self, s: &str) -> &mut Self {
        // Strings are bounded; truncate at a char boundary rather than refuse to send a reason.
        let mut end = s.len().min(MAX_STRING_BYTES);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.u32(end as u32);
        self.0.extend_from_slice(&s.as_bytes()[..end]);
        self
    }
    /// The bytes the message takes on the wire, length prefix included.
    pub(super) fn len(&self) -> usize {
        self.0.len()
    }
    /// Fills in the length prefix. Every message is bounded before it is built (the builders
    /// check [`super::peer_message_bytes`] / [`super::master_message_bytes`] against
    /// [`MAX_MESSAGE_BYTES`] where its size depends on peer input), so an oversized one here is
    /// a bug in this crate, not something a peer can cause.
    pub(super) fn finish(mut self) -> Vec<u8> {
        let len = (self.0.len() - 4) as u32;
        assert!(
            self.0.len() <= MAX_MESSAGE_BYTES,
            "control message over the size limit"
        );
        self.0[0..4].copy_from_slice(&len.to_le_bytes());
        self.0
    }
}

/// Reads fields in order; every read is bounds-checked.
pub(super) struct Dec<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Dec<'a> {
    /// A reader at the start of `buf` (a message body, its length prefix removed).
    pub(super) fn new(buf: &'a [u8]) -> Self {
        Dec { buf, pos: 0 }
    }
    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.buf.len() - self.pos < n {
            return Err(malformed(format!(
                "truncated: needed {n} more bytes at offset {}, message has {}",
                self.pos,
                self.buf.len()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    pub(super) fn u8(&mut self) -> Result<u8, ProtoError> {
        Ok(self.take(1)?[0])
    }
    pub(super) fn u16(&mut self) -> Result<u16, ProtoError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    pub(super) fn u32(&mut self) -> Result<u32, ProtoError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    pub(super) fn u64(&mut self) -> Result<u64, ProtoError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    /// Bytes not yet read: a bound on how many items a count may announce.
    pub(super) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    pub(super) fn bytes32(&mut self) -> Result<[u8; 32], ProtoError> {
        Ok(self.take(32)?.try_into().expect("32 bytes"))
    }
    pub(super) fn bool(&mut self) -> Result<bool, ProtoError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(malformed(format!("boolean byte {b}"))),
        }
    }
    pub(super) fn str(&mut self) -> Result<String, ProtoError> {
        let len = self.u32()? as usize;
        if len > MAX_STRING_BYTES {
            return Err(malformed(format!("string of {len} bytes over the limit")));
        }
        String::from_utf8(self.take(len)?.to_vec()).map_err(|_| malformed("string is not UTF-8"))
    }
    pub(super) fn magic_version(&mut self) -> Result<u32, ProtoError> {
        let magic = self.u32()?;
        if magic != CONTROL_MAGIC {
            return Err(malformed(format!(
                "bad magic {magic:#010x}: not a Concord peer"
            )));
        }
        let version = self.u32()?;
        if version != PROTOCOL_VERSION {
            return Err(ProtoError::Version {
                ours: PROTOCOL_VERSION,
                theirs: version,
            });
        }
        Ok(version)
    }
    pub(super) fn end(self) -> Result<(), ProtoError> {
        if self.pos != self.buf.len() {
            return Err(malformed(format!(
                "{} trailing bytes",
                self.buf.len() - self.pos
            )));
        }
        Ok(())
    }
}

/// Splits one frame off the front of `buf`: `Ok(Some((body, consumed)))` when a whole message is
/// there, `Ok(None)` when more bytes are needed, an error when the length is out of bounds.
pub fn split_frame(buf: &[u8]) -> Result<Option<(&[u8], usize)>, ProtoError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
    if len == 0 || len + 4 > MAX_MESSAGE_BYTES {
        return Err(malformed(format!("frame length {len} out of bounds")));
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    Ok(Some((&buf[4..4 + len], 4 + len)))
}
