//! The portable scalar path: one element at a time, the semantics written out plainly.
//!
//! This is also the twin of the test oracle: every other path (SIMD, CUDA) must give the same
//! bits as this one.

use std::num::NonZeroUsize;

use crate::convert::{
    bf16_to_f32, canon_f32, canon_f64, f16_to_f32, f32_to_bf16, f32_to_f16, F32_NAN_BITS,
    F64_NAN_BITS,
};
use crate::job::{Job, PathFns};
use crate::{DType, ReduceOp};

/// The scalar path's function table.
pub(crate) static FNS: PathFns = PathFns {
    combine,
    finish: finish_in_place,
};

/// One element type as the scalar path sees it: how to load, compute and store it.
pub(crate) trait Elem {
    /// Bytes per element in memory.
    const BYTES: usize;
    /// The type arithmetic happens in (f32 for f16 and bf16).
    type Acc: Copy;
    /// Load one element from `p` (any alignment).
    ///
    /// # Safety
    /// `p` must be valid for reading `Self::BYTES` bytes.
    unsafe fn load(p: *const u8) -> Self::Acc;
    /// Store one element to `p` (any alignment), rounding to the memory type.
    ///
    /// # Safety
    /// `p` must be valid for writing `Self::BYTES` bytes.
    unsafe fn store(p: *mut u8, v: Self::Acc);
    /// `a + b`.
    fn add(a: Self::Acc, b: Self::Acc) -> Self::Acc;
    /// `a * b`.
    fn mul(a: Self::Acc, b: Self::Acc) -> Self::Acc;
    /// `max(a, b)`.
    fn max(a: Self::Acc, b: Self::Acc) -> Self::Acc;
    /// `min(a, b)`.
    fn min(a: Self::Acc, b: Self::Acc) -> Self::Acc;
    /// Round to what a store followed by a load would give.
    fn round(v: Self::Acc) -> Self::Acc;
    /// `v / world` for Avg.
    fn div(v: Self::Acc, world: usize) -> Self::Acc;
}

/// Float max: NaN if either is NaN (canonical), `max(-0, +0) = +0`.
macro_rules! float_minmax {
    ($t:ty, $nan:expr) => {
        fn max(a: $t, b: $t) -> $t {
            if a.is_nan() || b.is_nan() {
                <$t>::from_bits($nan)
            } else if a == b {
                // Equal values differ at most in the sign of zero: AND the bits (+0 wins).
                <$t>::from_bits(a.to_bits() & b.to_bits())
            } else if a > b {
                a
            } else {
                b
            }
        }
        fn min(a: $t, b: $t) -> $t {
            if a.is_nan() || b.is_nan() {
                <$t>::from_bits($nan)
            } else if a == b {
                // OR the bits: -0 wins.
                <$t>::from_bits(a.to_bits() | b.to_bits())
            } else if a < b {
                a
            } else {
                b
            }
        }
    };
}

macro_rules! float_elem {
    ($name:ident, $mem:ty, $bytes:expr, $acc:ty, $to:expr, $from:expr, $canon:ident, $nan:expr) => {
        pub(crate) struct $name;
        impl Elem for $name {
            const BYTES: usize = $bytes;
            type Acc = $acc;
            #[inline(always)]
            unsafe fn load(p: *const u8) -> $acc {
                // SAFETY: the caller guarantees `p` is readable for BYTES bytes.
                let raw = unsafe { p.cast::<$mem>().read_unaligned() };
                ($to)(raw)
            }
            #[inline(always)]
            unsafe fn store(p: *mut u8, v: $acc) {
                let raw: $mem = ($from)(v);
                // SAFETY: the caller guarantees `p` is writable for BYTES bytes.
                unsafe { p.cast::<$mem>().write_unaligned(raw) }
            }
            #[inline(always)]
            fn add(a: $acc, b: $acc) -> $acc {
                $canon(a + b)
            }
            #[inline(always)]
            fn mul(a: $acc, b: $acc) -> $acc {
                $canon(a * b)
            }
            float_minmax!($acc, $nan);
            #[inline(always)]
            fn round(v: $acc) -> $acc {
                ($to)(($from)(v))
            }
            #[inline(always)]
            fn div(v: $acc, world: usize) -> $acc {
                $canon(v / world as $acc)
            }
        }
    };
}

float_elem!(F32, f32, 4, f32, |x| x, |x| x, canon_f32, F32_NAN_BITS);
float_elem!(F64, f64, 8, f64, |x| x, |x| x, canon_f64, F64_NAN_BITS);
float_elem!(
    F16,
    u16,
    2,
    f32,
    f16_to_f32,
    f32_to_f16,
    canon_f32,
    F32_NAN_BITS
);
float_elem!(
    BF16,
    u16,
    2,
    f32,
    bf16_to_f32,
    f32_to_bf16,
    canon_f32,
    F32_NAN_BITS
);

macro_rules! int_elem {
    ($name:ident, $t:ty) => {
        pub(crate) struct $name;
        impl Elem for $name {
            const BYTES: usize = std::mem::size_of::<$t>();
            type Acc = $t;
            #[inline(always)]
            unsafe fn load(p: *const u8) -> $t {
                // SAFETY: the caller guarantees `p` is readable for BYTES bytes.
                unsafe { p.cast::<$t>().read_unaligned() }
            }
            #[inline(always)]
            unsafe fn store(p: *mut u8, v: $t) {
                // SAFETY: the caller guarantees `p` is writable for BYTES bytes.
                unsafe { p.cast::<$t>().write_unaligned(v) }
            }
            #[inline(always)]
            fn add(a: $t, b: $t) -> $t {
                a.wrapping_add(b)
            }
            #[inline(always)]
            fn mul(a: $t, b: $t) -> $t {
                a.wrapping_mul(b)
            }
            #[inline(always)]
            fn max(a: $t, b: $t) -> $t {
                Ord::max(a, b)
            }
            #[inline(always)]
            fn min(a: $t, b: $t) -> $t {
                Ord::min(a, b)
            }
            #[inline(always)]
            fn round(v: $t) -> $t {
                v
            }
            #[inline(always)]
            fn div(v: $t, world: usize) -> $t {
                // Truncating division; the quotient's magnitude never exceeds |v|, so it fits.
                (i128::from(v) / world as i128) as $t
            }
        }
    };
}

