//! Control messages between peers and the master, and their codec.
//!
//! Every message travels as `len u32 | kind u8 | fields`, little endian, `len` counting the bytes
//! after itself and bounded by [`MAX_MESSAGE_BYTES`]. The first message of each side (`Hello`,
//! `Welcome`/`Refused`) begins with a fixed `magic u32 | version u32` that no future version may
//! move, so that two releases can always tell each other their versions before anything else.
//! Decoding is total: any byte string yields a message or a [`ProtoError`], never a panic.

use std::fmt;

pub use concord_transport::auth::{Nonce, Proof};
pub use concord_transport::PROTOCOL_VERSION;

/// Magic opening the first message of each side ("CDM1").
pub const CONTROL_MAGIC: u32 = 0x314D_4443;
/// Largest encoded control message (bounds every buffer on both sides).
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;
/// Longest string field (reasons, addresses, dtype and op names).
pub const MAX_STRING_BYTES: usize = 4096;
/// Most members a ring may list.
pub const MAX_RING_MEMBERS: usize = 4096;
/// Most shared-state entries in one vote or plan.
pub const MAX_ENTRIES: usize = 8192;

/// Identifier the master gives each peer, unique for the master's lifetime.
pub type PeerId = u64;

/// Which collective a vote is for. The wire carries it as one byte ([`CollKind::to_wire`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CollKind {
    /// Every peer ends with the reduction of every peer's input.
    AllReduce,
    /// Every peer ends with the root's buffer.
    Broadcast,
    /// The root ends with the reduction of every peer's input.
    Reduce,
    /// Every peer ends with every peer's input, in rank order.
    AllGather,
    /// Rank `r` ends with slice `r` of the reduction of every peer's input.
    ReduceScatter,
    /// Nothing moves: the vote itself is the synchronisation.
    Barrier,
}

impl CollKind {
    /// Every kind, in wire order.
    pub const ALL: [CollKind; 6] = [
        CollKind::AllReduce,
        CollKind::Broadcast,
        CollKind::Reduce,
        CollKind::AllGather,
        CollKind::ReduceScatter,
        CollKind::Barrier,
    ];

    /// nccl-tests' name of the collective (`all_reduce`, `broadcast`, ...).
    pub fn name(self) -> &'static str {
        match self {
            CollKind::AllReduce => "all_reduce",
            CollKind::Broadcast => "broadcast",
            CollKind::Reduce => "reduce",
            CollKind::AllGather => "all_gather",
            CollKind::ReduceScatter => "reduce_scatter",
            CollKind::Barrier => "barrier",
        }
    }

    /// The kind of a name as [`CollKind::name`] gives it.
    pub fn from_name(name: &str) -> Option<CollKind> {
        CollKind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Whether the collective has a root (broadcast and reduce).
    pub fn has_root(self) -> bool {
        matches!(self, CollKind::Broadcast | CollKind::Reduce)
    }

    /// Whether the collective reduces (and so its op matters).
    pub fn reduces(self) -> bool {
        matches!(
            self,
            CollKind::AllReduce | CollKind::Reduce | CollKind::ReduceScatter
        )
    }

    /// The byte the wire carries.
    pub fn to_wire(self) -> u8 {
        self as u8
    }

    /// The kind of a wire byte, if it is one.
    pub fn from_wire(byte: u8) -> Option<CollKind> {
        CollKind::ALL.get(usize::from(byte)).copied()
    }
}

impl fmt::Display for CollKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What every peer must agree on for a collective with a given tag.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct CollectiveDesc {
    /// Which collective.
    pub kind: CollKind,
    /// Element count of the whole buffer as nccl-tests counts it: the input of an all-reduce,
    /// broadcast or reduce; the output of an all-gather (world × each input); the input of a
    /// reduce-scatter (world × each output).
    pub count: u64,
    /// Element type name (for example "float").
    pub dtype: String,
    /// Reduction name (for example "sum"; "none" for collectives that do not reduce).
    pub op: String,
    /// Ring position of the root (broadcast and reduce; 0 for the others).
    pub root: u32,
}

