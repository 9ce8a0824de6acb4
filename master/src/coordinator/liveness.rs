//! Liveness and limits: connections that never say hello are closed, peers that no vote admits
//! are refused after a deadline, connections beyond the limits are refused at once, and while
//! anything waits on the peers every peer is pinged and kicked when it stays silent.
//!
//! Heartbeats run only while a vote, round, collective or sync is under way, or while peers wait
//! to be admitted (then only those are pinged): an idle group costs nothing, a peer stalled in
//! the middle of an operation is removed (so the survivors' operations abort naming it) instead
//! of being waited on forever, and a waiting peer that hangs does not keep its slot. Any message
//! from a peer proves it alive, not only the `Pong` that answers a ping.
//!
//! Refusals for the connection limits are logged once per address per minute, so that a flood
//! of connections cannot flood the log.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use concord_transport::PROTOCOL_VERSION;

use super::state::{
    Conn, ConnId, Coordinator, Ledger, Output, MAX_REFUSAL_LOG_ADDRS, REFUSAL_LOG_INTERVAL,
};
use crate::proto::{MasterMsg, PeerId};

impl Coordinator {
    /// Pings the peers being watched and kicks those that did not answer the previous ping in
    /// time. Accepted peers are watched only while something waits on them; pending peers always.
    pub(super) fn heartbeat(&mut self, now: Instant) {
        let timeout = self.config.heartbeat_timeout;
        let active = self.active();
        let mut silent = Vec::new();
        let mut ping = Vec::new();
        for (id, p) in self.peers.iter_mut() {
            if p.accepted && !active {
                p.ping_sent_at = None; // Not watched now: a later operation starts afresh.
                continue;
            }
            match p.ping_sent_at {
                Some(at) if now.saturating_duration_since(at) >= timeout => {
                    silent.push((*id, p.conn))
                }
                Some(_) => {}
                None => {
                    p.ping_sent_at = Some(now);
                    ping.push(*id);
                }
            }
        }
        for id in ping {
            self.send(id, MasterMsg::Ping);
        }
        for (id, conn) in silent {
            let ms = timeout.as_millis();
            tracing::warn!("peer {id} silent for {ms} ms; removing it");
            self.kick_conn(
                conn,
                &format!("no answer to heartbeats for {ms} ms: stalled, hung or cut off"),
            );
        }
    }

    /// Kicks the connections whose hello deadline has passed.
    pub(super) fn expire_hellos(&mut self, now: Instant) {
        let late: Vec<ConnId> = self
            .conns
            .iter()
            .filter_map(|(id, c)| match c {
                Conn::AwaitingHello { deadline, .. } | Conn::AwaitingProof { deadline, .. }
                    if *deadline <= now =>
                {
                    Some(*id)
                }
                _ => None,
            })
            .collect();
        for conn in late {
            let ms = self.config.hello_timeout.as_millis();
            self.kick_conn(conn, &format!("no hello and proof within {ms} ms"));
        }
    }

