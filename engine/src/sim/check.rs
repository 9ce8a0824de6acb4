//! The invariants, checked while the run goes, on both sides of the control connection.
//!
//! Master side (every message the coordinator emits): a ring never lists a removed peer; a
//! collective commences only on the members of its epoch's ring, each of which launched the
//! tag; it completes (`CollDone`) only when every member of that ring is still there, so a
//! removed peer is never silently counted; a kick is only ever for silence (heartbeats), never
//! for a protocol violation by our peers.
//!
//! Peer side (every operation a peer sees end with `Done`): it ran on the epoch the master said,
//! after the master's `CollDone`; its bits equal exactly the reduction of the inputs of the
//! members of that epoch's ring (no missing or doubled contribution); every peer that completed
//! the attempt holds the same bits; and a data tag completes in one attempt only.

use std::collections::{BTreeMap, BTreeSet};

use concord_kernels::ReduceOp;
use concord_master::proto::{CollKind, MasterMsg, PeerId};

use super::net::Time;

/// One attempt of a collective (a master sequence number) as the master ran it.
#[derive(Debug)]
struct Attempt {
    tag: u64,
    epoch: u64,
    op: ReduceOp,
    kind: CollKind,
    /// Ring position of a broadcast's or reduce's root.
    root: usize,
    /// Recipients of `CollCommence`, with the input each had launched.
    inputs: BTreeMap<PeerId, Vec<f32>>,
    /// Recipients of `CollDone`.
    done_sent: BTreeSet<PeerId>,
    /// The bits of the first peer that completed it.
    result: Option<Vec<u8>>,
}

/// The oracle: what happened, and the first invariant that broke.
#[derive(Debug, Default)]
pub(crate) struct Checker {
    failure: Option<(Time, String)>,
    epochs: BTreeMap<u64, Vec<PeerId>>,
    registered: BTreeSet<PeerId>,
    removed: BTreeMap<PeerId, Time>,
    attempts: BTreeMap<u64, Attempt>,
    /// The input of each peer's latest launch of each tag, with its op, kind and root.
    inputs: BTreeMap<(PeerId, u64), Launched>,
    /// The attempt that completed each data tag, and the peers that completed it.
    tag_seq: BTreeMap<u64, (u64, BTreeSet<PeerId>)>,
    /// Attempts the master completed / aborted.
    pub(crate) completed: u64,
    pub(crate) aborted: BTreeSet<u64>,
}

impl Checker {
    /// Records a broken invariant (the first one wins: it is the cause, the rest are echoes).
    pub(crate) fn fail(&mut self, now: Time, message: String) {
        if self.failure.is_none() {
            self.failure = Some((now, message));
        }
    }

    pub(crate) fn failure(&self) -> Option<&(Time, String)> {
        self.failure.as_ref()
    }

    /// When the master removed `peer`, if it did.
    pub(crate) fn removed_at(&self, peer: PeerId) -> Option<Time> {
        self.removed.get(&peer).copied()
    }

    /// Ring epochs announced so far.
    pub(crate) fn epochs(&self) -> usize {
        self.epochs.len()
    }

    /// Members of the ring of `epoch`, as the master announced it.
    pub(crate) fn ring(&self, epoch: u64) -> Option<&[PeerId]> {
        self.epochs.get(&epoch).map(Vec::as_slice)
    }

    /// The peers the master knows after an input; those that vanished were removed now.
    pub(crate) fn on_registered(&mut self, now: Time, now_registered: BTreeSet<PeerId>) {
        for gone in self.registered.difference(&now_registered) {
            self.removed.insert(*gone, now);
        }
        self.registered = now_registered;
    }

    /// A peer voted for `tag` with this input.
    pub(crate) fn on_launch(
        &mut self,
        peer: PeerId,
        tag: u64,
        input: &[f32],
        op: ReduceOp,
        kind: CollKind,
        root: usize,
    ) {
        let launched = Launched {
            input: input.to_vec(),
            op,
            kind,
            root,
        };
        self.inputs.insert((peer, tag), launched);
    }

