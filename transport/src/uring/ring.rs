//! The one place that pushes submission entries and waits for their completions.
//!
//! Every operation is submitted alone (its timeout is the wait's) or with a linked timeout on
//! kernels before 5.11, and waited for until the kernel has posted **every** completion it owes
//! (the operation's, a linked timeout's or a cancel's, and for a zero-copy send the
//! buffer-release notification). Only then does [`Ring::run`] return, so no
//! caller can free or reuse memory the kernel still reads or writes. See `README.md` beside this
//! file.

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use super::stats::{bump, COUNTERS};

/// `user_data` of the operation, of its linked timeout, and of the cancel of a timed-out wait.
const OP: u64 = 1;
const TIMEOUT: u64 = 2;
const CANCEL: u64 = 3;

/// Entries of each ring: one operation and its timeout are in flight at a time.
const RING_ENTRIES: u32 = 8;

/// Fatal `io_uring_enter` errors tolerated, after shutting the socket down, before giving up.
const FATAL_RETRIES: u32 = 100;

/// What the kernel said about one operation.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Outcome {
    /// The operation's result: bytes moved, or `-errno`.
    pub(crate) res: i32,
    /// The timeout passed before the operation completed (which then was cancelled).
    pub(crate) timed_out: bool,
    /// A zero-copy send's notification result (`IORING_NOTIF_USAGE_ZC_COPIED` bit when the
    /// kernel copied after all), when the send produced one.
    pub(crate) notif: Option<i32>,
}

/// One io_uring owned by one stream.
pub(crate) struct Ring {
    ring: IoUring,
    /// The kernel takes a timeout for the wait itself (`IORING_FEAT_EXT_ARG`), so operations
    /// need no linked timeout.
    wait_timeouts: bool,
}

impl Ring {
    /// A small ring, with cooperative task running when the kernel has it.
    pub(crate) fn new(coop_taskrun: bool) -> io::Result<Ring> {
        let ring = if coop_taskrun {
            IoUring::<squeue::Entry>::builder()
                .setup_coop_taskrun()
                .build(RING_ENTRIES)
                .or_else(|_| IoUring::new(RING_ENTRIES))?
        } else {
            IoUring::new(RING_ENTRIES)?
        };
        let wait_timeouts = ring.params().is_feature_ext_arg();
        Ok(Ring {
            ring,
            wait_timeouts,
        })
    }

    /// Whether timeouts are the wait's own rather than linked operations.
    pub(crate) fn wait_timeouts(&self) -> bool {
        self.wait_timeouts
    }

    /// Uses linked timeouts even where the kernel has wait timeouts (for tests of that path).
    pub(crate) fn force_linked_timeouts(&mut self) {
        self.wait_timeouts = false;
    }

    /// Registers `fd` as this ring's fixed file 0. The ring then holds a reference to the
    /// file until it is dropped.
    pub(crate) fn register_file(&mut self, fd: RawFd) -> io::Result<()> {
        self.ring.submitter().register_files(&[fd])
    }

    /// Registers fixed buffers.
    ///
    /// # Safety
    /// The memory behind `iovecs` must stay mapped until this ring is dropped.
    pub(crate) unsafe fn register_buffers(&self, iovecs: &[libc::iovec]) -> io::Result<()> {
        // SAFETY: forwarded to the caller.
        unsafe { self.ring.submitter().register_buffers(iovecs) }
    }

