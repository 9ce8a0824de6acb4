//! Unit tests of the coordinator: votes, disconnects during votes, kicks.

use std::time::{Duration, Instant};

use concord_transport::PROTOCOL_VERSION;

use super::{ConnId, Coordinator, CoordinatorConfig, Output};
use crate::proto::{AbortKind, CollKind, CollectiveDesc, MasterMsg, PeerMsg};

struct H {
    c: Coordinator,
    now: Instant,
}

impl H {
    fn new() -> Self {
        H {
            c: Coordinator::new(CoordinatorConfig::default()),
            now: Instant::now(),
        }
    }
    fn drain(&mut self) -> Vec<Output> {
        std::iter::from_fn(|| self.c.poll_output()).collect()
    }
    fn sent_to(out: &[Output], conn: ConnId) -> Vec<MasterMsg> {
        out.iter()
            .filter_map(|o| match o {
                Output::Send { conn: c, msg } if *c == conn => Some(msg.clone()),
                _ => None,
            })
            .collect()
    }
    fn closed(out: &[Output], conn: ConnId) -> bool {
        out.contains(&Output::Close { conn })
    }
    fn msg(&mut self, conn: ConnId, m: PeerMsg) -> Vec<Output> {
        self.c.handle_message(conn, m, self.now);
        self.drain()
    }
    fn hello(&mut self, conn: ConnId) -> Vec<Output> {
        self.c
            .handle_connect(conn, "127.0.0.1".parse().unwrap(), self.now);
        let hello = PeerMsg::Hello {
            version: PROTOCOL_VERSION,
            data_port: 1000 + conn as u16,
            advertise_ip: String::new(),
            group: 0,
            nonce: [conn as u8; 32],
        };
        self.register(conn, hello)
    }
    /// Sends `hello` and answers the challenge (any proof: the master has no token); the
    /// outputs after the challenge.
    fn register(&mut self, conn: ConnId, hello: PeerMsg) -> Vec<Output> {
        let out = self.msg(conn, hello);
        let challenged = out.iter().any(|o| {
            matches!(o, Output::Send { conn: c, msg: MasterMsg::Challenge { .. } } if *c == conn)
        });
        if !challenged {
            return out;
        }
        let mut rest: Vec<Output> = out
            .into_iter()
            .filter(|o| {
                !matches!(
                    o,
                    Output::Send {
                        msg: MasterMsg::Challenge { .. },
                        ..
                    }
                )
            })
            .collect();
        rest.extend(self.msg(conn, PeerMsg::Proof { proof: [0; 32] }));
        rest
    }
    /// Connects peers on conns 1..=n and builds a ring of all of them. Peer ids equal conn ids.
    fn group(n: u64) -> Self {
        let mut h = H::new();
        let out = h.hello(1);
        let epoch = topology_epoch(&H::sent_to(&out, 1)).expect("first peer admitted at once");
        h.msg(
            1,
            PeerMsg::ConnectResult {
                epoch,
                ok: true,
                detail: String::new(),
            },
        );
        for conn in 2..=n {
            h.hello(conn);
        }
        if n > 1 {
            let out = h.msg(1, PeerMsg::AcceptVote);
            let epoch = topology_epoch(&H::sent_to(&out, 1)).unwrap();
            for conn in 1..=n {
                h.msg(
                    conn,
                    PeerMsg::ConnectResult {
                        epoch,
                        ok: true,
                        detail: String::new(),
                    },
                );
            }
        }
        assert_eq!(h.c.accepted().len(), n as usize);
        h
    }
}

/// The TopologyDone of a single group of `world` peers.
fn done(epoch: u64, world: u32) -> MasterMsg {
    MasterMsg::TopologyDone {
        epoch,
        world,
        global_world: world,
        groups: 1,
        largest_group: world,
    }
}

fn topology_epoch(msgs: &[MasterMsg]) -> Option<u64> {
    msgs.iter().find_map(|m| match m {
        MasterMsg::Topology { epoch, .. } => Some(*epoch),
        _ => None,
    })
}

fn desc(count: u64) -> CollectiveDesc {
    CollectiveDesc {
        kind: CollKind::AllReduce,
        count,
        dtype: "float".into(),
        op: "sum".into(),
        root: 0,
    }
}

fn kicked(msgs: &[MasterMsg]) -> Option<String> {
    msgs.iter().find_map(|m| match m {
        MasterMsg::Kicked { reason } => Some(reason.clone()),
        _ => None,
    })
}

#[test]
fn first_peer_is_admitted_alone_and_later_ones_wait_for_a_vote() {
    let mut h = H::new();
    let out = h.hello(1);
    let msgs = H::sent_to(&out, 1);
    assert!(matches!(msgs[0], MasterMsg::Welcome { peer_id: 1, .. }));
    let epoch = topology_epoch(&msgs).unwrap();
    let out = h.msg(
        1,
        PeerMsg::ConnectResult {
            epoch,
            ok: true,
            detail: String::new(),
        },
    );
    assert_eq!(H::sent_to(&out, 1), vec![done(epoch, 1)]);

    let out = h.hello(2);
    assert_eq!(H::sent_to(&out, 2).len(), 1, "only a Welcome: peer 2 waits");
    assert_eq!(h.c.pending(), vec![2]);

    let out = h.msg(1, PeerMsg::PendingQuery);
    assert_eq!(
        H::sent_to(&out, 1),
        vec![MasterMsg::PendingAnswer { pending: true }]
    );

    let out = h.msg(1, PeerMsg::AcceptVote);
    let e2 = topology_epoch(&H::sent_to(&out, 2)).expect("the new peer gets the ring");
    assert_eq!(topology_epoch(&H::sent_to(&out, 1)), Some(e2));
    h.msg(
        1,
        PeerMsg::ConnectResult {
            epoch: e2,
            ok: true,
            detail: String::new(),
        },
    );
    let out = h.msg(
        2,
        PeerMsg::ConnectResult {
            epoch: e2,
            ok: true,
            detail: String::new(),
        },
    );
    for conn in [1, 2] {
        assert_eq!(H::sent_to(&out, conn), vec![done(e2, 2)]);
    }
    let out = h.msg(1, PeerMsg::PendingQuery);
    assert!(out.is_empty(), "the vote waits for peer 2");
    let out = h.msg(2, PeerMsg::PendingQuery);
    assert_eq!(
        H::sent_to(&out, 1),
        vec![MasterMsg::PendingAnswer { pending: false }]
    );
    assert_eq!(
        H::sent_to(&out, 2),
        vec![MasterMsg::PendingAnswer { pending: false }]
    );
}

