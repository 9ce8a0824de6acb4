//! Choosing a ring order from measured edges.
//!
//! A pipelined ring moves every byte over every edge, so it runs at the pace of its slowest
//! edge: the order **maximises the bottleneck bandwidth** (the smallest bandwidth of its `n`
//! directed edges), then, among the orders with that bottleneck, **minimises the total latency**
//! (the sum of its edges' one-way latencies, half their round trips). Edges are directed: the
//! bandwidth from `i` to `j` need not be that from `j` to `i`.
//!
//! - Up to [`EXACT_MAX_PEERS`] peers the answer is exact: the bottleneck by a search over the
//!   measured bandwidths, each step asking whether a Hamiltonian cycle exists among the edges at
//!   least that fast (a dynamic programme over subsets, bit-parallel), then the latency by the
//!   Held-Karp programme over those edges. Its cost grows as `2^n n^2`: under a millisecond at 10
//!   peers and about 20 ms at 16 in a test build (`cargo test -p concord-master exact_sizes --
//!   --nocapture` prints them).
//! - Beyond, a heuristic bounded by the caller's time budget: for each start, a greedy path that
//!   always takes the fastest edge to an unvisited peer, then local moves (moving one peer
//!   elsewhere in the ring) while they improve the order and the budget lasts. Its answer is
//!   never below the id order's, and [`RingChoice::exact`] says it is not proven best.
//!
//! Pure and deterministic: the same matrix (and budget) gives the same order.

use std::time::{Duration, Instant};

/// Largest group solved exactly.
pub const EXACT_MAX_PEERS: usize = 16;

/// Measured directed edges of a group of `n` peers, by index.
#[derive(Clone, Debug, PartialEq)]
pub struct EdgeMatrix {
    n: usize,
    /// Bytes per second from `i` to `j` at `i * n + j`; 0 (or not finite): unusable.
    bandwidth: Vec<f64>,
    /// Round-trip time in seconds between `i` and `j` at `i * n + j`.
    rtt: Vec<f64>,
}

impl EdgeMatrix {
    /// A matrix of `n` peers with no edge measured (every edge unusable, zero latency).
    pub fn new(n: usize) -> EdgeMatrix {
        EdgeMatrix {
            n,
            bandwidth: vec![0.0; n * n],
            rtt: vec![0.0; n * n],
        }
    }

    /// Records the edge from `i` to `j`: bytes per second and round trip in seconds.
    pub fn set(&mut self, i: usize, j: usize, bandwidth: f64, rtt: f64) {
        let k = i * self.n + j;
        self.bandwidth[k] = if bandwidth.is_finite() && bandwidth > 0.0 {
            bandwidth
        } else {
            0.0
        };
        self.rtt[k] = if rtt.is_finite() && rtt > 0.0 {
            rtt
        } else {
            0.0
        };
    }

    /// Peers.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Whether the group is empty.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Bandwidth from `i` to `j` (bytes per second; 0: unusable).
    pub fn bandwidth(&self, i: usize, j: usize) -> f64 {
        self.bandwidth[i * self.n + j]
    }

    /// One-way latency from `i` to `j` (half the round trip), in seconds.
    pub fn latency(&self, i: usize, j: usize) -> f64 {
        self.rtt[i * self.n + j] / 2.0
    }

    /// The bottleneck and total latency of the ring `order` (each peer sends to the next, the
    /// last to the first).
    pub fn score(&self, order: &[usize]) -> (f64, f64) {
        let n = order.len();
        if n < 2 {
            return (f64::INFINITY, 0.0);
        }
        let mut bottleneck = f64::INFINITY;
        let mut latency = 0.0;
        for k in 0..n {
            let (a, b) = (order[k], order[(k + 1) % n]);
            bottleneck = bottleneck.min(self.bandwidth(a, b));
            latency += self.latency(a, b);
        }
        (bottleneck, latency)
    }

    /// An upper bound of any ring's bottleneck: every peer must send over one of its edges and
    /// receive over one.
    pub fn bottleneck_bound(&self) -> f64 {
        if self.n < 2 {
            return f64::INFINITY;
        }
        (0..self.n)
            .map(|i| {
                let out = (0..self.n)
                    .filter(|&j| j != i)
                    .map(|j| self.bandwidth(i, j))
                    .fold(0.0, f64::max);
                let inc = (0..self.n)
                    .filter(|&j| j != i)
                    .map(|j| self.bandwidth(j, i))
                    .fold(0.0, f64::max);
                out.min(inc)
            })
            .fold(f64::INFINITY, f64::min)
    }
}

