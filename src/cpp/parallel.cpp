// parallel.cpp: the caller-runs pool of parallel.h.
//
// Note [claim protocol]
// One job is live at a time (parallel_for lets one caller in; a pool belongs to one
// process). Its chunks are handed out through ONE 64-bit atomic word:
//     state = generation (24 bits) | next chunk (20 bits) | chunk count (20 bits)
// A thread claims chunk k by a compare-and-swap from (g, k, n) to (g, k + 1, n) with k < n.
// A successful CAS proves that the job it names is the live one, so the claimer may then read
// the job's fields (published before `state` with release ordering) and run the chunk; a
// worker holding a stale word just fails its CAS. Workers count the chunks they finish in
// `done_by_workers_`; the caller, once no chunk is left to claim, waits until that count
// equals the chunks it did not run itself. Only then does the job end and its fields change.
//
// Note [floating-point mode]
// MXCSR (flush-to-zero, denormals-are-zero, rounding) is per thread, and a new thread inherits
// its creator's. The caller's mode at the time of the call is the one the update must use
// (torch.set_flush_denormal(True) changes it long after the workers exist), so each job
// carries the caller's MXCSR; a thread that claims a chunk switches to it first, and a worker
// goes back to its own mode when it runs out of chunks. A 2-thread result is then bitwise the
// 1-thread result in every mode.
//
// Note [fork]
// fork() copies only the forking thread. If another thread was inside parallel_for, the child
// inherits the one-job lock `g_busy` held (by a thread that does not exist there), and every
// child update would run on one thread; its pool's workers do not exist either. A pthread_atfork child handler, which runs in the child while it is still
// single-threaded, gives the child a fresh lock and no pool; the old ones are leaked (a locked
// mutex may not be destroyed). The child's first parallel call starts its own workers. It also
// forgets the outside runner (runner.h, Note [outside runner]): the OpenMP runtime's threads do
// not exist in the child either.
#include "parallel.h"
#include "runner.h"

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define FO_PAUSE() _mm_pause()
#else
#define FO_PAUSE() ((void)0)
#endif

namespace fastoptim {
namespace {

std::atomic<int> g_last_threads_used{1};

// The calling thread's floating-point mode (Note [floating-point mode]); 0 where untracked.
inline uint32_t fp_mode() {
#if defined(__x86_64__) || defined(__i386__)
  return _mm_getcsr();
#else
  return 0;
#endif
}

inline void set_fp_mode(uint32_t mode) {
#if defined(__x86_64__) || defined(__i386__)
  if (_mm_getcsr() != mode) _mm_setcsr(mode);
#else
  (void)mode;
#endif
}

constexpr int kCountBits = 20;
constexpr uint64_t kCountMask = (uint64_t{1} << kCountBits) - 1;
constexpr uint64_t kMaxChunks = kCountMask;             // chunk count fits 20 bits
constexpr int kGenShift = 2 * kCountBits;
constexpr uint64_t kNextOne = uint64_t{1} << kCountBits;
constexpr int kSpinBeforeSleep = 20000;  // ~100 us of polling before a worker sleeps

inline uint64_t next_of(uint64_t s) { return (s >> kCountBits) & kCountMask; }
inline uint64_t count_of(uint64_t s) { return s & kCountMask; }

class Pool {
 public:
  // chunk: at least total / kMaxChunks (parallel_for clamps it, as the state word needs).
  void run(int n_threads, int64_t total, int64_t chunk, RangeFn fn, const void* ctx) {
    const uint64_t n = static_cast<uint64_t>((total + chunk - 1) / chunk);
    const int helpers = std::min<int64_t>(n_threads - 1, static_cast<int64_t>(n) - 1);
    if (helpers <= 0) {
      fn(ctx, 0, total);
      g_last_threads_used.store(1, std::memory_order_relaxed);
      return;
    }
    ensure_workers(helpers);

    // Publish the job, then the state word that makes it claimable.
    fn_.store(fn, std::memory_order_relaxed);
    ctx_.store(ctx, std::memory_order_relaxed);
    total_.store(total, std::memory_order_relaxed);
    chunk_.store(chunk, std::memory_order_relaxed);
    fp_mode_.store(fp_mode(), std::memory_order_relaxed);
    active_workers_.store(helpers, std::memory_order_relaxed);
    done_by_workers_.store(0, std::memory_order_relaxed);
    participants_.store(0, std::memory_order_relaxed);
    const uint64_t gen = (state_.load(std::memory_order_relaxed) >> kGenShift) + 1;
    state_.store((gen << kGenShift) | n, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(mu_);
      ++wake_seq_;
      cv_.notify_all();
    }

    uint64_t mine = 0;
    while (run_one()) ++mine;
    const int64_t theirs = static_cast<int64_t>(n - mine);
    for (int spins = 0; done_by_workers_.load(std::memory_order_acquire) != theirs; ++spins) {
      if (spins < 4096) FO_PAUSE(); else std::this_thread::yield();
    }
    g_last_threads_used.store(participants_.load(std::memory_order_relaxed) + (mine > 0 ? 1 : 0),
                              std::memory_order_relaxed);
  }

