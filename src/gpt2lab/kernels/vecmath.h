/* Scalar and 16-wide helpers shared by decode.c and gelu.c: bfloat16 and float16 <-> float32 as
 * PyTorch converts, loads of each dtype as float32, e^x and GPT-2's tanh-approximated GELU.
 * dtype codes: 0 float32, 1 bfloat16, 3 float16 (2 is decode.c's int8 matrices). */
#ifndef GPT2LAB_VECMATH_H
#define GPT2LAB_VECMATH_H
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as PyTorch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#define DTYPE_F16 3

/* IEEE half precision: 1 sign, 5 exponent (bias 15) and 10 fraction bits */
static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, f = h & 0x3ffu, u;
    if (e == 0x1fu) { /* infinity or NaN (its payload kept) */
        u = sign | 0x7f800000u | (f << 13);
    } else if (e) {
        u = sign | ((e + 112u) << 23) | (f << 13);
    } else { /* zero or subnormal: f * 2^-24, exact in float32 */
        float v = (float)f * 5.9604644775390625e-8f;
        memcpy(&u, &v, 4);
        u |= sign;
    }
    float out;
    memcpy(&out, &u, 4);
    return out;
}

static inline uint16_t f32_to_f16(float v) { /* round to nearest even, as PyTorch does */
    uint32_t u;
    memcpy(&u, &v, 4);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00u; /* NaN, as PyTorch writes it */
    if (a >= 0x477ff000u) return sign | 0x7c00u; /* rounds past 65504: infinity */
    if (a < 0x38800000u) { /* below 2^-14: a subnormal or zero, in units of 2^-24 */
        float m;
        memcpy(&m, &a, 4);
        return sign | (uint16_t)nearbyintf(m * 16777216.0f); /* exact product, ties to even */
    }
    uint32_t r = a + 0xfffu + ((a >> 13) & 1u); /* round the 13 dropped bits to nearest even */
    return sign | (uint16_t)((r - 0x38000000u) >> 13);
}

static inline float load(const void *p, size_t i, int dtype) {
    if (dtype == DTYPE_F16) return f16_to_f32(((const uint16_t *)p)[i]);
    return dtype ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store(void *p, size_t i, float v, int dtype) {
    if (dtype == DTYPE_F16)
        ((uint16_t *)p)[i] = f32_to_f16(v);
    else if (dtype)
        ((uint16_t *)p)[i] = f32_to_bf16(v);
    else
        ((float *)p)[i] = v;
}

/* n values of a dtype from p + at into float32 out, and back: whole rows (a table's, a LayerNorm's,
   the cache's), with the dtype chosen once for the loop rather than per value as load() does,
   so that each loop vectorises */
static inline void load_row(const void *p, size_t at, int n, int dtype, float *out) {
    const uint16_t *h = (const uint16_t *)p + at;
    if (dtype == DTYPE_F16)
        for (int i = 0; i < n; i++) out[i] = f16_to_f32(h[i]);
    else if (dtype)
        for (int i = 0; i < n; i++) out[i] = bf16_to_f32(h[i]);
    else
        memcpy(out, (const float *)p + at, (size_t)n * sizeof(float));
}

static inline void store_row(void *p, size_t at, const float *x, int n, int dtype) {
    uint16_t *h = (uint16_t *)p + at;
    if (dtype == DTYPE_F16)
        for (int i = 0; i < n; i++) h[i] = f32_to_f16(x[i]);
    else if (dtype)
        for (int i = 0; i < n; i++) h[i] = f32_to_bf16(x[i]);
    else
        memcpy((float *)p + at, x, (size_t)n * sizeof(float));
}

#ifdef __AVX512F__
static inline __m512 load16(const void *W, size_t i, int dtype) {
    if (dtype == DTYPE_F16)
        return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)W + i)));
    if (dtype) { /* bfloat16 is float32's upper half: widen and shift */
        __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)W + i));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_loadu_ps((const float *)W + i);
}
#endif

/* GPT-2's GELU, 0.5 v (1 + tanh(z)) with z = sqrt(2/pi) (v + 0.044715 v^3), written as
   v sigmoid(2z): the same function, one e^x, and no 1 + tanh(z) cancelling to nothing for v << 0 */
#define GELU_C 0.7978845608028654f /* sqrt(2 / pi) */
#define GELU_A 0.044715f

/* sigmoid(2z) */
static inline float gelu_sigmoid(float v) { return 1.0f / (1.0f + expf(-2.0f * GELU_C * (v + GELU_A * v * v * v))); }

static inline float gelu(float v) { return v * gelu_sigmoid(v); }

/* d gelu / dv = s + v s (1 - s) 2c (1 + 3a v^2), s = sigmoid(2z) */
static inline float gelu_grad(float v) {
    float s = gelu_sigmoid(v);
    return s + v * s * (1.0f - s) * 2.0f * GELU_C * (1.0f + 3.0f * GELU_A * v * v);
}

#ifdef __AVX512F__
/* e^x for 16 floats: 2^(x log2 e) split into 2^n (scalef) times 2^f, |f| <= 1/2, by its Taylor
   series to degree 7 (relative error ~1e-8); x is clamped to [-104, 89], beyond which e^x is 0
   or overflows to infinity in float32 anyway (the clamp keeps infinities from making NaNs) */
static inline __m512 exp16(__m512 x) {
    static const float c[8] = {1.0f, 0.6931471806f, 0.2402265070f, 0.0555041087f, 0.0096181291f,
                               0.0013333558f, 0.0001540353f, 0.0000152527f};
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(89.0f));
    __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950409f));
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(t, n), p = _mm512_set1_ps(c[7]);
    for (int k = 6; k >= 0; k--) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c[k]));
    return _mm512_scalef_ps(p, n);
}

/* sigmoid(2z) for 16 floats v */
static inline __m512 gelu_sigmoid16(__m512 v) {
    __m512 v3 = _mm512_mul_ps(_mm512_mul_ps(v, v), v);
    __m512 z2 = _mm512_mul_ps(_mm512_set1_ps(-2.0f * GELU_C), _mm512_fmadd_ps(_mm512_set1_ps(GELU_A), v3, v));
    return _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(z2)));
}

static inline __m512 gelu16(__m512 v) { return _mm512_mul_ps(v, gelu_sigmoid16(v)); }

static inline __m512 gelu_grad16(__m512 v) {
    __m512 s = gelu_sigmoid16(v), one = _mm512_set1_ps(1.0f);
    __m512 dz = _mm512_fmadd_ps(_mm512_set1_ps(3.0f * GELU_A), _mm512_mul_ps(v, v), one); /* 1 + 3a v^2 */
    __m512 t = _mm512_mul_ps(_mm512_mul_ps(v, s), _mm512_sub_ps(one, s));                 /* v s (1 - s) */
    return _mm512_fmadd_ps(_mm512_mul_ps(t, _mm512_set1_ps(2.0f * GELU_C)), dz, s);
}

/* 16 floats stored as float32, or as bfloat16 or float16 rounded to nearest even (NaN kept a
   NaN), as PyTorch converts */
static inline void store16(void *p, size_t i, __m512 v, int dtype) {
    if (!dtype) {
        _mm512_storeu_ps((float *)p + i, v);
        return;
    }
    if (dtype == DTYPE_F16) {
        _mm256_storeu_si256((__m256i *)((uint16_t *)p + i), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        return;
    }
    __m512i u = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd));
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
    _mm256_storeu_si256((__m256i *)((uint16_t *)p + i), _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
}
#endif

#endif
