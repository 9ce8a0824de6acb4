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

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use concord_transport::PROTOCOL_VERSION;

use crate::proto::{CollectiveDesc, MasterMsg, PeerId, PeerMsg, RingMember};

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
    /// While collectives or votes are under way, every accepted peer is pinged this often.
    pub heartbeat_interval: Duration,
    /// A pinged peer that sends nothing for this long is kicked (stalled, hung or cut off): the
    /// survivors' collectives abort naming it, instead of waiting for it forever.
    pub heartbeat_timeout: Duration,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            hello_timeout: Duration::from_secs(10),
            max_peers: 1024,
            max_collectives: 4096,
            secret_seed: 0x5eed,
            heartbeat_interval: Duration::from_millis(500),
            heartbeat_timeout: Duration::from_secs(3),
        }
    }
}

#[derive(Debug)]
enum Conn {
    AwaitingHello { ip: IpAddr, deadline: Instant },
    Peer(PeerId),
}

#[derive(Debug)]
struct Peer {
    conn: ConnId,
    data_addr: String,
    group: u32,
    accepted: bool,
    /// When the unanswered ping was sent; cleared by any message from the peer.
    ping_sent_at: Option<Instant>,
}

#[derive(Debug)]
struct Round {
    epoch: u64,
    members: Vec<PeerId>,
    connected: BTreeSet<PeerId>,
}

