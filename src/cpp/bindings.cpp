// bindings.cpp: the pybind11 module fastoptim._core.
//
// Every entry point follows the same order:
//   1. check every hyperparameter (ValueError/TypeError naming it),
//   2. check every array of every argument (type, dtype, count, shape, contiguity,
//      writeability) and that no written array overlaps any other array of the call,
//   3. only then release the GIL and run ONE fused kernel over all tensors.
// Nothing is written before step 3, so a bad call leaves every array as it was.
//
// Dtype dispatch lives here and only here: one switch over the supported dtypes
// (float32, float64); all arrays of a call share one dtype, anything else is a TypeError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "dispatch.h"

namespace py = pybind11;

namespace fastoptim {
namespace {

constexpr int kNpyFloat = 11;   // NPY_FLOAT
constexpr int kNpyDouble = 12;  // NPY_DOUBLE
constexpr int kNpyCContiguous = 0x0001;
constexpr int kNpyWriteable = 0x0400;
constexpr int64_t kReleaseGilFrom = 4096;  // elements; below this the GIL round trip costs more

[[noreturn]] void type_error(const std::string& msg) { throw py::type_error(msg); }
[[noreturn]] void value_error(const std::string& msg) { throw py::value_error(msg); }

std::string shape_str(int nd, const py::ssize_t* dims) {
  std::ostringstream s;
  s << '(';
  for (int i = 0; i < nd; ++i) s << (i ? ", " : "") << dims[i];
  if (nd == 1) s << ',';
  s << ')';
  return s.str();
}

std::string fmt(double x) {
  std::ostringstream s;
  s << x;
  return s.str();
}

// ---- hyperparameters ------------------------------------------------------------------
struct Hyper {
  const char* fn;
  void non_negative(const char* name, double x) const {
    if (!(x >= 0.0) || std::isinf(x))
      value_error(std::string(fn) + ": " + name + " must be a finite number >= 0, got " + fmt(x));
  }
  void unit_open(const char* name, double x) const {  // [0, 1)
    if (!(x >= 0.0 && x < 1.0))
      value_error(std::string(fn) + ": " + name + " must be in [0, 1), got " + fmt(x));
  }
  void unit_closed(const char* name, double x) const {  // [0, 1]
    if (!(x >= 0.0 && x <= 1.0))
      value_error(std::string(fn) + ": " + name + " must be in [0, 1], got " + fmt(x));
  }
  // step: a Python integer >= 1 (None allowed only where `required` is false).
  int64_t step(py::handle obj, bool required, const char* why) const {
    if (obj.is_none()) {
      if (required) value_error(std::string(fn) + ": step is required " + why);
      return 0;
    }
    if (PyBool_Check(obj.ptr()) || !PyIndex_Check(obj.ptr()))
      type_error(std::string(fn) + ": step must be an integer >= 1, got " +
                 std::string(py::str(py::type::of(obj).attr("__name__"))));
    const int64_t s = obj.cast<int64_t>();
    if (s < 1) value_error(std::string(fn) + ": step must be an integer >= 1, got " + std::to_string(s));
    return s;
  }
};

// ---- arrays ---------------------------------------------------------------------------
struct Interval {
  uintptr_t lo, hi;
  int arg;
  int64_t index;
  bool written;
};

struct ArgNames {
  const char* name;
  bool is_list;
};

// Collects the arrays of one call, slot by slot, checking each against params (slot 0).
class CallBuilder {
 public:
  explicit CallBuilder(const char* fn) : fn_(fn) {}

  // Adds an argument. `obj` is one ndarray or a list/tuple of ndarrays. The first call
  // defines the tensor count and shapes every later argument must match.
  void add(int slot, const char* name, py::handle obj, bool written) {
    const int arg = static_cast<int>(names_.size());
    const bool is_list = PyList_Check(obj.ptr()) || PyTuple_Check(obj.ptr());
    names_.push_back({name, is_list});
    const int64_t n = is_list ? static_cast<int64_t>(PySequence_Fast_GET_SIZE(obj.ptr())) : 1;
    if (arg == 0) {
      n_ = n;
      offsets_.assign(1, 0);
      offsets_.reserve(n + 1);
      ref_.reserve(n);
    } else if (n != n_) {
      value_error(std::string(fn_) + ": " + name + " has " + std::to_string(n) + " array(s) but " +
                  names_[0].name + " has " + std::to_string(n_));
    }
    std::vector<void*>& ptrs = slots_[slot];
    ptrs.resize(n);
    for (int64_t i = 0; i < n; ++i) {
      PyObject* item = is_list ? PySequence_Fast_GET_ITEM(obj.ptr(), i) : obj.ptr();
      ptrs[i] = check_array(arg, i, item, written);
    }
  }

