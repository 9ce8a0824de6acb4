//! Binding the peer processes that one machine runs to disjoint sets of CPUs.
//!
//! A peer's hot threads (the caller, one receiver per connection, the sender) hand bytes to
//! each other and to the neighbour's threads over loopback many times per collective. Left to
//! the scheduler, the wake-ups of two peers on one small machine tend to pull both peers onto
//! the same CPU for a whole run, and a small collective then takes twice as long: on a
//! 2-vCPU Intel Xeon host, 1 MiB all-reduces between 2 peers took 272-548 us unbound, depending
//! on the run, against 289-303 us with each peer on its own CPU (f32 sum, 1000 iterations, 5
//! interleaved rounds). With more peers than CPUs, binding hurts instead (4 peers on 2 CPUs,
//! 256 MiB: 1.00-1.12 GB/s bound two to a CPU against 1.15-1.17 unbound), so [`plan`] binds
//! only where every peer can have CPUs of its own. This is what `mpirun --bind-to core` does by
//! default for small jobs; multi-node launchers do it with `srun --cpu-bind` or `taskset`.

use std::io;
use std::process::Command;

/// The CPUs this process may run on (its affinity mask), in increasing order.
#[cfg(target_os = "linux")]
pub fn allowed_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain old data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a live, writable cpu_set_t of the size passed.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: CPU_ISSET only reads the set, and `cpu` is below CPU_SETSIZE.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect())
}

/// The CPUs this process may run on; other systems have no affinity masks here.
#[cfg(not(target_os = "linux"))]
pub fn allowed_cpus() -> io::Result<Vec<usize>> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "CPU binding is implemented for Linux only",
    ))
}

/// Disjoint CPU sets for `peers` processes out of `allowed`: contiguous slices of equal size
/// (the first `allowed.len() % peers` one CPU larger). `None` where there are fewer CPUs than
/// peers: sharing CPUs between bound peers is slower than leaving them to the scheduler.
pub fn plan(peers: usize, allowed: &[usize]) -> Option<Vec<Vec<usize>>> {
    if peers == 0 || allowed.len() < peers {
        return None;
    }
    let (each, extra) = (allowed.len() / peers, allowed.len() % peers);
    let mut rest = allowed;
    let sets = (0..peers)
        .map(|i| {
            let (set, tail) = rest.split_at(each + usize::from(i < extra));
            rest = tail;
            set.to_vec()
        })
        .collect();
    Some(sets)
}

/// Makes the process that `cmd` starts run only on `cpus` (set in the child before it runs
/// anything, so every thread it creates inherits the mask). Fails if a CPU number is out of
/// range; the child itself fails to start if the kernel refuses the mask.
#[cfg(target_os = "linux")]
pub fn bind_command(cmd: &mut Command, cpus: &[usize]) -> io::Result<()> {
    use std::os::unix::process::CommandExt;
    if cpus.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "binding to an empty set of CPUs",
        ));
    }
    // SAFETY: cpu_set_t is plain old data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("CPU {cpu} is beyond this system's CPU_SETSIZE"),
            ));
        }
        // SAFETY: `cpu` is below CPU_SETSIZE, checked above.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: the closure runs between fork and exec, where only async-signal-safe calls are
    // allowed: it makes one system call on a copy of `set` and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// Binding is implemented for Linux only.
#[cfg(not(target_os = "linux"))]
pub fn bind_command(_cmd: &mut Command, _cpus: &[usize]) -> io::Result<()> {
    allowed_cpus().map(|_| ())
}