 private:
  // Claims and runs one chunk of the live job; false when none is left.
  bool run_one() {
    uint64_t s = state_.load(std::memory_order_acquire);
    while (next_of(s) < count_of(s)) {
      if (state_.compare_exchange_weak(s, s + kNextOne, std::memory_order_acq_rel,
                                       std::memory_order_acquire)) {
        const int64_t k = static_cast<int64_t>(next_of(s));
        const int64_t chunk = chunk_.load(std::memory_order_relaxed);
        const int64_t total = total_.load(std::memory_order_relaxed);
        const int64_t begin = k * chunk;
        set_fp_mode(fp_mode_.load(std::memory_order_relaxed));  // a no-op on the caller
        fn_.load(std::memory_order_relaxed)(ctx_.load(std::memory_order_relaxed), begin,
                                            std::min(total, begin + chunk));
        return true;
      }
    }
    return false;
  }

  bool work_available(int index) const {
    const uint64_t s = state_.load(std::memory_order_seq_cst);
    return next_of(s) < count_of(s) && index < active_workers_.load(std::memory_order_relaxed);
  }

  void worker_loop(int index) {
    const uint32_t own_fp_mode = fp_mode();
    uint64_t seen = 0;
    for (;;) {
      for (int spins = 0; spins < kSpinBeforeSleep; ++spins) {
        if (work_available(index)) {
          bool first = true;
          while (index < active_workers_.load(std::memory_order_relaxed) && run_one()) {
            // Counted before the chunk is reported done, so the caller sees it (release).
            if (first) participants_.fetch_add(1, std::memory_order_relaxed);
            first = false;
            done_by_workers_.fetch_add(1, std::memory_order_release);
          }
          set_fp_mode(own_fp_mode);
          spins = 0;
        }
        FO_PAUSE();
      }
      std::unique_lock<std::mutex> lock(mu_);
      sleepers_.fetch_add(1, std::memory_order_seq_cst);
      // A job published before the increment above may have skipped the notify: look again.
      if (!work_available(index)) cv_.wait(lock, [&] { return wake_seq_ != seen; });
      seen = wake_seq_;
      sleepers_.fetch_sub(1, std::memory_order_seq_cst);
    }
  }

  void ensure_workers(int n) {
    while (static_cast<int>(workers_.size()) < n) {
      const int index = static_cast<int>(workers_.size());
      workers_.emplace_back([this, index] { worker_loop(index); });
      workers_.back().detach();
    }
  }

