//! The watchdog thread (`concord-watchdog`): deadlines of collectives in flight.

use std::sync::Weak;
use std::time::{Duration, Instant};

use crate::peer::{flush, Inner, RING_FAILURE_GRACE};
use crate::Error;
use concord_master::proto::AbortKind;

/// How long a peer waits for the master's answer to a cancel before failing the operation alone.
const CANCEL_GRACE: Duration = Duration::from_secs(5);

/// The watchdog thread: sleeps until the next deadline, then asks the master to abort what is
/// late; fails alone what the master does not answer for within a grace period.
pub(crate) fn watchdog(inner: Weak<Inner>) {
    loop {
        let Some(inner) = inner.upgrade() else { return };
        let mut g = inner.lock();
        // Checked under the lock: `begin_shutdown` sets the flag, then notifies under the lock,
        // so a shutdown either shows here or wakes the wait below (never falls in between).
        if inner.shutting_down() {
            return;
        }
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        let mut late = Vec::new();
        let mut unanswered = Vec::new();
        let mut broken = Vec::new();
        for (tag, l) in &g.launched {
            if let Some((at, ..)) = &l.ring_failure {
                let due = *at + RING_FAILURE_GRACE;
                if due <= now {
                    broken.push(*tag);
                } else {
                    next = Some(next.map_or(due, |n| n.min(due)));
                }
            }
            match l.cancelled_at {
                None if l.deadline <= now => late.push((*tag, l.timeout)),
                None => next = Some(next.map_or(l.deadline, |n| n.min(l.deadline))),
                Some(at) if at + CANCEL_GRACE <= now => unanswered.push(*tag),
                Some(at) => {
                    next = Some(next.map_or(at + CANCEL_GRACE, |n| n.min(at + CANCEL_GRACE)))
                }
            }
        }
        let acted = !late.is_empty() || !unanswered.is_empty() || !broken.is_empty();
        for tag in broken {
            // No abort from the master within the grace: report the broken ring ourselves
            // (a no-op if the collective ended meanwhile).
            if let Some((_, seq, why)) =
                g.launched.get_mut(&tag).and_then(|l| l.ring_failure.take())
            {
                g.proto.collective_finished(tag, seq, Err(why));
            }
        }
        let me = g.proto.peer_id().unwrap_or(0);
        for (tag, timeout) in late {
            let reason = format!(
                "timed out after {} ms (deadline of peer {me})",
                timeout.as_millis()
            );
            if let Some(l) = g.launched.get_mut(&tag) {
                l.cancelled_at = Some(now);
            }
            if !g.proto.cancel(tag, AbortKind::Timeout, reason) {
                continue;
            }
            next = Some(next.map_or(now + CANCEL_GRACE, |n| n.min(now + CANCEL_GRACE)));
        }
        for tag in unanswered {
            // The master did not answer: fail it here, alone.
            g.proto.fail_locally(
                tag,
                Error::Timeout(format!(
                    "collective {tag}: the master did not answer a cancel within {} s",
                    CANCEL_GRACE.as_secs()
                )),
            );
        }
        flush(&mut g);
        if acted {
            inner.notify(&mut g);
        }
        let cond = &inner.watch;
        g.watch_at = next;
        match next {
            Some(at) => {
                let wait = at
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1));
                drop(
                    cond.wait_timeout(g, wait)
                        .unwrap_or_else(|p| p.into_inner()),
                );
            }
            None => drop(cond.wait(g).unwrap_or_else(|p| p.into_inner())),
        }
    }
}
