//! The ring all-reduce schedule, as pure functions of (rank, world, count).
//!
//! The buffer is split into `world` contiguous chunks, the first `count % world` one element
//! longer. Over `2 (world - 1)` steps `t`, a peer sends chunk `(rank - t) mod world` to its
//! successor and receives chunk `(rank - t - 1) mod world` from its predecessor:
//! - steps `t < world - 1` are the reduce-scatter: the received chunk is reduced with the peer's
//!   own input (`dst = src op received`); on the last of them the peer holds the final value of
//!   chunk `(rank + 1) mod world`, which it finishes (divides, for `avg`);
//! - the remaining steps are the all-gather: received chunks are copied.
//!
//! What a peer sends at step `t >= 1` is exactly what it received at step `t - 1`, so sends can
//! start sub-chunk by sub-chunk as soon as the matching received sub-chunk is reduced: receiving,
//! reducing and sending overlap, with no barrier between steps. Each final chunk is computed once,
//! by its owner, and copied everywhere else, so every peer ends with the same bits.

use std::ops::Range;

/// The schedule of one ring all-reduce on one peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingPlan {
    /// Ring size.
    pub world: usize,
    /// This peer's position in the ring.
    pub rank: usize,
    /// Elements in the buffer.
    pub count: usize,
    /// Bytes per element.
    pub elem_bytes: usize,
    /// Elements per sub-chunk (the unit of pipelining and of one frame).
    pub sub_elems: usize,
}

/// What a step does with the chunk it receives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecvKind {
    /// `dst = src op received`.
    Reduce,
    /// `dst = finish(src op received)`: the last reduce-scatter step.
    ReduceFinish,
    /// `dst = received`.
    Copy,
}

impl RingPlan {
    /// A plan; `sub_bytes` is rounded down to whole elements (at least one).
    pub fn new(
        world: usize,
        rank: usize,
        count: usize,
        elem_bytes: usize,
        sub_bytes: usize,
    ) -> Self {
        assert!(world >= 1 && rank < world && elem_bytes >= 1);
        RingPlan {
            world,
            rank,
            count,
            elem_bytes,
            sub_elems: (sub_bytes / elem_bytes).max(1),
        }
    }

    /// Number of steps.
    pub fn steps(&self) -> usize {
        2 * (self.world - 1)
    }

    /// Element range of chunk `c`.
    pub fn chunk(&self, c: usize) -> Range<usize> {
        let (base, extra) = (self.count / self.world, self.count % self.world);
        let start = c * base + c.min(extra);
        start..start + base + usize::from(c < extra)
    }

    fn wrap(&self, x: isize) -> usize {
        x.rem_euclid(self.world as isize) as usize
    }

    /// Byte range in the buffer of chunk `c`.
    pub fn chunk_bytes(&self, c: usize) -> Range<usize> {
        let elems = self.chunk(c);
        elems.start * self.elem_bytes..elems.end * self.elem_bytes
    }

    /// Chunk sent at step `t`.
    pub fn send_chunk(&self, t: usize) -> usize {
        self.wrap(self.rank as isize - t as isize)
    }

    /// Chunk received at step `t`.
    pub fn recv_chunk(&self, t: usize) -> usize {
        self.wrap(self.rank as isize - t as isize - 1)
    }

    /// What step `t` does with what it receives.
    pub fn recv_kind(&self, t: usize) -> RecvKind {
        if t + 2 == self.world {
            RecvKind::ReduceFinish
        } else if t + 1 < self.world {
            RecvKind::Reduce
        } else {
            RecvKind::Copy
        }
    }

    /// The chunk this peer finishes (owns) at the end of the reduce-scatter.
    pub fn owned_chunk(&self) -> usize {
        (self.rank + 1) % self.world
    }

    /// Number of sub-chunks of chunk `c`.
    pub fn subs(&self, c: usize) -> usize {
        self.chunk(c).len().div_ceil(self.sub_elems)
    }

    /// Byte range in the buffer of sub-chunk `j` of chunk `c`.
    pub fn sub_bytes(&self, c: usize, j: usize) -> Range<usize> {
        let chunk = self.chunk(c);
        let start = chunk.start + j * self.sub_elems;
        let end = (start + self.sub_elems).min(chunk.end);
        debug_assert!(start < end, "sub-chunk {j} of chunk {c} is empty");
        start * self.elem_bytes..end * self.elem_bytes
    }

    /// Sub-chunks received before step `t` (prefix sums of the receive order).
    pub fn recv_subs_before(&self, t: usize) -> usize {
        (0..t).map(|u| self.subs(self.recv_chunk(u))).sum()
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

    /// Runs the schedule across `world` in-memory peers with integer sums and checks every peer
    /// ends with the exact total, for many shapes: the schedule alone, with no I/O.
    #[test]
    fn in_memory_ring_gives_every_peer_the_full_sum() {
        for world in 1..7usize {
            for count in [0, 1, world.saturating_sub(1), 13, 97, 1000] {
                let inputs: Vec<Vec<u64>> = (0..world)
                    .map(|r| (0..count).map(|i| (i * 31 + r * 7 + 1) as u64).collect())
                    .collect();
                let mut dst = vec![vec![0u64; count]; world];
                let plans: Vec<RingPlan> = (0..world)
                    .map(|r| RingPlan::new(world, r, count, 8, 24))
                    .collect();
                for t in 0..plans.first().map_or(0, |p| p.steps()) {
                    // Everyone sends first (from src at t = 0, from dst after), then receives.
                    let sent: Vec<Vec<u64>> = (0..world)
                        .map(|r| {
                            let range = plans[r].chunk(plans[r].send_chunk(t));
                            if t == 0 {
                                inputs[r][range].to_vec()
                            } else {
                                dst[r][range].to_vec()
                            }
                        })
                        .collect();
                    for r in 0..world {
                        let from = &sent[(r + world - 1) % world];
                        let range = plans[r].chunk(plans[r].recv_chunk(t));
                        for (k, i) in range.clone().enumerate() {
                            dst[r][i] = match plans[r].recv_kind(t) {
                                RecvKind::Copy => from[k],
                                _ => inputs[r][i] + from[k],
                            };
                        }
                    }
                }
                if world == 1 {
                    dst[0].clone_from(&inputs[0]);
                }
                let total: Vec<u64> = (0..count)
                    .map(|i| inputs.iter().map(|v| v[i]).sum())
                    .collect();
                for (r, d) in dst.iter().enumerate() {
                    assert_eq!(d, &total, "world {world} count {count} rank {r}");
                }
            }
        }
    }
}