    /// The master sends `msg` to peer `to`; `known` are the peers it knows once the input that
    /// caused the message is applied (a peer removed by that very input is not among them).
    pub(crate) fn on_master_send(
        &mut self,
        now: Time,
        to: PeerId,
        msg: &MasterMsg,
        known: &BTreeSet<PeerId>,
    ) {
        if let Some(at) = self.removed_at(to) {
            self.fail(
                now,
                format!("the master sent to peer {to}, removed at {at} us: {msg:?}"),
            );
        }
        match msg {
            MasterMsg::Topology { epoch, ring, .. } => {
                let ids: Vec<PeerId> = ring.iter().map(|m| m.peer_id).collect();
                if !ids.contains(&to) {
                    self.fail(
                        now,
                        format!("ring of epoch {epoch} sent to non-member {to}"),
                    );
                }
                if let Some(id) = ids.iter().find(|id| !known.contains(id)) {
                    let at = self.removed_at(*id);
                    let why = format!(
                        "the ring of epoch {epoch} lists peer {id}, removed (at {at:?} us)"
                    );
                    self.fail(now, why);
                }
                let previous = self.epochs.entry(*epoch).or_insert_with(|| ids.clone());
                if *previous != ids {
                    let why = format!("two rings for epoch {epoch}: {previous:?} and {ids:?}");
                    self.fail(now, why);
                }
            }
            MasterMsg::CollCommence { tag, seq, epoch } => {
                self.on_commence(now, to, *tag, *seq, *epoch)
            }
            MasterMsg::CollDone { tag, seq } => self.on_coll_done(now, to, *tag, *seq, known),
            MasterMsg::CollAborted { seq, .. } if *seq > 0 => {
                self.aborted.insert(*seq);
            }
            MasterMsg::Kicked { reason } if !reason.contains("heartbeat") => {
                self.fail(
                    now,
                    format!("peer {to} kicked for something else than silence: {reason}"),
                );
            }
            _ => {}
        }
    }

    fn on_commence(&mut self, now: Time, to: PeerId, tag: u64, seq: u64, epoch: u64) {
        let in_ring = self.epochs.get(&epoch).is_some_and(|r| r.contains(&to));
        if !in_ring {
            self.fail(now, format!("collective {tag} seq {seq} commenced on peer {to}, not in the ring of epoch {epoch}"));
            return;
        }
        let Some(Launched {
            input,
            op,
            kind,
            root,
        }) = self.inputs.get(&(to, tag)).cloned()
        else {
            self.fail(
                now,
                format!(
                    "collective {tag} seq {seq} commenced on peer {to}, which never launched it"
                ),
            );
            return;
        };
        let attempt = self.attempts.entry(seq).or_insert_with(|| Attempt {
            tag,
            epoch,
            op,
            kind,
            root,
            inputs: BTreeMap::new(),
            done_sent: BTreeSet::new(),
            result: None,
        });
        let same = (
            attempt.tag,
            attempt.epoch,
            attempt.op,
            attempt.kind,
            attempt.root,
        ) == (tag, epoch, op, kind, root);
        if !same {
            self.fail(
                now,
                format!("seq {seq} commenced as two different collectives"),
            );
            return;
        }
        attempt.inputs.insert(to, input);
    }

    fn on_coll_done(
        &mut self,
        now: Time,
        to: PeerId,
        tag: u64,
        seq: u64,
        known: &BTreeSet<PeerId>,
    ) {
        let Some(attempt) = self.attempts.get_mut(&seq) else {
            self.fail(
                now,
                format!("CollDone for tag {tag} seq {seq}, never commenced"),
            );
            return;
        };
        if attempt.tag != tag || !attempt.inputs.contains_key(&to) {
            self.fail(
                now,
                format!("CollDone for tag {tag} seq {seq} sent to peer {to}, not a member"),
            );
            return;
        }
        let first = attempt.done_sent.is_empty();
        attempt.done_sent.insert(to);
        if !first {
            return;
        }
        self.completed += 1;
        // The whole ring of the epoch took part, and nobody in it was removed before now.
        let members: Vec<PeerId> = attempt.inputs.keys().copied().collect();
        let mut ring = self.epochs[&attempt.epoch].clone();
        ring.sort_unstable();
        if members != ring {
            let why = format!("collective {tag} seq {seq} completed with members {members:?}, the ring of epoch {} is {ring:?}", attempt.epoch);
            self.fail(now, why);
        }
        if let Some(id) = members.iter().find(|id| !known.contains(id)) {
            let at = self.removed_at(*id);
            let why = format!(
                "collective {tag} seq {seq} completed counting peer {id}, removed (at {at:?} us)"
            );
            self.fail(now, why);
        }
    }

