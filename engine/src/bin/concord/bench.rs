//! `concord bench`: all-reduce bandwidth, following nccl-tests (sizes, iterations, table, busbw).

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use concord::{Communicator, DType, ReduceOp};

use crate::sizes::parse_size;
use concord::verify as check;

/// Options of `concord bench` (the short flags are those of nccl-tests).
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct BenchArgs {
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
    /// Deadline of each operation, in seconds.
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
    /// With --master: wait until this many peers are in the group.
    #[arg(long)]
    pub(crate) world: Option<usize>,
    /// Keep going through joins, kills and stalls: each iteration admits pending peers, runs
    /// `-m` all-reduces of `-b` bytes (f32 sum) with retry, checks them, and prints one JSON line.
    /// Needs --master; --world is the group size to wait for before the first iteration.
    #[arg(long, requires = "master")]
    pub(crate) elastic: bool,
    /// Measure shared-state sync instead: rank 0 changes `-b` bytes of state (in 8 MiB
    /// entries) every iteration and the other peers (receive-only) pull it; compared with the
    /// all-reduce busbw of the same bytes, measured in the same run.
    #[arg(long)]
    pub(crate) state: bool,
    /// Data-plane backend: auto (io_uring where allowed, else sockets), uring or socket.
    /// Default: CONCORD_TRANSPORT, else auto.
    #[arg(long)]
    pub(crate) transport: Option<concord::BackendChoice>,
    /// Connections per ring neighbour (sub-chunks go to whichever is free).
    #[arg(long, default_value_t = 2)]
    pub(crate) conns: usize,
    /// Sub-chunk size (the unit of pipelining).
    #[arg(long, default_value = "512K", value_parser = parse_size)]
    pub(crate) sub_chunk: usize,
    /// How long small collectives poll before blocking, in microseconds (peers and, with
    /// `--local`, the embedded master; 0: never poll). Default: CONCORD_SPIN_US, else 100.
    #[arg(long)]
    pub(crate) spin_us: Option<u64>,
    /// SO_SNDBUF/SO_RCVBUF of data sockets (default: kernel autotuning).
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
    /// this process's CPUs) where there are at least as many CPUs as peers, `none` leaves them
    /// to the scheduler. On the 2-vCPU development VM, binding 2 peers halves the time of small
    /// collectives in the runs where the scheduler would put both on one CPU. Default: auto.
    #[arg(long)]
    pub(crate) cpu_bind: Option<CpuBind>,
}

/// How `concord bench --local` places its peer processes on CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CpuBind {
    Auto,
    None,
}

