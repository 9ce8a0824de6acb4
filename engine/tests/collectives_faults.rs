//! A peer SIGKILLed during a broadcast, reduce, all-gather or reduce-scatter (and the root killed
//! mid-broadcast): real processes over real sockets with a real master. The survivors fail fast
//! with an error naming the lost peer (and the root, when it is the one lost), get their
//! in-place inputs back, and a retry on the repaired ring gives the exact result.

use std::time::{Duration, Instant};

mod common;

use common::*;
use concord::{verify, CollKind, Communicator, DType, Error, ReduceOp};

const TAG: u64 = 100;
const ELEMS: usize = 3 << 20; // 12 MiB of f32: many frames, so a kill lands mid-collective.

/// What the survivors must hold after `kind` of `whole` bytes on `comm`'s ring, in place (but
/// the all-gather, whose input is its slot): (the call's buffer before, the buffer after).
fn inputs(comm: &Communicator, kind: CollKind, root: usize, iter: u64) -> (Vec<u8>, Vec<u8>) {
    let (rank, world) = (comm.rank(), comm.world_size());
    let (dtype, op) = (DType::F32, ReduceOp::Sum);
    let whole = ELEMS / world * world * 4;
    let slot = whole / world;
    let mut before = vec![0u8; whole];
    let mut after = vec![0u8; whole];
    match kind {
        CollKind::Broadcast => {
            if rank == root {
                verify::fill(dtype, op, rank, iter, &mut before);
            }
            verify::fill(dtype, op, root, iter, &mut after);
        }
        CollKind::Reduce => {
            verify::fill(dtype, op, rank, iter, &mut before);
            if rank == root {
                verify::reference(dtype, op, world, iter, &mut after);
            } else {
                after.copy_from_slice(&before);
            }
        }
        CollKind::AllGather => {
            for r in 0..world {
                verify::fill(dtype, op, r, iter, &mut after[r * slot..(r + 1) * slot]);
            }
            before[rank * slot..(rank + 1) * slot]
                .copy_from_slice(&after[rank * slot..(rank + 1) * slot]);
        }
        _ => {
            verify::fill(dtype, op, rank, iter, &mut before);
            let mut total = vec![0u8; whole];
            verify::reference(dtype, op, world, iter, &mut total);
            after.copy_from_slice(&before);
            after[rank * slot..(rank + 1) * slot]
                .copy_from_slice(&total[rank * slot..(rank + 1) * slot]);
        }
    }
    (before, after)
}

fn call(comm: &Communicator, kind: CollKind, root: usize, buf: &mut [u8]) -> Result<(), Error> {
    let (dtype, op) = (DType::F32, ReduceOp::Sum);
    let r = match kind {
        CollKind::Broadcast => comm.broadcast_raw(buf, dtype, root, TAG, None),
        CollKind::Reduce => comm.reduce_raw(None, buf, dtype, op, root, TAG, None),
        CollKind::AllGather => comm.all_gather_raw(None, buf, dtype, TAG, None),
        _ => comm.reduce_scatter_raw(None, buf, dtype, op, TAG, None),
    };
    r.map(drop)
}

