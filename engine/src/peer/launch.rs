//! A collective from this peer's vote to its outcome: launch (backpressure, the vote), run
//! (the master's go-ahead starts the data movement), the data plane's report, and release
//! (buffers back, in-place inputs restored on failure).

use std::sync::Arc;
use std::time::{Duration, Instant};

use concord_master::proto::{AbortKind, CollKind};

use super::{flush, Inner, Launch, PeerState};
use crate::collective::ring::{chunks_of, RingPlan};
use crate::collective::sizing::sub_bytes_for;
use crate::collective::{Spec, Traffic};
use crate::gpu::DeviceAttempt;
use crate::plane::{Attempt, PlaneEvent, PlaneEvents};
use crate::protocol::Effect;
use crate::raw_buf::Bufs;
use crate::results::ReduceInfo;
use crate::Error;

impl Inner {
    /// Starts a collective: backpressure on the in-flight limit, then the vote.
    ///
    /// In place, `bufs.backup` is a buffer as long as `bufs.dst` (contents unspecified) that
    /// receives each range's original just before its first write; a failure puts the saved
    /// ranges back, so the caller gets its input again.
    ///
    /// # Safety
    /// The buffers of `bufs` (and the device buffers of `device`) must stay alive, and
    /// untouched by the caller, until [`Inner::complete`] returned for this tag (or forever, if
    /// it never does).
    pub(crate) unsafe fn launch(
        &self,
        spec: Spec,
        bufs: Bufs,
        device: Option<Arc<DeviceAttempt>>,
        tag: u64,
        timeout: Duration,
    ) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        let limit = self.config.max_in_flight;
        let mut g = self
            .wait(
                deadline,
                &format!("{}: {limit} collectives already in flight", spec.call(tag)),
                |s| (s.launched.len() < limit).then_some(Ok(())),
            )
            .map(|()| self.lock())?;
        g.proto.start_collective(tag, spec.desc())?;
        let launch = Launch {
            spec,
            src: bufs.src,
            dst: bufs.dst,
            backup: bufs.backup,
            work: bufs.work,
            root_peer: None,
            device,
            deadline,
            timeout,
            cancelled_at: None,
            ring_failure: None,
            running: None,
            traffic: Traffic::default(),
            launched_at: Instant::now(),
            commenced_at: None,
            moved_at: None,
        };
        self.pace.launched(launch.bytes());
        g.launched.insert(tag, launch);
        flush(&mut g);
        crate::fault::kill_point("vote", Some(tag));
        if g.watch_at.is_none_or(|at| deadline < at) {
            self.watch.notify_all(); // The watchdog learns the earlier deadline.
        }
        Ok(())
    }

    /// The outcome of `tag`, if it has one: `Some` only once, after which the buffers are free.
    pub(crate) fn try_complete(&self, tag: u64) -> Option<Result<ReduceInfo, Error>> {
        let mut g = self.lock();
        let outcome = match g.proto.take_collective(tag) {
            Some(r) => r,
            None => {
                let e = g.proto.fatal().cloned()?;
                g.proto.forget(tag);
                Err(e)
            }
        };
        let was_full = g.launched.len() >= self.config.max_in_flight;
        let launch = g
            .launched
            .remove(&tag)
            .expect("a launched tag has a launch");
        self.pace.completed(launch.bytes());
        if let (Some((seq, _, _, _)), Some(plane)) = (&launch.running, &g.plane) {
            plane.retire(tag, *seq);
        }
        if was_full {
            self.notify(&mut g); // A slot is free: wake a launch waiting on the limit.
        }
        drop(g);
        let outcome = outcome.map_err(|e| name_lost_root(e, &launch));
        Some(self.release(launch, outcome))
    }

    /// Asks every peer to abort `tag` (`kind` and `reason` as [`crate::protocol::PeerProto::cancel`] takes them).
    pub(crate) fn cancel(&self, tag: u64, kind: AbortKind, reason: String) {
        let mut guard = self.lock();
        let g = &mut *guard;
        if let Some(l) = g.launched.get_mut(&tag) {
            if l.cancelled_at.is_none() && g.proto.cancel(tag, kind, reason) {
                l.cancelled_at = Some(Instant::now());
                flush(g);
                self.notify(g);
                self.watch.notify_all();
            }
        }
    }

    /// Waits until no thread touches the launch's buffers, then turns the outcome into a result.
    pub(super) fn release(
        &self,
        launch: Launch,
        outcome: Result<(), Error>,
    ) -> Result<ReduceInfo, Error> {
        if tracing::enabled!(tracing::Level::DEBUG) {
            let us = |a: Instant, b: Option<Instant>| {
                b.map_or(-1.0, |b| b.saturating_duration_since(a).as_secs_f64() * 1e6)
            };
            let c = launch.commenced_at;
            tracing::debug!(
                "collective {}: start vote {:.1} us, data {:.1} us, completion vote {:.1} us",
                launch.spec.count,
                us(launch.launched_at, c),
                c.map_or(-1.0, |c| us(c, launch.moved_at)),
                launch
                    .moved_at
                    .map_or(-1.0, |m| us(m, Some(Instant::now()))),
            );
        }
        let (seq, world, epoch) = launch
            .running
            .as_ref()
            .map_or((0, 0, 0), |(s, w, e, _)| (*s, *w, *e));
        if let Some((_, _, _, attempt)) = &launch.running {
            if !attempt.retire_and_wait(self.config.op_timeout) {
                // A thread is stuck in a socket call: break the ring so that it returns.
                let plane = self.lock().plane.take();
                drop(plane);
                attempt.retire_and_wait(Duration::from_secs(3600));
            }
            if outcome.is_err() {
                // SAFETY: retired and idle: no data-plane thread touches the buffers any more,
                // and the caller's contract keeps them alive until this returns.
                unsafe { attempt.restore_saved() };
            }
        }
        outcome.map(|()| ReduceInfo {
            world,
            seq,
            epoch,
            traffic: launch.traffic,
            device: None,
        })
    }

    /// Starts the data movement of an attempt the master let go (reader thread, lock held).
    fn run(&self, g: &mut PeerState, tag: u64, seq: u64) {
        let (epoch, ring) = g.proto.ring().expect("collectives run on a ring").clone();
        let me = g.proto.peer_id();
        let rank = ring
            .iter()
            .position(|m| Some(m.peer_id) == me)
            .expect("this peer is in its ring");
        let world = ring.len();
        let Some(l) = g.launched.get_mut(&tag) else {
            return;
        };
        l.commenced_at = Some(Instant::now());
        let spec = l.spec;
        if spec.kind.has_root() {
            l.root_peer = ring.get(spec.root).map(|m| m.peer_id);
        }
        let elem = spec.dtype.size_bytes();
        let sliced = matches!(spec.kind, CollKind::AllGather | CollKind::ReduceScatter);
        if spec.root >= world || (sliced && !spec.count.is_multiple_of(world)) {
            // Checked at launch against the same ring; only a bug gets here.
            let why = format!(
                "{} does not fit the ring of {world} peers (root {}, {} elements)",
                spec.kind, spec.root, spec.count
            );
            g.proto.collective_finished(tag, seq, Err(why));
            return;
        }
        let sub_bytes = sub_bytes_for(
            spec.count,
            elem,
            chunks_of(spec.kind, world),
            self.config.sub_chunk_bytes,
        );
        let plan = RingPlan::of(
            spec.kind, spec.root, world, rank, spec.count, elem, sub_bytes,
        );
        let attempt = Arc::new(
            Attempt::new(tag, seq, plan, spec.dtype, spec.op, l.src, l.dst)
                .with_work(l.work)
                .with_device(l.device.clone())
                .with_backup(l.backup),
        );
        l.running = Some((seq, world, epoch, Arc::clone(&attempt)));
        if let Some(device) = &l.device {
            let staged = if world == 1 || spec.count == 0 {
                device.copy_all()
            } else {
                // Step 0 sends this peer's own chunk: only that one needs the host.
                let c = attempt.plan.chunk_bytes(attempt.plan.send_chunk(0));
                device.stage_input(c, attempt.copy_recvs())
            };
            if let Err(e) = staged {
                g.proto.collective_finished(tag, seq, Err(e.to_string()));
                return;
            }
            if world == 1 || spec.count == 0 {
                g.proto.collective_finished(tag, seq, Ok(()));
                return;
            }
        }
        if world == 1 || spec.count == 0 || spec.kind == CollKind::Barrier {
            // Nothing to move: the result is the input (divided by one for avg).
            let _busy = attempt.enter();
            // SAFETY: the launch's buffers are alive (launch contract) and no other thread has
            // this attempt.
            let r = unsafe { attempt.alone() };
            g.proto.collective_finished(tag, seq, r);
            return;
        }
        let registered = match &g.plane {
            Some(plane) => plane.register(attempt),
            None => Err("this peer has no ring connections; call update_topology()".into()),
        };
        match registered {
            Ok(first) => g.first_sends.push(first),
            Err(e) => g.proto.collective_finished(tag, seq, Err(e)),
        }
    }

    pub(crate) fn apply(&self, g: &mut PeerState, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::Run { tag, seq } => self.run(g, tag, seq),
                Effect::Retire { tag, seq } => {
                    if let Some(plane) = &g.plane {
                        plane.retire(tag, seq);
                    }
                }
                Effect::BreakRing => {
                    if let Some(plane) = &g.plane {
                        plane.break_links();
                    }
                }
            }
        }
    }
}

