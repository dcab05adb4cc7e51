/* Rotary position embedding (HF's rotate_half form) in one pass, float32 and float64:
 *
 *     y = x * cos + rotate_half(x) * sin,   rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])
 *
 * so that, with h = D/2,  y[d] = x[d] * cos[d] - x[d + h] * sin[d]  and
 *                         y[d + h] = x[d + h] * cos[d + h] + x[d] * sin[d + h].
 * As ATen ops that is seven per tensor (two slices, neg, cat, two muls, add) with three
 * temporaries the size of x; here it is one call that reads x once and writes y once.
 *
 * x: [H, T, D] with strides (sxh, sxt, 1) (a view of the q/k projection's [T, H * D] output, as
 * the graph has it); cos, sin: [T, D] rows with strides sct, sst; y: [H, T, D] with strides
 * (syh, syt, 1), which the caller makes x's (the layout ATen's add would give it). Each element is the sum of two rounded products, as in ATen
 * (the compiler may fuse one product into the add: a rounding step apart at most).
 */
#include <stdint.h>

#define DEFINE_ROPE(S, T_)                                                                          \
static void rope_##S(const T_ *x, int64_t H, int64_t T, int64_t D, int64_t sxh, int64_t sxt,         \
                     const T_ *cos, int64_t sct, const T_ *sin, int64_t sst, T_ *y, int64_t syh,     \
                     int64_t syt) {                                                                 \
    const int64_t h = D / 2;                                                                        \
    for (int64_t a = 0; a < H; a++)                                                                 \
        for (int64_t t = 0; t < T; t++) {                                                           \
            const T_ *restrict xr = x + a * sxh + t * sxt;                                          \
            const T_ *restrict c = cos + t * sct, *restrict s = sin + t * sst;                      \
            T_ *restrict o = y + a * syh + t * syt;                                                 \
            for (int64_t d = 0; d < h; d++) o[d] = xr[d] * c[d] - xr[d + h] * s[d];                 \
            for (int64_t d = 0; d < h; d++) o[d + h] = xr[d + h] * c[d + h] + xr[d] * s[d + h];     \
        }                                                                                           \
}

DEFINE_ROPE(f32, float)
DEFINE_ROPE(f64, double)

/* dtype: 0 float32, 1 float64. D even. Returns 0, or -1 for an unknown dtype or an odd D. */
int orca_rope(int dtype, const void *x, int64_t H, int64_t T, int64_t D, int64_t sxh, int64_t sxt,
              const void *cos, int64_t sct, const void *sin, int64_t sst, void *y, int64_t syh, int64_t syt) {
    if ((dtype != 0 && dtype != 1) || D % 2) return -1;
    if (dtype == 0)
        rope_f32((const float *)x, H, T, D, sxh, sxt, (const float *)cos, sct, (const float *)sin, sst, (float *)y,
                 syh, syt);
    else
        rope_f64((const double *)x, H, T, D, sxh, sxt, (const double *)cos, sct, (const double *)sin, sst,
                 (double *)y, syh, syt);
    return 0;
}
