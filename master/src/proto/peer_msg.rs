//! The wire form of [`PeerMsg`], the messages a peer sends to the master.
//!
//! `Hello` opens with the `magic | version` that lets two releases name each other's versions.
//! Encoder and decoder sit side by side so that each message's field order can be checked at a
//! glance.

use super::wire::{Dec, Enc};
use super::{
    abort_kind, coll_kind, malformed, CollectiveDesc, EntryDesc, PeerMsg, ProtoError,
    CONTROL_MAGIC, MAX_ENTRIES, MAX_RING_MEMBERS,
};

/// Encodes a peer-to-master message, length prefix included.
pub fn encode_peer(msg: &PeerMsg) -> Vec<u8> {
    fields(msg).finish()
}

/// The bytes `msg` takes on the wire, length prefix included: what a sender checks against
/// [`MAX_MESSAGE_BYTES`](super::MAX_MESSAGE_BYTES) before it queues a message whose size
/// depends on its inputs (a shared-state vote).
pub fn peer_message_bytes(msg: &PeerMsg) -> usize {
    fields(msg).len()
}

fn fields(msg: &PeerMsg) -> Enc {
    match msg {
        PeerMsg::Hello {
            version,
            data_port,
            advertise_ip,
            group,
            nonce,
        } => {
            let mut e = Enc::new(1);
            e.u32(CONTROL_MAGIC)
                .u32(*version)
                .u16(*data_port)
                .str(advertise_ip)
                .u32(*group)
                .bytes32(nonce);
            e
        }
        PeerMsg::Proof { proof } => {
            let mut e = Enc::new(13);
            e.bytes32(proof);
            e
        }
        PeerMsg::AcceptVote => Enc::new(2),
        PeerMsg::PendingQuery => Enc::new(3),
        PeerMsg::ConnectResult { epoch, ok, detail } => {
            let mut e = Enc::new(4);
            e.u64(*epoch).u8(*ok as u8).str(detail);
            e
        }
        PeerMsg::CollInit { tag, desc } => {
            let mut e = Enc::new(5);
            e.u64(*tag)
                .u8(desc.kind.to_wire())
                .u64(desc.count)
                .str(&desc.dtype)
                .str(&desc.op)
                .u32(desc.root);
            e
        }
        PeerMsg::CollComplete {
            tag,
            seq,
            ok,
            detail,
        } => {
            let mut e = Enc::new(6);
            e.u64(*tag).u64(*seq).u8(*ok as u8).str(detail);
            e
        }
        PeerMsg::Goodbye => Enc::new(7),
        PeerMsg::Pong => Enc::new(9),
        PeerMsg::RepairVote => Enc::new(12),
        PeerMsg::OrderVote { order } => {
            let mut e = Enc::new(14);
            e.u32(order.len() as u32);
            for id in order {
                e.u64(*id);
            }
            e
        }
        PeerMsg::SyncVote {
            revision,
            strategy,
            entries,
        } => {
            let mut e = Enc::new(10);
            e.u64(*revision).str(strategy).u32(entries.len() as u32);
            for x in entries {
                e.str(&x.key)
                    .str(&x.dtype)
                    .u64(x.bytes)
                    .u64(x.hash)
                    .u8(x.allow_content_inequality as u8);
            }
            e
        }
        PeerMsg::SyncDone {
            revision,
            ok,
            detail,
        } => {
            let mut e = Enc::new(11);
            e.u64(*revision).u8(*ok as u8).str(detail);
            e
        }
        PeerMsg::CollCancel {
            tag,
            seq,
            kind,
            reason,
        } => {
            let mut e = Enc::new(8);
            e.u64(*tag).u64(*seq).u8(kind.to_wire()).str(reason);
            e
        }
    }
}

/// Decodes the body of a peer-to-master message (without its length prefix).
pub fn decode_peer(body: &[u8]) -> Result<PeerMsg, ProtoError> {
    let mut d = Dec::new(body);
    let msg = match d.u8()? {
        1 => {
            let version = d.magic_version()?;
            PeerMsg::Hello {
                version,
                data_port: d.u16()?,
                advertise_ip: d.str()?,
                group: d.u32()?,
                nonce: d.bytes32()?,
            }
        }
        13 => PeerMsg::Proof {
            proof: d.bytes32()?,
        },
        2 => PeerMsg::AcceptVote,
        3 => PeerMsg::PendingQuery,
        4 => PeerMsg::ConnectResult {
            epoch: d.u64()?,
            ok: d.bool()?,
            detail: d.str()?,
        },
        5 => PeerMsg::CollInit {
            tag: d.u64()?,
            desc: CollectiveDesc {
                kind: coll_kind(d.u8()?)?,
                count: d.u64()?,
                dtype: d.str()?,
                op: d.str()?,
                root: d.u32()?,
            },
        },
        6 => PeerMsg::CollComplete {
            tag: d.u64()?,
            seq: d.u64()?,
            ok: d.bool()?,
            detail: d.str()?,
        },
        7 => PeerMsg::Goodbye,
        9 => PeerMsg::Pong,
        12 => PeerMsg::RepairVote,
        14 => {
            let n = d.u32()? as usize;
            if n > MAX_RING_MEMBERS {
                return Err(malformed(format!(
                    "a ring order of {n} peers over the limit"
                )));
            }
            let mut order = Vec::with_capacity(n.min(d.remaining() / 8));
            for _ in 0..n {
                order.push(d.u64()?);
            }
            PeerMsg::OrderVote { order }
        }
        10 => {
            let (revision, strategy, n) = (d.u64()?, d.str()?, d.u32()? as usize);
            if n > MAX_ENTRIES {
                return Err(malformed(format!(
                    "{n} shared-state entries over the limit"
                )));
            }
            let mut entries = Vec::with_capacity(n.min(d.remaining() / 4));
            for _ in 0..n {
                entries.push(EntryDesc {
                    key: d.str()?,
                    dtype: d.str()?,
                    bytes: d.u64()?,
                    hash: d.u64()?,
                    allow_content_inequality: d.bool()?,
                });
            }
            PeerMsg::SyncVote {
                revision,
                strategy,
                entries,
            }
        }
        11 => PeerMsg::SyncDone {
            revision: d.u64()?,
            ok: d.bool()?,
            detail: d.str()?,
        },
        8 => PeerMsg::CollCancel {
            tag: d.u64()?,
            seq: d.u64()?,
            kind: abort_kind(d.u8()?)?,
            reason: d.str()?,
        },
        k => return Err(malformed(format!("unknown peer message kind {k}"))),
    };
    d.end()?;
    Ok(msg)
}
