/* Causal self-attention for training on a CPU (up to 2048 positions), forward and backward,
 * from the c_attn output (B, T, 3C) to the heads' output (B, T, C) and back: what
 * model.attention(q, k, v) computes after the split into heads, with no split, transpose, mask
 * or T x T tensor in between. PyTorch's explicit path spends most of its time in those small
 * operations, and SDPA's CPU flash kernel has a slow bfloat16 backward (docs/performance.md).
 *
 * Each (sequence, head) pair is one task: its q, k, v are copied into float32 buffers that stay
 * in cache (zero-padded to multiples of 16), the products run there in 4-row tiles, and only
 * the per-row log-sum-exp is kept for the backward, which recomputes the probabilities (as flash
 * attention does). Sums are float32 whatever the tensors' dtype (0 float32, 1 bfloat16).
 * Called by gpt2lab.kernels.attention, tested against float64 attention and PyTorch's autograd
 * in tests/kernels/test_attention.py. */
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
    int T, hs, tp, hp;
    float *q, *k, *v, *dy, *kt, *vt, *dq, *dk, *dv, *s, *ds;
} Pair;

size_t gpt2lab_attention_work_floats(int T, int hs) {
    size_t tp = (size_t)round16(T), hp = (size_t)round16(hs);
    return 9 * tp * hp + 2 * TILE * tp;
}

/* this thread's buffers in `work`, zeroed once a call: padding never holds stale NaNs */
static Pair thread_buffers(float *work, int T, int hs) {
    Pair p = {.T = T, .hs = hs, .tp = round16(T), .hp = round16(hs)};
    size_t per = gpt2lab_attention_work_floats(T, hs), th = (size_t)p.tp * p.hp;
#ifdef _OPENMP
    work += per * (size_t)omp_get_thread_num();
#endif
    memset(work, 0, per * sizeof(float));
    float **mats[] = {&p.q, &p.k, &p.v, &p.dy, &p.kt, &p.vt, &p.dq, &p.dk, &p.dv};
    for (int i = 0; i < 9; i++, work += th) *mats[i] = work;
    p.s = work;
    p.ds = work + TILE * p.tp;
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

/* the last row a tile starting at i0 reaches, plus one (causal: query i sees keys 0..i) */
static inline int tile_end(int i0, int T) { return i0 + TILE < T ? i0 + TILE : T; }

/* the probabilities of queries i0 .. i0 + TILE - 1 over keys 0 .. n - 1 into p->s: softmax of
 * q k^T over keys j <= i, zero elsewhere (and for rows past T); with lse == NULL each row's
 * log-sum-exp is computed and written to lse_out[i], else read from lse[i] */
static void probabilities(const Pair *p, int i0, int n, const float *lse, float *lse_out) {
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
    Pair p = thread_buffers(work, T, hs);
#pragma omp for schedule(static)
    for (int task = 0; task < B * nh; task++) {
        int b = task / nh, h = task % nh;
        gather_head(qkv, b, h, C, dtype, scale, &p, NULL);
        for (int i0 = 0; i0 < T; i0 += TILE) { /* a tile of queries: P, then y = P v */
            int end = tile_end(i0, T);
            probabilities(&p, i0, round16(end), NULL, lse + (size_t)task * T);
            tile_product(p.s, p.tp, 1, p.v, p.hp, p.dq + (size_t)i0 * p.hp, p.hp, p.hp, 0, end);
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
    Pair p = thread_buffers(work, T, hs);
#pragma omp for schedule(static)
    for (int task = 0; task < B * nh; task++) {
        int b = task / nh, h = task % nh;
        gather_head(qkv, b, h, C, dtype, scale, &p, p.vt);
        gather((const char *)dy + (size_t)b * T * C * esize, dtype, C, h * hs, 1.0f, &p, p.dy, NULL);
        memset(p.dk, 0, 2 * (size_t)p.tp * p.hp * sizeof(float)); /* dk and dv accumulate */
        for (int i0 = 0; i0 < T; i0 += TILE) {
            int end = tile_end(i0, T), n = round16(end);
            probabilities(&p, i0, n, lse + (size_t)task * T, NULL);
            /* dP = dy v^T, then dS = P (dP - sum_j P dP), zero past each row's last key */
            tile_product(p.dy + (size_t)i0 * p.hp, p.hp, 1, p.vt, p.tp, p.ds, p.tp, n, 0, hs);
            for (int r = 0; r < TILE; r++) {
                float *P = p.s + (size_t)r * p.tp, *dS = p.ds + (size_t)r * p.tp, D = 0.0f;
                int last = i0 + r < T ? i0 + r : -1;
                for (int j = 0; j <= last; j++) D += P[j] * dS[j];
                for (int j = 0; j <= last; j++) dS[j] = P[j] * (dS[j] - D);
                for (int j = last + 1; j < n; j++) dS[j] = 0.0f;
            }
            /* dq = dS k / sqrt(hs); dk += dS^T q / sqrt(hs) (q is scaled); dv += P^T dy */
            tile_product(p.ds, p.tp, 1, p.k, p.hp, p.dq + (size_t)i0 * p.hp, p.hp, p.hp, 0, end);
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
