//! The flags of `concord bench` (the short ones are those of nccl-tests) and their checks.

use std::path::PathBuf;
use std::time::Duration;

use concord::{DType, ReduceOp};

use crate::sizes::parse_size;

/// Options of `concord bench` (the short flags are those of nccl-tests).
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct BenchArgs {
    /// Collective to time, by nccl-tests' names: all_reduce, broadcast, reduce, all_gather,
    /// reduce_scatter (and barrier, which moves nothing). Sizes are the whole buffer as
    /// nccl-tests counts it (an all-gather's output, a reduce-scatter's input).
    #[arg(long = "coll", default_value = "all_reduce", value_parser = parse_coll)]
    pub(crate) coll: concord::CollKind,
    /// Root rank of a broadcast or reduce.
    #[arg(short = 'r', long = "root", default_value_t = 0)]
    pub(crate) root: usize,
    /// Smallest size in bytes (K/M/G suffixes are powers of 1024).
    #[arg(short = 'b', long = "minbytes", default_value = "64K", value_parser = parse_size)]
    pub(crate) minbytes: usize,
    /// Largest size in bytes.
    #[arg(short = 'e', long = "maxbytes", default_value = "64M", value_parser = parse_size)]
    pub(crate) maxbytes: usize,
    /// Multiply the size by this factor between rows.
    #[arg(short = 'f', long = "stepfactor", default_value_t = 4)]
    pub(crate) stepfactor: usize,
    /// Timed iterations per size.
    #[arg(short = 'n', long = "iters", default_value_t = 20)]
    pub(crate) iters: usize,
    /// Warm-up iterations per size (not timed).
    #[arg(short = 'w', long = "warmup_iters", default_value_t = 5)]
    pub(crate) warmup: usize,
    /// Check every timed iteration against a reference (1) or not (0).
    #[arg(short = 'c', long = "check", default_value_t = 1)]
    pub(crate) check: u8,
    /// Reduction: sum, prod, min, max, avg.
    #[arg(short = 'o', long = "op", default_value = "sum")]
    pub(crate) op: ReduceOp,
    /// Element type: float, half, bfloat16, double, int8..int64, uint8..uint64.
    #[arg(short = 'd', long = "datatype", default_value = "float")]
    pub(crate) dtype: DType,
    /// Reduce in place instead of out of place.
    #[arg(long)]
    pub(crate) in_place: bool,
    /// Collectives in flight per iteration, each of the row's size, launched async and in place
    /// (so `-m 16 -b 4M` compares with `-m 1 -b 64M`); busbw is their aggregate. Without `-m`,
    /// one blocking collective per iteration.
    #[arg(short = 'm', long = "ops")]
    pub(crate) ops: Option<usize>,
    /// Deadline of each operation, in seconds; with --master it also bounds the wait to be
    /// admitted to the group and the wait for --world peers.
    #[arg(short = 'T', long = "timeout", default_value_t = 120)]
    pub(crate) timeout_s: u64,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
    /// Start an embedded master and this many peer processes on loopback.
    #[arg(long, conflicts_with_all = ["master", "world"])]
    pub(crate) local: Option<usize>,
    /// This process is one peer of the master at ADDR (host:port).
    #[arg(long, requires = "world")]
    pub(crate) master: Option<String>,
    /// With --master: the file holding the run token the master was given (default:
    /// CONCORD_TOKEN). --local makes a fresh token for its master and peers itself.
    #[arg(long, value_name = "PATH", requires = "master")]
    pub(crate) token_file: Option<PathBuf>,
    /// With --master: wait until this many peers are in the group.
    #[arg(long)]
    pub(crate) world: Option<usize>,
    /// Keep going through joins, kills and stalls: each iteration admits pending peers, runs
    /// `-m` all-reduces of `-b` bytes (f32 sum) with retry, checks them, and prints one JSON line.
    /// Needs --master; --world is the group size to wait for before the first iteration.
    #[arg(long, requires = "master")]
    pub(crate) elastic: bool,
    /// Measure shared-state sync instead: rank 0 changes `-e` bytes of state (in 8 MiB
    /// entries) every iteration and the other peers (receive-only) pull it; compared with the
    /// all-reduce busbw of the same bytes, measured in the same run.
    #[arg(long)]
    pub(crate) state: bool,
    /// Measure the directed edges between the peers first (`optimize_topology`): print the
    /// bandwidth and round-trip matrices, the ring in id order and the ring chosen, each with
    /// its predicted busbw; the rows that follow run on the chosen ring.
    #[arg(long)]
    pub(crate) topology: bool,
    /// As --topology, without the rows.
    #[arg(long)]
    pub(crate) topology_only: bool,
    /// Most bytes one edge's probe sends (with --topology).
    #[arg(long, default_value = "16M", value_parser = parse_size)]
    pub(crate) probe_bytes: usize,
    /// Data-plane transport: auto (shared memory with peers on this host, io_uring to others
    /// where allowed, else sockets), shm (as auto, but shared memory that fails on one host is
    /// an error), uring or socket (never shared memory). Default: CONCORD_TRANSPORT, else auto.
    #[arg(long)]
    pub(crate) transport: Option<concord::BackendChoice>,
    /// Connections per ring neighbour (sub-chunks go to whichever is free).
    #[arg(long, default_value_t = 2)]
    pub(crate) conns: usize,
    /// The interface whose address the data plane uses: `eth0`, a prefix, `eth0,ib0`, `=eth0`,
    /// `^docker,lo` (default: CONCORD_SOCKET_IFNAME, else every interface).
    #[arg(long)]
    pub(crate) ifname: Option<String>,
    /// The IP the ring dials for this peer, behind NAT (default: CONCORD_ADVERTISE, else the
    /// chosen interface's, else the address the master sees).
    #[arg(long)]
    pub(crate) advertise: Option<String>,
    /// Ports the data listener may take, `lo-hi` (default: CONCORD_DATA_PORTS, else any).
    #[arg(long)]
    pub(crate) data_ports: Option<String>,
    /// Sub-chunk size (the unit of pipelining).
    #[arg(long, default_value = "512K", value_parser = parse_size)]
    pub(crate) sub_chunk: usize,
    /// Ring bytes of each shared-memory connection a peer receives on (256K to 1G; default:
    /// room for four sub-chunks).
    #[arg(long, value_parser = parse_size)]
    pub(crate) shm_ring: Option<usize>,
    /// How long small collectives poll before blocking, in microseconds (peers and, with
    /// `--local`, the embedded master; 0: never poll). Default: CONCORD_SPIN_US, else 100.
    #[arg(long)]
    pub(crate) spin_us: Option<u64>,
    /// SO_SNDBUF/SO_RCVBUF of data sockets, in bytes (default: kernel autotuning).
    #[arg(long, value_parser = parse_size)]
    pub(crate) socket_buffer: Option<usize>,
    /// Where the buffers live: `cpu` (host memory) or `cuda` (GPU memory, reduced on the GPU;
    /// several peer processes may share one GPU). (`emulated` runs the device pipeline on a
    /// host-memory stand-in for a GPU: for tests, its figures mean nothing.)
    #[arg(long, default_value = "cpu")]
    pub(crate) device: BenchDevice,
    /// With `--device cuda`: the GPU's ordinal. Default: the launcher's local rank
    /// (`LOCAL_RANK`, else `SLURM_LOCALID`) modulo the GPUs present, else 0.
    #[arg(long)]
    pub(crate) cuda_device: Option<usize>,
    /// With `--local`: `auto` runs each peer process on CPUs of its own (contiguous slices of
    /// this process's CPUs) where there are at least as many CPUs as peers, and lets its data
    /// threads use every CPU while a collective over 4 MiB is in flight; `strict` keeps them on
    /// the peer's own CPUs always; `none` leaves everything to the scheduler. On a host of two
    /// CPUs, binding 2 peers keeps the scheduler from putting both peers' hot threads on one
    /// CPU, which doubles the time of small collectives; large ones need the kernel's TCP work
    /// spread. Default: auto.
    #[arg(long)]
    pub(crate) cpu_bind: Option<CpuBind>,
}