/// `0-3,8` for the sets `[0, 1, 2, 3, 8]` (what `taskset -c` reads).
pub fn format_cpus(cpus: &[usize]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        if !out.is_empty() {
            out.push(',');
        }
        if j == i {
            out.push_str(&cpus[i].to_string());
        } else {
            out.push_str(&format!("{}-{}", cpus[i], cpus[j]));
        }
        i = j + 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_as_the_kernel_writes_them() {
        assert_eq!(parse_cpus("0,1"), Some(vec![0, 1]));
        assert_eq!(parse_cpus("0-3,8"), Some(vec![0, 1, 2, 3, 8]));
        assert_eq!(
            parse_cpus(format_cpus(&[2, 3, 4, 7]).as_str()),
            Some(vec![2, 3, 4, 7])
        );
        for bad in ["", "a", "3-1", "0-99999"] {
            assert_eq!(parse_cpus(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn plan_gives_disjoint_slices_covering_the_cpus() {
        let allowed = [0, 1, 2, 3, 4, 8, 9];
        let sets = plan(3, &allowed).expect("enough CPUs");
        assert_eq!(sets, vec![vec![0, 1, 2], vec![3, 4], vec![8, 9]]);
        assert_eq!(plan(2, &[0, 1]), Some(vec![vec![0], vec![1]]));
    }

    #[test]
    fn plan_refuses_to_share_cpus() {
        assert_eq!(plan(3, &[0, 1]), None);
        assert_eq!(plan(0, &[0, 1]), None);
    }

    #[test]
    fn cpu_lists_read_as_taskset_writes_them() {
        assert_eq!(format_cpus(&[0, 1, 2, 3, 8]), "0-3,8");
        assert_eq!(format_cpus(&[1, 3, 4]), "1,3-4");
        assert_eq!(format_cpus(&[]), "");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_bound_child_runs_on_its_cpu_only() {
        let allowed = allowed_cpus().expect("sched_getaffinity");
        if allowed.len() < 2 {
            // One CPU: the child's mask would read the same bound or not.
            eprintln!(
                "SKIPPED a_bound_child_runs_on_its_cpu_only: this process may use one CPU only"
            );
            return;
        }
        let last = *allowed.last().expect("non-empty");
        let mut cmd = Command::new("grep");
        cmd.args(["Cpus_allowed_list", "/proc/self/status"]);
        bind_command(&mut cmd, &[last]).expect("valid CPU");
        let out = cmd.output().expect("grep runs");
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        let list = text.split(':').nth(1).expect("a value").trim();
        assert_eq!(list, last.to_string(), "the child's mask: {text}");
    }
}

/// Set by `concord bench --local` for each peer it binds: the CPUs of the whole launch (`0,1`).
/// A bound peer's data threads run on them while a large collective is in flight (see
/// `Widening`).
pub const WIDE_ENV: &str = "CONCORD_CPU_WIDE";

/// `0,1,4` (and `2-3` ranges) as CPU numbers.
pub fn parse_cpus(text: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let (lo, hi): (usize, usize) = (lo.trim().parse().ok()?, hi.trim().parse().ok()?);
        if lo > hi || hi >= 4096 {
            return None;
        }
        cpus.extend(lo..=hi);
    }
    (!cpus.is_empty()).then_some(cpus)
}

/// Restricts the calling thread to `cpus`.
#[cfg(target_os = "linux")]
pub fn bind_thread(cpus: &[usize]) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain old data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus.iter().filter(|&&c| c < libc::CPU_SETSIZE as usize) {
        // SAFETY: `cpu` is below CPU_SETSIZE; CPU_SET writes inside `set`.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: pid 0 is the calling thread; `set` is a live cpu_set_t of the size passed.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Restricts the calling thread to `cpus`; other systems have no affinity masks here.
#[cfg(not(target_os = "linux"))]
pub fn bind_thread(_cpus: &[usize]) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "CPU binding is implemented for Linux only",
    ))
}

/// Placement that binds only what gains. A peer bound to CPUs of its own (by `concord bench
/// --local`) keeps small collectives on them: their threads hand each frame on in
/// microseconds, and being pulled onto one CPU with the neighbour doubles their time. But one
/// CPU per peer also holds its sender, receivers and the kernel's TCP work for them, which caps
/// large transfers: on a 2 vCPU AMD EPYC host, 256 MiB between 2 peers ran at 1.36-1.48 GB/s
/// bound against 1.52-1.56 unbound, while 1 MiB took 0.94-1.04 ms bound against 1.34-1.52
/// unbound. So each data thread widens itself to every CPU of the launch while a collective of
/// more than 4 MiB is in flight, and narrows back when none is.
#[derive(Debug)]
pub(crate) struct Widening {
    narrow: Vec<usize>,
    wide: Vec<usize>,
}

impl Widening {
    /// From [`WIDE_ENV`] and this thread's mask; `None` unless the launch's CPUs are more than
    /// the process's own.
    pub(crate) fn from_env() -> Option<Widening> {
        let wide = parse_cpus(&std::env::var(WIDE_ENV).ok()?)?;
        let narrow = allowed_cpus().ok()?;
        (wide.len() > narrow.len()).then_some(Widening { narrow, wide })
    }

    /// Applies the mask `large` calls for, if the thread's `widened` state differs.
    pub(crate) fn follow(&self, large: bool, widened: &mut bool) {
        if large != *widened {
            let cpus = if large { &self.wide } else { &self.narrow };
            if bind_thread(cpus).is_ok() {
                *widened = large;
            }
        }
    }
}
