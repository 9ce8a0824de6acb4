//! Data-parallel training with Concord: a tiny MLP on synthetic data, gradients averaged across
//! peers every step.
//!
//! ```text
//! cargo run --release --example ddp -- --local 3           # master + 3 peer processes
//! cargo run --release --example ddp -- --master HOST:PORT   # one peer of a running master
//! ```
//!
//! Each peer draws its own batch (its data shard), computes gradients, and all-reduces them with
//! `avg` together with its loss; every peer applies the same update, so every peer prints the same
//! loss curve. With `--local`, the launcher compares the peers' curves and final parameter hashes
//! and exits non-zero if any two differ.

use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use concord::{Communicator, ReduceOp};

const IN: usize = 16;
const HIDDEN: usize = 32;
const BATCH: usize = 64;
const LR: f32 = 0.05;

/// Parameters of `y = w2 . tanh(W1 x + b1) + b2`, flat: W1, b1, w2, b2.
struct Mlp {
    p: Vec<f32>,
}

impl Mlp {
    const LEN: usize = HIDDEN * IN + HIDDEN + HIDDEN + 1;

    fn new() -> Self {
        // Every peer starts from the same parameters: a fixed seed.
        let mut rng = Rng(42);
        let p = (0..Self::LEN).map(|_| rng.normal() * 0.3).collect();
        Mlp { p }
    }

    /// Loss and gradient (written into `grad`) of the mean squared error over a batch.
    fn loss_grad(&self, xs: &[[f32; IN]], ys: &[f32], grad: &mut [f32]) -> f32 {
        grad.fill(0.0);
        let (w1, rest) = self.p.split_at(HIDDEN * IN);
        let (b1, rest) = rest.split_at(HIDDEN);
        let (w2, b2) = rest.split_at(HIDDEN);
        let mut loss = 0.0;
        let n = xs.len() as f32;
        for (x, y) in xs.iter().zip(ys) {
            let mut h = [0f32; HIDDEN];
            for j in 0..HIDDEN {
                let z: f32 = b1[j] + (0..IN).map(|i| w1[j * IN + i] * x[i]).sum::<f32>();
                h[j] = z.tanh();
            }
            let out = b2[0] + (0..HIDDEN).map(|j| w2[j] * h[j]).sum::<f32>();
            let err = out - y;
            loss += err * err / n;
            let d_out = 2.0 * err / n;
            let (gw1, grest) = grad.split_at_mut(HIDDEN * IN);
            let (gb1, grest) = grest.split_at_mut(HIDDEN);
            let (gw2, gb2) = grest.split_at_mut(HIDDEN);
            gb2[0] += d_out;
            for j in 0..HIDDEN {
                gw2[j] += d_out * h[j];
                let dz = d_out * w2[j] * (1.0 - h[j] * h[j]);
                gb1[j] += dz;
                for i in 0..IN {
                    gw1[j * IN + i] += dz * x[i];
                }
            }
        }
        loss
    }

    fn hash(&self) -> u64 {
        self.p.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, v| {
            (h ^ v.to_bits() as u64).wrapping_mul(0x100_0000_01b3)
        })
    }
}

/// A small deterministic generator (xorshift64*), so the example needs no extra crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    fn normal(&mut self) -> f32 {
        (0..6).map(|_| self.uniform()).sum::<f32>() / 2.0
    }
}

/// The function to learn.
fn target(x: &[f32; IN]) -> f32 {
    (x[0] * 1.5).sin() + x[1] * x[2] - 0.5 * x[3]
}

fn peer(master: &str, world: usize, steps: usize) -> Result<(), String> {
    let mut comm = Communicator::builder(master)
        .connect()
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while comm.world_size() < world {
        if Instant::now() > deadline {
            return Err(format!(
                "only {} of {world} peers joined",
                comm.world_size()
            ));
        }
        if comm.are_new_peers_pending().map_err(|e| e.to_string())? {
            comm.update_topology().map_err(|e| e.to_string())?;
        } else {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let rank = comm.rank();
    let mut model = Mlp::new();
    // Gradients and the loss travel in one buffer: one all-reduce per step.
    let mut buf = vec![0f32; Mlp::LEN + 1];
    let mut rng = Rng(0x1234_5678 + rank as u64 * 7919);
    for step in 0..steps {
        let xs: Vec<[f32; IN]> = (0..BATCH)
            .map(|_| std::array::from_fn(|_| rng.uniform()))
            .collect();
        let ys: Vec<f32> = xs.iter().map(target).collect();
        let loss = model.loss_grad(&xs, &ys, &mut buf[..Mlp::LEN]);
        buf[Mlp::LEN] = loss;
        comm.all_reduce_in_place(&mut buf, ReduceOp::Avg, step as u64)
            .map_err(|e| e.to_string())?;
        for (p, g) in model.p.iter_mut().zip(&buf[..Mlp::LEN]) {
            *p -= LR * g;
        }
        println!("step {step:4} loss {:.6}", buf[Mlp::LEN]);
    }
    println!("params {:016x}", model.hash());
    Ok(())
}

fn launch_local(n: usize, steps: usize) -> Result<(), String> {
    let server =
        concord_master::server::Server::bind("127.0.0.1:0".parse().unwrap(), Default::default())
            .map_err(|e| e.to_string())?;
    let addr = server.local_addr().to_string();
    std::thread::spawn(move || server.run(None, || false));
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let children: Vec<_> = (0..n)
        .map(|_| {
            Command::new(&exe)
                .args([
                    "--master",
                    &addr,
                    "--world",
                    &n.to_string(),
                    "--steps",
                    &steps.to_string(),
                ])
                .stdout(Stdio::piped())
                .spawn()
                .map_err(|e| e.to_string())
        })
        .collect::<Result<_, _>>()?;
    let mut outputs = Vec::new();
    for child in children {
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!("a peer failed with {}", out.status));
        }
        outputs.push(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let every = (steps / 10).max(1);
    for (i, line) in outputs[0].lines().enumerate() {
        if i % every == 0 || i + 2 >= steps + 1 {
            println!("{line}");
        }
    }
    for (i, o) in outputs.iter().enumerate().skip(1) {
        if o != &outputs[0] {
            return Err(format!(
                "peer {i}'s loss curve or parameters differ from peer 0's"
            ));
        }
    }
    println!("all {n} peers printed the same loss curve and parameters");
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let steps = get("--steps").map_or(Ok(200), |s| {
        s.parse::<usize>().map_err(|e| format!("--steps {s}: {e}"))
    });
    let result = steps.and_then(|steps| match (get("--local"), get("--master")) {
        (Some(n), None) => n
            .parse::<usize>()
            .map_err(|e| format!("--local {n}: {e}"))
            .and_then(|n| launch_local(n, steps)),
        (None, Some(m)) => {
            let world = get("--world").map_or(Ok(1), |w| {
                w.parse::<usize>().map_err(|e| format!("--world {w}: {e}"))
            });
            world.and_then(|w| peer(&m, w, steps))
        }
        _ => Err("usage: ddp --local N | --master HOST:PORT [--world N] [--steps S]".into()),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ddp: {e}");
            ExitCode::FAILURE
        }
    }
}
