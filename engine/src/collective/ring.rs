//! The ring schedules of every collective, as pure functions of (kind, root, rank, world, count).
//!
//! **All-reduce.** The buffer is split into `world` contiguous chunks, the first `count % world`
//! one element longer. Over `2 (world - 1)` steps `t`, a peer sends chunk `(rank - t) mod world`
//! to its successor and receives chunk `(rank - t - 1) mod world` from its predecessor:
//! - steps `t < world - 1` are the reduce-scatter: the received chunk is reduced with the peer's
//!   own input (`dst = src op received`); on the last of them the peer holds the final value of
//!   chunk `(rank + 1) mod world`, which it finishes (divides, for `avg`);
//! - the remaining steps are the all-gather: received chunks are copied.
//!
//! **Reduce-scatter and all-gather** are those two halves on their own. The reduce-scatter's
//! chunk numbering is shifted by one so that rank `r` finishes chunk `r` (its slice of the
//! output); its partial sums land in a work buffer, since they are sent on and never kept. The
//! all-gather starts from each peer's own chunk (chunk `rank`), so it has `world - 1` steps of
//! copies.
//!
//! **Broadcast and reduce** are pipelined chains along the ring, the whole buffer one chunk: the
//! broadcast from the root to its predecessor (the peer at distance `p` from the root receives at
//! step `p - 1` and forwards at step `p`), the reduce from the root's successor to the root
//! (each peer adds its input to the running sum it receives and forwards it; the root finishes).
//! Sub-chunk by sub-chunk, a buffer crosses every hop at once, so it moves at link speed.
//!
//! In every schedule, what a peer sends at step `t` is exactly what it received at step `t - 1`
//! when it received anything then (else its input), so sends start sub-chunk by sub-chunk as
//! soon as the matching received sub-chunk has landed: receiving, reducing and sending overlap,
//! with no barrier between steps. Each final value is computed once, by one peer, and copied
//! everywhere else, so every peer that holds it holds the same bits.

use std::ops::Range;

pub use concord_master::proto::CollKind;

/// The schedule of one collective on one peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingPlan {
    /// Which collective.
    pub kind: CollKind,
    /// Ring position of the root (broadcast and reduce).
    pub root: usize,
    /// Ring size.
    pub world: usize,
    /// This peer's position in the ring.
    pub rank: usize,
    /// Elements in the whole buffer (see `CollectiveDesc::count`).
    pub count: usize,
    /// Bytes per element.
    pub elem_bytes: usize,
    /// Elements per sub-chunk (the unit of pipelining and of one frame).
    pub sub_elems: usize,
}

/// What a step does with the chunk it receives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecvKind {
    /// `out = src op received`.
    Reduce,
    /// `out = finish(src op received)`: the step that computes a final value.
    ReduceFinish,
    /// `out = received`.
    Copy,
}

/// Which of a collective's buffers a range lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// The caller's input.
    Src,
    /// The caller's output.
    Dst,
    /// The collective's own scratch buffer, as long as the whole buffer: partial sums that are
    /// sent on and not kept (a reduce-scatter's other chunks, a reduce off the root).
    Work,
}

/// How many chunks a collective of `kind` cuts its buffer into on a ring of `world`: one per
/// peer around the ring, one for a chain (and a barrier, which moves nothing).
pub fn chunks_of(kind: CollKind, world: usize) -> usize {
    match kind {
        CollKind::Broadcast | CollKind::Reduce | CollKind::Barrier => 1,
        _ => world,
    }
}

impl RingPlan {
    /// An all-reduce plan; `sub_bytes` is rounded down to whole elements (at least one).
    pub fn new(
        world: usize,
        rank: usize,
        count: usize,
        elem_bytes: usize,
        sub_bytes: usize,
    ) -> Self {
        Self::of(
            CollKind::AllReduce,
            0,
            world,
            rank,
            count,
            elem_bytes,
            sub_bytes,
        )
    }

