/* Causal self-attention for training on a CPU (up to 2048 positions), forward and backward,
 * from the c_attn output (B, T, 3C) to the heads' output (B, T, C) and back: what
 * model.attention(q, k, v) computes after the split into heads, with no split, transpose, mask
 * or T x T tensor in between. PyTorch's explicit path spends most of its time in those small
 * operations, and SDPA's CPU flash kernel has a slow bfloat16 backward (docs/performance.md).
 *
 * Each (sequence, head) pair is one task: its q, k, v are copied into buffers that stay in
 * cache (zero-padded to multiples of 16; bfloat16 ones in pairs for vdpbf16ps, see below), the
 * products run there in tiles of 8 query rows, and only the per-row log-sum-exp is kept for the
 * backward, which recomputes the probabilities (as flash attention does). Sums are float32
 * whatever the tensors' dtype (0 float32, 1 bfloat16). Called by gpt2lab.kernels.attention,
 * tested against float64 attention (SDPA) and the plain model in tests/kernels/test_attention.py. */
#include "vecmath.h"
#ifdef _OPENMP
#include <omp.h>
#endif

#define TILE 8 /* output rows a pass: each row of B loaded is used eight times */

static inline int round16(int n) { return (n + 15) & ~15; }

#ifdef __AVX512F__
/* columns [j, j + 16 nb) of the tile product below, nb = 1 or 2 (inlined for each) */
static inline __attribute__((always_inline)) void tile_block(const float *a, size_t a_row, size_t a_k,
                                                             const float *B, int ldb, float *C, int ldc,
                                                             int j, int nb, int k0, int k1) {
    __m512 c[TILE][2];
    for (int r = 0; r < TILE; r++) c[r][0] = c[r][1] = _mm512_setzero_ps();
    for (int k = k0; k < k1; k++) {
        const float *b = B + (size_t)k * ldb + j;
        __m512 bk[2];
        for (int u = 0; u < nb; u++) bk[u] = _mm512_loadu_ps(b + 16 * u);
        for (int r = 0; r < TILE; r++) {
            __m512 ar = _mm512_set1_ps(a[r * a_row + k * a_k]);
            for (int u = 0; u < nb; u++) c[r][u] = _mm512_fmadd_ps(ar, bk[u], c[r][u]);
        }
    }
    for (int r = 0; r < TILE; r++)
        for (int u = 0; u < nb; u++) _mm512_storeu_ps(C + (size_t)r * ldc + j + 16 * u, c[r][u]);
}
#endif

/* C[r][0..n) = sum over k in [k0, k1) of a(r, k) B[k][0..n) for r < TILE, where a(r, k) is
 * a[r * a_row + k * a_k] (a row of A, or with a_row = 1 a column); n is a multiple of 16 */
static void tile_product(const float *a, size_t a_row, size_t a_k, const float *B, int ldb, float *C,
                         int ldc, int n, int k0, int k1) {
    int j = 0;
#ifdef __AVX512F__
    for (; j + 32 <= n; j += 32) tile_block(a, a_row, a_k, B, ldb, C, ldc, j, 2, k0, k1);
    if (j < n) tile_block(a, a_row, a_k, B, ldb, C, ldc, j, 1, k0, k1);
#else
    for (; j < n; j += 16) {
        float acc[TILE][16] = {{0}};
        for (int k = k0; k < k1; k++) {
            const float *b = B + (size_t)k * ldb + j;
            for (int r = 0; r < TILE; r++) {
                float ar = a[r * a_row + k * a_k];
                for (int u = 0; u < 16; u++) acc[r][u] += ar * b[u];
            }
        }
        for (int r = 0; r < TILE; r++) memcpy(C + (size_t)r * ldc + j, acc[r], sizeof acc[r]);
    }
#endif
}

/* C[j][0..hp) += sum over r < TILE of A[r][j] B[r][0..hp), for j < n: a rank-TILE update, how
 * keys' gradients gather the contributions of a tile of queries */
