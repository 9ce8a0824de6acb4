//! `concord bench --local N`: an embedded master on a thread, N peer processes (each bound to
//! CPUs of its own where there are enough), their exit codes collected.

use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{BenchArgs, CpuBind};

/// Embedded master on a thread, `n` peer processes, their exit codes collected.
pub(super) fn run_local(args: &BenchArgs, n: usize) -> Result<(), String> {
    // A fresh token for this run: only the peers started here can join the master.
    let (token, token_text) = concord::RunToken::generate().map_err(|e| e.to_string())?;
    let mut config = concord_master::coordinator::CoordinatorConfig::default();
    config.token = Some(token);
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
        cmd.args(args.child_args(&addr, n))
            .env(concord_transport::auth::TOKEN_ENV, &token_text);
        if let Some((sets, wide)) = &binding {
            concord::affinity::bind_command(&mut cmd, &sets[i])
                .map_err(|e| format!("binding a peer process to CPUs: {e}"))?;
            if let Some(wide) = wide {
                cmd.env(concord::affinity::WIDE_ENV, wide);
            }
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
/// Each peer's CPUs, and (with `auto`) the launch's CPUs its data threads widen to while a
/// large collective is in flight (`concord::affinity::Widening`).
type Binding = (Vec<Vec<usize>>, Option<String>);

fn local_binding(bind: CpuBind, n: usize) -> Option<Binding> {
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
            let wide = (bind == CpuBind::Auto).then(|| concord::affinity::format_cpus(&allowed));
            println!(
                "# cpu binding: peer processes on CPUs {}{} (--cpu-bind none to turn off)",
                list.join(" | "),
                match &wide {
                    Some(w) => format!(", data threads on {w} during collectives over 4 MiB"),
                    None => String::new(),
                }
            );
            Some((sets, wide))
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