    /// Refuses the peers that waited longer than `pending_timeout` to be admitted.
    pub(super) fn expire_pending(&mut self, now: Instant) {
        let timeout = self.config.pending_timeout;
        let late: Vec<PeerId> = self
            .pending_since
            .iter()
            .filter(|(_, since)| now.saturating_duration_since(**since) >= timeout)
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            self.pending_since.remove(&id);
            let Some(conn) = self.peers.get(&id).map(|p| p.conn) else {
                continue;
            };
            let reason = format!(
                "not admitted within {} s: the group's members did not all call update_topology",
                timeout.as_secs_f64()
            );
            tracing::warn!("peer {id} refused: {reason}");
            self.out.push_back(Output::Send {
                conn,
                msg: MasterMsg::Refused {
                    version: PROTOCOL_VERSION,
                    reason,
                },
            });
            self.close(conn, "not admitted in time");
        }
    }

    /// The earliest admission deadline of a pending peer.
    pub(super) fn pending_deadline(&self) -> Option<Instant> {
        let earliest = self.pending_since.values().min()?;
        Some(*earliest + self.config.pending_timeout)
    }

    /// Keeps `pending_since` to the peers still waiting: a new one is stamped with the latest
    /// input's time (its hello), an admitted or departed one is forgotten.
    pub(super) fn track_pending(&mut self) {
        let peers = &self.peers;
        self.pending_since
            .retain(|id, _| peers.get(id).is_some_and(|p| !p.accepted));
        let Some(now) = self.now else { return };
        for (id, _) in self.peers.iter().filter(|(_, p)| !p.accepted) {
            self.pending_since.entry(*id).or_insert(now);
        }
    }

    /// Starts the heartbeat when something comes under way or a peer waits to be admitted
    /// (every peer gets a fresh ping) and stops it when nothing is left.
    pub(super) fn arm_heartbeat(&mut self) {
        let wanted = self.active() || !self.pending_since.is_empty();
        match (wanted, self.next_heartbeat, self.now) {
            (true, None, Some(now)) => {
                for p in self.peers.values_mut() {
                    p.ping_sent_at = None;
                }
                self.next_heartbeat = Some(now + self.config.heartbeat_interval);
            }
            (false, Some(_), _) => self.next_heartbeat = None,
            _ => {}
        }
    }

    /// Why a new connection from `ip` must be refused, if the limits say so.
    pub(super) fn over_limit(&self, ip: IpAddr) -> Option<String> {
        let total = self.ledger.ips.len();
        if total >= self.config.max_connections {
            return Some(format!(
                "the master has too many connections ({total}, at most {}); close idle connections or raise the master's --max-connections",
                self.config.max_connections
            ));
        }
        let from_ip = self.ledger.per_ip.get(&ip).copied().unwrap_or(0);
        if from_ip >= self.config.max_connections_per_ip {
            return Some(format!(
                "too many connections from {ip} ({from_ip}, at most {}); close idle connections or raise the master's --max-connections-per-ip",
                self.config.max_connections_per_ip
            ));
        }
        None
    }

    /// Logs a refused connection: once per address per minute, and a count of the rest when
    /// the addresses remembered are too many.
    pub(super) fn log_refusal(&mut self, ip: IpAddr, reason: &str, now: Instant) {
        let log = &mut self.refusals;
        let recent = |at: &Instant| now.saturating_duration_since(*at) < REFUSAL_LOG_INTERVAL;
        let prune_due = log
            .pruned_at
            .is_none_or(|at| now.saturating_duration_since(at) >= Duration::from_secs(1));
        if log.logged_at.len() >= MAX_REFUSAL_LOG_ADDRS && prune_due {
            log.logged_at.retain(|_, at| recent(at));
            log.pruned_at = Some(now);
        }
        let due = match log.logged_at.get(&ip) {
            Some(at) => !recent(at),
            None => log.logged_at.len() < MAX_REFUSAL_LOG_ADDRS,
        };
        if due {
            log.logged_at.insert(ip, now);
            tracing::warn!(
                "refused a connection from {ip}: {reason} (further refusals of this address are not logged for {} s)",
                REFUSAL_LOG_INTERVAL.as_secs()
            );
            return;
        }
        log.unlogged += 1;
        match log.summary_at {
            None => log.summary_at = Some(now),
            Some(at) if !recent(&at) => {
                tracing::warn!(
                    "refused {} more connections in the last {} s (each address is logged once in that time)",
                    log.unlogged,
                    REFUSAL_LOG_INTERVAL.as_secs()
                );
                log.unlogged = 0;
                log.summary_at = Some(now);
            }
            Some(_) => {}
        }
    }
}

impl Ledger {
    /// Counts an open connection.
    pub(super) fn open(&mut self, conn: ConnId, ip: IpAddr) {
        let previous = self.ips.insert(conn, ip);
        assert!(previous.is_none(), "connection id {conn} reused while open");
        *self.per_ip.entry(ip).or_insert(0) += 1;
    }

    /// Stops counting a connection (nothing when it was never counted).
    pub(super) fn close(&mut self, conn: ConnId) {
        let Some(ip) = self.ips.remove(&conn) else {
            return;
        };
        match self.per_ip.get_mut(&ip) {
            Some(n) if *n > 1 => *n -= 1,
            Some(_) => {
                self.per_ip.remove(&ip);
            }
            None => debug_assert!(false, "connection {conn} of {ip} was not counted"),
        }
    }
}
