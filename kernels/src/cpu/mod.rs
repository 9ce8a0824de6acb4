//! CPU implementations: the scalar reference and the x86-64 SIMD paths.
//!
//! Intrinsics live only under `x86_64/`; everything else here is portable.

use crate::job::PathFns;

pub(crate) mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86_64;

/// The scalar path's table (the reference).
pub(crate) static SCALAR: &PathFns = &scalar::FNS;
/// The AVX2 path's table.
#[cfg(target_arch = "x86_64")]
pub(crate) static AVX2: &PathFns = &x86_64::avx2::FNS;
/// The AVX-512 path's table.
#[cfg(target_arch = "x86_64")]
pub(crate) static AVX512: &PathFns = &x86_64::avx512::FNS;
/// The AVX-512 + AVX512-BF16 path's table.
#[cfg(target_arch = "x86_64")]
pub(crate) static AVX512_BF16: &PathFns = &x86_64::avx512_bf16::FNS;
/// The AVX-512 + AVX512-FP16 path's table.
#[cfg(target_arch = "x86_64")]
pub(crate) static AVX512_FP16: &PathFns = &x86_64::avx512_fp16::FNS;

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
