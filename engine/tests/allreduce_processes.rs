//! Multi-process all-reduce on loopback: a real master process, 2 to 4 peer processes, every
//! dtype and op, counts 0, 1, W-1, primes and about a million plus a few, in place and out of
//! place. Every peer checks against the reference it computes alone, and prints a digest of its
//! results so that the parent can check all peers hold the same bits.

// Skips are written straight to stderr, past the test harness's capture, so they show.
use std::io::Write as _;

mod common;

use std::time::Duration;

use common::*;
use concord::{verify, DType, ReduceOp};

fn counts(world: usize) -> Vec<usize> {
    vec![0, 1, world - 1, 7, 7919, 1_000_003]
}

/// Peer side of `allreduce_matrix`: runs the whole matrix and prints one line per case.
#[test]
fn peer_matrix() {
    if !is_peer() {
        return;
    }
    let comm = join_from_env();
    let world = comm.world_size();
    let rank = comm.rank();
    let mut tag = 0u64;
    for dtype in DType::ALL {
        for op in ReduceOp::ALL {
            for count in counts(world) {
                // The million-element cases for every dtype with sum, and for f32/bf16/i32 with all ops.
                let big = count > 100_000;
                if big
                    && op != ReduceOp::Sum
                    && !matches!(dtype, DType::F32 | DType::BF16 | DType::I32)
                {
                    continue;
                }
                for in_place in [false, true] {
                    tag += 1;
                    let iter = tag;
                    let bytes = count * dtype.size_bytes();
                    let mut src = vec![0u8; bytes];
                    verify::fill(dtype, op, rank, iter, &mut src);
                    let mut dst = vec![0xA5u8; bytes];
                    let r = if in_place {
                        dst.copy_from_slice(&src);
                        comm.all_reduce_raw(None, &mut dst, dtype, op, tag, None)
                    } else {
                        comm.all_reduce_raw(Some(&src), &mut dst, dtype, op, tag, None)
                    };
                    let info = r.unwrap_or_else(|e| panic!("{dtype} {op} count {count}: {e}"));
                    assert_eq!(info.world, world);
                    let mut want = vec![0u8; bytes];
                    verify::reference(dtype, op, world, iter, &mut want);
                    let wrong = verify::count_wrong(dtype, &dst, &want);
                    println!(
                        "CASE {dtype}/{op}/{count}/{in_place} {:016x} {wrong} {}",
                        digest(&dst),
                        info.traffic.bytes_sent
                    );
                }
            }
        }
    }
    let stats = concord_transport::uring::uring_stats();
    println!(
        "BACKEND {} {} {}",
        comm.transport().name(),
        stats.bytes_sent,
        stats.bytes_received
    );
    println!("DONE");
}

