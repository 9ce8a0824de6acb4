//! The run token and everything proven with it: who may join, and which data connections belong
//! to a ring epoch.
//!
//! A run is invited by a token every member holds (`--token-file PATH`, `CONCORD_TOKEN`, or a
//! builder option). The token never travels: each side proves it holds it with an HMAC-SHA256
//! over the other side's fresh nonce (challenge-response, see [`peer_proof`] and
//! [`master_proof`]), and each ring epoch's data connections and each shared-state pull are
//! authenticated with a key derived from the token and that epoch's salt ([`EpochKey`]), so a
//! hello recorded in one epoch is worthless in the next.
//!
//! Without a token (a master started `--insecure`, or on loopback) the same exchanges run with
//! an empty key: they then prove nothing beyond the epoch's salt, which the master hands out in
//! the clear.

use std::fmt;
use std::path::Path;

use hmac::{Hmac, Mac as _};
use sha2::{Digest, Sha256};

use crate::{Result, TransportError};

/// Environment variable holding the run token (its text, as in a token file).
pub const TOKEN_ENV: &str = "CONCORD_TOKEN";
/// Bytes of every nonce, proof and key.
pub const AUTH_BYTES: usize = 32;
/// Shortest token accepted, in bytes of text: a guessable token invites nobody in particular.
pub const MIN_TOKEN_BYTES: usize = 16;
/// Longest token accepted, in bytes of text.
pub const MAX_TOKEN_BYTES: usize = 4096;

/// A fresh random value that makes a proof good for one exchange only.
pub type Nonce = [u8; AUTH_BYTES];
/// An HMAC-SHA256 tag.
pub type Proof = [u8; AUTH_BYTES];

type HmacSha256 = Hmac<Sha256>;

/// The secret shared by the members of a run. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct RunToken {
    /// SHA-256 of the token's text: a fixed-size key whatever the text's length.
    key: [u8; AUTH_BYTES],
}

impl fmt::Debug for RunToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RunToken(..)")
    }
}

impl RunToken {
    /// A token from its text (surrounding whitespace ignored); refused when shorter than
    /// [`MIN_TOKEN_BYTES`] or longer than [`MAX_TOKEN_BYTES`].
    pub fn new(text: &str) -> Result<Self> {
        let text = text.trim();
        if text.len() < MIN_TOKEN_BYTES {
            return Err(TransportError::Config(format!(
                "the run token is {} bytes long; use at least {MIN_TOKEN_BYTES} random bytes \
                 (for example `openssl rand -hex 32`)",
                text.len()
            )));
        }
        if text.len() > MAX_TOKEN_BYTES {
            return Err(TransportError::Config(format!(
                "the run token is {} bytes long; at most {MAX_TOKEN_BYTES}",
                text.len()
            )));
        }
        Ok(RunToken {
            key: Sha256::digest(text.as_bytes()).into(),
        })
    }

    /// A token read from a file (its whole text). A file that others may read is used, with a
    /// warning: anyone who reads it can join the run.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            TransportError::io(format!("reading the run token file {}", path.display()), e)
        })?;
        #[cfg(unix)]
        if let Ok(meta) = std::fs::metadata(path) {
            use std::os::unix::fs::PermissionsExt;
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(
                    "the run token file {} may be read by other users (chmod 600 it)",
                    path.display()
                );
            }
        }
        Self::new(&text).map_err(|e| match e {
            TransportError::Config(why) => {
                TransportError::Config(format!("{}: {why}", path.display()))
            }
            other => other,
        })
    }

    /// The token in [`TOKEN_ENV`], if set; a set but unusable value is an error.
    pub fn from_env() -> Result<Option<Self>> {
        match std::env::var(TOKEN_ENV) {
            Ok(text) => Self::new(&text)
                .map(Some)
                .map_err(|e| TransportError::Config(format!("{TOKEN_ENV}: {e}"))),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(TransportError::Config(format!(
                "{TOKEN_ENV} is not valid UTF-8"
            ))),
        }
    }

    /// A fresh random token and its text (to hand to child processes through [`TOKEN_ENV`]).
    pub fn generate() -> Result<(Self, String)> {
        let text = hex(&random_bytes()?);
        Ok((Self::new(&text)?, text))
    }
}

/// A fresh nonce from the operating system's generator.
pub fn nonce() -> Result<Nonce> {
    random_bytes()
}

/// The `counter`th nonce of a sequence seeded with `seed` (a random seed from [`nonce`]): a
/// sans-IO state machine draws its nonces so, never repeating one.
pub fn derive_nonce(seed: &Nonce, counter: u64) -> Nonce {
    let mut h = Sha256::new();
    h.update(b"concord/nonce/1");
    h.update(seed);
    h.update(counter.to_le_bytes());
    h.finalize().into()
}