#[test]
fn update_topology_without_changes_answers_at_once() {
    let mut h = H::group(2);
    h.msg(1, PeerMsg::AcceptVote);
    let out = h.msg(2, PeerMsg::AcceptVote);
    assert!(
        topology_epoch(&H::sent_to(&out, 1)).is_none(),
        "no reconnect when nothing changed"
    );
    assert!(matches!(
        H::sent_to(&out, 2)[0],
        MasterMsg::TopologyDone { world: 2, .. }
    ));
}

#[test]
fn collective_runs_after_unanimous_votes_with_rising_sequence_numbers() {
    let mut h = H::group(3);
    let mut last_seq = 0;
    for tag in [7u64, 8] {
        h.msg(
            1,
            PeerMsg::CollInit {
                tag,
                desc: desc(10),
            },
        );
        h.msg(
            2,
            PeerMsg::CollInit {
                tag,
                desc: desc(10),
            },
        );
        let out = h.msg(
            3,
            PeerMsg::CollInit {
                tag,
                desc: desc(10),
            },
        );
        let seq = match H::sent_to(&out, 3)[0] {
            MasterMsg::CollCommence { seq, tag: t, .. } if t == tag => seq,
            ref m => panic!("{m:?}"),
        };
        assert!(seq > last_seq);
        last_seq = seq;
        h.msg(
            1,
            PeerMsg::CollComplete {
                tag,
                seq,
                ok: true,
                detail: String::new(),
            },
        );
        let out = h.msg(
            2,
            PeerMsg::CollComplete {
                tag,
                seq,
                ok: true,
                detail: String::new(),
            },
        );
        assert!(out.is_empty());
        let out = h.msg(
            3,
            PeerMsg::CollComplete {
                tag,
                seq,
                ok: true,
                detail: String::new(),
            },
        );
        for conn in 1..=3 {
            assert_eq!(
                H::sent_to(&out, conn),
                vec![MasterMsg::CollDone { tag, seq }]
            );
        }
    }
    assert_eq!(h.c.collectives_in_flight(), 0);
}

#[test]
fn mismatched_descriptors_are_refused_to_everyone_naming_both() {
    let mut h = H::group(2);
    h.msg(
        1,
        PeerMsg::CollInit {
            tag: 1,
            desc: desc(100),
        },
    );
    let out = h.msg(
        2,
        PeerMsg::CollInit {
            tag: 1,
            desc: desc(99),
        },
    );
    for conn in [1, 2] {
        match &H::sent_to(&out, conn)[0] {
            MasterMsg::CollRefused { tag: 1, reason } => {
                assert!(
                    reason.contains("count=100") && reason.contains("count=99"),
                    "{reason}"
                );
            }
            m => panic!("{m:?}"),
        }
    }
}

#[test]
fn disconnect_during_a_vote_aborts_it_for_the_survivors() {
    let mut h = H::group(3);
    h.msg(
        1,
        PeerMsg::CollInit {
            tag: 5,
            desc: desc(1),
        },
    );
    h.msg(
        2,
        PeerMsg::CollInit {
            tag: 5,
            desc: desc(1),
        },
    );
    h.c.handle_disconnect(3, h.now);
    let out = h.drain();
    for conn in [1, 2] {
        assert!(
            matches!(&H::sent_to(&out, conn)[0], MasterMsg::CollAborted { tag: 5, kind: AbortKind::LostPeer, lost, .. } if lost == &vec![3]),
            "{out:?}"
        );
    }
    // A new collective is refused until the ring is rebuilt, then runs with the survivors.
    let out = h.msg(
        1,
        PeerMsg::CollInit {
            tag: 6,
            desc: desc(1),
        },
    );
    assert!(
        matches!(&H::sent_to(&out, 1)[0], MasterMsg::CollAborted { seq: 0, reason, .. } if reason.contains("update_topology"))
    );
    h.msg(1, PeerMsg::AcceptVote);
    let out = h.msg(2, PeerMsg::AcceptVote);
    let epoch = topology_epoch(&H::sent_to(&out, 1)).expect("ring rebuilt around the hole");
    h.msg(
        1,
        PeerMsg::ConnectResult {
            epoch,
            ok: true,
            detail: String::new(),
        },
    );
    let out = h.msg(
        2,
        PeerMsg::ConnectResult {
            epoch,
            ok: true,
            detail: String::new(),
        },
    );
    assert_eq!(H::sent_to(&out, 1), vec![done(epoch, 2)]);
}

#[test]
fn disconnect_mid_collective_aborts_once_per_survivor_and_late_completions_are_ignored() {
    let mut h = H::group(3);
    for conn in 1..=3 {
        h.msg(
            conn,
            PeerMsg::CollInit {
                tag: 1,
                desc: desc(4),
            },
        );
    }
    h.msg(
        1,
        PeerMsg::CollComplete {
            tag: 1,
            seq: 1,
            ok: true,
            detail: String::new(),
        },
    );
    h.c.handle_disconnect(2, h.now);
    let out = h.drain();
    for conn in [1, 3] {
        let aborts = H::sent_to(&out, conn);
        assert_eq!(aborts.len(), 1, "{aborts:?}");
        assert!(
            matches!(&aborts[0], MasterMsg::CollAborted { seq: 1, lost, .. } if lost == &vec![2])
        );
    }
    let out = h.msg(
        3,
        PeerMsg::CollComplete {
            tag: 1,
            seq: 1,
            ok: true,
            detail: String::new(),
        },
    );
    assert!(
        out.is_empty(),
        "a completion racing the abort is not a violation: {out:?}"
    );
}

#[test]
fn a_failed_peer_aborts_the_collective_for_all() {
    let mut h = H::group(2);
    for conn in 1..=2 {
        h.msg(
            conn,
            PeerMsg::CollInit {
                tag: 1,
                desc: desc(4),
            },
        );
    }
    let out = h.msg(
        2,
        PeerMsg::CollComplete {
            tag: 1,
            seq: 1,
            ok: false,
            detail: "reset".into(),
        },
    );
    for conn in 1..=2 {
        assert!(
            matches!(&H::sent_to(&out, conn)[0], MasterMsg::CollAborted { reason, .. } if reason.contains("reset"))
        );
    }
}

