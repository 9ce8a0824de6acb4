//! What the coordinator remembers: its public limits and outputs, the records it keeps per
//! connection, peer, round, collective and sync, and the few queries every job asks of them.
//!
//! Every other file of the coordinator builds on this one and none of them on each other's
//! records, so that the jobs (membership, topology, collectives, shared state, liveness) can be
//! read one at a time.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use concord_transport::auth::{Nonce, RunToken};

use crate::proto::{AbortKind, CollectiveDesc, EntryDesc, MasterMsg, PeerId};

/// Identifies one connection of the master (assigned by the I/O shell).
pub type ConnId = u64;

/// What the coordinator asks the I/O shell to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send a message on a connection.
    Send {
        /// Target connection.
        conn: ConnId,
        /// The message.
        msg: MasterMsg,
    },
    /// Flush what is queued for the connection, then close it.
    Close {
        /// The connection.
        conn: ConnId,
    },
}

/// Limits of the coordinator.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct CoordinatorConfig {
    /// A connection must say hello within this time or it is closed.
    pub hello_timeout: Duration,
    /// Most peers registered at once; further ones are refused.
    pub max_peers: usize,
    /// Most collectives (tags) in flight at once across the group.
    pub max_collectives: usize,
    /// Seed of the per-epoch ring secrets (the server seeds it from the OS).
    pub secret_seed: u64,
    /// Seed of the challenges' nonces (the server seeds it from the OS): each connection's
    /// challenge is derived from it and a counter, so no two are alike.
    pub nonce_seed: Nonce,
    /// The run token. With one, only a peer that proves it (challenge-response) is registered;
    /// without one, any peer that reaches the master is.
    pub token: Option<RunToken>,
    /// While collectives or votes are under way, every accepted peer is pinged this often.
    pub heartbeat_interval: Duration,
    /// A pinged peer that sends nothing for this long is kicked (stalled, hung or cut off): the
    /// survivors' collectives abort naming it, instead of waiting for it forever.
    pub heartbeat_timeout: Duration,
    /// A registered peer that no vote admits within this time is refused and closed, so that
    /// peers nobody admits cannot fill `max_peers`. Default 600 s: as long as a peer waits to be
    /// admitted by default (the engine's `join_timeout`), past which it has given up anyway.
    pub pending_timeout: Duration,
    /// Most connections at once, including those yet to say hello; further ones are refused and
    /// closed at once. Each costs the master one file descriptor and up to one message of read
    /// buffer (1 MiB), so keep it under the process's open-files limit. Default 4096
    /// (4 × the default `max_peers`).
    pub max_connections: usize,
    /// Most connections at once from one IP address (a host running many peers needs one per
    /// peer). Default 64.
    pub max_connections_per_ip: usize,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            hello_timeout: Duration::from_secs(10),
            max_peers: 1024,
            max_collectives: 4096,
            secret_seed: 0x5eed,
            nonce_seed: [0; 32],
            token: None,
            heartbeat_interval: Duration::from_millis(500),
            heartbeat_timeout: Duration::from_secs(3),
            pending_timeout: Duration::from_secs(600),
            max_connections: 4096,
            max_connections_per_ip: 64,
        }
    }
}

#[derive(Debug)]
pub(super) enum Conn {
    /// Connected; must say `Hello` before the deadline.
    AwaitingHello {
        ip: IpAddr,
        deadline: Instant,
    },
    /// Said `Hello` and was challenged; must prove the token before the same deadline.
    AwaitingProof {
        ip: IpAddr,
        deadline: Instant,
        hello: Box<Registration>,
    },
    Peer(PeerId),
}

/// What a `Hello` asked for, kept until the peer proves the token.
#[derive(Debug)]
pub(super) struct Registration {
    /// Where the ring dials the peer (checked at the hello).
    pub(super) data_addr: String,
    pub(super) group: u32,
    pub(super) peer_nonce: Nonce,
    pub(super) master_nonce: Nonce,
    /// The hello as encoded: the peer's proof covers it.
    pub(super) hello_bytes: Vec<u8>,
}

