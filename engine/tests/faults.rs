//! Fault tolerance with real processes: a `concord master` and `concord bench --elastic` peers
//! that keep reducing (with retry, checking every result bit for bit against the exact sum over
//! the peers that took part) while the tests kill, stop and add peers, or kill the master.

mod common;

use std::time::{Duration, Instant};

use common::elastic::{unix_ms, Peer};
use common::MasterProcess;
use serde_json::Value;

/// Survivors finished every iteration, all checked, and report the failure they saw.
fn assert_survived(lines: &[Value], iters: u64, final_world: u64) -> Option<u128> {
    let ok: Vec<&Value> = lines.iter().filter(|l| l["ok"] == true).collect();
    assert_eq!(
        ok.len() as u64,
        iters,
        "every iteration completed: {lines:?}"
    );
    assert!(
        lines
            .iter()
            .all(|l| l["wrong"] == 0 || l["wrong"].is_null()),
        "{lines:?}"
    );
    assert_eq!(ok.last().unwrap()["world"], final_world, "{lines:?}");
    assert!(
        ok.iter().any(|l| l["retries"].as_u64().unwrap() > 0),
        "a retry happened: {lines:?}"
    );
    ok.iter()
        .find_map(|l| l["failure_unix_ms"].as_u64())
        .map(u128::from)
}

#[test]
fn sigkill_mid_run_fails_fast_and_the_retry_is_exact() {
    let master = MasterProcess::start();
    let peers: Vec<Peer> = (0..3)
        .map(|_| Peer::start(&master.addr, 3, 30, &[]))
        .collect();
    peers[0].wait_until("3 iterations", Duration::from_secs(60), |p| {
        p.completed() >= 3
    });
    let mut peers = peers;
    let victim = peers.pop().unwrap();
    let killed_at = unix_ms();
    victim.signal("KILL");
    for p in peers {
        let (ok, lines) = p.finish(Duration::from_secs(90));
        assert!(ok, "survivor failed: {lines:?}");
        let failed_at = assert_survived(&lines, 30, 2).expect("the survivor saw the failure");
        let ms = failed_at.saturating_sub(killed_at);
        println!("SIGKILL -> survivor error after {ms} ms");
        assert!(ms < 1000, "survivors must fail within 1 s, took {ms} ms");
    }
}

#[test]
fn a_peer_killed_in_each_phase_leaves_survivors_that_finish() {
    // Tag 3001 is the second collective of iteration 3.
    for point in ["vote:3001", "reduce-scatter:3001", "all-gather:3001"] {
        let master = MasterProcess::start();
        let mut peers: Vec<Peer> = (0..2)
            .map(|_| Peer::start(&master.addr, 3, 8, &[]))
            .collect();
        let victim = Peer::start(&master.addr, 3, 8, &[("CONCORD_FAULT_KILL_AT", point)]);
        for p in peers.drain(..) {
            let (ok, lines) = p.finish(Duration::from_secs(90));
            assert!(ok, "{point}: survivor failed: {lines:?}");
            assert_survived(&lines, 8, 2);
        }
        let (ok, _) = victim.finish(Duration::from_secs(5));
        assert!(!ok, "{point}: the victim died");
    }
}

/// `concord bench --elastic --coll KIND` with a peer SIGKILLed inside the second collective of
/// iteration 3 (whether it receives first or only sends there): the survivors retry it on the
/// repaired ring and finish every iteration with exact results.
#[test]
fn a_peer_killed_in_each_new_collective_leaves_survivors_that_finish() {
    for kind in ["broadcast", "reduce", "all_gather", "reduce_scatter"] {
        let point = format!("{kind}:3001,{kind}-sent:3001");
        let master = MasterProcess::start();
        let flags = ["--coll", kind];
        let mut peers: Vec<Peer> = (0..2)
            .map(|_| Peer::start_with(&master.addr, 3, 8, "2M", &flags, &[]))
            .collect();
        let victim = Peer::start_with(
            &master.addr,
            3,
            8,
            "2M",
            &flags,
            &[("CONCORD_FAULT_KILL_AT", point.as_str())],
        );
        for p in peers.drain(..) {
            let (ok, lines) = p.finish(Duration::from_secs(90));
            assert!(ok, "{kind}: survivor failed: {lines:?}");
            assert_survived(&lines, 8, 2);
        }
        let (ok, _) = victim.finish(Duration::from_secs(5));
        assert!(!ok, "{kind}: the victim died");
    }
}