    /// A plan of any kind. For an all-gather or a reduce-scatter `count` is a multiple of
    /// `world`; `root < world`.
    pub fn of(
        kind: CollKind,
        root: usize,
        world: usize,
        rank: usize,
        count: usize,
        elem_bytes: usize,
        sub_bytes: usize,
    ) -> Self {
        assert!(world >= 1 && rank < world && root < world && elem_bytes >= 1);
        if matches!(kind, CollKind::AllGather | CollKind::ReduceScatter) {
            assert!(
                count.is_multiple_of(world),
                "{kind}: {count} elements on {world} peers"
            );
        }
        RingPlan {
            kind,
            root,
            world,
            rank,
            count,
            elem_bytes,
            sub_elems: (sub_bytes / elem_bytes).max(1),
        }
    }

    /// How many chunks the buffer is cut into (see [`chunks_of`]).
    pub fn chunks(&self) -> usize {
        chunks_of(self.kind, self.world)
    }

    /// Number of steps of the whole collective (the largest step number is one less).
    pub fn steps(&self) -> usize {
        match self.kind {
            CollKind::AllReduce => 2 * (self.world - 1),
            CollKind::AllGather | CollKind::ReduceScatter => self.world - 1,
            CollKind::Broadcast | CollKind::Reduce => self.world - 1,
            CollKind::Barrier => 0,
        }
    }

    /// This peer's distance along a chain from its first sender (the root of a broadcast, the
    /// root's successor for a reduce).
    fn chain_pos(&self) -> usize {
        let first = match self.kind {
            CollKind::Reduce => self.root + 1,
            _ => self.root,
        };
        self.wrap(self.rank as isize - first as isize)
    }

    /// The steps at which this peer sends.
    pub fn send_steps(&self) -> Range<usize> {
        match self.kind {
            CollKind::Broadcast | CollKind::Reduce => {
                let p = self.chain_pos();
                if p + 1 < self.world {
                    p..p + 1
                } else {
                    0..0
                }
            }
            _ => 0..self.steps(),
        }
    }

    /// The steps at which this peer receives.
    pub fn recv_steps(&self) -> Range<usize> {
        match self.kind {
            CollKind::Broadcast | CollKind::Reduce => {
                let p = self.chain_pos();
                if p > 0 {
                    p - 1..p
                } else {
                    0..0
                }
            }
            _ => 0..self.steps(),
        }
    }

    /// Element range of chunk `c`.
    pub fn chunk(&self, c: usize) -> Range<usize> {
        let n = self.chunks();
        let (base, extra) = (self.count / n, self.count % n);
        let start = c * base + c.min(extra);
        start..start + base + usize::from(c < extra)
    }

    fn wrap(&self, x: isize) -> usize {
        x.rem_euclid(self.world as isize) as usize
    }

    /// Byte range in the whole buffer of chunk `c`.
    pub fn chunk_bytes(&self, c: usize) -> Range<usize> {
        let elems = self.chunk(c);
        elems.start * self.elem_bytes..elems.end * self.elem_bytes
    }

    /// How far the chunk numbering is turned: the reduce-scatter's by one, so that rank `r`
    /// finishes chunk `r`.
    fn shift(&self) -> isize {
        isize::from(self.kind == CollKind::ReduceScatter)
    }

    /// Chunk sent at step `t`.
    pub fn send_chunk(&self, t: usize) -> usize {
        match self.chunks() {
            1 => 0,
            _ => self.wrap(self.rank as isize - t as isize - self.shift()),
        }
    }

    /// Chunk received at step `t`.
    pub fn recv_chunk(&self, t: usize) -> usize {
        match self.chunks() {
            1 => 0,
            _ => self.wrap(self.rank as isize - t as isize - 1 - self.shift()),
        }
    }

