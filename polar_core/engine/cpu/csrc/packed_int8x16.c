/* y = x W^T on 8-bit codes with a float32 scale (and offset) per 16 inputs.
 *
 * Included by packed_linear.c (its helpers and includes come first). The
 * formats of Gemma 3 270M's layer weights do not fit the Q4_1 / Q8_0 kernels:
 *
 *   Q5_0: W = d * q,                 q in -16..15, d float16 per 32 inputs
 *   Q6_K: W = (d * s) * q,           q in -32..31, s int8 per 16, d float16 per 256
 *   Q4_K: W = (d * s) * q - dmin * m,  q in 0..15, s, m 6-bit per 32, d, dmin float16 per 256
 *
 * and transformers keeps them as the float32 values of those products. Each
 * is one grid per block of 16 inputs (b = k / 16):
 *
 *   I8X16:   W[n, k] = d[n, b] * q[n, k]              (Q5_0, Q6_K; Q8_0 too)
 *   I8X16M:  W[n, k] = d[n, b] * q[n, k] + m[n, b]    (Q4_K)
 *
 * with q in -127..127 and d, m float32: the scale of a K-quant is a product
 * of two stored numbers, and there is no float16 that equals it. One byte
 * per code is more than the file's 4.5-6.5 bits, but a quarter of float32,
 * and one kernel serves all three formats.
 *
 * i8x16_pack / i8x16m_pack find a grid in the float32 weight and refuse the
 * weight (return 0) unless d * q (+ m) gives back every weight exactly.
 * Any exact grid will do: the codes need not be the file's, only the weights.
 *
 * Layout (as Q8_0's): outputs in tiles of 16;
 *   codes         [N/16][K][16] signed bytes, byte j of (tile t, input k) is q[16t + j, k];
 *   scales, mins  [N/16][K/16][16] float32. */

/* One tile (16 outputs) of one input row; mins NULL: the offset-free format.
 * Per block of 16 inputs: d * sum(q x) (+ m * sum(x)). */
static inline __attribute__((always_inline)) void
i8x16_tile(const float *xr, const float *x_sums, int K, const int8_t *c, const float *d, const float *m, float *y) {
#if defined(__AVX512F__) && !defined(POLAR_NO_AVX512)
    __m512 acc = _mm512_setzero_ps();
    for (int b = 0; b < K / 16; b++) {
        __m512 part[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int line = 0; line < 256; line += 64)
            _mm_prefetch((const char *)(c + (size_t)(16 * b) * 16 + PREFETCH + line), _MM_HINT_T0);
        _mm_prefetch((const char *)(d + 16 * b) + PREFETCH / 4, _MM_HINT_T0);
        for (int k = 16 * b; k < 16 * b + 16; k += 4)
            for (int u = 0; u < 4; u++) {
                const __m128i raw = _mm_loadu_si128((const __m128i *)(c + (size_t)(k + u) * 16));
                const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw));
                part[u] = _mm512_fmadd_ps(w, _mm512_set1_ps(xr[k + u]), part[u]);
            }
        const __m512 codes_dot_x = _mm512_add_ps(_mm512_add_ps(part[0], part[1]), _mm512_add_ps(part[2], part[3]));
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(d + 16 * b), codes_dot_x, acc);
        if (m) acc = _mm512_fmadd_ps(_mm512_loadu_ps(m + 16 * b), _mm512_set1_ps(x_sums[b]), acc);
    }
    _mm512_storeu_ps(y, acc);
#else
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int b = 0; b < K / 16; b++) {
        __m256 part[4][2]; /* four partial sums per output vector, for FMA latency */
        for (int u = 0; u < 4; u++) part[u][0] = part[u][1] = _mm256_setzero_ps();
        for (int line = 0; line < 256; line += 64)
            _mm_prefetch((const char *)(c + (size_t)(16 * b) * 16 + PREFETCH + line), _MM_HINT_T0);
        _mm_prefetch((const char *)(d + 16 * b) + PREFETCH / 4, _MM_HINT_T0);
        for (int k = 16 * b; k < 16 * b + 16; k += 4)
            for (int u = 0; u < 4; u++) {
                const __m128i raw = _mm_loadu_si128((const __m128i *)(c + (size_t)(k + u) * 16));
                const __m256 xk = _mm256_set1_ps(xr[k + u]);
                part[u][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw)), xk, part[u][0]);
                part[u][1] = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(raw, 8))), xk, part[u][1]);
            }
        for (int v = 0; v < 2; v++) {
            const __m256 codes_dot_x = _mm256_add_ps(_mm256_add_ps(part[0][v], part[1][v]),
                                                     _mm256_add_ps(part[2][v], part[3][v]));
            acc[v] = _mm256_fmadd_ps(_mm256_loadu_ps(d + 16 * b + 8 * v), codes_dot_x, acc[v]);
            if (m) acc[v] = _mm256_fmadd_ps(_mm256_loadu_ps(m + 16 * b + 8 * v), _mm256_set1_ps(x_sums[b]), acc[v]);
        }
    }
    _mm256_storeu_ps(y, acc[0]);
    _mm256_storeu_ps(y + 8, acc[1]);
#endif
}

