//! Fuzzing on the stable toolchain: a seeded driver feeds every decoder that reads what a
//! stranger sends (control messages both ways, the data frame header, the data hello and its
//! reply, the shared-state pull request) with mutations of a committed corpus and with random
//! bytes, and feeds random message sequences into the sans-IO master (`Coordinator`, with and
//! without a run token, proving it right or wrong) and peer (`PeerProto`). Nothing may panic;
//! whatever decodes must encode back to the same message; every message the master sends fits
//! the size limit.
//!
//! Each target runs for `CONCORD_FUZZ_SECS` seconds (default 3) and says how many inputs it
//! ran. A failure prints the seed and the input: `CONCORD_FUZZ_SEED=S` replays a run.
//! `cargo test -p concord --test fuzz -- --ignored write_corpus` rewrites the seed corpus in
//! `engine/tests/fuzz-corpus/` from the message builders below.

use std::io::{Read, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use concord::protocol::PeerProto;
use concord::PullRequest;
use concord_master::coordinator::{Coordinator, CoordinatorConfig, Output};
use concord_master::proto::{
    decode_master, decode_peer, encode_master, encode_peer, master_message_bytes, split_frame,
    AbortKind, CollKind, CollectiveDesc, EntryDesc, MasterMsg, PeerMsg, Pull, RingMember,
    MAX_MESSAGE_BYTES, PROTOCOL_VERSION,
};
use concord_transport::auth::{self, EpochKey, KeyPurpose, RunToken};
use concord_transport::frame::{DataHeader, HEADER_BYTES};
use concord_transport::handshake::{read_reply, DataHello};

/// xorshift64*: deterministic, fast, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn chance(&mut self, one_in: u64) -> bool {
        self.next().is_multiple_of(one_in)
    }
    /// Small values most of the time, extremes sometimes: what breaks bounds checks.
    fn int(&mut self) -> u64 {
        match self.below(8) {
            0 => 0,
            1 => u64::MAX,
            2 => self.next(),
            3 => 1 << self.below(64),
            _ => self.below(6) as u64,
        }
    }
    fn text(&mut self) -> String {
        let n = [0, 1, 8, 64, 300, 5000][self.below(6)];
        (0..n)
            .map(|_| ['a', '-', '.', ':', '1', 'é', '\0'][self.below(7)])
            .collect()
    }
}

