//! Element types a user may reduce, mapped to kernel dtypes.

use concord_kernels::DType;

/// A type the engine can all-reduce: plain old data with a matching [`DType`].
pub trait Element: bytemuck::Pod + Send + Sync {
    /// The kernel dtype of this type.
    const DTYPE: DType;
}

macro_rules! element {
    ($($t:ty => $d:ident),* $(,)?) => {
        $(impl Element for $t { const DTYPE: DType = DType::$d; })*
    };
}

element!(
    f32 => F32, f64 => F64, half::f16 => F16, half::bf16 => BF16,
    i8 => I8, i16 => I16, i32 => I32, i64 => I64,
    u8 => U8, u16 => U16, u32 => U32, u64 => U64,
);
