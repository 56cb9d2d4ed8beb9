// launch_plan.h: how ONE CUDA launch covers every element of every tensor of a call.
//
// The index space is the CPU Batch's (kernel_api.h): a GLOBAL element index over the
// concatenation of the call's tensors, offsets[t] .. offsets[t + 1] being tensor t. It is cut
// into chunks of `plan.chunk` elements. Block b of a grid of G blocks takes chunks
// b, b + G, b + 2G, ... (a grid-stride loop, so one launch covers any size); inside a chunk,
// the block finds the tensor of its first element by binary search (tensor_of, the same
// semantics as kernels.h) and walks the tensors the chunk touches, one SPAN (the part of one
// tensor inside the chunk) at a time. The threads of the block share a span round-robin.
//
// Everything here is host + device (FO_HD) and written as a function of
// (blockIdx, threadIdx, blockDim, gridDim), so the CUDA kernel (src/cuda/kernels.cuh) and the
// CPU test hook (_core._plan_coverage, src/cuda/plan_hooks.cpp) execute the SAME code: the
// tests walk the whole grid on the CPU and prove that every element is visited exactly once.
//
// Note [vector path]
// A span is processed with 16-byte loads and stores (float4 / double2) when, at its first
// element past a short scalar head, the pointers of EVERY slot the rule touches are 16-byte
// aligned: the head is the few elements (< 16 / sizeof(T)) before the param pointer reaches a
// 16-byte boundary. Slots misaligned relative to each other (slices at different odd offsets)
// make the whole span scalar. Vector and scalar visits run the same rule on the same lanes
// (Note [bitwise identical paths] in vec.h), so the choice never changes a result. A vector
// never extends past the span: the last partial vector is done by scalar visits (tail).
//
// Note [64-bit indexing]
// Every element index, offset, chunk number and product of them is int64_t. The CUDA
// built-ins are 32-bit unsigned; they enter as uint32_t and are widened before any product,
// so a buffer of more than 2^31 (or 2^32) elements is addressed correctly. The host test
// walks the chunks around 2^31 and the last chunk of such a buffer without allocating it.
#pragma once

#include <cstdint>

#include "rules.h"

