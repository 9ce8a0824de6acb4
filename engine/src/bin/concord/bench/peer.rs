//! One peer of `concord bench`: join the group, then for each size run the warm-up and timed
//! iterations (host, device or `-m K` async buffers), agree on the figures with the other
//! peers, and let rank 0 print them.

use std::io::Write;
use std::time::{Duration, Instant};

use concord::verify as check;
use concord::{Communicator, ReduceOp};

use super::args::BenchDevice;
use super::report::{self, Row};
use super::shapes::{self, Shape};
use super::BenchArgs;
use crate::device::{Buffers as DeviceBuffers, StageSums};

/// What one iteration measured on this peer.
struct Sample {
    elapsed: Duration,
    /// CPU seconds of the collective only (filling, resetting and checking are not counted).
    cpu_s: f64,
    wrong: u64,
    /// Where the time of a device collective went (device and emulated buffers).
    stages: Option<concord::gpu::DeviceStages>,
}

/// The host buffers every size reuses (sized for the largest).
struct HostBuffers {
    src: Vec<u8>,
    dst: Vec<u8>,
    /// The reference result, with `-c 1`.
    want: Vec<u8>,
    /// The buffers of `-m K`'s collectives in flight.
    pool: Vec<Vec<u8>>,
}

impl HostBuffers {
    /// Refills this peer's input (and poisons the output, so that a stale result cannot pass
    /// the check) when `due`; says whether it did.
    fn refill(
        &mut self,
        args: &BenchArgs,
        rank: usize,
        bytes: usize,
        iter_id: u64,
        due: bool,
    ) -> bool {
        if due {
            check::fill(args.dtype, args.op, rank, iter_id, &mut self.src[..bytes]);
            self.dst[..bytes].fill(0xA5);
        }
        due
    }

    /// The elements of the output that differ from the reference result.
    fn wrong(&mut self, args: &BenchArgs, world: usize, bytes: usize, iter_id: u64) -> u64 {
        let want = &mut self.want[..bytes];
        check::reference(args.dtype, args.op, world, iter_id, want);
        check::count_wrong(args.dtype, &self.dst[..bytes], want)
    }
}

pub(super) fn run_peer(args: &BenchArgs) -> Result<(), String> {
    let (mut comm, launcher) = join(args)?;
    let world = comm.world_size();
    let leader = comm.rank() == 0;
    let mut out = std::io::stdout().lock();
    if let (true, Some(said)) = (leader, &launcher) {
        let _ = writeln!(out, "# launcher: {said}");
    }
    if args.topology || args.topology_only {
        let opts = concord::OptimizeOptions {
            probe_bytes: args.probe_bytes,
            ..Default::default()
        };
        let report = comm
            .optimize_topology(&opts)
            .map_err(|e| format!("optimize_topology: {e}"))?;
        if leader {
            super::topology::print(&mut out, &report, args.probe_bytes);
            if let (true, Some(path)) = (args.topology_only, &args.json) {
                let text = serde_json::to_string_pretty(&super::topology::json(&report))
                    .expect("serialisable");
                std::fs::write(path, text)
                    .map_err(|e| format!("writing {}: {e}", path.display()))?;
            }
        }
        if args.topology_only {
            return Ok(());
        }
    }
    // The optimised ring has its own rank 0.
    let leader = comm.rank() == 0;
    if leader {
        report::print_banner(&mut out, args, world, comm.transport());
    }
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
    let max_bytes = args.maxbytes / args.dtype.size_bytes() * args.dtype.size_bytes();
    let mut host = HostBuffers {
        src: vec![0u8; max_bytes],
        dst: vec![0u8; max_bytes],
        want: if args.check == 1 {
            vec![0u8; max_bytes]
        } else {
            Vec::new()
        },
        pool: Vec::new(),
    };
    let mut tag = 0u64;
    let mut rows = Vec::new();
    let sizes = match args.coll {
        // A barrier moves nothing: one row.
        concord::CollKind::Barrier => vec![0],
        _ => args.sizes(),
    };
    for (size_index, &size) in sizes.iter().enumerate() {
        let bytes = shapes::row_bytes(args.coll, size, args.dtype.size_bytes(), world);
        let mut gpu = cuda
            .as_ref()
            .map(|ctx| DeviceBuffers::new(ctx, bytes))
            .transpose()?;
        let mut times = Vec::with_capacity(args.iters);
        let (mut cpu_s, mut wrong) = (0.0, 0u64);
        let mut stages = StageSums::default();
        for it in 0..args.warmup + args.iters {
            let iter_id = ((size_index as u64) << 32) | it as u64;
            let timed = it >= args.warmup;
            let checked = timed && args.check == 1;
            let first = it == 0;
            let sample = match &mut gpu {
                Some(gpu) => iterate_device(
                    &comm, args, gpu, &mut host, bytes, iter_id, checked, first, &mut tag,
                )?,
                None if args.ops.is_some() => iterate_async(
                    &mut comm,
                    args,
                    &mut host.pool,
                    bytes,
                    iter_id,
                    checked,
                    &mut tag,
                )?,
                None => iterate_host(
                    &comm, args, &mut host, bytes, iter_id, checked, first, &mut tag,
                )?,
            };
            if timed {
                times.push(sample.elapsed.as_secs_f64() * 1e6);
                cpu_s += sample.cpu_s;
                wrong += sample.wrong;
                stages.add(sample.elapsed, sample.stages);
            }
        }
        let row = agree(&comm, args, bytes, times, cpu_s, wrong, &mut tag)?;
        if leader {
            report::print_row(&mut out, &row, args.check == 1);
            if args.device != BenchDevice::Cpu {
                let _ = writeln!(out, "{}", stages.line());
                let _ = out.flush();
            }
        }
        rows.push(row);
    }
    let total_wrong: u64 = rows.iter().map(|r| r.wrong).sum();
    let avg_busbw = rows.iter().map(|r| r.busbw_gbps).sum::<f64>() / rows.len().max(1) as f64;
    if leader {
        report::print_footer(&mut out, total_wrong, avg_busbw);
        if let Some(path) = &args.json {
            report::write_json(path, args, world, comm.transport(), &rows, avg_busbw)?;
        }
    }
    if total_wrong > 0 {
        return Err(format!("{total_wrong} wrong elements"));
    }
    Ok(())
}

