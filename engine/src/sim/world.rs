//! The world: the master, the peers, the network, the faults, and the loop that pops events in
//! virtual-time order and hands each to whoever must process it.

use std::collections::{BTreeMap, VecDeque};

use concord_master::coordinator::CoordinatorConfig;

use super::check::Checker;
use super::ctx::{Ctx, Stats};
use super::master::SimMaster;
use super::net::{Event, Net, Time};
use super::peer::{data_port, SimPeer, Stage};
use super::rng::{Digest, Rng};
use super::{Failure, PeerResult, SimConfig, Summary};

/// Longest any peer may wait for one thing (a vote, a ring, its collectives): well above the
/// longest stall (8 s) plus the heartbeat kick (3 s, checked every 0.5 s).
const HANG_BOUND_US: Time = 30_000_000;
/// How often the hang bound is checked.
const CHECK_EVERY_US: Time = 1_000_000;
/// Virtual time after which a run has certainly gone wrong.
const TIME_LIMIT_US: Time = 3_600_000_000;
/// Events after which a run has certainly gone wrong (a livelock).
const MAX_EVENTS: u64 = 20_000_000;
/// Peers that may join on top of the initial ones.
const MAX_JOINS: usize = 4;

/// Which fault a tick injects.
#[derive(Clone, Copy, Debug)]
enum Fault {
    Kill,
    Stall,
    Join,
    Drop,
    Timeout,
}

#[derive(Debug)]
pub(crate) struct World {
    ctx: Ctx,
    master: SimMaster,
    peers: Vec<SimPeer>,
    fault_rng: Rng,
    peer_rng: Rng,
    faults_left: usize,
    digest: Digest,
}

impl World {
    pub(crate) fn new(config: &SimConfig) -> Self {
        let mut rng = Rng::new(config.seed);
        let net = Net::new(rng.fork(1), config.faults.delay);
        let mut fault_rng = rng.fork(2);
        let peer_rng = rng.fork(3);
        let mut coord = CoordinatorConfig::default();
        coord.secret_seed = config.seed;
        let f = config.faults;
        let faults_left = if f.kill || f.stall || f.join || f.drop || f.timeout {
            fault_rng.range(1, config.max_faults as u64 + 1) as usize
        } else {
            0
        };
        let mut world = World {
            ctx: Ctx {
                now: 0,
                net,
                checker: Checker::default(),
                config: config.clone(),
                directory: BTreeMap::new(),
                stats: Stats::default(),
                trace: VecDeque::new(),
            },
            master: SimMaster::new(coord),
            peers: Vec::new(),
            fault_rng,
            peer_rng,
            faults_left,
            digest: Digest::new(),
        };
        for _ in 0..config.peers {
            let at = world.peer_rng.range(0, 200);
            world.add_peer(at);
        }
        if world.faults_left > 0 {
            let at = world.fault_rng.range(1_000, 10_000);
            world.ctx.net.at(at, Event::FaultTick);
        }
        world.ctx.net.at(CHECK_EVERY_US, Event::Check);
        world
    }

    /// A new peer that registers at `at`.
    fn add_peer(&mut self, at: Time) {
        let idx = self.peers.len();
        let addr = format!("10.0.{}.{}:{}", idx >> 8, idx & 255, data_port(idx));
        self.ctx.directory.insert(addr, idx);
        let rng = self.peer_rng.fork(idx as u64);
        self.peers.push(SimPeer::new(idx, rng, at));
        self.ctx.net.at(at, Event::Register { peer: idx });
    }

    /// Runs until every peer is done or an invariant breaks.
    pub(crate) fn run(&mut self) {
        while self.ctx.checker.failure().is_none() && self.peers.iter().any(SimPeer::active) {
            let Some((at, event)) = self.ctx.net.pop() else {
                let waiting = self.describe_waiting();
                return self.ctx.checker.fail(
                    self.ctx.now,
                    format!("deadlock: no event left while {waiting}"),
                );
            };
            debug_assert!(at >= self.ctx.now, "time goes forward");
            self.ctx.now = at;
            if at > TIME_LIMIT_US || self.ctx.stats.events > MAX_EVENTS {
                let why = format!("runaway: {} events in {at} us", self.ctx.stats.events);
                return self.ctx.checker.fail(at, why);
            }
            self.process(event);
        }
        if self.ctx.checker.failure().is_none() {
            self.final_checks();
        }
    }