static void rank_update(float *C, int ldc, const float *A, int lda, const float *B, int hp, int n) {
    int u = 0;
#ifdef __AVX512F__
    for (; u + 32 <= hp; u += 32) { /* B's TILE x 32 block stays in registers */
        __m512 b[TILE][2];
        for (int r = 0; r < TILE; r++) {
            b[r][0] = _mm512_loadu_ps(B + (size_t)r * hp + u);
            b[r][1] = _mm512_loadu_ps(B + (size_t)r * hp + u + 16);
        }
        for (int j = 0; j < n; j++) {
            float *c = C + (size_t)j * ldc + u;
            __m512 c0 = _mm512_loadu_ps(c), c1 = _mm512_loadu_ps(c + 16);
            for (int r = 0; r < TILE; r++) {
                __m512 ar = _mm512_set1_ps(A[(size_t)r * lda + j]);
                c0 = _mm512_fmadd_ps(ar, b[r][0], c0);
                c1 = _mm512_fmadd_ps(ar, b[r][1], c1);
            }
            _mm512_storeu_ps(c, c0);
            _mm512_storeu_ps(c + 16, c1);
        }
    }
#endif
    for (; u < hp; u++)
        for (int j = 0; j < n; j++)
            for (int r = 0; r < TILE; r++) C[(size_t)j * ldc + u] += A[(size_t)r * lda + j] * B[(size_t)r * hp + u];
}

/* row[j] = e^(row[j] - m) for j <= i, 0 for i < j < n; returns the sum */
static float exp_row(float *row, int i, int n, float m) {
    int j = 0;
#ifdef __AVX512F__
    __m512 vm = _mm512_set1_ps(m), acc = _mm512_setzero_ps();
    for (; j <= i; j += 16) { /* the last block keeps only keys j <= i, zeroing the rest */
        __mmask16 keep = i + 1 - j >= 16 ? 0xffff : (__mmask16)((1u << (i + 1 - j)) - 1);
        __m512 d = _mm512_sub_ps(_mm512_loadu_ps(row + j), vm), e = exp16(d);
        /* exp16 clamps a NaN away: keep it, so a NaN score makes its row NaN as in PyTorch */
        e = _mm512_maskz_mov_ps(keep, _mm512_mask_mov_ps(e, _mm512_cmp_ps_mask(d, d, _CMP_UNORD_Q), d));
        _mm512_storeu_ps(row + j, e);
        acc = _mm512_add_ps(acc, e);
    }
    for (; j < n; j++) row[j] = 0.0f;
    return _mm512_reduce_add_ps(acc);
#else
    for (; j <= i; j++) row[j] = expf(row[j] - m);
    for (; j < n; j++) row[j] = 0.0f;
    float sum = 0.0f;
    for (j = 0; j <= i; j++) sum += row[j];
    return sum;
#endif
}

/* One (sequence, head)'s buffers: rows padded to tp, head columns to hp; s and ds hold a tile of
 * TILE rows of the T x T probabilities and their gradient, never the whole matrix */
typedef struct {
    int T, hs, tp, hp, pairs; /* pairs: bfloat16 tensors, products by vdpbf16ps (below) */
    float scale;              /* 1 / sqrt(hs), which the pairs' scores still need */
    float *q, *k, *v, *dy, *kt, *vt, *dq, *dk, *dv, *s, *ds;
    uint16_t *qb, *dyb, *ktb, *vtb, *kb, *vb, *sb, *dsb; /* the bfloat16 operands */
} Pair;

size_t gpt2lab_attention_work_floats(int T, int hs) {
    size_t tp = (size_t)round16(T), hp = (size_t)round16(hs);
    return 9 * tp * hp + 2 * TILE * tp + (6 * tp * hp + 2 * TILE * tp) / 2;
}