int_elem!(I8, i8);
int_elem!(I16, i16);
int_elem!(I32, i32);
int_elem!(I64, i64);
int_elem!(U8, u8);
int_elem!(U16, u16);
int_elem!(U32, u32);
int_elem!(U64, u64);

/// Calls `$body::<ElemType>` for the job's dtype.
macro_rules! by_dtype {
    ($dtype:expr, $f:ident ( $($arg:expr),* )) => {
        match $dtype {
            DType::F32 => $f::<$crate::cpu::scalar::F32>($($arg),*),
            DType::F64 => $f::<$crate::cpu::scalar::F64>($($arg),*),
            DType::F16 => $f::<$crate::cpu::scalar::F16>($($arg),*),
            DType::BF16 => $f::<$crate::cpu::scalar::BF16>($($arg),*),
            DType::I8 => $f::<$crate::cpu::scalar::I8>($($arg),*),
            DType::I16 => $f::<$crate::cpu::scalar::I16>($($arg),*),
            DType::I32 => $f::<$crate::cpu::scalar::I32>($($arg),*),
            DType::I64 => $f::<$crate::cpu::scalar::I64>($($arg),*),
            DType::U8 => $f::<$crate::cpu::scalar::U8>($($arg),*),
            DType::U16 => $f::<$crate::cpu::scalar::U16>($($arg),*),
            DType::U32 => $f::<$crate::cpu::scalar::U32>($($arg),*),
            DType::U64 => $f::<$crate::cpu::scalar::U64>($($arg),*),
        }
    };
}
// Only the SIMD paths (x86-64) dispatch through it.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_imports))]
pub(crate) use by_dtype;

/// `dst[i] = a[i] op b[i]` (then `/ world` when the job carries a divisor) for every element.
///
/// # Safety
/// The job's pointers must satisfy the contract documented on [`Job`].
pub(crate) unsafe fn combine(job: &Job) {
    // SAFETY: forwarded from our caller.
    unsafe { by_dtype!(job.dtype, combine_elems(job, 0)) }
}

/// Like [`combine`], for elements `start..job.len` only (SIMD paths finish their tails here).
///
/// # Safety
/// The job's pointers must satisfy the contract documented on [`Job`]; `start <= job.len`.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) unsafe fn combine_from(job: &Job, start: usize) {
    // SAFETY: forwarded from our caller.
    unsafe { by_dtype!(job.dtype, combine_elems(job, start)) }
}

/// Inlined into the SIMD paths too, where the compiler vectorises it for the dtypes they do
/// not hand-write (the same code, so the same bits).
///
/// # Safety
/// The job's pointers must satisfy the contract documented on [`Job`]; `start <= job.len`.
#[inline(always)]
pub(crate) unsafe fn combine_elems<E: Elem>(job: &Job, start: usize) {
    // SAFETY: every arm forwards our caller's guarantees.
    unsafe {
        match job.op {
            ReduceOp::Sum | ReduceOp::Avg => combine_with::<E>(job, start, E::add),
            ReduceOp::Prod => combine_with::<E>(job, start, E::mul),
            ReduceOp::Max => combine_with::<E>(job, start, E::max),
            ReduceOp::Min => combine_with::<E>(job, start, E::min),
        }
    }
}

/// # Safety
/// The job's pointers must satisfy the contract documented on [`Job`]; `start <= job.len`.
#[inline(always)]
unsafe fn combine_with<E: Elem>(job: &Job, start: usize, f: fn(E::Acc, E::Acc) -> E::Acc) {
    debug_assert!(start <= job.len);
    let divisor = job.divisor.map(NonZeroUsize::get);
    for i in start..job.len {
        let off = i * E::BYTES;
        // SAFETY: i < len, so `off..off + BYTES` lies inside every operand (Job contract).
        // `a` may equal `dst`: each element is read before it is written.
        unsafe {
            let r = f(E::load(job.a.add(off)), E::load(job.b.add(off)));
            let r = match divisor {
                Some(world) => E::div(E::round(r), world),
                None => r,
            };
            E::store(job.dst.add(off), r);
        }
    }
}

/// `dst[i] = dst[i] / world` for every element.
///
/// # Safety
/// `dst` must be valid for reads and writes of `len` elements of `dtype`.
pub(crate) unsafe fn finish_in_place(dst: *mut u8, len: usize, dtype: DType, world: NonZeroUsize) {
    // SAFETY: forwarded from our caller.
    unsafe { by_dtype!(dtype, finish_elems(dst, len, world.get())) }
}

/// # Safety
/// `dst` must be valid for reads and writes of `len` elements of `E`.
#[inline(always)]
pub(crate) unsafe fn finish_elems<E: Elem>(dst: *mut u8, len: usize, world: usize) {
    for i in 0..len {
        let off = i * E::BYTES;
        // SAFETY: i < len, so the element lies inside `dst` (caller contract).
        unsafe {
            let v = E::load(dst.add(off));
            E::store(dst.add(off), E::div(v, world));
        }
    }
}