#[test]
fn disconnect_during_a_connection_round_fails_the_round() {
    let mut h = H::group(2);
    h.hello(3);
    h.msg(1, PeerMsg::AcceptVote);
    let out = h.msg(2, PeerMsg::AcceptVote);
    let epoch = topology_epoch(&H::sent_to(&out, 3)).unwrap();
    h.msg(
        1,
        PeerMsg::ConnectResult {
            epoch,
            ok: true,
            detail: String::new(),
        },
    );
    h.c.handle_disconnect(2, h.now);
    let out = h.drain();
    for conn in [1, 3] {
        assert!(
            matches!(&H::sent_to(&out, conn)[0], MasterMsg::TopologyFailed { .. }),
            "{out:?}"
        );
    }
    // Everyone left votes again and gets a ring of the two survivors.
    h.msg(1, PeerMsg::AcceptVote);
    let out = h.msg(3, PeerMsg::AcceptVote);
    match &H::sent_to(&out, 3)[0] {
        MasterMsg::Topology { ring, .. } => {
            assert_eq!(
                ring.iter().map(|m| m.peer_id).collect::<Vec<_>>(),
                vec![1, 3]
            );
        }
        m => panic!("{m:?}"),
    }
}

#[test]
fn illegal_messages_get_the_sender_kicked_and_others_keep_going() {
    // Before hello.
    let mut h = H::group(2);
    h.c.handle_connect(9, "127.0.0.1".parse().unwrap(), h.now);
    let out = h.msg(9, PeerMsg::AcceptVote);
    assert!(kicked(&H::sent_to(&out, 9)).unwrap().contains("Hello") && H::closed(&out, 9));

    // Not yet admitted.
    h.hello(10);
    let out = h.msg(
        10,
        PeerMsg::CollInit {
            tag: 1,
            desc: desc(1),
        },
    );
    assert!(kicked(&H::sent_to(&out, 10))
        .unwrap()
        .contains("before being admitted"));

    // Duplicate tag in flight.
    h.msg(
        1,
        PeerMsg::CollInit {
            tag: 3,
            desc: desc(1),
        },
    );
    let out = h.msg(
        1,
        PeerMsg::CollInit {
            tag: 3,
            desc: desc(1),
        },
    );
    assert!(kicked(&H::sent_to(&out, 1))
        .unwrap()
        .contains("already in flight"));
    assert!(H::closed(&out, 1));
    assert!(
        H::sent_to(&out, 2).is_empty(),
        "peer 2 never voted on tag 3: {out:?}"
    );
    let out = h.msg(
        2,
        PeerMsg::CollInit {
            tag: 3,
            desc: desc(1),
        },
    );
    assert!(
        matches!(&H::sent_to(&out, 2)[0], MasterMsg::CollAborted { reason, .. } if reason.contains("kicked")),
        "the ring lost the kicked peer: {out:?}"
    );

    // Topology vote with a collective in flight; a completion never started.
    let mut h = H::group(2);
    h.msg(
        1,
        PeerMsg::CollInit {
            tag: 3,
            desc: desc(1),
        },
    );
    let out = h.msg(1, PeerMsg::AcceptVote);
    assert!(kicked(&H::sent_to(&out, 1))
        .unwrap()
        .contains("collectives in flight"));
    let out = h.msg(
        2,
        PeerMsg::CollComplete {
            tag: 9,
            seq: 999,
            ok: true,
            detail: String::new(),
        },
    );
    assert!(kicked(&H::sent_to(&out, 2))
        .unwrap()
        .contains("never started"));
}

#[test]
fn malformed_bytes_and_other_versions_are_refused() {
    let mut h = H::group(1);
    h.c.handle_connect(5, "127.0.0.1".parse().unwrap(), h.now);
    h.c.handle_malformed(5, "bad magic", h.now);
    let out = h.drain();
    assert!(kicked(&H::sent_to(&out, 5)).unwrap().contains("bad magic") && H::closed(&out, 5));
    h.c.handle_connect(6, "127.0.0.1".parse().unwrap(), h.now);
    h.c.handle_version_mismatch(6, PROTOCOL_VERSION + 1, h.now);
    let out = h.drain();
    match &H::sent_to(&out, 6)[0] {
        MasterMsg::Refused { reason, .. } => {
            assert!(reason.contains(&format!("version {PROTOCOL_VERSION}")));
            assert!(reason.contains(&(PROTOCOL_VERSION + 1).to_string()));
        }
        m => panic!("{m:?}"),
    }
    assert_eq!(h.c.accepted(), vec![1], "the group is untouched");
}

#[test]
fn silent_connections_are_closed_after_the_hello_timeout() {
    let mut h = H::new();
    h.c.handle_connect(1, "127.0.0.1".parse().unwrap(), h.now);
    let deadline = h.c.poll_timeout().unwrap();
    h.c.handle_timeout(deadline - Duration::from_millis(1));
    assert!(h.drain().is_empty());
    h.c.handle_timeout(deadline);
    let out = h.drain();
    assert!(H::closed(&out, 1));
    assert_eq!(h.c.connection_count(), 0);
    assert!(h.c.poll_timeout().is_none());
}

#[test]
fn a_cancel_aborts_the_collective_everywhere_and_keeps_the_ring() {
    let mut h = H::group(2);
    for conn in 1..=2 {
        h.msg(
            conn,
            PeerMsg::CollInit {
                tag: 4,
                desc: desc(8),
            },
        );
    }
    let out = h.msg(
        1,
        PeerMsg::CollCancel {
            tag: 4,
            seq: 1,
            kind: AbortKind::Timeout,
            reason: "timed out after 1 s".into(),
        },
    );
    for conn in 1..=2 {
        assert!(
            matches!(&H::sent_to(&out, conn)[0], MasterMsg::CollAborted { kind: AbortKind::Timeout, reason, lost, .. } if reason.contains("timed out") && lost.is_empty())
        );
    }
    // The ring is intact: the next collective starts without a topology update.
    h.msg(
        1,
        PeerMsg::CollInit {
            tag: 5,
            desc: desc(8),
        },
    );
    let out = h.msg(
        2,
        PeerMsg::CollInit {
            tag: 5,
            desc: desc(8),
        },
    );
    assert!(matches!(
        &H::sent_to(&out, 1)[0],
        MasterMsg::CollCommence { tag: 5, .. }
    ));
    // A late cancel of the finished attempt is ignored, not kicked.
    let out = h.msg(
        2,
        PeerMsg::CollCancel {
            tag: 4,
            seq: 1,
            kind: AbortKind::Cancelled,
            reason: "late".into(),
        },
    );
    assert!(out.is_empty(), "{out:?}");
}

