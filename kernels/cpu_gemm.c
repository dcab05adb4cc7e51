/* Linear layers for the CPU: C[M, N] = act(A[M, K] @ W[N, K]^T + bias), float32 and float64, with W
 * packed once; W may also be bfloat16 or float16 under float32 A, C and arithmetic (load_bf16).
 * Aimed at the decode iterations of serving, where M (the tokens of the iteration) is small and
 * every weight streams from DRAM; large M runs at the same rate as oneDNN.
 *
 * Built and loaded by kernels/gemm_cpu.py (the system C compiler, ctypes; no torch headers).
 *
 * Layout. W is packed into panels of NR output columns, NR = 16 floats or 8 doubles (64 bytes, one
 * cache line, per k; 16 16-bit weights are 32 bytes, half a line, and the prefetch below then asks
 * for each line twice, a few spare instructions not worth a second code path): panel p holds
 * W[NR p .. NR p + NR - 1, :] as [K][NR], zero-padded past N.
 * The micro-kernel holds an R x NR block of C in registers (R <= 6: 12 accumulators of one AVX2
 * register each, two for the line of W, one for the broadcast A value: 15 of the 16 registers) and
 * runs over k: per k, one line of W, R broadcasts, 2R fused multiply-adds.
 *
 * Memory. Each thread takes a contiguous range of panels and streams it front to back, in groups
 * that fit L2 (see the driver): every panel of W comes from DRAM once per call, and while the first
 * row block passes over a group the next group is prefetched into L2 (spread over the group's
 * calls), so the DRAM stream of W hides behind the arithmetic (on AMD, at 1-4 rows the hardware
 * prefetcher alone streamed W faster: PREFETCH_ABOVE). This is what oneDNN's small-M kernels lacked
 * on W1's decode steps (docs/benchmarks.md: GPT-2 small's 49 GEMMs at 1-32 rows).
 *
 * Epilogue, on the registers before the store: bias, then an activation (ACT_*). float32 uses a
 * vectorised exp (Cephes-style range reduction and polynomial, ~2 ulp); float64 calls libm per
 * element, since float64 is the dtype of the exactness tests rather than of serving.
 *
 * Threads: OpenMP, i.e. torch's own pool (libgomp.so.1 resolves to the copy torch has loaded; see
 * cpu_attention.c). Written with GCC/Clang vector extensions, not intrinsics, so it builds for
 * any target; with -march=native on an AVX2/FMA machine `acc += x * w` is a vfmadd on ymm registers.
 * On an AVX-512 target the 16-bit weights run a 512-bit version of the micro-kernel (one register
 * per line of W; same results bit for bit; blocks of 4 rows or more over two panels at once, so a
 * broadcast of A serves two lines of W), and a prefill's many rows run in blocks of 12 rows by
 * two panels, 16-bit weights widened once per group of panels (the many-rows driver, below the
 * kernels; the same results bit for bit again).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_simd.h"
#ifdef _OPENMP
#include <omp.h>
#endif

#define R_MAX 6
/* Below this many rows a call is bound by the DRAM stream of W (2 M flops per 4 bytes of W against
 * the AMD machine's ~5 flops per byte of DRAM bandwidth), and it runs the paced kernels (U = 1): the
 * faster small blocks only issue the next group's prefetches faster than DRAM returns them, and
 * were ~10% slower at 1, 2 and 7 rows (benchmarks/cpu_gemm_ab.py). */
#ifndef PACED_BELOW
#define PACED_BELOW 9
#endif
/* SPLIT_TAIL. Below PACED_BELOW rows, 7 or 8 rows run as two blocks of 4 + 3 or 4 + 4: a block of
 * 1 or 2 paced rows has too few accumulators to hide the FMA latency, and the 6 + 1 / 6 + 2 split
 * took 1.06 / 1.13x the time (benchmarks/cpu_gemm_ab.py at 7 and 8 rows; from 9 rows, with the
 * accumulator sets of the faster kernels, splitting the tail was 0.94-1.10x, so it is not done). */

/* The prefetching of the paced driver (below) is tuned per CPU maker, each on the machine it was
 * measured on (interleaved runs of benchmarks/cpu_gemm_ab.py on GPT-2 small's 49 GEMMs):
 * kernels/cbuild.py defines ORCA_CPU_INTEL from /proc/cpuinfo's vendor; every other CPU (AMD,
 * Arm, a machine that does not say) keeps the settings measured on the AMD one.
 *
 * PREFETCH_ABOVE: up to this many rows the driver issues no prefetches of the next group.
 *   AMD (Zen 4): each line of W is read once, front to back, a few cycles apart, and the hardware
 *   prefetcher alone streamed that faster (0.77-0.92x the time at 1-3 rows, ~0.9-1.05x at 4); from
 *   5 rows up, dropping them was 1.1-1.3x slower.
 *   Intel (a Xeon with AVX-512 and AMX, a 2-vCPU KVM guest): the other way round, so they are
 *   issued at every row count (docs/benchmarks.md, session 16: the A/B of this file against
 *   itself with PREFETCH_ABOVE 4).
 * PACED_GROUP_BYTES: the size of a group, so the prefetch distance. 256 KB on AMD; on the Intel
 *   machine 64 KB was faster at 1-16 rows (the same A/B with 256 KB), 1 MB slower. A group is at
 *   least one panel, two where panels are paired (below). float64 (the exactness tests' dtype,
 *   not serving's) takes the same settings, unmeasured. */
