//! Topology: the votes that admit pending peers and (re)build the rings (`AcceptVote`,
//! `RepairVote`), the "are peers pending?" question (`PendingQuery`), and the connection rounds
//! that follow.
//!
//! A round starts once every accepted peer voted: each group gets its ring with a fresh epoch and
//! secret, every member connects and reports (`ConnectResult`), and when all reported success the
//! rings are in force (`TopologyDone`). Any failure or departure fails the whole round and marks
//! every ring broken, so collectives are refused until the next vote rebuilds them.

use std::collections::{BTreeMap, BTreeSet};

use super::state::{mix, Coordinator, Round};
use crate::proto::{MasterMsg, PeerId, RingMember};

impl Coordinator {
    /// A vote to update the topology, admitting pending peers if `admit` (a repair does not).
    pub(super) fn on_topology_vote(&mut self, id: PeerId, admit: bool) -> Result<(), String> {
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

    /// A topology vote (without admitting anyone) that proposes the ring order of the voter's
    /// group. It is installed when every member of the group proposes the same order.
    pub(super) fn on_order_vote(&mut self, id: PeerId, order: Vec<PeerId>) -> Result<(), String> {
        let mut seen = BTreeSet::new();
        if let Some(bad) = order
            .iter()
            .find(|p| **p == 0 || **p >= self.next_peer_id || !seen.insert(**p))
        {
            return Err(format!(
                "proposed a ring order naming peer {bad} twice or never admitted"
            ));
        }
        if !order.contains(&id) {
            return Err("proposed a ring order without itself".into());
        }
        self.on_topology_vote(id, false)?;
        self.order_votes.insert(id, order);
        Ok(())
    }

    /// Installs the orders every member of a group agreed on; whether any ring changes.
    fn install_orders(&mut self, accepted: &BTreeSet<PeerId>) -> bool {
        let votes = std::mem::take(&mut self.order_votes);
        let mut changed = false;
        let groups: BTreeSet<u32> = accepted.iter().map(|id| self.peers[id].group).collect();
        for g in groups {
            let members: Vec<PeerId> = accepted
                .iter()
                .copied()
                .filter(|id| self.peers[id].group == g)
                .collect();
            let proposed: Vec<Vec<PeerId>> = members
                .iter()
                .filter_map(|id| votes.get(id))
                .map(|o| o.iter().copied().filter(|p| members.contains(p)).collect())
                .collect();
            let Some(first) = proposed.first() else {
                continue;
            };
            if proposed.len() != members.len() || proposed.iter().any(|o| o != first) {
                tracing::warn!(
                    group = g,
                    "the members of group {g} proposed different ring orders; keeping the ring's order"
                );
                continue;
            }
            if self.orders.get(&g) != Some(first) {
                self.orders.insert(g, first.clone());
                changed = true;
            }
        }
        changed
    }

    /// A vote to learn whether peers wait to be admitted.
    pub(super) fn on_pending_query(&mut self, id: PeerId) -> Result<(), String> {
        if !self.pending_votes.insert(id) {
            return Err("asked twice whether peers are pending".into());
        }
        Ok(())
    }

    pub(super) fn on_connect_result(
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

    /// Completes the topology votes, the round and the pending question once every accepted
    /// peer has taken part.
    pub(super) fn reevaluate_topology(&mut self, accepted: &BTreeSet<PeerId>, has_pending: bool) {
        let voters: BTreeSet<PeerId> = self.accept_votes.keys().copied().collect();
        if self.round.is_none() && !accepted.is_empty() && voters.is_superset(accepted) {
            // Pending peers are admitted only when every member asked for it.
            let admit = self.accept_votes.values().all(|a| *a);
            self.accept_votes.clear();
            let reordered = self.install_orders(accepted);
            let in_rings: BTreeSet<PeerId> = self.rings.values().flatten().copied().collect();
            let current = self.group_rings(accepted) == self.rings;
            if (admit && has_pending)
                || !self.broken.is_empty()
                || in_rings != *accepted
                || (reordered && !current)
            {
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
        if !accepted.is_empty() && self.pending_votes.is_superset(accepted) {
            let msg = MasterMsg::PendingAnswer {
                pending: has_pending,
            };
            for id in std::mem::take(&mut self.pending_votes) {
                self.send(id, msg.clone());
            }
        }
    }

    pub(super) fn start_round(&mut self) {
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

    pub(super) fn fail_round(&mut self, reason: &str) {
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

    /// Rings of every group among `members`, each in id order.
    /// Each group's ring: its members in the group's agreed order, those the order does not
    /// name after them in id order.
    fn group_rings<'a>(
        &self,
        members: impl IntoIterator<Item = &'a PeerId>,
    ) -> BTreeMap<u32, Vec<PeerId>> {
        let mut rings: BTreeMap<u32, Vec<PeerId>> = BTreeMap::new();
        for id in members {
            rings.entry(self.peers[id].group).or_default().push(*id);
        }
        for (g, ring) in rings.iter_mut() {
            if let Some(order) = self.orders.get(g) {
                let at = |id: &PeerId| order.iter().position(|p| p == id).unwrap_or(usize::MAX);
                ring.sort_by_key(|id| (at(id), *id));
            }
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
}