/// A broadcast's or reduce's abort that lost the root says so first: its data is gone with it.
fn name_lost_root(e: Error, launch: &Launch) -> Error {
    match (e, launch.root_peer) {
        (Error::Aborted { tag, reason, lost }, Some(root)) if lost.contains(&root) => {
            Error::Aborted {
                tag,
                reason: format!(
                    "the root of this {} (rank {}, peer {root}) was lost; {reason}",
                    launch.spec.kind, launch.spec.root
                ),
                lost,
            }
        }
        (e, _) => e,
    }
}

impl PlaneEvents for Inner {
    /// A plane's report that an attempt finished here (TX or RX thread; no lock held).
    fn on_plane_event(&self, event: PlaneEvent) {
        let PlaneEvent::Finished {
            tag,
            seq,
            result,
            ring_intact,
        } = event;
        let mut g = self.lock();
        if let (Ok(t), Some(l)) = (&result, g.launched.get_mut(&tag)) {
            l.traffic = *t;
            l.moved_at = Some(Instant::now());
        }
        self.pace.moved();
        // Success only moves the collective to its completion vote: nobody waits for that, so
        // nobody is woken (on two cores every spurious wake-up shows in small-message latency).
        let wake = result.is_err();
        match result {
            // Only this collective failed: abort it everywhere, keep the ring.
            Err(why) if ring_intact => {
                g.proto.cancel(tag, AbortKind::Failed, why);
            }
            // The ring broke: the master's abort naming a lost neighbour is likely on its way.
            Err(why) if g.launched.contains_key(&tag) => {
                let at = Instant::now() + super::RING_FAILURE_GRACE;
                if let Some(l) = g.launched.get_mut(&tag) {
                    l.ring_failure = Some((Instant::now(), seq, why));
                }
                if g.watch_at.is_none_or(|w| at < w) {
                    self.watch.notify_all();
                }
            }
            result => g.proto.collective_finished(tag, seq, result.map(drop)),
        }
        flush(&mut g);
        if wake {
            self.notify(&mut g);
        }
    }
}