/// `spin_us`: the peers' polling window (`CONCORD_SPIN_US`; `None`: the default). The socket run
/// of world 3 turns polling off, so that every wait of the data path also runs blocking.
/// `stream_always`: every out-of-place collective writes its reduce-scatter results with
/// streaming stores (`CONCORD_STREAM_MIN_BYTES=0`; by default only those of 16 MiB or more,
/// which the matrix does not reach).
fn run_matrix(world: usize, backend: &str, spin_us: Option<u32>, stream_always: bool) {
    if is_peer() {
        return;
    }
    if backend == "uring" {
        if let Err(why) = concord_transport::uring::probe() {
            let _ =
                writeln!(std::io::stderr(),
                "SKIPPED: io_uring unavailable here ({why}); the socket run covers the data path"
            );
            return;
        }
    }
    let master = MasterProcess::start();
    let mut env = vec![
        ("MASTER", master.addr.clone()),
        ("WORLD", world.to_string()),
        ("CONCORD_TRANSPORT", backend.to_string()),
    ];
    if let Some(us) = spin_us {
        env.push(("CONCORD_SPIN_US", us.to_string()));
    }
    if stream_always {
        env.push(("CONCORD_STREAM_MIN_BYTES", "0".to_string()));
    }
    let peers: Vec<_> = (0..world)
        .map(|_| spawn_peer("peer_matrix", &env))
        .collect();
    let outputs: Vec<String> = wait_outputs(peers, Duration::from_secs(300))
        .into_iter()
        .map(|(ok, out)| {
            assert!(ok, "a peer failed:\n{out}");
            out
        })
        .collect();
    let cases: Vec<Vec<Vec<&str>>> = outputs
        .iter()
        .map(|o| {
            lines_with(o, "CASE ")
                .into_iter()
                .map(|l| l.split(' ').collect())
                .collect()
        })
        .collect();
    assert!(
        cases[0].len() > 100,
        "the matrix ran: {} cases",
        cases[0].len()
    );
    for (p, peer_cases) in cases.iter().enumerate() {
        assert_eq!(peer_cases.len(), cases[0].len(), "peer {p} ran every case");
        for (case, first) in peer_cases.iter().zip(&cases[0]) {
            assert_eq!(case[0], first[0]);
            assert_eq!(case[2], "0", "peer {p} case {}: wrong elements", case[0]);
            assert_eq!(
                case[1], first[1],
                "peer {p} case {}: bits differ from peer 0",
                case[0]
            );
        }
    }
    // The selected backend carried the data: io_uring's own byte counters say so.
    for out in &outputs {
        let b: Vec<&str> = lines_with(out, "BACKEND ")[0].split(' ').collect();
        let expected = match backend {
            "uring" => "io_uring",
            "shm" => "shm",
            _ => "socket",
        };
        assert_eq!(b[0], expected);
        let uring_bytes: u64 = b[1].parse().unwrap();
        if backend == "uring" {
            assert!(uring_bytes > 1_000_000, "io_uring sent {uring_bytes} bytes");
        } else {
            assert_eq!(
                uring_bytes, 0,
                "the socket and shared-memory backends never touch io_uring"
            );
        }
    }
    // Traffic: a peer sends 2(W-1)/W of the buffer plus frame headers.
    let big = cases[0]
        .iter()
        .find(|c| c[0] == "float/sum/1000003/false")
        .expect("big f32 case");
    let sent: f64 = big[3].parse().unwrap();
    let expect = 2.0 * (world as f64 - 1.0) / world as f64 * 4.0 * 1_000_003.0;
    assert!(
        sent >= expect && sent < expect * 1.01,
        "sent {sent} bytes, expected about {expect}"
    );
}

#[test]
fn allreduce_matrix_world_2_uring() {
    run_matrix(2, "uring", None, true);
}

#[test]
fn allreduce_matrix_world_2_socket() {
    run_matrix(2, "socket", None, false);
}

#[test]
fn allreduce_matrix_world_3_uring() {
    run_matrix(3, "uring", None, false);
}

#[test]
fn allreduce_matrix_world_3_socket() {
    run_matrix(3, "socket", Some(0), true);
}

#[test]
fn allreduce_matrix_world_4_uring() {
    run_matrix(4, "uring", None, true);
}

#[test]
fn allreduce_matrix_world_4_socket() {
    run_matrix(4, "socket", None, false);
}

#[test]
fn allreduce_matrix_world_2_shm() {
    run_matrix(2, "shm", None, true);
}

/// Polling off: every wait of the shared-memory path sleeps on its doorbell.
#[test]
fn allreduce_matrix_world_3_shm() {
    run_matrix(3, "shm", Some(0), false);
}

#[test]
fn allreduce_matrix_world_4_shm() {
    run_matrix(4, "shm", None, true);
}

/// A ring of one has no connections: a small blocking collective, which a caller otherwise
/// runs on its own thread through the first ring connection, must still complete (the result
/// is the input), as must larger ones and every op.
#[test]
fn a_world_of_one_reduces_small_and_large_buffers() {
    if is_peer() {
        return;
    }
    let master = MasterProcess::start();
    let comm = join_world(&master.addr, 1);
    for (tag, n) in [(1u64, 1024usize), (2, 16 << 10), (3, 1 << 20)] {
        let src: Vec<f32> = (0..n).map(|i| (i % 113) as f32 - 7.0).collect();
        let mut dst = vec![0f32; n];
        for (k, op) in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max]
            .into_iter()
            .enumerate()
        {
            let info = comm
                .all_reduce(&src, &mut dst, op, tag * 10 + k as u64)
                .expect("a world of one reduces");
            assert_eq!(info.world, 1);
            assert_eq!(dst, src, "{op:?} over one peer is the input ({n} elements)");
        }
    }
}
