//! One peer's data plane for one ring epoch, in the simulation: the real [`RingPlan`] schedule
//! and the real kernel reductions, over simulated connections.
//!
//! It mirrors `crate::plane` (see its README): an operation is registered when the master
//! says go; step-0 sub-chunks leave at once; every received sub-chunk is reduced (or copied)
//! into the destination and, from then on, forwarded as the same sub-chunk of the next step.
//! Frames that overtake the go-ahead wait until the operation is registered; frames of a
//! retired `(tag, seq)` are dropped; any other unexpected frame, or a closed connection, fails
//! the plane and every operation on it. Like the real plane it is sans-IO: every method returns
//! what must be sent or reported, as [`PlaneOut`]s.

use std::collections::{BTreeMap, VecDeque};

use concord_kernels::{DType, ReduceOp};
use concord_master::proto::PeerId;

use super::net::Frame;
use crate::collective::ring::{chunks_of, CollKind, Place, RecvKind, RingPlan};

/// How many retired `(tag, seq)` pairs are remembered (as the real plane does).
const RETIRED_MEMORY: usize = 4096;
/// Most frames held for operations not registered yet; more means a neighbour is broken.
const MAX_EARLY_FRAMES: usize = 1 << 14;

/// What the plane asks its peer to do.
#[derive(Debug)]
pub(crate) enum PlaneOut {
    /// Send a frame to the successor.
    Frame { to: usize, frame: Frame },
    /// Open the data connection to the successor (hello with the epoch's secret).
    Dial { to: usize, epoch: u64, secret: u64 },
    /// Accept the predecessor's connection.
    DialAck { to: usize, epoch: u64 },
    /// Close the connection to a neighbour.
    LinkDown { to: usize, epoch: u64 },
    /// An operation's part here is over: its output (the whole buffer; a reduce-scatter's
    /// slot; off a reduce's root, the input untouched), or why it failed.
    Finished {
        tag: u64,
        seq: u64,
        result: Result<Vec<u8>, String>,
    },
}

/// A ring neighbour: its index in the world and its peer id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Neighbour {
    pub(crate) idx: usize,
    pub(crate) id: PeerId,
}

#[derive(Debug)]
struct RingOp {
    plan: RingPlan,
    op: ReduceOp,
    src: Vec<u8>,
    dst: Vec<u8>,
    /// Partial sums sent on and not kept ([`Place::Work`]).
    work: Vec<u8>,
    /// `recv_prefix[t - first]`: receives before step `t`, from this peer's first receive step.
    recv_prefix: Vec<usize>,
    /// Index of the next receive expected (frames of one connection arrive in order).
    next_recv: usize,
    reported: bool,
}

impl RingOp {
    /// The output this peer reports: its whole buffer, or a reduce-scatter's slot (`dst` is
    /// the slot there); off a reduce's root, the untouched input.
    fn result(&self) -> Vec<u8> {
        self.dst.clone()
    }
}

/// The connections and operations of one ring epoch on one peer.
#[derive(Debug)]
pub(crate) struct Plane {
    pub(crate) epoch: u64,
    secret: u64,
    world: usize,
    /// `None` when the ring has one member (nothing to connect).
    prev: Option<Neighbour>,
    next: Option<Neighbour>,
    prev_ok: bool,
    next_ok: bool,
    broken: Option<String>,
    ops: BTreeMap<(u64, u64), RingOp>,
    retired: VecDeque<(u64, u64)>,
    early: Vec<(usize, Frame)>,
}

impl Plane {
    /// A plane for `epoch`; returns it with the dial to the successor.
    pub(crate) fn connect(
        epoch: u64,
        secret: u64,
        world: usize,
        neighbours: Option<(Neighbour, Neighbour)>,
    ) -> (Plane, Vec<PlaneOut>) {
        assert_eq!(
            world == 1,
            neighbours.is_none(),
            "a ring of one has no neighbours"
        );
        let plane = Plane {
            epoch,
            secret,
            world,
            prev: neighbours.map(|n| n.0),
            next: neighbours.map(|n| n.1),
            prev_ok: world == 1,
            next_ok: world == 1,
            broken: None,
            ops: BTreeMap::new(),
            retired: VecDeque::new(),
            early: Vec::new(),
        };
        let dial = plane.next.map(|n| PlaneOut::Dial {
            to: n.idx,
            epoch,
            secret,
        });
        (plane, dial.into_iter().collect())
    }

    /// Both connections are up.
    pub(crate) fn connected(&self) -> bool {
        self.prev_ok && self.next_ok && self.broken.is_none()
    }

