// emulate.cpp: _core._emulate_kernel, the CUDA kernel body run on the CPU over NumPy arrays.
//
// The launch plan (src/cpp/launch_plan.h), RuleVisitor and the flag dispatch (rule_visitor.h)
// are the code the CUDA kernel is made of; here they run with host loads and stores, thread
// after thread. That equals the parallel kernel because every element belongs to exactly one
// thread (tests/test_launch_plan.py proves it), so tests/test_launch_plan.py can compare the
// result bit for bit with the CPU kernels. Built only with the CUDA backend (there is nothing
// to emulate otherwise), and at -O1 (cuda.cmake): a test hook, compiled for every rule.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "plan_hooks.h"
#include "rule_visitor.h"

namespace py = pybind11;

namespace fastoptim {
namespace cuda {
namespace {

template <class Rule, class T>
void emulate_typed(plan::LaunchPlan p, const plan::MetaView& m, const typename Rule::Args& a) {
  p.slot_mask = Rule::kReads | Rule::kWrites;
  const typename Rule::template Consts<T> c(a);  // built on the host, as the launcher does
  RuleVisitor<Rule, T> v{c};
  for (uint32_t b = 0; b < p.grid; ++b)
    for (uint32_t tid = 0; tid < p.block; ++tid) plan::block_body<T>(p, m, b, tid, p.block, p.grid, v);
}

template <class Rule>
void emulate(bool f64, const plan::LaunchPlan& p, const plan::MetaView& m,
             const typename Rule::Args& a) {
  if (f64) emulate_typed<Rule, double>(p, m, a);
  else emulate_typed<Rule, float>(p, m, a);
}

struct ArgReader {
  const py::dict& d;
  double f(const char* k) const { return d[k].cast<double>(); }
  bool b(const char* k) const { return d[k].cast<bool>(); }
};

template <class Args>
void emulate_args(const Args& a, bool f64, const plan::LaunchPlan& p, const plan::MetaView& m) {
  py::gil_scoped_release release;  // the arguments are read: no Python from here on
  dispatch_rule(a, [&](auto rule) { emulate<typename decltype(rule)::type>(f64, p, m, a); });
}

// The rule's *Args from a dict of its fields, then the dispatch of the CUDA launchers.
void emulate_rule(const std::string& rule, const py::dict& args, bool f64, const plan::LaunchPlan& p,
                  const plan::MetaView& m) {
  const ArgReader r{args};
  if (rule == "sgd") {
    emulate_args(SgdArgs{r.f("lr"), r.f("momentum"), r.f("dampening"), r.f("weight_decay"),
                         r.b("has_momentum"), r.b("nesterov"), r.b("first_step"), r.b("maximize")},
                 f64, p, m);
  } else if (rule == "rmsprop") {
    emulate_args(RmspropArgs{r.f("lr"), r.f("alpha"), r.f("eps"), r.f("weight_decay"), r.f("momentum"),
                             r.b("centered"), r.b("has_momentum"), r.b("maximize")},
                 f64, p, m);
  } else if (rule == "adam") {
    emulate_args(AdamArgs{r.f("lr"), r.f("beta1"), r.f("beta2"), r.f("eps"), r.f("weight_decay"),
                          r.f("step_size"), r.f("bias_correction2_sqrt"), r.b("amsgrad"),
                          r.b("decoupled"), r.b("maximize")},
                 f64, p, m);
  } else if (rule == "adagrad") {
    emulate_args(AdagradArgs{r.f("clr"), r.f("eps"), r.f("weight_decay"), r.b("maximize")}, f64, p, m);
  } else if (rule == "adadelta") {
    emulate_args(AdadeltaArgs{r.f("lr"), r.f("rho"), r.f("eps"), r.f("weight_decay"), r.b("maximize")},
                 f64, p, m);
  } else if (rule == "ema") {
    emulate_args(EmaArgs{r.f("beta")}, f64, p, m);
  } else if (rule == "stream") {
    emulate_args(StreamArgs{static_cast<int>(r.f("reads")), static_cast<int>(r.f("writes")),
                            r.f("scale")},
                 f64, p, m);
  } else {
    throw py::value_error("unknown rule '" + rule + "'");
  }
}

void emulate_kernel(const std::string& rule, const py::list& slots, const py::dict& args,
                    int sm_count, int64_t chunk, int64_t block, int64_t grid) {
  if (slots.size() < 2 || slots.size() > static_cast<size_t>(kMaxSlots))
    throw py::value_error("slots: 2 to 5 entries (param, grad, states...), each None or a list");
  std::vector<std::vector<py::array>> arrays(slots.size());
  int64_t n = -1;
  for (size_t s = 0; s < slots.size(); ++s) {
    if (slots[s].is_none()) continue;
    for (const py::handle h : py::reinterpret_borrow<py::list>(slots[s]))
      arrays[s].push_back(py::reinterpret_borrow<py::array>(h));
    if (n < 0) n = static_cast<int64_t>(arrays[s].size());
    if (static_cast<int64_t>(arrays[s].size()) != n)
      throw py::value_error("slots: lists of different lengths");
  }
  if (arrays[0].empty() && n != 0) throw py::value_error("slot 0 (param) is required");
  const bool f64 = n > 0 && arrays[0][0].dtype().itemsize() == 8;
  std::vector<int64_t> offsets(1, 0);
  std::vector<void*> ptrs(static_cast<size_t>(n > 0 ? n : 0) * kMaxSlots, nullptr);
  for (int64_t t = 0; t < n; ++t) {
    const py::ssize_t size = arrays[0][t].size();
    offsets.push_back(offsets.back() + size);
    for (size_t s = 0; s < arrays.size(); ++s) {
      if (arrays[s].empty()) continue;
      py::array& a = arrays[s][t];
      if (a.size() != size || !(a.flags() & py::array::c_style) || a.dtype().kind() != 'f' ||
          a.dtype().itemsize() != (f64 ? 8 : 4))
        throw py::value_error("slots: every array must be C-contiguous, of params' size and dtype");
      ptrs[t * kMaxSlots + s] = const_cast<void*>(a.data());
    }
  }
  const plan::LaunchPlan p = geometry(offsets.back(), n > 0 ? n : 0, 0, sm_count, chunk, block, grid);
  const plan::MetaView m{offsets.data(), ptrs.data()};
  emulate_rule(rule, args, f64, p, m);
}

}  // namespace

void def_emulation_hook(py::module_& m) {
  using py::arg;
  m.def("_emulate_kernel", &emulate_kernel, arg("rule"), arg("slots"), arg("args"), py::kw_only(),
        arg("sm_count") = 132, arg("chunk") = 0, arg("block") = 0, arg("grid") = 0,
        "Test hook: run the CUDA kernel body (launch plan + RuleVisitor) on the CPU, in place "
        "on NumPy arrays. rule: sgd, rmsprop, adam, adagrad, adadelta, ema or stream; slots: "
        "per slot (param, grad, states in argument order) a list of arrays or None; args: the "
        "fields of the rule's *Args struct (rules.h), per-step scalars included.");
}

}  // namespace cuda
}  // namespace fastoptim
