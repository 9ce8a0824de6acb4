//! When threads poll instead of blocking: the pacing every layer of a peer shares.

use std::time::Duration;

/// Threads poll (for at most the communicator's spin window) before they block only
/// while every collective in flight here is at most this large: there an answer is microseconds
/// away and a blocking wake-up would be most of the collective's time; larger ones keep every
/// core for moving bytes.
pub const SPIN_MAX_COLLECTIVE_BYTES: usize = 4 << 20;

/// Builds a peer's pacing from its polling window (zero: never poll).
impl Pace {
    pub(crate) fn new(spin: Duration) -> Self {
        Pace {
            large_in_flight: Default::default(),
            activity: Default::default(),
            spin,
        }
    }
}

/// When the threads waiting on a peer's collectives poll before they block.
///
/// Small collectives are chains of events (the master's answer to a vote, frames, the outcome)
/// each microseconds after the last, and a blocking wake-up costs tens of microseconds on a
/// virtual machine. So for `spin` after any event of this peer's collectives (one launched, a
/// master message, a frame, one finished here) the master reader, a waiting caller and the
/// data plane's first connection poll before they block (see [`concord_transport::spin`]); the
/// window covers the gap to the next collective of a loop too. Never while a collective larger
/// than [`SPIN_MAX_COLLECTIVE_BYTES`](SPIN_MAX_COLLECTIVE_BYTES) is in flight: its
/// events are far apart and every core is busy moving its bytes.
#[derive(Debug)]
pub(crate) struct Pace {
    large_in_flight: std::sync::atomic::AtomicUsize,
    activity: concord_transport::spin::Stamp,
    spin: Duration,
}

impl Pace {
    pub(crate) fn launched(&self, bytes: usize) {
        if bytes > SPIN_MAX_COLLECTIVE_BYTES {
            self.large_in_flight
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        self.moved();
    }

    pub(crate) fn completed(&self, bytes: usize) {
        if bytes > SPIN_MAX_COLLECTIVE_BYTES {
            self.large_in_flight
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
        self.moved();
    }

    /// A collective moved: the polling window starts again.
    pub(crate) fn moved(&self) {
        if !self.spin.is_zero() {
            self.activity.touch();
        }
    }

    /// Whether a collective larger than [`SPIN_MAX_COLLECTIVE_BYTES`] is in flight here.
    pub(crate) fn large(&self) -> bool {
        self.large_in_flight
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    }

    /// Whether a waiting thread should poll rather than block now.
    pub(crate) fn polling(&self) -> bool {
        !self.spin.is_zero()
            && self
                .large_in_flight
                .load(std::sync::atomic::Ordering::Relaxed)
                == 0
            && !self.activity.left(self.spin).is_zero()
    }
}
