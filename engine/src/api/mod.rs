//! What users call: the communicator and its builder, blocking collectives, membership,
//! shared-state sync, and async collectives with their handles.

mod all_reduce;
mod blocking;
mod broadcast_reduce;
mod builder;
mod collectives;
mod collectives_async;
mod communicator;
mod device_collectives;
mod gather_scatter;
mod handle;
mod layout;
mod membership;
mod optimize;
mod retry;
mod state_sync;

pub use builder::CommunicatorBuilder;
pub use collectives::{Collectives, PeerProbe};
pub use communicator::Communicator;
pub use handle::{Completion, DeviceCompletion, DeviceHandle, Handle};
pub use optimize::{OptimizeOptions, TopologyReport};
