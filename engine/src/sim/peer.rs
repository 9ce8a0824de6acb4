//! A simulated peer: the real [`PeerProto`] with a thin shell around it, as `crate::peer`, `crate::control`
//! and `crate::api` build one: master bytes are reassembled and decoded with the real codec
//! and fed to the protocol, its effects drive the data [`Plane`], what it queues for the master
//! is encoded and sent. The training loop on top of it is in `driver.rs`.

use std::collections::BTreeMap;

use concord_kernels::ReduceOp;
use concord_master::coordinator::ConnId;
use concord_master::proto::CollKind;
use concord_master::proto::{decode_master, encode_peer, split_frame, PeerId, PeerMsg};

use super::ctx::Ctx;
use super::net::{Event, Frame, Link, Time};
use super::plane::{Plane, PlaneOut};
use super::rng::Rng;
use crate::protocol::{Effect, PeerProto};

/// Where the peer's training loop stands (see `driver.rs`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Stage {
    /// In a topology vote (registered and waiting to be admitted, or updating): waiting for
    /// the master's ring or verdict.
    Topology,
    /// Opening the connections of `epoch`.
    Connecting { epoch: u64 },
    /// Connections reported; waiting for `TopologyDone` or `TopologyFailed`.
    Confirming,
    /// The step-agreement collective is in flight.
    Sync,
    /// The step's data collectives are in flight.
    Batch,
    /// Computing between steps (a `Wake` event ends it).
    Compute,
    /// The pending-peers vote is in flight.
    Pending,
    /// Ran every step and left.
    Finished,
    /// Out of the run: killed, removed by the master, or left alone.
    Out(String),
}

/// One collective this peer launched, until its outcome is taken.
#[derive(Debug)]
pub(crate) struct Launch {
    /// Which collective, with which root (a ring position).
    pub(crate) kind: CollKind,
    pub(crate) root: usize,
    pub(crate) op: ReduceOp,
    pub(crate) input: Vec<f32>,
    /// Which data collective of the step (`None`: the agreement collective).
    pub(crate) k: Option<usize>,
    /// (seq, epoch) of the attempt the master let go.
    pub(crate) running: Option<(u64, u64)>,
    /// The reduced buffer, once the ring part of that attempt finished here.
    pub(crate) output: Option<Vec<u8>>,
    /// `Some(ok)` once the protocol gave its outcome.
    pub(crate) ended: Option<bool>,
}

/// One peer of the simulation.
#[derive(Debug)]
pub(crate) struct SimPeer {
    pub(crate) idx: usize,
    pub(crate) conn: ConnId,
    pub(crate) proto: PeerProto,
    pub(crate) alive: bool,
    /// While stalled: the events it has not processed yet, in arrival order.
    pub(crate) stalled: Option<Vec<(Time, Event)>>,
    rx: Vec<u8>,
    pub(crate) plane: Option<Plane>,
    /// Dials for an epoch this peer has not reached yet (the listen backlog).
    dials: Vec<(usize, PeerId, u64, u64)>,
    // The training loop (driver.rs).
    pub(crate) stage: Stage,
    /// When the current wait began (the hang bound is measured from it).
    pub(crate) since: Time,
    pub(crate) step: u64,
    pub(crate) step_known: bool,
    pub(crate) todo: Vec<usize>,
    pub(crate) retrying: bool,
    /// The retry under way re-runs failed data collectives (not the agreement collective).
    pub(crate) batch_failed: bool,
    pub(crate) attempts: usize,
    pub(crate) rounds: usize,
    pub(crate) launches: BTreeMap<u64, Launch>,
    pub(crate) retries: u64,
    pub(crate) finished_at: Option<Time>,
    /// Results of the last step this peer completed: (k, epoch, reduced values).
    pub(crate) last: Vec<(usize, u64, u64, Vec<f32>)>,
    pub(crate) rng: Rng,
}

impl SimPeer {
    pub(crate) fn new(idx: usize, rng: Rng, now: Time) -> Self {
        SimPeer {
            idx,
            conn: super::ctx::conn_of(idx),
            proto: PeerProto::new(data_port(idx), String::new()),
            alive: true,
            stalled: None,
            rx: Vec::new(),
            plane: None,
            dials: Vec::new(),
            stage: Stage::Topology,
            since: now,
            step: 0,
            step_known: false,
            todo: Vec::new(),
            retrying: false,
            batch_failed: false,
            attempts: 0,
            rounds: 0,
            launches: BTreeMap::new(),
            retries: 0,
            finished_at: None,
            last: Vec::new(),
            rng,
        }
    }

    /// The id the master gave, or 0 before the welcome.
    pub(crate) fn id(&self) -> PeerId {
        self.proto.peer_id().unwrap_or(0)
    }

    /// Size of the ring in force (0 before the first).
    pub(crate) fn world(&self) -> usize {
        self.proto.ring().map_or(0, |r| r.1.len())
    }

