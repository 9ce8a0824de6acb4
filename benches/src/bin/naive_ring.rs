//! Naive ring all-reduce baseline (REFERENCE.md §4): blocking sockets, a fresh sender thread per
//! step, 1 MiB sub-chunks reduced on receipt, a barrier (join) between steps, no master.
//!
//! `naive-ring --peers N --bytes SIZE [--iters 10] [--warmup 3] [--timeout 300] [--json]`
//! starts N copies of itself on loopback (hidden form `--rank R --ports P0,P1,...`), collects each
//! rank's per-iteration times from its stdout and prints nccl-tests style figures.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::ops::Range;
use std::process::{Child, Command, ExitCode, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const PIECE: usize = 1 << 20;
const IO_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

const USAGE: &str = "usage: naive-ring --peers N(>=2) --bytes SIZE(multiple of 4, K/M/G suffix) \
                     [--iters 10] [--warmup 3] [--timeout SECS] [--json]";

type Res<T> = Result<T, String>;

/// Adds context to any error.
trait Ctx<T> {
    fn ctx(self, what: &str) -> Res<T>;
}

impl<T, E: std::fmt::Display> Ctx<T> for Result<T, E> {
    fn ctx(self, what: &str) -> Res<T> {
        self.map_err(|e| format!("{what}: {e}"))
    }
}

#[derive(Debug, Default)]
struct Args {
    peers: usize,
    bytes: usize,
    iters: usize,
    warmup: usize,
    timeout: u64,
    json: bool,
    rank: Option<usize>,
    ports: Vec<u16>,
}

fn parse_size(s: &str) -> Res<usize> {
    let shift = match s.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => 10,
        Some('M') => 20,
        Some('G') => 30,
        _ => 0,
    };
    let num = if shift > 0 { &s[..s.len() - 1] } else { s };
    let n: usize = num.parse().ctx(&format!("bad size {s:?}"))?;
    n.checked_mul(1 << shift)
        .ok_or(format!("size {s:?} overflows"))
}

fn parse_list<T: std::str::FromStr<Err: std::fmt::Display>>(s: &str) -> Res<Vec<T>> {
    s.split(',')
        .map(|x| x.parse().ctx(&format!("bad item {x:?}")))
        .collect()
}

fn parse_args() -> Res<Args> {
    let mut a = Args {
        iters: 10,
        warmup: 3,
        timeout: 300,
        ..Default::default()
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--json" {
            a.json = true;
            continue;
        }
        let v = it.next().ok_or(format!("{flag} needs a value"))?;
        let num = |v: &str| v.parse::<usize>().ctx(&format!("bad value for {flag}"));
        match flag.as_str() {
            "--peers" => a.peers = num(&v)?,
            "--bytes" => a.bytes = parse_size(&v)?,
            "--iters" => a.iters = num(&v)?,
            "--warmup" => a.warmup = num(&v)?,
            "--timeout" => a.timeout = num(&v)? as u64,
            "--rank" => a.rank = Some(num(&v)?),
            "--ports" => a.ports = parse_list(&v)?,
            _ => return Err(format!("unknown argument {flag:?}")),
        }
    }
    if a.rank.is_some() {
        a.peers = a.ports.len();
    }
    if a.peers < 2 || a.bytes < 4 || a.bytes & 3 != 0 || a.iters == 0 {
        return Err(USAGE.into());
    }
    Ok(a)
}

/// Byte range of chunk `c` of `count` f32 elements split into `w` chunks (first `count % w` longer).
fn chunk(count: usize, w: usize, c: usize) -> Range<usize> {
    let (base, extra) = (count / w, count % w);
    let start = c * base + c.min(extra);
    start * 4..(start + base + usize::from(c < extra)) * 4
}

/// Disjoint views of `buf`: `s` to read, `r` to write.
fn split(buf: &mut [u8], s: Range<usize>, r: Range<usize>) -> (&[u8], &mut [u8]) {
    if s.start < r.start {
        let (lo, hi) = buf.split_at_mut(r.start);
        (&lo[s], &mut hi[..r.len()])
    } else {
        let (lo, hi) = buf.split_at_mut(s.start);
        (&hi[..s.len()], &mut lo[r])
    }
}

fn f32_at(b: &[u8]) -> f32 {
    f32::from_ne_bytes([b[0], b[1], b[2], b[3]])
}

/// `dst[i] += src[i]` over native-endian f32 stored as bytes (fixed 4-byte chunks: vectorises).
fn add_f32(dst: &mut [u8], src: &[u8]) {
    for (d, s) in dst.chunks_exact_mut(4).zip(src.chunks_exact(4)) {
        d.copy_from_slice(&(f32_at(d) + f32_at(s)).to_ne_bytes());
    }
}

