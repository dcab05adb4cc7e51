/* Paged attention for the CPU, in place over the blocks of the paged KV cache (no gathered copy of
 * a context): every one-token request of the iteration (orca_decode_attention) and every
 * multi-token one, prompts and prompt chunks (orca_prefill_attention, further down).
 *
 * Built and loaded by kernels/attention_cpu.py (the system C compiler, ctypes; no torch headers).
 * Semantics are those of orca::attention (orca_compile/ops.py): a request's new tokens sit at the
 * last positions of its context of L = seq_lens[r] tokens; the token at position pos sees keys
 * max(0, pos - window + 1) .. pos; scores are scale * q.k, then softcap * tanh(s / softcap) if
 * softcap > 0, then plus slope_h * (key pos - pos) with ALiBi slopes; with sinks, query head h's
 * sink logit joins the softmax's maximum and its sum and attends to nothing (the weights of a row
 * then sum to less than 1). Sinks and slopes come as nh doubles per query head, or NULL.
 *
 * Decodes. Work items are a request and a slice of its KV heads (the whole request when there are
 * enough requests for the threads), so the query heads of a GQA group read each key and value row
 * once. Two passes per item: scores of the whole context into a scratch row per head, then softmax
 * and the weighted sum of V rows. The scores are taken four heads at a time, one vector
 * accumulator each: a single head's dot product is a chain of dependent FMAs that left the kernel
 * at ~30 GB/s of K/V on W1's decodes; four chains side by side read 12 layers' caches at ~84% of
 * the rate a plain sum over the same bytes gets in the same minute (docs/benchmarks.md).
 *
 * Also here: orca_store_kv, this iteration's K/V rows into their cache slots.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_simd.h"

/* Decodes prefetch the K (then V) rows PF_AHEAD positions ahead into L2, through the block table:
 * each cache block is a separate stretch of memory, which the hardware prefetcher only finds after
 * a few misses. 4 ahead into L2 was 6% faster than none on W1's decodes (12 layers, cache cold);
 * into L1, or 16-64 ahead, was slower. */
#ifndef PF_AHEAD
#define PF_AHEAD 4
#endif
static inline void prefetch_span(const void *p, int64_t bytes) {
    const char *c = (const char *)p;
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 2);
}

typedef struct {
    const void *q; int64_t q_row, q_head;           /* strides in elements */
    const void *k_cache, *v_cache;                  /* [num_blocks, bs, nkv, hd] / [.., hdv], contiguous */
    int64_t bs, nkv, hd, hdv, nh;
    const int64_t *qsl, *seq_lens, *block_tables;   /* [R + 1], [R], [R, bt_stride] */
    int64_t bt_stride;
    double scale, softcap;
    const double *sinks, *alibi;                    /* [nh] each, per query head; NULL: none */
    int64_t window;
    void *out; int64_t out_row, out_head;
} job_t;

/* Query head h's sink logit and ALiBi slope as the softmax rows take them: -INFINITY and 0 when
 * there are none, which the rows skip rather than add (so a job without either is bit for bit
 * the plain softmax). */
static inline double sink_of(const job_t *j, int64_t h) { return j->sinks ? j->sinks[h] : -INFINITY; }
static inline double slope_of(const job_t *j, int64_t h) { return j->alibi ? j->alibi[h] : 0; }

#define ROW_SLACK 8 /* spare scores past a row's last key: softmax_row_f32 works in whole vectors */

/* One row of attention weights over n >= 1 visible keys, in place: the raw dot products s[0 .. n)
 * become x_t = softcap * tanh(scale * s_t / softcap) (scale * s_t when softcap is 0), plus the
 * ALiBi bias slope * (dist0 + t) (dist0: the first key's position minus the query's), and then
 * exp(x_t - m) / (sum_t exp(x_t - m) + exp(sink - m)), m the maximum of the x_t and the sink.
 * slope 0 and sink -INFINITY (none) skip those steps. float32 is vectorised (exp_f32: a few ulp
 * from expf) and rounds n up to whole vectors: it reads and writes s up to 7 elements past n
 * (zeros land there), so every scores row has ROW_SLACK spare elements at its end. float64 stays
 * with libm. */
