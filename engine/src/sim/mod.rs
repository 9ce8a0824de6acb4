//! Deterministic simulation: the real master [`Coordinator`] and the peers' real
//! [`PeerProto`](crate::protocol::PeerProto), over an in-memory network, in virtual time.
//!
//! One seed fixes everything: latencies, the faults and when they hit, each peer's compute
//! time. The run is single-threaded and every container is ordered, so the same seed gives the
//! same trace and the same [`Summary::digest`], and a failing seed replays exactly. Invariants
//! are checked at every step (see `check.rs`): every operation ends, survivors agree bit for
//! bit, no result misses or doubles a contribution, a removed peer is never counted. The design
//! notes are in `README.md` beside this file.
//!
//! ```
//! use concord::sim::{run, Faults, SimConfig};
//! let mut config = SimConfig::new(7);
//! config.peers = 3;
//! config.steps = 4;
//! config.faults = Faults::ALL;
//! let summary = run(&config).expect("invariants hold");
//! assert_eq!(run(&config).unwrap().digest, summary.digest); // the same seed replays exactly
//! println!("{summary}");
//! ```
//!
//! [`Coordinator`]: concord_master::coordinator::Coordinator

mod check;
mod ctx;
mod driver;
mod master;
mod net;
mod peer;
mod plane;
mod rng;
mod world;

use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use concord_kernels::ReduceOp;
use concord_master::proto::PeerId;

/// Which faults a run injects. `delay` is continuous (random extra latency on messages); the
/// others hit at random times, a few per run (see [`SimConfig::max_faults`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// A peer vanishes: its master connection and data connections close.
    pub kill: bool,
    /// A peer stops processing for 0.1-1.5 s, or 4-8 s (then the master's heartbeats kick it).
    pub stall: bool,
    /// A new peer registers mid-run.
    pub join: bool,
    /// Random extra latency on messages (order per connection is kept, as TCP does).
    pub delay: bool,
    /// A peer's data connections reset (the peer itself lives on).
    pub drop: bool,
    /// A peer's deadline for one collective passes: its watchdog asks the master to abort it
    /// (`CollCancel`), and every member retries it.
    pub timeout: bool,
}

impl Faults {
    /// No fault.
    pub const NONE: Faults = Faults {
        kill: false,
        stall: false,
        join: false,
        delay: false,
        drop: false,
        timeout: false,
    };
    /// Every fault.
    pub const ALL: Faults = Faults {
        kill: true,
        stall: true,
        join: true,
        delay: true,
        drop: true,
        timeout: true,
    };
}

impl std::str::FromStr for Faults {
    type Err = String;

    /// A comma-separated list of `kill`, `stall`, `join`, `delay`, `drop`, `timeout`; `all`;
    /// `none` or "".
    fn from_str(s: &str) -> Result<Self, String> {
        let mut f = Faults::NONE;
        for word in s.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            match word {
                "kill" => f.kill = true,
                "stall" => f.stall = true,
                "join" => f.join = true,
                "delay" => f.delay = true,
                "drop" => f.drop = true,
                "timeout" => f.timeout = true,
                "all" => f = Faults::ALL,
                "none" => {}
                other => {
                    return Err(format!(
                        "unknown fault {other:?}: use kill, stall, join, delay, drop, timeout, all or none"
                    ))
                }
            }
        }
        Ok(f)
    }
}

impl fmt::Display for Faults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let on = [
            (self.kill, "kill"),
            (self.stall, "stall"),
            (self.join, "join"),
            (self.delay, "delay"),
            (self.drop, "drop"),
            (self.timeout, "timeout"),
        ];
        let names: Vec<&str> = on.iter().filter(|(b, _)| *b).map(|(_, n)| *n).collect();
        if names.is_empty() {
            write!(f, "none")
        } else {
            write!(f, "{}", names.join(","))
        }
    }
}

/// What to simulate. Start from [`SimConfig::new`] and set fields.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SimConfig {
    /// Fixes the whole run.
    pub seed: u64,
    /// Peers at the start (2 to 64).
    pub peers: usize,
    /// Training steps; each runs a batch of data collectives (1 to 10 000).
    pub steps: u64,
    /// Faults to inject.
    pub faults: Faults,
    /// Most faults (other than delays) per run; the seed picks how many, at least one.
    pub max_faults: usize,
    /// Data collectives in flight per step (1 to 64). Tag `k` uses [`op_of`]`(k)`.
    pub batch: usize,
    /// Elements of the first collective of a step; tag `k` has [`count_of`]`(elems, k)`.
    pub elems: usize,
    /// Elements per sub-chunk (one data frame); small, so that there are many frames.
    pub sub_elems: usize,
    /// Keep the last this many trace lines (0: none; costs time when on).
    pub trace_lines: usize,
    /// Re-run failed collectives right after the retry's topology update, without the step's
    /// agreement collective first: the order of `concord bench --elastic` (whose retries happen
    /// inside `all_reduce_many_with_retry`). A peer admitted by that update cannot know which
    /// tags are being re-run. Off by default.
    pub elastic_order: bool,
    /// Retries admit pending peers (`update_topology`) instead of only repairing the ring
    /// (`repair_topology`, what the engine does): the design the simulator caught hanging with
    /// `elastic_order`. Off by default; kept to show the simulator finds liveness bugs.
    pub admit_on_retry: bool,
}

