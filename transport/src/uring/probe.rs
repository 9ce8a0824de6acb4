//! Finds out, once per process, whether io_uring can run here and what it supports.

use std::io;
use std::sync::OnceLock;

use io_uring::{opcode, IoUring, Probe};

/// What the io_uring probe found.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct UringInfo {
    /// `uname -r` of the running kernel.
    pub kernel_release: String,
    /// `kernel.io_uring_disabled` (0: everyone, 1: only members of `kernel.io_uring_group`,
    /// 2: nobody), `None` on kernels without the sysctl.
    pub io_uring_disabled: Option<u8>,
    /// `IORING_OP_SENDMSG_ZC` is available: zero-copy sends can be enabled.
    pub send_zc: bool,
    /// `IORING_OP_READ_FIXED` is available: receives can land in registered buffers.
    pub read_fixed: bool,
    /// Rings can be set up with `IORING_SETUP_COOP_TASKRUN` (fewer interrupts).
    pub coop_taskrun: bool,
}

/// Checks whether io_uring works for this process and supports what the data plane needs
/// (`SEND`, `RECV`, `SENDMSG`, `LINK_TIMEOUT`; optionally `SENDMSG_ZC`, `READ_FIXED`).
///
/// The first call probes; later calls return the cached answer. The error is a sentence a user
/// can act on, e.g. `io_uring_setup refused: EPERM (blocked by seccomp in this container?)`.
/// Never panics.
pub fn probe() -> Result<UringInfo, String> {
    static PROBED: OnceLock<Result<UringInfo, String>> = OnceLock::new();
    PROBED.get_or_init(probe_now).clone()
}

fn probe_now() -> Result<UringInfo, String> {
    let disabled = read_sysctl("io_uring_disabled").and_then(|s| s.parse::<u8>().ok());
    if disabled == Some(2) {
        return Err(
            "kernel.io_uring_disabled=2: io_uring is switched off for every process on this host (an administrator can set the sysctl to 0)"
                .into(),
        );
    }
    let ring = IoUring::new(8).map_err(|e| setup_refused(&e, disabled))?;
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe).map_err(|e| {
        format!(
            "io_uring is too old here: IORING_REGISTER_PROBE failed ({}); Linux 5.6 or newer is needed",
            errno_text(&e)
        )
    })?;
    let required = [
        (opcode::Send::CODE, "SEND"),
        (opcode::Recv::CODE, "RECV"),
        (opcode::SendMsg::CODE, "SENDMSG"),
        (opcode::LinkTimeout::CODE, "LINK_TIMEOUT"),
    ];
    let missing: Vec<&str> = required
        .iter()
        .filter(|(code, _)| !probe.is_supported(*code))
        .map(|(_, name)| *name)
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "io_uring here lacks IORING_OP_{}; Linux 5.6 or newer is needed",
            missing.join(", IORING_OP_")
        ));
    }
    let coop_taskrun = IoUring::<io_uring::squeue::Entry>::builder()
        .setup_coop_taskrun()
        .build(8)
        .is_ok();
    Ok(UringInfo {
        kernel_release: read_sysctl("osrelease").unwrap_or_else(|| "unknown".into()),
        io_uring_disabled: disabled,
        send_zc: probe.is_supported(opcode::SendMsgZc::CODE),
        read_fixed: probe.is_supported(opcode::ReadFixed::CODE),
        coop_taskrun,
    })
}

/// Explains why `io_uring_setup(2)` failed.
fn setup_refused(e: &io::Error, disabled: Option<u8>) -> String {
    let errno = e.raw_os_error();
    if disabled == Some(1) && errno == Some(libc::EPERM) {
        let group = read_sysctl("io_uring_group").unwrap_or_else(|| "?".into());
        return format!(
            "kernel.io_uring_disabled=1 and this process is not in kernel.io_uring_group (gid {group}): add the user to that group or ask an administrator to set the sysctl to 0"
        );
    }
    let hint = match errno {
        Some(libc::EPERM) => {
            " (blocked by seccomp in this container? Docker's and containerd's default profiles refuse io_uring)"
        }
        Some(libc::ENOSYS) => {
            " (kernel built without io_uring, older than 5.1, or a sandbox that filters it)"
        }
        Some(libc::ENOMEM) => {
            " (on kernels before 5.12 rings count against RLIMIT_MEMLOCK: raise `ulimit -l`)"
        }
        _ => "",
    };
    format!("io_uring_setup refused: {}{hint}", errno_text(e))
}

fn read_sysctl(name: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/sys/kernel/{name}"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// `EPERM`-style name of an OS error, falling back to the error's own text.
pub(crate) fn errno_text(e: &io::Error) -> String {
    let name = match e.raw_os_error() {
        Some(libc::EPERM) => "EPERM",
        Some(libc::ENOSYS) => "ENOSYS",
        Some(libc::ENOMEM) => "ENOMEM",
        Some(libc::EINVAL) => "EINVAL",
        Some(libc::EACCES) => "EACCES",
        Some(libc::EFAULT) => "EFAULT",
        Some(libc::EOPNOTSUPP) => "EOPNOTSUPP",
        Some(libc::EBUSY) => "EBUSY",
        _ => return e.to_string(),
    };
    format!("{name}: {e}")
}