    /// Submits `op` and waits for all of its completions, for at most `timeout` without the
    /// operation completing: then it is cancelled, and the outcome says `timed_out` (its result
    /// still counts the bytes it moved before). `fd` is the socket the operation works on:
    /// should the ring itself fail while the operation is in flight, the socket is shut down so
    /// the operation completes.
    ///
    /// The timeout is the wait's own (`IORING_ENTER_EXT_ARG`, Linux 5.11) where the kernel has
    /// it, else an `IORING_OP_LINK_TIMEOUT` linked to the operation. The first costs nothing
    /// when the operation completes in time; the second is a second entry and a timer armed and
    /// cancelled per operation: 1 MiB all-reduces between 2 peers took 312 us with linked
    /// timeouts against 297 us with timed waits (medians of 4 interleaved rounds, development
    /// VM).
    ///
    /// # Safety
    /// Every buffer and structure `op` points to must stay valid (and unaliased where the kernel
    /// writes) until this returns; it returns only once the kernel is done with all of them.
    pub(crate) unsafe fn run(
        &mut self,
        op: squeue::Entry,
        timeout: Option<Duration>,
        fd: RawFd,
    ) -> io::Result<Outcome> {
        let ts = timeout.map(types::Timespec::from);
        let linked = ts.is_some() && !self.wait_timeouts;
        let mut expected = 1usize;
        {
            let mut sq = self.ring.submission();
            assert!(sq.is_empty(), "no entry is left behind by an earlier run");
            let op = op.user_data(OP);
            match &ts {
                Some(ts) if linked => {
                    let link = opcode::LinkTimeout::new(ts).build().user_data(TIMEOUT);
                    let pair = [op.flags(squeue::Flags::IO_LINK), link];
                    // SAFETY: the caller keeps op's memory valid until we return, and we return
                    // only after its completion (and notification) has been reaped; `ts` lives
                    // on this frame until the kernel has copied it (at submission) and both
                    // completions have been reaped.
                    unsafe { sq.push_multiple(&pair) }
                        .map_err(|_| io::Error::other("io_uring queue full"))?;
                    expected = 2;
                }
                _ => {
                    // SAFETY: as above.
                    unsafe { sq.push(&op) }.map_err(|_| io::Error::other("io_uring queue full"))?;
                }
            }
        }
        bump(&COUNTERS.sqes, expected as u64);
        let mut out = Outcome {
            res: 0,
            timed_out: false,
            notif: None,
        };
        let (mut op_done, mut timeout_done, mut notif_due) = (false, !linked, false);
        // The wait's own timeout: only while the operation runs and no cancel is under way.
        let mut wait_limit = if linked { None } else { ts };
        let (mut cancelled, mut cancel_done) = (false, true);
        let mut fatal = 0u32;
        while !op_done || !timeout_done || notif_due || !cancel_done {
            let want = usize::from(!op_done)
                + usize::from(!timeout_done)
                + usize::from(notif_due)
                + usize::from(!cancel_done);
            let limit = if op_done { None } else { wait_limit.as_ref() };
            match self.enter(want, limit) {
                Ok(true) => {}
                Ok(false) => {
                    // The wait timed out with the operation still in flight: cancel it, then
                    // wait (without a limit) for the operation's completion and the cancel's.
                    let cancel = opcode::AsyncCancel::new(OP).build().user_data(CANCEL);
                    // SAFETY: a cancel entry points to no memory.
                    unsafe { self.ring.submission().push(&cancel) }
                        .map_err(|_| io::Error::other("io_uring queue full"))?;
                    bump(&COUNTERS.sqes, 1);
                    cancelled = true;
                    wait_limit = None;
                    cancel_done = false;
                }
                Err(e) => {
                    fatal += 1;
                    // Never return while the kernel may still touch the caller's memory: make
                    // the socket operation finish, then keep reaping.
                    // SAFETY: shutdown(2) on a descriptor the caller keeps open; no memory
                    // involved.
                    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
                    if fatal > FATAL_RETRIES {
                        eprintln!(
                            "concord: io_uring_enter keeps failing ({e}) with an operation in flight; aborting rather than freeing memory the kernel may still write"
                        );
                        std::process::abort();
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            for cqe in self.ring.completion() {
                match cqe.user_data() {
                    OP if cqueue::notif(cqe.flags()) => {
                        out.notif = Some(cqe.result());
                        notif_due = false;
                    }
                    OP => {
                        out.res = cqe.result();
                        op_done = true;
                        // Cancelled after the wait's timeout with nothing moved (a partial
                        // result is progress and counts).
                        if cancelled {
                            out.timed_out = out.res == -libc::ECANCELED;
                        }
                        notif_due = cqueue::more(cqe.flags());
                    }
                    TIMEOUT => {
                        out.timed_out = cqe.result() == -libc::ETIME;
                        timeout_done = true;
                    }
                    // 0 (cancelled), -ENOENT (it had completed) or -EALREADY (it completes
                    // soon): the operation's own completion is what counts.
                    CANCEL => cancel_done = true,
                    other => debug_assert!(false, "unexpected completion {other}"),
                }
            }
        }
        Ok(out)
    }

    /// One `io_uring_enter`: submits what is queued and waits for `want` completions, for at
    /// most `limit` where given. `Ok(false)`: the limit passed first. Interrupted and busy waits
    /// are retried here (an interrupted wait starts its limit again); other errors go back to
    /// the caller.
    fn enter(&mut self, want: usize, limit: Option<&types::Timespec>) -> io::Result<bool> {
        loop {
            bump(&COUNTERS.enters, 1);
            let r = match limit {
                None => self.ring.submit_and_wait(want),
                Some(ts) => {
                    let args = types::SubmitArgs::new().timespec(ts);
                    self.ring.submitter().submit_with_args(want, &args)
                }
            };
            match r {
                Ok(_) => return Ok(true),
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR)) => continue,
                Err(e) if limit.is_some() && e.raw_os_error() == Some(libc::ETIME) => {
                    // The kernel may have posted the completion as the timer fired.
                    return Ok(self.ring.completion().len() >= want);
                }
                // Completion queue full or out of memory for a moment: reap what is there first.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EAGAIN)) => {
                    return Ok(true)
                }
                Err(e) => return Err(e),
            }
        }
    }
}