    /// Why the plane failed, if it did.
    pub(crate) fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    /// The predecessor's hello; a wrong epoch, id or secret is refused (dropped).
    pub(crate) fn on_dial(
        &mut self,
        from: usize,
        from_id: PeerId,
        epoch: u64,
        secret: u64,
    ) -> Vec<PlaneOut> {
        let expected = self.prev
            == Some(Neighbour {
                idx: from,
                id: from_id,
            });
        if epoch != self.epoch || !expected || secret != self.secret || self.broken.is_some() {
            return Vec::new();
        }
        self.prev_ok = true;
        vec![PlaneOut::DialAck { to: from, epoch }]
    }

    /// The successor accepted our dial.
    pub(crate) fn on_dial_ack(&mut self, from: usize, epoch: u64) {
        if epoch == self.epoch && self.next.map(|n| n.idx) == Some(from) {
            self.next_ok = true;
        }
    }

    /// Fails the plane: every unreported operation fails, both connections close.
    pub(crate) fn fail(&mut self, why: &str) -> Vec<PlaneOut> {
        if self.broken.is_some() {
            return Vec::new();
        }
        self.broken = Some(why.to_string());
        self.early.clear();
        let mut outs = Vec::new();
        for (&(tag, seq), op) in self.ops.iter_mut() {
            if !std::mem::replace(&mut op.reported, true) {
                outs.push(PlaneOut::Finished {
                    tag,
                    seq,
                    result: Err(why.to_string()),
                });
            }
        }
        let mut ends: Vec<usize> = self.prev.iter().chain(&self.next).map(|n| n.idx).collect();
        ends.dedup();
        for to in ends {
            outs.push(PlaneOut::LinkDown {
                to,
                epoch: self.epoch,
            });
        }
        outs
    }

    /// A neighbour's connection of this epoch closed: the ring is broken.
    pub(crate) fn on_link_down(&mut self, epoch: u64) -> Vec<PlaneOut> {
        if epoch != self.epoch {
            return Vec::new();
        }
        self.fail("a ring neighbour closed its connection")
    }

