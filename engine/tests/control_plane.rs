//! The master as users run it: one thread, kicks garbage, refuses other versions, idles at zero
//! CPU; peers get clear errors for mismatched descriptors and an unreachable master.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use concord::{Error, ReduceOp};
use concord_master::proto::{encode_peer, MasterMsg, PeerMsg};

/// Peer side: join, reduce a few times, optionally stay idle for a while, print a digest.
#[test]
fn peer_steady() {
    if !is_peer() {
        return;
    }
    let idle_ms: u64 = std::env::var("IDLE_MS")
        .map(|v| v.parse().unwrap())
        .unwrap_or(0);
    let comm = join_from_env();
    println!("JOINED {}", std::process::id());
    let mut buf: Vec<f32> = (0..10_000)
        .map(|i| (i % 97) as f32 + comm.rank() as f32)
        .collect();
    comm.all_reduce_in_place(&mut buf, ReduceOp::Sum, 1)
        .expect("first all-reduce");
    if idle_ms > 0 {
        std::thread::sleep(Duration::from_millis(idle_ms));
    }
    comm.all_reduce_in_place(&mut buf, ReduceOp::Max, 2)
        .expect("second all-reduce");
    println!("DIGEST {:016x}", digest(bytemuck::cast_slice(&buf)));
}

fn steady_group(master: &MasterProcess, world: usize, idle_ms: u64) -> Vec<std::process::Child> {
    (0..world)
        .map(|_| {
            spawn_peer(
                "peer_steady",
                &[
                    ("MASTER", master.addr.clone()),
                    ("WORLD", world.to_string()),
                    ("IDLE_MS", idle_ms.to_string()),
                ],
            )
        })
        .collect()
}

fn digests(peers: Vec<std::process::Child>) -> Vec<String> {
    peers
        .into_iter()
        .map(|p| {
            let (ok, out) = wait_output(p, Duration::from_secs(60));
            assert!(ok, "peer failed:\n{out}");
            lines_with(&out, "DIGEST ")[0].to_string()
        })
        .collect()
}

#[test]
fn master_is_one_thread_and_idles_without_cpu_while_serving_four_peers() {
    if is_peer() {
        return;
    }
    let master = MasterProcess::start();
    let peers = steady_group(&master, 4, 1500);
    // Wait for the group to form, then sample while every process sits idle.
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(
        thread_count(master.pid()),
        1,
        "the master runs exactly one thread"
    );
    let before = cpu_ticks(master.pid());
    std::thread::sleep(Duration::from_millis(600));
    let used = cpu_ticks(master.pid()) - before;
    assert!(
        used <= 2,
        "an idle master used {used} ticks of CPU in 600 ms"
    );
    assert_eq!(thread_count(master.pid()), 1);
    let d = digests(peers);
    assert!(d.iter().all(|x| x == &d[0]), "peers disagree: {d:?}");
}

#[test]
fn idle_peers_use_no_cpu() {
    if is_peer() {
        return;
    }
    let master = MasterProcess::start();
    let peers = steady_group(&master, 2, 2000);
    let pids: Vec<u32> = peers.iter().map(|p| p.id()).collect();
    std::thread::sleep(Duration::from_millis(900));
    let before: Vec<u64> = pids.iter().map(|p| cpu_ticks(*p)).collect();
    std::thread::sleep(Duration::from_millis(800));
    for (pid, b) in pids.iter().zip(before) {
        let used = cpu_ticks(*pid) - b;
        assert!(used <= 2, "idle peer {pid} used {used} ticks in 800 ms");
    }
    digests(peers);
}

#[test]
fn garbage_client_is_kicked_while_the_master_keeps_serving() {
    if is_peer() {
        return;
    }
    let master = MasterProcess::start();
    let peers = steady_group(&master, 3, 800);
    std::thread::sleep(Duration::from_millis(300));
    for garbage in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &[0xff; 64][..],
        &[5, 0, 0, 0, 99, 1, 2, 3, 4][..],
    ] {
        let mut s = TcpStream::connect(&master.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(garbage).unwrap();
        match read_master_msg(&mut s) {
            Some(MasterMsg::Kicked { reason }) => assert!(reason.contains("malformed"), "{reason}"),
            other => panic!("expected a kick, got {other:?}"),
        }
        let mut rest = Vec::new();
        assert_eq!(
            s.read_to_end(&mut rest).unwrap_or(0),
            0,
            "the master closed the connection"
        );
    }
    let d = digests(peers);
    assert!(d.iter().all(|x| x == &d[0]));
}

