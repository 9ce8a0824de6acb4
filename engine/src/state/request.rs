//! The pull request, the only thing a puller says to a holder: which bytes of which entry, for
//! which revision, signed with the sync's key.
//!
//! Layout (little endian): `magic u32 "CSP1" | version u32 | revision u64 | offset u64 | len u64 |
//! key_len u32 | key | tag [u8; 32]`, the tag the sync key's HMAC of everything before it. The
//! key is derived from the run token and the master's salt of the revision, so a holder serves
//! only the members of this sync, and a request recorded in one sync is refused in the next.
//! Decoding is total: any bytes give a request or an error.

use concord_transport::auth::{EpochKey, Proof, AUTH_BYTES};
use concord_transport::PROTOCOL_VERSION;

use super::{MAX_KEY_BYTES, PULL_MAGIC};

/// Bytes before the key.
pub(crate) const HEAD_BYTES: usize = 36;
/// Bytes of the tag after the key.
pub(crate) const TAG_BYTES: usize = AUTH_BYTES;

/// One request: `len` bytes at `offset` of entry `key`, as of `revision`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PullRequest {
    /// The sync's elected revision.
    pub revision: u64,
    /// First byte asked for.
    pub offset: u64,
    /// Bytes asked for.
    pub len: u64,
    /// The entry's name.
    pub key: String,
}

impl PullRequest {
    /// The request on the wire, signed with the sync's key.
    pub fn encode(&self, key: &EpochKey) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEAD_BYTES + self.key.len() + TAG_BYTES);
        out.extend_from_slice(&PULL_MAGIC.to_le_bytes());
        out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        out.extend_from_slice(&self.revision.to_le_bytes());
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
        out.extend_from_slice(&(self.key.len() as u32).to_le_bytes());
        out.extend_from_slice(self.key.as_bytes());
        let tag = key.sign(&out);
        out.extend_from_slice(&tag);
        out
    }

    /// How many bytes follow a request's head (its key and tag), or why the head is not one of
    /// a Concord pull of this version.
    pub fn rest_bytes(head: &[u8; HEAD_BYTES]) -> Result<usize, String> {
        let u32_at = |i: usize| u32::from_le_bytes(head[i..i + 4].try_into().expect("4 bytes"));
        let (magic, version, key_len) = (u32_at(0), u32_at(4), u32_at(32) as usize);
        if magic != PULL_MAGIC {
            return Err(format!(
                "magic {magic:#010x}: not a Concord shared-state pull"
            ));
        }
        if version != PROTOCOL_VERSION {
            return Err(format!(
                "a pull of protocol version {version}; this peer speaks {PROTOCOL_VERSION}"
            ));
        }
        if key_len > MAX_KEY_BYTES {
            return Err(format!("a key of {key_len} bytes; at most {MAX_KEY_BYTES}"));
        }
        Ok(key_len + TAG_BYTES)
    }

    /// Decodes a whole request and checks its tag with `key`: the request, or why it is refused.
    pub fn decode(bytes: &[u8], key: &EpochKey) -> Result<PullRequest, String> {
        let head: &[u8; HEAD_BYTES] = bytes
            .get(..HEAD_BYTES)
            .and_then(|h| h.try_into().ok())
            .ok_or("a pull request cut short")?;
        let rest = Self::rest_bytes(head)?;
        if bytes.len() != HEAD_BYTES + rest {
            return Err(format!(
                "a pull request of {} bytes; its head says {}",
                bytes.len(),
                HEAD_BYTES + rest
            ));
        }
        let (signed, tag) = bytes.split_at(bytes.len() - TAG_BYTES);
        let tag: &Proof = tag.try_into().expect("32 bytes");
        if !key.verify(signed, tag) {
            return Err(
                "a pull not signed with this sync's key (a stranger, another run's \
                        token, or another sync)"
                    .into(),
            );
        }
        let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
        let key = std::str::from_utf8(&signed[HEAD_BYTES..])
            .map_err(|_| "an entry name that is not UTF-8")?
            .to_string();
        Ok(PullRequest {
            revision: u64_at(8),
            offset: u64_at(16),
            len: u64_at(24),
            key,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use concord_transport::auth::{KeyPurpose, RunToken};

    fn key(token: &str, revision: u64) -> EpochKey {
        let token = RunToken::new(token).unwrap();
        EpochKey::derive(Some(&token), KeyPurpose::SharedState, revision, 5)
    }

    fn request() -> PullRequest {
        PullRequest {
            revision: 3,
            offset: 8 << 20,
            len: 1 << 20,
            key: "layer.0.weight".into(),
        }
    }

    #[test]
    fn round_trip_with_the_sync_key() {
        let k = key("the run's token 0123", 3);
        let bytes = request().encode(&k);
        let head: &[u8; HEAD_BYTES] = bytes[..HEAD_BYTES].try_into().unwrap();
        assert_eq!(
            PullRequest::rest_bytes(head).unwrap(),
            bytes.len() - HEAD_BYTES
        );
        assert_eq!(PullRequest::decode(&bytes, &k).unwrap(), request());
    }

    #[test]
    fn another_token_revision_or_a_changed_byte_is_refused() {
        let k = key("the run's token 0123", 3);
        let bytes = request().encode(&k);
        for other in [
            key("another run's token", 3),
            key("the run's token 0123", 4),
        ] {
            let err = PullRequest::decode(&bytes, &other).unwrap_err();
            assert!(err.contains("not signed"), "{err}");
        }
        // Every byte before the tag is covered: asking for another range breaks the tag.
        for i in 8..bytes.len() - TAG_BYTES {
            let mut changed = bytes.clone();
            changed[i] ^= 1;
            assert!(PullRequest::decode(&changed, &k).is_err(), "byte {i}");
        }
    }

    #[test]
    fn bad_heads_are_named() {
        let k = key("the run's token 0123", 3);
        let mut bytes = request().encode(&k);
        bytes[32..36].copy_from_slice(&(MAX_KEY_BYTES as u32 + 1).to_le_bytes());
        let err = PullRequest::decode(&bytes, &k).unwrap_err();
        assert!(err.contains("4096"), "{err}");
        bytes[4..8].copy_from_slice(&(PROTOCOL_VERSION + 1).to_le_bytes());
        let err = PullRequest::decode(&bytes, &k).unwrap_err();
        assert!(err.contains("version"), "{err}");
        assert!(PullRequest::decode(&bytes[..10], &k).is_err());
    }
}
