/* The yardstick of Concord's reduction kernels: the plain C loop `dst[i] = a[i] + b[i]` for
 * every dtype, as `gcc -O3 -march=native` vectorises it for the machine at hand. f16 uses
 * _Float16 (native arithmetic where the CPU has AVX512-FP16, else widened by the compiler);
 * bf16 is widened to float, added and rounded to nearest even with integer arithmetic, the
 * loop a C programmer writes without a bf16 type. Integers wrap (unsigned arithmetic).
 *
 * Output, one line per (dtype, size): `ref DTYPE BYTES GBPS` where BYTES is the size of each
 * of the three buffers and GBPS = 3 * BYTES / time (two read, one written), the median of
 * SAMPLES samples, each at least 20 ms of back-to-back passes.
 *
 * Build and run: benches/kernels.sh (or gcc -O3 -march=native -o reduce-ref reduce_ref.c).
 * Usage: reduce-ref [BYTES...]   (default: 131072 67108864)
 *
 * Built as a shared library instead (gcc -O3 -march=native -shared -fPIC -DREDUCE_REF_LIBRARY),
 * it exports the loops as `reduce_ref_pass`, and `reduce-bw --ref NAME=LIB.so` times them
 * sample by sample in turn with Concord's, so that both see the same phase of the machine. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define SAMPLES 15

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

#define PLAIN(name, T)                                                            \
  __attribute__((noinline)) static void name(T *restrict d, const T *restrict a,  \
                                             const T *restrict b, size_t n) {     \
    for (size_t i = 0; i < n; i++) d[i] = (T)(a[i] + b[i]);                       \
  }
PLAIN(add_f32, float)
PLAIN(add_f64, double)
PLAIN(add_f16, _Float16)
PLAIN(add_u8, uint8_t)
PLAIN(add_u16, uint16_t)
PLAIN(add_u32, uint32_t)
PLAIN(add_u64, uint64_t)

static inline float bf16_to_f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
static inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  u += 0x7FFF + ((u >> 16) & 1);
  return (uint16_t)(u >> 16);
}
__attribute__((noinline)) static void add_bf16(uint16_t *restrict d, const uint16_t *restrict a,
                                               const uint16_t *restrict b, size_t n) {
  for (size_t i = 0; i < n; i++) d[i] = f32_to_bf16(bf16_to_f32(a[i]) + bf16_to_f32(b[i]));
}

typedef void (*kernel)(void *, const void *, const void *, size_t);
struct row {
  const char *name; /* nccl-tests names, as `concord bench -d` takes them */
  size_t size;
  kernel run;
};
static const struct row ROWS[] = {
    {"float", 4, (kernel)add_f32},   {"double", 8, (kernel)add_f64},
    {"half", 2, (kernel)add_f16},    {"bfloat16", 2, (kernel)add_bf16},
    {"int8", 1, (kernel)add_u8},     {"uint8", 1, (kernel)add_u8},
    {"int16", 2, (kernel)add_u16},   {"uint16", 2, (kernel)add_u16},
    {"int32", 4, (kernel)add_u32},   {"uint32", 4, (kernel)add_u32},
    {"int64", 8, (kernel)add_u64},   {"uint64", 8, (kernel)add_u64},
};

/* One pass of the loop of `dtype` (a name of ROWS) over three buffers of `bytes` bytes each:
 * 0, or -1 when no row has that name. */
int reduce_ref_pass(const char *dtype, void *d, const void *a, const void *b, size_t bytes) {
  for (size_t r = 0; r < sizeof ROWS / sizeof ROWS[0]; r++) {
    if (strcmp(ROWS[r].name, dtype) == 0) {
      ROWS[r].run(d, a, b, bytes / ROWS[r].size);
      return 0;
    }
  }
  return -1;
}

#ifndef REDUCE_REF_LIBRARY
static int cmp(const void *x, const void *y) {
  double a = *(const double *)x, b = *(const double *)y;
  return (a > b) - (a < b);
}

int main(int argc, char **argv) {
  size_t sizes[8] = {131072, 67108864};
  int nsizes = 2;
  if (argc > 1) {
    nsizes = 0;
    for (int i = 1; i < argc && nsizes < 8; i++) sizes[nsizes++] = strtoull(argv[i], 0, 0);
  }
  for (int s = 0; s < nsizes; s++) {
    size_t bytes = sizes[s];
    unsigned char *d = aligned_alloc(64, bytes), *a = aligned_alloc(64, bytes),
                  *b = aligned_alloc(64, bytes);
    if (!d || !a || !b) {
      fprintf(stderr, "reduce-ref: cannot allocate 3 x %zu bytes\n", bytes);
      return 1;
    }
    /* Small values of every type: 0x3c (a small positive float/half/bf16 byte pattern). */
    memset(a, 0x3c, bytes);
    memset(b, 0x3b, bytes);
    memset(d, 0, bytes);
    for (size_t r = 0; r < sizeof ROWS / sizeof ROWS[0]; r++) {
      size_t n = bytes / ROWS[r].size;
      double t[SAMPLES];
      ROWS[r].run(d, a, b, n); /* warm up */
      for (int k = 0; k < SAMPLES; k++) {
        long passes = 0;
        double start = now(), el;
        do {
          ROWS[r].run(d, a, b, n);
          passes++;
          el = now() - start;
        } while (el < 0.02);
        t[k] = el / passes;
      }
      qsort(t, SAMPLES, sizeof t[0], cmp);
      printf("ref %s %zu %.2f\n", ROWS[r].name, bytes, 3.0 * bytes / t[SAMPLES / 2] / 1e9);
      fflush(stdout);
    }
    free(d);
    free(a);
    free(b);
  }
  return 0;
}
#endif