#[test]
fn a_vote_cancelled_early_aborts_late_voters_too() {
    let mut h = H::group(3);
    h.msg(
        1,
        PeerMsg::CollInit {
            tag: 9,
            desc: desc(8),
        },
    );
    let out = h.msg(
        1,
        PeerMsg::CollCancel {
            tag: 9,
            seq: 0,
            kind: AbortKind::Timeout,
            reason: "timed out after 5 ms".into(),
        },
    );
    assert!(
        matches!(&H::sent_to(&out, 1)[0], MasterMsg::CollAborted { tag: 9, reason, .. } if reason.contains("waiting for peer 2, 3")),
        "the error names the late peers: {out:?}"
    );
    for late in [2, 3] {
        let out = h.msg(
            late,
            PeerMsg::CollInit {
                tag: 9,
                desc: desc(8),
            },
        );
        assert!(
            matches!(&H::sent_to(&out, late)[0], MasterMsg::CollAborted { tag: 9, kind: AbortKind::Timeout, reason, .. } if reason.contains("timed out")),
            "{out:?}"
        );
    }
    // Everyone was told: the tag is free for a fresh vote.
    for conn in 1..=2 {
        h.msg(
            conn,
            PeerMsg::CollInit {
                tag: 9,
                desc: desc(8),
            },
        );
    }
    let out = h.msg(
        3,
        PeerMsg::CollInit {
            tag: 9,
            desc: desc(8),
        },
    );
    assert!(
        matches!(
            &H::sent_to(&out, 3)[0],
            MasterMsg::CollCommence { tag: 9, .. }
        ),
        "{out:?}"
    );
}

#[test]
fn a_silent_peer_is_kicked_by_heartbeats_and_named_to_the_survivors() {
    let mut h = H::group(3);
    assert_eq!(h.c.poll_timeout(), None, "an idle group is not pinged");
    for conn in 1..=3 {
        h.msg(
            conn,
            PeerMsg::CollInit {
                tag: 1,
                desc: desc(4),
            },
        );
    }
    let interval = CoordinatorConfig::default().heartbeat_interval;
    let timeout = CoordinatorConfig::default().heartbeat_timeout;
    let t1 =
        h.c.poll_timeout()
            .expect("heartbeats while a collective runs");
    h.c.handle_timeout(t1);
    let out = h.drain();
    for conn in 1..=3 {
        assert_eq!(H::sent_to(&out, conn), vec![MasterMsg::Ping]);
    }
    // Peers 1 and 2 answer; peer 3 is stopped.
    h.now = t1 + interval;
    h.msg(1, PeerMsg::Pong);
    h.msg(2, PeerMsg::Pong);
    let mut t = t1;
    let mut kicked_at = None;
    while kicked_at.is_none() && t < t1 + timeout * 3 {
        t = h.c.poll_timeout().unwrap();
        h.c.handle_timeout(t);
        let out = h.drain();
        if H::closed(&out, 3) {
            kicked_at = Some(t);
            assert!(kicked(&H::sent_to(&out, 3)).unwrap().contains("heartbeats"));
            for conn in [1, 2] {
                assert!(
                    H::sent_to(&out, conn).iter().any(
                        |m| matches!(m, MasterMsg::CollAborted { lost, .. } if lost == &vec![3])
                    ),
                    "{out:?}"
                );
            }
        } else {
            // The survivors keep answering.
            h.msg(1, PeerMsg::Pong);
            h.msg(2, PeerMsg::Pong);
        }
    }
    let at = kicked_at.expect("peer 3 was kicked");
    assert!(
        at - t1 >= timeout && at - t1 <= timeout + interval,
        "kicked after {:?}",
        at - t1
    );
}

mod shared_state {
    use super::*;
    use crate::proto::EntryDesc;

    fn entry(key: &str, hash: u64) -> EntryDesc {
        EntryDesc {
            key: key.into(),
            dtype: "float".into(),
            bytes: 16,
            hash,
            allow_content_inequality: false,
        }
    }

    fn vote(h: &mut H, conn: ConnId, revision: u64, strategy: &str, hashes: &[u64]) -> Vec<Output> {
        let entries = hashes
            .iter()
            .enumerate()
            .map(|(i, x)| entry(&format!("k{i}"), *x))
            .collect();
        h.msg(
            conn,
            PeerMsg::SyncVote {
                revision,
                strategy: strategy.into(),
                entries,
            },
        )
    }

    fn plan(out: &[Output], conn: ConnId) -> Option<(u64, Vec<crate::proto::Pull>)> {
        H::sent_to(out, conn).into_iter().find_map(|m| match m {
            MasterMsg::SyncPlan {
                revision, pulls, ..
            } => Some((revision, pulls)),
            _ => None,
        })
    }

    #[test]
    fn popularity_beats_first_arrival_and_only_dirty_keys_move() {
        let mut h = H::group(3);
        vote(&mut h, 1, 5, "enforce-popular", &[1, 9]); // first, but alone
        vote(&mut h, 2, 5, "enforce-popular", &[1, 2]);
        let out = vote(&mut h, 3, 5, "enforce-popular", &[1, 2]);
        let (rev, pulls) = plan(&out, 1).unwrap();
        assert_eq!(rev, 5);
        assert_eq!(pulls.len(), 1, "only the dirty key moves");
        assert_eq!(pulls[0].key, "k1");
        assert_eq!(pulls[0].hash, 2);
        let sources: Vec<u64> = pulls[0].sources.iter().map(|s| s.peer_id).collect();
        assert_eq!(sources, vec![2, 3], "every up-to-date holder is a source");
        assert!(
            plan(&out, 2).unwrap().1.is_empty(),
            "identical state moves nothing"
        );
        for conn in 1..=3 {
            h.msg(
                conn,
                PeerMsg::SyncDone {
                    revision: 5,
                    ok: true,
                    detail: String::new(),
                },
            );
        }
        // The next sync must be revision 6; 8 is a jump.
        let out = vote(&mut h, 2, 8, "enforce-popular", &[1, 2]);
        assert!(kicked(&H::sent_to(&out, 2))
            .unwrap()
            .contains("jumped from 5 to 8"));
    }

