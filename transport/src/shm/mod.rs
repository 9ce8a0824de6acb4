//! The shared-memory data path between ring neighbours on one host.
//!
//! - [`segment`]: an anonymous memfd (mode 0600, in no file system), created by the receiving
//!   end, mapped by both, freed by the kernel when both are gone;
//! - [`ring`]: a one-way ring of data frames in it, with reads in place, and waits that poll
//!   briefly, then sleep on the connection's TCP socket (doorbell and liveness channel);
//! - [`offer`]: the exchange after the data hello that decides whether a connection uses it
//!   (same host identity, both ends willing, the segment mappable).

pub mod offer;
pub mod ring;
pub mod segment;

pub use offer::{host_id, Answer, Offer, OfferedSegment, HOST_ID_ENV};
pub use ring::{ShmProbe, ShmReader, ShmStopper, ShmWriter};
pub use segment::{Created, Segment};
