//! `concord bench --topology`: the measured matrix and the ring chosen from it.

use std::io::Write;

use concord::TopologyReport;

/// Prints the bandwidth and round-trip matrices (peers in id order), the ring before with its
/// predicted busbw, and the ring chosen with its own. A pipelined ring all-reduce's busbw is
/// at most its slowest edge's bandwidth, which is the prediction.
pub(super) fn print(out: &mut impl Write, r: &TopologyReport, probe_bytes: usize) {
    let n = r.peers.len();
    let mut by_id: Vec<usize> = (0..n).collect();
    by_id.sort_by_key(|&k| r.peers[k]);
    let _ = writeln!(
        out,
        "# topology: {} of {} directed edges probed now (up to {} MiB each), the rest measured before",
        r.probed,
        n * n.saturating_sub(1),
        probe_bytes >> 20
    );
    let table = |out: &mut dyn Write, what: &str, cell: &dyn Fn(usize, usize) -> String| {
        let _ = write!(out, "# {what:>14}");
        for &b in &by_id {
            let _ = write!(out, " {:>9}", r.peers[b]);
        }
        let _ = writeln!(out);
        for &a in &by_id {
            let _ = write!(out, "# {:>14}", r.peers[a]);
            for &b in &by_id {
                let c = if a == b { "-".to_string() } else { cell(a, b) };
                let _ = write!(out, " {c:>9}");
            }
            let _ = writeln!(out);
        }
    };
    table(out, "GB/s from\\to", &|a, b| {
        format!("{:.3}", r.bandwidth[a][b] / 1e9)
    });
    table(out, "rtt us", &|a, b| format!("{:.0}", r.rtt[a][b] * 1e6));
    let ring = |ids: &[u64]| {
        ids.iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(" -> ")
    };
    let _ = writeln!(
        out,
        "# ring before: {} (predicted busbw {:.3} GB/s, its slowest edge)",
        ring(&r.before),
        r.before_bottleneck / 1e9
    );
    let _ = writeln!(
        out,
        "# ring chosen: {} (predicted busbw {:.3} GB/s, {}); the rows below run on it",
        ring(&r.chosen),
        r.chosen_bottleneck / 1e9,
        if r.exact {
            "the best possible"
        } else {
            "heuristic"
        }
    );
}

/// The report as JSON.
pub(super) fn json(r: &TopologyReport) -> serde_json::Value {
    serde_json::json!({
        "peers": r.peers,
        "bandwidth_bytes_per_s": r.bandwidth,
        "rtt_s": r.rtt,
        "probed": r.probed,
        "before": r.before,
        "before_bottleneck_bytes_per_s": r.before_bottleneck,
        "chosen": r.chosen,
        "chosen_bottleneck_bytes_per_s": r.chosen_bottleneck,
        "exact": r.exact,
    })
}