static void softmax_row_f32(float *s, int64_t n, float scale, float softcap, float slope, int64_t dist0,
                            float sink) {
    const v8i lane = {0, 1, 2, 3, 4, 5, 6, 7};
    const v8f lane_f = {0, 1, 2, 3, 4, 5, 6, 7};
    const int64_t whole = n & ~(int64_t)7;
    const v8i tail = lane < (v8i){0} + (int32_t)(n - whole); /* lanes of the last, partial vector */
    const v8f sv = splat_f32(scale), neg_inf = splat_f32(-INFINITY), zero = splat_f32(0);
    if (softcap > 0)
        for (int64_t t = 0; t < n; t++) s[t] = softcap * tanhf(s[t] * scale / softcap) / scale;
    v8f mv = neg_inf;
    for (int64_t t = 0; t < n; t += 8) {  /* s may be read and written past n: see ROW_SLACK */
        v8f x = load_f32(s + t) * sv;
        if (slope != 0) x += splat_f32(slope) * (splat_f32((float)(dist0 + t)) + lane_f);
        if (t == whole) x = select_f32(tail, x, neg_inf);
        store_f32(s + t, x);
        mv = select_f32(x > mv, x, mv);
    }
    float m = mv[0];
    for (int l = 1; l < 8; l++) m = mv[l] > m ? mv[l] : m;
    if (sink > m) m = sink;
    /* Weights under e^-64 of the row's largest become 0. They are far below float32's resolution
     * (no sum or output moves), but exp_f32 clamps them to 1.2e-38, which the normalisation and
     * S V turn into denormals, and x86 cores take a slow path for each of those: ALiBi's far keys
     * made float32 rows 3-14x slower before this. */
    const v8f msplat = splat_f32(m), floor = splat_f32(-64.0f);
    v8f acc = zero;
    for (int64_t t = 0; t < n; t += 8) {
        const v8f d = load_f32(s + t) - msplat;
        v8f e = select_f32(d >= floor, exp_f32(d), zero);
        if (t == whole) e = select_f32(tail, e, zero);
        store_f32(s + t, e);
        acc += e;
    }
    float sum = 0;
    for (int l = 0; l < 8; l++) sum += acc[l];
    if (sink > -INFINITY) sum += expf(sink - m);
    const v8f iv = splat_f32(1.0f / sum);
    for (int64_t t = 0; t < n; t += 8) store_f32(s + t, load_f32(s + t) * iv);
}

static void softmax_row_f64(double *s, int64_t n, double scale, double softcap, double slope, int64_t dist0,
                            double sink) {
    double m = sink, sum = 0; /* -INFINITY without a sink */
    for (int64_t t = 0; t < n; t++) {
        s[t] = softcap > 0 ? softcap * tanh(s[t] * scale / softcap) : s[t] * scale;
        if (slope != 0) s[t] += slope * (double)(dist0 + t);
        m = s[t] > m ? s[t] : m;
    }
    for (int64_t t = 0; t < n; t++) {
        s[t] = exp(s[t] - m);
        sum += s[t];
    }
    if (sink > -INFINITY) sum += exp(sink - m);
    for (int64_t t = 0; t < n; t++) s[t] /= sum;
}

/* one item: request r, KV heads [h0, h1); scores: (h1 - h0) * group x (max_len + ROW_SLACK), acc:
 * (h1 - h0) * group x hdv.
 * Positions outer, heads inner: each position's K (then V) row is read front to back, once.
 * VEC is a vector of LANES elements of T; heads whose size is not a multiple of LANES take the
 * scalar (compiler-vectorised) dot product. */
