//! Which data-plane backend runs: io_uring when the kernel and the sandbox allow it, else
//! blocking sockets. The choice is made once per process and its reason printed once.

use std::fmt;
use std::str::FromStr;

/// Name of the environment variable that overrides the configured backend
/// (`auto`, `shm`, `uring` / `io_uring`, or `socket`).
pub const BACKEND_ENV: &str = "CONCORD_TRANSPORT";

/// The backend that actually moves data frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// One io_uring per connection ([`UringStream`](super::UringStream)).
    Uring,
    /// Blocking `read`/`write` on the socket ([`crate::socket`]).
    Socket,
    /// A shared-memory ring ([`crate::shm`]), between peers of one host.
    Shm,
}

impl BackendKind {
    /// Lower-case name, as accepted by [`BackendChoice::from_str`].
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Uring => "io_uring",
            BackendKind::Socket => "socket",
            BackendKind::Shm => "shm",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the user asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum BackendChoice {
    /// Shared memory with the neighbours on this host where both ends allow it and can map a
    /// segment; towards other hosts io_uring when [`probe`](super::probe) says it works, else
    /// sockets (with the reason).
    #[default]
    Auto,
    /// As `Auto`, but a neighbour on this host with which shared memory fails is an error
    /// instead of a fall-back to TCP.
    Shm,
    /// io_uring (never shared memory) or an error that says why it cannot run.
    Uring,
    /// Blocking sockets, never probing io_uring, never shared memory.
    Socket,
}

impl FromStr for BackendChoice {
    type Err = String;

    /// Parses `auto`, `shm`, `uring`, `io_uring` or `socket` (any case, surrounding blanks
    /// ignored).
    ///
    /// ```
    /// use concord_transport::uring::BackendChoice;
    /// assert_eq!("io_uring".parse::<BackendChoice>(), Ok(BackendChoice::Uring));
    /// assert!("tcp".parse::<BackendChoice>().is_err());
    /// ```
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(BackendChoice::Auto),
            "shm" | "shared-memory" => Ok(BackendChoice::Shm),
            "uring" | "io_uring" | "io-uring" => Ok(BackendChoice::Uring),
            "socket" | "sockets" => Ok(BackendChoice::Socket),
            other => Err(format!(
                "unknown transport backend {other:?}: use auto, shm, io_uring or socket"
            )),
        }
    }
}

impl fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendChoice::Auto => "auto",
            BackendChoice::Shm => "shm",
            BackendChoice::Uring => "io_uring",
            BackendChoice::Socket => "socket",
        })
    }
}

impl BackendChoice {
    /// The choice in `CONCORD_TRANSPORT` when it is set and not empty, else `default`.
    /// A value that does not parse is an error naming the variable.
    pub fn from_env_or(default: BackendChoice) -> Result<BackendChoice, String> {
        match std::env::var(BACKEND_ENV) {
            Ok(v) if !v.trim().is_empty() => v
                .parse()
                .map_err(|e: String| format!("{BACKEND_ENV}={v:?}: {e}")),
            Ok(_) | Err(std::env::VarError::NotPresent) => Ok(default),
            Err(std::env::VarError::NotUnicode(v)) => Err(format!(
                "{BACKEND_ENV}={v:?} is not UTF-8: use auto, shm, io_uring or socket"
            )),
        }
    }
}

/// Resolves a choice to the backend that connections to other hosts run on, probing io_uring
/// once per process (`Shm` resolves as `Auto`: shared memory is decided per connection).
///
/// Returns the backend and, when `Auto` fell back to sockets, why (print it once: users want to
/// know which backend ran). An explicit `Uring` that cannot run is an error carrying the reason.
///
/// ```
/// use concord_transport::uring::{resolve_backend, BackendChoice, BackendKind};
/// let (kind, why) = resolve_backend(BackendChoice::Socket).unwrap();
/// assert_eq!((kind, why), (BackendKind::Socket, None));
/// ```
pub fn resolve_backend(choice: BackendChoice) -> Result<(BackendKind, Option<String>), String> {
    match choice {
        BackendChoice::Socket => Ok((BackendKind::Socket, None)),
        _ => resolve_with(choice, super::probe().map(|_| ())),
    }
}

/// The decision of [`resolve_backend`] for a given probe outcome (pure, for tests).
pub(crate) fn resolve_with(
    choice: BackendChoice,
    probed: Result<(), String>,
) -> Result<(BackendKind, Option<String>), String> {
    match (choice, probed) {
        (BackendChoice::Socket, _) => Ok((BackendKind::Socket, None)),
        (_, Ok(())) => Ok((BackendKind::Uring, None)),
        (BackendChoice::Auto | BackendChoice::Shm, Err(why)) => Ok((
            BackendKind::Socket,
            Some(format!("io_uring unavailable ({why}); using blocking sockets")),
        )),
        (BackendChoice::Uring, Err(why)) => Err(format!(
            "the io_uring transport was requested but cannot run: {why}; choose the socket backend ({BACKEND_ENV}=socket) or allow io_uring"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse() {
        for (s, c) in [
            ("auto", BackendChoice::Auto),
            (" AUTO ", BackendChoice::Auto),
            ("uring", BackendChoice::Uring),
            ("io_uring", BackendChoice::Uring),
            ("socket", BackendChoice::Socket),
            ("shm", BackendChoice::Shm),
        ] {
            assert_eq!(s.parse::<BackendChoice>(), Ok(c), "{s}");
            assert_eq!(c.to_string().parse::<BackendChoice>(), Ok(c));
        }
        let err = "rdma".parse::<BackendChoice>().unwrap_err();
        assert!(err.contains("rdma") && err.contains("socket"), "{err}");
    }

    #[test]
    fn auto_falls_back_with_the_reason_and_explicit_uring_fails() {
        let no = || Err("kernel.io_uring_disabled=2".to_string());
        let (kind, why) = resolve_with(BackendChoice::Auto, no()).unwrap();
        assert_eq!(kind, BackendKind::Socket);
        assert!(why.unwrap().contains("io_uring_disabled=2"));
        let err = resolve_with(BackendChoice::Uring, no()).unwrap_err();
        assert!(
            err.contains("io_uring_disabled=2") && err.contains(BACKEND_ENV),
            "{err}"
        );
        assert_eq!(
            resolve_with(BackendChoice::Socket, no()).unwrap(),
            (BackendKind::Socket, None)
        );
        assert_eq!(
            resolve_with(BackendChoice::Auto, Ok(())).unwrap(),
            (BackendKind::Uring, None)
        );
        assert_eq!(
            resolve_with(BackendChoice::Uring, Ok(())).unwrap(),
            (BackendKind::Uring, None)
        );
    }
}
