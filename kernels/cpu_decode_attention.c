/* Paged decode attention for the CPU: every one-token request of the iteration, attended in place
 * over its blocks of the paged KV cache (no gathered copy of its context).
 *
 * Built and loaded by kernels/attention_cpu.py (the system C compiler, ctypes; no torch headers).
 * Semantics are those of orca::attention (orca_compile/ops.py) restricted to requests with one new
 * token: the query sits at position L-1 of a context of L = seq_lens[r] tokens and sees keys
 * max(0, L - window) .. L-1; scores are scale * q.k, then softcap * tanh(s / softcap) if softcap > 0.
 * Multi-token requests are skipped (the caller attends them).
 *
 * Work items are a request and a slice of its KV heads (the whole request when there are enough
 * requests for the threads), so the query heads of a GQA group read each key and value row once.
 * Two passes per item: scores of the whole context into a scratch row per head, then softmax and
 * the weighted sum of V rows. The scores are taken four heads at a time, one vector accumulator
 * each: a single head's dot product is a chain of dependent FMAs that left the kernel at ~30 GB/s
 * of K/V on W1's decodes; four chains side by side reach the DRAM bandwidth (~36 GB/s).
 *
 * Also here: orca_store_kv, this iteration's K/V rows into their cache slots.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_simd.h"

typedef struct {
    const void *q; int64_t q_row, q_head;           /* strides in elements */
    const void *k_cache, *v_cache;                  /* [num_blocks, bs, nkv, hd] / [.., hdv], contiguous */
    int64_t bs, nkv, hd, hdv, nh;
    const int64_t *qsl, *seq_lens, *block_tables;   /* [R + 1], [R], [R, bt_stride] */
    int64_t bt_stride;
    double scale, softcap;
    int64_t window;
    void *out; int64_t out_row, out_head;
} job_t;

/* one item: request r, KV heads [h0, h1); scores: (h1 - h0) * group x max_len, acc: same x hdv.
 * Positions outer, heads inner: each position's K (then V) row is read front to back, once.
 * VEC is a vector of LANES elements of T; heads whose size is not a multiple of LANES take the
 * scalar (compiler-vectorised) dot product. */
#define DEFINE_ITEM(NAME, T, VEC, LANES, LOADV, EXP, TANH)                                           \
static void NAME(const job_t *j, int64_t r, int64_t h0, int64_t h1, T *scores, T *acc) {           \
    const int64_t group = j->nh / j->nkv, heads = (h1 - h0) * group;                                \
    const T *q = (const T *)j->q, *kc = (const T *)j->k_cache, *vc = (const T *)j->v_cache;         \
    T *out = (T *)j->out;                                                                           \
    const int64_t k_slot = j->nkv * j->hd, v_slot = j->nkv * j->hdv;                                \
    const T scale = (T)j->scale, softcap = (T)j->softcap;                                           \
    const int64_t row = j->qsl[r], len = j->seq_lens[r];                                            \
    const int64_t start = (j->window > 0 && len > j->window) ? len - j->window : 0;                 \
    const int64_t *table = j->block_tables + r * j->bt_stride;                                      \
    const int64_t n = len - start;                                                                  \
    const int vec = j->hd % LANES == 0;                                                             \
    for (int64_t p = start; p < len; p++) {                                                         \
        const T *kslot = kc + (table[p / j->bs] * j->bs + p % j->bs) * k_slot;                      \
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
                s *= scale;                                                                         \
                if (softcap > 0) s = softcap * TANH(s / softcap);                                   \
                scores[(i + u) * n + (p - start)] = s;                                              \
            }                                                                                       \
        }                                                                                           \
        for (; i < heads; i++) {                                                                    \
            const T *qh = q + row * j->q_row + (h0 * group + i) * j->q_head;                        \
            const T *krow = kslot + (h0 + i / group) * j->hd;                                       \
            T s = 0;                                                                                \
            _Pragma("omp simd reduction(+:s)")                                                      \
            for (int64_t d = 0; d < j->hd; d++) s += qh[d] * krow[d];                               \
            s *= scale;                                                                             \
            if (softcap > 0) s = softcap * TANH(s / softcap);                                       \
            scores[i * n + (p - start)] = s;                                                        \
        }                                                                                           \
    }                                                                                               \
    for (int64_t i = 0; i < heads; i++) {                                                           \
        T *sg = scores + i * n, m = -INFINITY, sum = 0;                                             \
        for (int64_t t = 0; t < n; t++) m = sg[t] > m ? sg[t] : m;                                  \
        for (int64_t t = 0; t < n; t++) { sg[t] = EXP(sg[t] - m); sum += sg[t]; }                   \
        T inv = n > 0 ? (T)1 / sum : 0;                                                             \
        for (int64_t t = 0; t < n; t++) sg[t] *= inv;                                               \
    }                                                                                               \
    memset(acc, 0, sizeof(T) * (size_t)(heads * j->hdv));                                           \
    for (int64_t p = start; p < len; p++) {                                                         \
        const T *vslot = vc + (table[p / j->bs] * j->bs + p % j->bs) * v_slot;                      \
        for (int64_t i = 0; i < heads; i++) {                                                       \
            const T *vrow = vslot + (h0 + i / group) * j->hdv;                                      \
            const T w = scores[i * n + (p - start)];                                                \
            T *a = acc + i * j->hdv;                                                                \
            _Pragma("omp simd")                                                                     \
            for (int64_t d = 0; d < j->hdv; d++) a[d] += w * vrow[d];                               \
        }                                                                                           \
    }                                                                                               \
    for (int64_t i = 0; i < heads; i++)                                                             \
        memcpy(out + row * j->out_row + (h0 * group + i) * j->out_head, acc + i * j->hdv,           \
               sizeof(T) * (size_t)j->hdv);                                                         \
}