#define DEFINE_ITEM(NAME, T, VEC, LANES, LOADV, SOFTMAX_ROW)                                           \
static void NAME(const job_t *j, int64_t r, int64_t h0, int64_t h1, T *scores, T *acc) {           \
    const int64_t group = j->nh / j->nkv, heads = (h1 - h0) * group;                                \
    const T *q = (const T *)j->q, *kc = (const T *)j->k_cache, *vc = (const T *)j->v_cache;         \
    T *out = (T *)j->out;                                                                           \
    const int64_t k_slot = j->nkv * j->hd, v_slot = j->nkv * j->hdv;                                \
    const int64_t row = j->qsl[r], len = j->seq_lens[r];                                            \
    const int64_t start = (j->window > 0 && len > j->window) ? len - j->window : 0;                 \
    const int64_t *table = j->block_tables + r * j->bt_stride;                                      \
    const int64_t n = len - start, ns = n + ROW_SLACK; /* scores row stride */                     \
    const int vec = j->hd % LANES == 0;                                                             \
    const int64_t span = (h1 - h0) * j->hd * (int64_t)sizeof(T), vspan = (h1 - h0) * j->hdv * (int64_t)sizeof(T); \
    for (int64_t p = start; p < len; p++) {                                                         \
        const T *kslot = kc + (table[p / j->bs] * j->bs + p % j->bs) * k_slot;                      \
        if (p + PF_AHEAD < len) prefetch_span(kc + (table[(p + PF_AHEAD) / j->bs] * j->bs + (p + PF_AHEAD) % j->bs) * k_slot + h0 * j->hd, span); \
        int64_t i = 0;                                                                              \
        for (; i + 4 <= heads && vec; i += 4) { /* four heads at once: four independent FMA chains */ \
            const T *qs[4], *ks[4];                                                                 \
            for (int u = 0; u < 4; u++) {                                                           \
                qs[u] = q + row * j->q_row + (h0 * group + i + u) * j->q_head;                      \
                ks[u] = kslot + (h0 + (i + u) / group) * j->hd;                                     \
            }                                                                                       \
            VEC acc[4] = {{0}, {0}, {0}, {0}};                                                      \
            for (int64_t d = 0; d < j->hd; d += LANES)                                              \
                for (int u = 0; u < 4; u++) acc[u] += LOADV(qs[u] + d) * LOADV(ks[u] + d);           \
            for (int u = 0; u < 4; u++) {                                                           \
                T s = 0;                                                                            \
                for (int l = 0; l < LANES; l++) s += acc[u][l];                                     \
                scores[(i + u) * ns + (p - start)] = s;                                             \
            }                                                                                       \
        }                                                                                           \
        for (; i < heads; i++) {                                                                    \
            const T *qh = q + row * j->q_row + (h0 * group + i) * j->q_head;                        \
            const T *krow = kslot + (h0 + i / group) * j->hd;                                       \
            T s = 0;                                                                                \
            _Pragma("omp simd reduction(+:s)")                                                      \
            for (int64_t d = 0; d < j->hd; d++) s += qh[d] * krow[d];                               \
            scores[i * ns + (p - start)] = s;                                                       \
        }                                                                                           \
    }                                                                                               \
    for (int64_t i = 0; i < heads; i++) { /* the query at position len - 1, keys from start */      \
        const int64_t h = h0 * group + i;                                                           \
        SOFTMAX_ROW(scores + i * ns, n, (T)j->scale, (T)j->softcap, (T)slope_of(j, h), start - (len - 1), \
                    (T)sink_of(j, h));                                                              \
    }                                                                                               \
    memset(acc, 0, sizeof(T) * (size_t)(heads * j->hdv));                                           \
    for (int64_t p = start; p < len; p++) {                                                         \
        const T *vslot = vc + (table[p / j->bs] * j->bs + p % j->bs) * v_slot;                      \
        if (p + PF_AHEAD < len) prefetch_span(vc + (table[(p + PF_AHEAD) / j->bs] * j->bs + (p + PF_AHEAD) % j->bs) * v_slot + h0 * j->hdv, vspan); \
        for (int64_t i = 0; i < heads; i++) {                                                       \
            const T *vrow = vslot + (h0 + i / group) * j->hdv;                                      \
            const T w = scores[i * ns + (p - start)];                                               \
            T *a = acc + i * j->hdv;                                                                \
            _Pragma("omp simd")                                                                     \
            for (int64_t d = 0; d < j->hdv; d++) a[d] += w * vrow[d];                               \
        }                                                                                           \
    }                                                                                               \
    for (int64_t i = 0; i < heads; i++)                                                             \
        memcpy(out + row * j->out_row + (h0 * group + i) * j->out_head, acc + i * j->hdv,           \
               sizeof(T) * (size_t)j->hdv);                                                         \
}

DEFINE_ITEM(item_f32, float, v8f, 8, load_f32, softmax_row_f32)
DEFINE_ITEM(item_f64, double, v4d, 4, load_f64, softmax_row_f64)

enum { ONE_TOKEN = 0, MULTI_TOKEN = 1, ANY_TOKENS = 2 }; /* which requests a call attends */

/* Whether the metadata points outside the tensors, for the requests a call attends (`attends`:
 * those with one new token, with more than one, or with any): query_start_loc not rising within
 * [0, num_rows], a context shorter than its new tokens or longer than its block-table row
 * (bt_width blocks), or a block id outside [0, num_blocks). */
