//! Bit-equality between every CPU path and the scalar path, which must hold for every dtype,
//! op and input (NaN payloads, subnormals and infinities included): each result is defined as
//! one correctly rounded operation (f16/bf16: in f32, rounded once), and NaN results are
//! canonical. Also: fused forms equal the separate calls, and in-place equals out-of-place.

mod common;

use common::*;
use concord_kernels::{CpuPath, DType, Kernels, ReduceOp, Stores};
use proptest::prelude::*;

fn scalar() -> Kernels {
    Kernels::new(CpuPath::Scalar).expect("the scalar path runs everywhere")
}

/// All four entry points on `k` for raw inputs `a`, `b`; returns their outputs.
fn outputs(k: &Kernels, d: DType, op: ReduceOp, a: &[u8], b: &[u8], world: usize) -> [Vec<u8>; 4] {
    let mut out = vec![0u8; a.len()];
    k.reduce_out(&mut out, a, b, d, op).unwrap();
    let mut out_fused = vec![0u8; a.len()];
    k.reduce_out_finish(&mut out_fused, a, b, d, op, world)
        .unwrap();
    let mut into = a.to_vec();
    k.reduce_into(&mut into, b, d, op).unwrap();
    let mut into_fused = a.to_vec();
    k.reduce_into_finish(&mut into_fused, b, d, op, world)
        .unwrap();
    // Streaming stores and the in-place form that keeps the originals change where the
    // results go, never their bits.
    for (finish, want) in [(None, &out), (Some(world), &out_fused)] {
        let mut streamed = vec![0u8; a.len()];
        k.reduce_out_with(&mut streamed, a, b, d, op, finish, Stores::Streaming)
            .unwrap();
        assert_eq!(
            &streamed,
            want,
            "{} {d} {op} {finish:?}: streamed",
            k.path()
        );
        let mut cached = vec![0u8; a.len()];
        k.reduce_out_with(&mut cached, a, b, d, op, finish, Stores::Cached)
            .unwrap();
        assert_eq!(&cached, want, "{} {d} {op} {finish:?}: cached", k.path());
        for stores in [Stores::Cached, Stores::Streaming] {
            let mut saving = a.to_vec();
            let mut saved = vec![0u8; a.len()];
            k.reduce_into_saving(&mut saving, b, &mut saved, stores, d, op, finish)
                .unwrap();
            let case = format!("{} {d} {op} {finish:?} {stores:?}", k.path());
            assert_eq!(&saving, want, "{case}: saving");
            assert_eq!(saved, a, "{case}: the saved originals");
        }
    }
    // finish after the plain form must equal the fused form.
    k.finish(&mut into, d, op, world).unwrap();
    assert_eq!(into, into_fused, "{} {d} {op}: finish != fused", k.path());
    [out, out_fused, into, into_fused]
}

fn assert_paths_agree(d: DType, op: ReduceOp, a: &[u8], b: &[u8], world: usize) {
    let want = outputs(&scalar(), d, op, a, b, world);
    assert_eq!(
        want[1], want[3],
        "scalar {d} {op}: out-of-place != in-place"
    );
    for k in paths() {
        let got = outputs(&k, d, op, a, b, world);
        for (form, (g, w)) in got.iter().zip(&want).enumerate() {
            if g != w {
                let n = d.size_bytes();
                let i = (0..a.len() / n)
                    .find(|&i| g[i * n..][..n] != w[i * n..][..n])
                    .unwrap_or(0);
                panic!(
                    "{} differs from scalar: {d} {op} world {world} form {form} element {i}: \
                     a={:#x} b={:#x} got={:#x} scalar={:#x}",
                    k.path(),
                    bits(a, d, i),
                    bits(b, d, i),
                    bits(g, d, i),
                    bits(w, d, i)
                );
            }
        }
    }
}

/// Every f16 / bf16 bit pattern against a spread of partners, in every op.
#[test]
fn every_16_bit_float_pattern() {
    let all: Vec<u8> = (0..=u16::MAX).flat_map(|h| h.to_ne_bytes()).collect();
    let mut rng = XorShift::new(7);
    for d in [DType::F16, DType::BF16] {
        let partners: Vec<Vec<u8>> = vec![
            all.clone(),
            all.iter().rev().copied().collect(),
            (0..=u16::MAX)
                .flat_map(|_| (rng.next() as u16).to_ne_bytes())
                .collect(),
            (0..=u16::MAX).flat_map(|_| 0u16.to_ne_bytes()).collect(),
            (0..=u16::MAX)
                .flat_map(|_| 0x8000u16.to_ne_bytes())
                .collect(),
        ];
        for op in ReduceOp::ALL {
            for (j, p) in partners.iter().enumerate() {
                assert_paths_agree(d, op, &all, p, 1 + j * 2);
            }
        }
    }
}

