// parallel.h: a caller-runs thread pool for the CPU kernels.
//
// parallel_for(n_threads, total, chunk, fn, ctx) calls fn(ctx, begin, end) over [0, total) in
// chunks of `chunk` elements, on the calling thread and on up to n_threads - 1 pool workers,
// and returns when every chunk is done.
//
// Note [caller runs]
// The calling thread claims chunks like any worker and never waits for a worker that has not
// started: it waits only for chunks a worker has already claimed. A worker that the OS wakes
// late (seen on this project's VMs: a sleeping thread is queued behind the busy core for a
// scheduler tick, ~8 ms, which stalls a fork-join OpenMP region) simply finds no work left.
// So a step is never slower than the single-threaded step by more than one chunk, a busy
// core elsewhere costs parallelism instead of latency, and after fork() (no workers in the
// child) everything still runs, on the caller.
#pragma once

#include <cstdint>

namespace fastoptim {

using RangeFn = void (*)(const void* ctx, int64_t begin, int64_t end);

void parallel_for(int n_threads, int64_t total, int64_t chunk, RangeFn fn, const void* ctx);

// Default thread count: the CPUs this process may run on.
int available_cpus();

}  // namespace fastoptim
