//! Process-wide counters of the io_uring backend, so that tests and benchmarks can prove that
//! io_uring, not the socket fallback, carried the data.

use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of the io_uring backend's counters, summed over every [`UringStream`] of the
/// process since it started. Take one before and one after, and subtract with [`UringStats::since`].
///
/// [`UringStream`]: super::UringStream
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct UringStats {
    /// `io_uring_enter(2)` calls (each submits and/or waits).
    pub enters: u64,
    /// Submission queue entries handed to the kernel (operations, plus linked timeouts where
    /// the kernel cannot time a wait, plus the cancels of timed-out operations).
    pub sqes: u64,
    /// Payload and header bytes the kernel reported sent.
    pub bytes_sent: u64,
    /// Bytes the kernel reported received.
    pub bytes_received: u64,
    /// Send completions that moved fewer bytes than asked, so that the remainder was resubmitted.
    pub short_sends: u64,
    /// Receive completions that moved fewer bytes than asked.
    pub short_recvs: u64,
    /// Zero-copy sends (`IORING_OP_SENDMSG_ZC`) completed.
    pub zc_sends: u64,
    /// Zero-copy sends whose notification said the kernel copied the data after all
    /// (always the case over loopback).
    pub zc_copied: u64,
    /// Receives that went into a registered buffer (`IORING_OP_READ_FIXED`).
    pub fixed_reads: u64,
    /// Operations that made no progress within the I/O timeout (and were cancelled).
    pub timeouts: u64,
    /// Bytes of small frames sent by a plain non-blocking `sendmsg(2)` instead of the ring
    /// (see [`DIRECT_MAX_BYTES`](super::DIRECT_MAX_BYTES)); not in `bytes_sent`.
    pub direct_bytes_sent: u64,
    /// Bytes of small reads taken by a plain non-blocking `recv(2)` instead of the ring; not in
    /// `bytes_received`.
    pub direct_bytes_received: u64,
}

impl UringStats {
    /// What happened between `earlier` and `self` (field-wise difference).
    pub fn since(&self, earlier: &UringStats) -> UringStats {
        UringStats {
            enters: self.enters - earlier.enters,
            sqes: self.sqes - earlier.sqes,
            bytes_sent: self.bytes_sent - earlier.bytes_sent,
            bytes_received: self.bytes_received - earlier.bytes_received,
            short_sends: self.short_sends - earlier.short_sends,
            short_recvs: self.short_recvs - earlier.short_recvs,
            zc_sends: self.zc_sends - earlier.zc_sends,
            zc_copied: self.zc_copied - earlier.zc_copied,
            fixed_reads: self.fixed_reads - earlier.fixed_reads,
            timeouts: self.timeouts - earlier.timeouts,
            direct_bytes_sent: self.direct_bytes_sent - earlier.direct_bytes_sent,
            direct_bytes_received: self.direct_bytes_received - earlier.direct_bytes_received,
        }
    }
}

/// The live counters. Relaxed ordering: they are statistics, never used to synchronise.
pub(crate) struct Counters {
    pub(crate) enters: AtomicU64,
    pub(crate) sqes: AtomicU64,
    pub(crate) bytes_sent: AtomicU64,
    pub(crate) bytes_received: AtomicU64,
    pub(crate) short_sends: AtomicU64,
    pub(crate) short_recvs: AtomicU64,
    pub(crate) zc_sends: AtomicU64,
    pub(crate) zc_copied: AtomicU64,
    pub(crate) fixed_reads: AtomicU64,
    pub(crate) timeouts: AtomicU64,
    pub(crate) direct_bytes_sent: AtomicU64,
    pub(crate) direct_bytes_received: AtomicU64,
}

pub(crate) static COUNTERS: Counters = Counters {
    enters: AtomicU64::new(0),
    sqes: AtomicU64::new(0),
    bytes_sent: AtomicU64::new(0),
    bytes_received: AtomicU64::new(0),
    short_sends: AtomicU64::new(0),
    short_recvs: AtomicU64::new(0),
    zc_sends: AtomicU64::new(0),
    zc_copied: AtomicU64::new(0),
    fixed_reads: AtomicU64::new(0),
    timeouts: AtomicU64::new(0),
    direct_bytes_sent: AtomicU64::new(0),
    direct_bytes_received: AtomicU64::new(0),
};

/// Adds `n` to a counter.
pub(crate) fn bump(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// Reads every counter of the io_uring backend (process-wide, monotonic).
pub fn uring_stats() -> UringStats {
    let c = &COUNTERS;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    UringStats {
        enters: get(&c.enters),
        sqes: get(&c.sqes),
        bytes_sent: get(&c.bytes_sent),
        bytes_received: get(&c.bytes_received),
        short_sends: get(&c.short_sends),
        short_recvs: get(&c.short_recvs),
        zc_sends: get(&c.zc_sends),
        zc_copied: get(&c.zc_copied),
        fixed_reads: get(&c.fixed_reads),
        timeouts: get(&c.timeouts),
        direct_bytes_sent: get(&c.direct_bytes_sent),
        direct_bytes_received: get(&c.direct_bytes_received),
    }
}
