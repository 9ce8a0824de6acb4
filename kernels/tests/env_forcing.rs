//! `CONCORD_KERNELS` forces a path for the whole process (read once, at the first call), and
//! a path the CPU lacks, or an unknown name, is refused with a clear error on every call.
//! Each case runs in a child process, since the choice is cached per process.

// Skips are written straight to stderr, past the test harness's capture, so they show.
use std::io::Write as _;

use std::process::Command;

use concord_kernels::{cpu_path, reduce_into, CpuPath, DType, Kernels, ReduceOp, PATH_ENV};

const CHILD_MARKER: &str = "CONCORD_KERNELS_TEST_CHILD";

/// Runs in the child: reports what the free functions do under the inherited environment.
#[test]
fn child_reports_path() {
    if std::env::var_os(CHILD_MARKER).is_none() {
        return;
    }
    let mut dst = 1.0f32.to_ne_bytes();
    let result = reduce_into(&mut dst, &2.0f32.to_ne_bytes(), DType::F32, ReduceOp::Sum);
    println!("PATH={}", cpu_path());
    match result {
        Ok(()) => println!("RESULT=ok {}", f32::from_ne_bytes(dst)),
        Err(e) => println!("RESULT=error {e}"),
    }
}

fn run_child(value: &str) -> String {
    let exe = std::env::current_exe().expect("test binary path");
    let out = Command::new(exe)
        .args([
            "--exact",
            "child_reports_path",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_MARKER, "1")
        .env(PATH_ENV, value)
        .output()
        .expect("run the child test");
    assert!(out.status.success(), "child failed: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn every_path_can_be_forced_or_is_refused() {
    for path in CpuPath::ALL {
        let out = run_child(path.name());
        if Kernels::new(path).is_ok() {
            assert!(
                out.contains(&format!("PATH={}", path.name())),
                "{path}: {out}"
            );
            assert!(out.contains("RESULT=ok 3"), "{path}: {out}");
        } else {
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: forcing {path}: not supported on this CPU (checked the refusal)"
            );
            assert!(out.contains("PATH=refused"), "{path}: {out}");
            assert!(out.contains("not supported on this CPU"), "{path}: {out}");
        }
    }
}

#[test]
fn unknown_path_is_refused_with_the_valid_names() {
    let out = run_child("avx9000");
    assert!(out.contains("PATH=refused"), "{out}");
    assert!(
        out.contains("unknown CPU kernel path \"avx9000\" (from CONCORD_KERNELS)"),
        "{out}"
    );
    assert!(
        out.contains("scalar, avx2, avx512, avx512bf16, avx512fp16"),
        "{out}"
    );
}

#[test]
fn empty_or_auto_selects_the_best_path() {
    for value in ["", "auto"] {
        let out = run_child(value);
        assert!(
            out.contains(&format!("PATH={}", CpuPath::best().name())),
            "{value:?}: {out}"
        );
    }
}
