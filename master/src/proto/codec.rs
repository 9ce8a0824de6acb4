//! Byte-level encoding of [`PeerMsg`] and [`MasterMsg`].

use super::*;

/// Writes fields in order.
struct Enc(Vec<u8>);

impl Enc {
    fn new(kind: u8) -> Self {
        let mut v = Vec::with_capacity(64);
        v.extend_from_slice(&[0, 0, 0, 0, kind]);
        Enc(v)
    }
    fn u8(&mut self, x: u8) -> &mut Self {
        self.0.push(x);
        self
    }
    fn u16(&mut self, x: u16) -> &mut Self {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    fn u32(&mut self, x: u32) -> &mut Self {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    fn u64(&mut self, x: u64) -> &mut Self {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        // Strings are bounded; truncate at a char boundary rather than refuse to send a reason.
        let mut end = s.len().min(MAX_STRING_BYTES);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.u32(end as u32);
        self.0.extend_from_slice(&s.as_bytes()[..end]);
        self
    }
    fn finish(mut self) -> Vec<u8> {
        let len = (self.0.len() - 4) as u32;
        assert!(
            self.0.len() <= MAX_MESSAGE_BYTES,
            "control message over the size limit"
        );
        self.0[0..4].copy_from_slice(&len.to_le_bytes());
        self.0
    }
}

/// Reads fields in order; every read is bounds-checked.
struct Dec<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Dec<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.buf.len() - self.pos < n {
            return Err(malformed(format!(
                "truncated: needed {n} more bytes at offset {}, message has {}",
                self.pos,
                self.buf.len()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, ProtoError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, ProtoError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, ProtoError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, ProtoError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn bool(&mut self) -> Result<bool, ProtoError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(malformed(format!("boolean byte {b}"))),
        }
    }
    fn str(&mut self) -> Result<String, ProtoError> {
        let len = self.u32()? as usize;
        if len > MAX_STRING_BYTES {
            return Err(malformed(format!("string of {len} bytes over the limit")));
        }
        String::from_utf8(self.take(len)?.to_vec()).map_err(|_| malformed("string is not UTF-8"))
    }
    fn magic_version(&mut self) -> Result<u32, ProtoError> {
        let magic = self.u32()?;
        if magic != CONTROL_MAGIC {
            return Err(malformed(format!(
                "bad magic {magic:#010x}: not a Concord peer"
            )));
        }
        let version = self.u32()?;
        if version != PROTOCOL_VERSION {
            return Err(ProtoError::Version {
                ours: PROTOCOL_VERSION,
                theirs: version,
            });
        }
        Ok(version)
    }
    fn end(self) -> Result<(), ProtoError> {
        if self.pos != self.buf.len() {
            return Err(malformed(format!(
                "{} trailing bytes",
                self.buf.len() - self.pos
            )));
        }
        Ok(())
    }
}

/// Splits one frame off the front of `buf`: `Ok(Some((body, consumed)))` when a whole message is
/// there, `Ok(None)` when more bytes are needed, an error when the length is out of bounds.
pub fn split_frame(buf: &[u8]) -> Result<Option<(&[u8], usize)>, ProtoError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
    if len == 0 || len + 4 > MAX_MESSAGE_BYTES {
        return Err(malformed(format!("frame length {len} out of bounds")));
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    Ok(Some((&buf[4..4 + len], 4 + len)))
}

/// Encodes a peer-to-master message, length prefix included.
pub fn encode_peer(msg: &PeerMsg) -> Vec<u8> {
    let e = match msg {
        PeerMsg::Hello {
            version,
            data_port,
            advertise_ip,
            group,
        } => {
            let mut e = Enc::new(1);
            e.u32(CONTROL_MAGIC)
                .u32(*version)
                .u16(*data_port)
                .str(advertise_ip)
                .u32(*group);
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
            e.u64(*tag).u64(desc.count).str(&desc.dtype).str(&desc.op);
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
        PeerMsg::CollCancel { tag, seq, reason } => {
            let mut e = Enc::new(8);
            e.u64(*tag).u64(*seq).str(reason);
            e
        }
    };
    e.finish()
}

/// Decodes the body of a peer-to-master message (without its length prefix).
pub fn decode_peer(body: &[u8]) -> Result<PeerMsg, ProtoError> {
    let mut d = Dec { buf: body, pos: 0 };
    let msg = match d.u8()? {
        1 => {
            let version = d.magic_version()?;
            PeerMsg::Hello {
                version,
                data_port: d.u16()?,
                advertise_ip: d.str()?,
                group: d.u32()?,
            }
        }
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
                count: d.u64()?,
                dtype: d.str()?,
                op: d.str()?,
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
        10 => {
            let (revision, strategy, n) = (d.u64()?, d.str()?, d.u32()? as usize);
            if n > MAX_ENTRIES {
                return Err(malformed(format!(
                    "{n} shared-state entries over the limit"
                )));
            }
            let mut entries = Vec::with_capacity(n);
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
            reason: d.str()?,
        },
        k => return Err(malformed(format!("unknown peer message kind {k}"))),
    };
    d.end()?;
    Ok(msg)
}

/// Encodes a master-to-peer message, length prefix included.
pub fn encode_master(msg: &MasterMsg) -> Vec<u8> {
    let e = match msg {
        MasterMsg::Welcome { version, peer_id } => {
            let mut e = Enc::new(1);
            e.u32(CONTROL_MAGIC).u32(*version).u64(*peer_id);
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
            reason,
            lost,
        } => {
            let mut e = Enc::new(10);
            e.u64(*tag).u64(*seq).str(reason).u32(lost.len() as u32);
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
    };
    e.finish()
}

/// Decodes the body of a master-to-peer message (without its length prefix).
pub fn decode_master(body: &[u8]) -> Result<MasterMsg, ProtoError> {
    let mut d = Dec { buf: body, pos: 0 };
    let msg = match d.u8()? {
        1 => {
            let version = d.magic_version()?;
            MasterMsg::Welcome {
                version,
                peer_id: d.u64()?,
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
            let mut ring = Vec::with_capacity(n);
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
            let (tag, seq, reason, n) = (d.u64()?, d.u64()?, d.str()?, d.u32()? as usize);
            if n > MAX_RING_MEMBERS {
                return Err(malformed(format!("{n} lost peers over the limit")));
            }
            let mut lost = Vec::with_capacity(n);
            for _ in 0..n {
                lost.push(d.u64()?);
            }
            MasterMsg::CollAborted {
                tag,
                seq,
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
            let mut pulls = Vec::with_capacity(n);
            for _ in 0..n {
                let (key, bytes, hash, m) = (d.str()?, d.u64()?, d.u64()?, d.u32()? as usize);
                if m > MAX_RING_MEMBERS {
                    return Err(malformed(format!("{m} sources over the limit")));
                }
                let mut sources = Vec::with_capacity(m);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn body(frame: &[u8]) -> &[u8] {
        split_frame(frame).unwrap().unwrap().0
    }

    #[test]
    fn every_message_round_trips() {
        let desc = CollectiveDesc {
            count: 5,
            dtype: "float".into(),
            op: "sum".into(),
        };
        let peers = [
            PeerMsg::Hello {
                version: PROTOCOL_VERSION,
                data_port: 7,
                advertise_ip: "10.0.0.1".into(),
                group: 0,
            },
            PeerMsg::AcceptVote,
            PeerMsg::PendingQuery,
            PeerMsg::ConnectResult {
                epoch: 2,
                ok: false,
                detail: "nope".into(),
            },
            PeerMsg::CollInit { tag: 9, desc },
            PeerMsg::CollComplete {
                tag: 9,
                seq: 4,
                ok: true,
                detail: String::new(),
            },
            PeerMsg::Goodbye,
            PeerMsg::Pong,
            PeerMsg::RepairVote,
            PeerMsg::SyncVote {
                revision: 3,
                strategy: "send-only".into(),
                entries: vec![EntryDesc {
                    key: "w".into(),
                    dtype: "bfloat16".into(),
                    bytes: 8,
                    hash: 99,
                    allow_content_inequality: true,
                }],
            },
            PeerMsg::SyncDone {
                revision: 4,
                ok: false,
                detail: "x".into(),
            },
            PeerMsg::CollCancel {
                tag: 3,
                seq: 4,
                reason: "timed out".into(),
            },
        ];
        for m in peers {
            assert_eq!(decode_peer(body(&encode_peer(&m))).unwrap(), m);
        }
        let ring = vec![RingMember {
            peer_id: 1,
            data_addr: "127.0.0.1:5".into(),
        }];
        let masters = [
            MasterMsg::Welcome {
                version: PROTOCOL_VERSION,
                peer_id: 3,
            },
            MasterMsg::Refused {
                version: 99,
                reason: "old".into(),
            },
            MasterMsg::PendingAnswer { pending: true },
            MasterMsg::Topology {
                epoch: 1,
                secret: 2,
                ring,
            },
            MasterMsg::TopologyDone {
                epoch: 1,
                world: 3,
                global_world: 5,
                groups: 2,
                largest_group: 3,
            },
            MasterMsg::TopologyFailed {
                epoch: 1,
                reason: "x".into(),
            },
            MasterMsg::CollCommence {
                tag: 1,
                seq: 2,
                epoch: 3,
            },
            MasterMsg::CollRefused {
                tag: 1,
                reason: "y".into(),
            },
            MasterMsg::CollDone { tag: 1, seq: 2 },
            MasterMsg::CollAborted {
                tag: 1,
                seq: 2,
                reason: "z".into(),
                lost: vec![4, 5],
            },
            MasterMsg::Kicked {
                reason: "bad".into(),
            },
            MasterMsg::Ping,
            MasterMsg::SyncPlan {
                revision: 2,
                secret: 3,
                pulls: vec![Pull {
                    key: "w".into(),
                    bytes: 8,
                    hash: 1,
                    sources: vec![RingMember {
                        peer_id: 1,
                        data_addr: "a:1".into(),
                    }],
                }],
            },
            MasterMsg::SyncComplete { revision: 2 },
            MasterMsg::SyncFailed { reason: "r".into() },
        ];
        for m in masters {
            assert_eq!(decode_master(body(&encode_master(&m))).unwrap(), m);
        }
    }

    #[test]
    fn other_versions_are_named() {
        let mut frame = encode_peer(&PeerMsg::Hello {
            version: PROTOCOL_VERSION,
            data_port: 1,
            advertise_ip: String::new(),
            group: 0,
        });
        frame[9..13].copy_from_slice(&(PROTOCOL_VERSION + 7).to_le_bytes());
        let err = decode_peer(body(&frame)).unwrap_err();
        assert_eq!(
            err,
            ProtoError::Version {
                ours: PROTOCOL_VERSION,
                theirs: PROTOCOL_VERSION + 7
            }
        );
    }

    #[test]
    fn garbage_never_panics() {
        // Every prefix and a sweep of byte patterns decode to a message or an error.
        let frame = encode_master(&MasterMsg::CollAborted {
            tag: 1,
            seq: 2,
            reason: "z".into(),
            lost: vec![4],
        });
        for cut in 0..frame.len() {
            let _ = decode_master(&frame[4..cut.max(4)]);
            let _ = decode_peer(&frame[4..cut.max(4)]);
        }
        let mut x = 0x1234_5678u32;
        for _ in 0..20_000 {
            let bytes: Vec<u8> = (0..(x % 40))
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            let _ = decode_peer(&bytes);
            let _ = decode_master(&bytes);
            let _ = split_frame(&bytes);
        }
        assert!(
            split_frame(&[0, 0, 0, 0]).is_err(),
            "zero length is refused"
        );
        assert!(
            split_frame(&u32::MAX.to_le_bytes()).is_err(),
            "huge length is refused"
        );
    }
}
