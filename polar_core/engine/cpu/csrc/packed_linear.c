/* y = x W^T with W kept as the codes of the embedded GGUF, not as float32.
 *
 * Decoding multiplies one token by every weight, so its speed is how fast the
 * weights stream from memory; codes are 1/8 (4-bit) or 1/4 (8-bit) of the
 * float32 bytes. Two formats, each per block of 32 inputs (b = k / 32):
 *
 *   Q4_1 (the layer weights):  W[n, k] = d[n, b] * q[n, k] + m[n, b],  q in 0..15
 *   Q8_0 (the tied LM head):   W[n, k] = d[n, b] * q[n, k],            q in -127..127
 *
 * with d and m float16 values. The sums are taken per block, d * sum(q x)
 * (+ m * sum(x)): the same weights, the float rounding of another summation
 * order. x86-64 with AVX2, FMA and F16C (AVX-512 where the CPU has it), one
 * thread (polar_core/packed.py compiles this at the first load and keeps
 * float32 where it cannot).
 *
 * q4_pack / q8_pack find the codes in a float32 weight and write them in the
 * kernel's layout, or refuse (return 0) unless d * q (+ m) gives back every
 * weight exactly. polar_core.packed.find_q4_codes is the torch reference of
 * q4_pack (same codes, same acceptance).
 *
 * Q4_1 layout: outputs in tiles of 32;
 *   codes  [N/32][K][16] bytes: byte j of (tile t, input k) holds
 *          q[32t + j, k] in its low nibble and q[32t + 16 + j, k] in its high;
 *   scales, mins [N/32][K/32][32] float16 (as in the file: 2 bytes each, not 4).
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "the packed kernels need AVX2, FMA and F16C"
#endif
#include <immintrin.h>
/* Codes are fetched this many bytes ahead (8 blocks of 32 inputs): the
 * weights stream from memory once per token, and the hardware prefetcher
 * alone left ~7% on the table on the development host (thread CPU time). A
 * prefetch past the end of a buffer is harmless: it never faults. */
#define PREFETCH 4096

/* 8 float16 values (scales, minimums) widened to floats. */
static inline __m256 half8(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }

static inline uint16_t to_half(float v) { return _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT); }

/* One tile (32 outputs) for ROWS input rows (1 or 2): the codes are widened
 * to floats once and used for every row. Each row's sums are split in SPLIT
 * partial sums: consecutive FMAs into one register would wait on each other's
 * latency. Inlined with constant ROWS and SPLIT, the arrays live in registers. */
static inline __attribute__((always_inline)) void
tile_product(const int ROWS, const int SPLIT, const float *const x[2], const float *const x_block_sums[2], int K,
             const uint8_t *codes, const uint16_t *scales, const uint16_t *mins, float *const y[2]) {
    const __m256i low_nibble = _mm256_set1_epi32(15);
    __m256 acc[2][4];
    for (int r = 0; r < ROWS; r++)
        for (int v = 0; v < 4; v++) acc[r][v] = _mm256_setzero_ps();
    for (int b = 0; b < K / 32; b++) {
        __m256 part[2][2][4];
        for (int r = 0; r < ROWS; r++)
            for (int u = 0; u < SPLIT; u++)
                for (int v = 0; v < 4; v++) part[r][u][v] = _mm256_setzero_ps();
        for (int line = 0; line < 512; line += 64)
            _mm_prefetch((const char *)(codes + (size_t)(32 * b) * 16 + PREFETCH + line), _MM_HINT_T0);
        _mm_prefetch((const char *)(scales + 32 * b) + PREFETCH / 8, _MM_HINT_T0);
        _mm_prefetch((const char *)(mins + 32 * b) + PREFETCH / 8, _MM_HINT_T0);
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
                acc[r][v] = _mm256_fmadd_ps(half8(scales + 32 * b + 8 * v), codes_dot_x, acc[r][v]);
                acc[r][v] = _mm256_fmadd_ps(half8(mins + 32 * b + 8 * v), x_sum, acc[r][v]);
            }
        }
    }
    for (int r = 0; r < ROWS; r++)
        for (int v = 0; v < 4; v++) _mm256_storeu_ps(y[r] + 8 * v, acc[r][v]);
}


