//! Runs the loom models of the data plane's synchronisation (`plane/attempt.rs`) as part of the
//! suite: a separate build with `--cfg loom`, in its own target directory.

// Skips are written straight to stderr, past the test harness's capture, so they show.
use std::io::Write as _;

use std::process::Command;

#[test]
fn loom_models_of_the_data_plane_hand_offs() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    let target = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/loom");
    let out = Command::new(cargo)
        .args([
            "test",
            "--release",
            "--lib",
            "--manifest-path",
            manifest,
            "loom_models",
        ])
        .env("RUSTFLAGS", "--cfg loom")
        .env("CARGO_TARGET_DIR", target)
        .env("LOOM_MAX_PREEMPTIONS", "3")
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: cannot run cargo for the loom build ({e})"
            );
            return;
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "loom models failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("test plane::attempt::loom_models::retire_waits_for_busy_threads ... ok"),
        "{stdout}"
    );
    assert!(
        stdout
            .contains("test plane::attempt::loom_models::received_flag_publishes_the_data ... ok"),
        "{stdout}"
    );
}
