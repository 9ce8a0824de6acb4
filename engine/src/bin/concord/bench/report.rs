//! What `concord bench` prints and writes: the banner, one row per size, the footer, JSON.

use std::io::Write;
use std::path::PathBuf;

use super::BenchArgs;

/// One size's figures, as the table and the JSON carry them.
#[derive(Debug, serde::Serialize)]
pub(super) struct Row {
    /// The collective, by nccl-tests' name.
    pub(super) coll: &'static str,
    pub(super) size_bytes: usize,
    pub(super) count: usize,
    pub(super) dtype: &'static str,
    pub(super) op: &'static str,
    pub(super) time_us: f64,
    pub(super) p10_us: f64,
    pub(super) p90_us: f64,
    pub(super) algbw_gbps: f64,
    pub(super) busbw_gbps: f64,
    pub(super) wrong: u64,
    /// CPU seconds (user + system, all peer processes) per GB of buffer reduced; none for a
    /// zero-byte row (N/A in the table, null in the JSON).
    pub(super) cpu_s_per_gb: Option<f64>,
}

/// One table row (rank 0 prints it).
pub(super) fn print_row(out: &mut impl Write, row: &Row, checked: bool) {
    let wrong_col = if checked {
        row.wrong.to_string()
    } else {
        "N/A".into()
    };
    let cpu_col = row
        .cpu_s_per_gb
        .map_or_else(|| "N/A".into(), |c| format!("{c:.3}"));
    let _ = writeln!(
        out,
        "{:>12} {:>12} {:>8} {:>6} {:>10.1} {:>8.3} {:>8.3} {:>7} {:>9.1} {:>9.1} {:>9}",
        row.size_bytes,
        row.count,
        row.dtype,
        row.op,
        row.time_us,
        row.algbw_gbps,
        row.busbw_gbps,
        wrong_col,
        row.p10_us,
        row.p90_us,
        cpu_col
    );
    let _ = out.flush();
}

/// The nccl-tests footer: wrong elements and the average bus bandwidth.
pub(super) fn print_footer(out: &mut impl Write, total_wrong: u64, avg_busbw: f64) {
    let _ = writeln!(
        out,
        "# Out of bounds values : {total_wrong} {}",
        if total_wrong == 0 { "OK" } else { "FAILED" }
    );
    let _ = writeln!(out, "# Avg bus bandwidth    : {avg_busbw:.3}");
    let _ = writeln!(out, "#");
}

pub(super) fn print_banner(
    out: &mut impl Write,
    args: &BenchArgs,
    world: usize,
    transport: concord::BackendKind,
) {
    let _ = writeln!(
        out,
        "# concord bench {}: {}{}, {world} peers, {} {}, {}, kernels {}, transport {transport}, {} conn(s)/neighbour, sub-chunk {} B, polling {} us",
        env!("CARGO_PKG_VERSION"),
        args.coll,
        if args.coll.has_root() {
            format!(" (root {})", args.root)
        } else {
            String::new()
        },
        args.dtype,
        args.op,
        if args.in_place { "in-place" } else { "out-of-place" },
        concord_kernels::cpu_path(),
        args.conns,
        args.sub_chunk,
        args.spin().as_micros(),
    );
    let _ = writeln!(
        out,
        "# time: median over {} iterations ({} warm-up) of the slowest peer; p10/p90 its spread",
        args.iters, args.warmup
    );
    let _ = writeln!(
        out,
        "# {:>10} {:>12} {:>8} {:>6} {:>10} {:>8} {:>8} {:>7} {:>9} {:>9} {:>9}",
        "size(B)",
        "count",
        "type",
        "redop",
        "time(us)",
        "algbw",
        "busbw",
        "#wrong",
        "p10(us)",
        "p90(us)",
        "cpu(s/GB)"
    );
    let _ = writeln!(
        out,
        "# {:>10} {:>12} {:>8} {:>6} {:>10} {:>8} {:>8} {:>7}",
        "", "(elements)", "", "", "", "(GB/s)", "(GB/s)", ""
    );
}

pub(super) fn write_json(
    path: &PathBuf,
    args: &BenchArgs,
    world: usize,
    transport: concord::BackendKind,
    rows: &[Row],
    avg_busbw: f64,
) -> Result<(), String> {
    let doc = serde_json::json!({
        "tool": "concord bench",
        "version": env!("CARGO_PKG_VERSION"),
        "world": world,
        "coll": args.coll.name(),
        "root": args.root,
        "dtype": args.dtype.name(),
        "op": args.op.name(),
        "in_place": args.in_place,
        "iters": args.iters,
        "warmup_iters": args.warmup,
        "kernels": concord_kernels::cpu_path(),
        "transport": transport.name(),
        "conns_per_neighbour": args.conns,
        "sub_chunk_bytes": args.sub_chunk,
        "spin_us": args.spin().as_micros() as u64,
        "results": rows,
        "avg_busbw_gbps": avg_busbw,
    });
    let text = serde_json::to_string_pretty(&doc).expect("serialisable");
    std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))
}
