//! Waiting for a collective's outcome. While small collectives are under way the waiting
//! caller polls, and for a small blocking host collective it reads the master connection and
//! the first ring connection itself, so that go-ahead, frames and outcome need no hand-off.

use std::time::Duration;

use super::{Inner, PeerState};
use crate::control::master_link::MasterDriver;
use crate::plane::{DataPlane, INLINE_MAX_TOTAL_BYTES};
use crate::protocol::CollPhase;
use crate::results::ReduceInfo;
use crate::Error;

impl Inner {
    /// Blocks until `tag` has its outcome (the watchdog bounds the wait by the deadline).
    pub(crate) fn complete(&self, tag: u64) -> Result<ReduceInfo, Error> {
        use std::sync::atomic::Ordering;
        let pending = |g: &PeerState| {
            g.proto
                .collective(tag)
                .is_some_and(|p| !matches!(p, CollPhase::Done | CollPhase::Failed(_)))
                && g.proto.fatal().is_none()
        };
        {
            let mut g = self.lock();
            while pending(&g) {
                // Poll while collectives are moving: the outcome is likely microseconds away,
                // and a blocking wake-up would cost more than the rest of a small collective.
                let seen = self.notified.load(Ordering::Acquire);
                if self.pace.polling() {
                    // A small host collective: this thread reads the master connection and the
                    // first ring connection itself (see `MasterIn`).
                    let drive = g
                        .launched
                        .get(&tag)
                        .is_some_and(|l| l.device.is_none() && l.bytes() <= INLINE_MAX_TOTAL_BYTES);
                    let plane = g.plane.as_ref().filter(|_| drive).map(DataPlane::driver);
                    drop(g);
                    let master = drive.then(|| MasterDriver::start(self));
                    // Each poll re-reads the window: every event of the collective extends it.
                    concord_transport::spin::spin_until(Duration::MAX, || {
                        if self.notified.load(Ordering::Acquire) != seen || !self.pace.polling() {
                            return true;
                        }
                        if let Some(m) = &master {
                            m.step();
                        }
                        if let Some(p) = &plane {
                            p.step();
                        }
                        self.notified.load(Ordering::Acquire) != seen
                    });
                    drop(master);
                    drop(plane);
                    g = self.lock();
                    if self.notified.load(Ordering::Acquire) != seen || self.pace.polling() {
                        continue;
                    }
                }
                g = self.cond.wait(g).unwrap_or_else(|p| p.into_inner());
            }
        }
        self.try_complete(tag).expect("finished above")
    }
}