/// The order chosen.
#[derive(Clone, Debug, PartialEq)]
pub struct RingChoice {
    /// Peer indices in ring order, starting with 0.
    pub order: Vec<usize>,
    /// Its slowest edge, bytes per second (0: the ring needs an unusable edge).
    pub bottleneck: f64,
    /// The sum of its edges' one-way latencies, seconds.
    pub latency: f64,
    /// Whether it is proven best (the exact search ran).
    pub exact: bool,
}

/// Whether ring `a` beats ring `b`: a faster bottleneck, else (within a relative 1e-9) a
/// smaller total latency.
fn better(a: (f64, f64), b: (f64, f64)) -> bool {
    let tol = 1e-9 * a.0.abs().max(b.0.abs()).max(f64::MIN_POSITIVE);
    if (a.0 - b.0).abs() > tol {
        return a.0 > b.0;
    }
    a.1 < b.1 - 1e-15
}

/// Chooses the ring order of `m` (see the module's documentation); `budget` bounds the
/// heuristic beyond [`EXACT_MAX_PEERS`].
pub fn solve(m: &EdgeMatrix, budget: Duration) -> RingChoice {
    let n = m.len();
    if n <= 3 {
        return small(m);
    }
    if n <= EXACT_MAX_PEERS {
        return exact(m);
    }
    heuristic(m, Instant::now() + budget)
}

fn choice(m: &EdgeMatrix, order: Vec<usize>, exact: bool) -> RingChoice {
    let (bottleneck, latency) = m.score(&order);
    RingChoice {
        order,
        bottleneck: if bottleneck.is_finite() {
            bottleneck
        } else {
            0.0
        },
        latency,
        exact,
    }
}

/// Up to three peers: every order, directly (a ring of three has two).
fn small(m: &EdgeMatrix) -> RingChoice {
    let n = m.len();
    let mut best: Vec<usize> = (0..n).collect();
    if n == 3 && better(m.score(&[0, 2, 1]), m.score(&best)) {
        best = vec![0, 2, 1];
    }
    choice(m, best, true)
}

/// Whether a Hamiltonian cycle exists among the edges at least `min` fast: `reach[mask]` holds
/// the ends of paths from peer 0 that visit exactly `mask`.
fn cycle_exists(m: &EdgeMatrix, min: f64) -> bool {
    let n = m.len();
    let adj: Vec<u32> = (0..n)
        .map(|i| {
            (0..n)
                .filter(|&j| j != i && m.bandwidth(i, j) >= min && m.bandwidth(i, j) > 0.0)
                .fold(0u32, |a, j| a | 1 << j)
        })
        .collect();
    let full = (1u32 << n) - 1;
    let mut reach = vec![0u32; 1 << n];
    reach[1] = 1;
    for mask in 1..=full {
        let ends = reach[mask as usize];
        if ends == 0 || mask & 1 == 0 {
            continue;
        }
        let mut e = ends;
        while e != 0 {
            let v = e.trailing_zeros() as usize;
            e &= e - 1;
            let mut next = adj[v] & !mask;
            while next != 0 {
                let u = next.trailing_zeros();
                next &= next - 1;
                reach[(mask | 1 << u) as usize] |= 1 << u;
            }
        }
    }
    let ends = reach[full as usize];
    (0..n).any(|v| ends & (1 << v) != 0 && adj[v] & 1 != 0)
}

/// The exact answer: the largest bottleneck with a cycle, then Held-Karp on latency.
fn exact(m: &EdgeMatrix) -> RingChoice {
    let n = m.len();
    let mut speeds: Vec<f64> = (0..n)
        .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
        .map(|(i, j)| m.bandwidth(i, j))
        .filter(|&b| b > 0.0)
        .collect();
    speeds.sort_by(f64::total_cmp);
    speeds.dedup();
    // The largest speed whose graph still has a cycle (monotone: fewer edges, fewer cycles).
    let (mut lo, mut hi) = (0usize, speeds.len());
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if mid > 0 && cycle_exists(m, speeds[mid - 1]) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    if lo == 0 {
        // No ring of usable edges at all: the id order, which fails where it must.
        return choice(m, (0..n).collect(), true);
    }
    let min = speeds[lo - 1];
    let usable = |i: usize, j: usize| i != j && m.bandwidth(i, j) >= min;
    // Held-Karp over paths from 0: cost[mask][v], the least latency of a path from 0 through
    // `mask` ending at `v`.
    let full = (1usize << n) - 1;
    let mut cost = vec![f64::INFINITY; (1 << n) * n];
    let mut from = vec![u8::MAX; (1 << n) * n];
    cost[n] = 0.0; // mask {0}, at 0
    for mask in 1..=full {
        if mask & 1 == 0 {
            continue;
        }
        for v in 0..n {
            let c = cost[mask * n + v];
            if !c.is_finite() {
                continue;
            }
            for u in 0..n {
                if mask & (1 << u) != 0 || !usable(v, u) {
                    continue;
                }
                let next = mask | 1 << u;
                let nc = c + m.latency(v, u);
                if nc < cost[next * n + u] {
                    cost[next * n + u] = nc;
                    from[next * n + u] = v as u8;
                }
            }
        }
    }
    let mut last = usize::MAX;
    let mut best = f64::INFINITY;
    for v in 1..n {
        let c = cost[full * n + v];
        if c.is_finite() && usable(v, 0) && c + m.latency(v, 0) < best {
            best = c + m.latency(v, 0);
            last = v;
        }
    }
    debug_assert!(last != usize::MAX, "a cycle exists at this speed");
    let mut order = Vec::with_capacity(n);
    let (mut mask, mut v) = (full, last);
    while v != 0 {
        order.push(v);
        let p = from[mask * n + v] as usize;
        mask &= !(1 << v);
        v = p;
    }
    order.push(0);
    order.reverse();
    choice(m, order, true)
}

