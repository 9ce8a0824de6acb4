//! Peers coming and going: registration (`Hello`, the challenge, `Proof`), leaving (`Goodbye`), kicks, and removal.
//!
//! Removing a peer is the one place that reaches into every job: its votes are dropped, the
//! connection round it was part of fails, its group's ring is marked broken and the group's
//! collectives abort naming it, and a sync goes on without it. Everything a peer can break ends
//! here, so a dead peer never blocks a vote.

use std::net::IpAddr;
use std::time::Instant;

use concord_transport::auth::{self, Nonce};
use concord_transport::PROTOCOL_VERSION;

use super::state::{CollKey, Conn, ConnId, Coordinator, Output, Peer, Registration};
use crate::proto::{
    encode_peer, AbortKind, MasterMsg, PeerId, PeerMsg, MAX_MESSAGE_BYTES, MAX_RING_MEMBERS,
};

impl Coordinator {
    /// The first message of a connection: checks what the peer asks for, then challenges it to
    /// prove the run token.
    pub(super) fn on_hello(&mut self, conn: ConnId, ip: IpAddr, deadline: Instant, msg: PeerMsg) {
        let hello_bytes = encode_peer(&msg);
        let PeerMsg::Hello {
            version,
            data_port,
            advertise_ip,
            group,
            nonce,
        } = msg
        else {
            self.kick_conn(
                conn,
                &format!("first message must be Hello, got {}", kind(&msg)),
            );
            return;
        };
        debug_assert_eq!(
            version, PROTOCOL_VERSION,
            "the codec refuses other versions"
        );
        if let Err(why) = check_advertised(&advertise_ip) {
            self.refuse(conn, format!("advertise_ip {why}"));
            return;
        }
        if let Some(why) = self.full() {
            self.refuse(conn, why);
            return;
        }
        let host = if advertise_ip.is_empty() {
            ip.to_string()
        } else {
            advertise_ip
        };
        let data_addr = match host.parse::<IpAddr>() {
            Ok(IpAddr::V6(v6)) => format!("[{v6}]:{data_port}"),
            _ => format!("{host}:{data_port}"),
        };
        let master_nonce = self.next_nonce();
        self.conns.insert(
            conn,
            Conn::AwaitingProof {
                ip,
                deadline,
                hello: Box::new(Registration {
                    data_addr,
                    group,
                    peer_nonce: nonce,
                    master_nonce,
                    hello_bytes,
                }),
            },
        );
        self.out.push_back(Output::Send {
            conn,
            msg: MasterMsg::Challenge {
                version: PROTOCOL_VERSION,
                nonce: master_nonce,
                token_required: self.config.token.is_some(),
            },
        });
    }

    /// The answer to the challenge: a peer that proves the run token (or any, without one) is
    /// registered (not yet accepted into a ring) and welcomed with the master's own proof.
    pub(super) fn on_proof(&mut self, conn: ConnId, msg: PeerMsg) {
        let PeerMsg::Proof { proof } = msg else {
            self.kick_conn(
                conn,
                &format!("second message must be Proof, got {}", kind(&msg)),
            );
            return;
        };
        let Some(Conn::AwaitingProof { ip, hello, .. }) = self.conns.remove(&conn) else {
            return;
        };
        let token = self.config.token.as_ref();
        if token.is_some() {
            let expected = auth::peer_proof(
                token,
                &hello.master_nonce,
                &hello.peer_nonce,
                &hello.hello_bytes,
            );
            if !auth::proofs_equal(&expected, &proof) {
                let reason = "not invited: this peer's run token does not match the master's                               (give every peer the run's token with --token-file or CONCORD_TOKEN)";
                if let Some(now) = self.now {
                    self.log_refusal(ip, reason, now);
                }
                self.out.push_back(Output::Send {
                    conn,
                    msg: MasterMsg::Refused {
                        version: PROTOCOL_VERSION,
                        reason: reason.into(),
                    },
                });
                self.out.push_back(Output::Close { conn });
                return;
            }
        }
        // Peers may have registered while this one proved itself.
        if let Some(why) = self.full() {
            self.refuse(conn, why);
            return;
        }
        let id = self.next_peer_id;
        self.next_peer_id += 1;
        self.conns.insert(conn, Conn::Peer(id));
        self.peers.insert(
            id,
            Peer {
                conn,
                data_addr: hello.data_addr,
                group: hello.group,
                accepted: false,
                ping_sent_at: None,
            },
        );
        let proof = auth::master_proof(token, &hello.peer_nonce, &hello.master_nonce, id);
        self.send(
            id,
            MasterMsg::Welcome {
                version: PROTOCOL_VERSION,
                peer_id: id,
                proof,
            },
        );
    }

    /// Why no further peer can register, if it cannot.
    fn full(&self) -> Option<String> {
        let max_peers = self.config.max_peers.min(MAX_TOPOLOGY_PEERS);
        (self.peers.len() >= max_peers).then(|| format!("the master is full ({max_peers} peers)"))
    }

    /// A nonce no other challenge of this master had.
    fn next_nonce(&mut self) -> Nonce {
        self.challenges += 1;
        auth::derive_nonce(&self.config.nonce_seed, self.challenges)
    }

    /// The peer leaves on purpose: forget it and close its connection.
    pub(super) fn on_goodbye(&mut self, id: PeerId) {
        let conn = self.peers[&id].conn;
        self.remove_peer(id, &format!("peer {id} left"));
        self.conns.remove(&conn);
        self.out.push_back(Output::Close { conn });
    }

