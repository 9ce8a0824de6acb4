//! Unit tests of the coordinator's bounds: what a peer advertises, and the size of every
//! message whose size depends on peer input (no message the master builds can outgrow the
//! limit, whatever peers send).

use std::time::Instant;

use concord_transport::PROTOCOL_VERSION;

use super::membership::{check_advertised, MAX_HOST_BYTES, MAX_TOPOLOGY_PEERS};
use super::{ConnId, Coordinator, CoordinatorConfig, Output};
use crate::proto::{
    encode_master, master_message_bytes, EntryDesc, MasterMsg, PeerMsg, RingMember,
    MAX_MESSAGE_BYTES,
};

struct Master {
    c: Coordinator,
    now: Instant,
}

impl Master {
    fn new() -> Self {
        Master {
            c: Coordinator::new(CoordinatorConfig::default()),
            now: Instant::now(),
        }
    }

    fn send(&mut self, conn: ConnId, m: PeerMsg) -> Vec<(ConnId, MasterMsg)> {
        self.c.handle_message(conn, m, self.now);
        let out: Vec<Output> = std::iter::from_fn(|| self.c.poll_output()).collect();
        out.into_iter()
            .filter_map(|o| match o {
                Output::Send { conn, msg } => Some((conn, msg)),
                Output::Close { .. } => None,
            })
            .collect()
    }

    fn hello(&mut self, conn: ConnId, advertise_ip: &str) -> Vec<(ConnId, MasterMsg)> {
        self.c
            .handle_connect(conn, "127.0.0.1".parse().unwrap(), self.now);
        let mut out = self.send(
            conn,
            PeerMsg::Hello {
                version: PROTOCOL_VERSION,
                data_port: 7000 + conn as u16,
                advertise_ip: advertise_ip.into(),
                group: 0,
                nonce: [0; 32],
            },
        );
        if out
            .iter()
            .any(|(_, m)| matches!(m, MasterMsg::Challenge { .. }))
        {
            out.extend(self.send(conn, PeerMsg::Proof { proof: [0; 32] }));
        }
        out
    }

    /// Peers on conns 1..=n (peer id = conn), each advertising `host(conn)`, in one ring: each
    /// newcomer is admitted by a vote of those already in.
    fn group(n: u64, host: impl Fn(u64) -> String) -> Self {
        let mut m = Master::new();
        for conn in 1..=n {
            let mut out = m.hello(conn, &host(conn));
            for voter in 1..conn {
                out.extend(m.send(voter, PeerMsg::AcceptVote));
            }
            let epoch = out
                .iter()
                .find_map(|(_, msg)| match msg {
                    MasterMsg::Topology { epoch, .. } => Some(*epoch),
                    _ => None,
                })
                .expect("a topology round started");
            for member in 1..=conn {
                m.send(
                    member,
                    PeerMsg::ConnectResult {
                        epoch,
                        ok: true,
                        detail: String::new(),
                    },
                );
            }
        }
        assert_eq!(m.c.accepted().len(), n as usize, "the group formed");
        m
    }
}

fn refusal(out: &[(ConnId, MasterMsg)]) -> Option<String> {
    out.iter().find_map(|(_, m)| match m {
        MasterMsg::Refused { reason, .. } => Some(reason.clone()),
        _ => None,
    })
}

#[test]
fn advertised_addresses_are_ips_or_hostnames_of_bounded_length() {
    for ok in [
        "",
        "10.1.2.3",
        "::1",
        "fe80::1",
        "node-7",
        "gpu001.cluster.example.org",
        "a.b.c.",
    ] {
        assert_eq!(check_advertised(ok), Ok(()), "{ok:?}");
    }
    let long =
        "a".repeat(63) + "." + &"b".repeat(63) + "." + &"c".repeat(63) + "." + &"d".repeat(63);
    assert!(long.len() > MAX_HOST_BYTES);
    for bad in [
        "-node",
        "node-",
        "no de",
        "node:80",
        "[::1]",
        "a..b",
        "x\u{0}y",
        "ünï",
        long.as_str(),
    ] {
        assert!(check_advertised(bad).is_err(), "{bad:?}");
    }
    // Over the wire: a stranger's bad address is refused, with why, and nothing is admitted.
    let mut m = Master::new();
    let why = refusal(&m.hello(1, &"x".repeat(4000))).expect("refused");
    assert!(why.contains("advertise_ip") && why.contains("253"), "{why}");
    let why = refusal(&m.hello(2, "evil; rm -rf /")).expect("refused");
    assert!(
        why.contains("neither an IP address nor a hostname"),
        "{why}"
    );
    assert!(m.c.accepted().is_empty() && m.c.pending().is_empty());
}

