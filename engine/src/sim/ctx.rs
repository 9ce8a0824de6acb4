//! What every handler of the simulation may touch besides its own state: virtual time, the
//! network, the invariant checker, the settings, the trace.

use std::collections::{BTreeMap, VecDeque};

use concord_master::coordinator::ConnId;

use super::check::Checker;
use super::net::{Net, Time};
use super::SimConfig;

/// The master connection of the peer with index `idx` (one per peer, never reused).
pub(crate) fn conn_of(idx: usize) -> ConnId {
    idx as ConnId + 1
}

/// Counters for the summary.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) control_messages: u64,
    pub(crate) data_frames: u64,
    pub(crate) events: u64,
    pub(crate) kills: u64,
    pub(crate) stalls: u64,
    pub(crate) long_stalls: u64,
    pub(crate) joins: u64,
    pub(crate) drops: u64,
    pub(crate) timeouts: u64,
}

/// What every handler may touch besides its own state.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub(crate) now: Time,
    pub(crate) net: Net,
    pub(crate) checker: Checker,
    pub(crate) config: SimConfig,
    /// Data address ("ip:port") of each peer, as the master will list it in rings.
    pub(crate) directory: BTreeMap<String, usize>,
    pub(crate) stats: Stats,
    pub(crate) trace: VecDeque<String>,
}

impl Ctx {
    /// Adds a line to the trace (formatted only when a trace is kept).
    pub(crate) fn trace(&mut self, line: impl FnOnce() -> String) {
        if self.config.trace_lines == 0 {
            return;
        }
        if self.trace.len() == self.config.trace_lines {
            self.trace.pop_front();
        }
        let t = self.now;
        self.trace.push_back(format!(
            "{:>6}.{:06} {}",
            t / 1_000_000,
            t % 1_000_000,
            line()
        ));
    }
}
