//! Collectives: the per-tag vote to start one (`CollInit`, descriptors that must match), the
//! completion of each attempt (`CollComplete`), and cancellation (`CollCancel`).
//!
//! A collective is known by its group and tag. It starts when every accepted member of the group
//! voted with the same descriptor, on the group's intact ring, under a fresh sequence number;
//! it is done when every member completed that sequence. A failure on one member aborts it on
//! all and marks the ring broken; a cancelled vote is remembered until every member has been
//! told, so that a late voter does not start a vote nobody else will join.

use std::collections::{BTreeMap, BTreeSet};

use super::state::{Coll, CollKey, Coordinator, Peer};
use crate::proto::{AbortKind, CollectiveDesc, MasterMsg, PeerId};

/// Longest dtype or op name a collective may carry.
const MAX_NAME_BYTES: usize = 32;

impl Coordinator {
    pub(super) fn on_coll_init(
        &mut self,
        id: PeerId,
        tag: u64,
        desc: CollectiveDesc,
    ) -> Result<(), String> {
        if self.in_sync(id) {
            return Err(
                "started a collective during a shared-state sync (one operation kind at a time)"
                    .into(),
            );
        }
        if desc.dtype.is_empty() || desc.op.is_empty() {
            return Err(format!("collective {tag} with an empty dtype or op"));
        }
        // Kept per voter until the vote completes: names, not payloads.
        if desc.dtype.len() > MAX_NAME_BYTES || desc.op.len() > MAX_NAME_BYTES {
            return Err(format!(
                "collective {tag} with a dtype or op name over {MAX_NAME_BYTES} bytes"
            ));
        }
        if self.accept_votes.contains_key(&id) {
            return Err("started a collective while voting to update the topology (one operation kind at a time)".into());
        }
        let g = self.peers[&id].group;
        let key = (g, tag);
        if let Some((kind, reason, told)) = self.cancelled_votes.get_mut(&key) {
            if told.insert(id) {
                let (kind, reason) = (*kind, reason.clone());
                self.send(
                    id,
                    MasterMsg::CollAborted {
                        tag,
                        seq: 0,
                        kind,
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
                                kind: AbortKind::Refused,
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

    pub(super) fn on_coll_complete(
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
                    self.abort_coll((g, tag), AbortKind::Failed, &reason, Vec::new());
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

    pub(super) fn on_coll_cancel(
        &mut self,
        id: PeerId,
        tag: u64,
        seq: u64,
        kind: AbortKind,
        reason: &str,
    ) -> Result<(), String> {
        // A peer may say its deadline passed, its user cancelled, or it failed here; that a
        // peer was lost or a collective refused is the master's to say.
        if !matches!(
            kind,
            AbortKind::Timeout | AbortKind::Cancelled | AbortKind::Failed
        ) {
            return Err(format!(
                "cancelled collective {tag} with kind {kind}, which only the master gives"
            ));
        }
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
                    self.cancelled_votes
                        .insert(key, (kind, reason.clone(), told));
                }
            }
            // The connections stay up: only this collective's frames stop.
            self.abort_coll(key, kind, &reason, Vec::new());
        } else if seq >= self.next_seq {
            return Err(format!(
                "cancelled collective {tag} with sequence {seq}, never started"
            ));
        }
        Ok(())
    }

    /// Starts the votes every member has cast, refuses those that disagree, and finishes the
    /// attempts every member completed.
    pub(super) fn reevaluate_collectives(&mut self, accepted: &BTreeSet<PeerId>) {
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
            .retain(|(g, _), (_, _, told)| !told.is_superset(&in_group(peers, *g)));
        let keys: Vec<CollKey> = self.colls.keys().copied().collect();
        for key in keys {
            let (g, tag) = key;
            let voters_needed = in_group(&self.peers, g);
            match &self.colls[&key] {
                Coll::Voting { descs }
                    if descs.keys().copied().collect::<BTreeSet<_>>() == voters_needed =>
                {
                    let (first_id, first) = descs.iter().next().expect("accepted is not empty");
                    let ring_len = self.rings.get(&g).map_or(0, Vec::len);
                    let agreed = descs.values().all(|d| d == first);
                    let refusal = if !agreed {
                        let diffs: Vec<String> = descs
                            .iter()
                            .filter(|(_, d)| *d != first)
                            .map(|(id, d)| {
                                format!(
                                    "peer {id} differs from peer {first_id} in {}",
                                    d.differences(first).join(", ")
                                )
                            })
                            .collect();
                        let listing: Vec<String> = descs
                            .iter()
                            .map(|(id, d)| format!("peer {id}: {d}"))
                            .collect();
                        Some(format!(
                            "peers disagree on collective {tag}, nothing was moved: {} ({})",
                            diffs.join("; "),
                            listing.join("; ")
                        ))
                    } else if first.kind.has_root() && first.root as usize >= ring_len {
                        Some(format!(
                            "{} {tag} names root rank {}, but the ring has {ring_len} peers (ranks 0..{ring_len}); nothing was moved",
                            first.kind, first.root
                        ))
                    } else {
                        None
                    };
                    if let Some(reason) = refusal {
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
                    } else {
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

    /// Ends a collective on every peer that took part, saying why.
    pub(super) fn abort_coll(
        &mut self,
        key: CollKey,
        kind: AbortKind,
        reason: &str,
        lost: Vec<PeerId>,
    ) {
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
                kind,
                reason: reason.to_string(),
                lost: lost.clone(),
            };
            self.send(id, msg);
        }
    }
}
