//! Shared-state synchronisation: the vote, the election, the kick rules and the transfer plan.
//!
//! Every accepted peer votes with its revision, strategy and per-entry (key, dtype, size, hash).
//! Once all voted: revisions must have risen by exactly one since the peer's last sync (any
//! first revision, to resume from a checkpoint); peers whose key set differs from the most common
//! one are kicked; the content is elected among peers that may send, preferring those at the
//! expected (highest) revision, then the most popular, then the lowest id; a send-only peer that
//! is outdated is kicked, and if every peer is receive-only all are. Each peer then gets the
//! list of entries it must pull and every up-to-date peer holding them, so it can pull from
//! several at once and resume from another when one dies. When every peer reports its pulls
//! done, all hold the elected revision.

use std::collections::{BTreeMap, BTreeSet};

use super::state::{mix, Coordinator, Strategy, SyncState, SyncVote};
use crate::proto::{
    master_message_bytes, EntryDesc, MasterMsg, PeerId, Pull, RingMember, MAX_MESSAGE_BYTES,
};

/// Most holders a plan names for one entry (each puller gets its own rotation of the
/// up-to-date holders, so the load still spreads over all of them): enough that a holder dying
/// mid-transfer leaves others to finish it, few enough that a plan stays small.
const MAX_SOURCES_PER_PULL: usize = 4;

impl Coordinator {
    pub(super) fn on_sync_vote(
        &mut self,
        id: PeerId,
        revision: u64,
        strategy: &str,
        entries: Vec<EntryDesc>,
    ) -> Result<(), String> {
        let strategy = Strategy::parse(strategy)
            .ok_or_else(|| format!("unknown shared-state strategy {strategy:?}"))?;
        if self.in_collective(id) || self.accept_votes.contains_key(&id) || self.round.is_some() {
            return Err("voted to sync shared state during another operation (one operation kind at a time)".into());
        }
        if entries.windows(2).any(|w| w[0].key >= w[1].key) {
            return Err("shared-state entries not sorted by unique key".into());
        }
        if let Some(last) = self.revisions.get(&id) {
            if Some(revision) != last.checked_add(1) {
                return Err(format!("shared-state revision jumped from {last} to {revision}; it must rise by exactly one"));
            }
        }
        let g = self.peers[&id].group;
        let state = self.sync.entry(g).or_insert_with(|| SyncState::Voting {
            votes: BTreeMap::new(),
        });
        let votes = match state {
            SyncState::Voting { votes } => votes,
            SyncState::Transferring { .. } => {
                return Err("voted to sync while a sync is transferring".into())
            }
        };
        if votes
            .insert(
                id,
                SyncVote {
                    revision,
                    strategy,
                    entries,
                },
            )
            .is_some()
        {
            return Err("voted twice to sync shared state".into());
        }
        Ok(())
    }

    pub(super) fn on_sync_done(
        &mut self,
        id: PeerId,
        revision: u64,
        ok: bool,
        detail: &str,
    ) -> Result<(), String> {
        let g = self.peers[&id].group;
        match self.sync.get_mut(&g) {
            Some(SyncState::Transferring {
                revision: r,
                members,
                done,
            }) if *r == revision && members.contains(&id) => {
                if !done.insert(id) {
                    return Err("reported its shared-state pulls twice".into());
                }
                if !ok {
                    let reason = format!("peer {id} could not fetch shared state: {detail}");
                    self.fail_sync(g, &reason);
                }
                Ok(())
            }
            _ => Err(format!(
                "reported shared-state pulls for revision {revision}, which is not being synced"
            )),
        }
    }

    pub(super) fn fail_sync(&mut self, g: u32, reason: &str) {
        let targets: Vec<PeerId> = match self.sync.remove(&g) {
            Some(SyncState::Voting { votes }) => votes.into_keys().collect(),
            Some(SyncState::Transferring { members, .. }) => members.into_iter().collect(),
            None => return,
        };
        for id in targets {
            self.send(
                id,
                MasterMsg::SyncFailed {
                    reason: reason.to_string(),
                },
            );
        }
    }