    /// Still taking part (not finished, not out).
    pub(crate) fn active(&self) -> bool {
        self.alive && !matches!(self.stage, Stage::Finished | Stage::Out(_))
    }

    /// Sends what the protocol queued for the master.
    pub(crate) fn flush(&mut self, ctx: &mut Ctx) {
        while let Some(msg) = self.proto.poll_transmit() {
            if self.alive {
                self.send(ctx, &msg);
            }
        }
    }

    fn send(&mut self, ctx: &mut Ctx, msg: &PeerMsg) {
        ctx.trace(|| format!("#{} -> master: {msg:?}", self.idx));
        ctx.stats.control_messages += 1;
        let link = Link::Up(self.idx);
        ctx.net
            .send_control(ctx.now, link, self.conn, encode_peer(msg));
    }

    /// Bytes from the master: reassemble, decode, handle, one message at a time.
    pub(crate) fn on_master_bytes(&mut self, ctx: &mut Ctx, bytes: &[u8]) {
        self.rx.extend_from_slice(bytes);
        let mut consumed = 0;
        while self.alive {
            let (msg, used) = match split_frame(&self.rx[consumed..]) {
                Ok(Some((body, used))) => (decode_master(body), used),
                Ok(None) => break,
                Err(e) => (Err(e), 0),
            };
            let msg = match msg {
                Ok(m) => m,
                Err(e) => {
                    let why = format!("peer {}: undecodable master message: {e}", self.id());
                    ctx.checker.fail(ctx.now, why);
                    return;
                }
            };
            consumed += used;
            ctx.trace(|| format!("#{} <- master: {msg:?}", self.idx));
            match self.proto.handle(msg) {
                Ok(effects) => self.apply(ctx, effects),
                Err(e) => {
                    let why = format!("peer {}: the master broke the protocol: {e}", self.id());
                    ctx.checker.fail(ctx.now, why);
                }
            }
            self.flush(ctx);
            self.pump(ctx);
        }
        self.rx.drain(..consumed);
    }

    /// The master closed the connection (after kicking this peer).
    pub(crate) fn on_master_closed(&mut self, ctx: &mut Ctx) {
        let effects = self.proto.master_lost(crate::Error::MasterLost(
            "the master closed the connection".into(),
        ));
        self.apply(ctx, effects);
        self.pump(ctx);
    }

