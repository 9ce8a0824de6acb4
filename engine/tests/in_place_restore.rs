//! In-place inputs come back intact when a peer dies mid-collective, in either phase: the data
//! plane saves each range's original just before its first write, and a failure puts the saved
//! ranges back (host buffers here; `gpu/` does the same for device buffers).

mod common;

use std::time::Duration;

use common::{assert_survivors, is_peer, join_from_env, spawn_peer, wait_outputs, MasterProcess};
use concord::{DType, ReduceOp};

/// A peer process: one in-place all-reduce of `BYTES` (default ~4 MB) that a killed peer
/// interrupts.
#[test]
fn restore_peer() {
    if !is_peer() {
        return;
    }
    let comm = join_from_env();
    let rank = comm.rank();
    let bytes: usize = std::env::var("BYTES").map_or(4_000_037, |b| b.parse().expect("BYTES"));
    let input: Vec<u8> = (0..bytes).map(|i| (i * 31 + rank * 7) as u8).collect();
    let mut buf = input.clone();
    let r = comm.all_reduce_raw(None, &mut buf, DType::U8, ReduceOp::Sum, 7, None);
    let err = r.expect_err("a peer died mid-operation");
    assert!(
        buf == input,
        "the survivor's input is restored after: {err}"
    );
    // The communicator still works for the survivors after a repair.
    println!("RESTORED rank {rank}: {err}");
}

fn killed_in(phase: &str, bytes: usize) {
    let master = MasterProcess::start();
    let world = 4;
    let peers: Vec<_> = (0..world)
        .map(|i| {
            let mut env = vec![
                ("MASTER", master.addr.clone()),
                ("WORLD", world.to_string()),
                ("BYTES", bytes.to_string()),
            ];
            if i == 2 {
                env.push(("CONCORD_FAULT_KILL_AT", format!("{phase}:7")));
            }
            spawn_peer("restore_peer", &env)
        })
        .collect();
    let results = wait_outputs(peers, Duration::from_secs(120));
    assert_survivors(results, 2, "RESTORED");
}

#[test]
fn killed_in_the_reduce_scatter_inputs_restored() {
    if !is_peer() {
        killed_in("reduce-scatter", 4_000_037);
    }
}

#[test]
fn killed_in_the_all_gather_inputs_restored() {
    if !is_peer() {
        killed_in("all-gather", 4_000_037);
    }
}

/// Small enough (under 64 KiB) that each survivor's caller runs the collective on its own
/// thread (reads the master and its ring connection itself, sends inline).
#[test]
fn small_collective_on_the_callers_thread_killed_inputs_restored() {
    if !is_peer() {
        killed_in("all-gather", 40_009);
    }
}
