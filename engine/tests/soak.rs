//! Churn soak (ignored by default; `ci/test.sh` runs it for two minutes): peers are spawned,
//! SIGKILLed and SIGSTOPped at random while the rest keep reducing with retry. Checks: nothing
//! hangs (every live peer keeps making progress), no result is ever wrong, and a long-lived
//! peer's file descriptors and threads stay flat.
//!
//! `CONCORD_SOAK_SECS` sets the duration (default 120), `CONCORD_SOAK_SEED` the random choices,
//! `CONCORD_SOAK_BYTES` the size of each all-reduce (default 2M, four in flight; 16K keeps them
//! on the small-collective path: inline sends, callers driving their connections).

mod common;

use std::time::{Duration, Instant};

use common::elastic::Peer;
use common::MasterProcess;

fn count(pid: u32, what: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/{what}")).map_or(0, |d| d.count())
}

#[test]
#[ignore = "a long churn soak: run with --ignored (ci/test.sh does, for two minutes)"]
fn churn_soak() {
    let secs: u64 = std::env::var("CONCORD_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    let mut seed: u64 = std::env::var("CONCORD_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed);
    let mut rand = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let bytes = std::env::var("CONCORD_SOAK_BYTES").unwrap_or_else(|_| "2M".to_owned());
    let start = |master: &str| Peer::start_sized(master, 1, 1_000_000, &bytes, &[]);
    let master = MasterProcess::start();
    // The anchor is never disturbed: its descriptors and threads are watched.
    let anchor = start(&master.addr);
    let mut others: Vec<Peer> = (0..2).map(|_| start(&master.addr)).collect();
    anchor.wait_until("the group to start", Duration::from_secs(60), |p| {
        p.completed() >= 3
    });
    std::thread::sleep(Duration::from_secs(2));
    let pid = anchor.child.id();
    let (fds0, threads0) = (count(pid, "fd"), count(pid, "task"));
    let mut stopped: Vec<Peer> = Vec::new();
    let (mut kills, mut stops, mut joins) = (0, 0, 0);
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(800 + rand(1500)));
        match rand(3) {
            0 if others.len() < 4 => {
                others.push(start(&master.addr));
                joins += 1;
            }
            // At least two live peers stay (the anchor and one more): with fewer, retry gives up
            // by design ("fewer than two peers remain").
            1 if others.len() >= 2 => {
                let p = others.swap_remove(rand(others.len() as u64) as usize);
                p.signal("KILL");
                let _ = p.finish(Duration::from_secs(10));
                kills += 1;
            }
            2 if others.len() >= 2 => {
                let p = others.swap_remove(rand(others.len() as u64) as usize);
                p.signal("STOP");
                stopped.push(p);
                stops += 1;
            }
            _ => {}
        }
        // Woken stalled peers learn they were removed, and exit.
        if stopped.len() > 1 {
            let p = stopped.remove(0);
            p.signal("CONT");
            let (ok, lines) = p.finish(Duration::from_secs(30));
            assert!(
                !ok && lines.last().is_some_and(|l| l["removed"] == true),
                "a woken peer: {:?}",
                lines.last()
            );
        }
        // No hang: the anchor keeps completing iterations; nothing is ever wrong.
        let before = anchor.completed();
        anchor.wait_until("progress", Duration::from_secs(30), |p| {
            p.completed() > before
        });
        for p in std::iter::once(&anchor).chain(&others) {
            assert!(
                p.lines()
                    .iter()
                    .all(|l| l["wrong"].as_u64().unwrap_or(0) == 0),
                "wrong results"
            );
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    let (fds1, threads1) = (count(pid, "fd"), count(pid, "task"));
    println!(
        "soak {secs} s, {bytes} per all-reduce: {joins} joins, {kills} kills, {stops} stops; anchor completed {} iterations; fds {fds0} -> {fds1}, threads {threads0} -> {threads1}",
        anchor.completed()
    );
    // A ring of up to five peers: two neighbours, a connection each way, plus the master and the
    // listener. Descriptors and threads depend on the ring, not on how long the churn lasted.
    assert!(fds1 <= fds0 + 8, "descriptors grew from {fds0} to {fds1}");
    assert!(
        threads1 <= threads0 + 2,
        "threads grew from {threads0} to {threads1}"
    );
    for p in stopped
        .into_iter()
        .chain(others)
        .chain(std::iter::once(anchor))
    {
        p.signal("KILL");
        p.signal("CONT");
    }
}
