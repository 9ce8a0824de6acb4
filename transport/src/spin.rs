//! Bounded polling before a blocking wait, for the waits whose answer is microseconds away.
//!
//! Waking a thread that sleeps in the kernel costs far more than the message that wakes it on a
//! virtual machine: on a 2-vCPU Intel Xeon VM a blocking loopback ping-pong takes about 100 us per
//! round trip, a polling one about 6 us (the sleeping vCPU halts, and the host has to schedule
//! it again). A collective of a few KiB is a chain of such wake-ups (vote, frames, vote), so the
//! threads on that chain poll for a short window before they block.
//!
//! The rules that keep this from costing what it saves:
//! - a window only opens after an event that makes an answer imminent (a vote sent, a small
//!   collective under way), and it is bounded: an idle process never polls;
//! - every poll yields the CPU, so on a machine with fewer cores than busy threads the thread
//!   with real work still runs;
//! - a zero window turns polling off (`CONCORD_SPIN_US=0`, `concord master --spin-us 0`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The polling window used where none is configured.
pub const DEFAULT_SPIN: Duration = Duration::from_micros(100);

/// The polling window from `CONCORD_SPIN_US` (microseconds), else [`DEFAULT_SPIN`]; an
/// unparsable value is reported once and ignored.
pub fn spin_from_env() -> Duration {
    static FROM_ENV: OnceLock<Duration> = OnceLock::new();
    *FROM_ENV.get_or_init(|| match std::env::var("CONCORD_SPIN_US") {
        Err(_) => DEFAULT_SPIN,
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(us) => Duration::from_micros(us),
            Err(_) => {
                tracing::warn!(
                    "CONCORD_SPIN_US={v:?} is not a number of microseconds; using {} us",
                    DEFAULT_SPIN.as_micros()
                );
                DEFAULT_SPIN
            }
        },
    })
}

/// Polls `ready` (yielding the CPU between polls) until it returns true or `window` has passed;
/// returns its last answer. A zero window polls once.
pub fn spin_until(window: Duration, mut ready: impl FnMut() -> bool) -> bool {
    if ready() {
        return true;
    }
    if window.is_zero() {
        return false;
    }
    let start = Instant::now();
    loop {
        std::thread::yield_now();
        if ready() {
            return true;
        }
        if start.elapsed() >= window {
            return false;
        }
    }
}

/// Whether bytes wait in the receive queue of socket `fd` (a read would not block).
#[cfg(unix)]
pub fn readable(fd: std::os::fd::RawFd) -> bool {
    let mut queued: libc::c_int = 0;
    // SAFETY: FIONREAD stores one int through the pointer, which points at a live local; an
    // invalid `fd` only makes the call fail.
    let r = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut queued) };
    r == 0 && queued > 0
}

/// Blocks until socket `fd` is readable or hung up (true), or `timeout` passed (false;
/// `None`: no limit). Interrupted waits resume.
#[cfg(unix)]
pub fn wait_readable(fd: std::os::fd::RawFd, timeout: Option<Duration>) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
    loop {
        // SAFETY: one valid pollfd for the length given; an invalid or closed `fd` only makes
        // poll report POLLNVAL.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r >= 0 {
            return r > 0;
        }
        if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return true; // Let the caller's read find the error.
        }
    }
}

/// A moment, shared between threads without a lock (nanoseconds since the process's first use).
#[derive(Debug, Default)]
pub struct Stamp(AtomicU64);

fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

fn now_ns() -> u64 {
    // +1: a touched stamp is never the untouched zero.
    base().elapsed().as_nanos() as u64 + 1
}

impl Stamp {
    /// Records now.
    pub fn touch(&self) {
        self.0.store(now_ns(), Ordering::Relaxed);
    }

    /// How long ago it was touched (`None`: never).
    pub fn age(&self) -> Option<Duration> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            t => Some(Duration::from_nanos(now_ns().saturating_sub(t))),
        }
    }

    /// What is left of a window of `window` opened at the last touch (zero if none is open).
    pub fn left(&self, window: Duration) -> Duration {
        self.age()
            .map_or(Duration::ZERO, |age| window.saturating_sub(age))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spin_until_stops_at_the_window_and_at_readiness() {
        let start = Instant::now();
        assert!(!spin_until(Duration::from_millis(2), || false));
        assert!(start.elapsed() >= Duration::from_millis(2));
        let mut n = 0;
        assert!(spin_until(Duration::from_secs(10), || {
            n += 1;
            n == 3
        }));
        assert_eq!(n, 3);
        let mut polls = 0;
        assert!(!spin_until(Duration::ZERO, || {
            polls += 1;
            false
        }));
        assert_eq!(polls, 1, "a zero window polls exactly once");
    }

    #[test]
    fn stamp_windows_open_at_a_touch_and_close() {
        let s = Stamp::default();
        assert_eq!(
            s.left(Duration::from_secs(1)),
            Duration::ZERO,
            "never touched"
        );
        s.touch();
        assert!(s.left(Duration::from_secs(10)) > Duration::from_secs(9));
        std::thread::sleep(Duration::from_millis(3));
        assert_eq!(s.left(Duration::from_millis(1)), Duration::ZERO);
    }

    #[test]
    fn readable_sees_queued_bytes() {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        assert!(!readable(b.as_raw_fd()));
        a.write_all(b"x").unwrap();
        assert!(spin_until(Duration::from_secs(5), || readable(
            b.as_raw_fd()
        )));
        assert!(wait_readable(b.as_raw_fd(), None));
        // A hang-up counts as readable (the read then reports it).
        let (c, _) = {
            let _gone = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
            l.accept().unwrap()
        };
        assert!(wait_readable(c.as_raw_fd(), Some(Duration::from_secs(5))));
        let quiet = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        assert!(!wait_readable(
            quiet.as_raw_fd(),
            Some(Duration::from_millis(20))
        ));
    }
}
