//! The wire form of [`MasterMsg`], the messages the master sends to a peer.
//!
//! `Challenge`, `Welcome` and `Refused` open with the `magic | version` that lets two releases name each
//! other's versions, and a refusal stays readable whatever the master's version. Encoder and
//! decoder sit side by side so that each message's field order can be checked at a glance.

use super::wire::{Dec, Enc};
use super::{
    abort_kind, malformed, MasterMsg, ProtoError, Pull, RingMember, CONTROL_MAGIC, MAX_ENTRIES,
    MAX_RING_MEMBERS,
};

/// Encodes a master-to-peer message, length prefix included.
pub fn encode_master(msg: &MasterMsg) -> Vec<u8> {
    fields(msg).finish()
}

/// The bytes `msg` takes on the wire, length prefix included: what the coordinator checks
/// against [`MAX_MESSAGE_BYTES`](super::MAX_MESSAGE_BYTES) before it sends a message whose size
/// depends on peer input (a shared-state plan).
pub fn master_message_bytes(msg: &MasterMsg) -> usize {
    fields(msg).len()
}

fn fields(msg: &MasterMsg) -> Enc {
    match msg {
        MasterMsg::Challenge {
            version,
            nonce,
            token_required,
        } => {
            let mut e = Enc::new(16);
            e.u32(CONTROL_MAGIC)
                .u32(*version)
                .bytes32(nonce)
                .u8(*token_required as u8);
            e
        }
        MasterMsg::Welcome {
            version,
            peer_id,
            proof,
        } => {
            let mut e = Enc::new(1);
            e.u32(CONTROL_MAGIC)
                .u32(*version)
                .u64(*peer_id)
                .bytes32(proof);
            e
        }
        MasterMsg::Refused { version, reason } => {
            let mut e = Enc::new(2);
            e.u32(CONTROL_MAGIC).u32(*version).str(reason);
            e
        }
        MasterMsg::PendingAnswer { pending } => {
            let mut e = Enc::new(3);
            e.u8(*pending as u8);
            e
        }
        MasterMsg::Topology {
            epoch,
            secret,
            ring,
        } => {
            let mut e = Enc::new(4);
            e.u64(*epoch).u64(*secret).u32(ring.len() as u32);
            for m in ring {
                e.u64(m.peer_id).str(&m.data_addr);
            }
            e
        }
        MasterMsg::TopologyDone {
            epoch,
            world,
            global_world,
            groups,
            largest_group,
        } => {
            let mut e = Enc::new(5);
            e.u64(*epoch)
                .u32(*world)
                .u32(*global_world)
                .u32(*groups)
                .u32(*largest_group);
            e
        }
        MasterMsg::TopologyFailed { epoch, reason } => {
            let mut e = Enc::new(6);
            e.u64(*epoch).str(reason);
            e
        }
        MasterMsg::CollCommence { tag, seq, epoch } => {
            let mut e = Enc::new(7);
            e.u64(*tag).u64(*seq).u64(*epoch);
            e
        }
        MasterMsg::CollRefused { tag, reason } => {
            let mut e = Enc::new(8);
            e.u64(*tag).str(reason);
            e
        }
        MasterMsg::CollDone { tag, seq } => {
            let mut e = Enc::new(9);
            e.u64(*tag).u64(*seq);
            e
        }
        MasterMsg::CollAborted {
            tag,
            seq,
            kind,
            reason,
            lost,
        } => {
            let mut e = Enc::new(10);
            e.u64(*tag)
                .u64(*seq)
                .u8(kind.to_wire())
                .str(reason)
                .u32(lost.len() as u32);
            for p in lost {
                e.u64(*p);
            }
            e
        }
        MasterMsg::Ping => Enc::new(12),
        MasterMsg::SyncPlan {
            revision,
            secret,
            pulls,
        } => {
            let mut e = Enc::new(13);
            e.u64(*revision).u64(*secret).u32(pulls.len() as u32);
            for p in pulls {
                e.str(&p.key)
                    .u64(p.bytes)
                    .u64(p.hash)
                    .u32(p.sources.len() as u32);
                for m in &p.sources {
                    e.u64(m.peer_id).str(&m.data_addr);
                }
            }
            e
        }
        MasterMsg::SyncComplete { revision } => {
            let mut e = Enc::new(14);
            e.u64(*revision);
            e
        }
        MasterMsg::SyncFailed { reason } => {
            let mut e = Enc::new(15);
            e.str(reason);
            e
        }
        MasterMsg::Kicked { reason } => {
            let mut e = Enc::new(11);
            e.str(reason);
            e
        }
    }
}

