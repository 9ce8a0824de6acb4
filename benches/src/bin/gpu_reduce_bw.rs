//! GPU reduction bandwidth against a device-to-device copy, measured in one run (the kernels
//! goal is at least 85 % of the copy's bandwidth at 256 MiB).
//!
//! `gpu-reduce-bw [--bytes 256M] [--iters 50] [--device 0]` prints, for sum over f32, f16 and
//! bf16 and for `cuMemcpyDtoD` of the same size: time per launch, GB/s of operands read (the
//! convention of the CPU `reduce` group: both operands of a reduction, the source of a copy) and
//! GB/s of device-memory traffic (a reduction reads two buffers and writes one, a copy reads one
//! and writes one), and the reduction's traffic as a share of the copy's. Where CUDA is not
//! usable it says why and exits with status 2, so a script cannot mistake a skip for a result.

use std::process::ExitCode;
use std::time::Instant;

use concord_kernels::convert::{f32_to_bf16, f32_to_f16};
use concord_kernels::cuda::cudarc::driver::CudaSlice;
use concord_kernels::cuda::CudaKernels;
use concord_kernels::{DType, ReduceOp};

const USAGE: &str = "usage: gpu-reduce-bw [--bytes SIZE(K/M/G suffix)] [--iters N] [--device N]";

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("gpu-reduce-bw: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<ExitCode, String> {
    let (mut bytes, mut iters, mut device) = (256usize << 20, 50usize, 0usize);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value\n{USAGE}"));
        match flag.as_str() {
            "--bytes" => bytes = parse_size(&value()?)?,
            "--iters" => iters = value()?.parse().map_err(|e| format!("--iters: {e}"))?,
            "--device" => device = value()?.parse().map_err(|e| format!("--device: {e}"))?,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(ExitCode::SUCCESS);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if iters == 0 || bytes < 4 {
        return Err(format!(
            "--iters must be at least 1 and --bytes at least 4\n{USAGE}"
        ));
    }
    let bytes = bytes / 4 * 4;
    let k = match CudaKernels::new(device) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("SKIPPED gpu-reduce-bw: no usable CUDA here ({e}); nothing was measured");
            return Ok(ExitCode::from(2));
        }
    };
    let stream = k.stream().clone();
    println!(
        "# gpu-reduce-bw: {}, {bytes} B per buffer, {iters} launches per row",
        k.device()
    );
    println!("# row              time(us)  operands GB/s  traffic GB/s  traffic vs copy");
    let mut dst: CudaSlice<u8> = stream
        .alloc_zeros(bytes)
        .map_err(|e| format!("allocating: {e}"))?;
    let mut src: CudaSlice<u8> = stream
        .alloc_zeros(bytes)
        .map_err(|e| format!("allocating: {e}"))?;

    // The copy: one read and one write of `bytes`.
    let time = |f: &mut dyn FnMut() -> Result<(), String>| -> Result<f64, String> {
        f()?; // warm-up
        stream.synchronize().map_err(|e| e.to_string())?;
        let start = Instant::now();
        for _ in 0..iters {
            f()?;
        }
        stream.synchronize().map_err(|e| e.to_string())?;
        Ok(start.elapsed().as_secs_f64() / iters as f64)
    };
    let copy_s = time(&mut || {
        stream
            .memcpy_dtod(&src, &mut dst)
            .map_err(|e| format!("copying: {e}"))
    })?;
    let copy_traffic = 2.0 * bytes as f64 / copy_s / 1e9;
    println!(
        "copy-d2d           {:>8.1}  {:>13.1}  {:>12.1}  {:>14}",
        copy_s * 1e6,
        bytes as f64 / copy_s / 1e9,
        copy_traffic,
        "100 %"
    );
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let (a, b) = (fill(dtype, bytes, 1.0), fill(dtype, bytes, 0.25));
        stream
            .memcpy_htod(&a, &mut dst)
            .and_then(|()| stream.memcpy_htod(&b, &mut src))
            .map_err(|e| format!("uploading: {e}"))?;
        // Sums of 1.0 and 0.25 grow slowly; 50 launches stay far from overflow in every dtype
        // (bf16 and f16 stop growing once 0.25 is under half an ulp, with no NaN or infinity).
        let s = time(&mut || {
            k.reduce_into(&mut dst, &src, dtype, ReduceOp::Sum)
                .map_err(|e| e.to_string())
        })?;
        let traffic = 3.0 * bytes as f64 / s / 1e9;
        println!(
            "sum/{:<14} {:>8.1}  {:>13.1}  {:>12.1}  {:>12.0} %",
            dtype.to_string(),
            s * 1e6,
            2.0 * bytes as f64 / s / 1e9,
            traffic,
            100.0 * traffic / copy_traffic
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `bytes` of `dtype` elements all equal to `value`.
fn fill(dtype: DType, bytes: usize, value: f32) -> Vec<u8> {
    let one: Vec<u8> = match dtype {
        DType::F32 => value.to_ne_bytes().to_vec(),
        DType::F16 => f32_to_f16(value).to_ne_bytes().to_vec(),
        _ => f32_to_bf16(value).to_ne_bytes().to_vec(),
    };
    one.iter().copied().cycle().take(bytes).collect()
}

fn parse_size(s: &str) -> Result<usize, String> {
    let (num, mult) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 1usize << 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 1 << 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or(format!("cannot parse size {s:?} (e.g. 256M)"))
}