    /// One event: deferred if its peer is stalled, dropped if its peer is gone.
    fn process(&mut self, event: Event) {
        if let Some(p) = event.target_peer() {
            let peer = &mut self.peers[p];
            if !peer.alive {
                return; // A closed process: nothing reads its sockets.
            }
            if let Some(backlog) = &mut peer.stalled {
                backlog.push((self.ctx.now, event));
                return;
            }
        }
        self.ctx.stats.events += 1;
        self.digest.u64(self.ctx.now);
        event.digest(&mut self.digest);
        let ctx = &mut self.ctx;
        match event {
            Event::Register { peer } => {
                ctx.trace(|| format!("#{peer} registers"));
                self.master.connect(ctx, self.peers[peer].conn);
                self.peers[peer].flush(ctx);
            }
            Event::ToMaster { conn, bytes } => self.master.on_bytes(ctx, conn, &bytes),
            Event::MasterSeesClose { conn } => self.master.on_close(ctx, conn),
            Event::MasterTimer { generation } => self.master.on_timer(ctx, generation),
            Event::ToPeer { peer, bytes } => self.peers[peer].on_master_bytes(ctx, &bytes),
            Event::PeerSeesClose { peer } => self.peers[peer].on_master_closed(ctx),
            Event::Data { to, from, frame } => self.peers[to].on_frame(ctx, from, frame),
            Event::Dial {
                to,
                from,
                from_id,
                epoch,
                secret,
            } => self.peers[to].on_dial(ctx, from, from_id, epoch, secret),
            Event::DialAck { to, from, epoch } => self.peers[to].on_dial_ack(ctx, from, epoch),
            Event::LinkDown { to, epoch, .. } => self.peers[to].on_link_down(ctx, epoch),
            Event::Wake { peer } => self.peers[peer].on_wake(ctx),
            Event::Resume { peer } => self.resume(peer),
            Event::FaultTick => self.inject(),
            Event::Check => self.check_hangs(),
        }
    }

    /// A stalled peer runs again and reads, in order, everything that arrived meanwhile.
    fn resume(&mut self, p: usize) {
        let Some(backlog) = self.peers[p].stalled.take() else {
            return; // Killed while stalled.
        };
        let (now, count) = (self.ctx.now, backlog.len());
        self.ctx
            .trace(|| format!("#{p} resumes with {count} events waiting"));
        for (_, event) in backlog {
            self.process(event);
        }
        self.ctx.now = now;
    }

    fn check_hangs(&mut self) {
        let now = self.ctx.now;
        for p in &self.peers {
            if p.active() && now.saturating_sub(p.since) > HANG_BOUND_US {
                let why = format!(
                    "hang: peer {} (#{}) has waited in {:?} since {} us (step {}, topology {:?})",
                    p.id(),
                    p.idx,
                    p.stage,
                    p.since,
                    p.step,
                    p.proto.topology()
                );
                return self.ctx.checker.fail(now, why);
            }
        }
        self.ctx.net.at(now + CHECK_EVERY_US, Event::Check);
    }

    /// Peers that are running, in the ring, and not stalled.
    fn healthy(&self) -> Vec<usize> {
        let ok = |p: &&SimPeer| p.active() && p.stalled.is_none() && p.proto.ring().is_some();
        self.peers.iter().filter(ok).map(|p| p.idx).collect()
    }

