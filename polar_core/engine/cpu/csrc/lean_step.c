/* The lean decode step: one program step (one pre-norm decoder layer) for a
 * few new tokens of one sequence, in one C call, on the GGUF codes.
 *
 *   x  = rmsnorm(h) * w_attn
 *   q, k, v = x Wq^T (+ bq), x Wk^T (+ bk), x Wv^T (+ bv)        codes (Q4_1 or Q8_0)
 *   q, k = rope(qk_norm(q)), rope(qk_norm(k))                   qk_norm: Qwen3 only
 *   keys/values of this step's own KV slot [start + i] = k, v
 *   a  = softmax(q K^T * scale over the slot's keys <= own position) V    (GQA, sliding window)
 *   h  = h + a Wo^T
 *   h  = h + down(silu(gate(rmsnorm(h) * w_mlp)) * up(...))
 *
 * This is what transformers' Llama / Mistral / Qwen2 / Qwen3 decoder layers
 * compute (polar_core/engine/cpu/lean.py checks the layer's structure and
 * compares one call with the reference at load); the sums are rounded in
 * another order. The KV slot is the program step's (polar_core.engine.cache),
 * so a looped layer keeps one slot per visit, exactly as on the reference path.
 *
 * Threads: the caller and up to 63 workers split every product by blocks of 32
 * outputs and the attention by (token, head); each output is computed by one
 * thread in a fixed order, so results do not depend on the thread count.
 * Workers are started at the first multi-threaded call, spin briefly between
 * calls and then sleep. One caller at a time uses them; a concurrent caller
 * (another Python thread) runs its step alone on its own thread.
 */
#define _GNU_SOURCE
#include "packed_linear.c"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <time.h>
#include <unistd.h>

enum { FORMAT_Q4_1 = 0, FORMAT_Q8_0 = 1 };
#define UNIT 32          /* outputs per unit of work (a Q4_1 tile, two Q8_0 tiles) */
#define MAX_THREADS 64
#define MAX_HEAD_DIM 512

/* The ctypes Structures in lean.py mirror these three. */
typedef struct {
    int32_t format, in, out, tile;
    const void *codes;
    const uint16_t *scales, *mins; /* float16; mins: Q4_1 only */
    const float *bias;             /* may be NULL */
} lean_weight;

typedef struct {
    lean_weight q, k, v, o, gate, up, down;
    const float *attn_norm, *mlp_norm; /* input_layernorm, post_attention_layernorm weights */
    const float *q_norm, *k_norm;      /* per-head RMSNorm weights (Qwen3), else NULL */
} lean_layer;

typedef struct {
    int32_t hidden, heads, kv_heads, head_dim, inter, layers;
    float eps, scale;
    const lean_layer *layer; /* [layers] */
    const float *final_norm;
    lean_weight head;        /* the LM head; format -1: none */
} lean_model;

/* ---- small vector helpers ---------------------------------------------------- */

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* exp(x) to ~1 ulp (Cephes' expf polynomial after x = n ln2 + r, |r| <= ln2 / 2). */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* out = w * (x / sqrt(mean(x^2) + eps)), as transformers' RMSNorm; n % 8 == 0. */
static void rms_norm(const float *x, const float *w, int n, float eps, float *out) {
    __m256 acc = _mm256_setzero_ps();
    for (int i = 0; i < n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        acc = _mm256_fmadd_ps(v, v, acc);
    }
    const __m256 inv = _mm256_set1_ps(1.0f / sqrtf(hsum(acc) / (float)n + eps));
    for (int i = 0; i < n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_loadu_ps(w + i), _mm256_mul_ps(_mm256_loadu_ps(x + i), inv)));
}

/* Rotary embedding in transformers' convention: x * cos + rotate_half(x) * sin. */
static void rope(float *x, const float *cos, const float *sin, int dim) {
    float tmp[MAX_HEAD_DIM];
    const int half = dim / 2;
    memcpy(tmp, x, sizeof(float) * (size_t)dim);
    for (int d = 0; d < half; d++) x[d] = tmp[d] * cos[d] - tmp[d + half] * sin[d];
    for (int d = half; d < dim; d++) x[d] = tmp[d] * cos[d] + tmp[d - half] * sin[d];
}