/// Connects to the master and waits until exactly `--world` peers are in: `-T` bounds both
/// the wait to be admitted and the wait for the others.
fn join(args: &BenchArgs) -> Result<(Communicator, Option<String>), String> {
    let launched = args.launched()?;
    let timeout = Duration::from_secs(args.timeout_s);
    let start = Instant::now();
    // Only a wait that ran its full course is -T's doing (a ring that cannot be built is a
    // timeout too, a quick one).
    let timed_out = |e: concord::Error| match e {
        concord::Error::Timeout(_) if start.elapsed() >= timeout => format!(
            "{e} (-T {} bounds joining the group; give a larger -T to wait longer)",
            args.timeout_s
        ),
        e => e.to_string(),
    };
    let said = launched.as_ref().map(|l| l.describe());
    let (builder, world) = match launched {
        Some(env) => {
            let world = env.world;
            (concord::CommunicatorBuilder::from_launch(env), world)
        }
        None => (
            Communicator::builder(args.master.as_deref().expect("validated")),
            args.world.expect("validated"),
        ),
    };
    let builder = match args.shm_ring {
        Some(bytes) => builder.shm_ring_bytes(bytes),
        None => builder,
    };
    let mut comm = args
        .with_token(builder)?
        .op_timeout(timeout)
        .join_timeout(timeout)
        .conns_per_neighbour(args.conns)
        .sub_chunk_bytes(args.sub_chunk)
        .spin(args.spin())
        .socket_buffer_bytes(args.socket_buffer)
        .transport(match args.transport {
            Some(t) => t,
            None => concord::BackendChoice::from_env_or(concord::BackendChoice::Auto)?,
        })
        .connect()
        .map_err(timed_out)?;
    comm.wait_for_world(world, timeout).map_err(timed_out)?;
    if comm.world_size() != world {
        return Err(format!(
            "{} peers joined, more than --world {world}",
            comm.world_size()
        ));
    }
    Ok((comm, said))
}

/// One collective on device buffers: inputs uploaded when they change, the result downloaded
/// and compared with the reference when `checked`.
#[allow(clippy::too_many_arguments)]
fn iterate_device(
    comm: &Communicator,
    args: &BenchArgs,
    gpu: &mut DeviceBuffers,
    host: &mut HostBuffers,
    bytes: usize,
    iter_id: u64,
    checked: bool,
    first: bool,
    tag: &mut u64,
) -> Result<Sample, String> {
    let (dtype, op) = (args.dtype, args.op);
    if host.refill(args, comm.rank(), bytes, iter_id, checked || first) {
        gpu.upload(&host.src[..bytes], &host.dst[..bytes])?;
    }
    if args.in_place {
        gpu.copy_src_to_dst()?;
    }
    *tag += 1;
    let cpu0 = cpu_seconds();
    let start = Instant::now();
    let r = gpu.all_reduce(comm, args.in_place, dtype, op, *tag);
    let elapsed = start.elapsed();
    let cpu_s = cpu_seconds() - cpu0;
    let info = r.map_err(|e| format!("all-reduce of {bytes} bytes in device memory: {e}"))?;
    let mut wrong = 0;
    if checked {
        gpu.download(&mut host.dst[..bytes])?;
        wrong = host.wrong(args, comm.world_size(), bytes, iter_id);
    }
    Ok(Sample {
        elapsed,
        cpu_s,
        wrong,
        stages: info.device,
    })
}

