//! `optimize_topology` with real processes on loopback: every member measures, agrees on the
//! same order, and the ring in force is that order; a second call reuses the measurements; the
//! collectives after it are exact. (Shaped links, where the order matters: `netns.rs`.)

mod common;

use std::time::Duration;

use common::*;
use concord::{verify, DType, OptimizeOptions, ReduceOp};

/// Peer side of `every_member_agrees_on_the_optimised_ring`.
#[test]
fn peer_optimize() {
    if !is_peer() {
        return;
    }
    let mut comm = join_from_env();
    let opts = OptimizeOptions {
        probe_bytes: 4 << 20,
        ..Default::default()
    };
    let first = comm.optimize_topology(&opts).expect("optimize");
    let n = first.peers.len();
    assert_eq!(first.probed, n * (n - 1), "every edge probed once");
    for a in 0..n {
        for b in 0..n {
            assert_eq!(first.bandwidth[a][b] > 0.0, a != b, "{:?}", first.bandwidth);
        }
    }
    assert_eq!(
        comm.peer_ids(),
        first.chosen,
        "the ring in force is the chosen order"
    );
    let again = comm.optimize_topology(&opts).expect("optimize again");
    assert_eq!(again.probed, 0, "measurements are reused");
    assert_eq!(again.chosen, first.chosen);
    let count = 100_003;
    let (world, rank) = (comm.world_size(), comm.rank());
    let mut src = vec![0u8; count * 4];
    verify::fill(DType::F32, ReduceOp::Sum, rank, 7, &mut src);
    let mut dst = vec![0u8; count * 4];
    comm.all_reduce_raw(Some(&src), &mut dst, DType::F32, ReduceOp::Sum, 7, None)
        .expect("all-reduce on the new ring");
    let mut want = vec![0u8; count * 4];
    verify::reference(DType::F32, ReduceOp::Sum, world, 7, &mut want);
    assert_eq!(verify::count_wrong(DType::F32, &dst, &want), 0);
    println!("CHOSEN {:?}", first.chosen);
    println!("DONE");
}

#[test]
fn every_member_agrees_on_the_optimised_ring() {
    if is_peer() {
        return;
    }
    let master = MasterProcess::start();
    let env = [("MASTER", master.addr.clone()), ("WORLD", "3".to_string())];
    let peers: Vec<_> = (0..3).map(|_| spawn_peer("peer_optimize", &env)).collect();
    let outputs: Vec<String> = wait_outputs(peers, Duration::from_secs(120))
        .into_iter()
        .map(|(ok, out)| {
            assert!(ok, "a peer failed:\n{out}");
            out
        })
        .collect();
    let chosen: Vec<&str> = outputs
        .iter()
        .map(|o| lines_with(o, "CHOSEN ")[0])
        .collect();
    assert!(chosen.iter().all(|c| *c == chosen[0]), "{chosen:?}");
    println!("every member chose {}", chosen[0]);
}
