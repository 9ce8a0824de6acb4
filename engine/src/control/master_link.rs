//! The master link: the reader thread (`concord-master-rx`), a caller driving the connection
//! instead, and what either does with a message (into the protocol, effects applied, waiters
//! woken).

use std::sync::Arc;
use std::time::Duration;

use concord_master::proto::MasterMsg;

use super::master_in::read_message;
use crate::peer::{flush, Inner};
use crate::protocol::CollPhase;
use crate::Error;

/// A caller driving the master connection (see [`MasterIn`]); dropping it stops.
pub(crate) struct MasterDriver<'a> {
    inner: &'a Inner,
}

impl<'a> MasterDriver<'a> {
    pub(crate) fn start(inner: &'a Inner) -> Self {
        inner.master_in.aside.enter();
        MasterDriver { inner }
    }

    /// Reads and handles one message if one is waiting and nobody else is reading.
    pub(crate) fn step(&self) {
        let mi = &self.inner.master_in;
        if mi.ended.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let Ok(mut r) = mi.reader.try_lock() else {
            return;
        };
        if r.buffer().is_empty() && !concord_transport::spin::readable(mi.fd) {
            return;
        }
        let msg = read_message(&mut *r);
        drop(r);
        if let Err(e) = msg.and_then(|m| handle_master(self.inner, m)) {
            master_ended(self.inner, e);
        }
    }
}

impl Drop for MasterDriver<'_> {
    fn drop(&mut self) {
        let gave_up = !self.inner.pace.polling();
        self.inner.master_in.aside.leave(gave_up);
    }
}

/// One master message into the protocol (reader thread or driving caller; no lock held).
/// `Err`: the connection is unusable (the master broke the protocol).
fn handle_master(inner: &Inner, msg: MasterMsg) -> Result<(), Error> {
    if !matches!(msg, MasterMsg::Ping) {
        inner.pace.moved();
    }
    // A go-ahead (unless the collective ended at once) and a ping change nothing a caller
    // waits for: wake nobody.
    let quiet = match &msg {
        MasterMsg::Ping => Some(None),
        MasterMsg::CollCommence { tag, .. } => Some(Some(*tag)),
        _ => None,
    };
    let mut g = inner.lock();
    let effects = g.proto.handle(msg)?;
    inner.apply(&mut g, effects);
    flush(&mut g);
    let quiet = match quiet {
        Some(None) => true,
        Some(Some(tag)) => {
            matches!(
                g.proto.collective(tag),
                Some(CollPhase::Run { .. } | CollPhase::Voting)
            ) && g.proto.fatal().is_none()
        }
        None => false,
    };
    if !quiet {
        inner.notify(&mut g);
    }
    let first = std::mem::take(&mut g.first_sends);
    drop(g);
    for f in first {
        f.send();
    }
    Ok(())
}

/// The master connection ended (or broke the protocol): every wait ends with why. Once.
fn master_ended(inner: &Inner, error: Error) {
    if inner
        .master_in
        .ended
        .swap(true, std::sync::atomic::Ordering::AcqRel)
    {
        return;
    }
    let mut g = inner.lock();
    let error = if inner.shutting_down() {
        Error::MasterLost("the communicator was dropped".into())
    } else {
        error
    };
    let effects = g.proto.master_lost(error);
    inner.apply(&mut g, effects);
    inner.notify(&mut g);
    let first = std::mem::take(&mut g.first_sends);
    drop(g);
    drop(first); // Unsent: wakes the TX threads, which find the plane failed.
}

/// The reader thread: master messages into the protocol, until the connection ends.
pub(crate) fn read_master(inner: Arc<Inner>) {
    let mi = &inner.master_in;
    loop {
        if mi.ended.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        if mi.aside.driving() && !inner.shutting_down() {
            mi.aside.wait();
            continue;
        }
        if mi.reader().buffer().is_empty() {
            if inner.pace.polling() {
                // A vote's answer is likely on its way: poll rather than pay a wake-up.
                concord_transport::spin::spin_until(Duration::MAX, || {
                    concord_transport::spin::readable(mi.fd)
                        || !inner.pace.polling()
                        || mi.aside.driving()
                });
                if mi.aside.driving() {
                    continue;
                }
            }
            concord_transport::spin::wait_readable(mi.fd, None);
            if mi.aside.driving() && !inner.shutting_down() {
                continue; // The driver reads what came.
            }
        }
        // May block (holding the reader) if a driver took the bytes meanwhile: then this
        // thread handles the next message, and the driver sees it through `notified`.
        let msg = read_message(&mut *mi.reader());
        if let Err(e) = msg.and_then(|m| handle_master(&inner, m)) {
            return master_ended(&inner, e);
        }
    }
}
