//! Broadcast, reduce, all-gather, reduce-scatter and barrier across real processes on loopback:
//! a real master, 1 to 4 peer processes, every dtype, every op where the collective reduces,
//! counts that are no multiple of the world (0, 1, W-1, 7, 7919 per peer; a million and a few
//! for f32 and bf16), in place and out of place, every root. Every peer checks its output
//! against the reference it computes alone (untouched ranges included) and prints a digest, so
//! that the parent can check that peers hold the same bits where the semantics say so.

// Skips are written straight to stderr, past the test harness's capture, so they show.
use std::io::Write as _;

mod common;

use std::time::Duration;

use common::*;
use concord::{verify, CollKind, Communicator, DType, ReduceOp};

const POISON: u8 = 0xA5;

/// One case on one peer: (output digest, wrong elements, bytes sent).
#[allow(clippy::too_many_arguments)]
fn run_case(
    comm: &Communicator,
    kind: CollKind,
    dtype: DType,
    op: ReduceOp,
    per: usize,
    in_place: bool,
    root: usize,
    tag: u64,
) -> (u64, u64, u64) {
    let (rank, world) = (comm.rank(), comm.world_size());
    let elem = dtype.size_bytes();
    let whole = match kind {
        CollKind::AllGather | CollKind::ReduceScatter => per * world,
        _ => per,
    } * elem;
    let slot = whole / world;
    let own = rank * slot..(rank + 1) * slot;
    let iter = tag;
    let fill = |r: usize, out: &mut [u8]| verify::fill(dtype, op, r, iter, out);
    let mut total = vec![0u8; whole];
    verify::reference(dtype, op, world, iter, &mut total);
    // The input, the buffer handed to the call and what it must hold afterwards.
    let mut src = vec![
        0u8;
        if kind == CollKind::AllGather {
            slot
        } else {
            whole
        }
    ];
    fill(rank, &mut src);
    let out_len = match (kind, in_place) {
        (CollKind::ReduceScatter, false) => slot,
        (CollKind::Reduce, false) if rank != root && tag.is_multiple_of(2) => 0, // may be empty
        _ => whole,
    };
    let mut dst = vec![POISON; out_len];
    let mut want = vec![POISON; out_len];
    match (kind, in_place) {
        (CollKind::Broadcast, _) => {
            if rank == root {
                fill(rank, &mut dst);
            }
            fill(root, &mut want);
        }
        (CollKind::Reduce, ip) => {
            if ip {
                dst.copy_from_slice(&src);
            }
            if rank == root {
                want.copy_from_slice(&total);
            } else if ip {
                want.copy_from_slice(&src);
            }
        }
        (CollKind::AllGather, ip) => {
            if ip {
                dst[own.clone()].copy_from_slice(&src);
            }
            for r in 0..world {
                fill(r, &mut want[r * slot..(r + 1) * slot]);
            }
        }
        (CollKind::ReduceScatter, false) => want.copy_from_slice(&total[own]),
        (CollKind::ReduceScatter, true) => {
            dst.copy_from_slice(&src);
            want.copy_from_slice(&src);
            want[own.clone()].copy_from_slice(&total[own]);
        }
        (k, _) => unreachable!("{k} is not in this matrix"),
    }
    let input = (!in_place).then_some(&src[..]);
    let r = match kind {
        CollKind::Broadcast => comm.broadcast_raw(&mut dst, dtype, root, tag, None),
        CollKind::Reduce => comm.reduce_raw(input, &mut dst, dtype, op, root, tag, None),
        CollKind::AllGather => comm.all_gather_raw(input, &mut dst, dtype, tag, None),
        _ => comm.reduce_scatter_raw(input, &mut dst, dtype, op, tag, None),
    };
    let info =
        r.unwrap_or_else(|e| panic!("{kind} {dtype} {op} per {per} in place {in_place}: {e}"));
    assert_eq!(info.world, world);
    let wrong = verify::count_wrong(dtype, &dst, &want);
    (digest(&dst), wrong, info.traffic.bytes_sent)
}

