//! Sending: the TX thread of each successor connection, the inline sends of small collectives,
//! and the first frames of a newly registered attempt.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use concord_transport::frame::{DataHeader, HEADER_BYTES};

use super::attempt::Attempt;
use super::connection::Connection;
use super::shared::Shared;
use crate::collective::ring::CollKind;

impl Shared {
    /// Sends `attempt`'s ready frames now, from this thread, if they may go inline (see
    /// [`INLINE_MAX_TOTAL_BYTES`]) and the first connection is free; else wakes the TX threads.
    /// Never call it holding the communicator's lock: a send may finish the operation.
    pub(super) fn send_ready(&self, attempt: &Attempt) {
        if attempt.striped || attempt.device.is_some() || !self.inline.load(Ordering::Relaxed) {
            return self.wake_tx_for(attempt);
        }
        let Some(Ok(mut stream)) = self.tx.first().map(Mutex::try_lock) else {
            // Its TX thread is sending: it may be about to park without seeing this frame.
            return self.wake_tx_for(attempt);
        };
        loop {
            match send_one(self, attempt, 0, &mut stream) {
                Ok(TrySend::Sent) => {}
                Ok(TrySend::Idle) => return,
                Err(e) => {
                    drop(stream);
                    return self.fail(e);
                }
            }
        }
    }

    /// Wakes the TX threads that may send `attempt`'s frames (only the first for an unstriped one).
    pub(super) fn wake_tx_for(&self, attempt: &Attempt) {
        if attempt.striped {
            self.wake_tx();
        } else if let Some(t) = self.tx_threads.get().and_then(|v| v.first()) {
            t.unpark();
        }
    }
}

/// The first frames of a just-registered operation, to send (inline, or by waking a TX thread)
/// once no lock is held. Dropping it unsent wakes the TX threads instead.
#[must_use = "send() the first frames once the communicator's lock is released"]
pub(crate) struct FirstSends(pub(super) Option<(Arc<Shared>, Arc<Attempt>)>);

impl FirstSends {
    pub(crate) fn send(mut self) {
        if let Some((shared, attempt)) = self.0.take() {
            shared.send_ready(&attempt);
        }
    }
}

impl Drop for FirstSends {
    fn drop(&mut self) {
        if let Some((shared, attempt)) = self.0.take() {
            shared.wake_tx_for(&attempt);
        }
    }
}

impl std::fmt::Debug for FirstSends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FirstSends").finish_non_exhaustive()
    }
}

enum TrySend {
    Sent,
    Idle,
}

pub(super) fn tx_loop(s: &Shared, conn: usize) {
    let mut cache: Vec<Arc<Attempt>> = Vec::new();
    let mut cache_gen = u64::MAX;
    let mut turn = 0usize;
    let mut widened = false;
    while !s.failed.load(Ordering::Acquire) {
        s.place_thread(&mut widened);
        {
            let r = s.lock();
            if r.generation != cache_gen {
                cache.clone_from(&r.ops);
                cache_gen = r.generation;
            }
        }
        let n = cache.len();
        let mut progressed = false;
        let mut stream = s.tx[conn].lock().unwrap_or_else(|p| p.into_inner());
        for off in 0..n {
            let attempt = &cache[(turn + off) % n];
            match send_one(s, attempt, conn, &mut stream) {
                Ok(TrySend::Sent) => {
                    turn = (turn + off + 1) % n.max(1);
                    progressed = true;
                    break;
                }
                Ok(TrySend::Idle) => {}
                Err(e) => {
                    drop(stream);
                    return s.fail(e);
                }
            }
        }
        drop(stream);
        if progressed {
            continue;
        }
        // Inline sends carry small collectives: no need to poll for them here.
        if s.polling(conn) && !(conn == 0 && s.inline.load(Ordering::Relaxed)) {
            // A small collective is under way: its next sub-chunk is microseconds away.
            std::thread::yield_now();
            continue;
        }
        // Hold no operation while parked (a retired one's memory goes back at once).
        cache.clear();
        cache_gen = u64::MAX;
        std::thread::park();
    }
}

fn send_one(
    s: &Shared,
    attempt: &Attempt,
    conn: usize,
    stream: &mut Connection,
) -> Result<TrySend, String> {
    if conn > 0 && !attempt.striped {
        return Ok(TrySend::Idle);
    }
    let Some(busy) = attempt.enter() else {
        return Ok(TrySend::Idle);
    };
    // Dynamic striping: whichever TX thread is free claims the next ready send, so a slow
    // connection carries fewer frames instead of setting the pace.
    let (t, j) = loop {
        let Some((k, t, j)) = attempt.next_send() else {
            return Ok(TrySend::Idle);
        };
        if !attempt.send_ready(t, j) {
            return Ok(TrySend::Idle);
        }
        if attempt.claim_send(k) {
            break (t, j);
        }
    };
    if let (0, Some(device)) = (t, &attempt.device) {
        // Step 0 sends the input, which is on its way from the device to the mirror.
        if let Err(why) = device.input_ready() {
            attempt.failed.store(true, Ordering::Release);
            drop(busy);
            s.report(attempt, Err(why.to_string()), true);
            return Ok(TrySend::Idle);
        }
    }
    let plan = &attempt.plan;
    let (c, place) = (plan.send_chunk(t), plan.send_place(t));
    let range = plan.place_bytes(place, c, j);
    // SAFETY: inside a busy guard the buffers are alive. A send from the input reads what
    // nobody writes; any other reads a range the RX thread finished (flag acquired in
    // `send_ready`) and writes again only after this frame reached the successor (ring.rs).
    let payload = unsafe { attempt.buf(place).slice(range.clone()) };
    let header = DataHeader {
        len: payload.len() as u32,
        tag: attempt.tag,
        seq: attempt.seq,
        step: t as u32,
        sub: j as u32,
    };
    stream
        .write_frame(&header, payload)
        .map_err(|e| format!("sending to ring successor {}: {e}", s.next_id))?;
    if j == 1 && t == plan.send_steps().start {
        // Where a test may kill this peer: mid-send of its first step (a broadcast's root).
        crate::fault::kill_point(sent_point(plan.kind), Some(attempt.tag));
    }
    drop(busy);
    if attempt.sent((HEADER_BYTES + header.len as usize) as u64) {
        s.finish(attempt, Ok(attempt.traffic()));
    }
    Ok(TrySend::Sent)
}

/// The fault-injection point after a peer's second frame of its first send step.
fn sent_point(kind: CollKind) -> &'static str {
    match kind {
        CollKind::AllReduce => "all_reduce-sent",
        CollKind::Broadcast => "broadcast-sent",
        CollKind::Reduce => "reduce-sent",
        CollKind::AllGather => "all_gather-sent",
        CollKind::ReduceScatter => "reduce_scatter-sent",
        CollKind::Barrier => "barrier-sent",
    }
}
