/* One GPT-2 decoding step, in C: what `gpt2lab.kernels.cpu_decode.DecodeStep` computes with
 * PyTorch operations, written as plain loops so that a token costs one call. A step feeds one new
 * token to each of a few sequences (rows), which may be left-padded (each row then has its own
 * positions and a mask of the cache columns it attends to); each weight is read from memory once
 * a step, whatever the number of rows.
 *
 * Decoding one token multiplies a single row by every weight matrix, so its speed is the speed at
 * which the weights stream from memory. A matrix-vector product that reads each weight once, in
 * order, with the activations in registers, streams near the memory's bandwidth; PyTorch's
 * products for one row reach about two thirds of it on the CPUs we measured, and each of the ~170
 * operations of a step costs a few microseconds of dispatch. Here a step is: for each layer,
 * LayerNorm, the q/k/v product, the new key and value written into the cache, attention over the
 * cached keys, the output product plus the residual, LayerNorm, the MLP's two products (GELU and
 * the residual fused into them); then the final LayerNorm and the head.
 *
 * Weights are float32, bfloat16 or float16 (dtype 0, 1 or 3), exactly the model's tensors (row-major
 * (out, in), as nn.Linear stores them), or for the matrices of a `gpt2lab.quantize` model int8
 * values with one float32 scale per row (wdtype 2). An int8 product rounds its input to int8
 * with one scale (max|x| / 127), sums the 8-bit products exactly in int32 (the CPU's VNNI
 * instruction where it has one) and scales the sums: what Int8Linear's plain CPU path computes
 * with torch._int_mm (one scale per input row). Other activations and sums are float32; the KV
 * cache has the float weights' dtype, laid out as gpt2lab.model.KVCache (see Step). Built by
 * gpt2lab.kernels.native with the C compiler of the machine (-O3 -march=native -fopenmp); tested
 * equal to the model's forward in tests/kernels/test_native_decode.py.
 */
#include "vecmath.h"
#ifdef _OPENMP
#include <omp.h>
#endif

typedef struct {
    int n_layer, n_head, head_size, n_embd, vocab, max_len, dtype, threads;
    int wdtype; /* the matrices': as dtype (0 float32, 1 bfloat16, 3 float16), or 2: int8 with row scales */
    float eps;
    /* per layer: arrays of n_layer pointers (a bias or LayerNorm shift may be NULL) */
    const void **ln1_w, **ln1_b, **attn_w, **attn_b, **proj_w, **proj_b;
    const void **ln2_w, **ln2_b, **fc_w, **fc_b, **fcp_w, **fcp_b;
    const void *lnf_w, *lnf_b, *wte, *wpe, *head_w;
    void *k_cache, *v_cache; /* of the float weights' dtype, laid out as Step says */
    float *work;             /* scratch: gpt2lab_work_floats(n_embd, n_head, max_len, rows) */
    /* int8 matrices: one float32 scale per row (W ~ values * scale[row]); NULL otherwise */
    const void **attn_s, **proj_s, **fc_s, **fcp_s;
    const void *head_s, *wte_s;
    /* int8 matrices: each row's sum of values, int32 (for the unsigned-input VNNI products) */
    const void **attn_r, **proj_r, **fc_r, **fcp_r;
    const void *head_r;
} Model;

/* One step of `rows` sequences, one new token each (what changes from call to call). The cache is
   (n_layer, rows, n_head, max_len, head_size), its layers and rows `layer_stride` and `row_stride`
   elements apart (the first rows of a larger cache, say); each row's heads are contiguous. */
typedef struct {
    int rows, pos;              /* pos: the column every row's new key and value go to */
    int64_t layer_stride, row_stride;
    const int64_t *ids;         /* rows token ids */
    const int64_t *positions;   /* rows positions (left padding), or NULL: pos for every row */
    const uint8_t *mask;        /* rows x mask_stride: the columns [0, pos] a row attends to, or
                                   NULL: all of them */
    int64_t mask_stride;
} Step;