#ifndef ORCA_CPU_INTEL
#define ORCA_CPU_INTEL 0
#endif
#ifndef PREFETCH_ABOVE
#define PREFETCH_ABOVE (ORCA_CPU_INTEL ? 0 : 4)
#endif
#ifndef PACED_GROUP_BYTES
#define PACED_GROUP_BYTES (ORCA_CPU_INTEL ? 64 * 1024 : 256 * 1024)
#endif
/* The many-rows driver's group (16-bit weights widened into it, so a float32 buffer of this size). */
#ifndef GROUP_BYTES
#define GROUP_BYTES (256 * 1024)
#endif

enum { ACT_NONE = 0, ACT_RELU = 1, ACT_SILU = 2, ACT_GELU_TANH = 3, ACT_SIGMOID = 4 };

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
 * S: type suffix, T: element, V: vector of L elements.
 *
 * An FMA's result is ready 4 cycles after it issues and two issue a cycle, so the FMA units stay
 * busy only with 8 or more independent accumulators. R rows give 2R; blocks of 1-3 rows therefore
 * can keep U sets of accumulators, one per k modulo U, summed at the end (the driver picks U).
 * WS, TW: the weights' load suffix and element (f32/float, f64/double, bf16 or f16/uint16_t: a
 * 16-bit line is widened to two float32 vectors as it is loaded). */
