//! What one iteration of `concord bench --coll KIND` puts in, calls and expects, per collective,
//! following nccl-tests: the size is the whole buffer (an all-gather's output, a
//! reduce-scatter's input), and the bus bandwidth factor is nccl-tests' for the collective.

use concord::verify as check;
use concord::{CollKind, Communicator, Error, ReduceInfo};

use super::BenchArgs;

/// Poison written over outputs before a checked iteration, so that a stale result cannot pass.
const POISON: u8 = 0xA5;

/// One collective of one row, on one peer.
#[derive(Clone, Copy, Debug)]
pub(super) struct Shape {
    pub(super) kind: CollKind,
    root: usize,
    rank: usize,
    world: usize,
    /// Bytes of the whole buffer.
    pub(super) bytes: usize,
    in_place: bool,
}

/// The row's bytes for a requested `size`: whole elements, and for an all-gather or a
/// reduce-scatter a whole number of them per peer (as nccl-tests rounds).
pub(super) fn row_bytes(kind: CollKind, size: usize, elem: usize, world: usize) -> usize {
    let unit = match kind {
        CollKind::AllGather | CollKind::ReduceScatter => elem * world,
        CollKind::Barrier => return 0,
        _ => elem,
    };
    size / unit * unit
}

/// nccl-tests' bus bandwidth factor: what each link carries relative to the buffer.
pub(super) fn bus_factor(kind: CollKind, world: usize) -> f64 {
    let n = world as f64;
    match kind {
        CollKind::AllReduce => 2.0 * (n - 1.0) / n,
        CollKind::AllGather | CollKind::ReduceScatter => (n - 1.0) / n,
        CollKind::Broadcast | CollKind::Reduce => 1.0,
        CollKind::Barrier => 0.0,
    }
}

impl Shape {
    pub(super) fn new(args: &BenchArgs, rank: usize, world: usize, bytes: usize) -> Self {
        Shape {
            kind: args.coll,
            root: args.root,
            rank,
            world,
            bytes,
            in_place: args.in_place,
        }
    }

    /// Bytes of one peer's slot (an all-gather's input, a reduce-scatter's output).
    fn slot(&self) -> usize {
        self.bytes / self.world
    }

    /// The slot of rank `r` within the whole buffer.
    fn slot_of(&self, r: usize) -> std::ops::Range<usize> {
        r * self.slot()..(r + 1) * self.slot()
    }

    /// Sets this peer's inputs for iteration `iter` (`fresh`: refill and poison the outputs;
    /// else only redo what the last call overwrote of an in-place input).
    pub(super) fn prepare(
        &self,
        args: &BenchArgs,
        iter: u64,
        fresh: bool,
        src: &mut [u8],
        dst: &mut [u8],
    ) {
        let (dtype, op, rank) = (args.dtype, args.op, self.rank);
        let src_len = match self.kind {
            CollKind::AllGather => self.slot(),
            CollKind::Broadcast | CollKind::Barrier => 0,
            _ => self.bytes,
        };
        if fresh {
            check::fill(dtype, op, rank, iter, &mut src[..src_len]);
            dst[..self.bytes].fill(POISON);
        }
        let buf = &mut dst[..self.bytes];
        match (self.kind, self.in_place) {
            // The root's buffer is never written: refilled only when fresh.
            (CollKind::Broadcast, _) if rank == self.root && fresh => {
                check::fill(dtype, op, rank, iter, buf)
            }
            (CollKind::AllGather, true) => {
                let own = self.slot_of(rank);
                buf[own].copy_from_slice(&src[..src_len]);
            }
            (CollKind::AllReduce | CollKind::Reduce | CollKind::ReduceScatter, true) => {
                buf.copy_from_slice(&src[..src_len])
            }
            _ => {}
        }
    }

    /// Runs the collective on the buffers `prepare` set.
    pub(super) fn call(
        &self,
        comm: &Communicator,
        args: &BenchArgs,
        src: &[u8],
        dst: &mut [u8],
        tag: u64,
    ) -> Result<ReduceInfo, Error> {
        let (dtype, op, root, n) = (args.dtype, args.op, self.root, self.bytes);
        let in_place = self.in_place;
        match self.kind {
            CollKind::AllReduce if in_place => {
                comm.all_reduce_raw(None, &mut dst[..n], dtype, op, tag, None)
            }
            CollKind::AllReduce => {
                comm.all_reduce_raw(Some(&src[..n]), &mut dst[..n], dtype, op, tag, None)
            }
            CollKind::Broadcast => comm.broadcast_raw(&mut dst[..n], dtype, root, tag, None),
            CollKind::Reduce if in_place => {
                comm.reduce_raw(None, &mut dst[..n], dtype, op, root, tag, None)
            }
            CollKind::Reduce => {
                comm.reduce_raw(Some(&src[..n]), &mut dst[..n], dtype, op, root, tag, None)
            }
            CollKind::AllGather if in_place => {
                comm.all_gather_raw(None, &mut dst[..n], dtype, tag, None)
            }
            CollKind::AllGather => {
                comm.all_gather_raw(Some(&src[..self.slot()]), &mut dst[..n], dtype, tag, None)
            }
            CollKind::ReduceScatter if in_place => {
                comm.reduce_scatter_raw(None, &mut dst[..n], dtype, op, tag, None)
            }
            CollKind::ReduceScatter => comm.reduce_scatter_raw(
                Some(&src[..n]),
                &mut dst[..self.slot()],
                dtype,
                op,
                tag,
                None,
            ),
            CollKind::Barrier => comm.barrier(tag),
        }
    }

    /// The elements of this peer's output that differ from what the collective must give
    /// (every output byte this peer has: untouched ones included), for iteration `iter`.
    pub(super) fn wrong(&self, args: &BenchArgs, iter: u64, dst: &[u8], want: &mut Vec<u8>) -> u64 {
        let (dtype, op, rank, world) = (args.dtype, args.op, self.rank, self.world);
        want.clear();
        want.resize(self.bytes, POISON);
        let out_len = match (self.kind, self.in_place) {
            (CollKind::ReduceScatter, false) => self.slot(),
            (CollKind::Barrier, _) => 0,
            _ => self.bytes,
        };
        match (self.kind, self.in_place) {
            (CollKind::AllReduce, _) => check::reference(dtype, op, world, iter, want),
            (CollKind::Broadcast, _) => check::fill(dtype, op, self.root, iter, want),
            (CollKind::Reduce, _) if rank == self.root => {
                check::reference(dtype, op, world, iter, want)
            }
            // Off the root the output is untouched: the poison, or in place the input.
            (CollKind::Reduce, false) => {}
            (CollKind::Reduce, true) => check::fill(dtype, op, rank, iter, want),
            (CollKind::AllGather, _) => {
                for r in 0..world {
                    check::fill(dtype, op, r, iter, &mut want[self.slot_of(r)]);
                }
            }
            (CollKind::ReduceScatter, in_place) => {
                let mut total = vec![0u8; self.bytes];
                check::reference(dtype, op, world, iter, &mut total);
                let own = self.slot_of(rank);
                if in_place {
                    // The other slots keep the input.
                    check::fill(dtype, op, rank, iter, want);
                    want[own.clone()].copy_from_slice(&total[own]);
                } else {
                    want.truncate(out_len);
                    want.copy_from_slice(&total[own]);
                }
            }
            (CollKind::Barrier, _) => {}
        }
        check::count_wrong(dtype, &dst[..out_len], &want[..out_len])
    }
}
