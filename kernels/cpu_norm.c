/* Residual add and norm in one pass over each row, float32 and float64:
 *
 *     s = x + r                (the new residual stream; skipped when r is NULL: s = x)
 *     y = (s - mean(s)) / sqrt(var(s) + eps) * w + b      (orca_add_layer_norm; biased variance)
 *     y = w * (s * (1 / sqrt(mean(s^2) + eps)))           (orca_add_rms_norm: HF's RMSNorm; below)
 *
 * What a pre-norm transformer does between its sublayers (GPT-2: `h = h + attn(...)`, then
 * `ln_2(h)`). As two ATen ops that is two passes over the rows and two dispatches; here it is one
 * call per residual point, and a row (a few KB) stays in L1 from the add to the last pass.
 *
 * Per row: s (written), its sum -> the mean; sum (s - mean)^2 -> the variance (two-pass, as
 * torch's float64 path, not E[s^2] - mean^2); then y. Four vector accumulators of 8 floats / 4
 * doubles, so the sums round differently from torch's (a few ulp of the row's scale).
 *
 * Built and loaded by kernels/norm_cpu.py (cbuild: the system C compiler, ctypes). Rows are
 * split over OpenMP threads (torch's pool, see cpu_attention.c) only when there are enough of them
 * to pay for waking the pool.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cpu_simd.h"

/* Below this many elements a call stays on the calling thread: W1's decode steps (<= 32 rows of
 * 768) take a few microseconds, about what a parallel region costs. */
#ifndef PARALLEL_FROM
#define PARALLEL_FROM (64 * 1024)
#endif

/* The first pass over a row: s = x + r (or x), and the sum of s in four vector accumulators, as
 * one add chain would wait out the add latency at every vector (a 768-wide row is 96 of them). */
#define DEFINE_ADD_SUM(S, T, V, L)                                                                  \
static inline __attribute__((always_inline)) T add_sum_##S(const T *x, const T *r, T *s, int64_t n) { \
    const int64_t whole = n - n % L, quads = n - n % (4 * L);                                       \
    V a0 = splat_##S(0), a1 = a0, a2 = a0, a3 = a0;                                                 \
    T tail = 0;                                                                                     \
    int64_t i = 0;                                                                                  \
    for (; i < quads; i += 4 * L) {                                                                 \
        V v0 = load_##S(x + i), v1 = load_##S(x + i + L), v2 = load_##S(x + i + 2 * L), v3 = load_##S(x + i + 3 * L); \
        if (r) {                                                                                    \
            v0 += load_##S(r + i); v1 += load_##S(r + i + L);                                       \
            v2 += load_##S(r + i + 2 * L); v3 += load_##S(r + i + 3 * L);                           \
        }                                                                                           \
        store_##S(s + i, v0); store_##S(s + i + L, v1); store_##S(s + i + 2 * L, v2); store_##S(s + i + 3 * L, v3); \
        a0 += v0; a1 += v1; a2 += v2; a3 += v3;                                                     \
    }                                                                                               \
    for (; i < whole; i += L) {                                                                     \
        V v = load_##S(x + i);                                                                      \
        if (r) v += load_##S(r + i);                                                                \
        store_##S(s + i, v);                                                                        \
        a0 += v;                                                                                    \
    }                                                                                               \
    for (; i < n; i++) {                                                                            \
        const T v = r ? x[i] + r[i] : x[i];                                                         \
        s[i] = v;                                                                                   \
        tail += v;                                                                                  \
    }                                                                                               \
    const V acc = (a0 + a1) + (a2 + a3);                                                            \
    T sum = tail;                                                                                   \
    for (int l = 0; l < L; l++) sum += acc[l];                                                      \
    return sum;                                                                                     \
}

/* Layer norm: the mean from the first pass, the variance in a second (two-pass), then y. */
#define DEFINE_ROW(S, T, V, L)                                                                      \
static void row_##S(const T *x, const T *r, T *s, const T *w, const T *b, T *y, int64_t n, T eps) { \
    const int64_t whole = n - n % L, quads = n - n % (4 * L);                                       \
    const T sum = add_sum_##S(x, r, s, n);                                                          \
    const T mean = sum / (T)n;                                                                      \
    const V mv = splat_##S(mean);                                                                   \
    V a0 = splat_##S(0), a1 = a0, a2 = a0, a3 = a0;                                                 \
    T tail = 0;                                                                                     \
    int64_t i;                                                                                      \
    for (i = 0; i < quads; i += 4 * L) {                                                            \
        const V d0 = load_##S(s + i) - mv, d1 = load_##S(s + i + L) - mv;                           \
        const V d2 = load_##S(s + i + 2 * L) - mv, d3 = load_##S(s + i + 3 * L) - mv;               \
        a0 += d0 * d0; a1 += d1 * d1; a2 += d2 * d2; a3 += d3 * d3;                                 \
    }                                                                                               \
    for (; i < whole; i += L) {                                                                     \
        const V d = load_##S(s + i) - mv;                                                           \
        a0 += d * d;                                                                                \
    }                                                                                               \
    for (; i < n; i++) tail += (s[i] - mean) * (s[i] - mean);                                       \
    const V acc = (a0 + a1) + (a2 + a3);                                                            \
    T sq = tail;                                                                                    \
    for (int l = 0; l < L; l++) sq += acc[l];                                                       \
    const T rstd = (T)1 / sqrt##S(sq / (T)n + eps);                                                 \
    const V rv = splat_##S(rstd);                                                                   \
    for (i = 0; i < whole; i += L) {                                                                \
        V v = (load_##S(s + i) - mv) * rv;                                                          \
        if (w) v *= load_##S(w + i);                                                                \
        if (b) v += load_##S(b + i);                                                                \
        store_##S(y + i, v);                                                                        \
    }                                                                                               \
    for (; i < n; i++) {                                                                            \
        T v = (s[i] - mean) * rstd;                                                                 \
        if (w) v *= w[i];                                                                           \
        if (b) v += b[i];                                                                           \
        y[i] = v;                                                                                   \
    }                                                                                               \
}

