//! The one place that pushes submission entries and waits for their completions.
//!
//! Every operation is submitted together with an optional linked timeout and waited for until
//! the kernel has posted **every** completion it owes (the operation's, the timeout's, and for a
//! zero-copy send the buffer-release notification). Only then does [`Ring::run`] return, so no
//! caller can free or reuse memory the kernel still reads or writes. See `README.md` beside this
//! file.

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use super::stats::{bump, COUNTERS};

/// `user_data` of the operation and of its linked timeout.
const OP: u64 = 1;
const TIMEOUT: u64 = 2;

/// Entries of each ring: one operation and its timeout are in flight at a time.
const RING_ENTRIES: u32 = 8;

/// Fatal `io_uring_enter` errors tolerated, after shutting the socket down, before giving up.
const FATAL_RETRIES: u32 = 100;

/// What the kernel said about one operation.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Outcome {
    /// The operation's result: bytes moved, or `-errno`.
    pub(crate) res: i32,
    /// The linked timeout fired (`-ETIME`).
    pub(crate) timed_out: bool,
    /// A zero-copy send's notification result (`IORING_NOTIF_USAGE_ZC_COPIED` bit when the
    /// kernel copied after all), when the send produced one.
    pub(crate) notif: Option<i32>,
}

/// One io_uring owned by one stream.
pub(crate) struct Ring {
    ring: IoUring,
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
        Ok(Ring { ring })
    }

    /// Registers fixed buffers.
    ///
    /// # Safety
    /// The memory behind `iovecs` must stay mapped until this ring is dropped.
    pub(crate) unsafe fn register_buffers(&self, iovecs: &[libc::iovec]) -> io::Result<()> {
        // SAFETY: forwarded to the caller.
        unsafe { self.ring.submitter().register_buffers(iovecs) }
    }

    /// Submits `op` (with a linked timeout when `timeout` is set) and waits for all of its
    /// completions. `fd` is the socket the operation works on: should the ring itself fail while
    /// the operation is in flight, the socket is shut down so the operation completes.
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
        let mut expected = 1usize;
        {
            let mut sq = self.ring.submission();
            assert!(sq.is_empty(), "no entry is left behind by an earlier run");
            let op = op.user_data(OP);
            match &ts {
                None => {
                    // SAFETY: the caller keeps op's memory valid until we return, and we return
                    // only after its completion (and notification) has been reaped.
                    unsafe { sq.push(&op) }.map_err(|_| io::Error::other("io_uring queue full"))?;
                }
                Some(ts) => {
                    let link = opcode::LinkTimeout::new(ts).build().user_data(TIMEOUT);
                    let pair = [op.flags(squeue::Flags::IO_LINK), link];
                    // SAFETY: as above; `ts` lives on this frame until the kernel has copied it
                    // (at submission) and both completions have been reaped.
                    unsafe { sq.push_multiple(&pair) }
                        .map_err(|_| io::Error::other("io_uring queue full"))?;
                    expected = 2;
                }
            }
        }
        bump(&COUNTERS.sqes, expected as u64);
        let mut out = Outcome {
            res: 0,
            timed_out: false,
            notif: None,
        };
        let (mut op_done, mut timeout_done, mut notif_due) = (false, ts.is_none(), false);
        let mut fatal = 0u32;
        while !op_done || !timeout_done || notif_due {
            let want = usize::from(!op_done) + usize::from(!timeout_done) + usize::from(notif_due);
            if let Err(e) = self.enter(want) {
                fatal += 1;
                // Never return while the kernel may still touch the caller's memory: make the
                // socket operation finish, then keep reaping.
                // SAFETY: shutdown(2) on a descriptor the caller keeps open; no memory involved.
                unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
                if fatal > FATAL_RETRIES {
                    eprintln!(
                        "concord: io_uring_enter keeps failing ({e}) with an operation in flight; aborting rather than freeing memory the kernel may still write"
                    );
                    std::process::abort();
                }
                std::thread::sleep(Duration::from_millis(1));
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
                        notif_due = cqueue::more(cqe.flags());
                    }
                    TIMEOUT => {
                        out.timed_out = cqe.result() == -libc::ETIME;
                        timeout_done = true;
                    }
                    other => debug_assert!(false, "unexpected completion {other}"),
                }
            }
        }
        Ok(out)
    }

    /// One `io_uring_enter`: submits what is queued and waits for `want` completions. Interrupted
    /// and busy waits are retried here; other errors go back to the caller.
    fn enter(&mut self, want: usize) -> io::Result<()> {
        loop {
            bump(&COUNTERS.enters, 1);
            match self.ring.submit_and_wait(want) {
                Ok(_) => return Ok(()),
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR)) => continue,
                // Completion queue full or out of memory for a moment: reap what is there first.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EAGAIN)) => {
                    return Ok(())
                }
                Err(e) => return Err(e),
            }
        }
    }
}
