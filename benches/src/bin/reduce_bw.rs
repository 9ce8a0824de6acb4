//! Concord's reduction kernels timed the way `benches/c/reduce_ref.c` times the plain C loop,
//! so that `benches/kernels.sh` can set one against the other in the same run.
//!
//! For every dtype and size: `dst = a + b` on the process-wide path (`CONCORD_KERNELS` forces
//! one), three buffers of BYTES each, GB/s = 3 * BYTES / time, the median of 15 samples of at
//! least 20 ms each. With `--ref NAME=LIB`, the C loops of `LIB` (reduce_ref.c built as a
//! shared library) are timed too, on the same buffers, sample by sample in turn with Concord's:
//! a host's slow and fast phases then fall on both alike.
//!
//! One line per row: `concord DTYPE BYTES GBPS STORES`, where STORES is `cached` or `streaming`
//! (non-temporal results) and `engine` marks the stores the engine uses for a collective of
//! that size; `ref NAME DTYPE BYTES GBPS` for each reference.
//!
//! Usage: reduce-bw [--ref NAME=LIB]... [BYTES...]   (default: 131072 67108864)

use std::ffi::{c_char, c_int, c_void, CString};
use std::time::Instant;

use concord_kernels::{DType, Kernels, ReduceOp, Stores};

const SAMPLES: usize = 15;

/// `reduce_ref_pass` of reduce_ref.c.
type RefPass =
    unsafe extern "C" fn(*const c_char, *mut c_void, *const c_void, *const c_void, usize) -> c_int;

/// What one row times: Concord's kernel with these stores, or the reference at this index.
#[derive(Clone, Copy)]
enum Contender {
    Concord(Stores),
    Reference(usize),
}

/// A C reference loaded from a shared library.
struct Reference {
    name: String,
    pass: RefPass,
    _lib: libloading::Library,
}

fn main() {
    let (refs, sizes) = match parse(std::env::args().skip(1)) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("reduce-bw: {e}\nusage: reduce-bw [--ref NAME=LIB]... [BYTES...]");
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
            let c_name = CString::new(dtype.name()).expect("dtype names have no NUL");
            // Concord with each kind of stores, then every reference. Each row is printed as
            // `{head} {GBPS}{tail}`.
            let mut rows: Vec<(Contender, String, String, Vec<f64>)> = Vec::new();
            let engine = if bytes >= Stores::STREAMING_MIN_BYTES {
                Stores::Streaming
            } else {
                Stores::Cached
            };
            for (stores, name) in [(Stores::Cached, "cached"), (Stores::Streaming, "streaming")] {
                let tag = if stores == engine { " engine" } else { "" };
                rows.push((
                    Contender::Concord(stores),
                    format!("concord {} {bytes}", dtype.name()),
                    format!(" {name}{tag}"),
                    Vec::new(),
                ));
            }
            for (i, r) in refs.iter().enumerate() {
                rows.push((
                    Contender::Reference(i),
                    format!("ref {} {} {bytes}", r.name, dtype.name()),
                    String::new(),
                    Vec::new(),
                ));
            }
            let pass = |who: Contender, d: &mut Aligned| match who {
                Contender::Concord(stores) => {
                    k.reduce_out_with(
                        &mut d.bytes_mut()[..usable],
                        &a.bytes()[..usable],
                        &b.bytes()[..usable],
                        dtype,
                        ReduceOp::Sum,
                        None,
                        stores,
                    )
                    .expect("benchmark buffers are valid");
                }
                Contender::Reference(i) => {
                    // SAFETY: three live buffers of at least `usable` bytes each, `d` exclusive;
                    // the loop reads `a` and `b` and writes `d` within `usable` bytes.
                    let rc = unsafe {
                        (refs[i].pass)(
                            c_name.as_ptr(),
                            d.bytes_mut().as_mut_ptr().cast(),
                            a.bytes().as_ptr().cast(),
                            b.bytes().as_ptr().cast(),
                            usable,
                        )
                    };
                    assert_eq!(rc, 0, "{} has no loop for {}", refs[i].name, dtype.name());
                }
            };
            for row in &rows {
                pass(row.0, &mut d); // warm up
            }
            for _ in 0..SAMPLES {
                for row in &mut rows {
                    let (start, mut passes) = (Instant::now(), 0u32);
                    while start.elapsed().as_secs_f64() < 0.02 {
                        pass(row.0, &mut d);
                        passes += 1;
                    }
                    row.3
                        .push(start.elapsed().as_secs_f64() / f64::from(passes));
                }
            }
            for (_, head, tail, mut t) in rows {
                t.sort_by(f64::total_cmp);
                let gbps = 3.0 * usable as f64 / t[SAMPLES / 2] / 1e9;
                println!("{head} {gbps:.2}{tail}");
            }
        }
    }
}

/// The references (`--ref NAME=LIB`, loaded) and the sizes.
fn parse(mut args: impl Iterator<Item = String>) -> Result<(Vec<Reference>, Vec<usize>), String> {
    let (mut refs, mut sizes) = (Vec::new(), Vec::new());
    while let Some(arg) = args.next() {
        if arg == "--ref" {
            let spec = args.next().ok_or("--ref needs NAME=LIB")?;
            let (name, path) = spec
                .split_once('=')
                .ok_or_else(|| format!("--ref {spec:?}: expected NAME=LIB"))?;
            // SAFETY: loading runs the library's initialisers; reduce_ref.c has none, and the
            // user named the library to be loaded.
            let lib = unsafe { libloading::Library::new(path) }
                .map_err(|e| format!("--ref {name}: cannot load {path}: {e}"))?;
            // SAFETY: reduce_ref.c defines `reduce_ref_pass` with exactly the RefPass signature.
            let pass: RefPass = *unsafe { lib.get::<RefPass>(b"reduce_ref_pass\0") }.map_err(|e| {
                format!("--ref {name}: {path} has no reduce_ref_pass (build benches/c/reduce_ref.c with -shared -fPIC -DREDUCE_REF_LIBRARY): {e}")
            })?;
            refs.push(Reference {
                name: name.to_string(),
                pass,
                _lib: lib,
            });
        } else {
            let n = arg
                .parse::<usize>()
                .map_err(|e| format!("sizes are numbers of bytes, not {arg:?}: {e}"))?;
            sizes.push(n);
        }
    }
    if sizes.is_empty() {
        sizes = vec![128 << 10, 64 << 20];
    }
    Ok((refs, sizes))
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
