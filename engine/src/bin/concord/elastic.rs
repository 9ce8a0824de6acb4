//! `concord bench --elastic`: collectives that keep going while peers join, die and stall.
//!
//! Each iteration: agree on the iteration number (a joiner learns it); run `-m` in-place f32 sums
//! of `-b` bytes with retry (all-reduces as one batch in flight; with `--coll`, any other
//! collective one after the other, each through `with_retry`, a broadcast or reduce rooted at
//! rank `iteration mod world`); admit pending peers; check every result against the exact
//! result over the members of the ring its successful attempt ran on; print one JSON line.
//! Inputs are small integers, so every order of summation gives the same bits.

use std::io::Write;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use concord::{CollKind, Communicator, Error, ReduceOp};

use crate::bench::args::BenchArgs;

/// Tag of the per-iteration agreement on the iteration number (never used by the batch).
const SYNC_TAG: u64 = u64::MAX - 1;

fn value(peer: u64, iteration: u64, k: usize, i: usize) -> f32 {
    ((peer * 7 + iteration * 3 + k as u64 * 5 + i as u64) % 13) as f32
}

fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

pub(crate) fn run(args: &BenchArgs) -> Result<(), String> {
    let master = args.master.as_deref().expect("validated");
    let min_world = args.world.unwrap_or(1);
    let mut comm = args
        .with_token(Communicator::builder(master))?
        .op_timeout(Duration::from_secs(args.timeout_s))
        .conns_per_neighbour(args.conns)
        .sub_chunk_bytes(args.sub_chunk)
        .connect()
        .map_err(|e| e.to_string())?;
    let me = comm.peer_id();
    comm.wait_for_world(min_world, Duration::from_secs(args.timeout_s))
        .map_err(|e| e.to_string())?;
    let elems = (args.minbytes / 4).max(1);
    let batch = args.ops_in_flight();
    let mut out = std::io::stdout().lock();
    let mut iteration = 0u64;
    while iteration < args.iters as u64 {
        let start = Instant::now();
        match step(&mut comm, me, &mut iteration, elems, batch, args.coll) {
            Ok((world, retries, wrong, first_failure)) => {
                let line = serde_json::json!({
                    "iteration": iteration, "peer": me, "world": world, "ok": wrong == 0,
                    "retries": retries, "wrong": wrong, "time_us": start.elapsed().as_micros() as u64,
                    "failure_unix_ms": first_failure.as_ref().map(|f| f.0),
                    "failure": first_failure.map(|f| f.1),
                });
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
                if wrong > 0 {
                    return Err(format!("iteration {iteration}: {wrong} wrong elements"));
                }
                iteration += 1;
            }
            Err(e) => {
                let line = serde_json::json!({
                    "iteration": iteration, "peer": me, "ok": false, "error": e.to_string(),
                    "error_unix_ms": unix_ms(), "removed": matches!(e, Error::Kicked(_)),
                });
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
                return Err(e.to_string());
            }
        }
    }
    Ok(())
}

type StepOutcome = (usize, usize, u64, Option<(u128, String)>);

