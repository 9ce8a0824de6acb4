//! CPU placement of `concord bench --local`: each peer process is bound to CPUs of its own, and
//! with the default `--cpu-bind auto` its data threads widen to every CPU of the launch while a
//! large collective is in flight (read from /proc while it runs); `strict` never widens.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::concord_bin;

/// (thread name, allowed CPUs) of every thread of every child process of `pid`.
fn child_threads(pid: u32) -> Vec<(String, String)> {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    let mut out = Vec::new();
    for child in children.split_whitespace() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{child}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            if let Some(cpus) = status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            {
                out.push((comm.trim().to_string(), cpus.trim().to_string()));
            }
        }
    }
    out
}

/// Runs large all-reduces of 2 peers under `bind`; returns whether a data thread was seen on
/// the launch's CPUs and whether every main thread stayed on its own.
fn watch(bind: &str) -> Option<(bool, bool)> {
    let launch = concord::affinity::allowed_cpus().ok()?;
    if launch.len() < 2 {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: fewer than 2 CPUs here, nothing is bound"
        );
        return None;
    }
    let wide = concord::affinity::format_cpus(&launch);
    let mut child = Command::new(concord_bin())
        .args([
            "bench", "--local", "2", "-b", "128M", "-e", "128M", "-n", "12", "-w", "1", "-c", "0",
        ])
        .args(["--cpu-bind", bind])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let (mut widened, mut mains_narrow, mut mains_seen) = (false, true, 0usize);
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        for (name, cpus) in child_threads(child.id()) {
            if name.starts_with("concord-tx") || name.starts_with("concord-rx") {
                widened |= cpus == wide;
            }
            if name == "concord" {
                mains_narrow &= cpus != wide;
                mains_seen += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(child.wait().unwrap().success());
    assert!(mains_seen > 0, "the peer processes' main threads were seen");
    Some((widened, mains_narrow))
}

#[test]
fn auto_widens_data_threads_for_large_collectives_and_strict_does_not() {
    let Some((widened, narrow)) = watch("auto") else {
        return;
    };
    assert!(
        widened,
        "a data thread ran on every CPU during 128 MiB all-reduces"
    );
    assert!(narrow, "each peer's main thread stayed on its own CPUs");
    let (widened, narrow) = watch("strict").expect("CPUs as before");
    assert!(
        !widened && narrow,
        "strict keeps every thread on the peer's CPUs"
    );
}
