// plan_hooks.cpp: the CUDA kernel body executed on the CPU, for the tests. No CUDA is needed:
// compiled by the host compiler into every build of _core.
//
// _core._plan_coverage splits a call into launches as the launcher does (plan::for_each_group,
// plan::fill_group) and runs plan::block_body (or plan::chunk_body for chosen chunks) of
// src/cpp/launch_plan.h, the very code of the CUDA kernel, for every (block, thread) of every
// launch, over FAKE device pointers (never dereferenced), with a visitor that records what each
// thread would load and store. tests/test_launch_plan.py then proves that every element of
// every tensor is visited exactly once, that every 16-byte access is 16-byte aligned in every
// slot, and that each visit used its own tensor's pointers.
//
// _core._cuda_capture_problem and _core._cuda_device_switch expose host_logic.h's decisions.
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
#include "host_logic.h"

namespace py = pybind11;

namespace fastoptim {
namespace cuda {
namespace {

constexpr uintptr_t kSlotSpacing = uintptr_t{1} << 44;  // fake slot s lives at (s + 1) << 44

struct Fake {
  std::vector<int64_t> offsets;
  std::vector<void*> ptrs;    // [t * kMaxSlots + s]
  std::vector<void*> copies;  // [t]: the copies stream (16-bit launches that have one)
};

struct Recorder {
  const Fake* fake;
  unsigned mask;
  int64_t bytes[kMaxSlots];          // element size of each slot
  int64_t copy_bytes = 0;            // of the copies stream (0: none)
  const int64_t* tensors = nullptr;  // the current launch's tensors (group-local t -> call's t)
  int32_t* counts = nullptr;      // dense walk: visits per global element
  std::vector<int64_t>* visits = nullptr;  // chunk walk: (tensor, index, width) triples
  int64_t scalar_visits = 0, vector_visits = 0, out_of_range = 0, misaligned = 0, wrong_ptrs = 0;