    fn apply(&mut self, ctx: &mut Ctx, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::Run { tag, seq } => self.run(ctx, tag, seq),
                Effect::Retire { tag, seq } => {
                    if let Some(plane) = &mut self.plane {
                        plane.retire(tag, seq);
                    }
                }
                Effect::BreakRing => {
                    let outs = self.plane.as_mut().map(|p| p.fail("the ring lost a peer"));
                    self.apply_plane(ctx, outs.unwrap_or_default());
                }
            }
        }
    }

    /// Starts the data movement of an attempt the master let go (as `peer::Inner::run`).
    fn run(&mut self, ctx: &mut Ctx, tag: u64, seq: u64) {
        let (epoch, ring) = self
            .proto
            .ring()
            .expect("collectives run on a ring")
            .clone();
        let me = self.id();
        let rank = ring
            .iter()
            .position(|m| m.peer_id == me)
            .expect("a peer is in its ring");
        let sub_elems = ctx.config.sub_elems;
        let Some(launch) = self.launches.get_mut(&tag) else {
            let why = format!("peer {me}: told to run tag {tag}, which it never launched");
            return ctx.checker.fail(ctx.now, why);
        };
        launch.running = Some((seq, epoch));
        launch.output = None;
        let src: Vec<u8> = launch.input.iter().flat_map(|x| x.to_ne_bytes()).collect();
        let (op, kind, root) = (launch.op, launch.kind, launch.root);
        let outs = match &mut self.plane {
            Some(plane) if plane.epoch == epoch => {
                plane.register(tag, seq, kind, root, rank, sub_elems, op, src)
            }
            _ => vec![PlaneOut::Finished {
                tag,
                seq,
                result: Err("this peer has no ring connections".into()),
            }],
        };
        self.apply_plane(ctx, outs);
    }

    /// Carries out what the plane asked for.
    pub(crate) fn apply_plane(&mut self, ctx: &mut Ctx, outs: Vec<PlaneOut>) {
        let from = self.idx;
        for out in outs {
            match out {
                PlaneOut::Frame { to, frame } => {
                    ctx.stats.data_frames += 1;
                    let link = Link::Data {
                        from,
                        to,
                        epoch: frame.epoch,
                    };
                    let bytes = frame.payload.len() + 32;
                    ctx.net
                        .send(ctx.now, link, bytes, Event::Data { to, from, frame });
                }
                PlaneOut::Dial { to, epoch, secret } => {
                    let from_id = self.id();
                    let link = Link::Data { from, to, epoch };
                    let dial = Event::Dial {
                        to,
                        from,
                        from_id,
                        epoch,
                        secret,
                    };
                    ctx.net.send(ctx.now, link, 32, dial);
                }
                PlaneOut::DialAck { to, epoch } => {
                    let link = Link::Data { from, to, epoch };
                    ctx.net
                        .send(ctx.now, link, 32, Event::DialAck { to, from, epoch });
                }
                PlaneOut::LinkDown { to, epoch } => {
                    let link = Link::Data { from, to, epoch };
                    ctx.net
                        .send(ctx.now, link, 0, Event::LinkDown { to, from, epoch });
                }
                PlaneOut::Finished { tag, seq, result } => {
                    let result = match result {
                        Ok(output) => {
                            if let Some(l) = self.launches.get_mut(&tag) {
                                if l.running.map(|r| r.0) == Some(seq) {
                                    l.output = Some(output);
                                }
                            }
                            Ok(())
                        }
                        Err(e) => Err(e),
                    };
                    self.proto.collective_finished(tag, seq, result);
                }
            }
        }
        self.flush(ctx);
    }

    /// A data frame from the predecessor.
    pub(crate) fn on_frame(&mut self, ctx: &mut Ctx, from: usize, frame: Frame) {
        let outs = match &mut self.plane {
            Some(plane) => plane.on_frame(from, frame),
            None => Vec::new(),
        };
        self.apply_plane(ctx, outs);
        self.pump(ctx);
    }

    /// The predecessor's hello for `epoch`.
    pub(crate) fn on_dial(
        &mut self,
        ctx: &mut Ctx,
        from: usize,
        id: PeerId,
        epoch: u64,
        secret: u64,
    ) {
        let current = self.plane.as_ref().map_or(0, |p| p.epoch);
        if epoch > current {
            // Not there yet: the connection waits in the listen backlog.
            self.dials.push((from, id, epoch, secret));
            return;
        }
        let outs = match &mut self.plane {
            Some(plane) => plane.on_dial(from, id, epoch, secret),
            None => Vec::new(),
        };
        self.apply_plane(ctx, outs);
        self.pump(ctx);
    }

    pub(crate) fn on_dial_ack(&mut self, ctx: &mut Ctx, from: usize, epoch: u64) {
        if let Some(plane) = &mut self.plane {
            plane.on_dial_ack(from, epoch);
        }
        self.pump(ctx);
    }

    pub(crate) fn on_link_down(&mut self, ctx: &mut Ctx, epoch: u64) {
        let outs = self.plane.as_mut().map(|p| p.on_link_down(epoch));
        self.apply_plane(ctx, outs.unwrap_or_default());
        self.pump(ctx);
    }

    /// Replaces the plane by one for a new epoch, and accepts the dials that were waiting.
    pub(crate) fn install_plane(&mut self, ctx: &mut Ctx, plane: Plane, dial: Vec<PlaneOut>) {
        self.close_plane(ctx);
        let epoch = plane.epoch;
        self.plane = Some(plane);
        self.apply_plane(ctx, dial);
        let waiting = std::mem::take(&mut self.dials);
        for (from, id, e, secret) in waiting {
            if e == epoch {
                let outs = self
                    .plane
                    .as_mut()
                    .expect("just set")
                    .on_dial(from, id, e, secret);
                self.apply_plane(ctx, outs);
            } else if e > epoch {
                self.dials.push((from, id, e, secret));
            }
        }
    }

    /// Drops the plane: its connections close.
    pub(crate) fn close_plane(&mut self, ctx: &mut Ctx) {
        if let Some(old) = self.plane.take() {
            let outs = old.close();
            self.apply_plane(ctx, outs);
        }
    }

    /// The peer vanishes (SIGKILL): its connections close, nothing more runs.
    pub(crate) fn kill(&mut self, ctx: &mut Ctx) {
        self.alive = false; // First: a dead process sends nothing, only its sockets close.
        self.close_plane(ctx);
        self.stalled = None;
        self.stage = Stage::Out("killed".into());
        let conn = self.conn;
        ctx.net.send(
            ctx.now,
            Link::Up(self.idx),
            0,
            Event::MasterSeesClose { conn },
        );
    }

    /// The peer leaves: says goodbye (as dropping a `Communicator` does) and closes.
    pub(crate) fn leave(&mut self, ctx: &mut Ctx, stage: Stage) {
        ctx.trace(|| format!("#{} leaves: {stage:?}", self.idx));
        self.close_plane(ctx);
        if self.proto.fatal().is_none() {
            self.send(ctx, &PeerMsg::Goodbye);
        }
        self.alive = false;
        self.stage = stage;
        let conn = self.conn;
        ctx.net.send(
            ctx.now,
            Link::Up(self.idx),
            0,
            Event::MasterSeesClose { conn },
        );
    }
}

/// The data port a peer advertises (its ring address is "10.0.x.y:port").
pub(crate) fn data_port(idx: usize) -> u16 {
    20_000 + (idx % 40_000) as u16
}