static int bad_metadata(int attends, const int64_t *qsl, const int64_t *seq_lens, const int64_t *block_tables,
                        int64_t bt_stride, int64_t num_reqs, int64_t bs, int64_t num_rows, int64_t bt_width,
                        int64_t num_blocks) {
    if (num_reqs > 0 && qsl[0] < 0) return 1;
    for (int64_t r = 0; r < num_reqs; r++) {
        if (qsl[r + 1] < qsl[r] || qsl[r + 1] > num_rows) return 1;
        const int64_t n = qsl[r + 1] - qsl[r];
        if (attends == ANY_TOKENS ? n < 1 : attends == MULTI_TOKEN ? n <= 1 : n != 1) continue;
        const int64_t len = seq_lens[r], used = (len + bs - 1) / bs;
        if (len < n || used > bt_width) return 1;
        for (int64_t b = 0; b < used; b++) {
            const int64_t id = block_tables[r * bt_stride + b];
            if (id < 0 || id >= num_blocks) return 1;
        }
    }
    return 0;
}

/* The one-token requests of a job whose metadata has been checked. */
static int64_t decode_run(const job_t *jp, int dtype, int64_t num_reqs, int num_threads) {
    const job_t j = *jp;
    const int64_t *qsl = j.qsl, *seq_lens = j.seq_lens, nkv = j.nkv, nh = j.nh, hdv = j.hdv;
    int64_t *decodes = (int64_t *)malloc(sizeof(int64_t) * (size_t)(num_reqs > 0 ? num_reqs : 1));
    if (!decodes) return -1;
    int64_t nd = 0, max_len = 1;
    for (int64_t r = 0; r < num_reqs; r++)
        if (qsl[r + 1] - qsl[r] == 1) {
            decodes[nd++] = r;
            if (seq_lens[r] > max_len) max_len = seq_lens[r];
        }
    /* Items: each request's KV heads in `chunks` slices. Whole requests when there are enough
     * of them to keep every thread busy (rows then read front to back), else finer slices. */
    if (num_threads < 1) num_threads = 1;
    int64_t chunks = 1;
    while (chunks < nkv && nd * chunks < 4 * (int64_t)num_threads) chunks *= 2;
    if (chunks > nkv) chunks = nkv;
    const int64_t per = (nkv + chunks - 1) / chunks, items = nd * chunks, group = nh / nkv;
    const size_t elem = dtype == 0 ? sizeof(float) : sizeof(double);
    int failed = 0;
    #pragma omp parallel num_threads(num_threads) if(items > 1) reduction(|:failed)
    {
        void *scores = malloc(elem * (size_t)(per * group * (max_len + ROW_SLACK)));
        void *acc = malloc(elem * (size_t)(per * group * hdv));
        if (!scores || !acc) {
            failed = 1;
        } else {
            #pragma omp for schedule(dynamic, 1)
            for (int64_t i = 0; i < items; i++) {
                const int64_t r = decodes[i / chunks], h0 = (i % chunks) * per;
                const int64_t h1 = h0 + per < nkv ? h0 + per : nkv;
                if (h0 >= h1) continue;
                if (dtype == 0) item_f32(&j, r, h0, h1, (float *)scores, (float *)acc);
                else item_f64(&j, r, h0, h1, (double *)scores, (double *)acc);
            }
        }
        free(scores);
        free(acc);
    }
    free(decodes);
    if (failed) return -1;
    int64_t left = 0;
    for (int64_t r = 0; r < num_reqs; r++) left += qsl[r + 1] - qsl[r] > 1;
    return left;
}

/* dtype: 0 float32, 1 float64. Returns the number of requests it left to the caller (those with
 * more than one token this iteration: prefills), -1 when a scratch buffer could not be had, or -2
 * (nothing written) when the metadata points outside the tensors: query_start_loc not rising
 * within [0, num_rows], a one-token request's context longer than its block-table row
 * (bt_width blocks), or one of its block ids outside [0, num_blocks). sinks, alibi: nh sink
 * logits and ALiBi slopes, one per query head, or NULL for none.
 * Parallel over the items with OpenMP. Built with -fopenmp, this library needs
 * libgomp.so.1, which the loader resolves to the copy torch has loaded already: one thread pool
 * for torch's ops and this kernel (a second pool would spin against torch's on the same cores). */
