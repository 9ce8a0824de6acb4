//! Unit tests of the peer's protocol: one operation kind at a time, aborts, master loss, and
//! out-of-turn master messages.

use super::*;
use concord_master::proto::{AbortKind, CollKind, CollectiveDesc};

fn challenged(token: Option<&str>, token_required: bool) -> PeerProto {
    let credentials = Credentials {
        token: token.map(|t| RunToken::new(t).unwrap()),
        nonce: [6; 32],
    };
    let mut p = PeerProto::with_group(9, String::new(), 0, credentials);
    assert!(matches!(p.poll_transmit(), Some(PeerMsg::Hello { .. })));
    p.handle(MasterMsg::Challenge {
        version: PROTOCOL_VERSION,
        nonce: [8; 32],
        token_required,
    })
    .unwrap();
    p
}

fn welcomed() -> PeerProto {
    let mut p = challenged(None, false);
    assert!(matches!(p.poll_transmit(), Some(PeerMsg::Proof { .. })));
    p.handle(MasterMsg::Welcome {
        version: PROTOCOL_VERSION,
        peer_id: 4,
        proof: [0; 32],
    })
    .unwrap();
    let ring = vec![RingMember {
        peer_id: 4,
        data_addr: "x:1".into(),
    }];
    p.handle(MasterMsg::Topology {
        epoch: 1,
        secret: 0,
        ring: ring.clone(),
    })
    .unwrap();
    p.install_ring(1, ring);
    p.connect_finished(1, Ok(()));
    assert!(matches!(
        p.poll_transmit(),
        Some(PeerMsg::ConnectResult { ok: true, .. })
    ));
    p.handle(MasterMsg::TopologyDone {
        epoch: 1,
        world: 1,
        global_world: 1,
        groups: 1,
        largest_group: 1,
    })
    .unwrap();
    p
}

fn desc() -> CollectiveDesc {
    CollectiveDesc {
        kind: CollKind::AllReduce,
        count: 1,
        dtype: "float".into(),
        op: "sum".into(),
        root: 0,
    }
}

#[test]
fn one_operation_kind_at_a_time_and_unique_tags() {
    let mut p = welcomed();
    p.start_collective(1, desc()).unwrap();
    assert!(
        matches!(p.start_collective(1, desc()), Err(Error::Usage(m)) if m.contains("already in flight"))
    );
    assert!(matches!(p.start_update_topology(), Err(Error::Usage(m)) if m.contains("in flight")));
    p.start_pending_query()
        .expect("the pending query may run beside collectives");
}

#[test]
fn abort_of_a_running_collective_interrupts_the_ring() {
    let mut p = welcomed();
    p.start_collective(1, desc()).unwrap();
    p.handle(MasterMsg::CollCommence {
        tag: 1,
        seq: 5,
        epoch: 1,
    })
    .unwrap();
    let fx = p
        .handle(MasterMsg::CollAborted {
            tag: 1,
            seq: 5,
            kind: AbortKind::LostPeer,
            reason: "gone".into(),
            lost: vec![2],
        })
        .unwrap();
    assert_eq!(
        fx,
        vec![Effect::BreakRing, Effect::Retire { tag: 1, seq: 5 }],
        "a lost peer breaks the ring"
    );
    assert!(
        matches!(p.take_collective(1), Some(Err(Error::Aborted { lost, .. })) if lost == vec![2])
    );
    assert_eq!(p.collectives_in_flight(), 0);
}

#[test]
fn master_loss_fails_every_wait() {
    let mut p = welcomed();
    p.start_collective(1, desc()).unwrap();
    p.master_lost(Error::MasterLost("eof".into()));
    assert!(matches!(
        p.take_collective(1),
        Some(Err(Error::MasterLost(_)))
    ));
    assert!(p.start_collective(2, desc()).is_err());
}

#[test]
fn out_of_turn_master_messages_are_violations() {
    let mut p = welcomed();
    p.start_collective(3, desc()).unwrap();
    assert!(p.handle(MasterMsg::CollDone { tag: 3, seq: 1 }).is_err());
    assert!(p
        .handle(MasterMsg::CollCommence {
            tag: 4,
            seq: 1,
            epoch: 1
        })
        .is_err());
}

#[test]
fn the_abort_kind_decides_the_error_not_the_reason_words() {
    let cases = [
        (AbortKind::Timeout, "peer 3: gave up"),
        (AbortKind::Cancelled, "peer 3: timed out"),
        (AbortKind::LostPeer, "peer 3: cancelled, timed out"),
        (AbortKind::Failed, "timed out"),
        (AbortKind::Refused, "cancelled"),
    ];
    for (tag, (kind, reason)) in (1u64..).zip(cases) {
        let mut p = welcomed();
        p.start_collective(tag, desc()).unwrap();
        p.handle(MasterMsg::CollAborted {
            tag,
            seq: 0,
            kind,
            reason: reason.into(),
            lost: Vec::new(),
        })
        .unwrap();
        let error = p.take_collective(tag).unwrap().unwrap_err();
        let as_kind = match error {
            Error::Timeout(_) => AbortKind::Timeout,
            Error::Cancelled { .. } => AbortKind::Cancelled,
            Error::Aborted { .. } => kind, // Lost, failed and refused are all retryable aborts.
            other => panic!("{kind}: {other}"),
        };
        assert_eq!(as_kind, kind, "{reason}");
    }
}

