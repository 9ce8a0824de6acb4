//! Wire quantisation throughput: group `quant`, ids `{encode|decode}/{codec}/{bytes}`,
//! throughput = the bytes of the f32 chunk (what the codec saves bandwidth on). The yardstick in
//! the same run is `copy/{bytes}`, a plain memory copy of the same chunk.
//!
//! Run: `cargo bench -p concord-benches --bench quant`.

use std::time::Duration;

use concord_kernels::quant::{decode, encode, Codec};
use concord_kernels::DType;
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

/// One frame of the data plane (the default sub-chunk).
const BYTES: usize = 512 << 10;

fn quant(c: &mut Criterion) {
    let src: Vec<u8> = (0..BYTES / 4)
        .flat_map(|i| ((i as f32 * 0.001).sin() * 3.0).to_le_bytes())
        .collect();
    let mut g = c.benchmark_group("quant");
    g.throughput(Throughput::Bytes(BYTES as u64));
    g.measurement_time(Duration::from_secs(2));
    let mut dst = vec![0u8; BYTES];
    g.bench_function(BenchmarkId::new("copy", BYTES), |b| {
        b.iter(|| dst.copy_from_slice(black_box(&src)))
    });
    for codec in Codec::ALL {
        let mut enc = Vec::with_capacity(codec.max_encoded_len(DType::F32, BYTES / 4));
        g.bench_function(BenchmarkId::new(format!("encode/{codec}"), BYTES), |b| {
            b.iter(|| {
                enc.clear();
                encode(codec, DType::F32, black_box(&src), &mut enc).unwrap();
            })
        });
        g.bench_function(BenchmarkId::new(format!("decode/{codec}"), BYTES), |b| {
            b.iter(|| decode(DType::F32, black_box(&enc), &mut dst).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, quant);
criterion_main!(benches);
