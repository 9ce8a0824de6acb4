//! Concord's reduction kernels timed the way `benches/c/reduce_ref.c` times the plain C loop,
//! so that `benches/kernels.sh` can set one against the other in the same run.
//!
//! For every dtype and size: `dst = a + b` on the process-wide path (`CONCORD_KERNELS` forces
//! one), three buffers of BYTES each, GB/s = 3 * BYTES / time, the median of 15 samples of at
//! least 20 ms each. One line per row: `concord DTYPE BYTES GBPS STORES`, where STORES is
//! `cached` or `streaming` (non-temporal results); `engine` marks the stores the engine uses
//! for a collective of that size.
//!
//! Usage: reduce-bw [BYTES...]   (default: 131072 67108864)

use std::time::Instant;

use concord_kernels::{DType, Kernels, ReduceOp, Stores};

const SAMPLES: usize = 15;
/// The engine streams the results of host collectives from this size on (its default).
const ENGINE_STREAM_MIN_BYTES: usize = 16 << 20;

fn main() {
    let sizes: Vec<usize> = match std::env::args()
        .skip(1)
        .map(|a| a.parse::<usize>())
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(v) if !v.is_empty() => v,
        Ok(_) => vec![128 << 10, 64 << 20],
        Err(e) => {
            eprintln!("reduce-bw: sizes are numbers of bytes: {e}");
            std::process::exit(2);
        }
    };
    let k = match Kernels::default_path() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("reduce-bw: {e}");
            std::process::exit(1);
        }
    };
    eprintln!("reduce-bw: CPU path {}", k.path());
    for bytes in sizes {
        // 64-byte aligned buffers, as the engine's pooled buffers are.
        let (mut d, a, b) = (
            Aligned::new(bytes, 0),
            Aligned::new(bytes, 0x3c),
            Aligned::new(bytes, 0x3b),
        );
        for dtype in DType::ALL {
            let usable = bytes - bytes % dtype.size_bytes();
            for stores in [Stores::Cached, Stores::Streaming] {
                let mut pass = || {
                    k.reduce_out_with(
                        &mut d.bytes_mut()[..usable],
                        &a.bytes()[..usable],
                        &b.bytes()[..usable],
                        dtype,
                        ReduceOp::Sum,
                        None,
                        stores,
                    )
                    .expect("benchmark buffers are valid")
                };
                pass();
                let mut t: Vec<f64> = (0..SAMPLES)
                    .map(|_| {
                        let (start, mut passes) = (Instant::now(), 0u32);
                        while start.elapsed().as_secs_f64() < 0.02 {
                            pass();
                            passes += 1;
                        }
                        start.elapsed().as_secs_f64() / f64::from(passes)
                    })
                    .collect();
                t.sort_by(f64::total_cmp);
                let gbps = 3.0 * usable as f64 / t[SAMPLES / 2] / 1e9;
                let engine = (stores == Stores::Streaming) == (bytes >= ENGINE_STREAM_MIN_BYTES);
                let name = if stores == Stores::Streaming {
                    "streaming"
                } else {
                    "cached"
                };
                println!(
                    "concord {} {bytes} {gbps:.2} {name}{}",
                    dtype.name(),
                    if engine { " engine" } else { "" }
                );
            }
        }
    }
}

/// A 64-byte aligned, initialised byte buffer.
struct Aligned {
    words: Vec<[u8; 64]>,
    len: usize,
}

impl Aligned {
    fn new(len: usize, fill: u8) -> Self {
        Aligned {
            words: vec![[fill; 64]; len.div_ceil(64)],
            len,
        }
    }
    fn bytes(&self) -> &[u8] {
        &self.words.as_flattened()[..self.len]
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.words.as_flattened_mut()[..self.len]
    }
}