  void record(const plan::SpanPtrs& sp, int64_t local, int64_t i, int64_t w) {
    const int64_t n = static_cast<int64_t>(fake->offsets.size()) - 1;
    const int64_t t = tensors[local];
    if (t < 0 || t >= n || i < 0 || i + w > fake->offsets[t + 1] - fake->offsets[t]) {
      ++out_of_range;
      return;
    }
    for (int s = 0; s < kMaxSlots; ++s) {
      if (!(mask & (1u << s))) continue;
      if (sp.p[s] != fake->ptrs[t * kMaxSlots + s]) ++wrong_ptrs;
      if (w > 1 && plan::addr_of(sp.p[s], i, bytes[s]) % plan::kVecBytes != 0) ++misaligned;
    }
    if (copy_bytes > 0) {
      if (sp.copy != fake->copies[t]) ++wrong_ptrs;
      if (w > 1 && plan::addr_of(sp.copy, i, copy_bytes) % plan::kVecBytes != 0) ++misaligned;
    }
    if (counts) {
      for (int64_t k = 0; k < w; ++k) ++counts[fake->offsets[t] + i + k];
    } else {
      visits->insert(visits->end(), {t, i, w});
    }
  }
};

// The visitor of plan::span_body: kV elements a vector visit (4 or 2 for float32 or float64,
// 8 for the 16-bit formats' launches, whose float32 streams take two 16-byte pieces a visit).
template <int64_t kV> struct RecorderOf {
  static constexpr int64_t kVec = kV;
  Recorder& r;
  int64_t slot_bytes(int s) const { return r.bytes[s]; }
  int64_t copy_bytes() const { return r.copy_bytes; }
  void scalar(const plan::SpanPtrs& sp, int64_t t, int64_t i) {
    ++r.scalar_visits;
    r.record(sp, t, i, 1);
  }
  void vector(const plan::SpanPtrs& sp, int64_t t, int64_t i) {
    ++r.vector_visits;
    r.record(sp, t, i, kV);
  }
};

// Walks the chosen chunks (chunk_body), the chosen blocks (block_body), or the whole grid.
template <class V>
void walk(const plan::LaunchPlan& p, const plan::MetaView& m, const std::vector<int64_t>* chunks,
          const std::vector<int64_t>* blocks, V& r) {
  if (chunks) {
    for (int64_t c : *chunks)
      for (uint32_t tid = 0; tid < p.block; ++tid) plan::chunk_body(p, m, c, tid, p.block, r);
    return;
  }
  if (blocks) {
    for (int64_t b : *blocks)
      for (uint32_t tid = 0; tid < p.block; ++tid)
        plan::block_body(p, m, static_cast<uint32_t>(b), tid, p.block, p.grid, r);
    return;
  }
  for (uint32_t b = 0; b < p.grid; ++b)
    for (uint32_t tid = 0; tid < p.block; ++tid) plan::block_body(p, m, b, tid, p.block, p.grid, r);
}

}  // namespace

void check_geometry(int64_t chunk, int64_t block, int64_t grid, int64_t group) {
  if (block < 0 || block > (int64_t{1} << 20) || grid < 0 || grid > (int64_t{1} << 31) ||
      chunk < 0 || group < 0 || group > plan::kGroupLarge)
    throw py::value_error("block, grid, chunk and group must be >= 0 (0: the launcher's choice), "
                          "group at most " + std::to_string(plan::kGroupLarge));
}

plan::LaunchPlan override_geometry(plan::LaunchPlan p, int64_t block, int64_t grid) {
  if (block > 0) p.block = static_cast<uint32_t>(block);
  if (grid > 0 && p.num_chunks > 0) p.grid = static_cast<uint32_t>(grid);
  return p;
}

namespace {

// itemsize: 4 or 8 (float32, float64: every slot), or 5 per-slot sizes of 2 or 4 (a 16-bit
// format's launch: 8 elements a vector visit), and optionally a sixth, the copies stream's (0:
// none, or 2); a per-tensor align_offsets entry then takes 6 values.
py::dict plan_coverage(const std::vector<int64_t>& sizes, py::object align_offsets, py::object itemsize_arg,
                       unsigned slot_mask, int sm_count, int64_t chunk, int64_t block, int64_t grid,
                       int64_t group, py::object chunks, py::object blocks) {
  int64_t slot_bytes[kMaxSlots];
  int64_t copy_bytes = 0;
  bool mixed = false;
  if (py::isinstance<py::sequence>(itemsize_arg)) {
    const auto v = itemsize_arg.cast<std::vector<int64_t>>();
    if (v.size() != kMaxSlots && v.size() != kMaxSlots + 1)
      throw py::value_error("per-slot itemsizes need 5 values (6 with the copies stream's)");
    for (int s = 0; s < kMaxSlots; ++s) {
      if (v[s] != 2 && v[s] != 4) throw py::value_error("per-slot itemsizes must be 2 or 4");
      slot_bytes[s] = v[s];
    }
    if (v.size() == kMaxSlots + 1) {
      if (v[kMaxSlots] != 0 && v[kMaxSlots] != 2)
        throw py::value_error("the copies stream's itemsize must be 0 (none) or 2");
      copy_bytes = v[kMaxSlots];
    }
    mixed = true;
  } else {
    const int64_t itemsize = itemsize_arg.cast<int64_t>();
    if (itemsize != 4 && itemsize != 8) throw py::value_error("itemsize must be 4 or 8");
    for (int64_t& b : slot_bytes) b = itemsize;
  }
  if (!(slot_mask & 1u) || slot_mask >= (1u << kMaxSlots))
    throw py::value_error("slot_mask must include slot 0 (param) and only slots 0..4");
  check_geometry(chunk, block, grid, group);
  if (chunk == 0) chunk = plan::kChunk;
  if (group == 0) group = mixed ? plan::kGroupMixed : plan::kGroupLarge;
  if (mixed && group > plan::kGroupMixed)
    throw py::value_error("group at most " + std::to_string(plan::kGroupMixed) + " for per-slot itemsizes");
  const int64_t n = static_cast<int64_t>(sizes.size());
  Fake fake;
  fake.offsets.assign(1, 0);
  for (int64_t s : sizes) {
    if (s < 0) throw py::value_error("sizes must be >= 0");
    fake.offsets.push_back(fake.offsets.back() + s);
  }
  const int64_t total = fake.offsets.back();
  // Fake pointers: 64-byte aligned per tensor, plus the requested byte offsets.
  constexpr int kStreams = kMaxSlots + 1;  // the slots and the copies stream
  std::vector<int64_t> offs(static_cast<size_t>(n * kStreams), 0);
  if (!align_offsets.is_none()) {
    const py::sequence seq = align_offsets;
    if (static_cast<int64_t>(py::len(seq)) != n)
      throw py::value_error("align_offsets must have one entry per tensor");
    for (int64_t t = 0; t < n; ++t) {
      const py::object e = seq[static_cast<size_t>(t)];
      if (py::isinstance<py::sequence>(e)) {
        const auto v = e.cast<std::vector<int64_t>>();
        if (v.size() != static_cast<size_t>(copy_bytes > 0 ? kStreams : kMaxSlots))
          throw py::value_error("a per-slot align_offsets entry needs 5 values (6 with a copies stream)");
        for (size_t s = 0; s < v.size(); ++s) offs[t * kStreams + s] = v[s];
      } else {
        for (int s = 0; s < kStreams; ++s) offs[t * kStreams + s] = e.cast<int64_t>();
      }
    }
  }
  fake.ptrs.assign(static_cast<size_t>(n * kMaxSlots), nullptr);
  std::vector<void*> slot_tables[kMaxSlots];
  void* const* slots[kMaxSlots] = {};
  for (int s = 0; s < kMaxSlots; ++s) {
    if (!(slot_mask & (1u << s))) continue;
    slot_tables[s].resize(static_cast<size_t>(n));
    for (int64_t t = 0; t < n; ++t) {
      const uintptr_t start = kSlotSpacing * (s + 1) +
                              static_cast<uintptr_t>(fake.offsets[t] * slot_bytes[s]) +
                              64u * static_cast<uintptr_t>(t);
      const uintptr_t aligned = (start + 63u) & ~uintptr_t{63};
      void* p = reinterpret_cast<void*>(aligned + static_cast<uintptr_t>(offs[t * kStreams + s]));
      fake.ptrs[t * kMaxSlots + s] = p;
      slot_tables[s][t] = p;
    }
    slots[s] = slot_tables[s].data();
  }
  if (copy_bytes > 0) {
    fake.copies.resize(static_cast<size_t>(n));
    for (int64_t t = 0; t < n; ++t) {
      const uintptr_t start = kSlotSpacing * (kMaxSlots + 1) +
                              static_cast<uintptr_t>(fake.offsets[t] * copy_bytes) +
                              64u * static_cast<uintptr_t>(t);
      const uintptr_t aligned = (start + 63u) & ~uintptr_t{63};
      fake.copies[t] = reinterpret_cast<void*>(aligned + static_cast<uintptr_t>(offs[t * kStreams + kMaxSlots]));
    }
  }

  // The launches, as the launcher makes them (Note [launch groups]).
  struct Launch {
    std::vector<int64_t> tensors, sizes, starts, bases;
    std::vector<void*> ptrs, copies;
    plan::LaunchPlan p;
  };
  std::vector<Launch> launches;
  plan::for_each_group(fake.offsets.data(), n, group, [&](const int64_t* ts, int64_t count) {
    Launch l;
    l.tensors.assign(ts, ts + count);
    l.sizes.resize(count);
    l.starts.resize(count + 1);
    l.ptrs.resize(count * kMaxSlots);
    l.bases.resize(count);
    l.copies.resize(count);
    l.p = override_geometry(
        plan::fill_group(fake.offsets.data(), slots, ts, count, slot_mask, chunk, sm_count,
                         l.sizes.data(), l.starts.data(), l.ptrs.data(),
                         copy_bytes > 0 ? l.bases.data() : nullptr, l.copies.data(),
                         copy_bytes > 0 ? fake.copies.data() : nullptr),
        block, grid);
    launches.push_back(std::move(l));
  });

  std::vector<int64_t> chunk_list, block_list;
  if (!chunks.is_none() && !blocks.is_none()) throw py::value_error("pass chunks= or blocks=, not both");
  const bool sparse = !chunks.is_none() || !blocks.is_none();
  if (sparse && launches.size() != 1)
    throw py::value_error("chunks= and blocks= need a call of exactly one launch");
  if (!chunks.is_none()) {
    chunk_list = chunks.cast<std::vector<int64_t>>();
    for (int64_t c : chunk_list)
      if (c < 0 || c >= launches[0].p.num_chunks) throw py::value_error("chunk index out of range");
  } else if (!blocks.is_none()) {
    block_list = blocks.cast<std::vector<int64_t>>();
    for (int64_t b : block_list)
      if (b < 0 || b >= static_cast<int64_t>(launches[0].p.grid))
        throw py::value_error("block index out of range");
  } else if (total > (int64_t{1} << 28)) {
    throw py::value_error("a dense walk is limited to 2^28 elements; pass chunks= or blocks=");
  }

  py::array_t<int32_t> counts(sparse ? 0 : total);
  std::vector<int64_t> visits;
  Recorder r{&fake, slot_mask, {slot_bytes[0], slot_bytes[1], slot_bytes[2], slot_bytes[3], slot_bytes[4]},
             copy_bytes};
  r.visits = &visits;
  if (!sparse && total > 0) {
    r.counts = counts.mutable_data();
    std::fill(r.counts, r.counts + total, 0);
  }
  {
    py::gil_scoped_release release;
    const std::vector<int64_t>* c = chunks.is_none() ? nullptr : &chunk_list;
    const std::vector<int64_t>* b = blocks.is_none() ? nullptr : &block_list;
    for (const Launch& l : launches) {
      r.tensors = l.tensors.data();
      plan::MetaView m{l.sizes.data(), l.starts.data(), l.ptrs.data()};
      if (copy_bytes > 0) {
        m.bases = l.bases.data();
        m.copies = l.copies.data();
      }
      if (mixed) {
        RecorderOf<8> v{r};
        walk(l.p, m, c, b, v);
      } else if (slot_bytes[0] == 4) {
        RecorderOf<4> v{r};
        walk(l.p, m, c, b, v);
      } else {
        RecorderOf<2> v{r};
        walk(l.p, m, c, b, v);
      }
    }
  }

  py::dict d;
  int64_t num_chunks = 0;
  py::list launch_list;
  for (const Launch& l : launches) {
    num_chunks += l.p.num_chunks;
    py::dict e;
    e["tensors"] = l.tensors;
    e["num_chunks"] = l.p.num_chunks;
    e["grid"] = l.p.grid;
    e["chunk_starts"] = l.starts;
    launch_list.append(e);
  }
  d["total"] = total;
  d["num_chunks"] = num_chunks;
  d["chunk"] = chunk;
  d["block"] = launches.empty() ? plan::kBlockThreads : launches[0].p.block;
  d["grid"] = launches.empty() ? 0u : launches[0].p.grid;
  d["launches"] = launch_list;
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

Capture capture_of(const py::handle& h) {
  const auto st = h.cast<std::pair<std::string, unsigned long long>>();
  if (st.first == "none") return Capture::kNone;
  if (st.first == "active") return Capture::kActive;
  if (st.first == "invalidated") return Capture::kInvalidated;
  throw py::value_error("capture status must be 'none', 'active' or 'invalidated'");
}

StreamCapture stream_capture(const py::handle& h) {
  StreamCapture c;
  c.status = capture_of(h);
  c.id = h.cast<std::pair<std::string, unsigned long long>>().second;
  return c;
}

}  // namespace

void def_plan_hooks(py::module_& m) {
  using py::arg;
  m.def("_plan_coverage", &plan_coverage, arg("sizes"), arg("align_offsets") = py::none(),
        py::kw_only(), arg("itemsize") = 4, arg("slot_mask") = 0x1fu, arg("sm_count") = 132,
        arg("chunk") = 0, arg("block") = 0, arg("grid") = 0, arg("group") = 0,
        arg("chunks") = py::none(), arg("blocks") = py::none(),
        "Test hook: split a call into CUDA launches and walk their plans (src/cpp/launch_plan.h) "
        "on the CPU over fake pointers, reporting what every thread would touch. sizes: elements "
        "per tensor; itemsize: 4 or 8, or 5 per-slot sizes of 2 or 4 and an optional sixth, a "
        "copies stream's (0 or 2); align_offsets: per tensor, a byte offset (or one per stream) "
        "added to its 64-byte aligned fake address; chunk/block/grid/group (tensors per launch): 0 = the "
        "launcher's choice; chunks (or blocks): walk only these chunks (or these blocks, "
        "grid-stride loop included) of a one-launch call and return their visits (tensor, "
        "index, width) instead of per-element counts.");
  m.def("_cuda_capture_problem",
        [](py::handle launch, py::sequence waits, std::vector<std::string> names) {
          if (py::len(waits) != names.size()) throw py::value_error("one name per wait stream");
          std::vector<StreamCapture> w;
          for (const py::handle h : waits) w.push_back(stream_capture(h));
          return capture_problem(stream_capture(launch), w.data(), names.data(), w.size());
        },
        arg("launch"), arg("waits"), arg("names"),
        "Test hook (host_logic.h): why a call whose launch stream and other streams are in these "
        "capture states ((status, capture id), status 'none' | 'active' | 'invalidated') cannot "
        "be enqueued; '' when it can.");
  m.def("_cuda_device_switch",
        [](bool has_context, int context_device, int target) {
          const DeviceSwitch s = device_switch(has_context, context_device, target);
          return py::make_tuple(s.set_device, s.restore_context);
        },
        arg("has_context"), arg("context_device"), arg("target"),
        "Test hook (host_logic.h): (set_device, restore_context) of the launcher's device switch.");
}

}  // namespace cuda
}  // namespace fastoptim
