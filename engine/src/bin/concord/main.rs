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
    Master {
        /// Address to listen on.
        #[arg(long, default_value_t = format!("0.0.0.0:{}", concord_master::DEFAULT_PORT))]
        listen: String,
        /// Close connections that do not say hello within this many milliseconds.
        #[arg(long, default_value_t = 10_000)]
        hello_timeout_ms: u64,
        /// Most peers at once.
        #[arg(long, default_value_t = 1024)]
        max_peers: usize,
        /// While collectives or votes are under way, ping every peer this often.
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
    },
    /// Measure all-reduce bandwidth (nccl-tests conventions).
    Bench(bench::BenchArgs),
    /// Print the version, CPU features, kernel path, transports and CUDA status.
    Info,
    /// Simulate a group in virtual time, with faults, checking invariants (deterministic by seed).
    Simulate(simulate::SimulateArgs),
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
        Command::Master {
            listen,
            hello_timeout_ms,
            max_peers,
            heartbeat_interval_ms,
            heartbeat_timeout_ms,
            spin_us,
        } => run_master(
            &listen,
            hello_timeout_ms,
            max_peers,
            heartbeat_interval_ms,
            heartbeat_timeout_ms,
            spin_us,
        ),
        Command::Bench(args) => bench::run(args),
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

fn run_master(
    listen: &str,
    hello_timeout_ms: u64,
    max_peers: usize,
    heartbeat_interval_ms: u64,
    heartbeat_timeout_ms: u64,
    spin_us: Option<u64>,
) -> Result<(), String> {
    if heartbeat_interval_ms == 0 || heartbeat_timeout_ms < heartbeat_interval_ms {
        return Err(
            "the heartbeat interval must be positive and at most the heartbeat timeout".into(),
        );
    }
    let addr = concord_transport::socket::resolve(listen).map_err(|e| e.to_string())?;
    let mut config = concord_master::coordinator::CoordinatorConfig::default();
    config.hello_timeout = std::time::Duration::from_millis(hello_timeout_ms);
    config.max_peers = max_peers;
    config.heartbeat_interval = std::time::Duration::from_millis(heartbeat_interval_ms);
    config.heartbeat_timeout = std::time::Duration::from_millis(heartbeat_timeout_ms);
    let mut server =
        concord_master::server::Server::bind(addr, config).map_err(|e| e.to_string())?;
    if let Some(us) = spin_us {
        server = server.with_spin(std::time::Duration::from_micros(us));
    }
    eprintln!("concord master listening on {}", server.local_addr());
    server.run(None, || false).map_err(|e| e.to_string())
}
