//! The CUDA kernel source, compiled as host C++ (a few lines of shims stand in for the CUDA
//! intrinsics, which are all IEEE round-to-nearest operations), must give the scalar path's
//! bits for every kernel. This checks the kernels' logic (conversions, NaN and signed-zero
//! rules, wrapping, integer division) on machines without a GPU; `tests/cuda.rs` checks the
//! real thing where a GPU exists. Skips loudly without a C++ compiler.

// Skips are written straight to stderr, past the test harness's capture, so they show.
use std::io::Write as _;

mod common;

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use common::*;
use concord_kernels::{CpuPath, DType, Kernels, ReduceOp};

const SHIM: &str = r#"
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>
#define __device__
#define __global__
#define __forceinline__ inline
struct Dim { unsigned x; };
static Dim blockIdx = {0}, blockDim = {1}, threadIdx = {0}, gridDim = {1};
template <class To, class From> inline To bits_as(From f) { To t; std::memcpy(&t, &f, sizeof t); return t; }
inline float __uint_as_float(unsigned u) { return bits_as<float>(u); }
inline unsigned __float_as_uint(float f) { return bits_as<unsigned>(f); }
inline double __longlong_as_double(long long u) { return bits_as<double>(u); }
inline long long __double_as_longlong(double d) { return bits_as<long long>(d); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline float __ull2float_rn(unsigned long long x) { return (float)x; }
inline double __ull2double_rn(unsigned long long x) { return (double)x; }
"#;

const DRIVER: &str = r#"
static std::string dir;
template <class T> std::vector<T> load(const std::string& name) {
    FILE* f = std::fopen((dir + "/" + name).c_str(), "rb");
    if (!f) { std::perror(name.c_str()); std::exit(2); }
    std::fseek(f, 0, SEEK_END); long n = std::ftell(f); std::fseek(f, 0, SEEK_SET);
    std::vector<T> v(n / sizeof(T));
    if (n && std::fread(v.data(), 1, n, f) != (size_t)n) std::exit(3);
    std::fclose(f);
    return v;
}
template <class T> void save(const std::string& name, const std::vector<T>& v) {
    FILE* f = std::fopen((dir + "/" + name).c_str(), "wb");
    if (!f) { std::perror(name.c_str()); std::exit(2); }
    if (!v.empty()) std::fwrite(v.data(), sizeof(T), v.size(), f);
    std::fclose(f);
}
template <class E> void red(void (*k)(typename E::S*, const typename E::S*, const typename E::S*, u64),
                            const char* dt, const char* name) {
    auto a = load<typename E::S>(std::string("a_") + dt), b = load<typename E::S>(std::string("b_") + dt);
    std::vector<typename E::S> d(a.size());
    k(d.data(), a.data(), b.data(), a.size());
    save(name, d);
}
template <class E> void avg(void (*k)(typename E::S*, const typename E::S*, const typename E::S*, u64, u64),
                            void (*fin)(typename E::S*, u64, u64), const char* dt, u64 world) {
    auto a = load<typename E::S>(std::string("a_") + dt), b = load<typename E::S>(std::string("b_") + dt);
    std::vector<typename E::S> d(a.size());
    k(d.data(), a.data(), b.data(), a.size(), world);
    save(std::string("fused_") + dt + "_" + std::to_string(world), d);
    fin(a.data(), a.size(), world);
    save(std::string("finish_") + dt + "_" + std::to_string(world), a);
}
int main(int argc, char** argv) {
    dir = argv[1];
"#;

const WORLDS: [u64; 3] = [3, 1 << 40, u64::MAX];

fn compile(dir: &Path) -> Result<std::path::PathBuf, String> {
    let mut src = String::from(SHIM);
    src.push_str(&concord_kernels::cuda::kernel_source());
    src.push_str(DRIVER);
    for dtype in DType::ALL {
        let dt = dtype.short_name();
        let e = dt.to_uppercase();
        for op in ["sum", "prod", "max", "min"] {
            writeln!(
                src,
                "    red<{e}>(concord_reduce_{op}_{dt}, \"{dt}\", \"{op}_{dt}\");"
            )
            .unwrap();
        }
        for w in WORLDS {
            writeln!(
                src,
                "    avg<{e}>(concord_reduce_finish_avg_{dt}, concord_finish_avg_{dt}, \"{dt}\", {w}ull);"
            )
            .unwrap();
        }
    }
    src.push_str("    return 0;\n}\n");
    let cpp = dir.join("kernels_host.cpp");
    let exe = dir.join("kernels_host");
    std::fs::write(&cpp, src).map_err(|e| e.to_string())?;
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".to_owned());
    let out = Command::new(&cxx)
        .args([
            "-std=c++14",
            "-O2",
            "-ffp-contract=off",
            "-fno-fast-math",
            "-o",
        ])
        .arg(&exe)
        .arg(&cpp)
        .output()
        .map_err(|e| format!("cannot run {cxx}: {e}"))?;
    if !out.status.success() {
        panic!(
            "the kernel source does not compile as host C++:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(exe)
}

#[test]
fn cuda_source_on_the_host_matches_scalar() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cuda-host");
    std::fs::create_dir_all(&dir).unwrap();
    let exe = match compile(&dir) {
        Ok(exe) => exe,
        Err(reason) => {
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: host check of the CUDA source: {reason}"
            );
            return;
        }
    };
    let mut rng = XorShift::new(5);
    let len = 20_000;
    let mut inputs = Vec::new();
    for dtype in DType::ALL {
        // Half raw bits (NaN payloads, subnormals, infinities), half typical values.
        let mut a: Vec<u8> = (0..len / 2 * dtype.size_bytes())
            .map(|_| rng.next() as u8)
            .collect();
        let mut b: Vec<u8> = (0..len / 2 * dtype.size_bytes())
            .map(|_| rng.next() as u8)
            .collect();
        a.extend(gen(dtype, len / 2, &mut rng));
        b.extend(gen(dtype, len / 2, &mut rng));
        std::fs::write(dir.join(format!("a_{}", dtype.short_name())), &a).unwrap();
        std::fs::write(dir.join(format!("b_{}", dtype.short_name())), &b).unwrap();
        inputs.push((dtype, a, b));
    }
    let status = Command::new(&exe)
        .arg(&dir)
        .status()
        .expect("run the host build");
    assert!(
        status.success(),
        "host build of the kernels failed: {status}"
    );

    let cpu = Kernels::new(CpuPath::Scalar).unwrap();
    let read =
        |name: String| std::fs::read(dir.join(&name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    for (dtype, a, b) in &inputs {
        let dt = dtype.short_name();
        for (op, name) in [
            (ReduceOp::Sum, "sum"),
            (ReduceOp::Prod, "prod"),
            (ReduceOp::Max, "max"),
            (ReduceOp::Min, "min"),
        ] {
            let mut want = vec![0u8; a.len()];
            cpu.reduce_out(&mut want, a, b, *dtype, op).unwrap();
            assert_same(&read(format!("{name}_{dt}")), &want, *dtype, name);
        }
        for w in WORLDS {
            let world = usize::try_from(w).unwrap();
            let mut want = vec![0u8; a.len()];
            cpu.reduce_out_finish(&mut want, a, b, *dtype, ReduceOp::Avg, world)
                .unwrap();
            assert_same(
                &read(format!("fused_{dt}_{w}")),
                &want,
                *dtype,
                &format!("fused avg /{w}"),
            );
            let mut want = a.clone();
            cpu.finish(&mut want, *dtype, ReduceOp::Avg, world).unwrap();
            assert_same(
                &read(format!("finish_{dt}_{w}")),
                &want,
                *dtype,
                &format!("finish /{w}"),
            );
        }
    }
}

fn assert_same(got: &[u8], want: &[u8], dtype: DType, what: &str) {
    assert_eq!(got.len(), want.len(), "{dtype} {what}: length");
    let n = dtype.size_bytes();
    if let Some(i) = (0..want.len() / n).find(|&i| got[i * n..][..n] != want[i * n..][..n]) {
        panic!(
            "CUDA source (host build) differs from scalar: {dtype} {what} element {i}: got {:#x} want {:#x}",
            bits(got, dtype, i),
            bits(want, dtype, i)
        );
    }
}
