/* The writer's per-shard statistics of CPU rows in one pass over the stored values (cache/stats.py
   states the algorithm and holds the numpy twin that gives the same bits where this does not build).

   Why C: the numpy/torch form widens each block to a float32 copy and reads it twice (column sums,
   row squares), three times the shard's bytes through memory for a bfloat16 shard; beside the
   writer's other threads that memory traffic, not the arithmetic, set its speed. Here each row is
   widened into a buffer that stays in the L1 cache and both sums are taken from there.

   Built with -ffp-contract=off and without -ffast-math: every float operation is the IEEE operation
   written, in the order written, so the bits are the numpy twin's on every x86 or ARM CPU. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CHUNK 128      /* columns per float32 partial of a row's squares */
#define LANES 16       /* accumulators per chunk: column c of the chunk goes to lane c % 16 */
#define BLOCK_ROWS 256 /* rows per float32 pairwise sum of the columns */
#define LEVELS 9       /* log2(BLOCK_ROWS) + 1 */

static void widen_row(const void *src, int dtype, int64_t d, float *out) {
    if (dtype == 0) {
        memcpy(out, src, (size_t)d * sizeof(float));
    } else { /* bfloat16: the high half of a float32 (memcpy: no type punning through pointers) */
        const uint16_t *s = (const uint16_t *)src;
        for (int64_t j = 0; j < d; j++) {
            uint32_t bits = (uint32_t)s[j] << 16;
            memcpy(out + j, &bits, sizeof bits);
        }
    }
}

/* sum over the chunks, in float64 and in order, of each chunk's float32 sum of squares: lane l adds the
   squares of columns l, l + 16, ... of the chunk in order, then lanes are added pairwise (0+1, 2+3, ...,
   then those pairs, ...). `x` is zero past the row's end, up to a multiple of CHUNK. */
static double row_squares(const float *x, int64_t chunks) {
    double total = 0.0;
    for (int64_t c = 0; c < chunks; c++) {
        const float *p = x + c * CHUNK;
        float lane[LANES];
        for (int l = 0; l < LANES; l++) lane[l] = p[l] * p[l];
        for (int g = 1; g < CHUNK / LANES; g++)
            for (int l = 0; l < LANES; l++) lane[l] = lane[l] + p[g * LANES + l] * p[g * LANES + l];
        for (int width = LANES / 2; width >= 1; width /= 2)
            for (int l = 0; l < width; l++) lane[l] = lane[2 * l] + lane[2 * l + 1];
        total = total + (double)lane[0];
    }
    return total;
}

/* One layer of a shard, its rows in pieces (pieces[i]: piece_rows[i] contiguous rows of d values of
   `dtype`, 0 float32, 1 bfloat16). Out: col_sums[d] (float64) and row_sq[n] (float64, each row's sum of
   squares). Column sums: within each block of BLOCK_ROWS rows counted from the first row, the pairwise
   float32 sum (rows 0+1, 2+3, ..., then those pairs, ...; a partial block as if padded with -0.0,
   which adds nothing); the blocks' sums added in float64, in order, from 0.0. Returns 0, or -1 when
   out of memory. */
int cache_row_sums(const void *const *pieces, const int64_t *piece_rows, int n_pieces, int dtype, int64_t d,
                   double *col_sums, double *row_sq) {
    int64_t chunks = (d + CHUNK - 1) / CHUNK;
    int64_t width = chunks * CHUNK;
    float *buf = calloc((size_t)width * (LEVELS + 1), sizeof(float));
    if (!buf) return -1;
    float *row = buf; /* zero past d, for row_squares */
    float *stack = buf + width; /* LEVELS partial sums of 1, 2, 4, ... rows */
    int occupied[LEVELS] = {0}; /* a merge lands at most on level LEVELS - 1: a full block, flushed at once */
    size_t item = dtype == 0 ? 4 : 2;
    int64_t in_block = 0, r = 0;
    for (int64_t j = 0; j < d; j++) col_sums[j] = 0.0;
    for (int i = 0; i < n_pieces; i++) {
        const char *src = (const char *)pieces[i];
        for (int64_t k = 0; k < piece_rows[i]; k++, r++, src += (size_t)d * item) {
            /* a binary counter of partial sums: equal levels merge, as a pairwise tree does; each sum is
               written straight into the level it lands on */
            float *cur = occupied[0] ? row : stack;
            widen_row(src, dtype, d, cur);
            row_sq[r] = row_squares(cur, chunks);
            int level = 0;
            while (occupied[level]) {
                float *s = stack + level * width;
                float *dst = occupied[level + 1] ? s : s + width;
                for (int64_t j = 0; j < d; j++) dst[j] = s[j] + cur[j];
                cur = dst;
                occupied[level++] = 0;
            }
            occupied[level] = 1;
            if (++in_block == BLOCK_ROWS) { /* the block's whole tree is the top level */
                for (int64_t j = 0; j < d; j++) col_sums[j] = col_sums[j] + (double)stack[level * width + j];
                occupied[level] = 0;
                in_block = 0;
            }
        }
    }
    if (in_block) { /* a partial block: the levels left, lowest first, each added onto the next */
        float *cur = NULL;
        for (int level = 0; level < LEVELS; level++) {
            if (!occupied[level]) continue;
            float *s = stack + level * width;
            if (cur)
                for (int64_t j = 0; j < d; j++) s[j] = s[j] + cur[j];
            cur = s;
        }
        for (int64_t j = 0; j < d; j++) col_sums[j] = col_sums[j] + (double)cur[j];
    }
    free(buf);
    return 0;
}