/// The connections the I/O shell holds open, counted per address for the limits: a connection
/// enters at `handle_connect` and leaves at `handle_disconnect` (the shell reports every
/// connection it drops, also those the coordinator closed), so each one counted holds a
/// descriptor in the shell.
#[derive(Debug, Default)]
pub(super) struct Ledger {
    pub(super) ips: BTreeMap<ConnId, IpAddr>,
    /// Open connections per address; no entry is zero.
    pub(super) per_ip: BTreeMap<IpAddr, usize>,
}

/// Refused connections are logged once per address per [`REFUSAL_LOG_INTERVAL`], so that a
/// flood cannot flood the log; the map of addresses is bounded by [`MAX_REFUSAL_LOG_ADDRS`].
#[derive(Debug, Default)]
pub(super) struct RefusalLog {
    /// When each address's refusal was last logged.
    pub(super) logged_at: BTreeMap<IpAddr, Instant>,
    /// Refusals not logged since the last summary.
    pub(super) unlogged: u64,
    /// When the last summary of unlogged refusals was written.
    pub(super) summary_at: Option<Instant>,
    /// When `logged_at` was last pruned of stale addresses (at most once a second while full).
    pub(super) pruned_at: Option<Instant>,
}

/// How often the refusals of one address are logged.
pub(super) const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// Most addresses whose last logged refusal is remembered.
pub(super) const MAX_REFUSAL_LOG_ADDRS: usize = 1024;

#[derive(Debug)]
pub(super) struct Peer {
    pub(super) conn: ConnId,
    pub(super) data_addr: String,
    pub(super) group: u32,
    pub(super) accepted: bool,
    /// When the unanswered ping was sent; cleared by any message from the peer.
    pub(super) ping_sent_at: Option<Instant>,
}

#[derive(Debug)]
pub(super) struct Round {
    pub(super) epoch: u64,
    pub(super) members: Vec<PeerId>,
    pub(super) connected: BTreeSet<PeerId>,
}

#[derive(Debug)]
pub(super) enum Coll {
    Voting {
        descs: BTreeMap<PeerId, CollectiveDesc>,
    },
    Running {
        seq: u64,
        members: BTreeSet<PeerId>,
        done: BTreeSet<PeerId>,
    },
}

/// A collective is known by its peer group and its tag.
pub(super) type CollKey = (u32, u64);

