//! The training loop each simulated peer runs on top of its protocol, as `concord bench
//! --elastic` does with a real `Communicator`:
//!
//! ```text
//! join ─► [topology] ─► sync ─► batch ─► compute ─► pending? ─yes─► [topology] ─► sync ...
//!                         ▲       │ some failed                └─no──────────────► sync ...
//!                         └───────┴──── [topology] (retry: rebuild the ring, re-run the failed)
//! ```
//!
//! Every member calls the same votes in the same order, and everybody (a joiner included) is
//! right after a topology update when it starts a step, so a joiner fits in wherever the group
//! admits it. The step starts with an agreement collective (`SYNC_TAG`, max over the members of
//! `[step, todo mask]`): a joiner contributes zeros and learns the step and which data tags the
//! members still have to run (all of them on a fresh step, the failed ones on a retry). Then the
//! batch runs with several tags in flight; failed tags are re-run after an update, as
//! `all_reduce_many_with_retry` does, until all succeed or fewer than two peers remain.

use concord_kernels::{DType, ReduceOp};
use concord_master::proto::{AbortKind, CollKind};

use super::check::Done;
use super::ctx::Ctx;
use super::net::Event;
use super::peer::{Launch, SimPeer, Stage};
use super::plane::{Neighbour, Plane};
use super::{count_of, data_tag, floats, input_value, kind_of, op_of};
use crate::protocol::TopoPhase;

/// Tag of the per-step agreement collective (never a data tag).
pub(crate) const SYNC_TAG: u64 = u64::MAX - 1;
/// Failed attempts of one step before giving up (as `all_reduce_many_with_retry`).
const MAX_ATTEMPTS: usize = 16;
/// Connection rounds of one topology vote before giving up (as `finish_topology`).
const MAX_ROUNDS: usize = 16;
/// State transitions per input: far more than one input can cause; more is a loop.
const MAX_TRANSITIONS: usize = 64;
/// Longest compute between steps, in microseconds.
const MAX_COMPUTE_US: u64 = 500;

impl SimPeer {
    /// Advances the loop as far as the protocol's state allows, then sends what it queued.
    pub(crate) fn pump(&mut self, ctx: &mut Ctx) {
        for _ in 0..MAX_TRANSITIONS {
            if !self.advance(ctx) {
                self.flush(ctx);
                return;
            }
        }
        let why = format!(
            "peer {}: the loop does not settle in {:?}",
            self.id(),
            self.stage
        );
        ctx.checker.fail(ctx.now, why);
    }

    fn set_stage(&mut self, ctx: &mut Ctx, stage: Stage) {
        ctx.trace(|| format!("#{} {:?} -> {stage:?}", self.idx, self.stage));
        self.stage = stage;
        self.since = ctx.now;
    }

    fn fail(&self, ctx: &mut Ctx, what: String) {
        ctx.checker.fail(
            ctx.now,
            format!("peer {} (#{}): {what}", self.id(), self.idx),
        );
    }

    /// One transition; false when the loop must wait for an input.
    fn advance(&mut self, ctx: &mut Ctx) -> bool {
        if !self.active() || ctx.checker.failure().is_some() {
            return false;
        }
        if let Some(e) = self.proto.fatal() {
            let why = format!("removed: {e}");
            self.leave(ctx, Stage::Out(why));
            return false;
        }
        match self.stage.clone() {
            Stage::Topology => match self.proto.topology().clone() {
                TopoPhase::Connect {
                    epoch,
                    secret,
                    ring,
                } => self.start_connect(ctx, epoch, secret, &ring),
                TopoPhase::Done { .. } => self.topology_done(ctx),
                TopoPhase::Failed { reason } => self.revote(ctx, &reason),
                _ => return false,
            },
            Stage::Connecting { epoch } => return self.connecting(ctx, epoch),
            Stage::Confirming => match self.proto.topology().clone() {
                TopoPhase::Done { .. } => self.topology_done(ctx),
                TopoPhase::Failed { reason } => self.revote(ctx, &reason),
                _ => return false,
            },
            Stage::Sync => return self.sync_wait(ctx),
            Stage::Batch => return self.batch_wait(ctx),
            Stage::Pending => match self.proto.take_pending_answer() {
                Some(true) => self.update_topology(ctx),
                Some(false) => self.begin_step(ctx),
                None => return false,
            },
            Stage::Compute | Stage::Finished | Stage::Out(_) => return false,
        }
        true
    }

