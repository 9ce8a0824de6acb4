//! Runs one ring all-reduce over a peer's [`Links`]: the I/O shell around [`RingPlan`].
//!
//! Two threads per operation: the calling thread receives and reduces, a scoped sender thread
//! streams sub-chunks to the successor. The sender of step `t >= 1` may send sub-chunk `j` as
//! soon as the receiver has reduced sub-chunk `j` of step `t - 1` (a release/acquire counter of
//! received sub-chunks; the sender parks while it waits, never spins). Sub-chunk `k` of the
//! operation travels on connection `k % conns`, on both ends, so the pool is striped in order.
//!
//! On any error either thread tears the links down, which wakes the other from its blocking
//! read or write; the caller reports the failure to the master, which aborts the operation for
//! every peer.

use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use concord_kernels::{DType, ReduceOp};
use concord_transport::frame::{DataHeader, HEADER_BYTES};
use concord_transport::socket::{discard, read_header, write_frame};

use super::ring::{RecvKind, RingPlan};
use crate::links::Links;

/// Bytes moved by one operation on this peer (headers included).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Bytes written to the successor.
    pub bytes_sent: u64,
    /// Bytes read from the predecessor.
    pub bytes_received: u64,
}

/// Identifies the attempt on the wire.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Attempt {
    pub(crate) tag: u64,
    pub(crate) seq: u64,
    pub(crate) dtype: DType,
    pub(crate) op: ReduceOp,
}

/// `dst` shared by the receiving thread (which writes sub-chunks) and the sending thread (which
/// reads sub-chunks the receiver has finished).
#[derive(Clone, Copy)]
struct SharedDst {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the pointer is only dereferenced for disjoint sub-ranges, handed from the receiver to
// the sender through the `received` counter (release on store, acquire on load); see `run`.
unsafe impl Send for SharedDst {}
// SAFETY: as above; `&SharedDst` only gives out the raw pointer.
unsafe impl Sync for SharedDst {}

impl SharedDst {
    /// # Safety
    /// No other thread may access `range` of the buffer while the slice lives.
    unsafe fn slice_mut(&self, range: std::ops::Range<usize>) -> &mut [u8] {
        assert!(range.start <= range.end && range.end <= self.len);
        // SAFETY: in bounds (checked above); exclusivity is the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.len()) }
    }