/* ---- the matrix-vector product: y[n - n0] = W[n, :] . x for rows n in [n0, n1) --------------- */

/* dot(q, row) and o += p * row over a head's n values (a key or value row of the cache) */
static float dot_head(const void *cache, size_t at, const float *q, int n, int dtype) {
    int i = 0;
    float s = 0.0f;
#ifdef __AVX512F__
    __m512 a = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) a = _mm512_fmadd_ps(load16(cache, at + i, dtype), _mm512_loadu_ps(q + i), a);
    s = _mm512_reduce_add_ps(a);
#endif
    for (; i < n; i++) s += q[i] * load(cache, at + i, dtype);
    return s;
}

static void add_scaled(float *o, float p, const void *cache, size_t at, int n, int dtype) {
    int i = 0;
#ifdef __AVX512F__
    __m512 pv = _mm512_set1_ps(p);
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(o + i, _mm512_fmadd_ps(pv, load16(cache, at + i, dtype), _mm512_loadu_ps(o + i)));
#endif
    for (; i < n; i++) o[i] += p * load(cache, at + i, dtype);
}

static float dot_row(const void *W, size_t row, const float *x, int K, int dtype) {
    size_t base = row * (size_t)K;
    int k = 0;
    float s = 0.0f;
#ifdef __AVX512F__
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; k + 64 <= K; k += 64) {
        a0 = _mm512_fmadd_ps(load16(W, base + k, dtype), _mm512_loadu_ps(x + k), a0);
        a1 = _mm512_fmadd_ps(load16(W, base + k + 16, dtype), _mm512_loadu_ps(x + k + 16), a1);
        a2 = _mm512_fmadd_ps(load16(W, base + k + 32, dtype), _mm512_loadu_ps(x + k + 32), a2);
        a3 = _mm512_fmadd_ps(load16(W, base + k + 48, dtype), _mm512_loadu_ps(x + k + 48), a3);
    }
    for (; k + 16 <= K; k += 16) a0 = _mm512_fmadd_ps(load16(W, base + k, dtype), _mm512_loadu_ps(x + k), a0);
    s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#endif
    for (; k < K; k++) s += load(W, base + k, dtype) * x[k];
    return s;
}

/* int8: x rounded to int8 with one scale, as Int8Linear's plain path does (s = max|x| / 127,
   q = round(x / s), ties to even), stored as q + 128 (unsigned) for VNNI, which multiplies
   unsigned by signed bytes; returns s */
static float quantize_input(const float *x, int K, uint8_t *xu) {
    float top = 0.0f;
    int k = 0;
#ifdef __AVX512F__
    __m512 t = _mm512_setzero_ps();
    for (; k + 16 <= K; k += 16) t = _mm512_max_ps(t, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
    top = _mm512_reduce_max_ps(t);
#endif
    for (; k < K; k++) top = fmaxf(top, fabsf(x[k]));
    float s = fmaxf(top, 1e-30f) / 127.0f;
    k = 0;
#ifdef __AVX512F__
    const __m512 sv = _mm512_set1_ps(s);
    const __m512i off = _mm512_set1_epi32(128);
    for (; k + 16 <= K; k += 16) { /* the same division and ties-to-even rounding, 16 at a time */
        __m512 q = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(x + k), sv),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128((__m128i *)(xu + k), _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_cvtps_epi32(q), off)));
    }
#endif
    for (; k < K; k++) xu[k] = (uint8_t)((int)nearbyintf(x[k] / s) + 128);
    return s;
}

#ifdef __AVX512VNNI__
/* the sums of four vectors' 16 lanes each, as one vector (a's sum first): three rounds of
   pairwise adds, instead of four reductions of their own */