    /// The master announced a ring: open its connections (dropping the old ones first).
    fn start_connect(
        &mut self,
        ctx: &mut Ctx,
        epoch: u64,
        secret: u64,
        ring: &[concord_master::proto::RingMember],
    ) {
        let me = self.id();
        let world = ring.len();
        let Some(rank) = ring.iter().position(|m| m.peer_id == me) else {
            return self.fail(ctx, format!("the ring of epoch {epoch} does not list it"));
        };
        let resolve = |m: &concord_master::proto::RingMember| {
            let idx = ctx.directory.get(&m.data_addr).copied();
            idx.map(|idx| Neighbour { idx, id: m.peer_id })
        };
        let neighbours = if world == 1 {
            None
        } else {
            let prev = resolve(&ring[(rank + world - 1) % world]);
            let next = resolve(&ring[(rank + 1) % world]);
            match prev.zip(next) {
                Some(pair) => Some(pair),
                None => return self.fail(ctx, format!("unknown data address in {ring:?}")),
            }
        };
        let (plane, dial) = Plane::connect(epoch, secret, world, neighbours);
        self.install_plane(ctx, plane, dial);
        self.set_stage(ctx, Stage::Connecting { epoch });
    }

    fn connecting(&mut self, ctx: &mut Ctx, epoch: u64) -> bool {
        match self.proto.topology().clone() {
            TopoPhase::Failed { reason } => self.revote(ctx, &reason),
            TopoPhase::Connect { epoch: e, ring, .. } if e == epoch => {
                let plane = self.plane.as_ref().filter(|p| p.epoch == epoch);
                if let Some(why) = plane.and_then(|p| p.broken()) {
                    // A connection reset during the handshake: `establish` fails.
                    let why = format!("connecting epoch {epoch}: {why}");
                    self.proto.connect_finished(epoch, Err(why));
                } else if plane.is_some_and(|p| p.connected()) {
                    self.proto.install_ring(epoch, ring);
                    self.proto.connect_finished(epoch, Ok(()));
                } else {
                    return false;
                }
                self.set_stage(ctx, Stage::Confirming);
            }
            other => self.fail(
                ctx,
                format!("topology {other:?} while connecting epoch {epoch}"),
            ),
        }
        true
    }

    /// A connection round failed: vote again (as `Communicator::revote`).
    fn revote(&mut self, ctx: &mut Ctx, reason: &str) {
        self.rounds += 1;
        if self.rounds >= MAX_ROUNDS {
            return self.fail(
                ctx,
                format!("the ring could not be built in {MAX_ROUNDS} rounds ({reason})"),
            );
        }
        self.close_plane(ctx);
        self.update_topology(ctx);
    }

    fn update_topology(&mut self, ctx: &mut Ctx) {
        self.proto.reset_topology();
        let vote = if self.retrying && !ctx.config.admit_on_retry {
            self.proto.start_repair_topology()
        } else {
            self.proto.start_update_topology()
        };
        if let Err(e) = vote {
            return self.fail(ctx, format!("update_topology refused: {e}"));
        }
        self.set_stage(ctx, Stage::Topology);
    }

    fn topology_done(&mut self, ctx: &mut Ctx) {
        self.rounds = 0;
        if self.retrying && self.world() < 2 {
            return self.leave(ctx, Stage::Out("fewer than two peers remain".into()));
        }
        if self.batch_failed && ctx.config.elastic_order && self.step_known {
            return self.start_batch(ctx); // Straight back to the failed tags.
        }
        self.begin_step(ctx);
    }

