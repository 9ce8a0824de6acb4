//! The master in the simulation: the real [`Coordinator`], driven the way `master::server`
//! drives it (bytes reassembled with `split_frame`, decoded with the real codec, outputs applied
//! in order, a close followed by `handle_disconnect`), with virtual instants.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use concord_master::coordinator::{ConnId, Coordinator, CoordinatorConfig, Output};
use concord_master::proto::{decode_peer, encode_master, split_frame, PeerId, ProtoError};

use super::ctx::Ctx;
use super::net::{Event, Link, Time};

fn idx_of(conn: ConnId) -> usize {
    (conn - 1) as usize
}

/// The coordinator and its connections.
#[derive(Debug)]
pub(crate) struct SimMaster {
    coord: Coordinator,
    /// Virtual time zero: every instant handed to the coordinator is `base + t`.
    base: Instant,
    open: BTreeSet<ConnId>,
    rx: BTreeMap<ConnId, Vec<u8>>,
    /// Peer id of each connection, learnt from the `Welcome` the master sent on it.
    ids: BTreeMap<ConnId, PeerId>,
    /// The scheduled timer: (due, generation); an older generation's event is stale.
    timer: Option<(Time, u64)>,
    generation: u64,
}

impl SimMaster {
    pub(crate) fn new(config: CoordinatorConfig) -> Self {
        SimMaster {
            coord: Coordinator::new(config),
            base: Instant::now(),
            open: BTreeSet::new(),
            rx: BTreeMap::new(),
            ids: BTreeMap::new(),
            timer: None,
            generation: 0,
        }
    }

    fn instant(&self, t: Time) -> Instant {
        self.base + Duration::from_micros(t)
    }

    fn time(&self, at: Instant) -> Time {
        // Rounded up: a deadline is never seen before it is due.
        at.saturating_duration_since(self.base)
            .as_nanos()
            .div_ceil(1000) as Time
    }

    /// The peers the coordinator knows (accepted and pending).
    pub(crate) fn known(&self) -> BTreeSet<PeerId> {
        self.coord
            .accepted()
            .into_iter()
            .chain(self.coord.pending())
            .collect()
    }

    /// A peer opens its connection.
    pub(crate) fn connect(&mut self, ctx: &mut Ctx, conn: ConnId) {
        let idx = idx_of(conn);
        let ip = IpAddr::V4(Ipv4Addr::new(10, 0, (idx >> 8) as u8, idx as u8));
        assert!(self.open.insert(conn), "connection {conn} opened twice");
        self.coord.handle_connect(conn, ip, self.instant(ctx.now));
        self.drain(ctx);
    }

    /// Bytes arrive on a connection.
    pub(crate) fn on_bytes(&mut self, ctx: &mut Ctx, conn: ConnId, bytes: &[u8]) {
        if !self.open.contains(&conn) {
            return; // The server forgot the connection: late bytes go nowhere.
        }
        let now = self.instant(ctx.now);
        let mut buf = self.rx.remove(&conn).unwrap_or_default();
        buf.extend_from_slice(bytes);
        let mut consumed = 0;
        while self.open.contains(&conn) {
            match split_frame(&buf[consumed..]) {
                Ok(Some((body, used))) => {
                    consumed += used;
                    match decode_peer(body) {
                        Ok(msg) => {
                            ctx.trace(|| format!("master <- #{}: {msg:?}", idx_of(conn)));
                            self.coord.handle_message(conn, msg, now);
                        }
                        Err(ProtoError::Version { theirs, .. }) => {
                            self.coord.handle_version_mismatch(conn, theirs, now);
                        }
                        Err(e) => self.coord.handle_malformed(conn, &e.to_string(), now),
                    }
                    self.drain(ctx);
                }
                Ok(None) => break,
                Err(e) => {
                    self.coord.handle_malformed(conn, &e.to_string(), now);
                    self.drain(ctx);
                }
            }
        }
        buf.drain(..consumed);
        if self.open.contains(&conn) && !buf.is_empty() {
            self.rx.insert(conn, buf);
        }
    }

    /// The peer's end of the connection closed.
    pub(crate) fn on_close(&mut self, ctx: &mut Ctx, conn: ConnId) {
        if self.open.remove(&conn) {
            self.rx.remove(&conn);
            ctx.trace(|| format!("master: connection of #{} closed", idx_of(conn)));
            self.coord.handle_disconnect(conn, self.instant(ctx.now));
            self.drain(ctx);
        }
    }

    pub(crate) fn on_timer(&mut self, ctx: &mut Ctx, generation: u64) {
        if self.timer.map(|t| t.1) != Some(generation) {
            return; // Superseded by a later deadline.
        }
        self.timer = None;
        self.coord.handle_timeout(self.instant(ctx.now));
        self.drain(ctx);
    }

    /// Applies every output, in order, then re-arms the timer.
    fn drain(&mut self, ctx: &mut Ctx) {
        let known = self.known();
        let mut closed = Vec::new();
        while let Some(out) = self.coord.poll_output() {
            match out {
                Output::Send { conn, msg } => {
                    if !self.open.contains(&conn) {
                        continue;
                    }
                    if let concord_master::proto::MasterMsg::Welcome { peer_id, .. } = &msg {
                        self.ids.insert(conn, *peer_id);
                    }
                    if let Some(to) = self.ids.get(&conn) {
                        ctx.checker.on_master_send(ctx.now, *to, &msg, &known);
                    }
                    ctx.trace(|| format!("master -> #{}: {msg:?}", idx_of(conn)));
                    ctx.stats.control_messages += 1;
                    let link = Link::Down(idx_of(conn));
                    ctx.net
                        .send_control(ctx.now, link, conn, encode_master(&msg));
                }
                Output::Close { conn } => {
                    if self.open.remove(&conn) {
                        self.rx.remove(&conn);
                        let peer = idx_of(conn);
                        // After everything queued for it (the server flushes, then closes).
                        ctx.net
                            .send(ctx.now, Link::Down(peer), 0, Event::PeerSeesClose { peer });
                        closed.push(conn);
                    }
                }
            }
        }
        ctx.checker.on_registered(ctx.now, known);
        // As the server does: a connection it closed is then dropped, which it reports.
        for conn in closed {
            self.coord.handle_disconnect(conn, self.instant(ctx.now));
            self.drain(ctx);
        }
        let due = self.coord.poll_timeout().map(|at| self.time(at));
        if due != self.timer.map(|t| t.0) {
            self.generation += 1;
            self.timer = due.map(|t| (t, self.generation));
            if let Some(t) = due {
                let generation = self.generation;
                ctx.net
                    .at(t.max(ctx.now), Event::MasterTimer { generation });
            }
        }
    }
}
