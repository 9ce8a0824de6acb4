//! Concord's master: admits peers, runs the unanimous votes, hands out sequence numbers and kicks
//! peers that misbehave, from a single thread.
//!
//! - [`proto`]: control messages and their versioned codec (shared with the engine);
//! - [`coordinator`]: the sans-IO state machine;
//! - [`server`]: the single-threaded `mio` event loop around it;
//! - [`ring_order`]: the ring order that measured edges call for (bottleneck first, then
//!   latency), pure.
//!
//! ```no_run
//! use concord_master::{coordinator::CoordinatorConfig, server::Server};
//! let mut config = CoordinatorConfig::default();
//! // Beyond loopback only peers holding the run's token join (see `concord_transport::auth`).
//! config.token = concord_transport::auth::RunToken::from_env()?;
//! let server = Server::bind("0.0.0.0:48148".parse().unwrap(), config)?;
//! server.run(None, || false)?; // serves until the process ends
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod coordinator;
pub mod proto;
pub mod ring_order;
pub mod server;

/// The master's default port.
pub const DEFAULT_PORT: u16 = 48148;