#[test]
fn a_cancel_sends_its_kind_as_a_field() {
    let mut p = welcomed();
    p.start_collective(1, desc()).unwrap();
    while p.poll_transmit().is_some() {}
    assert!(p.cancel(1, AbortKind::Timeout, "no words about the kind".into()));
    assert!(matches!(
        p.poll_transmit(),
        Some(PeerMsg::CollCancel {
            tag: 1,
            seq: 0,
            kind: AbortKind::Timeout,
            ..
        })
    ));
    assert!(!p.cancel(2, AbortKind::Cancelled, "not in flight".into()));
}

#[test]
fn a_shared_state_vote_over_the_message_limit_is_refused_before_it_is_sent() {
    let mut p = welcomed();
    while p.poll_transmit().is_some() {}
    let entry = |i: usize| concord_master::proto::EntryDesc {
        key: format!("{i:06}{}", "k".repeat(250)),
        dtype: "float".into(),
        bytes: 4,
        hash: 1,
        allow_content_inequality: false,
    };
    // 8,000 keys of 256 bytes: within the entry cap, over the byte limit.
    let err = p
        .start_sync(1, "enforce-popular", (0..8000).map(entry).collect())
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument(m) if m.contains("message limit") && m.contains("shorter keys")),
        "{err}"
    );
    let err = p
        .start_sync(1, "enforce-popular", (0..9000).map(entry).collect())
        .unwrap_err();
    assert!(err.to_string().contains("at most 8192"), "{err}");
    assert!(p.poll_transmit().is_none(), "nothing was queued");
    // The refusal leaves the peer able to sync a state that fits.
    p.start_sync(1, "enforce-popular", (0..10).map(entry).collect())
        .unwrap();
    assert!(matches!(p.poll_transmit(), Some(PeerMsg::SyncVote { .. })));
}

const TOKEN: &str = "the run's token 0123";

#[test]
fn a_challenge_is_answered_with_the_token_and_the_master_must_prove_it_back() {
    let mut p = challenged(Some(TOKEN), true);
    let token = RunToken::new(TOKEN).unwrap();
    let hello = encode_peer(&PeerMsg::Hello {
        version: PROTOCOL_VERSION,
        data_port: 9,
        advertise_ip: String::new(),
        group: 0,
        nonce: [6; 32],
    });
    match p.poll_transmit() {
        Some(PeerMsg::Proof { proof }) => assert_eq!(
            proof,
            auth::peer_proof(Some(&token), &[8; 32], &[6; 32], &hello)
        ),
        other => panic!("expected a proof, got {other:?}"),
    }
    // A master that cannot prove the token back is not this run's: the peer leaves.
    p.handle(MasterMsg::Welcome {
        version: PROTOCOL_VERSION,
        peer_id: 4,
        proof: [0; 32],
    })
    .unwrap();
    assert!(matches!(p.fatal(), Some(Error::Unauthenticated(_))));
    assert_eq!(p.peer_id(), None);

    let mut p = challenged(Some(TOKEN), true);
    p.poll_transmit();
    p.handle(MasterMsg::Welcome {
        version: PROTOCOL_VERSION,
        peer_id: 4,
        proof: auth::master_proof(Some(&token), &[6; 32], &[8; 32], 4),
    })
    .unwrap();
    assert_eq!(p.peer_id(), Some(4));
    assert!(p.fatal().is_none());
}

#[test]
fn a_token_on_one_side_only_is_named_and_nothing_is_proven() {
    for (token, required, says) in [
        (None, true, "requires a run token"),
        (Some(TOKEN), false, "--insecure"),
    ] {
        let mut p = challenged(token, required);
        assert!(p.poll_transmit().is_none(), "no proof is sent");
        match p.fatal() {
            Some(Error::Unauthenticated(why)) => assert!(why.contains(says), "{why}"),
            other => panic!("expected an authentication error, got {other:?}"),
        }
    }
}

#[test]
fn a_welcome_before_the_challenge_is_a_violation() {
    let mut p = PeerProto::new(9, String::new());
    p.poll_transmit();
    let err = p
        .handle(MasterMsg::Welcome {
            version: PROTOCOL_VERSION,
            peer_id: 4,
            proof: [0; 32],
        })
        .unwrap_err();
    assert!(err.to_string().contains("before its challenge"), "{err}");
}