    /// Forgets a peer and fails whatever it was part of.
    pub(super) fn remove_peer(&mut self, id: PeerId, reason: &str) {
        let Some(peer) = self.peers.remove(&id) else {
            return;
        };
        self.accept_votes.remove(&id);
        self.order_votes.remove(&id);
        self.pending_votes.remove(&id);
        self.sync_remove_peer(id);
        if !peer.accepted {
            return;
        }
        if self.round.as_ref().is_some_and(|r| r.members.contains(&id)) {
            self.fail_round(reason);
        }
        let g = peer.group;
        if let Some(ring) = self.rings.get_mut(&g) {
            if ring.contains(&id) {
                ring.retain(|p| *p != id);
                self.broken.insert(g, reason.to_string());
            }
        }
        // The group's ring lost a member: nothing can run on it until it is rebuilt. Other
        // groups' collectives go on.
        let keys: Vec<CollKey> = self.colls.keys().copied().filter(|k| k.0 == g).collect();
        for key in keys {
            self.abort_coll(key, AbortKind::LostPeer, reason, vec![id]);
        }
    }

    /// Refuses a connection that said hello: tells it why (the reason is logged, never a
    /// secret), then closes it.
    fn refuse(&mut self, conn: ConnId, reason: String) {
        tracing::warn!(conn, "refused a peer: {reason}");
        self.out.push_back(Output::Send {
            conn,
            msg: MasterMsg::Refused {
                version: PROTOCOL_VERSION,
                reason,
            },
        });
        self.close(conn, "refused");
    }

    /// Tells the connection why, then closes it (removing its peer, if it registered).
    pub(super) fn kick_conn(&mut self, conn: ConnId, reason: &str) {
        let reason = match self.conns.get(&conn) {
            Some(Conn::Peer(id)) => format!("peer {id} kicked: {reason}"),
            _ => format!("connection {conn} kicked: {reason}"),
        };
        tracing::warn!("{reason}");
        self.out.push_back(Output::Send {
            conn,
            msg: MasterMsg::Kicked {
                reason: reason.clone(),
            },
        });
        self.close(conn, &reason);
    }

    /// Kicks a registered peer by id (nothing when it is already gone).
    pub(super) fn kick_peer(&mut self, id: PeerId, reason: &str) {
        if let Some(conn) = self.peers.get(&id).map(|p| p.conn) {
            self.kick_conn(conn, reason);
        }
    }

    /// Closes a connection after what is queued for it, removing its peer.
    pub(super) fn close(&mut self, conn: ConnId, reason: &str) {
        if let Some(Conn::Peer(id)) = self.conns.remove(&conn) {
            self.remove_peer(id, reason);
        }
        self.out.push_back(Output::Close { conn });
    }
}

/// A message's name, for kick reasons.
pub(super) fn kind(msg: &PeerMsg) -> &'static str {
    match msg {
        PeerMsg::Hello { .. } => "Hello",
        PeerMsg::Proof { .. } => "Proof",
        PeerMsg::AcceptVote => "AcceptVote",
        PeerMsg::RepairVote => "RepairVote",
        PeerMsg::OrderVote { .. } => "OrderVote",
        PeerMsg::PendingQuery => "PendingQuery",
        PeerMsg::ConnectResult { .. } => "ConnectResult",
        PeerMsg::CollInit { .. } => "CollInit",
        PeerMsg::CollComplete { .. } => "CollComplete",
        PeerMsg::Goodbye => "Goodbye",
        PeerMsg::Pong => "Pong",
        PeerMsg::SyncVote { .. } => "SyncVote",
        PeerMsg::SyncDone { .. } => "SyncDone",
        PeerMsg::CollCancel { .. } => "CollCancel",
    }
}

/// Longest host an advertised data address may name: a DNS name's limit.
pub(super) const MAX_HOST_BYTES: usize = 253;

/// Longest data address a ring member can have: `[host]:port`.
const MAX_DATA_ADDR_BYTES: usize = MAX_HOST_BYTES + 2 + 6;

/// Most peers a `Topology` message can list within the message limit, with every address as
/// long as allowed (peer id, string length, address): the master never admits more, so no ring
/// it sends can outgrow the limit.
pub(super) const MAX_TOPOLOGY_PEERS: usize =
    (MAX_MESSAGE_BYTES - 64) / (8 + 4 + MAX_DATA_ADDR_BYTES);
// A ring of that many is also one the decoder accepts.
const _: () = assert!(MAX_TOPOLOGY_PEERS <= MAX_RING_MEMBERS);

/// An advertised address is empty (use the one the master sees), an IP address, or a hostname
/// (labels of letters, digits and hyphens, at most 253 bytes): the ring dials it, so nothing
/// else is accepted.
pub(super) fn check_advertised(host: &str) -> Result<(), String> {
    if host.is_empty() || host.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    if host.len() > MAX_HOST_BYTES {
        return Err(format!(
            "is {} bytes long; at most {MAX_HOST_BYTES} (an IP address or a hostname)",
            host.len()
        ));
    }
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if host.trim_end_matches('.').split('.').all(label_ok) {
        Ok(())
    } else {
        Err(format!(
            "{:?} is neither an IP address nor a hostname",
            host.chars().take(64).collect::<String>()
        ))
    }
}