    /// Starts a step with the agreement collective.
    fn begin_step(&mut self, ctx: &mut Ctx) {
        let batch = ctx.config.batch;
        let mut input = vec![0.0f32; 1 + batch];
        if self.step_known {
            input[0] = self.step as f32;
            for k in &self.todo {
                input[1 + k] = 1.0;
            }
        }
        self.launches.clear();
        self.launch(
            ctx,
            SYNC_TAG,
            input,
            ReduceOp::Max,
            None,
            CollKind::AllReduce,
        );
        self.set_stage(ctx, Stage::Sync);
    }

    /// Votes for collective `tag` of `kind` with this peer's `input` (its slot, for an
    /// all-gather), in place; a broadcast's or reduce's root follows the step and `k`.
    fn launch(
        &mut self,
        ctx: &mut Ctx,
        tag: u64,
        mut input: Vec<f32>,
        op: ReduceOp,
        k: Option<usize>,
        kind: CollKind,
    ) {
        let world = self.world().max(1);
        let root = (self.step as usize + k.unwrap_or(0)) % world;
        if kind == CollKind::ReduceScatter {
            input.truncate(input.len() / world * world); // A whole slot per peer.
        }
        let count = match kind {
            CollKind::AllGather => input.len() * world,
            _ => input.len(),
        };
        let spec = crate::collective::Spec {
            kind,
            root: if kind.has_root() { root } else { 0 },
            dtype: DType::F32,
            op,
            count,
        };
        if let Err(e) = self.proto.start_collective(tag, spec.desc()) {
            return self.fail(ctx, format!("{} refused: {e}", spec.call(tag)));
        }
        ctx.checker
            .on_launch(self.id(), tag, &input, op, kind, spec.root);
        let launch = Launch {
            kind,
            root: spec.root,
            op,
            input,
            k,
            running: None,
            output: None,
            ended: None,
        };
        self.launches.insert(tag, launch);
    }

    /// Takes every outcome the protocol has, checking each success against the oracle.
    fn collect(&mut self, ctx: &mut Ctx) {
        let me = self.id();
        let tags: Vec<u64> = self.launches.keys().copied().collect();
        for tag in tags {
            let Some(outcome) = self.proto.take_collective(tag) else {
                continue;
            };
            let launch = self.launches.get_mut(&tag).expect("listed above");
            launch.ended = Some(outcome.is_ok());
            let (running, bits) = (launch.running, launch.output.clone());
            match (outcome, running, bits) {
                (Ok(()), Some((seq, epoch)), Some(bits)) => {
                    let unique_tag = tag != SYNC_TAG;
                    let bits = &bits;
                    let done = Done {
                        tag,
                        seq,
                        epoch,
                        bits,
                        unique_tag,
                    };
                    ctx.checker.on_done(ctx.now, me, done);
                }
                (Ok(()), running, _) => {
                    let why = format!(
                        "tag {tag} done ({running:?}) without its ring part finishing here"
                    );
                    return self.fail(ctx, why);
                }
                (Err(e), _, _) if e.is_retryable() || matches!(e, crate::Error::Timeout(_)) => {}
                (Err(_), _, _) if self.proto.fatal().is_some() => {} // Removed: handled next.
                (Err(e), _, _) => return self.fail(ctx, format!("tag {tag} failed for good: {e}")),
            }
        }
    }

    fn sync_wait(&mut self, ctx: &mut Ctx) -> bool {
        self.collect(ctx);
        let (ended, values) = match self.launches.get(&SYNC_TAG) {
            Some(l) => (l.ended, l.output.as_deref().map(floats)),
            None => return false,
        };
        match (ended, values) {
            (None, _) => false,
            (Some(true), Some(v)) => {
                self.step = v[0] as u64;
                self.step_known = true;
                self.todo = (0..ctx.config.batch).filter(|k| v[1 + k] > 0.5).collect();
                if self.todo.is_empty() {
                    self.todo = (0..ctx.config.batch).collect(); // Nobody had a step: the first.
                }
                self.start_batch(ctx);
                true
            }
            (Some(_), _) => {
                self.retry(ctx, false);
                true
            }
        }
    }