#define DEFINE_KERNEL(S, T, V, L, WS, TW, R, U)                                                     \
static void kernel_##WS##_##R##_##U(int64_t K, const T *a, int64_t lda, const TW *b, const T *bias, T *c, \
                                   int64_t ldc, int64_t cols, const TW *pf, int pf_shift, int act) { \
    V acc0[U][R], acc1[U][R];                                                                       \
    for (int u = 0; u < U; u++)                                                                     \
        for (int r = 0; r < R; r++) { acc0[u][r] = splat_##S(0); acc1[u][r] = splat_##S(0); }       \
    const int64_t pf_mask = ((int64_t)1 << pf_shift) - 1;                                         \
    if (!pf) pf = b; /* a prefetch of lines already in cache costs next to nothing: one loop */     \
    int64_t k = 0;                                                                                  \
    for (; k + U <= K; k += U)                                                                      \
        for (int u = 0; u < U; u++) {                                                               \
            const int64_t kk = k + u;                                                               \
            if (!(kk & pf_mask)) __builtin_prefetch(pf + (kk >> pf_shift) * 2 * L, 0, 2);           \
            V b0 = load_##WS(b + kk * 2 * L), b1 = load_##WS(b + kk * 2 * L + L);                   \
            if (R >= 4 || U > 1) { IN_REGISTER(b0); IN_REGISTER(b1); }                              \
            for (int r = 0; r < R; r++) {                                                           \
                const V x = splat_##S(a[r * lda + kk]);                                             \
                acc0[u][r] += x * b0;                                                               \
                acc1[u][r] += x * b1;                                                               \
            }                                                                                       \
        }                                                                                           \
    for (; k < K; k++) {                                                                            \
        if (!(k & pf_mask)) __builtin_prefetch(pf + (k >> pf_shift) * 2 * L, 0, 2);                 \
        V b0 = load_##WS(b + k * 2 * L), b1 = load_##WS(b + k * 2 * L + L);                         \
        for (int r = 0; r < R; r++) {                                                               \
            const V x = splat_##S(a[r * lda + k]);                                                  \
            acc0[0][r] += x * b0;                                                                   \
            acc1[0][r] += x * b1;                                                                   \
        }                                                                                           \
    }                                                                                               \
    for (int u = 1; u < U; u++)                                                                     \
        for (int r = 0; r < R; r++) { acc0[0][r] += acc0[u][r]; acc1[0][r] += acc1[u][r]; }         \
    if (bias) {                                                                                     \
        T bb[2 * L];                                                                                \
        memset(bb, 0, sizeof bb);                                                                   \
        memcpy(bb, bias, sizeof(T) * (size_t)cols);                                                 \
        const V c0 = load_##S(bb), c1 = load_##S(bb + L);                                           \
        for (int r = 0; r < R; r++) { acc0[0][r] += c0; acc1[0][r] += c1; }                         \
    }                                                                                               \
    if (act != ACT_NONE)                                                                            \
        for (int r = 0; r < R; r++) {                                                               \
            acc0[0][r] = act_##S(acc0[0][r], act);                                                  \
            acc1[0][r] = act_##S(acc1[0][r], act);                                                  \
        }                                                                                           \
    for (int r = 0; r < R; r++) {                                                                   \
        if (cols == 2 * L) {                                                                        \
            store_##S(c + r * ldc, acc0[0][r]);                                                     \
            store_##S(c + r * ldc + L, acc1[0][r]);                                                 \
        } else {                                                                                    \
            T t[2 * L];                                                                             \
            store_##S(t, acc0[0][r]);                                                               \
            store_##S(t + L, acc1[0][r]);                                                           \
            memcpy(c + r * ldc, t, sizeof(T) * (size_t)cols);                                       \
        }                                                                                           \
    }                                                                                               \
}

#if HAVE_V16
/* The epilogue of a 512-bit block's row, in the 256-bit kernel's order: bias (bb: its two halves, or
 * NULL), then the activation, on each half; cols (1-16) columns stored. */
static inline void load_bias16(v8f bb[2], const float *bias, int64_t cols) {
    float t[16];
    memset(t, 0, sizeof t);
    memcpy(t, bias, sizeof(float) * (size_t)cols);
    bb[0] = load_f32(t);
    bb[1] = load_f32(t + 8);
}

static inline void finish16(float *c, v16f acc, const v8f *bb, int64_t cols, int act) {
    float t[16];
    store16_f32(t, acc);
    v8f lo = load_f32(t), hi = load_f32(t + 8);
    if (bb) { lo += bb[0]; hi += bb[1]; }
    if (act != ACT_NONE) { lo = act_f32(lo, act); hi = act_f32(hi, act); }
    if (cols == 16) {
        store_f32(c, lo);
        store_f32(c + 8, hi);
    } else {
        store_f32(t, lo);
        store_f32(t + 8, hi);
        memcpy(c, t, sizeof(float) * (size_t)cols);
    }
}
#endif

/* The same block with a line of W in one 512-bit register (HAVE_V16: AVX-512): per k one load of
 * W, R broadcasts and R FMAs of 16 lanes instead of two loads and 2R FMAs of 8. Each lane runs the
 * same operations in the same order as above, so the results are the same bit for bit; only the
 * instruction count changes. float32 arithmetic only (S, T, V, L are those of the 256-bit kernel,
 * whose epilogue this one reuses on the two halves). */
#define DEFINE_WIDE_KERNEL(S, T, V, L, WS, TW, R, U)                                                \
static void kernel_##WS##_##R##_##U(int64_t K, const float *a, int64_t lda, const TW *b, const float *bias, \
                                   float *c, int64_t ldc, int64_t cols, const TW *pf, int pf_shift, int act) { \
    v16f acc[U][R];                                                                                 \
    for (int u = 0; u < U; u++)                                                                     \
        for (int r = 0; r < R; r++) acc[u][r] = splat16_f32(0);                                     \
    const int64_t pf_mask = ((int64_t)1 << pf_shift) - 1;                                         \
    if (!pf) pf = b;                                                                                \
    int64_t k = 0;                                                                                  \
    for (; k + U <= K; k += U)                                                                      \
        for (int u = 0; u < U; u++) {                                                               \
            const int64_t kk = k + u;                                                               \
            if (!(kk & pf_mask)) __builtin_prefetch(pf + (kk >> pf_shift) * 16, 0, 2);              \
            v16f b0 = load16_##WS(b + kk * 16);                                                     \
            if (R >= 4 || U > 1) IN_REGISTER(b0);                                                   \
            for (int r = 0; r < R; r++) acc[u][r] += splat16_f32(a[r * lda + kk]) * b0;             \
        }                                                                                           \
    for (; k < K; k++) {                                                                            \
        if (!(k & pf_mask)) __builtin_prefetch(pf + (k >> pf_shift) * 16, 0, 2);                    \
        const v16f b0 = load16_##WS(b + k * 16);                                                    \
        for (int r = 0; r < R; r++) acc[0][r] += splat16_f32(a[r * lda + k]) * b0;                 \
    }                                                                                               \
    for (int u = 1; u < U; u++)                                                                     \
        for (int r = 0; r < R; r++) acc[0][r] += acc[u][r];                                         \
    v8f bb[2];                                                                                      \
    if (bias) load_bias16(bb, bias, cols);                                                          \
    for (int r = 0; r < R; r++) finish16(c + r * ldc, acc[0][r], bias ? bb : NULL, cols, act);      \
}