/// Runs `one` on fresh inputs for the time budget; a panic names the seed and the iteration.
fn drive(name: &str, min_runs: u64, mut one: impl FnMut(&mut Rng)) {
    let secs: f64 = std::env::var("CONCORD_FUZZ_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3.0);
    let seed: u64 = std::env::var("CONCORD_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    let mut rng = Rng(seed);
    let start = Instant::now();
    let budget = Duration::from_secs_f64(secs);
    let mut runs = 0u64;
    while start.elapsed() < budget || runs < min_runs {
        let at = rng.0;
        let outcome = catch_unwind(AssertUnwindSafe(|| one(&mut rng)));
        if let Err(panic) = outcome {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!(
                "fuzz target {name}: input {runs} panicked: {what}\n\
                 replay: CONCORD_FUZZ_SEED={seed} (the failing input starts from rng state {at})"
            );
        }
        runs += 1;
    }
    println!(
        "fuzz target {name}: {runs} inputs in {:.1} s, seed {seed}, no panic",
        start.elapsed().as_secs_f64()
    );
}

fn desc() -> CollectiveDesc {
    CollectiveDesc {
        kind: CollKind::AllReduce,
        count: 1024,
        dtype: "float".into(),
        op: "sum".into(),
        root: 0,
    }
}

fn entry(i: u64) -> EntryDesc {
    EntryDesc {
        key: format!("layer{i}.weight"),
        dtype: "bfloat16".into(),
        bytes: 4096,
        hash: i.wrapping_mul(0x9E37),
        allow_content_inequality: i.is_multiple_of(3),
    }
}

fn member(i: u64) -> RingMember {
    RingMember {
        peer_id: i,
        data_addr: format!("10.0.0.{i}:4000"),
    }
}

/// One message of every kind, both directions: the seed corpus.
fn seed_messages() -> (Vec<PeerMsg>, Vec<MasterMsg>) {
    let peer = vec![
        PeerMsg::Hello {
            version: PROTOCOL_VERSION,
            data_port: 4000,
            advertise_ip: "node-1".into(),
            group: 2,
            nonce: [7; 32],
        },
        PeerMsg::Proof { proof: [9; 32] },
        PeerMsg::AcceptVote,
        PeerMsg::RepairVote,
        PeerMsg::OrderVote {
            order: vec![1, 3, 2],
        },
        PeerMsg::PendingQuery,
        PeerMsg::ConnectResult {
            epoch: 3,
            ok: false,
            detail: "refused".into(),
        },
        PeerMsg::CollInit {
            tag: 7,
            desc: desc(),
        },
        PeerMsg::CollComplete {
            tag: 7,
            seq: 9,
            ok: true,
            detail: String::new(),
        },
        PeerMsg::Goodbye,
        PeerMsg::Pong,
        PeerMsg::SyncVote {
            revision: 5,
            strategy: "enforce-popular".into(),
            entries: (0..4).map(entry).collect(),
        },
        PeerMsg::SyncDone {
            revision: 5,
            ok: true,
            detail: String::new(),
        },
        PeerMsg::CollCancel {
            tag: 7,
            seq: 9,
            kind: AbortKind::Timeout,
            reason: "timed out".into(),
        },
    ];
    let master = vec![
        MasterMsg::Challenge {
            version: PROTOCOL_VERSION,
            nonce: [3; 32],
            token_required: true,
        },
        MasterMsg::Welcome {
            version: PROTOCOL_VERSION,
            peer_id: 4,
            proof: [5; 32],
        },
        MasterMsg::Refused {
            version: PROTOCOL_VERSION,
            reason: "full".into(),
        },
        MasterMsg::PendingAnswer { pending: true },
        MasterMsg::Topology {
            epoch: 3,
            secret: 77,
            ring: (1..4).map(member).collect(),
        },
        MasterMsg::TopologyDone {
            epoch: 3,
            world: 3,
            global_world: 3,
            groups: 1,
            largest_group: 3,
        },
        MasterMsg::TopologyFailed {
            epoch: 3,
            reason: "lost".into(),
        },
        MasterMsg::CollCommence {
            tag: 7,
            seq: 9,
            epoch: 3,
        },
        MasterMsg::CollRefused {
            tag: 7,
            reason: "mismatch".into(),
        },
        MasterMsg::CollDone { tag: 7, seq: 9 },
        MasterMsg::CollAborted {
            tag: 7,
            seq: 9,
            kind: AbortKind::LostPeer,
            reason: "peer 2 lost".into(),
            lost: vec![2],
        },
        MasterMsg::Ping,
        MasterMsg::SyncPlan {
            revision: 6,
            secret: 1,
            pulls: vec![Pull {
                key: "layer1.weight".into(),
                bytes: 4096,
                hash: 3,
                sources: (1..3).map(member).collect(),
            }],
        },
        MasterMsg::SyncComplete { revision: 6 },
        MasterMsg::SyncFailed {
            reason: "holder lost".into(),
        },
        MasterMsg::Kicked {
            reason: "stalled".into(),
        },
    ];
    (peer, master)
}

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-corpus")
}

/// The committed corpus: whole frames (length prefix included) of control messages, data
/// headers and hellos, one file each.
fn corpus() -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir())
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    let inputs: Vec<Vec<u8>> = files.iter().filter_map(|p| std::fs::read(p).ok()).collect();
    assert!(
        inputs.len() >= 30,
        "the fuzz corpus in {} is missing or incomplete ({} files)",
        corpus_dir().display(),
        inputs.len()
    );
    inputs
}

