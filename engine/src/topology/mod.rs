//! Measuring the edges between peers for `optimize_topology` (`api/optimize.rs`): one probe
//! per directed edge (`probe`).

pub(crate) mod probe;
