//! Shared helpers for the Concord criterion benchmarks (see `benches/`).