/// Beyond the exact size: greedy paths from every start, then moves of one peer, within the
/// deadline; never worse than the id order.
fn heuristic(m: &EdgeMatrix, deadline: Instant) -> RingChoice {
    let n = m.len();
    let mut best: Vec<usize> = (0..n).collect();
    let mut best_score = m.score(&best);
    for start in 0..n {
        if Instant::now() >= deadline {
            break;
        }
        let order = greedy(m, start);
        let s = m.score(&order);
        if better(s, best_score) {
            best = order;
            best_score = s;
        }
    }
    // Local search: move one peer to another place while it helps.
    let mut improved = true;
    while improved && Instant::now() < deadline {
        improved = false;
        'moves: for i in 0..n {
            for j in 0..n {
                if i == j {
                    continue;
                }
                let mut cand = best.clone();
                let p = cand.remove(i);
                cand.insert(j, p);
                let s = m.score(&cand);
                if better(s, best_score) {
                    best = cand;
                    best_score = s;
                    improved = true;
                    break 'moves;
                }
            }
            if Instant::now() >= deadline {
                break;
            }
        }
    }
    let zero = best.iter().position(|&p| p == 0).unwrap_or(0);
    best.rotate_left(zero);
    choice(m, best, false)
}

/// A path from `start` that always takes the fastest edge to a peer not yet on it (the lower
/// latency on a tie).
fn greedy(m: &EdgeMatrix, start: usize) -> Vec<usize> {
    let n = m.len();
    let mut on = vec![false; n];
    let mut order = vec![start];
    on[start] = true;
    let mut at = start;
    for _ in 1..n {
        let next = (0..n)
            .filter(|&j| !on[j])
            .max_by(|&a, &b| {
                m.bandwidth(at, a)
                    .total_cmp(&m.bandwidth(at, b))
                    .then(m.latency(at, b).total_cmp(&m.latency(at, a)))
                    .then(b.cmp(&a))
            })
            .expect("a peer is left");
        on[next] = true;
        order.push(next);
        at = next;
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Every ring order by brute force (peer 0 first): the best bottleneck, and the least
    /// latency among the orders that reach it.
    fn brute(m: &EdgeMatrix) -> (f64, f64) {
        fn perms(rest: &mut Vec<usize>, at: usize, f: &mut impl FnMut(&[usize])) {
            if at == rest.len() {
                return f(rest);
            }
            for i in at..rest.len() {
                rest.swap(at, i);
                perms(rest, at + 1, f);
                rest.swap(at, i);
            }
        }
        let n = m.len();
        let mut best: Option<(f64, f64)> = None;
        let mut order: Vec<usize> = (0..n).collect();
        perms(&mut order, 1, &mut |o| {
            let s = m.score(o);
            if best.is_none_or(|b| better(s, b)) {
                best = Some(s);
            }
        });
        best.expect("at least one order")
    }

    fn matrix(n: usize, values: &[(f64, f64)]) -> EdgeMatrix {
        let mut m = EdgeMatrix::new(n);
        for i in 0..n {
            for j in 0..n {
                let (b, r) = values[(i * n + j) % values.len()];
                m.set(i, j, b, r);
            }
        }
        m
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// Exact for every group of up to 8 peers, rates from a few levels (ties) or spread.
        #[test]
        fn exact_matches_brute_force(
            n in 2usize..=8,
            values in proptest::collection::vec((0u32..6, 1u32..50), 64),
        ) {
            let values: Vec<(f64, f64)> = values
                .iter()
                .map(|&(b, r)| (f64::from(b) * 1e8, f64::from(r) * 1e-4))
                .collect();
            let m = matrix(n, &values);
            let got = solve(&m, Duration::from_secs(1));
            prop_assert!(got.exact);
            prop_assert_eq!(got.order.len(), n);
            prop_assert_eq!(got.order[0], 0);
            let mut seen = got.order.clone();
            seen.sort_unstable();
            prop_assert_eq!(seen, (0..n).collect::<Vec<_>>());
            let want = brute(&m);
            let score = m.score(&got.order);
            let bottleneck = if want.0.is_finite() { want.0 } else { 0.0 };
            prop_assert_eq!(got.bottleneck, bottleneck, "bottleneck of {:?}", got.order);
            if want.0 > 0.0 {
                prop_assert!((score.1 - want.1).abs() < 1e-12, "latency {} vs {}", score.1, want.1);
            }
        }
    }

    /// A slow pair on the id-order ring is routed around.
    #[test]
    fn a_slow_link_is_avoided() {
        let n = 6;
        let mut m = EdgeMatrix::new(n);
        for i in 0..n {
            for j in 0..n {
                m.set(i, j, 1.25e8, 1e-3);
            }
        }
        m.set(2, 3, 1.25e6, 1e-3); // 10 Mbit/s one way
        assert_eq!(m.score(&(0..n).collect::<Vec<_>>()).0, 1.25e6);
        let got = solve(&m, Duration::from_secs(1));
        assert_eq!(got.bottleneck, 1.25e8, "{got:?}");
        assert!(got.exact);
    }

    /// Ten peers are solved exactly well within a second (debug builds included), sixteen too.
    #[test]
    fn exact_sizes_are_fast() {
        for n in [10, EXACT_MAX_PEERS] {
            let values: Vec<(f64, f64)> = (0..97)
                .map(|k| {
                    (
                        1e8 * f64::from((k * 37 % 11) as u32 + 1),
                        1e-4 * f64::from(k % 7 + 1),
                    )
                })
                .collect();
            let m = matrix(n, &values);
            let start = Instant::now();
            let got = solve(&m, Duration::from_secs(1));
            let took = start.elapsed();
            assert!(got.exact && got.bottleneck > 0.0, "{got:?}");
            println!(
                "{n} peers solved exactly in {took:?}: bottleneck {}",
                got.bottleneck
            );
            if n == 10 {
                assert!(took < Duration::from_secs(1), "10 peers took {took:?}");
            }
        }
    }

    /// Beyond the exact size the heuristic keeps its budget and never loses to the id order.
    #[test]
    fn the_heuristic_is_bounded_and_no_worse_than_id_order() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        // Against the exact answer where it is known.
        for n in [12, EXACT_MAX_PEERS] {
            let mut m = EdgeMatrix::new(n);
            for i in 0..n {
                for j in 0..n {
                    m.set(
                        i,
                        j,
                        1e7 * (next() % 100 + 1) as f64,
                        1e-4 * (next() % 50 + 1) as f64,
                    );
                }
            }
            let h = heuristic(&m, Instant::now() + Duration::from_millis(200));
            let e = exact(&m);
            assert!(!better(
                (h.bottleneck, h.latency),
                (e.bottleneck, e.latency)
            ));
            println!(
                "{n} peers: heuristic bottleneck {:.2} of the exact one",
                h.bottleneck / e.bottleneck
            );
        }
        for n in [17, 32, 64] {
            let mut m = EdgeMatrix::new(n);
            for i in 0..n {
                for j in 0..n {
                    m.set(
                        i,
                        j,
                        1e7 * (next() % 100 + 1) as f64,
                        1e-4 * (next() % 50 + 1) as f64,
                    );
                }
            }
            let start = Instant::now();
            let got = solve(&m, Duration::from_millis(200));
            assert!(start.elapsed() < Duration::from_millis(400), "{n} peers");
            assert!(!got.exact);
            let id = m.score(&(0..n).collect::<Vec<_>>());
            assert!(
                !better(id, (got.bottleneck, got.latency)),
                "{n} peers: {got:?} vs id {id:?}"
            );
            assert!(got.bottleneck <= m.bottleneck_bound());
            println!(
                "{n} peers: heuristic bottleneck {:.2} of the bound, id order {:.2} of it",
                got.bottleneck / m.bottleneck_bound(),
                id.0 / m.bottleneck_bound()
            );
        }
    }
}