/// The token the corpus's hellos and pulls are signed with, so that mutations of them reach
/// past the signature check.
fn fuzz_token() -> RunToken {
    RunToken::new("the fuzz corpus's token").unwrap()
}

fn fuzz_key(purpose: KeyPurpose) -> EpochKey {
    EpochKey::derive(Some(&fuzz_token()), purpose, 3, 77)
}

#[test]
#[ignore = "rewrites the committed corpus"]
fn write_corpus() {
    let dir = corpus_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let (peer, master) = seed_messages();
    for (i, m) in peer.iter().enumerate() {
        std::fs::write(dir.join(format!("peer-{i:02}.bin")), encode_peer(m)).unwrap();
    }
    for (i, m) in master.iter().enumerate() {
        std::fs::write(dir.join(format!("master-{i:02}.bin")), encode_master(m)).unwrap();
    }
    let header = DataHeader {
        len: 512 << 10,
        tag: 7,
        seq: 9,
        step: 1,
        sub: 2,
    };
    std::fs::write(dir.join("data-header.bin"), header.encode()).unwrap();
    let mut hello = Vec::new();
    DataHello {
        epoch: 3,
        from: 1,
        to: 2,
        conn_index: 0,
        conn_count: 2,
    }
    .send(&fuzz_key(KeyPurpose::Ring), &mut hello)
    .unwrap();
    std::fs::write(dir.join("data-hello.bin"), hello).unwrap();
    let pull = PullRequest {
        revision: 3,
        offset: 8 << 20,
        len: 4096,
        key: "layer1.weight".into(),
    };
    std::fs::write(
        dir.join("state-pull.bin"),
        pull.encode(&fuzz_key(KeyPurpose::SharedState)),
    )
    .unwrap();
    let mut reply = Vec::new();
    concord_transport::handshake::write_reply(
        &mut reply,
        concord_transport::handshake::HelloStatus::Ok,
    )
    .unwrap();
    std::fs::write(dir.join("data-reply.bin"), reply).unwrap();
    let offer = concord_transport::shm::Offer {
        host: [b'h'; 64],
        segment: Some(concord_transport::shm::OfferedSegment {
            pid: 4242,
            fd: 9,
            capacity: 4 << 20,
            cookie: [5; 16],
        }),
    };
    std::fs::write(dir.join("shm-offer.bin"), offer.encode()).unwrap();
    std::fs::write(
        dir.join("shm-answer.bin"),
        concord_transport::shm::Answer::Failed { errno: 13 }.encode(),
    )
    .unwrap();
}

/// A corpus input, mutated: bit flips, interesting bytes, truncation, growth, splicing.
fn mutate(rng: &mut Rng, corpus: &[Vec<u8>]) -> Vec<u8> {
    if rng.chance(16) {
        let n = rng.below(96);
        return (0..n).map(|_| rng.next() as u8).collect();
    }
    let mut v = corpus[rng.below(corpus.len())].clone();
    for _ in 0..1 + rng.below(4) {
        match rng.below(6) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = [0, 0xFF, 0x7F, 0x80, 1][rng.below(5)];
            }
            2 if v.len() >= 4 => {
                // A length or count field somewhere: make it huge or small.
                let i = rng.below(v.len() - 3);
                let x = [0u32, 1, 0xFFFF_FFFF, 1 << 20, 4097][rng.below(5)];
                v[i..i + 4].copy_from_slice(&x.to_le_bytes());
            }
            3 => v.truncate(rng.below(v.len() + 1)),
            4 => {
                let n = rng.below(64);
                v.extend((0..n).map(|_| rng.next() as u8));
            }
            _ => {
                let other = &corpus[rng.below(corpus.len())];
                let cut = rng.below(other.len() + 1);
                let at = rng.below(v.len() + 1);
                v.splice(at..at, other[..cut].iter().copied());
            }
        }
    }
    v
}

