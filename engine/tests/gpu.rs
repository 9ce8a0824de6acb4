//! Device (CUDA) buffers. Where CUDA is missing, the request is a clear error (checked here);
//! the GPU tests skip loudly, saying why. Where a GPU is present they check every op and dtype
//! against the CPU oracle with 2 to 4 peer processes on one GPU, in and out of place, odd
//! counts, async handles, device shared-state entries, and that a peer killed mid-operation
//! leaves the survivors' device buffers restored.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{
    assert_survivors, is_peer, join_from_env, lines_with, spawn_peer, wait_outputs, MasterProcess,
};
use concord::gpu::cudarc::driver::{CudaContext, CudaSlice};
use concord::ReduceOp;

/// `Some(())` where a GPU can run the tests; otherwise says why they are skipped.
fn gpu_or_skip(test: &str) -> Option<()> {
    match concord::cuda_status() {
        Ok(device) => {
            eprintln!("{test}: running on {device}");
            Some(())
        }
        Err(why) => {
            // Straight to the process's stderr, past the test harness's capture: loud.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr().lock(),
                "SKIPPED {test}: no usable CUDA here ({why}); nothing on the GPU was checked"
            );
            None
        }
    }
}

#[test]
fn without_cuda_asking_for_device_buffers_is_a_clear_error() {
    if is_peer() {
        return;
    }
    let bin = common::concord_bin();
    let info = Command::new(&bin)
        .arg("info")
        .output()
        .expect("concord info");
    let info = String::from_utf8_lossy(&info.stdout).to_string();
    match concord::cuda_status() {
        Ok(device) => {
            assert!(info.contains("cuda: available"), "{info}");
            eprintln!("CUDA is available here ({device}): the no-CUDA error path is not reachable");
        }
        Err(why) => {
            assert!(
                info.contains(&format!("cuda: not available: {why}")),
                "info says why: {info}"
            );
            let out = Command::new(&bin)
                .args([
                    "bench", "--local", "2", "--device", "cuda", "-b", "1M", "-e", "1M",
                ])
                .output()
                .expect("concord bench");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "bench --device cuda must fail here");
            assert!(
                stderr.contains("--device cuda: CUDA is not available here")
                    && stderr.contains(&why),
                "a clear error naming the reason: {stderr}"
            );
            assert!(!stderr.contains("panicked"), "{stderr}");
        }
    }
}

/// `concord bench --local W --device cuda` with the check on: every element of every checked
/// iteration is compared with the oracle each peer computes on the CPU.
fn bench_ok(world: usize, dtype: &str, esize: usize, op: &str, in_place: bool) {
    bench_on("cuda", world, dtype, esize, op, in_place);
}

