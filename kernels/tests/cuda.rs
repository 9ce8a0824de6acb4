//! CUDA: the kernel source compiles for sm_80 and sm_90 without spills (no GPU needed), and,
//! where a GPU is present, every kernel gives the scalar path's bits. Whatever cannot run here
//! is reported on stderr as "SKIPPED: reason".

// Skips are written straight to stderr, past the test harness's capture, so they show.
use std::io::Write as _;

mod common;

use std::path::PathBuf;
use std::process::Command;

#[test]
fn kernels_compile_with_nvrtc_and_ptxas() {
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let src = tmp.join("concord_kernels.cu");
    std::fs::write(&src, concord_kernels::cuda::kernel_source()).expect("write the kernel source");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../ci/cuda-compile.sh");
    let out = match Command::new("bash")
        .arg(&script)
        .env("CONCORD_CUDA_SRC", &src)
        .env("CONCORD_CUDA_CI_DIR", tmp.join("cuda-ci"))
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: cannot run bash for {}: {e}",
                script.display()
            );
            return;
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if let Some(line) = stdout.lines().find(|l| l.starts_with("SKIP:")) {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: CUDA compile check: {}",
            line.trim_start_matches("SKIP:").trim()
        );
        return;
    }
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "ci/cuda-compile.sh failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains("without spills"), "{stdout}");
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::common::*;
    use concord_kernels::cuda::CudaKernels;
    use concord_kernels::{CpuPath, DType, Kernels, ReduceOp};
    use std::io::Write as _;

    fn gpu() -> Option<CudaKernels> {
        match CudaKernels::new(0) {
            Ok(k) => {
                eprintln!("running on {}", k.device());
                Some(k)
            }
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "SKIPPED: GPU parity: {e}");
                None
            }
        }
    }

    #[test]
    fn gpu_matches_scalar_bit_for_bit() {
        let Some(gpu) = gpu() else { return };
        let cpu = Kernels::new(CpuPath::Scalar).expect("scalar path");
        let mut rng = XorShift::new(17);
        for dtype in DType::ALL {
            for len in [0usize, 1, 7, 255, 4096 + 3, 1 << 20] {
                // Raw random bits (NaN payloads, subnormals, infinities) and typical values.
                let raw = |rng: &mut XorShift| -> Vec<u8> {
                    (0..len * dtype.size_bytes())
                        .map(|_| rng.next() as u8)
                        .collect()
                };
                let inputs = [
                    (raw(&mut rng), raw(&mut rng)),
                    (gen(dtype, len, &mut rng), gen(dtype, len, &mut rng)),
                ];
                for (a, b) in &inputs {
                    for op in ReduceOp::ALL {
                        let mut want = vec![0u8; a.len()];
                        cpu.reduce_out(&mut want, a, b, dtype, op).unwrap();
                        let got = gpu.reduce_host(a, b, dtype, op, None).unwrap();
                        assert!(
                            got == want,
                            "{dtype} {op} len {len}: GPU differs from scalar"
                        );
                        for world in [3usize, 8] {
                            cpu.reduce_out_finish(&mut want, a, b, dtype, op, world)
                                .unwrap();
                            let got = gpu.reduce_host(a, b, dtype, op, Some(world)).unwrap();
                            assert!(
                                got == want,
                                "{dtype} {op} world {world} len {len}: GPU differs"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn gpu_in_place_and_finish_match_scalar() {
        let Some(gpu) = gpu() else { return };
        let cpu = Kernels::new(CpuPath::Scalar).expect("scalar path");
        let mut rng = XorShift::new(23);
        let stream = gpu.stream().clone();
        for dtype in DType::ALL {
            let len = 10_000;
            let a: Vec<u8> = (0..len * dtype.size_bytes())
                .map(|_| rng.next() as u8)
                .collect();
            let b: Vec<u8> = (0..len * dtype.size_bytes())
                .map(|_| rng.next() as u8)
                .collect();
            let mut want = a.clone();
            cpu.reduce_into(&mut want, &b, dtype, ReduceOp::Avg)
                .unwrap();
            cpu.finish(&mut want, dtype, ReduceOp::Avg, 5).unwrap();
            let mut d = stream.clone_htod(&a).unwrap();
            let s = stream.clone_htod(&b).unwrap();
            gpu.reduce_into(&mut d, &s, dtype, ReduceOp::Avg).unwrap();
            gpu.finish(&mut d, dtype, ReduceOp::Avg, 5).unwrap();
            assert!(
                stream.clone_dtoh(&d).unwrap() == want,
                "{dtype}: in-place avg differs"
            );
        }
    }
}

#[cfg(not(feature = "cuda"))]
#[test]
fn gpu_parity_needs_the_cuda_feature() {
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: GPU parity tests: built without the `cuda` feature (use --features cuda)"
    );
    assert!(concord_kernels::cuda::probe().is_err());
}
