//! Deterministic simulation: the real master coordinator and the peers' real protocol over an
//! in-memory network in virtual time (`concord::sim`). A failing seed is printed with the
//! command that replays it.

use std::time::Instant;

use concord::sim::{count_of, input_value, kind_of, op_of, run, sweep, Faults, SimConfig};
use concord::{CollKind, ReduceOp};

/// Seeds in the sweep with every fault on.
const SWEEP_SEEDS: u64 = 300;

fn config(seed: u64, faults: Faults) -> SimConfig {
    let mut c = SimConfig::new(seed);
    c.faults = faults;
    c
}

fn replay_hint(c: &SimConfig) -> String {
    format!(
        "replay: cargo run -p concord -- simulate --seed {} --peers {} --steps {} --faults {} --trace 60",
        c.seed, c.peers, c.steps, c.faults
    )
}

#[test]
fn the_same_seed_gives_the_same_digest() {
    for seed in [1, 2, 3] {
        let c = config(seed, Faults::ALL);
        let a = run(&c).unwrap_or_else(|f| panic!("{f}\n{}", replay_hint(&c)));
        let b = run(&c).unwrap_or_else(|f| panic!("{f}\n{}", replay_hint(&c)));
        assert_eq!(a.digest, b.digest, "seed {seed} does not replay");
        assert_eq!(a.events, b.events);
        assert_eq!(a.virtual_us, b.virtual_us);
    }
}

#[test]
fn different_seeds_give_different_digests() {
    let mut digests: Vec<u64> = (0..20)
        .map(|seed| {
            run(&config(seed, Faults::NONE))
                .expect("no faults, no failure")
                .digest
        })
        .collect();
    digests.sort_unstable();
    digests.dedup();
    assert_eq!(digests.len(), 20, "two seeds gave the same trace");
}

#[test]
fn a_run_without_faults_matches_a_direct_computation() {
    let c = config(11, Faults::NONE);
    let s = run(&c).unwrap_or_else(|f| panic!("{f}"));
    assert_eq!(s.finished, c.peers, "every peer ran every step:\n{s}");
    assert_eq!(
        s.kills + s.stalls + s.joins + s.drops + s.aborted + s.retries,
        0
    );
    // Every peer holds every data collective of the last step, over all peers.
    assert_eq!(s.results.len(), c.peers * c.batch);
    for r in &s.results {
        let world = r.members.len();
        assert_eq!(world, c.peers);
        let rank = r.members.iter().position(|p| *p == r.peer).unwrap();
        let value = |p: u64, i: usize| input_value(p, r.step, r.k, i);
        let reduce = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|i| {
                    let column = r.members.iter().map(|p| value(*p, i));
                    match op_of(r.k) {
                        ReduceOp::Max => column.fold(f32::MIN, f32::max),
                        ReduceOp::Avg => column.sum::<f32>() / world as f32,
                        _ => column.sum::<f32>(),
                    }
                })
                .collect()
        };
        let n = count_of(c.elems, r.k);
        let root = (r.step as usize + r.k) % world;
        let own = |p: u64| -> Vec<f32> { (0..n).map(|i| value(p, i)).collect() };
        let want: Vec<f32> = match kind_of(r.step, r.k) {
            CollKind::AllReduce => reduce(n),
            CollKind::ReduceScatter => {
                let slot = n / world;
                reduce(slot * world)[rank * slot..(rank + 1) * slot].to_vec()
            }
            CollKind::AllGather => r.members.iter().flat_map(|p| own(*p)).collect(),
            CollKind::Broadcast => own(r.members[root]),
            CollKind::Reduce if rank == root => reduce(n),
            CollKind::Reduce => own(r.peer),
            CollKind::Barrier => Vec::new(),
        };
        let got: Vec<u32> = r.data.iter().map(|x| x.to_bits()).collect();
        let want: Vec<u32> = want.iter().map(|x| x.to_bits()).collect();
        assert_eq!(
            got,
            want,
            "peer {} k {} ({:?})",
            r.peer,
            r.k,
            kind_of(r.step, r.k)
        );
    }
}