static inline __m128i sum4_epi32(__m512i a, __m512i b, __m512i c, __m512i d) {
    __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
    __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
    __m512i abcd = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
    __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(abcd), _mm512_extracti64x4_epi64(abcd, 1));
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

/* a row's products with q (as q + 128) over its first K bytes, K a multiple of 64: 16 partial
   sums */
static inline __m512i row_dpbusd(const int8_t *r, const uint8_t *xu, int K) {
    __m512i a0 = _mm512_setzero_si512(), a1 = a0;
    int k = 0;
    for (; k + 128 <= K; k += 128) { /* 64 products per instruction, one cache line */
        a0 = _mm512_dpbusd_epi32(a0, _mm512_loadu_si512(xu + k), _mm512_loadu_si512(r + k));
        a1 = _mm512_dpbusd_epi32(a1, _mm512_loadu_si512(xu + k + 64), _mm512_loadu_si512(r + k + 64));
    }
    if (k < K) a0 = _mm512_dpbusd_epi32(a0, _mm512_loadu_si512(xu + k), _mm512_loadu_si512(r + k));
    return _mm512_add_epi32(a0, a1);
}
#endif

/* y[n - n0] = W[n, :] . q exactly, for int8 rows W and the input q (given as q + 128): the sum
   of (q + 128) w, less 128 times the row's sum. Rows are read one after another (one stream
   from memory); with VNNI four rows' partial sums are reduced together. */
static void rows_product_int8(const int8_t *W, const int32_t *rowsum, const uint8_t *xu, int K,
                              int n0, int n1, float *y) {
    int n = n0;
#ifdef __AVX512VNNI__
    for (; K % 64 == 0 && n + 4 <= n1; n += 4) {
        const int8_t *r = W + (size_t)n * K;
        __m512i s0 = row_dpbusd(r, xu, K), s1 = row_dpbusd(r + K, xu, K);
        __m512i s2 = row_dpbusd(r + 2 * (size_t)K, xu, K), s3 = row_dpbusd(r + 3 * (size_t)K, xu, K);
        __m128i sums = sum4_epi32(s0, s1, s2, s3);
        sums = _mm_sub_epi32(sums, _mm_slli_epi32(_mm_loadu_si128((const __m128i *)(rowsum + n)), 7));
        _mm_storeu_ps(y + (n - n0), _mm_cvtepi32_ps(sums));
    }
#endif
    for (; n < n1; n++) { /* the rest one at a time; past the last 64-byte block, plain */
        const int8_t *r = W + (size_t)n * K;
        int32_t acc = 0;
        int k = 0;
#ifdef __AVX512VNNI__
        k = K / 64 * 64;
        acc = _mm512_reduce_add_epi32(row_dpbusd(r, xu, k));
#endif
        for (; k < K; k++) acc += (int32_t)xu[k] * r[k];
        y[n - n0] = (float)(acc - 128 * rowsum[n]);
    }
}

static void rows_product(const void *W, const float *x, int K, int n0, int n1, float *y, int dtype) {
    for (int n = n0; n < n1; n++) y[n - n0] = dot_row(W, (size_t)n, x, K, dtype);
}

#ifdef __AVX512F__
/* the same for 4 inputs at once (x: 4 x K, y: 4 x ystride): each 16 weights loaded once feed
   four products */
static void rows_product_x4(const void *W, const float *x, int K, int n0, int n1, float *y,
                            int ystride, int dtype) {
    for (int n = n0; n < n1; n++) {
        size_t base = (size_t)n * K;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        int k = 0;
        for (; k + 16 <= K; k += 16) {
            __m512 w = load16(W, base + k, dtype);
            a0 = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + k), a0);
            a1 = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + K + k), a1);
            a2 = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + 2 * K + k), a2);
            a3 = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + 3 * K + k), a3);
        }
        float s0 = _mm512_reduce_add_ps(a0), s1 = _mm512_reduce_add_ps(a1);
        float s2 = _mm512_reduce_add_ps(a2), s3 = _mm512_reduce_add_ps(a3);
        for (; k < K; k++) {
            float w = load(W, base + k, dtype);
            s0 += w * x[k], s1 += w * x[K + k], s2 += w * x[2 * K + k], s3 += w * x[3 * K + k];
        }
        y[n - n0] = s0, y[ystride + n - n0] = s1, y[2 * ystride + n - n0] = s2, y[3 * ystride + n - n0] = s3;
    }
}
#endif