/* this thread's buffers in `work`, zeroed once a call: padding never holds stale NaNs */
static Pair thread_buffers(float *work, int T, int hs, int dtype) {
    Pair p = {.T = T, .hs = hs, .tp = round16(T), .hp = round16(hs), .scale = 1.0f / sqrtf((float)hs)};
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
    p.pairs = dtype == 1 && hs % 2 == 0; /* whole pairs of head columns, as every GPT-2 has */
#else
    (void)dtype;
#endif
    size_t per = gpt2lab_attention_work_floats(T, hs), th = (size_t)p.tp * p.hp;
#ifdef _OPENMP
    work += per * (size_t)omp_get_thread_num();
#endif
    memset(work, 0, per * sizeof(float));
    float **mats[] = {&p.q, &p.k, &p.v, &p.dy, &p.kt, &p.vt, &p.dq, &p.dk, &p.dv};
    for (int i = 0; i < 9; i++, work += th) *mats[i] = work;
    p.s = work;
    p.ds = work + TILE * p.tp;
    uint16_t *half = (uint16_t *)(work + 2 * TILE * p.tp);
    uint16_t **bf[] = {&p.qb, &p.dyb, &p.ktb, &p.vtb, &p.kb, &p.vb};
    for (int i = 0; i < 6; i++, half += th) *bf[i] = half;
    p.sb = half;
    p.dsb = half + TILE * p.tp;
    return p;
}

/* rows [0, T) of head columns [col, col + hs) of a (T, width) matrix into a (tp, hp) buffer,
 * times `scale`, and, given `t`, transposed into a (hp, tp) one too */
static void gather(const void *x, int dtype, int width, int col, float scale, const Pair *p,
                   float *out, float *t) {
    for (int i = 0; i < p->T; i++) {
        size_t at = (size_t)i * width + col;
        float *row = out + (size_t)i * p->hp;
        int d = 0;
#ifdef __AVX512F__
        for (; d + 16 <= p->hs; d += 16)
            _mm512_storeu_ps(row + d, _mm512_mul_ps(load16(x, at + d, dtype), _mm512_set1_ps(scale)));
#endif
        for (; d < p->hs; d++) row[d] = scale * load(x, at + d, dtype);
    }
    if (t) /* read across rows, write along them: strided loads are cheaper than strided stores */
        for (int d = 0; d < p->hs; d++)
            for (int i = 0; i < p->T; i++) t[(size_t)d * p->tp + i] = out[(size_t)i * p->hp + d];
}

static void scatter(const float *buf, float scale, const Pair *p, void *x, int dtype, int width,
                    int col) {
    for (int i = 0; i < p->T; i++) {
        size_t at = (size_t)i * width + col;
        const float *row = buf + (size_t)i * p->hp;
        int d = 0;
#ifdef __AVX512F__
        for (; d + 16 <= p->hs; d += 16)
            store16(x, at + d, _mm512_mul_ps(_mm512_loadu_ps(row + d), _mm512_set1_ps(scale)), dtype);
#endif
        for (; d < p->hs; d++) store(x, at + d, scale * row[d], dtype);
    }
}

