//! `concord`: run a master, benchmark all-reduce bandwidth, or describe this host.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod device;
mod elastic;
mod info;
mod simulate;
mod sizes;
mod state;

/// Concord: fault-tolerant ring all-reduce.
#[derive(Debug, Parser)]
#[command(name = "concord", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a master: one thread that admits peers and coordinates their collectives.
    Master(MasterArgs),
    /// Measure all-reduce bandwidth (nccl-tests conventions).
    Bench(Box<bench::BenchArgs>),
    /// Print the version, CPU features, kernel path, transports and CUDA status.
    Info,
    /// Simulate a group in virtual time, with faults, checking invariants (deterministic by seed).
    Simulate(simulate::SimulateArgs),
}

/// The `master` subcommand's flags.
#[derive(Debug, clap::Args)]
struct MasterArgs {
    /// Address to listen on.
    #[arg(long, default_value_t = format!("0.0.0.0:{}", concord_master::DEFAULT_PORT))]
    listen: String,
    /// File holding the run token: only peers that prove they hold the same token join (the
    /// token never travels). Default: CONCORD_TOKEN. Required beyond loopback unless --insecure.
    #[arg(long, value_name = "PATH")]
    token_file: Option<std::path::PathBuf>,
    /// Listen beyond loopback without a run token: anyone who reaches the master joins. For
    /// networks where every host is trusted.
    #[arg(long)]
    insecure: bool,
    /// Close connections that do not say hello and prove the token within this many
    /// milliseconds.
    #[arg(long, default_value_t = 10_000)]
    hello_timeout_ms: u64,
    /// Most peers at once.
    #[arg(long, default_value_t = 1024)]
    max_peers: usize,
    /// Refuse a peer that no member's update_topology admits within this many milliseconds
    /// (as long as a peer waits to be admitted by default).
    #[arg(long, default_value_t = 600_000)]
    pending_timeout_ms: u64,
    /// Most connections at once, those yet to say hello included; further ones are refused.
    /// Default: 4 × --max-peers, at most what the open-files limit (ulimit -n) leaves.
    #[arg(long)]
    max_connections: Option<usize>,
    /// Most connections at once from one IP address (one per peer on a host).
    #[arg(long, default_value_t = 64)]
    max_connections_per_ip: usize,
    /// While collectives or votes are under way, ping every peer this often (and peers waiting
    /// to be admitted, while any wait).
    #[arg(long, default_value_t = 500)]
    heartbeat_interval_ms: u64,
    /// Kick a peer that answers nothing for this long (stalled, hung or cut off).
    #[arg(long, default_value_t = 3000)]
    heartbeat_timeout_ms: u64,
    /// Poll this long for the next message after one arrived before sleeping (latency of
    /// votes on hosts where waking a thread is slow; 0: never poll). Default:
    /// CONCORD_SPIN_US, else 100.
    #[arg(long)]
    spin_us: Option<u64>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Master(args) => run_master(&args),
        Command::Bench(args) => bench::run(*args),
        Command::Simulate(args) => simulate::run(args),
        Command::Info => {
            info::print();
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("concord: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Descriptors the master needs besides its connections (standard streams, the listener,
/// the event loop, and some to spare).
const RESERVED_FDS: u64 = 16;
/// The default `--max-connections` is at most this, whatever `--max-peers` says.
const MAX_DEFAULT_CONNECTIONS: usize = 65_536;

fn run_master(args: &MasterArgs) -> Result<(), String> {
    use std::time::Duration;
    if args.heartbeat_interval_ms == 0 || args.heartbeat_timeout_ms < args.heartbeat_interval_ms {
        return Err(
            "the heartbeat interval must be positive and at most the heartbeat timeout".into(),
        );
    }
    if args.max_connections == Some(0) || args.max_connections_per_ip == 0 {
        return Err("--max-connections and --max-connections-per-ip must be positive".into());
    }
    if args.pending_timeout_ms == 0 {
        return Err("--pending-timeout-ms must be positive".into());
    }
    // Beyond the open-files limit, `accept` fails and connections wait in the backlog: by
    // default, refuse them with a reason before that.
    let fds = open_files_limit().map(|n| n.saturating_sub(RESERVED_FDS).max(1));
    let fit = |n: usize| fds.map_or(n, |f| n.min(usize::try_from(f).unwrap_or(usize::MAX)));
    let max_connections = args.max_connections.unwrap_or_else(|| {
        fit(args
            .max_peers
            .saturating_mul(4)
            .min(MAX_DEFAULT_CONNECTIONS))
    });
    let addr = concord_transport::socket::resolve(&args.listen).map_err(|e| e.to_string())?;
    let mut config = concord_master::coordinator::CoordinatorConfig::default();
    config.hello_timeout = Duration::from_millis(args.hello_timeout_ms);
    config.max_peers = args.max_peers;
    config.pending_timeout = Duration::from_millis(args.pending_timeout_ms);
    config.max_connections = max_connections;
    config.max_connections_per_ip = args.max_connections_per_ip;
    config.heartbeat_interval = Duration::from_millis(args.heartbeat_interval_ms);
    config.heartbeat_timeout = Duration::from_millis(args.heartbeat_timeout_ms);
    config.token = run_token(args.token_file.as_deref())?;
    let bind = if args.insecure {
        concord_master::server::Server::bind_insecure
    } else {
        concord_master::server::Server::bind
    };
    let mut server = bind(addr, config).map_err(|e| e.to_string())?;
    if let Some(us) = args.spin_us {
        server = server.with_spin(Duration::from_micros(us));
    }
    eprintln!("concord master listening on {}", server.local_addr());
    if fit(max_connections) < max_connections {
        tracing::warn!(
            "--max-connections {max_connections} is more than the open-files limit (ulimit -n) leaves ({}): beyond that, new connections wait until others close",
            fit(max_connections)
        );
    }
    server.run(None, || false).map_err(|e| e.to_string())
}

/// The run token of `--token-file`, else of `CONCORD_TOKEN`, else none.
pub(crate) fn run_token(
    file: Option<&std::path::Path>,
) -> Result<Option<concord::RunToken>, String> {
    match file {
        Some(path) => concord::RunToken::from_file(path)
            .map(Some)
            .map_err(|e| e.to_string()),
        None => concord::RunToken::from_env().map_err(|e| e.to_string()),
    }
}

/// The soft limit on open descriptors (`ulimit -n`), if there is one.
fn open_files_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for getrlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    (lim.rlim_cur != libc::RLIM_INFINITY).then_some(lim.rlim_cur)
}
