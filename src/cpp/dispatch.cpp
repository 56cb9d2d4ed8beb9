// dispatch.cpp: the one place where the ISA is chosen and work is split between threads.
//
// Note [untested ISA paths]
// A path is chosen by default only if it is compiled, the CPU has it, and it has been run by
// the test suite on some machine. Every compiled path has: AVX-512 (F) passed the whole suite
// with FASTOPTIM_ISA=avx512 on an AMD Zen 5 (avx512 f/bw/dq/vl/bf16), so it is now the default
// where the CPU has it. Whether it is also the faster path there is for a benchmark to say; a
// path that has never been run anywhere goes back to opt-in by returning false here.
//
// Note [small arrays stay on one thread]
// Waking a worker costs microseconds and, with a core busy elsewhere, the wake-up can be late
// by a scheduler quantum (parallel.h, Note [caller runs]). A call uses at most
// total / kMinPerThread threads, so arrays of fewer than 2 * kMinPerThread elements never
// involve a second thread.
#include "dispatch.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <vector>

#include "parallel.h"

namespace fastoptim {
namespace {

constexpr int64_t kMinPerThread = int64_t{1} << 15;
// Work is handed out in chunks of this many elements (a multiple of every vector width and of
// a cache line): small enough to balance two threads when one is late, large enough that the
// one atomic claim per chunk costs nothing (Adam fp32: ~0.9 MB of traffic per chunk).
constexpr int64_t kChunk = int64_t{1} << 15;

KernelTable g_tables[kNumIsas];
// Written by set_isa / set_num_threads (any Python thread, GIL held) and read by updates
// running with the GIL released: atomics. Relaxed is enough, nothing else is published with
// them; execute() reads g_isa through the implicit (seq_cst) conversion.
std::atomic<int> g_isa{static_cast<int>(Isa::kScalar)};  // an Isa
std::atomic<int> g_threads{1};

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx512Bf16: return "avx512bf16";
  }
  return "?";
}

bool isa_compiled(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return true;
#if defined(FASTOPTIM_HAVE_AVX2)
    case Isa::kAvx2: return true;
#endif
#if defined(FASTOPTIM_HAVE_AVX512)
    case Isa::kAvx512: return true;
#endif
#if defined(FASTOPTIM_HAVE_AVX512) && defined(FASTOPTIM_HAVE_AVX512BF16)
    case Isa::kAvx512Bf16: return true;
#endif
    default: return false;
  }
}

bool isa_cpu_has(Isa isa) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  switch (isa) {
    case Isa::kScalar: return true;
    // Each vector TU is also compiled with -mf16c (f16 storage, vec.h): every AVX2 CPU has it.
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
    case Isa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
    case Isa::kAvx512Bf16:
      // (its unit is compiled with -mavx512bw -mavx512dq too: kernels.h, Note [paired native bf16
      // stores])
      return isa_cpu_has(Isa::kAvx512) && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512bf16");
  }
  return false;
#else
  return isa == Isa::kScalar;
#endif
}

bool isa_tested(Isa) { return true; }  // every compiled path (Note [untested ISA paths])

Isa current_isa() { return static_cast<Isa>(g_isa.load(std::memory_order_relaxed)); }

namespace {
// The ISA called `name`, if this build and this CPU can run it.
Isa usable_isa(const std::string& name) {
  for (int i = 0; i < kNumIsas; ++i) {
    const Isa isa = static_cast<Isa>(i);
    if (name != isa_name(isa)) continue;
    if (!isa_compiled(isa))
      throw std::invalid_argument("ISA '" + name + "' was not compiled into this build of fastoptim");
    if (!isa_cpu_has(isa))
      throw std::invalid_argument("ISA '" + name + "' is not supported by this CPU");
    return isa;
  }
  throw std::invalid_argument("unknown ISA '" + name +
                              "'; expected one of scalar, avx2, avx512, avx512bf16");
}
}  // namespace

void set_isa(const std::string& name) {
  g_isa.store(static_cast<int>(usable_isa(name)), std::memory_order_relaxed);
}