/* Two panels at once for the row blocks of R >= PAIR_FROM rows (U = 1): per k two lines of W and
 * 2R FMAs on R broadcasts, where two calls of the kernel above issue 2R broadcasts. The broadcasts
 * are loads, and at 8 rows one panel's 9 loads per 8 FMAs, not DRAM, set the block's pace: two
 * panels took 0.83-0.96x the time at 4-8 rows and 0.75-0.76x at 16 (benchmarks/cpu_gemm_ab.py
 * --weights bfloat16 / float16, the Intel Xeon). Each lane runs the kernel above's operations in
 * its order: the same results bit for bit. pf0 / pf1: the two panels' prefetch slices (or NULL),
 * as the driver gives a single panel's. */
#define DEFINE_WIDE_PAIR(WS, TW, R)                                                                 \
static void pair_##WS##_##R(int64_t K, const float *a, int64_t lda, const TW *b, const float *bias, float *c, \
                            int64_t ldc, int64_t cols, const TW *pf0, const TW *pf1, int pf_shift, int act) { \
    v16f acc0[R], acc1[R];                                                                          \
    for (int r = 0; r < R; r++) { acc0[r] = splat16_f32(0); acc1[r] = splat16_f32(0); }             \
    const TW *b1 = b + K * 16;  /* the next panel */                                                \
    const int64_t pf_mask = ((int64_t)1 << pf_shift) - 1;                                           \
    if (!pf0) pf0 = b;                                                                              \
    if (!pf1) pf1 = b1;                                                                             \
    for (int64_t k = 0; k < K; k++) {                                                               \
        if (!(k & pf_mask)) {                                                                       \
            __builtin_prefetch(pf0 + (k >> pf_shift) * 16, 0, 2);                                   \
            __builtin_prefetch(pf1 + (k >> pf_shift) * 16, 0, 2);                                   \
        }                                                                                           \
        v16f w0 = load16_##WS(b + k * 16), w1 = load16_##WS(b1 + k * 16);                           \
        IN_REGISTER(w0);                                                                            \
        IN_REGISTER(w1);                                                                            \
        for (int r = 0; r < R; r++) {                                                               \
            const v16f x = splat16_f32(a[r * lda + k]);                                             \
            acc0[r] += x * w0;                                                                      \
            acc1[r] += x * w1;                                                                      \
        }                                                                                           \
    }                                                                                               \
    v8f bb0[2], bb1[2];                                                                             \
    if (bias) { load_bias16(bb0, bias, 16); load_bias16(bb1, bias + 16, cols - 16); }               \
    for (int r = 0; r < R; r++) {                                                                   \
        finish16(c + r * ldc, acc0[r], bias ? bb0 : NULL, 16, act);                                 \
        finish16(c + r * ldc + 16, acc1[r], bias ? bb1 : NULL, cols - 16, act);                     \
    }                                                                                               \
}

/* Paced calls of up to PACED_MAX rows run as one block. 6 (R_MAX) for the 256-bit kernels, whose
 * registers hold no more; 8 for the 512-bit kernel of 16-bit weights, so that a decode of 7 or 8
 * rows widens each line of W once, not once per block of the SPLIT_TAIL (the same results bit for
 * bit: U = 1 in both). */
_Static_assert(PACED_BELOW > 8, "the 7- and 8-row blocks are in the paced table only");
#define KERNELS_7_8_6(KERNEL, S, T, V, L, WS, TW)
#define TABLE_7_8_6(WS) 0, 0
#define KERNELS_7_8_8(KERNEL, S, T, V, L, WS, TW) KERNEL(S, T, V, L, WS, TW, 7, 1) KERNEL(S, T, V, L, WS, TW, 8, 1)
#define TABLE_7_8_8(WS) kernel_##WS##_7_1, kernel_##WS##_8_1
/* The two-panel blocks go with the 512-bit kernels (PACED_MAX 8), for row blocks of PAIR_FROM rows
 * and more. */
#ifndef PAIR_FROM
#define PAIR_FROM 4
#endif
_Static_assert(PAIR_FROM >= 4, "blocks of 1-3 rows may keep several accumulator sets (U > 1); pairs have one");
#define PAIRED_6 0
#define PAIRED_8 1
#define PAIRS_6(WS, TW)
#define PAIR_TABLE_6(WS) 0
#define PAIRS_8(WS, TW) DEFINE_WIDE_PAIR(WS, TW, 4) DEFINE_WIDE_PAIR(WS, TW, 5) DEFINE_WIDE_PAIR(WS, TW, 6) \
                        DEFINE_WIDE_PAIR(WS, TW, 7) DEFINE_WIDE_PAIR(WS, TW, 8)
#define PAIR_TABLE_8(WS) 0, 0, 0, 0, PAIR_FROM <= 4 ? pair_##WS##_4 : 0, PAIR_FROM <= 5 ? pair_##WS##_5 : 0, \
                         PAIR_FROM <= 6 ? pair_##WS##_6 : 0, PAIR_FROM <= 7 ? pair_##WS##_7 : 0, pair_##WS##_8

