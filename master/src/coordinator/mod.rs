//! The master's sans-IO state machine.
//!
//! Inputs arrive through `handle_*` with the current time; outputs (messages to send, connections
//! to close) leave through [`Coordinator::poll_output`]. The coordinator never reads a clock or
//! touches a socket, so the same code runs under the real event loop ([`crate::server`]) and
//! under deterministic simulation.
//!
//! Every transition is a unanimous vote of the accepted peers: accept pending peers and build a
//! ring (`AcceptVote`), answer "are peers pending?" (`PendingQuery`), start a collective per tag
//! (`CollInit`, with descriptors that must match), complete it (`CollComplete`). All pending
//! votes are re-evaluated after every message and every disconnect, so a dead peer never blocks
//! a vote: it is simply no longer among the voters, and whatever it was part of is aborted.
//! A message that is illegal in the sender's state gets the sender kicked.
//!
//! One file per job, all of them methods of the one [`Coordinator`]. Each imports the records of
//! `state` and the messages of [`crate::proto`], and no job's file imports another's (only `api`,
//! on top, borrows `membership`'s message names):
//!
//! - `state`: the public limits and outputs, the records kept, the queries every job asks;
//! - `api`: the `handle_*` / `poll_*` surface, the routing of messages and the re-check after
//!   every input;
//! - `membership`: registration (the hello, the run token's challenge and proof), departures,
//!   kicks, and the removal of a peer from every job;
//! - `topology`: the votes that admit peers and rebuild rings, and the connection rounds;
//! - `collectives`: the per-tag votes, completions and cancellations;
//! - `shared_state`: the shared-state sync election and transfer plan;
//! - `liveness`: hello deadlines and heartbeats.

mod api;
mod collectives;
mod liveness;
mod membership;
mod shared_state;
mod state;
mod topology;

pub use api::MAX_UNREGISTERED_MESSAGE_BYTES;
pub use state::{ConnId, Coordinator, CoordinatorConfig, Output};

#[cfg(test)]
mod auth_tests;
#[cfg(test)]
mod bounds_tests;
#[cfg(test)]
mod tests;