#[test]
fn control_message_decoders() {
    let corpus = corpus();
    drive("control decoders", 100_000, |rng| {
        let input = mutate(rng, &corpus);
        let bodies: Vec<&[u8]> = match split_frame(&input) {
            Ok(Some((body, _))) => vec![body, input.get(4..).unwrap_or_default()],
            _ => vec![input.get(4..).unwrap_or_default(), &input],
        };
        for body in bodies {
            if let Ok(m) = decode_peer(body) {
                let again = encode_peer(&m);
                assert!(again.len() <= MAX_MESSAGE_BYTES);
                assert_eq!(decode_peer(&again[4..]).as_ref(), Ok(&m), "peer round trip");
            }
            if let Ok(m) = decode_master(body) {
                let again = encode_master(&m);
                assert_eq!(
                    decode_master(&again[4..]).as_ref(),
                    Ok(&m),
                    "master round trip"
                );
            }
        }
    });
}

/// A stream that reads the fuzz input and swallows what is written back.
struct Wire<'a> {
    input: &'a [u8],
}

impl Read for Wire<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Wire<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn data_plane_decoders() {
    let corpus = corpus();
    drive("data header, hello and reply", 100_000, |rng| {
        let input = mutate(rng, &corpus);
        let mut header = [0u8; HEADER_BYTES];
        let n = input.len().min(HEADER_BYTES);
        header[..n].copy_from_slice(&input[..n]);
        if let Ok(h) = DataHeader::decode(&header) {
            assert_eq!(h.encode(), header, "a valid header encodes to its bytes");
        }
        if let Ok(signed) = DataHello::receive(&mut Wire { input: &input }) {
            let key = fuzz_key(KeyPurpose::Ring);
            if signed.verify(&key) {
                // Only the corpus's own hello (or one equal to it) carries a good tag.
                assert_eq!(
                    signed.hello.encode(&key)[..],
                    input[..concord_transport::handshake::HELLO_BYTES]
                );
            }
        }
        let _ = read_reply(&mut Wire { input: &input });
        // The shared-memory offer and answer: any bytes decode or give an error, and what
        // decodes encodes back to the same bytes.
        use concord_transport::shm::offer::{ANSWER_BYTES, OFFER_BYTES};
        use concord_transport::shm::{Answer, Offer};
        let mut offer = [0u8; OFFER_BYTES];
        let n = input.len().min(OFFER_BYTES);
        offer[..n].copy_from_slice(&input[..n]);
        if let Ok(o) = Offer::decode(&offer) {
            let again = Offer::decode(&o.encode()).expect("re-decodes");
            assert_eq!(again, o);
        }
        let mut answer = [0u8; ANSWER_BYTES];
        let n = input.len().min(ANSWER_BYTES);
        answer[..n].copy_from_slice(&input[..n]);
        let _ = Answer::decode(&answer);
    });
}

#[test]
fn shared_state_pull_decoder() {
    let corpus = corpus();
    let key = fuzz_key(KeyPurpose::SharedState);
    let mut accepted = 0u64;
    drive("shared-state pull request", 100_000, |rng| {
        let input = mutate(rng, &corpus);
        if let Ok(req) = PullRequest::decode(&input, &key) {
            assert_eq!(req.encode(&key), input, "a valid pull encodes to its bytes");
            accepted += 1;
        }
    });
    // The unmutated corpus pull decodes: the target reaches past the checks.
    assert!(accepted > 0, "no mutation of the corpus decoded as a pull");
}

