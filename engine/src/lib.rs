//! Concord: a fault-tolerant ring collective engine (all-reduce, reduce-scatter, all-gather,
//! broadcast, reduce, barrier).
//!
//! A master coordinates; each process embeds a [`Communicator`] that joins it, is admitted by
//! the group, and runs collectives with its ring neighbours over TCP. Under a launcher
//! (torchrun, `srun`, `mpirun`) every process runs the same code: [`Communicator::from_env`]
//! reads the launcher's ranks, rank 0 runs the master on a thread of its own, and every process
//! waits until the whole world is in:
//!
//! ```no_run
//! use concord::{Communicator, ReduceOp};
//! let mut comm = Communicator::from_env()?;
//! // Between steps: let waiting peers in.
//! if comm.are_new_peers_pending()? {
//!     comm.update_topology()?;
//! }
//! let mut grads = vec![0.5f32; 1 << 20];
//! comm.all_reduce_in_place(&mut grads, ReduceOp::Avg, 0)?;
//! # Ok::<(), concord::Error>(())
//! ```
//!
//! Without a launcher, start `concord master` and join it with
//! `Communicator::builder("host:48148").connect()`, then
//! [`Communicator::wait_for_world`] for the group you expect.

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
mod topology;
#[doc(hidden)]
pub mod verify;

pub use api::{
    Collectives, Communicator, CommunicatorBuilder, Completion, DeviceCompletion, DeviceHandle,
    Handle, OptimizeOptions, PeerProbe, TopologyReport,
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
