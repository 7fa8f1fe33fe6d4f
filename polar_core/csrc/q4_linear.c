/* y = x W^T for a weight W whose rows are 4-bit codes with a scale and a
 * minimum per block of 32 inputs (the Q4_1 format of the embedded GGUF):
 *
 *     W[n, k] = d[n, b] * q[n, k] + m[n, b],   b = k / 32,  q in 0..15.
 *
 * Decoding multiplies one token by every weight, so its speed is how fast the
 * weights stream from memory: the codes are 1/8 of the float32 bytes. The sum
 * is taken per block, d * sum(q x) + m * sum(x): the same weights, the float
 * rounding of a different summation order.
 *
 * Layout (see polar_core/packed.py): the outputs are cut in tiles of 32;
 *   codes  [N/32][K][16] bytes: byte j of (tile t, input k) holds
 *          q[32t + j, k] in its low nibble and q[32t + 16 + j, k] in its high;
 *   scales, mins [N/32][K/32][32] floats.
 * One thread; x86-64 with AVX2 and FMA (elsewhere the library keeps float32).
 */
#include <stddef.h>
#include <stdint.h>

#if !defined(__AVX2__) || !defined(__FMA__)
#error "q4_linear needs AVX2 and FMA"
#endif
#include <immintrin.h>

/* One tile (32 outputs) for ROWS input rows (1 or 2): the codes are widened
 * to floats once and used for every row. Each row's sums are split in SPLIT
 * partial sums: consecutive FMAs into one register would wait on each other's
 * latency. Inlined with constant ROWS and SPLIT, the arrays live in registers. */
static inline __attribute__((always_inline)) void
tile_product(const int ROWS, const int SPLIT, const float *const x[2], const float *const x_block_sums[2], int K,
             const uint8_t *codes, const float *scales, const float *mins, float *const y[2]) {
    const __m256i low_nibble = _mm256_set1_epi32(15);
    __m256 acc[2][4];
    for (int r = 0; r < ROWS; r++)
        for (int v = 0; v < 4; v++) acc[r][v] = _mm256_setzero_ps();
    for (int b = 0; b < K / 32; b++) {
        __m256 part[2][2][4];
        for (int r = 0; r < ROWS; r++)
            for (int u = 0; u < SPLIT; u++)
                for (int v = 0; v < 4; v++) part[r][u][v] = _mm256_setzero_ps();
        for (int k = 32 * b; k < 32 * b + 32; k += SPLIT) {
            for (int u = 0; u < SPLIT; u++) {
                __m128i raw = _mm_loadu_si128((const __m128i *)(codes + (size_t)(k + u) * 16));
                __m256i q0 = _mm256_cvtepu8_epi32(raw);                     /* outputs 0-7, 16-23 */
                __m256i q1 = _mm256_cvtepu8_epi32(_mm_srli_si128(raw, 8));  /* outputs 8-15, 24-31 */
                __m256 w[4] = {_mm256_cvtepi32_ps(_mm256_and_si256(q0, low_nibble)),
                               _mm256_cvtepi32_ps(_mm256_and_si256(q1, low_nibble)),
                               _mm256_cvtepi32_ps(_mm256_srli_epi32(q0, 4)),
                               _mm256_cvtepi32_ps(_mm256_srli_epi32(q1, 4))};
                for (int r = 0; r < ROWS; r++) {
                    __m256 xk = _mm256_set1_ps(x[r][k + u]);
                    for (int v = 0; v < 4; v++) part[r][u][v] = _mm256_fmadd_ps(w[v], xk, part[r][u][v]);
                }
            }
        }
        for (int r = 0; r < ROWS; r++) {
            __m256 x_sum = _mm256_set1_ps(x_block_sums[r][b]);
            for (int v = 0; v < 4; v++) {
                __m256 codes_dot_x = part[r][0][v];
                for (int u = 1; u < SPLIT; u++) codes_dot_x = _mm256_add_ps(codes_dot_x, part[r][u][v]);
                acc[r][v] = _mm256_fmadd_ps(_mm256_loadu_ps(scales + 32 * b + 8 * v), codes_dot_x, acc[r][v]);
                acc[r][v] = _mm256_fmadd_ps(_mm256_loadu_ps(mins + 32 * b + 8 * v), x_sum, acc[r][v]);
            }
        }
    }
    for (int r = 0; r < ROWS; r++)
        for (int v = 0; v < 4; v++) _mm256_storeu_ps(y[r] + 8 * v, acc[r][v]);
}

static void block_sums(const float *x, int K, float *sums) {
    for (int b = 0; b < K / 32; b++) {
        float s = 0.f;
        for (int j = 0; j < 32; j++) s += x[32 * b + j];
        sums[b] = s;
    }
}

void q4_linear(const float *x, int rows, int K, int N, const uint8_t *codes,
               const float *scales, const float *mins, float *y) {
    for (int r = 0; r < rows; r += 2) {  /* rows in pairs: one widening of the codes serves two */
        const int pair = rows - r >= 2;
        float sums[2][K / 32];
        const float *xr[2] = {x + (size_t)r * K, x + (size_t)(r + pair) * K};
        const float *sr[2] = {sums[0], sums[1]};
        block_sums(xr[0], K, sums[0]);
        if (pair) block_sums(xr[1], K, sums[1]);
        for (int t = 0; t < N / 32; t++) {
            float *yr[2] = {y + (size_t)r * N + 32 * t, y + (size_t)(r + pair) * N + 32 * t};
            const uint8_t *ct = codes + (size_t)t * K * 16;
            if (pair)
                tile_product(2, 1, xr, sr, K, ct, scales + (size_t)t * K, mins + (size_t)t * K, yr);
            else
                tile_product(1, 2, xr, sr, K, ct, scales + (size_t)t * K, mins + (size_t)t * K, yr);
        }
    }
}