    #[test]
    fn the_expected_revision_is_preferred_over_popularity() {
        let mut h = H::group(3);
        vote(&mut h, 1, 7, "enforce-popular", &[4]);
        vote(&mut h, 2, 6, "enforce-popular", &[3]);
        let out = vote(&mut h, 3, 6, "enforce-popular", &[3]);
        let (rev, pulls) = plan(&out, 2).unwrap();
        assert_eq!(
            (rev, pulls[0].hash),
            (7, 4),
            "the newest revision's content wins"
        );
    }

    #[test]
    fn ties_go_to_the_lowest_peer_id_and_strategies_kick() {
        let mut h = H::group(2);
        vote(&mut h, 1, 1, "enforce-popular", &[10]);
        let out = vote(&mut h, 2, 1, "enforce-popular", &[20]);
        assert_eq!(
            plan(&out, 2).unwrap().1[0].hash,
            10,
            "tie: peer 1's content"
        );

        let mut h = H::group(2);
        vote(&mut h, 1, 1, "receive-only", &[1]);
        let out = vote(&mut h, 2, 1, "receive-only", &[1]);
        assert!(
            H::closed(&out, 1) && H::closed(&out, 2),
            "all receive-only: everyone is kicked"
        );

        let mut h = H::group(3);
        vote(&mut h, 1, 1, "send-only", &[1]);
        vote(&mut h, 2, 1, "enforce-popular", &[2]);
        let out = vote(&mut h, 3, 1, "enforce-popular", &[2]);
        assert!(
            kicked(&H::sent_to(&out, 1)).unwrap().contains("send-only"),
            "outdated send-only peer kicked"
        );

        let mut h = H::group(2);
        vote(&mut h, 1, 1, "enforce-popular", &[1, 2]);
        let out = vote(&mut h, 2, 1, "enforce-popular", &[1]);
        assert!(
            H::closed(&out, 1) || H::closed(&out, 2),
            "a key-set mismatch gets the odd peer kicked"
        );
    }

    #[test]
    fn a_receive_only_peer_never_serves_and_resume_from_any_revision() {
        let mut h = H::group(3);
        vote(&mut h, 1, 41, "receive-only", &[5]);
        vote(&mut h, 2, 41, "enforce-popular", &[6]);
        let out = vote(&mut h, 3, 41, "enforce-popular", &[6]);
        let (rev, pulls) = plan(&out, 1).unwrap();
        assert_eq!(rev, 41, "any first revision (resume from a checkpoint)");
        assert!(pulls[0].sources.iter().all(|s| s.peer_id != 1));
    }

    #[test]
    fn a_failed_pull_fails_the_sync_for_everyone() {
        let mut h = H::group(2);
        vote(&mut h, 1, 1, "enforce-popular", &[1]);
        vote(&mut h, 2, 1, "enforce-popular", &[1]);
        let out = h.msg(
            2,
            PeerMsg::SyncDone {
                revision: 1,
                ok: false,
                detail: "hash mismatch".into(),
            },
        );
        for conn in 1..=2 {
            assert!(
                matches!(&H::sent_to(&out, conn)[0], MasterMsg::SyncFailed { reason } if reason.contains("hash mismatch"))
            );
        }
    }
}

#[test]
fn groups_run_side_by_side_on_their_own_rings() {
    let mut h = H::new();
    let hello = |h: &mut H, conn: ConnId, group: u32| {
        h.c.handle_connect(conn, "127.0.0.1".parse().unwrap(), h.now);
        h.register(
            conn,
            PeerMsg::Hello {
                version: PROTOCOL_VERSION,
                data_port: 1,
                advertise_ip: String::new(),
                group,
                nonce: [0; 32],
            },
        )
    };
    let out = hello(&mut h, 1, 0);
    let e = topology_epoch(&H::sent_to(&out, 1)).unwrap();
    h.msg(
        1,
        PeerMsg::ConnectResult {
            epoch: e,
            ok: true,
            detail: String::new(),
        },
    );
    for (conn, group) in [(2, 0), (3, 7), (4, 7), (5, 7)] {
        hello(&mut h, conn, group);
    }
    let out = h.msg(1, PeerMsg::AcceptVote);
    let ring_of = |out: &[Output], conn| match &H::sent_to(out, conn)[0] {
        MasterMsg::Topology { ring, epoch, .. } => {
            (*epoch, ring.iter().map(|m| m.peer_id).collect::<Vec<_>>())
        }
        m => panic!("{m:?}"),
    };
    let (e, ring0) = ring_of(&out, 2);
    assert_eq!(ring0, vec![1, 2], "group 0's ring");
    assert_eq!(ring_of(&out, 4).1, vec![3, 4, 5], "group 7's ring");
    let mut out = Vec::new();
    for conn in 1..=5 {
        out = h.msg(
            conn,
            PeerMsg::ConnectResult {
                epoch: e,
                ok: true,
                detail: String::new(),
            },
        );
    }
    assert_eq!(
        H::sent_to(&out, 3),
        vec![MasterMsg::TopologyDone {
            epoch: e,
            world: 3,
            global_world: 5,
            groups: 2,
            largest_group: 3
        }]
    );
    // The same tag runs in both groups independently, with each group's own descriptor.
    h.msg(
        1,
        PeerMsg::CollInit {
            tag: 1,
            desc: desc(10),
        },
    );
    let out = h.msg(
        2,
        PeerMsg::CollInit {
            tag: 1,
            desc: desc(10),
        },
    );
    assert!(
        matches!(
            H::sent_to(&out, 1)[0],
            MasterMsg::CollCommence { tag: 1, .. }
        ),
        "group 0 alone decides"
    );
    for conn in 3..=5 {
        h.msg(
            conn,
            PeerMsg::CollInit {
                tag: 1,
                desc: desc(99),
            },
        );
    }
    // Losing a peer of group 7 aborts only group 7's collective.
    h.c.handle_disconnect(5, h.now);
    let out = h.drain();
    assert!(
        H::sent_to(&out, 1).is_empty() && H::sent_to(&out, 2).is_empty(),
        "{out:?}"
    );
    assert!(
        matches!(&H::sent_to(&out, 3)[0], MasterMsg::CollAborted { lost, .. } if lost == &vec![5])
    );
    // Group 0 completes its collective.
    h.msg(
        1,
        PeerMsg::CollComplete {
            tag: 1,
            seq: 1,
            ok: true,
            detail: String::new(),
        },
    );
    let out = h.msg(
        2,
        PeerMsg::CollComplete {
            tag: 1,
            seq: 1,
            ok: true,
            detail: String::new(),
        },
    );
    assert_eq!(
        H::sent_to(&out, 1),
        vec![MasterMsg::CollDone { tag: 1, seq: 1 }]
    );
}