int64_t orca_decode_attention(int dtype, const void *q, int64_t q_row, int64_t q_head,
                              const void *k_cache, const void *v_cache, int64_t bs, int64_t nkv, int64_t hd,
                              int64_t hdv, int64_t nh, const int64_t *qsl, const int64_t *seq_lens,
                              const int64_t *block_tables, int64_t bt_stride, int64_t num_reqs, double scale,
                              int64_t window, double softcap, const double *sinks, const double *alibi,
                              void *out, int64_t out_row, int64_t out_head, int64_t num_rows, int64_t bt_width,
                              int64_t num_blocks, int num_threads) {
    if (bad_metadata(ONE_TOKEN, qsl, seq_lens, block_tables, bt_stride, num_reqs, bs, num_rows, bt_width, num_blocks))
        return -2;
    const job_t j = {q, q_row, q_head, k_cache, v_cache, bs, nkv, hd, hdv, nh, qsl, seq_lens, block_tables,
                     bt_stride, scale, softcap, sinks, alibi, window, out, out_row, out_head};
    return decode_run(&j, dtype, num_reqs, num_threads);
}

/* ---- Multi-token requests (prompts and prompt chunks) ----
 *
 * Request r has n = qsl[r+1] - qsl[r] > 1 new tokens at positions L - n .. L - 1 of its context of
 * L = seq_lens[r] tokens, whose K/V are all in the cache already (stored before this call). Query
 * i (position L - n + i) sees keys max(0, pos - window + 1) .. pos.
 *
 * An item is a request, one KV head and a range of its query rows. It copies the keys and values
 * it needs out of the paged cache once, into the GEMM's panel layout (kernels/cpu_gemm.c): K
 * transposed into panels of NR keys ([hd][NR] each), V into panels of NR value columns ([keys][NR]
 * each). Then, for each query head of the GQA group and each block of up to 6 query rows, the
 * scores S = Q K^T over the keys the block can see, masked softmax per row, and O = S V, both
 * products on a 6 x NR register block (the GEMM's micro-kernel shape). Blocks of 6 rows keep the
 * causal waste to the keys past a row inside its block's range (< 6 + NR per row). */
#define PF_ROWS 6

#define PF_MM_LOOP(S, V, L, ROWS)                                                                   \
    for (int64_t k = 0; k < K; k++) {                                                               \
        V b0 = load_##S(b + k * 2 * L), b1 = load_##S(b + k * 2 * L + L);                           \
        IN_REGISTER(b0);                                                                            \
        IN_REGISTER(b1);                                                                            \
        for (int r = 0; r < ROWS; r++) {                                                            \
            const V x = splat_##S(a[r * lda + k]);                                                  \
            acc0[r] += x * b0;                                                                      \
            acc1[r] += x * b1;                                                                      \
        }                                                                                           \
    }

