// Concord reduction kernels for NVIDIA GPUs, compiled at run time by NVRTC.
//
// Self-contained on purpose (no CUDA headers): the f16/bf16 conversions and the NaN and
// signed-zero rules are written out with integer arithmetic, mirroring `cpu::scalar` and
// `convert.rs` line for line, so that every result has the CPU paths' bits. Float arithmetic
// uses the explicitly rounded intrinsics (__fadd_rn, ...) so that no contraction into FMA and
// no approximate division can creep in; compile with --ftz=false --prec-div=true --fmad=false.
//
// `a` may alias `dst` (in-place reduction), so no pointer is __restrict__.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef signed char i8;
typedef short i16;
typedef int i32;
typedef long long i64;

#define CONCORD_F32_NAN 0x7FC00000u
#define CONCORD_F64_NAN 0x7FF8000000000000ull
#define CONCORD_F16_NAN ((u16)0x7E00)
#define CONCORD_BF16_NAN ((u16)0x7FC0)

__device__ __forceinline__ float canon_f32(float x) {
    return x != x ? __uint_as_float(CONCORD_F32_NAN) : x;
}

__device__ __forceinline__ double canon_f64(double x) {
    return x != x ? __longlong_as_double((i64)CONCORD_F64_NAN) : x;
}

__device__ __forceinline__ float f16_to_f32(u16 h) {
    u32 sign = ((u32)h & 0x8000u) << 16;
    u32 exp = ((u32)h >> 10) & 0x1Fu;
    u32 man = (u32)h & 0x3FFu;
    if (exp == 0x1Fu) return __uint_as_float(sign | 0x7F800000u | (man << 13));
    if (exp == 0u) {
        float magnitude = __fmul_rn((float)man, __uint_as_float(0x33800000u));  // man * 2^-24
        return __uint_as_float(sign | __float_as_uint(magnitude));
    }
    return __uint_as_float(sign | ((exp + 112u) << 23) | (man << 13));
}

__device__ __forceinline__ u16 f32_to_f16(float x) {
    u32 bits = __float_as_uint(x);
    u16 sign = (u16)((bits >> 16) & 0x8000u);
    u32 abs = bits & 0x7FFFFFFFu;
    if (abs > 0x7F800000u) return CONCORD_F16_NAN;
    if (abs >= 0x477FF000u) return (u16)(sign | 0x7C00u);
    if (abs >= 0x38800000u) {
        u32 rebiased = abs - (112u << 23);
        u32 lsb = (rebiased >> 13) & 1u;
        return (u16)(sign | ((rebiased + 0x0FFFu + lsb) >> 13));
    }
    u32 exp = abs >> 23;
    if (exp < 102u) return sign;
    u32 man = (abs & 0x007FFFFFu) | 0x00800000u;
    u32 shift = 126u - exp;
    u32 r = man >> shift;
    u32 rem = man & ((1u << shift) - 1u);
    u32 half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (r & 1u) == 1u)) r += 1u;
    return (u16)(sign | r);
}

__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float((u32)h << 16); }

__device__ __forceinline__ u16 f32_to_bf16(float x) {
    u32 bits = __float_as_uint(x);
    if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return CONCORD_BF16_NAN;
    u32 lsb = (bits >> 16) & 1u;
    return (u16)((bits + 0x7FFFu + lsb) >> 16);
}

// Max/Min: NaN if either operand is NaN (canonical); equal operands differ at most in the sign
// of zero, so AND of the bits gives max(-0, +0) = +0 and OR gives min(-0, +0) = -0.
__device__ __forceinline__ float max_f32(float a, float b) {
    if (a != a || b != b) return __uint_as_float(CONCORD_F32_NAN);
    if (a == b) return __uint_as_float(__float_as_uint(a) & __float_as_uint(b));
    return a > b ? a : b;
}
__device__ __forceinline__ float min_f32(float a, float b) {
    if (a != a || b != b) return __uint_as_float(CONCORD_F32_NAN);
    if (a == b) return __uint_as_float(__float_as_uint(a) | __float_as_uint(b));
    return a < b ? a : b;
}
__device__ __forceinline__ double max_f64(double a, double b) {
    if (a != a || b != b) return __longlong_as_double((i64)CONCORD_F64_NAN);
    if (a == b) return __longlong_as_double(__double_as_longlong(a) & __double_as_longlong(b));
    return a > b ? a : b;
}
__device__ __forceinline__ double min_f64(double a, double b) {
    if (a != a || b != b) return __longlong_as_double((i64)CONCORD_F64_NAN);
    if (a == b) return __longlong_as_double(__double_as_longlong(a) | __double_as_longlong(b));
    return a < b ? a : b;
}

