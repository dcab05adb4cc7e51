/* Vector helpers shared by the C kernels (cpu_gemm.c, cpu_attention.c, cpu_norm.c): 256-bit vectors
 * through GCC/Clang vector extensions (so any target builds; with -march=native on AVX2/FMA
 * `acc += x * w` is one vfmadd on a ymm register), a vectorised exp, and IN_REGISTER. Intrinsics
 * only for the 16-bit conversions, under the target macros that have them, with the vector
 * extensions as the fallback.
 * kernels/cbuild.py hashes this header with each source, so editing it rebuilds both. */
#ifndef ORCA_CPU_SIMD_H
#define ORCA_CPU_SIMD_H

#include <stdint.h>
#if defined(__AVX512F__) || defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

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

/* 16-bit floats, widened to float32 as they are loaded and rounded to nearest even as they are
 * stored. bfloat16 is the top half of a float32: zero-extend and shift; the store rounds as
 * c10::BFloat16 does (a NaN becomes 0x7FC0). float16 goes through _Float16 (F16C's vcvtph2ps /
 * vcvtps2ph with -march=native on x86); where the compiler lacks _Float16, HAVE_F16 is 0 and the
 * kernels take no float16. */
typedef uint16_t v8u16 __attribute__((vector_size(16), aligned(2), may_alias));
typedef uint32_t v8u32 __attribute__((vector_size(32)));
/* The widening loads use intrinsics where the target has the instruction: GCC 12.2 with
 * -march=native on an AVX-512 Xeon split the 512-bit __builtin_convertvector into two 256-bit
 * halves and three shuffles (port 5, which also holds the second 512-bit FMA unit), and with
 * AVX512-FP16 widened float16 one element at a time (vcvtsh2ss): the decode GEMM on 16-bit
 * weights was bound by those instructions, not by DRAM (docs/benchmarks.md, session 16). Same
 * values bit for bit: a zero-extension and a shift, or the exact float16 -> float32 conversion. */
static inline v8f load_bf16(const uint16_t *p) {
#if defined(__AVX2__)
    return (v8f)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16);
#else
    return (v8f)(__builtin_convertvector(*(const v8u16 *)p, v8u32) << 16);
#endif
}
static inline void store_bf16(uint16_t *p, v8f v) {
    const v8u32 u = (v8u32)v;
    const v8u32 rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const v8u32 nan = (v8u32)(v != v);
    *(v8u16 *)p = __builtin_convertvector((nan & 0x7FC0u) | (~nan & rounded), v8u16);
}
#ifdef __FLT16_MAX__
#define HAVE_F16 1
typedef _Float16 v8h __attribute__((vector_size(16), aligned(2), may_alias));
static inline v8f load_f16(const uint16_t *p) {
#if defined(__F16C__)
    return (v8f)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
#else
    return __builtin_convertvector(*(const v8h *)p, v8f);
#endif
}
static inline void store_f16(uint16_t *p, v8f v) {
#if defined(__F16C__)
    _mm_storeu_si128((__m128i *)p, _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
    *(v8h *)p = __builtin_convertvector(v, v8h);
#endif
}
#else
#define HAVE_F16 0
#endif

/* 512-bit vectors where the target has AVX-512 (-march=native on such a CPU): the C GEMM's float32
 * kernels then hold a line of 16 weights in one register and issue half the FMAs (cpu_gemm.c). */
#if defined(__AVX512F__)
#define HAVE_V16 1
typedef float v16f __attribute__((vector_size(64)));
typedef float v16f_u __attribute__((vector_size(64), aligned(4), may_alias));
static inline v16f load16_f32(const float *p) { return *(const v16f_u *)p; }
static inline void store16_f32(float *p, v16f v) { *(v16f_u *)p = v; }
static inline v16f splat16_f32(float s) { return (v16f){s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s}; }
static inline v16f load16_bf16(const uint16_t *p) {
    return (v16f)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
}
#if HAVE_F16
static inline v16f load16_f16(const uint16_t *p) {
    return (v16f)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}
#endif
#else
#define HAVE_V16 0
#endif

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

/* Keeps a vector in a register: an empty asm that claims to change it. Without it GCC folds the
 * line of W into each FMA as a memory operand when R <= 4, so every k re-reads it R times and the
 * loads, not the FMAs, set the pace (2 loads a cycle on Zen 4: R = 4 ran at half its FMA rate). */
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && defined(__AVX__)
#define IN_REGISTER(v) __asm__("" : "+x"(v))
#else
#define IN_REGISTER(v) ((void)0)
#endif

#endif
