//! The peer's side of the control protocol, as a sans-IO state machine.
//!
//! Inputs: the user's requests (`start_*`), messages from the master ([`PeerProto::handle`]) and
//! what the I/O shell reports back (`connect_finished`, `collective_finished`). Outputs: messages
//! for the master ([`PeerProto::poll_transmit`]), [`Effect`]s for the shell, and states that
//! blocked callers wait on. It never reads a clock or touches a socket, so the same logic runs in
//! the real [`crate::Communicator`] and in a simulation.
//!
//! It also enforces the rule of one operation kind at a time: a topology update cannot start
//! while collectives are in flight, and the reverse.

use std::collections::{BTreeMap, VecDeque};

use concord_master::proto::{
    CollectiveDesc, EntryDesc, MasterMsg, PeerId, PeerMsg, Pull, RingMember,
};
use concord_transport::PROTOCOL_VERSION;

use crate::Error;

/// Words a cancel reason carries so that every peer reports the right kind of error.
pub(crate) const TIMEOUT_MARK: &str = "timed out";
/// See [`TIMEOUT_MARK`].
pub(crate) const CANCEL_MARK: &str = "cancelled";

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

/// The peer's protocol state.
#[derive(Debug)]
pub struct PeerProto {
    peer_id: Option<PeerId>,
    /// Set once the master refused, kicked us or went away: every wait ends with it.
    fatal: Option<Error>,
    topo: TopoPhase,
    /// The ring in force: epoch, members, our rank.
    ring: Option<(u64, Vec<RingMember>)>,
    pending: Option<Option<bool>>,
    colls: BTreeMap<u64, CollPhase>,
    out: VecDeque<PeerMsg>,
    history: VecDeque<(u64, Vec<PeerId>)>,
    sync: SyncPhase,
    groups: GroupInfo,
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

impl PeerProto {
    /// A peer about to register; queues the hello.
    pub fn new(data_port: u16, advertise_ip: String) -> Self {
        Self::with_group(data_port, advertise_ip, 0)
    }

    /// A peer of peer group `group` about to register; queues the hello.
    pub fn with_group(data_port: u16, advertise_ip: String, group: u32) -> Self {
        let mut out = VecDeque::new();
        out.push_back(PeerMsg::Hello {
            version: PROTOCOL_VERSION,
            data_port,
            advertise_ip,
            group,
        });
        PeerProto {
            peer_id: None,
            fatal: None,
            topo: TopoPhase::Waiting,
            ring: None,
            pending: None,
            colls: BTreeMap::new(),
            out,
            history: VecDeque::new(),
            sync: SyncPhase::Idle,
            groups: GroupInfo::default(),
        }
    }

    /// Next message for the master.
    pub fn poll_transmit(&mut self) -> Option<PeerMsg> {
        self.out.pop_front()
    }

    /// Our id, once welcomed.
    pub fn peer_id(&self) -> Option<PeerId> {
        self.peer_id
    }

    /// The fatal error, if the peer can no longer talk to the master.
    pub fn fatal(&self) -> Option<&Error> {
        self.fatal.as_ref()
    }

    /// The topology phase.
    pub fn topology(&self) -> &TopoPhase {
        &self.topo
    }

    /// The ring in force: (epoch, members).
    pub fn ring(&self) -> Option<&(u64, Vec<RingMember>)> {
        self.ring.as_ref()
    }

    /// The phase of a collective.
    pub fn collective(&self, tag: u64) -> Option<&CollPhase> {
        self.colls.get(&tag)
    }

    /// Collectives in flight (not yet taken).
    pub fn collectives_in_flight(&self) -> usize {
        self.colls.len()
    }

    /// The answer of the pending-peers vote, once it came.
    pub fn pending_answer(&self) -> Option<bool> {
        self.pending.flatten()
    }

    fn usable(&self) -> Result<(), Error> {
        match &self.fatal {
            Some(e) => Err(e.clone()),
            None if self.peer_id.is_none() => {
                Err(Error::Usage("not registered with the master yet".into()))
            }
            None => Ok(()),
        }
    }

    /// Starts a topology update (vote to admit pending peers and rebuild the ring).
    pub fn start_update_topology(&mut self) -> Result<(), Error> {
        self.start_topology_vote(PeerMsg::AcceptVote)
    }

    /// Starts a repair: rebuild the ring around lost peers without admitting pending ones (the
    /// retry after a failure, so that nobody joins in the middle of a re-run).
    pub fn start_repair_topology(&mut self) -> Result<(), Error> {
        self.start_topology_vote(PeerMsg::RepairVote)
    }

