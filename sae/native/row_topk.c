/* Per-row top-k of a [rows, m] matrix of float32 or bfloat16 values on the CPU, for the TopK step.

   torch's CPU top-k copies each row into a vector of (value, index) pairs and runs nth_element over it:
   ~5-7 ns an entry whatever k is, as long as the step's whole dense GEMM in bf16 (bench/RESULTS.md,
   "Top-k selection"). sae/selection.py's `strided_block_topk` cuts that work with strided blocks, but
   as four torch operators, each a pass over memory. Here the same exact search runs row by row while
   the row sits in the core's cache: one vectorised pass for the block maxima, a threshold t that at
   least k of them reach, a scan of the few blocks whose maximum reaches t, and the k largest of the
   values >= t among them.

   Every k-th largest value is found by bisection over order-preserving integer keys of the floats:
   ~30 branch-free counting passes over a few hundred keys, which the compiler vectorises. A quickselect
   (and a single-pass scan with a running threshold that used it) lost its time to data-dependent
   branches that mispredict on every other element and beat the torch path by nothing.

   NaN: torch's top-k ranks NaN above everything; these functions stop at a NaN and return 1, and the
   caller falls back to torch for the whole call. Plain C that the compiler vectorises for the host
   (sae/native/build.py builds it with -O3 -march=native). */

#include "parallel.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_value(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline float f32_value(float y) { return y; }

