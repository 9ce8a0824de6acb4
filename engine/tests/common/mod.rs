//! Harness for the multi-process tests: a real `concord master` process and peer processes
//! (this test binary re-executed with a role in its environment).

#![allow(unreachable_pub)]
#![allow(dead_code)]

pub mod elastic;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `concord master` process on a free loopback port; killed on drop.
pub struct MasterProcess {
    pub child: Child,
    pub addr: String,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

/// The `concord` binary the tests run: `CONCORD_TEST_BIN` where set (test binaries copied to a
/// machine without a toolchain, e.g. `ci/device-kit.sh`), else the one Cargo built.
pub fn concord_bin() -> std::ffi::OsString {
    std::env::var_os("CONCORD_TEST_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_concord").into())
}

impl MasterProcess {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A master on loopback with `extra` flags (say `--token-file PATH`).
    pub fn start_with(extra: &[&str]) -> Self {
        let mut child = Command::new(concord_bin())
            .args(["master", "--listen", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "info")
            .env_remove("CONCORD_TOKEN")
            .stderr(Stdio::piped())
            .spawn()
            .expect("start concord master");
        let mut stderr = BufReader::new(child.stderr.take().expect("piped"));
        let mut line = String::new();
        stderr
            .read_line(&mut line)
            .expect("master prints its address");
        let addr = line.trim().rsplit(' ').next().expect("address").to_string();
        assert!(
            addr.starts_with("127.0.0.1:"),
            "unexpected master banner {line:?}"
        );
        // Keep draining stderr (so the master never blocks on a full pipe) into a log that a
        // failing test prints.
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = std::sync::Arc::clone(&log);
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                sink.lock().unwrap().push_str(&line);
                sink.lock().unwrap().push('\n');
            }
        });
        MasterProcess { child, addr, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the master logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for MasterProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- master log ---\n{}", self.log.lock().unwrap());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Re-executes this test binary as a peer running `entry` (a test function name) with `env`.
pub fn spawn_peer(entry: &str, env: &[(&str, String)]) -> Child {
    let mut cmd = Command::new(std::env::current_exe().expect("test binary"));
    cmd.args([
        "--exact",
        entry,
        "--nocapture",
        "--test-threads=1",
        "--include-ignored",
    ]);
    cmd.env("CONCORD_TEST_ROLE", "peer");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
    cmd.spawn().expect("spawn peer process")
}

/// Whether this process is a peer spawned by [`spawn_peer`].
pub fn is_peer() -> bool {
    std::env::var("CONCORD_TEST_ROLE").as_deref() == Ok("peer")
}

/// Waits for a child with a deadline; kills it and panics on timeout. Returns its stdout.
pub fn wait_output(mut child: Child, timeout: Duration) -> (bool, String) {
    let mut stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("peer process did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    (status.success(), reader.join().expect("reader"))
}

/// Waits for every child at once, each with `timeout` (as [`wait_output`]): a child whose
/// output nobody reads yet would block once its pipe is full, and stall the collectives of the
/// others. Results in the children's order.
pub fn wait_outputs(children: Vec<Child>, timeout: Duration) -> Vec<(bool, String)> {
    let waits: Vec<_> = children
        .into_iter()
        .map(|c| std::thread::spawn(move || wait_output(c, timeout)))
        .collect();
    waits
        .into_iter()
        .map(|w| w.join().expect("a waiter"))
        .collect()
}

/// What follows `marker` on each line of `out` that has it (libtest may print a test's name
/// before the first line a test prints).
pub fn lines_with<'a>(out: &'a str, marker: &str) -> Vec<&'a str> {
    out.lines()
        .filter_map(|l| l.find(marker).map(|i| &l[i + marker.len()..]))
        .collect()
}

/// CPU time (user + system) of a process in clock ticks, from /proc.
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/pid/stat");
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Number of threads of a process.
pub fn thread_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("read /proc/pid/task")
        .count()
}

/// Checks peers of which `killed` died on purpose: it failed, every other one succeeded and
/// printed `marker`.
pub fn assert_survivors(results: Vec<(bool, String)>, killed: usize, marker: &str) {
    for (i, (ok, out)) in results.into_iter().enumerate() {
        if i == killed {
            assert!(!ok, "the killed peer died");
        } else {
            assert!(
                ok && !lines_with(&out, marker).is_empty(),
                "survivor {i}:\n{out}"
            );
        }
    }
}

/// Joins the group at `addr` and waits until `world` peers are in it.
pub fn join_world(addr: &str, world: usize) -> concord::Communicator {
    let mut comm = concord::Communicator::builder(addr)
        .op_timeout(Duration::from_secs(60))
        .connect()
        .expect("connect to the master");
    comm.wait_for_world(world, Duration::from_secs(60))
        .expect("the group forms");
    assert_eq!(comm.world_size(), world);
    comm
}

/// In a peer process: joins the master of `MASTER` and waits for a group of `WORLD` peers.
pub fn join_from_env() -> concord::Communicator {
    let master = std::env::var("MASTER").expect("MASTER");
    let world: usize = std::env::var("WORLD")
        .expect("WORLD")
        .parse()
        .expect("WORLD");
    join_world(&master, world)
}

/// FNV-1a of a byte string, for comparing results across processes.
pub fn digest(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// The first message the master sends on `s`, or `None` when it closes first.
pub fn read_master_msg(s: &mut std::net::TcpStream) -> Option<concord_master::proto::MasterMsg> {
    use concord_master::proto::{decode_master, split_frame};
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Ok(Some((body, _))) = split_frame(&buf) {
            return Some(decode_master(body).expect("the master speaks the protocol"));
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}
