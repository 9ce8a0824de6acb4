//! CPU implementations: the scalar reference and the x86-64 SIMD paths.
//!
//! Intrinsics live only under `x86_64/`; everything else here is portable.

use crate::dispatch::PathFns;
use crate::CpuPath;

pub(crate) mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86_64;

/// The CPU features the AVX2 path needs that this CPU lacks.
pub(crate) fn avx2_missing() -> Vec<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        let mut missing = Vec::new();
        if !std::arch::is_x86_feature_detected!("avx2") {
            missing.push("avx2");
        }
        if !std::arch::is_x86_feature_detected!("f16c") {
            missing.push("f16c");
        }
        missing
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        vec!["x86-64 CPU"]
    }
}

/// The CPU features the AVX-512 path needs that this CPU lacks.
pub(crate) fn avx512_missing() -> Vec<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        let mut missing = Vec::new();
        if !std::arch::is_x86_feature_detected!("avx512f") {
            missing.push("avx512f");
        }
        if !std::arch::is_x86_feature_detected!("avx512bw") {
            missing.push("avx512bw");
        }
        if !std::arch::is_x86_feature_detected!("avx512vl") {
            missing.push("avx512vl");
        }
        if !std::arch::is_x86_feature_detected!("f16c") {
            missing.push("f16c");
        }
        missing
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        vec!["x86-64 CPU"]
    }
}

/// The CPU features the AVX-512 + AVX512-BF16 path needs that this CPU lacks.
pub(crate) fn avx512_bf16_missing() -> Vec<&'static str> {
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
    let mut missing = avx512_missing();
    #[cfg(target_arch = "x86_64")]
    {
        if !std::arch::is_x86_feature_detected!("avx512dq") {
            missing.push("avx512dq");
        }
        if !std::arch::is_x86_feature_detected!("avx512bf16") {
            missing.push("avx512bf16");
        }
    }
    missing
}

/// The CPU features the AVX-512 + AVX512-FP16 path needs that this CPU lacks.
pub(crate) fn avx512_fp16_missing() -> Vec<&'static str> {
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
    let mut missing = avx512_missing();
    #[cfg(target_arch = "x86_64")]
    {
        if !std::arch::is_x86_feature_detected!("avx512fp16") {
            missing.push("avx512fp16");
        }
    }
    missing
}

/// The function table of `path`. The caller has checked that the CPU supports it.
pub(crate) fn fns(path: CpuPath) -> &'static PathFns {
    match path {
        CpuPath::Scalar => &scalar::FNS,
        #[cfg(target_arch = "x86_64")]
        CpuPath::Avx2 => &x86_64::avx2::FNS,
        #[cfg(target_arch = "x86_64")]
        CpuPath::Avx512 => &x86_64::avx512::FNS,
        #[cfg(target_arch = "x86_64")]
        CpuPath::Avx512Bf16 => &x86_64::avx512_bf16::FNS,
        #[cfg(target_arch = "x86_64")]
        CpuPath::Avx512Fp16 => &x86_64::avx512_fp16::FNS,
        #[cfg(not(target_arch = "x86_64"))]
        CpuPath::Avx2 | CpuPath::Avx512 | CpuPath::Avx512Bf16 | CpuPath::Avx512Fp16 => &scalar::FNS,
    }
}
