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
// So a step is never slower than the single-threaded step by more than one chunk, and a busy
// core elsewhere costs parallelism instead of latency. A forked child starts workers of its
// own (parallel.cpp, Note [fork]), and every chunk runs in the caller's floating-point mode
// (parallel.cpp, Note [floating-point mode]).
#pragma once

#include <cstdint>

namespace fastoptim {

// Most threads one call may use (the caller and kMaxThreads - 1 pool workers); larger
// n_threads are clamped. set_num_threads (dispatch.h) accepts 1..kMaxThreads.
constexpr int kMaxThreads = 1024;

using RangeFn = void (*)(const void* ctx, int64_t begin, int64_t end);

void parallel_for(int n_threads, int64_t total, int64_t chunk, RangeFn fn, const void* ctx);

// Test hook: how many threads (caller included) ran at least one chunk of the most recent
// parallel_for in this process (1 when it ran on the caller alone).
int last_threads_used();

// Default thread count: the CPUs this process may run on.
int available_cpus();

}  // namespace fastoptim