fn input(i: usize, rank: usize) -> u64 {
    ((i as u64) * 7 + (rank as u64) * 13) % 17
}

/// Retries `f` every 10 ms until it succeeds or the deadline passes.
fn retry<T>(deadline: Instant, what: &str, mut f: impl FnMut() -> std::io::Result<T>) -> Res<T> {
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() > deadline => return Err(format!("{what}: {e}")),
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
}

#[derive(Debug)]
struct Ring {
    rank: usize,
    w: usize,
    next: TcpStream,
    prev: TcpStream,
    tmp: Vec<u8>,
}

impl Ring {
    fn connect(rank: usize, ports: &[u16]) -> Res<Ring> {
        let (w, port, succ) = (ports.len(), ports[rank], ports[(rank + 1) % ports.len()]);
        let listener = TcpListener::bind(("127.0.0.1", port)).ctx(&format!("bind port {port}"))?;
        listener.set_nonblocking(true).ctx("listener")?;
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let mut next = retry(deadline, "connect to successor", || {
            TcpStream::connect(("127.0.0.1", succ))
        })?;
        next.write_all(&(rank as u32).to_le_bytes()).ctx("hello")?;
        let mut prev = retry(deadline, "accept predecessor", || listener.accept())?.0;
        for s in [&next, &prev] {
            let opts = || -> std::io::Result<()> {
                s.set_nonblocking(false)?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                s.set_write_timeout(Some(IO_TIMEOUT))
            };
            opts().ctx("socket options")?;
        }
        let mut hello = [0u8; 4];
        prev.read_exact(&mut hello).ctx("hello from predecessor")?;
        let (from, want) = (u32::from_le_bytes(hello) as usize, (rank + w - 1) % w);
        if from != want {
            return Err(format!("rank {rank}: predecessor is {from}, want {want}"));
        }
        let tmp = vec![0u8; PIECE];
        Ok(Ring {
            rank,
            w,
            next,
            prev,
            tmp,
        })
    }

    /// Two token trips around the ring: everyone has arrived, then everyone is released.
    fn barrier(&mut self) -> std::io::Result<()> {
        for _ in 0..2 {
            if self.rank == 0 {
                self.next.write_all(&[1])?;
            }
            self.prev.read_exact(&mut [0u8])?;
            if self.rank != 0 {
                self.next.write_all(&[1])?;
            }
        }
        Ok(())
    }

    /// One step: a fresh thread sends chunk `sc` to the successor in 1 MiB writes while this thread
    /// receives chunk `rc` 1 MiB at a time (reduced or copied); joining the sender is the barrier.
    fn step(&mut self, buf: &mut [u8], sc: usize, rc: usize, reduce: bool) -> Res<()> {
        let count = buf.len() / 4;
        let (out, inp) = split(buf, chunk(count, self.w, sc), chunk(count, self.w, rc));
        let Ring {
            next, prev, tmp, ..
        } = self;
        thread::scope(|scope| {
            let sender = scope.spawn(|| out.chunks(PIECE).try_for_each(|p| next.write_all(p)));
            let recv = inp.chunks_mut(PIECE).try_for_each(|p| {
                if !reduce {
                    return prev.read_exact(p);
                }
                let t = &mut tmp[..p.len()];
                prev.read_exact(t)?;
                add_f32(p, t);
                Ok(())
            });
            let sent = sender.join().map_err(|_| "sender thread panicked")?;
            sent.ctx("send to successor")?;
            recv.ctx("receive from predecessor")
        })
    }

    /// Ring all-reduce (sum): W-1 reduce-scatter steps, then W-1 all-gather steps.
    fn all_reduce(&mut self, buf: &mut [u8]) -> Res<()> {
        let (r, w) = (self.rank, self.w);
        for s in 0..w - 1 {
            self.step(buf, (r + w - s) % w, (r + 2 * w - s - 1) % w, true)?;
        }
        for s in 0..w - 1 {
            self.step(buf, (r + 1 + w - s) % w, (r + w - s) % w, false)?;
        }
        Ok(())
    }
}

fn run_rank(a: &Args, rank: usize) -> Res<()> {
    if rank >= a.peers {
        return Err(format!("rank {rank} out of range for {} peers", a.peers));
    }
    let mut ring = Ring::connect(rank, &a.ports)?;
    let mut buf = vec![0u8; a.bytes];
    let mut times = Vec::with_capacity(a.iters);
    for it in 0..a.warmup + a.iters {
        for (i, d) in buf.chunks_exact_mut(4).enumerate() {
            d.copy_from_slice(&(input(i, rank) as f32).to_ne_bytes());
        }
        ring.barrier().ctx("barrier")?;
        let t0 = Instant::now();
        ring.all_reduce(&mut buf)?;
        if it >= a.warmup {
            times.push(t0.elapsed().as_nanos().to_string());
        }
    }
    let mut wrong = buf.chunks_exact(4).enumerate().filter_map(|(i, d)| {
        let want = (0..a.peers).map(|r| input(i, r)).sum::<u64>() as f32;
        (f32_at(d) != want).then(|| format!("element {i}: got {}, want {want}", f32_at(d)))
    });
    if let Some(first) = wrong.next() {
        let n = 1 + wrong.count();
        return Err(format!(
            "rank {rank}: WRONG RESULT in {n} elements, {first}"
        ));
    }
    println!("TIMES_NS {}", times.join(","));
    Ok(())
}

