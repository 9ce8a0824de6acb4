//! Shared-state sync across real processes: a late joiner ends bit-identical (16-bit entries
//! included), up-to-date peers move nothing, only dirty keys move, and a holder killed
//! mid-transfer is replaced by another.

mod common;

use std::time::Duration;

use common::*;
use concord::{SharedState, SyncStrategy};
use half::{bf16, f16};

struct Model {
    weights: Vec<f32>,
    emb: Vec<bf16>,
    head: Vec<f16>,
    quant: Vec<i16>,
    step: Vec<u64>,
}

impl Model {
    fn trained(seed: u32, big: usize) -> Model {
        Model {
            weights: (0..big)
                .map(|i| ((i as u32).wrapping_mul(2654435761) ^ seed) as f32 * 1e-9)
                .collect(),
            emb: (0..65_537)
                .map(|i| bf16::from_f32(i as f32 * 0.25 + seed as f32))
                .collect(),
            head: (0..10_007)
                .map(|i| f16::from_f32((i % 100) as f32 * 0.5))
                .collect(),
            quant: (0..4099).map(|i| (i as i16).wrapping_mul(7)).collect(),
            step: vec![1234],
        }
    }

    fn empty(big: usize) -> Model {
        Model {
            weights: vec![0.0; big],
            emb: vec![bf16::ZERO; 65_537],
            head: vec![f16::ZERO; 10_007],
            quant: vec![0; 4099],
            step: vec![0],
        }
    }

    fn state(&mut self, revision: u64) -> SharedState<'_> {
        let mut s = SharedState::new(revision);
        s.add("weights", &mut self.weights)
            .add("emb", &mut self.emb)
            .add("head", &mut self.head)
            .add("quant", &mut self.quant)
            .add("step", &mut self.step);
        s
    }

    fn digest(&self) -> u64 {
        let parts: [&[u8]; 5] = [
            bytemuck::cast_slice(&self.weights),
            bytemuck::cast_slice(&self.emb),
            bytemuck::cast_slice(&self.head),
            bytemuck::cast_slice(&self.quant),
            bytemuck::cast_slice(&self.step),
        ];
        parts
            .iter()
            .fold(0, |h, p| h.rotate_left(7) ^ concord::state_hash(p))
    }
}