namespace fastoptim {
namespace plan {

constexpr uint32_t kBlockThreads = 256;   // threads per block
constexpr int64_t kElemsPerThread = 16;   // elements per thread per chunk
constexpr int64_t kChunk = kBlockThreads * kElemsPerThread;  // 4,096 elements per chunk
constexpr int64_t kBlocksPerSm = 32;      // grid cap: a few waves of resident blocks per SM
constexpr uintptr_t kVecBytes = 16;       // float4 / double2

// The geometry of one launch.
struct LaunchPlan {
  int64_t total = 0;        // elements over all tensors (offsets[n_tensors])
  int64_t n_tensors = 0;
  int64_t chunk = kChunk;   // elements per chunk; any value >= 1 is correct
  int64_t num_chunks = 0;   // ceil(total / chunk)
  uint32_t block = kBlockThreads;
  uint32_t grid = 0;        // 0 only when total == 0 (no launch)
  unsigned slot_mask = 0;   // slots the rule loads or stores (Rule::kReads | Rule::kWrites)
};

// Where the tensors are: offsets[n_tensors + 1] (prefix sums of element counts) and
// ptrs[t * kMaxSlots + s], the data of slot s of tensor t (null for slots the rule ignores).
struct MetaView {
  const int64_t* offsets;
  void* const* ptrs;
};

// The plan the CUDA launcher uses for `total` elements on a device with `sm_count` SMs.
inline LaunchPlan make_plan(int64_t total, int64_t n_tensors, unsigned slot_mask, int sm_count) {
  LaunchPlan p;
  p.total = total;
  p.n_tensors = n_tensors;
  p.slot_mask = slot_mask;
  p.num_chunks = total > 0 ? (total + p.chunk - 1) / p.chunk : 0;
  const int64_t cap = static_cast<int64_t>(sm_count > 0 ? sm_count : 1) * kBlocksPerSm;
  p.grid = static_cast<uint32_t>(p.num_chunks < cap ? p.num_chunks : cap);
  return p;
}

// Index of the tensor holding global element `i`: the last t with off[t] <= i, so empty
// tensors before a non-empty one are skipped (kernels.h's tensor_of, host + device).
FO_HD FO_INLINE int64_t tensor_of(const int64_t* off, int64_t n, int64_t i) {
  int64_t lo = 0, hi = n;  // off[lo] <= i holds; answer in [lo, hi]
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    if (off[mid] <= i) lo = mid; else hi = mid - 1;
  }
  return lo;
}

template <class T> struct SpanPtrs {
  T* p[kMaxSlots];
};

FO_HD FO_INLINE int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
FO_HD FO_INLINE int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// Byte address of element i of a slot, as an integer (also for the CPU walk's fake pointers,
// which are never dereferenced).
template <class T> FO_HD FO_INLINE uintptr_t addr_of(const T* p, int64_t i) {
  return reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(i) * sizeof(T);
}

// One thread's share of the span [lo, hi) of tensor t (local indices). The visitor gets
//   v.scalar(ptrs, t, i)   one element i
//   v.vector(ptrs, t, i)   the kVec elements i .. i + kVec - 1, all slots 16-byte aligned at i
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <class T, class Visitor>
FO_HD FO_INLINE void span_body(const SpanPtrs<T>& sp, unsigned slot_mask, int64_t t, int64_t lo,
                               int64_t hi, int64_t tid, int64_t nthreads, Visitor& v) {
  constexpr int64_t kVec = static_cast<int64_t>(kVecBytes / sizeof(T));
  // Scalar head until the param pointer is 16-byte aligned (Note [vector path]).
  const uintptr_t a0 = addr_of(sp.p[0], lo);
  int64_t head = static_cast<int64_t>(((kVecBytes - a0 % kVecBytes) % kVecBytes) / sizeof(T));
  head = min64(head, hi - lo);
  bool vec_ok = (a0 % sizeof(T)) == 0;
  for (int s = 0; s < kMaxSlots; ++s)
    if (slot_mask & (1u << s)) vec_ok = vec_ok && addr_of(sp.p[s], lo + head) % kVecBytes == 0;
  if (!vec_ok) {
    for (int64_t i = lo + tid; i < hi; i += nthreads) v.scalar(sp, t, i);
    return;
  }
  const int64_t body = lo + head;
  const int64_t n_vec = (hi - body) / kVec;
  const int64_t tail = body + n_vec * kVec;
  for (int64_t i = lo + tid; i < body; i += nthreads) v.scalar(sp, t, i);
  for (int64_t j = tid; j < n_vec; j += nthreads) v.vector(sp, t, body + j * kVec);
  for (int64_t i = tail + tid; i < hi; i += nthreads) v.scalar(sp, t, i);
}

// One thread's share of chunk c: every span of every tensor the chunk touches.
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <class T, class Visitor>
FO_HD FO_INLINE void chunk_body(const LaunchPlan& plan, const MetaView& m, int64_t c, int64_t tid,
                                int64_t nthreads, Visitor& v) {
  const int64_t begin = c * plan.chunk;
  const int64_t end = min64(begin + plan.chunk, plan.total);
  const int64_t* off = m.offsets;
  for (int64_t t = tensor_of(off, plan.n_tensors, begin); t < plan.n_tensors && off[t] < end; ++t) {
    const int64_t lo = max64(begin, off[t]) - off[t];
    const int64_t hi = min64(end, off[t + 1]) - off[t];
    if (lo >= hi) continue;  // an empty tensor
    SpanPtrs<T> sp;
    for (int s = 0; s < kMaxSlots; ++s)
      sp.p[s] = (plan.slot_mask & (1u << s)) ? static_cast<T*>(m.ptrs[t * kMaxSlots + s]) : nullptr;
    span_body<T>(sp, plan.slot_mask, t, lo, hi, tid, nthreads, v);
  }
}

// The whole kernel body of thread (block_idx, thread_idx): its block's chunks, grid-stride.
// The arguments are CUDA's blockIdx.x, threadIdx.x, blockDim.x, gridDim.x.
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <class T, class Visitor>
FO_HD FO_INLINE void block_body(const LaunchPlan& plan, const MetaView& m, uint32_t block_idx,
                                uint32_t thread_idx, uint32_t block_dim, uint32_t grid_dim,
                                Visitor& v) {
  for (int64_t c = block_idx; c < plan.num_chunks; c += grid_dim)
    chunk_body<T>(plan, m, c, thread_idx, block_dim, v);
}

}  // namespace plan
}  // namespace fastoptim