    /// Forgets a departed peer's part in a sync; a transfer goes on without it (pullers resume
    /// from other sources).
    pub(super) fn sync_remove_peer(&mut self, id: PeerId) {
        self.revisions.remove(&id);
        for state in self.sync.values_mut() {
            match state {
                SyncState::Voting { votes } => {
                    votes.remove(&id);
                }
                SyncState::Transferring { members, done, .. } => {
                    members.remove(&id);
                    done.remove(&id);
                }
            }
        }
    }

    pub(super) fn reevaluate_sync(&mut self, accepted: &BTreeSet<PeerId>) {
        let groups: Vec<u32> = self.sync.keys().copied().collect();
        for g in groups {
            let in_group: BTreeSet<PeerId> = accepted
                .iter()
                .copied()
                // A peer kicked by an election earlier in this pass is gone: skip it.
                .filter(|id| self.peers.get(id).is_some_and(|p| p.group == g))
                .collect();
            match self.sync.get(&g) {
                Some(SyncState::Voting { votes })
                    if !in_group.is_empty()
                        && votes.keys().copied().collect::<BTreeSet<_>>() == in_group =>
                {
                    let Some(SyncState::Voting { votes }) = self.sync.remove(&g) else {
                        unreachable!("matched")
                    };
                    self.elect(g, votes);
                }
                Some(SyncState::Transferring {
                    revision,
                    members,
                    done,
                }) if done.is_superset(members) => {
                    let (revision, members) = (*revision, members.clone());
                    self.sync.remove(&g);
                    for id in members {
                        self.revisions.insert(id, revision);
                        self.send(id, MasterMsg::SyncComplete { revision });
                    }
                }
                Some(SyncState::Voting { votes }) if votes.is_empty() => {
                    self.sync.remove(&g);
                }
                _ => {}
            }
        }
    }