#define DEFINE_PREFILL(S, T, V, L, SOFTMAX_ROW)                                                      \
/* c[r][0 .. cols) = sum_k a[r * lda + k] * b[k][0 .. NR) for r < R (R <= 6). */                     \
static void mm_##S(int R, int64_t K, const T *a, int64_t lda, const T *b, T *c, int64_t ldc,          \
                   int64_t cols) {                                                                  \
    V acc0[PF_ROWS], acc1[PF_ROWS];                                                                 \
    for (int r = 0; r < PF_ROWS; r++) { acc0[r] = splat_##S(0); acc1[r] = splat_##S(0); }           \
    /* the same loop twice: with R a constant for whole blocks (it unrolls), and with R read */    \
    if (R == PF_ROWS) PF_MM_LOOP(S, V, L, PF_ROWS)                                                  \
    else PF_MM_LOOP(S, V, L, R)                                                                     \
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
}                                                                                                   \
                                                                                                    \
/* Request r, KV head kvh, query rows [i0, i1). kp: ceil(keys / NR) * hd * NR, vp: ceil(hdv / NR) * \
 * keys * NR, sc: PF_ROWS * (ceil(keys / NR) * NR + ROW_SLACK) elements, keys <= the context. */   \
static void prefill_item_##S(const job_t *j, int64_t r, int64_t kvh, int64_t i0, int64_t i1, T *kp,  \
                             T *vp, T *sc) {                                                        \
    const int64_t NR = 2 * L, group = j->nh / j->nkv, hd = j->hd, hdv = j->hdv;                     \
    const T *q = (const T *)j->q, *kc = (const T *)j->k_cache, *vc = (const T *)j->v_cache;         \
    T *out = (T *)j->out;                                                                           \
    const int64_t row0 = j->qsl[r], n = j->qsl[r + 1] - row0, len = j->seq_lens[r], first = len - n; \
    const int64_t *table = j->block_tables + r * j->bt_stride;                                      \
    const int64_t window = j->window;                                                               \
    /* keys [lo, hi) cover every query of [i0, i1); key positions are lo + index from here on */    \
    const int64_t hi = first + i1;                                                                  \
    const int64_t lo = window > 0 && first + i0 - window + 1 > 0 ? first + i0 - window + 1 : 0;     \
    const int64_t nk = hi - lo, kpanels = (nk + NR - 1) / NR, vpanels = (hdv + NR - 1) / NR;        \
    const int64_t ldk = kpanels * NR + ROW_SLACK; /* scores row stride */                          \
    /* The last K panel's columns past nk and V's past hdv are left unset: the scores they give are \
     * never read (softmax and S V stop at the block's last key) and their output lanes are never  \
     * stored. */                                                                                   \
    for (int64_t t = 0; t < nk; t++) {                                                              \
        const int64_t pos = lo + t, slot = table[pos / j->bs] * j->bs + pos % j->bs;                \
        const T *krow = kc + (slot * j->nkv + kvh) * hd, *vrow = vc + (slot * j->nkv + kvh) * hdv;   \
        T *kdst = kp + (t / NR) * hd * NR + t % NR;                                                 \
        for (int64_t d = 0; d < hd; d++) kdst[d * NR] = krow[d];                                    \
        for (int64_t p = 0; p < vpanels; p++) {                                                     \
            const int64_t w = hdv - p * NR < NR ? hdv - p * NR : NR;                                \
            memcpy(vp + (p * nk + t) * NR, vrow + p * NR, sizeof(T) * (size_t)w);                   \
        }                                                                                           \
    }                                                                                               \
    const T scale = (T)j->scale, softcap = (T)j->softcap;                                           \
    for (int64_t g = 0; g < group; g++) {                                                           \
        const int64_t h = kvh * group + g;                                                          \
        const T slope = (T)slope_of(j, h), sink = (T)sink_of(j, h);                                 \
        for (int64_t b0 = i0; b0 < i1; b0 += PF_ROWS) {                                             \
            const int rows = (int)(i1 - b0 < PF_ROWS ? i1 - b0 : PF_ROWS);                          \
            /* this block's keys: [blo, bhi) relative to lo */                                      \
            const int64_t bpos = first + b0, bhi = bpos + rows - lo;                                \
            const int64_t blo = window > 0 && bpos - window + 1 - lo > 0 ? bpos - window + 1 - lo : 0; \
            const int64_t p0 = blo / NR, p1 = (bhi + NR - 1) / NR;                                  \
            const T *qb = q + (row0 + b0) * j->q_row + h * j->q_head;                               \
            for (int64_t p = p0; p < p1; p++)                                                       \
                mm_##S(rows, hd, qb, j->q_row, kp + p * hd * NR, sc + p * NR, ldk, NR);             \
            for (int i = 0; i < rows; i++) {                                                        \
                T *s = sc + i * ldk;                                                                \
                const int64_t pos = bpos + i, vhi = pos + 1 - lo;                                   \
                const int64_t vlo = window > 0 && pos - window + 1 - lo > 0 ? pos - window + 1 - lo : 0; \
                SOFTMAX_ROW(s + vlo, vhi - vlo, scale, softcap, slope, lo + vlo - pos, sink);       \
                for (int64_t t = blo; t < vlo; t++) s[t] = 0;                                       \
                for (int64_t t = vhi; t < bhi; t++) s[t] = 0;                                       \
            }                                                                                       \
            T *ob = out + (row0 + b0) * j->out_row + h * j->out_head;                               \
            for (int64_t p = 0; p < vpanels; p++)                                                   \
                mm_##S(rows, bhi - blo, sc + blo, ldk, vp + (p * nk + blo) * NR, ob + p * NR, j->out_row, \
                       hdv - p * NR < NR ? hdv - p * NR : NR);                                      \
        }                                                                                           \
    }                                                                                               \
}

DEFINE_PREFILL(f32, float, v8f, 8, softmax_row_f32)
DEFINE_PREFILL(f64, double, v4d, 4, softmax_row_f64)

