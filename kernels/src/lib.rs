//! Reduction kernels for Concord: `dst = a op b` over byte buffers of any alignment, for every
//! element type and operator the engine supports, on the fastest CPU path this machine has.
//!
//! ```
//! use concord_kernels::{reduce_into, reduce_into_finish, DType, ReduceOp};
//!
//! // Three peers' f32 vectors, averaged the way the ring does it: two plain reductions, and the
//! // last one fused with the division by the world size.
//! let peers: [[f32; 4]; 3] = [[1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.0], [3.0, 6.0, 9.0, 12.0]];
//! let bytes = |v: &[f32; 4]| v.iter().flat_map(|x| x.to_ne_bytes()).collect::<Vec<u8>>();
//! let mut acc = bytes(&peers[0]);
//! reduce_into(&mut acc, &bytes(&peers[1]), DType::F32, ReduceOp::Avg)?;
//! reduce_into_finish(&mut acc, &bytes(&peers[2]), DType::F32, ReduceOp::Avg, 3)?;
//! assert_eq!(acc, bytes(&[2.0, 4.0, 6.0, 8.0]));
//! println!("reduced on the {} path", concord_kernels::cpu_path());
//! # Ok::<(), concord_kernels::KernelError>(())
//! ```
//!
//! # Semantics (identical on every path, bit for bit)
//!
//! * **Integers**: `Sum` and `Prod` wrap; `Max`/`Min` are the ordinary ones; `Avg` is the
//!   wrapping sum, then [`finish`] divides by the world size truncating toward zero (Rust `/`).
//! * **f32, f64**: one IEEE 754 operation per element in the type's own precision, round to
//!   nearest even. `Avg` divides by `world as f32` (`as f64` for f64), a true division.
//! * **f16, bf16**: both operands are widened to f32 (exactly), the operation is done in f32 and
//!   the result is rounded once to the 16-bit type (round to nearest even, subnormals kept, no
//!   flush to zero). `Avg`'s division happens in f32 on the already-rounded sum and is rounded
//!   once more; the fused `*_finish` forms give the same bits as the two separate calls.
//! * **NaN**: every floating-point result that is a NaN is the *canonical* quiet NaN, positive,
//!   with a zero payload (`0x7FC0_0000` for f32, `0x7FF8_0000_0000_0000` for f64, `0x7E00` for
//!   f16, `0x7FC0` for bf16; see [`convert`]). `Max` and `Min` *propagate* NaN: if either operand
//!   is NaN, the result is that canonical NaN. `Sum`/`Prod`/`Avg` give NaN where IEEE does
//!   (a NaN operand, `inf - inf`, `0 * inf`).
//! * **Infinity** behaves as IEEE says: overflow rounds to ±inf, `max(x, inf) = inf`.
//! * **Signed zeros**: `max(-0, +0) = max(+0, -0) = +0` and `min(-0, +0) = min(+0, -0) = -0`
//!   (as IEEE 754-2019 `maximum`/`minimum`), independent of operand order.
//! * The floating-point environment is assumed to be Rust's default (no flush-to-zero,
//!   no denormals-are-zero in MXCSR).
//!
//! # Paths
//!
//! `scalar` (portable, the reference), `avx2` (AVX2 + F16C), `avx512` (AVX-512 F/BW/VL + F16C)
//! `avx512bf16` (`avx512` narrowing bf16 with AVX512-BF16; only when forced, as it measured
//! no faster) and `avx512fp16` (`avx512` with f16 sums and products computed natively by
//! AVX512-FP16, the same bits). The widest of scalar/avx2/avx512/avx512fp16 the CPU supports is
//! chosen at the first call and cached; `CONCORD_KERNELS=scalar|avx2|avx512|avx512bf16|avx512fp16`
//! forces one, and a forced path the CPU lacks makes every call fail with
//! [`KernelError::PathUnsupported`]. [`cpu_path`] names the path
//! that runs.
//! The [`cuda`] module holds the same kernels for NVIDIA GPUs, compiled at run time by NVRTC.