static inline void split(int total, int ith, int nth, int *begin, int *end) {
    *begin = (int)((long)total * ith / nth);
    *end = (int)((long)total * (ith + 1) / nth);
}

/* y[r * ldy + o] = x_r . W[o] (+ bias) for outputs o in units [u0, u1) of 32,
 * rows r < rows of x (row stride ldx); sums: per row, x's sums per block of 32. */
static void product_units(const lean_weight *w, const float *x, int ldx, const float *sums, int rows,
                          float *y, int ldy, int u0, int u1) {
    const int K = w->in, blocks = K / 32;
    if (w->format == FORMAT_Q4_1) {
        for (int t = u0; t < u1; t++) {
            const uint8_t *ct = (const uint8_t *)w->codes + (size_t)t * K * 16;
            const uint16_t *st = w->scales + (size_t)t * K, *mt = w->mins + (size_t)t * K;
            for (int r = 0; r < rows; r += 2) {
                const int pair = rows - r >= 2;
                const float *xr[2] = {x + (size_t)r * ldx, x + (size_t)(r + pair) * ldx};
                const float *sr[2] = {sums + (size_t)r * blocks, sums + (size_t)(r + pair) * blocks};
                float *yr[2] = {y + (size_t)r * ldy + 32 * t, y + (size_t)(r + pair) * ldy + 32 * t};
                if (pair)
                    TILE_PRODUCT(2, 1, xr, sr, K, ct, st, mt, yr);
                else
                    TILE_PRODUCT(1, 2, xr, sr, K, ct, st, mt, yr);
            }
        }
    } else {
        for (int t = 2 * u0; t < 2 * u1; t++) {
            const int8_t *c = (const int8_t *)w->codes + (size_t)t * K * 16;
            const uint16_t *d = w->scales + (size_t)t * blocks * 16;
            for (int r = 0; r < rows; r++) q8_tile(x + (size_t)r * ldx, K, c, d, y + (size_t)r * ldy + 16 * t);
        }
    }
    if (w->bias)
        for (int r = 0; r < rows; r++)
            for (int o = UNIT * u0; o < UNIT * u1; o++) y[(size_t)r * ldy + o] += w->bias[o];
}

static void row_block_sums(const float *x, int rows, int K, float *sums) {
    for (int r = 0; r < rows; r++) block_sums(x + (size_t)r * K, K, sums + (size_t)r * (K / 32));
}

/* ---- the team of threads ------------------------------------------------------- *
 *
 * Work is handed out in chunks from a counter per phase, and a phase ends when
 * all its chunks are done, not when every thread has arrived: on a shared
 * machine a worker that lost its core for a while delays nothing but the chunk
 * it holds, and the caller does the rest. A worker joins a job only while the
 * job is open; the caller closes it when done and waits for the workers that
 * joined, so none touches a job after its call returned. */

typedef void (*team_fn)(void *job, int ith, int nth);

static struct {
    pthread_mutex_t busy;  /* held by the one caller using the workers */
    pthread_mutex_t lock;  /* with `wake`: workers that sleep */
    pthread_cond_t wake;
    int workers;
    atomic_uint state;     /* 2 * job number + 1 while the job is open */
    atomic_int joined;     /* workers inside the current job */
    team_fn fn;
    void *job;
    int nth;
} team = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, NULL, NULL, 0};

static pthread_once_t team_once = PTHREAD_ONCE_INIT;

/* A forked child has none of the workers (and maybe a held lock): start afresh. */
static void team_after_fork(void) {
    pthread_mutex_init(&team.busy, NULL);
    pthread_mutex_init(&team.lock, NULL);
    pthread_cond_init(&team.wake, NULL);
    team.workers = 0;
    atomic_store(&team.joined, 0);
}

static void team_init(void) { pthread_atfork(NULL, NULL, team_after_fork); }

static double seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

typedef struct { atomic_int next, done; } phase;

/* Chunk loop: every thread takes chunks of phase P until none are left. */
#define FOR_CHUNKS(P, c, chunks) \
    for (int c; (c = atomic_fetch_add_explicit(&(P)->next, 1, memory_order_relaxed)) < (chunks); \
         atomic_fetch_add_explicit(&(P)->done, 1, memory_order_release))