/// f16 sums and products (computed natively by `avx512fp16`, in f32 then rounded elsewhere):
/// every f16 pattern meets 256 partners spread over the whole space, so every exponent
/// distance, sign mix, subnormal, overflow edge and NaN is paired many times.
#[test]
fn f16_sum_and_prod_every_pattern_against_256_partners() {
    let all: Vec<u16> = (0..=u16::MAX).collect();
    let a: Vec<u8> = all.iter().flat_map(|h| h.to_ne_bytes()).collect();
    for k in 0..256usize {
        let b: Vec<u8> = all
            .iter()
            .map(|h| h.wrapping_add((k * 257 + 1) as u16))
            .flat_map(|h| h.to_ne_bytes())
            .collect();
        for op in [ReduceOp::Sum, ReduceOp::Prod] {
            assert_paths_agree(DType::F16, op, &a, &b, 2);
        }
    }
}

/// f32 values whose f16/bf16 narrowing is delicate: ties, subnormal results, overflow edges,
/// reached through the Avg division (f32 quotient of a rounded sum).
#[test]
fn narrowing_edges_through_avg() {
    let mut rng = XorShift::new(11);
    for d in [DType::F16, DType::BF16] {
        for world in [3usize, 5, 7, 1000, 65_537, usize::MAX] {
            let a: Vec<u8> = (0..4096)
                .flat_map(|_| (rng.next() as u16).to_ne_bytes())
                .collect();
            let b: Vec<u8> = (0..4096)
                .flat_map(|_| (rng.next() as u16).to_ne_bytes())
                .collect();
            assert_paths_agree(d, ReduceOp::Avg, &a, &b, world);
        }
    }
}

#[test]
fn large_buffers_agree() {
    let mut rng = XorShift::new(3);
    for d in DType::ALL {
        let len = (1 << 18) / d.size_bytes() + 5;
        let a = gen(d, len, &mut rng);
        let b = gen(d, len, &mut rng);
        for op in ReduceOp::ALL {
            assert_paths_agree(d, op, &a, &b, 6);
        }
    }
}

fn dtype_strategy() -> impl Strategy<Value = DType> {
    prop::sample::select(DType::ALL.to_vec())
}

fn op_strategy() -> impl Strategy<Value = ReduceOp> {
    prop::sample::select(ReduceOp::ALL.to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(384))]

    /// Arbitrary bytes (so arbitrary NaN payloads, subnormals, infinities), arbitrary
    /// misalignment of every buffer: all paths give the scalar path's bits.
    #[test]
    fn raw_bytes_all_paths_bit_identical(
        d in dtype_strategy(),
        op in op_strategy(),
        raw in prop::collection::vec(any::<u8>(), 0..1200),
        offs in (0usize..8, 0usize..8),
        world in 1usize..40,
    ) {
        let n = d.size_bytes();
        let half = raw.len() / 2 / n * n;
        let a = &raw[..half];
        let b = &raw[half..2 * half];
        // Copy to misaligned positions.
        let mut buf_a = vec![0u8; half + 8];
        let mut buf_b = vec![0u8; half + 8];
        buf_a[offs.0..offs.0 + half].copy_from_slice(a);
        buf_b[offs.1..offs.1 + half].copy_from_slice(b);
        assert_paths_agree(d, op, &buf_a[offs.0..offs.0 + half], &buf_b[offs.1..offs.1 + half], world);
    }

    /// Max/Min are commutative bit for bit (signed zeros and NaN included); Sum/Prod too,
    /// for every element type.
    #[test]
    fn ops_are_commutative(
        d in dtype_strategy(),
        op in op_strategy(),
        raw in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let n = d.size_bytes();
        let half = raw.len() / 2 / n * n;
        let (a, b) = (&raw[..half], &raw[half..2 * half]);
        for k in paths() {
            let mut ab = vec![0u8; half];
            let mut ba = vec![0u8; half];
            k.reduce_out(&mut ab, a, b, d, op).unwrap();
            k.reduce_out(&mut ba, b, a, d, op).unwrap();
            prop_assert_eq!(&ab, &ba, "{} {} {}", k.path(), d, op);
        }
    }
}
