//! `concord bench`: collective bandwidth, following nccl-tests (sizes, iterations, table, busbw).
//!
//! Rooms: `args` (flags), `local` (`--local N`: an embedded master and N peer processes),
//! `peer` (one peer's measurement loop), `shapes` (what each collective puts in and expects),
//! `report` (the table, the footer and JSON).

pub(crate) mod args;
mod local;
mod peer;
mod report;
mod shapes;
mod topology;

pub(crate) use args::BenchArgs;
use args::CpuBind;

/// Runs the benchmark the flags describe: a local group, an elastic or shared-state run, or one
/// peer of a group whose master runs elsewhere.
pub(crate) fn run(args: BenchArgs) -> Result<(), String> {
    args.validate()?;
    match (args.local, args.elastic) {
        (Some(n), _) => local::run_local(&args, n),
        (None, true) => crate::elastic::run(&args),
        (None, false) if args.state => crate::state::run(&args),
        (None, false) => peer::run_peer(&args),
    }
}
