/* Row-parallel work for the kernels of sae/native: one owner for how they use threads. */
#ifndef SAE_NATIVE_PARALLEL_H
#define SAE_NATIVE_PARALLEL_H

#include <stddef.h>
#include <stdint.h>

#define SAE_MAX_THREADS 64

/* Runs fn on each of the n jobs (an array of n structs of `size` bytes) and returns when all are done:
   on the OpenMP team of the runtime torch loaded where the library was built with OpenMP, else job 0
   on the calling thread and the others on threads of their own (on the calling thread where one
   cannot be started). n is clamped to [1, SAE_MAX_THREADS] by the caller (sae_threads). */
void sae_run_parallel(void *(*fn)(void *), void *jobs, size_t size, int n);

/* The thread count for `rows` rows: at least 1, at most n_threads, SAE_MAX_THREADS and rows. */
int sae_threads(int n_threads, int64_t rows);

#endif