#[derive(Debug)]
enum Coll {
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
type CollKey = (u32, u64);

/// The master's state: peers, ring, votes and collectives in flight.
#[derive(Debug)]
pub struct Coordinator {
    config: CoordinatorConfig,
    conns: BTreeMap<ConnId, Conn>,
    peers: BTreeMap<PeerId, Peer>,
    next_peer_id: PeerId,
    epoch: u64,
    /// Each group's ring, in ring order.
    rings: BTreeMap<u32, Vec<PeerId>>,
    /// Groups whose ring cannot carry collectives (a member left), and why.
    broken: BTreeMap<u32, String>,
    round: Option<Round>,
    /// Topology votes: voter -> whether it asked to admit pending peers.
    accept_votes: BTreeMap<PeerId, bool>,
    pending_votes: BTreeSet<PeerId>,
    colls: BTreeMap<CollKey, Coll>,
    /// Votes cancelled before every member voted: (reason, peers told). A late voter of the tag
    /// is told at once instead of starting a vote nobody else will join.
    cancelled_votes: BTreeMap<CollKey, (String, BTreeSet<PeerId>)>,
    /// The shared-state sync under way, if any.
    sync: BTreeMap<u32, sync::SyncState>,
    /// Each peer's shared-state revision after its last completed sync.
    revisions: BTreeMap<PeerId, u64>,
    next_seq: u64,
    out: VecDeque<Output>,
    /// The latest time an input carried.
    now: Option<Instant>,
    /// Next heartbeat tick, while something is under way.
    next_heartbeat: Option<Instant>,
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
            pending_votes: BTreeSet::new(),
            colls: BTreeMap::new(),
            cancelled_votes: BTreeMap::new(),
            sync: BTreeMap::new(),
            revisions: BTreeMap::new(),
            next_seq: 1,
            out: VecDeque::new(),
            now: None,
            next_heartbeat: None,
        }
    }

    /// Next output for the I/O shell.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// When [`Coordinator::handle_timeout`] must next be called, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.conns
            .values()
            .filter_map(|c| match c {
                Conn::AwaitingHello { deadline, .. } => Some(*deadline),
                Conn::Peer(_) => None,
            })
            .chain(self.next_heartbeat)
            .min()
    }

    /// Whether anything waits on the peers (then their liveness matters).
    fn active(&self) -> bool {
        !self.colls.is_empty()
            || !self.sync.is_empty()
            || self.round.is_some()
            || !self.accept_votes.is_empty()
            || !self.pending_votes.is_empty()
    }

    /// Pings accepted peers and kicks those that did not answer the previous ping in time.
    fn heartbeat(&mut self, now: Instant) {
        let timeout = self.config.heartbeat_timeout;
        let mut silent = Vec::new();
        let mut ping = Vec::new();
        for (id, p) in self.peers.iter_mut().filter(|(_, p)| p.accepted) {
            match p.ping_sent_at {
                Some(at) if now.saturating_duration_since(at) >= timeout => {
                    silent.push((*id, p.conn))
                }
                Some(_) => {}
                None => {
                    p.ping_sent_at = Some(now);
                    ping.push(*id);
                }
            }
        }
        for id in ping {
            self.send(id, MasterMsg::Ping);
        }
        for (id, conn) in silent {
            let ms = timeout.as_millis();
            tracing::warn!("peer {id} silent for {ms} ms; removing it");
            self.kick_conn(
                conn,
                &format!("no answer to heartbeats for {ms} ms: stalled, hung or cut off"),
            );
        }
    }

    /// Accepted peers, in ring order once a ring is built.
    pub fn accepted(&self) -> Vec<PeerId> {
        self.peers
            .iter()
            .filter(|(_, p)| p.accepted)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Registered peers still waiting to be admitted.
    pub fn pending(&self) -> Vec<PeerId> {
        self.peers
            .iter()
            .filter(|(_, p)| !p.accepted)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Number of open connections (peers and those still to say hello).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Collectives in flight (voting or running).
    pub fn collectives_in_flight(&self) -> usize {
        self.colls.len()
    }

    /// A new connection from `ip`.
    pub fn handle_connect(&mut self, conn: ConnId, ip: IpAddr, now: Instant) {
        self.now = Some(now);
        let deadline = now + self.config.hello_timeout;
        let previous = self
            .conns
            .insert(conn, Conn::AwaitingHello { ip, deadline });
        assert!(previous.is_none(), "connection id {conn} reused while open");
    }

    /// The connection closed (by the peer or by an I/O error).
    pub fn handle_disconnect(&mut self, conn: ConnId, now: Instant) {
        self.now = Some(now);
        if let Some(Conn::Peer(id)) = self.conns.remove(&conn) {
            self.remove_peer(id, &format!("peer {id} disconnected"));
        }
        self.reevaluate();
    }

    /// The connection sent bytes that do not decode: kick it.
    pub fn handle_malformed(&mut self, conn: ConnId, error: &str, now: Instant) {
        self.now = Some(now);
        self.kick_conn(conn, &format!("malformed message: {error}"));
        self.reevaluate();
    }

    /// The connection speaks another protocol version: refuse it, naming both versions.
    pub fn handle_version_mismatch(&mut self, conn: ConnId, theirs: u32, now: Instant) {
        self.now = Some(now);
        let reason = format!(
            "protocol version mismatch: the master speaks version {PROTOCOL_VERSION}, this peer speaks {theirs}; run the same Concord release on every machine"
        );
        self.out.push_back(Output::Send {
            conn,
            msg: MasterMsg::Refused {
                version: PROTOCOL_VERSION,
                reason,
            },
        });
        self.close(conn, "version mismatch");
        self.reevaluate();
    }

    /// Deadlines: connections that never said hello are closed.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = Some(now);
        if self.next_heartbeat.is_some_and(|t| t <= now) {
            self.next_heartbeat = Some(now + self.config.heartbeat_interval);
            self.heartbeat(now);
        }
        let late: Vec<ConnId> = self
            .conns
            .iter()
            .filter_map(|(id, c)| match c {
                Conn::AwaitingHello { deadline, .. } if *deadline <= now => Some(*id),
                _ => None,
            })
            .collect();
        for conn in late {
            let ms = self.config.hello_timeout.as_millis();
            self.kick_conn(conn, &format!("no hello within {ms} ms"));
        }
        self.reevaluate();
    }

    /// A decoded message from a connection.
    pub fn handle_message(&mut self, conn: ConnId, msg: PeerMsg, now: Instant) {
        self.now = Some(now);
        match self.conns.get(&conn) {
            None => {} // Already closed; late bytes are ignored.
            Some(Conn::AwaitingHello { ip, .. }) => {
                let ip = *ip;
                self.on_hello(conn, ip, msg);
            }
            Some(Conn::Peer(id)) => {
                let id = *id;
                if let Some(p) = self.peers.get_mut(&id) {
                    p.ping_sent_at = None; // Anything it says proves it alive.
                }
                if let Err(reason) = self.on_peer_message(id, msg) {
                    self.kick_conn(conn, &reason);
                }
            }
        }
        self.reevaluate();
    }

    fn on_hello(&mut self, conn: ConnId, ip: IpAddr, msg: PeerMsg) {
        let PeerMsg::Hello {
            version,
            data_port,
            advertise_ip,
            group,
        } = msg
        else {
            self.kick_conn(
                conn,
                &format!("first message must be Hello, got {}", kind(&msg)),
            );
            return;
        };
        debug_assert_eq!(
            version, PROTOCOL_VERSION,
            "the codec refuses other versions"
        );
        if self.peers.len() >= self.config.max_peers {
            let reason = format!("the master is full ({} peers)", self.config.max_peers);
            self.out.push_back(Output::Send {
                conn,
                msg: MasterMsg::Refused {
                    version: PROTOCOL_VERSION,
                    reason,
                },
            });
            self.close(conn, "full");
            return;
        }
        let host = if advertise_ip.is_empty() {
            ip.to_string()
        } else {
            advertise_ip
        };
        let data_addr = match host.parse::<IpAddr>() {
            Ok(IpAddr::V6(v6)) => format!("[{v6}]:{data_port}"),
            _ => format!("{host}:{data_port}"),
        };
        let id = self.next_peer_id;
        self.next_peer_id += 1;
        self.conns.insert(conn, Conn::Peer(id));
        self.peers.insert(
            id,
            Peer {
                conn,
                data_addr,
                group,
                accepted: false,
                ping_sent_at: None,
            },
        );
        self.send(
            id,
            MasterMsg::Welcome {
                version: PROTOCOL_VERSION,
                peer_id: id,
            },
        );
    }

    /// Applies a message from a registered peer; `Err` means "kick with this reason".
    fn on_peer_message(&mut self, id: PeerId, msg: PeerMsg) -> Result<(), String> {
        let accepted = self.peers[&id].accepted;
        match msg {
            PeerMsg::Goodbye => {
                let conn = self.peers[&id].conn;
                self.remove_peer(id, &format!("peer {id} left"));
                self.conns.remove(&conn);
                self.out.push_back(Output::Close { conn });
                Ok(())
            }
            PeerMsg::Hello { .. } => Err("sent Hello twice".into()),
            PeerMsg::Pong => Ok(()),
            PeerMsg::SyncVote { .. } | PeerMsg::SyncDone { .. } if !accepted => {
                Err("sent a shared-state message before being admitted to the group".into())
            }
            PeerMsg::SyncVote {
                revision,
                strategy,
                entries,
            } => self.on_sync_vote(id, revision, &strategy, entries),
            PeerMsg::SyncDone {
                revision,
                ok,
                detail,
            } => self.on_sync_done(id, revision, ok, &detail),
            other if !accepted => Err(format!(
                "sent {} before being admitted to the group",
                kind(&other)
            )),
            PeerMsg::AcceptVote | PeerMsg::RepairVote => {
                let admit = matches!(msg, PeerMsg::AcceptVote);
                if self.in_sync(id) {
                    return Err("voted to update the topology during a shared-state sync".into());
                }
                if self.round.is_some() {
                    return Err("voted to update the topology during a connection round".into());
                }
                if self.in_collective(id) {
                    return Err("voted to update the topology with collectives in flight (one operation kind at a time)".into());
                }
                if self.accept_votes.insert(id, admit).is_some() {
                    return Err("voted twice to update the topology".into());
                }
                Ok(())
            }
            PeerMsg::PendingQuery => {
                if !self.pending_votes.insert(id) {
                    return Err("asked twice whether peers are pending".into());
                }
                Ok(())
            }
            PeerMsg::ConnectResult { epoch, ok, detail } => {
                self.on_connect_result(id, epoch, ok, detail)
            }
            PeerMsg::CollInit { tag, desc } => self.on_coll_init(id, tag, desc),
            PeerMsg::CollComplete {
                tag,
                seq,
                ok,
                detail,
            } => self.on_coll_complete(id, tag, seq, ok, detail),
            PeerMsg::CollCancel { tag, seq, reason } => self.on_coll_cancel(id, tag, seq, &reason),
        }
    }

    fn on_coll_cancel(
        &mut self,
        id: PeerId,
        tag: u64,
        seq: u64,
        reason: &str,
    ) -> Result<(), String> {
        let key = (self.peers[&id].group, tag);
        let current = match self.colls.get(&key) {
            Some(Coll::Voting { descs }) => seq == 0 && descs.contains_key(&id),
            Some(Coll::Running {
                seq: s, members, ..
            }) => *s == seq && members.contains(&id),
            None => false,
        };
        if current {
            let mut reason = format!("peer {id}: {reason}");
            if let Some(Coll::Voting { descs }) = self.colls.get(&key) {
                // Say who is late: the members of the group that never started it.
                let late: Vec<String> = self
                    .peers
                    .iter()
                    .filter(|(p, peer)| {
                        peer.accepted && peer.group == key.0 && !descs.contains_key(p)
                    })
                    .map(|(p, _)| p.to_string())
                    .collect();
                if !late.is_empty() {
                    reason.push_str(&format!(
                        "; waiting for peer {} to start it",
                        late.join(", ")
                    ));
                }
            }
            if let Some(Coll::Voting { descs }) = self.colls.get(&key) {
                if self.cancelled_votes.len() < self.config.max_collectives {
                    let told = descs.keys().copied().collect();
                    self.cancelled_votes.insert(key, (reason.clone(), told));
                }
            }
            // The connections stay up: only this collective's frames stop.
            self.abort_coll(key, &reason, Vec::new());
        } else if seq >= self.next_seq {
            return Err(format!(
                "cancelled collective {tag} with sequence {seq}, never started"
            ));
        }
        Ok(())
    }

    fn on_connect_result(
        &mut self,
        id: PeerId,
        epoch: u64,
        ok: bool,
        detail: String,
    ) -> Result<(), String> {
        let Some(round) = self.round.as_mut().filter(|r| r.epoch == epoch) else {
            if epoch <= self.epoch {
                return Ok(()); // A report for a round that already ended.
            }
            return Err(format!(
                "reported connections for epoch {epoch}, never announced"
            ));
        };
        if !round.members.contains(&id) {
            return Err(format!(
                "reported connections for epoch {epoch} it is not part of"
            ));
        }
        if ok {
            if !round.connected.insert(id) {
                return Err(format!("reported connections for epoch {epoch} twice"));
            }
        } else {
            self.fail_round(&format!("peer {id} could not connect: {detail}"));
        }
        Ok(())
    }

    fn on_coll_init(&mut self, id: PeerId, tag: u64, desc: CollectiveDesc) -> Result<(), String> {
        if self.in_sync(id) {
            return Err(
                "started a collective during a shared-state sync (one operation kind at a time)"
                    .into(),
            );
        }
        if desc.dtype.is_empty() || desc.op.is_empty() {
            return Err(format!("collective {tag} with an empty dtype or op"));
        }
        if self.accept_votes.contains_key(&id) {
            return Err("started a collective while voting to update the topology (one operation kind at a time)".into());
        }
        let g = self.peers[&id].group;
        let key = (g, tag);
        if let Some((reason, told)) = self.cancelled_votes.get_mut(&key) {
            if told.insert(id) {
                let reason = reason.clone();
                self.send(
                    id,
                    MasterMsg::CollAborted {
                        tag,
                        seq: 0,
                        reason,
                        lost: Vec::new(),
                    },
                );
                return Ok(());
            }
        }
        match self.colls.get_mut(&key) {
            Some(Coll::Voting { descs }) => {
                if descs.insert(id, desc).is_some() {
                    return Err(format!("tag {tag} is already in flight on this peer"));
                }
                Ok(())
            }
            Some(Coll::Running { .. }) => {
                Err(format!("tag {tag} is already in flight on this peer"))
            }
            None => {
                let refuse = if let Some(why) = self.broken.get(&g) {
                    Some(format!(
                        "{why}; the ring must be rebuilt: call update_topology() and retry"
                    ))
                } else if self.round.is_some() || self.rings.get(&g).is_none_or(Vec::is_empty) {
                    Some("the ring is being rebuilt; retry after update_topology()".to_string())
                } else if self.colls.len() >= self.config.max_collectives {
                    Some(format!(
                        "too many collectives in flight (limit {})",
                        self.config.max_collectives
                    ))
                } else {
                    None
                };
                match refuse {
                    Some(reason) => {
                        self.send(
                            id,
                            MasterMsg::CollAborted {
                                tag,
                                seq: 0,
                                reason,
                                lost: Vec::new(),
                            },
                        );
                    }
                    None => {
                        self.colls.insert(
                            key,
                            Coll::Voting {
                                descs: BTreeMap::from([(id, desc)]),
                            },
                        );
                    }
                }
                Ok(())
            }
        }
    }

    fn on_coll_complete(
        &mut self,
        id: PeerId,
        tag: u64,
        seq: u64,
        ok: bool,
        detail: String,
    ) -> Result<(), String> {
        let g = self.peers[&id].group;
        match self.colls.get_mut(&(g, tag)) {
            Some(Coll::Running {
                seq: s,
                members,
                done,
            }) if *s == seq && members.contains(&id) => {
                if ok {
                    if !done.insert(id) {
                        return Err(format!("completed collective {tag} (seq {seq}) twice"));
                    }
                } else {
                    let reason = format!("peer {id} failed collective {tag}: {detail}");
                    self.abort_coll((g, tag), &reason, Vec::new());
                    self.broken.entry(g).or_insert(reason);
                }
                Ok(())
            }
            _ if seq < self.next_seq => Ok(()), // Completion of an attempt already aborted.
            _ => Err(format!(
                "completed collective {tag} with sequence {seq}, never started"
            )),
        }
    }

    fn in_collective(&self, id: PeerId) -> bool {
        self.colls.values().any(|c| match c {
            Coll::Voting { descs } => descs.contains_key(&id),
            Coll::Running { members, done, .. } => members.contains(&id) && !done.contains(&id),
        })
    }

    /// Re-checks every vote; called after every input.
    fn reevaluate(&mut self) {
        let accepted: BTreeSet<PeerId> = self.accepted().into_iter().collect();
        let has_pending = accepted.len() < self.peers.len();

        // A group with no accepted peer admits whoever is waiting: the vote of nobody is unanimous.
        if accepted.is_empty() && has_pending && self.round.is_none() {
            self.start_round();
            return self.reevaluate();
        }
        let voters: BTreeSet<PeerId> = self.accept_votes.keys().copied().collect();
        if self.round.is_none() && !accepted.is_empty() && voters.is_superset(&accepted) {
            // Pending peers are admitted only when every member asked for it.
            let admit = self.accept_votes.values().all(|a| *a);
            self.accept_votes.clear();
            let in_rings: BTreeSet<PeerId> = self.rings.values().flatten().copied().collect();
            if (admit && has_pending) || !self.broken.is_empty() || in_rings != accepted {
                self.start_round_admitting(admit);
            } else {
                self.send_topology_done(&accepted.iter().copied().collect::<Vec<_>>());
            }
        }
        if let Some(round) = &self.round {
            if round.connected.len() == round.members.len() {
                let round = self.round.take().expect("checked");
                self.rings = self.group_rings(&round.members);
                self.broken.clear();
                self.send_topology_done(&round.members);
            }
        }
        if !accepted.is_empty() && self.pending_votes.is_superset(&accepted) {
            let msg = MasterMsg::PendingAnswer {
                pending: has_pending,
            };
            for id in std::mem::take(&mut self.pending_votes) {
                self.send(id, msg.clone());
            }
        }
        self.reevaluate_collectives(&accepted);
        self.reevaluate_sync(&accepted);
        match (self.active(), self.next_heartbeat, self.now) {
            (true, None, Some(now)) => {
                for p in self.peers.values_mut() {
                    p.ping_sent_at = None;
                }
                self.next_heartbeat = Some(now + self.config.heartbeat_interval);
            }
            (false, Some(_), _) => self.next_heartbeat = None,
            _ => {}
        }
    }

    fn reevaluate_collectives(&mut self, accepted: &BTreeSet<PeerId>) {
        // A cancelled vote is forgotten once every member has been told.
        let in_group = |peers: &BTreeMap<PeerId, Peer>, g: u32| -> BTreeSet<PeerId> {
            accepted
                .iter()
                .copied()
                .filter(|id| peers[id].group == g)
                .collect()
        };
        let peers = &self.peers;
        self.cancelled_votes
            .retain(|(g, _), (_, told)| !told.is_superset(&in_group(peers, *g)));
        let keys: Vec<CollKey> = self.colls.keys().copied().collect();
        for key in keys {
            let (g, tag) = key;
            let voters_needed = in_group(&self.peers, g);
            match &self.colls[&key] {
                Coll::Voting { descs }
                    if descs.keys().copied().collect::<BTreeSet<_>>() == voters_needed =>
                {
                    let first = descs.values().next().expect("accepted is not empty");
                    if descs.values().all(|d| d == first) {
                        let seq = self.next_seq;
                        self.next_seq += 1;
                        let members: BTreeSet<PeerId> =
                            self.rings.get(&g).into_iter().flatten().copied().collect();
                        debug_assert_eq!(
                            members, voters_needed,
                            "collectives start on an intact ring"
                        );
                        let msg = MasterMsg::CollCommence {
                            tag,
                            seq,
                            epoch: self.epoch,
                        };
                        for id in &members {
                            self.send(*id, msg.clone());
                        }
                        self.colls.insert(
                            key,
                            Coll::Running {
                                seq,
                                members,
                                done: BTreeSet::new(),
                            },
                        );
                    } else {
                        let listing: Vec<String> = descs
                            .iter()
                            .map(|(id, d)| format!("peer {id}: {d}"))
                            .collect();
                        let reason = format!(
                            "peers disagree on collective {tag}, nothing was reduced ({})",
                            listing.join("; ")
                        );
                        let voters: Vec<PeerId> = descs.keys().copied().collect();
                        self.colls.remove(&key);
                        for id in voters {
                            self.send(
                                id,
                                MasterMsg::CollRefused {
                                    tag,
                                    reason: reason.clone(),
                                },
                            );
                        }
                    }
                }
                Coll::Running { seq, members, done } if done == members => {
                    let msg = MasterMsg::CollDone { tag, seq: *seq };
                    let members: Vec<PeerId> = members.iter().copied().collect();
                    self.colls.remove(&key);
                    for id in members {
                        self.send(id, msg.clone());
                    }
                }
                _ => {}
            }
        }
    }

    fn start_round(&mut self) {
        self.start_round_admitting(true);
    }

    /// A connection round over the accepted peers, after admitting the pending ones if `admit`.
    fn start_round_admitting(&mut self, admit: bool) {
        debug_assert!(self.round.is_none());
        if admit {
            for peer in self.peers.values_mut() {
                peer.accepted = true;
            }
        }
        self.epoch += 1;
        let members: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.accepted)
            .map(|(id, _)| *id)
            .collect();
        let secret = mix(self.config.secret_seed ^ self.epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        // Each peer gets its own group's ring.
        for (_, ids) in self.group_rings(&members) {
            let ring: Vec<RingMember> = ids
                .iter()
                .map(|id| RingMember {
                    peer_id: *id,
                    data_addr: self.peers[id].data_addr.clone(),
                })
                .collect();
            let msg = MasterMsg::Topology {
                epoch: self.epoch,
                secret,
                ring,
            };
            for id in ids {
                self.send(id, msg.clone());
            }
        }
        self.round = Some(Round {
            epoch: self.epoch,
            members,
            connected: BTreeSet::new(),
        });
    }

    fn fail_round(&mut self, reason: &str) {
        let Some(round) = self.round.take() else {
            return;
        };
        for id in &round.members {
            let msg = MasterMsg::TopologyFailed {
                epoch: round.epoch,
                reason: reason.to_string(),
            };
            self.send(*id, msg);
        }
        // Every ring must be rebuilt: mark all groups (and any group yet to exist) broken.
        for g in round
            .members
            .iter()
            .filter_map(|id| self.peers.get(id).map(|p| p.group))
        {
            self.broken.insert(g, reason.to_string());
        }
        self.broken
            .entry(u32::MAX)
            .or_insert_with(|| reason.to_string());
    }

    fn abort_coll(&mut self, key: CollKey, reason: &str, lost: Vec<PeerId>) {
        let tag = key.1;
        let Some(coll) = self.colls.remove(&key) else {
            return;
        };
        let (seq, targets): (u64, Vec<PeerId>) = match coll {
            Coll::Voting { descs } => (0, descs.into_keys().collect()),
            Coll::Running { seq, members, .. } => (seq, members.into_iter().collect()),
        };
        for id in targets {
            let msg = MasterMsg::CollAborted {
                tag,
                seq,
                reason: reason.to_string(),
                lost: lost.clone(),
            };
            self.send(id, msg);
        }
    }

    /// Forgets a peer and fails whatever it was part of.
    fn remove_peer(&mut self, id: PeerId, reason: &str) {
        let Some(peer) = self.peers.remove(&id) else {
            return;
        };
        self.accept_votes.remove(&id);
        self.pending_votes.remove(&id);
        self.sync_remove_peer(id);
        if !peer.accepted {
            return;
        }
        if self.round.as_ref().is_some_and(|r| r.members.contains(&id)) {
            self.fail_round(reason);
        }
        let g = peer.group;
        if let Some(ring) = self.rings.get_mut(&g) {
            if ring.contains(&id) {
                ring.retain(|p| *p != id);
                self.broken.insert(g, reason.to_string());
            }
        }
        // The group's ring lost a member: nothing can run on it until it is rebuilt. Other
        // groups' collectives go on.
        let keys: Vec<CollKey> = self.colls.keys().copied().filter(|k| k.0 == g).collect();
        for key in keys {
            self.abort_coll(key, reason, vec![id]);
        }
    }

    /// Rings of every group among `members`, each in id order.
    fn group_rings(&self, members: &[PeerId]) -> BTreeMap<u32, Vec<PeerId>> {
        let mut rings: BTreeMap<u32, Vec<PeerId>> = BTreeMap::new();
        for id in members {
            rings.entry(self.peers[id].group).or_default().push(*id);
        }
        rings
    }

    /// Tells each of `members` the ring in force, with the group attributes.
    fn send_topology_done(&mut self, members: &[PeerId]) {
        let rings = self.group_rings(members);
        let global_world = members.len() as u32;
        let groups = rings.len() as u32;
        let largest_group = rings.values().map(Vec::len).max().unwrap_or(0) as u32;
        for ids in rings.values() {
            let msg = MasterMsg::TopologyDone {
                epoch: self.epoch,
                world: ids.len() as u32,
                global_world,
                groups,
                largest_group,
            };
            for id in ids {
                self.send(*id, msg.clone());
            }
        }
    }

    fn kick_conn(&mut self, conn: ConnId, reason: &str) {
        let reason = match self.conns.get(&conn) {
            Some(Conn::Peer(id)) => format!("peer {id} kicked: {reason}"),
            _ => format!("connection {conn} kicked: {reason}"),
        };
        tracing::warn!("{reason}");
        self.out.push_back(Output::Send {
            conn,
            msg: MasterMsg::Kicked {
                reason: reason.clone(),
            },
        });
        self.close(conn, &reason);
    }

    fn close(&mut self, conn: ConnId, reason: &str) {
        if let Some(Conn::Peer(id)) = self.conns.remove(&conn) {
            self.remove_peer(id, reason);
        }
        self.out.push_back(Output::Close { conn });
    }

    fn send(&mut self, id: PeerId, msg: MasterMsg) {
        if let Some(peer) = self.peers.get(&id) {
            self.out.push_back(Output::Send {
                conn: peer.conn,
                msg,
            });
        }
    }
}

fn kind(msg: &PeerMsg) -> &'static str {
    match msg {
        PeerMsg::Hello { .. } => "Hello",
        PeerMsg::AcceptVote => "AcceptVote",
        PeerMsg::RepairVote => "RepairVote",
        PeerMsg::PendingQuery => "PendingQuery",
        PeerMsg::ConnectResult { .. } => "ConnectResult",
        PeerMsg::CollInit { .. } => "CollInit",
        PeerMsg::CollComplete { .. } => "CollComplete",
        PeerMsg::Goodbye => "Goodbye",
        PeerMsg::Pong => "Pong",
        PeerMsg::SyncVote { .. } => "SyncVote",
        PeerMsg::SyncDone { .. } => "SyncDone",
        PeerMsg::CollCancel { .. } => "CollCancel",
    }
}

/// splitmix64 finaliser: spreads a seed into a secret.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

mod sync;

#[cfg(test)]
mod tests;
