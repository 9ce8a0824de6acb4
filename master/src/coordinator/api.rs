//! The coordinator's surface: inputs come in through `handle_*` with the current time, outputs
//! leave through `poll_*`, and after every input each pending vote is checked again.
//!
//! This is the one file that routes: a peer's message goes to the job that owns it (membership,
//! topology, collectives, shared state), and `reevaluate` asks each job in turn
//! whether its vote is complete, so that a vote never waits on a peer that is gone.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Instant;

use concord_transport::PROTOCOL_VERSION;

use super::membership::kind;
use super::state::{Conn, ConnId, Coordinator, Output};
use crate::proto::{MasterMsg, PeerId, PeerMsg, MAX_MESSAGE_BYTES, MAX_STRING_BYTES};

/// The largest message a connection may send before it is registered: a `Hello` with the
/// longest string, or a `Proof`.
pub const MAX_UNREGISTERED_MESSAGE_BYTES: usize = MAX_STRING_BYTES + 256;

impl Coordinator {
    /// Next output for the I/O shell.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// When [`Coordinator::handle_timeout`] must next be called, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.conns
            .values()
            .filter_map(|c| match c {
                Conn::AwaitingHello { deadline, .. } | Conn::AwaitingProof { deadline, .. } => {
                    Some(*deadline)
                }
                Conn::Peer(_) => None,
            })
            .chain(self.next_heartbeat)
            .chain(self.pending_deadline())
            .min()
    }

    /// Accepted peers, in ring order once a ring is built.
    pub fn accepted(&self) -> Vec<PeerId> {
        self.peers
            .iter()
            .filter(|(_, p)| p.accepted)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Registered peers still waiting to be admitted.
    pub fn pending(&self) -> Vec<PeerId> {
        self.peers
            .iter()
            .filter(|(_, p)| !p.accepted)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Number of open connections (peers and those still to say hello).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// The largest message (length prefix included) connection `conn` may send now:
    /// [`MAX_UNREGISTERED_MESSAGE_BYTES`] until it is a registered peer, then
    /// [`MAX_MESSAGE_BYTES`]. The I/O shell refuses longer ones before buffering them.
    pub fn message_limit(&self, conn: ConnId) -> usize {
        match self.conns.get(&conn) {
            Some(Conn::Peer(_)) => MAX_MESSAGE_BYTES,
            _ => MAX_UNREGISTERED_MESSAGE_BYTES,
        }
    }

    /// Collectives in flight (voting or running).
    pub fn collectives_in_flight(&self) -> usize {
        self.colls.len()
    }

    /// A new connection from `ip`. Beyond `max_connections` in all or `max_connections_per_ip`
    /// from `ip`, it is refused (a `Refused` naming the limit, then closed) and not counted.
    pub fn handle_connect(&mut self, conn: ConnId, ip: IpAddr, now: Instant) {
        self.now = Some(now);
        if let Some(reason) = self.over_limit(ip) {
            self.log_refusal(ip, &reason, now);
            self.out.push_back(Output::Send {
                conn,
                msg: MasterMsg::Refused {
                    version: PROTOCOL_VERSION,
                    reason,
                },
            });
            self.out.push_back(Output::Close { conn });
            return;
        }
        self.ledger.open(conn, ip);
        let deadline = now + self.config.hello_timeout;
        let previous = self
            .conns
            .insert(conn, Conn::AwaitingHello { ip, deadline });
        assert!(previous.is_none(), "connection id {conn} reused while open");
    }

    /// The I/O shell dropped the connection: the peer closed it, an I/O error broke it, or the
    /// shell closed it after an [`Output::Close`]. The shell reports every connection it drops,
    /// once; until then the connection counts against the connection limits.
    pub fn handle_disconnect(&mut self, conn: ConnId, now: Instant) {
        self.now = Some(now);
        self.ledger.close(conn);
        if let Some(Conn::Peer(id)) = self.conns.remove(&conn) {
            self.remove_peer(id, &format!("peer {id} disconnected"));
        }
        self.reevaluate();
    }

    /// The connection sent bytes that do not decode: kick it.
    pub fn handle_malformed(&mut self, conn: ConnId, error: &str, now: Instant) {
        self.now = Some(now);
        self.kick_conn(conn, &format!("malformed message: {error}"));
        self.reevaluate();
    }

    /// The connection speaks another protocol version: refuse it, naming both versions.
    pub fn handle_version_mismatch(&mut self, conn: ConnId, theirs: u32, now: Instant) {
        self.now = Some(now);
        let reason = format!(
            "protocol version mismatch: the master speaks version {PROTOCOL_VERSION}, this peer speaks {theirs}; run the same Concord release on every machine"
        );
        self.out.push_back(Output::Send {
            conn,
            msg: MasterMsg::Refused {
                version: PROTOCOL_VERSION,
                reason,
            },
        });
        self.close(conn, "version mismatch");
        self.reevaluate();
    }

    /// Deadlines: connections that never said hello are closed, peers never admitted are
    /// refused, and heartbeats are sent.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = Some(now);
        if self.next_heartbeat.is_some_and(|t| t <= now) {
            self.next_heartbeat = Some(now + self.config.heartbeat_interval);
            self.heartbeat(now);
        }
        self.expire_hellos(now);
        self.expire_pending(now);
        self.reevaluate();
    }

    /// A decoded message from a connection.
    pub fn handle_message(&mut self, conn: ConnId, msg: PeerMsg, now: Instant) {
        self.now = Some(now);
        match self.conns.get(&conn) {
            None => {} // Already closed; late bytes are ignored.
            Some(Conn::AwaitingHello { ip, deadline }) => {
                let (ip, deadline) = (*ip, *deadline);
                self.on_hello(conn, ip, deadline, msg);
            }
            Some(Conn::AwaitingProof { .. }) => self.on_proof(conn, msg),
            Some(Conn::Peer(id)) => {
                let id = *id;
                if let Some(p) = self.peers.get_mut(&id) {
                    p.ping_sent_at = None; // Anything it says proves it alive.
                }
                if let Err(reason) = self.on_peer_message(id, msg) {
                    self.kick_conn(conn, &reason);
                }
            }
        }
        self.reevaluate();
    }

    /// Applies a message from a registered peer; `Err` means "kick with this reason".
    fn on_peer_message(&mut self, id: PeerId, msg: PeerMsg) -> Result<(), String> {
        let accepted = self.peers[&id].accepted;
        match msg {
            PeerMsg::Goodbye => {
                self.on_goodbye(id);
                Ok(())
            }
            PeerMsg::Hello { .. } => Err("sent Hello twice".into()),
            PeerMsg::Proof { .. } => Err("sent a proof after being welcomed".into()),
            PeerMsg::Pong => Ok(()),
            PeerMsg::SyncVote { .. } | PeerMsg::SyncDone { .. } if !accepted => {
                Err("sent a shared-state message before being admitted to the group".into())
            }
            PeerMsg::SyncVote {
                revision,
                strategy,
                entries,
            } => self.on_sync_vote(id, revision, &strategy, entries),
            PeerMsg::SyncDone {
                revision,
                ok,
                detail,
            } => self.on_sync_done(id, revision, ok, &detail),
            other if !accepted => Err(format!(
                "sent {} before being admitted to the group",
                kind(&other)
            )),
            PeerMsg::AcceptVote | PeerMsg::RepairVote => {
                self.on_topology_vote(id, matches!(msg, PeerMsg::AcceptVote))
            }
            PeerMsg::OrderVote { order } => self.on_order_vote(id, order),
            PeerMsg::PendingQuery => self.on_pending_query(id),
            PeerMsg::ConnectResult { epoch, ok, detail } => {
                self.on_connect_result(id, epoch, ok, detail)
            }
            PeerMsg::CollInit { tag, desc } => self.on_coll_init(id, tag, desc),
            PeerMsg::CollComplete {
                tag,
                seq,
                ok,
                detail,
            } => self.on_coll_complete(id, tag, seq, ok, detail),
            PeerMsg::CollCancel {
                tag,
                seq,
                kind,
                reason,
            } => self.on_coll_cancel(id, tag, seq, kind, &reason),
        }
    }

    /// Re-checks every vote; called after every input.
    fn reevaluate(&mut self) {
        let accepted: BTreeSet<PeerId> = self.accepted().into_iter().collect();
        let has_pending = accepted.len() < self.peers.len();

        // A group with no accepted peer admits whoever is waiting: the vote of nobody is unanimous.
        if accepted.is_empty() && has_pending && self.round.is_none() {
            self.start_round();
            return self.reevaluate();
        }
        self.reevaluate_topology(&accepted, has_pending);
        self.reevaluate_collectives(&accepted);
        self.reevaluate_sync(&accepted);
        self.track_pending();
        self.arm_heartbeat();
    }
}