/// Decodes the body of a master-to-peer message (without its length prefix).
pub fn decode_master(body: &[u8]) -> Result<MasterMsg, ProtoError> {
    let mut d = Dec::new(body);
    let msg = match d.u8()? {
        1 => {
            let version = d.magic_version()?;
            MasterMsg::Welcome {
                version,
                peer_id: d.u64()?,
                proof: d.bytes32()?,
            }
        }
        16 => {
            let version = d.magic_version()?;
            MasterMsg::Challenge {
                version,
                nonce: d.bytes32()?,
                token_required: d.bool()?,
            }
        }
        2 => {
            // A refusal must be readable whatever the master's version: read it raw.
            let magic = d.u32()?;
            if magic != CONTROL_MAGIC {
                return Err(malformed(format!(
                    "bad magic {magic:#010x}: not a Concord master"
                )));
            }
            MasterMsg::Refused {
                version: d.u32()?,
                reason: d.str()?,
            }
        }
        3 => MasterMsg::PendingAnswer { pending: d.bool()? },
        4 => {
            let (epoch, secret, n) = (d.u64()?, d.u64()?, d.u32()? as usize);
            if n > MAX_RING_MEMBERS {
                return Err(malformed(format!("ring of {n} members over the limit")));
            }
            let mut ring = Vec::with_capacity(n.min(d.remaining() / 4));
            for _ in 0..n {
                ring.push(RingMember {
                    peer_id: d.u64()?,
                    data_addr: d.str()?,
                });
            }
            MasterMsg::Topology {
                epoch,
                secret,
                ring,
            }
        }
        5 => MasterMsg::TopologyDone {
            epoch: d.u64()?,
            world: d.u32()?,
            global_world: d.u32()?,
            groups: d.u32()?,
            largest_group: d.u32()?,
        },
        6 => MasterMsg::TopologyFailed {
            epoch: d.u64()?,
            reason: d.str()?,
        },
        7 => MasterMsg::CollCommence {
            tag: d.u64()?,
            seq: d.u64()?,
            epoch: d.u64()?,
        },
        8 => MasterMsg::CollRefused {
            tag: d.u64()?,
            reason: d.str()?,
        },
        9 => MasterMsg::CollDone {
            tag: d.u64()?,
            seq: d.u64()?,
        },
        10 => {
            let (tag, seq) = (d.u64()?, d.u64()?);
            let kind = abort_kind(d.u8()?)?;
            let (reason, n) = (d.str()?, d.u32()? as usize);
            if n > MAX_RING_MEMBERS {
                return Err(malformed(format!("{n} lost peers over the limit")));
            }
            let mut lost = Vec::with_capacity(n.min(d.remaining() / 4));
            for _ in 0..n {
                lost.push(d.u64()?);
            }
            MasterMsg::CollAborted {
                tag,
                seq,
                kind,
                reason,
                lost,
            }
        }
        11 => MasterMsg::Kicked { reason: d.str()? },
        12 => MasterMsg::Ping,
        13 => {
            let (revision, secret, n) = (d.u64()?, d.u64()?, d.u32()? as usize);
            if n > MAX_ENTRIES {
                return Err(malformed(format!("{n} pulls over the limit")));
            }
            let mut pulls = Vec::with_capacity(n.min(d.remaining() / 4));
            for _ in 0..n {
                let (key, bytes, hash, m) = (d.str()?, d.u64()?, d.u64()?, d.u32()? as usize);
                if m > MAX_RING_MEMBERS {
                    return Err(malformed(format!("{m} sources over the limit")));
                }
                let mut sources = Vec::with_capacity(m.min(d.remaining() / 4));
                for _ in 0..m {
                    sources.push(RingMember {
                        peer_id: d.u64()?,
                        data_addr: d.str()?,
                    });
                }
                pulls.push(Pull {
                    key,
                    bytes,
                    hash,
                    sources,
                });
            }
            MasterMsg::SyncPlan {
                revision,
                secret,
                pulls,
            }
        }
        14 => MasterMsg::SyncComplete { revision: d.u64()? },
        15 => MasterMsg::SyncFailed { reason: d.str()? },
        k => return Err(malformed(format!("unknown master message kind {k}"))),
    };
    d.end()?;
    Ok(msg)
}
