//! The pinned pool under a small `RLIMIT_MEMLOCK`, as an ordinary user sees it.
//!
//! The limit is set in a child process (this test binary, re-executed with an environment
//! variable) so the parent's limits stay untouched. The child also drops `CAP_IPC_LOCK`, which
//! would otherwise let root lock any amount and hide the degraded path.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;

use concord_transport::buffers::{PinnedPool, PoolConfig};
use concord_transport::uring::{probe, uring_stats, UringStream};

const CHILD_ENV: &str = "CONCORD_TEST_MEMLOCK_CHILD";
const LIMIT_BYTES: u64 = 64 * 1024;
const BUFFER_BYTES: usize = 64 * 1024;

#[test]
fn pool_degrades_under_a_small_memlock_limit() {
    if std::env::var_os(CHILD_ENV).is_some() {
        child();
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = Command::new(exe)
        .args([
            "--exact",
            "pool_degrades_under_a_small_memlock_limit",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("--- child stdout ---\n{stdout}--- child stderr ---\n{stderr}");
    assert!(out.status.success(), "the child failed: {:?}", out.status);
    assert!(stderr.contains("CHILD DONE"), "the child ran its checks");
    for line in stderr.lines().filter(|l| l.starts_with("SKIPPED")) {
        skip_loudly(format!("{line} (in the memlock child)"));
    }
}

fn child() {
    drop_ipc_lock_capability();
    let lim = libc::rlimit {
        rlim_cur: LIMIT_BYTES as libc::rlim_t,
        rlim_max: LIMIT_BYTES as libc::rlim_t,
    };
    // SAFETY: `lim` is a valid rlimit; lowering a limit needs no privilege.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) }, 0);

    // 8 x 64 KiB asked, 64 KiB allowed: halving finds 1 buffer that fits.
    let shrunk = PinnedPool::new(8, BUFFER_BYTES).unwrap();
    let why = shrunk.degraded_reason().expect("a degraded pool says why");
    eprintln!("shrunk pool: {shrunk:?}\n  reason: {why}");
    assert!(shrunk.is_locked());
    assert!(shrunk.buffers() < 8 && shrunk.buffers() >= 1, "{shrunk:?}");
    assert_eq!(shrunk.requested_buffers(), 8);
    assert!(why.contains("ulimit -l"), "{why}");
    exercise(&shrunk);

    // Needs at least 4 buffers locked: cannot, so all 8 stay unlocked and still work.
    let unlocked =
        PinnedPool::with_config(PoolConfig::new(8, BUFFER_BYTES).with_min_buffers(4)).unwrap();
    let why = unlocked
        .degraded_reason()
        .expect("an unlocked pool says why");
    eprintln!("unlocked pool: {unlocked:?}\n  reason: {why}");
    assert!(!unlocked.is_locked());
    assert_eq!(unlocked.buffers(), 8);
    assert!(
        why.contains("not locked") && why.contains("RLIMIT_MEMLOCK"),
        "{why}"
    );
    exercise(&unlocked);

    fixed_registration_falls_back(&unlocked);
    eprintln!("CHILD DONE");
}

/// Every buffer can be taken, written and read back.
fn exercise(pool: &PinnedPool) {
    let mut bufs: Vec<_> = (0..pool.buffers())
        .map(|_| pool.try_acquire().unwrap())
        .collect();
    assert!(pool.try_acquire().is_none());
    for (i, b) in bufs.iter_mut().enumerate() {
        b.fill(i as u8 + 1);
    }
    for (i, b) in bufs.iter().enumerate() {
        assert!(b.iter().all(|&x| x == i as u8 + 1));
    }
}

/// Registering 512 KiB as io_uring fixed buffers under a 64 KiB limit is refused (without
/// CAP_IPC_LOCK); the stream records why and keeps receiving with plain RECV.
fn fixed_registration_falls_back(pool: &PinnedPool) {
    if let Err(why) = probe() {
        skip_loudly(format!("SKIPPED: io_uring unavailable: {why}"));
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut tx = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let mut rx = UringStream::new(listener.accept().unwrap().0).unwrap();
    let registered = rx.register_pool(pool);
    eprintln!(
        "fixed buffers registered: {registered}; reason: {:?}",
        rx.fixed_buffers_reason()
    );
    assert!(
        !registered,
        "512 KiB of fixed buffers fit a 64 KiB memlock limit?"
    );
    assert!(rx.fixed_buffers_reason().unwrap().contains("ENOMEM"));
    // Through the ring, not the plain-syscall path of small reads: that is what is counted.
    rx.set_direct_max(0);
    let before = uring_stats();
    let mut buf = pool.acquire();
    tx.write_all(b"still works").unwrap();
    rx.read_exact_fixed(&mut buf, 11).unwrap();
    assert_eq!(&buf[..11], b"still works");
    let d = uring_stats().since(&before);
    assert_eq!((d.fixed_reads, d.bytes_received), (0, 11), "{d:?}");
    drop(rx);
    assert_eq!(
        tx.read(&mut [0u8; 1]).unwrap(),
        0,
        "dropping the stream closed it"
    );
}

/// Removes CAP_IPC_LOCK from this process's effective and permitted sets (a no-op for a user
/// who never had it).
fn drop_ipc_lock_capability() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    const CAP_IPC_LOCK: u32 = 14;
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget with a v3 header writes two `Data` records, which `data` holds.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    assert_eq!(rc, 0, "capget: {}", std::io::Error::last_os_error());
    data[0].effective &= !(1 << CAP_IPC_LOCK);
    data[0].permitted &= !(1 << CAP_IPC_LOCK);
    // SAFETY: as above; capset only reads the records. Dropping a capability needs no privilege.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    assert_eq!(rc, 0, "capset: {}", std::io::Error::last_os_error());
}

/// Says why a test is skipped on the real stderr: the test harness captures `eprintln!`, and a
/// skip must be visible in a plain `cargo test`.
fn skip_loudly(message: String) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{message}");
}
