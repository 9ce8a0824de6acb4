//! Codec tests: every message round-trips, other versions are named, garbage never panics.

use super::*;

fn body(frame: &[u8]) -> &[u8] {
    split_frame(frame).unwrap().unwrap().0
}

#[test]
fn every_message_round_trips() {
    let desc = CollectiveDesc {
        kind: CollKind::AllReduce,
        count: 5,
        dtype: "float".into(),
        op: "sum".into(),
        root: 0,
    };
    let peers = [
        PeerMsg::Hello {
            version: PROTOCOL_VERSION,
            data_port: 7,
            advertise_ip: "10.0.0.1".into(),
            group: 0,
            nonce: [4; 32],
        },
        PeerMsg::Proof { proof: [5; 32] },
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
        PeerMsg::OrderVote {
            order: vec![3, 1, 2],
        },
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
            kind: AbortKind::Timeout,
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
        MasterMsg::Challenge {
            version: PROTOCOL_VERSION,
            nonce: [1; 32],
            token_required: true,
        },
        MasterMsg::Welcome {
            version: PROTOCOL_VERSION,
            peer_id: 3,
            proof: [2; 32],
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
            kind: AbortKind::Failed,
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
        nonce: [0; 32],
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
        kind: AbortKind::LostPeer,
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

#[test]
fn abort_kinds_travel_as_a_field_and_unknown_ones_are_refused() {
    for kind in AbortKind::ALL {
        assert_eq!(AbortKind::from_wire(kind.to_wire()), Some(kind));
        let msg = MasterMsg::CollAborted {
            tag: 7,
            seq: 1,
            kind,
            reason: "any words at all".into(),
            lost: Vec::new(),
        };
        assert_eq!(decode_master(&encode_master(&msg)[4..]), Ok(msg));
        let msg = PeerMsg::CollCancel {
            tag: 7,
            seq: 1,
            kind,
            reason: String::new(),
        };
        assert_eq!(decode_peer(&encode_peer(&msg)[4..]), Ok(msg));
    }
    // The kind byte follows the tag and the sequence number; 5 is no kind.
    let mut frame = encode_peer(&PeerMsg::CollCancel {
        tag: 7,
        seq: 1,
        kind: AbortKind::Timeout,
        reason: "timed out".into(),
    });
    let at = frame.len() - 4 - "timed out".len() - 1;
    assert_eq!(frame[at], AbortKind::Timeout.to_wire());
    frame[at] = 5;
    let err = decode_peer(&frame[4..]).unwrap_err().to_string();
    assert!(err.contains("unknown abort kind 5"), "{err}");
}