/* Returns 0, or -1 when out of memory (y untouched). */
static int i8x16_product(const float *x, int rows, int K, int N, const int8_t *codes, const float *scales,
                         const float *mins, float *y) {
    float *sums = NULL;
    if (mins) {  /* per row, x's sums per block of 16 inputs (for the offsets) */
        sums = malloc(sizeof(float) * (size_t)rows * (K / 16) + 1);
        if (!sums) return -1;
        for (int r = 0; r < rows; r++)
            for (int b = 0; b < K / 16; b++) {
                float s = 0.f;
                for (int j = 0; j < 16; j++) s += x[(size_t)r * K + 16 * b + j];
                sums[(size_t)r * (K / 16) + b] = s;
            }
    }
    for (int t = 0; t < N / 16; t++) {
        const int8_t *c = codes + (size_t)t * K * 16;
        const float *d = scales + (size_t)t * K, *m = mins ? mins + (size_t)t * K : NULL;
        for (int r = 0; r < rows; r++)  /* the tile's codes stay in cache for the other rows */
            i8x16_tile(x + (size_t)r * K, sums ? sums + (size_t)r * (K / 16) : NULL, K, c, d, m,
                       y + (size_t)r * N + 16 * t);
    }
    free(sums);
    return 0;
}

int i8x16_linear(const float *x, int rows, int K, int N, const int8_t *codes, const float *scales,
                 const float *unused, float *y) {
    (void)unused;
    return i8x16_product(x, rows, K, N, codes, scales, NULL, y);
}

int i8x16m_linear(const float *x, int rows, int K, int N, const int8_t *codes, const float *scales,
                  const float *mins, float *y) {
    return i8x16_product(x, rows, K, N, codes, scales, mins, y);
}

/* Whether low + d * q == w exactly, in real numbers. d * q is exact in double
 * (24-bit d, 8-bit q); the sum's rounding error (Knuth's two-sum) must be zero. */
static inline int on_grid(float w, float d, float q, float low) {
    const double p = (double)d * q, s = p + low, back = s - p;
    return s == (double)w && (p - (s - back)) + ((double)low - back) == 0.0;
}

/* One block of 16 weights x: the coarsest grid low + d * q with q in 0..steps
 * (offset: low = the block minimum, steps up to 127) or -steps..steps (no
 * offset: low = 0, d = max |x| / steps) that holds every weight exactly;
 * writes the codes (stride 16) and returns 1, or returns 0 when none does.
 * Any exact grid will do. The step counts of the GGUF formats are tried
 * first (Q5_0's max |w| is 16 d, Q4_K's span at most 15 d, Q8_0's 127 d,
 * Q6_K's up to 32 d), then every count from 1 up; a wrong count fails at its
 * first weight off the grid. That keeps packing Gemma's weights to ~1 s. */
static int find_grid(const float *x, int offset, int8_t *codes, float *scale, float *low_out) {
    float low = x[0], high = x[0], amax = 0.f;
    for (int k = 0; k < 16; k++) {
        low = x[k] < low ? x[k] : low;
        high = x[k] > high ? x[k] : high;
        amax = fabsf(x[k]) > amax ? fabsf(x[k]) : amax;
    }
    const float base = offset ? low : 0.f, span = offset ? high - low : amax;
    if (!isfinite(span)) return 0;
    if (span == 0.f) {  /* a constant block: every code 0 */
        if (!offset && low != 0.f) return 0;
        for (int k = 0; k < 16; k++) codes[16 * k] = 0;
        *scale = 0.f, *low_out = base;
        return 1;
    }
    static const int likely[] = {16, 15, 32, 31, 127};
    const int n_likely = (int)(sizeof likely / sizeof likely[0]);
    for (int attempt = 0; attempt < n_likely + 127; attempt++) {
        const int steps = attempt < n_likely ? likely[attempt] : attempt - n_likely + 1;
        const float d = span / (float)steps;
        int k = 0;
        for (; k < 16; k++) {
            const float q = nearbyintf((x[k] - base) / d);
            if (q < -127 || q > 127 || !on_grid(x[k], d, q, base)) break;
            codes[16 * k] = (int8_t)q;
        }
        if (k == 16) {
            *scale = d, *low_out = base;
            return 1;
        }
    }
    return 0;
}

/* Codes, scales (and mins) of a row-major (N, K) weight in the layout above;
 * 1 if they give back every weight exactly, 0 (outputs unspecified) if not. */
static int i8x16_find(const float *w, int N, int K, int8_t *codes, float *scales, float *mins) {
    for (int n = 0; n < N; n++) {
        const int tile = n / 16, lane = n % 16;
        for (int b = 0; b < K / 16; b++) {
            float d, low;
            int8_t *c = codes + ((size_t)tile * K + 16 * b) * 16 + lane;
            if (!find_grid(w + (size_t)n * K + 16 * b, mins != NULL, c, &d, &low)) return 0;
            scales[((size_t)tile * (K / 16) + b) * 16 + lane] = d;
            if (mins) mins[((size_t)tile * (K / 16) + b) * 16 + lane] = low;
        }
    }
    return 1;
}

int i8x16_pack(const float *w, int N, int K, int8_t *codes, float *scales, float *unused) {
    (void)unused;
    return i8x16_find(w, N, K, codes, scales, NULL);
}

int i8x16m_pack(const float *w, int N, int K, int8_t *codes, float *scales, float *mins) {
    return i8x16_find(w, N, K, codes, scales, mins);
}