    /// # Safety
    /// No thread may write `range` of the buffer while the slice lives.
    unsafe fn slice(&self, range: std::ops::Range<usize>) -> &[u8] {
        assert!(range.start <= range.end && range.end <= self.len);
        // SAFETY: in bounds (checked above); no concurrent writer is the caller's promise.
        unsafe { std::slice::from_raw_parts(self.ptr.add(range.start), range.len()) }
    }
}

/// Runs the all-reduce: `dst = reduce over the ring of every peer's src`. `src` and `dst` have
/// the same length; `staging` holds at least one sub-chunk.
pub(crate) fn run(
    links: &Links,
    plan: &RingPlan,
    attempt: Attempt,
    src: &[u8],
    dst: &mut [u8],
    staging: &mut [u8],
) -> Result<Traffic, String> {
    assert_eq!(src.len(), dst.len());
    assert_eq!(src.len(), plan.count * plan.elem_bytes);
    if plan.steps() == 0 {
        dst.copy_from_slice(src);
        concord_kernels::finish(dst, attempt.dtype, attempt.op, 1).map_err(|e| e.to_string())?;
        return Ok(Traffic::default());
    }
    assert!(
        !links.next.is_empty() && !links.prev.is_empty(),
        "a ring of two or more has links"
    );
    let received = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let shared = SharedDst {
        ptr: dst.as_mut_ptr(),
        len: dst.len(),
    };
    // prefix[t] = sub-chunks received before step t.
    let prefix: Vec<usize> = (0..=plan.steps())
        .map(|t| plan.recv_subs_before(t))
        .collect();

    std::thread::scope(|s| {
        let sender = std::thread::Builder::new()
            .name("concord-ring-tx".into())
            .spawn_scoped(s, || {
                let r = send_all(
                    links, plan, attempt, src, shared, &prefix, &received, &failed,
                );
                if r.is_err() {
                    failed.store(true, Ordering::Release);
                    links.shutdown();
                }
                r
            })
            .map_err(|e| format!("spawning the ring sender: {e}"))?;
        let received_result = recv_all(
            links,
            plan,
            attempt,
            src,
            shared,
            staging,
            &received,
            &failed,
            sender.thread(),
        );
        if received_result.is_err() {
            failed.store(true, Ordering::Release);
            links.shutdown();
            sender.thread().unpark();
        }
        let sent = sender
            .join()
            .unwrap_or_else(|_| Err("the ring sender panicked".into()));
        match (sent, received_result) {
            (Ok(sent), Ok(recv)) => Ok(Traffic {
                bytes_sent: sent,
                bytes_received: recv,
            }),
            // Report the first cause: an error seen after the other side tore the links down
            // says less than the one that did.
            (Err(e), Ok(_)) | (Ok(_), Err(e)) => Err(e),
            (Err(se), Err(re)) => Err(if se.contains("aborted") { re } else { se }),
        }
    })
}

#[allow(clippy::too_many_arguments)]
fn send_all(
    links: &Links,
    plan: &RingPlan,
    attempt: Attempt,
    src: &[u8],
    dst: SharedDst,
    prefix: &[usize],
    received: &AtomicUsize,
    failed: &AtomicBool,
) -> Result<u64, String> {
    let mut k = 0usize;
    let mut bytes = 0u64;
    for t in 0..plan.steps() {
        let c = plan.send_chunk(t);
        for j in 0..plan.subs(c) {
            let range = plan.sub_bytes(c, j);
            let payload: &[u8] = if t == 0 {
                &src[range]
            } else {
                let need = prefix[t - 1] + j + 1;
                while received.load(Ordering::Acquire) < need {
                    if failed.load(Ordering::Acquire) {
                        return Err("aborted".into());
                    }
                    std::thread::park();
                }
                // SAFETY: the receiver finished writing this range (counter acquired above) and
                // will not write it again before this write returns: the next write of the range
                // is in the all-gather, and needs data that only exists after the successor got
                // these bytes (ring.rs).
                unsafe { dst.slice(range) }
            };
            let header = DataHeader {
                len: payload.len() as u32,
                tag: attempt.tag,
                seq: attempt.seq,
                step: t as u32,
                sub: j as u32,
            };
            let mut stream = &links.next[k % links.next.len()];
            write_frame(&mut stream, &header, payload)
                .map_err(|e| format!("sending to ring successor {}: {e}", links.next_id))?;
            bytes += (HEADER_BYTES + payload.len()) as u64;
            k += 1;
        }
    }
    Ok(bytes)
}

#[allow(clippy::too_many_arguments)]
fn recv_all(
    links: &Links,
    plan: &RingPlan,
    attempt: Attempt,
    src: &[u8],
    dst: SharedDst,
    staging: &mut [u8],
    received: &AtomicUsize,
    failed: &AtomicBool,
    sender: &std::thread::Thread,
) -> Result<u64, String> {
    let from = links.prev_id;
    let mut k = 0usize;
    let mut bytes = 0u64;
    for t in 0..plan.steps() {
        let c = plan.recv_chunk(t);
        let kind = plan.recv_kind(t);
        for j in 0..plan.subs(c) {
            if failed.load(Ordering::Acquire) {
                return Err("aborted".into());
            }
            let range = plan.sub_bytes(c, j);
            let mut stream = &links.prev[k % links.prev.len()];
            let header = loop {
                let h = read_header(&mut stream)
                    .map_err(|e| format!("receiving from ring predecessor {from}: {e}"))?;
                if h.seq < attempt.seq {
                    // A leftover of an aborted attempt: drop it.
                    discard(&mut stream, h.len as usize)
                        .map_err(|e| format!("receiving from ring predecessor {from}: {e}"))?;
                    continue;
                }
                break h;
            };
            let expected = DataHeader {
                len: range.len() as u32,
                tag: attempt.tag,
                seq: attempt.seq,
                step: t as u32,
                sub: j as u32,
            };
            if header != expected {
                return Err(format!(
                    "ring predecessor {from} sent frame {header:?}, expected {expected:?}"
                ));
            }
            // SAFETY: this thread is the only writer of dst; the sender reads this range only
            // after the counter below says it is done, and no longer reads its previous contents
            // (it sent them at an earlier step, whose write returned before this data existed).
            let out = unsafe { dst.slice_mut(range.clone()) };
            let read_err =
                |e: std::io::Error| format!("receiving from ring predecessor {from}: {e}");
            match kind {
                RecvKind::Copy => stream.read_exact(out).map_err(read_err)?,
                RecvKind::Reduce | RecvKind::ReduceFinish => {
                    let staged = &mut staging[..range.len()];
                    stream.read_exact(staged).map_err(read_err)?;
                    let mine = &src[range.clone()];
                    let r = if kind == RecvKind::Reduce {
                        concord_kernels::reduce_out(out, mine, staged, attempt.dtype, attempt.op)
                    } else {
                        concord_kernels::reduce_out_finish(
                            out,
                            mine,
                            staged,
                            attempt.dtype,
                            attempt.op,
                            plan.world,
                        )
                    };
                    r.map_err(|e| e.to_string())?;
                }
            }
            bytes += (HEADER_BYTES + range.len()) as u64;
            k += 1;
            received.store(k, Ordering::Release);
            sender.unpark();
        }
    }
    Ok(bytes)
}
