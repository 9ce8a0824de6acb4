//! Receiving: the RX thread of each predecessor connection, and a caller driving the first
//! one. Each frame is looked up, checked, then copied or reduced into its attempt's buffer.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use concord_transport::frame::HEADER_BYTES;

use super::attempt::Attempt;
use super::shared::{Pending, RxConn, Shared};
use crate::collective::ring::RecvKind;
use crate::fault::{injected_panic_tag, panic_message};

/// A caller receiving on the first connection while it waits for a small blocking collective:
/// the frame goes from the socket through the reduction to the next send on one thread, and the
/// RX thread stays aside. Dropping it hands the connection back.
pub(crate) struct Driver(pub(super) Arc<Shared>);

impl Driver {
    /// Receives one frame if one is waiting, the collectives here are small enough and nobody
    /// else is receiving.
    pub(crate) fn step(&self) {
        let s = &*self.0;
        if !s.inline.load(Ordering::Relaxed) || s.failed.load(Ordering::Acquire) {
            return;
        }
        // A ring of one has no connections.
        let Some(Ok(mut c)) = s.rx.first().map(Mutex::try_lock) else {
            return;
        };
        if c.held.is_none() && !c.stream.readable_now() {
            return;
        }
        if let Err(e) = recv_one(s, 0, &mut c, false) {
            drop(c);
            s.fail(e);
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let s = &*self.0;
        s.aside.leave(!s.pace.polling());
    }
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver").finish_non_exhaustive()
    }
}

/// Finds the operation of a frame, waiting a bounded time for its registration (the frame may
/// overtake the master's go-ahead). `Ok(None)`: a retired operation, drop the frame.
fn lookup(s: &Shared, tag: u64, seq: u64) -> Result<Option<Arc<Attempt>>, String> {
    let deadline = Instant::now() + s.register_timeout;
    let mut r = s.lock();
    loop {
        if let Some(found) = r.find(tag, seq)? {
            return Ok(found);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "ring predecessor {} sent a frame of collective {tag} (seq {seq}), which this peer never started",
                s.prev_id
            ));
        }
        if s.pace.polling() {
            // The master's go-ahead is usually microseconds behind the frame.
            drop(r);
            std::thread::yield_now();
            r = s.lock();
            continue;
        }
        r = s
            .registry_cv
            .wait_timeout(r, left)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
}

fn finish_pending(s: &Shared, p: Pending) {
    let Pending {
        op,
        busy,
        m,
        bytes,
        frame,
    } = p;
    let result = op
        .device
        .as_ref()
        .expect("a device collective")
        .reduce_done(frame);
    drop(busy);
    match result {
        Err(why) => {
            op.failed.store(true, Ordering::Release);
            s.report(&op, Err(why), true);
        }
        Ok(()) => {
            let done = op.received(m, bytes);
            s.wake_tx_for(&op);
            if done {
                s.finish(&op, Ok(op.traffic()));
            }
        }
    }
}

