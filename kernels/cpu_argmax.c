/* Greedy decoding's argmax on the CPU (kernels/argmax_cpu.py): the index of each row's first
 * maximum, or its first NaN, as torch.argmax answers. Built and loaded by kernels/cbuild.py like the
 * other C kernels (OpenMP on torch's pool; vector extensions, cpu_simd.h). */
#include <stdint.h>

#include "cpu_simd.h"
#ifdef _OPENMP
#include <omp.h>
#endif

/* Greedy decoding's argmax, row by row over logits [M, N] (row stride ld): out[r] = the index of
 * the first maximum of row r, or of its first NaN if it has one (torch.argmax's answer). Eight
 * running maxima and their indices per row, strict > so each lane keeps its first; a NaN flag
 * vector sends the rare row with a NaN to a scalar scan. torch.argmax took 0.9 ms on W1's
 * [32, 50257] logits (one pass at ~7 GB/s); this is one vectorised pass per thread's rows. */
#define DEFINE_ARGMAX(S, T, V, L, VI, IT)                                                           \
static int64_t argmax_row_##S(const T *x, int64_t n) {                                              \
    int64_t best = 0;                                                                               \
    if (n >= L) {                                                                                   \
        V mv = load_##S(x);                                                                         \
        VI iv, idx, nan = (VI){0} != (VI){0};                                                       \
        for (int l = 0; l < L; l++) iv[l] = (IT)l;                                                  \
        idx = iv;                                                                                   \
        nan |= (VI)(mv != mv);                                                                      \
        int64_t t = L;                                                                              \
        for (; t + L <= n; t += L) {                                                                \
            const V v = load_##S(x + t);                                                            \
            idx += (IT)L;                                                                           \
            const VI gt = (VI)(v > mv);                                                             \
            mv = (V)((gt & (VI)v) | (~gt & (VI)mv));                                                \
            iv = (gt & idx) | (~gt & iv);                                                           \
            nan |= (VI)(v != v);                                                                    \
        }                                                                                           \
        int any_nan = 0;                                                                            \
        for (int l = 0; l < L; l++) any_nan |= nan[l] != 0;                                         \
        if (any_nan) {                                                                              \
            for (int64_t u = 0; u < n; u++) if (x[u] != x[u]) return u;                             \
        }                                                                                           \
        T m = mv[0];                                                                                \
        best = (int64_t)iv[0];                                                                      \
        for (int l = 1; l < L; l++)                                                                 \
            if (mv[l] > m || (mv[l] == m && (int64_t)iv[l] < best)) { m = mv[l]; best = (int64_t)iv[l]; } \
        for (; t < n; t++) {                                                                        \
            if (x[t] != x[t]) return t;                                                             \
            if (x[t] > m) { m = x[t]; best = t; }                                                   \
        }                                                                                           \
        return best;                                                                                \
    }                                                                                               \
    for (int64_t t = 0; t < n; t++) {                                                               \
        if (x[t] != x[t]) return t;                                                                 \
        if (x[t] > x[best]) best = t;                                                               \
    }                                                                                               \
    return best;                                                                                    \
}

typedef int64_t v4l __attribute__((vector_size(32)));
DEFINE_ARGMAX(f32, float, v8f, 8, v8i, int32_t)
DEFINE_ARGMAX(f64, double, v4d, 4, v4l, int64_t)

/* dtype: 0 float32, 1 float64. x: [M, N] with row stride ld; out: M indices. Returns 0, or -1 for
 * an unknown dtype or (float32) a row too long for 32-bit lane indices. */
int orca_argmax(int dtype, const void *x, int64_t ld, int64_t M, int64_t N, int64_t *out, int num_threads) {
    if (dtype != 0 && dtype != 1) return -1;
    if (dtype == 0 && N > INT32_MAX - 16) return -1;
    if (num_threads < 1) num_threads = 1;
    _Pragma("omp parallel for num_threads(num_threads) if(num_threads > 1 && M > 1)")
    for (int64_t r = 0; r < M; r++)
        out[r] = dtype == 0 ? argmax_row_f32((const float *)x + r * ld, N) : argmax_row_f64((const double *)x + r * ld, N);
    return 0;
}
