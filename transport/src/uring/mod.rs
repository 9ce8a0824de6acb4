//! The io_uring data-plane backend, and the choice between it and blocking sockets.
//!
//! - [`probe`] finds out once per process whether io_uring can run (kernel, the
//!   `kernel.io_uring_disabled` sysctl, a container's seccomp profile) and what it supports.
//! - [`resolve_backend`] turns the user's [`BackendChoice`] (`CONCORD_TRANSPORT`) into the
//!   [`BackendKind`] that runs, with the reason whenever `auto` fell back to sockets.
//! - [`UringStream`] drives one connected TCP stream through its own small ring: frame writes in
//!   one submission, exact reads, reads into registered [`PinnedBuf`](crate::buffers::PinnedBuf)s,
//!   timed waits, and a [`ShutdownHandle`] that stops a blocked call from another thread. The
//!   type and its lifecycle are in `conn.rs`, its transfers through the ring in `ring_io.rs`,
//!   and small transfers by plain non-blocking syscalls in `direct.rs`.
//! - [`uring_stats`] counts submissions and bytes, so tests can show io_uring moved the data.
//!
//! Off Linux the module still compiles: [`probe`] says io_uring does not exist there and
//! [`UringStream::new`] fails with that reason. Design notes: `README.md` in this folder.
//!
//! ```
//! use concord_transport::uring::{resolve_backend, BackendChoice, BackendKind};
//! let choice = BackendChoice::from_env_or(BackendChoice::Auto).unwrap();
//! let (kind, fell_back) = resolve_backend(choice).unwrap_or((BackendKind::Socket, None));
//! if let Some(why) = fell_back {
//!     eprintln!("concord: {why}");
//! }
//! println!("data plane: {kind}");
//! ```

mod backend;
mod stats;

pub use backend::{resolve_backend, BackendChoice, BackendKind, BACKEND_ENV};
pub use stats::{uring_stats, UringStats};

#[cfg(target_os = "linux")]
mod conn;
#[cfg(target_os = "linux")]
mod direct;
#[cfg(target_os = "linux")]
mod probe;
#[cfg(target_os = "linux")]
mod ring;
#[cfg(target_os = "linux")]
mod ring_io;

#[cfg(target_os = "linux")]
pub use conn::{ShutdownHandle, UringStream, DEFAULT_ZERO_COPY, DIRECT_MAX_BYTES};
#[cfg(target_os = "linux")]
pub use probe::{probe, UringInfo};

#[cfg(not(target_os = "linux"))]
mod shell;
#[cfg(not(target_os = "linux"))]
pub use shell::{probe, ShutdownHandle, UringInfo, UringStream, DEFAULT_ZERO_COPY};