    fn inject(&mut self) {
        let f = self.ctx.config.faults;
        let kinds: Vec<Fault> = [
            (f.kill, Fault::Kill),
            (f.stall, Fault::Stall),
            (f.join, Fault::Join),
            (f.drop, Fault::Drop),
            (f.timeout, Fault::Timeout),
        ]
        .into_iter()
        .filter_map(|(on, kind)| on.then_some(kind))
        .collect();
        if self.faults_left == 0 || kinds.is_empty() {
            return;
        }
        let kind = kinds[self.fault_rng.index(kinds.len())];
        if self.apply_fault(kind) {
            self.faults_left -= 1;
        }
        if self.faults_left > 0 {
            let at = self.ctx.now + self.fault_rng.range(1_000, 15_000);
            self.ctx.net.at(at, Event::FaultTick);
        }
    }

    /// Injects one fault; false when no peer can take it now.
    fn apply_fault(&mut self, kind: Fault) -> bool {
        let healthy = self.healthy();
        // A peer whose loss still leaves two healthy members in the ring.
        let left_after = |idx: usize| healthy.len() - usize::from(healthy.contains(&idx));
        let removable: Vec<usize> = self
            .peers
            .iter()
            .filter(|p| p.active() && left_after(p.idx) >= 2)
            .map(|p| p.idx)
            .collect();
        let ctx = &mut self.ctx;
        match kind {
            Fault::Kill => {
                let Some(&p) = pick(&mut self.fault_rng, &removable) else {
                    return false;
                };
                ctx.trace(|| format!("FAULT: kill #{p}"));
                ctx.stats.kills += 1;
                self.peers[p].kill(ctx);
            }
            Fault::Stall => {
                let candidates: Vec<usize> = self
                    .peers
                    .iter()
                    .filter(|p| p.active() && p.stalled.is_none())
                    .map(|p| p.idx)
                    .collect();
                let Some(&p) = pick(&mut self.fault_rng, &candidates) else {
                    return false;
                };
                // A long stall gets the peer kicked: only where the group can lose it.
                let long = removable.contains(&p) && self.fault_rng.chance(1, 2);
                let us = if long {
                    self.fault_rng.range(4_000_000, 8_000_000)
                } else {
                    self.fault_rng.range(100_000, 1_500_000)
                };
                ctx.trace(|| format!("FAULT: stall #{p} for {us} us"));
                ctx.stats.stalls += 1;
                ctx.stats.long_stalls += u64::from(long);
                self.peers[p].stalled = Some(Vec::new());
                ctx.net.at(ctx.now + us, Event::Resume { peer: p });
            }
            Fault::Join => {
                if ctx.stats.joins as usize >= MAX_JOINS {
                    return false;
                }
                ctx.stats.joins += 1;
                let idx = self.peers.len();
                ctx.trace(|| format!("FAULT: join #{idx}"));
                let now = ctx.now;
                self.add_peer(now);
            }
            Fault::Drop => {
                let connected: Vec<usize> = self
                    .peers
                    .iter()
                    .filter(|p| p.active() && p.stalled.is_none() && p.world() >= 2)
                    .filter(|p| p.plane.as_ref().is_some_and(|pl| pl.connected()))
                    .map(|p| p.idx)
                    .collect();
                let Some(&p) = pick(&mut self.fault_rng, &connected) else {
                    return false;
                };
                ctx.trace(|| format!("FAULT: drop the data connections of #{p}"));
                ctx.stats.drops += 1;
                let peer = &mut self.peers[p];
                let outs = peer
                    .plane
                    .as_mut()
                    .map(|pl| pl.fail("injected: connection reset"));
                peer.apply_plane(ctx, outs.unwrap_or_default());
                peer.pump(ctx);
            }
            Fault::Timeout => {
                let waiting: Vec<usize> = self
                    .peers
                    .iter()
                    .filter(|p| p.active() && p.stalled.is_none() && p.world() >= 2)
                    .filter(|p| p.in_flight().is_some())
                    .map(|p| p.idx)
                    .collect();
                let Some(&p) = pick(&mut self.fault_rng, &waiting) else {
                    return false;
                };
                ctx.stats.timeouts += 1;
                self.peers[p].deadline_passed(ctx, &mut self.fault_rng);
            }
        }
        true
    }

    fn describe_ends(&self) -> String {
        let ends: Vec<String> = self
            .peers
            .iter()
            .map(|p| format!("peer {} (#{}): {:?}", p.id(), p.idx, p.stage))
            .collect();
        ends.join("; ")
    }