void init_dispatch() {
  // A table filler is compiled with its ISA's flags (it may itself use wide stores), so it
  // runs only on a CPU that has the ISA.
  // Each ISA's shards fill disjoint entries of its table (kernels.h, Note [ISA shards]).
  const auto fill = [](const FillFn (&shards)[kIsaShards], KernelTable* t) {
    for (FillFn f : shards) f(t);
  };
  fill(FO_ISA_FILL_LIST(scalar), &g_tables[0]);
#if defined(FASTOPTIM_HAVE_AVX2)
  if (isa_cpu_has(Isa::kAvx2)) fill(FO_ISA_FILL_LIST(avx2), &g_tables[1]);
#endif
#if defined(FASTOPTIM_HAVE_AVX512)
  if (isa_cpu_has(Isa::kAvx512)) fill(FO_ISA_FILL_LIST(avx512), &g_tables[2]);
#endif
#if defined(FASTOPTIM_HAVE_AVX512) && defined(FASTOPTIM_HAVE_AVX512BF16)
  if (isa_cpu_has(Isa::kAvx512Bf16)) {
    // the avx512 table, with the entries of the bfloat16-storing formats replaced
    KernelTable bf;
    fill(FO_ISA_FILL_LIST(avx512bf16), &bf);
    g_tables[3] = g_tables[2];
    g_tables[3].isa = "avx512bf16";
    for (int r = 0; r < kNumRules; ++r)
      for (int f = 0; f < kNumFormats; ++f)
        if (bf.fn[r][f] != nullptr) g_tables[3].fn[r][f] = bf.fn[r][f];
    for (int k = 0; k < kNumStorage; ++k)
      for (int w = 0; w < 2; ++w)
        if (bf.convert[k][w] != nullptr) g_tables[3].convert[k][w] = bf.convert[k][w];
  }
#endif
  g_threads.store(std::min(available_cpus(), kMaxThreads), std::memory_order_relaxed);
  Isa best = Isa::kScalar;
  for (int i = kNumIsas - 1; i >= 0; --i) {
    const Isa isa = static_cast<Isa>(i);
    if (isa_compiled(isa) && isa_cpu_has(isa) && isa_tested(isa)) {
      best = isa;
      break;
    }
  }
  g_isa.store(static_cast<int>(best), std::memory_order_relaxed);
  if (const char* env = std::getenv("FASTOPTIM_ISA"); env != nullptr && *env != '\0') {
    try {
      set_isa(env);
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument(std::string("FASTOPTIM_ISA: ") + e.what());
    }
  }
}

int num_threads() { return g_threads.load(std::memory_order_relaxed); }
void set_num_threads(int n) {
  g_threads.store(std::clamp(n, 1, kMaxThreads), std::memory_order_relaxed);
}

int threads_for(int64_t total) {
  const int64_t by_size = total / kMinPerThread;
  const int64_t threads = g_threads.load(std::memory_order_relaxed);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, by_size)));
}

namespace {
struct Job {
  KernelFn fn;
  const Batch* batch;
  const void* args;
  unsigned mask;
};
void run_job(const void* ctx, int64_t begin, int64_t end) {
  const Job& j = *static_cast<const Job*>(ctx);
  j.fn(*j.batch, begin, end, j.args, j.mask);
}
}  // namespace

namespace {
std::atomic<int64_t> g_prefetch_ahead{kAutoPrefetch};
// Note [software prefetch] (kernels.h): elements ahead by the width of the params. Measured
// with bench/bench_prefetch.py (AdamW 2^26, every distance on the same arrays in one process,
// medians of 5 rounds, Zen 5, 1 and 2 threads; ms relative to 256 ahead; two runs, 1024 ahead
// in the second only):
//   16-bit params (all-bf16, all-fp16, bf16 + SR / Kahan): 1024 ahead 0.75-0.92, 512 ahead
//     0.81-1.03, none 0.79-1.14; so 1024 (2 KiB of params).
//   32-bit params: fp32 and fp32 master with bf16 grads within +-10% from none to 1024, no
//     consistent winner; int8/int4 states noisier (int8 0.78-1.26), no consistent winner
//     either. 256 (1 KiB) stayed then, as measured on the AVX2 VM of the first sessions (4-8%
//     faster than none at 2^26), and stays for the quantized driver (Note [quantized block
//     driver]) and fp32 params with bf16 states.
// Measured again on a Zen 4 VM (avx512bf16; two bench_prefetch.py --log2 26 --reps 7 runs with
// one interleaved fp32 A/B against torch fused on its tensors): fp32 AdamW ran at 0.66-0.80x
// the time of 256 ahead at 64 ahead and 0.78-0.80x with none, 1 and 2 threads; fp32 master
// with bf16 grads 0.69-0.76x at 64; the 16-bit formats as before (none 1.13-1.29x, 1024
// best); int8 0.89-0.93x with none but int4 1.19-1.21x. So fp32 params read and written
// whole (fp32, and fp32 master with 16-bit grads, with or without the copy) take 64.
// The quantized formats on that VM, four runs (bench_prefetch.py --log2 26 --reps 7 or 9,
// --formats to time only them): int8 states on fp32 params ran at 0.82-0.89x the time of 256
// ahead with none (1 thread) and 0.82-0.93x (2 threads), every other distance within +-7% of
// 256; so none. int4 on fp32 params 1.09-1.21x with none (256 stays); bf16 params with int8 or
// int4 states 1.06-1.19x with none and within -14%/+8% at 64 to 1024 (one run: 256 stays).
int64_t default_prefetch_ahead(Format f) {
  switch (f) {
    case kBF16: case kF16: case kBF16F32States: case kF16F32States: case kBF16Kahan:
      return 1024;
    case kF64:
      return 128;
    case kF32: case kF32BF16Grads: case kF32F16Grads: case kF32BF16GradsCopy: case kF32F16GradsCopy:
      return 64;
    case kF32Q8:
      return 0;
    default:
      return 256;
  }
}
}  // namespace
int64_t prefetch_ahead_setting() { return g_prefetch_ahead.load(std::memory_order_relaxed); }
int64_t set_prefetch_ahead(int64_t elements) { return g_prefetch_ahead.exchange(elements); }

