//! Elastic peers for the fault tests: `concord bench --elastic` processes whose JSON lines are
//! collected as they come, and whose logs are kept in a file so a failure explains itself.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

pub fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

/// An elastic peer process and the JSON lines it printed so far.
pub struct Peer {
    pub child: Child,
    lines: Arc<Mutex<Vec<Value>>>,
    log_path: std::path::PathBuf,
}

impl Peer {
    pub fn start(master: &str, min_world: usize, iters: usize, env: &[(&str, &str)]) -> Peer {
        Peer::start_sized(master, min_world, iters, "2M", env)
    }

    /// As [`Peer::start`], with `bytes` per all-reduce (`-b`; four in flight).
    pub fn start_sized(
        master: &str,
        min_world: usize,
        iters: usize,
        bytes: &str,
        env: &[(&str, &str)],
    ) -> Peer {
        Peer::start_with(master, min_world, iters, bytes, &[], env)
    }

    /// As [`Peer::start_sized`], with more flags of `concord bench --elastic` (`--coll`).
    pub fn start_with(
        master: &str,
        min_world: usize,
        iters: usize,
        bytes: &str,
        flags: &[&str],
        env: &[(&str, &str)],
    ) -> Peer {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log_path =
            std::env::temp_dir().join(format!("concord-fault-{}-{n}.log", std::process::id()));
        let log = std::fs::File::create(&log_path).expect("log file");
        let mut cmd = Command::new(super::concord_bin());
        cmd.args([
            "bench",
            "--elastic",
            "--master",
            master,
            "--world",
            &min_world.to_string(),
        ])
        .args(["-n", &iters.to_string(), "-b", bytes, "-m", "4", "-T", "30"])
        .args(flags)
        .stdout(Stdio::piped())
        .env("RUST_LOG", "info")
        .stderr(Stdio::from(log.try_clone().expect("log file")));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start an elastic peer");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    sink.lock().unwrap().push(v);
                }
            }
        });
        Peer {
            child,
            lines,
            log_path,
        }
    }

    pub fn lines(&self) -> Vec<Value> {
        self.lines.lock().unwrap().clone()
    }

    pub fn completed(&self) -> u64 {
        self.lines().iter().filter(|l| l["ok"] == true).count() as u64
    }

    pub fn wait_until(&self, what: &str, timeout: Duration, f: impl Fn(&Peer) -> bool) {
        let deadline = Instant::now() + timeout;
        while !f(self) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; last lines: {:?}",
                self.lines().iter().rev().take(4).collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The peer's log (kept in a file so a failure explains itself).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn finish(mut self, timeout: Duration) -> (bool, Vec<Value>) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("peer hung; lines: {:?}", self.lines());
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        std::thread::sleep(Duration::from_millis(50)); // let the reader drain
        if !status.success() {
            eprintln!("--- log of peer {} ---\n{}", self.child.id(), self.log());
        }
        (status.success(), self.lines())
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success(), "kill -{sig}");
    }
}