    /// What step `t` does with what it receives.
    pub fn recv_kind(&self, t: usize) -> RecvKind {
        match self.kind {
            CollKind::AllReduce | CollKind::ReduceScatter if t + 2 == self.world => {
                RecvKind::ReduceFinish
            }
            CollKind::AllReduce | CollKind::ReduceScatter if t + 1 < self.world => RecvKind::Reduce,
            CollKind::Reduce if self.rank == self.root => RecvKind::ReduceFinish,
            CollKind::Reduce => RecvKind::Reduce,
            _ => RecvKind::Copy,
        }
    }

    /// The chunk this peer finishes (owns) at the end of an all-reduce's reduce-scatter.
    pub fn owned_chunk(&self) -> usize {
        (self.rank + 1) % self.world
    }

    /// Where the frame sent at step `t` is read from: the input when this peer received nothing
    /// at step `t - 1`, else where that receive landed.
    pub fn send_place(&self, t: usize) -> Place {
        if t == 0 || !self.recv_steps().contains(&(t - 1)) {
            return Place::Src;
        }
        self.out_place(self.recv_chunk(t - 1))
    }

    /// Where what this peer receives for chunk `c` lands.
    pub fn out_place(&self, c: usize) -> Place {
        match self.kind {
            CollKind::ReduceScatter if c != self.rank => Place::Work,
            CollKind::Reduce if self.rank != self.root => Place::Work,
            _ => Place::Dst,
        }
    }

    /// How many bytes `place` spans: the whole buffer, or one chunk where the buffer is one
    /// peer's slice (an all-gather's input, a reduce-scatter's output).
    pub fn place_len(&self, place: Place) -> usize {
        match (self.kind, place) {
            (CollKind::AllGather, Place::Src) | (CollKind::ReduceScatter, Place::Dst) => {
                self.chunk_bytes(self.rank).len()
            }
            _ => self.count * self.elem_bytes,
        }
    }

    /// Byte range in `place` of sub-chunk `j` of chunk `c`.
    pub fn place_bytes(&self, place: Place, c: usize, j: usize) -> Range<usize> {
        let r = self.sub_bytes(c, j);
        if self.place_len(place) == self.count * self.elem_bytes {
            return r;
        }
        debug_assert_eq!(c, self.rank, "a one-chunk buffer holds this peer's chunk");
        let base = self.chunk_bytes(c).start;
        r.start - base..r.end - base
    }

    /// Number of sub-chunks of chunk `c`.
    pub fn subs(&self, c: usize) -> usize {
        self.chunk(c).len().div_ceil(self.sub_elems)
    }

    /// Byte range in the whole buffer of sub-chunk `j` of chunk `c`.
    pub fn sub_bytes(&self, c: usize, j: usize) -> Range<usize> {
        let chunk = self.chunk(c);
        let start = chunk.start + j * self.sub_elems;
        let end = (start + self.sub_elems).min(chunk.end);
        debug_assert!(start < end, "sub-chunk {j} of chunk {c} is empty");
        start * self.elem_bytes..end * self.elem_bytes
    }

