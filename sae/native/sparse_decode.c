/* The gradient of a sparse decode to its kept values, for sae/sparse_decode.py.

   x_hat[b] = sum_{n in row b} vals[n] * W[cols[n]], so d vals[n] = grad[b] . W[cols[n]]: one dot
   product of d values per kept entry. torch gets it from embedding_bag's per-sample-weights backward
   at ~14 GFLOP/s on the CPU, longer than the decode itself; here each row's gradient stays in L1 while
   its k dots run as vectorised loops (bench/RESULTS.md, "The TopK step"). float32 only; built with
   row_topk.c by sae/native/build.py. */

#include "parallel.h"

#include <stdint.h>

struct dot_job {
    const float *grad, *w;
    const int64_t *cols, *offsets;
    int64_t row0, row1, rows, n, m, d;
    float *out;
    int status;
};

static void *dot_rows(void *arg) {
    struct dot_job *j = (struct dot_job *)arg;
    for (int64_t b = j->row0; b < j->row1; b++) {
        const float *g = j->grad + b * j->d;
        int64_t start = j->offsets[b], end = b + 1 < j->rows ? j->offsets[b + 1] : j->n;
        if (start < 0 || end < start || end > j->n) {
            j->status = -3;
            return NULL;
        }
        for (int64_t e = start; e < end; e++) {
            int64_t c = j->cols[e];
            if (c < 0 || c >= j->m) {
                j->status = -4;
                return NULL;
            }
            const float *wr = j->w + c * j->d;
            float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
            for (int64_t i = 0; i < j->d; i++) acc += g[i] * wr[i];
            j->out[e] = acc;
        }
    }
    return NULL;
}

/* out[e] = grad[b] . w[cols[e]] for each entry e of row b (row b owns entries offsets[b] to
   offsets[b + 1], the last row to n). grad [rows, d], w [m, d], both contiguous float32.
   Returns 0, -3 if the offsets do not start at 0 and rise within [0, n], -4 if a column is outside [0, m). */
int sae_gather_dot(const float *grad, const float *w, const int64_t *cols, const int64_t *offsets, int64_t rows,
                   int64_t n, int64_t m, int64_t d, float *out, int n_threads) {
    if (rows <= 0) return n == 0 ? 0 : -3;
    if (offsets[0] != 0) return -3; /* entries before the first row would belong to no row */
    n_threads = sae_threads(n_threads, rows);
    struct dot_job jobs[SAE_MAX_THREADS];
    for (int i = 0; i < n_threads; i++)
        jobs[i] = (struct dot_job){grad, w, cols, offsets, rows * i / n_threads, rows * (i + 1) / n_threads,
                                   rows, n, m, d, out, 0};
    sae_run_parallel(dot_rows, jobs, sizeof jobs[0], n_threads);
    for (int i = 0; i < n_threads; i++)
        if (jobs[i].status) return jobs[i].status;
    return 0;
}