#if defined(__AVX512F__) && !defined(POLAR_NO_AVX512)
/* The same tile with 16-lane vectors, on CPUs with AVX-512 (-march=native says
 * so; -DPOLAR_NO_AVX512 keeps the AVX2 code): the same per-block sums, split
 * into 4 partial sums instead of 2, in half the instructions. Widening the
 * codes to floats, not memory, bounds one thread: on the development host
 * (AMD EPYC, Zen 5) a token took ~30% less time (thread CPU time). */
static inline __attribute__((always_inline)) void
tile_product16(const int ROWS, const float *const x[2], const float *const x_block_sums[2], int K,
               const uint8_t *codes, const uint16_t *scales, const uint16_t *mins, float *const y[2]) {
    enum { SPLIT16 = 4 };
    const __m512i low_nibble = _mm512_set1_epi32(15);
    __m512 acc[2][2];
    for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int b = 0; b < K / 32; b++) {
        __m512 part[2][SPLIT16][2];
        for (int r = 0; r < ROWS; r++)
            for (int u = 0; u < SPLIT16; u++) part[r][u][0] = part[r][u][1] = _mm512_setzero_ps();
        for (int line = 0; line < 512; line += 64)
            _mm_prefetch((const char *)(codes + (size_t)(32 * b) * 16 + PREFETCH + line), _MM_HINT_T0);
        _mm_prefetch((const char *)(scales + 32 * b) + PREFETCH / 8, _MM_HINT_T0);
        _mm_prefetch((const char *)(mins + 32 * b) + PREFETCH / 8, _MM_HINT_T0);
        for (int k = 32 * b; k < 32 * b + 32; k += SPLIT16) {
            for (int u = 0; u < SPLIT16; u++) {
                const __m128i raw = _mm_loadu_si128((const __m128i *)(codes + (size_t)(k + u) * 16));
                const __m512i q = _mm512_cvtepu8_epi32(raw); /* lane j: outputs j (low nibble), 16 + j (high) */
                const __m512 w0 = _mm512_cvtepi32_ps(_mm512_and_si512(q, low_nibble)); /* outputs 0-15 */
                const __m512 w1 = _mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4));         /* outputs 16-31 */
                for (int r = 0; r < ROWS; r++) {
                    const __m512 xk = _mm512_set1_ps(x[r][k + u]);
                    part[r][u][0] = _mm512_fmadd_ps(w0, xk, part[r][u][0]);
                    part[r][u][1] = _mm512_fmadd_ps(w1, xk, part[r][u][1]);
                }
            }
        }
        const __m512 d[2] = {_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scales + 32 * b))),
                             _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scales + 32 * b + 16)))};
        const __m512 m[2] = {_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(mins + 32 * b))),
                             _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(mins + 32 * b + 16)))};
        for (int r = 0; r < ROWS; r++) {
            const __m512 x_sum = _mm512_set1_ps(x_block_sums[r][b]);
            for (int v = 0; v < 2; v++) {
                __m512 codes_dot_x = _mm512_add_ps(_mm512_add_ps(part[r][0][v], part[r][1][v]),
                                                   _mm512_add_ps(part[r][2][v], part[r][3][v]));
                acc[r][v] = _mm512_fmadd_ps(d[v], codes_dot_x, acc[r][v]);
                acc[r][v] = _mm512_fmadd_ps(m[v], x_sum, acc[r][v]);
            }
        }
    }
    for (int r = 0; r < ROWS; r++) {
        _mm512_storeu_ps(y[r], acc[r][0]);
        _mm512_storeu_ps(y[r] + 16, acc[r][1]);
    }
}
#define TILE_PRODUCT(ROWS, SPLIT, x, s, K, c, d, m, y) tile_product16(ROWS, x, s, K, c, d, m, y)
#else
#define TILE_PRODUCT(ROWS, SPLIT, x, s, K, c, d, m, y) tile_product(ROWS, SPLIT, x, s, K, c, d, m, y)
#endif

static void block_sums(const float *x, int K, float *sums) {
    for (int b = 0; b < K / 32; b++) {
        float s = 0.f;
        for (int j = 0; j < 32; j++) s += x[32 * b + j];
        sums[b] = s;
    }
}

/* Per row, the sums of x over each block of 32 inputs (for the minimums). */
static float *block_sums_of_rows(const float *x, int rows, int K) {
    float *sums = malloc(sizeof(float) * (size_t)rows * (K / 32) + 1);
    if (!sums) return NULL;
    for (int r = 0; r < rows; r++) block_sums(x + (size_t)r * K, K, sums + (size_t)r * (K / 32));
    return sums;
}