impl std::str::FromStr for CpuBind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(CpuBind::Auto),
            "none" => Ok(CpuBind::None),
            other => Err(format!("unknown --cpu-bind {other:?}: give auto or none")),
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
    fn spin(&self) -> Duration {
        self.spin_us.map_or_else(
            concord_transport::spin::spin_from_env,
            Duration::from_micros,
        )
    }

    fn validate(&self) -> Result<(), String> {
        if self.local.is_none() && self.master.is_none() {
            return Err(
                "give --local N (embedded master and N peers) or --master ADDR --world N".into(),
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
        if self.device != BenchDevice::Cpu && (self.state || self.elastic || self.ops.is_some()) {
            return Err(
                "--device cuda measures blocking all-reduces: drop --state, --elastic and -m"
                    .into(),
            );
        }
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

    /// Collectives per iteration.
    pub(crate) fn ops_in_flight(&self) -> usize {
        self.ops.unwrap_or(1)
    }

    fn sizes(&self) -> Vec<usize> {
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
    fn child_args(&self, master: &str, world: usize) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "bench".into(),
            "--master".into(),
            master.into(),
            "--world".into(),
            world.to_string(),
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
            ("--spin-us", self.spin().as_micros().to_string()),
        ] {
            a.push(flag.into());
            a.push(v);
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
        if let Some(t) = self.transport {
            a.push("--transport".into());
            a.push(
                match t {
                    concord::BackendChoice::Uring => "uring",
                    concord::BackendChoice::Socket => "socket",
                    _ => "auto",
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

pub(crate) fn run(args: BenchArgs) -> Result<(), String> {
    args.validate()?;
    match (args.local, args.elastic) {
        (Some(n), _) => run_local(&args, n),
        (None, true) => crate::elastic::run(&args),
        (None, false) if args.state => crate::state::run(&args),
        (None, false) => run_peer(&args),
    }
}

/// Embedded master on a thread, `n` peer processes, their exit codes collected.
fn run_local(args: &BenchArgs, n: usize) -> Result<(), String> {
    let config = concord_master::coordinator::CoordinatorConfig::default();
    let server =
        concord_master::server::Server::bind("127.0.0.1:0".parse().expect("valid"), config)
            .map_err(|e| e.to_string())?
            .with_spin(args.spin());
    let addr = server.local_addr().to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let stop_master = Arc::clone(&stop);
    let master = std::thread::Builder::new()
        .name("concord-master".into())
        .spawn(move || {
            server.run(Some(Duration::from_millis(100)), || {
                stop_master.load(Ordering::Relaxed)
            })
        })
        .map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| format!("finding the concord binary: {e}"))?;
    let binding = local_binding(args.cpu_bind.unwrap_or(CpuBind::Auto), n);
    let mut children: Vec<Child> = Vec::with_capacity(n);
    for i in 0..n {
        let mut cmd = Command::new(&exe);
        cmd.args(args.child_args(&addr, n));
        if let Some(sets) = &binding {
            concord::affinity::bind_command(&mut cmd, &sets[i])
                .map_err(|e| format!("binding a peer process to CPUs: {e}"))?;
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("starting a peer process: {e}"))?;
        children.push(child);
    }
    let mut failure = None;
    let mut running: Vec<Option<Child>> = children.into_iter().map(Some).collect();
    while running.iter().any(Option::is_some) {
        for slot in running.iter_mut() {
            let Some(child) = slot else { continue };
            match child.try_wait() {
                Ok(Some(status)) => {
                    if !status.success() && failure.is_none() {
                        failure = Some(format!("a peer process exited with {status}"));
                    }
                    *slot = None;
                }
                Ok(None) => {}
                Err(e) => failure = Some(e.to_string()),
            }
        }
        if failure.is_some() {
            // One peer failed: the others would only wait for their deadline.
            for child in running.iter_mut().flatten() {
                let _ = child.kill();
                let _ = child.wait();
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    let _ = master.join();
    failure.map_or(Ok(()), Err)
}

/// The CPU sets of `--local`'s `n` peer processes, or `None` (unbound); says which on stdout.
fn local_binding(bind: CpuBind, n: usize) -> Option<Vec<Vec<usize>>> {
    if bind == CpuBind::None {
        println!("# cpu binding: none (--cpu-bind none)");
        return None;
    }
    let allowed = match concord::affinity::allowed_cpus() {
        Ok(cpus) => cpus,
        Err(e) => {
            println!("# cpu binding: none (cannot read this process's CPUs: {e})");
            return None;
        }
    };
    match concord::affinity::plan(n, &allowed) {
        Some(sets) => {
            let list: Vec<String> = sets
                .iter()
                .map(|s| concord::affinity::format_cpus(s))
                .collect();
            println!(
                "# cpu binding: peer processes on CPUs {} (--cpu-bind none to turn off)",
                list.join(" | ")
            );
            Some(sets)
        }
        None => {
            println!(
                "# cpu binding: none ({n} peers on {} CPUs would share them)",
                allowed.len()
            );
            None
        }
    }
}

#[derive(Debug, serde::Serialize)]
struct Row {
    size_bytes: usize,
    count: usize,
    pub(crate) dtype: &'static str,
    pub(crate) op: &'static str,
    time_us: f64,
    p10_us: f64,
    p90_us: f64,
    algbw_gbps: f64,
    busbw_gbps: f64,
    wrong: u64,
    /// CPU seconds (user + system, all peer processes) per GB of buffer reduced.
    cpu_s_per_gb: f64,
}

fn run_peer(args: &BenchArgs) -> Result<(), String> {
    let master = args.master.as_deref().expect("validated");
    let world = args.world.expect("validated");
    let timeout = Duration::from_secs(args.timeout_s);
    let mut comm = Communicator::builder(master)
        .op_timeout(timeout)
        .conns_per_neighbour(args.conns)
        .sub_chunk_bytes(args.sub_chunk)
        .spin(args.spin())
        .socket_buffer_bytes(args.socket_buffer)
        .transport(match args.transport {
            Some(t) => t,
            None => concord::BackendChoice::from_env_or(concord::BackendChoice::Auto)?,
        })
        .connect()
        .map_err(|e| e.to_string())?;
    comm.wait_for_world(world, timeout)
        .map_err(|e| e.to_string())?;
    if comm.world_size() != world {
        return Err(format!(
            "{} peers joined, more than --world {world}",
            comm.world_size()
        ));
    }
    let leader = comm.rank() == 0;
    let (dtype, op) = (args.dtype, args.op);
    let esize = dtype.size_bytes();
    let mut out = std::io::stdout().lock();
    if leader {
        print_banner(&mut out, args, world, comm.transport());
    }
    let max_bytes = args.maxbytes / esize * esize;
    let mut src = vec![0u8; max_bytes];
    let mut dst = vec![0u8; max_bytes];
    let mut want = if args.check == 1 {
        vec![0u8; max_bytes]
    } else {
        Vec::new()
    };
    let mut tag = 0u64;
    let mut rows = Vec::new();
    let mut pool: Vec<Vec<u8>> = Vec::new();
    let cuda = match args.device {
        BenchDevice::Cuda => Some(crate::device::open(args.cuda_device)?),
        BenchDevice::Cpu | BenchDevice::Emulated => None,
    };
    if leader && args.device == BenchDevice::Emulated {
        let _ = writeln!(
            out,
            "# device buffers: EMULATED (host memory standing in for a GPU; a test of the device \
             pipeline, not a measurement)"
        );
    }
    if let (true, Some(ctx)) = (leader, &cuda) {
        let _ = writeln!(out, "# device buffers: {}", crate::device::describe(ctx));
    }
    for (size_index, &size) in args.sizes().iter().enumerate() {
        let count = size / esize;
        let bytes = count * esize;
        let mut gpu = cuda
            .as_ref()
            .map(|ctx| crate::device::Buffers::new(ctx, bytes))
            .transpose()?;
        let mut times = Vec::with_capacity(args.iters);
        let mut cpu_s = 0.0;
        let mut wrong = 0u64;
        let mut stages = crate::device::StageSums::default();
        for it in 0..args.warmup + args.iters {
            let iter_id = ((size_index as u64) << 32) | it as u64;
            let timed = it >= args.warmup;
            let checked = timed && args.check == 1;
            // CPU time of the collective only (filling, resetting and checking are not counted).
            let cpu_used: f64;
            let elapsed = if let Some(gpu) = &mut gpu {
                let (src, dst) = (&mut src[..bytes], &mut dst[..bytes]);
                if checked || it == 0 {
                    check::fill(dtype, op, comm.rank(), iter_id, src);
                    dst.fill(0xA5); // A stale result must not pass the check.
                    gpu.upload(src, dst)?;
                }
                if args.in_place {
                    gpu.copy_src_to_dst()?;
                }
                tag += 1;
                let cpu0 = cpu_seconds();
                let start = Instant::now();
                let r = gpu.all_reduce(&comm, args.in_place, dtype, op, tag);
                let elapsed = start.elapsed();
                cpu_used = cpu_seconds() - cpu0;
                let info =
                    r.map_err(|e| format!("all-reduce of {bytes} bytes in device memory: {e}"))?;
                if timed {
                    stages.add(elapsed, info.device);
                }
                if checked {
                    gpu.download(dst)?;
                    check::reference(dtype, op, world, iter_id, &mut want[..bytes]);
                    wrong += check::count_wrong(dtype, dst, &want[..bytes]);
                }
                elapsed
            } else if args.ops.is_some() {
                let (t, w, c) = iterate_async(
                    &mut comm, args, &mut pool, bytes, iter_id, checked, &mut tag,
                )?;
                wrong += w;
                cpu_used = c;
                t
            } else {
                let (src, dst) = (&mut src[..bytes], &mut dst[..bytes]);
                if checked || it == 0 {
                    check::fill(dtype, op, comm.rank(), iter_id, src);
                    dst.fill(0xA5); // A stale result must not pass the check.
                }
                if args.in_place {
                    dst.copy_from_slice(src);
                }
                tag += 1;
                let cpu0 = cpu_seconds();
                let start = Instant::now();
                let emulated = args.device == BenchDevice::Emulated;
                let r = match (args.in_place, emulated) {
                    (true, false) => comm.all_reduce_raw(None, dst, dtype, op, tag, None),
                    (false, false) => comm.all_reduce_raw(Some(src), dst, dtype, op, tag, None),
                    (true, true) => comm.all_reduce_emulated_device(None, dst, dtype, op, tag),
                    (false, true) => {
                        comm.all_reduce_emulated_device(Some(src), dst, dtype, op, tag)
                    }
                };
                let elapsed = start.elapsed();
                cpu_used = cpu_seconds() - cpu0;
                let info = r.map_err(|e| format!("all-reduce of {bytes} bytes: {e}"))?;
                if timed && emulated {
                    stages.add(elapsed, info.device);
                }
                if checked {
                    check::reference(dtype, op, world, iter_id, &mut want[..bytes]);
                    wrong += check::count_wrong(dtype, dst, &want[..bytes]);
                }
                elapsed
            };
            if timed {
                times.push(elapsed.as_secs_f64() * 1e6);
                cpu_s += cpu_used;
            }
        }
        times.sort_by(f64::total_cmp);
        let pick = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
        // Every peer's median, p10, p90: the slowest peer sets the figure.
        let mut stats = [pick(0.5), pick(0.1), pick(0.9)];
        tag += 1;
        comm.all_reduce_in_place(&mut stats, ReduceOp::Max, tag)
            .map_err(|e| e.to_string())?;
        let mut cpu_all = [cpu_s];
        tag += 1;
        comm.all_reduce_in_place(&mut cpu_all, ReduceOp::Sum, tag)
            .map_err(|e| e.to_string())?;
        let mut wrong_all = [wrong];
        tag += 1;
        comm.all_reduce_in_place(&mut wrong_all, ReduceOp::Sum, tag)
            .map_err(|e| e.to_string())?;
        let moved = bytes * args.ops_in_flight();
        let algbw = if stats[0] > 0.0 {
            moved as f64 / (stats[0] * 1e-6) / 1e9
        } else {
            0.0
        };
        let busbw = algbw * 2.0 * (world as f64 - 1.0) / world as f64;
        let row = Row {
            size_bytes: bytes,
            count,
            dtype: dtype.name(),
            op: op.name(),
            time_us: stats[0],
            p10_us: stats[1],
            p90_us: stats[2],
            algbw_gbps: algbw,
            busbw_gbps: busbw,
            wrong: if args.check == 1 { wrong_all[0] } else { 0 },
            cpu_s_per_gb: cpu_all[0] / (moved as f64 * args.iters as f64 / 1e9).max(1e-12),
        };
        if leader {
            let wrong_col = if args.check == 1 {
                row.wrong.to_string()
            } else {
                "N/A".into()
            };
            let _ = writeln!(
                out,
                "{:>12} {:>12} {:>8} {:>6} {:>10.1} {:>8.3} {:>8.3} {:>7} {:>9.1} {:>9.1} {:>9.3}",
                row.size_bytes,
                row.count,
                row.dtype,
                row.op,
                row.time_us,
                row.algbw_gbps,
                row.busbw_gbps,
                wrong_col,
                row.p10_us,
                row.p90_us,
                row.cpu_s_per_gb
            );
            let _ = out.flush();
        }
        if leader && args.device != BenchDevice::Cpu {
            let _ = writeln!(out, "{}", stages.line());
            let _ = out.flush();
        }
        rows.push(row);
    }
    let total_wrong: u64 = rows.iter().map(|r| r.wrong).sum();
    let avg_busbw = rows.iter().map(|r| r.busbw_gbps).sum::<f64>() / rows.len().max(1) as f64;
    if leader {
        let _ = writeln!(
            out,
            "# Out of bounds values : {total_wrong} {}",
            if total_wrong == 0 { "OK" } else { "FAILED" }
        );
        let _ = writeln!(out, "# Avg bus bandwidth    : {avg_busbw:.3}");
        let _ = writeln!(out, "#");
        if let Some(path) = &args.json {
            write_json(path, args, world, comm.transport(), &rows, avg_busbw)?;
        }
    }
    if total_wrong > 0 {
        return Err(format!("{total_wrong} wrong elements"));
    }
    Ok(())
}

fn print_banner(
    out: &mut impl Write,
    args: &BenchArgs,
    world: usize,
    transport: concord::BackendKind,
) {
    let _ = writeln!(
        out,
        "# concord bench {}: all_reduce, {world} peers, {} {}, {}, kernels {}, transport {transport}, {} conn(s)/neighbour, sub-chunk {} B, polling {} us",
        env!("CARGO_PKG_VERSION"),
        args.dtype,
        args.op,
        if args.in_place { "in-place" } else { "out-of-place" },
        concord_kernels::cpu_path(),
        args.conns,
        args.sub_chunk,
        args.spin().as_micros(),
    );
    let _ = writeln!(
        out,
        "# time: median over {} iterations ({} warm-up) of the slowest peer; p10/p90 its spread",
        args.iters, args.warmup
    );
    let _ = writeln!(
        out,
        "# {:>10} {:>12} {:>8} {:>6} {:>10} {:>8} {:>8} {:>7} {:>9} {:>9} {:>9}",
        "size(B)",
        "count",
        "type",
        "redop",
        "time(us)",
        "algbw",
        "busbw",
        "#wrong",
        "p10(us)",
        "p90(us)",
        "cpu(s/GB)"
    );
    let _ = writeln!(
        out,
        "# {:>10} {:>12} {:>8} {:>6} {:>10} {:>8} {:>8} {:>7}",
        "", "(elements)", "", "", "", "(GB/s)", "(GB/s)", ""
    );
}

fn write_json(
    path: &PathBuf,
    args: &BenchArgs,
    world: usize,
    transport: concord::BackendKind,
    rows: &[Row],
    avg_busbw: f64,
) -> Result<(), String> {
    let doc = serde_json::json!({
        "tool": "concord bench",
        "version": env!("CARGO_PKG_VERSION"),
        "world": world,
        "dtype": args.dtype.name(),
        "op": args.op.name(),
        "in_place": args.in_place,
        "iters": args.iters,
        "warmup_iters": args.warmup,
        "kernels": concord_kernels::cpu_path(),
        "transport": transport.name(),
        "conns_per_neighbour": args.conns,
        "sub_chunk_bytes": args.sub_chunk,
        "spin_us": args.spin().as_micros() as u64,
        "results": rows,
        "avg_busbw_gbps": avg_busbw,
    });
    let text = serde_json::to_string_pretty(&doc).expect("serialisable");
    std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// One iteration of `-m K`: K in-place collectives in flight together; returns the time from the
/// first launch to the last completion, and the wrong elements when `checked`.
fn iterate_async(
    comm: &mut Communicator,
    args: &BenchArgs,
    pool: &mut Vec<Vec<u8>>,
    bytes: usize,
    iter_id: u64,
    checked: bool,
    tag: &mut u64,
) -> Result<(Duration, u64, f64), String> {
    let (dtype, op, rank, world) = (args.dtype, args.op, comm.rank(), comm.world_size());
    pool.resize_with(args.ops_in_flight(), Vec::new);
    for (i, buf) in pool.iter_mut().enumerate() {
        buf.resize(bytes, 0);
        if checked || buf.is_empty() {
            check::fill(dtype, op, rank, iter_id ^ ((i as u64) << 48), buf);
        }
    }
    let (collectives, _probe) = comm.split();
    let cpu0 = cpu_seconds();
    let start = Instant::now();
    let handles: Vec<_> = pool
        .drain(..)
        .map(|buf| {
            *tag += 1;
            collectives.all_reduce_async_raw(buf, dtype, op, *tag)
        })
        .collect();
    let mut first_error = None;
    for h in handles {
        let (buf, r) = h.wait();
        if let Err(e) = r {
            first_error.get_or_insert(format!("all-reduce of {bytes} bytes: {e}"));
        }
        pool.push(buf);
    }
    let elapsed = start.elapsed();
    let cpu = cpu_seconds() - cpu0;
    if let Some(e) = first_error {
        return Err(e);
    }
    let mut wrong = 0;
    if checked {
        let mut want = vec![0u8; bytes];
        for (i, buf) in pool.iter().enumerate() {
            check::reference(dtype, op, world, iter_id ^ ((i as u64) << 48), &mut want);
            wrong += check::count_wrong(dtype, buf, &want);
        }
    }
    Ok((elapsed, wrong, cpu))
}

/// User + system CPU seconds of this process so far.
fn cpu_seconds() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage writes a whole `rusage` into the pointer it is given, which points to
    // enough writable memory; it is read only when the call succeeded.
    let usage = unsafe {
        if libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) != 0 {
            return 0.0;
        }
        usage.assume_init()
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}
