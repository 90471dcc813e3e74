/* Row-parallel work for the kernels of sae/native: one owner for how they use threads. */
#ifndef SAE_NATIVE_PARALLEL_H
#define SAE_NATIVE_PARALLEL_H

#include <stddef.h>
#include <stdint.h>

#define SAE_MAX_THREADS 64

/* Runs fn on each of the n jobs (an array of n structs of `size` bytes): job 0 on the calling thread,
   the others on threads of their own, or on the calling thread where one cannot be started. n is
   clamped to [1, SAE_MAX_THREADS] by the caller (sae_threads). Returns when all are done. */
void sae_run_parallel(void *(*fn)(void *), void *jobs, size_t size, int n);

/* The thread count for `rows` rows: at least 1, at most n_threads, SAE_MAX_THREADS and rows. */
int sae_threads(int n_threads, int64_t rows);

#endif