/* Returns 0, or -1 when out of memory (y untouched). Tiles outside, rows
 * inside: a tile's codes (K * 16 bytes) come from memory once and stay in the
 * first-level cache for the other rows. */
int q4_linear(const float *x, int rows, int K, int N, const uint8_t *codes,
              const uint16_t *scales, const uint16_t *mins, float *y) {
    float *sums = block_sums_of_rows(x, rows, K);
    if (!sums) return -1;
    const int blocks = K / 32;
    for (int t = 0; t < N / 32; t++) {
        const uint8_t *ct = codes + (size_t)t * K * 16;
        const uint16_t *st = scales + (size_t)t * K, *mt = mins + (size_t)t * K;
        for (int r = 0; r < rows; r += 2) {  /* rows in pairs: one widening of the codes serves two */
            const int pair = rows - r >= 2;
            const float *xr[2] = {x + (size_t)r * K, x + (size_t)(r + pair) * K};
            const float *sr[2] = {sums + (size_t)r * blocks, sums + (size_t)(r + pair) * blocks};
            float *yr[2] = {y + (size_t)r * N + 32 * t, y + (size_t)(r + pair) * N + 32 * t};
            if (pair)
                TILE_PRODUCT(2, 1, xr, sr, K, ct, st, mt, yr);
            else
                TILE_PRODUCT(1, 2, xr, sr, K, ct, st, mt, yr);
        }
    }
    free(sums);
    return 0;
}

static float to_half_and_back(float v) {
    return _cvtsh_ss(_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT));
}

/* Codes, scales and minimums of a row-major (N, K) weight in the layout above;
 * returns 1 if they give back every weight exactly, 0 (outputs unspecified)
 * if not. Per block of 32 inputs, as Q4_1 stores it: minimum m = the block
 * minimum, scale d = (max - min) / 15, both float16, codes round((w - m) / d).
 * Exactness is checked in double precision, where d * q + m has no rounding
 * (float16 d and m, 4-bit q), so the kernel multiplies by the very weights. */
int q4_pack(const float *w, int N, int K, uint8_t *codes, uint16_t *scales, uint16_t *mins) {
    const int blocks = K / 32;
    memset(codes, 0, (size_t)N * K / 2);
    for (int n = 0; n < N; n++) {
        const int tile = n / 32, lane = n % 32, shift = 4 * (lane / 16), byte = lane % 16;
        for (int b = 0; b < blocks; b++) {
            const float *x = w + (size_t)n * K + 32 * b;
            float low = x[0], high = x[0];
            for (int k = 1; k < 32; k++) {
                low = x[k] < low ? x[k] : low;
                high = x[k] > high ? x[k] : high;
            }
            const float scale = to_half_and_back((high - low) / 15.0f);
            if (to_half_and_back(low) != low || !isfinite(scale)) return 0;
            for (int k = 0; k < 32; k++) {
                float q = scale > 0 ? nearbyintf((x[k] - low) / scale) : 0.0f;
                q = q < 0 ? 0 : (q > 15 ? 15 : q);
                if ((double)scale * q + (double)low != (double)x[k]) return 0;
                codes[((size_t)tile * K + 32 * b + k) * 16 + byte] |= (uint8_t)((int)q << shift);
            }
            scales[((size_t)tile * blocks + b) * 32 + lane] = to_half(scale);
            mins[((size_t)tile * blocks + b) * 32 + lane] = to_half(low);
        }
    }
    return 1;
}

/* ---- 8-bit codes (Q8_0, the embedded model's tied LM head) --------------------
 *
 *     W[n, k] = d[n, b] * q[n, k],   b = k / 32,  q in -127..127, d float16.
 *
 * Layout: the outputs in tiles of 16; codes [N/16][K][16] signed bytes (byte j
 * of (tile t, input k) is q[16t + j, k]); scales [N/16][K/32][16] float16. */