enum { PLAIN = 0, GELU = 1, ADD = 2 };

#ifdef __AVX512BF16__
/* bfloat16 weights times x rounded to bfloat16 (as PyTorch's bfloat16 products round their
   input), with the CPU's bfloat16 dot-product instruction: 32 weights, one cache line, each */
static void rows_product_dpbf16(const uint16_t *W, const uint16_t *xb, int K, int n0, int n1, float *y) {
    for (int n = n0; n < n1; n++) { /* one row after another: the matrix is read as one stream */
        const uint16_t *r = W + (size_t)n * K;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0;
        int k = 0;
        for (; k + 64 <= K; k += 64) {
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(r + k), (__m512bh)_mm512_loadu_si512(xb + k));
            a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(r + k + 32), (__m512bh)_mm512_loadu_si512(xb + k + 32));
        }
        for (; k < K; k += 32)
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(r + k), (__m512bh)_mm512_loadu_si512(xb + k));
        y[n - n0] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    }
}

/* the same for 4 inputs at once (xb: 4 x K, y: 4 x ystride): each 32 weights loaded once feed
   four products, so a block of rows costs one pass for 4 inputs, not four */
static void rows_product_dpbf16_x4(const uint16_t *W, const uint16_t *xb, int K, int n0, int n1,
                                   float *y, int ystride) {
    for (int n = n0; n < n1; n++) {
        const uint16_t *r = W + (size_t)n * K;
        /* two sums per input (even and odd 32-weight chunks): chains half as long */
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        int k = 0;
        for (; k + 64 <= K; k += 64) {
            __m512bh w = (__m512bh)_mm512_loadu_si512(r + k), v = (__m512bh)_mm512_loadu_si512(r + k + 32);
            a0 = _mm512_dpbf16_ps(a0, w, (__m512bh)_mm512_loadu_si512(xb + k));
            a1 = _mm512_dpbf16_ps(a1, w, (__m512bh)_mm512_loadu_si512(xb + K + k));
            a2 = _mm512_dpbf16_ps(a2, w, (__m512bh)_mm512_loadu_si512(xb + 2 * K + k));
            a3 = _mm512_dpbf16_ps(a3, w, (__m512bh)_mm512_loadu_si512(xb + 3 * K + k));
            b0 = _mm512_dpbf16_ps(b0, v, (__m512bh)_mm512_loadu_si512(xb + k + 32));
            b1 = _mm512_dpbf16_ps(b1, v, (__m512bh)_mm512_loadu_si512(xb + K + k + 32));
            b2 = _mm512_dpbf16_ps(b2, v, (__m512bh)_mm512_loadu_si512(xb + 2 * K + k + 32));
            b3 = _mm512_dpbf16_ps(b3, v, (__m512bh)_mm512_loadu_si512(xb + 3 * K + k + 32));
        }
        for (; k < K; k += 32) {
            __m512bh w = (__m512bh)_mm512_loadu_si512(r + k);
            a0 = _mm512_dpbf16_ps(a0, w, (__m512bh)_mm512_loadu_si512(xb + k));
            a1 = _mm512_dpbf16_ps(a1, w, (__m512bh)_mm512_loadu_si512(xb + K + k));
            a2 = _mm512_dpbf16_ps(a2, w, (__m512bh)_mm512_loadu_si512(xb + 2 * K + k));
            a3 = _mm512_dpbf16_ps(a3, w, (__m512bh)_mm512_loadu_si512(xb + 3 * K + k));
        }
        y[n - n0] = _mm512_reduce_add_ps(_mm512_add_ps(a0, b0));
        y[ystride + n - n0] = _mm512_reduce_add_ps(_mm512_add_ps(a1, b1));
        y[2 * ystride + n - n0] = _mm512_reduce_add_ps(_mm512_add_ps(a2, b2));
        y[3 * ystride + n - n0] = _mm512_reduce_add_ps(_mm512_add_ps(a3, b3));
    }
}
#endif

