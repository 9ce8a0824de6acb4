//! The state every thread of one data plane shares: the registry of attempts in flight, the
//! connections behind their locks, and the plane's failure, reported once.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::Thread;
use std::time::Duration;

use concord_master::proto::PeerId;
use concord_transport::frame::DataHeader;
use concord_transport::PinnedBuf;

use super::attempt::{Attempt, BusyOwned};
use super::connection::{Connection, Stopper};
use super::{PlaneEvent, PlaneEvents, INLINE_MAX_TOTAL_BYTES};
use crate::collective::Traffic;
use crate::gpu::DeviceFrame;
use crate::pace::{Pace, SPIN_MAX_COLLECTIVE_BYTES};

pub(super) const POLL_NONE: u8 = 0;
pub(super) const POLL_FIRST: u8 = 1;
pub(super) const POLL_ALL: u8 = 2;

#[derive(Default)]
pub(super) struct Registry {
    pub(super) ops: Vec<Arc<Attempt>>,
    pub(super) retired: VecDeque<(u64, u64)>,
    pub(super) generation: u64,
    pub(super) failure: Option<String>,
}

impl Registry {
    /// The operation of a frame: `Some(Some)` registered, `Some(None)` retired (drop the
    /// frame), `None` not registered yet; `Err` once the plane failed.
    pub(super) fn find(&self, tag: u64, seq: u64) -> Result<Option<Option<Arc<Attempt>>>, String> {
        if let Some(attempt) = self.ops.iter().find(|o| o.tag == tag && o.seq == seq) {
            return Ok(Some(Some(Arc::clone(attempt))));
        }
        if self.retired.contains(&(tag, seq)) {
            return Ok(Some(None));
        }
        match &self.failure {
            Some(why) => Err(why.clone()),
            None => Ok(None),
        }
    }
}

pub(super) struct Shared {
    /// One per connection, to wake its owner thread from another.
    pub(super) stoppers: Vec<Stopper>,
    /// The successor connections. Each TX thread locks its own to send; inline senders (see
    /// [`INLINE_MAX_TOTAL_BYTES`]) only ever `try_lock` the first.
    pub(super) tx: Vec<Mutex<Connection>>,
    /// The predecessor connections with their receive state. Each RX thread locks its own to
    /// receive; a driving caller only ever `try_lock`s the first.
    pub(super) rx: Vec<Mutex<RxConn>>,
    /// Probes of `rx`, to wait for bytes without holding the lock.
    pub(super) rx_probes: Vec<super::connection::Probe>,
    /// Whether frames may be sent inline now: the collectives here are small enough, unstriped
    /// and in host memory (the first TX thread then need not poll for them).
    pub(super) inline: AtomicBool,
    /// Callers receiving on the first connection now; its RX thread stays aside meanwhile.
    pub(super) aside: crate::aside::Aside,
    pub(super) next_id: PeerId,
    pub(super) prev_id: PeerId,
    pub(super) registry: Mutex<Registry>,
    pub(super) registry_cv: Condvar,
    pub(super) tx_threads: OnceLock<Vec<Thread>>,
    pub(super) failed: AtomicBool,
    /// The owner, told when an attempt finishes here (see [`PlaneEvents`]).
    pub(super) events: std::sync::Weak<dyn PlaneEvents>,
    /// How long an RX thread waits for the operation of a frame to be registered here.
    pub(super) register_timeout: Duration,
    /// Whether the communicator's small collectives are under way (see [`Shared::polling`]).
    pub(super) pace: Arc<Pace>,
    /// A bound peer's data threads widen to the launch's CPUs for large collectives
    /// (`crate::affinity::Widening`).
    pub(super) widening: Option<crate::affinity::Widening>,
    /// Which threads may poll: [`POLL_FIRST`] (the collectives here are all small enough and
    /// unstriped, or there are none: only the first connection carries them), [`POLL_ALL`]
    /// (small, some striped) or [`POLL_NONE`] (a large one is here).
    pub(super) small: AtomicU8,
}

