//! Receiving: the RX thread of each predecessor connection, and a caller driving the first
//! one. Each frame is looked up, checked, then copied or reduced into its attempt's buffer.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use concord_transport::frame::HEADER_BYTES;

use super::attempt::Attempt;
use super::shared::{Pending, RxConn, Shared};
use crate::collective::ring::{CollKind, RecvKind};
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
        attempt,
        busy,
        m,
        bytes,
        frame,
    } = p;
    let result = attempt
        .device
        .as_ref()
        .expect("a device collective")
        .reduce_done(frame);
    drop(busy);
    match result {
        Err(why) => {
            attempt.failed.store(true, Ordering::Release);
            s.report(&attempt, Err(why.to_string()), true);
        }
        Ok(()) => {
            let done = attempt.received(m, bytes);
            s.wake_tx_for(&attempt);
            if done {
                s.finish(&attempt, Ok(attempt.traffic()));
            }
        }
    }
}

pub(super) fn rx_loop(s: &Shared, conn: usize) {
    // Since when the first connection has been quiet while waiting without its lock: after a
    // whole `register_timeout` with collectives expecting data, the blocking read below (with
    // its timeout) takes over, so a silent predecessor is still an error, as on the others.
    let mut quiet_since: Option<Instant> = None;
    let mut widened = false;
    while !s.failed.load(Ordering::Acquire) {
        s.place_thread(&mut widened);
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
            let probe = &s.rx_probes[0];
            if s.polling(conn) {
                // A small collective is under way: its next frame is microseconds away.
                concord_transport::spin::spin_until(Duration::MAX, || {
                    probe.readable() || !s.polling(conn) || s.aside.driving()
                });
                continue;
            }
            // Bounded, to notice the plane failing, a driver, or a long silence.
            if !probe.wait(Duration::from_millis(100)) || s.aside.driving() {
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
///
/// The steps: read the header, find its attempt, check the frame against the attempt's
/// schedule, then land the payload (device, copy or reduce) and publish it for TX.
fn recv_one(s: &Shared, conn: usize, c: &mut RxConn, may_wait: bool) -> Result<(), String> {
    let h = next_header(s, conn, c)?;
    let attempt = match find_attempt(s, c, h, may_wait)? {
        Found::Attempt(attempt) => attempt,
        Found::Held => return Ok(()),
        Found::Drop => {
            return c
                .stream
                .discard(h.len as usize)
                .map_err(|e| s.recv_error(e))
        }
    };
    let frame = check_frame(s, &attempt, &h)?;
    let Some(busy) = attempt.enter() else {
        return c
            .stream
            .discard(h.len as usize)
            .map_err(|e| s.recv_error(e));
    };
    let plan = &attempt.plan;
    let kind = plan.recv_kind(frame.step);
    if frame.sub == 0 && frame.step == plan.recv_steps().start {
        // Where a test may kill this peer: its first frame of the collective.
        crate::fault::kill_point(plan.kind.name(), Some(attempt.tag));
    }
    if plan.kind == CollKind::AllReduce
        && frame.sub == 0
        && (frame.step == 0 || frame.step + 1 == plan.world)
    {
        let phase = if kind == RecvKind::Copy {
            "all-gather"
        } else {
            "reduce-scatter"
        };
        crate::fault::kill_point(phase, Some(attempt.tag));
    }
    // Only a device reduce-scatter frame may overtake the pending one.
    if attempt.device.is_none() || kind == RecvKind::Copy {
        if let Some(p) = c.pending.take() {
            finish_pending(s, p);
        }
    }
    let landed = if attempt.device.is_some() {
        land_device(s, conn, c, &attempt, busy, &frame, kind)?
    } else if kind == RecvKind::Copy {
        land_copy(s, c, &attempt, &frame)?;
        Landed::Done(busy)
    } else {
        land_reduce(s, c, &attempt, busy, &frame, kind)?
    };
    match landed {
        Landed::Pending | Landed::Failed => {}
        Landed::Done(busy) => {
            drop(busy);
            let done = attempt.received(frame.receive, (HEADER_BYTES + frame.range.len()) as u64);
            s.send_ready(&attempt);
            if done {
                s.finish(&attempt, Ok(attempt.traffic()));
            }
        }
    }
    Ok(())
}

/// Where a received frame belongs in its attempt.
struct Frame {
    step: usize,
    sub: usize,
    /// The receive's index in the attempt's schedule (its claim and ready flag).
    receive: usize,
    /// The chunk it belongs to.
    chunk: usize,
    /// Its bytes in the buffer it lands in ([`Attempt::buf`] of the chunk's `out_place`).
    range: std::ops::Range<usize>,
}

/// What a frame's header found.
enum Found {
    Attempt(Arc<Attempt>),
    /// Not registered yet; a driving caller keeps the header for later.
    Held,
    /// Failed here (its abort is on its way) or retired: drop what is still in flight.
    Drop,
}

/// What landing a payload came to.
enum Landed<'a> {
    /// Received in full: publish it.
    Done(super::attempt::Busy<'a>),
    /// A device frame whose GPU work still runs (see [`Pending`]).
    Pending,
    /// The attempt failed alone and was reported; the connection carries on.
    Failed,
}

impl Shared {
    fn recv_error(&self, e: std::io::Error) -> String {
        format!("receiving from ring predecessor {}: {e}", self.prev_id)
    }
}

/// The next header: one a driving caller held back, else read from the socket (polling first
/// while a small collective is under way).
fn next_header(
    s: &Shared,
    conn: usize,
    c: &mut RxConn,
) -> Result<concord_transport::frame::DataHeader, String> {
    let stream = &mut c.stream;
    if c.held.is_none() && s.polling(conn) {
        // A small collective is under way: its next frame is microseconds away.
        concord_transport::spin::spin_until(Duration::MAX, || {
            stream.readable_now() || !s.polling(conn)
        });
    }
    let h = match c.held.take() {
        Some(h) => h,
        None => {
            let idle = || s.lock().ops.is_empty();
            stream.read_header(idle).map_err(|e| s.recv_error(e))?
        }
    };
    s.pace.moved();
    Ok(h)
}

fn find_attempt(
    s: &Shared,
    c: &mut RxConn,
    h: concord_transport::frame::DataHeader,
    may_wait: bool,
) -> Result<Found, String> {
    let found = if may_wait {
        lookup(s, h.tag, h.seq)?
    } else {
        let now = s.lock().find(h.tag, h.seq)?; // The registry lock ends here.
        match now {
            Some(found) => found,
            None => {
                c.held = Some(h);
                return Ok(Found::Held);
            }
        }
    };
    Ok(match found {
        Some(attempt) if !attempt.failed.load(Ordering::Acquire) => Found::Attempt(attempt),
        _ => Found::Drop,
    })
}

/// Checks that the attempt's schedule has this frame, of this size, and that it arrives once.
fn check_frame(
    s: &Shared,
    attempt: &Attempt,
    h: &concord_transport::frame::DataHeader,
) -> Result<Frame, String> {
    let from = s.prev_id;
    let plan = &attempt.plan;
    let (t, j) = (h.step as usize, h.sub as usize);
    let chunk = plan.recv_chunk(t);
    let valid = plan.recv_steps().contains(&t) && j < plan.subs(chunk);
    let range = if valid {
        plan.place_bytes(plan.out_place(chunk), chunk, j)
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
    let receive = attempt.recv_index(t, j);
    if !attempt.claim_recv(receive) {
        return Err(format!(
            "ring predecessor {from} sent step {t} sub-chunk {j} of collective {} twice",
            h.tag
        ));
    }
    Ok(Frame {
        step: t,
        sub: j,
        receive,
        chunk,
        range,
    })
}

impl Attempt {
    /// The buffer a frame lands in.
    fn out(&self, frame: &Frame) -> &crate::raw_buf::RawBuf {
        self.buf(self.plan.out_place(frame.chunk))
    }
}

/// Fails `attempt` alone (the connection and the other attempts carry on).
fn fail_alone(s: &Shared, attempt: &Attempt, why: String) {
    attempt.failed.store(true, Ordering::Release);
    s.report(attempt, Err(why), true);
}

/// A device collective's frame: all-gather frames land in the mirror and are copied to the
/// device; reduce-scatter frames go through the lane's pinned buffer to the GPU's reduction,
/// which runs on while the next frame is received.
fn land_device<'a>(
    s: &Shared,
    conn: usize,
    c: &mut RxConn,
    attempt: &'a Arc<Attempt>,
    busy: super::attempt::Busy<'a>,
    frame: &Frame,
    kind: RecvKind,
) -> Result<Landed<'a>, String> {
    let device = attempt.device.as_ref().expect("a device collective");
    let range = frame.range.clone();
    let len = range.len();
    let outcome = match device.lane(conn) {
        Err(why) => {
            c.stream.discard(len).map_err(|e| s.recv_error(e))?;
            Err(why)
        }
        Ok(lane) if kind == RecvKind::Copy => {
            // SAFETY: inside a busy guard; this RX thread is the only writer of the receive's
            // range, and the TX thread reads it only after its ready flag is set.
            let out = unsafe { attempt.dst.slice_mut(range.clone()) };
            c.stream.read_exact(out).map_err(|e| s.recv_error(e))?;
            device.copy_in(&lane, range)
        }
        Ok(lane) => {
            let stream = &mut c.stream;
            lane.receive(len, |buf| stream.read_exact(buf))
                .map_err(|e| s.recv_error(e))?;
            let finish = (kind == RecvKind::ReduceFinish).then_some(attempt.plan.world);
            match device.reduce_async(&lane, range, finish) {
                Ok(gpu_frame) => {
                    // The previous frame's host buffer takes the lane's next frame: finish it
                    // now, while this one's copies and kernel run.
                    if let Some(p) = c.pending.take() {
                        finish_pending(s, p);
                    }
                    c.pending = Some(Pending {
                        busy: busy.into_owned(attempt),
                        attempt: Arc::clone(attempt),
                        m: frame.receive,
                        bytes: (HEADER_BYTES + len) as u64,
                        frame: gpu_frame,
                    });
                    return Ok(Landed::Pending);
                }
                Err(why) => Err(why),
            }
        }
    };
    match outcome {
        Ok(()) => Ok(Landed::Done(busy)),
        Err(why) => {
            drop(busy);
            fail_alone(s, attempt, why.to_string());
            Ok(Landed::Failed)
        }
    }
}

/// An all-gather frame of a host collective: read straight into place. In place, the range's
/// original goes to the backup before the first write (a failure puts it back;
/// `attempt.backup_stores` streams large backups, which only a failure reads).
fn land_copy(s: &Shared, c: &mut RxConn, attempt: &Attempt, frame: &Frame) -> Result<(), String> {
    // SAFETY: inside a busy guard; this RX thread is the only writer of the receive's range,
    // and the TX thread reads it only after its ready flag is set.
    let out = unsafe { attempt.out(frame).slice_mut(frame.range.clone()) };
    // SAFETY: inside a busy guard; this RX thread is the only writer of the range now.
    if let Some(save) = unsafe { attempt.claim_save(frame.chunk, frame.sub) } {
        concord_kernels::copy(save, out, attempt.backup_stores).map_err(|e| e.to_string())?;
    }
    c.stream.read_exact(out).map_err(|e| s.recv_error(e))
}

/// A reduce-scatter frame of a host collective: reduced with this peer's own chunk into place
/// from where it arrived (the staging buffer, or the shared-memory ring) (in place, saving each block of the original while
/// reducing it). A failed or panicking reduction fails the attempt alone.
fn land_reduce<'a>(
    s: &Shared,
    c: &mut RxConn,
    attempt: &'a Attempt,
    busy: super::attempt::Busy<'a>,
    frame: &Frame,
    kind: RecvKind,
) -> Result<Landed<'a>, String> {
    let len = frame.range.len();
    // SAFETY: inside a busy guard; this RX thread is the only writer of the receive's range,
    // and the TX thread reads it only after its ready flag is set.
    let out = unsafe { attempt.out(frame).slice_mut(frame.range.clone()) };
    let finish = (kind == RecvKind::ReduceFinish).then_some(attempt.plan.world);
    let chunk = frame.chunk;
    let reduce_with = |staged: &[u8]| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if injected_panic_tag() == Some(attempt.tag) {
                panic!("injected fault: CONCORD_FAULT_PANIC_TAG={}", attempt.tag);
            }
            // SAFETY: inside a busy guard; this RX thread is the only writer of the range now,
            // and the backup range is claimed only right before it is filled.
            match unsafe { attempt.claim_save(chunk, frame.sub) } {
                Some(save) => concord_kernels::reduce_into_saving(
                    out,
                    staged,
                    save,
                    attempt.backup_stores,
                    attempt.dtype,
                    attempt.reduce,
                    finish,
                ),
                None => {
                    // SAFETY: inside a busy guard, by the range's writer; in place, saved by an
                    // earlier writer (the claim above found it done).
                    let mine = unsafe { attempt.original(chunk, frame.sub) };
                    concord_kernels::reduce_out_with(
                        out,
                        mine,
                        staged,
                        attempt.dtype,
                        attempt.reduce,
                        finish,
                        attempt.stores,
                    )
                }
            }
        }))
    };
    // The payload is reduced where it lies: in the staging buffer it was read into, or in the
    // shared-memory ring.
    let reduce = c
        .stream
        .with_payload(&mut c.staging, len, reduce_with)
        .map_err(|e| s.recv_error(e))?;
    let failure = match reduce {
        Ok(Ok(())) => return Ok(Landed::Done(busy)),
        Ok(Err(e)) => e.to_string(),
        Err(panic) => format!("the reduction panicked: {}", panic_message(&panic)),
    };
    drop(busy);
    fail_alone(s, attempt, failure);
    Ok(Landed::Failed)
}