#[test]
fn a_peer_killed_while_connecting_spoils_only_that_round() {
    let master = MasterProcess::start();
    let peers: Vec<Peer> = (0..2)
        .map(|_| Peer::start(&master.addr, 2, 12, &[]))
        .collect();
    peers[0].wait_until("2 iterations", Duration::from_secs(60), |p| {
        p.completed() >= 2
    });
    let victim = Peer::start(&master.addr, 1, 12, &[("CONCORD_FAULT_KILL_AT", "connect")]);
    let (ok, _) = victim.finish(Duration::from_secs(30));
    assert!(!ok, "the joiner died while connecting");
    for p in peers {
        let (ok, lines) = p.finish(Duration::from_secs(90));
        assert!(ok, "survivor failed: {lines:?}");
        let done: Vec<&Value> = lines.iter().filter(|l| l["ok"] == true).collect();
        assert_eq!(done.len(), 12, "{lines:?}");
        assert_eq!(done.last().unwrap()["world"], 2);
    }
}

#[test]
fn sigstop_is_detected_kicked_and_told_when_it_wakes() {
    let master = MasterProcess::start();
    let mut peers: Vec<Peer> = (0..3)
        .map(|_| Peer::start(&master.addr, 3, 400, &[]))
        .collect();
    peers[0].wait_until("3 iterations", Duration::from_secs(60), |p| {
        p.completed() >= 3
    });
    let stalled = peers.pop().unwrap();
    let stopped_at = unix_ms();
    stalled.signal("STOP");
    // Survivors notice through the master's heartbeats (3 s by default), then carry on.
    for p in &peers {
        p.wait_until("a retry", Duration::from_secs(30), |p| {
            p.lines()
                .iter()
                .any(|l| l["retries"].as_u64().unwrap_or(0) > 0)
        });
    }
    let failed_at = peers[0]
        .lines()
        .iter()
        .find_map(|l| l["failure_unix_ms"].as_u64())
        .unwrap() as u128;
    let ms = failed_at.saturating_sub(stopped_at);
    println!("SIGSTOP -> survivor error after {ms} ms (heartbeat timeout 3000 ms)");
    assert!(
        ms < 3000 + 1500,
        "stall detected within the timeout plus slack: {ms} ms"
    );
    let p0 = peers[0].lines().len();
    peers[0].wait_until(
        "progress without the stalled peer",
        Duration::from_secs(30),
        |p| p.lines().len() > p0 + 3,
    );
    assert_eq!(peers[0].lines().last().unwrap()["world"], 2);
    // The stalled process wakes: it learns it was removed.
    stalled.signal("CONT");
    let (ok, lines) = stalled.finish(Duration::from_secs(30));
    assert!(!ok);
    let last = lines.last().expect("an error line");
    assert_eq!(last["removed"], true, "{last}");
    assert!(
        last["error"]
            .as_str()
            .unwrap()
            .contains("removed from the group"),
        "{last}"
    );
    for p in peers {
        p.signal("KILL");
    }
}

#[test]
fn master_death_is_reported_within_seconds() {
    let mut master = MasterProcess::start();
    let peers: Vec<Peer> = (0..2)
        .map(|_| Peer::start(&master.addr, 2, 100_000, &[]))
        .collect();
    peers[0].wait_until("2 iterations", Duration::from_secs(60), |p| {
        p.completed() >= 2
    });
    let killed = Instant::now();
    master.child.kill().unwrap();
    for p in peers {
        let (ok, lines) = p.finish(Duration::from_secs(10));
        assert!(!ok);
        let last = lines.last().unwrap();
        assert!(last["error"].as_str().unwrap().contains("master"), "{last}");
    }
    println!(
        "master SIGKILL -> peers exited after {} ms",
        killed.elapsed().as_millis()
    );
    assert!(killed.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_peer_joins_a_running_group_between_steps() {
    let master = MasterProcess::start();
    let peers: Vec<Peer> = (0..2)
        .map(|_| Peer::start(&master.addr, 2, 40, &[]))
        .collect();
    peers[0].wait_until("3 iterations", Duration::from_secs(60), |p| {
        p.completed() >= 3
    });
    let joiner = Peer::start(&master.addr, 1, 40, &[]);
    let (ok, lines) = joiner.finish(Duration::from_secs(90));
    assert!(ok, "joiner: {lines:?}");
    let first = lines.first().unwrap()["iteration"].as_u64().unwrap();
    assert!(
        first >= 3,
        "the joiner started at the group's iteration, not 0: {first}"
    );
    assert!(lines.iter().all(|l| l["world"] == 3 && l["wrong"] == 0));
    for p in peers {
        let (ok, lines) = p.finish(Duration::from_secs(30));
        assert!(ok, "{lines:?}");
        assert_eq!(lines.last().unwrap()["world"], 3);
    }
}