impl CollectiveDesc {
    /// The fields in which `self` and `other` differ, each as `name (this vs other)`.
    pub fn differences(&self, other: &CollectiveDesc) -> Vec<String> {
        let mut out = Vec::new();
        if self.kind != other.kind {
            out.push(format!("kind ({} vs {})", self.kind, other.kind));
        }
        if self.count != other.count {
            out.push(format!("count ({} vs {})", self.count, other.count));
        }
        if self.dtype != other.dtype {
            out.push(format!("dtype ({} vs {})", self.dtype, other.dtype));
        }
        if self.op != other.op {
            out.push(format!("op ({} vs {})", self.op, other.op));
        }
        if self.root != other.root {
            out.push(format!("root ({} vs {})", self.root, other.root));
        }
        out
    }
}

impl fmt::Display for CollectiveDesc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} count={} dtype={} op={}",
            self.kind, self.count, self.dtype, self.op
        )?;
        if self.kind.has_root() {
            write!(f, " root={}", self.root)?;
        }
        Ok(())
    }
}

/// One shared-state entry as a peer describes it in its vote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryDesc {
    /// Name of the tensor.
    pub key: String,
    /// Element type name.
    pub dtype: String,
    /// Size in bytes.
    pub bytes: u64,
    /// xxHash64 (seed 0) of the bytes.
    pub hash: u64,
    /// Whether peers may hold different contents by design (never synchronised).
    pub allow_content_inequality: bool,
}

/// What an outdated peer must fetch for one entry, and from whom.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pull {
    /// Name of the tensor.
    pub key: String,
    /// Size in bytes.
    pub bytes: u64,
    /// The elected content's hash, to verify after the transfer.
    pub hash: u64,
    /// Peers holding the elected content (pull from several at once).
    pub sources: Vec<RingMember>,
}

/// One member of a ring, in ring order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RingMember {
    /// The member's id.
    pub peer_id: PeerId,
    /// Where the member accepts data connections ("ip:port").
    pub data_addr: String,
}

/// Messages a peer sends to the master.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerMsg {
    /// First message: who I am and where my ring predecessor can reach me.
    Hello {
        /// The peer's protocol version.
        version: u32,
        /// Port of the peer's data listener.
        data_port: u16,
        /// Address to advertise instead of the one the master sees (empty: use the observed IP).
        advertise_ip: String,
        /// Peer group: collectives and shared state run per group, each group on its own ring.
        group: u32,
        /// Fresh random bytes the master's proof must cover (see [`MasterMsg::Welcome`]).
        nonce: Nonce,
    },
    /// Answer to [`MasterMsg::Challenge`]: the run token's proof over both nonces and the hello
    /// (`concord_transport::auth::peer_proof`).
    Proof {
        /// The proof.
        proof: Proof,
    },
    /// Vote to accept pending peers and (re)build the ring (`update_topology`).
    AcceptVote,
    /// Vote to rebuild the rings around lost peers without admitting anyone (the retry after a
    /// failure: a peer admitted then would start somewhere else than the members' re-run).
    RepairVote,
    /// Vote to rebuild the rings, without admitting anyone, with this peer's group in `order`
    /// (`optimize_topology`: every member of the group proposes the same order, the one its
    /// measurements call for). Counts as a topology vote.
    OrderVote {
        /// The group's members in ring order.
        order: Vec<PeerId>,
    },
    /// Vote to learn whether peers are waiting to join (`are_new_peers_pending`).
    PendingQuery,
    /// The peer's connections for a ring epoch are up (or failed).
    ConnectResult {
        /// The epoch of the ring.
        epoch: u64,
        /// Whether every connection came up.
        ok: bool,
        /// Why not, when not.
        detail: String,
    },
    /// Vote to start a collective.
    CollInit {
        /// User tag.
        tag: u64,
        /// What the peer asks for.
        desc: CollectiveDesc,
    },
    /// Vote that the peer's part of a collective ended.
    CollComplete {
        /// User tag.
        tag: u64,
        /// Sequence number of the attempt.
        seq: u64,
        /// Whether the peer's ring I/O succeeded.
        ok: bool,
        /// Why not, when not.
        detail: String,
    },
    /// The peer leaves on purpose.
    Goodbye,
    /// Answer to [`MasterMsg::Ping`]: this peer is alive.
    Pong,
    /// Vote to synchronise shared state.
    SyncVote {
        /// The peer's revision of its shared state.
        revision: u64,
        /// "enforce-popular", "receive-only" or "send-only".
        strategy: String,
        /// Every entry, sorted by key.
        entries: Vec<EntryDesc>,
    },
    /// This peer finished its pulls of a sync (or failed them).
    SyncDone {
        /// The elected revision.
        revision: u64,
        /// Whether every pulled entry arrived and matched its hash.
        ok: bool,
        /// Why not, when not.
        detail: String,
    },
    /// Abort a collective on every peer (its deadline passed, or the user cancelled it).
    CollCancel {
        /// User tag.
        tag: u64,
        /// Sequence number of the attempt (0 while it is still being voted on).
        seq: u64,
        /// What kind of abort this is (a deadline, a user's cancel, a failure here).
        kind: AbortKind,
        /// Why, in words ("timed out after 120 s", "cancelled").
        reason: String,
    },
}

