/* See parallel.h. Built with -fopenmp where the compiler has it: the library then needs libgomp.so.1,
   which the loader resolves to the copy torch has already loaded (same soname), so the jobs run on
   torch's own OpenMP threads. Threads of our own would share the cores with those, which spin for a
   while after each torch operator: measured inside a training step, that made each kernel about twice
   as slow as alone (bench/RESULTS.md, "The TopK step"). Without OpenMP, a thread per job and per call. */
#include "parallel.h"

#ifdef _OPENMP

void sae_run_parallel(void *(*fn)(void *), void *jobs, size_t size, int n) {
    char *base = (char *)jobs;
#pragma omp parallel for num_threads(n) schedule(static, 1)
    for (int i = 0; i < n; i++) fn(base + i * size);
}

#else

#include <pthread.h>

void sae_run_parallel(void *(*fn)(void *), void *jobs, size_t size, int n) {
    pthread_t tids[SAE_MAX_THREADS];
    int started[SAE_MAX_THREADS] = {0};
    char *base = (char *)jobs;
    for (int i = 1; i < n; i++) started[i] = pthread_create(&tids[i], NULL, fn, base + i * size) == 0;
    fn(base);
    for (int i = 1; i < n; i++) {
        if (started[i]) pthread_join(tids[i], NULL);
        else fn(base + i * size); /* no thread to be had: this one does that share too */
    }
}

#endif

int sae_threads(int n_threads, int64_t rows) {
    if (n_threads > SAE_MAX_THREADS) n_threads = SAE_MAX_THREADS;
    if (n_threads > rows) n_threads = (int)rows;
    return n_threads < 1 ? 1 : n_threads;
}
