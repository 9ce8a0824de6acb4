//! The path every blocking host collective takes (lay out, attach pooled backup and scratch,
//! launch, wait), and the barrier.

use std::time::Duration;

use super::communicator::Communicator;
use super::layout::layout;
use crate::collective::Spec;
use crate::raw_buf::RawBuf;
use crate::results::ReduceInfo;
use crate::Error;

/// A raw view of a vector's bytes (its heap memory, which does not move while it is not resized).
pub(super) fn raw_vec(v: &mut [u8]) -> RawBuf {
    RawBuf {
        ptr: v.as_mut_ptr(),
        len: v.len(),
    }
}

impl Communicator {
    /// Blocks until every peer has reached the same barrier (the same `tag`): nothing moves but
    /// the vote, which the master answers once every member of the group has cast it.
    pub fn barrier(&self, tag: u64) -> Result<ReduceInfo, Error> {
        let spec = Spec {
            kind: crate::CollKind::Barrier,
            ..Spec::all_reduce(crate::DType::U8, crate::ReduceOp::Sum, 0)
        };
        self.run_host(spec, None, &mut [], tag, None)
    }

    /// Runs a host collective and blocks until it is over: `src == None` means in place (`dst`
    /// is then the one buffer; see `layout.rs` for what each kind reads and writes).
    pub(super) fn run_host(
        &self,
        mut spec: Spec,
        src: Option<&[u8]>,
        dst: &mut [u8],
        tag: u64,
        timeout: Option<Duration>,
    ) -> Result<ReduceInfo, Error> {
        let timeout = timeout.unwrap_or(self.inner.config.op_timeout);
        let (rank, world) = self.inner.position();
        let src = src.map(|s| RawBuf {
            ptr: s.as_ptr() as *mut u8,
            len: s.len(),
        });
        let l = layout(&mut spec, rank, world, src, raw_vec(dst))?;
        // In place, each range's original is saved to a pooled backup just before the data
        // plane first writes it, and put back if the collective fails.
        let mut backup = l.backup.map(|n| self.inner.take_backup(n));
        let mut work = l.work.map(|n| self.inner.take_backup(n));
        let mut bufs = l.bufs;
        let l = &l;
        bufs.backup = backup.as_deref_mut().map(raw_vec);
        bufs.work = work.as_deref_mut().map(raw_vec);
        // SAFETY: the caller's buffers are borrowed for this whole call and the pooled ones are
        // owned by it; it returns only through `complete`, after the data plane released them
        // (and restored an in-place input on failure), or when the launch failed.
        let result = unsafe { self.inner.launch(spec, bufs, None, tag, timeout) }.and_then(|()| {
            // SAFETY: the buffers are borrowed for this call; the data plane never touches an
            // all-gather's own slot of the output.
            unsafe { l.copy_own_slot() };
            self.inner.complete(tag)
        });
        for b in [backup, work].into_iter().flatten() {
            self.inner.give_backup(b);
        }
        result
    }
}