#[test]
fn another_protocol_version_is_refused_naming_both() {
    if is_peer() {
        return;
    }
    let master = MasterProcess::start();
    let mut s = TcpStream::connect(&master.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut hello = encode_peer(&PeerMsg::Hello {
        version: concord_transport::PROTOCOL_VERSION,
        data_port: 1,
        advertise_ip: String::new(),
        group: 0,
        nonce: [0; 32],
    });
    let theirs = concord_transport::PROTOCOL_VERSION + 41;
    hello[9..13].copy_from_slice(&theirs.to_le_bytes());
    s.write_all(&hello).unwrap();
    match read_master_msg(&mut s) {
        Some(MasterMsg::Refused { version, reason }) => {
            assert_eq!(version, concord_transport::PROTOCOL_VERSION);
            assert!(
                reason.contains(&theirs.to_string()) && reason.contains(&version.to_string()),
                "{reason}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn unreachable_master_is_a_clear_error_after_a_bounded_retry() {
    if is_peer() {
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let start = Instant::now();
    let err = concord::Communicator::builder(format!("127.0.0.1:{port}"))
        .connect_timeout(Duration::from_millis(800))
        .connect()
        .unwrap_err();
    let took = start.elapsed();
    assert!(matches!(err, Error::MasterLost(_)), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("timed out") && text.contains("concord master"),
        "{text}"
    );
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_secs(5),
        "took {took:?}"
    );
}

/// Peer side of the mismatch test: count differs by rank.
#[test]
fn peer_mismatch() {
    if !is_peer() {
        return;
    }
    let addr = std::env::var("MASTER").unwrap();
    let comm = join_world(&addr, 2);
    let mut buf = vec![1.5f32; 100 + comm.rank()];
    let before = buf.clone();
    let err = comm
        .all_reduce_in_place(&mut buf, ReduceOp::Sum, 77)
        .unwrap_err();
    assert!(matches!(err, Error::Mismatch { tag: 77, .. }), "{err}");
    assert_eq!(buf, before, "nothing was reduced");
    println!("ERROR {err}");
    // The tag is free again and the group still works.
    let mut ok = vec![1.0f32; 10];
    comm.all_reduce_in_place(&mut ok, ReduceOp::Sum, 77)
        .expect("the group keeps working");
    assert!(ok.iter().all(|x| *x == 2.0));
}

#[test]
fn mismatched_counts_fail_on_every_peer_naming_the_mismatch() {
    if is_peer() {
        return;
    }
    let master = MasterProcess::start();
    let peers: Vec<_> = (0..2)
        .map(|_| spawn_peer("peer_mismatch", &[("MASTER", master.addr.clone())]))
        .collect();
    for p in peers {
        let (ok, out) = wait_output(p, Duration::from_secs(60));
        assert!(ok, "{out}");
        let line = lines_with(&out, "ERROR ")
            .first()
            .copied()
            .unwrap_or_else(|| panic!("no error line in:\n{out}"));
        assert!(
            line.contains("count=100") && line.contains("count=101"),
            "{line}"
        );
    }
}

/// Waiting for a group that never forms ends at the deadline with a timeout naming the count.
#[test]
fn waiting_for_missing_peers_times_out_clearly() {
    if is_peer() {
        return;
    }
    let master = MasterProcess::start();
    let mut comm = concord::Communicator::builder(master.addr.as_str())
        .connect()
        .expect("connect");
    let start = Instant::now();
    let err = comm
        .wait_for_world(2, Duration::from_millis(300))
        .expect_err("nobody else joins");
    assert!(
        matches!(&err, Error::Timeout(m) if m.contains("only 1 of 2 peers joined")),
        "{err}"
    );
    assert!(start.elapsed() < Duration::from_secs(10), "bounded wait");
    assert_eq!(
        comm.wait_for_world(1, Duration::from_millis(300)).unwrap(),
        1
    );
}
