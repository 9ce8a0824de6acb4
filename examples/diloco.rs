//! DiLoCo-style training with Concord: each peer takes `H` local (inner) SGD steps on its own
//! data, then the group all-reduces the pseudo-gradients (parameters before minus after the inner
//! steps) and applies an outer Nesterov-momentum step. Parameters, outer momentum and the outer
//! step counter are shared state: a peer that joins late catches up through the sync, bit for
//! bit, and then takes part.
//!
//! ```text
//! cargo run --release --example diloco -- --local 3 --late-joiner
//! cargo run --release --example diloco -- --master HOST:PORT      # one peer of a running master
//! ```
//!
//! Every peer prints a hash of its parameters after each outer step; with `--local` the launcher
//! compares them across peers and exits non-zero if any two differ.

use std::collections::BTreeMap;
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use concord::{Communicator, ReduceOp, SharedState, SyncStrategy};

#[path = "common/mlp.rs"]
mod mlp;

use mlp::{hash_f32, Mlp, Rng};

const INNER_STEPS: usize = 20;
const INNER_LR: f32 = 0.05;
const OUTER_LR: f32 = 0.7;
const MOMENTUM: f32 = 0.9;

struct Shared {
    params: Vec<f32>,
    momentum: Vec<f32>,
    outer_step: Vec<u64>,
}

fn peer(master: &str, outer_steps: u64, world: usize) -> Result<(), String> {
    let e = |e: concord::Error| e.to_string();
    let mut comm = Communicator::builder(master).connect().map_err(e)?;
    // The founding members wait for each other; a late joiner goes straight in.
    comm.wait_for_world(world, Duration::from_secs(120))
        .map_err(e)?;
    let me = comm.peer_id();
    let joined_late = comm.world_size() > 1 && std::env::var_os("DILOCO_LATE").is_some();
    let mut shared = Shared {
        params: Mlp::new().p,
        momentum: vec![0.0; Mlp::LEN],
        outer_step: vec![0],
    };
    if joined_late {
        // A fresh peer: whatever it holds is replaced by the group's state.
        shared.params.fill(0.0);
    }
    let mut revision = 0u64;
    let mut first_sync = true;
    let mut rng = Rng(0xD1_10C0 ^ me.wrapping_mul(0x9E37_79B9));
    let mut grad = vec![0.0f32; Mlp::LEN];
    loop {
        // 1. Shared state: a late joiner catches up here (receive-only on its first sync).
        let strategy = if first_sync && joined_late {
            SyncStrategy::ReceiveOnly
        } else {
            SyncStrategy::EnforcePopular
        };
        let mut state = SharedState::new(if first_sync { revision } else { revision + 1 });
        state
            .add("params", &mut shared.params)
            .add("momentum", &mut shared.momentum)
            .add("outer_step", &mut shared.outer_step);
        let info = comm.sync_shared_state(&mut state, strategy).map_err(e)?;
        revision = info.revision;
        if info.bytes_received > 0 {
            println!(
                "peer {me} caught up: {} bytes in {} entries at revision {revision}",
                info.bytes_received, info.entries_pulled
            );
        }
        first_sync = false;
        let step = shared.outer_step[0];
        if step >= outer_steps {
            return Ok(());
        }
        // 2. Inner steps on local data.
        let mut model = Mlp {
            p: shared.params.clone(),
        };
        for _ in 0..INNER_STEPS {
            let (xs, ys) = rng.batch();
            model.loss_grad(&xs, &ys, &mut grad);
            for (p, g) in model.p.iter_mut().zip(&grad) {
                *p -= INNER_LR * g;
            }
        }
        // 3. Outer step: average the pseudo-gradients, Nesterov momentum.
        let mut pseudo: Vec<f32> = shared
            .params
            .iter()
            .zip(&model.p)
            .map(|(a, b)| a - b)
            .collect();
        comm.all_reduce_in_place(&mut pseudo, ReduceOp::Avg, step)
            .map_err(e)?;
        for ((p, m), g) in shared
            .params
            .iter_mut()
            .zip(shared.momentum.iter_mut())
            .zip(&pseudo)
        {
            *m = MOMENTUM * *m + g;
            *p -= OUTER_LR * (g + MOMENTUM * *m);
        }
        shared.outer_step[0] = step + 1;
        // Loss of the new parameters on a fixed evaluation batch (the same on every peer).
        let (xs, ys) = Rng(7).batch();
        let loss = Mlp {
            p: shared.params.clone(),
        }
        .loss_grad(&xs, &ys, &mut grad);
        println!(
            "outer {step:3} world {} loss {loss:.6} hash {:016x}",
            comm.world_size(),
            hash_f32(&shared.params)
        );
        // 4. Between outer steps: let waiting peers in.
        if comm.are_new_peers_pending().map_err(e)? {
            comm.update_topology().map_err(e)?;
        }
    }
}