// Element types: S is the stored type, C the type arithmetic happens in.
struct F32 {
    typedef float S; typedef float C;
    static __device__ __forceinline__ C load(S s) { return s; }
    static __device__ __forceinline__ S store(C c) { return c; }
    static __device__ __forceinline__ C round(C c) { return c; }
    static __device__ __forceinline__ C add(C a, C b) { return canon_f32(__fadd_rn(a, b)); }
    static __device__ __forceinline__ C mul(C a, C b) { return canon_f32(__fmul_rn(a, b)); }
    static __device__ __forceinline__ C max(C a, C b) { return max_f32(a, b); }
    static __device__ __forceinline__ C min(C a, C b) { return min_f32(a, b); }
    static __device__ __forceinline__ C div(C v, u64 w) { return canon_f32(__fdiv_rn(v, __ull2float_rn(w))); }
};

struct F16 {
    typedef u16 S; typedef float C;
    static __device__ __forceinline__ C load(S s) { return f16_to_f32(s); }
    static __device__ __forceinline__ S store(C c) { return f32_to_f16(c); }
    static __device__ __forceinline__ C round(C c) { return f16_to_f32(f32_to_f16(c)); }
    static __device__ __forceinline__ C add(C a, C b) { return F32::add(a, b); }
    static __device__ __forceinline__ C mul(C a, C b) { return F32::mul(a, b); }
    static __device__ __forceinline__ C max(C a, C b) { return max_f32(a, b); }
    static __device__ __forceinline__ C min(C a, C b) { return min_f32(a, b); }
    static __device__ __forceinline__ C div(C v, u64 w) { return F32::div(v, w); }
};

struct BF16 {
    typedef u16 S; typedef float C;
    static __device__ __forceinline__ C load(S s) { return bf16_to_f32(s); }
    static __device__ __forceinline__ S store(C c) { return f32_to_bf16(c); }
    static __device__ __forceinline__ C round(C c) { return bf16_to_f32(f32_to_bf16(c)); }
    static __device__ __forceinline__ C add(C a, C b) { return F32::add(a, b); }
    static __device__ __forceinline__ C mul(C a, C b) { return F32::mul(a, b); }
    static __device__ __forceinline__ C max(C a, C b) { return max_f32(a, b); }
    static __device__ __forceinline__ C min(C a, C b) { return min_f32(a, b); }
    static __device__ __forceinline__ C div(C v, u64 w) { return F32::div(v, w); }
};

struct F64 {
    typedef double S; typedef double C;
    static __device__ __forceinline__ C load(S s) { return s; }
    static __device__ __forceinline__ S store(C c) { return c; }
    static __device__ __forceinline__ C round(C c) { return c; }
    static __device__ __forceinline__ C add(C a, C b) { return canon_f64(__dadd_rn(a, b)); }
    static __device__ __forceinline__ C mul(C a, C b) { return canon_f64(__dmul_rn(a, b)); }
    static __device__ __forceinline__ C max(C a, C b) { return max_f64(a, b); }
    static __device__ __forceinline__ C min(C a, C b) { return min_f64(a, b); }
    static __device__ __forceinline__ C div(C v, u64 w) { return canon_f64(__ddiv_rn(v, __ull2double_rn(w))); }
};