/* Whether chunks are left: a worker that joins late skips the preparations of finished phases. */
static inline int phase_open(phase *p, int chunks) { return atomic_load_explicit(&p->next, memory_order_relaxed) < chunks; }

/* Wait until all `chunks` of the phase are done (their results visible). */
static void phase_wait(phase *p, int chunks) {
    for (unsigned i = 1; atomic_load_explicit(&p->done, memory_order_acquire) < chunks; i++) {
        _mm_pause();
        if ((i & 1023) == 0) sched_yield();  /* the holder of the last chunk may have lost its core */
    }
}

#define IDLE_SPIN_SECONDS 0.002  /* spans the calls of one pass and the Python between tokens */

/* arg: (the job state before the worker's first job << 8) | its index. */
static void *team_worker(void *arg) {
    const int ith = (int)((uintptr_t)arg & 255);
    unsigned seen = (unsigned)((uintptr_t)arg >> 8) >> 1;
    for (;;) {
        double until = 0;
        for (unsigned i = 1; atomic_load_explicit(&team.state, memory_order_acquire) >> 1 == seen; i++) {
            _mm_pause();
            if ((i & 255) == 0) {
                const double now = seconds();
                if (until == 0) until = now + IDLE_SPIN_SECONDS;
                else if (now > until) {
                    pthread_mutex_lock(&team.lock);
                    while (atomic_load(&team.state) >> 1 == seen) pthread_cond_wait(&team.wake, &team.lock);
                    pthread_mutex_unlock(&team.lock);
                }
            }
        }
        const unsigned state = atomic_load(&team.state);
        seen = state >> 1;
        if (!(state & 1)) continue;  /* already closed: too late to help */
        atomic_fetch_add(&team.joined, 1);
        if (atomic_load(&team.state) == state && ith < team.nth) team.fn(team.job, ith, team.nth);
        atomic_fetch_sub(&team.joined, 1);
    }
    return NULL;
}

/* Run fn(job, ith, nth) with up to nth threads (the caller is ith 0; fn must
 * finish the job on its own if no worker joins); alone if the team is busy. */
static void team_run(team_fn fn, void *job, int nth) {
    pthread_once(&team_once, team_init);
    if (nth > MAX_THREADS) nth = MAX_THREADS;
    if (nth <= 1 || pthread_mutex_trylock(&team.busy) != 0) {
        fn(job, 0, 1);
        return;
    }
    while (team.workers < nth - 1) {
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const uintptr_t arg = ((uintptr_t)atomic_load(&team.state) << 8) | (uintptr_t)(team.workers + 1);
        const int failed = pthread_create(&thread, &attr, team_worker, (void *)arg);
        pthread_attr_destroy(&attr);
        if (failed) break;
        team.workers++;
    }
    team.fn = fn;
    team.job = job;
    team.nth = nth < team.workers + 1 ? nth : team.workers + 1;
    const unsigned opened = ((atomic_load(&team.state) >> 1) + 1) * 2 + 1;
    pthread_mutex_lock(&team.lock);
    atomic_store(&team.state, opened);
    pthread_cond_broadcast(&team.wake);
    pthread_mutex_unlock(&team.lock);
    fn(job, 0, team.nth);
    atomic_store(&team.state, opened - 1);  /* closed */
    for (unsigned i = 1; atomic_load(&team.joined) > 0; i++) {
        _mm_pause();
        if ((i & 1023) == 0) sched_yield();
    }
    pthread_mutex_unlock(&team.busy);
}

/* Floats per vector of the products: 16 with AVX-512, 8 with AVX2 (for the status line). */
int lean_vector_width(void) {
#if defined(__AVX512F__) && !defined(POLAR_NO_AVX512)
    return 16;
#else
    return 8;
#endif
}

/* ---- one step ------------------------------------------------------------------ */

enum { PHASE_QKV, PHASE_KV, PHASE_ATTEND, PHASE_OUT, PHASE_MLP, PHASE_DOWN, PHASES };