    /// Sub-chunks received before step `t` (prefix sums of the receive order), `t` within or
    /// at the end of [`RingPlan::recv_steps`].
    pub fn recv_subs_before(&self, t: usize) -> usize {
        (self.recv_steps().start..t)
            .map(|u| self.subs(self.recv_chunk(u)))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_tile_the_buffer_and_the_first_ones_are_longer() {
        for world in 1..9 {
            for count in [0, 1, 2, 7, 8, 9, 100, 1001] {
                let plan = RingPlan::new(world, 0, count, 4, 64);
                let mut next = 0;
                for c in 0..world {
                    let r = plan.chunk(c);
                    assert_eq!(r.start, next);
                    assert!(r.len() == count / world + usize::from(c < count % world));
                    next = r.end;
                }
                assert_eq!(next, count);
            }
        }
    }

    #[test]
    fn each_step_sends_what_the_previous_one_received() {
        for world in 2..9 {
            for rank in 0..world {
                let plan = RingPlan::new(world, rank, 100, 4, 64);
                for t in 1..plan.steps() {
                    assert_eq!(plan.send_chunk(t), plan.recv_chunk(t - 1));
                }
                // The successor receives at step t what this peer sends at step t.
                let next = RingPlan::new(world, (rank + 1) % world, 100, 4, 64);
                for t in 0..plan.steps() {
                    assert_eq!(plan.send_chunk(t), next.recv_chunk(t));
                }
            }
        }
    }

    /// The buffers of one in-memory peer, laid out as the data plane lays them out.
    struct Bufs {
        src: Vec<u64>,
        dst: Vec<u64>,
        work: Vec<u64>,
    }

    impl Bufs {
        fn at(&mut self, place: Place) -> &mut Vec<u64> {
            match place {
                Place::Src => &mut self.src,
                Place::Dst => &mut self.dst,
                Place::Work => &mut self.work,
            }
        }
    }

    /// Runs `kind`'s schedule across `world` in-memory peers with integer sums, step by step
    /// (every sender first, then every receiver), checking each frame's chunk against what the
    /// sender sent; returns each peer's buffers. Elements are 8 bytes; `inputs[r]` is peer `r`'s
    /// input as the data plane sees it (one chunk for an all-gather).
    fn run(
        kind: CollKind,
        root: usize,
        world: usize,
        count: usize,
        inputs: &[Vec<u64>],
    ) -> Vec<Bufs> {
        let plans: Vec<RingPlan> = (0..world)
            .map(|r| RingPlan::of(kind, root, world, r, count, 8, 24))
            .collect();
        let mut bufs: Vec<Bufs> = (0..world)
            .map(|r| Bufs {
                src: inputs[r].clone(),
                dst: vec![u64::MAX; plans[r].place_len(Place::Dst) / 8],
                work: vec![u64::MAX; count],
            })
            .collect();
        let steps = plans[0].steps();
        for t in 0..steps {
            let sent: Vec<Option<(usize, Vec<u64>)>> = (0..world)
                .map(|r| {
                    let p = &plans[r];
                    p.send_steps().contains(&t).then(|| {
                        let c = p.send_chunk(t);
                        let place = p.send_place(t);
                        let data: Vec<u64> = (0..p.subs(c))
                            .flat_map(|j| {
                                let b = p.place_bytes(place, c, j);
                                bufs[r].at(place)[b.start / 8..b.end / 8].to_vec()
                            })
                            .collect();
                        (c, data)
                    })
                })
                .collect();
            for r in 0..world {
                let p = plans[r];
                let from = &sent[(r + world - 1) % world];
                if !p.recv_steps().contains(&t) {
                    assert!(
                        from.is_none(),
                        "{kind} step {t}: rank {r} is sent a frame it does not expect"
                    );
                    continue;
                }
                let (c, data) = from
                    .as_ref()
                    .expect("the predecessor sends what this peer receives");
                assert_eq!(*c, p.recv_chunk(t), "{kind} step {t} rank {r}");
                let place = p.out_place(*c);
                let elems = p.chunk(*c);
                if elems.is_empty() {
                    continue;
                }
                let out_base = p.place_bytes(place, *c, 0).start / 8;
                for (k, i) in elems.clone().enumerate() {
                    let mine = match (kind, p.place_len(Place::Src) == count * 8) {
                        (CollKind::Broadcast | CollKind::AllGather, _) => 0,
                        (_, true) => bufs[r].src[i],
                        (_, false) => unreachable!("only an all-gather's input is one chunk"),
                    };
                    bufs[r].at(place)[out_base + k] = match p.recv_kind(t) {
                        RecvKind::Copy => data[k],
                        _ => mine + data[k],
                    };
                }
            }
        }
        bufs
    }

    /// Every kind on every shape: each peer ends with exactly the reference result, and the
    /// ranges nobody should write are untouched.
    #[test]
    fn in_memory_rings_give_every_peer_the_reference_result() {
        for world in 1..7usize {
            for per in [0, 1, 2, 7, 33] {
                for root in 0..world {
                    for kind in [
                        CollKind::AllReduce,
                        CollKind::ReduceScatter,
                        CollKind::AllGather,
                        CollKind::Broadcast,
                        CollKind::Reduce,
                    ] {
                        let count = match kind {
                            CollKind::AllGather | CollKind::ReduceScatter => per * world,
                            _ => per * world + root,
                        };
                        let full = |r: usize| -> Vec<u64> {
                            (0..count).map(|i| (i * 31 + r * 7 + 1) as u64).collect()
                        };
                        let inputs: Vec<Vec<u64>> = (0..world)
                            .map(|r| match kind {
                                CollKind::AllGather => {
                                    (0..per).map(|i| (i * 13 + r * 1000) as u64).collect()
                                }
                                _ => full(r),
                            })
                            .collect();
                        let total: Vec<u64> = (0..count)
                            .map(|i| (0..world).map(|r| full(r)[i]).sum())
                            .collect();
                        let mut bufs = run(kind, root, world, count, &inputs);
                        let what = format!("{kind} world {world} count {count} root {root}");
                        for (r, b) in bufs.iter_mut().enumerate() {
                            let plan = RingPlan::of(kind, root, world, r, count, 8, 24);
                            match kind {
                                CollKind::AllReduce if world == 1 => {}
                                CollKind::AllReduce => assert_eq!(b.dst, total, "{what} rank {r}"),
                                CollKind::ReduceScatter if world > 1 => {
                                    assert_eq!(b.dst, total[plan.chunk(r)], "{what} rank {r}")
                                }
                                CollKind::AllGather => {
                                    // The data plane copies a peer's own input into its slot.
                                    let own = plan.chunk(r);
                                    b.dst[own].copy_from_slice(&inputs[r]);
                                    let all: Vec<u64> = inputs.concat();
                                    assert_eq!(b.dst, all, "{what} rank {r}");
                                }
                                CollKind::Broadcast if r != root => {
                                    assert_eq!(b.dst, inputs[root], "{what} rank {r}")
                                }
                                CollKind::Broadcast => {
                                    assert!(b.dst.iter().all(|&x| x == u64::MAX))
                                }
                                CollKind::Reduce if r == root && world > 1 => {
                                    assert_eq!(b.dst, total, "{what} rank {r}")
                                }
                                CollKind::Reduce => {
                                    assert!(
                                        b.dst.iter().all(|&x| x == u64::MAX),
                                        "{what} rank {r}: dst is the root's alone"
                                    )
                                }
                                _ => {}
                            }
                            assert_eq!(
                                b.src, inputs[r],
                                "{what} rank {r}: the input is never written"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Chains have one send and one receive per peer at most, and the frames of the chain's
    /// last hop are all the root's (reduce) or its predecessor's (broadcast).
    #[test]
    fn chains_run_from_and_to_the_root() {
        for world in 2..7 {
            for root in 0..world {
                let b = RingPlan::of(CollKind::Broadcast, root, world, root, 10, 4, 8);
                assert_eq!((b.send_steps(), b.recv_steps()), (0..1, 0..0));
                let last = RingPlan::of(
                    CollKind::Broadcast,
                    root,
                    world,
                    (root + world - 1) % world,
                    10,
                    4,
                    8,
                );
                assert_eq!(
                    (last.send_steps(), last.recv_steps()),
                    (0..0, world - 2..world - 1)
                );
                let r = RingPlan::of(CollKind::Reduce, root, world, root, 10, 4, 8);
                assert_eq!(
                    (r.send_steps(), r.recv_steps()),
                    (0..0, world - 2..world - 1)
                );
                assert_eq!(r.recv_kind(world - 2), RecvKind::ReduceFinish);
                let first =
                    RingPlan::of(CollKind::Reduce, root, world, (root + 1) % world, 10, 4, 8);
                assert_eq!((first.send_steps(), first.recv_steps()), (0..1, 0..0));
                assert_eq!(first.send_place(0), Place::Src);
            }
        }
    }
}