  // Verifies that no written array overlaps any other array (Note [aliasing]).
  void check_overlaps() {
    if (intervals_.size() < 2) return;
    std::sort(intervals_.begin(), intervals_.end(),
              [](const Interval& a, const Interval& b) { return a.lo < b.lo; });
    const Interval* max_all = nullptr;      // interval reaching furthest so far
    const Interval* max_written = nullptr;  // written interval reaching furthest so far
    for (const Interval& cur : intervals_) {
      const Interval* other = nullptr;
      if (cur.written && max_all && max_all->hi > cur.lo) other = max_all;
      else if (max_written && max_written->hi > cur.lo) other = max_written;
      if (other) {
        value_error(std::string(fn_) + ": " + label(cur.arg, cur.index) + " overlaps " +
                    label(other->arg, other->index) +
                    " in memory; parameters and optimizer states must not share memory with "
                    "any other array of the call");
      }
      if (!max_all || cur.hi > max_all->hi) max_all = &cur;
      if (cur.written && (!max_written || cur.hi > max_written->hi)) max_written = &cur;
    }
  }

  Batch batch() const {
    Batch b;
    b.n_tensors = n_;
    b.offsets = offsets_.data();
    for (int s = 0; s < kMaxSlots; ++s) b.slots[s] = slots_[s].empty() ? nullptr : slots_[s].data();
    return b;
  }
  DType dtype() const { return dtype_num_ == kNpyDouble ? kF64 : kF32; }
  int64_t total() const { return offsets_.back(); }
  int64_t count() const { return n_; }

 private:
  std::string label(int arg, int64_t i) const {
    const ArgNames& a = names_[arg];
    return a.is_list ? std::string(a.name) + "[" + std::to_string(i) + "]" : std::string(a.name);
  }

  void* check_array(int arg, int64_t i, PyObject* item, bool written) {
    if (!py::isinstance<py::array>(item)) {
      type_error(std::string(fn_) + ": " + label(arg, i) + " must be a numpy.ndarray, got " +
                 std::string(py::str(py::type::of(py::handle(item)).attr("__name__"))));
    }
    auto* a = py::detail::array_proxy(item);
    auto* d = py::detail::array_descriptor_proxy(a->descr);
    const bool native = d->byteorder != '>';
    if ((d->type_num != kNpyFloat && d->type_num != kNpyDouble) || !native) {
      type_error(std::string(fn_) + ": " + label(arg, i) + " has dtype " +
                 std::string(py::str(py::handle(item).attr("dtype"))) +
                 "; fastoptim supports float32 and float64 (native byte order)");
    }
    if (dtype_num_ < 0) {
      dtype_num_ = d->type_num;
      dtype_item_ = item;
      dtype_label_ = label(arg, i);
    } else if (d->type_num != dtype_num_) {
      type_error(std::string(fn_) + ": " + label(arg, i) + " has dtype " +
                 std::string(py::str(py::handle(item).attr("dtype"))) + " but " + dtype_label_ +
                 " has dtype " + std::string(py::str(py::handle(dtype_item_).attr("dtype"))) +
                 "; all arrays of one call must share one dtype");
    }
    int64_t size = 1;
    for (int k = 0; k < a->nd; ++k) size *= a->dimensions[k];
    if (arg == 0) {
      ref_.push_back(item);
      offsets_.push_back(offsets_.back() + size);
    } else {
      auto* r = py::detail::array_proxy(ref_[i]);
      if (r->nd != a->nd || !std::equal(a->dimensions, a->dimensions + a->nd, r->dimensions)) {
        value_error(std::string(fn_) + ": " + label(arg, i) + " has shape " +
                    shape_str(a->nd, a->dimensions) + " but " + label(0, i) + " has shape " +
                    shape_str(r->nd, r->dimensions));
      }
    }
    if (!(a->flags & kNpyCContiguous)) {
      value_error(std::string(fn_) + ": " + label(arg, i) +
                  " is not C-contiguous; fastoptim updates contiguous buffers in place (a copy "
                  "made with numpy.ascontiguousarray would not be updated)");
    }
    if (written && !(a->flags & kNpyWriteable)) {
      value_error(std::string(fn_) + ": " + label(arg, i) + " is read-only; it is updated in place");
    }
    const int64_t itemsize = d->type_num == kNpyDouble ? 8 : 4;
    if (size > 0) {
      const auto lo = reinterpret_cast<uintptr_t>(a->data);
      intervals_.push_back({lo, lo + static_cast<uintptr_t>(size * itemsize), arg, i, written});
    }
    return a->data;
  }

