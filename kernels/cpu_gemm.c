/* Linear layers for the CPU: C[M, N] = act(A[M, K] @ W[N, K]^T + bias), float32 and float64, with W
 * packed once. Aimed at the decode iterations of serving, where M (the tokens of the iteration) is
 * small and every weight streams from DRAM; large M runs at the same rate as oneDNN.
 *
 * Built and loaded by kernels/gemm_cpu.py (the system C compiler, ctypes; no torch headers).
 *
 * Layout. W is packed into panels of NR output columns, NR = 16 floats or 8 doubles (64 bytes, one
 * cache line, per k): panel p holds W[NR p .. NR p + NR - 1, :] as [K][NR], zero-padded past N.
 * The micro-kernel holds an R x NR block of C in registers (R <= 6: 12 accumulators of one AVX2
 * register each, two for the line of W, one for the broadcast A value: 15 of the 16 registers) and
 * runs over k: per k, one line of W, R broadcasts, 2R fused multiply-adds.
 *
 * Memory. Each thread takes a contiguous range of panels and streams it front to back, in groups
 * that fit L2 (see the driver): every panel of W comes from DRAM once per call, and while the first
 * row block passes over a group the next group is prefetched into L2 (one line per k), so the DRAM
 * stream of W hides behind the arithmetic when there are enough rows and runs near the machine's
 * read bandwidth when there are not. This is what oneDNN's small-M kernels lacked on W1's decode
 * steps (docs/benchmarks.md: GPT-2 small's 49 GEMMs at 1-32 rows).
 *
 * Epilogue, on the registers before the store: bias, then an activation (ACT_*). float32 uses a
 * vectorised exp (Cephes-style range reduction and polynomial, ~2 ulp); float64 calls libm per
 * element, since float64 is the dtype of the exactness tests rather than of serving.
 *
 * Threads: OpenMP, i.e. torch's own pool (libgomp.so.1 resolves to the copy torch has loaded; see
 * cpu_decode_attention.c). Written with GCC/Clang vector extensions, not intrinsics, so it builds for
 * any target; with -march=native on an AVX2/FMA machine `acc += x * w` is a vfmadd on ymm registers.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define R_MAX 6
#ifndef GROUP_BYTES
#define GROUP_BYTES (256 * 1024)
#endif

enum { ACT_NONE = 0, ACT_RELU = 1, ACT_SILU = 2, ACT_GELU_TANH = 3, ACT_SIGMOID = 4 };

typedef float v8f __attribute__((vector_size(32)));
typedef float v8f_u __attribute__((vector_size(32), aligned(4), may_alias));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef double v4d __attribute__((vector_size(32)));
typedef double v4d_u __attribute__((vector_size(32), aligned(8), may_alias));

static inline v8f load_f32(const float *p) { return *(const v8f_u *)p; }
static inline void store_f32(float *p, v8f v) { *(v8f_u *)p = v; }
static inline v8f splat_f32(float s) { return (v8f){s, s, s, s, s, s, s, s}; }
static inline v4d load_f64(const double *p) { return *(const v4d_u *)p; }
static inline void store_f64(double *p, v4d v) { *(v4d_u *)p = v; }
static inline v4d splat_f64(double s) { return (v4d){s, s, s, s}; }

/* Bitwise select: m ? x : y, lane by lane (m: all ones or all zeros per lane, from a comparison). */
static inline v8f select_f32(v8i m, v8f x, v8f y) { return (v8f)((m & (v8i)x) | (~m & (v8i)y)); }

/* exp(x) for 8 floats: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by Cephes' degree-6 polynomial,
 * times 2^n through the exponent bits. x is clamped to [-87.3, 88.3], so no infinity or denormal
 * comes out (the activations below only need exp's far tails to be huge or tiny, not exact). */
static inline v8f exp_f32(v8f x) {
    const v8f hi = splat_f32(88.3f), lo = splat_f32(-87.3f);
    x = select_f32(x > hi, hi, x);
    x = select_f32(x < lo, lo, x);
    const v8f magic = splat_f32(12582912.0f);                /* 1.5 * 2^23: adding it rounds to an integer */
    const v8f t = x * splat_f32(1.44269504088896341f) + magic;
    const v8f n = t - magic;
    const v8i ni = (v8i)t - (v8i)magic;                       /* n as an integer */
    const v8f r = x - n * splat_f32(0.693359375f) - n * splat_f32(-2.12194440e-4f);
    v8f p = splat_f32(1.9875691500e-4f);
    p = p * r + splat_f32(1.3981999507e-3f);
    p = p * r + splat_f32(8.3334519073e-3f);
    p = p * r + splat_f32(4.1665795894e-2f);
    p = p * r + splat_f32(1.6666665459e-1f);
    p = p * r + splat_f32(5.0000001201e-1f);
    p = p * r * r + r + splat_f32(1.0f);
    return p * (v8f)((ni + 127) << 23);
}