// Integers: wrapping arithmetic done in an unsigned type W at least as wide as int (so no
// signed overflow and no promotion to signed int), truncating division like Rust's `/`.
template <typename T, typename W, bool SIGNED>
struct Int {
    typedef T S; typedef T C;
    static __device__ __forceinline__ C load(S s) { return s; }
    static __device__ __forceinline__ S store(C c) { return c; }
    static __device__ __forceinline__ C round(C c) { return c; }
    static __device__ __forceinline__ C add(C a, C b) { return (T)((W)a + (W)b); }
    static __device__ __forceinline__ C mul(C a, C b) { return (T)((W)a * (W)b); }
    static __device__ __forceinline__ C max(C a, C b) { return a > b ? a : b; }
    static __device__ __forceinline__ C min(C a, C b) { return a < b ? a : b; }
    static __device__ __forceinline__ C div(C v, u64 w) {
        if (SIGNED) {
            if (w > 0x7FFFFFFFFFFFFFFFull) {
                // |v| <= 2^63 <= w: the quotient truncates to 0, except -2^63 / 2^63 = -1.
                return (T)(((i64)v == (i64)0x8000000000000000ull && w == 0x8000000000000000ull) ? -1 : 0);
            }
            return (T)((i64)v / (i64)w);
        }
        return (T)((u64)v / w);
    }
};

typedef Int<i8, u32, true> I8;
typedef Int<i16, u32, true> I16;
typedef Int<i32, u32, true> I32;
typedef Int<i64, u64, true> I64;
typedef Int<u8, u32, false> U8;
typedef Int<u16, u32, false> U16;
typedef Int<u32, u32, false> U32;
typedef Int<u64, u64, false> U64;

struct OpSum { template <class E> static __device__ __forceinline__ typename E::C apply(typename E::C a, typename E::C b) { return E::add(a, b); } };
struct OpProd { template <class E> static __device__ __forceinline__ typename E::C apply(typename E::C a, typename E::C b) { return E::mul(a, b); } };
struct OpMax { template <class E> static __device__ __forceinline__ typename E::C apply(typename E::C a, typename E::C b) { return E::max(a, b); } };
struct OpMin { template <class E> static __device__ __forceinline__ typename E::C apply(typename E::C a, typename E::C b) { return E::min(a, b); } };

// Grid-stride loops; 64-bit indices so any length works.
template <class E, class Op>
__device__ __forceinline__ void reduce_body(typename E::S* dst, const typename E::S* a,
                                            const typename E::S* b, u64 n) {
    u64 stride = (u64)blockDim.x * gridDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        dst[i] = E::store(Op::template apply<E>(E::load(a[i]), E::load(b[i])));
    }
}

template <class E, class Op>
__device__ __forceinline__ void reduce_finish_body(typename E::S* dst, const typename E::S* a,
                                                   const typename E::S* b, u64 n, u64 world) {
    u64 stride = (u64)blockDim.x * gridDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        typename E::C r = Op::template apply<E>(E::load(a[i]), E::load(b[i]));
        dst[i] = E::store(E::div(E::round(r), world));
    }
}

template <class E>
__device__ __forceinline__ void finish_body(typename E::S* dst, u64 n, u64 world) {
    u64 stride = (u64)blockDim.x * gridDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        dst[i] = E::store(E::div(E::load(dst[i]), world));
    }
}

#define CONCORD_REDUCE(OPNAME, OP, DT, E)                                                   \
    extern "C" __global__ void concord_reduce_##OPNAME##_##DT(                              \
        E::S* dst, const E::S* a, const E::S* b, u64 n) {                                   \
        reduce_body<E, OP>(dst, a, b, n);                                                   \
    }

#define CONCORD_AVG(DT, E)                                                                  \
    extern "C" __global__ void concord_reduce_finish_avg_##DT(                              \
        E::S* dst, const E::S* a, const E::S* b, u64 n, u64 world) {                        \
        reduce_finish_body<E, OpSum>(dst, a, b, n, world);                                  \
    }                                                                                       \
    extern "C" __global__ void concord_finish_avg_##DT(E::S* dst, u64 n, u64 world) {       \
        finish_body<E>(dst, n, world);                                                      \
    }

// Instantiations (one line per dtype) are appended by `cuda::kernel_source()`.