/// `--data-ports lo-hi`.
pub(crate) fn parse_ports(text: &str) -> Result<(u16, u16), String> {
    let (lo, hi) = text.split_once('-').unwrap_or((text, text));
    match (lo.trim().parse::<u16>(), hi.trim().parse::<u16>()) {
        (Ok(lo), Ok(hi)) if lo > 0 && lo <= hi => Ok((lo, hi)),
        _ => Err(format!(
            "--data-ports {text:?}: give a port range like 40000-40100 (1 to 65535, low first)"
        )),
    }
}

fn parse_coll(s: &str) -> Result<concord::CollKind, String> {
    concord::CollKind::from_name(s).ok_or_else(|| {
        let names: Vec<&str> = concord::CollKind::ALL.iter().map(|k| k.name()).collect();
        format!("unknown collective {s:?}: give one of {}", names.join(", "))
    })
}

/// How `concord bench --local` places its peer processes on CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CpuBind {
    Auto,
    Strict,
    None,
}

impl std::str::FromStr for CpuBind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(CpuBind::Auto),
            "strict" => Ok(CpuBind::Strict),
            "none" => Ok(CpuBind::None),
            other => Err(format!(
                "unknown --cpu-bind {other:?}: give auto, strict or none"
            )),
        }
    }
}

