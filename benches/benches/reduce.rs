//! Reduction kernel throughput: group `reduce`, ids `{op}/{dtype}/{bytes}`, throughput = the
//! bytes of both operands read (`2 * bytes`).
//!
//! The plain id measures the process-wide path (what the engine uses; `CONCORD_KERNELS` can
//! force it); ids ending in `/{path}` measure every other path this CPU has, the scalar one
//! included, for comparison. `plain-loop/float/{bytes}` is the machine's yardstick in the same
//! run: the plain `dst[i] += src[i]` loop, auto-vectorised.
//!
//! Run: `cargo bench -p concord-benches --bench reduce`.

use std::time::Duration;

use concord_kernels::{CpuPath, DType, Kernels, ReduceOp, Stores};
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const SIZES_BYTES: [usize; 2] = [512 << 10, 64 << 20];
const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// A buffer of `bytes` bytes holding small positive values of `dtype` (no NaN, no subnormal).
fn filled(dtype: DType, bytes: usize, value: f32) -> Vec<u8> {
    let one: Vec<u8> = match dtype {
        DType::F32 => value.to_ne_bytes().to_vec(),
        DType::F16 => half::f16::from_f32(value).to_ne_bytes().to_vec(),
        _ => half::bf16::from_f32(value).to_ne_bytes().to_vec(),
    };
    one.iter().copied().cycle().take(bytes).collect()
}

fn reduce(c: &mut Criterion) {
    let default = match Kernels::default_path() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("reduce benches: {e}");
            return;
        }
    };
    eprintln!("reduce: default CPU path = {}", default.path());
    let mut rows = vec![(default, String::new())];
    for path in CpuPath::ALL {
        match Kernels::new(path) {
            Ok(k) if path != default.path() => rows.push((k, format!("/{path}"))),
            Ok(_) => {}
            Err(e) => eprintln!("reduce: skipping path {path}: {e}"),
        }
    }

    let mut group = c.benchmark_group("reduce");
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    group.sample_size(20);
    let op = ReduceOp::Sum;
    for bytes in SIZES_BYTES {
        for dtype in DTYPES {
            let src = filled(dtype, bytes, 0.25);
            let mut dst = filled(dtype, bytes, 1.0);
            group.throughput(Throughput::BytesDecimal(2 * bytes as u64));
            for (k, suffix) in &rows {
                let id = BenchmarkId::from_parameter(format!("{op}/{dtype}/{bytes}{suffix}"));
                group.bench_function(id, |b| {
                    b.iter(|| {
                        k.reduce_into(black_box(&mut dst), black_box(&src), dtype, op)
                            .expect("benchmark buffers are valid")
                    })
                });
            }
        }
    }
    // The machine's own yardstick, measured in the same run: the plain loop a C compiler would
    // emit for `dst[i] += src[i]` over f32 (auto-vectorised with AVX-512 where the CPU has it).
    for bytes in SIZES_BYTES {
        let src = vec![0.25f32; bytes / 4];
        let mut dst = vec![1.0f32; bytes / 4];
        group.throughput(Throughput::BytesDecimal(2 * bytes as u64));
        let id = BenchmarkId::from_parameter(format!("plain-loop/float/{bytes}"));
        group.bench_function(id, |b| {
            b.iter(|| plain_add(black_box(&mut dst), black_box(&src)))
        });
    }
    group.finish();
}

/// `dst[i] += src[i]`, as plain as it gets.
fn plain_add(dst: &mut [f32], src: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512 F (checked just above).
            return unsafe { plain_add_avx512(dst, src) };
        }
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d += *s;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn plain_add_avx512(dst: &mut [f32], src: &[f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d += *s;
    }
}

/// The ring's reduce-scatter receive in isolation: each 512 KiB frame lands in a staging buffer
/// that stays in the cache, and is reduced with this peer's input into the destination, both
/// 64 MiB (from memory). Group `stores`, throughput = destination bytes:
/// * `out/{cached,streaming}`: out of place, results written with ordinary or streaming stores;
/// * `in-place/{copy-then-reduce,saving}`: in place with a backup of the originals, as a copy
///   and then the reduction, or as the fused `reduce_into_saving`.
fn stores(c: &mut Criterion) {
    let k = match Kernels::default_path() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("stores benches: {e}");
            return;
        }
    };
    const FRAME: usize = 512 << 10;
    const BYTES: usize = 64 << 20;
    let (dtype, op) = (DType::F32, ReduceOp::Sum);
    let staged = filled(dtype, FRAME, 0.25);
    let src = filled(dtype, BYTES, 1.0);
    let mut dst = filled(dtype, BYTES, 0.0);
    let mut backup = filled(dtype, BYTES, 0.0);
    let mut group = c.benchmark_group("stores");
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    group.sample_size(20);
    group.throughput(Throughput::BytesDecimal(BYTES as u64));
    for (name, stores) in [("cached", Stores::Cached), ("streaming", Stores::Streaming)] {
        group.bench_function(format!("out/{name}/{dtype}/{BYTES}"), |b| {
            b.iter(|| {
                for (d, s) in dst.chunks_mut(FRAME).zip(src.chunks(FRAME)) {
                    k.reduce_out_with(d, s, &staged, dtype, op, None, stores)
                        .expect("benchmark buffers are valid");
                }
                black_box(&mut dst);
            })
        });
    }
    group.bench_function(format!("in-place/copy-then-reduce/{dtype}/{BYTES}"), |b| {
        b.iter(|| {
            for (d, s) in dst.chunks_mut(FRAME).zip(backup.chunks_mut(FRAME)) {
                s.copy_from_slice(d);
                k.reduce_out(d, s, &staged, dtype, op)
                    .expect("benchmark buffers are valid");
            }
            black_box(&mut dst);
        })
    });
    group.bench_function(format!("in-place/saving/{dtype}/{BYTES}"), |b| {
        b.iter(|| {
            for (d, s) in dst.chunks_mut(FRAME).zip(backup.chunks_mut(FRAME)) {
                k.reduce_into_saving(d, &staged, s, Stores::Streaming, dtype, op, None)
                    .expect("benchmark buffers are valid");
            }
            black_box(&mut dst);
        })
    });
    group.finish();
}

criterion_group!(benches, reduce, stores);
criterion_main!(benches);
