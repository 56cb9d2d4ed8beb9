// launch_plan.h: how CUDA launches cover every element of every tensor of a call.
//
// Note [chunks per tensor]
// Each tensor is cut into chunks of `plan.chunk` elements (its last chunk shorter); the
// chunks of a launch are numbered tensor after tensor: chunk_starts[t] is the number of the
// first chunk of tensor t, chunk_starts[n] the launch's num_chunks (an empty tensor has no
// chunk). Block b of a grid of G blocks takes chunks b, b + G, b + 2G, ... (a grid-stride
// loop, so one launch covers any size); for chunk c it finds the tensor by binary search over
// chunk_starts (tensor_of), and its 256 threads share that one SPAN (the part of one tensor
// inside the chunk) round-robin. One block per (tensor, chunk) is the mapping of the usual
// multi-tensor kernels: 5,000 tensors of 17 elements are 5,000 blocks spread over every SM,
// not 21 blocks walking 240 spans each (which a chunking of the concatenated index space gave).
//
// Note [launch groups]
// The metadata of a launch (per tensor: its size, its first chunk and its 5 slot pointers,
// 56 bytes) travels INSIDE the kernel's parameters (__grid_constant__): no host buffer, no
// copy, nothing for a CUDA graph to capture but the launch itself, whose parameters the graph
// stores by value. The parameter space holds kGroupLarge tensors (CUDA 12.1+ on sm_70+:
// 32,764 bytes); a call with more non-empty tensors is split into several launches on the
// same stream, of at most kGroupLarge tensors each, in order (for_each_group). A launch of at
// most kGroupSmall tensors uses a kernel with a small parameter block (less to upload per
// launch for the usual few-tensor call). Empty tensors take no place. The 16-bit formats'
// launches carry two more values a tensor (MetaView's bases and copies, 72 bytes): at most
// kGroupMixed tensors each, one parameter-block size.
//
// Everything the kernel executes is host + device (FO_HD) and written as a function of
// (blockIdx, threadIdx, blockDim, gridDim), so the CUDA kernel (src/cuda/kernels.cuh) and the
// CPU test hooks (_core._plan_coverage, src/cuda/plan_hooks.cpp; _core._emulate_kernel) run
// the SAME code, groups included: the tests walk whole grids on the CPU and prove that every
// element is visited exactly once.
//
// Note [vector path]
// A span is processed in 16-byte pieces (float4 / double2; the 16-bit formats' 8-element
// visits: one uint4 of a 16-bit stream, two of a float32 one) when, at its first
// element past a short scalar head, the pointers of EVERY slot the rule touches are 16-byte
// aligned: the head is the few elements (< 16 / param bytes) before the param pointer reaches a
// 16-byte boundary. Slots misaligned relative to each other (slices at different odd offsets)
// make the whole span scalar. Vector and scalar visits run the same rule on the same lanes
// (Note [bitwise identical paths] in vec.h), so the choice never changes a result. A vector
// never extends past the span: the last partial vector is done by scalar visits (tail).
//
// Note [64-bit indexing]
// Every element index, size, chunk number and product of them is int64_t. The CUDA
// built-ins are 32-bit unsigned; they enter as uint32_t and are widened before any product,
// so a buffer of more than 2^31 (or 2^32) elements is addressed correctly. The host test
// walks the chunks around 2^31 and the last chunk of such a buffer without allocating it.
#pragma once

#include <cstdint>
#include <vector>

#include "rules.h"

