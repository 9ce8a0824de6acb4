//! Data-parallel training with Concord: a tiny MLP on synthetic data, gradients averaged across
//! peers every step.
//!
//! ```text
//! cargo run --release --example ddp -- --local 3           # master + 3 peer processes
//! cargo run --release --example ddp -- --master HOST:PORT   # one peer of a running master
//! cargo run --release --example ddp -- --local 2 --device cuda   # gradients all-reduced in GPU memory
//! ```
//!
//! With `--device cuda` each step's gradients go to a `cudarc` device buffer and are averaged
//! there with `all_reduce_device_in_place` (in a real trainer they would already be on the GPU);
//! without CUDA it stops with the reason.
//!
//! Each peer draws its own batch (its data shard), computes gradients, and all-reduces them with
//! `avg` together with its loss; every peer applies the same update, so every peer prints the same
//! loss curve. With `--local`, the launcher compares the peers' curves and final parameter hashes
//! and exits non-zero if any two differ.

use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use concord::{Communicator, ReduceOp};

#[path = "common/mlp.rs"]
mod mlp;

use mlp::{Mlp, Rng};

const LR: f32 = 0.05;

fn peer(master: &str, world: usize, steps: usize, cuda: bool) -> Result<(), String> {
    let gpu = if cuda {
        concord::cuda_status()
            .map_err(|why| format!("--device cuda: CUDA is not available: {why}"))?;
        let ctx = concord::gpu::cudarc::driver::CudaContext::new(0)
            .map_err(|e| format!("opening CUDA device 0: {e}"))?;
        Some(ctx.default_stream())
    } else {
        None
    };
    let mut comm = Communicator::builder(master)
        .connect()
        .map_err(|e| e.to_string())?;
    comm.wait_for_world(world, Duration::from_secs(60))
        .map_err(|e| e.to_string())?;
    let rank = comm.rank();
    let mut model = Mlp::new();
    // Gradients and the loss travel in one buffer: one all-reduce per step.
    let mut buf = vec![0f32; Mlp::LEN + 1];
    let mut rng = Rng(0x1234_5678 + rank as u64 * 7919);
    for step in 0..steps {
        let (xs, ys) = rng.batch();
        let loss = model.loss_grad(&xs, &ys, &mut buf[..Mlp::LEN]);
        buf[Mlp::LEN] = loss;
        match &gpu {
            None => comm
                .all_reduce_in_place(&mut buf, ReduceOp::Avg, step as u64)
                .map(drop)
                .map_err(|e| e.to_string())?,
            Some(stream) => {
                let mut grads = stream.clone_htod(&buf).map_err(|e| e.to_string())?;
                comm.all_reduce_device_in_place(&mut grads, ReduceOp::Avg, step as u64)
                    .map_err(|e| e.to_string())?;
                buf = stream.clone_dtoh(&grads).map_err(|e| e.to_string())?;
            }
        }
        for (p, g) in model.p.iter_mut().zip(&buf[..Mlp::LEN]) {
            *p -= LR * g;
        }
        println!("step {step:4} loss {:.6}", buf[Mlp::LEN]);
    }
    println!("params {:016x}", model.hash());
    Ok(())
}

fn launch_local(n: usize, steps: usize, cuda: bool) -> Result<(), String> {
    if cuda {
        concord::cuda_status()
            .map_err(|why| format!("--device cuda: CUDA is not available: {why}"))?;
    }
    // A fresh run token: only the processes started here can join (they read CONCORD_TOKEN).
    let (token, token_text) = concord::RunToken::generate().map_err(|e| e.to_string())?;
    let mut config = concord_master::coordinator::CoordinatorConfig::default();
    config.token = Some(token);
    let server = concord_master::server::Server::bind("127.0.0.1:0".parse().unwrap(), config)
        .map_err(|e| e.to_string())?;
    let addr = server.local_addr().to_string();
    std::thread::spawn(move || server.run(None, || false));
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let children: Vec<_> = (0..n)
        .map(|_| {
            Command::new(&exe)
                .env("CONCORD_TOKEN", &token_text)
                .args([
                    "--master",
                    &addr,
                    "--world",
                    &n.to_string(),
                    "--steps",
                    &steps.to_string(),
                    "--device",
                    if cuda { "cuda" } else { "cpu" },
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
        if i % every == 0 || i + 1 >= steps {
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
    let losses: Vec<f32> = outputs[0]
        .lines()
        .filter_map(|l| {
            l.strip_prefix("step ")?
                .split_whitespace()
                .nth(2)?
                .parse()
                .ok()
        })
        .collect();
    mlp::check_loss_fell(&losses)
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
    let cuda = match get("--device").as_deref() {
        None | Some("cpu") => Ok(false),
        Some("cuda") => Ok(true),
        Some(other) => Err(format!("--device {other}: give cpu or cuda")),
    };
    let result = steps.and_then(|steps| {
        let cuda = cuda?;
        match (get("--local"), get("--master")) {
            (Some(n), None) => n
                .parse::<usize>()
                .map_err(|e| format!("--local {n}: {e}"))
                .and_then(|n| launch_local(n, steps, cuda)),
            (None, Some(m)) => {
                let world = get("--world").map_or(Ok(1), |w| {
                    w.parse::<usize>().map_err(|e| format!("--world {w}: {e}"))
                });
                world.and_then(|w| peer(&m, w, steps, cuda))
            }
            _ => Err(
                "usage: ddp --local N | --master HOST:PORT [--world N] [--steps S] \
                 [--device cpu|cuda]"
                    .into(),
            ),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ddp: {e}");
            ExitCode::FAILURE
        }
    }
}
