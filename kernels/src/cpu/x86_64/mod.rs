//! x86-64 SIMD paths. Intrinsics appear only below this module.

pub(crate) mod avx2;
pub(crate) mod avx512;
pub(crate) mod avx512_bf16;
pub(crate) mod avx512_fp16;
mod common;