/// What kind of abort ended a collective: the part a program acts on (the reason says it in
/// words). It travels as a field of `CollCancel` and `CollAborted`, never inside the reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AbortKind {
    /// The group lost a peer of the collective (it died, left or was kicked): the ring must be
    /// rebuilt (`update_topology`) before a retry.
    LostPeer,
    /// A peer's deadline for the collective passed.
    Timeout,
    /// A user cancelled it.
    Cancelled,
    /// It failed on one peer (a reduction or a device step failed).
    Failed,
    /// The master did not start it: the ring is being rebuilt or broken, or too many
    /// collectives are in flight.
    Refused,
}

impl AbortKind {
    /// Every kind, in wire order.
    pub const ALL: [AbortKind; 5] = [
        AbortKind::LostPeer,
        AbortKind::Timeout,
        AbortKind::Cancelled,
        AbortKind::Failed,
        AbortKind::Refused,
    ];

    /// The kind's byte on the wire.
    pub fn to_wire(self) -> u8 {
        match self {
            AbortKind::LostPeer => 0,
            AbortKind::Timeout => 1,
            AbortKind::Cancelled => 2,
            AbortKind::Failed => 3,
            AbortKind::Refused => 4,
        }
    }

    /// The kind of a wire byte, `None` for a byte no kind has.
    pub fn from_wire(byte: u8) -> Option<AbortKind> {
        AbortKind::ALL.into_iter().find(|k| k.to_wire() == byte)
    }

    /// A short lowercase name ("lost-peer", "timeout", ...), for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            AbortKind::LostPeer => "lost-peer",
            AbortKind::Timeout => "timeout",
            AbortKind::Cancelled => "cancelled",
            AbortKind::Failed => "failed",
            AbortKind::Refused => "refused",
        }
    }
}

