//! The public API: names, wire codes, argument checks and the documented semantics.

use concord_kernels::{
    copy, cpu_path, finish, reduce_into, reduce_into_finish, reduce_into_saving, reduce_out,
    reduce_out_finish, reduce_out_with, CpuPath, DType, KernelError, Kernels, ReduceOp, Stores,
};

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_ne_bytes()).collect()
}

fn to_f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn dtype_names_and_wire_codes_round_trip() {
    let names = [
        "float", "double", "half", "bfloat16", "int8", "int16", "int32", "int64", "uint8",
        "uint16", "uint32", "uint64",
    ];
    for (i, d) in DType::ALL.into_iter().enumerate() {
        assert_eq!(d.name(), names[i]);
        assert_eq!(d.to_wire(), i as u8, "wire codes are pinned");
        assert_eq!(DType::from_wire(d.to_wire()), Some(d));
        assert_eq!(d.to_string().parse::<DType>(), Ok(d));
        assert_eq!(d.short_name().parse::<DType>(), Ok(d));
    }
    assert_eq!(DType::from_wire(12), None);
    assert_eq!("float32".parse::<DType>(), Ok(DType::F32));
    assert_eq!("BF16".parse::<DType>(), Ok(DType::BF16));
    let err = "f8".parse::<DType>().unwrap_err().to_string();
    assert!(err.contains("bfloat16") && err.contains("uint64"), "{err}");
    assert!(DType::F16.is_float() && !DType::U8.is_float());
    assert_eq!(DType::I64.size_bytes(), 8);
}

#[test]
fn op_names_and_wire_codes_round_trip() {
    let expected = [("sum", 0), ("avg", 4), ("prod", 1), ("max", 2), ("min", 3)];
    for (op, (name, code)) in ReduceOp::ALL.into_iter().zip(expected) {
        assert_eq!(op.name(), name);
        assert_eq!(op.to_wire(), code);
        assert_eq!(ReduceOp::from_wire(code), Some(op));
        assert_eq!(name.parse::<ReduceOp>(), Ok(op));
        assert_eq!(op.to_string(), name);
    }
    assert_eq!(ReduceOp::from_wire(5), None);
    assert!("median".parse::<ReduceOp>().is_err());
}

#[test]
fn argument_errors_are_reported_and_leave_dst_alone() {
    let mut dst = vec![7u8; 6];
    let err = reduce_into(&mut dst, &[0u8; 6], DType::F32, ReduceOp::Sum).unwrap_err();
    assert!(matches!(
        err,
        KernelError::NotWholeElements { len_bytes: 6, .. }
    ));
    let err = reduce_into(&mut dst, &[0u8; 8], DType::U8, ReduceOp::Sum).unwrap_err();
    assert!(matches!(err, KernelError::LengthMismatch { .. }), "{err}");
    let err = reduce_out(&mut dst, &[0u8; 6], &[0u8; 5], DType::U8, ReduceOp::Sum).unwrap_err();
    assert!(err.to_string().contains("`b`"), "{err}");
    assert_eq!(
        finish(&mut dst, DType::U8, ReduceOp::Avg, 0),
        Err(KernelError::ZeroWorld)
    );
    let (a, b) = ([1u8; 6], [2u8; 6]);
    for stores in [Stores::Cached, Stores::Streaming] {
        let err = reduce_out_with(
            &mut dst,
            &a,
            &b[..5],
            DType::U8,
            ReduceOp::Sum,
            None,
            stores,
        )
        .unwrap_err();
        assert!(err.to_string().contains("`b`"), "{err}");
        let err = reduce_out_with(&mut dst, &a, &b, DType::U8, ReduceOp::Avg, Some(0), stores)
            .unwrap_err();
        assert_eq!(err, KernelError::ZeroWorld);
        let err = copy(&mut dst, &a[..4], stores).unwrap_err();
        assert!(matches!(err, KernelError::LengthMismatch { .. }), "{err}");
    }
    let mut save = [0u8; 5];
    let err = reduce_into_saving(
        &mut dst,
        &b,
        &mut save,
        Stores::Cached,
        DType::U8,
        ReduceOp::Sum,
        None,
    )
    .unwrap_err();
    assert!(err.to_string().contains("`save`"), "{err}");
    assert_eq!(save, [0u8; 5]);
    assert_eq!(dst, vec![7u8; 6]);
}

#[test]
fn forced_path_that_is_missing_is_refused_clearly() {
    for path in CpuPath::ALL {
        match Kernels::new(path) {
            Ok(k) => assert_eq!(k.path(), path),
            Err(e) => assert!(e.to_string().contains("not supported"), "{e}"),
        }
    }
    assert!(Kernels::new(CpuPath::Scalar).is_ok());
    // The default is whatever `CONCORD_KERNELS` forces, else the widest path this CPU runs:
    // never assume which CPU the suite runs on.
    let expected = match std::env::var(concord_kernels::PATH_ENV) {
        Ok(forced) => forced.parse::<CpuPath>().unwrap().name(),
        Err(_) => CpuPath::best().name(),
    };
    assert_eq!(cpu_path(), expected);
    assert!(CpuPath::best().is_supported());
}