#[test]
fn a_repair_vote_rebuilds_the_ring_without_admitting_anyone() {
    let mut h = H::group(3);
    h.c.handle_disconnect(3, h.now);
    h.drain();
    h.hello(4); // waiting to join
    h.msg(1, PeerMsg::RepairVote);
    let out = h.msg(2, PeerMsg::RepairVote);
    match &H::sent_to(&out, 1)[0] {
        MasterMsg::Topology { ring, .. } => {
            assert_eq!(
                ring.iter().map(|m| m.peer_id).collect::<Vec<_>>(),
                vec![1, 2],
                "the joiner waits"
            );
        }
        m => panic!("{m:?}"),
    }
    assert!(
        H::sent_to(&out, 4).is_empty(),
        "nothing for the pending peer"
    );
    assert_eq!(h.c.pending(), vec![4]);
    let epoch = topology_epoch(&H::sent_to(&out, 1)).unwrap();
    for conn in [1, 2] {
        h.msg(
            conn,
            PeerMsg::ConnectResult {
                epoch,
                ok: true,
                detail: String::new(),
            },
        );
    }
    // A mix of repair and admit votes admits nobody; a unanimous AcceptVote does.
    h.msg(1, PeerMsg::RepairVote);
    let out = h.msg(2, PeerMsg::AcceptVote);
    assert!(
        H::sent_to(&out, 4).is_empty(),
        "a mixed vote admits nobody: {out:?}"
    );
    h.msg(1, PeerMsg::AcceptVote);
    let out = h.msg(2, PeerMsg::AcceptVote);
    assert!(
        topology_epoch(&H::sent_to(&out, 4)).is_some(),
        "now admitted"
    );
}

mod shared_state_more {
    use super::*;
    use crate::proto::EntryDesc;

    fn entries(n: usize, f: impl Fn(usize) -> (u64, bool)) -> Vec<EntryDesc> {
        (0..n)
            .map(|i| {
                let (hash, allow) = f(i);
                EntryDesc {
                    key: format!("k{i:05}"),
                    dtype: "half".into(),
                    bytes: 2,
                    hash,
                    allow_content_inequality: allow,
                }
            })
            .collect()
    }

    fn pulls(out: &[Output], conn: ConnId) -> Vec<String> {
        H::sent_to(out, conn)
            .into_iter()
            .find_map(|m| match m {
                MasterMsg::SyncPlan { pulls, .. } => {
                    Some(pulls.into_iter().map(|p| p.key).collect())
                }
                _ => None,
            })
            .expect("a plan")
    }

    #[test]
    fn entries_allowed_to_differ_never_move() {
        let mut h = H::group(2);
        // Key 0 differs by design; key 1 differs for real.
        h.msg(
            1,
            PeerMsg::SyncVote {
                revision: 1,
                strategy: "enforce-popular".into(),
                entries: entries(2, |i| (10 + i as u64, i == 0)),
            },
        );
        let out = h.msg(
            2,
            PeerMsg::SyncVote {
                revision: 1,
                strategy: "enforce-popular".into(),
                entries: entries(2, |i| (20 + i as u64, i == 0)),
            },
        );
        assert_eq!(
            pulls(&out, 2),
            vec!["k00001".to_string()],
            "only the real difference moves"
        );
        assert!(pulls(&out, 1).is_empty());
    }

    #[test]
    fn many_keys_only_the_dirty_ones_move() {
        let mut h = H::group(3);
        let n = 3000;
        h.msg(
            1,
            PeerMsg::SyncVote {
                revision: 7,
                strategy: "enforce-popular".into(),
                entries: entries(n, |i| (i as u64, false)),
            },
        );
        h.msg(
            2,
            PeerMsg::SyncVote {
                revision: 7,
                strategy: "enforce-popular".into(),
                entries: entries(n, |i| (i as u64, false)),
            },
        );
        // Peer 3 is stale on every 7th key.
        let out = h.msg(
            3,
            PeerMsg::SyncVote {
                revision: 7,
                strategy: "enforce-popular".into(),
                entries: entries(n, |i| (if i % 7 == 0 { 99_999 } else { i as u64 }, false)),
            },
        );
        let moved = pulls(&out, 3);
        assert_eq!(moved.len(), n.div_ceil(7));
        assert!(moved
            .iter()
            .all(|k| k[1..].parse::<usize>().unwrap() % 7 == 0));
        assert!(pulls(&out, 1).is_empty() && pulls(&out, 2).is_empty());
    }
}

/// Deadlines for peers never admitted, and the limits on connections.
mod limits {
    use std::net::IpAddr;

    use super::*;

