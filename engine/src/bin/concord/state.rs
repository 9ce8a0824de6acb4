//! `concord bench --state`: shared-state sync throughput against all-reduce busbw, same bytes,
//! same run. Rank 0 (the only sender) changes every entry before each sync; the other peers are
//! receive-only and pull all of it.

use std::io::Write;
use std::time::{Duration, Instant};

use concord::{Communicator, ReduceOp, SharedState, SyncStrategy};

use crate::bench::args::BenchArgs;

const ENTRY_BYTES: usize = 8 << 20;

pub(crate) fn run(args: &BenchArgs) -> Result<(), String> {
    let e = |e: concord::Error| e.to_string();
    let master = args.master.as_deref().expect("validated");
    let world = args.world.expect("validated");
    let mut comm = args
        .with_token(Communicator::builder(master))?
        .op_timeout(Duration::from_secs(args.timeout_s))
        .connect()
        .map_err(e)?;
    comm.wait_for_world(world, Duration::from_secs(args.timeout_s))
        .map_err(e)?;
    let rank = comm.rank();
    let bytes = args.maxbytes / 4 * 4;
    let mut data = vec![0f32; bytes / 4];
    let mut times = Vec::new();
    let mut revision = 1u64;
    let mut received = 0u64;
    for it in 0..args.warmup + args.iters {
        if rank == 0 {
            // Change every entry, so every entry is pulled.
            for chunk in data.chunks_mut(ENTRY_BYTES / 4) {
                chunk[0] = it as f32 + 1.0;
            }
        }
        let mut state = SharedState::new(revision);
        for (k, chunk) in data.chunks_mut(ENTRY_BYTES / 4).enumerate() {
            state.add(format!("w{k:05}"), chunk);
        }
        let strategy = if rank == 0 {
            SyncStrategy::SendOnly
        } else {
            SyncStrategy::ReceiveOnly
        };
        let start = Instant::now();
        let info = comm.sync_shared_state(&mut state, strategy).map_err(e)?;
        let took = start.elapsed();
        revision = info.revision + 1;
        if it >= args.warmup {
            times.push(took.as_secs_f64());
            received += info.bytes_received;
        }
    }
    // The same bytes through an all-reduce, in the same run.
    let mut ar = Vec::new();
    let src = vec![1f32; bytes / 4];
    let mut dst = vec![0f32; bytes / 4];
    for it in 0..args.warmup + args.iters {
        let start = Instant::now();
        comm.all_reduce(&src, &mut dst, ReduceOp::Sum, it as u64)
            .map_err(e)?;
        if it >= args.warmup {
            ar.push(start.elapsed().as_secs_f64());
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (sync_s, ar_s) = (median(&mut times), median(&mut ar));
    let sync_gbps = bytes as f64 / sync_s / 1e9;
    let busbw = bytes as f64 / ar_s / 1e9 * 2.0 * (world as f64 - 1.0) / world as f64;
    if rank == 1 {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "state sync of {bytes} bytes to receive-only peers: {:.1} ms, {sync_gbps:.3} GB/s ({} bytes pulled per sync); all-reduce busbw of the same bytes: {busbw:.3} GB/s; ratio {:.0}%",
            sync_s * 1e3,
            received / args.iters as u64,
            100.0 * sync_gbps / busbw
        );
    }
    Ok(())
}