/* sequence b's q (times `scale`), k (and k^T) and v (and, given `vt`, v^T) of head h */
static void gather_head(const void *qkv, int b, int h, int C, int dtype, float scale, const Pair *p,
                        float *vt) {
    const void *x = (const char *)qkv + (size_t)b * p->T * 3 * C * (dtype ? 2 : 4);
    gather(x, dtype, 3 * C, h * p->hs, scale, p, p->q, NULL);
    gather(x, dtype, 3 * C, C + h * p->hs, 1.0f, p, p->k, p->kt);
    gather(x, dtype, 3 * C, 2 * C + h * p->hs, 1.0f, p, p->v, vt);
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
/* bfloat16 tensors: the products take two bfloat16 terms of a sum per 32-bit lane (vdpbf16ps,
 * twice float32 FMA's rate), so each right-hand operand is stored in pairs along the summed
 * index: B[k][c] at (k / 2) * 2 ncols + 2 c + k % 2. Left-hand rows are plain bfloat16 rows, whose
 * consecutive pairs one 32-bit broadcast takes. q, k, v and dy are bfloat16 already (copied
 * exactly); only the probabilities and their gradient are rounded, as PyTorch's bfloat16
 * products round them. Sums stay float32. */
static inline int even(int n) { return (n + 1) & ~1; }

/* rows [0, T), columns [col, col + hs) of a bfloat16 (T, width) matrix: as rows (T, hp), and in
 * pairs summed over rows (for products over keys) or over columns (over the head dimension) */
static void fill_rows(const uint16_t *x, int width, int col, const Pair *p, uint16_t *out) {
    for (int i = 0; i < p->T; i++) memcpy(out + (size_t)i * p->hp, x + (size_t)i * width + col, 2 * (size_t)p->hs);
}

static void fill_pairs_over_rows(const uint16_t *x, int width, int col, const Pair *p, uint16_t *out) {
    /* rows i and i + 1 interleaved element by element, 16 columns at a time */
    const __m512i mix = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                         23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (int i = 0; i < p->T; i += 2) {
        const uint16_t *r0 = x + (size_t)i * width + col, *r1 = i + 1 < p->T ? r0 + width : NULL;
        uint16_t *o = out + (size_t)(i / 2) * 2 * p->hp;
        int d = 0;
        for (; r1 && d + 16 <= p->hs; d += 16) {
            __m512i two = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(r0 + d))),
                                             _mm256_loadu_si256((const __m256i *)(r1 + d)), 1);
            _mm512_storeu_si512(o + 2 * d, _mm512_permutexvar_epi16(mix, two));
        }
        for (; d < p->hs; d++) {
            o[2 * d] = r0[d];
            o[2 * d + 1] = r1 ? r1[d] : 0;
        }
    }
}

static void fill_pairs_over_columns(const uint16_t *x, int width, int col, const Pair *p, uint16_t *out) {
    /* a column pair is one 32-bit word of a row (hs and col are even here): a 32-bit transpose,
       read across rows and written along them */
    uint32_t *o = (uint32_t *)out;
    for (int d = 0; d < p->hs; d += 2)
        for (int i = 0; i < p->T; i++) {
            uint32_t two;
            memcpy(&two, x + (size_t)i * width + col + d, 4);
            o[(size_t)(d / 2) * p->tp + i] = two;
        }
}

/* `tile_product` for bfloat16 in pairs: C[r][0..n) = sum over k in [k0, k1) (both even) of
 * a[r * lda + k] B[k][0..n), B in pairs with ldb = 2 ncols */
static void tile_product_pairs(const uint16_t *a, int lda, const uint16_t *B, int ldb, float *C, int ldc,
                               int n, int k0, int k1) {
    for (int j = 0; j < n; j += 32) {
        int nb = j + 32 <= n ? 2 : 1;
        __m512 c[TILE][2];
        for (int r = 0; r < TILE; r++) c[r][0] = c[r][1] = _mm512_setzero_ps();
        for (int k = k0; k < k1; k += 2) {
            const uint16_t *b = B + (size_t)(k / 2) * ldb + 2 * j;
            __m512bh b0 = (__m512bh)_mm512_loadu_si512(b), b1 = b0;
            if (nb == 2) b1 = (__m512bh)_mm512_loadu_si512(b + 32);
            for (int r = 0; r < TILE; r++) {
                uint32_t two;
                memcpy(&two, a + (size_t)r * lda + k, 4);
                __m512bh ar = (__m512bh)_mm512_set1_epi32((int)two);
                c[r][0] = _mm512_dpbf16_ps(c[r][0], ar, b0);
                if (nb == 2) c[r][1] = _mm512_dpbf16_ps(c[r][1], ar, b1);
            }
        }
        for (int r = 0; r < TILE; r++)
            for (int u = 0; u < nb; u++) _mm512_storeu_ps(C + (size_t)r * ldc + j + 16 * u, c[r][u]);
    }
}

/* a tile's float32 rows [0, n) rounded to bfloat16 rows */
static void tile_to_bf16(const float *s, uint16_t *out, int tp, int n) {
    for (int r = 0; r < TILE; r++)
        for (int j = 0; j < n; j += 16)
            _mm256_storeu_si256((__m256i *)(out + (size_t)r * tp + j), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(s + (size_t)r * tp + j)));
}