/// Peer side of `run_matrix`: the whole matrix, one line per case.
#[test]
fn peer_collectives() {
    if !is_peer() {
        return;
    }
    let comm = join_from_env();
    let world = comm.world_size();
    println!("RANK {}", comm.rank());
    let mut tag = 0u64;
    for kind in [
        CollKind::Broadcast,
        CollKind::Reduce,
        CollKind::AllGather,
        CollKind::ReduceScatter,
    ] {
        for dtype in DType::ALL {
            let ops: &[ReduceOp] = if kind.reduces() {
                &ReduceOp::ALL
            } else {
                &[ReduceOp::Sum]
            };
            for &op in ops {
                let mut pers = vec![0, 1, world - 1, 7, 7919];
                if op == ReduceOp::Sum && matches!(dtype, DType::F32 | DType::BF16) {
                    pers.push(1_000_003);
                }
                for per in pers {
                    for in_place in [false, true] {
                        tag += 1;
                        let root = (tag as usize / 2) % world;
                        let (d, wrong, sent) =
                            run_case(&comm, kind, dtype, op, per, in_place, root, tag);
                        println!("CASE {kind}/{dtype}/{op}/{per}/{in_place}/{root} {d:016x} {wrong} {sent}");
                    }
                }
            }
        }
    }
    // A barrier returns on every peer, and twice in a row with distinct tags.
    for t in [u64::MAX - 3, u64::MAX - 2] {
        comm.barrier(t).expect("barrier");
    }
    println!("TRANSPORT {}", comm.transport().name());
    println!("DONE");
}

fn run_matrix(world: usize, backend: &str) {
    if is_peer() {
        return;
    }
    if backend == "uring" {
        if let Err(why) = concord_transport::uring::probe() {
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: io_uring unavailable here ({why}); the socket run covers the data path"
            );
            return;
        }
    }
    let master = MasterProcess::start();
    let env = vec![
        ("MASTER", master.addr.clone()),
        ("WORLD", world.to_string()),
        ("CONCORD_TRANSPORT", backend.to_string()),
    ];
    let peers: Vec<_> = (0..world)
        .map(|_| spawn_peer("peer_collectives", &env))
        .collect();
    let outputs: Vec<String> = wait_outputs(peers, Duration::from_secs(400))
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
    if backend == "shm" && world > 1 {
        // Every peer's connections to its successor were shared-memory rings.
        for out in &outputs {
            assert_eq!(lines_with(out, "TRANSPORT ")[0], "shm", "{out}");
        }
    }
    assert!(
        cases[0].len() > 400,
        "the matrix ran: {} cases",
        cases[0].len()
    );
    for (p, peer_cases) in cases.iter().enumerate() {
        assert_eq!(peer_cases.len(), cases[0].len(), "peer {p} ran every case");
        for (case, first) in peer_cases.iter().zip(&cases[0]) {
            assert_eq!(case[0], first[0], "peer {p} ran the cases in order");
            assert_eq!(case[2], "0", "peer {p} case {}: wrong elements", case[0]);
            // Every peer of a broadcast and of an all-gather holds the same bits.
            let same = case[0].starts_with("broadcast/") || case[0].starts_with("all_gather/");
            if same {
                assert_eq!(case[1], first[1], "peer {p} case {}: bits differ", case[0]);
            }
        }
        assert!(outputs[p].contains("DONE"));
    }
    // Traffic: a chain's root sends the buffer once (plus frame headers) and its last peer
    // nothing; a reduce-scatter sends (W-1)/W of its input.
    if world == 1 {
        return;
    }
    let ranks: Vec<usize> = outputs
        .iter()
        .map(|o| lines_with(o, "RANK ")[0].parse().unwrap())
        .collect();
    let sent = |p: usize, prefix: &str| -> (f64, usize) {
        let c = cases[p]
            .iter()
            .find(|c| c[0].starts_with(prefix))
            .unwrap_or_else(|| panic!("case {prefix} ran"));
        let root = c[0].rsplit('/').next().unwrap().parse().unwrap();
        (c[3].parse().unwrap(), root)
    };
    let bytes = 4.0 * 1_000_003.0;
    for (p, &rank) in ranks.iter().enumerate() {
        let (b, root) = sent(p, "broadcast/float/sum/1000003/false/");
        let want = if rank == (root + world - 1) % world {
            0.0
        } else {
            bytes
        };
        assert!(
            b >= want && b <= want * 1.01,
            "rank {rank} sent {b} bytes of a broadcast from {root}"
        );
        let (b, _) = sent(p, "reduce_scatter/float/sum/1000003/false/");
        let want = (world as f64 - 1.0) * bytes;
        assert!(
            b >= want && b <= want * 1.01,
            "rank {rank} sent {b} bytes of a reduce-scatter"
        );
    }
}

#[test]
fn collectives_matrix_world_1_socket() {
    run_matrix(1, "socket");
}

#[test]
fn collectives_matrix_world_2_uring() {
    run_matrix(2, "uring");
}

#[test]
fn collectives_matrix_world_3_socket() {
    run_matrix(3, "socket");
}

#[test]
fn collectives_matrix_world_3_uring() {
    run_matrix(3, "uring");
}

#[test]
fn collectives_matrix_world_4_socket() {
    run_matrix(4, "socket");
}

#[test]
fn collectives_matrix_world_2_shm() {
    run_matrix(2, "shm");
}

#[test]
fn collectives_matrix_world_3_shm() {
    run_matrix(3, "shm");
}