    fn with(config: CoordinatorConfig) -> H {
        H {
            c: Coordinator::new(config),
            now: Instant::now(),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn refused(msgs: &[MasterMsg]) -> Option<String> {
        msgs.iter().find_map(|m| match m {
            MasterMsg::Refused { reason, .. } => Some(reason.clone()),
            _ => None,
        })
    }

    /// Runs the coordinator's deadlines until `until`, peers `answering` answering every ping.
    fn run_until(h: &mut H, until: Instant, answering: &[ConnId]) -> Vec<Output> {
        let mut all = Vec::new();
        while let Some(t) = h.c.poll_timeout().filter(|t| *t <= until) {
            h.now = t;
            h.c.handle_timeout(t);
            let out = h.drain();
            for conn in answering {
                if H::sent_to(&out, *conn).contains(&MasterMsg::Ping) {
                    all.extend(h.msg(*conn, PeerMsg::Pong));
                }
            }
            all.extend(out);
        }
        h.now = until;
        all
    }

    #[test]
    fn a_peer_nobody_admits_is_refused_at_its_deadline_and_frees_its_slot() {
        let config = CoordinatorConfig {
            max_peers: 2,
            ..CoordinatorConfig::default()
        };
        let pending_timeout = config.pending_timeout;
        assert_eq!(pending_timeout, Duration::from_secs(600), "the default");
        let mut h = with(config);
        let out = h.hello(1);
        let epoch = topology_epoch(&H::sent_to(&out, 1)).unwrap();
        let detail = String::new();
        h.msg(
            1,
            PeerMsg::ConnectResult {
                epoch,
                ok: true,
                detail,
            },
        );
        let registered = h.now;
        h.hello(2);
        assert_eq!(h.c.pending(), vec![2]);
        let out = h.hello(3);
        assert!(refused(&H::sent_to(&out, 3)).unwrap().contains("full"));
        assert!(h.c.poll_timeout().unwrap() <= registered + pending_timeout);

        // Answering its pings keeps it alive, not admitted: just before the deadline it waits.
        let out = run_until(
            &mut h,
            registered + pending_timeout - Duration::from_millis(1),
            &[2],
        );
        assert!(!H::closed(&out, 2), "{out:?}");
        assert!(
            H::sent_to(&out, 1).is_empty(),
            "an idle member is not pinged"
        );
        let out = run_until(&mut h, registered + pending_timeout, &[2]);
        let reason = refused(&H::sent_to(&out, 2)).expect("refused at the deadline");
        assert!(
            reason.contains("not admitted within 600 s") && reason.contains("update_topology"),
            "{reason}"
        );
        assert!(H::closed(&out, 2));
        assert!(h.c.pending().is_empty());
        assert_eq!(h.c.accepted(), vec![1], "the group is untouched");
        h.c.handle_disconnect(2, h.now);
        h.drain();
        assert!(h.c.poll_timeout().is_none(), "nothing left to watch");
        let out = h.hello(4);
        assert!(refused(&H::sent_to(&out, 4)).is_none(), "{out:?}");
        assert_eq!(h.c.pending().len(), 1, "the slot is free again");
    }

    #[test]
    fn a_pending_peer_that_stops_answering_pings_is_kicked() {
        let mut h = H::new();
        let out = h.hello(1);
        let epoch = topology_epoch(&H::sent_to(&out, 1)).unwrap();
        let detail = String::new();
        h.msg(
            1,
            PeerMsg::ConnectResult {
                epoch,
                ok: true,
                detail,
            },
        );
        assert!(h.c.poll_timeout().is_none());
        h.hello(2);
        h.hello(3);
        let timeout = CoordinatorConfig::default().heartbeat_timeout;
        let interval = CoordinatorConfig::default().heartbeat_interval;
        let start = h.now;
        // Peer 3 answers, peer 2 is stopped.
        let out = run_until(&mut h, start + timeout + interval * 2, &[3]);
        assert!(H::sent_to(&out, 2).contains(&MasterMsg::Ping));
        assert!(
            kicked(&H::sent_to(&out, 2)).unwrap().contains("heartbeats"),
            "{out:?}"
        );
        assert!(H::closed(&out, 2));
        assert!(!H::closed(&out, 3));
        assert!(
            H::sent_to(&out, 1).is_empty(),
            "the idle member is not pinged"
        );
        assert_eq!(h.c.pending(), vec![3]);
        // Once admitted, the idle group is not pinged any more.
        let out = h.msg(1, PeerMsg::AcceptVote);
        let epoch = topology_epoch(&H::sent_to(&out, 1)).unwrap();
        for conn in [1, 3] {
            let detail = String::new();
            h.msg(
                conn,
                PeerMsg::ConnectResult {
                    epoch,
                    ok: true,
                    detail,
                },
            );
        }
        assert_eq!(h.c.accepted(), vec![1, 3]);
        assert!(h.c.poll_timeout().is_none(), "an idle group costs nothing");
    }

    #[test]
    fn connections_beyond_the_per_address_limit_are_refused_until_one_closes() {
        let config = CoordinatorConfig {
            max_connections_per_ip: 2,
            ..CoordinatorConfig::default()
        };
        let mut h = with(config);
        for conn in [1, 2] {
            h.c.handle_connect(conn, ip("10.0.0.1"), h.now);
        }
        h.c.handle_connect(3, ip("10.0.0.2"), h.now);
        assert!(h.drain().is_empty(), "within the limits");
        h.c.handle_connect(4, ip("10.0.0.1"), h.now);
        let out = h.drain();
        let reason = refused(&H::sent_to(&out, 4)).expect("refused");
        assert!(
            reason.contains("10.0.0.1") && reason.contains("--max-connections-per-ip"),
            "{reason}"
        );
        assert!(H::closed(&out, 4));
        // Its late bytes and its drop change nothing.
        h.c.handle_message(4, PeerMsg::Goodbye, h.now);
        h.c.handle_disconnect(4, h.now);
        assert!(h.drain().is_empty());
        h.c.handle_connect(5, ip("10.0.0.1"), h.now);
        assert!(H::closed(&h.drain(), 5), "still two open from 10.0.0.1");
        h.c.handle_disconnect(5, h.now);
        h.c.handle_disconnect(1, h.now);
        h.c.handle_connect(6, ip("10.0.0.1"), h.now);
        assert!(h.drain().is_empty(), "a dropped connection frees its slot");
        assert_eq!(h.c.connection_count(), 3);
    }

    #[test]
    fn connections_beyond_the_total_are_refused_and_count_until_the_shell_drops_them() {
        let config = CoordinatorConfig {
            max_connections: 3,
            ..CoordinatorConfig::default()
        };
        let mut h = with(config);
        for conn in 1..=3u64 {
            h.c.handle_connect(conn, ip(&format!("10.0.0.{conn}")), h.now);
        }
        h.c.handle_connect(4, ip("10.0.0.4"), h.now);
        let out = h.drain();
        let reason = refused(&H::sent_to(&out, 4)).expect("refused");
        assert!(reason.contains("--max-connections"), "{reason}");
        // Connection 1 never says hello: the coordinator closes it, but its descriptor is held
        // until the shell drops it.
        let deadline = h.c.poll_timeout().unwrap();
        h.c.handle_timeout(deadline);
        assert!(H::closed(&h.drain(), 1));
        h.c.handle_connect(5, ip("10.0.0.5"), h.now);
        assert!(H::closed(&h.drain(), 5), "connection 1 is not dropped yet");
        h.c.handle_disconnect(5, h.now);
        for conn in 1..=3 {
            h.c.handle_disconnect(conn, h.now);
        }
        h.drain();
        for conn in 6..=8u64 {
            h.c.handle_connect(conn, ip("10.0.0.6"), h.now);
        }
        assert!(h.drain().is_empty(), "every slot is free again");
    }

    #[test]
    fn refusals_of_a_flood_are_remembered_for_a_bounded_number_of_addresses() {
        let config = CoordinatorConfig {
            max_connections: 1,
            ..CoordinatorConfig::default()
        };
        let mut h = with(config);
        h.c.handle_connect(1, ip("10.0.0.1"), h.now);
        let flood = (super::super::state::MAX_REFUSAL_LOG_ADDRS as u64) * 3;
        for conn in 2..2 + flood {
            let addr = IpAddr::V6(std::net::Ipv6Addr::from(conn as u128));
            h.c.handle_connect(conn, addr, h.now);
            h.c.handle_disconnect(conn, h.now);
        }
        let out = h.drain();
        assert_eq!(
            out.iter()
                .filter(|o| matches!(o, Output::Close { .. }))
                .count() as u64,
            flood
        );
        assert!(h.c.refusals.logged_at.len() <= super::super::state::MAX_REFUSAL_LOG_ADDRS);
        assert!(h.c.refusals.unlogged > 0);
        // A minute later, the addresses are forgotten and logging resumes.
        h.now += Duration::from_secs(61);
        h.c.handle_connect(flood + 10, ip("10.9.9.9"), h.now);
        assert!(h.c.refusals.logged_at.len() <= 1, "stale addresses pruned");
        assert_eq!(h.c.connection_count(), 1);
    }
}

#[test]
fn a_refusal_names_the_fields_that_differ() {
    let mut h = H::group(2);
    let broadcast = |root| CollectiveDesc {
        kind: CollKind::Broadcast,
        root,
        ..desc(64)
    };
    h.msg(
        1,
        PeerMsg::CollInit {
            tag: 3,
            desc: broadcast(0),
        },
    );
    let out = h.msg(
        2,
        PeerMsg::CollInit {
            tag: 3,
            desc: broadcast(1),
        },
    );
    for conn in [1, 2] {
        match &H::sent_to(&out, conn)[0] {
            MasterMsg::CollRefused { tag: 3, reason } => assert!(
                reason.contains("root (1 vs 0)") && !reason.contains("count ("),
                "{reason}"
            ),
            m => panic!("{m:?}"),
        }
    }
    h.msg(
        1,
        PeerMsg::CollInit {
            tag: 4,
            desc: desc(64),
        },
    );
    let out = h.msg(
        2,
        PeerMsg::CollInit {
            tag: 4,
            desc: CollectiveDesc {
                kind: CollKind::AllGather,
                ..desc(64)
            },
        },
    );
    match &H::sent_to(&out, 1)[0] {
        MasterMsg::CollRefused { tag: 4, reason } => {
            assert!(
                reason.contains("kind (all_gather vs all_reduce)"),
                "{reason}"
            )
        }
        m => panic!("{m:?}"),
    }
}

#[test]
fn a_root_outside_the_ring_is_refused() {
    let mut h = H::group(2);
    let reduce = CollectiveDesc {
        kind: CollKind::Reduce,
        root: 2,
        ..desc(8)
    };
    h.msg(
        1,
        PeerMsg::CollInit {
            tag: 9,
            desc: reduce.clone(),
        },
    );
    let out = h.msg(
        2,
        PeerMsg::CollInit {
            tag: 9,
            desc: reduce,
        },
    );
    for conn in [1, 2] {
        match &H::sent_to(&out, conn)[0] {
            MasterMsg::CollRefused { tag: 9, reason } => {
                assert!(
                    reason.contains("root rank 2") && reason.contains("2 peers"),
                    "{reason}"
                )
            }
            m => panic!("{m:?}"),
        }
    }
}

/// An order every member proposes becomes the ring (and stays through later rounds); orders
/// that differ leave the ring as it was; an order naming a stranger gets its sender kicked.
#[test]
fn an_agreed_ring_order_is_installed() {
    let mut h = H::group(3);
    let ring_of = |out: &[Output], conn| match &H::sent_to(out, conn)[0] {
        MasterMsg::Topology { ring, epoch, .. } => {
            (*epoch, ring.iter().map(|m| m.peer_id).collect::<Vec<_>>())
        }
        m => panic!("{m:?}"),
    };
    for id in [1, 2] {
        h.msg(
            id,
            PeerMsg::OrderVote {
                order: vec![1, 3, 2],
            },
        );
    }
    let out = h.msg(
        3,
        PeerMsg::OrderVote {
            order: vec![1, 3, 2],
        },
    );
    let (epoch, ring) = ring_of(&out, 2);
    assert_eq!(ring, vec![1, 3, 2]);
    for conn in [1, 2, 3] {
        h.msg(
            conn,
            PeerMsg::ConnectResult {
                epoch,
                ok: true,
                detail: String::new(),
            },
        );
    }
    // A later repair keeps the order.
    h.c.handle_disconnect(2, h.now);
    h.drain();
    h.msg(1, PeerMsg::RepairVote);
    let out = h.msg(3, PeerMsg::RepairVote);
    assert_eq!(ring_of(&out, 1).1, vec![1, 3]);
    let epoch = ring_of(&out, 1).0;
    for conn in [1, 3] {
        h.msg(
            conn,
            PeerMsg::ConnectResult {
                epoch,
                ok: true,
                detail: String::new(),
            },
        );
    }
    // Disagreeing orders change nothing: the round is not even needed.
    h.msg(1, PeerMsg::OrderVote { order: vec![3, 1] });
    let out = h.msg(3, PeerMsg::OrderVote { order: vec![1, 3] });
    assert!(
        H::sent_to(&out, 1)
            .iter()
            .all(|m| !matches!(m, MasterMsg::Topology { .. })),
        "{out:?}"
    );
    // A stranger in the order is a protocol violation.
    let out = h.msg(1, PeerMsg::OrderVote { order: vec![1, 99] });
    assert!(
        out.iter().any(|o| matches!(o, Output::Close { conn: 1 })),
        "{out:?}"
    );
}