/* Round to nearest even, as torch's float -> bfloat16 conversion does (NaN never reaches it here). */
static inline uint16_t bf16_of(float y) {
    uint32_t u;
    memcpy(&u, &y, sizeof u);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static inline float f32_of(float y) { return y; }

/* Unsigned keys in the order of the floats (-0 just below +0); NaN never reaches them. */
static inline uint32_t key_of(float y) {
    uint32_t u;
    memcpy(&u, &y, sizeof u);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* The buffers of one thread, each of m + 1 entries: block maxima, keys and indices of the candidates,
   chosen blocks, tie scratch. */
struct scratch {
    float *mx;
    uint32_t *key;
    int32_t *ix, *blocks, *tie_ix;
};

static inline int64_t count_at_least(const uint32_t *key, int64_t n, uint32_t t) {
    uint32_t c = 0; /* 32-bit lanes: twice the keys a vector add of 64-bit ones takes */
    for (int64_t i = 0; i < n; i++) c += key[i] >= t;
    return c;
}

/* The largest key t with at least k of key[0..n) >= t, or, where `slack`
   > 0, any t with between k and k + slack keys >= t (fewer bisection steps: the block search below
   needs a lower bound of the k-th largest maximum, not its exact value). */
static uint32_t threshold(const uint32_t *key, int64_t n, int64_t k, int64_t slack) {
    uint32_t lo = key[0], hi = key[0];
    for (int64_t i = 1; i < n; i++) {
        lo = key[i] < lo ? key[i] : lo;
        hi = key[i] > hi ? key[i] : hi;
    }
    while (lo < hi) { /* count(>= lo) >= k holds throughout, count(> hi) < k */
        uint32_t mid = lo + (uint32_t)(((uint64_t)hi - lo + 1) / 2);
        int64_t c = count_at_least(key, n, mid);
        if (c < k) {
            hi = mid - 1;
        } else {
            lo = mid;
            if (c <= k + slack && slack > 0) break;
        }
    }
    return lo;
}

/* Moves the k largest of key[0..n) (with their indices) to the front, in no order; returns the k-th
   largest. tie_ix is scratch for at least k + 1 indices. */
static uint32_t keep_largest(uint32_t *key, int32_t *ix, int64_t n, int64_t k, int32_t *tie_ix) {
    uint32_t lo = threshold(key, n, k, 0);
    int64_t need = k - (lo == UINT32_MAX ? 0 : count_at_least(key, n, lo + 1)); /* ties at lo to keep */
    int64_t w = 0, e = 0;
    for (int64_t i = 0; i < n; i++) { /* branch-free compaction: in place, w <= i */
        uint32_t kk = key[i];
        int32_t id = ix[i];
        key[w] = kk;
        ix[w] = id;
        w += kk > lo;
        tie_ix[e] = id;
        e += (kk == lo) & (e < need);
    }
    for (int64_t q = 0; q < e; q++) {
        key[w + q] = lo;
        ix[w + q] = tie_ix[q];
    }
    return lo;
}

/* The value at column i of the row being searched (with its bias where the instance adds one). */
#define AT(VALUE, BIAS, i) ((BIAS) ? VALUE(x[i]) + bias[i] : VALUE(x[i]))

/* One row of m values of type T (m = width * nb + tail), each plus bias[column] where BIAS is 1: writes
   the k kept column indices to out_idx and their values (as T, rounded by STORE) to out_val. Returns 1
   on NaN. See `strided_block_topk` in sae/selection.py for why the blocks are strided and why their
   search is exact; here both passes run over one row while it sits in the core's cache. BIAS is a
   constant of each instance, so the version without bias does not pay for it. */
#define ROW_SELECT(NAME, T, VALUE, STORE, BIAS)                                               \
    static int NAME(const T *x, const float *bias, int64_t m, int64_t k, int64_t width,       \
                    const struct scratch *s, T *out_val, int64_t *out_idx) {                  \
        int64_t nb = m / width;                                                               \
        float *mx = s->mx;                                                                    \
        for (int64_t c = 0; c < nb; c++) mx[c] = AT(VALUE, BIAS, c);                          \
        for (int64_t j = 1; j < width; j++) {                                                 \
            for (int64_t c = 0; c < nb; c++) { /* NaN sticks in mx[c], whatever follows it */ \
                float y = AT(VALUE, BIAS, j * nb + c);                                        \
                mx[c] = (y > mx[c] || y != y) ? y : mx[c];                                    \
            }                                                                                 \
        }                                                                                     \
        int nan = 0;                                                                          \
        for (int64_t c = 0; c < nb; c++) {                                                    \
            nan |= mx[c] != mx[c];                                                            \
            s->key[c] = key_of(mx[c]);                                                        \
        }                                                                                     \
        if (nan) return 1;                                                                    \
        uint32_t t = threshold(s->key, nb, k, k / 4);                                         \
        int64_t n = 0;                                                                        \
        for (int64_t c = 0; c < nb; c++) { /* the blocks whose maximum reaches t */           \
            s->blocks[n] = (int32_t)c;                                                        \
            n += s->key[c] >= t;                                                              \
        }                                                                                     \
        int64_t n_blocks = n;                                                                 \
        n = 0;                                                                                \
        for (int64_t q = 0; q < n_blocks; q++) {                                              \
            int64_t c = s->blocks[q];                                                         \
            for (int64_t j = 0; j < width; j++) {                                             \
                uint32_t kk = key_of(AT(VALUE, BIAS, j * nb + c));                            \
                s->key[n] = kk;                                                               \
                s->ix[n] = (int32_t)(j * nb + c);                                             \
                n += kk >= t;                                                                 \
            }                                                                                 \
        }                                                                                     \
        for (int64_t j = width * nb; j < m; j++) { /* the tail no block covers */             \
            float y = AT(VALUE, BIAS, j);                                                     \
            if (y != y) return 1;                                                             \
            s->key[n] = key_of(y);                                                            \
            s->ix[n] = (int32_t)j;                                                            \
            n += s->key[n] >= t;                                                              \
        }                                                                                     \
        if (n > k) keep_largest(s->key, s->ix, n, k, s->tie_ix);                              \
        for (int64_t q = 0; q < k; q++) {                                                     \
            out_idx[q] = s->ix[q];                                                            \
            out_val[q] = BIAS ? STORE(AT(VALUE, BIAS, s->ix[q])) : x[s->ix[q]];               \
        }                                                                                     \
        return 0;                                                                             \
    }

ROW_SELECT(row_select_f32, float, f32_value, f32_of, 0)
ROW_SELECT(row_select_bf16, uint16_t, bf16_value, bf16_of, 0)
ROW_SELECT(row_select_f32_bias, float, f32_value, f32_of, 1)
ROW_SELECT(row_select_bf16_bias, uint16_t, bf16_value, bf16_of, 1)

struct job {
    const char *x;
    const float *bias;
    int bf16;
    int64_t row0, row1, m, row_stride, k, width;
    char *out_val;
    int64_t *out_idx;
    int status;
};

static void *run_job(void *arg) {
    struct job *jb = (struct job *)arg;
    int64_t size = jb->bf16 ? 2 : 4;
    size_t n = (size_t)jb->m + 1;
    struct scratch s = {malloc(n * sizeof(float)), malloc(n * sizeof(uint32_t)), malloc(n * sizeof(int32_t)),
                        malloc(n * sizeof(int32_t)), malloc(n * sizeof(int32_t))};
    if (!s.mx || !s.key || !s.ix || !s.blocks || !s.tie_ix) {
        jb->status = -1;
    } else {
        for (int64_t r = jb->row0; r < jb->row1; r++) {
            const char *row = jb->x + r * jb->row_stride * size;
            char *out = jb->out_val + r * jb->k * size;
            int64_t *out_idx = jb->out_idx + r * jb->k;
            const float *b = jb->bias;
            int nan;
            if (jb->bf16) {
                const uint16_t *xr = (const uint16_t *)row;
                nan = b ? row_select_bf16_bias(xr, b, jb->m, jb->k, jb->width, &s, (uint16_t *)out, out_idx)
                        : row_select_bf16(xr, b, jb->m, jb->k, jb->width, &s, (uint16_t *)out, out_idx);
            } else {
                const float *xr = (const float *)row;
                nan = b ? row_select_f32_bias(xr, b, jb->m, jb->k, jb->width, &s, (float *)out, out_idx)
                        : row_select_f32(xr, b, jb->m, jb->k, jb->width, &s, (float *)out, out_idx);
            }
            if (nan) {
                jb->status = 1;
                break;
            }
        }
    }
    free(s.mx);
    free(s.key);
    free(s.ix);
    free(s.blocks);
    free(s.tie_ix);
    return NULL;
}

/* The top-k of each of `rows` rows of m values (row r at x + r * row_stride elements, columns
   contiguous), each value plus bias[column] where bias (m float32) is not NULL, on n_threads threads.
   out_val [rows, k] in x's format (with the bias: the float32 sum rounded to it), out_idx [rows, k]
   int64. Returns 0, 1 if a row holds NaN (the outputs are then incomplete), -1 if memory ran out, -2 if
   k > m. */
int sae_row_topk(const void *x, int bf16, int64_t rows, int64_t m, int64_t row_stride, int64_t k, int64_t width,
                 const float *bias, void *out_val, int64_t *out_idx, int n_threads) {
    if (k <= 0 || rows <= 0) return 0;
    if (k > m || width < 1 || m / width < k || m >= INT32_MAX) return -2;
    n_threads = sae_threads(n_threads, rows);
    struct job jobs[SAE_MAX_THREADS];
    for (int i = 0; i < n_threads; i++)
        jobs[i] = (struct job){(const char *)x, bias, bf16, rows * i / n_threads, rows * (i + 1) / n_threads, m,
                               row_stride, k, width, (char *)out_val, out_idx, 0};
    sae_run_parallel(run_job, jobs, sizeof jobs[0], n_threads);
    int status = 0;
    for (int i = 0; i < n_threads; i++) {
        if (jobs[i].status < 0) return -1;
        if (jobs[i].status) status = 1;
    }
    return status;
}