    fn start_topology_vote(&mut self, vote: PeerMsg) -> Result<(), Error> {
        self.usable()?;
        if !self.colls.is_empty() {
            return Err(Error::Usage(format!(
                "update_topology() while {} collective(s) are in flight: wait for them first (one operation kind at a time)",
                self.colls.len()
            )));
        }
        if !matches!(
            self.topo,
            TopoPhase::Idle | TopoPhase::Done { .. } | TopoPhase::Failed { .. }
        ) {
            return Err(Error::Usage(
                "a topology update is already under way".into(),
            ));
        }
        self.topo = TopoPhase::Waiting;
        self.out.push_back(vote);
        Ok(())
    }

    /// Starts the "are peers pending?" vote.
    pub fn start_pending_query(&mut self) -> Result<(), Error> {
        self.usable()?;
        if self.pending.is_some() {
            return Err(Error::Usage(
                "are_new_peers_pending() is already being asked".into(),
            ));
        }
        self.pending = Some(None);
        self.out.push_back(PeerMsg::PendingQuery);
        Ok(())
    }

    /// Takes the answer of the pending-peers vote.
    pub fn take_pending_answer(&mut self) -> Option<bool> {
        let answer = self.pending.flatten();
        if answer.is_some() {
            self.pending = None;
        }
        answer
    }

    /// Starts the vote for a collective.
    pub fn start_collective(&mut self, tag: u64, desc: CollectiveDesc) -> Result<(), Error> {
        self.usable()?;
        if !matches!(self.topo, TopoPhase::Idle | TopoPhase::Done { .. }) {
            return Err(Error::Usage(format!(
                "all_reduce(tag {tag}) while the topology is not established ({}): call update_topology() first",
                match &self.topo {
                    TopoPhase::Failed { reason } => reason.as_str(),
                    _ => "an update is under way",
                }
            )));
        }
        if !matches!(
            self.sync,
            SyncPhase::Idle | SyncPhase::Complete { .. } | SyncPhase::Failed(_)
        ) {
            return Err(Error::Usage(format!(
                "all_reduce(tag {tag}) during a shared-state sync (one operation kind at a time)"
            )));
        }
        if self.colls.contains_key(&tag) {
            return Err(Error::Usage(format!(
                "tag {tag} is already in flight: each collective in flight needs its own tag"
            )));
        }
        self.colls.insert(tag, CollPhase::Voting);
        self.out.push_back(PeerMsg::CollInit { tag, desc });
        Ok(())
    }

    /// The shell finished (or failed) building the connections of `epoch`.
    pub fn connect_finished(&mut self, epoch: u64, result: Result<(), String>) {
        if !matches!(&self.topo, TopoPhase::Connect { epoch: e, .. } if *e == epoch) {
            return;
        }
        let (ok, detail) = match result {
            Ok(()) => (true, String::new()),
            Err(e) => (false, e),
        };
        self.topo = TopoPhase::Reported { epoch };
        self.out
            .push_back(PeerMsg::ConnectResult { epoch, ok, detail });
    }

    /// The shell finished (or failed) its part of collective `tag`.
    pub fn collective_finished(&mut self, tag: u64, seq: u64, result: Result<(), String>) {
        if self.colls.get(&tag) != Some(&CollPhase::Run { seq }) {
            return; // Aborted meanwhile: the master already knows.
        }
        let (ok, detail) = match result {
            Ok(()) => (true, String::new()),
            Err(e) => (false, e),
        };
        self.colls.insert(tag, CollPhase::Completing { seq });
        self.out.push_back(PeerMsg::CollComplete {
            tag,
            seq,
            ok,
            detail,
        });
    }

    /// Takes a finished collective's outcome (`Done` or `Failed`), freeing its tag.
    pub fn take_collective(&mut self, tag: u64) -> Option<Result<(), Error>> {
        match self.colls.get(&tag)? {
            CollPhase::Done => {
                self.colls.remove(&tag);
                Some(Ok(()))
            }
            CollPhase::Failed(_) => match self.colls.remove(&tag) {
                Some(CollPhase::Failed(e)) => Some(Err(e)),
                _ => unreachable!("checked above"),
            },
            _ => None,
        }
    }