/// A peer message with small value domains, so that sequences reach deep states.
fn peer_message(rng: &mut Rng, epoch_hint: u64, seq_hint: u64) -> PeerMsg {
    let small = |rng: &mut Rng, hint: u64| {
        if rng.chance(4) {
            rng.int()
        } else {
            hint.saturating_sub(rng.below(2) as u64)
        }
    };
    match rng.below(14) {
        0 => PeerMsg::Hello {
            version: PROTOCOL_VERSION,
            data_port: rng.next() as u16,
            advertise_ip: if rng.chance(3) {
                rng.text()
            } else {
                String::new()
            },
            group: rng.below(2) as u32,
            nonce: [rng.below(3) as u8; 32],
        },
        12 => PeerMsg::Proof {
            proof: [rng.next() as u8; 32],
        },
        1 => PeerMsg::AcceptVote,
        2 => PeerMsg::RepairVote,
        13 => PeerMsg::OrderVote {
            order: (0..rng.below(5)).map(|_| rng.below(6) as u64).collect(),
        },
        3 => PeerMsg::PendingQuery,
        4 => PeerMsg::ConnectResult {
            epoch: small(rng, epoch_hint),
            ok: !rng.chance(4),
            detail: rng.text(),
        },
        5 => PeerMsg::CollInit {
            tag: rng.below(4) as u64,
            desc: CollectiveDesc {
                kind: CollKind::ALL[rng.below(CollKind::ALL.len())],
                count: rng.below(3) as u64 * 1000,
                dtype: ["float", "half", "nonsense"][rng.below(3)].into(),
                op: ["sum", "avg", "bogus"][rng.below(3)].into(),
                root: rng.below(4) as u32,
            },
        },
        6 => PeerMsg::CollComplete {
            tag: rng.below(4) as u64,
            seq: small(rng, seq_hint),
            ok: !rng.chance(5),
            detail: rng.text(),
        },
        7 => PeerMsg::Goodbye,
        8 => PeerMsg::Pong,
        9 => PeerMsg::SyncVote {
            revision: rng.int(),
            strategy: ["enforce-popular", "receive-only", "send-only", "x"][rng.below(4)].into(),
            entries: (0..rng.below(4) as u64)
                .map(|i| EntryDesc {
                    hash: rng.below(3) as u64,
                    ..entry(i)
                })
                .collect(),
        },
        10 => PeerMsg::SyncDone {
            revision: rng.int(),
            ok: !rng.chance(4),
            detail: rng.text(),
        },
        _ => PeerMsg::CollCancel {
            tag: rng.below(4) as u64,
            seq: small(rng, seq_hint),
            kind: AbortKind::ALL[rng.below(AbortKind::ALL.len())],
            reason: rng.text(),
        },
    }
}

#[test]
fn coordinator_message_sequences() {
    let mut welcomed = 0u64;
    drive("coordinator sequences", 2_000, |rng| {
        let mut config = CoordinatorConfig::default();
        let token = rng.chance(2).then(fuzz_token);
        config.token = token.clone();
        let mut c = Coordinator::new(config);
        // Per connection: the hello it sent, and the challenge's nonce once the master sent it,
        // so that a proof is right (most of the time) or wrong.
        let mut hellos: std::collections::HashMap<u64, (Vec<u8>, [u8; 32])> = Default::default();
        let mut challenges: std::collections::HashMap<u64, [u8; 32]> = Default::default();
        let mut now = Instant::now();
        let (mut epoch, mut seq) = (0u64, 0u64);
        // As the server drives it: connection ids are never reused, and only open
        // connections send or close.
        let mut open: Vec<u64> = Vec::new();
        let mut next_conn = 1u64;
        for _ in 0..200 {
            if open.is_empty() || (open.len() < 6 && rng.chance(4)) {
                c.handle_connect(next_conn, "127.0.0.1".parse().unwrap(), now);
                open.push(next_conn);
                next_conn += 1;
                continue;
            }
            let conn = open[rng.below(open.len())];
            match rng.below(10) {
                0 => {
                    c.handle_disconnect(conn, now);
                    open.retain(|c| *c != conn);
                }
                1 => c.handle_malformed(conn, "fuzz", now),
                2 => {
                    now += Duration::from_millis(rng.below(20_000) as u64);
                    c.handle_timeout(now);
                }
                _ => {
                    let mut msg = peer_message(rng, epoch, seq);
                    match &mut msg {
                        PeerMsg::Hello { nonce, .. } => {
                            let nonce = *nonce;
                            hellos.insert(conn, (encode_peer(&msg), nonce));
                        }
                        PeerMsg::Proof { proof } if !rng.chance(4) => {
                            if let (Some((hello, peer_nonce)), Some(master_nonce)) =
                                (hellos.get(&conn), challenges.get(&conn))
                            {
                                *proof = auth::peer_proof(
                                    token.as_ref(),
                                    master_nonce,
                                    peer_nonce,
                                    hello,
                                );
                            }
                        }
                        _ => {}
                    }
                    c.handle_message(conn, msg, now)
                }
            }
            while let Some(out) = c.poll_output() {
                let msg = match out {
                    Output::Close { conn } => {
                        // As the server does: a closed connection is dropped, the core told.
                        if open.contains(&conn) {
                            open.retain(|c| *c != conn);
                            c.handle_disconnect(conn, now);
                        }
                        continue;
                    }
                    Output::Send { conn, msg } => {
                        if let MasterMsg::Challenge { nonce, .. } = &msg {
                            challenges.insert(conn, *nonce);
                        }
                        msg
                    }
                };
                assert!(
                    master_message_bytes(&msg) <= MAX_MESSAGE_BYTES,
                    "the master built an oversized {msg:?}"
                );
                match msg {
                    MasterMsg::Welcome { .. } => welcomed += 1,
                    MasterMsg::Topology { epoch: e, .. } => epoch = e,
                    MasterMsg::CollCommence { seq: s, .. } => seq = s,
                    _ => {}
                }
            }
        }
    });
    // Sequences get past the challenge: peers are welcomed, with and without a token.
    assert!(welcomed > 0, "no sequence registered a peer");
}

