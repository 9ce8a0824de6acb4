//! `optimize_topology`: measure the directed edges between the members of this peer's group,
//! choose the ring order they call for (`concord_master::ring_order`), and install it.
//!
//! Every member runs the same steps, so every member reaches the same order:
//! 1. an all-gather of which edges each member already measured (a join adds new ones);
//! 2. rounds `r = 1..n`: member `i` probes `i + r` while `i - r` probes it, so each peer sends
//!    one probe and receives one per round (no two probes share a direction of a peer's link);
//!    a barrier opens each round; a round nobody needs is skipped;
//! 3. an all-gather of every member's measured row (bandwidth and round trip);
//! 4. the solver's order, voted with the master (`OrderVote`), which rebuilds the rings in it.
//!
//! Measurements are kept by the communicator and reused; `remeasure` probes every edge again.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use concord_master::proto::PeerId;
use concord_master::ring_order::{self, EdgeMatrix};
use concord_transport::socket::resolve;

use super::communicator::Communicator;
use crate::peer::flush;
use crate::topology::probe::{self, ProbeSpec};
use crate::Error;

/// How [`Communicator::optimize_topology`] measures and solves.
#[derive(Clone, Debug)]
pub struct OptimizeOptions {
    /// Most bytes one probe sends (default 16 MiB: 0.13 s at 1 Gbit/s).
    pub probe_bytes: usize,
    /// Most time one probe streams for (default 1 s); it then reports what it moved.
    pub probe_time: Duration,
    /// Probe every edge, even those measured before (default: only edges not yet measured,
    /// those of peers that joined since).
    pub remeasure: bool,
    /// Time the solver may take beyond the groups it solves exactly (default 100 ms).
    pub solve_budget: Duration,
}

impl Default for OptimizeOptions {
    fn default() -> Self {
        OptimizeOptions {
            probe_bytes: 16 << 20,
            probe_time: Duration::from_secs(1),
            remeasure: false,
            solve_budget: Duration::from_millis(100),
        }
    }
}

/// What [`Communicator::optimize_topology`] measured and chose.
#[derive(Clone, Debug, PartialEq)]
pub struct TopologyReport {
    /// The group's peers in the ring order before the call: the matrices' indices.
    pub peers: Vec<PeerId>,
    /// `bandwidth[i][j]`: bytes per second from `peers[i]` to `peers[j]` (0 on the diagonal).
    pub bandwidth: Vec<Vec<f64>>,
    /// `rtt[i][j]`: round trip between `peers[i]` and `peers[j]`, seconds.
    pub rtt: Vec<Vec<f64>>,
    /// Directed edges probed by this call, by all members (the others were measured before).
    pub probed: usize,
    /// The ring before the call, and its slowest edge (bytes per second).
    pub before: Vec<PeerId>,
    /// See `before`.
    pub before_bottleneck: f64,
    /// The ring chosen and installed, and its slowest edge.
    pub chosen: Vec<PeerId>,
    /// See `chosen`.
    pub chosen_bottleneck: f64,
    /// Whether `chosen` is proven best (groups of up to 16 peers).
    pub exact: bool,
}

/// Tags of the collectives the optimisation runs (none of the user's is in flight meanwhile).
const TAG_BASE: u64 = u64::MAX - (1 << 20);