/// Spawns the ranks into `children` and waits for all of them, failing on the first that fails.
fn spawn_and_wait(a: &Args, children: &mut Vec<Child>) -> Res<()> {
    // Free ports: bind 127.0.0.1:0 (all at once, so they differ), release them for the ranks.
    let ls = (0..a.peers).map(|_| TcpListener::bind("127.0.0.1:0"));
    let ls: Vec<TcpListener> = ls.collect::<Result<_, _>>().ctx("bind")?;
    let mut ports = Vec::new();
    for l in ls {
        ports.push(l.local_addr().ctx("local_addr")?.port().to_string());
    }
    let ports = ports.join(",");
    let exe = std::env::current_exe().ctx("current_exe")?;
    for r in 0..a.peers {
        let args = format!(
            "--rank {r} --ports {ports} --bytes {} --iters {} --warmup {}",
            a.bytes, a.iters, a.warmup
        );
        let child = Command::new(&exe)
            .args(args.split(' '))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn();
        children.push(child.ctx(&format!("spawn rank {r}"))?);
    }
    let deadline = Instant::now() + Duration::from_secs(a.timeout);
    loop {
        let mut pending = 0;
        for (r, c) in children.iter_mut().enumerate() {
            match c.try_wait().ctx(&format!("wait for rank {r}"))? {
                Some(st) if !st.success() => return Err(format!("rank {r} failed ({st})")),
                Some(_) => {}
                None => pending += 1,
            }
        }
        if pending == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("timed out after {} s", a.timeout));
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn launch(a: &Args) -> Res<()> {
    let mut children = Vec::new();
    if let Err(e) = spawn_and_wait(a, &mut children) {
        for c in children.iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        return Err(format!("{e}; killed all ranks"));
    }
    // Per iteration, the slowest rank's time (as nccl-tests does across ranks).
    let mut iter_ns = vec![0u128; a.iters];
    for (r, c) in children.iter_mut().enumerate() {
        let mut out = String::new();
        let mut stdout = c.stdout.take().ok_or("no stdout")?;
        stdout.read_to_string(&mut out).ctx("rank output")?;
        let line = out.lines().find_map(|l| l.strip_prefix("TIMES_NS "));
        let line = line.ok_or(format!("rank {r} reported no times"))?;
        let ts: Vec<u128> = parse_list(line)?;
        if ts.len() != a.iters {
            return Err(format!("rank {r} reported {} times", ts.len()));
        }
        for (m, t) in iter_ns.iter_mut().zip(ts) {
            *m = (*m).max(t);
        }
    }
    let mut us: Vec<f64> = iter_ns.iter().map(|&t| t as f64 / 1e3).collect();
    let times_json: Vec<String> = us.iter().map(|t| format!("{t:.1}")).collect();
    us.sort_by(f64::total_cmp);
    let n = us.len();
    let median = (us[(n - 1) / 2] + us[n / 2]) / 2.0;
    let algbw = a.bytes as f64 / (median * 1e-6) / 1e9;
    let busbw = algbw * 2.0 * (a.peers - 1) as f64 / a.peers as f64;
    let (p, b, w, min, max) = (a.peers, a.bytes, a.warmup, us[0], us[n - 1]);
    if a.json {
        let t = times_json.join(",");
        println!(
            "{{\"bench\":\"naive-ring\",\"peers\":{p},\"bytes\":{b},\"iters\":{n},\"warmup\":{w},\
             \"time_us\":{median:.1},\"min_us\":{min:.1},\"max_us\":{max:.1},\"algbw\":{algbw:.3},\
             \"busbw\":{busbw:.3},\"times_us\":[{t}]}}"
        );
    } else {
        println!(
            "naive-ring peers {p} bytes {b} time_us {median:.1} algbw {algbw:.3} busbw {busbw:.3} \
             min_us {min:.1} max_us {max:.1} iters {n}"
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let res = parse_args().and_then(|a| match a.rank {
        Some(r) => run_rank(&a, r),
        None => launch(&a),
    });
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("naive-ring: error: {e}");
            ExitCode::FAILURE
        }
    }
}
