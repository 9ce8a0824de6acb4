//! Element types and reduction operators, with their names and wire codes.

use std::fmt;
use std::str::FromStr;

use crate::KernelError;

/// The element type of a buffer being reduced.
///
/// Buffers are plain byte slices in native byte order; `DType` says how to read them.
/// Names follow nccl-tests (`"float"`, `"half"`, `"bfloat16"`, ...); parsing also accepts short
/// Rust-style names (`f32`, `bf16`, `u8`, ...) and `float32`-style names.
///
/// ```
/// use concord_kernels::DType;
/// let d: DType = "bf16".parse().unwrap();
/// assert_eq!(d, DType::BF16);
/// assert_eq!(d.to_string(), "bfloat16");
/// assert_eq!(d.size_bytes(), 2);
/// assert_eq!(DType::from_wire(d.to_wire()), Some(d));
/// ```
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE 754 binary32.
    F32,
    /// IEEE 754 binary64.
    F64,
    /// IEEE 754 binary16 (computed in f32, rounded once per element).
    F16,
    /// bfloat16 (computed in f32, rounded once per element).
    BF16,
    /// Signed 8-bit integer (wrapping arithmetic).
    I8,
    /// Signed 16-bit integer (wrapping arithmetic).
    I16,
    /// Signed 32-bit integer (wrapping arithmetic).
    I32,
    /// Signed 64-bit integer (wrapping arithmetic).
    I64,
    /// Unsigned 8-bit integer (wrapping arithmetic).
    U8,
    /// Unsigned 16-bit integer (wrapping arithmetic).
    U16,
    /// Unsigned 32-bit integer (wrapping arithmetic).
    U32,
    /// Unsigned 64-bit integer (wrapping arithmetic).
    U64,
}

impl DType {
    /// Every element type, in wire-code order.
    pub const ALL: [DType; 12] = [
        DType::F32,
        DType::F64,
        DType::F16,
        DType::BF16,
        DType::I8,
        DType::I16,
        DType::I32,
        DType::I64,
        DType::U8,
        DType::U16,
        DType::U32,
        DType::U64,
    ];

    /// Size of one element in bytes.
    pub fn size_bytes(self) -> usize {
        match self {
            DType::I8 | DType::U8 => 1,
            DType::F16 | DType::BF16 | DType::I16 | DType::U16 => 2,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F64 | DType::I64 | DType::U64 => 8,
        }
    }

    /// The nccl-tests name (`"float"`, `"double"`, `"half"`, `"bfloat16"`, `"int8"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float",
            DType::F64 => "double",
            DType::F16 => "half",
            DType::BF16 => "bfloat16",
            DType::I8 => "int8",
            DType::I16 => "int16",
            DType::I32 => "int32",
            DType::I64 => "int64",
            DType::U8 => "uint8",
            DType::U16 => "uint16",
            DType::U32 => "uint32",
            DType::U64 => "uint64",
        }
    }

    /// The short name (`"f32"`, `"bf16"`, `"u8"`, ...).
    pub fn short_name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I8 => "i8",
            DType::I16 => "i16",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::U8 => "u8",
            DType::U16 => "u16",
            DType::U32 => "u32",
            DType::U64 => "u64",
        }
    }

    /// Stable one-byte code for the network protocol: the index in [`DType::ALL`].
    /// These codes never change; new types get new codes.
    pub fn to_wire(self) -> u8 {
        match self {
            DType::F32 => 0,
            DType::F64 => 1,
            DType::F16 => 2,
            DType::BF16 => 3,
            DType::I8 => 4,
            DType::I16 => 5,
            DType::I32 => 6,
            DType::I64 => 7,
            DType::U8 => 8,
            DType::U16 => 9,
            DType::U32 => 10,
            DType::U64 => 11,
        }
    }

    /// Inverse of [`DType::to_wire`]; `None` for an unknown code.
    pub fn from_wire(code: u8) -> Option<DType> {
        DType::ALL.get(usize::from(code)).copied()
    }

    /// True for the floating-point types (f32, f64, f16, bf16).
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64 | DType::F16 | DType::BF16)
    }

    fn aliases(self) -> &'static [&'static str] {
        match self {
            DType::F32 => &["float32", "fp32"],
            DType::F64 => &["float64", "fp64"],
            DType::F16 => &["float16", "fp16"],
            DType::BF16 => &["bfloat", "bf"],
            DType::I8 => &["char"],
            DType::I16 => &["short"],
            DType::I32 => &["int"],
            DType::I64 => &["long"],
            DType::U8 => &["uchar"],
            DType::U16 => &["ushort"],
            DType::U32 => &["uint"],
            DType::U64 => &["ulong"],
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DType {
    type Err = KernelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim().to_ascii_lowercase();
        DType::ALL
            .into_iter()
            .find(|d| {
                d.name() == wanted || d.short_name() == wanted || d.aliases().contains(&&*wanted)
            })
            .ok_or_else(|| KernelError::UnknownDType {
                input: s.to_owned(),
            })
    }
}

/// A reduction operator.
///
/// `Avg` reduces like `Sum`; the division by the number of peers happens in
/// [`finish`](crate::finish) (or the fused `*_finish` entry points).
///
/// ```
/// use concord_kernels::ReduceOp;
/// assert_eq!("max".parse::<ReduceOp>().unwrap(), ReduceOp::Max);
/// assert_eq!(ReduceOp::Avg.to_string(), "avg");
/// ```
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    /// Sum (wrapping for integers).
    Sum,
    /// Sum, then divided by the world size in `finish`.
    Avg,
    /// Product (wrapping for integers).
    Prod,
    /// Maximum (NaN propagates; `max(-0, +0) = +0`).
    Max,
    /// Minimum (NaN propagates; `min(-0, +0) = -0`).
    Min,
}

impl ReduceOp {
    /// Every operator.
    pub const ALL: [ReduceOp; 5] = [
        ReduceOp::Sum,
        ReduceOp::Avg,
        ReduceOp::Prod,
        ReduceOp::Max,
        ReduceOp::Min,
    ];

    /// The nccl-tests name: `"sum"`, `"avg"`, `"prod"`, `"max"`, `"min"`.
    pub fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Avg => "avg",
            ReduceOp::Prod => "prod",
            ReduceOp::Max => "max",
            ReduceOp::Min => "min",
        }
    }

    /// Stable one-byte code for the network protocol (same numbering as NCCL's `ncclRedOp_t`).
    pub fn to_wire(self) -> u8 {
        match self {
            ReduceOp::Sum => 0,
            ReduceOp::Prod => 1,
            ReduceOp::Max => 2,
            ReduceOp::Min => 3,
            ReduceOp::Avg => 4,
        }
    }

    /// Inverse of [`ReduceOp::to_wire`]; `None` for an unknown code.
    pub fn from_wire(code: u8) -> Option<ReduceOp> {
        ReduceOp::ALL.into_iter().find(|op| op.to_wire() == code)
    }
}

impl fmt::Display for ReduceOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ReduceOp {
    type Err = KernelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim().to_ascii_lowercase();
        let alias = match wanted.as_str() {
            "mean" | "average" => "avg",
            "product" | "mul" => "prod",
            "add" => "sum",
            other => other,
        };
        ReduceOp::ALL
            .into_iter()
            .find(|op| op.name() == alias)
            .ok_or_else(|| KernelError::UnknownOp {
                input: s.to_owned(),
            })
    }
}