#[test]
fn the_largest_topology_the_master_admits_fits_the_message_limit() {
    // Every member with the longest address a hello can advertise.
    let host = [
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(61),
    ]
    .join(".");
    assert_eq!(host.len(), MAX_HOST_BYTES);
    let ring: Vec<RingMember> = (0..MAX_TOPOLOGY_PEERS as u64)
        .map(|peer_id| RingMember {
            peer_id,
            data_addr: format!("[{host}]:65535"),
        })
        .collect();
    let msg = MasterMsg::Topology {
        epoch: u64::MAX,
        secret: u64::MAX,
        ring,
    };
    assert!(master_message_bytes(&msg) <= MAX_MESSAGE_BYTES);
    assert_eq!(encode_master(&msg).len(), master_message_bytes(&msg));
}

fn entries(n: usize, key_bytes: usize, hash: u64) -> Vec<EntryDesc> {
    (0..n)
        .map(|i| EntryDesc {
            key: format!("{i:08}{}", "k".repeat(key_bytes.saturating_sub(8))),
            dtype: "float".into(),
            bytes: 4,
            hash,
            allow_content_inequality: false,
        })
        .collect()
}

fn vote(entries: Vec<EntryDesc>) -> PeerMsg {
    PeerMsg::SyncVote {
        revision: 1,
        strategy: "enforce-popular".into(),
        entries,
    }
}

#[test]
fn a_plan_names_a_few_holders_per_entry_spread_over_the_pullers() {
    // Eight holders of every entry (conns 1-8), eight outdated peers (9-16).
    let peers = 16u64;
    let mut m = Master::group(peers, |_| String::new());
    let mut plans = std::collections::BTreeMap::new();
    for conn in 1..=peers {
        let hash = if conn > 8 { 2 } else { 1 };
        for (to, msg) in m.send(conn, vote(entries(64, 24, hash))) {
            if let MasterMsg::SyncPlan { pulls, .. } = msg {
                plans.insert(to, pulls);
            }
        }
    }
    let mut used = std::collections::BTreeSet::new();
    for puller in 9..=peers {
        let pulls = &plans[&puller];
        assert_eq!(pulls.len(), 64);
        let first: Vec<u64> = pulls[0].sources.iter().map(|s| s.peer_id).collect();
        assert_eq!(first.len(), 4, "a few holders per entry: {first:?}");
        for p in pulls {
            let ids: Vec<u64> = p.sources.iter().map(|s| s.peer_id).collect();
            // The same few for all of one puller's entries: it pulls from them at once.
            assert_eq!(ids, first, "puller {puller}, {}", p.key);
        }
        used.extend(first);
    }
    assert_eq!(
        used.len(),
        8,
        "the pullers spread over every holder: {used:?}"
    );
}

#[test]
fn a_plan_over_the_message_limit_fails_the_sync_naming_the_limit() {
    // Five peers advertising 190-byte hostnames, 2,000 entries of 200-byte keys: each vote
    // fits (about 0.5 MB) but the outdated peer's plan, four long addresses per entry, would not.
    let peers = 5u64;
    let host = |conn: u64| {
        format!(
            "h{conn}.{}",
            ["x".repeat(60), "y".repeat(60), "z".repeat(60)].join(".")
        )
    };
    let mut m = Master::group(peers, host);
    let mut outcome = Vec::new();
    for conn in 1..=peers {
        let hash = if conn == peers { 2 } else { 1 };
        let v = vote(entries(2000, 200, hash));
        assert!(crate::proto::peer_message_bytes(&v) <= MAX_MESSAGE_BYTES);
        outcome.extend(m.send(conn, v));
    }
    let failed: Vec<&String> = outcome
        .iter()
        .filter_map(|(_, msg)| match msg {
            MasterMsg::SyncFailed { reason } => Some(reason),
            MasterMsg::SyncPlan { .. } => panic!("a plan went out: {msg:?}"),
            _ => None,
        })
        .collect();
    assert_eq!(
        failed.len(),
        peers as usize,
        "every voter is told: {outcome:?}"
    );
    assert!(
        failed[0].contains("message limit") && failed[0].contains(&MAX_MESSAGE_BYTES.to_string()),
        "{}",
        failed[0]
    );
    // Every message the master did send fits.
    for (_, msg) in &outcome {
        assert!(master_message_bytes(msg) <= MAX_MESSAGE_BYTES);
    }
}

#[test]
fn a_revision_at_the_top_of_the_range_is_refused_not_overflowed() {
    let mut m = Master::group(1, |_| String::new());
    let mut top = vote(entries(1, 8, 1));
    if let PeerMsg::SyncVote { revision, .. } = &mut top {
        *revision = u64::MAX;
    }
    m.send(1, top.clone());
    m.send(
        1,
        PeerMsg::SyncDone {
            revision: u64::MAX,
            ok: true,
            detail: String::new(),
        },
    );
    // The next vote would have to be revision u64::MAX + 1: refused as a jump, no panic.
    let out = m.send(1, top);
    assert!(
        out.iter().any(
            |(_, msg)| matches!(msg, MasterMsg::Kicked { reason } if reason.contains("revision"))
        ),
        "{out:?}"
    );
}
