// plan_hooks.cpp: the CUDA kernel body executed on the CPU, for the tests. No CUDA is needed:
// compiled by the host compiler into every build of _core.
//
// _core._plan_coverage runs plan::block_body (or plan::chunk_body for chosen chunks) of
// src/cpp/launch_plan.h, the very code of the CUDA kernel, for every (block, thread) of the
// grid, over FAKE device pointers (never dereferenced), with a visitor that records what each
// thread would load and store. tests/test_launch_plan.py then proves that every element of
// every tensor is visited exactly once, that every 16-byte access is 16-byte aligned in every
// slot, and that each visit used its own tensor's pointers.
//
// Builds with the CUDA backend also get _core._emulate_kernel (emulate.cpp).
#include "plan_hooks.h"

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "../cpp/launch_plan.h"

namespace py = pybind11;

namespace fastoptim {
namespace cuda {
namespace {

constexpr uintptr_t kSlotSpacing = uintptr_t{1} << 44;  // fake slot s lives at (s + 1) << 44

struct Fake {
  std::vector<int64_t> offsets;
  std::vector<void*> ptrs;  // [t * kMaxSlots + s]
};

struct Recorder {
  const Fake* fake;
  unsigned mask;
  int32_t* counts = nullptr;      // dense walk: visits per global element
  std::vector<int64_t>* visits = nullptr;  // chunk walk: (tensor, index, width) triples
  int64_t scalar_visits = 0, vector_visits = 0, out_of_range = 0, misaligned = 0, wrong_ptrs = 0;