impl std::fmt::Display for AbortKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Messages the master sends to a peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MasterMsg {
    /// Answer to a `Hello`: prove the run token over this nonce (with [`PeerMsg::Proof`]).
    Challenge {
        /// The master's protocol version.
        version: u32,
        /// Fresh random bytes the peer's proof must cover.
        nonce: Nonce,
        /// Whether the master checks the proof (it holds a token); `false` for a master run
        /// without one, which a peer holding a token refuses to join.
        token_required: bool,
    },
    /// Registration accepted; wait to be admitted.
    Welcome {
        /// The master's protocol version.
        version: u32,
        /// The id given to this peer.
        peer_id: PeerId,
        /// The master's proof of the run token, over both nonces and the id
        /// (`concord_transport::auth::master_proof`).
        proof: Proof,
    },
    /// Registration refused (for example another version); the master closes the connection.
    Refused {
        /// The master's protocol version.
        version: u32,
        /// Why.
        reason: String,
    },
    /// Result of the pending-peers vote, the same for every voter.
    PendingAnswer {
        /// Whether peers are waiting to join.
        pending: bool,
    },
    /// A new ring: connect to your successor, accept from your predecessor, then report.
    Topology {
        /// The ring epoch.
        epoch: u64,
        /// The epoch's salt: with the run token it derives the key the ring's hellos are signed
        /// with (`concord_transport::auth::EpochKey`). Not a secret by itself.
        secret: u64,
        /// Members in ring order.
        ring: Vec<RingMember>,
    },
    /// The topology vote finished; the ring of `epoch` is in place.
    TopologyDone {
        /// The ring epoch now in force.
        epoch: u64,
        /// The size of this peer's group (its ring).
        world: u32,
        /// Accepted peers across all groups.
        global_world: u32,
        /// Number of groups.
        groups: u32,
        /// Size of the largest group.
        largest_group: u32,
    },
    /// A connection round failed (a member dropped or could not connect); vote again.
    TopologyFailed {
        /// The failed epoch.
        epoch: u64,
        /// Why.
        reason: String,
    },
    /// All members voted for a collective with matching descriptors: run it.
    CollCommence {
        /// User tag.
        tag: u64,
        /// Sequence number of this attempt.
        seq: u64,
        /// Ring epoch it runs on.
        epoch: u64,
    },
    /// Members disagreed on the descriptor; nothing is reduced.
    CollRefused {
        /// User tag.
        tag: u64,
        /// Which peers asked for what.
        reason: String,
    },
    /// Every member completed the collective.
    CollDone {
        /// User tag.
        tag: u64,
        /// Sequence number.
        seq: u64,
    },
    /// The collective failed on some member or lost one; restore inputs and retry.
    CollAborted {
        /// User tag.
        tag: u64,
        /// Sequence number (0 when it had not started).
        seq: u64,
        /// What kind of abort this is.
        kind: AbortKind,
        /// Why, in words.
        reason: String,
        /// Peers lost, if any.
        lost: Vec<PeerId>,
    },
    /// Liveness probe, sent while collectives or votes are under way; answer with `Pong`.
    Ping,
    /// Result of the shared-state vote for this peer: what it must pull (nothing, when up to
    /// date), and the salt of the key pull requests are signed with.
    SyncPlan {
        /// The elected revision, which every peer holds afterwards.
        revision: u64,
        /// The sync's salt (see `Topology`'s).
        secret: u64,
        /// Entries to fetch.
        pulls: Vec<Pull>,
    },
    /// Every peer holds the elected state; sources may stop serving.
    SyncComplete {
        /// The elected revision.
        revision: u64,
    },
    /// The sync failed (a peer could not fetch an entry); nobody's revision changed.
    SyncFailed {
        /// Why.
        reason: String,
    },
    /// The master removes this peer; the connection closes after this message.
    Kicked {
        /// Why.
        reason: String,
    },
}

/// A control message that cannot be decoded.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// The other side speaks another version.
    #[error("protocol version mismatch: this side speaks version {ours}, the other side speaks {theirs}; run the same Concord release on every machine")]
    Version {
        /// Our version.
        ours: u32,
        /// Theirs.
        theirs: u32,
    },
    /// Bytes that are not a valid message.
    #[error("malformed control message: {0}")]
    Malformed(String),
}

/// The abort kind of a wire byte; an unknown byte is a malformed message.
fn abort_kind(byte: u8) -> Result<AbortKind, ProtoError> {
    AbortKind::from_wire(byte).ok_or_else(|| malformed(format!("unknown abort kind {byte}")))
}

fn coll_kind(byte: u8) -> Result<CollKind, ProtoError> {
    CollKind::from_wire(byte).ok_or_else(|| malformed(format!("unknown collective kind {byte}")))
}

fn malformed(what: impl Into<String>) -> ProtoError {
    ProtoError::Malformed(what.into())
}

mod master_msg;
mod peer_msg;
mod wire;

pub use master_msg::{decode_master, encode_master, master_message_bytes};
pub use peer_msg::{decode_peer, encode_peer, peer_message_bytes};
pub use wire::split_frame;

#[cfg(test)]
mod tests;