    /// Starts an operation the master let go. `src` is this peer's input (its slot for an
    /// all-gather; the root's data on a broadcast's root); every call is in place but a
    /// reduce-scatter's, whose output is this peer's slot.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn register(
        &mut self,
        tag: u64,
        seq: u64,
        kind: CollKind,
        root: usize,
        rank: usize,
        sub_elems: usize,
        op: ReduceOp,
        src: Vec<u8>,
    ) -> Vec<PlaneOut> {
        let finished = |result| vec![PlaneOut::Finished { tag, seq, result }];
        if let Some(why) = &self.broken {
            return finished(Err(why.clone()));
        }
        if self.ops.contains_key(&(tag, seq)) || self.retired.contains(&(tag, seq)) {
            return finished(Err(format!("collective {tag} seq {seq} registered twice")));
        }
        let elem_bytes = DType::F32.size_bytes();
        let count = match kind {
            CollKind::AllGather => src.len() / elem_bytes * self.world,
            _ => src.len() / elem_bytes,
        };
        if self.world == 1 || count == 0 || kind == CollKind::Barrier {
            // Nothing to move: the result is the input (divided by one for avg).
            let mut dst = src;
            let r = concord_kernels::finish(&mut dst, DType::F32, op, 1);
            return finished(r.map(|()| dst).map_err(|e| e.to_string()));
        }
        let plan = RingPlan::of(
            kind,
            root,
            self.world,
            rank,
            count,
            elem_bytes,
            sub_elems * elem_bytes,
        );
        debug_assert_eq!(plan.chunks(), chunks_of(kind, self.world));
        let recvs = plan.recv_steps();
        let recv_prefix = (recvs.start..=recvs.end)
            .map(|t| plan.recv_subs_before(t))
            .collect();
        let mut dst = vec![0u8; plan.place_len(Place::Dst)];
        match kind {
            CollKind::AllGather => {
                dst[plan.chunk_bytes(rank)].copy_from_slice(&src);
            }
            CollKind::ReduceScatter => {}
            _ => dst.copy_from_slice(&src),
        }
        let ring_op = RingOp {
            plan,
            op,
            dst,
            work: vec![0u8; count * elem_bytes],
            src,
            recv_prefix,
            next_recv: 0,
            reported: false,
        };
        let mut outs = Vec::new();
        // The first send step goes out now when it sends the input (no receive gates it).
        let sends = plan.send_steps();
        if !sends.is_empty() && plan.send_place(sends.start) == Place::Src {
            let t = sends.start;
            let c = plan.send_chunk(t);
            for j in 0..plan.subs(c) {
                let payload = ring_op.src[plan.place_bytes(Place::Src, c, j)].to_vec();
                outs.push(self.frame(tag, seq, t, j, payload));
            }
        }
        if ring_op.recv_prefix[recvs.len()] == 0 {
            // Nothing to receive (a chain's first peer): its part is over once it has sent.
            outs.push(PlaneOut::Finished {
                tag,
                seq,
                result: Ok(ring_op.result()),
            });
            self.ops.insert(
                (tag, seq),
                RingOp {
                    reported: true,
                    ..ring_op
                },
            );
            return outs;
        }
        self.ops.insert((tag, seq), ring_op);
        // Frames that overtook the go-ahead, in their arrival order.
        let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.early)
            .into_iter()
            .partition(|(_, f)| (f.tag, f.seq) == (tag, seq));
        self.early = rest;
        for (from, frame) in mine {
            outs.extend(self.on_frame(from, frame));
        }
        outs
    }

    /// Removes a finished or aborted operation; its late frames will be dropped.
    pub(crate) fn retire(&mut self, tag: u64, seq: u64) {
        self.ops.remove(&(tag, seq));
        self.early.retain(|(_, f)| (f.tag, f.seq) != (tag, seq));
        if self.retired.len() == RETIRED_MEMORY {
            self.retired.pop_front();
        }
        self.retired.push_back((tag, seq));
    }

    fn frame(&self, tag: u64, seq: u64, step: usize, sub: usize, payload: Vec<u8>) -> PlaneOut {
        let to = self
            .next
            .expect("a ring of two or more has a successor")
            .idx;
        let frame = Frame {
            epoch: self.epoch,
            tag,
            seq,
            step: step as u32,
            sub: sub as u32,
            payload,
        };
        PlaneOut::Frame { to, frame }
    }

    /// A frame from the predecessor.
    pub(crate) fn on_frame(&mut self, from: usize, frame: Frame) -> Vec<PlaneOut> {
        if frame.epoch != self.epoch || self.broken.is_some() {
            return Vec::new(); // A closed connection: nothing is read from it any more.
        }
        if self.prev.map(|n| n.idx) != Some(from) {
            return self.fail(&format!("a frame from peer #{from}, not the predecessor"));
        }
        let key = (frame.tag, frame.seq);
        if self.retired.contains(&key) {
            return Vec::new();
        }
        let Some(op) = self.ops.get_mut(&key) else {
            if self.early.len() == MAX_EARLY_FRAMES {
                return self.fail("too many frames of collectives never started here");
            }
            self.early.push((from, frame));
            return Vec::new();
        };
        if op.reported {
            return Vec::new(); // Failed here; its abort is on its way.
        }
        let plan = op.plan;
        let (t, j) = (frame.step as usize, frame.sub as usize);
        let c = plan.recv_chunk(t);
        let recvs = plan.recv_steps();
        let valid = recvs.contains(&t) && j < plan.subs(c);
        let place = plan.out_place(c);
        let range = if valid {
            plan.place_bytes(place, c, j)
        } else {
            0..0
        };
        let index = if valid {
            op.recv_prefix[t - recvs.start] + j
        } else {
            usize::MAX
        };
        if !valid || index != op.next_recv || frame.payload.len() != range.len() {
            let why = format!(
                "predecessor sent step {t} sub-chunk {j} ({} bytes) of collective {} seq {}, expected receive {}",
                frame.payload.len(),
                frame.tag,
                frame.seq,
                op.next_recv
            );
            return self.fail(&why);
        }
        let mine = match plan.kind {
            CollKind::AllGather | CollKind::Broadcast => Vec::new(),
            _ => op.src[plan.place_bytes(Place::Src, c, j)].to_vec(),
        };
        let out = match place {
            Place::Dst => &mut op.dst[range.clone()],
            Place::Work => &mut op.work[range.clone()],
            Place::Src => unreachable!("nothing lands in the input"),
        };
        let reduced = match plan.recv_kind(t) {
            RecvKind::Copy => {
                out.copy_from_slice(&frame.payload);
                Ok(())
            }
            RecvKind::Reduce => {
                concord_kernels::reduce_out(out, &mine, &frame.payload, DType::F32, op.op)
            }
            RecvKind::ReduceFinish => concord_kernels::reduce_out_finish(
                out,
                &mine,
                &frame.payload,
                DType::F32,
                op.op,
                plan.world,
            ),
        };
        if let Err(e) = reduced {
            return self.fail(&format!("reduction failed: {e}"));
        }
        let forwarded = out.to_vec();
        op.next_recv += 1;
        let mut outs = Vec::new();
        // What step t received is what step t + 1 sends (ring.rs), sub-chunk for sub-chunk.
        if plan.send_steps().contains(&(t + 1)) {
            outs.push(self.frame(frame.tag, frame.seq, t + 1, j, forwarded));
        }
        let op = self.ops.get_mut(&key).expect("present above");
        if op.next_recv == op.recv_prefix[recvs.len()] {
            op.reported = true;
            outs.push(PlaneOut::Finished {
                tag: frame.tag,
                seq: frame.seq,
                result: Ok(op.result()),
            });
        }
        outs
    }

    /// The plane is replaced (a new epoch) or its peer leaves: its connections close.
    pub(crate) fn close(mut self) -> Vec<PlaneOut> {
        self.fail("the ring was torn down")
    }
}