typedef struct {
    const lean_model *m;
    const lean_layer *L;
    float *h;                 /* (rows, hidden), updated in place */
    int rows, capacity, start, first_key, window;
    float *keys, *values;     /* this step's slot, (kv_heads, capacity, head_dim) each */
    const float *cos, *sin;   /* (rows, head_dim) */
    float *q, *k, *v, *attn, *mid, *act; /* shared scratch */
    float *private_scratch;   /* per thread: private_floats */
    size_t private_floats;
    phase phases[PHASES];
} step_job;

static void attend(const step_job *j, int i, int head, float *scores) {
    const lean_model *m = j->m;
    const int dim = m->head_dim, qd = m->heads * dim;
    const int kv = head / (m->heads / m->kv_heads);
    float *q = j->q + (size_t)i * qd + (size_t)head * dim;
    if (j->L->q_norm) rms_norm(q, j->L->q_norm, dim, m->eps, q);
    rope(q, j->cos + (size_t)i * dim, j->sin + (size_t)i * dim, dim);
    const int last = j->start + i;  /* its own position's cache index: causal */
    int first = j->first_key;
    if (j->window > 0 && last - j->window + 1 > first) first = last - j->window + 1;
    const float *K = j->keys + (size_t)kv * j->capacity * dim, *V = j->values + (size_t)kv * j->capacity * dim;
    const int n = last - first + 1;
    float best = -INFINITY;
    for (int s = 0; s < n; s++) {
        const float *key = K + (size_t)(first + s) * dim;
        __m256 acc = _mm256_setzero_ps();
        for (int d = 0; d < dim; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(key + d), acc);
        scores[s] = hsum(acc) * m->scale;
        best = scores[s] > best ? scores[s] : best;
    }
    int s = 0;
    for (; s + 8 <= n; s += 8)
        _mm256_storeu_ps(scores + s, exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + s), _mm256_set1_ps(best))));
    if (s < n) {
        float tail[8] = {0};
        memcpy(tail, scores + s, sizeof(float) * (size_t)(n - s));
        _mm256_storeu_ps(tail, exp8(_mm256_sub_ps(_mm256_loadu_ps(tail), _mm256_set1_ps(best))));
        memcpy(scores + s, tail, sizeof(float) * (size_t)(n - s));
    }
    float total = 0.f;
    for (s = 0; s < n; s++) total += scores[s];
    const float inv = 1.0f / total;
    float *out = j->attn + (size_t)i * qd + (size_t)head * dim;
    for (int d = 0; d < dim; d += 8) {
        __m256 acc = _mm256_setzero_ps();
        for (s = 0; s < n; s++)
            acc = _mm256_fmadd_ps(_mm256_set1_ps(scores[s] * inv), _mm256_loadu_ps(V + (size_t)(first + s) * dim + d), acc);
        _mm256_storeu_ps(out + d, acc);
    }
}

