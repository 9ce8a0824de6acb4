//! Writes that bypass the cache: copies with non-temporal stores, and the fence that publishes
//! them (the reduction loops stream through `Job::stream`).
//!
//! A plain store to a line that is not in the cache first *reads* the line from memory (the
//! read-for-ownership), then writes it back later: two line transfers for one line of results.
//! A non-temporal store writes the line straight to memory: one transfer. Where a large result
//! is not read again soon (the ring's reduce-scatter output, an in-place backup that only a
//! failure reads), that halves the destination's memory traffic, which is what a 2-core host
//! running the TCP stack and the reductions together is short of.
//!
//! The results are the same bits whichever way they are stored: [`Stores`] is a hint.

/// How a reduction or copy writes its results.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Stores {
    /// Ordinary stores: the results stay in the cache. Right for results read again soon,
    /// and for destinations already in the cache (for example just read).
    #[default]
    Cached,
    /// Non-temporal stores where the CPU has them (x86-64; elsewhere ordinary stores): results
    /// go to memory without the destination being read first, and leave the cache to the data
    /// still needed. Right for large results nobody reads soon. A streaming call ends with a
    /// store fence, so the results are visible to another thread that synchronises with this
    /// one afterwards (a release store, a mutex), as with ordinary stores.
    Streaming,
}

impl Stores {
    /// Results of at least this many bytes are worth streaming when nothing reads them again
    /// soon: well past any L2 cache, so the lines would be evicted before their next use
    /// anyway. Below it a result may still be in the cache when it is next read, and cached
    /// stores win. The engine streams host collectives' out-of-place results from this size
    /// (`CONCORD_STREAM_MIN_BYTES` overrides it); `reduce-bw` marks the same choice.
    pub const STREAMING_MIN_BYTES: usize = 16 << 20;
}

/// Bytes of `dst` that [`crate::Kernels::reduce_into_saving`] copies to the backup at a time
/// before reducing them, while they are in the L1 cache: a multiple of every element size.
pub(crate) const BLOCK_BYTES: usize = 8 * 1024;

/// `dst.copy_from_slice(src)` with `stores` (a streaming copy ends with a fence). Panics if
/// the lengths differ (callers check).
pub(crate) fn copy(dst: &mut [u8], src: &[u8], stores: Stores) {
    assert_eq!(
        dst.len(),
        src.len(),
        "copy between slices of different lengths"
    );
    copy_unfenced(dst, src, stores);
    fence_after(stores);
}

/// `dst.copy_from_slice(src)` with `stores`; after streaming ones the caller owes
/// [`fence_after`] before the results may be published. Lengths are equal.
pub(crate) fn copy_unfenced(dst: &mut [u8], src: &[u8], stores: Stores) {
    match stores {
        Stores::Cached => dst.copy_from_slice(src),
        Stores::Streaming => stream_unfenced(dst, src),
    }
}

/// After writes with `stores`: for streaming ones, orders every earlier non-temporal store
/// before any later store (the release that publishes the results); nothing for cached ones.
pub(crate) fn fence_after(stores: Stores) {
    #[cfg(target_arch = "x86_64")]
    if stores == Stores::Streaming {
        // SAFETY: SSE is part of x86-64.
        unsafe { std::arch::x86_64::_mm_sfence() };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = stores;
}

/// `dst.copy_from_slice(src)` with non-temporal stores for the whole lines of `dst`; the caller
/// owes a [`fence_after`] before the results may be published. Lengths are equal.
#[cfg(not(target_arch = "x86_64"))]
fn stream_unfenced(dst: &mut [u8], src: &[u8]) {
    dst.copy_from_slice(src);
}

/// `dst.copy_from_slice(src)` with non-temporal stores for the whole lines of `dst`; the caller
/// owes a [`fence_after`] before the results may be published. Lengths are equal.
#[cfg(target_arch = "x86_64")]
fn stream_unfenced(dst: &mut [u8], src: &[u8]) {
    const LINE: usize = 64;
    // Whole lines only: a partial line written non-temporally costs a partial memory write.
    let head = dst.as_ptr().align_offset(LINE).min(dst.len());
    let body = (dst.len() - head) / LINE * LINE;
    let (dst_head, rest) = dst.split_at_mut(head);
    let (dst_body, dst_tail) = rest.split_at_mut(body);
    let (src_head, rest) = src.split_at(head);
    let (src_body, src_tail) = rest.split_at(body);
    dst_head.copy_from_slice(src_head);
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked just above); `dst_body` is 64-byte aligned and
        // both halves are `body` bytes, a multiple of 64.
        unsafe { x86::lines_avx512(dst_body, src_body) };
    } else {
        // SAFETY: SSE2 is part of x86-64; alignment and lengths as above.
        unsafe { x86::lines_sse2(dst_body, src_body) };
    }
    dst_tail.copy_from_slice(src_tail);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Copies whole 64-byte lines with 512-bit non-temporal stores.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `dst` is 64-byte aligned; both slices have the same length, a
    /// multiple of 64.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn lines_avx512(dst: &mut [u8], src: &[u8]) {
        let (d, s) = (dst.as_mut_ptr(), src.as_ptr());
        let mut off = 0;
        while off < dst.len() {
            // SAFETY: `off + 64 <= len` for both slices; `d + off` is 64-byte aligned (the
            // caller's contract); the load is unaligned.
            unsafe {
                let v = _mm512_loadu_si512(s.add(off).cast());
                _mm512_stream_si512(d.add(off).cast(), v);
            }
            off += 64;
        }
    }

    /// Copies whole 64-byte lines with 128-bit non-temporal stores.
    ///
    /// # Safety
    /// `dst` is 64-byte aligned; both slices have the same length, a multiple of 64.
    #[target_feature(enable = "sse2")]
    pub(super) unsafe fn lines_sse2(dst: &mut [u8], src: &[u8]) {
        let (d, s) = (dst.as_mut_ptr(), src.as_ptr());
        let mut off = 0;
        while off < dst.len() {
            // SAFETY: `off + 16 <= len` for both slices; `d + off` is 16-byte aligned.
            unsafe {
                let v = _mm_loadu_si128(s.add(off).cast());
                _mm_stream_si128(d.add(off).cast(), v);
            }
            off += 16;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_copy_matches_at_every_offset_and_length() {
        let src: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        let mut dst = vec![0u8; 4096 + 128];
        for off in 0..65 {
            for len in [0, 1, 63, 64, 65, 127, 128, 129, 1000, 4096 - 64] {
                dst.fill(0xEE);
                copy(&mut dst[off..off + len], &src[..len], Stores::Streaming);
                assert_eq!(
                    &dst[off..off + len],
                    &src[..len],
                    "offset {off} length {len}"
                );
                assert!(
                    dst[..off].iter().all(|&b| b == 0xEE),
                    "wrote before the range"
                );
                assert!(
                    dst[off + len..].iter().all(|&b| b == 0xEE),
                    "wrote past the range"
                );
            }
        }
    }
}