fn random_bytes() -> Result<[u8; AUTH_BYTES]> {
    let mut out = [0u8; AUTH_BYTES];
    getrandom::getrandom(&mut out).map_err(|e| {
        TransportError::Config(format!("the operating system gave no random bytes: {e}"))
    })?;
    Ok(out)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// HMAC-SHA256 under `key` (the empty key without a token) of `label` and `parts`, each part
/// length-prefixed so that no two different inputs hash alike.
fn tag(token: Option<&RunToken>, label: &str, parts: &[&[u8]]) -> Proof {
    let key: &[u8] = token.map_or(&[], |t| &t.key);
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(label.as_bytes());
    for part in parts {
        mac.update(&(part.len() as u64).to_le_bytes());
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// Compares two tags in time independent of where they differ.
pub fn proofs_equal(a: &Proof, b: &Proof) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A peer's answer to the master's challenge: it holds the token, for this exchange (both
/// nonces) and for what it said in its hello (`hello`, the bytes the master will act on).
pub fn peer_proof(
    token: Option<&RunToken>,
    master_nonce: &Nonce,
    peer_nonce: &Nonce,
    hello: &[u8],
) -> Proof {
    tag(
        token,
        "concord/peer-proof/1",
        &[master_nonce, peer_nonce, hello],
    )
}

/// The master's proof to a peer that it holds the token too, bound to the id it hands out.
pub fn master_proof(
    token: Option<&RunToken>,
    peer_nonce: &Nonce,
    master_nonce: &Nonce,
    peer_id: u64,
) -> Proof {
    tag(
        token,
        "concord/master-proof/1",
        &[peer_nonce, master_nonce, &peer_id.to_le_bytes()],
    )
}

/// What an [`EpochKey`] authenticates: one purpose per key, so that a tag made for one is
/// refused by the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyPurpose {
    /// The data connections of one ring epoch.
    Ring,
    /// The shared-state pulls of one sync revision.
    SharedState,
}

/// A key that authenticates the hellos of one ring epoch or one shared-state sync, derived from
/// the run token and the salt (`secret`) the master chose for that epoch. Its `Debug` never
/// shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct EpochKey {
    key: RunToken,
}

impl fmt::Debug for EpochKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EpochKey(..)")
    }
}

impl EpochKey {
    /// The key of epoch (or revision) `epoch` with the master's salt `secret`.
    pub fn derive(token: Option<&RunToken>, purpose: KeyPurpose, epoch: u64, secret: u64) -> Self {
        let label = match purpose {
            KeyPurpose::Ring => "concord/ring-key/1",
            KeyPurpose::SharedState => "concord/state-key/1",
        };
        EpochKey {
            key: RunToken {
                key: tag(token, label, &[&epoch.to_le_bytes(), &secret.to_le_bytes()]),
            },
        }
    }

    /// The tag of `message` under this key.
    pub fn sign(&self, message: &[u8]) -> Proof {
        tag(Some(&self.key), "concord/hello/1", &[message])
    }

    /// Whether `proof` is this key's tag of `message`.
    pub fn verify(&self, message: &[u8], proof: &Proof) -> bool {
        proofs_equal(&self.sign(message), proof)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(s: &str) -> RunToken {
        RunToken::new(s).unwrap()
    }

    #[test]
    fn short_and_long_tokens_are_refused_with_the_limit() {
        let err = RunToken::new("  short \n").unwrap_err().to_string();
        assert!(err.contains("5 bytes") && err.contains("16"), "{err}");
        let err = RunToken::new(&"x".repeat(5000)).unwrap_err().to_string();
        assert!(err.contains("4096"), "{err}");
    }

    #[test]
    fn surrounding_whitespace_does_not_change_the_token() {
        assert_eq!(token("0123456789abcdef\n"), token("  0123456789abcdef"));
        assert_ne!(token("0123456789abcdef"), token("0123456789abcdeg"));
    }

    #[test]
    fn debug_never_shows_the_key() {
        let t = token("0123456789abcdef");
        assert_eq!(format!("{t:?}"), "RunToken(..)");
        let k = EpochKey::derive(Some(&t), KeyPurpose::Ring, 1, 2);
        assert_eq!(format!("{k:?}"), "EpochKey(..)");
    }

    #[test]
    fn a_proof_holds_only_for_its_token_nonces_and_hello() {
        let (a, b) = (token("0123456789abcdef"), token("fedcba9876543210"));
        let (m, p) = ([1u8; 32], [2u8; 32]);
        let good = peer_proof(Some(&a), &m, &p, b"hello");
        assert!(proofs_equal(&good, &peer_proof(Some(&a), &m, &p, b"hello")));
        for other in [
            peer_proof(Some(&b), &m, &p, b"hello"),
            peer_proof(None, &m, &p, b"hello"),
            peer_proof(Some(&a), &[3u8; 32], &p, b"hello"),
            peer_proof(Some(&a), &m, &[3u8; 32], b"hello"),
            peer_proof(Some(&a), &m, &p, b"hellp"),
            // The master's proof is another label: a peer cannot echo one for the other.
            master_proof(Some(&a), &m, &p, 0),
        ] {
            assert!(!proofs_equal(&good, &other));
        }
    }

    #[test]
    fn epoch_keys_differ_by_token_purpose_epoch_and_salt() {
        let t = token("0123456789abcdef");
        let k = EpochKey::derive(Some(&t), KeyPurpose::Ring, 5, 9);
        let tag = k.sign(b"hello");
        assert!(k.verify(b"hello", &tag));
        assert!(!k.verify(b"hellp", &tag));
        for other in [
            EpochKey::derive(None, KeyPurpose::Ring, 5, 9),
            EpochKey::derive(Some(&t), KeyPurpose::SharedState, 5, 9),
            EpochKey::derive(Some(&t), KeyPurpose::Ring, 6, 9),
            EpochKey::derive(Some(&t), KeyPurpose::Ring, 5, 8),
        ] {
            assert!(!other.verify(b"hello", &tag));
        }
    }

    #[test]
    fn generated_tokens_are_fresh_and_usable() {
        let (a, text_a) = RunToken::generate().unwrap();
        let (b, text_b) = RunToken::generate().unwrap();
        assert_ne!(text_a, text_b);
        assert_ne!(a, b);
        assert_eq!(text_a.len(), 64);
        assert_eq!(RunToken::new(&text_a).unwrap(), a);
    }
}
