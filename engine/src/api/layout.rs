//! How each collective's host buffers map onto the data plane's views: the length checks, which
//! part of an in-place buffer is input and which output, and which calls need a backup (to
//! restore an input on failure) or scratch (for partial sums).
//!
//! | kind | input (`src`) | output (`dst`) | in place | backup | scratch |
//! |---|---|---|---|---|---|
//! | all-reduce | n | n | one buffer | `dst` | — |
//! | broadcast | n (the root's) | n | always: one buffer | — (only the root's is an input, never written) | — |
//! | reduce | n | n on the root; n or 0 elsewhere | one buffer | on the root | off the root |
//! | all-gather | n / world | n | `src` is slot `rank` of `dst` | — (that slot is never written) | — |
//! | reduce-scatter | n | n / world | `dst` is slot `rank` of `src` | that slot | always |

use concord_master::proto::CollKind;

use crate::collective::Spec;
use crate::raw_buf::{Bufs, RawBuf};
use crate::Error;

/// A collective's views, and the pooled buffers it needs besides the caller's.
#[derive(Debug)]
pub(crate) struct Layout {
    /// `backup` and `work` are `None`: the caller attaches the pooled ones.
    pub(crate) bufs: Bufs,
    /// Bytes of backup to attach (in place, where an input range is overwritten).
    pub(crate) backup: Option<usize>,
    /// Bytes of scratch to attach.
    pub(crate) work: Option<usize>,
    /// An out-of-place all-gather's own input and its slot of the output: the caller copies
    /// one into the other while the data plane runs ([`Layout::copy_own_slot`]; nobody else
    /// reads or writes that slot during the collective).
    own_slot: Option<(RawBuf, RawBuf)>,
}

impl Layout {
    /// Copies an out-of-place all-gather's input into this peer's slot of the output (nothing
    /// for the other kinds). Off the data plane's threads: they only send from the input.
    ///
    /// # Safety
    /// The buffers are alive, the input unchanged, and nobody else touches the slot (the data
    /// plane never does: no receive lands in a peer's own chunk).
    pub(crate) unsafe fn copy_own_slot(&self) {
        if let Some((src, slot)) = self.own_slot {
            // SAFETY: the caller's contract; `src` and the slot have the same length (the
            // layout checked `dst = world x src`) and are distinct buffers.
            unsafe {
                slot.slice_mut(0..slot.len)
                    .copy_from_slice(src.slice(0..src.len))
            };
        }
    }
}