/* sequence b's bfloat16 operands of head h; with `backward`, also those of the gradients and q
 * as float32 (scaled), which the keys' gradient sums */
static void gather_pairs(const void *qkv, int b, int h, int C, const Pair *p, int backward) {
    const uint16_t *x = (const uint16_t *)qkv + (size_t)b * p->T * 3 * C;
    int q = h * p->hs, k = C + h * p->hs, v = 2 * C + h * p->hs;
    fill_rows(x, 3 * C, q, p, p->qb);
    fill_pairs_over_columns(x, 3 * C, k, p, p->ktb);
    fill_pairs_over_rows(x, 3 * C, v, p, p->vb);
    if (backward) {
        fill_pairs_over_columns(x, 3 * C, v, p, p->vtb);
        fill_pairs_over_rows(x, 3 * C, k, p, p->kb);
        gather(x, 1, 3 * C, q, p->scale, p, p->q, NULL);
    }
}
#endif

/* the last row a tile starting at i0 reaches, plus one (causal: query i sees keys 0..i) */
static inline int tile_end(int i0, int T) { return i0 + TILE < T ? i0 + TILE : T; }

/* the probabilities of queries i0 .. i0 + TILE - 1 over keys 0 .. n - 1 into p->s: softmax of
 * q k^T over keys j <= i, zero elsewhere (and for rows past T); with lse == NULL each row's
 * log-sum-exp is computed and written to lse_out[i], else read from lse[i] */
static void probabilities(const Pair *p, int i0, int n, const float *lse, float *lse_out) {
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
    if (p->pairs) {
        tile_product_pairs(p->qb + (size_t)i0 * p->hp, p->hp, p->ktb, 2 * p->tp, p->s, p->tp, n, 0, even(p->hs));
        for (int r = 0; r < TILE; r++) /* the columns computed, not the whole padded row */
            for (int j = 0; j < n; j++) p->s[(size_t)r * p->tp + j] *= p->scale;
    } else
#endif
        tile_product(p->q + (size_t)i0 * p->hp, p->hp, 1, p->kt, p->tp, p->s, p->tp, n, 0, p->hs);
    for (int r = 0; r < TILE; r++) {
        int i = i0 + r;
        float *row = p->s + (size_t)r * p->tp;
        if (i >= p->T) {
            memset(row, 0, n * sizeof(float));
        } else if (lse) {
            exp_row(row, i, n, lse[i]);
        } else {
            float mx = row[0];
            for (int j = 1; j <= i; j++) mx = row[j] > mx ? row[j] : mx;
            float sum = exp_row(row, i, n, mx), inv = 1.0f / sum;
            for (int j = 0; j <= i; j++) row[j] *= inv;
            lse_out[i] = mx + logf(sum);
        }
    }
}

/* y = softmax(q k^T / sqrt(hs), causal) v for every sequence and head; lse (B, nh, T) float32 */
void gpt2lab_attention(const void *qkv, void *y, float *lse, float *work, int B, int T, int nh,
                       int hs, int dtype, int threads) {
    int C = nh * hs;
    size_t esize = dtype ? 2 : 4;
    float scale = 1.0f / sqrtf((float)hs);
#pragma omp parallel num_threads(threads)
    {
    Pair p = thread_buffers(work, T, hs, dtype);
#pragma omp for schedule(static)
    for (int task = 0; task < B * nh; task++) {
        int b = task / nh, h = task % nh;
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
        if (p.pairs) gather_pairs(qkv, b, h, C, &p, 0);
        else
#endif
            gather_head(qkv, b, h, C, dtype, scale, &p, NULL);
        for (int i0 = 0; i0 < T; i0 += TILE) { /* a tile of queries: P, then y = P v */
            int end = tile_end(i0, T), n = round16(end);
            probabilities(&p, i0, n, NULL, lse + (size_t)task * T);
            float *y_tile = p.dq + (size_t)i0 * p.hp;
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
            if (p.pairs) {
                tile_to_bf16(p.s, p.sb, p.tp, n);
                tile_product_pairs(p.sb, p.tp, p.vb, 2 * p.hp, y_tile, p.hp, p.hp, 0, even(end));
                continue;
            }
#endif
            tile_product(p.s, p.tp, 1, p.v, p.hp, y_tile, p.hp, p.hp, 0, end);
        }
        scatter(p.dq, 1.0f, &p, (char *)y + (size_t)b * T * C * esize, dtype, C, h * hs);
    }
    }
}

