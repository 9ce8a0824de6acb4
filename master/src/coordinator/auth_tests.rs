//! Unit tests of admission by run token: only a peer that proves the token is registered, the
//! master proves it back, and the proof's deadline is the hello's.

use std::time::{Duration, Instant};

use concord_transport::auth::{self, RunToken};
use concord_transport::PROTOCOL_VERSION;

use super::{ConnId, Coordinator, CoordinatorConfig, Output};
use crate::proto::{encode_peer, MasterMsg, PeerMsg};

const TOKEN: &str = "the run's token 0123";

fn coordinator(token: Option<&str>) -> Coordinator {
    Coordinator::new(CoordinatorConfig {
        token: token.map(|t| RunToken::new(t).unwrap()),
        nonce_seed: [9; 32],
        ..CoordinatorConfig::default()
    })
}

fn hello(nonce: u8) -> PeerMsg {
    PeerMsg::Hello {
        version: PROTOCOL_VERSION,
        data_port: 4000,
        advertise_ip: String::new(),
        group: 0,
        nonce: [nonce; 32],
    }
}

fn drain(c: &mut Coordinator) -> Vec<Output> {
    std::iter::from_fn(|| c.poll_output()).collect()
}

/// Connects `conn`, says hello; the challenge's nonce.
fn challenge(c: &mut Coordinator, conn: ConnId, now: Instant) -> [u8; 32] {
    c.handle_connect(conn, "127.0.0.1".parse().unwrap(), now);
    c.handle_message(conn, hello(conn as u8), now);
    match drain(c).as_slice() {
        [Output::Send {
            msg:
                MasterMsg::Challenge {
                    nonce,
                    token_required,
                    ..
                },
            ..
        }] => {
            assert_eq!(*token_required, c_has_token(c));
            *nonce
        }
        other => panic!("expected only a challenge, got {other:?}"),
    }
}

fn c_has_token(c: &Coordinator) -> bool {
    c.config.token.is_some()
}

#[test]
fn a_peer_proving_the_token_is_welcomed_with_the_masters_proof() {
    let mut c = coordinator(Some(TOKEN));
    let now = Instant::now();
    let master_nonce = challenge(&mut c, 1, now);
    assert!(
        c.pending().is_empty(),
        "nobody registers before proving the token"
    );
    let token = RunToken::new(TOKEN).unwrap();
    let proof = auth::peer_proof(
        Some(&token),
        &master_nonce,
        &[1; 32],
        &encode_peer(&hello(1)),
    );
    c.handle_message(1, PeerMsg::Proof { proof }, now);
    let out = drain(&mut c);
    let welcome = out.iter().find_map(|o| match o {
        Output::Send {
            msg: MasterMsg::Welcome { peer_id, proof, .. },
            ..
        } => Some((*peer_id, *proof)),
        _ => None,
    });
    let (id, proof) = welcome.expect("welcomed");
    assert!(auth::proofs_equal(
        &proof,
        &auth::master_proof(Some(&token), &[1; 32], &master_nonce, id)
    ));
    assert_eq!(c.accepted(), vec![id], "the first peer is admitted at once");
}

#[test]
fn a_wrong_proof_is_refused_and_registers_nobody() {
    let mut c = coordinator(Some(TOKEN));
    let now = Instant::now();
    let master_nonce = challenge(&mut c, 1, now);
    let other = RunToken::new("another run's token").unwrap();
    // Right shape, wrong token; and the right token over another hello (a changed address).
    let token = RunToken::new(TOKEN).unwrap();
    let proofs = [auth::peer_proof(
        Some(&other),
        &master_nonce,
        &[1; 32],
        &encode_peer(&hello(1)),
    )];
    // The first answers conn 1's challenge; the second a fresh connection's.
    let second = challenge(&mut c, 2, now);
    let proofs = [
        (1, proofs[0]),
        (
            2,
            auth::peer_proof(Some(&token), &second, &[2; 32], &encode_peer(&hello(3))),
        ),
    ];
    for (conn, proof) in proofs {
        c.handle_message(conn, PeerMsg::Proof { proof }, now);
        let out = drain(&mut c);
        assert!(
            out.iter().any(|o| matches!(o, Output::Send { msg: MasterMsg::Refused { reason, .. }, .. } if reason.contains("not invited"))),
            "{out:?}"
        );
        assert!(out.contains(&Output::Close { conn }));
        assert!(c.pending().is_empty() && c.accepted().is_empty());
    }
}

#[test]
fn challenges_never_repeat() {
    let mut c = coordinator(Some(TOKEN));
    let now = Instant::now();
    let nonces: std::collections::BTreeSet<_> =
        (1..=50).map(|conn| challenge(&mut c, conn, now)).collect();
    assert_eq!(nonces.len(), 50);
}

#[test]
fn without_a_token_any_proof_registers() {
    let mut c = coordinator(None);
    let now = Instant::now();
    challenge(&mut c, 1, now);
    c.handle_message(1, PeerMsg::Proof { proof: [0; 32] }, now);
    assert!(drain(&mut c).iter().any(|o| matches!(
        o,
        Output::Send {
            msg: MasterMsg::Welcome { .. },
            ..
        }
    )));
    assert_eq!(c.accepted().len(), 1);
}

#[test]
fn a_challenged_peer_that_never_proves_is_closed_at_the_hello_deadline() {
    let mut c = coordinator(Some(TOKEN));
    let now = Instant::now();
    challenge(&mut c, 1, now);
    let deadline = c.poll_timeout().expect("the proof has a deadline");
    assert!(deadline <= now + Duration::from_secs(10));
    c.handle_timeout(deadline);
    let out = drain(&mut c);
    assert!(out.contains(&Output::Close { conn: 1 }), "{out:?}");
    assert_eq!(c.connection_count(), 0);
}

#[test]
fn anything_but_a_proof_after_the_challenge_is_kicked() {
    let mut c = coordinator(Some(TOKEN));
    let now = Instant::now();
    challenge(&mut c, 1, now);
    c.handle_message(1, PeerMsg::AcceptVote, now);
    let out = drain(&mut c);
    assert!(
        out.iter().any(|o| matches!(o, Output::Send { msg: MasterMsg::Kicked { reason }, .. } if reason.contains("Proof"))),
        "{out:?}"
    );
    assert!(c.pending().is_empty());
}