/// Where `concord bench` keeps its buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BenchDevice {
    Cpu,
    Cuda,
    Emulated,
}

impl std::str::FromStr for BenchDevice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" | "host" => Ok(BenchDevice::Cpu),
            "cuda" | "gpu" => Ok(BenchDevice::Cuda),
            "emulated" => Ok(BenchDevice::Emulated),
            other => Err(format!("unknown device {other:?}: give cpu or cuda")),
        }
    }
}

impl BenchArgs {
    /// The polling window: `--spin-us`, else `CONCORD_SPIN_US`, else the default.
    pub(crate) fn spin(&self) -> Duration {
        self.spin_us.map_or_else(
            concord_transport::spin::spin_from_env,
            Duration::from_micros,
        )
    }

    pub(super) fn validate(&self) -> Result<(), String> {
        if self.local.is_none() && self.master.is_none() && self.launched()?.is_none() {
            return Err(
                "give --local N (embedded master and N peers), --master ADDR --world N, or run \
                 under a launcher (torchrun, srun, mpirun; or CONCORD_RANK, CONCORD_WORLD_SIZE \
                 and CONCORD_MASTER)"
                    .into(),
            );
        }
        if let Some(n) = self.local {
            if !(1..=64).contains(&n) {
                return Err(format!("--local {n}: give 1 to 64 peers"));
            }
        }
        if self.cpu_bind.is_some() && self.local.is_none() {
            return Err(
                "--cpu-bind places the processes --local starts; bind a --master peer with `taskset` or `srun --cpu-bind`".into(),
            );
        }
        if self.world == Some(0) {
            return Err("--world 0: a group needs at least one peer".into());
        }
        if self.minbytes > self.maxbytes {
            return Err(format!(
                "-b {} is larger than -e {}",
                self.minbytes, self.maxbytes
            ));
        }
        if self.stepfactor < 2 && self.minbytes != self.maxbytes {
            return Err(format!(
                "-f {}: the step factor must be at least 2 (or give -b equal to -e)",
                self.stepfactor
            ));
        }
        if self.iters == 0 {
            return Err("-n 0: give at least one timed iteration".into());
        }
        if self.check > 1 {
            return Err(format!(
                "-c {}: give 0 (no check) or 1 (check every iteration)",
                self.check
            ));
        }
        if self.maxbytes > (16usize << 30) {
            return Err(format!("-e {}: at most 16G", self.maxbytes));
        }
        if let Some(m) = self.ops.filter(|m| !(1..=1024).contains(m)) {
            return Err(format!("-m {m}: give 1 to 1024 collectives in flight"));
        }
        if self.timeout_s == 0 {
            return Err("-T 0: the deadline must be at least one second".into());
        }
        if let Some(r) = &self.data_ports {
            parse_ports(r)?;
        }
        if self.root != 0 && !self.coll.has_root() {
            return Err(format!(
                "-r {}: {} has no root; -r applies to broadcast and reduce",
                self.root, self.coll
            ));
        }
        if let Some(n) = self.local.filter(|&n| self.root >= n) {
            return Err(format!(
                "-r {}: the root must be a rank of the {n} peers (0..{n})",
                self.root
            ));
        }
        if let Some(n) = self.world.filter(|&n| self.root >= n) {
            return Err(format!(
                "-r {}: the root must be a rank of the {n} peers (0..{n})",
                self.root
            ));
        }
        if self.coll != concord::CollKind::AllReduce
            && (self.device != BenchDevice::Cpu || self.state)
        {
            return Err(format!(
                "--coll {}: device buffers and --state measure all_reduce; drop --device / --state or give --coll all_reduce",
                self.coll
            ));
        }
        if self.device != BenchDevice::Cpu && (self.state || self.elastic || self.ops.is_some()) {
            return Err(
                "--device cuda measures blocking all-reduces: drop --state, --elastic and -m"
                    .into(),
            );
        }
        self.refuse_flags_without_effect()?;
        if self.device == BenchDevice::Cuda {
            if let Err(why) = concord::cuda_status() {
                return Err(format!(
                    "--device cuda: CUDA is not available here: {why} (run without --device \
                     cuda for host buffers)"
                ));
            }
        }
        Ok(())
    }