#![warn(missing_docs)]

mod cpu;
mod dispatch;
mod error;
mod job;
mod stores;
mod types;

pub mod convert;
pub mod cuda;
pub mod quant;

use std::num::NonZeroUsize;

pub use dispatch::{CpuPath, Kernels, PATH_ENV};
pub use error::KernelError;
pub use stores::Stores;
pub use types::{DType, ReduceOp};

use job::Job;

/// `dst[i] = dst[i] op src[i]` on the process-wide path (`Avg` behaves as `Sum` here; the
/// division happens in [`finish`]).
pub fn reduce_into(
    dst: &mut [u8],
    src: &[u8],
    dtype: DType,
    op: ReduceOp,
) -> Result<(), KernelError> {
    Kernels::default_path()?.reduce_into(dst, src, dtype, op)
}

/// `dst[i] = a[i] op b[i]` on the process-wide path.
pub fn reduce_out(
    dst: &mut [u8],
    a: &[u8],
    b: &[u8],
    dtype: DType,
    op: ReduceOp,
) -> Result<(), KernelError> {
    Kernels::default_path()?.reduce_out(dst, a, b, dtype, op)
}

/// For `Avg`: `dst[i] = dst[i] / world`. For every other op: nothing (after checking the
/// arguments). `world` must be at least 1.
pub fn finish(dst: &mut [u8], dtype: DType, op: ReduceOp, world: usize) -> Result<(), KernelError> {
    Kernels::default_path()?.finish(dst, dtype, op, world)
}

/// [`reduce_into`] then [`finish`], fused; gives the same bits as the two calls.
pub fn reduce_into_finish(
    dst: &mut [u8],
    src: &[u8],
    dtype: DType,
    op: ReduceOp,
    world: usize,
) -> Result<(), KernelError> {
    Kernels::default_path()?.reduce_into_finish(dst, src, dtype, op, world)
}

/// [`reduce_out`] then [`finish`], fused; gives the same bits as the two calls.
pub fn reduce_out_finish(
    dst: &mut [u8],
    a: &[u8],
    b: &[u8],
    dtype: DType,
    op: ReduceOp,
    world: usize,
) -> Result<(), KernelError> {
    Kernels::default_path()?.reduce_out_finish(dst, a, b, dtype, op, world)
}

/// `dst[i] = a[i] op b[i]`, then for `Avg` with `finish = Some(world)` the division (as
/// [`reduce_out_finish`]), writing `dst` with `stores`, on the process-wide path. Same bits as
/// [`reduce_out`] / [`reduce_out_finish`]; [`Stores::Streaming`] only changes how the results
/// reach memory.
pub fn reduce_out_with(
    dst: &mut [u8],
    a: &[u8],
    b: &[u8],
    dtype: DType,
    op: ReduceOp,
    finish: Option<usize>,
    stores: Stores,
) -> Result<(), KernelError> {
    Kernels::default_path()?.reduce_out_with(dst, a, b, dtype, op, finish, stores)
}

/// In place, keeping the originals: `save[i] = dst[i]`, then `dst[i] = save[i] op src[i]`
/// (and the division for `Avg` with `finish = Some(world)`), on the process-wide path. One pass
/// over `dst`: each block is copied to `save` (written with `save_stores`:
/// [`Stores::Streaming`] for a large backup nobody reads soon) while it is in the cache for the
/// reduction. Same bits in `dst` as [`reduce_into`] / [`reduce_into_finish`].
pub fn reduce_into_saving(
    dst: &mut [u8],
    src: &[u8],
    save: &mut [u8],
    save_stores: Stores,
    dtype: DType,
    op: ReduceOp,
    finish: Option<usize>,
) -> Result<(), KernelError> {
    Kernels::default_path()?.reduce_into_saving(dst, src, save, save_stores, dtype, op, finish)
}