/// Peer: ROLE=holder syncs revision 10 with the other holders, then 11 with the joiner;
/// ROLE=joiner joins after the first sync with an empty model and syncs once.
#[test]
fn peer_state() {
    if !is_peer() {
        return;
    }
    let role = std::env::var("ROLE").unwrap();
    let holders: usize = std::env::var("HOLDERS").unwrap().parse().unwrap();
    let big: usize = std::env::var("BIG").unwrap().parse().unwrap();
    let addr = std::env::var("MASTER").unwrap();
    if role == "holder" {
        let mut comm = join_world(&addr, holders);
        let mut model = Model::trained(7, big);
        // First sync: any revision. One holder differs in one key: only that key moves.
        if comm.rank() == 0 {
            model.head[5] = f16::from_f32(99.0);
        }
        let info = comm
            .sync_shared_state(&mut model.state(10), SyncStrategy::EnforcePopular)
            .unwrap();
        println!(
            "SYNC1 rev {} pulled {} recv {} sent {}",
            info.revision, info.entries_pulled, info.bytes_received, info.bytes_sent
        );
        // Wait for the joiner.
        while comm.world_size() < holders + 1 {
            if comm.are_new_peers_pending().unwrap() {
                comm.update_topology().unwrap();
            } else {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let mut state = model.state(10);
        state.revision += 1;
        let info = comm
            .sync_shared_state(&mut state, SyncStrategy::EnforcePopular)
            .unwrap();
        println!(
            "SYNC2 rev {} pulled {} recv {} sent {}",
            info.revision, info.entries_pulled, info.bytes_received, info.bytes_sent
        );
        println!("DIGEST {:016x}", model.digest());
    } else {
        let mut comm = concord::Communicator::builder(addr)
            .op_timeout(Duration::from_secs(60))
            .connect()
            .unwrap();
        let mut model = Model::empty(big);
        let info = comm
            .sync_shared_state(&mut model.state(0), SyncStrategy::ReceiveOnly)
            .unwrap();
        println!(
            "SYNC2 rev {} pulled {} recv {} sent {}",
            info.revision, info.entries_pulled, info.bytes_received, info.bytes_sent
        );
        println!("DIGEST {:016x}", model.digest());
    }
}

fn numbers(line: &str) -> Vec<u64> {
    line.split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect()
}

fn run(holders: usize, big: usize, victim_env: Option<(&str, &str)>) -> Vec<String> {
    let master = MasterProcess::start();
    let env = |role: &str| {
        vec![
            ("MASTER", master.addr.clone()),
            ("ROLE", role.to_string()),
            ("HOLDERS", holders.to_string()),
            ("BIG", big.to_string()),
        ]
    };
    let mut procs = Vec::new();
    for i in 0..holders {
        let mut e = env("holder");
        if let (Some((k, v)), true) = (victim_env, i == holders - 1) {
            e.push((k, v.to_string()));
        }
        procs.push((
            i == holders - 1 && victim_env.is_some(),
            spawn_peer("peer_state", &e),
        ));
    }
    std::thread::sleep(Duration::from_millis(300));
    procs.push((false, spawn_peer("peer_state", &env("joiner"))));
    let mut outs = Vec::new();
    for (is_victim, p) in procs {
        let (ok, out) = wait_output(p, Duration::from_secs(120));
        if is_victim {
            assert!(!ok, "the victim holder died mid-transfer:\n{out}");
            continue;
        }
        assert!(ok, "peer failed:\n{out}");
        outs.push(out);
    }
    outs
}

#[test]
fn late_joiner_ends_bit_identical_and_only_dirty_keys_move() {
    if is_peer() {
        return;
    }
    let outs = run(2, 1 << 20, None);
    let digests: Vec<&str> = outs.iter().map(|o| lines_with(o, "DIGEST ")[0]).collect();
    assert!(digests.iter().all(|d| *d == digests[0]), "{digests:?}");
    let total = (4 << 20) + 65_537 * 2 + 10_007 * 2 + 4099 * 2 + 8;
    for (i, o) in outs.iter().enumerate() {
        let s2 = numbers(lines_with(o, "SYNC2 ")[0]);
        assert_eq!(s2[0], 11, "everyone holds revision 11");
        if i < 2 {
            assert_eq!(s2[2], 0, "an up-to-date holder pulls nothing");
            let s1 = numbers(lines_with(o, "SYNC1 ")[0]);
            // Tie between the two holders: the lower id's content wins; the other pulls one key.
            assert!(s1[1] <= 1, "at most the one dirty key moved: {s1:?}");
            if s1[1] == 1 {
                assert_eq!(s1[2], 10_007 * 2, "exactly the f16 entry's bytes");
            }
        } else {
            assert_eq!(
                s2[1], 5,
                "the joiner pulls all five entries, 16-bit ones included"
            );
            assert_eq!(s2[2], total as u64, "every byte of them");
        }
    }
    let served: u64 = outs[..2]
        .iter()
        .map(|o| numbers(lines_with(o, "SYNC2 ")[0])[3])
        .sum();
    assert_eq!(
        served, total as u64,
        "the holders together served exactly the joiner's bytes"
    );
    assert!(
        outs[..2]
            .iter()
            .all(|o| numbers(lines_with(o, "SYNC2 ")[0])[3] > 0),
        "pulled from both holders at once"
    );
}

#[test]
fn a_holder_killed_mid_transfer_is_replaced_by_another() {
    if is_peer() {
        return;
    }
    let outs = run(3, 16 << 20, Some(("CONCORD_FAULT_KILL_AT", "serve:11")));
    let digests: Vec<&str> = outs.iter().map(|o| lines_with(o, "DIGEST ")[0]).collect();
    assert_eq!(digests.len(), 3, "two surviving holders and the joiner");
    assert!(digests.iter().all(|d| *d == digests[0]), "{digests:?}");
}

/// Peer of `groups_run_side_by_side`: GROUP from the environment; waits for 4 peers in all.
#[test]
fn peer_grouped() {
    if !is_peer() {
        return;
    }
    let group: u32 = std::env::var("GROUP").unwrap().parse().unwrap();
    let mut comm = concord::Communicator::builder(std::env::var("MASTER").unwrap())
        .group(group)
        .op_timeout(Duration::from_secs(60))
        .connect()
        .unwrap();
    while comm.global_world_size() < 4 {
        if comm.are_new_peers_pending().unwrap() {
            comm.update_topology().unwrap();
        } else {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    assert_eq!(
        (
            comm.world_size(),
            comm.num_groups(),
            comm.largest_group_size()
        ),
        (2, 2, 2)
    );
    // The same tag in both groups, different data: each group reduces only its own.
    let mut v = vec![(group * 100 + comm.rank() as u32) as f32; 1000];
    comm.all_reduce_in_place(&mut v, concord::ReduceOp::Sum, 1)
        .unwrap();
    println!("SUM {}", v[0]);
    // Shared state with keys of its own group.
    let mut w = vec![
        if comm.rank() == 0 {
            group as f32 + 0.5
        } else {
            0.0
        };
        4096
    ];
    let mut state = SharedState::new(1);
    state.add(format!("group{group}.weights"), &mut w);
    let info = comm
        .sync_shared_state(&mut state, SyncStrategy::EnforcePopular)
        .unwrap();
    println!("STATE {} {}", w[0], info.revision);
}

#[test]
fn groups_run_side_by_side_with_their_own_keys() {
    if is_peer() {
        return;
    }
    let master = MasterProcess::start();
    let peers: Vec<_> = [0u32, 0, 1, 1]
        .iter()
        .map(|g| {
            spawn_peer(
                "peer_grouped",
                &[("MASTER", master.addr.clone()), ("GROUP", g.to_string())],
            )
        })
        .collect();
    let mut weights = Vec::new();
    for (i, p) in peers.into_iter().enumerate() {
        let (ok, out) = wait_output(p, Duration::from_secs(60));
        assert!(ok, "peer failed:\n{out}");
        let group = [0, 0, 1, 1][i];
        let sum: f32 = lines_with(&out, "SUM ")[0].parse().unwrap();
        assert_eq!(
            sum,
            (group * 200 + 1) as f32,
            "group {group} reduced only its own members"
        );
        let state: Vec<&str> = lines_with(&out, "STATE ")[0].split(' ').collect();
        assert_eq!(state[1], "1");
        weights.push(state[0].parse::<f32>().unwrap());
    }
    // Within each group both peers hold the same elected content; across groups the keys and
    // contents are their own (group 1's holder wrote 1.5, group 0's 0.5).
    assert_eq!(weights[0], weights[1], "group 0 agrees: {weights:?}");
    assert_eq!(weights[2], weights[3], "group 1 agrees: {weights:?}");
    assert!(
        [0.0, 0.5].contains(&weights[0]) && [0.0, 1.5].contains(&weights[2]),
        "{weights:?}"
    );
}

/// Two data addresses on loopback that nothing listens on right now (for communicators whose
/// data ports the test must know).
fn two_free_loopback_addrs() -> [std::net::SocketAddr; 2] {
    let probe = |_: u32| {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let first = probe(0);
    let second = (1..)
        .map(probe)
        .find(|a| *a != first)
        .expect("another port");
    [first, second]
}

/// Two communicators on threads (data ports `ports`), each syncing one small entry `syncs`
/// times after `before_syncs` ran: rank 0 changes it every time (send-only), rank 1 pulls it
/// (receive-only). Returns each peer's final value and sync times.
fn sync_small_entry(
    syncs: u64,
    ports: [std::net::SocketAddr; 2],
    before_syncs: impl FnOnce(),
) -> Vec<(f32, Vec<Duration>)> {
    let master = MasterProcess::start();
    let ready = std::sync::Arc::new(std::sync::Barrier::new(3));
    let peers: Vec<_> = ports
        .into_iter()
        .map(|port| {
            let (addr, ready) = (master.addr.clone(), std::sync::Arc::clone(&ready));
            std::thread::spawn(move || {
                let mut comm = concord::Communicator::builder(addr)
                    .data_listen(port)
                    .op_timeout(Duration::from_secs(60))
                    .connect()
                    .unwrap();
                comm.wait_for_world(2, Duration::from_secs(60)).unwrap();
                ready.wait(); // The group is up.
                ready.wait(); // The test is ready for the syncs.
                let rank = comm.rank();
                let strategy = if rank == 0 {
                    SyncStrategy::SendOnly
                } else {
                    SyncStrategy::ReceiveOnly
                };
                let (mut w, mut revision, mut times) = (vec![0f32; 256], 1, Vec::new());
                for i in 0..syncs {
                    if rank == 0 {
                        w[0] = i as f32 + 1.0;
                    }
                    let mut state = SharedState::new(revision);
                    state.add("w", &mut w);
                    let start = std::time::Instant::now();
                    let info = comm.sync_shared_state(&mut state, strategy).unwrap();
                    times.push(start.elapsed());
                    revision = info.revision + 1;
                }
                (rank, w[0], times)
            })
        })
        .collect();
    ready.wait();
    before_syncs();
    ready.wait();
    let mut results: Vec<_> = peers.into_iter().map(|p| p.join().unwrap()).collect();
    results.sort_by_key(|r| r.0);
    results.into_iter().map(|(_, w, t)| (w, t)).collect()
}

/// A sync ends as soon as every peer is done: no polling interval of the holder's server sets
/// a floor under it (it used to be 50 ms, so no sync could end sooner). Not a benchmark: it
/// asks only that the fastest of 20 syncs beats the old floor, which holds on a loaded host
/// too (the other tests of this binary run beside it).
#[test]
fn a_small_sync_takes_milliseconds() {
    if is_peer() {
        return;
    }
    const SYNCS: u64 = 20;
    let ports = two_free_loopback_addrs();
    for (rank, (w, mut times)) in sync_small_entry(SYNCS, ports, || {})
        .into_iter()
        .enumerate()
    {
        assert_eq!(w, SYNCS as f32, "rank {rank} holds the last change");
        times.sort();
        let median = times[times.len() / 2];
        println!(
            "rank {rank}: median sync {:.2} ms, min {:.2} ms, max {:.2} ms",
            median.as_secs_f64() * 1e3,
            times[0].as_secs_f64() * 1e3,
            times[times.len() - 1].as_secs_f64() * 1e3
        );
        assert!(
            times[0] < Duration::from_millis(40),
            "rank {rank}: no sync of one small entry beat the old 50 ms floor: {times:?}"
        );
    }
}

/// Connections that never send a request do not use up a holder: with more of them open than
/// it serves at once, the sync still gets its pulls through, without waiting for them to time
/// out.
#[test]
fn idle_connections_do_not_keep_pullers_out() {
    if is_peer() {
        return;
    }
    let ports = two_free_loopback_addrs();
    let mut idle = Vec::new();
    let results = sync_small_entry(1, ports, || {
        for port in ports {
            for _ in 0..40 {
                idle.push(std::net::TcpStream::connect(port).unwrap());
            }
        }
    });
    for (rank, (w, times)) in results.into_iter().enumerate() {
        assert_eq!(w, 1.0, "rank {rank} holds the change");
        assert!(
            times[0] < Duration::from_secs(5),
            "rank {rank}: the sync waited for idle connections: {times:?}"
        );
    }
    drop(idle);
}