    /// Starts a shared-state sync vote (entries sorted by key).
    pub fn start_sync(
        &mut self,
        revision: u64,
        strategy: &str,
        entries: Vec<EntryDesc>,
    ) -> Result<(), Error> {
        self.usable()?;
        if !self.colls.is_empty() {
            return Err(Error::Usage(
                "sync_shared_state() with collectives in flight: wait for them first".into(),
            ));
        }
        if !matches!(self.topo, TopoPhase::Idle | TopoPhase::Done { .. }) {
            return Err(Error::Usage(
                "sync_shared_state() while the topology is not established: call update_topology()"
                    .into(),
            ));
        }
        if !matches!(
            self.sync,
            SyncPhase::Idle | SyncPhase::Complete { .. } | SyncPhase::Failed(_)
        ) {
            return Err(Error::Usage(
                "a shared-state sync is already under way".into(),
            ));
        }
        self.sync = SyncPhase::Voting;
        self.out.push_back(PeerMsg::SyncVote {
            revision,
            strategy: strategy.into(),
            entries,
        });
        Ok(())
    }

    /// Sizes across groups, as of the last topology update.
    pub fn group_info(&self) -> GroupInfo {
        self.groups
    }

    /// The sync phase.
    pub fn sync_phase(&self) -> &SyncPhase {
        &self.sync
    }

    /// The shell finished its pulls (or failed them).
    pub fn sync_pulled(&mut self, result: Result<(), String>) {
        if let SyncPhase::Plan { revision, .. } = self.sync {
            let (ok, detail) = match result {
                Ok(()) => (true, String::new()),
                Err(e) => (false, e),
            };
            self.sync = SyncPhase::Reported { revision };
            self.out.push_back(PeerMsg::SyncDone {
                revision,
                ok,
                detail,
            });
        }
    }

    /// Asks the master to abort collective `tag` on every peer (`reason` says why). Returns
    /// false when the tag is not in flight here.
    pub fn cancel(&mut self, tag: u64, reason: String) -> bool {
        let seq = match self.colls.get(&tag) {
            Some(CollPhase::Voting) => 0,
            Some(CollPhase::Run { seq } | CollPhase::Completing { seq }) => *seq,
            _ => return false,
        };
        self.out.push_back(PeerMsg::CollCancel { tag, seq, reason });
        true
    }

    /// Fails a tag here without the master (it did not answer in time).
    pub fn fail_locally(&mut self, tag: u64, error: Error) {
        if let Some(phase) = self.colls.get_mut(&tag) {
            if !matches!(phase, CollPhase::Done | CollPhase::Failed(_)) {
                *phase = CollPhase::Failed(error);
            }
        }
    }

    /// Forgets a tag whatever its state (the shell gave up waiting for the master).
    pub fn forget(&mut self, tag: u64) {
        self.colls.remove(&tag);
    }

    /// The master connection is gone: every wait ends with `error`.
    pub fn master_lost(&mut self, error: Error) -> Vec<Effect> {
        if self.fatal.is_none() {
            self.fatal = Some(error.clone());
        }
        let mut effects = self.fail_everything(error);
        effects.push(Effect::BreakRing);
        effects
    }

    fn fail_everything(&mut self, error: Error) -> Vec<Effect> {
        let mut effects = Vec::new();
        for (tag, phase) in self.colls.iter_mut() {
            if let CollPhase::Run { seq } | CollPhase::Completing { seq } = phase {
                effects.push(Effect::Retire {
                    tag: *tag,
                    seq: *seq,
                });
            }
            if !matches!(phase, CollPhase::Done | CollPhase::Failed(_)) {
                *phase = CollPhase::Failed(error.clone());
            }
        }
        if !matches!(self.topo, TopoPhase::Idle | TopoPhase::Done { .. }) {
            self.topo = TopoPhase::Failed {
                reason: error.to_string(),
            };
        }
        if !matches!(
            self.sync,
            SyncPhase::Idle | SyncPhase::Complete { .. } | SyncPhase::Failed(_)
        ) {
            self.sync = SyncPhase::Failed(error);
        }
        effects
    }