/* A linear layer's inputs, each row in the form its weights' products read: float32 (x), rounded
   to bfloat16 (xb, for vdpbf16ps) or to int8 with one scale a row (xu as q + 128, xs) */
typedef struct {
    const float *x;
    const uint16_t *xb;
    const uint8_t *xu;
    const float *xs;
    int K, dp;
} Inputs;

/* out[j][n - n0] = W[n, :] . input (r + j) for W's rows [n0, n1); returns how many inputs it
   took: four at once where it can (float weights: each weight loaded once feeds four products,
   so a block of W costs one pass for four rows, not four), else one */
static int products(const void *W, const void *S, const void *R, const Inputs *in, int r, int rows,
                    int n0, int n1, float out[4][64], int wdtype) {
    const int K = in->K;
#ifdef __AVX512BF16__
    if (in->dp && r + 4 <= rows) {
        rows_product_dpbf16_x4((const uint16_t *)W, in->xb + (size_t)r * K, K, n0, n1, out[0], 64);
        return 4;
    }
    if (in->dp) {
        rows_product_dpbf16((const uint16_t *)W, in->xb + (size_t)r * K, K, n0, n1, out[0]);
        return 1;
    }
#endif
#ifdef __AVX512F__
    if (wdtype != 2 && r + 4 <= rows) {
        rows_product_x4(W, in->x + (size_t)r * K, K, n0, n1, out[0], 64, wdtype);
        return 4;
    }
#endif
    if (wdtype == 2) {
        rows_product_int8((const int8_t *)W, (const int32_t *)R, in->xu + (size_t)r * K, K, n0, n1, out[0]);
        for (int n = n0; n < n1; n++) out[0][n - n0] *= in->xs[r] * ((const float *)S)[n];
    } else {
        rows_product(W, in->x + (size_t)r * K, K, n0, n1, out[0], wdtype);
    }
    return 1;
}

/* y[n] = v[n - n0] + b[n] for n in [n0, n1), then GELU (GELU) or y[n] += it (ADD: y is the
   residual stream) */
static void finish(const float *v, const void *b, int n0, int n1, float *y, int epilogue, int dtype) {
    int n = n0;
#ifdef __AVX512F__
    for (; n + 16 <= n1; n += 16) { /* the scalar loop's arithmetic, 16 at a time */
        __m512 t = _mm512_loadu_ps(v + (n - n0));
        if (b) t = _mm512_add_ps(t, load16(b, n, dtype));
        if (epilogue == GELU) t = gelu16(t);
        if (epilogue == ADD) t = _mm512_add_ps(_mm512_loadu_ps(y + n), t);
        _mm512_storeu_ps(y + n, t);
    }
#endif
    for (; n < n1; n++) {
        float t = v[n - n0] + (b ? load(b, n, dtype) : 0.0f);
        if (epilogue == GELU) t = gelu(t);
        y[n] = epilogue == ADD ? y[n] + t : t;
    }
}

/* y = W x + b, then GELU or the residual add, for `rows` inputs x (rows x K) and outputs y
   (rows x N), in parallel over blocks of W's rows: a block is read from memory once a step, and
   from the core's cache for the other inputs. int8 W comes with its rows' scales S and sums R. */
