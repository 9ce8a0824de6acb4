//! Concord: a fault-tolerant ring all-reduce engine.
//!
//! A `concord master` coordinates; each process embeds a [`Communicator`] that joins the master,
//! is admitted by the group, and all-reduces buffers with its ring neighbours over TCP.
//!
//! ```no_run
//! use concord::{Communicator, ReduceOp};
//! // Start `concord master` first (default port 48148).
//! let mut comm = Communicator::builder("127.0.0.1:48148").connect()?;
//! // Between steps: let waiting peers in.
//! if comm.are_new_peers_pending()? {
//!     comm.update_topology()?;
//! }
//! let mut grads = vec![0.5f32; 1 << 20];
//! comm.all_reduce_in_place(&mut grads, ReduceOp::Avg, 0)?;
//! # Ok::<(), concord::Error>(())
//! ```

#![warn(missing_docs)]

#[doc(hidden)]
pub mod affinity;
mod api;
mod aside;
#[doc(hidden)]
pub mod collective;
mod config;
mod control;
mod element;
mod error;
mod fault;
pub mod gpu;
pub mod launch;
mod pace;
mod peer;
mod plane;
#[doc(hidden)]
pub mod protocol;
mod raw_buf;
mod results;
#[doc(hidden)]
pub mod sim;
mod state;
#[doc(hidden)]
pub mod verify;

pub use api::{
    Collectives, Communicator, CommunicatorBuilder, Completion, DeviceCompletion, DeviceHandle,
    Handle, PeerProbe,
};
pub use collective::Traffic;
pub use concord_kernels::{DType, ReduceOp};
pub use concord_master::proto::CollKind;
pub use concord_transport::auth::RunToken;
pub use concord_transport::{BackendChoice, BackendKind};
pub use config::Config;
pub use element::Element;
pub use error::{Error, IoError};
pub use gpu::{cuda_status, DeviceElement};
pub use pace::SPIN_MAX_COLLECTIVE_BYTES;
pub use results::{Batch, ReduceInfo, RetryReport};
/// The shared-state pull request's codec, exposed for the fuzz targets.
#[doc(hidden)]
pub use state::request::PullRequest;
pub use state::{hash as state_hash, Entry, SharedState, SyncInfo, SyncStrategy};