pub(super) fn rx_loop(s: &Shared, conn: usize) {
    // Since when the first connection has been quiet while waiting without its lock: after a
    // whole `register_timeout` with collectives expecting data, the blocking read below (with
    // its timeout) takes over, so a silent predecessor is still an error, as on the others.
    let mut quiet_since: Option<Instant> = None;
    while !s.failed.load(Ordering::Acquire) {
        if conn == 0 && s.aside.driving() {
            // A caller receives here itself for now.
            quiet_since = None;
            s.aside.wait();
            continue;
        }
        let mut c = s.rx[conn].lock().unwrap_or_else(|p| p.into_inner());
        if c.pending.is_some() && !c.stream.readable_now() {
            let p = c.pending.take().expect("checked");
            finish_pending(s, p);
        }
        // Only where a caller may drive (small collectives) does this thread wait for bytes
        // without the lock; otherwise it blocks in the read, one syscall per frame as before.
        let drivable = conn == 0 && s.inline.load(Ordering::Relaxed);
        let silent_too_long = quiet_since
            .is_some_and(|q| q.elapsed() >= s.register_timeout && !s.lock().ops.is_empty());
        if drivable && c.held.is_none() && !c.stream.readable_now() && !silent_too_long {
            drop(c);
            quiet_since.get_or_insert_with(Instant::now);
            let fd = s.rx_fds[0];
            if s.polling(conn) {
                // A small collective is under way: its next frame is microseconds away.
                concord_transport::spin::spin_until(Duration::MAX, || {
                    concord_transport::spin::readable(fd) || !s.polling(conn) || s.aside.driving()
                });
                continue;
            }
            // Bounded, to notice the plane failing, a driver, or a long silence.
            if !concord_transport::spin::wait_readable(fd, Some(Duration::from_millis(100)))
                || s.aside.driving()
            {
                continue;
            }
            c = s.rx[conn].lock().unwrap_or_else(|p| p.into_inner());
        }
        quiet_since = None;
        if let Err(e) = recv_one(s, conn, &mut c, true) {
            if let Some(p) = c.pending.take() {
                finish_pending(s, p);
            }
            drop(c);
            return s.fail(e);
        }
    }
    let mut c = s.rx[conn].lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = c.pending.take() {
        finish_pending(s, p);
    }
}