static void linear(const void *W, const void *S, const void *R, const void *b, const float *x,
                   int N, int K, float *y, int epilogue, const Model *m, int rows) {
    const int block = 64;
    int blocks = (N + block - 1) / block;
    float xs[rows];
    uint8_t xu[m->wdtype == 2 ? rows * K : 1];
    uint16_t xb[m->wdtype == 1 ? rows * K : 1];
    Inputs in = {x, xb, xu, xs, K, 0};
    if (m->wdtype == 2)
        for (int r = 0; r < rows; r++) xs[r] = quantize_input(x + (size_t)r * K, K, xu + (size_t)r * K);
#ifdef __AVX512BF16__
    in.dp = m->wdtype == 1 && K % 32 == 0;
    if (in.dp) /* K % 32 == 0; the instruction rounds to nearest even, as f32_to_bf16 does */
        for (size_t k = 0; k < (size_t)rows * K; k += 16)
            _mm256_storeu_si256((__m256i *)(xb + k), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + k)));
#endif
#pragma omp parallel for schedule(static) num_threads(m->threads)
    for (int i = 0; i < blocks; i++) {
        int n0 = i * block, n1 = n0 + block < N ? n0 + block : N;
        for (int r = 0; r < rows;) {
            float out[4][64];
            int done = products(W, S, R, &in, r, rows, n0, n1, out, m->wdtype);
            for (int j = 0; j < done; j++) finish(out[j], b, n0, n1, y + (size_t)(r + j) * N, epilogue, m->dtype);
            r += done;
        }
    }
}

/* each of `rows` rows of x (rows x C) normalised into out */
static void layer_norm(const float *x, const void *w, const void *b, int C, float eps, float *out,
                       int dtype, int rows) {
    float wf[C], bf[C];
    load_row(w, 0, C, dtype, wf);
    if (b)
        load_row(b, 0, C, dtype, bf);
    else
        for (int i = 0; i < C; i++) bf[i] = 0.0f;
    for (int r = 0; r < rows; r++, x += C, out += C) {
        double mean = 0.0, var = 0.0;
        for (int i = 0; i < C; i++) mean += x[i];
        mean /= C;
        for (int i = 0; i < C; i++) var += (x[i] - mean) * (x[i] - mean);
        float inv = 1.0f / sqrtf((float)(var / C) + eps);
        for (int i = 0; i < C; i++) out[i] = (float)(x[i] - mean) * inv * wf[i] + bf[i];
    }
}

/* attention of each row's query, per head, over its cached keys [0, pos] (the columns its mask
   keeps): out (rows x C) from qkv (rows x 3C) */
static void attend(const Model *m, const Step *st, int layer, const float *qkv, float *out, float *scores) {
    const int nh = m->n_head, hs = m->head_size, dtype = m->dtype, C = nh * hs, pos = st->pos;
    const size_t per_head = (size_t)m->max_len * hs;
    const float scale = 1.0f / sqrtf((float)hs);
#pragma omp parallel for schedule(static) num_threads(m->threads)
    for (int rh = 0; rh < st->rows * nh; rh++) {
        const int r = rh / nh, h = rh % nh;
        const float *q = qkv + (size_t)r * 3 * C + h * hs;
        const uint8_t *keep = st->mask ? st->mask + (size_t)r * st->mask_stride : NULL;
        size_t kv = layer * st->layer_stride + r * st->row_stride + h * per_head;
        float *s = scores + (size_t)rh * m->max_len, top = -INFINITY, total = 0.0f;
        for (int t = 0; t <= pos; t++) {
            s[t] = keep && !keep[t] ? -INFINITY : dot_head(m->k_cache, kv + (size_t)t * hs, q, hs, dtype) * scale;
            if (s[t] > top) top = s[t];
        }
        for (int t = 0; t <= pos; t++) total += (s[t] = expf(s[t] - top)); /* masked: e^-inf = 0 */
        float *o = out + (size_t)r * C + h * hs;
        for (int i = 0; i < hs; i++) o[i] = 0.0f;
        for (int t = 0; t <= pos; t++)
            if (s[t] != 0.0f) add_scaled(o, s[t] / total, m->v_cache, kv + (size_t)t * hs, hs, dtype);
    }
}