#define sqrtf32 sqrtf
#define sqrtf64 sqrt
DEFINE_ADD_SUM(f32, float, v8f, 8)
DEFINE_ADD_SUM(f64, double, v4d, 4)
DEFINE_ROW(f32, float, v8f, 8)
DEFINE_ROW(f64, double, v4d, 4)

/* dtype: 0 float32, 1 float64. x, r (or NULL), s, y: [M, n] with row strides ldx, ldr, lds, ldy
 * (unit column stride); w, b: [n] or NULL. Each row's first pass reads x and r and writes s at
 * the same elements, and its last pass writes y after both were read, so s may be x or r and y
 * the other one: the in-place form, for inputs that die at this call. s and y must not overlap.
 * Returns 0, or -1 for an unknown dtype. */
int orca_add_layer_norm(int dtype, const void *x, int64_t ldx, const void *r, int64_t ldr, void *s, int64_t lds,
                        const void *w, const void *b, void *y, int64_t ldy, int64_t M, int64_t n, double eps,
                        int num_threads) {
    if (dtype != 0 && dtype != 1) return -1;
    if (num_threads < 1 || M * n < PARALLEL_FROM) num_threads = 1;
    _Pragma("omp parallel for num_threads(num_threads) if(num_threads > 1)")
    for (int64_t m = 0; m < M; m++) {
        if (dtype == 0)
            row_f32((const float *)x + m * ldx, r ? (const float *)r + m * ldr : 0, (float *)s + m * lds,
                    (const float *)w, (const float *)b, (float *)y + m * ldy, n, (float)eps);
        else
            row_f64((const double *)x + m * ldx, r ? (const double *)r + m * ldr : 0, (double *)s + m * lds,
                    (const double *)w, (const double *)b, (double *)y + m * ldy, n, eps);
    }
    return 0;
}

/* RMS norm, HF's (Llama, Qwen2, Mistral):
 *
 *     s = x + r                                      (or s = x when r is NULL)
 *     y = w * (s * (1 / sqrt(mean(s^2) + eps)))      (HF's order: s times rstd, then the weight)
 *
 * One pass writes s and sums its squares in four vector accumulators (so the mean rounds
 * otherwise than ATen's pow + mean: a few ulp of the row's scale), one writes y. Under float32,
 * r may be 16-bit (a 16-bit linear's result, widened as it is read) and y may be stored in 16 bits
 * (rounded to nearest even: the cast in front of a 16-bit linear); the codes: 0 the row's dtype,
 * 1 bfloat16, 2 float16. */
enum { AS_ROW = 0, AS_BF16 = 1, AS_F16 = 2 };

static inline v8f load_code(const void *p, int64_t i, int code) {
    if (code == AS_BF16) return load_bf16((const uint16_t *)p + i);
#if HAVE_F16
    if (code == AS_F16) return load_f16((const uint16_t *)p + i);
#endif
    return load_f32((const float *)p + i);
}

static inline void store_code(void *p, int64_t i, v8f v, int code) {
    if (code == AS_BF16) store_bf16((uint16_t *)p + i, v);
#if HAVE_F16
    else if (code == AS_F16) store_f16((uint16_t *)p + i, v);
#endif
    else store_f32((float *)p + i, v);
}

/* A row's last n % 8 elements go through one padded vector, so they round as the rest do. */
static inline v8f load_tail(const void *p, int64_t i, int64_t count, int code) {
    const size_t size = code == AS_ROW ? 4 : 2;
    unsigned char buf[32] __attribute__((aligned(32))) = {0};
    memcpy(buf, (const unsigned char *)p + i * (int64_t)size, (size_t)count * size);
    return load_code(buf, 0, code);
}

static inline void store_tail(void *p, int64_t i, int64_t count, v8f v, int code) {
    const size_t size = code == AS_ROW ? 4 : 2;
    unsigned char buf[32] __attribute__((aligned(32)));
    store_code(buf, 0, v, code);
    memcpy((unsigned char *)p + i * (int64_t)size, buf, (size_t)count * size);
}

