//! How large a collective's sub-chunks are: the unit of pipelining and of one frame.

/// Sub-chunks per ring step that a small collective is cut into, so that receiving, reducing
/// and sending still overlap within each step (a step of one sub-chunk cannot). Three keeps
/// such collectives on one connection (striping starts at
/// `plane::attempt::STRIPE_MIN_SENDS_PER_STEP`, four), which is faster at these sizes. Measured
/// with `concord bench --local 2 -b 1M -e 1M -n 300`, three interleaved rounds: 668-758 us
/// against 735-885 us with one 512 KiB sub-chunk per step, 809-932 us with four (striped).
const SMALL_SUBS_PER_STEP: usize = 3;

/// The smallest sub-chunk that cutting a small collective produces: below it, per-frame costs
/// outweigh the overlap.
const MIN_SMALL_SUB_BYTES: usize = 64 << 10;

/// The sub-chunk size of a collective of `count` elements of `elem_bytes` on a ring of
/// `world`: the configured size, or less where a ring step's chunk would be fewer than
/// [`SMALL_SUBS_PER_STEP`] sub-chunks (never under [`MIN_SMALL_SUB_BYTES`]). Every peer computes
/// the same from the same inputs.
pub(crate) fn sub_bytes_for(
    count: usize,
    elem_bytes: usize,
    world: usize,
    configured: usize,
) -> usize {
    let chunk_elems = count.div_ceil(world.max(1));
    let sub_elems = chunk_elems
        .div_ceil(SMALL_SUBS_PER_STEP)
        .max(MIN_SMALL_SUB_BYTES.div_ceil(elem_bytes));
    (sub_elems * elem_bytes).min(configured)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::ring::RingPlan;

    #[test]
    fn small_collectives_are_cut_into_three_sub_chunks_per_step() {
        let plan = |count: usize, elem: usize, world: usize| {
            RingPlan::new(
                world,
                0,
                count,
                elem,
                sub_bytes_for(count, elem, world, 512 << 10),
            )
        };
        // 1 MiB of f32 on 2 peers: 512 KiB chunks in three sub-chunks, not one.
        let p = plan(1 << 18, 4, 2);
        assert!((0..2).all(|c| p.subs(c) == 3), "{p:?}");
        // Uneven chunks and odd element sizes never give a fourth (striped) sub-chunk.
        for (count, elem, world) in [(1_000_003, 4, 3), (777_777, 2, 4), (123_457, 8, 2)] {
            let p = plan(count, elem, world);
            assert!(
                (0..world).all(|c| (1..=3).contains(&p.subs(c))),
                "{count} {elem} {world}: {p:?}"
            );
        }
        // Large collectives keep the configured size; tiny ones are one sub-chunk.
        assert_eq!(sub_bytes_for(64 << 20, 1, 2, 512 << 10), 512 << 10);
        assert_eq!(plan(1024, 4, 2).subs(0), 1);
        // Never below the floor.
        assert_eq!(sub_bytes_for(3 << 16, 1, 2, 512 << 10), MIN_SMALL_SUB_BYTES);
    }
}