static const void *at(const void **per_layer, int l) { return per_layer ? per_layer[l] : NULL; }

/* The logits (rows x vocab floats) of each row's new token; writes its key and value at column
   st->pos of its cache row. */
void gpt2lab_rows(const Model *m, const Step *st, float *logits) {
    const int C = m->n_embd, nh = m->n_head, hs = m->head_size, dtype = m->dtype, R = st->rows;
    float *x = m->work, *h = x + (size_t)R * C, *qkv = h + (size_t)R * C, *y = qkv + (size_t)R * 3 * C;
    float *u = y + (size_t)R * C, *scores = u + (size_t)R * 4 * C;
    for (int r = 0; r < R; r++) { /* token + position embeddings, into x (h as scratch) */
        const int64_t id = st->ids[r], p = st->positions ? st->positions[r] : st->pos;
        float *xr = x + (size_t)r * C;
        load_row(m->wpe, (size_t)p * C, C, dtype, h);
        if (m->wte_s)
            for (int i = 0; i < C; i++)
                xr[i] = ((const int8_t *)m->wte)[(size_t)id * C + i] * ((const float *)m->wte_s)[id] + h[i];
        else {
            load_row(m->wte, (size_t)id * C, C, dtype, xr);
            for (int i = 0; i < C; i++) xr[i] += h[i];
        }
    }
    for (int l = 0; l < m->n_layer; l++) {
        layer_norm(x, m->ln1_w[l], m->ln1_b[l], C, m->eps, h, dtype, R);
        linear(m->attn_w[l], at(m->attn_s, l), at(m->attn_r, l), m->attn_b[l], h, 3 * C, C, qkv, PLAIN, m, R);
        for (int r = 0; r < R; r++)
            for (int hd = 0; hd < nh; hd++) {
                size_t at = l * st->layer_stride + r * st->row_stride + ((size_t)hd * m->max_len + st->pos) * hs;
                const float *kr = qkv + (size_t)r * 3 * C + C + hd * hs, *vr = kr + C;
                store_row(m->k_cache, at, kr, hs, dtype);
                store_row(m->v_cache, at, vr, hs, dtype);
            }
        attend(m, st, l, qkv, y, scores);
        linear(m->proj_w[l], at(m->proj_s, l), at(m->proj_r, l), m->proj_b[l], y, C, C, x, ADD, m, R);
        layer_norm(x, m->ln2_w[l], m->ln2_b[l], C, m->eps, h, dtype, R);
        linear(m->fc_w[l], at(m->fc_s, l), at(m->fc_r, l), m->fc_b[l], h, 4 * C, C, u, GELU, m, R);
        linear(m->fcp_w[l], at(m->fcp_s, l), at(m->fcp_r, l), m->fcp_b[l], u, C, 4 * C, x, ADD, m, R);
    }
    layer_norm(x, m->lnf_w, m->lnf_b, C, m->eps, h, dtype, R);
    linear(m->head_w, m->head_s, m->head_r, NULL, h, m->vocab, C, logits, PLAIN, m, R);
}

/* floats of scratch a step of `rows` rows needs */
size_t gpt2lab_work_floats(int n_embd, int n_head, int max_len, int rows) {
    return (size_t)rows * (10 * (size_t)n_embd + (size_t)n_head * max_len);
}

/* The scalar float16 conversions the step uses (vecmath.h), over n values: h = x rounded to
   float16, y = h widened back. For tests, which hold them against PyTorch's on every float16. */
void gpt2lab_f16_round_trip(const float *x, uint16_t *h, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        h[i] = f32_to_f16(x[i]);
        y[i] = f16_to_f32(h[i]);
    }
}
