//! The `concord` command line: bad input gets a clear error and a non-zero exit, never a panic
//! or a hang; `info` describes the host; a small `bench --local` runs and checks itself.

mod common;

// Skips are written straight to stderr, past the test harness's capture, so they show.
use std::io::Write as _;

use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

fn concord(args: &[&str]) -> Output {
    finish(spawn(args), args, Duration::from_secs(120)).0
}

/// Starts `concord args`, its output piped, logging at the default level whatever the
/// environment says (the tests read its warnings and errors).
fn spawn(args: &[&str]) -> Child {
    Command::new(common::concord_bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run concord")
}

/// Waits for a `concord` process (killed, and the test failed, after `limit`); returns its
/// output and how long it ran from `spawn`.
fn finish(mut child: Child, args: &[&str], limit: Duration) -> (Output, Duration) {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "concord {args:?} still ran after {limit:?}:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = start.elapsed();
    (child.wait_with_output().unwrap(), took)
}

fn assert_refused(args: &[&str], needle: &str) {
    let out = concord(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "concord {args:?} should fail");
    assert!(
        !stderr.contains("panicked"),
        "concord {args:?} panicked:\n{stderr}"
    );
    assert!(
        stderr.contains(needle),
        "concord {args:?}: expected {needle:?} in:\n{stderr}"
    );
}

#[test]
fn bad_input_is_refused_clearly() {
    assert_refused(&["bench", "--local", "2", "--frobnicate"], "--frobnicate");
    assert_refused(
        &["bench", "--local", "2", "-b", "12Q"],
        "unknown size suffix",
    );
    assert_refused(&["bench", "--local", "2", "-b", "lots"], "is not a size");
    assert_refused(
        &["bench", "--local", "2", "-b", "2M", "-e", "1M"],
        "larger than",
    );
    assert_refused(&["bench", "--local", "0"], "1 to 64 peers");
    assert_refused(&["bench"], "--local N");
    assert_refused(&["bench", "--local", "2", "-d", "float8"], "float8");
    assert_refused(&["bench", "--local", "2", "-o", "xor"], "xor");
    assert_refused(&["bench", "--local", "2", "-c", "2"], "-c 2");
    assert_refused(&["bench", "--local", "2", "-n", "0"], "-n 0");
    assert_refused(
        &["bench", "--local", "2", "-f", "1", "-b", "1K", "-e", "4K"],
        "step factor",
    );
    assert_refused(
        &["bench", "--local", "2", "--master", "127.0.0.1:1"],
        "cannot be used with",
    );
    assert_refused(&["bench", "--master", "127.0.0.1:1"], "--world");
    assert_refused(
        &["bench", "--local", "2", "--conns", "0"],
        "conns_per_neighbour",
    );
    assert_refused(
        &["bench", "--local", "2", "--cpu-bind", "all"],
        "auto, strict or none",
    );
    assert_refused(
        &[
            "bench",
            "--master",
            "127.0.0.1:1",
            "--world",
            "2",
            "--cpu-bind",
            "none",
        ],
        "taskset",
    );
    assert_refused(&["master", "--listen", "not-an-address"], "not-an-address");
    assert_refused(&["nonsense"], "nonsense");
}

#[test]
fn info_describes_the_host_without_panicking() {
    let out = concord(&["info"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "concord ",
        "protocol version",
        "cpu features:",
        "kernels:",
        "transports:",
        "cuda:",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
}

#[test]
fn local_bench_runs_checks_and_writes_json() {
    let json = std::env::temp_dir().join(format!("concord-bench-{}.json", std::process::id()));
    let json_arg = json.display().to_string();
    let out = concord(&[
        "bench", "--local", "3", "-b", "1K", "-e", "1M", "-f", "32", "-n", "3", "-w", "1", "-d",
        "bfloat16", "-o", "avg", "--json", &json_arg,
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("size(B)") && stdout.contains("busbw") && stdout.contains("#wrong"),
        "{stdout}"
    );
    assert!(stdout.contains("# Avg bus bandwidth"), "{stdout}");
    assert!(stdout.contains("# Out of bounds values : 0 OK"), "{stdout}");
    let rows: Vec<&str> = stdout.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(rows.len(), 3, "1K, 32K and 1M rows:\n{stdout}");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    std::fs::remove_file(&json).ok();
    assert_eq!(doc["world"], 3);
    assert_eq!(doc["dtype"], "bfloat16");
    let results = doc["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    for r in results {
        assert_eq!(r["wrong"], 0);
        assert!(r["busbw_gbps"].as_f64().unwrap() > 0.0);
    }
}

/// `--local` binds its peers to CPUs of their own where there are enough, and says so.
#[cfg(target_os = "linux")]
#[test]
fn local_peers_are_bound_to_cpus_of_their_own_where_there_are_enough() {
    let cpus = concord::affinity::allowed_cpus().expect("sched_getaffinity");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "bench", "--local", "2", "-b", "4K", "-e", "4K", "-n", "2", "-w", "1",
        ];
        args.extend_from_slice(extra);
        let out = concord(&args);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{stdout}");
        assert!(stdout.contains("# Out of bounds values : 0 OK"), "{stdout}");
        stdout
    };
    let stdout = run(&[]);
    let sets = concord::affinity::plan(2, &cpus);
    match sets {
        Some(sets) => {
            let want = format!(
                "# cpu binding: peer processes on CPUs {} | {}",
                concord::affinity::format_cpus(&sets[0]),
                concord::affinity::format_cpus(&sets[1])
            );
            assert!(stdout.contains(&want), "expected {want:?} in:\n{stdout}");
        }
        None => assert!(
            stdout.contains("# cpu binding: none (2 peers on 1 CPUs"),
            "{stdout}"
        ),
    }
    let stdout = run(&["--cpu-bind", "none"]);
    assert!(
        stdout.contains("# cpu binding: none (--cpu-bind none)"),
        "{stdout}"
    );
}

#[test]
fn striping_over_several_connections_per_neighbour_is_exact() {
    for transport in ["socket", "uring"] {
        let out = concord(&[
            "bench",
            "--local",
            "3",
            "-b",
            "1K",
            "-e",
            "4M",
            "-f",
            "64",
            "-n",
            "2",
            "-w",
            "1",
            "--conns",
            "3",
            "-d",
            "half",
            "--transport",
            transport,
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if transport == "uring" && !out.status.success() && stderr.contains("io_uring") {
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: io_uring unavailable here: {stderr}"
            );
            continue;
        }
        assert!(out.status.success(), "{transport}: {stdout}\n{stderr}");
        assert!(
            stdout.contains("3 conn(s)/neighbour")
                && stdout.contains("# Out of bounds values : 0 OK"),
            "{stdout}"
        );
    }
}

/// A flag that cannot apply is refused by name rather than silently ignored.
#[test]
fn flags_that_cannot_apply_are_refused() {
    assert_refused(&["bench", "--local", "2", "--elastic"], "--elastic");
    assert_refused(
        &["bench", "--local", "2", "--socket-buffer", "0"],
        "--socket-buffer 0",
    );
    assert_refused(
        &["bench", "--local", "2", "--cuda-device", "1"],
        "--cuda-device picks the GPU of --device cuda",
    );
    let peer = ["bench", "--master", "127.0.0.1:1", "--world", "2"];
    let with = |extra: &[&'static str]| [&peer[..], extra].concat();
    assert_refused(&with(&["--elastic", "--state"]), "two different runs");
    for (mode, flag, value) in [
        ("--state", "--json", Some("out.json")),
        ("--state", "--in-place", None),
        ("--state", "--transport", Some("socket")),
        ("--state", "--socket-buffer", Some("1M")),
        ("--state", "--spin-us", Some("0")),
        ("--state", "-d", Some("half")),
        ("--state", "-o", Some("max")),
        ("--state", "-m", Some("4")),
        ("--state", "--conns", Some("3")),
        ("--state", "--sub-chunk", Some("1M")),
        ("--elastic", "--json", Some("out.json")),
        ("--elastic", "--in-place", None),
        ("--elastic", "--transport", Some("socket")),
        ("--elastic", "--socket-buffer", Some("1M")),
        ("--elastic", "--spin-us", Some("0")),
        ("--elastic", "-d", Some("int32")),
        ("--elastic", "-o", Some("min")),
    ] {
        let mut args = with(&[mode, flag]);
        args.extend(value);
        assert_refused(&args, &format!("{flag} does nothing with {mode}"));
    }
}

/// The flags a mode does read still work with it: `--local 2 --state` runs.
#[test]
fn local_state_run_still_takes_its_flags() {
    let out = concord(&[
        "bench", "--local", "2", "--state", "-e", "64K", "-n", "2", "-w", "1", "-T", "30",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("state sync of 65536 bytes"), "{stdout}");
}

/// A zero-byte row has no CPU cost per GB: N/A in the table, null in the JSON (it used to
/// print CPU seconds divided by a clamped 1e-12).
#[test]
fn zero_byte_rows_print_no_cpu_figure() {
    let json = std::env::temp_dir().join(format!("concord-zero-{}.json", std::process::id()));
    let json_arg = json.display().to_string();
    let out = concord(&[
        "bench", "--local", "2", "-b", "0", "-e", "0", "-n", "2", "-w", "1", "--json", &json_arg,
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<&str> = stdout.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(rows.len(), 1, "one zero-byte row:\n{stdout}");
    let columns: Vec<&str> = rows[0].split_whitespace().collect();
    assert_eq!(columns[0], "0", "{stdout}");
    assert_eq!(
        columns.last(),
        Some(&"N/A"),
        "cpu(s/GB) of 0 bytes:\n{stdout}"
    );
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    std::fs::remove_file(&json).ok();
    let row = &doc["results"][0];
    assert_eq!(row["size_bytes"], 0);
    assert!(row["cpu_s_per_gb"].is_null(), "{row}");
}

/// Peers started with different `--conns` are told so, by name, on both sides, at once: it
/// used to be refused as a stranger's connection, 30 s per try.
#[test]
fn a_conns_mismatch_is_named_on_both_sides_at_once() {
    let master = common::MasterProcess::start();
    let args = |conns: &'static str| {
        let mut a = vec!["bench", "--master", &master.addr, "--world", "2"];
        a.extend([
            "-b", "1K", "-e", "1K", "-n", "1", "-w", "0", "--conns", conns,
        ]);
        a
    };
    let (one, two) = (args("1"), args("2"));
    let peers = [spawn(&one), spawn(&two)];
    for (child, args) in peers.into_iter().zip([&one, &two]) {
        let (out, took) = finish(child, args, Duration::from_secs(60));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "concord {args:?} should fail");
        assert!(
            took < Duration::from_secs(15),
            "concord {args:?} took {took:?} to fail:\n{stderr}"
        );
        // The process's own last word says it, not only a log line before it.
        let last = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        for needle in [
            "conns_per_neighbour",
            "--conns 1",
            "--conns 2",
            "same value",
        ] {
            assert!(
                last.contains(needle),
                "concord {args:?}: expected {needle:?} in its final error {last:?}:\n{stderr}"
            );
        }
    }
}

/// `-T` bounds the wait for `--world` peers: a lone peer gives up after it, naming it.
#[test]
fn minus_t_bounds_the_wait_for_the_world() {
    let master = common::MasterProcess::start();
    let args = ["bench", "--master", &master.addr, "--world", "2", "-T", "2"];
    let (out, took) = finish(spawn(&args), &args, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a lone peer should give up:\n{stderr}"
    );
    assert!(
        took < Duration::from_secs(15),
        "gave up after {took:?}:\n{stderr}"
    );
    assert!(
        stderr.contains("1 of 2 peers") && stderr.contains("-T 2"),
        "{stderr}"
    );
}

/// `-T` bounds the wait to be admitted too: a peer that the group never admits (its member
/// never votes) gives up after it, naming it, instead of the builder's 600 s.
#[test]
fn minus_t_bounds_the_wait_to_be_admitted() {
    let master = common::MasterProcess::start();
    // The first peer is admitted alone, at once; it never calls update_topology.
    let member = concord::Communicator::builder(master.addr.clone())
        .connect()
        .expect("the first peer is admitted");
    let args = ["bench", "--master", &master.addr, "--world", "2", "-T", "2"];
    let (out, took) = finish(spawn(&args), &args, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "an unadmitted peer should give up:\n{stderr}"
    );
    assert!(
        took < Duration::from_secs(15),
        "gave up after {took:?}:\n{stderr}"
    );
    assert!(
        stderr.contains("admitted") && stderr.contains("-T 2"),
        "{stderr}"
    );
    drop(member);
}