/* dqkv from dy, given the forward's qkv and lse */
void gpt2lab_attention_backward(const void *qkv, const void *dy, const float *lse, void *dqkv,
                                float *work, int B, int T, int nh, int hs, int dtype, int threads) {
    int C = nh * hs;
    size_t esize = dtype ? 2 : 4;
    float scale = 1.0f / sqrtf((float)hs);
#pragma omp parallel num_threads(threads)
    {
    Pair p = thread_buffers(work, T, hs, dtype);
#pragma omp for schedule(static)
    for (int task = 0; task < B * nh; task++) {
        int b = task / nh, h = task % nh;
        const void *dy_b = (const char *)dy + (size_t)b * T * C * esize;
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
        if (p.pairs) {
            gather_pairs(qkv, b, h, C, &p, 1);
            fill_rows(dy_b, C, h * hs, &p, p.dyb);
        } else
#endif
            gather_head(qkv, b, h, C, dtype, scale, &p, p.vt);
        gather(dy_b, dtype, C, h * hs, 1.0f, &p, p.dy, NULL);
        memset(p.dk, 0, 2 * (size_t)p.tp * p.hp * sizeof(float)); /* dk and dv accumulate */
        for (int i0 = 0; i0 < T; i0 += TILE) {
            int end = tile_end(i0, T), n = round16(end);
            probabilities(&p, i0, n, lse + (size_t)task * T, NULL);
            /* dP = dy v^T, then dS = P (dP - sum_j P dP), zero past each row's last key */
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
            if (p.pairs)
                tile_product_pairs(p.dyb + (size_t)i0 * p.hp, p.hp, p.vtb, 2 * p.tp, p.ds, p.tp, n, 0, even(hs));
            else
#endif
                tile_product(p.dy + (size_t)i0 * p.hp, p.hp, 1, p.vt, p.tp, p.ds, p.tp, n, 0, hs);
            for (int r = 0; r < TILE; r++) {
                float *P = p.s + (size_t)r * p.tp, *dS = p.ds + (size_t)r * p.tp, D = 0.0f;
                int last = i0 + r < T ? i0 + r : -1;
                for (int j = 0; j <= last; j++) D += P[j] * dS[j];
                for (int j = 0; j <= last; j++) dS[j] = P[j] * (dS[j] - D);
                for (int j = last + 1; j < n; j++) dS[j] = 0.0f;
            }
            /* dq = dS k / sqrt(hs); dk += dS^T q / sqrt(hs) (q is scaled); dv += P^T dy */
            float *dq_tile = p.dq + (size_t)i0 * p.hp;
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
            if (p.pairs) {
                tile_to_bf16(p.ds, p.dsb, p.tp, n);
                tile_product_pairs(p.dsb, p.tp, p.kb, 2 * p.hp, dq_tile, p.hp, p.hp, 0, even(end));
            } else
#endif
                tile_product(p.ds, p.tp, 1, p.k, p.hp, dq_tile, p.hp, p.hp, 0, end);
            rank_update(p.dk, p.hp, p.ds, p.tp, p.q + (size_t)i0 * p.hp, p.hp, end);
            rank_update(p.dv, p.hp, p.s, p.tp, p.dy + (size_t)i0 * p.hp, p.hp, end);
        }
        char *out = (char *)dqkv + (size_t)b * T * 3 * C * esize;
        scatter(p.dq, scale, &p, out, dtype, 3 * C, h * hs);
        scatter(p.dk, 1.0f, &p, out, dtype, 3 * C, C + h * hs);
        scatter(p.dv, 1.0f, &p, out, dtype, 3 * C, 2 * C + h * hs);
    }
    }
}