/// Receives one frame on `conn`. `may_wait`: wait for the frame's collective to be registered
/// here; else (a driving caller, who registers collectives itself) keep the header for later.
fn recv_one(s: &Shared, conn: usize, c: &mut RxConn, may_wait: bool) -> Result<(), String> {
    let RxConn {
        stream,
        staging,
        pending,
        held,
    } = c;
    let from = s.prev_id;
    let io = |e: std::io::Error| format!("receiving from ring predecessor {from}: {e}");
    let idle = || s.lock().ops.is_empty();
    if held.is_none() && s.polling(conn) {
        // A small collective is under way: its next frame is microseconds away.
        concord_transport::spin::spin_until(Duration::MAX, || {
            stream.readable_now() || !s.polling(conn)
        });
    }
    let h = match held.take() {
        Some(h) => h,
        None => stream
            .read_header(idle)
            .map_err(|e| format!("receiving from ring predecessor {from}: {e}"))?,
    };
    s.pace.moved();
    let found = if may_wait {
        lookup(s, h.tag, h.seq)?
    } else {
        let now = s.lock().find(h.tag, h.seq)?; // The registry lock ends here.
        match now {
            Some(found) => found,
            None => {
                *held = Some(h);
                return Ok(());
            }
        }
    };
    let op = match found {
        // Failed here (its abort is on its way) or retired: drop what is still in flight.
        Some(op) if !op.failed.load(Ordering::Acquire) => op,
        _ => return stream.discard(h.len as usize).map_err(io),
    };
    let plan = &op.plan;
    let (t, j) = (h.step as usize, h.sub as usize);
    let valid = t < plan.steps() && j < plan.subs(plan.recv_chunk(t));
    let m = if valid {
        op.recv_prefix[t] + j
    } else {
        usize::MAX
    };
    let range = if valid {
        plan.sub_bytes(plan.recv_chunk(t), j)
    } else {
        0..0
    };
    if !valid || h.len as usize != range.len() {
        return Err(format!(
            "ring predecessor {from} sent step {t} sub-chunk {j} ({} bytes) of collective {}, which has no such frame of that size",
            h.len,
            h.tag,
        ));
    }
    if !op.claim_recv(m) {
        return Err(format!(
            "ring predecessor {from} sent step {t} sub-chunk {j} of collective {} twice",
            h.tag
        ));
    }
    let Some(busy) = op.enter() else {
        return stream.discard(h.len as usize).map_err(io);
    };
    // SAFETY: inside a busy guard; this RX thread is the only writer of receive `m`'s range, and
    // the TX thread reads it only after the flag set below.
    let out = unsafe { op.dst.slice_mut(range.clone()) };
    let kind = plan.recv_kind(t);
    if j == 0 && (t == 0 || t + 1 == plan.world) {
        let phase = if kind == RecvKind::Copy {
            "all-gather"
        } else {
            "reduce-scatter"
        };
        crate::fault::kill_point(phase, Some(op.tag));
    }
    // Only a device reduce-scatter frame may overtake the pending one.
    if op.device.is_none() || kind == RecvKind::Copy {
        if let Some(p) = pending.take() {
            finish_pending(s, p);
        }
    }
    if let Some(device) = &op.device {
        let len = range.len();
        let finish = (kind == RecvKind::ReduceFinish).then_some(plan.world);
        let outcome = match device.lane(conn) {
            Err(why) => {
                stream.discard(len).map_err(io)?;
                Err(why)
            }
            Ok(lane) if kind == RecvKind::Copy => {
                stream.read_exact(out).map_err(io)?;
                device.copy_in(&lane, range.clone())
            }
            Ok(lane) => {
                lane.receive(len, |buf| stream.read_exact(buf))
                    .map_err(io)?;
                match device.reduce_async(&lane, range.clone(), finish) {
                    Ok(frame) => {
                        // The previous frame's host buffer takes the lane's next frame: finish
                        // it now, while this one's copies and kernel run.
                        if let Some(p) = pending.take() {
                            finish_pending(s, p);
                        }
                        *pending = Some(Pending {
                            busy: busy.into_owned(&op),
                            op: Arc::clone(&op),
                            m,
                            bytes: (HEADER_BYTES + len) as u64,
                            frame,
                        });
                        return Ok(());
                    }
                    Err(why) => Err(why),
                }
            }
        };
        if let Err(why) = outcome {
            // This operation fails; the connection and the other operations carry on.
            op.failed.store(true, Ordering::Release);
            drop(busy);
            s.report(&op, Err(why), true);
            return Ok(());
        }
    } else if kind == RecvKind::Copy {
        // In place, the range's original goes to the backup before the first write (a failure
        // puts it back; `op.backup_stores` streams large backups, which only a failure reads).
        // Device collectives keep their own backup.
        // SAFETY: inside a busy guard; this RX thread is the only writer of the range now.
        if let Some(save) = unsafe { op.claim_save(plan.recv_chunk(t), j) } {
            concord_kernels::copy(save, out, op.backup_stores).map_err(|e| e.to_string())?;
        }
        stream.read_exact(out).map_err(io)?;
    } else {
        stream.read_staged(staging, range.len()).map_err(io)?;
        let staged = &staging[..range.len()];
        let finish = (kind == RecvKind::ReduceFinish).then_some(plan.world);
        let c = plan.recv_chunk(t);
        let reduce = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if injected_panic_tag() == Some(op.tag) {
                panic!("injected fault: CONCORD_FAULT_PANIC_TAG={}", op.tag);
            }
            // SAFETY: inside a busy guard; this RX thread is the only writer of the range now,
            // and the backup range is claimed only right before it is filled.
            match unsafe { op.claim_save(c, j) } {
                // In place, first write: save each block of the original while reducing it.
                Some(save) => concord_kernels::reduce_into_saving(
                    out,
                    staged,
                    save,
                    op.backup_stores,
                    op.dtype,
                    op.op,
                    finish,
                ),
                None => {
                    // SAFETY: inside a busy guard, by the range's writer; in place, saved by an
                    // earlier writer (the claim above found it done).
                    let mine = unsafe { op.original(c, j) };
                    concord_kernels::reduce_out_with(
                        out, mine, staged, op.dtype, op.op, finish, op.stores,
                    )
                }
            }
        }));
        let failure = match reduce {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(panic) => Some(format!("the reduction panicked: {}", panic_message(&panic))),
        };
        if let Some(why) = failure {
            // This operation fails; the connection and the other operations carry on.
            op.failed.store(true, Ordering::Release);
            drop(busy);
            s.report(&op, Err(why), true);
            return Ok(());
        }
    }
    drop(busy);
    let done = op.received(m, (HEADER_BYTES + range.len()) as u64);
    s.send_ready(&op);
    if done {
        s.finish(&op, Ok(op.traffic()));
    }
    Ok(())
}