/// Lays out a call of `spec.kind` for the peer at `rank` of `world`, `src == None` meaning in
/// place (`dst` then is the one buffer). Fills `spec.count`. Lengths are in bytes.
pub(crate) fn layout(
    spec: &mut Spec,
    rank: usize,
    world: usize,
    src: Option<RawBuf>,
    dst: RawBuf,
) -> Result<Layout, Error> {
    let elem = spec.dtype.size_bytes();
    let call = spec.kind.name();
    fn bad<T>(call: &str, why: String) -> Result<T, Error> {
        Err(Error::InvalidArgument(format!("{call}: {why}")))
    }
    for (what, b) in [("src", src), ("dst", Some(dst))] {
        if let Some(b) = b {
            if !b.len.is_multiple_of(elem) {
                return bad(
                    call,
                    format!(
                        "{what} has {} bytes, not a whole number of {} elements",
                        b.len, spec.dtype
                    ),
                );
            }
        }
    }
    if world == 0 && !matches!(spec.kind, CollKind::AllReduce | CollKind::Barrier) {
        return bad(
            call,
            "this peer is in no ring yet; call update_topology() first".into(),
        );
    }
    if spec.kind.has_root() && spec.root >= world {
        return bad(
            call,
            format!(
                "root rank {} is outside the ring of {world} peers (ranks 0..{world})",
                spec.root
            ),
        );
    }
    let n = |b: RawBuf| b.len / elem;
    let slot = |whole: RawBuf| {
        let len = whole.len / world;
        RawBuf {
            // `rank < world`: the slot lies inside `whole`.
            ptr: whole.ptr.wrapping_add(rank * len),
            len,
        }
    };
    let whole_multiple = |b: RawBuf, what: &str| -> Result<(), Error> {
        if n(b).is_multiple_of(world) {
            Ok(())
        } else {
            bad(
                call,
                format!(
                    "{what} has {} elements, not a multiple of the {world} peers",
                    n(b)
                ),
            )
        }
    };
    let plain = |backup: bool, count: usize| {
        let bufs = Bufs::new(src.unwrap_or(dst), dst, None);
        let layout = Layout {
            bufs,
            backup: backup.then_some(dst.len),
            work: None,
            own_slot: None,
        };
        (layout, count)
    };
    let (layout, count) = match (spec.kind, src) {
        (CollKind::AllReduce, Some(s)) if s.len != dst.len => {
            return bad(
                call,
                format!(
                    "src has {} elements and dst {}: they must match",
                    n(s),
                    n(dst)
                ),
            )
        }
        (CollKind::AllReduce, _) => plain(src.is_none(), n(dst)),
        (CollKind::Barrier, _) => (
            Layout {
                bufs: Bufs::new(dst, dst, None),
                backup: None,
                work: None,
                own_slot: None,
            },
            0,
        ),
        (CollKind::Broadcast, Some(_)) => {
            return bad(call, "a broadcast is in place: pass one buffer".into());
        }
        (CollKind::Broadcast, None) => plain(false, n(dst)),
        (CollKind::Reduce, Some(s)) => {
            let dst_ok = dst.len == s.len || (rank != spec.root && dst.len == 0);
            if !dst_ok {
                return bad(call, format!(
                    "src has {} elements and dst {}: dst must match src (off the root it may also be empty)",
                    n(s),
                    n(dst)
                ));
            }
            let mut l = plain(false, n(s));
            l.0.work = (rank != spec.root).then_some(s.len);
            l
        }
        (CollKind::Reduce, None) => {
            let mut l = plain(rank == spec.root, n(dst));
            l.0.work = (rank != spec.root).then_some(dst.len);
            l
        }
        (CollKind::AllGather, Some(s)) => {
            if s.len * world != dst.len {
                return bad(
                    call,
                    format!(
                        "dst has {} elements; it must hold the {world} peers' {} each ({})",
                        n(dst),
                        n(s),
                        n(s) * world
                    ),
                );
            }
            let mut l = plain(false, n(dst));
            l.0.own_slot = (world > 1).then(|| (s, slot(dst)));
            l
        }
        (CollKind::AllGather, None) => {
            whole_multiple(dst, "the buffer")?;
            (
                Layout {
                    bufs: Bufs::new(slot(dst), dst, None),
                    backup: None,
                    work: None,
                    own_slot: None,
                },
                n(dst),
            )
        }
        (CollKind::ReduceScatter, Some(s)) => {
            if dst.len * world != s.len {
                return bad(
                    call,
                    format!(
                    "src has {} elements; it must hold the {world} peers' slices of {} each ({})",
                    n(s),
                    n(dst),
                    n(dst) * world
                ),
                );
            }
            (
                Layout {
                    bufs: Bufs::new(s, dst, None),
                    backup: None,
                    work: (world > 1).then_some(s.len),
                    own_slot: None,
                },
                n(s),
            )
        }
        (CollKind::ReduceScatter, None) => {
            whole_multiple(dst, "the buffer")?;
            let out = slot(dst);
            (
                Layout {
                    bufs: Bufs::new(dst, out, None),
                    backup: Some(out.len),
                    work: (world > 1).then_some(dst.len),
                    own_slot: None,
                },
                n(dst),
            )
        }
    };
    spec.count = count;
    Ok(layout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use concord_kernels::{DType, ReduceOp};

    fn view(v: &mut [u8]) -> RawBuf {
        RawBuf {
            ptr: v.as_mut_ptr(),
            len: v.len(),
        }
    }

    fn spec(kind: CollKind, root: usize) -> Spec {
        Spec {
            kind,
            root,
            ..Spec::all_reduce(DType::F32, ReduceOp::Sum, 0)
        }
    }

    #[test]
    fn in_place_slices_are_the_ranks_slot() {
        let mut buf = vec![0u8; 48];
        let base = buf.as_mut_ptr();
        let mut s = spec(CollKind::AllGather, 0);
        let l = layout(&mut s, 2, 3, None, view(&mut buf)).unwrap();
        assert_eq!(
            (l.bufs.src.ptr, l.bufs.src.len),
            (base.wrapping_add(32), 16)
        );
        assert_eq!((s.count, l.backup, l.work), (12, None, None));
        let mut s = spec(CollKind::ReduceScatter, 0);
        let l = layout(&mut s, 1, 3, None, view(&mut buf)).unwrap();
        assert_eq!(
            (l.bufs.dst.ptr, l.bufs.dst.len),
            (base.wrapping_add(16), 16)
        );
        assert_eq!((s.count, l.backup, l.work), (12, Some(16), Some(48)));
    }

    #[test]
    fn wrong_shapes_are_refused_naming_what_is_expected() {
        let (mut a, mut b) = (vec![0u8; 12], vec![0u8; 24]);
        let e = layout(
            &mut spec(CollKind::AllGather, 0),
            0,
            3,
            Some(view(&mut a)),
            view(&mut b),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("all_gather") && e.contains("(9)"), "{e}");
        let e = layout(&mut spec(CollKind::Broadcast, 3), 0, 3, None, view(&mut b))
            .unwrap_err()
            .to_string();
        assert!(e.contains("root rank 3 is outside the ring of 3"), "{e}");
        let e = layout(
            &mut spec(CollKind::ReduceScatter, 0),
            0,
            4,
            None,
            view(&mut a),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("not a multiple of the 4 peers"), "{e}");
        // Off the root a reduce's output may be empty; on it, it may not.
        let mut empty = Vec::new();
        assert!(layout(
            &mut spec(CollKind::Reduce, 1),
            0,
            2,
            Some(view(&mut a)),
            view(&mut empty)
        )
        .is_ok());
        assert!(layout(
            &mut spec(CollKind::Reduce, 0),
            0,
            2,
            Some(view(&mut a)),
            view(&mut empty)
        )
        .is_err());
    }
}
