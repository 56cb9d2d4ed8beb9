// runner.h: an outside runner for parallel_for's chunks (Note [outside runner]).
//
// Included by parallel.cpp and bindings.cpp only (not by the kernels: dispatch.h includes
// parallel.h), and by the torch extension, which provides the runner.
#pragma once

#include <cstdint>

namespace fastoptim {

// Note [outside runner]
// Where torch runs in the same process, torch's intra-op threads (OpenMP) spin for a while
// after each of torch's parallel ops, waiting for the next. An update called right after (the
// backward pass of a training step) then found the other cores taken by those spinning
// threads: fastoptim's pool workers could not get a core, and the calling thread ran every
// chunk itself (Note [caller runs]). The 2,000-tensor Adam step at 2 threads on the 2-core VM
// took 8.8 ms instead of 7.1 as the raw call and 11.1 instead of 8.6 through fastoptim.torch,
// right after a torch op. The torch extension (src/torch/torch_ext.cpp) therefore offers a
// runner that hands the chunks to torch's own OpenMP threads, and fastoptim.torch installs it
// (_core._set_runner): a spinning thread takes its chunk at once. The runner declines (returns
// 0) when it cannot serve the call as asked: inside a parallel region, or when fastoptim asks
// for more threads than torch has (or torch has one); parallel_for then uses its pool. Chunks
// are the pool's chunks, each run in the caller's floating-point mode, so the bits are the
// same. What the runner gives up is Note [caller runs]: an OpenMP region ends at a barrier that
// waits for every thread of the team, so a thread that the OS wakes late stalls the update as
// it stalls torch's own ops. A forked child forgets the runner (parallel.cpp, Note [fork]).

// Runs chunk(job, k) for every k in [0, n_chunks) on at most n_threads threads, the calling
// thread among them, and returns how many threads ran at least one chunk; 0 when it ran none
// (it declined).
using ChunkFn = void (*)(const void* job, int64_t k);
using RunnerFn = int (*)(int n_threads, int64_t n_chunks, ChunkFn chunk, const void* job);

// The runner parallel_for hands its chunks to (nullptr: its own pool, the default).
void set_runner(RunnerFn runner);
RunnerFn runner();

// Test hook: whether the most recent parallel_for in this process ran on the runner.
bool last_run_outside();

}  // namespace fastoptim