static void rms_row_f32(const float *x, const void *r, int r_code, float *s, const float *w, void *y, int y_code,
                        int64_t n, float eps) {
    const int64_t whole = n - n % 8, quads = n - n % 32;
    v8f a0 = splat_f32(0), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i < quads; i += 32) {
        v8f v0 = load_f32(x + i), v1 = load_f32(x + i + 8), v2 = load_f32(x + i + 16), v3 = load_f32(x + i + 24);
        if (r) {
            v0 += load_code(r, i, r_code); v1 += load_code(r, i + 8, r_code);
            v2 += load_code(r, i + 16, r_code); v3 += load_code(r, i + 24, r_code);
            store_f32(s + i, v0); store_f32(s + i + 8, v1); store_f32(s + i + 16, v2); store_f32(s + i + 24, v3);
        }
        a0 += v0 * v0; a1 += v1 * v1; a2 += v2 * v2; a3 += v3 * v3;
    }
    for (; i < whole; i += 8) {
        v8f v = load_f32(x + i);
        if (r) {
            v += load_code(r, i, r_code);
            store_f32(s + i, v);
        }
        a0 += v * v;
    }
    if (i < n) {
        v8f v = load_tail(x, i, n - i, AS_ROW);
        if (r) {
            v += load_tail(r, i, n - i, r_code);
            store_tail(s, i, n - i, v, AS_ROW);
        }
        a0 += v * v;  /* the padding is zero */
    }
    const float *sum = r ? s : x;  /* s = x without a residual: read, never copied */
    const v8f acc = (a0 + a1) + (a2 + a3);
    float sq = 0;
    for (int l = 0; l < 8; l++) sq += acc[l];
    const float rstd = 1.0f / sqrtf(sq / (float)n + eps);
    const v8f rv = splat_f32(rstd);
    for (i = 0; i < whole; i += 8) {
        v8f v = load_f32(sum + i) * rv;
        if (w) v = load_f32(w + i) * v;
        store_code(y, i, v, y_code);
    }
    if (i < n) {
        v8f v = load_tail(sum, i, n - i, AS_ROW) * rv;
        if (w) v = load_tail(w, i, n - i, AS_ROW) * v;
        store_tail(y, i, n - i, v, y_code);
    }
}

static void rms_row_f64(const double *x, const double *r, double *s, const double *w, double *y, int64_t n,
                        double eps) {
    double sq = 0;
    for (int64_t i = 0; i < n; i++) {
        const double v = r ? x[i] + r[i] : x[i];
        if (r) s[i] = v;
        sq += v * v;
    }
    const double *sum = r ? s : x;
    const double rstd = 1.0 / sqrt(sq / (double)n + eps);
    for (int64_t i = 0; i < n; i++) y[i] = w ? w[i] * (sum[i] * rstd) : sum[i] * rstd;
}

/* dtype: 0 float32, 1 float64. x, s: [M, n] of dtype; r (or NULL): [M, n] as r_code says; y:
 * [M, n] as y_code says; w: [n] of dtype or NULL; row strides ldx, ldr, lds, ldy in elements,
 * unit column stride. Without r, s is x and is neither written nor read (it may be NULL). As orca_add_layer_norm, s may be x and y may be r (of y's dtype) when they
 * die at this call. Returns 0, or -1 for a dtype or code this build does not take (16-bit codes
 * need float32; float16 needs _Float16). */
int orca_add_rms_norm(int dtype, const void *x, int64_t ldx, const void *r, int64_t ldr, int r_code, void *s,
                      int64_t lds, const void *w, void *y, int64_t ldy, int y_code, int64_t M, int64_t n, double eps,
                      int num_threads) {
    if (M == 0) return (dtype != 0 && dtype != 1) || (!HAVE_F16 && (r_code == AS_F16 || y_code == AS_F16)) ? -1 : 0;
    if ((dtype != 0 && dtype != 1) || r_code < AS_ROW || r_code > AS_F16 || y_code < AS_ROW || y_code > AS_F16
        || (dtype == 1 && (r_code != AS_ROW || y_code != AS_ROW))
        || (!HAVE_F16 && (r_code == AS_F16 || y_code == AS_F16)))
        return -1;
    const int64_t ry = r_code == AS_ROW ? (dtype == 0 ? 4 : 8) : 2, yy = y_code == AS_ROW ? (dtype == 0 ? 4 : 8) : 2;
    if (num_threads < 1 || M * n < PARALLEL_FROM) num_threads = 1;
    _Pragma("omp parallel for num_threads(num_threads) if(num_threads > 1)")
    for (int64_t m = 0; m < M; m++) {
        const void *rr = r ? (const unsigned char *)r + m * ldr * ry : 0;
        void *sr = r ? (unsigned char *)s + m * lds * (dtype == 0 ? 4 : 8) : 0;
        void *yr = (unsigned char *)y + m * ldy * yy;
        if (dtype == 0)
            rms_row_f32((const float *)x + m * ldx, rr, r_code, (float *)sr, (const float *)w, yr, y_code, n,
                        (float)eps);
        else
            rms_row_f64((const double *)x + m * ldx, rr, (double *)sr, (const double *)w, yr, n, eps);
    }
    return 0;
}