    fn elect(&mut self, g: u32, mut votes: BTreeMap<PeerId, SyncVote>) {
        // Key sets: the most common one wins; the others are kicked.
        let shape = |v: &SyncVote| -> Vec<(String, String, u64)> {
            v.entries
                .iter()
                .map(|e| (e.key.clone(), e.dtype.clone(), e.bytes))
                .collect()
        };
        let mut shapes: BTreeMap<Vec<(String, String, u64)>, Vec<PeerId>> = BTreeMap::new();
        for (id, v) in &votes {
            shapes.entry(shape(v)).or_default().push(*id);
        }
        let popular = shapes
            .iter()
            .max_by_key(|(_, ids)| (ids.len(), std::cmp::Reverse(ids[0])))
            .map(|(s, _)| s.clone())
            .expect("votes");
        let odd: Vec<PeerId> = votes
            .iter()
            .filter(|(_, v)| shape(v) != popular)
            .map(|(id, _)| *id)
            .collect();
        for id in odd {
            votes.remove(&id);
            self.kick_peer(
                id,
                "its shared-state keys, types or sizes differ from the group's",
            );
        }
        if votes.values().all(|v| v.strategy == Strategy::ReceiveOnly) {
            let ids: Vec<PeerId> = votes.keys().copied().collect();
            for id in ids {
                self.kick_peer(
                    id,
                    "every peer is receive-only: nobody may provide the shared state",
                );
            }
            return;
        }
        // Election among peers that may send: expected revision first, then popularity, then id.
        let content = |v: &SyncVote| -> Vec<u64> {
            v.entries
                .iter()
                .map(|e| {
                    if e.allow_content_inequality {
                        0
                    } else {
                        e.hash
                    }
                })
                .collect()
        };
        let senders: Vec<(&PeerId, &SyncVote)> = votes
            .iter()
            .filter(|(_, v)| v.strategy != Strategy::ReceiveOnly)
            .collect();
        let expected = senders
            .iter()
            .map(|(_, v)| v.revision)
            .max()
            .expect("a sender exists");
        let mut tally: BTreeMap<Vec<u64>, Vec<PeerId>> = BTreeMap::new();
        for (id, v) in senders.iter().filter(|(_, v)| v.revision == expected) {
            tally.entry(content(v)).or_default().push(**id);
        }
        let (elected, _) = tally
            .into_iter()
            .max_by_key(|(_, ids)| (ids.len(), std::cmp::Reverse(ids[0])))
            .expect("a candidate");
        // An outdated send-only peer may not receive: kicked.
        let outdated_senders: Vec<PeerId> = votes
            .iter()
            .filter(|(_, v)| v.strategy == Strategy::SendOnly && content(v) != elected)
            .map(|(id, _)| *id)
            .collect();
        for id in outdated_senders {
            votes.remove(&id);
            self.kick_peer(id, "send-only peer holds outdated shared state");
        }
        let holders: Vec<(PeerId, &SyncVote)> = votes
            .iter()
            .filter(|(_, v)| v.strategy != Strategy::ReceiveOnly)
            .map(|(id, v)| (*id, v))
            .collect();
        let secret = mix(self.config.secret_seed
            ^ expected.wrapping_mul(0xA076_1D64_78BD_642F)
            ^ self.epoch);
        let mut plans = Vec::new();
        for (id, v) in &votes {
            let mut pulls = Vec::new();
            for (k, entry) in v.entries.iter().enumerate() {
                if entry.allow_content_inequality || entry.hash == elected[k] {
                    continue;
                }
                let up_to_date: Vec<PeerId> = holders
                    .iter()
                    .filter(|(h, hv)| h != id && hv.entries[k].hash == elected[k])
                    .map(|(h, _)| *h)
                    .collect();
                // At most a few holders per entry, the same few for all of one puller's entries
                // (it pulls from those at once) and another few for the next puller: the load
                // spreads over the holders and the plan stays small.
                let start = *id as usize % up_to_date.len().max(1);
                let mut chosen: Vec<PeerId> = up_to_date
                    .iter()
                    .cycle()
                    .skip(start)
                    .take(up_to_date.len().min(MAX_SOURCES_PER_PULL))
                    .copied()
                    .collect();
                chosen.sort_unstable();
                let sources: Vec<RingMember> = chosen
                    .iter()
                    .map(|h| RingMember {
                        peer_id: *h,
                        data_addr: self.peers[h].data_addr.clone(),
                    })
                    .collect();
                pulls.push(Pull {
                    key: entry.key.clone(),
                    bytes: entry.bytes,
                    hash: elected[k],
                    sources,
                });
            }
            plans.push((*id, pulls));
        }
        let members: BTreeSet<PeerId> = votes.keys().copied().collect();
        let plans: Vec<(PeerId, MasterMsg)> = plans
            .into_iter()
            .map(|(id, pulls)| {
                let plan = MasterMsg::SyncPlan {
                    revision: expected,
                    secret,
                    pulls,
                };
                (id, plan)
            })
            .collect();
        if let Some((id, plan)) = plans
            .iter()
            .find(|(_, plan)| master_message_bytes(plan) > MAX_MESSAGE_BYTES)
        {
            let reason = format!(
                "the transfer plan of peer {id} would take {} bytes, over the {MAX_MESSAGE_BYTES}-byte \
                 message limit: sync fewer or shorter-named entries at a time",
                master_message_bytes(plan)
            );
            // The votes are out of the group's sync state by now: tell every voter here.
            for (id, _) in plans {
                self.send(
                    id,
                    MasterMsg::SyncFailed {
                        reason: reason.clone(),
                    },
                );
            }
            return;
        }
        for (id, plan) in plans {
            self.send(id, plan);
        }
        self.sync.insert(
            g,
            SyncState::Transferring {
                revision: expected,
                members,
                done: BTreeSet::new(),
            },
        );
    }
}