/// `dst.copy_from_slice(src)` written with `stores` (see [`Stores`]); an error if the lengths
/// differ.
pub fn copy(dst: &mut [u8], src: &[u8], stores: Stores) -> Result<(), KernelError> {
    check_same("src", src.len(), dst.len())?;
    stores::copy(dst, src, stores);
    Ok(())
}

/// Name of the CPU path the free functions use (`"scalar"`, `"avx2"`, `"avx512"`, or
/// `"avx512bf16"` when forced), chosen once
/// and cached. Returns `"refused"` when `CONCORD_KERNELS` names a path that is unknown or not
/// supported here; [`Kernels::default_path`] then gives the error to show.
pub fn cpu_path() -> &'static str {
    match Kernels::default_path() {
        Ok(k) => k.path().name(),
        Err(_) => "refused",
    }
}

pub(crate) fn check_len(
    operand: &'static str,
    bytes: usize,
    dtype: DType,
) -> Result<usize, KernelError> {
    let elem_bytes = dtype.size_bytes();
    if !bytes.is_multiple_of(elem_bytes) {
        return Err(KernelError::NotWholeElements {
            operand,
            len_bytes: bytes,
            dtype,
            elem_bytes,
        });
    }
    Ok(bytes / elem_bytes)
}

pub(crate) fn check_same(
    operand: &'static str,
    bytes: usize,
    dst_bytes: usize,
) -> Result<(), KernelError> {
    if bytes != dst_bytes {
        return Err(KernelError::LengthMismatch {
            operand,
            len_bytes: bytes,
            dst_bytes,
        });
    }
    Ok(())
}

pub(crate) fn check_world(world: usize) -> Result<NonZeroUsize, KernelError> {
    NonZeroUsize::new(world).ok_or(KernelError::ZeroWorld)
}

/// The fused division of a `*_finish` form: `Some(world)` for `Avg` (checked), `None` for every
/// other op or without `finish`.
fn divisor(op: ReduceOp, finish: Option<usize>) -> Result<Option<NonZeroUsize>, KernelError> {
    let world = finish.map(check_world).transpose()?;
    Ok(world.filter(|_| op == ReduceOp::Avg))
}

