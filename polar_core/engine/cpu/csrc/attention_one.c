/* The attention of one new token per head over its cached keys, on one thread.
 *
 * A decoding step's attention is tiny (Gemma 3 270M: 4 heads of 256 over a
 * few hundred keys), yet PyTorch's CPU kernels split it over the intra-op
 * threads; on a busy 2-core host the caller then waits, spinning, for the
 * second thread to be scheduled: ~2 ms per layer, more than the rest of the
 * step (polar_core/engine/cpu/attention.py). Here one thread does it all:
 *
 *   out[h] = softmax(scale * q[h] . K[g]^T + mask) V[g],   g = h / (heads / kv_heads)
 *
 * the same function as scaled_dot_product_attention with another rounding
 * of its sums. Keys and values are rows of `dim` floats, rows `row_stride`
 * apart, heads `head_stride` apart (views into a KV cache need no copy);
 * the mask is additive (NULL: none). x86-64 with AVX2 and FMA; dim % 8 == 0. */
#include <immintrin.h>
#include <math.h>
#include <stddef.h>
#include <stdlib.h>

static inline float dot(const float *a, const float *b, int n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    for (; i < n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(_mm256_add_ps(s0, s1)), _mm256_extractf128_ps(_mm256_add_ps(s0, s1), 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Returns 0, -1 when out of memory, -2 on bad arguments. */
int attend_one(const float *q, int heads, int kv_heads, int dim, int keys, const float *k, long k_head_stride,
               long k_row_stride, const float *v, long v_head_stride, long v_row_stride, const float *mask,
               float scale, float *out) {
    if (heads <= 0 || kv_heads <= 0 || heads % kv_heads || dim % 8 || keys <= 0) return -2;
    float *p = malloc(sizeof(float) * (size_t)keys);
    if (!p) return -1;
    const int group = heads / kv_heads;
    for (int h = 0; h < heads; h++) {
        const float *qh = q + (size_t)h * dim;
        const float *kh = k + (size_t)(h / group) * k_head_stride, *vh = v + (size_t)(h / group) * v_head_stride;
        float high = -INFINITY;
        for (int j = 0; j < keys; j++) {
            p[j] = scale * dot(qh, kh + (size_t)j * k_row_stride, dim) + (mask ? mask[j] : 0.f);
            high = p[j] > high ? p[j] : high;
        }
        float total = 0.f;
        for (int j = 0; j < keys; j++) {
            p[j] = high == -INFINITY ? 0.f : expf(p[j] - high);
            total += p[j];
        }
        float *oh = out + (size_t)h * dim;
        for (int d = 0; d < dim; d += 8) {
            __m256 acc = _mm256_setzero_ps();
            for (int j = 0; j < keys; j++)
                acc = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), _mm256_loadu_ps(vh + (size_t)j * v_row_stride + d), acc);
            _mm256_storeu_ps(oh + d, _mm256_mul_ps(acc, _mm256_set1_ps(total > 0.f ? 1.f / total : 0.f)));
        }
    }
    free(p);
    return 0;
}