    /// A message from the master. An `Err` is a protocol violation by the master (fatal).
    pub fn handle(&mut self, msg: MasterMsg) -> Result<Vec<Effect>, Error> {
        let violation = |what: &str| Err(Error::Protocol(format!("the master sent {what}")));
        match msg {
            MasterMsg::Welcome { peer_id, .. } => {
                if self.peer_id.is_some() {
                    return violation("Welcome twice");
                }
                self.peer_id = Some(peer_id);
            }
            MasterMsg::Refused { version, reason } => {
                let error = if version != PROTOCOL_VERSION {
                    Error::VersionMismatch {
                        ours: PROTOCOL_VERSION,
                        theirs: version,
                    }
                } else {
                    Error::Refused(reason)
                };
                return Ok(self.master_lost(error));
            }
            MasterMsg::Kicked { reason } => return Ok(self.master_lost(Error::Kicked(reason))),
            MasterMsg::Ping => self.out.push_back(PeerMsg::Pong),
            MasterMsg::SyncPlan {
                revision,
                secret,
                pulls,
            } => {
                if self.sync != SyncPhase::Voting {
                    return violation("a shared-state plan without a vote");
                }
                self.sync = SyncPhase::Plan {
                    revision,
                    secret,
                    pulls,
                };
            }
            MasterMsg::SyncComplete { revision } => {
                if self.sync != (SyncPhase::Reported { revision }) {
                    return violation("SyncComplete out of turn");
                }
                self.sync = SyncPhase::Complete { revision };
            }
            MasterMsg::SyncFailed { reason } => {
                if matches!(self.sync, SyncPhase::Idle | SyncPhase::Complete { .. }) {
                    return violation("SyncFailed out of turn");
                }
                self.sync = SyncPhase::Failed(Error::SyncFailed(reason));
            }
            MasterMsg::PendingAnswer { pending } => {
                if self.pending != Some(None) {
                    return violation("an answer to a question not asked");
                }
                self.pending = Some(Some(pending));
            }
            MasterMsg::Topology {
                epoch,
                secret,
                ring,
            } => {
                let me = self.peer_id;
                if !ring.iter().any(|m| Some(m.peer_id) == me) {
                    return violation("a ring that does not include this peer");
                }
                // A joining peer waits in `Waiting`; a member that voted too. A member that did not
                // vote cannot get a ring (the vote is unanimous).
                if self.topo != TopoPhase::Waiting {
                    return violation("a ring without a vote");
                }
                self.topo = TopoPhase::Connect {
                    epoch,
                    secret,
                    ring,
                };
            }
            MasterMsg::TopologyDone {
                epoch,
                world,
                global_world,
                groups,
                largest_group,
            } => {
                let fits = match &self.topo {
                    // The ring we connected is now in force.
                    TopoPhase::Reported { epoch: e } => *e == epoch,
                    // Nothing changed: the ring we have stays.
                    TopoPhase::Waiting => self.ring.as_ref().is_some_and(|r| r.0 == epoch),
                    _ => false,
                };
                if !fits {
                    return violation("TopologyDone out of turn");
                }
                self.topo = TopoPhase::Done { epoch, world };
                self.groups = GroupInfo {
                    global_world,
                    groups,
                    largest_group,
                };
            }
            MasterMsg::TopologyFailed { epoch: _, reason } => {
                if matches!(self.topo, TopoPhase::Idle | TopoPhase::Done { .. }) {
                    return violation("TopologyFailed out of turn");
                }
                self.topo = TopoPhase::Failed { reason };
            }
            MasterMsg::CollCommence { tag, seq, epoch } => {
                if self.colls.get(&tag) != Some(&CollPhase::Voting) {
                    return violation(&format!("CollCommence for tag {tag}, which is not voting"));
                }
                if self.ring.as_ref().map(|r| r.0) != Some(epoch) {
                    return violation(&format!(
                        "CollCommence for epoch {epoch}, not the ring in force"
                    ));
                }
                self.colls.insert(tag, CollPhase::Run { seq });
                return Ok(vec![Effect::Run { tag, seq }]);
            }
            MasterMsg::CollRefused { tag, reason } => {
                if self.colls.get(&tag) != Some(&CollPhase::Voting) {
                    return violation(&format!("CollRefused for tag {tag}, which is not voting"));
                }
                self.colls
                    .insert(tag, CollPhase::Failed(Error::Mismatch { tag, reason }));
            }
            MasterMsg::CollDone { tag, seq } => match self.colls.get(&tag) {
                Some(CollPhase::Completing { seq: s }) if *s == seq => {
                    self.colls.insert(tag, CollPhase::Done);
                    return Ok(vec![Effect::Retire { tag, seq }]);
                }
                // A tag this peer gave up on (its deadline passed) and forgot.
                None => {}
                _ => return violation(&format!("CollDone for tag {tag} seq {seq} out of turn")),
            },
            MasterMsg::CollAborted {
                tag,
                seq,
                reason,
                lost,
            } => {
                let running = match self.colls.get(&tag) {
                    Some(CollPhase::Voting) => false,
                    Some(CollPhase::Run { seq: s } | CollPhase::Completing { seq: s })
                        if *s == seq =>
                    {
                        true
                    }
                    _ => return Ok(Vec::new()), // Already failed or forgotten here.
                };
                // A lost peer means the ring is gone: nothing more can flow on it.
                let mut effects = Vec::new();
                if !lost.is_empty() {
                    effects.push(Effect::BreakRing);
                }
                let error = if reason.contains(TIMEOUT_MARK) {
                    Error::Timeout(format!("collective {tag}: {reason}"))
                } else if reason.contains(CANCEL_MARK) {
                    Error::Cancelled { tag, reason }
                } else {
                    Error::Aborted { tag, reason, lost }
                };
                self.colls.insert(tag, CollPhase::Failed(error));
                if running {
                    effects.push(Effect::Retire { tag, seq });
                }
                return Ok(effects);
            }
        }
        Ok(Vec::new())
    }