impl Shared {
    /// Keeps the calling data thread on the CPUs the collectives in flight call for.
    pub(super) fn place_thread(&self, widened: &mut bool) {
        if let Some(w) = &self.widening {
            w.follow(self.pace.large(), widened);
        }
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the thread of connection `conn` should poll rather than block now.
    pub(super) fn polling(&self, conn: usize) -> bool {
        let poll = match self.small.load(Ordering::Relaxed) {
            POLL_ALL => true,
            POLL_FIRST => conn == 0,
            _ => false,
        };
        poll && !self.failed.load(Ordering::Relaxed) && self.pace.polling()
    }

    /// Recomputes [`Shared::small`] after the set of operations changed (registry lock held).
    pub(super) fn update_small(&self, r: &Registry) {
        let small = r.ops.iter().all(|attempt| {
            attempt.plan.count * attempt.plan.elem_bytes <= SPIN_MAX_COLLECTIVE_BYTES
        });
        let total: usize = r
            .ops
            .iter()
            .map(|attempt| attempt.plan.count * attempt.plan.elem_bytes)
            .sum();
        let inline = total <= INLINE_MAX_TOTAL_BYTES
            && r.ops
                .iter()
                .all(|attempt| !attempt.striped && attempt.device.is_none());
        self.inline.store(inline, Ordering::Relaxed);
        let state = match (small, r.ops.iter().any(|attempt| attempt.striped)) {
            (false, _) => POLL_NONE,
            (true, false) => POLL_FIRST,
            (true, true) => POLL_ALL,
        };
        self.small.store(state, Ordering::Relaxed);
    }

    pub(super) fn stop_all(&self) {
        for s in &self.stoppers {
            s.stop();
        }
    }

    pub(super) fn wake_tx(&self) {
        for t in self.tx_threads.get().into_iter().flatten() {
            t.unpark();
        }
    }

    pub(super) fn finish(&self, attempt: &Attempt, result: Result<Traffic, String>) {
        self.report(attempt, result, false);
    }

    pub(super) fn report(
        &self,
        attempt: &Attempt,
        result: Result<Traffic, String>,
        ring_intact: bool,
    ) {
        if attempt.claim_report() {
            let (tag, seq) = (attempt.tag, attempt.seq);
            if let Some(owner) = self.events.upgrade() {
                owner.on_plane_event(PlaneEvent::Finished {
                    tag,
                    seq,
                    result,
                    ring_intact,
                });
            }
        }
    }

    /// Fails the plane: every operation on it fails, sockets are shut down, threads wake.
    pub(super) fn fail(&self, why: String) {
        if self.failed.swap(true, Ordering::AcqRel) {
            return;
        }
        let ops = {
            let mut r = self.lock();
            r.failure = Some(why.clone());
            let ops = std::mem::take(&mut r.ops);
            self.update_small(&r);
            ops
        };
        // A neighbour leaving between collectives is ordinary; losing one mid-collective is not.
        // (A collective finished here but not yet retired does not count.)
        let unfinished = ops.iter().filter(|attempt| !attempt.is_reported()).count();
        if unfinished == 0 {
            tracing::debug!("data plane closed: {why}");
        } else {
            tracing::warn!("data plane failed with {unfinished} collective(s) in flight: {why}");
        }
        self.registry_cv.notify_all();
        self.stop_all();
        self.wake_tx();
        for attempt in ops {
            attempt.failed.store(true, Ordering::Release);
            self.finish(&attempt, Err(why.clone()));
        }
    }
}

/// A predecessor connection with what its receiver keeps between frames.
pub(super) struct RxConn {
    pub(super) stream: Connection,
    pub(super) staging: PinnedBuf,
    /// A device frame whose GPU work is still running.
    pub(super) pending: Option<Pending>,
    /// A header read by a driving caller before its collective was registered here.
    pub(super) held: Option<DataHeader>,
}

/// A device reduce-scatter frame whose GPU work is still running. Its RX thread receives the
/// next frame meanwhile (the GPU and the socket overlap), and finishes this one (publishes the
/// result for TX, counts it) right after, or before it would block on an empty socket: a frame
/// whose result is unpublished may be what the rest of the ring waits for.
pub(super) struct Pending {
    pub(super) attempt: Arc<Attempt>,
    pub(super) busy: BusyOwned,
    pub(super) m: usize,
    pub(super) bytes: u64,
    pub(super) frame: DeviceFrame,
}
