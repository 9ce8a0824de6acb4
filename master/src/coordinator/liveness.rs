//! Liveness: connections that never say hello are closed, and while anything waits on the peers
//! every accepted peer is pinged and kicked when it stays silent.
//!
//! Heartbeats run only while a vote, round, collective or sync is under way: an idle group costs
//! nothing, and a peer stalled in the middle of an operation is removed (so the survivors'
//! operations abort naming it) instead of being waited on forever. Any message from a peer proves
//! it alive, not only the `Pong` that answers a ping.

use std::time::Instant;

use super::state::{Conn, ConnId, Coordinator};
use crate::proto::MasterMsg;

impl Coordinator {
    /// Pings accepted peers and kicks those that did not answer the previous ping in time.
    pub(super) fn heartbeat(&mut self, now: Instant) {
        let timeout = self.config.heartbeat_timeout;
        let mut silent = Vec::new();
        let mut ping = Vec::new();
        for (id, p) in self.peers.iter_mut().filter(|(_, p)| p.accepted) {
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
                Conn::AwaitingHello { deadline, .. } if *deadline <= now => Some(*id),
                _ => None,
            })
            .collect();
        for conn in late {
            let ms = self.config.hello_timeout.as_millis();
            self.kick_conn(conn, &format!("no hello within {ms} ms"));
        }
    }

    /// Starts the heartbeat when something comes under way (every peer gets a fresh ping) and
    /// stops it when nothing is left.
    pub(super) fn arm_heartbeat(&mut self) {
        match (self.active(), self.next_heartbeat, self.now) {
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
}