    /// Records that the ring announced for `epoch` is the one in force (called by the shell once
    /// its connections are up, before reporting them).
    pub fn install_ring(&mut self, epoch: u64, ring: Vec<RingMember>) {
        const HISTORY: usize = 64;
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history
            .push_back((epoch, ring.iter().map(|m| m.peer_id).collect()));
        self.ring = Some((epoch, ring));
    }

    /// Members of a recent ring, by epoch.
    pub fn ring_history(&self, epoch: u64) -> Option<Vec<PeerId>> {
        self.history
            .iter()
            .find(|(e, _)| *e == epoch)
            .map(|(_, m)| m.clone())
    }

    /// Forgets a finished topology outcome so that the next update can start.
    pub fn reset_topology(&mut self) {
        if matches!(self.topo, TopoPhase::Done { .. } | TopoPhase::Failed { .. }) {
            self.topo = TopoPhase::Idle;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn welcomed() -> PeerProto {
        let mut p = PeerProto::new(9, String::new());
        assert!(matches!(p.poll_transmit(), Some(PeerMsg::Hello { .. })));
        p.handle(MasterMsg::Welcome {
            version: PROTOCOL_VERSION,
            peer_id: 4,
        })
        .unwrap();
        let ring = vec![RingMember {
            peer_id: 4,
            data_addr: "x:1".into(),
        }];
        p.handle(MasterMsg::Topology {
            epoch: 1,
            secret: 0,
            ring: ring.clone(),
        })
        .unwrap();
        p.install_ring(1, ring);
        p.connect_finished(1, Ok(()));
        assert!(matches!(
            p.poll_transmit(),
            Some(PeerMsg::ConnectResult { ok: true, .. })
        ));
        p.handle(MasterMsg::TopologyDone {
            epoch: 1,
            world: 1,
            global_world: 1,
            groups: 1,
            largest_group: 1,
        })
        .unwrap();
        p
    }

    fn desc() -> CollectiveDesc {
        CollectiveDesc {
            count: 1,
            dtype: "float".into(),
            op: "sum".into(),
        }
    }

    #[test]
    fn one_operation_kind_at_a_time_and_unique_tags() {
        let mut p = welcomed();
        p.start_collective(1, desc()).unwrap();
        assert!(
            matches!(p.start_collective(1, desc()), Err(Error::Usage(m)) if m.contains("already in flight"))
        );
        assert!(
            matches!(p.start_update_topology(), Err(Error::Usage(m)) if m.contains("in flight"))
        );
        p.start_pending_query()
            .expect("the pending query may run beside collectives");
    }

    #[test]
    fn abort_of_a_running_collective_interrupts_the_ring() {
        let mut p = welcomed();
        p.start_collective(1, desc()).unwrap();
        p.handle(MasterMsg::CollCommence {
            tag: 1,
            seq: 5,
            epoch: 1,
        })
        .unwrap();
        let fx = p
            .handle(MasterMsg::CollAborted {
                tag: 1,
                seq: 5,
                reason: "gone".into(),
                lost: vec![2],
            })
            .unwrap();
        assert_eq!(
            fx,
            vec![Effect::BreakRing, Effect::Retire { tag: 1, seq: 5 }],
            "a lost peer breaks the ring"
        );
        assert!(
            matches!(p.take_collective(1), Some(Err(Error::Aborted { lost, .. })) if lost == vec![2])
        );
        assert_eq!(p.collectives_in_flight(), 0);
    }

    #[test]
    fn master_loss_fails_every_wait() {
        let mut p = welcomed();
        p.start_collective(1, desc()).unwrap();
        p.master_lost(Error::MasterLost("eof".into()));
        assert!(matches!(
            p.take_collective(1),
            Some(Err(Error::MasterLost(_)))
        ));
        assert!(p.start_collective(2, desc()).is_err());
    }

    #[test]
    fn out_of_turn_master_messages_are_violations() {
        let mut p = welcomed();
        p.start_collective(3, desc()).unwrap();
        assert!(p.handle(MasterMsg::CollDone { tag: 3, seq: 1 }).is_err());
        assert!(p
            .handle(MasterMsg::CollCommence {
                tag: 4,
                seq: 1,
                epoch: 1
            })
            .is_err());
    }
}