/* The multi-token requests of a job whose metadata has been checked. */
static int64_t prefill_run(const job_t *jp, int dtype, int64_t num_reqs, int num_threads) {
    const job_t j = *jp;
    const int64_t *qsl = j.qsl, *seq_lens = j.seq_lens, nkv = j.nkv, hd = j.hd, hdv = j.hdv;
    int64_t np = 0, max_len = 1, rows_total = 0;
    for (int64_t r = 0; r < num_reqs; r++) {
        const int64_t n = qsl[r + 1] - qsl[r];
        if (n <= 1) continue;
        np++;
        rows_total += n;
        if (seq_lens[r] > max_len) max_len = seq_lens[r];
    }
    if (np == 0) return 0;
    if (num_threads < 1) num_threads = 1;
    /* requests longest first; each split into `chunks` query ranges */
    int64_t *reqs = (int64_t *)malloc(sizeof(int64_t) * (size_t)np);
    if (!reqs) return -1;
    np = 0;
    for (int64_t r = 0; r < num_reqs; r++)
        if (qsl[r + 1] - qsl[r] > 1) {
            int64_t at = np++;
            while (at > 0 && seq_lens[reqs[at - 1]] < seq_lens[r]) { reqs[at] = reqs[at - 1]; at--; }
            reqs[at] = r;
        }
    int64_t chunks = 1;
    while (np * nkv * chunks < 4 * (int64_t)num_threads && chunks * PF_ROWS * np < rows_total) chunks *= 2;
    const int64_t items = np * nkv * chunks, nr = dtype == 0 ? 16 : 8;
    const int64_t kpanels = (max_len + nr - 1) / nr, vpanels = (hdv + nr - 1) / nr;
    const size_t elem = dtype == 0 ? sizeof(float) : sizeof(double);
    int failed = 0;
    #pragma omp parallel num_threads(num_threads) if(items > 1) reduction(|:failed)
    {
        void *kp = malloc(elem * (size_t)(kpanels * hd * nr));
        void *vp = malloc(elem * (size_t)(vpanels * max_len * nr));
        void *sc = malloc(elem * (size_t)(PF_ROWS * (kpanels * nr + ROW_SLACK)));
        if (!kp || !vp || !sc) {
            failed = 1;
        } else {
            #pragma omp for schedule(dynamic, 1)
            for (int64_t i = 0; i < items; i++) {
                const int64_t r = reqs[i / (nkv * chunks)], kvh = (i / chunks) % nkv, c = i % chunks;
                const int64_t n = qsl[r + 1] - qsl[r];
                /* row blocks split evenly; later ranges see more keys, so cut by area (sqrt) */
                const int64_t blocks = (n + PF_ROWS - 1) / PF_ROWS;
                const int64_t b0 = (int64_t)(blocks * sqrt((double)c / chunks) + 0.5);
                const int64_t b1 = (int64_t)(blocks * sqrt((double)(c + 1) / chunks) + 0.5);
                const int64_t i0 = b0 * PF_ROWS, i1 = b1 * PF_ROWS < n ? b1 * PF_ROWS : n;
                if (i0 >= i1) continue;
                if (dtype == 0) prefill_item_f32(&j, r, kvh, i0, i1, (float *)kp, (float *)vp, (float *)sc);
                else prefill_item_f64(&j, r, kvh, i0, i1, (double *)kp, (double *)vp, (double *)sc);
            }
        }
        free(kp);
        free(vp);
        free(sc);
    }
    free(reqs);
    return failed ? -1 : 0;
}

/* The multi-token requests of the iteration (orca_decode_attention's arguments; one-token
 * requests are skipped). Returns 0, -1 when a scratch buffer could not be had, or -2 (nothing
 * written) when the metadata points outside the tensors: query_start_loc not rising within
 * [0, num_rows], a context shorter than its new tokens or longer than its block-table row, or a
 * block id outside [0, num_blocks). Items: (request, KV head, a range of query rows), the ranges
 * split until there are a few items per thread, longest requests first (dynamic schedule). */