    fn start_batch(&mut self, ctx: &mut Ctx) {
        if self.step >= ctx.config.steps {
            return self.finish(ctx);
        }
        self.launches.clear();
        self.batch_failed = false;
        let me = self.id();
        for k in self.todo.clone() {
            let input = (0..count_of(ctx.config.elems, k))
                .map(|i| input_value(me, self.step, k, i))
                .collect();
            let kind = kind_of(self.step, k);
            self.launch(ctx, data_tag(self.step, k), input, op_of(k), Some(k), kind);
        }
        self.set_stage(ctx, Stage::Batch);
    }

    fn batch_wait(&mut self, ctx: &mut Ctx) -> bool {
        self.collect(ctx);
        if self.launches.values().any(|l| l.ended.is_none()) || ctx.checker.failure().is_some() {
            return false;
        }
        let failed: Vec<usize> = self
            .launches
            .values()
            .filter(|l| l.ended == Some(false))
            .filter_map(|l| l.k)
            .collect();
        if failed.is_empty() {
            self.step_done(ctx);
        } else {
            self.todo = failed;
            self.retry(ctx, true);
        }
        true
    }

    fn step_done(&mut self, ctx: &mut Ctx) {
        self.last = self
            .launches
            .values()
            .filter_map(|l| {
                let (seq, epoch) = l.running?;
                Some((l.k?, seq, epoch, floats(l.output.as_ref()?)))
            })
            .collect();
        self.step += 1;
        self.attempts = 0;
        self.retrying = false;
        if self.step >= ctx.config.steps {
            return self.finish(ctx);
        }
        self.todo = (0..ctx.config.batch).collect();
        let until = ctx.now + self.rng.range(0, MAX_COMPUTE_US);
        ctx.net.at(until, Event::Wake { peer: self.idx });
        self.set_stage(ctx, Stage::Compute);
    }

    /// Compute is over: ask whether peers wait to join.
    pub(crate) fn on_wake(&mut self, ctx: &mut Ctx) {
        if self.stage != Stage::Compute {
            return;
        }
        if let Err(e) = self.proto.start_pending_query() {
            return self.fail(ctx, format!("are_new_peers_pending refused: {e}"));
        }
        self.set_stage(ctx, Stage::Pending);
        self.pump(ctx);
    }

    /// A collective of this peer still in flight (voting or running), if any.
    pub(crate) fn in_flight(&self) -> Option<u64> {
        self.launches.keys().copied().find(|t| self.cancellable(*t))
    }

    fn cancellable(&self, tag: u64) -> bool {
        use crate::protocol::CollPhase;
        let phase = self.proto.collective(tag);
        matches!(
            phase,
            Some(CollPhase::Voting | CollPhase::Run { .. } | CollPhase::Completing { .. })
        )
    }

    /// The deadline of one collective in flight passed: the watchdog asks the master to abort
    /// it everywhere (as `control::watchdog` does).
    pub(crate) fn deadline_passed(&mut self, ctx: &mut Ctx, rng: &mut super::rng::Rng) {
        let tags: Vec<u64> = self
            .launches
            .keys()
            .copied()
            .filter(|t| self.cancellable(*t))
            .collect();
        let Some(&tag) = tags.get(rng.index(tags.len().max(1))) else {
            return;
        };
        let reason = format!("timed out after 0 ms (deadline of peer {})", self.id());
        ctx.trace(|| format!("FAULT: #{} cancels tag {tag}: {reason}", self.idx));
        self.proto.cancel(tag, AbortKind::Timeout, reason);
        self.pump(ctx);
    }

    /// Some collectives failed (the batch's when `batch`, else the agreement): rebuild the ring.
    fn retry(&mut self, ctx: &mut Ctx, batch: bool) {
        self.attempts += 1;
        if self.attempts > MAX_ATTEMPTS {
            return self.fail(
                ctx,
                format!(
                    "step {} still failing after {MAX_ATTEMPTS} attempts",
                    self.step
                ),
            );
        }
        self.retries += 1;
        self.retrying = true;
        self.batch_failed = batch;
        self.update_topology(ctx);
    }

    fn finish(&mut self, ctx: &mut Ctx) {
        self.finished_at = Some(ctx.now);
        self.leave(ctx, Stage::Finished);
    }
}