#if defined(__AVX512F__) && !defined(POLAR_NO_AVX512)
/* One tile (16 outputs) of one input row with 16-lane vectors. */
static inline __attribute__((always_inline)) void
q8_tile(const float *xr, int K, const int8_t *c, const uint16_t *d, float *y) {
    __m512 acc = _mm512_setzero_ps();
    for (int b = 0; b < K / 32; b++) {
        __m512 part[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int line = 0; line < 512; line += 64)
            _mm_prefetch((const char *)(c + (size_t)(32 * b) * 16 + PREFETCH + line), _MM_HINT_T0);
        _mm_prefetch((const char *)(d + 16 * b) + PREFETCH / 16, _MM_HINT_T0);
        for (int k = 32 * b; k < 32 * b + 32; k += 4)
            for (int u = 0; u < 4; u++) {
                const __m128i raw = _mm_loadu_si128((const __m128i *)(c + (size_t)(k + u) * 16));
                const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw));
                part[u] = _mm512_fmadd_ps(w, _mm512_set1_ps(xr[k + u]), part[u]);
            }
        const __m512 codes_dot_x = _mm512_add_ps(_mm512_add_ps(part[0], part[1]), _mm512_add_ps(part[2], part[3]));
        acc = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(d + 16 * b))), codes_dot_x, acc);
    }
    _mm512_storeu_ps(y, acc);
}
#else
/* One tile (16 outputs) of one input row: y[0..15] = sum_k W[16t + j, k] x[k]. */
static inline __attribute__((always_inline)) void
q8_tile(const float *xr, int K, const int8_t *c, const uint16_t *d, float *y) {
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int b = 0; b < K / 32; b++) {
        __m256 part[4][2];  /* four partial sums per output vector, for FMA latency */
        for (int u = 0; u < 4; u++) part[u][0] = part[u][1] = _mm256_setzero_ps();
        for (int line = 0; line < 512; line += 64)
            _mm_prefetch((const char *)(c + (size_t)(32 * b) * 16 + PREFETCH + line), _MM_HINT_T0);
        _mm_prefetch((const char *)(d + 16 * b) + PREFETCH / 16, _MM_HINT_T0);
        for (int k = 32 * b; k < 32 * b + 32; k += 4) {
            for (int u = 0; u < 4; u++) {
                __m128i raw = _mm_loadu_si128((const __m128i *)(c + (size_t)(k + u) * 16));
                __m256 xk = _mm256_set1_ps(xr[k + u]);
                part[u][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw)), xk, part[u][0]);
                part[u][1] = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(raw, 8))), xk, part[u][1]);
            }
        }
        for (int v = 0; v < 2; v++) {
            __m256 codes_dot_x = _mm256_add_ps(_mm256_add_ps(part[0][v], part[1][v]),
                                               _mm256_add_ps(part[2][v], part[3][v]));
            acc[v] = _mm256_fmadd_ps(half8(d + 16 * b + 8 * v), codes_dot_x, acc[v]);
        }
    }
    _mm256_storeu_ps(y, acc[0]);
    _mm256_storeu_ps(y + 8, acc[1]);
}

#endif

int q8_linear(const float *x, int rows, int K, int N, const int8_t *codes,
              const uint16_t *scales, const uint16_t *unused, float *y) {
    (void)unused;
    for (int t = 0; t < N / 16; t++) {
        const int8_t *c = codes + (size_t)t * K * 16;
        const uint16_t *d = scales + (size_t)t * (K / 32) * 16;
        for (int r = 0; r < rows; r++)  /* the tile's codes stay in cache for the other rows */
            q8_tile(x + (size_t)r * K, K, c, d, y + (size_t)r * N + 16 * t);
    }
    return 0;
}

/* As q4_pack, for Q8_0: scale d = max |w| / 127 (float16), codes round(w / d). */
int q8_pack(const float *w, int N, int K, int8_t *codes, uint16_t *scales, uint16_t *unused) {
    (void)unused;
    const int blocks = K / 32;
    for (int n = 0; n < N; n++) {
        const int tile = n / 16, lane = n % 16;
        for (int b = 0; b < blocks; b++) {
            const float *x = w + (size_t)n * K + 32 * b;
            float amax = 0.f;
            for (int k = 0; k < 32; k++) amax = fabsf(x[k]) > amax ? fabsf(x[k]) : amax;
            const float scale = to_half_and_back(amax / 127.0f);
            if (!isfinite(scale)) return 0;
            for (int k = 0; k < 32; k++) {
                float q = scale > 0 ? nearbyintf(x[k] / scale) : 0.0f;
                q = q < -127 ? -127 : (q > 127 ? 127 : q);
                if ((double)scale * q != (double)x[k]) return 0;
                codes[((size_t)tile * K + 32 * b + k) * 16 + lane] = (int8_t)q;
            }
            scales[((size_t)tile * blocks + b) * 16 + lane] = to_half(scale);
        }
    }
    return 1;
}

/* ---- 8-bit codes with float32 scales per 16 inputs (Q5_0, Q4_K, Q6_K weights) ---- */
#include "packed_int8x16.c"