  template <class T> void record(const plan::SpanPtrs<T>& sp, int64_t t, int64_t i, int64_t w) {
    const int64_t n = static_cast<int64_t>(fake->offsets.size()) - 1;
    if (t < 0 || t >= n || i < 0 || i + w > fake->offsets[t + 1] - fake->offsets[t]) {
      ++out_of_range;
      return;
    }
    for (int s = 0; s < kMaxSlots; ++s) {
      if (!(mask & (1u << s))) continue;
      if (sp.p[s] != fake->ptrs[t * kMaxSlots + s]) ++wrong_ptrs;
      if (w > 1 && plan::addr_of(sp.p[s], i) % plan::kVecBytes != 0) ++misaligned;
    }
    if (counts) {
      for (int64_t k = 0; k < w; ++k) ++counts[fake->offsets[t] + i + k];
    } else {
      visits->insert(visits->end(), {t, i, w});
    }
  }
  template <class T> void scalar(const plan::SpanPtrs<T>& sp, int64_t t, int64_t i) {
    ++scalar_visits;
    record(sp, t, i, 1);
  }
  template <class T> void vector(const plan::SpanPtrs<T>& sp, int64_t t, int64_t i) {
    ++vector_visits;
    record(sp, t, i, static_cast<int64_t>(plan::kVecBytes / sizeof(T)));
  }
};

// Walks the chosen chunks (chunk_body), the chosen blocks (block_body), or the whole grid.
template <class T>
void walk(const plan::LaunchPlan& p, const plan::MetaView& m, const std::vector<int64_t>* chunks,
          const std::vector<int64_t>* blocks, Recorder& r) {
  if (chunks) {
    for (int64_t c : *chunks)
      for (uint32_t tid = 0; tid < p.block; ++tid) plan::chunk_body<T>(p, m, c, tid, p.block, r);
    return;
  }
  if (blocks) {
    for (int64_t b : *blocks)
      for (uint32_t tid = 0; tid < p.block; ++tid)
        plan::block_body<T>(p, m, static_cast<uint32_t>(b), tid, p.block, p.grid, r);
    return;
  }
  for (uint32_t b = 0; b < p.grid; ++b)
    for (uint32_t tid = 0; tid < p.block; ++tid) plan::block_body<T>(p, m, b, tid, p.block, p.grid, r);
}

}  // namespace

// The launcher's plan (make_plan), with chunk/block/grid overridden where > 0.
plan::LaunchPlan geometry(int64_t total, int64_t n, unsigned slot_mask, int sm_count, int64_t chunk,
                          int64_t block, int64_t grid) {
  if (block < 0 || block > (int64_t{1} << 20) || grid < 0 || grid > (int64_t{1} << 31) || chunk < 0)
    throw py::value_error("block, grid and chunk must be >= 0 (0: the launcher's choice)");
  plan::LaunchPlan p = plan::make_plan(total, n, slot_mask, sm_count);
  if (chunk > 0) {
    p.chunk = chunk;
    p.num_chunks = total > 0 ? (total + chunk - 1) / chunk : 0;
    const int64_t cap = static_cast<int64_t>(sm_count > 0 ? sm_count : 1) * plan::kBlocksPerSm;
    p.grid = static_cast<uint32_t>(p.num_chunks < cap ? p.num_chunks : cap);
  }
  if (block > 0) p.block = static_cast<uint32_t>(block);
  if (grid > 0 && p.num_chunks > 0) p.grid = static_cast<uint32_t>(grid);
  return p;
}

namespace {

py::dict plan_coverage(const std::vector<int64_t>& sizes, py::object align_offsets, int itemsize,
                       unsigned slot_mask, int sm_count, int64_t chunk, int64_t block, int64_t grid,
                       py::object chunks, py::object blocks) {
  if (itemsize != 4 && itemsize != 8) throw py::value_error("itemsize must be 4 or 8");
  if (!(slot_mask & 1u) || slot_mask >= (1u << kMaxSlots))
    throw py::value_error("slot_mask must include slot 0 (param) and only slots 0..4");
  const int64_t n = static_cast<int64_t>(sizes.size());
  Fake fake;
  fake.offsets.assign(1, 0);
  for (int64_t s : sizes) {
    if (s < 0) throw py::value_error("sizes must be >= 0");
    fake.offsets.push_back(fake.offsets.back() + s);
  }
  const int64_t total = fake.offsets.back();
  // Fake pointers: 64-byte aligned per tensor, plus the requested byte offsets.
  std::vector<int64_t> offs(static_cast<size_t>(n * kMaxSlots), 0);
  if (!align_offsets.is_none()) {
    const py::sequence seq = align_offsets;
    if (static_cast<int64_t>(py::len(seq)) != n)
      throw py::value_error("align_offsets must have one entry per tensor");
    for (int64_t t = 0; t < n; ++t) {
      const py::object e = seq[static_cast<size_t>(t)];
      if (py::isinstance<py::sequence>(e)) {
        const auto v = e.cast<std::vector<int64_t>>();
        if (v.size() != kMaxSlots)
          throw py::value_error("a per-slot align_offsets entry needs 5 values");
        for (int s = 0; s < kMaxSlots; ++s) offs[t * kMaxSlots + s] = v[s];
      } else {
        for (int s = 0; s < kMaxSlots; ++s) offs[t * kMaxSlots + s] = e.cast<int64_t>();
      }
    }
  }
  fake.ptrs.assign(static_cast<size_t>(n * kMaxSlots), nullptr);
  for (int64_t t = 0; t < n; ++t)
    for (int s = 0; s < kMaxSlots; ++s) {
      if (!(slot_mask & (1u << s))) continue;
      const uintptr_t start = kSlotSpacing * (s + 1) +
                              static_cast<uintptr_t>(fake.offsets[t]) * itemsize +
                              64u * static_cast<uintptr_t>(t);
      const uintptr_t aligned = (start + 63u) & ~uintptr_t{63};
      fake.ptrs[t * kMaxSlots + s] =
          reinterpret_cast<void*>(aligned + static_cast<uintptr_t>(offs[t * kMaxSlots + s]));
    }

  const plan::LaunchPlan p = geometry(total, n, slot_mask, sm_count, chunk, block, grid);

  std::vector<int64_t> chunk_list, block_list;
  if (!chunks.is_none() && !blocks.is_none()) throw py::value_error("pass chunks= or blocks=, not both");
  const bool sparse = !chunks.is_none() || !blocks.is_none();
  if (!chunks.is_none()) {
    chunk_list = chunks.cast<std::vector<int64_t>>();
    for (int64_t c : chunk_list)
      if (c < 0 || c >= p.num_chunks) throw py::value_error("chunk index out of range");
  } else if (!blocks.is_none()) {
    block_list = blocks.cast<std::vector<int64_t>>();
    for (int64_t b : block_list)
      if (b < 0 || b >= static_cast<int64_t>(p.grid)) throw py::value_error("block index out of range");
  } else if (total > (int64_t{1} << 28)) {
    throw py::value_error("a dense walk is limited to 2^28 elements; pass chunks= or blocks=");
  }

  py::array_t<int32_t> counts(sparse ? 0 : total);
  std::vector<int64_t> visits;
  Recorder r{&fake, slot_mask};
  r.visits = &visits;
  if (!sparse && total > 0) {
    r.counts = counts.mutable_data();
    std::fill(r.counts, r.counts + total, 0);
  }
  const plan::MetaView m{fake.offsets.data(), fake.ptrs.data()};
  {
    py::gil_scoped_release release;
    const std::vector<int64_t>* c = chunks.is_none() ? nullptr : &chunk_list;
    const std::vector<int64_t>* b = blocks.is_none() ? nullptr : &block_list;
    if (itemsize == 4) walk<float>(p, m, c, b, r);
    else walk<double>(p, m, c, b, r);
  }

  py::dict d;
  d["total"] = total;
  d["num_chunks"] = p.num_chunks;
  d["chunk"] = p.chunk;
  d["block"] = p.block;
  d["grid"] = p.grid;
  d["scalar_visits"] = r.scalar_visits;
  d["vector_visits"] = r.vector_visits;
  d["out_of_range"] = r.out_of_range;
  d["misaligned_vectors"] = r.misaligned;
  d["wrong_pointers"] = r.wrong_ptrs;
  if (sparse) {
    py::array_t<int64_t> v({static_cast<py::ssize_t>(visits.size() / 3), py::ssize_t{3}});
    std::copy(visits.begin(), visits.end(), v.mutable_data());
    d["visits"] = v;
  } else {
    d["counts"] = counts;
  }
  return d;
}

}  // namespace

void def_plan_hooks(py::module_& m) {
  using py::arg;
  m.def("_plan_coverage", &plan_coverage, arg("sizes"), arg("align_offsets") = py::none(),
        py::kw_only(), arg("itemsize") = 4, arg("slot_mask") = 0x1fu, arg("sm_count") = 132,
        arg("chunk") = 0, arg("block") = 0, arg("grid") = 0, arg("chunks") = py::none(),
        arg("blocks") = py::none(),
        "Test hook: walk a CUDA launch plan (src/cpp/launch_plan.h) on the CPU over fake "
        "pointers and report what every thread would touch. sizes: elements per tensor; "
        "align_offsets: per tensor, a byte offset (or 5, one per slot) added to its 64-byte "
        "aligned fake address; chunk/block/grid: 0 = the launcher's choice; chunks (or blocks): "
        "walk only these chunks (or these blocks, grid-stride loop included) and return their "
        "visits (tensor, index, width) instead of per-element counts.");
}

}  // namespace cuda
}  // namespace fastoptim