void execute(RuleId rule, unsigned mask, Format format, const Batch& batch_in, const void* args) {
  const KernelFn fn = g_tables[static_cast<int>(g_isa)].fn[rule][format];
  const int64_t total = batch_in.offsets[batch_in.n_tensors];
  if (total == 0) return;
  Batch batch = batch_in;
  const int64_t ahead = prefetch_ahead_setting();
  batch.prefetch_ahead = ahead >= 0 ? ahead : default_prefetch_ahead(format);
  const Job job{fn, &batch, args, mask};
  parallel_for(threads_for(total), total, kChunk, &run_job, &job);
}

namespace {
struct BytesJob {
  BytesFn fn;
  const ByteStreams* streams;
};
void run_bytes(const void* ctx, int64_t begin, int64_t end) {
  const BytesJob& j = *static_cast<const BytesJob*>(ctx);
  j.fn(*j.streams, begin, end);
}
}  // namespace

void stream_bytes(const ByteStreams& streams, int64_t elements) {
  const BytesJob job{g_tables[static_cast<int>(g_isa)].stream_bytes, &streams};
  parallel_for(threads_for(elements), elements / kByteBlock, kChunk / kByteBlock, &run_bytes, &job);
}

namespace {
struct NormJob {
  NormFn fn;
  const Batch* batch;
  const int64_t* block_offsets;
  double* partial;
};
void run_norm(const void* ctx, int64_t begin, int64_t end) {
  const NormJob& j = *static_cast<const NormJob*>(ctx);
  j.fn(*j.batch, j.block_offsets, begin, end, j.partial);
}
struct UnscaleJob {
  UnscaleFn fn;
  const Batch* batch;
  double scale;
  mutable std::atomic<bool> found{false};
};
void run_unscale(const void* ctx, int64_t begin, int64_t end) {
  const UnscaleJob& j = *static_cast<const UnscaleJob*>(ctx);
  if (j.fn(*j.batch, begin, end, j.scale)) j.found.store(true, std::memory_order_relaxed);
}
}  // namespace

double sum_of_squares(GradType type, const Batch& batch) {
  std::vector<int64_t> block_offsets(batch.n_tensors + 1, 0);
  for (int64_t t = 0; t < batch.n_tensors; ++t) {
    const int64_t n = batch.offsets[t + 1] - batch.offsets[t];
    block_offsets[t + 1] = block_offsets[t] + (n + kNormBlock - 1) / kNormBlock;
  }
  const int64_t blocks = block_offsets.back();
  if (blocks == 0) return 0.0;
  std::vector<double> partial(blocks, 0.0);
  const NormJob job{g_tables[static_cast<int>(g_isa)].sumsq[type], &batch, block_offsets.data(),
                    partial.data()};
  // Whole blocks per chunk; the thread count follows the element count as in execute().
  parallel_for(threads_for(batch.offsets[batch.n_tensors]), blocks,
               std::max<int64_t>(1, kChunk / kNormBlock), &run_norm, &job);
  double sum = 0.0;
  for (const double p : partial) sum += p;  // block order: deterministic
  return sum;
}

bool unscale(GradType type, const Batch& batch, double scale) {
  const int64_t total = batch.offsets[batch.n_tensors];
  if (total == 0) return false;
  UnscaleJob job;
  job.fn = g_tables[static_cast<int>(g_isa)].unscale[type];
  job.batch = &batch;
  job.scale = scale;
  parallel_for(threads_for(total), total, kChunk, &run_unscale, &job);
  return job.found.load();
}

void run_convert(const std::string& isa, Storage fmt, bool widen, const void* src, void* dst,
                 int64_t n) {
  g_tables[static_cast<int>(usable_isa(isa))].convert[fmt][widen](src, dst, n);
}

void run_convert_sr(const std::string& isa, const float* src, void* dst, int64_t n, uint32_t key,
                    uint64_t index0) {
  g_tables[static_cast<int>(usable_isa(isa))].convert_sr(src, dst, n, key, index0);
}

}  // namespace fastoptim