static void step_team(void *arg, int ith, int nth) {
    (void)nth;
    step_job *j = arg;
    const lean_model *m = j->m;
    const lean_layer *L = j->L;
    const int rows = j->rows, hidden = m->hidden, dim = m->head_dim;
    const int qd = m->heads * dim, kvd = m->kv_heads * dim, inter = m->inter;
    const int wide = hidden > inter ? hidden : inter;
    float *x = j->private_scratch + (size_t)ith * j->private_floats;  /* (rows, wide) */
    float *sums = x + (size_t)rows * wide;                            /* (rows, wide / 32) */
    float *scores = sums + (size_t)rows * (wide / 32 + 1);            /* (capacity) */
    phase *P = j->phases;

    /* q, k, v: one unit of one of the three products per chunk */
    const int uq = qd / UNIT, ukv = kvd / UNIT;
    if (phase_open(&P[PHASE_QKV], uq + 2 * ukv)) {
        for (int r = 0; r < rows; r++) rms_norm(j->h + (size_t)r * hidden, L->attn_norm, hidden, m->eps, x + (size_t)r * hidden);
        row_block_sums(x, rows, hidden, sums);
    }
    FOR_CHUNKS(&P[PHASE_QKV], c, uq + 2 * ukv) {
        if (c < uq) product_units(&L->q, x, hidden, sums, rows, j->q, qd, c, c + 1);
        else if (c < uq + ukv) product_units(&L->k, x, hidden, sums, rows, j->k, kvd, c - uq, c - uq + 1);
        else product_units(&L->v, x, hidden, sums, rows, j->v, kvd, c - uq - ukv, c - uq - ukv + 1);
    }
    phase_wait(&P[PHASE_QKV], uq + 2 * ukv);

    /* the new keys (normed, rotated) and values into this step's slot */
    FOR_CHUNKS(&P[PHASE_KV], c, rows * m->kv_heads) {
        const int i = c / m->kv_heads, kv = c % m->kv_heads;
        float *key = j->keys + ((size_t)kv * j->capacity + j->start + i) * dim;
        memcpy(key, j->k + (size_t)i * kvd + (size_t)kv * dim, sizeof(float) * (size_t)dim);
        if (L->k_norm) rms_norm(key, L->k_norm, dim, m->eps, key);
        rope(key, j->cos + (size_t)i * dim, j->sin + (size_t)i * dim, dim);
        memcpy(j->values + ((size_t)kv * j->capacity + j->start + i) * dim, j->v + (size_t)i * kvd + (size_t)kv * dim,
               sizeof(float) * (size_t)dim);
    }
    phase_wait(&P[PHASE_KV], rows * m->kv_heads);

    FOR_CHUNKS(&P[PHASE_ATTEND], c, rows * m->heads) attend(j, c / m->heads, c % m->heads, scores);
    phase_wait(&P[PHASE_ATTEND], rows * m->heads);

    /* mid = h + attn Wo^T */
    if (phase_open(&P[PHASE_OUT], hidden / UNIT)) row_block_sums(j->attn, rows, qd, sums);
    FOR_CHUNKS(&P[PHASE_OUT], c, hidden / UNIT) {
        product_units(&L->o, j->attn, qd, sums, rows, j->mid, hidden, c, c + 1);
        for (int r = 0; r < rows; r++)
            for (int o = UNIT * c; o < UNIT * (c + 1); o++) j->mid[(size_t)r * hidden + o] += j->h[(size_t)r * hidden + o];
    }
    phase_wait(&P[PHASE_OUT], hidden / UNIT);

    /* act = silu(gate(x)) * up(x), x = rmsnorm(mid); up goes into act's second half */
    if (phase_open(&P[PHASE_MLP], inter / UNIT)) {
        for (int r = 0; r < rows; r++) rms_norm(j->mid + (size_t)r * hidden, L->mlp_norm, hidden, m->eps, x + (size_t)r * hidden);
        row_block_sums(x, rows, hidden, sums);
    }
    float *up = j->act + (size_t)rows * inter;
    FOR_CHUNKS(&P[PHASE_MLP], c, inter / UNIT) {
        product_units(&L->gate, x, hidden, sums, rows, j->act, inter, c, c + 1);
        product_units(&L->up, x, hidden, sums, rows, up, inter, c, c + 1);
        for (int r = 0; r < rows; r++) {
            float *g = j->act + (size_t)r * inter, *u = up + (size_t)r * inter;
            for (int o = UNIT * c; o < UNIT * (c + 1); o += 8) {
                const __m256 gv = _mm256_loadu_ps(g + o);
                const __m256 sig = _mm256_div_ps(_mm256_set1_ps(1.0f),
                                                 _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv))));
                _mm256_storeu_ps(g + o, _mm256_mul_ps(_mm256_mul_ps(gv, sig), _mm256_loadu_ps(u + o)));
            }
        }
    }
    phase_wait(&P[PHASE_MLP], inter / UNIT);

    /* h = mid + act Wd^T */
    if (phase_open(&P[PHASE_DOWN], hidden / UNIT)) row_block_sums(j->act, rows, inter, sums);
    FOR_CHUNKS(&P[PHASE_DOWN], c, hidden / UNIT) {
        product_units(&L->down, j->act, inter, sums, rows, j->h, hidden, c, c + 1);
        for (int r = 0; r < rows; r++)
            for (int o = UNIT * c; o < UNIT * (c + 1); o++) j->h[(size_t)r * hidden + o] += j->mid[(size_t)r * hidden + o];
    }
    phase_wait(&P[PHASE_DOWN], hidden / UNIT);
}

