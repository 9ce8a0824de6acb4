//! What the protocol shows its shell: the phase of each kind of operation, the effects a master
//! message asks for, and the group sizes.
//!
//! These are plain data at the bottom of the protocol: the state machine's files build on them,
//! and the engine's blocked callers wait on them.

use concord_master::proto::{Pull, RingMember};

use crate::Error;

/// Where the peer stands in a topology update.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TopoPhase {
    /// Nothing under way.
    Idle,
    /// Voted (or, when joining, registered); waiting for the master.
    Waiting,
    /// The master announced a ring: the shell must connect, then call `connect_finished`.
    Connect {
        /// Ring epoch.
        epoch: u64,
        /// Secret of the epoch.
        secret: u64,
        /// Members in ring order.
        ring: Vec<RingMember>,
    },
    /// Connections reported; waiting for the master's verdict.
    Reported {
        /// Ring epoch.
        epoch: u64,
    },
    /// The ring of the epoch is in place.
    Done {
        /// Ring epoch.
        epoch: u64,
        /// Ring size.
        world: u32,
    },
    /// The round failed; vote again.
    Failed {
        /// Why.
        reason: String,
    },
}

/// Where one collective (by tag) stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CollPhase {
    /// Voted to start; waiting for the master.
    Voting,
    /// The master said go: the shell runs the ring, then calls `collective_finished`.
    Run {
        /// Sequence number of the attempt.
        seq: u64,
    },
    /// Ring done locally; waiting for every other peer.
    Completing {
        /// Sequence number of the attempt.
        seq: u64,
    },
    /// Every peer completed.
    Done,
    /// Refused (descriptor mismatch) or aborted; the error says which.
    Failed(Error),
}

/// Where a shared-state sync stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SyncPhase {
    /// No sync under way.
    Idle,
    /// Voted; waiting for the plan.
    Voting,
    /// The plan: pull these entries (none when up to date), serve the others.
    Plan {
        /// Elected revision.
        revision: u64,
        /// Secret pull requests present.
        secret: u64,
        /// What to fetch.
        pulls: Vec<Pull>,
    },
    /// Pulls reported; serving until everyone is done.
    Reported {
        /// Elected revision.
        revision: u64,
    },
    /// Every peer holds the elected revision.
    Complete {
        /// Elected revision.
        revision: u64,
    },
    /// The sync failed.
    Failed(Error),
}

/// What the I/O shell must do after a master message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Start moving this attempt's data on the ring.
    Run {
        /// User tag.
        tag: u64,
        /// Attempt.
        seq: u64,
    },
    /// The ring lost a peer: tear its connections down now (blocked I/O returns at once).
    BreakRing,
    /// Stop this attempt's I/O (it completed or was aborted); its late frames are dropped.
    Retire {
        /// User tag.
        tag: u64,
        /// Attempt.
        seq: u64,
    },
}

/// Sizes across peer groups, as of the last topology update.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupInfo {
    /// Accepted peers across all groups.
    pub global_world: u32,
    /// Number of groups.
    pub groups: u32,
    /// Size of the largest group.
    pub largest_group: u32,
}
