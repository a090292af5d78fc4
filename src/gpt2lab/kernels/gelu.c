/* GPT-2's GELU (the tanh approximation) and its gradient for training, over float32 or bfloat16
 * tensors: what torch's gelu(x, approximate="tanh") and its backward compute, in float32, storing
 * the input's dtype. PyTorch's CPU kernels for these evaluate tanh in full precision and took
 * ~15% of a small model's bfloat16 training step (docs/performance.md); here each is one pass
 * over memory with a 16-wide e^x. Called by gpt2lab.kernels.gelu, tested equal to PyTorch's in
 * tests/kernels/test_gelu.py. dtype: 0 float32, 1 bfloat16. */
#include "vecmath.h"
#ifdef _OPENMP
#include <omp.h>
#endif

#define CHUNK 8192 /* elements per task: small tensors stay on one thread */

/* y = gelu(x) */
void gpt2lab_gelu(const void *x, void *y, int64_t n, int dtype, int threads) {
    int64_t chunks = (n + CHUNK - 1) / CHUNK;
#pragma omp parallel for schedule(static) num_threads(threads) if (chunks > 1)
    for (int64_t c = 0; c < chunks; c++) {
        int64_t i = c * CHUNK, end = i + CHUNK < n ? i + CHUNK : n;
#ifdef __AVX512F__
        for (; i + 16 <= end; i += 16) store16(y, (size_t)i, gelu16(load16(x, (size_t)i, dtype)), dtype);
#endif
        for (; i < end; i++) store(y, (size_t)i, gelu(load(x, (size_t)i, dtype)), dtype);
    }
}

/* gx = gy * gelu'(x) */
void gpt2lab_gelu_backward(const void *x, const void *gy, void *gx, int64_t n, int dtype, int threads) {
    int64_t chunks = (n + CHUNK - 1) / CHUNK;
#pragma omp parallel for schedule(static) num_threads(threads) if (chunks > 1)
    for (int64_t c = 0; c < chunks; c++) {
        int64_t i = c * CHUNK, end = i + CHUNK < n ? i + CHUNK : n;
#ifdef __AVX512F__
        for (; i + 16 <= end; i += 16) {
            __m512 g = _mm512_mul_ps(load16(gy, (size_t)i, dtype), gelu_grad16(load16(x, (size_t)i, dtype)));
            store16(gx, (size_t)i, g, dtype);
        }
#endif
        for (; i < end; i++) store(gx, (size_t)i, load(gy, (size_t)i, dtype) * gelu_grad(load(x, (size_t)i, dtype)), dtype);
    }
}