  std::vector<std::thread> workers_;
  std::atomic<uint64_t> state_{0};
  std::atomic<RangeFn> fn_{nullptr};
  std::atomic<const void*> ctx_{nullptr};
  std::atomic<int64_t> total_{0};
  std::atomic<int64_t> chunk_{1};
  std::atomic<uint32_t> fp_mode_{0};  // the caller's MXCSR (Note [floating-point mode])
  std::atomic<int> active_workers_{0};
  std::atomic<int64_t> done_by_workers_{0};
  std::atomic<int> participants_{0};  // workers that ran a chunk of the live job
  std::atomic<int> sleepers_{0};
  std::mutex mu_;
  std::condition_variable cv_;
  uint64_t wake_seq_ = 0;
};

// Never destroyed: detached workers may still be parked in it at interpreter exit. Both are
// replaced in a forked child (Note [fork]); only that handler writes the pointers after load.
Pool* g_pool = nullptr;
// One job at a time: the GIL is released during updates, so two Python threads may call in
// at once. The second one does not queue; it runs its update on its own thread.
std::mutex* g_busy = new std::mutex;

std::atomic<RunnerFn> g_runner{nullptr};  // Note [outside runner] (runner.h)
std::atomic<bool> g_last_outside{false};   // whether the last parallel_for's chunks went there

void reset_in_forked_child() {
  g_busy = new std::mutex;
  g_pool = nullptr;
  g_runner.store(nullptr, std::memory_order_relaxed);
}

// parallel_for's job as the outside runner sees it: chunk k of fn over [0, total).
struct RunnerJob {
  RangeFn fn;
  const void* ctx;
  int64_t total;
  int64_t chunk;
  uint32_t fp_mode;  // the caller's (Note [floating-point mode])
};

void run_runner_chunk(const void* job, int64_t k) {
  const RunnerJob& j = *static_cast<const RunnerJob*>(job);
  const uint32_t own = fp_mode();
  set_fp_mode(j.fp_mode);
  const int64_t begin = k * j.chunk;
  j.fn(j.ctx, begin, std::min(j.total, begin + j.chunk));
  set_fp_mode(own);
}

// Hands the job to the outside runner; false when there is none or it declined.
bool run_outside(int n_threads, int64_t total, int64_t chunk, RangeFn fn, const void* ctx) {
  const RunnerFn runner = g_runner.load(std::memory_order_acquire);
  if (runner == nullptr) return false;
  const int64_t n = (total + chunk - 1) / chunk;
  if (n <= 1) return false;
  const RunnerJob job{fn, ctx, total, chunk, fp_mode()};
  const int used = runner(n_threads, n, &run_runner_chunk, &job);
  if (used <= 0) return false;
  g_last_threads_used.store(used, std::memory_order_relaxed);
  g_last_outside.store(true, std::memory_order_relaxed);
  return true;
}

struct AtforkRegistration {
  AtforkRegistration() { pthread_atfork(nullptr, nullptr, &reset_in_forked_child); }
} g_atfork_registration;

}  // namespace

void parallel_for(int n_threads, int64_t total, int64_t chunk, RangeFn fn, const void* ctx) {
  if (total <= 0) return;
  g_last_outside.store(false, std::memory_order_relaxed);
  if (n_threads <= 1) {
    fn(ctx, 0, total);
    g_last_threads_used.store(1, std::memory_order_relaxed);
    return;
  }
  std::unique_lock<std::mutex> lock(*g_busy, std::try_to_lock);
  if (!lock.owns_lock()) {
    fn(ctx, 0, total);
    g_last_threads_used.store(1, std::memory_order_relaxed);
    return;
  }
  n_threads = std::min(n_threads, kMaxThreads);
  // at most kMaxChunks chunks (the claim word's 20 bits), for the pool and the runner alike
  chunk = std::max<int64_t>(chunk, (total + static_cast<int64_t>(kMaxChunks) - 1) /
                                       static_cast<int64_t>(kMaxChunks));
  if (run_outside(n_threads, total, chunk, fn, ctx)) return;
  if (g_pool == nullptr) g_pool = new Pool();
  g_pool->run(n_threads, total, chunk, fn, ctx);
}

void set_runner(RunnerFn runner) { g_runner.store(runner, std::memory_order_release); }
RunnerFn runner() { return g_runner.load(std::memory_order_acquire); }
bool last_run_outside() { return g_last_outside.load(std::memory_order_relaxed); }

int last_threads_used() { return g_last_threads_used.load(std::memory_order_relaxed); }

int available_cpus() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

}  // namespace fastoptim