    fn describe_waiting(&self) -> String {
        let waiting: Vec<String> = self
            .peers
            .iter()
            .filter(|p| p.active())
            .map(|p| format!("peer {} (#{}) waits in {:?}", p.id(), p.idx, p.stage))
            .collect();
        waiting.join("; ")
    }

    /// Every peer ended, and none that the master removed was counted as finishing; and the
    /// group survived: faults always leave two healthy peers, and a short stall (1.5 s plus
    /// delays) is far below the heartbeat timeout (3 s), so at least two peers must finish.
    fn final_checks(&mut self) {
        let finished = self
            .peers
            .iter()
            .filter(|p| p.stage == Stage::Finished)
            .count();
        if finished < 2 {
            let why = format!("only {finished} peer(s) finished: {}", self.describe_ends());
            return self.ctx.checker.fail(self.ctx.now, why);
        }
        for p in &self.peers {
            let removed = self.ctx.checker.removed_at(p.id());
            if let (Some(done), Some(removed), Stage::Finished) = (p.finished_at, removed, &p.stage)
            {
                if removed < done {
                    let why = format!(
                        "peer {} was removed at {removed} us but finished its run at {done} us",
                        p.id()
                    );
                    return self.ctx.checker.fail(self.ctx.now, why);
                }
            }
        }
    }

    pub(crate) fn trace(&self) -> Vec<String> {
        self.ctx.trace.iter().cloned().collect()
    }

    pub(crate) fn failure(&self) -> Option<Failure> {
        let (at_us, message) = self.ctx.checker.failure()?.clone();
        Some(Failure {
            seed: self.ctx.config.seed,
            at_us,
            message,
            digest: self.digest.value(),
            trace: self.trace(),
        })
    }

    /// A failure for a panic inside the run (an assertion of the master or of a peer).
    pub(crate) fn panicked(&self, message: String) -> Failure {
        Failure {
            seed: self.ctx.config.seed,
            at_us: self.ctx.now,
            message: format!("panicked: {message}"),
            digest: self.digest.value(),
            trace: self.trace(),
        }
    }

    pub(crate) fn summary(&self) -> Summary {
        let s = &self.ctx.stats;
        let mut results = Vec::new();
        for p in self.peers.iter().filter(|p| p.stage == Stage::Finished) {
            for (k, seq, epoch, data) in &p.last {
                results.push(PeerResult {
                    peer: p.id(),
                    step: self.ctx.config.steps - 1,
                    k: *k,
                    seq: *seq,
                    members: self
                        .ctx
                        .checker
                        .ring(*epoch)
                        .map(<[_]>::to_vec)
                        .unwrap_or_default(),
                    data: data.clone(),
                });
            }
        }
        Summary {
            seed: self.ctx.config.seed,
            peers: self.ctx.config.peers,
            steps: self.ctx.config.steps,
            faults: self.ctx.config.faults,
            finished: self
                .peers
                .iter()
                .filter(|p| p.stage == Stage::Finished)
                .count(),
            collectives: self.ctx.checker.completed,
            aborted: self.ctx.checker.aborted.len() as u64,
            retries: self.peers.iter().map(|p| p.retries).max().unwrap_or(0),
            epochs: self.ctx.checker.epochs() as u64,
            kills: s.kills,
            stalls: s.stalls,
            long_stalls: s.long_stalls,
            kicked: self
                .peers
                .iter()
                .filter(|p| matches!(&p.stage, Stage::Out(w) if w.contains("removed")))
                .count() as u64,
            joins: s.joins,
            drops: s.drops,
            timeouts: s.timeouts,
            control_messages: s.control_messages,
            data_frames: s.data_frames,
            events: s.events,
            virtual_us: self.ctx.now,
            digest: self.digest.value(),
            results,
            trace: self.trace(),
        }
    }
}

fn pick<'a>(rng: &mut Rng, from: &'a [usize]) -> Option<&'a usize> {
    (!from.is_empty()).then(|| &from[rng.index(from.len())])
}