    /// Refuses a flag that would silently do nothing: one that applies only with another flag,
    /// or one that the chosen kind of run (`--state`, `--elastic`) does not read.
    fn refuse_flags_without_effect(&self) -> Result<(), String> {
        if self.elastic && self.local.is_some() {
            return Err(
                "--elastic runs one peer of a group whose master runs elsewhere; --local \
                 does not start elastic peers: start `concord master` and one `concord bench \
                 --master ADDR --world N --elastic` per peer"
                    .into(),
            );
        }
        if self.elastic && self.state {
            return Err("--elastic and --state are two different runs: give one of them".into());
        }
        if self.socket_buffer == Some(0) {
            return Err(
                "--socket-buffer 0: give a buffer size in bytes (K/M suffixes), or leave \
                 the flag out for the kernel's autotuning"
                    .into(),
            );
        }
        if self.cuda_device.is_some() && self.device != BenchDevice::Cuda {
            return Err(
                "--cuda-device picks the GPU of --device cuda: add --device cuda, or drop \
                 --cuda-device"
                    .into(),
            );
        }
        let (mode, what) = match (self.state, self.elastic) {
            (true, _) => (
                "--state",
                "it syncs f32 entries and times f32 sums, on a communicator with the default \
                 connection settings, and prints one line",
            ),
            (false, true) => (
                "--elastic",
                "it runs f32 sums on a communicator with the default transport and socket \
                 settings, and prints JSON lines to stdout",
            ),
            (false, false) => return Ok(()),
        };
        let defaults = Self::defaults();
        let mut ignored = vec![
            ("--json", self.json.is_some()),
            ("--in-place", self.in_place),
            ("--transport", self.transport.is_some()),
            ("--socket-buffer", self.socket_buffer.is_some()),
            ("--spin-us", self.spin_us.is_some()),
            ("-d", self.dtype != defaults.dtype),
            ("-o", self.op != defaults.op),
        ];
        if self.state {
            ignored.extend([
                ("-m", self.ops.is_some()),
                ("--conns", self.conns != defaults.conns),
                ("--sub-chunk", self.sub_chunk != defaults.sub_chunk),
            ]);
        }
        match ignored.into_iter().find(|(_, given)| *given) {
            Some((flag, _)) => Err(format!(
                "{flag} does nothing with {mode} ({what}): drop {flag}"
            )),
            None => Ok(()),
        }
    }

    /// The flags' defaults (what an empty command line gives).
    fn defaults() -> Self {
        #[derive(clap::Parser)]
        struct Bare {
            #[command(flatten)]
            args: BenchArgs,
        }
        <Bare as clap::Parser>::try_parse_from(["bench"])
            .expect("every flag has a default or is optional")
            .args
    }

    /// The launcher's group when neither `--local` nor `--master` is given and a launcher's
    /// variables are set.
    pub(crate) fn launched(&self) -> Result<Option<concord::launch::env::LaunchEnv>, String> {
        if self.local.is_some() || self.master.is_some() {
            return Ok(None);
        }
        concord::launch::env::detect(&|k| std::env::var(k).ok()).map_err(|e| e.to_string())
    }