static inline v8f act_f32(v8f x, int act) {
    const v8f one = splat_f32(1.0f);
    switch (act) {
    case ACT_RELU: return select_f32(x < splat_f32(0.0f), splat_f32(0.0f), x); /* NaN stays NaN, as torch.relu */
    case ACT_SILU: return x / (one + exp_f32(-x));
    case ACT_SIGMOID: return one / (one + exp_f32(-x));
    case ACT_GELU_TANH: {  /* 0.5 x (1 + tanh(u)) = x / (1 + exp(-2u)), u = sqrt(2 / pi) (x + 0.044715 x^3) */
        const v8f u = splat_f32(0.7978845608028654f) * (x + splat_f32(0.044715f) * x * x * x);
        return x / (one + exp_f32(-2.0f * u));
    }
    default: return x;
    }
}

static inline double act_scalar_f64(double x, int act) {
    switch (act) {
    case ACT_RELU: return x < 0 ? 0.0 : x;
    case ACT_SILU: return x / (1.0 + exp(-x));
    case ACT_SIGMOID: return 1.0 / (1.0 + exp(-x));
    case ACT_GELU_TANH: return 0.5 * x * (1.0 + tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)));
    default: return x;
    }
}

static inline v4d act_f64(v4d x, int act) {
    if (act == ACT_NONE) return x;
    for (int i = 0; i < 4; i++) x[i] = act_scalar_f64(x[i], act);
    return x;
}

/* R x NR block: c[r][0 .. cols) = act(sum_k a[r][k] * b[k][0 .. NR) + bias). pf: lines to prefetch
 * into L2, one every 2^pf_shift k-steps (ceil(K / 2^pf_shift) of them, contiguous), or NULL for none.
 * S: type suffix, T: element, V: vector of L elements. */
