//! Launch from a launcher's environment, in real processes on loopback: torchrun-style and
//! Slurm-style variables form the group with no master address or world given by hand (rank 0
//! starts the master in-process), `concord bench` runs under them with no flag naming the group,
//! and bad environments fail at once, naming the variable.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::*;
use concord::{Communicator, ReduceOp};

/// A port nobody listens on now.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// The README's embedding snippet, as each launched process runs it.
#[test]
fn peer_launched() {
    if !is_peer() {
        return;
    }
    let mut comm = Communicator::from_env().expect("the launcher's group forms");
    if comm.are_new_peers_pending().expect("pending vote") {
        comm.update_topology().expect("topology");
    }
    let world = comm.world_size();
    let mut grads = vec![comm.rank() as f32 + 1.0; 1 << 16];
    comm.all_reduce_in_place(&mut grads, ReduceOp::Sum, 0)
        .expect("all-reduce");
    let want = (world * (world + 1) / 2) as f32;
    assert!(
        grads.iter().all(|&g| g == want),
        "every peer's contribution"
    );
    println!("LAUNCHED world {world}");
}

fn run_launched(world: usize, env_of: impl Fn(usize) -> Vec<(&'static str, String)>) {
    let peers = (0..world)
        .map(|i| spawn_peer("peer_launched", &env_of(i)))
        .collect();
    for (ok, out) in wait_outputs(peers, Duration::from_secs(60)) {
        assert!(ok, "a launched peer failed:\n{out}");
        assert_eq!(lines_with(&out, "LAUNCHED world "), [world.to_string()]);
    }
}

#[test]
fn a_torchrun_environment_forms_the_group() {
    if is_peer() {
        return;
    }
    let port = free_port();
    run_launched(3, |i| {
        vec![
            ("MASTER_ADDR", "127.0.0.1".into()),
            ("MASTER_PORT", (port - 1).to_string()),
            ("WORLD_SIZE", "3".into()),
            ("RANK", i.to_string()),
            ("LOCAL_RANK", i.to_string()),
            ("LOCAL_WORLD_SIZE", "3".into()),
        ]
    });
}

#[test]
fn a_slurm_environment_forms_the_group() {
    if is_peer() {
        return;
    }
    let port = free_port();
    run_launched(4, |i| {
        vec![
            ("SLURM_PROCID", i.to_string()),
            ("SLURM_NTASKS", "4".into()),
            ("SLURM_LOCALID", i.to_string()),
            ("SLURM_JOB_NODELIST", "localhost,node[02-04]".into()),
            ("SLURM_JOB_ID", "4242".into()),
            ("CONCORD_MASTER_PORT", port.to_string()),
        ]
    });
}

/// `concord bench` under a launcher: no --master, no --world; the first line says what it took.
#[test]
fn bench_runs_under_a_launcher_with_no_group_flags() {
    if is_peer() {
        return;
    }
    let port = free_port();
    let children: Vec<_> = (0..2)
        .map(|i| {
            Command::new(concord_bin())
                .args([
                    "bench", "-b", "64K", "-e", "64K", "-n", "3", "-w", "1", "-T", "30",
                ])
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", (port - 1).to_string())
                .env("WORLD_SIZE", "2")
                .env("RANK", i.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    for o in &outs {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let all: String = outs
        .iter()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .collect();
    assert!(
        all.contains("# launcher: torchrun: rank ")
            && all.contains(&format!("MASTER_PORT={}", port - 1)),
        "{all}"
    );
    assert!(all.contains("# Out of bounds values : 0 OK"), "{all}");
}

/// Bad environments: an error naming the variable, at once (no hang waiting for a world).
#[test]
fn bad_environments_fail_at_once_naming_the_variable() {
    if is_peer() {
        return;
    }
    for (env, says) in [
        (
            vec![
                ("RANK", "5"),
                ("WORLD_SIZE", "2"),
                ("MASTER_ADDR", "127.0.0.1"),
                ("MASTER_PORT", "29400"),
            ],
            "RANK=5 is outside WORLD_SIZE=2",
        ),
        (
            vec![
                ("SLURM_PROCID", "0"),
                ("SLURM_NTASKS", "2"),
                ("SLURM_JOB_NODELIST", "gpu[01-"),
                ("SLURM_JOB_ID", "9"),
            ],
            "SLURM_JOB_NODELIST",
        ),
        (
            vec![
                ("RANK", "1"),
                ("WORLD_SIZE", "2"),
                ("MASTER_ADDR", "no-such-host.invalid"),
                ("MASTER_PORT", "29400"),
            ],
            "does not resolve",
        ),
        (
            vec![("OMPI_COMM_WORLD_RANK", "0"), ("OMPI_COMM_WORLD_SIZE", "2")],
            "set CONCORD_MASTER",
        ),
    ] {
        let start = Instant::now();
        let out = Command::new(concord_bin())
            .args(["bench", "-b", "4K", "-e", "4K", "-n", "1"])
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(says),
            "{env:?}: {err}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{env:?}: took {:?}",
            start.elapsed()
        );
    }
}

/// Two processes that both claim rank 0 on one host: the second cannot start the master and
/// says why at once.
#[test]
fn two_processes_claiming_rank_0_are_told() {
    if is_peer() {
        return;
    }
    let port = free_port();
    let run = || {
        Command::new(concord_bin())
            .args(["bench", "-b", "4K", "-e", "4K", "-n", "1", "-T", "5"])
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", (port - 1).to_string())
            .env("WORLD_SIZE", "2")
            .env("RANK", "0")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let first = run();
    std::thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    let second = run().wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        !second.status.success() && err.contains("claim rank 0"),
        "{err}"
    );
    assert!(start.elapsed() < Duration::from_secs(5));
    // The first waits for a world that never comes, and gives up at its deadline (-T 5).
    let first = first.wait_with_output().unwrap();
    assert!(
        !first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
}

/// torchrun's variables with an IPv6 master address: the group forms on `::1`.
#[test]
fn an_ipv6_master_address() {
    if is_peer() {
        return;
    }
    let Ok(l) = std::net::TcpListener::bind("[::1]:0") else {
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "SKIPPED: no IPv6 loopback here");
        return;
    };
    let port = l.local_addr().unwrap().port();
    drop(l);
    run_launched(2, |i| {
        vec![
            ("MASTER_ADDR", "::1".into()),
            ("MASTER_PORT", (port - 1).to_string()),
            ("WORLD_SIZE", "2".into()),
            ("RANK", i.to_string()),
            ("CONCORD_SOCKET_IFNAME", "lo".into()),
            ("CONCORD_SOCKET_FAMILY", "AF_INET6".into()),
        ]
    });
}

/// A data port range with no free port is an error that names it; a free range is used.
#[test]
fn the_data_port_range_is_honoured() {
    if is_peer() {
        return;
    }
    let taken = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let p = taken.local_addr().unwrap().port();
    let out = Command::new(concord_bin())
        .args(["bench", "-b", "4K", "-e", "4K", "-n", "1", "-T", "5"])
        .env("CONCORD_RANK", "0")
        .env("CONCORD_WORLD_SIZE", "1")
        .env("CONCORD_MASTER", format!("127.0.0.1:{}", free_port()))
        .env("CONCORD_DATA_PORTS", format!("{p}-{p}"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains(&format!("no free data port in {p}-{p}")),
        "{err}"
    );
    // A range with a free port: a world of one under a launcher that starts its own master.
    let free = free_port();
    let port = free_port();
    let out = Command::new(concord_bin())
        .args([
            "bench",
            "-b",
            "4K",
            "-e",
            "4K",
            "-n",
            "1",
            "-T",
            "10",
            "--data-ports",
        ])
        .arg(format!("{free}-{free}"))
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", (port - 1).to_string())
        .env("WORLD_SIZE", "1")
        .env("RANK", "0")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(taken);
}