    /// Collectives per iteration.
    pub(crate) fn ops_in_flight(&self) -> usize {
        self.ops.unwrap_or(1)
    }

    pub(super) fn sizes(&self) -> Vec<usize> {
        let mut sizes = vec![self.minbytes];
        while let Some(&last) = sizes.last() {
            let next = last.saturating_mul(self.stepfactor.max(2)).max(last + 1);
            if next > self.maxbytes || self.minbytes == self.maxbytes {
                break;
            }
            sizes.push(next);
        }
        sizes
    }

    /// The flags a `--local` child gets (everything but the launch mode).
    /// `builder` with the token of `--token-file`, if given (else the builder reads
    /// `CONCORD_TOKEN`), and `--ifname`, `--advertise` and `--data-ports`.
    pub(crate) fn with_token(
        &self,
        mut builder: concord::CommunicatorBuilder,
    ) -> Result<concord::CommunicatorBuilder, String> {
        if let Some(i) = &self.ifname {
            builder = builder.socket_ifname(i.clone());
        }
        if let Some(a) = &self.advertise {
            builder = builder.advertise_ip(a.clone());
        }
        if let Some(r) = &self.data_ports {
            let (lo, hi) = parse_ports(r)?;
            builder = builder.data_port_range(lo, hi);
        }
        match &self.token_file {
            Some(path) => {
                Ok(builder.token(concord::RunToken::from_file(path).map_err(|e| e.to_string())?))
            }
            None => Ok(builder),
        }
    }

    pub(super) fn child_args(&self, master: &str, world: usize) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "bench".into(),
            "--master".into(),
            master.into(),
            "--world".into(),
            world.to_string(),
            "--coll".into(),
            self.coll.name().into(),
            "-r".into(),
            self.root.to_string(),
        ];
        for (flag, v) in [
            ("-b", self.minbytes.to_string()),
            ("-e", self.maxbytes.to_string()),
            ("-f", self.stepfactor.to_string()),
            ("-n", self.iters.to_string()),
            ("-w", self.warmup.to_string()),
            ("-c", self.check.to_string()),
            ("-o", self.op.name().to_string()),
            ("-d", self.dtype.name().to_string()),
            ("-T", self.timeout_s.to_string()),
            ("--conns", self.conns.to_string()),
            ("--sub-chunk", self.sub_chunk.to_string()),
        ] {
            a.push(flag.into());
            a.push(v);
        }
        if let Some(ring) = self.shm_ring {
            a.push("--shm-ring".into());
            a.push(ring.to_string());
        }
        // Given only when given: the children inherit CONCORD_SPIN_US, and a --state child
        // refuses --spin-us.
        if let Some(us) = self.spin_us {
            a.extend(["--spin-us".into(), us.to_string()]);
        }
        if let Some(m) = self.ops {
            a.push("-m".into());
            a.push(m.to_string());
        }
        if self.in_place {
            a.push("--in-place".into());
        }
        if self.device == BenchDevice::Emulated {
            a.extend(["--device".into(), "emulated".into()]);
        }
        if self.device == BenchDevice::Cuda {
            a.extend(["--device".into(), "cuda".into()]);
            if let Some(d) = self.cuda_device {
                a.extend(["--cuda-device".into(), d.to_string()]);
            }
        }
        if self.state {
            a.push("--state".into());
        }
        if self.topology {
            a.push("--topology".into());
        }
        if self.topology_only {
            a.push("--topology-only".into());
        }
        a.push("--probe-bytes".into());
        a.push(self.probe_bytes.to_string());
        if let Some(t) = self.transport {
            a.push("--transport".into());
            a.push(
                match t {
                    concord::BackendChoice::Uring => "uring",
                    concord::BackendChoice::Socket => "socket",
                    concord::BackendChoice::Shm => "shm",
                    concord::BackendChoice::Auto => "auto",
                }
                .into(),
            );
        }
        if let Some(j) = &self.json {
            a.push("--json".into());
            a.push(j.display().to_string());
        }
        if let Some(b) = self.socket_buffer {
            a.push("--socket-buffer".into());
            a.push(b.to_string());
        }
        a
    }
}