namespace fastoptim {
namespace plan {

constexpr uint32_t kBlockThreads = 256;   // threads per block
constexpr int64_t kElemsPerThread = 16;   // elements per thread per chunk
constexpr int64_t kChunk = kBlockThreads * kElemsPerThread;  // 4,096 elements per chunk
constexpr int64_t kBlocksPerSm = 32;      // grid cap: a few waves of resident blocks per SM
constexpr uintptr_t kVecBytes = 16;       // float4 / double2

// Note [launch groups]: tensors per launch. 576 x 56 bytes = 32,256 bytes, below the 32,764
// bytes of kernel parameters with room for the plan and the rule's constants (kernels.cuh
// static_asserts the total per kernel).
constexpr int64_t kGroupSmall = 8;
constexpr int64_t kGroupLarge = 576;
// The 16-bit formats' launches carry two more values per tensor (MetaView's bases and
// copies, 72 bytes a tensor): 448 x 72 = 32,256 bytes, the same parameter space.
constexpr int64_t kGroupMixed = 448;
constexpr int64_t kMetaBytesPerTensor = 2 * sizeof(int64_t) + kMaxSlots * sizeof(void*);

// The geometry of one launch.
struct LaunchPlan {
  int64_t n_tensors = 0;    // tensors of this launch (empty ones are never in a launch)
  int64_t chunk = kChunk;   // elements per chunk; any value >= 1 is correct
  int64_t num_chunks = 0;   // chunk_starts[n_tensors]
  uint32_t block = kBlockThreads;
  uint32_t grid = 0;        // 0 only when num_chunks == 0 (no launch)
  unsigned slot_mask = 0;   // slots the rule loads or stores (Rule::kReads | Rule::kWrites)
};

// Where the tensors of one launch are (Note [chunks per tensor]).
struct MetaView {
  const int64_t* sizes;         // sizes[t]: elements of tensor t (> 0)
  const int64_t* chunk_starts;  // [n_tensors + 1]: first chunk of tensor t; [n] = num_chunks
  void* const* ptrs;            // ptrs[t * kMaxSlots + s]: slot s of tensor t (null if unused)
  // The 16-bit formats' launches only (Note [16-bit formats on the device], rule_visitor.h),
  // else null: tensor t's first element's index in the call (stochastic rounding's element
  // index), and its param copy or compensation (the copies stream; null if the call has none).
  const int64_t* bases = nullptr;
  void* const* copies = nullptr;
};

// Blocks of a launch of `num_chunks` chunks on a device with `sm_count` SMs.
inline uint32_t grid_for(int64_t num_chunks, int sm_count) {
  const int64_t cap = static_cast<int64_t>(sm_count > 0 ? sm_count : 1) * kBlocksPerSm;
  return static_cast<uint32_t>(num_chunks < cap ? num_chunks : cap);
}

// Host: calls fn(tensors, count) for each launch of a call whose tensor t has
// offsets[t + 1] - offsets[t] elements: the non-empty tensors, in order, `cap` at a time
// (Note [launch groups]). `tensors` are indices into the call's tensors.
template <class Fn> void for_each_group(const int64_t* offsets, int64_t n, int64_t cap, Fn&& fn) {
  std::vector<int64_t> group;
  group.reserve(static_cast<size_t>(n < cap ? n : cap));
  for (int64_t t = 0; t < n; ++t) {
    if (offsets[t + 1] == offsets[t]) continue;
    group.push_back(t);
    if (static_cast<int64_t>(group.size()) == cap) {
      fn(group.data(), cap);
      group.clear();
    }
  }
  if (!group.empty()) fn(group.data(), static_cast<int64_t>(group.size()));
}

// Host: fills one launch's metadata (capacity >= count) for the tensors `tensors` of a call
// (offsets as above; slots[s][t] the data of slot s of tensor t, slots[s] null if unused) and
// returns its plan. Only the slots of slot_mask are kept; the others are null.
// Where `bases` is not null, bases[k] and copies[k] receive the tensor's offset in the call
// and its copies-stream pointer (call_copies[t], or null where call_copies is null).
inline LaunchPlan fill_group(const int64_t* offsets, void* const* const* slots, const int64_t* tensors,
                             int64_t count, unsigned slot_mask, int64_t chunk, int sm_count,
                             int64_t* sizes, int64_t* chunk_starts, void** ptrs,
                             int64_t* bases = nullptr, void** copies = nullptr,
                             void* const* call_copies = nullptr) {
  LaunchPlan p;
  p.n_tensors = count;
  p.chunk = chunk;
  p.slot_mask = slot_mask;
  int64_t c = 0;
  for (int64_t k = 0; k < count; ++k) {
    const int64_t t = tensors[k];
    sizes[k] = offsets[t + 1] - offsets[t];
    chunk_starts[k] = c;
    c += (sizes[k] + chunk - 1) / chunk;
    for (int s = 0; s < kMaxSlots; ++s)
      ptrs[k * kMaxSlots + s] = (slot_mask & (1u << s)) && slots[s] ? slots[s][t] : nullptr;
    if (bases) {
      bases[k] = offsets[t];
      copies[k] = call_copies ? call_copies[t] : nullptr;
    }
  }
  chunk_starts[count] = c;
  p.num_chunks = c;
  p.grid = grid_for(c, sm_count);
  return p;
}

// Index of the tensor holding chunk `c`: the last t with starts[t] <= c, so tensors without
// chunks before a non-empty one are skipped (kernels.h's tensor_of semantics, host + device).
FO_HD FO_INLINE int64_t tensor_of(const int64_t* starts, int64_t n, int64_t c) {
  int64_t lo = 0, hi = n;  // starts[lo] <= c holds; answer in [lo, hi]
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    if (starts[mid] <= c) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// The pointers of the span of one tensor: its slots, its copies stream (or null) and its
// first element's index in the call (MetaView's bases; 0 where there are none).
struct SpanPtrs {
  void* p[kMaxSlots];
  void* copy;
  int64_t base;
};

FO_HD FO_INLINE int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Byte address of element i of a stream of `bytes`-sized elements, as an integer (also for the
// CPU walk's fake pointers, which are never dereferenced).
FO_HD FO_INLINE uintptr_t addr_of(const void* p, int64_t i, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(i) * static_cast<uintptr_t>(bytes);
}

// One thread's share of the span [lo, hi) of tensor t (local indices). The visitor says how
// its streams are stored: Visitor::kVec, the elements of one vector visit, and
// v.slot_bytes(s) / v.copy_bytes(), the element size of slot s and of the copies stream
// (0: none), with which every stream of a vector visit is read in 16-byte pieces. It gets
//   v.scalar(ptrs, t, i)   one element i
//   v.vector(ptrs, t, i)   the kVec elements i .. i + kVec - 1, every stream 16-byte aligned at i
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <class Visitor>
FO_HD FO_INLINE void span_body(const SpanPtrs& sp, unsigned slot_mask, int64_t t, int64_t lo,
                               int64_t hi, int64_t tid, int64_t nthreads, Visitor& v) {
  constexpr int64_t kVec = Visitor::kVec;
  // Scalar head until the param pointer is 16-byte aligned (Note [vector path]).
  const int64_t pb = v.slot_bytes(0);
  const uintptr_t a0 = addr_of(sp.p[0], lo, pb);
  int64_t head = static_cast<int64_t>(((kVecBytes - a0 % kVecBytes) % kVecBytes) / static_cast<uintptr_t>(pb));
  head = min64(head, hi - lo);
  bool vec_ok = (a0 % static_cast<uintptr_t>(pb)) == 0;
  for (int s = 0; s < kMaxSlots; ++s)
    if (slot_mask & (1u << s)) vec_ok = vec_ok && addr_of(sp.p[s], lo + head, v.slot_bytes(s)) % kVecBytes == 0;
  if (v.copy_bytes() > 0) vec_ok = vec_ok && addr_of(sp.copy, lo + head, v.copy_bytes()) % kVecBytes == 0;
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

// One thread's share of chunk c: the span of the one tensor the chunk belongs to.
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <class Visitor>
FO_HD FO_INLINE void chunk_body(const LaunchPlan& plan, const MetaView& m, int64_t c, int64_t tid,
                                int64_t nthreads, Visitor& v) {
  const int64_t t = tensor_of(m.chunk_starts, plan.n_tensors, c);
  const int64_t lo = (c - m.chunk_starts[t]) * plan.chunk;
  const int64_t hi = min64(lo + plan.chunk, m.sizes[t]);
  SpanPtrs sp;
  for (int s = 0; s < kMaxSlots; ++s)
    sp.p[s] = (plan.slot_mask & (1u << s)) ? m.ptrs[t * kMaxSlots + s] : nullptr;
  sp.copy = m.copies ? m.copies[t] : nullptr;
  sp.base = m.bases ? m.bases[t] : 0;
  span_body(sp, plan.slot_mask, t, lo, hi, tid, nthreads, v);
}

// The whole kernel body of thread (block_idx, thread_idx): its block's chunks, grid-stride.
// The arguments are CUDA's blockIdx.x, threadIdx.x, blockDim.x, gridDim.x.
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <class Visitor>
FO_HD FO_INLINE void block_body(const LaunchPlan& plan, const MetaView& m, uint32_t block_idx,
                                uint32_t thread_idx, uint32_t block_dim, uint32_t grid_dim,
                                Visitor& v) {
  for (int64_t c = block_idx; c < plan.num_chunks; c += grid_dim)
    chunk_body(plan, m, c, thread_idx, block_dim, v);
}

}  // namespace plan
}  // namespace fastoptim