/// A shared-state vote as the master keeps it.
#[derive(Debug, Clone)]
pub(super) struct SyncVote {
    pub(super) revision: u64,
    pub(super) strategy: Strategy,
    pub(super) entries: Vec<EntryDesc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Strategy {
    EnforcePopular,
    ReceiveOnly,
    SendOnly,
}

impl Strategy {
    pub(super) fn parse(s: &str) -> Option<Self> {
        match s {
            "enforce-popular" => Some(Strategy::EnforcePopular),
            "receive-only" => Some(Strategy::ReceiveOnly),
            "send-only" => Some(Strategy::SendOnly),
            _ => None,
        }
    }
}

/// Where a sync stands.
#[derive(Debug)]
pub(super) enum SyncState {
    Voting {
        votes: BTreeMap<PeerId, SyncVote>,
    },
    Transferring {
        revision: u64,
        members: BTreeSet<PeerId>,
        done: BTreeSet<PeerId>,
    },
}

/// The master's state: peers, ring, votes and collectives in flight.
#[derive(Debug)]
pub struct Coordinator {
    pub(super) config: CoordinatorConfig,
    pub(super) conns: BTreeMap<ConnId, Conn>,
    pub(super) peers: BTreeMap<PeerId, Peer>,
    pub(super) next_peer_id: PeerId,
    pub(super) epoch: u64,
    /// Each group's ring, in ring order.
    pub(super) rings: BTreeMap<u32, Vec<PeerId>>,
    /// Groups whose ring cannot carry collectives (a member left), and why.
    pub(super) broken: BTreeMap<u32, String>,
    pub(super) round: Option<Round>,
    /// Topology votes: voter -> whether it asked to admit pending peers.
    pub(super) accept_votes: BTreeMap<PeerId, bool>,
    /// The ring orders proposed with the topology votes (`OrderVote`), by voter.
    pub(super) order_votes: BTreeMap<PeerId, Vec<PeerId>>,
    /// Each group's ring order, as its members last agreed (`optimize_topology`); rings follow
    /// it, members it does not name last in id order.
    pub(super) orders: BTreeMap<u32, Vec<PeerId>>,
    pub(super) pending_votes: BTreeSet<PeerId>,
    pub(super) colls: BTreeMap<CollKey, Coll>,
    /// Votes cancelled before every member voted: (reason, peers told). A late voter of the tag
    /// is told at once instead of starting a vote nobody else will join.
    pub(super) cancelled_votes: BTreeMap<CollKey, (AbortKind, String, BTreeSet<PeerId>)>,
    /// The shared-state sync under way, if any.
    pub(super) sync: BTreeMap<u32, SyncState>,
    /// Each peer's shared-state revision after its last completed sync.
    pub(super) revisions: BTreeMap<PeerId, u64>,
    pub(super) next_seq: u64,
    pub(super) out: VecDeque<Output>,
    /// The latest time an input carried.
    pub(super) now: Option<Instant>,
    /// Next heartbeat tick, while something is under way or peers wait to be admitted.
    pub(super) next_heartbeat: Option<Instant>,
    /// When each peer still waiting to be admitted registered.
    pub(super) pending_since: BTreeMap<PeerId, Instant>,
    pub(super) ledger: Ledger,
    pub(super) refusals: RefusalLog,
    /// Challenges sent so far (the nonce counter).
    pub(super) challenges: u64,
}

impl Coordinator {
    /// A coordinator with no peers.
    pub fn new(config: CoordinatorConfig) -> Self {
        Coordinator {
            config,
            conns: BTreeMap::new(),
            peers: BTreeMap::new(),
            next_peer_id: 1,
            epoch: 0,
            rings: BTreeMap::new(),
            broken: BTreeMap::new(),
            round: None,
            accept_votes: BTreeMap::new(),
            order_votes: BTreeMap::new(),
            orders: BTreeMap::new(),
            pending_votes: BTreeSet::new(),
            colls: BTreeMap::new(),
            cancelled_votes: BTreeMap::new(),
            sync: BTreeMap::new(),
            revisions: BTreeMap::new(),
            next_seq: 1,
            out: VecDeque::new(),
            now: None,
            next_heartbeat: None,
            pending_since: BTreeMap::new(),
            ledger: Ledger::default(),
            refusals: RefusalLog::default(),
            challenges: 0,
        }
    }

    /// Whether anything waits on the peers (then their liveness matters).
    pub(super) fn active(&self) -> bool {
        !self.colls.is_empty()
            || !self.sync.is_empty()
            || self.round.is_some()
            || !self.accept_votes.is_empty()
            || !self.pending_votes.is_empty()
    }

    /// Whether `id` takes part in a collective it has not finished (one operation kind at a time).
    pub(super) fn in_collective(&self, id: PeerId) -> bool {
        self.colls.values().any(|c| match c {
            Coll::Voting { descs } => descs.contains_key(&id),
            Coll::Running { members, done, .. } => members.contains(&id) && !done.contains(&id),
        })
    }

    /// Whether `id` takes part in a shared-state sync it has not finished.
    pub(super) fn in_sync(&self, id: PeerId) -> bool {
        let g = self.peers.get(&id).map_or(u32::MAX, |p| p.group);
        match self.sync.get(&g) {
            Some(SyncState::Voting { votes }) => votes.contains_key(&id),
            Some(SyncState::Transferring { members, done, .. }) => {
                members.contains(&id) && !done.contains(&id)
            }
            None => false,
        }
    }

    /// Queues `msg` for peer `id`; a peer already gone gets nothing.
    pub(super) fn send(&mut self, id: PeerId, msg: MasterMsg) {
        if let Some(peer) = self.peers.get(&id) {
            self.out.push_back(Output::Send {
                conn: peer.conn,
                msg,
            });
        }
    }
}

/// splitmix64 finaliser: spreads a seed into a secret.
pub(super) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