impl SimConfig {
    /// Four peers, ten steps, no faults, four f32 collectives of 300-321 elements per step in
    /// 24-element frames.
    pub fn new(seed: u64) -> Self {
        SimConfig {
            seed,
            peers: 4,
            steps: 10,
            faults: Faults::NONE,
            max_faults: 4,
            batch: 4,
            elems: 300,
            sub_elems: 24,
            trace_lines: 0,
            elastic_order: false,
            admit_on_retry: false,
        }
    }

    fn validate(&self) -> Result<(), String> {
        let checks = [
            ((2..=64).contains(&self.peers), "peers must be 2 to 64"),
            (
                (1..=10_000).contains(&self.steps),
                "steps must be 1 to 10000",
            ),
            ((1..=64).contains(&self.batch), "batch must be 1 to 64"),
            (
                (1..=1 << 20).contains(&self.elems),
                "elems must be 1 to 1048576",
            ),
            (
                (1..=1 << 16).contains(&self.sub_elems),
                "sub_elems must be 1 to 65536",
            ),
            (
                (1..=64).contains(&self.max_faults),
                "max_faults must be 1 to 64",
            ),
        ];
        match checks.iter().find(|(ok, _)| !ok) {
            Some((_, why)) => Err(why.to_string()),
            None => Ok(()),
        }
    }
}

/// One data collective of the last step, as a peer that finished the run holds it.
#[derive(Clone, Debug)]
pub struct PeerResult {
    /// The peer.
    pub peer: PeerId,
    /// The step.
    pub step: u64,
    /// Which collective of the step (its kind is [`kind_of`]`(step, k)`, its op [`op_of`]`(k)`).
    pub k: usize,
    /// The master's sequence number of the attempt that succeeded.
    pub seq: u64,
    /// Members of the ring it ran on.
    pub members: Vec<PeerId>,
    /// Its output here (see [`kind_of`]: every call is in place but a reduce-scatter's).
    pub data: Vec<f32>,
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct Summary {
    /// The seed.
    pub seed: u64,
    /// Peers at the start.
    pub peers: usize,
    /// Steps.
    pub steps: u64,
    /// Faults enabled.
    pub faults: Faults,
    /// Peers that ran every step.
    pub finished: usize,
    /// Collective attempts the master completed (`CollDone`).
    pub collectives: u64,
    /// Collective attempts aborted after they started.
    pub aborted: u64,
    /// Most retries (ring rebuilds after failures) of one peer.
    pub retries: u64,
    /// Ring epochs announced.
    pub epochs: u64,
    /// Peers killed.
    pub kills: u64,
    /// Peers stalled, and how many of those stalls were long enough to be kicked.
    pub stalls: u64,
    /// See [`Summary::stalls`].
    pub long_stalls: u64,
    /// Peers the master removed while they were still running.
    pub kicked: u64,
    /// Peers that joined mid-run.
    pub joins: u64,
    /// Data-connection resets.
    pub drops: u64,
    /// Collectives whose deadline a peer declared passed.
    pub timeouts: u64,
    /// Control messages sent (both directions).
    pub control_messages: u64,
    /// Data frames sent.
    pub data_frames: u64,
    /// Events processed.
    pub events: u64,
    /// Virtual time at the end, in microseconds.
    pub virtual_us: u64,
    /// FNV-1a digest of every processed event, in order: the identity of the trace.
    pub digest: u64,
    /// The last step's data collectives on every peer that finished.
    pub results: Vec<PeerResult>,
    /// The last trace lines kept ([`SimConfig::trace_lines`]).
    pub trace: Vec<String>,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "seed {}: {} peers (+{} joined), {} steps, faults {}: ok",
            self.seed, self.peers, self.joins, self.steps, self.faults
        )?;
        writeln!(
            f,
            "  collectives completed {}, aborted {}, retries {}, ring epochs {}, finished peers {}",
            self.collectives, self.aborted, self.retries, self.epochs, self.finished
        )?;
        writeln!(
            f,
            "  kills {}, stalls {} ({} long), kicked {}, joins {}, connection drops {}, timeouts {}",
            self.kills,
            self.stalls,
            self.long_stalls,
            self.kicked,
            self.joins,
            self.drops,
            self.timeouts
        )?;
        writeln!(
            f,
            "  {} events, {} control messages, {} data frames, virtual time {}.{:06} s",
            self.events,
            self.control_messages,
            self.data_frames,
            self.virtual_us / 1_000_000,
            self.virtual_us % 1_000_000
        )?;
        write!(f, "  digest {:016x}", self.digest)
    }
}