#[test]
fn collectives_matrix_world_4_shm() {
    run_matrix(4, "shm");
}

/// Peer side of `async_collectives_of_every_kind_in_flight_together`.
#[test]
fn peer_async() {
    if !is_peer() {
        return;
    }
    let mut comm = join_from_env();
    let (rank, world) = (comm.rank(), comm.world_size());
    let (dtype, op) = (DType::F32, ReduceOp::Sum);
    let per = 40_009usize;
    let floats = |bytes: Vec<u8>| -> Vec<f32> { bytemuck::cast_slice(&bytes).to_vec() };
    let filled = |r: usize, iter: u64, n: usize| {
        let mut b = vec![0u8; n * 4];
        verify::fill(dtype, op, r, iter, &mut b);
        floats(b)
    };
    let total = |iter: u64, n: usize| {
        let mut b = vec![0u8; n * 4];
        verify::reference(dtype, op, world, iter, &mut b);
        floats(b)
    };
    {
        let (collectives, _probe) = comm.split();
        // Eight rounds of every kind, all launched before any is awaited.
        let mut handles = Vec::new();
        for round in 0..8u64 {
            let t = 10 * round;
            let root = round as usize % world;
            let bcast = if rank == root {
                filled(rank, t + 1, per)
            } else {
                vec![0.0; per]
            };
            handles.push((
                CollKind::Broadcast,
                t + 1,
                root,
                collectives.broadcast_async(bcast, root, t + 1),
            ));
            let h = collectives.reduce_async(filled(rank, t + 2, per), op, root, t + 2);
            handles.push((CollKind::Reduce, t + 2, root, h));
            let h = collectives.all_gather_async(
                filled(rank, t + 3, per),
                vec![0.0; per * world],
                t + 3,
            );
            handles.push((CollKind::AllGather, t + 3, root, h));
            let h = collectives.reduce_scatter_async(
                filled(rank, t + 4, per * world),
                vec![0.0; per],
                op,
                t + 4,
            );
            handles.push((CollKind::ReduceScatter, t + 4, root, h));
            handles.push((
                CollKind::AllReduce,
                t + 5,
                root,
                collectives.all_reduce_async(filled(rank, t + 5, per), op, t + 5),
            ));
            handles.push((CollKind::Barrier, t + 6, root, {
                // A barrier's handle holds no buffer: its type differs, so it is awaited here.
                let b = collectives.barrier_async(t + 6);
                let (buf, r) = b.wait();
                r.expect("barrier");
                assert!(buf.is_empty());
                collectives.all_reduce_async(vec![1.0f32], op, t + 7)
            }));
        }
        for (kind, tag, root, h) in handles {
            let (got, r) = h.wait();
            r.unwrap_or_else(|e| panic!("{kind} tag {tag}: {e}"));
            let want = match kind {
                CollKind::Broadcast => filled(root, tag, per),
                CollKind::Reduce if rank == root => total(tag, per),
                CollKind::Reduce => filled(rank, tag, per),
                CollKind::AllGather => (0..world).flat_map(|r| filled(r, tag, per)).collect(),
                CollKind::ReduceScatter => {
                    total(tag, per * world)[rank * per..(rank + 1) * per].to_vec()
                }
                CollKind::AllReduce => total(tag, per),
                CollKind::Barrier => vec![world as f32],
            };
            assert!(got == want, "{kind} tag {tag}: wrong result");
        }
    }
    // Peers that disagree on the root are refused with the field named; nothing moves.
    let mut buf = filled(rank, 99, 1000);
    let before = buf.clone();
    let err = comm
        .broadcast(&mut buf, rank, 500)
        .expect_err("three peers name three roots");
    assert!(matches!(err, concord::Error::Mismatch { .. }), "{err}");
    assert!(err.to_string().contains("root ("), "{err}");
    assert!(buf == before, "a refused broadcast moved nothing");
    // A shape that does not fit the ring is refused before anything is sent.
    let err = comm
        .all_gather(&[1.0f32; 3], &mut [0.0f32; 5], 501)
        .expect_err("5 is not 3 x world");
    assert!(matches!(err, concord::Error::InvalidArgument(_)), "{err}");
    println!("ASYNC_OK");
}

#[test]
fn async_collectives_of_every_kind_in_flight_together() {
    if is_peer() {
        return;
    }
    let master = MasterProcess::start();
    let env = vec![("MASTER", master.addr.clone()), ("WORLD", "3".to_string())];
    let peers = (0..3).map(|_| spawn_peer("peer_async", &env)).collect();
    for (ok, out) in wait_outputs(peers, Duration::from_secs(120)) {
        assert!(ok && out.contains("ASYNC_OK"), "a peer:\n{out}");
    }
}