#define DEFINE_KERNEL(S, T, V, L, R)                                                                \
static void kernel_##S##_##R(int64_t K, const T *a, int64_t lda, const T *b, const T *bias, T *c,   \
                             int64_t ldc, int64_t cols, const T *pf, int pf_shift, int act) {       \
    V acc0[R], acc1[R];                                                                             \
    for (int r = 0; r < R; r++) { acc0[r] = splat_##S(0); acc1[r] = splat_##S(0); }                 \
    const int64_t pf_mask = ((int64_t)1 << pf_shift) - 1;                                         \
    if (!pf) pf = b; /* a prefetch of lines already in cache costs next to nothing: one loop */     \
    for (int64_t k = 0; k < K; k++) {                                                               \
        if (!(k & pf_mask)) __builtin_prefetch(pf + (k >> pf_shift) * 2 * L, 0, 2);                 \
        const V b0 = load_##S(b + k * 2 * L), b1 = load_##S(b + k * 2 * L + L);                     \
        for (int r = 0; r < R; r++) {                                                               \
            const V x = splat_##S(a[r * lda + k]);                                                  \
            acc0[r] += x * b0;                                                                      \
            acc1[r] += x * b1;                                                                      \
        }                                                                                           \
    }                                                                                               \
    if (bias) {                                                                                     \
        T bb[2 * L];                                                                                \
        memset(bb, 0, sizeof bb);                                                                   \
        memcpy(bb, bias, sizeof(T) * (size_t)cols);                                                 \
        const V c0 = load_##S(bb), c1 = load_##S(bb + L);                                           \
        for (int r = 0; r < R; r++) { acc0[r] += c0; acc1[r] += c1; }                               \
    }                                                                                               \
    if (act != ACT_NONE)                                                                            \
        for (int r = 0; r < R; r++) { acc0[r] = act_##S(acc0[r], act); acc1[r] = act_##S(acc1[r], act); } \
    for (int r = 0; r < R; r++) {                                                                   \
        if (cols == 2 * L) {                                                                        \
            store_##S(c + r * ldc, acc0[r]);                                                        \
            store_##S(c + r * ldc + L, acc1[r]);                                                    \
        } else {                                                                                    \
            T t[2 * L];                                                                             \
            store_##S(t, acc0[r]);                                                                  \
            store_##S(t + L, acc1[r]);                                                              \
            memcpy(c + r * ldc, t, sizeof(T) * (size_t)cols);                                       \
        }                                                                                           \
    }                                                                                               \
}

/* The driver. Each thread takes a contiguous range of panels and walks it in groups of G panels
 * (G * K * 64 bytes ~ GROUP_BYTES, so a group and the next fit in L2 together); every row block of
 * R_MAX rows passes over a group before the next group starts, so each panel of W comes from DRAM
 * once per call however many rows there are (A, M x K, is re-read per group from L2/L3). While a
 * group is computed, the next one is prefetched into L2, spread evenly over all of the group's
 * micro-kernel calls (row blocks x panels), each taking a contiguous slice. Issuing the whole next
 * group during the first row block alone was 3-12% slower at 8-32 rows (benchmarks/cpu_gemm_ab.py
 * on GPT-2 small's 49 GEMMs): a burst that size overruns the core's outstanding-miss
 * slots, so prefetches are dropped and the next group's first pass waits on DRAM. */
#define DEFINE_GEMM(S, T, V, L)                                                                     \
DEFINE_KERNEL(S, T, V, L, 1)                                                                        \
DEFINE_KERNEL(S, T, V, L, 2)                                                                        \
DEFINE_KERNEL(S, T, V, L, 3)                                                                        \
DEFINE_KERNEL(S, T, V, L, 4)                                                                        \
DEFINE_KERNEL(S, T, V, L, 5)                                                                        \
DEFINE_KERNEL(S, T, V, L, 6)                                                                        \
typedef void (*kernel_##S##_t)(int64_t, const T *, int64_t, const T *, const T *, T *, int64_t, int64_t, \
                               const T *, int, int);                                                \
static const kernel_##S##_t KERNELS_##S[R_MAX + 1] = {0, kernel_##S##_1, kernel_##S##_2, kernel_##S##_3, \
                                                     kernel_##S##_4, kernel_##S##_5, kernel_##S##_6}; \
static void gemm_##S(const T *a, int64_t lda, const T *packed, const T *bias, T *c, int64_t ldc,     \
                     int64_t M, int64_t N, int64_t K, int act, int num_threads) {                   \
    const int64_t nr = 2 * L, panels = (N + nr - 1) / nr, panel_bytes = K * nr * (int64_t)sizeof(T); \
    const int64_t group = panel_bytes > 0 && GROUP_BYTES / panel_bytes > 1 ? GROUP_BYTES / panel_bytes : 1; \
    if (num_threads > panels) num_threads = (int)panels;                                            \
    if (num_threads < 1) num_threads = 1;                                                           \
    _Pragma("omp parallel num_threads(num_threads) if(num_threads > 1)")                            \
    {                                                                                               \
        int t = 0, nt = 1;                                                                          \
        OMP_IDS(t, nt);                                                                             \
        const int64_t p0 = panels * t / nt, p1 = panels * (t + 1) / nt;                             \
        const int64_t blocks = (M + R_MAX - 1) / R_MAX;                                             \
        int shift = 0;                                                                              \
        while (((int64_t)1 << (shift + 1)) <= blocks && shift < 20) shift++;                         \
        const int64_t slice = (K + ((int64_t)1 << shift) - 1) >> shift;                             \
        for (int64_t g0 = p0; g0 < p1; g0 += group) {                                               \
            const int64_t g1 = g0 + group < p1 ? g0 + group : p1;                                   \
            const int64_t next_lines = ((g1 + group < p1 ? g1 + group : p1) - g1) * K;              \
            for (int64_t i = 0; i < M; i += R_MAX) {                                                \
                const int64_t rows = M - i < R_MAX ? M - i : R_MAX;                                 \
                for (int64_t p = g0; p < g1; p++) {                                                 \
                    const T *b = packed + p * K * nr;                                               \
                    const int64_t cols = N - p * nr < nr ? N - p * nr : nr;                         \
                    const int64_t first = ((i / R_MAX) * (g1 - g0) + (p - g0)) * slice;             \
                    const T *pf = first + slice <= next_lines ? packed + (g1 * K + first) * nr : NULL; \
                    KERNELS_##S[rows](K, a + i * lda, lda, b, bias ? bias + p * nr : NULL,          \
                                      c + i * ldc + p * nr, ldc, cols, pf, shift, act);             \
                }                                                                                   \
            }                                                                                       \
        }                                                                                           \
    }                                                                                               \
}

#ifdef _OPENMP
#define OMP_IDS(t, nt) do { t = omp_get_thread_num(); nt = omp_get_num_threads(); } while (0)
#else
#define OMP_IDS(t, nt) do { } while (0)
#endif

DEFINE_GEMM(f32, float, v8f, 8)
DEFINE_GEMM(f64, double, v4d, 4)

/* dtype: 0 float32, 1 float64. a: [M, K], row stride lda; packed: [ceil(N / NR), K, NR] with
 * NR = 16 (float32) or 8 (float64); bias: [N] or NULL; c: [M, N], row stride ldc; act: ACT_*.
 * Returns 0, or -1 for an unknown dtype or activation. */
int orca_gemm(int dtype, const void *a, int64_t lda, const void *packed, const void *bias, void *c, int64_t ldc,
              int64_t M, int64_t N, int64_t K, int act, int num_threads) {
    if (act < ACT_NONE || act > ACT_SIGMOID) return -1;
    if (dtype == 0) gemm_f32(a, lda, packed, bias, c, ldc, M, N, K, act, num_threads);
    else if (dtype == 1) gemm_f64(a, lda, packed, bias, c, ldc, M, N, K, act, num_threads);
    else return -1;
    return 0;
}