/// One blocking collective on host buffers (or the emulated device's).
#[allow(clippy::too_many_arguments)]
fn iterate_host(
    comm: &Communicator,
    args: &BenchArgs,
    host: &mut HostBuffers,
    bytes: usize,
    iter_id: u64,
    checked: bool,
    first: bool,
    tag: &mut u64,
) -> Result<Sample, String> {
    let (dtype, op) = (args.dtype, args.op);
    let shape = Shape::new(args, comm.rank(), comm.world_size(), bytes);
    shape.prepare(
        args,
        iter_id,
        checked || first,
        &mut host.src,
        &mut host.dst,
    );
    *tag += 1;
    let tag = *tag;
    let emulated = args.device == BenchDevice::Emulated;
    let (src, dst) = (&host.src[..], &mut host.dst[..]);
    let cpu0 = cpu_seconds();
    let start = Instant::now();
    let r = match (args.in_place, emulated) {
        (true, true) => comm.all_reduce_emulated_device(None, &mut dst[..bytes], dtype, op, tag),
        (false, true) => {
            comm.all_reduce_emulated_device(Some(&src[..bytes]), &mut dst[..bytes], dtype, op, tag)
        }
        (_, false) => shape.call(comm, args, src, dst, tag),
    };
    let elapsed = start.elapsed();
    let cpu_s = cpu_seconds() - cpu0;
    let info = r.map_err(|e| format!("{} of {bytes} bytes: {e}", args.coll))?;
    let wrong = if checked {
        shape.wrong(args, iter_id, &host.dst, &mut host.want)
    } else {
        0
    };
    Ok(Sample {
        elapsed,
        cpu_s,
        wrong,
        stages: info.device.filter(|_| emulated),
    })
}

/// Every peer's median, p10 and p90 (the slowest peer sets each), CPU time and wrong elements,
/// agreed by all-reduces, as one row.
fn agree(
    comm: &Communicator,
    args: &BenchArgs,
    bytes: usize,
    mut times: Vec<f64>,
    cpu_s: f64,
    wrong: u64,
    tag: &mut u64,
) -> Result<Row, String> {
    let world = comm.world_size();
    times.sort_by(f64::total_cmp);
    let pick = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    let mut stats = [pick(0.5), pick(0.1), pick(0.9)];
    *tag += 1;
    comm.all_reduce_in_place(&mut stats, ReduceOp::Max, *tag)
        .map_err(|e| e.to_string())?;
    let mut cpu_all = [cpu_s];
    *tag += 1;
    comm.all_reduce_in_place(&mut cpu_all, ReduceOp::Sum, *tag)
        .map_err(|e| e.to_string())?;
    let mut wrong_all = [wrong];
    *tag += 1;
    comm.all_reduce_in_place(&mut wrong_all, ReduceOp::Sum, *tag)
        .map_err(|e| e.to_string())?;
    let moved = bytes * args.ops_in_flight();
    let algbw = if stats[0] > 0.0 {
        moved as f64 / (stats[0] * 1e-6) / 1e9
    } else {
        0.0
    };
    Ok(Row {
        coll: args.coll.name(),
        size_bytes: bytes,
        count: bytes / args.dtype.size_bytes(),
        dtype: args.dtype.name(),
        op: args.op.name(),
        time_us: stats[0],
        p10_us: stats[1],
        p90_us: stats[2],
        algbw_gbps: algbw,
        busbw_gbps: algbw * shapes::bus_factor(args.coll, world),
        wrong: if args.check == 1 { wrong_all[0] } else { 0 },
        // Per GB of nothing is no figure: a zero-byte row has none.
        cpu_s_per_gb: (moved > 0).then(|| cpu_all[0] / (moved as f64 * args.iters as f64 / 1e9)),
    })
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
) -> Result<Sample, String> {
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
    Ok(Sample {
        elapsed,
        cpu_s: cpu,
        wrong,
        stages: None,
    })
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