  const char* fn_;
  int64_t n_ = 0;
  int dtype_num_ = -1;
  PyObject* dtype_item_ = nullptr;
  std::string dtype_label_;
  std::vector<ArgNames> names_;
  std::vector<int64_t> offsets_;
  std::vector<PyObject*> ref_;
  std::vector<void*> slots_[kMaxSlots];
  std::vector<Interval> intervals_;
};

void run(CallBuilder& call, RuleId rule, const void* args) {
  call.check_overlaps();
  const Batch b = call.batch();
  if (call.total() >= kReleaseGilFrom) {
    py::gil_scoped_release release;
    execute(rule, call.dtype(), b, args);
  } else {
    execute(rule, call.dtype(), b, args);
  }
}

void require(const char* fn, bool present, const char* what) {
  if (!present) value_error(std::string(fn) + ": " + what);
}

// ---- entry points ---------------------------------------------------------------------
void sgd(py::handle params, py::handle grads, py::handle momentum_buffers, py::handle step,
         double lr, double momentum, double dampening, double weight_decay, bool nesterov,
         bool maximize) {
  const char* fn = "sgd_";
  const Hyper h{fn};
  h.non_negative("lr", lr);
  h.unit_closed("momentum", momentum);
  h.unit_closed("dampening", dampening);
  h.non_negative("weight_decay", weight_decay);
  const bool has_momentum = momentum != 0.0;
  if (nesterov && (!has_momentum || dampening != 0.0))
    value_error("sgd_: nesterov=True requires momentum > 0 and dampening == 0");
  int64_t s = 0;
  if (has_momentum) {
    require(fn, !momentum_buffers.is_none(), "momentum_buffers is required when momentum != 0");
    s = h.step(step, true, "when momentum != 0 (step == 1 initialises the momentum buffers)");
  } else {
    h.step(step, false, "");
  }
  CallBuilder call(fn);
  call.add(kParam, "params", params, true);
  call.add(kGrad, "grads", grads, false);
  if (has_momentum) call.add(kState0, "momentum_buffers", momentum_buffers, true);
  const SgdArgs a{lr, momentum, dampening, weight_decay, has_momentum, nesterov, s == 1, maximize};
  run(call, kSgd, &a);
}

void rmsprop(py::handle params, py::handle grads, py::handle square_avgs, py::handle grad_avgs,
             py::handle momentum_buffers, double lr, double alpha, double eps,
             double weight_decay, double momentum, bool centered, bool maximize) {
  const char* fn = "rmsprop_";
  const Hyper h{fn};
  h.non_negative("lr", lr);
  h.unit_closed("alpha", alpha);
  h.non_negative("eps", eps);
  h.non_negative("weight_decay", weight_decay);
  h.unit_closed("momentum", momentum);
  const bool has_momentum = momentum > 0.0;
  if (centered) require(fn, !grad_avgs.is_none(), "grad_avgs is required when centered=True");
  if (has_momentum)
    require(fn, !momentum_buffers.is_none(), "momentum_buffers is required when momentum > 0");
  CallBuilder call(fn);
  call.add(kParam, "params", params, true);
  call.add(kGrad, "grads", grads, false);
  call.add(kState0, "square_avgs", square_avgs, true);
  if (centered) call.add(kState1, "grad_avgs", grad_avgs, true);
  if (has_momentum) call.add(kState2, "momentum_buffers", momentum_buffers, true);
  const RmspropArgs a{lr, alpha, eps, weight_decay, momentum, centered, has_momentum, maximize};
  run(call, kRmsprop, &a);
}

void adam(py::handle params, py::handle grads, py::handle exp_avgs, py::handle exp_avg_sqs,
          py::handle max_exp_avg_sqs, py::handle step, double lr, double beta1, double beta2,
          double eps, double weight_decay, bool amsgrad, bool maximize, bool decoupled) {
  const char* fn = decoupled ? "adamw_" : "adam_";
  const Hyper h{fn};
  h.non_negative("lr", lr);
  h.unit_open("beta1", beta1);
  h.unit_open("beta2", beta2);
  h.non_negative("eps", eps);
  h.non_negative("weight_decay", weight_decay);
  const int64_t s = h.step(step, true, "(the 1-based count of steps taken, this one included)");
  if (amsgrad) require(fn, !max_exp_avg_sqs.is_none(), "max_exp_avg_sqs is required when amsgrad=True");
  CallBuilder call(fn);
  call.add(kParam, "params", params, true);
  call.add(kGrad, "grads", grads, false);
  call.add(kState0, "exp_avgs", exp_avgs, true);
  call.add(kState1, "exp_avg_sqs", exp_avg_sqs, true);
  if (amsgrad) call.add(kState2, "max_exp_avg_sqs", max_exp_avg_sqs, true);
  // Per-step scalars, once on the host, exactly as torch computes them (Python floats).
  const double bias_correction1 = 1.0 - std::pow(beta1, static_cast<double>(s));
  const double bias_correction2 = 1.0 - std::pow(beta2, static_cast<double>(s));
  const AdamArgs a{lr,  beta1, beta2, eps, weight_decay, lr / bias_correction1,
                   std::sqrt(bias_correction2), amsgrad, decoupled, maximize};
  run(call, kAdam, &a);
}

void adagrad(py::handle params, py::handle grads, py::handle state_sums, py::handle step,
             double lr, double lr_decay, double weight_decay, double eps, bool maximize) {
  const char* fn = "adagrad_";
  const Hyper h{fn};
  h.non_negative("lr", lr);
  h.non_negative("lr_decay", lr_decay);
  h.non_negative("weight_decay", weight_decay);
  h.non_negative("eps", eps);
  const int64_t s = h.step(step, true, "(the 1-based count of steps taken, this one included)");
  CallBuilder call(fn);
  call.add(kParam, "params", params, true);
  call.add(kGrad, "grads", grads, false);
  call.add(kState0, "state_sums", state_sums, true);
  const AdagradArgs a{lr / (1.0 + static_cast<double>(s - 1) * lr_decay), eps, weight_decay, maximize};
  run(call, kAdagrad, &a);
}

void adadelta(py::handle params, py::handle grads, py::handle square_avgs, py::handle acc_deltas,
              double lr, double rho, double eps, double weight_decay, bool maximize) {
  const char* fn = "adadelta_";
  const Hyper h{fn};
  h.non_negative("lr", lr);
  h.unit_closed("rho", rho);
  h.non_negative("eps", eps);
  h.non_negative("weight_decay", weight_decay);
  CallBuilder call(fn);
  call.add(kParam, "params", params, true);
  call.add(kGrad, "grads", grads, false);
  call.add(kState0, "square_avgs", square_avgs, true);
  call.add(kState1, "acc_deltas", acc_deltas, true);
  const AdadeltaArgs a{lr, rho, eps, weight_decay, maximize};
  run(call, kAdadelta, &a);
}

void ema(py::handle averages, py::handle values, double beta) {
  const char* fn = "ema_";
  Hyper{fn}.unit_closed("beta", beta);
  CallBuilder call(fn);
  call.add(0, "averages", averages, true);
  call.add(1, "values", values, false);
  const EmaArgs a{beta};
  run(call, kEma, &a);
}

// The bandwidth ceiling of the benchmark: streams[k] (one array or a list) for k < reads;
// the first `writes` streams are read, modified and written in place.
void stream_rmw(py::list streams, int writes, double scale) {
  const int reads = static_cast<int>(streams.size());
  if (!((reads == 2 && writes == 1) || (reads == 3 && writes == 2) || (reads == 4 && writes == 3) ||
        (reads == 5 && writes == 4)))
    value_error("stream_rmw: supported (streams, writes): (2,1), (3,2), (4,3), (5,4)");
  static const char* kNames[kMaxSlots] = {"streams[0]", "streams[1]", "streams[2]", "streams[3]",
                                          "streams[4]"};
  CallBuilder call("stream_rmw");
  for (int k = 0; k < reads; ++k) call.add(k, kNames[k], streams[k], k < writes);
  const StreamArgs a{reads, writes, scale};
  run(call, kStream, &a);
}

py::dict info() {
  py::dict d;
  d["isa"] = isa_name(current_isa());
  py::list compiled, supported, tested;
  for (int i = 0; i < kNumIsas; ++i) {
    const Isa isa = static_cast<Isa>(i);
    if (isa_compiled(isa)) compiled.append(isa_name(isa));
    if (isa_compiled(isa) && isa_cpu_has(isa)) supported.append(isa_name(isa));
    if (isa_tested(isa)) tested.append(isa_name(isa));
  }
  d["isas_compiled"] = compiled;
  d["isas_supported"] = supported;
  d["isas_default_eligible"] = tested;
  d["num_threads"] = num_threads();
  d["threading"] = "caller-runs pool";
  return d;
}

}  // namespace
}  // namespace fastoptim