/* One program step for `rows` new tokens h (rows, hidden), in place. The
 * tokens sit at cache indices start .. start + rows - 1 of this step's slot
 * (keys, values: (kv_heads, capacity, head_dim)); keys before first_key are
 * padding; window > 0 limits attention to the last `window` cache indices.
 * Returns 0, -1 when out of memory, -2 when the arguments do not fit. */
int lean_step(const lean_model *m, int layer, float *h, int rows, float *keys, float *values, int capacity,
              int start, int first_key, int window, const float *cos, const float *sin, int threads) {
    if (layer < 0 || layer >= m->layers || rows < 1 || start + rows > capacity || first_key > start) return -2;
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    const int dim = m->head_dim, qd = m->heads * dim, kvd = m->kv_heads * dim;
    const int wide = m->hidden > m->inter ? m->hidden : m->inter;
    const size_t shared = (size_t)rows * (qd + 2 * kvd + qd + m->hidden + 2 * m->inter);
    const size_t private_floats = (size_t)rows * wide + (size_t)rows * (wide / 32 + 1) + (size_t)capacity + 8;
    float *scratch = malloc(sizeof(float) * (shared + private_floats * threads));
    if (!scratch) return -1;
    step_job j;
    memset(&j, 0, sizeof j);
    j.m = m;
    j.L = &m->layer[layer];
    j.h = h;
    j.rows = rows;
    j.capacity = capacity;
    j.start = start;
    j.first_key = first_key;
    j.window = window;
    j.keys = keys;
    j.values = values;
    j.cos = cos;
    j.sin = sin;
    j.q = scratch;
    j.k = j.q + (size_t)rows * qd;
    j.v = j.k + (size_t)rows * kvd;
    j.attn = j.v + (size_t)rows * kvd;
    j.mid = j.attn + (size_t)rows * qd;
    j.act = j.mid + (size_t)rows * m->hidden;
    j.private_scratch = scratch + shared;
    j.private_floats = private_floats;
    team_run(step_team, &j, threads);
    free(scratch);
    return 0;
}

/* ---- the LM head --------------------------------------------------------------- */

#define HEAD_CHUNK 8  /* units of 32 outputs per chunk */

typedef struct {
    const lean_model *m;
    const float *h;
    int rows;
    float *logits;
    float *private_scratch;
    size_t private_floats;
    phase done;
} head_job;

static void head_team(void *arg, int ith, int nth) {
    (void)nth;
    head_job *j = arg;
    const lean_model *m = j->m;
    const int hidden = m->hidden, units = m->head.out / UNIT, chunks = (units + HEAD_CHUNK - 1) / HEAD_CHUNK;
    if (!phase_open(&j->done, chunks)) return;  /* joined too late: nothing left to do */
    float *x = j->private_scratch + (size_t)ith * j->private_floats, *sums = x + (size_t)j->rows * hidden;
    for (int r = 0; r < j->rows; r++) rms_norm(j->h + (size_t)r * hidden, m->final_norm, hidden, m->eps, x + (size_t)r * hidden);
    row_block_sums(x, j->rows, hidden, sums);
    FOR_CHUNKS(&j->done, c, chunks) {
        const int end = HEAD_CHUNK * (c + 1) < units ? HEAD_CHUNK * (c + 1) : units;
        product_units(&m->head, x, hidden, sums, j->rows, j->logits, m->head.out, HEAD_CHUNK * c, end);
    }
    phase_wait(&j->done, chunks);
}

/* logits (rows, vocab) = rmsnorm(h) W_head^T. Returns 0, -1 when out of memory, -2 without a head. */
int lean_head(const lean_model *m, const float *h, int rows, float *logits, int threads) {
    if (m->head.format < 0 || rows < 1) return -2;
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    const size_t private_floats = (size_t)rows * (m->hidden + m->hidden / 32 + 1) + 8;
    float *scratch = malloc(sizeof(float) * private_floats * threads);
    if (!scratch) return -1;
    head_job j;
    memset(&j, 0, sizeof j);
    j.m = m;
    j.h = h;
    j.rows = rows;
    j.logits = logits;
    j.private_scratch = scratch;
    j.private_floats = private_floats;
    team_run(head_team, &j, threads);
    free(scratch);
    return 0;
}
