//! Backend selection as a user drives it, through `CONCORD_TRANSPORT`. Only one test in this binary
//! touches the environment, so that setting the variable races with nothing.

use concord_transport::buffers::{PinnedBuf, PinnedPool};
use concord_transport::uring::{
    probe, resolve_backend, BackendChoice, BackendKind, ShutdownHandle, UringStream, BACKEND_ENV,
};

#[test]
fn the_environment_overrides_the_configured_backend() {
    std::env::remove_var(BACKEND_ENV);
    assert_eq!(
        BackendChoice::from_env_or(BackendChoice::Auto),
        Ok(BackendChoice::Auto)
    );
    for (value, want) in [
        ("socket", BackendChoice::Socket),
        ("io_uring", BackendChoice::Uring),
        ("uring", BackendChoice::Uring),
        ("auto", BackendChoice::Auto),
        ("", BackendChoice::Socket),
    ] {
        std::env::set_var(BACKEND_ENV, value);
        assert_eq!(
            BackendChoice::from_env_or(BackendChoice::Socket),
            Ok(want),
            "{value:?}"
        );
    }
    std::env::set_var(BACKEND_ENV, "rdma");
    let err = BackendChoice::from_env_or(BackendChoice::Auto).unwrap_err();
    assert!(err.contains(BACKEND_ENV) && err.contains("rdma"), "{err}");
    std::env::remove_var(BACKEND_ENV);

    // What resolution gives on this machine, said out loud.
    match probe() {
        Ok(_) => {
            assert_eq!(
                resolve_backend(BackendChoice::Auto).unwrap(),
                (BackendKind::Uring, None)
            );
            assert_eq!(
                resolve_backend(BackendChoice::Uring).unwrap(),
                (BackendKind::Uring, None)
            );
        }
        Err(why) => {
            skip_loudly(format!(
                "SKIPPED: io_uring unavailable: {why} (checking the fallback instead)"
            ));
            let (kind, fell_back) = resolve_backend(BackendChoice::Auto).unwrap();
            assert_eq!(kind, BackendKind::Socket);
            assert!(fell_back.unwrap().contains(&why));
            assert!(resolve_backend(BackendChoice::Uring)
                .unwrap_err()
                .contains(&why));
        }
    }
    assert_eq!(
        resolve_backend(BackendChoice::Socket).unwrap(),
        (BackendKind::Socket, None)
    );
}

/// The threading rules the engine relies on, checked at compile time.
#[test]
fn streams_buffers_and_handles_cross_threads() {
    fn send<T: Send>() {}
    fn send_sync<T: Send + Sync>() {}
    send::<UringStream>();
    send::<PinnedBuf>();
    send_sync::<PinnedPool>();
    send_sync::<ShutdownHandle>();
}

/// Says why a test is skipped on the real stderr: the test harness captures `eprintln!`, and a
/// skip must be visible in a plain `cargo test`.
fn skip_loudly(message: String) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{message}");
}