impl Communicator {
    /// Measures the edges between the members of this peer's group, then rebuilds the ring in
    /// the order that maximises its slowest edge's bandwidth (then minimises its latency).
    /// Every member must call it, between steps, like [`Communicator::update_topology`]; a peer
    /// lost meanwhile fails it on every member, and the ring can be repaired as after any
    /// failure. Returns what was measured and chosen.
    pub fn optimize_topology(&mut self, opts: &OptimizeOptions) -> Result<TopologyReport, Error> {
        let (epoch, ring, key) = {
            let g = self.inner.lock();
            let (epoch, ring) = g.proto.ring().cloned().ok_or_else(|| {
                Error::Usage("optimize_topology() before the ring was built".into())
            })?;
            (epoch, ring, g.ring_key.clone())
        };
        let n = ring.len();
        let ids: Vec<PeerId> = ring.iter().map(|m| m.peer_id).collect();
        let me = self.peer_id();
        let i = ids.iter().position(|&p| p == me).unwrap_or(0);
        let mut probed = 0;
        if n >= 2 {
            let key = key.ok_or_else(|| Error::Usage("the ring's key is unknown".into()))?;
            // 1. Which edges each member still has to measure.
            let known = self
                .inner
                .edges
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let mine: Vec<u8> = (0..n)
                .map(|j| u8::from(j == i || (!opts.remeasure && known.contains_key(&(me, ids[j])))))
                .collect();
            let mut have = vec![0u8; n * n];
            self.all_gather(&mine, &mut have, TAG_BASE)?;
            probed = (0..n * n).filter(|&k| have[k] == 0).count();
            let spec = ProbeSpec {
                key: &key,
                epoch,
                me,
                bytes: opts.probe_bytes,
                time: opts.probe_time,
            };
            // 2. Rounds of disjoint probes.
            for r in 1..n {
                if (0..n).all(|a| have[a * n + (a + r) % n] != 0) {
                    continue;
                }
                self.barrier(TAG_BASE + r as u64)?;
                let (to, from) = ((i + r) % n, (i + n - r) % n);
                let send = have[i * n + to] == 0;
                let receive = have[from * n + i] == 0;
                let deadline = Instant::now() + 2 * opts.probe_time + Duration::from_secs(10);
                let listener = &self.inner.listener;
                let (sent, served) = std::thread::scope(|s| {
                    let server = receive
                        .then(|| s.spawn(|| probe::serve(listener, &spec, ids[from], deadline)));
                    let sent = send.then(|| {
                        let addr = resolve(&ring[to].data_addr).map_err(|e| e.to_string())?;
                        probe::probe(&spec, ids[to], addr)
                    });
                    let served = server.map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err("the probe server panicked".into()))
                    });
                    (sent, served)
                });
                let failed = |why: String| {
                    Error::io("optimize_topology: probing", std::io::Error::other(why))
                };
                if let Some(Err(why)) = served {
                    return Err(failed(why));
                }
                if let Some(edge) = sent {
                    let edge = edge.map_err(failed)?;
                    self.inner
                        .edges
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert((me, ids[to]), edge);
                }
            }
        }
        // 3. Every member's row.
        let known = self
            .inner
            .edges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut row = vec![0f64; 2 * n];
        for (j, id) in ids.iter().enumerate() {
            if let Some(e) = known.get(&(me, *id)) {
                row[2 * j] = e.bandwidth;
                row[2 * j + 1] = e.rtt;
            }
        }
        let mut all = vec![0f64; 2 * n * n];
        if n >= 2 {
            self.all_gather(&row, &mut all, TAG_BASE + n as u64 + 1)?;
        } else {
            all.copy_from_slice(&row);
        }
        let mut m = EdgeMatrix::new(n);
        let mut learned = BTreeMap::new();
        for a in 0..n {
            for b in 0..n {
                let (bw, rtt) = (all[a * 2 * n + 2 * b], all[a * 2 * n + 2 * b + 1]);
                if a != b {
                    m.set(a, b, bw, rtt);
                    if bw > 0.0 {
                        learned.insert((ids[a], ids[b]), probe::Edge { bandwidth: bw, rtt });
                    }
                }
            }
        }
        self.inner
            .edges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(learned);
        // 4. The order, installed.
        let solved = ring_order::solve(&m, opts.solve_budget);
        let mut chosen: Vec<PeerId> = solved.order.iter().map(|&k| ids[k]).collect();
        if let Some(first) = chosen
            .iter()
            .enumerate()
            .min_by_key(|(_, p)| **p)
            .map(|(k, _)| k)
        {
            chosen.rotate_left(first);
        }
        let before_bottleneck = m.score(&(0..n).collect::<Vec<_>>()).0;
        if n >= 2 {
            let deadline = self.topology_deadline();
            {
                let mut g = self.inner.lock();
                g.proto.reset_topology();
                g.proto.start_order_topology(chosen.clone())?;
                flush(&mut g);
            }
            self.finish_topology(deadline, "optimize_topology: not every member voted")?;
        }
        let finite = |x: f64| if x.is_finite() { x } else { 0.0 };
        Ok(TopologyReport {
            bandwidth: (0..n)
                .map(|a| (0..n).map(|b| m.bandwidth(a, b)).collect())
                .collect(),
            rtt: (0..n)
                .map(|a| (0..n).map(|b| 2.0 * m.latency(a, b)).collect())
                .collect(),
            peers: ids.clone(),
            probed,
            before: ids,
            before_bottleneck: finite(before_bottleneck),
            chosen,
            chosen_bottleneck: solved.bottleneck,
            exact: solved.exact,
        })
    }
}
