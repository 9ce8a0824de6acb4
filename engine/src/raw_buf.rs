//! A raw view of a caller's buffer, shared by the threads of one collective.
//!
//! The bottom of the engine: the data plane, the device pipeline and the API all name it, and it
//! names nothing of theirs.

/// A raw view of a buffer that outlives the operation (its owner waits for `busy == 0` before
/// reusing it; see [`Attempt::retire_and_wait`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct RawBuf {
    pub(crate) ptr: *mut u8,
    pub(crate) len: usize,
}

// SAFETY: a RawBuf is only dereferenced inside an `Attempt::enter` guard, for disjoint ranges handed
// between threads by the release/acquire flags of `Attempt`; the owner keeps the memory alive and
// untouched until the operation is retired and idle.
unsafe impl Send for RawBuf {}
// SAFETY: as above.
unsafe impl Sync for RawBuf {}

impl RawBuf {
    /// # Safety
    /// The range must be in bounds of a live buffer that nobody writes while the slice lives.
    pub(crate) unsafe fn slice(&self, range: std::ops::Range<usize>) -> &[u8] {
        assert!(range.start <= range.end && range.end <= self.len);
        // SAFETY: bounds checked above; liveness and absence of writers are the caller's promise.
        unsafe { std::slice::from_raw_parts(self.ptr.add(range.start), range.len()) }
    }

    /// # Safety
    /// The range must be in bounds of a live buffer that no other thread accesses while the slice
    /// lives.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice_mut(&self, range: std::ops::Range<usize>) -> &mut [u8] {
        assert!(range.start <= range.end && range.end <= self.len);
        // SAFETY: bounds checked above; exclusivity is the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.len()) }
    }
}

/// The buffers of one collective, as the data plane reaches them.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bufs {
    /// The input (the whole buffer, or this peer's chunk for an all-gather).
    pub(crate) src: RawBuf,
    /// The output (the whole buffer, or this peer's chunk for a reduce-scatter); `src` itself,
    /// or overlapping it, in place.
    pub(crate) dst: RawBuf,
    /// In place: where each range of `dst` that overlaps the input saves its original before
    /// its first write (as long as `dst`).
    pub(crate) backup: Option<RawBuf>,
    /// Scratch as long as the whole buffer, for partial sums that are sent on and not kept (a
    /// reduce-scatter; a reduce, off the root).
    pub(crate) work: Option<RawBuf>,
}

impl Bufs {
    /// Out of place (`backup: None`) or in place (`src` is `dst`), with no scratch.
    pub(crate) fn new(src: RawBuf, dst: RawBuf, backup: Option<RawBuf>) -> Self {
        Bufs {
            src,
            dst,
            backup,
            work: None,
        }
    }
}