impl Kernels {
    /// `dst[i] = dst[i] op src[i]` on this path.
    pub fn reduce_into(
        &self,
        dst: &mut [u8],
        src: &[u8],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<(), KernelError> {
        self.run_into(dst, src, dtype, op, None)
    }

    /// `dst[i] = a[i] op b[i]` on this path.
    pub fn reduce_out(
        &self,
        dst: &mut [u8],
        a: &[u8],
        b: &[u8],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<(), KernelError> {
        self.run_out(dst, a, b, dtype, op, None, Stores::Cached)
    }

    /// For `Avg`: `dst[i] = dst[i] / world`; otherwise nothing. `world` must be at least 1.
    pub fn finish(
        &self,
        dst: &mut [u8],
        dtype: DType,
        op: ReduceOp,
        world: usize,
    ) -> Result<(), KernelError> {
        let len = check_len("dst", dst.len(), dtype)?;
        let world = check_world(world)?;
        if op == ReduceOp::Avg {
            // SAFETY: `dst` is a live exclusive slice of exactly `len` elements of `dtype`.
            unsafe { (self.fns.finish)(dst.as_mut_ptr(), len, dtype, world) }
        }
        Ok(())
    }

    /// [`Kernels::reduce_into`] then [`Kernels::finish`], fused (same bits).
    pub fn reduce_into_finish(
        &self,
        dst: &mut [u8],
        src: &[u8],
        dtype: DType,
        op: ReduceOp,
        world: usize,
    ) -> Result<(), KernelError> {
        self.run_into(dst, src, dtype, op, divisor(op, Some(world))?)
    }

    /// [`Kernels::reduce_out`] then [`Kernels::finish`], fused (same bits).
    pub fn reduce_out_finish(
        &self,
        dst: &mut [u8],
        a: &[u8],
        b: &[u8],
        dtype: DType,
        op: ReduceOp,
        world: usize,
    ) -> Result<(), KernelError> {
        self.run_out(
            dst,
            a,
            b,
            dtype,
            op,
            divisor(op, Some(world))?,
            Stores::Cached,
        )
    }

    /// [`reduce_out_with`] on this path.
    #[allow(clippy::too_many_arguments)]
    pub fn reduce_out_with(
        &self,
        dst: &mut [u8],
        a: &[u8],
        b: &[u8],
        dtype: DType,
        op: ReduceOp,
        finish: Option<usize>,
        stores: Stores,
    ) -> Result<(), KernelError> {
        self.run_out(dst, a, b, dtype, op, divisor(op, finish)?, stores)
    }

    /// [`reduce_into_saving`] on this path.
    #[allow(clippy::too_many_arguments)]
    pub fn reduce_into_saving(
        &self,
        dst: &mut [u8],
        src: &[u8],
        save: &mut [u8],
        save_stores: Stores,
        dtype: DType,
        op: ReduceOp,
        finish: Option<usize>,
    ) -> Result<(), KernelError> {
        let divisor = divisor(op, finish)?;
        check_same("src", src.len(), dst.len())?;
        check_same("save", save.len(), dst.len())?;
        check_len("dst", dst.len(), dtype)?;
        let size = dtype.size_bytes();
        let mut start = 0;
        while start < dst.len() {
            let n = (dst.len() - start).min(stores::BLOCK_BYTES);
            let block = &mut dst[start..start + n];
            // The block is now in the cache: the reduction below reads it from there.
            stores::copy_unfenced(&mut save[start..start + n], block, save_stores);
            let block_ptr = block.as_mut_ptr();
            let job = Job {
                dst: block_ptr,
                a: block_ptr.cast_const(),
                b: src[start..].as_ptr(),
                len: n / size,
                dtype,
                op,
                divisor,
                stream: false,
            };
            // SAFETY: `block` is an exclusive slice of `n` bytes (`a == dst` is the allowed
            // in-place case) and `src` holds `n` bytes from `start`; they cannot overlap.
            unsafe { (self.fns.combine)(&job) };
            start += n;
        }
        stores::fence_after(save_stores);
        Ok(())
    }

    fn run_into(
        &self,
        dst: &mut [u8],
        src: &[u8],
        dtype: DType,
        op: ReduceOp,
        divisor: Option<NonZeroUsize>,
    ) -> Result<(), KernelError> {
        check_same("src", src.len(), dst.len())?;
        let len = check_len("dst", dst.len(), dtype)?;
        let dst_ptr = dst.as_mut_ptr();
        let job = Job {
            dst: dst_ptr,
            a: dst_ptr.cast_const(),
            b: src.as_ptr(),
            len,
            dtype,
            op,
            divisor,
            stream: false,
        };
        // SAFETY: `dst` (exclusive) and `src` (shared) are live slices of exactly `len`
        // elements; they cannot overlap, and `a == dst` is the allowed in-place case.
        unsafe { (self.fns.combine)(&job) }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn run_out(
        &self,
        dst: &mut [u8],
        a: &[u8],
        b: &[u8],
        dtype: DType,
        op: ReduceOp,
        divisor: Option<NonZeroUsize>,
        stores: Stores,
    ) -> Result<(), KernelError> {
        check_same("a", a.len(), dst.len())?;
        check_same("b", b.len(), dst.len())?;
        let len = check_len("dst", dst.len(), dtype)?;
        let stream = stores == Stores::Streaming;
        let job = Job {
            dst: dst.as_mut_ptr(),
            a: a.as_ptr(),
            b: b.as_ptr(),
            len,
            dtype,
            op,
            divisor,
            stream,
        };
        // SAFETY: three live slices of exactly `len` elements; `dst` is exclusive, so it
        // overlaps neither `a` nor `b`.
        unsafe { (self.fns.combine)(&job) }
        stores::fence_after(stores);
        Ok(())
    }
}