PYBIND11_MODULE(_core, m) {
  using namespace fastoptim;
  m.doc() = "fastoptim compiled kernels (use the fastoptim package, not this module)";
  try {
    init_dispatch();
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }
  using py::arg;
  m.def("sgd", &sgd, arg("params"), arg("grads"), arg("momentum_buffers"), arg("step"), arg("lr"),
        arg("momentum"), arg("dampening"), arg("weight_decay"), arg("nesterov"), arg("maximize"));
  m.def("rmsprop", &rmsprop, arg("params"), arg("grads"), arg("square_avgs"), arg("grad_avgs"),
        arg("momentum_buffers"), arg("lr"), arg("alpha"), arg("eps"), arg("weight_decay"),
        arg("momentum"), arg("centered"), arg("maximize"));
  m.def("adam", &adam, arg("params"), arg("grads"), arg("exp_avgs"), arg("exp_avg_sqs"),
        arg("max_exp_avg_sqs"), arg("step"), arg("lr"), arg("beta1"), arg("beta2"), arg("eps"),
        arg("weight_decay"), arg("amsgrad"), arg("maximize"), arg("decoupled"));
  m.def("adagrad", &adagrad, arg("params"), arg("grads"), arg("state_sums"), arg("step"),
        arg("lr"), arg("lr_decay"), arg("weight_decay"), arg("eps"), arg("maximize"));
  m.def("adadelta", &adadelta, arg("params"), arg("grads"), arg("square_avgs"), arg("acc_deltas"),
        arg("lr"), arg("rho"), arg("eps"), arg("weight_decay"), arg("maximize"));
  m.def("ema", &ema, arg("averages"), arg("values"), arg("beta"));
  m.def("stream_rmw", &stream_rmw, arg("streams"), arg("writes"), arg("scale") = 0.0);
  m.def("info", &info);
  m.def("set_isa", [](const std::string& name) {
    try {
      set_isa(name);
    } catch (const std::invalid_argument& e) {
      throw py::value_error(e.what());
    }
  });
  m.def("set_num_threads", [](int n) {
    if (n < 1) throw py::value_error("set_num_threads: n must be >= 1, got " + std::to_string(n));
    set_num_threads(n);
  });
  m.def("get_num_threads", &num_threads);
  // Test hook: how many threads a call over `total` elements uses (Note [small arrays ...]).
  m.def("_threads_for", [](int64_t total) { return threads_for(total); }, arg("total"));
}