DEFINE_ITEM(item_f32, float, v8f, 8, load_f32, expf, tanhf)
DEFINE_ITEM(item_f64, double, v4d, 4, load_f64, exp, tanh)

/* dtype: 0 float32, 1 float64. Returns the number of requests it left to the caller (those with
 * more than one token this iteration: prefills), -1 when a scratch buffer could not be had, or -2
 * (nothing written) when the metadata points outside the tensors: query_start_loc not rising
 * within [0, num_rows], a one-token request's context longer than its block-table row
 * (bt_width blocks), or one of its block ids outside [0, num_blocks).
 * Parallel over the items with OpenMP. Built with -fopenmp, this library needs
 * libgomp.so.1, which the loader resolves to the copy torch has loaded already: one thread pool
 * for torch's ops and this kernel (a second pool would spin against torch's on the same cores). */
int64_t orca_decode_attention(int dtype, const void *q, int64_t q_row, int64_t q_head,
                              const void *k_cache, const void *v_cache, int64_t bs, int64_t nkv, int64_t hd,
                              int64_t hdv, int64_t nh, const int64_t *qsl, const int64_t *seq_lens,
                              const int64_t *block_tables, int64_t bt_stride, int64_t num_reqs, double scale,
                              int64_t window, double softcap, void *out, int64_t out_row, int64_t out_head,
                              int64_t num_rows, int64_t bt_width, int64_t num_blocks, int num_threads) {
    if (num_reqs > 0 && qsl[0] < 0) return -2;
    for (int64_t r = 0; r < num_reqs; r++) {
        if (qsl[r + 1] < qsl[r] || qsl[r + 1] > num_rows) return -2;
        if (qsl[r + 1] - qsl[r] != 1) continue;
        const int64_t len = seq_lens[r], used = (len + bs - 1) / bs;
        if (len < 1 || used > bt_width) return -2;
        for (int64_t b = 0; b < used; b++) {
            const int64_t id = block_tables[r * bt_stride + b];
            if (id < 0 || id >= num_blocks) return -2;
        }
    }
    const job_t j = {q, q_row, q_head, k_cache, v_cache, bs, nkv, hd, hdv, nh, qsl, seq_lens, block_tables,
                     bt_stride, scale, softcap, window, out, out_row, out_head};
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
        void *scores = malloc(elem * (size_t)(per * group * max_len));
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