int64_t orca_prefill_attention(int dtype, const void *q, int64_t q_row, int64_t q_head,
                               const void *k_cache, const void *v_cache, int64_t bs, int64_t nkv, int64_t hd,
                               int64_t hdv, int64_t nh, const int64_t *qsl, const int64_t *seq_lens,
                               const int64_t *block_tables, int64_t bt_stride, int64_t num_reqs, double scale,
                               int64_t window, double softcap, const double *sinks, const double *alibi,
                               void *out, int64_t out_row, int64_t out_head, int64_t num_rows, int64_t bt_width,
                               int64_t num_blocks, int num_threads) {
    if (bad_metadata(MULTI_TOKEN, qsl, seq_lens, block_tables, bt_stride, num_reqs, bs, num_rows, bt_width,
                     num_blocks))
        return -2;
    const job_t j = {q, q_row, q_head, k_cache, v_cache, bs, nkv, hd, hdv, nh, qsl, seq_lens, block_tables,
                     bt_stride, scale, softcap, sinks, alibi, window, out, out_row, out_head};
    return prefill_run(&j, dtype, num_reqs, num_threads);
}

/* This iteration's K and V rows into their cache slots: token t's heads go to slot slots[t] of
 * the flattened [num_slots, nkv, hd] caches; slots < 0 are padding and skipped. k: [T, nkv, hd]
 * with strides (k_row, k_head, 1), v likewise with hdv. Returns 0, or -1 (nothing written) when a
 * slot is num_slots or beyond. */
int orca_store_kv(int dtype, const void *k, int64_t k_row, int64_t k_head, const void *v, int64_t v_row,
                  int64_t v_head, void *k_cache, void *v_cache, int64_t nkv, int64_t hd, int64_t hdv,
                  const int64_t *slots, int64_t T, int64_t num_slots) {
    for (int64_t t = 0; t < T; t++)
        if (slots[t] >= num_slots) return -1;
    const size_t elem = dtype == 0 ? sizeof(float) : sizeof(double);
    const char *kb = (const char *)k, *vb = (const char *)v;
    char *kc = (char *)k_cache, *vc = (char *)v_cache;
    for (int64_t t = 0; t < T; t++) {
        const int64_t s = slots[t];
        if (s < 0) continue;
        for (int64_t h = 0; h < nkv; h++) {
            memcpy(kc + ((s * nkv + h) * hd) * elem, kb + (t * k_row + h * k_head) * elem, hd * elem);
            memcpy(vc + ((s * nkv + h) * hdv) * elem, vb + (t * v_row + h * v_head) * elem, hdv * elem);
        }
    }
    return 0;
}

/* The whole of orca::attention for one layer in one call (what kernels/attention_cpu.attention
 * makes per layer, instead of three calls through ctypes): this iteration's K/V rows into their
 * slots (k, v: [T, nkv, hd] / [.., hdv] with row and head strides), then the one-token requests,
 * then the multi-token ones. Arguments as orca_store_kv and orca_decode_attention take them.
 * Returns 0; -1 when a scratch buffer could not be had; -2 (nothing written) when the metadata
 * points outside the tensors; -3 (nothing written) when a slot is num_blocks * bs or beyond. */
int64_t orca_attention(int dtype, const void *q, int64_t q_row, int64_t q_head, const void *k, int64_t k_row,
                       int64_t k_head, const void *v, int64_t v_row, int64_t v_head, const int64_t *slots,
                       void *k_cache, void *v_cache, int64_t bs, int64_t nkv, int64_t hd, int64_t hdv, int64_t nh,
                       const int64_t *qsl, const int64_t *seq_lens, const int64_t *block_tables, int64_t bt_stride,
                       int64_t num_reqs, double scale, int64_t window, double softcap, const double *sinks,
                       const double *alibi, void *out, int64_t out_row, int64_t out_head, int64_t num_rows,
                       int64_t bt_width, int64_t num_blocks, int num_threads) {
    if (bad_metadata(ANY_TOKENS, qsl, seq_lens, block_tables, bt_stride, num_reqs, bs, num_rows, bt_width,
                     num_blocks))
        return -2;
    if (orca_store_kv(dtype, k, k_row, k_head, v, v_row, v_head, k_cache, v_cache, nkv, hd, hdv, slots, num_rows,
                      num_blocks * bs))
        return -3;
    const job_t j = {q, q_row, q_head, k_cache, v_cache, bs, nkv, hd, hdv, nh, qsl, seq_lens, block_tables,
                     bt_stride, scale, softcap, sinks, alibi, window, out, out_row, out_head};
    const int64_t left = decode_run(&j, dtype, num_reqs, num_threads);
    return left <= 0 ? left : prefill_run(&j, dtype, num_reqs, num_threads);
}