#[test]
fn f32_ops_and_avg() {
    let a = f32s(&[1.0, -2.0, 3.0, 0.5]);
    let b = f32s(&[4.0, 5.0, -6.0, 0.25]);
    let mut d = vec![0u8; 16];
    reduce_out(&mut d, &a, &b, DType::F32, ReduceOp::Prod).unwrap();
    assert_eq!(to_f32s(&d), [4.0, -10.0, -18.0, 0.125]);
    reduce_out(&mut d, &a, &b, DType::F32, ReduceOp::Max).unwrap();
    assert_eq!(to_f32s(&d), [4.0, 5.0, 3.0, 0.5]);
    let mut d = a.clone();
    reduce_into_finish(&mut d, &b, DType::F32, ReduceOp::Avg, 2).unwrap();
    assert_eq!(to_f32s(&d), [2.5, 1.5, -1.5, 0.375]);
    let mut d2 = vec![0u8; 16];
    reduce_out_finish(&mut d2, &a, &b, DType::F32, ReduceOp::Avg, 2).unwrap();
    assert_eq!(d, d2);
    // finish is a no-op for ops other than Avg.
    finish(&mut d2, DType::F32, ReduceOp::Sum, 2).unwrap();
    assert_eq!(d, d2);
}

#[test]
fn nan_and_signed_zero_rules() {
    let nan_in = f32::from_bits(0xFFC0_1234);
    let a = f32s(&[nan_in, 1.0, -0.0, 0.0, f32::INFINITY]);
    let b = f32s(&[1.0, f32::NAN, 0.0, -0.0, f32::NEG_INFINITY]);
    for (op, want) in [
        (
            ReduceOp::Max,
            [
                0x7FC0_0000,
                0x7FC0_0000,
                0x0000_0000,
                0x0000_0000,
                0x7F80_0000,
            ],
        ),
        (
            ReduceOp::Min,
            [
                0x7FC0_0000,
                0x7FC0_0000,
                0x8000_0000,
                0x8000_0000,
                0xFF80_0000,
            ],
        ),
        (
            ReduceOp::Sum,
            [
                0x7FC0_0000,
                0x7FC0_0000,
                0x0000_0000,
                0x0000_0000,
                0x7FC0_0000,
            ],
        ),
    ] {
        let mut d = vec![0u8; a.len()];
        reduce_out(&mut d, &a, &b, DType::F32, op).unwrap();
        let bits: Vec<u32> = to_f32s(&d).iter().map(|x| x.to_bits()).collect();
        assert_eq!(bits, want, "{op}");
    }
}

#[test]
fn integer_wrapping_and_truncating_avg() {
    let mut d = vec![250u8, 3];
    reduce_into(&mut d, &[10, 4], DType::U8, ReduceOp::Sum).unwrap();
    assert_eq!(d, [4, 7]);
    let mut d: Vec<u8> = [-7i8, 7, -128].iter().map(|x| *x as u8).collect();
    finish(&mut d, DType::I8, ReduceOp::Avg, 2).unwrap();
    assert_eq!(d.iter().map(|x| *x as i8).collect::<Vec<_>>(), [-3, 3, -64]);
    let mut d = [(-128i8) as u8];
    finish(&mut d, DType::I8, ReduceOp::Avg, 128).unwrap();
    assert_eq!(d[0] as i8, -1);
}

#[test]
fn half_types_round_once_per_call() {
    use half::{bf16, f16};
    let a: Vec<u8> = [1.0f32, 65504.0, 1e-7]
        .iter()
        .flat_map(|x| f16::from_f32(*x).to_ne_bytes())
        .collect();
    let b: Vec<u8> = [2.0f32, 15.0, 1e-7]
        .iter()
        .flat_map(|x| f16::from_f32(*x).to_ne_bytes())
        .collect();
    let mut d = a.clone();
    reduce_into(&mut d, &b, DType::F16, ReduceOp::Sum).unwrap();
    let got: Vec<f32> = d
        .chunks_exact(2)
        .map(|c| f16::from_ne_bytes([c[0], c[1]]).to_f32())
        .collect();
    assert_eq!(got[0], 3.0);
    assert_eq!(got[1], 65504.0, "65519 rounds down to the largest f16");
    assert_eq!(
        got[2],
        2.0 * f16::from_f32(1e-7).to_f32(),
        "subnormal sum is exact"
    );
    let bb: Vec<u8> = [1.5f32]
        .iter()
        .flat_map(|x| bf16::from_f32(*x).to_ne_bytes())
        .collect();
    let mut d = bb.clone();
    reduce_into_finish(&mut d, &bb, DType::BF16, ReduceOp::Avg, 2).unwrap();
    assert_eq!(bf16::from_ne_bytes([d[0], d[1]]).to_f32(), 1.5);
}