/* The driver. Each thread takes a contiguous range of panels and walks it in groups of G panels
 * (G panels ~ PACED_GROUP_BYTES, at least one; a group and the next fit in L2); every row block of
 * R_MAX rows passes over a group before the next group starts, so each panel of W comes from DRAM
 * once per call however many rows there are (A, M x K, is re-read per group from L2/L3). While a
 * group is computed, the next one is prefetched into L2, spread evenly over all of the group's
 * micro-kernel calls (row blocks x panels), each taking a contiguous slice. Issuing the whole next
 * group during the first row block alone was 3-12% slower at 8-32 rows (benchmarks/cpu_gemm_ab.py
 * on GPT-2 small's 49 GEMMs): a burst that size overruns the core's outstanding-miss
 * slots, so prefetches are dropped and the next group's first pass waits on DRAM. Calls of at most
 * PREFETCH_ABOVE rows issue none (see there). */
#define DEFINE_GEMM(S, T, V, L, WS, TW, KERNEL, PACED_MAX)                                          \
KERNEL(S, T, V, L, WS, TW, 1, 1)                                                                    \
KERNEL(S, T, V, L, WS, TW, 2, 1)                                                                    \
KERNEL(S, T, V, L, WS, TW, 3, 1)                                                                    \
KERNEL(S, T, V, L, WS, TW, 1, 4)                                                                    \
KERNEL(S, T, V, L, WS, TW, 2, 2)                                                                    \
KERNEL(S, T, V, L, WS, TW, 3, 2)                                                                    \
KERNEL(S, T, V, L, WS, TW, 4, 1)                                                                    \
KERNEL(S, T, V, L, WS, TW, 5, 1)                                                                    \
KERNEL(S, T, V, L, WS, TW, 6, 1)                                                                    \
KERNELS_7_8_##PACED_MAX(KERNEL, S, T, V, L, WS, TW)                                                 \
PAIRS_##PACED_MAX(WS, TW)                                                                           \
typedef void (*kernel_##WS##_t)(int64_t, const T *, int64_t, const TW *, const T *, T *, int64_t, int64_t, \
                               const TW *, int, int);                                                \
typedef void (*pair_##WS##_t)(int64_t, const T *, int64_t, const TW *, const T *, T *, int64_t, int64_t, \
                             const TW *, const TW *, int, int);                                      \