/// A broken invariant (or a panic), with what is needed to replay it.
#[derive(Clone, Debug)]
pub struct Failure {
    /// The seed that fails.
    pub seed: u64,
    /// Virtual time of the failure, in microseconds.
    pub at_us: u64,
    /// What broke.
    pub message: String,
    /// Digest of the trace up to the failure.
    pub digest: u64,
    /// The last trace lines kept ([`SimConfig::trace_lines`]).
    pub trace: Vec<String>,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed {} failed at {}.{:06} s (digest {:016x}): {}",
            self.seed,
            self.at_us / 1_000_000,
            self.at_us % 1_000_000,
            self.digest,
            self.message
        )
    }
}

impl std::error::Error for Failure {}

/// Runs one simulation. `Err` names the first broken invariant; the same config replays it.
pub fn run(config: &SimConfig) -> Result<Summary, Failure> {
    if let Err(why) = config.validate() {
        return Err(Failure {
            seed: config.seed,
            at_us: 0,
            message: format!("invalid configuration: {why}"),
            digest: 0,
            trace: Vec::new(),
        });
    }
    // The master logs every kick; here kicks are expected, and the trace tells them.
    let quiet = tracing::subscriber::NoSubscriber::default();
    tracing::subscriber::with_default(quiet, || {
        let mut world = world::World::new(config);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| world.run()));
        if let Err(panic) = outcome {
            return Err(world.panicked(panic_message(panic.as_ref())));
        }
        match world.failure() {
            Some(failure) => Err(failure),
            None => Ok(world.summary()),
        }
    })
}

/// Runs `config` for every seed of `seeds` on `threads` threads; returns the failures, by seed,
/// and the summaries of the runs that passed, by seed.
pub fn sweep(
    config: &SimConfig,
    seeds: Range<u64>,
    threads: usize,
) -> (Vec<Summary>, Vec<Failure>) {
    let next = AtomicU64::new(seeds.start);
    let results = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| loop {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= seeds.end {
                    return;
                }
                let mut c = config.clone();
                c.seed = seed;
                let r = run(&c);
                results
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((seed, r));
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_else(|p| p.into_inner());
    results.sort_by_key(|(seed, _)| *seed);
    let mut passed = Vec::new();
    let mut failed = Vec::new();
    for (_, r) in results {
        match r {
            Ok(s) => passed.push(s),
            Err(f) => failed.push(f),
        }
    }
    (passed, failed)
}

/// Input element `i` of data collective `k` of `step` on `peer`: a small integer, so every sum
/// is exact in f32 whatever the order, and the result can be checked bit for bit.
pub fn input_value(peer: PeerId, step: u64, k: usize, i: usize) -> f32 {
    ((peer * 7 + step * 3 + k as u64 * 5 + i as u64) % 13) as f32
}

/// The reduction data collective `k` of a step uses: sum, sum, avg, max, in turn.
pub fn op_of(k: usize) -> ReduceOp {
    match k % 4 {
        2 => ReduceOp::Avg,
        3 => ReduceOp::Max,
        _ => ReduceOp::Sum,
    }
}

/// The collective data collective `k` of `step` is: every kind in turn over the steps, so that
/// a batch of four mixes all-reduces with broadcasts, reduces, all-gathers and reduce-scatters.
pub fn kind_of(step: u64, k: usize) -> concord_master::proto::CollKind {
    use concord_master::proto::CollKind::*;
    const KINDS: [concord_master::proto::CollKind; 5] =
        [AllReduce, ReduceScatter, AllGather, Broadcast, Reduce];
    KINDS[(step as usize + k) % KINDS.len()]
}

/// Elements of data collective `k` when the first has `elems` (uneven, so chunks differ).
pub fn count_of(elems: usize, k: usize) -> usize {
    elems + 7 * k
}

/// The tag of data collective `k` of `step` (unique over a run).
fn data_tag(step: u64, k: usize) -> u64 {
    1 + step * 64 + k as u64
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic.downcast_ref::<&str>().map(|s| s.to_string());
    text.or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-text panic".into())
}

/// Native-endian f32s of a byte buffer.
fn floats(bits: &[u8]) -> Vec<f32> {
    bits.chunks_exact(4)
        .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}
