//! Topology from the peer's side: the votes to update or repair the ring, the "are peers
//! pending?" question, the connection round the master announces, and the ring in force.
//!
//! A vote moves the phase to `Waiting`; the master answers with a ring to connect (`Connect`),
//! the shell reports (`Reported`), and the master's verdict ends the round (`Done` or `Failed`).
//! A vote is refused while collectives are in flight: one operation kind at a time.

use concord_master::proto::{PeerId, PeerMsg, RingMember};

use super::{violation, Effect, GroupInfo, PeerProto, TopoPhase};
use crate::Error;

impl PeerProto {
    /// The topology phase.
    pub fn topology(&self) -> &TopoPhase {
        &self.topo
    }

    /// The ring in force: (epoch, members).
    pub fn ring(&self) -> Option<&(u64, Vec<RingMember>)> {
        self.ring.as_ref()
    }

    /// The answer of the pending-peers vote, once it came.
    pub fn pending_answer(&self) -> Option<bool> {
        self.pending.flatten()
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

    /// Starts a rebuild of the ring in `order` (this peer's group), admitting nobody: the vote
    /// of `optimize_topology`, which every member casts with the same order.
    pub fn start_order_topology(&mut self, order: Vec<PeerId>) -> Result<(), Error> {
        self.start_topology_vote(PeerMsg::OrderVote { order })
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

    /// Sizes across groups, as of the last topology update.
    pub fn group_info(&self) -> GroupInfo {
        self.groups
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

    /// The master announced a ring: the shell must connect.
    pub(super) fn on_topology(
        &mut self,
        epoch: u64,
        secret: u64,
        ring: Vec<RingMember>,
    ) -> Result<Vec<Effect>, Error> {
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
        Ok(Vec::new())
    }

    /// The ring of `epoch` is in force (or, with nothing to change, the ring we have stays).
    pub(super) fn on_topology_done(
        &mut self,
        epoch: u64,
        world: u32,
        groups: GroupInfo,
    ) -> Result<Vec<Effect>, Error> {
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
        self.groups = groups;
        Ok(Vec::new())
    }

    /// The connection round failed; the caller votes again.
    pub(super) fn on_topology_failed(&mut self, reason: String) -> Result<Vec<Effect>, Error> {
        if matches!(self.topo, TopoPhase::Idle | TopoPhase::Done { .. }) {
            return violation("TopologyFailed out of turn");
        }
        self.topo = TopoPhase::Failed { reason };
        Ok(Vec::new())
    }

    /// The answer of the pending-peers vote.
    pub(super) fn on_pending_answer(&mut self, pending: bool) -> Result<Vec<Effect>, Error> {
        if self.pending != Some(None) {
            return violation("an answer to a question not asked");
        }
        self.pending = Some(Some(pending));
        Ok(Vec::new())
    }
}