/// A master message with small value domains.
fn master_message(rng: &mut Rng, me: u64) -> MasterMsg {
    let (_, seeds) = seed_messages();
    let mut m = seeds[rng.below(seeds.len())].clone();
    match &mut m {
        MasterMsg::Welcome { peer_id, .. } => *peer_id = me,
        MasterMsg::Topology { epoch, ring, .. } => {
            *epoch = rng.below(4) as u64;
            ring.truncate(rng.below(4));
            if rng.chance(2) {
                ring.push(member(me));
            }
        }
        MasterMsg::TopologyDone { epoch, world, .. } => {
            *epoch = rng.below(4) as u64;
            *world = rng.below(4) as u32;
        }
        MasterMsg::CollCommence { tag, seq, epoch } => {
            *tag = rng.below(3) as u64;
            *seq = rng.below(4) as u64;
            *epoch = rng.below(4) as u64;
        }
        MasterMsg::CollDone { tag, seq } | MasterMsg::CollAborted { tag, seq, .. } => {
            *tag = rng.below(3) as u64;
            *seq = rng.below(4) as u64;
        }
        MasterMsg::CollRefused { tag, .. } => *tag = rng.below(3) as u64,
        _ => {}
    }
    m
}

#[test]
fn peer_protocol_message_sequences() {
    drive("peer protocol sequences", 2_000, |rng| {
        let mut p = PeerProto::new(4000, String::new());
        let me = 1 + rng.below(3) as u64;
        for _ in 0..100 {
            let outcome = match rng.below(8) {
                0 => p.start_collective(rng.below(3) as u64, desc()).map(|_| ()),
                1 => {
                    p.cancel(
                        rng.below(3) as u64,
                        AbortKind::ALL[rng.below(AbortKind::ALL.len())],
                        "fuzz".into(),
                    );
                    Ok(())
                }
                2 => p.start_update_topology(),
                3 => p.start_sync(rng.int(), "enforce-popular", (0..2).map(entry).collect()),
                4 => {
                    p.connect_finished(rng.below(4) as u64, Ok(()));
                    Ok(())
                }
                _ => p.handle(master_message(rng, me)).map(drop),
            };
            // Refusals are the protocol working; only a panic is a failure.
            drop(outcome);
            while let Some(msg) = p.poll_transmit() {
                assert!(encode_peer(&msg).len() <= MAX_MESSAGE_BYTES);
            }
        }
    });
}
