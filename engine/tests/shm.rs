//! The shared-memory transport with real processes: a ring that spans two "hosts" (distinct
//! `CONCORD_HOST_ID`s on this machine) runs its connections within a host over shared memory and
//! the others over TCP, with exact results; rings live only in mappings (no descriptor, nothing
//! in `/dev/shm`); a neighbour killed mid-run leaves survivors that carry on and hold none of
//! its rings any more, so the kernel has freed them.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::elastic::Peer;
use common::*;
use concord::{verify, DType, ReduceOp};

/// The inodes of the shared-memory rings a process maps.
fn ring_inodes(pid: &str) -> Vec<u64> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    maps.lines()
        .filter(|l| l.contains("/memfd:concord-ring"))
        .filter_map(|l| l.split_whitespace().nth(4)?.parse().ok())
        .collect()
}

/// How many memfd descriptors of rings a process holds open.
fn ring_fds(pid: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|l| l.to_string_lossy().starts_with("/memfd:concord-ring"))
                .count()
        })
        .unwrap_or(0)
}

fn dev_shm() -> BTreeSet<String> {
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// Peer side of `a_ring_across_two_hosts_shares_memory_only_within_one`.
#[test]
fn peer_mixed() {
    if !is_peer() {
        return;
    }
    let comm = join_from_env();
    let (world, rank) = (comm.world_size(), comm.rank());
    let mut tag = 0;
    for count in [1usize, 1000, 262_147, 1 << 21] {
        for in_place in [false, true] {
            tag += 1;
            let (dtype, op) = (DType::F32, ReduceOp::Sum);
            let bytes = count * dtype.size_bytes();
            let mut src = vec![0u8; bytes];
            verify::fill(dtype, op, rank, tag, &mut src);
            let mut dst = src.clone();
            let r = if in_place {
                comm.all_reduce_raw(None, &mut dst, dtype, op, tag, None)
            } else {
                comm.all_reduce_raw(Some(&src), &mut dst, dtype, op, tag, None)
            };
            r.unwrap_or_else(|e| panic!("count {count}: {e}"));
            let mut want = vec![0u8; bytes];
            verify::reference(dtype, op, world, tag, &mut want);
            let wrong = verify::count_wrong(dtype, &dst, &want);
            println!("CASE {count}/{in_place} {:016x} {wrong}", digest(&dst));
        }
    }
    let me = std::process::id().to_string();
    println!(
        "PEER {rank} {} {} {} {}",
        std::env::var("CONCORD_HOST_ID").unwrap(),
        comm.transport().name(),
        ring_inodes(&me).len(),
        ring_fds(&me)
    );
    // Stay in the group until every peer has looked at its own mappings.
    comm.barrier(u64::MAX).expect("final barrier");
    println!("DONE");
}

#[test]
fn a_ring_across_two_hosts_shares_memory_only_within_one() {
    if is_peer() {
        return;
    }
    let before = dev_shm();
    let master = MasterProcess::start();
    // In a ring of three every two peers are neighbours: the two of host-a share one ring
    // connection direction, every other connection crosses hosts.
    let hosts = ["host-a", "host-a", "host-b"];
    let peers: Vec<_> = hosts
        .iter()
        .map(|h| {
            spawn_peer(
                "peer_mixed",
                &[
                    ("MASTER", master.addr.clone()),
                    ("WORLD", "3".into()),
                    ("CONCORD_HOST_ID", h.to_string()),
                    ("CONCORD_TRANSPORT", "auto".into()),
                ],
            )
        })
        .collect();
    let outputs: Vec<String> = wait_outputs(peers, Duration::from_secs(120))
        .into_iter()
        .map(|(ok, out)| {
            assert!(ok, "a peer failed:\n{out}");
            out
        })
        .collect();
    // Exact and identical everywhere.
    let cases: Vec<Vec<&str>> = outputs.iter().map(|o| lines_with(o, "CASE ")).collect();
    assert_eq!(cases[0].len(), 8);
    for c in &cases {
        assert_eq!(c, &cases[0], "every peer holds the same bits");
        assert!(c.iter().all(|l| l.ends_with(" 0")), "{c:?}");
    }
    // (rank, host, transport to the successor, rings mapped, ring descriptors open)
    let mut by_rank: Vec<(usize, String, String, usize, usize)> = outputs
        .iter()
        .map(|o| {
            let f: Vec<&str> = lines_with(o, "PEER ")[0].split(' ').collect();
            (
                f[0].parse().unwrap(),
                f[1].into(),
                f[2].into(),
                f[3].parse().unwrap(),
                f[4].parse().unwrap(),
            )
        })
        .collect();
    by_rank.sort();
    let n = by_rank.len();
    let conns = 2; // connections per neighbour, the default
    let tcp = if concord_transport::uring::probe().is_ok() {
        "io_uring"
    } else {
        "socket"
    };
    let mut shm_edges = 0;
    for r in 0..n {
        let (succ, pred) = (&by_rank[(r + 1) % n], &by_rank[(r + n - 1) % n]);
        let me = &by_rank[r];
        let to_succ = me.1 == succ.1;
        let from_pred = me.1 == pred.1;
        assert_eq!(
            me.2,
            if to_succ { "shm" } else { tcp }.to_string(),
            "rank {r} on {} to rank {} on {}: {by_rank:?}",
            me.1,
            (r + 1) % n,
            succ.1
        );
        shm_edges += usize::from(to_succ);
        let rings = conns * (usize::from(to_succ) + usize::from(from_pred));
        assert_eq!(
            me.3, rings,
            "rank {r} maps one ring per shared-memory connection"
        );
        assert_eq!(me.4, 0, "rank {r} closed every ring descriptor once mapped");
    }
    assert_eq!(shm_edges, 1, "{by_rank:?}");
    assert_eq!(dev_shm(), before, "nothing was left in /dev/shm");
}

/// A neighbour SIGKILLed mid-run: the survivors fail fast, retry exactly on a ring of two, and
/// neither maps any ring it shared with the dead peer (so the kernel freed them), nor holds a
/// ring descriptor; nothing appears in `/dev/shm`.
#[test]
fn a_killed_neighbour_leaves_no_ring_behind() {
    if is_peer() {
        return;
    }
    let before = dev_shm();
    let master = MasterProcess::start();
    let env = [("CONCORD_TRANSPORT", "shm")];
    let mut peers: Vec<Peer> = (0..3)
        .map(|_| Peer::start(&master.addr, 3, 40, &env))
        .collect();
    peers[0].wait_until("3 iterations", Duration::from_secs(60), |p| {
        p.completed() >= 3
    });
    let pid = |p: &Peer| p.child.id().to_string();
    let rings: Vec<Vec<u64>> = peers.iter().map(|p| ring_inodes(&pid(p))).collect();
    for (i, r) in rings.iter().enumerate() {
        assert_eq!(
            r.len(),
            4,
            "peer {i}: two rings to each neighbour: {rings:?}"
        );
    }
    let victim = peers.pop().unwrap();
    let victims: BTreeSet<u64> = ring_inodes(&pid(&victim)).into_iter().collect();
    victim.signal("KILL");
    for p in &peers {
        p.wait_until("progress on a ring of two", Duration::from_secs(60), |p| {
            p.lines()
                .iter()
                .filter(|l| l["ok"] == true && l["world"] == 2)
                .count()
                >= 3
        });
    }
    for (i, p) in peers.iter().enumerate() {
        let now = ring_inodes(&pid(p));
        assert_eq!(
            now.len(),
            4,
            "survivor {i} maps the new epoch's rings only: {now:?}"
        );
        assert!(
            now.iter().all(|r| !victims.contains(r)),
            "survivor {i} still maps a ring of the dead peer: {now:?} vs {victims:?}"
        );
        assert_eq!(
            ring_fds(&pid(p)),
            0,
            "survivor {i} holds no ring descriptor"
        );
    }
    for p in peers {
        let (ok, lines) = p.finish(Duration::from_secs(90));
        assert!(ok, "survivor failed: {lines:?}");
        assert!(lines
            .iter()
            .all(|l| l["wrong"] == 0 || l["wrong"].is_null()));
    }
    assert_eq!(dev_shm(), before, "nothing was left in /dev/shm");
}
