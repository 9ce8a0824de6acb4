//! `concord simulate`: the real master coordinator and the peers' real protocol over an
//! in-memory network in virtual time (see `concord::sim`). One seed is one exact trace.

use std::ops::Range;
use std::time::Instant;

use concord::sim::{self, Faults, SimConfig};

/// Options of `concord simulate`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct SimulateArgs {
    /// Seed of the run: the same seed replays the same trace (and digest).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Sweep the seeds A..B (B excluded) instead of one seed; prints every failing seed.
    #[arg(long, value_parser = parse_range, conflicts_with = "seed")]
    seeds: Option<Range<u64>>,
    /// Peers at the start.
    #[arg(long, default_value_t = 4)]
    peers: usize,
    /// Training steps (each a batch of tagged collectives: all-reduces, reduce-scatters, all-gathers, broadcasts and reduces in turn).
    #[arg(long, default_value_t = 10)]
    steps: u64,
    /// Faults to inject: a comma-separated list of kill, stall, join, delay, drop, timeout (or
    /// all).
    #[arg(long, default_value = "none")]
    faults: Faults,
    /// Most faults per run, other than delays (the seed picks how many).
    #[arg(long, default_value_t = 4)]
    max_faults: usize,
    /// Collectives in flight per step.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Elements of each collective (f32).
    #[arg(long, default_value_t = 300)]
    elems: usize,
    /// Elements per data frame.
    #[arg(long, default_value_t = 24)]
    sub_elems: usize,
    /// Print the last N lines of the trace (every line with a large N).
    #[arg(long, default_value_t = 0)]
    trace: usize,
    /// Re-run failed collectives right after the retry's topology update, without the step's
    /// agreement collective (the order of `concord bench --elastic`).
    #[arg(long)]
    elastic_order: bool,
    /// Threads for --seeds.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

fn parse_range(s: &str) -> Result<Range<u64>, String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("{s:?} is not a range A..B"))?;
    let a: u64 = a.trim().parse().map_err(|e| format!("{a:?}: {e}"))?;
    let b: u64 = b.trim().parse().map_err(|e| format!("{b:?}: {e}"))?;
    if b <= a {
        return Err(format!("empty range {a}..{b}"));
    }
    Ok(a..b)
}

impl SimulateArgs {
    fn config(&self, seed: u64) -> SimConfig {
        let mut c = SimConfig::new(seed);
        c.peers = self.peers;
        c.steps = self.steps;
        c.faults = self.faults;
        c.max_faults = self.max_faults;
        c.batch = self.batch;
        c.elems = self.elems;
        c.sub_elems = self.sub_elems;
        c.trace_lines = self.trace;
        c.elastic_order = self.elastic_order;
        c
    }

    fn replay(&self, seed: u64) -> String {
        format!(
            "concord simulate --seed {seed} --peers {} --steps {} --faults {} --max-faults {} --batch {} --elems {} --sub-elems {}{} --trace 60",
            self.peers,
            self.steps,
            self.faults,
            self.max_faults,
            self.batch,
            self.elems,
            self.sub_elems,
            if self.elastic_order { " --elastic-order" } else { "" }
        )
    }
}

pub(crate) fn run(args: SimulateArgs) -> Result<(), String> {
    match args.seeds.clone() {
        Some(seeds) => run_sweep(&args, seeds),
        None => run_one(&args),
    }
}

fn run_one(args: &SimulateArgs) -> Result<(), String> {
    match sim::run(&args.config(args.seed)) {
        Ok(summary) => {
            print_trace(&summary.trace);
            println!("{summary}");
            Ok(())
        }
        Err(failure) => {
            print_trace(&failure.trace);
            println!("FAILED {failure}");
            Err(format!(
                "seed {} broke an invariant; replay: {}",
                failure.seed,
                args.replay(failure.seed)
            ))
        }
    }
}

fn run_sweep(args: &SimulateArgs, seeds: Range<u64>) -> Result<(), String> {
    let start = Instant::now();
    let mut config = args.config(seeds.start);
    config.trace_lines = 0; // Replay a failing seed to see its trace.
    let (passed, failed) = sim::sweep(&config, seeds.clone(), args.threads);
    for f in &failed {
        println!("FAILED {f}\n  replay: {}", args.replay(f.seed));
    }
    let collectives: u64 = passed.iter().map(|s| s.collectives).sum();
    let events: u64 = passed.iter().map(|s| s.events).sum();
    println!(
        "seeds {}..{}: {} passed, {} failed; {collectives} collectives, {events} events in {:.2} s",
        seeds.start,
        seeds.end,
        passed.len(),
        failed.len(),
        start.elapsed().as_secs_f64()
    );
    if failed.is_empty() {
        Ok(())
    } else {
        let list: Vec<String> = failed.iter().map(|f| f.seed.to_string()).collect();
        Err(format!("failing seeds: {}", list.join(" ")))
    }
}

fn print_trace(lines: &[String]) {
    for line in lines {
        println!("{line}");
    }
}
