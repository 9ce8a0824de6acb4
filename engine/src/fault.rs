//! Fault injection for the tests: `CONCORD_FAULT_KILL_AT=<point>[:<tag>][,...]` makes this
//! process SIGKILL itself when it reaches one of the points (for collective `tag`, if given).
//! Points:
//! `vote` (just voted to start a collective), `reduce-scatter` and `all-gather` (receiving the
//! first frame of that phase of an all-reduce), a collective's name (`broadcast`, `reduce`,
//! `all_gather`, `reduce_scatter`, `all_reduce`: receiving its first frame), that name with
//! `-sent` (after sending the second frame of its first step: a broadcast's root), `connect` (building ring connections), `serve` (after serving a
//! piece of shared state; the number is the sync's revision there, not a tag). Read once; costs one
//! comparison per call when unset.

use std::sync::OnceLock;

fn targets() -> &'static [(String, Option<u64>)] {
    static T: OnceLock<Vec<(String, Option<u64>)>> = OnceLock::new();
    T.get_or_init(|| {
        let Ok(v) = std::env::var("CONCORD_FAULT_KILL_AT") else {
            return Vec::new();
        };
        v.split(',')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let mut parts = p.splitn(2, ':');
                let point = parts.next().unwrap_or_default().to_string();
                let tag = parts.next().and_then(|t| t.parse().ok());
                (point, tag)
            })
            .collect()
    })
}

/// Dies here if told to.
pub(crate) fn kill_point(point: &str, tag: Option<u64>) {
    let hit = targets()
        .iter()
        .any(|(p, want)| p == point && (want.is_none() || *want == tag));
    if hit {
        eprintln!("concord: fault injection: SIGKILL at {point}");
        // SAFETY: plain libc calls with no pointers; the process ends here.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

/// The text of a panic payload.
pub(crate) fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-text panic".into())
}

/// Testing hook: `CONCORD_FAULT_PANIC_TAG=N` makes the reduction of collective `N` panic on this
/// peer, to prove that a worker panic fails only that collective. Read once.
pub(crate) fn injected_panic_tag() -> Option<u64> {
    static TAG: OnceLock<Option<u64>> = OnceLock::new();
    *TAG.get_or_init(|| {
        std::env::var("CONCORD_FAULT_PANIC_TAG")
            .ok()
            .and_then(|v| v.parse().ok())
    })
}