/// Peer side: agrees on the victim's rank, runs the collective (the victim dies in it), then
/// retries on the survivors' ring and checks the result.
#[test]
fn peer_fault() {
    if !is_peer() {
        return;
    }
    let kind = CollKind::from_name(&std::env::var("KIND").unwrap()).unwrap();
    let root_is_victim = std::env::var("ROOT_IS_VICTIM").is_ok();
    let victim = std::env::var("CONCORD_FAULT_KILL_AT").is_ok();
    let mut comm = join_from_env();
    let mut mark = [if victim {
        comm.rank() as f32 + 1.0
    } else {
        0.0
    }];
    comm.all_reduce_in_place(&mut mark, ReduceOp::Max, 1)
        .expect("agree on the victim");
    let victim_rank = mark[0] as usize - 1;
    let world = comm.world_size();
    // The victim receives in the collective (where it dies), unless it is the root.
    let root = if root_is_victim {
        victim_rank
    } else {
        (victim_rank + 1) % world
    };
    let (before, _) = inputs(&comm, kind, root, 7);
    let mut buf = before.clone();
    let start = Instant::now();
    let err = call(&comm, kind, root, &mut buf).expect_err("a peer died during it");
    let took = start.elapsed();
    assert!(err.is_retryable(), "{err}");
    if let Error::Aborted { lost, .. } = &err {
        assert!(!lost.is_empty(), "the abort names the lost peer: {err}");
    }
    if root_is_victim {
        assert!(
            err.to_string().contains("root"),
            "the error says the root was lost: {err}"
        );
    }
    // In-place inputs come back; outputs of other ranks' data are not inputs.
    let restored = match kind {
        CollKind::Reduce => comm.rank() != root || buf == before,
        CollKind::ReduceScatter => buf == before,
        CollKind::AllGather => {
            let slot = buf.len() / world;
            let own = comm.rank() * slot..(comm.rank() + 1) * slot;
            buf[own.clone()] == before[own]
        }
        _ => true,
    };
    assert!(restored, "{kind}: the input is restored after the failure");
    println!("FAILED_AFTER_MS {}", took.as_millis());
    println!("ERROR {err}");
    // The retry on the survivors' ring: a lost root is replaced by rank 0.
    let (result, retries) = comm
        .with_retry(|c| {
            let root = if root < c.world_size() && !root_is_victim {
                root
            } else {
                0
            };
            let (before, after) = inputs(c, kind, root, 8);
            let mut buf = before;
            call(c, kind, root, &mut buf)?;
            Ok((buf, after))
        })
        .expect("the retry succeeds");
    assert_eq!(comm.world_size(), world - 1);
    assert!(retries <= 2, "{retries} retries");
    assert!(result.0 == result.1, "{kind}: the retry's result is exact");
    println!("SURVIVED");
}

fn run(kind: CollKind, root_is_victim: bool) {
    if is_peer() {
        return;
    }
    let master = MasterProcess::start();
    // A broadcast's root only sends: it dies after its second frame; everyone else dies on
    // receiving its first.
    let point = if root_is_victim && kind == CollKind::Broadcast {
        format!("{kind}-sent:{TAG}")
    } else {
        format!("{kind}:{TAG}")
    };
    let mut env = vec![
        ("MASTER", master.addr.clone()),
        ("WORLD", "3".to_string()),
        ("KIND", kind.name().to_string()),
    ];
    if root_is_victim {
        env.push(("ROOT_IS_VICTIM", "1".to_string()));
    }
    let mut victim_env = env.clone();
    victim_env.push(("CONCORD_FAULT_KILL_AT", point));
    let peers = vec![
        spawn_peer("peer_fault", &victim_env),
        spawn_peer("peer_fault", &env),
        spawn_peer("peer_fault", &env),
    ];
    let results = wait_outputs(peers, Duration::from_secs(120));
    assert!(!results[0].0, "the victim died: {}", results[0].1);
    assert!(!results[0].1.contains("SURVIVED"));
    for (ok, out) in &results[1..] {
        assert!(*ok && out.contains("SURVIVED"), "a survivor:\n{out}");
        let ms: u64 = lines_with(out, "FAILED_AFTER_MS ")[0].parse().unwrap();
        // Fast: the master sees the connection drop; nowhere near the 60 s deadline.
        assert!(ms < 10_000, "the survivor failed after {ms} ms");
    }
}

#[test]
fn a_peer_killed_mid_broadcast() {
    run(CollKind::Broadcast, false);
}

#[test]
fn the_root_killed_mid_broadcast() {
    run(CollKind::Broadcast, true);
}

#[test]
fn a_peer_killed_mid_reduce() {
    run(CollKind::Reduce, false);
}

#[test]
fn the_root_killed_mid_reduce() {
    run(CollKind::Reduce, true);
}

#[test]
fn a_peer_killed_mid_all_gather() {
    run(CollKind::AllGather, false);
}

#[test]
fn a_peer_killed_mid_reduce_scatter() {
    run(CollKind::ReduceScatter, false);
}