static const pair_##WS##_t PAIRS_##WS[9] = {PAIR_TABLE_##PACED_MAX(WS)};                             \
static const kernel_##WS##_t KERNELS_##WS[2][9] = {                                                   \
    {0, kernel_##WS##_1_1, kernel_##WS##_2_1, kernel_##WS##_3_1, kernel_##WS##_4_1, kernel_##WS##_5_1, kernel_##WS##_6_1, \
     TABLE_7_8_##PACED_MAX(WS)},                                                                    \
    {0, kernel_##WS##_1_4, kernel_##WS##_2_2, kernel_##WS##_3_2, kernel_##WS##_4_1, kernel_##WS##_5_1, kernel_##WS##_6_1}}; \
static void gemm_##WS(const T *a, int64_t lda, const TW *packed, const T *bias, T *c, int64_t ldc,     \
                     int64_t M, int64_t N, int64_t K, int act, int num_threads) {                   \
    const int64_t nr = 2 * L, panels = (N + nr - 1) / nr, panel_bytes = K * nr * (int64_t)sizeof(TW); \
    const int paired = PAIRED_##PACED_MAX && M >= PAIR_FROM;  /* groups of two panels at least */      \
    int64_t group = panel_bytes > 0 && PACED_GROUP_BYTES / panel_bytes > 1 ? PACED_GROUP_BYTES / panel_bytes : 1; \
    if (paired && group < 2) group = 2;                                                             \
    if (num_threads > panels) num_threads = (int)panels;                                            \
    if (num_threads < 1) num_threads = 1;                                                           \
    _Pragma("omp parallel num_threads(num_threads) if(num_threads > 1)")                            \
    {                                                                                               \
        int t = 0, nt = 1;                                                                          \
        OMP_IDS(t, nt);                                                                             \
        const int64_t p0 = panels * t / nt, p1 = panels * (t + 1) / nt;                             \
        const int64_t blocks = M <= PACED_MAX ? M > 0 : (M + R_MAX - 1) / R_MAX;                     \
        const kernel_##WS##_t *kernels = KERNELS_##WS[M >= PACED_BELOW];                              \
        int shift = 0;                                                                              \
        while (((int64_t)1 << (shift + 1)) <= blocks && shift < 20) shift++;                         \
        const int64_t slice = (K + ((int64_t)1 << shift) - 1) >> shift;                             \
        for (int64_t g0 = p0; g0 < p1; g0 += group) {                                               \
            const int64_t g1 = g0 + group < p1 ? g0 + group : p1;                                   \
            const int64_t next_lines = ((g1 + group < p1 ? g1 + group : p1) - g1) * K;              \
            for (int64_t blk = 0, i = 0, rows = 0; blk < blocks; blk++, i += rows) {                \
                /* 7 or 8 paced rows as 4 + 3 or 4 + 4, not 6 + 1 or 6 + 2: see SPLIT_TAIL */     \
                rows = M <= PACED_MAX ? M : M < PACED_BELOW && M - i > R_MAX ? (M - i) / 2                 \
                     : M - i < R_MAX ? M - i : R_MAX;                                               \
                for (int64_t p = g0; p < g1; p++) {                                                 \
                    const TW *b = packed + p * K * nr;                                               \
                    const int64_t cols = N - p * nr < nr ? N - p * nr : nr;                         \
                    const int64_t first = (blk * (g1 - g0) + (p - g0)) * slice;                     \
                    const TW *pf = M > PREFETCH_ABOVE && first + slice <= next_lines ? packed + (g1 * K + first) * nr : NULL; \
                    if (paired && PAIRS_##WS[rows] && p + 1 < g1) {  /* panels p and p + 1, slices alike */ \
                        const TW *pf1 = M > PREFETCH_ABOVE && first + 2 * slice <= next_lines               \
                                        ? packed + (g1 * K + first + slice) * nr : NULL;            \
                        PAIRS_##WS[rows](K, a + i * lda, lda, b, bias ? bias + p * nr : NULL, c + i * ldc + p * nr, \
                                         ldc, N - p * nr < 2 * nr ? N - p * nr : 2 * nr, pf, pf1, shift, act); \
                        p++;                                                                        \
                        continue;                                                                   \
                    }                                                                               \
                    kernels[rows](K, a + i * lda, lda, b, bias ? bias + p * nr : NULL,          \
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

/* 16-bit weights, float32 arithmetic: a line of 16 weights is 32 bytes (half the float32 line's
 * DRAM traffic), widened to two float32 vectors in registers as it is read (load_bf16 / load_f16,
 * cpu_simd.h). */
/* With AVX-512 the 16-bit weights take the 512-bit kernel: one widening of a 16-weight line instead
 * of two, half the FMAs; GPT-2 small's 49 GEMMs on bfloat16 weights 0.76-0.91x the time at 1-32
 * rows (benchmarks/cpu_gemm_ab.py --weights bfloat16). float32 weights keep the 256-bit one: there
 * the 512-bit kernel was 1.05x the time at 1 row (three runs; the DRAM stream sets the pace and
 * the core clocks lower under 512-bit FMAs) and 0.91-1.01x at 2-512 rows, no clear gain. */
#if HAVE_V16 && !defined(NO_WIDE)
#define SIXTEEN_BIT_KERNEL DEFINE_WIDE_KERNEL
#define SIXTEEN_BIT_PACED 8
#else
#define SIXTEEN_BIT_KERNEL DEFINE_KERNEL
#define SIXTEEN_BIT_PACED 6
#endif
#define DEFINE_GEMM_(...) DEFINE_GEMM(__VA_ARGS__)  /* expands SIXTEEN_BIT_PACED before it is pasted */
DEFINE_GEMM(f32, float, v8f, 8, f32, float, DEFINE_KERNEL, 6)
DEFINE_GEMM(f64, double, v4d, 4, f64, double, DEFINE_KERNEL, 6)
DEFINE_GEMM_(f32, float, v8f, 8, bf16, uint16_t, SIXTEEN_BIT_KERNEL, SIXTEEN_BIT_PACED)
#if HAVE_F16
DEFINE_GEMM_(f32, float, v8f, 8, f16, uint16_t, SIXTEEN_BIT_KERNEL, SIXTEEN_BIT_PACED)
#endif

/* Many rows (a prefill chunk's). Two changes from the driver above, both measured on GPT-2 small's
 * 49 GEMMs (benchmarks/cpu_gemm_ab.py, interleaved, against the previous build; this machine's
 * run-to-run spread is ~5%, ~7% at 20-30 rows):
 *
 * - With AVX-512, blocks of 12 rows by two panels (kernel_big, below). The 6-row kernels issue a
 *   load or a broadcast per FMA and reached about half the rate of MKL's float32 GEMM at 512 rows
 *   (116 against 231 GFLOP/s on Qwen2.5-0.5B's 896 -> 4864, benchmarks/gemm_sixteen_bit.py).
 *   float32 weights: 0.84-0.92x the time at 36-44 rows, 0.71-0.80x at 48-128, 0.63x at 512; at
 *   16-32 rows 0.99-1.07x, no gain, so from MANY_ROWS_FROM rows.
 * - 16-bit weights: each thread widens a group of panels once into a float32 buffer that stays in
 *   L2 and runs the float32 blocks on it, where the row blocks widened every line of W in each of
 *   their M / 6 passes: bit for bit the float32 weights' results on half the DRAM bytes. Without the
 *   12-row blocks this alone was 0.76x the time at 512 rows; with them, against the previous build,
 *   0.64-0.71x at 48-512 rows and 0.87-0.90x at 40-44; at 12-24 rows it cost 1.13-1.31x, so from
 *   WIDEN_FROM rows (a decode's few row blocks widen in registers as they stream).
 *
 * No prefetch of the next group here: a group is read front to back once (the hardware
 * prefetcher's case), and the row blocks then compute on it from L2 for far longer. */
#ifndef WIDEN_FROM
#define WIDEN_FROM 40
#endif
#ifndef MANY_ROWS_FROM
#if HAVE_V16 && !defined(NO_WIDE)
#define MANY_ROWS_FROM 36
#else
#define MANY_ROWS_FROM INT64_MAX  /* no 12-row blocks: float32 weights keep the driver above */
#endif
#endif
/* kernel_big: 12 rows by two panels (32 columns) in 24 registers; per k two loads of W, 12
 * broadcasts and 24 FMAs of 16 lanes. Each lane runs the same operations in the same order as in
 * the 6-row kernels (U = 1), so the results are the same bit for bit. */
#if HAVE_V16 && !defined(NO_WIDE)
#define BIG_R 12
static void kernel_big(int64_t K, const float *a, int64_t lda, const float *b, const float *bias, float *c,
                       int64_t ldc, int64_t cols, int act) {
    v16f acc0[BIG_R], acc1[BIG_R];
    for (int r = 0; r < BIG_R; r++) { acc0[r] = splat16_f32(0); acc1[r] = splat16_f32(0); }
    const float *b1 = b + K * 16;  /* the next panel */
    for (int64_t k = 0; k < K; k++) {
        v16f w0 = load16_f32(b + k * 16), w1 = load16_f32(b1 + k * 16);
        IN_REGISTER(w0);
        IN_REGISTER(w1);
        for (int r = 0; r < BIG_R; r++) {
            const v16f x = splat16_f32(a[r * lda + k]);
            acc0[r] += x * w0;
            acc1[r] += x * w1;
        }
    }
    v8f bb0[2], bb1[2];
    if (bias) { load_bias16(bb0, bias, 16); load_bias16(bb1, bias + 16, cols - 16); }
    for (int r = 0; r < BIG_R; r++) {
        finish16(c + r * ldc, acc0[r], bias ? bb0 : NULL, 16, act);
        finish16(c + r * ldc + 16, acc1[r], bias ? bb1 : NULL, cols - 16, act);
    }
}
#else
#define BIG_R R_MAX
#endif

/* All M rows against panels g0 .. g1 - 1 of float32 weights at w (panel g0 first, in memory or in
 * a widened buffer): blocks of BIG_R rows by pairs of panels where the 512-bit kernel is built, the
 * rest (a last odd panel, the last M % BIG_R rows) in blocks of R_MAX on the kernels above. */
static void rows_over_group(const float *a, int64_t lda, const float *w, int64_t g0, int64_t g1, const float *bias,
                            float *c, int64_t ldc, int64_t M, int64_t N, int64_t K, int act) {
    const int64_t nr = 16, panel_floats = K * nr;
    for (int64_t i = 0; i < M; i += BIG_R) {
        const int64_t rows = M - i < BIG_R ? M - i : BIG_R;
        for (int64_t p = g0; p < g1; p++) {
            const float *b = w + (p - g0) * panel_floats;
            const float *pb = bias ? bias + p * nr : NULL;
#if HAVE_V16 && !defined(NO_WIDE)
            if (rows == BIG_R && p + 1 < g1) {
                const int64_t cols = N - p * nr < 2 * nr ? N - p * nr : 2 * nr;
                kernel_big(K, a + i * lda, lda, b, pb, c + i * ldc + p * nr, ldc, cols, act);
                p++;
                continue;
            }
#endif
            const int64_t cols = N - p * nr < nr ? N - p * nr : nr;
            for (int64_t j = i; j < i + rows; j += R_MAX) {
                const int64_t rr = i + rows - j < R_MAX ? i + rows - j : R_MAX;
                KERNELS_f32[1][rr](K, a + j * lda, lda, b, pb, c + j * ldc + p * nr, ldc, cols, NULL, 0, act);
            }
        }
    }
}

/* The driver for many rows (MANY_ROWS_FROM, WIDEN_FROM): each thread's range of panels in groups, every row
 * block passing over a group (from L2) before the next; 16-bit weights widened into a float32
 * buffer first (WS), float32 ones read in place (f32). Groups hold an even number of panels (the
 * 512-bit kernel takes them in pairs), at least two. */
#define DEFINE_MANY_ROWS(WS, TW)                                                                    \
static void gemm_rows_##WS(const float *a, int64_t lda, const TW *packed, const float *bias, float *c,   \
                           int64_t ldc, int64_t M, int64_t N, int64_t K, int act, int num_threads) { \
    const int64_t nr = 16, panels = (N + nr - 1) / nr, panel_floats = K * nr;                         \
    int64_t group = panel_floats > 0 ? GROUP_BYTES / (panel_floats * 4) : 2;                        \
    group = group < 2 ? 2 : group - group % 2;                                                      \
    const int widen = sizeof(TW) != sizeof(float);                                                  \
    if (num_threads > panels) num_threads = (int)panels;                                            \
    if (num_threads < 1) num_threads = 1;                                                           \
    int failed = 0;                                                                                 \
    _Pragma("omp parallel num_threads(num_threads) if(num_threads > 1) reduction(|: failed)")       \
    {                                                                                               \
        int t = 0, nt = 1;                                                                          \
        OMP_IDS(t, nt);                                                                             \
        const int64_t p0 = panels * t / nt, p1 = panels * (t + 1) / nt;                             \
        float *buf = widen && p1 > p0 ? aligned_alloc(64, (size_t)(group * panel_floats * 4)) : NULL; \
        if (widen && p1 > p0 && !buf) failed = 1;                                                   \
        for (int64_t g0 = p0; !(widen && !buf) && g0 < p1; g0 += group) {                           \
            const int64_t g1 = g0 + group < p1 ? g0 + group : p1;                                   \
            const TW *src = packed + g0 * panel_floats;                                             \
            if (widen)                                                                              \
                for (int64_t j = 0; j < (g1 - g0) * panel_floats; j += 8) store_f32(buf + j, load_##WS(src + j)); \
            rows_over_group(a, lda, widen ? buf : (const float *)src, g0, g1, bias, c, ldc, M, N, K, act); \
        }                                                                                           \
        free(buf);                                                                                  \
    }                                                                                               \
    if (failed) /* no memory for a buffer: widen in registers instead */                           \
        gemm_##WS(a, lda, packed, bias, c, ldc, M, N, K, act, num_threads);                         \
}
DEFINE_MANY_ROWS(f32, float)
DEFINE_MANY_ROWS(bf16, uint16_t)
#if HAVE_F16
DEFINE_MANY_ROWS(f16, uint16_t)
#endif

/* The row count from which orca_gemm's ``dtype`` takes the many-rows driver, or -1 for never
 * (float32 weights without AVX-512); for the tests. */
int64_t orca_gemm_many_rows_from(int dtype) {
    if (dtype == 0) return MANY_ROWS_FROM == INT64_MAX ? -1 : (int64_t)MANY_ROWS_FROM;
    return (dtype == 2 || (dtype == 3 && HAVE_F16)) ? WIDEN_FROM : -1;
}

/* Whether this build takes orca_gemm's ``dtype`` (float16 weights need the compiler's _Float16). */
int orca_gemm_supports(int dtype) { return dtype == 0 || dtype == 1 || dtype == 2 || (dtype == 3 && HAVE_F16); }

/* dtype: 0 float32, 1 float64, 2 float32 with bfloat16 weights, 3 float32 with float16 weights.
 * a: [M, K] (float32 or float64), row stride lda; packed: [ceil(N / NR), K, NR] with NR = 16
 * (float32 and the 16-bit weights) or 8 (float64); bias: [N] of a's dtype, or NULL; c: [M, N] of
 * a's dtype, row stride ldc; act: ACT_*. Returns 0, or -1 for a dtype or activation not taken. */
int orca_gemm(int dtype, const void *a, int64_t lda, const void *packed, const void *bias, void *c, int64_t ldc,
              int64_t M, int64_t N, int64_t K, int act, int num_threads) {
    if (act < ACT_NONE || act > ACT_SIGMOID || !orca_gemm_supports(dtype)) return -1;
    if (dtype == 0)
        (M >= MANY_ROWS_FROM ? gemm_rows_f32 : gemm_f32)(a, lda, packed, bias, c, ldc, M, N, K, act, num_threads);
    else if (dtype == 1) gemm_f64(a, lda, packed, bias, c, ldc, M, N, K, act, num_threads);
    else if (dtype == 2)
        (M >= WIDEN_FROM ? gemm_rows_bf16 : gemm_bf16)(a, lda, packed, bias, c, ldc, M, N, K, act, num_threads);
#if HAVE_F16
    else (M >= WIDEN_FROM ? gemm_rows_f16 : gemm_f16)(a, lda, packed, bias, c, ldc, M, N, K, act, num_threads);
#endif
    return 0;
}