    /// Peer `peer` took `Done` for `tag`, run as `seq` on `epoch`, holding `bits`.
    pub(crate) fn on_done(&mut self, now: Time, peer: PeerId, done: Done<'_>) {
        let Done {
            tag,
            seq,
            epoch,
            bits,
            unique_tag,
        } = done;
        let Some(attempt) = self.attempts.get_mut(&seq) else {
            self.fail(
                now,
                format!("peer {peer} completed tag {tag} seq {seq}, never commenced"),
            );
            return;
        };
        if (attempt.tag, attempt.epoch) != (tag, epoch) || !attempt.done_sent.contains(&peer) {
            let why = format!(
                "peer {peer} completed tag {tag} seq {seq} on epoch {epoch}; the master ran tag {} on epoch {} and told {:?} it was done",
                attempt.tag, attempt.epoch, attempt.done_sent
            );
            self.fail(now, why);
            return;
        }
        let ring = self.epochs.get(&epoch).cloned().unwrap_or_default();
        let want = expected(attempt, &ring, peer);
        let got: Vec<f32> = super::floats(bits);
        let wrong = (got.len() != want.len())
            .then_some(0)
            .or_else(|| (0..got.len()).find(|i| got[*i].to_bits() != want[*i].to_bits()));
        let mut broken = wrong.map(|i| {
            format!(
                "peer {peer}: collective {tag} seq {seq} ({} {:?} over {:?} of epoch {epoch}) is wrong at element {i} of {}: got {:?}, want {:?}",
                attempt.kind,
                attempt.op,
                attempt.inputs.keys().collect::<Vec<_>>(),
                want.len(),
                got.get(i),
                want.get(i)
            )
        });
        // Every peer holds the same bits where the semantics say so.
        let shared = matches!(
            attempt.kind,
            CollKind::AllReduce | CollKind::AllGather | CollKind::Broadcast
        );
        match &attempt.result {
            _ if !shared => {}
            None => attempt.result = Some(bits.to_vec()),
            Some(first) if first != bits => {
                let why = format!("peers disagree on the bits of collective {tag} seq {seq}");
                broken.get_or_insert(why);
            }
            Some(_) => {}
        }
        if let Some(why) = broken {
            self.fail(now, why);
        }
        if unique_tag {
            self.check_tag_once(now, peer, tag, seq);
        }
    }

    /// Survivors agree on which attempt completed a data tag. A tag completes again only when
    /// every peer that completed it before is gone (the group lost the state and restarted).
    fn check_tag_once(&mut self, now: Time, peer: PeerId, tag: u64, seq: u64) {
        let (first, holders) = self
            .tag_seq
            .entry(tag)
            .or_insert_with(|| (seq, BTreeSet::new()));
        if *first == seq {
            holders.insert(peer);
            return;
        }
        let alive: Vec<PeerId> = holders
            .iter()
            .copied()
            .filter(|p| self.registered.contains(p))
            .collect();
        if alive.is_empty() {
            self.tag_seq.insert(tag, (seq, BTreeSet::from([peer])));
        } else {
            let why = format!(
                "tag {tag} completed twice: seq {first} on {alive:?}, seq {seq} on peer {peer}"
            );
            self.fail(now, why);
        }
    }
}

/// What a peer launched for a tag.
#[derive(Clone, Debug)]
struct Launched {
    input: Vec<f32>,
    op: ReduceOp,
    kind: CollKind,
    root: usize,
}

/// What `peer` must hold at the end of `attempt` on `ring` (every call is in place but a
/// reduce-scatter's): computed from every member's input, so a missing or doubled
/// contribution shows.
fn expected(attempt: &Attempt, ring: &[PeerId], peer: PeerId) -> Vec<f32> {
    let rank = ring.iter().position(|p| *p == peer).unwrap_or(usize::MAX);
    let in_ring_order: Vec<&[f32]> = ring
        .iter()
        .filter_map(|p| attempt.inputs.get(p).map(Vec::as_slice))
        .collect();
    if in_ring_order.len() != ring.len() || rank == usize::MAX {
        return Vec::new(); // A member without an input: nothing can match, the caller says so.
    }
    let all = || reduce_exact(attempt.op, &in_ring_order);
    match attempt.kind {
        CollKind::AllReduce => all(),
        CollKind::ReduceScatter => {
            let total = all();
            let slot = total.len() / ring.len();
            total[rank * slot..(rank + 1) * slot].to_vec()
        }
        CollKind::AllGather => in_ring_order.concat(),
        CollKind::Broadcast => in_ring_order[attempt.root].to_vec(),
        CollKind::Reduce if rank == attempt.root => all(),
        CollKind::Reduce => in_ring_order[rank].to_vec(),
        CollKind::Barrier => Vec::new(),
    }
}

/// What a peer completed (see [`Checker::on_done`]).
#[derive(Debug)]
pub(crate) struct Done<'a> {
    pub(crate) tag: u64,
    pub(crate) seq: u64,
    pub(crate) epoch: u64,
    pub(crate) bits: &'a [u8],
    /// A tag used once per run (data tags), as opposed to the per-step agreement tag.
    pub(crate) unique_tag: bool,
}

/// The reduction computed directly, element by element. Inputs are small integers, so every
/// order of summation is exact and gives the ring's bits; avg is one division of that sum.
pub(crate) fn reduce_exact(op: ReduceOp, inputs: &[&[f32]]) -> Vec<f32> {
    let len = inputs.first().map_or(0, |v| v.len());
    if inputs.iter().any(|v| v.len() != len) {
        return Vec::new(); // Mismatched lengths: nothing can match, the caller reports it.
    }
    (0..len)
        .map(|i| {
            let column = inputs.iter().map(|v| v[i]);
            match op {
                ReduceOp::Max => column.fold(f32::NEG_INFINITY, f32::max),
                ReduceOp::Min => column.fold(f32::INFINITY, f32::min),
                ReduceOp::Avg => column.sum::<f32>() / inputs.len() as f32,
                _ => column.sum::<f32>(), // Sum (the simulation uses no other op).
            }
        })
        .collect()
}