fn step(
    comm: &mut Communicator,
    me: u64,
    iteration: &mut u64,
    elems: usize,
    batch: usize,
    kind: CollKind,
) -> Result<StepOutcome, Error> {
    let mut retries = 0;
    let mut first_failure: Option<(u128, String)> = None;
    // Agree on the iteration (a joiner contributes 0 and learns it). Every peer arrives here
    // right after an update_topology (members at the end of the last step, joiners in connect).
    loop {
        let mut sync = [*iteration];
        match comm.all_reduce_in_place(&mut sync, ReduceOp::Max, SYNC_TAG) {
            Ok(_) => {
                *iteration = sync[0];
                break;
            }
            Err(e) if e.is_retryable() || matches!(e, Error::Timeout(_)) => {
                first_failure.get_or_insert((unix_ms(), e.to_string()));
                retries += 1;
                comm.repair_topology()?;
            }
            Err(e) => return Err(e),
        }
    }
    let it = *iteration;
    if kind != CollKind::AllReduce {
        let (wrong, more) = other_kind(comm, me, it, elems, batch, kind)?;
        if comm.are_new_peers_pending()? {
            comm.update_topology()?;
        }
        return Ok((comm.world_size(), retries + more, wrong, first_failure));
    }
    let work: Vec<(u64, Vec<f32>)> = (0..batch)
        .map(|k| {
            (
                it * 1_000 + k as u64,
                (0..elems).map(|i| value(me, it, k, i)).collect(),
            )
        })
        .collect();
    let report = comm
        .all_reduce_many_with_retry(work, ReduceOp::Sum, batch)
        .map_err(|(_, e)| e)?;
    if let Some((at, e)) = &report.first_failure {
        let ago = at.elapsed().as_millis();
        first_failure.get_or_insert((unix_ms().saturating_sub(ago), e.to_string()));
    }
    // Admit pending peers between steps.
    if comm.are_new_peers_pending()? {
        comm.update_topology()?;
    }
    let mut wrong = 0u64;
    for (k, (_, buf, info)) in report.results.iter().enumerate() {
        let members = comm.ring_members(info.epoch).unwrap_or_default();
        for (i, got) in buf.iter().enumerate() {
            let want: f32 = members.iter().map(|p| value(*p, it, k, i)).sum();
            wrong += u64::from(got.to_bits() != want.to_bits());
        }
    }
    Ok((
        comm.world_size(),
        retries + report.retries,
        wrong,
        first_failure,
    ))
}

/// `batch` collectives of `kind` (not all-reduce), one after the other, each retried on a
/// repaired ring until it succeeds; returns the wrong elements and the retries.
fn other_kind(
    comm: &mut Communicator,
    me: u64,
    it: u64,
    elems: usize,
    batch: usize,
    kind: CollKind,
) -> Result<(u64, usize), Error> {
    let (mut wrong, mut retries) = (0u64, 0usize);
    for k in 0..batch {
        let tag = it * 1_000 + k as u64;
        let (w, r) = comm.with_retry(|c| {
            let (rank, world) = (c.rank(), c.world_size());
            let members = c.peer_ids();
            let root = it as usize % world;
            let slot = (elems / world).max(1);
            let input =
                |p: u64, n: usize| -> Vec<f32> { (0..n).map(|i| value(p, it, k, i)).collect() };
            let sum = |n: usize| -> Vec<f32> {
                (0..n)
                    .map(|i| members.iter().map(|p| value(*p, it, k, i)).sum())
                    .collect()
            };
            let (got, want) = match kind {
                CollKind::Broadcast => {
                    let mut buf = if rank == root {
                        input(me, elems)
                    } else {
                        vec![0.0; elems]
                    };
                    c.broadcast(&mut buf, root, tag)?;
                    (buf, input(members[root], elems))
                }
                CollKind::Reduce => {
                    let mut buf = input(me, elems);
                    c.reduce_in_place(&mut buf, ReduceOp::Sum, root, tag)?;
                    let want = if rank == root {
                        sum(elems)
                    } else {
                        input(me, elems)
                    };
                    (buf, want)
                }
                CollKind::AllGather => {
                    let mut out = vec![0.0; slot * world];
                    c.all_gather(&input(me, slot), &mut out, tag)?;
                    let want: Vec<f32> = members.iter().flat_map(|p| input(*p, slot)).collect();
                    (out, want)
                }
                CollKind::ReduceScatter => {
                    let mut out = vec![0.0; slot];
                    c.reduce_scatter(&input(me, slot * world), &mut out, ReduceOp::Sum, tag)?;
                    (
                        out,
                        sum(slot * world)[rank * slot..(rank + 1) * slot].to_vec(),
                    )
                }
                _ => {
                    c.barrier(tag)?;
                    (Vec::new(), Vec::new())
                }
            };
            Ok(got
                .iter()
                .zip(&want)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count() as u64)
        })?;
        wrong += w;
        retries += r;
    }
    Ok((wrong, retries))
}