#[test]
fn hundreds_of_seeds_with_every_fault_keep_every_invariant() {
    let c = config(0, Faults::ALL);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let start = Instant::now();
    let (passed, failed) = sweep(&c, 0..SWEEP_SEEDS, threads);
    let took = start.elapsed();
    let sum = |f: fn(&concord::sim::Summary) -> u64| passed.iter().map(f).sum::<u64>();
    println!(
        "{SWEEP_SEEDS} seeds in {:.1} s on {threads} threads: {} passed; {} collectives, {} aborted, {} retries, {} kills, {} stalls ({} long), {} kicked, {} joins, {} drops, {} timeouts, {} events",
        took.as_secs_f64(),
        passed.len(),
        sum(|s| s.collectives),
        sum(|s| s.aborted),
        sum(|s| s.retries),
        sum(|s| s.kills),
        sum(|s| s.stalls),
        sum(|s| s.long_stalls),
        sum(|s| s.kicked),
        sum(|s| s.joins),
        sum(|s| s.drops),
        sum(|s| s.timeouts),
        sum(|s| s.events),
    );
    for f in &failed {
        let mut c = c.clone();
        c.seed = f.seed;
        println!("FAILING SEED {}: {f}\n  {}", f.seed, replay_hint(&c));
    }
    assert!(
        failed.is_empty(),
        "{} of {SWEEP_SEEDS} seeds failed (listed above)",
        failed.len()
    );
    // The faults really happened, and really bit.
    assert!(sum(|s| s.kills) > 0 && sum(|s| s.long_stalls) > 0 && sum(|s| s.joins) > 0);
    assert!(sum(|s| s.drops) > 0 && sum(|s| s.timeouts) > 0);
    assert!(sum(|s| s.kicked) > 0 && sum(|s| s.aborted) > 0 && sum(|s| s.retries) > 0);
}

#[test]
fn small_and_larger_groups_keep_every_invariant() {
    for (peers, seeds) in [(2, 0..100), (3, 100..200), (7, 200..250)] {
        let mut c = config(0, Faults::ALL);
        c.peers = peers;
        c.max_faults = 6;
        let (passed, failed) = sweep(&c, seeds.clone(), 2);
        for f in &failed {
            let mut c = c.clone();
            c.seed = f.seed;
            println!("FAILING SEED {}: {f}\n  {}", f.seed, replay_hint(&c));
        }
        assert!(
            failed.is_empty(),
            "{peers} peers: {} seeds failed",
            failed.len()
        );
        assert_eq!(passed.len() as u64, seeds.end - seeds.start);
    }
}

/// The simulation must catch a liveness bug, not only pass: the order of `concord bench
/// --elastic` (failed collectives re-run right after the retry's `update_topology`) hangs when
/// that update admits a waiting peer, which starts with the agreement collective while the
/// members re-run data tags. It needs a join and a failure in the same step: search until found.
/// Every failure must be that hang, never a wrong result, and must replay exactly.
#[test]
fn the_elastic_order_hang_is_caught_and_replays() {
    let mut c = config(0, "join,drop".parse().expect("valid faults"));
    c.peers = 3;
    c.max_faults = 8;
    c.elastic_order = true;
    c.admit_on_retry = true; // The old design: the retry admits the joiner.
    let mut failed = Vec::new();
    for start in (0..3000).step_by(250) {
        failed = sweep(&c, start..start + 250, 2).1;
        if !failed.is_empty() {
            break;
        }
    }
    assert!(!failed.is_empty(), "the hang was not found in 3000 seeds");
    for f in &failed {
        assert!(f.message.starts_with("hang:"), "not a hang: {f}");
    }
    let mut again = c.clone();
    again.seed = failed[0].seed;
    let replay = run(&again).expect_err("a failing seed fails again");
    assert_eq!(
        (replay.digest, &replay.message),
        (failed[0].digest, &failed[0].message)
    );
    println!("elastic order: {}", failed[0]);
}

/// The fix for the hang above: retries only repair the ring (`repair_topology`), so a waiting
/// peer is admitted at the next ordinary update, where everyone starts a step together. The
/// seeds that hung with the old design pass.
#[test]
fn repair_only_retries_do_not_hang_in_elastic_order() {
    let mut c = config(0, "join,drop".parse().expect("valid faults"));
    c.peers = 3;
    c.max_faults = 8;
    c.elastic_order = true;
    let mut old = c.clone();
    old.admit_on_retry = true;
    let hung: Vec<u64> = sweep(&old, 0..1500, 2).1.iter().map(|f| f.seed).collect();
    let (_, failed) = sweep(&c, 0..1500, 2);
    assert!(
        failed.is_empty(),
        "repair-only retries failed: {:?}",
        failed.first().map(|f| f.to_string())
    );
    println!(
        "{} seeds hung with admitting retries; all 1500 pass with repair-only retries",
        hung.len()
    );
}