fn bench_on(device: &str, world: usize, dtype: &str, esize: usize, op: &str, in_place: bool) {
    let bin = common::concord_bin();
    // Odd counts: 3, 21, 147, ... elements (and at least one sub-chunk boundary crossed).
    let (b, e) = ((3 * esize).to_string(), (352_947 * esize).to_string());
    let world = world.to_string();
    let mut args = vec![
        "bench",
        "--local",
        &world,
        "--device",
        device,
        "-b",
        &b,
        "-e",
        &e,
        "-f",
        "7",
        "-n",
        "2",
        "-w",
        "1",
        "-c",
        "1",
        "-d",
        dtype,
        "-o",
        op,
        "--sub-chunk",
        "64K",
    ];
    if in_place {
        args.push("--in-place");
    }
    let out = Command::new(&bin)
        .args(&args)
        .output()
        .expect("concord bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("Out of bounds values : 0 OK"),
        "{args:?}:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn device_buffers_every_op_and_dtype_match_the_oracle() {
    if is_peer() || gpu_or_skip("device_buffers_every_op_and_dtype_match_the_oracle").is_none() {
        return;
    }
    for world in 2..=4 {
        for (dtype, esize) in [("float", 4), ("half", 2), ("bfloat16", 2)] {
            for op in ["sum", "avg", "prod", "max", "min"] {
                for in_place in [false, true] {
                    bench_ok(world, dtype, esize, op, in_place);
                }
            }
        }
    }
    for (dtype, esize) in [
        ("double", 8),
        ("int8", 1),
        ("int16", 2),
        ("int32", 4),
        ("int64", 8),
        ("uint8", 1),
        ("uint16", 2),
        ("uint32", 4),
        ("uint64", 8),
    ] {
        for op in ["sum", "max"] {
            bench_ok(3, dtype, esize, op, false);
        }
    }
}

/// The device pipeline (mirror, lanes, input staging, backup) on the emulated device, which
/// runs everywhere: every op over f32/f16/bf16 with 2 to 4 processes (in and out of place
/// alternately), the other dtypes once. The CUDA calls themselves are what it cannot check.
#[test]
fn emulated_device_pipeline_matches_the_oracle() {
    if is_peer() {
        return;
    }
    let mut k = 0;
    for world in 2..=4 {
        for (dtype, esize) in [("float", 4), ("half", 2), ("bfloat16", 2)] {
            for op in ["sum", "avg", "prod", "max", "min"] {
                k += 1;
                bench_on("emulated", world, dtype, esize, op, k % 2 == 0);
            }
        }
    }
    for (dtype, esize) in [("double", 8), ("int8", 1), ("int32", 4), ("uint64", 8)] {
        bench_on("emulated", 3, dtype, esize, "sum", false);
    }
}

#[test]
fn emulated_device_a_peer_killed_mid_operation_leaves_survivors_buffers_restored() {
    if is_peer() {
        return;
    }
    assert_survivors(run_peers(3, "kill-emulated", Some(1)), 1, "RESTORED");
}

/// A peer process: device all-reduces (blocking, async, shared state), or the kill scenario.
#[test]
fn gpu_peer() {
    if !is_peer() {
        return;
    }
    let scenario = std::env::var("SCENARIO").expect("SCENARIO");
    let comm = join_from_env();
    let world = comm.world_size();
    let rank = comm.rank();
    if scenario == "kill-emulated" {
        let input: Vec<u8> = (0..4_000_012usize).map(|i| (i * 31 + rank) as u8).collect();
        let mut buf = input.clone();
        let r =
            comm.all_reduce_emulated_device(None, &mut buf, concord::DType::U8, ReduceOp::Sum, 7);
        let err = r.expect_err("a peer died mid-operation");
        assert!(
            buf == input,
            "the survivor's buffer is restored after: {err}"
        );
        println!("RESTORED rank {rank}: {err}");
        return;
    }
    let ctx = CudaContext::new(0).expect("CUDA device 0");
    let stream = ctx.default_stream();
    let n = 1_000_003usize;
    let input: Vec<f32> = (0..n)
        .map(|i| ((i * 7 + rank * 13) % 1000) as f32 * 0.25)
        .collect();
    let expected: Vec<f32> = (0..n)
        .map(|i| {
            (0..world)
                .map(|r| ((i * 7 + r * 13) % 1000) as f32 * 0.25)
                .sum()
        })
        .collect();
    let mut buf: CudaSlice<f32> = stream.clone_htod(&input).expect("upload");
    match scenario.as_str() {
        "reduce" => {
            comm.all_reduce_device_in_place(&mut buf, ReduceOp::Sum, 1)
                .expect("device all-reduce");
            let got = stream.clone_dtoh(&buf).expect("download");
            // Sums of 2-4 quarter-integers below 1000: exact in f32 whatever the order.
            assert_eq!(got, expected, "in-place device all-reduce");
            let src: CudaSlice<f32> = stream.clone_htod(&input).expect("upload");
            let mut dst: CudaSlice<f32> = stream.alloc_zeros(n).expect("alloc");
            comm.all_reduce_device(&src, &mut dst, ReduceOp::Sum, 2)
                .expect("out-of-place device all-reduce");
            assert_eq!(stream.clone_dtoh(&dst).expect("download"), expected);
            let mut comm = comm;
            {
                let (collectives, _probe) = comm.split();
                let handles: Vec<_> = (0..8u64)
                    .map(|k| {
                        let b = stream.clone_htod(&input).expect("upload");
                        collectives.all_reduce_device_async(b, ReduceOp::Sum, 100 + k, None)
                    })
                    .collect();
                for h in handles {
                    let (b, r) = h.wait();
                    r.expect("async device all-reduce");
                    assert_eq!(stream.clone_dtoh(&b).expect("download"), expected);
                }
            }
            // Shared state with a device entry: rank 0's content wins everywhere.
            let mine: Vec<u32> = (0..4099u32)
                .map(|i| if rank == 0 { i * 3 } else { i })
                .collect();
            let mut entry: CudaSlice<u32> = stream.clone_htod(&mine).expect("upload");
            let mut state = concord::SharedState::new(if rank == 0 { 1 } else { 0 });
            state.add_device("weights", &mut entry);
            comm.sync_shared_state(&mut state, concord::SyncStrategy::EnforcePopular)
                .expect("shared-state sync");
            let got = stream.clone_dtoh(&entry).expect("download");
            assert_eq!(got, (0..4099u32).map(|i| i * 3).collect::<Vec<_>>());
            // The other collectives of device buffers (staged through host memory).
            let value = |r: usize, i: usize| ((i * 7 + r * 13) % 1000) as f32 * 0.25;
            let root = world - 1;
            let mut b: CudaSlice<f32> = stream.clone_htod(&input).expect("upload");
            comm.broadcast_device(&mut b, root, 200)
                .expect("device broadcast");
            let want: Vec<f32> = (0..n).map(|i| value(root, i)).collect();
            assert_eq!(stream.clone_dtoh(&b).expect("download"), want, "broadcast");
            let src: CudaSlice<f32> = stream.clone_htod(&input).expect("upload");
            let mut dst: CudaSlice<f32> = stream.alloc_zeros(n).expect("alloc");
            comm.reduce_device(&src, &mut dst, ReduceOp::Sum, root, 201)
                .expect("device reduce");
            let got = stream.clone_dtoh(&dst).expect("download");
            if rank == root {
                assert_eq!(got, expected, "reduce on the root");
            } else {
                assert!(
                    got.iter().all(|&x| x == 0.0),
                    "reduce leaves the others' dst"
                );
            }
            let slot = n / world;
            let mine: CudaSlice<f32> = stream.clone_htod(&input[..slot]).expect("upload");
            let mut all: CudaSlice<f32> = stream.alloc_zeros(slot * world).expect("alloc");
            comm.all_gather_device(&mine, &mut all, 202)
                .expect("device all-gather");
            let want: Vec<f32> = (0..world)
                .flat_map(|r| (0..slot).map(move |i| value(r, i)))
                .collect();
            assert_eq!(
                stream.clone_dtoh(&all).expect("download"),
                want,
                "all-gather"
            );
            let whole: CudaSlice<f32> = stream.clone_htod(&input[..slot * world]).expect("upload");
            let mut part: CudaSlice<f32> = stream.alloc_zeros(slot).expect("alloc");
            comm.reduce_scatter_device(&whole, &mut part, ReduceOp::Sum, 203)
                .expect("device reduce-scatter");
            assert_eq!(
                stream.clone_dtoh(&part).expect("download"),
                expected[rank * slot..(rank + 1) * slot].to_vec(),
                "reduce-scatter"
            );
            println!("GPU_OK rank {rank}");
        }
        "kill" => {
            // The peer with KILL set dies inside the reduce-scatter (fault.rs).
            let r = comm.all_reduce_device_in_place(&mut buf, ReduceOp::Sum, 7);
            let err = r.expect_err("a peer died mid-operation");
            let got = stream.clone_dtoh(&buf).expect("download");
            assert_eq!(
                got, input,
                "the survivor's device buffer is restored after: {err}"
            );
            println!("RESTORED rank {rank}: {err}");
        }
        other => panic!("unknown scenario {other}"),
    }
}

fn run_peers(world: usize, scenario: &str, killed: Option<usize>) -> Vec<(bool, String)> {
    let master = MasterProcess::start();
    let peers: Vec<_> = (0..world)
        .map(|i| {
            let mut env = vec![
                ("MASTER", master.addr.clone()),
                ("WORLD", world.to_string()),
                ("SCENARIO", scenario.to_string()),
            ];
            if killed == Some(i) {
                env.push(("CONCORD_FAULT_KILL_AT", "reduce-scatter:7".to_string()));
            }
            spawn_peer("gpu_peer", &env)
        })
        .collect();
    wait_outputs(peers, Duration::from_secs(300))
}

#[test]
fn device_buffers_blocking_async_and_shared_state_across_processes() {
    if is_peer()
        || gpu_or_skip("device_buffers_blocking_async_and_shared_state_across_processes").is_none()
    {
        return;
    }
    for world in [2, 4] {
        for (i, (ok, out)) in run_peers(world, "reduce", None).into_iter().enumerate() {
            assert!(
                ok && !lines_with(&out, "GPU_OK").is_empty(),
                "peer {i}:\n{out}"
            );
        }
    }
}

#[test]
fn a_peer_killed_mid_operation_leaves_survivors_device_buffers_restored() {
    if is_peer()
        || gpu_or_skip("a_peer_killed_mid_operation_leaves_survivors_device_buffers_restored")
            .is_none()
    {
        return;
    }
    assert_survivors(run_peers(3, "kill", Some(1)), 1, "RESTORED");
}
