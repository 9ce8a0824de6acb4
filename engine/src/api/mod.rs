//! What users call: the communicator and its builder, blocking collectives, membership,
//! shared-state sync, and async collectives with their handles.

mod all_reduce;
mod builder;
mod collectives;
mod communicator;
mod handle;
mod membership;
mod retry;
mod state_sync;

pub use builder::CommunicatorBuilder;
pub use collectives::{Collectives, PeerProbe};
pub use communicator::Communicator;
pub use handle::{Completion, DeviceCompletion, DeviceHandle, Handle};