fn launch_local(n: usize, outer_steps: u64, late_joiner: bool) -> Result<(), String> {
    // A fresh run token: only the processes started here can join (they read CONCORD_TOKEN).
    let (token, token_text) = concord::RunToken::generate().map_err(|e| e.to_string())?;
    let mut config = concord_master::coordinator::CoordinatorConfig::default();
    config.token = Some(token);
    let server = concord_master::server::Server::bind("127.0.0.1:0".parse().unwrap(), config)
        .map_err(|e| e.to_string())?;
    let addr = server.local_addr().to_string();
    std::thread::spawn(move || server.run(None, || false));
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let spawn = |late: bool| {
        let world = if late {
            1
        } else if late_joiner {
            n - 1
        } else {
            n
        };
        let mut cmd = Command::new(&exe);
        cmd.env("CONCORD_TOKEN", &token_text)
            .args([
                "--master",
                &addr,
                "--steps",
                &outer_steps.to_string(),
                "--world",
                &world.to_string(),
            ])
            .stdout(Stdio::piped());
        if late {
            cmd.env("DILOCO_LATE", "1");
        }
        cmd.spawn().map_err(|e| e.to_string())
    };
    let first = if late_joiner { n - 1 } else { n };
    let mut children = Vec::new();
    for _ in 0..first {
        children.push(spawn(false)?);
    }
    // Peer 0's output is read as it comes: the late joiner starts once it saw outer step 3.
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout0 = children[0].stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut all = String::new();
        for line in std::io::BufReader::new(stdout0)
            .lines()
            .map_while(Result::ok)
        {
            if line.starts_with("outer   3") {
                let _ = tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    if late_joiner {
        rx.recv_timeout(Duration::from_secs(60))
            .map_err(|_| "the group never reached outer step 3".to_string())?;
        children.push(spawn(true)?);
    }
    let mut outputs = Vec::new();
    for (i, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!("a peer failed with {}", out.status));
        }
        outputs.push(if i == 0 {
            String::new()
        } else {
            String::from_utf8_lossy(&out.stdout).into_owned()
        });
    }
    outputs[0] = reader.join().map_err(|_| "reader panicked".to_string())?;
    // Compare each outer step's hash across every peer that printed it.
    let mut by_step: BTreeMap<String, Vec<(usize, String)>> = BTreeMap::new();
    for (i, out) in outputs.iter().enumerate() {
        for line in out.lines().filter(|l| l.starts_with("outer")) {
            let step = line
                .split_whitespace()
                .nth(1)
                .unwrap_or_default()
                .to_string();
            let hash = line
                .split_whitespace()
                .last()
                .unwrap_or_default()
                .to_string();
            by_step.entry(step).or_default().push((i, hash));
        }
    }
    print!("{}", outputs[0]);
    if late_joiner {
        print!("late joiner:\n{}", outputs.last().expect("a joiner"));
    }
    let mut late_steps = 0;
    for (step, hashes) in &by_step {
        if hashes.iter().any(|(_, h)| h != &hashes[0].1) {
            return Err(format!("outer step {step}: peers disagree: {hashes:?}"));
        }
        late_steps += usize::from(late_joiner && hashes.iter().any(|(i, _)| *i == n - 1));
    }
    if late_joiner && late_steps == 0 {
        return Err("the late joiner never took part in an outer step".into());
    }
    println!("all peers hold identical parameters after every outer step ({late_steps} with the late joiner)");
    // "outer STEP world W loss L hash H", as peer 0 printed it.
    let losses: Vec<f32> = outputs[0]
        .lines()
        .filter_map(|l| {
            l.strip_prefix("outer ")?
                .split_whitespace()
                .nth(4)?
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
    let steps = get("--steps").map_or(Ok(30u64), |s| {
        s.parse().map_err(|e| format!("--steps {s}: {e}"))
    });
    let late = args.iter().any(|a| a == "--late-joiner");
    let result = steps.and_then(|steps| match (get("--local"), get("--master")) {
        (Some(n), None) => match n.parse::<usize>() {
            Ok(n) if n >= 2 || (n >= 1 && !late) => launch_local(n, steps, late),
            _ => Err(format!(
                "--local {n}: give at least 2 peers with --late-joiner, 1 without"
            )),
        },
        (None, Some(m)) => {
            let world = get("--world").map_or(Ok(1), |w| {
                w.parse::<usize>().map_err(|e| format!("--world {w}: {e}"))
            });
            world.and_then(|w| peer(&m, steps, w))
        }
        _ => Err(
            "usage: diloco --local N [--late-joiner] [--steps S] | --master HOST:PORT [--steps S]"
                .into(),
        ),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("diloco: {e}");
            ExitCode::FAILURE
        }
    }
}
