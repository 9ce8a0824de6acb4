//! A thread that steps aside while callers drive its connection (the master reader for the
//! master connection, the first RX thread for the first ring connection; see
//! `control::master_in::MasterIn` and `plane::Driver`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// How often a thread that stepped aside looks again. A driver that got its outcome does not
/// wake it, to keep a thread wake-up off every collective; one that gave up does.
const RECHECK: Duration = Duration::from_millis(1);

/// Who drives a connection now: callers (counted), else its own thread.
#[derive(Debug, Default)]
pub(crate) struct Aside {
    drivers: AtomicUsize,
    lock: Mutex<()>,
    cv: Condvar,
}

impl Aside {
    /// Whether callers drive now (the owning thread should stay aside).
    pub(crate) fn driving(&self) -> bool {
        self.drivers.load(Ordering::Acquire) > 0
    }

    /// A caller starts driving.
    pub(crate) fn enter(&self) {
        self.drivers.fetch_add(1, Ordering::AcqRel);
    }

    /// A caller stops; `gave_up` (nothing moved for a whole polling window): the owning thread
    /// takes over at once instead of at its next look.
    pub(crate) fn leave(&self, gave_up: bool) {
        if self.drivers.fetch_sub(1, Ordering::AcqRel) == 1 && gave_up {
            let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.cv.notify_all();
        }
    }

    /// The owning thread: waits while callers drive, at most [`RECHECK`].
    pub(crate) fn wait(&self) {
        let g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        if self.driving() {
            drop(self.cv.wait_timeout(g, RECHECK));
        }
    }
}
