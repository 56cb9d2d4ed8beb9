// bindings.cpp: the pybind11 module fastoptim._core.
//
// Every entry point follows the same order:
//   1. check every hyperparameter (ValueError/TypeError naming it),
//   2. check every array of every argument (type, dtype, count, shape, contiguity,
//      writeability) and that no written array overlaps any other array of the call,
//   3. only then release the GIL and run ONE fused kernel over all tensors.
// Nothing is written before step 3, so a bad call leaves every array as it was.
//
// Dtype dispatch lives here and only here: the dtypes of a call's params, grads, states and
// param_copies select one row of kFormatTable (kernel_api.h, Note [storage formats]); any other
// combination is a TypeError naming the dtypes.
//
// Device: an array that is not a numpy.ndarray but exposes __cuda_array_interface__ or
// DLPack (CuPy, torch CUDA tensors, Numba) goes through the same checks on those fields, and
// the call then runs as ONE CUDA launch (src/cuda/, docs/cuda.md). A call is all host or all
// device memory of one device; the ndarray path does no attribute lookup.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <memory>
#include <optional>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "../cuda/cuda_api.h"
#include "../cuda/plan_hooks.h"
#include "dispatch.h"
#include "packed.h"
#include "quant_api.h"
#include "runner.h"

namespace py = pybind11;

namespace fastoptim {
namespace {

constexpr int kNpyFloat = 11;   // NPY_FLOAT
constexpr int kNpyDouble = 12;  // NPY_DOUBLE
constexpr int kNpyHalf = 23;    // NPY_HALF

// Element types of a stream, and the formats (kernel_api.h, Note [storage formats]) as the
// element types of (params, grads, states, param_copies); kNone: no copies.
// kElemQ8/kElemQ4: a quantized state (a fastoptim.quant.QuantizedState, never an ndarray).
enum Elem : int { kNone = -1, kElemF32 = 0, kElemF64, kElemBF16, kElemF16, kElemQ8, kElemQ4 };
constexpr const char* kElemNames[] = {"float32", "float64", "bfloat16", "float16", "int8", "int4"};
constexpr int kElemSize[] = {4, 8, 2, 2, 1, 1};
struct FormatRow {
  Format format;
  Elem param, grad, state, copy, comp = kNone;  // comp: the Kahan compensation (kBF16Kahan)
};
constexpr FormatRow kFormatTable[] = {
    {kF32, kElemF32, kElemF32, kElemF32, kNone},
    {kF64, kElemF64, kElemF64, kElemF64, kNone},
    {kBF16, kElemBF16, kElemBF16, kElemBF16, kNone},
    {kF16, kElemF16, kElemF16, kElemF16, kNone},
    {kBF16F32States, kElemBF16, kElemBF16, kElemF32, kNone},
    {kF16F32States, kElemF16, kElemF16, kElemF32, kNone},
    {kF32BF16Grads, kElemF32, kElemBF16, kElemF32, kNone},
    {kF32F16Grads, kElemF32, kElemF16, kElemF32, kNone},
    {kF32BF16GradsCopy, kElemF32, kElemBF16, kElemF32, kElemBF16},
    {kF32F16GradsCopy, kElemF32, kElemF16, kElemF32, kElemF16},
    {kBF16Kahan, kElemBF16, kElemBF16, kElemBF16, kNone, kElemBF16},
    {kF32Q8, kElemF32, kElemF32, kElemQ8, kNone},
    {kF32Q4, kElemF32, kElemF32, kElemQ4, kNone},
    {kF32BF16States, kElemF32, kElemF32, kElemBF16, kNone},
    {kBF16Q8, kElemBF16, kElemBF16, kElemQ8, kNone},
    {kBF16Q4, kElemBF16, kElemBF16, kElemQ4, kNone},
};
static_assert(sizeof(kFormatTable) / sizeof(kFormatTable[0]) == kNumFormats,
              "kFormatTable lists every Format once");
// Format f's row (the table lists the formats in their enum order: checked below).
constexpr const FormatRow& row_of(Format f) { return kFormatTable[f]; }
constexpr bool rows_in_order(int i = 0) {
  return i == kNumFormats || (kFormatTable[i].format == i && rows_in_order(i + 1));
}
static_assert(rows_in_order(), "kFormatTable lists the formats in the order of enum Format");

// The stream types of format f as the CUDA launcher takes them (cuda_api.h, StreamTypes).
cuda::StreamTypes stream_types(Format f) {
  const FormatRow& r = row_of(f);
  const auto code = [](Elem e) -> uint8_t { return e == kElemBF16 ? 1 : e == kElemF16 ? 2 : 0; };
  cuda::StreamTypes t;
  t.param = code(r.param);
  t.grad = code(r.grad);
  t.state = code(r.state);
  t.kahan = r.comp != kNone;
  t.copy = r.copy != kNone ? code(r.copy) : t.kahan ? code(r.comp) : uint8_t{255};
  return t;
}
// Whether the CUDA kernels run format f: all but the quantized states.
constexpr bool runs_on_cuda(Format f) {
  return row_of(f).state != kElemQ8 && row_of(f).state != kElemQ4;
}

// ml_dtypes.bfloat16 is a NumPy user dtype (its type number is assigned at run time): it is
// recognised by its scalar type's name (kind 'V', itemsize 2).
bool is_bfloat16(const py::detail::PyArrayDescr_Proxy* d) {
  if (d->typeobj == nullptr) return false;
  const char* name = reinterpret_cast<PyTypeObject*>(d->typeobj)->tp_name;
  return std::strcmp(name, "ml_dtypes.bfloat16") == 0 || std::strcmp(name, "bfloat16") == 0;
}
Elem elem_of(const py::detail::PyArrayDescr_Proxy* d) {
  if (d->type_num == kNpyFloat) return kElemF32;
  if (d->type_num == kNpyDouble) return kElemF64;
  if (d->type_num == kNpyHalf) return kElemF16;
  if (is_bfloat16(d)) return kElemBF16;
  return kNone;
}
constexpr int kNpyCContiguous = 0x0001;
constexpr int kNpyWriteable = 0x0400;
constexpr int64_t kReleaseGilFrom = 4096;  // elements; below this the GIL round trip costs more

[[noreturn]] void type_error(const std::string& msg) { throw py::type_error(msg); }
[[noreturn]] void value_error(const std::string& msg) { throw py::value_error(msg); }

std::string shape_str(int nd, const py::ssize_t* dims) {
  std::string s = "(";
  for (int i = 0; i < nd; ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  if (nd == 1) s += ',';
  return s + ')';
}

std::string fmt(double x) {  // what std::ostream prints by default (%g), without iostreams
  char b[32];
  std::snprintf(b, sizeof b, "%g", x);
  return b;
}

// ---- scalar arguments ------------------------------------------------------------------
// Every scalar is read from the Python object by hand, never by pybind11's casters: a wrong
// type is a short TypeError naming the argument (a caster's "incompatible function arguments"
// would print the repr of every array of the call).

std::string type_name(PyObject* o) { return Py_TYPE(o)->tp_name; }

bool is_bool(PyObject* o) {  // bool or numpy.bool_
  if (PyBool_Check(o)) return true;
  const char* t = Py_TYPE(o)->tp_name;
  return std::strcmp(t, "numpy.bool") == 0 || std::strcmp(t, "numpy.bool_") == 0;
}

// A real number: a Python int or float, or anything with __float__ that is not a bool, str,
// bytes or complex (numpy scalars, 0-d and 1-element arrays, 1-element tensors). An object
// with a dtype (a numpy array or scalar, a tensor) of bools, strings, objects, dates or
// durations is refused too, though NumPy gives it a __float__.
double real_arg(const char* fn, const char* name, PyObject* o) {
  if (PyFloat_Check(o)) return PyFloat_AS_DOUBLE(o);
  const auto wrong = [&] {
    type_error(std::string(fn) + ": " + name + " must be a real number, got " + type_name(o));
  };
  if (is_bool(o) || PyUnicode_Check(o) || PyBytes_Check(o) || PyComplex_Check(o) ||
      std::strstr(Py_TYPE(o)->tp_name, "complex") != nullptr)
    wrong();
  if (PyLong_Check(o)) {
    const double x = PyLong_AsDouble(o);
    if (x == -1.0 && PyErr_Occurred()) {
      PyErr_Clear();
      value_error(std::string(fn) + ": " + name + " is too large for a float");
    }
    return x;
  }
  py::object item;  // a 1-element numpy array's element (its __float__ takes 0-d arrays only)
  if (PyObject_HasAttrString(o, "dtype")) {
    const py::object dtype = py::handle(o).attr("dtype");
    if (PyObject_HasAttrString(dtype.ptr(), "kind")) {  // numpy
      const std::string kind = py::str(dtype.attr("kind"));
      if (kind.size() != 1 || std::strchr("bUSOmMc", kind[0]) != nullptr) wrong();
      if (py::isinstance<py::array>(o)) {
        const auto* a = py::detail::array_proxy(o);
        int64_t size = 1;
        for (int k = 0; k < a->nd; ++k) size *= a->dimensions[k];
        if (a->nd > 0 && size == 1) {
          item = py::handle(o).attr("item")();
          o = item.ptr();
          if (PyFloat_Check(o)) return PyFloat_AS_DOUBLE(o);
        }
      }
    } else if (std::string(py::str(dtype)) == "torch.bool") {
      wrong();
    }
  }
  PyNumberMethods* nb = Py_TYPE(o)->tp_as_number;
  if (nb == nullptr || nb->nb_float == nullptr) wrong();
  const double x = PyFloat_AsDouble(o);
  if (x == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    wrong();
  }
  return x;
}

bool flag_arg(const char* fn, const char* name, PyObject* o) {
  if (!is_bool(o))
    type_error(std::string(fn) + ": " + name + " must be a bool, got " + type_name(o));
  return o == Py_True || (!PyBool_Check(o) && PyObject_IsTrue(o) == 1);
}

void check_range(const char* fn, const HyperSpec& spec, double x) {
  const char* want = nullptr;
  switch (spec.range) {
    case Range::kNonNegative: if (!(x >= 0.0 && std::isfinite(x))) want = "a finite number >= 0"; break;
    case Range::kUnitOpen: if (!(x >= 0.0 && x < 1.0)) want = "in [0, 1)"; break;
    case Range::kUnitClosed: if (!(x >= 0.0 && x <= 1.0)) want = "in [0, 1]"; break;
    case Range::kFinite: if (!std::isfinite(x)) want = "a finite number"; break;
  }
  if (want) value_error(std::string(fn) + ": " + spec.name + " must be " + want + ", got " + fmt(x));
}

// step: a Python integer in [1, 2**53] (exact as a double, which the per-step scalars use).
constexpr int64_t kMaxStep = int64_t{1} << 53;
int64_t step_arg(const char* fn, PyObject* o, StepUse use) {
  if (o == Py_None) {
    if (use == StepUse::kRequired)
      value_error(std::string(fn) + ": step is required (the 1-based count of steps taken, this "
                  "one included)");
    return 0;
  }
  if (is_bool(o) || !PyIndex_Check(o))
    type_error(std::string(fn) + ": step must be an integer >= 1, got " + type_name(o));
  const py::object index = py::reinterpret_steal<py::object>(PyNumber_Index(o));
  if (!index) {  // an ndarray that is not an integer scalar (NumPy's message names nothing)
    PyErr_Clear();
    type_error(std::string(fn) + ": step must be an integer >= 1, got " + type_name(o));
  }
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
  if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
  if (overflow != 0 || v < 1 || v > kMaxStep)
    value_error(std::string(fn) + ": step must be an integer >= 1 and <= 2**53, got " +
                std::string(py::str(index)));
  return static_cast<int64_t>(v);
}

// ---- arrays ---------------------------------------------------------------------------
struct Interval {
  uintptr_t lo, hi;
  int arg;
  int64_t index;
  bool written;
};

// One data pointer of the pointer forms (Note [pointer path], Note [grad pointers]) for an
// array of `size` elements of `itemsize` bytes: non-null where there is data and aligned to
// the element size (else a ValueError naming label(), from `fn`); its span joins `spans`.
template <class Label>
void add_pointer_span(std::vector<Interval>& spans, const char* fn, const Label& label,
                      uintptr_t ptr, int64_t size, int64_t itemsize, int arg, int64_t index,
                      bool written) {
  if (size <= 0) return;
  if (ptr == 0 || ptr % static_cast<uintptr_t>(itemsize) != 0) {
    throw py::value_error(std::string(fn) + ": " + label() + " is not a valid pointer aligned to " +
                          std::to_string(itemsize) + " bytes");
  }
  // a span past the end of the address space would wrap, and the overlap check miss it
  if (static_cast<uint64_t>(size) > (UINTPTR_MAX - ptr) / static_cast<uint64_t>(itemsize)) {
    throw py::value_error(std::string(fn) + ": " + label() + ": " + std::to_string(size) +
                          " elements of " + std::to_string(itemsize) + " bytes from pointer " +
                          std::to_string(ptr) + " run past the end of the address space");
  }
  spans.push_back({ptr, ptr + static_cast<uintptr_t>(size * itemsize), arg, index, written});
}

// Note [overlap order cache]
//   Every call checks that no span it writes overlaps any other span of the call (Note
//   [aliasing]): the spans sorted by start, then one sweep. fastoptim.torch and training
//   loops call with the same arrays step after step, and sorting 8,000 spans (2,000 tensors of
//   Adam) cost about 0.2 ms a call. So the order that sorted the last call's spans is kept
//   (per thread) and tried first: when the spans, taken in that order, are still sorted
//   (one O(n) pass), it is a valid sorted order and the sweep uses it; otherwise they are
//   sorted again. Any sorted order gives the same answer: the sweep compares each span with the
//   furthest-reaching span and written span before it, and spans with equal starts overlap
//   whichever comes first (empty arrays have no span). Equal starts are ordered by position in
//   the call, so that the message names the same pair whatever the previous call was.
//   Returns the first overlapping pair found (the later span, then the earlier one), or two
//   nulls.
std::pair<const Interval*, const Interval*> find_overlap(const std::vector<Interval>& spans) {
  thread_local std::vector<size_t> order;
  const size_t n = spans.size();
  if (n < 2) return {nullptr, nullptr};
  const auto before = [&spans](size_t a, size_t b) {
    return spans[a].lo < spans[b].lo || (spans[a].lo == spans[b].lo && a < b);
  };
  bool sorted = order.size() == n;
  for (size_t i = 1; sorted && i < n; ++i) sorted = before(order[i - 1], order[i]);
  if (!sorted) {
    order.resize(n);
    for (size_t i = 0; i < n; ++i) order[i] = i;
    std::sort(order.begin(), order.end(), before);
  }
  const Interval* max_all = nullptr;      // span reaching furthest so far
  const Interval* max_written = nullptr;  // written span reaching furthest so far
  for (const size_t k : order) {
    const Interval& cur = spans[k];
    if (cur.written && max_all && max_all->hi > cur.lo) return {&cur, max_all};
    if (max_written && max_written->hi > cur.lo) return {&cur, max_written};
    if (!max_all || cur.hi > max_all->hi) max_all = &cur;
    if (cur.written && (!max_written || cur.hi > max_written->hi)) max_written = &cur;
  }
  return {nullptr, nullptr};
}

// The ValueError of Note [aliasing] for the first overlapping pair of spans (find_overlap),
// each named by label(span); nothing when none overlap.
template <class Label>
void check_no_overlap(const char* fn, const std::vector<Interval>& spans, Label label) {
  const auto [cur, other] = find_overlap(spans);
  if (cur) {
    value_error(std::string(fn) + ": " + label(*cur) + " overlaps " + label(*other) +
                " in memory; parameters and optimizer states must not share memory with any "
                "other array of the call");
  }
}

struct ArgNames {
  const char* name;
  bool is_list;
};

// Collects the arrays of one call, slot by slot, checking each against params (slot 0).
// Note [grad pointers]
//   fastoptim.torch's format fast path (Note [Format fast path] in torch.py) hands a call its
//   gradients as _core._GradPointers(template, pointers): a NumPy array of the gradients' dtype
//   (its dtype is all that is read) and one data pointer per param, instead of a NumPy view of
//   each gradient, which cost about 2 us per tensor to make, every step. The caller has
//   checked, from torch's metadata, that every gradient is a dense CPU tensor with its
//   param's dtype, shape and strides (and so, like the params, contiguous), and it holds the
//   gradients until the call returns, the GIL released or not. What the call checks, before
//   its first write, is what _core._pointers checks (Note [pointer path]): the count, every
//   pointer (non-null where there is data, aligned to the element size), and that no written
//   span overlaps a gradient's (Note [aliasing]). Private: a wrong pointer is memory the
//   kernel reads.
struct GradPointers {
  py::object dtype_template;
  std::vector<uintptr_t> ptrs;
};

class CallBuilder {
 public:
  explicit CallBuilder(const char* fn) : fn_(fn) {}

  // Adds an argument. `obj` is one ndarray or a list/tuple of ndarrays. The first call
  // defines the tensor count and shapes every later argument must match.
  // Which map the quantized states of the next add() must use (rules.h, StateSpec).
  void expect_non_negative(bool nn) { expect_non_negative_ = nn; }

  void add(int slot, const char* name, py::handle obj, bool written) {
    add_to(slots_[slot], slot < kState0 ? slot : kRoleStates, name, obj, written);
  }

  // The low-precision copies of the params that a copy format writes (Note [storage formats]).
  void add_copies(const char* name, py::handle obj) { add_to(copies_, kRoleCopies, name, obj, true); }
  // The params' Kahan compensation (kBF16Kahan): read and written, in the copies stream.
  void add_compensation(const char* name, py::handle obj) {
    add_to(copies_, kRoleComp, name, obj, true);
  }
  // Load/store options of the call (kernel_api.h, Note [load/store options]).
  void set_grad_scale(double scale) { grad_scale_ = scale; }
  void set_stochastic_rounding(uint32_t key, uint64_t index0) {
    sr_ = true;
    sr_key_ = key;
    sr_index0_ = index0;
  }

 private:
  void add_to(std::vector<void*>& ptrs, int role, const char* name, py::handle obj, bool written) {
    if (role == kGrad && py::isinstance<GradPointers>(obj)) return add_grad_pointers(ptrs, name, obj);
    const int arg = static_cast<int>(names_.size());
    const bool is_list = PyList_Check(obj.ptr()) || PyTuple_Check(obj.ptr());
    names_.push_back({name, is_list});
    // Note [references held]: a list is snapshotted into a tuple that owns a reference to
    // every item; the call keeps it (and a single array) alive until it returns, so another
    // Python thread (the GIL is released while the kernel runs) or a __cuda_array_interface__
    // property that clears the list cannot free an array the kernel is writing.
    py::object held = is_list ? py::reinterpret_steal<py::object>(PySequence_Tuple(obj.ptr()))
                              : py::reinterpret_borrow<py::object>(obj);
    if (!held) throw py::error_already_set();
    PyObject* seq = held.ptr();
    held_.push_back(std::move(held));
    const int64_t n = is_list ? static_cast<int64_t>(PyTuple_GET_SIZE(seq)) : 1;
    if (arg == 0) {
      n_ = n;
      offsets_.assign(1, 0);
      offsets_.reserve(n + 1);
      ref_.reserve(n);
    } else if (n != n_) {
      value_error(std::string(fn_) + ": " + name + " has " + std::to_string(n) + " array(s) but " +
                  names_[0].name + " has " + std::to_string(n_));
    }
    ptrs.resize(n);
    for (int64_t i = 0; i < n; ++i) {
      PyObject* item = is_list ? PyTuple_GET_ITEM(seq, i) : seq;
      ptrs[i] = check_array(arg, i, item, written, role);
    }
  }

  // Note [grad pointers]: the gradients of the params already added, as data pointers.
  void add_grad_pointers(std::vector<void*>& ptrs, const char* name, py::handle obj) {
    const int arg = static_cast<int>(names_.size());
    names_.push_back({name, true});
    held_.push_back(py::reinterpret_borrow<py::object>(obj));  // (the gradients: the caller's)
    const GradPointers& gp = obj.cast<const GradPointers&>();
    const int64_t n = static_cast<int64_t>(gp.ptrs.size());
    if (arg == 0 || n != n_) {
      value_error(std::string(fn_) + ": " + name + " has " + std::to_string(n) + " pointer(s) but " +
                  (arg == 0 ? std::string("no params come before them")
                            : std::string(names_[0].name) + " has " + std::to_string(n_)));
    }
    if (mode_ == kModeDevice) mixed_devices(arg, 0);
    mode_ = kModeHost;
    PyObject* tmpl = gp.dtype_template.ptr();
    const auto* d = py::detail::array_descriptor_proxy(py::detail::array_proxy(tmpl)->descr);
    const Elem elem = elem_of(d);
    if (elem == kNone || d->byteorder == '>') {
      type_error(std::string(fn_) + ": " + name + " has dtype " +
                 std::string(py::str(py::handle(tmpl).attr("dtype"))) +
                 "; fastoptim supports float32, float64, float16 and bfloat16 (ml_dtypes), "
                 "native byte order");
    }
    note_dtype(arg, 0, tmpl, kGrad, elem);
    const int64_t itemsize = kElemSize[elem];
    ptrs.resize(n);
    for (int64_t i = 0; i < n; ++i) {
      add_pointer_span(intervals_, fn_, [&] { return label(arg, i); }, gp.ptrs[i],
                       offsets_[i + 1] - offsets_[i], itemsize, arg, i, false);
      ptrs[i] = reinterpret_cast<void*>(gp.ptrs[i]);
    }
  }

 public:

  // Verifies that no written array overlaps any other array (Note [aliasing]).
  void check_overlaps() {
    check_no_overlap(fn_, intervals_, [this](const Interval& s) { return label(s.arg, s.index); });
  }

  Batch batch() const {
    Batch b;
    b.n_tensors = n_;
    b.offsets = offsets_.data();
    for (int s = 0; s < kMaxSlots; ++s) b.slots[s] = slots_[s].empty() ? nullptr : slots_[s].data();
    b.copies = copies_.empty() ? nullptr : copies_.data();
    b.grad_scale_inv_d = 1.0 / grad_scale_;
    b.grad_scale_inv_f = static_cast<float>(b.grad_scale_inv_d);
    b.sr = sr_;
    b.sr_key = sr_key_;
    b.sr_index0 = sr_index0_;
    return b;
  }
  // The element type of the first argument's arrays (the reductions' single argument).
  Elem first_elem() const { return roles_[0].elem; }

  // The call's format, from the dtypes of its params, grads, states and copies: one row of
  // kFormatTable, or a TypeError naming the dtypes.
  Format format() const {
    const Elem p = roles_[0].elem, g = roles_[1].elem, st = roles_[kRoleStates].elem,
               c = roles_[kRoleCopies].elem, k = roles_[kRoleComp].elem;
    if (p == kNone) return kF32;  // no arrays: nothing runs
    for (const FormatRow& f : kFormatTable)
      if (f.param == p && f.grad == g && (st == kNone || f.state == st) && f.copy == c && f.comp == k)
        return f.format;
    std::string got = std::string("params ") + kElemNames[p] + " (" + role_label(0) + "), grads " +
                      (g == kNone ? "-" : kElemNames[g]);
    if (st != kNone) got += std::string(", states ") + kElemNames[st] + " (" + role_label(kRoleStates) + ")";
    if (c != kNone) got += std::string(", param_copies ") + kElemNames[c];
    if (k != kNone) got += std::string(", compensation ") + kElemNames[k];
    type_error(std::string(fn_) + ": unsupported combination of dtypes: " + got +
               "; supported (params, grads, states[, param_copies]): float32; float64; bfloat16; "
               "float16; bfloat16, bfloat16, float32; float16, float16, float32; float32, "
               "bfloat16, float32[, bfloat16]; float32, float16, float32[, float16]; float32, "
               "float32, bfloat16; float32 or bfloat16, same as params, int8 or int4 "
               "(QuantizedState); with compensation (bfloat16): bfloat16 params, grads and "
               "states");
  }
  int64_t total() const { return offsets_.back(); }
  int64_t count() const { return n_; }
  bool on_device() const { return mode_ == kModeDevice; }

  // Device arrays, after every other check: all on one CUDA device, then the launches on
  // params[0]'s stream, without the GIL. The device is DLPack's, or else the driver's
  // (cuda::pointer_info), asked once per CUDA allocation rather than once per array: arrays
  // are taken in address order, and one that lies inside the allocation range of the previous
  // answer is on that device. The arrays are alive for the whole call, so their allocations
  // cannot be freed and reused meanwhile.
  void launch_cuda(const Batch& b, RuleId rule, unsigned mask, const void* args) {
    if (total() == 0) return;
    cuda::require_device();
    const size_t n = intervals_.size();
    std::vector<size_t> order(n);
    for (size_t k = 0; k < n; ++k) order[k] = k;
    std::sort(order.begin(), order.end(),
              [&](size_t x, size_t y) { return intervals_[x].lo < intervals_[y].lo; });
    std::vector<cuda::PointerInfo> where(n);
    std::sort(dev_->known_devices.begin(), dev_->known_devices.end());
    cuda::PointerInfo known;  // the allocation of the last query
    for (size_t k : order) {
      const Interval& a = intervals_[k];
      const auto named = std::lower_bound(dev_->known_devices.begin(), dev_->known_devices.end(),
                                          std::make_pair(a.lo, -1));
      if (named != dev_->known_devices.end() && named->first == a.lo) {  // DLPack named it
        where[k].device_memory = true;
        where[k].device = named->second;
        continue;
      }
      if (!(known.device_memory && a.lo >= known.base && a.hi <= known.end))
        known = cuda::pointer_info(reinterpret_cast<const void*>(a.lo));
      where[k] = known;
    }
    size_t ref = 0;  // the first non-empty array in argument order names the device
    for (size_t k = 0; k < n; ++k) {
      const Interval& a = intervals_[k];
      const Interval& r = intervals_[ref];
      if (a.arg < r.arg || (a.arg == r.arg && a.index < r.index)) ref = k;
    }
    for (size_t k = 0; k < n; ++k) {
      if (!where[k].device_memory) {
        value_error(std::string(fn_) + ": " + label(intervals_[k].arg, intervals_[k].index) +
                    " exposes __cuda_array_interface__ but its data is not CUDA device memory");
      }
    }
    for (size_t k = 0; k < n; ++k) {
      if (where[k].device != where[ref].device) {
        value_error(std::string(fn_) + ": " + label(intervals_[k].arg, intervals_[k].index) +
                    " is on CUDA device " + std::to_string(where[k].device) + " but " +
                    label(intervals_[ref].arg, intervals_[ref].index) + " is on CUDA device " +
                    std::to_string(where[ref].device) +
                    "; all arrays of one call must be on one device");
      }
    }
    const Format f = format();
    if (!runs_on_cuda(f))  // quantized states are host arrays: refused before this
      throw std::logic_error(std::string(fn_) + ": a quantized-state format reached the CUDA launcher");
    const cuda::Launch l{rule, mask, f, stream_types(f), &b, args, where[ref].device, dev_->stream,
                         dev_->wait_streams, dev_->wait_names};
    py::gil_scoped_release release;
    cuda::launch(l);
  }

 private:
  std::string label(int arg, int64_t i) const {
    const ArgNames& a = names_[arg];
    return a.is_list ? std::string(a.name) + "[" + std::to_string(i) + "]" : std::string(a.name);
  }

  void* check_array(int arg, int64_t i, PyObject* item, bool written, int role) {
    if (!py::isinstance<py::array>(item)) {
      if (role == kRoleStates && is_quantized(item)) return check_quantized(arg, i, item);
      return check_device_array(arg, i, item, written, role);
    }
    if (Py_TYPE(item) != py::detail::npy_api::get().PyArray_Type_) check_subclass(arg, i, item);
    if (mode_ == kModeDevice) mixed_devices(arg, i);
    mode_ = kModeHost;
    auto* a = py::detail::array_proxy(item);
    auto* d = py::detail::array_descriptor_proxy(a->descr);
    const bool native = d->byteorder != '>';
    const Elem elem = elem_of(d);
    if (elem == kNone || !native) {
      type_error(std::string(fn_) + ": " + label(arg, i) + " has dtype " +
                 std::string(py::str(py::handle(item).attr("dtype"))) +
                 "; fastoptim supports float32, float64, float16 and bfloat16 (ml_dtypes), "
                 "native byte order");
    }
    note_dtype(arg, i, item, role, elem);
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
      // A read-only argument (a gradient) may be a contiguous copy; a written one may not:
      // the update would go to the copy.
      value_error(std::string(fn_) + ": " + label(arg, i) + " is not C-contiguous; " +
                  (written ? "it is updated in place, so it must be contiguous itself "
                             "(numpy.ascontiguousarray would make a copy, and the copy would be "
                             "updated, not " + label(arg, i) + ")"
                           : "it is only read, so a contiguous copy works: "
                             "numpy.ascontiguousarray(" + label(arg, i) + ")"));
    }
    if (written && !(a->flags & kNpyWriteable)) {
      value_error(std::string(fn_) + ": " + label(arg, i) + " is read-only; it is updated in place");
    }
    const int64_t itemsize = kElemSize[elem];
    if (size > 0) {
      const auto lo = reinterpret_cast<uintptr_t>(a->data);
      intervals_.push_back({lo, lo + static_cast<uintptr_t>(size * itemsize), arg, i, written});
    }
    return a->data;
  }

  static constexpr int kRoleStates = 2, kRoleCopies = 3, kRoleComp = 4, kNumRoles = 5;
  static constexpr const char* kRoleRule[] = {
      nullptr /* "all <params' argument name> of one call ..." */, "all grads of one call share one dtype",
      "all optimizer states of one call share one dtype",
      "all param_copies of one call share one dtype",
      "all compensation arrays of one call share one dtype"};
  struct RoleDtype {
    Elem elem = kNone;
    int arg = 0;  // the first array of the role, for messages
    int64_t index = 0;
    PyObject* item = nullptr;
  };

  std::string role_label(int role) const { return label(roles_[role].arg, roles_[role].index); }

  void note_dtype(int arg, int64_t i, PyObject* item, int role, Elem elem) {
    RoleDtype& r = roles_[role];
    if (r.elem == kNone) {
      r = {elem, arg, i, item};
    } else if (r.elem != elem) {
      type_error(std::string(fn_) + ": " + label(arg, i) + " has dtype " +
                 std::string(py::str(py::handle(item).attr("dtype"))) + " but " +
                 label(r.arg, r.index) + " has dtype " +
                 std::string(py::str(py::handle(r.item).attr("dtype"))) + "; " +
                 (kRoleRule[role] ? std::string(kRoleRule[role])
                                  : std::string("all ") + names_[arg].name + " of one call share one dtype"));
    }
  }

  // ndarray subclasses: numpy.ma.MaskedArray would be updated under its mask; refuse it.
  __attribute__((noinline)) void check_subclass(int arg, int64_t i, PyObject* item) const {
    static PyObject* masked = [] {
      return py::object(py::module_::import("numpy.ma").attr("MaskedArray")).release().ptr();
    }();
    const int is_masked = PyObject_IsInstance(item, masked);
    if (is_masked < 0) throw py::error_already_set();
    if (is_masked) {
      type_error(std::string(fn_) + ": " + label(arg, i) +
                 " is a numpy.ma.MaskedArray; masked arrays are not supported (the update would "
                 "ignore the mask): pass its .data, or fill the masked entries first");
    }
  }

  // ---- quantized states (quant_api.h, Note [quantized states]) ----
  // A fastoptim.quant.QuantizedState: codes (uint8, 1-D) and absmax (float32, 1-D) of the
  // tensor params[i], and bits (8 or 4). Checked like an array: sizes against params[i], both
  // C-contiguous and writeable, every absmax finite and >= 0; the kernel gets a QuantStream.
  static bool is_quantized(PyObject* item) {
    return std::strcmp(Py_TYPE(item)->tp_name, "QuantizedState") == 0;
  }

  __attribute__((noinline)) void* check_quantized(int arg, int64_t i, PyObject* item) {
    if (mode_ == kModeDevice) mixed_devices(arg, i);
    mode_ = kModeHost;
    const py::handle h(item);
    const std::string where = label(arg, i);
    const py::object bits_obj = h.attr("bits");
    int overflow = 0;
    const long bits_l = PyLong_Check(bits_obj.ptr()) ? PyLong_AsLongAndOverflow(bits_obj.ptr(), &overflow) : 0;
    const int bits = overflow == 0 && (bits_l == 8 || bits_l == 4) ? static_cast<int>(bits_l) : 0;
    if (bits != 8 && bits != 4)
      value_error(std::string(fn_) + ": " + where + ".bits must be 8 or 4");
    note_dtype(arg, i, item, kRoleStates, bits == 8 ? kElemQ8 : kElemQ4);
    const int nn = PyObject_IsTrue(h.attr("non_negative").ptr());
    if (nn < 0) throw py::error_already_set();
    if ((nn != 0) != expect_non_negative_)
      value_error(std::string(fn_) + ": " + where + " has non_negative=" + (nn ? "True" : "False") +
                  " but " + names_[arg].name + " is declared " +
                  (expect_non_negative_ ? "non-negative" : "signed") +
                  " (fastoptim.quant.non_negative_states)");
    auto* r = py::detail::array_proxy(ref_[i]);
    int64_t n = 1;
    for (int k = 0; k < r->nd; ++k) n *= r->dimensions[k];
    const py::object shape = h.attr("shape");
    py::tuple dims(r->nd);
    for (int k = 0; k < r->nd; ++k) dims[k] = py::int_(r->dimensions[k]);
    if (!shape.equal(dims))  // codes of the right length for another shape: a misplaced state
      value_error(std::string(fn_) + ": " + where + " has shape " + std::string(py::str(shape)) +
                  " but " + label(0, i) + " has shape " + shape_str(r->nd, r->dimensions));
    const auto array = [&](const char* field, int npy, const char* dtype, int64_t len, int64_t itemsize) {
      const py::object o = h.attr(field);
      if (!py::isinstance<py::array>(o) || Py_TYPE(o.ptr()) != py::detail::npy_api::get().PyArray_Type_)
        type_error(std::string(fn_) + ": " + where + "." + field + " must be a numpy.ndarray, got " +
                   type_name(o.ptr()));
      auto* a = py::detail::array_proxy(o.ptr());
      auto* d = py::detail::array_descriptor_proxy(a->descr);
      if (d->type_num != npy || d->byteorder == '>')
        type_error(std::string(fn_) + ": " + where + "." + field + " has dtype " +
                   std::string(py::str(o.attr("dtype"))) + "; expected " + dtype);
      if (a->nd != 1 || a->dimensions[0] != len)
        value_error(std::string(fn_) + ": " + where + "." + field + " has shape " +
                    shape_str(a->nd, a->dimensions) + " but " + label(0, i) + " (" +
                    std::to_string(n) + " elements) needs (" + std::to_string(len) + ",) at " +
                    std::to_string(bits) + " bits");
      if (!(a->flags & kNpyCContiguous) || !(a->flags & kNpyWriteable))
        value_error(std::string(fn_) + ": " + where + "." + field +
                    " must be C-contiguous and writeable; it is updated in place");
      if (len > 0) {
        const auto lo = reinterpret_cast<uintptr_t>(a->data);
        intervals_.push_back({lo, lo + static_cast<uintptr_t>(len * itemsize), arg, i, true});
      }
      held_.push_back(o);
      return a->data;
    };
    constexpr int kNpyUByte = 2;
    auto* codes = reinterpret_cast<uint8_t*>(array("codes", kNpyUByte, "uint8", quant_code_bytes(bits, n), 1));
    const int64_t blocks = quant_blocks(bits, n);
    auto* absmax = reinterpret_cast<float*>(array("absmax", kNpyFloat, "float32", blocks, 4));
    for (int64_t b = 0; b < blocks; ++b) {
      if (!(absmax[b] >= 0.0f && absmax[b] - absmax[b] == 0.0f))
        value_error(std::string(fn_) + ": " + where + ".absmax[" + std::to_string(b) + "] is " +
                    fmt(absmax[b]) + "; every absmax must be finite and >= 0 (a NaN absmax "
                    "means a NaN or Inf reached that block of the state)");
    }
    quant_.push_back(QuantStream{codes, absmax});
    return &quant_.back();
  }

  // ---- device arrays (__cuda_array_interface__, DLPack) ----
  static constexpr int kModeHost = 1, kModeDevice = 2;
  struct DeviceCall {
    std::vector<py::ssize_t> dims;       // shapes of params, concatenated
    std::vector<size_t> dims_start{0};   // params[t]'s shape is dims[dims_start[t] ..]
    uintptr_t stream = cuda::kStreamDefault;
    std::vector<uintptr_t> wait_streams;  // the other streams reported (Note [stream joins])
    std::vector<std::string> wait_names;  // the first array reporting each
    std::vector<std::pair<uintptr_t, int>> known_devices;  // (data, device) of DLPack arrays
    std::string role_typestr[5], role_dlpack_name[5];  // each role's first array's (messages)
  };

  [[noreturn]] void mixed_devices(int arg, int64_t i) const {
    const bool first_on_device = mode_ == kModeDevice;
    type_error(std::string(fn_) + ": " + label(arg, i) + " is " +
               (first_on_device ? "a numpy.ndarray (host memory)" : "a CUDA device array") +
               " but " + label(0, 0) + " is " +
               (first_on_device ? "a CUDA device array" : "a numpy.ndarray (host memory)") +
               "; all arrays of one call must be on the same device");
  }

  [[noreturn]] void bad_interface(int arg, int64_t i, const std::string& what) const {
    type_error(std::string(fn_) + ": " + label(arg, i) +
               " has an invalid __cuda_array_interface__: " + what);
  }

  static std::string type_name(PyObject* item) {
    return std::string(py::str(py::type::of(py::handle(item)).attr("__name__")));
  }

  // A device array's dtype name, for messages: DLPack's, or numpy's name of a CUDA Array
  // Interface typestr ("<f4" -> "float32").
  static std::string dtype_of(const std::string& typestr, const std::string& dlpack_name) {
    return typestr.empty() ? dlpack_name : typestr_name(typestr);
  }
  static std::string typestr_name(const std::string& typestr) {
    try {
      return std::string(py::str(py::module_::import("numpy").attr("dtype")(typestr)));
    } catch (const py::error_already_set&) {
      return typestr;
    }
  }

  // Note [DLPack input]
  // An array is read through its __cuda_array_interface__ (CuPy, Numba, torch, JAX) or, when it
  // has none, through DLPack (__dlpack_device__ + __dlpack__). An interface without a 'stream'
  // key (v2: torch) says nothing about ordering, so an object that also exports DLPack is read
  // through DLPack instead: __dlpack__(stream=S) with S the call's launch stream (params[0]'s,
  // or 1, the legacy default stream) is DLPack's stream handshake: the producer makes S wait
  // for the work it queued on its own current stream (torch under torch.cuda.stream(s): for
  // s), so the update reads finished gradients. The legacy capsule ('dltensor') is kept, not
  // consumed, until the call returns; its destructor calls the producer's deleter. DLPack
  // names the device, so such an array needs no pointer query (launch_cuda).
  struct DeviceView {  // what the checks need from either interface
    std::vector<py::ssize_t> dims;
    Elem elem = kNone;             // float32, float64, float16 or bfloat16; kNone: another dtype
    std::string typestr;           // CUDA Array Interface: numpy's name only for a message
    std::string dtype_name;        // DLPack: the name (no Python involved)
    bool has_strides = false;
    std::vector<int64_t> strides;  // in bytes
    uintptr_t ptr = 0;
    bool read_only = false;
    int device = -1;               // known (DLPack), or -1: ask the driver (launch_cuda)
  };

  // DLPack's ABI (dlpack.h, v0.x / 1.x; only the legacy capsule is used).
  struct DLDevice { int32_t device_type, device_id; };
  struct DLDataType { uint8_t code, bits; uint16_t lanes; };
  struct DLTensor {
    void* data;
    DLDevice device;
    int32_t ndim;
    DLDataType dtype;
    int64_t* shape;
    int64_t* strides;  // in elements; null: C-contiguous
    uint64_t byte_offset;
  };
  struct DLManagedTensor {
    DLTensor dl_tensor;
    void* manager_ctx;
    void (*deleter)(DLManagedTensor*);
  };
  static constexpr int kDLCPU = 1, kDLCUDA = 2, kDLCUDAHost = 3, kDLCUDAManaged = 13;

  [[noreturn]] void bad_dlpack(int arg, int64_t i, const std::string& what) const {
    type_error(std::string(fn_) + ": " + label(arg, i) + " has an invalid DLPack export: " + what);
  }

  static bool has_attr(PyObject* item, const char* name) {
    const int r = PyObject_HasAttrString(item, name);
    return r == 1;
  }
  // Whether item exports DLPack (keeps a pending Python error as it was).
  static bool has_dlpack(PyObject* item) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    const bool r = has_attr(item, "__dlpack__") && has_attr(item, "__dlpack_device__");
    PyErr_Restore(type, value, tb);
    return r;
  }

  void enter_device_mode(int arg, int64_t i, PyObject* item) {
    if (!cuda::built()) {
      type_error(std::string(fn_) + ": " + label(arg, i) + " is a CUDA array (" + type_name(item) +
                 ") but fastoptim was built without CUDA (docs/cuda.md: FASTOPTIM_CUDA)");
    }
    if (mode_ == kModeHost) mixed_devices(arg, i);
    mode_ = kModeDevice;
    if (!dev_) dev_ = std::make_unique<DeviceCall>();
  }

  // The CUDA Array Interface's names, interned once: a lookup by a C string makes a new str
  // each time, which with a dozen lookups per array cost microseconds per array (5,000-tensor
  // calls). Created under the GIL on first use and kept for the life of the process.
  struct CaiKeys {
    PyObject *cai, *shape, *typestr, *strides, *mask, *data, *stream;
  };
  static const CaiKeys& cai_keys() {
    static const CaiKeys k = [] {
      const auto intern = [](const char* s) {
        PyObject* o = PyUnicode_InternFromString(s);
        if (!o) throw py::error_already_set();
        return o;
      };
      return CaiKeys{intern("__cuda_array_interface__"), intern("shape"), intern("typestr"),
                     intern("strides"), intern("mask"), intern("data"), intern("stream")};
    }();
    return k;
  }

  // The ndarray checks of check_array, on the fields of a CUDA Array Interface (v0..v3), or of
  // a DLPack export (Note [DLPack input]). Out of line: inlined, it would slow the ndarray path
  // it branches off.
  __attribute__((noinline)) void* check_device_array(int arg, int64_t i, PyObject* item, bool written,
                                                     int role) {
    const CaiKeys& key = cai_keys();
    PyObject* raw = PyObject_GetAttr(item, key.cai);
    if (!raw) {
      // An interface that raises something other than AttributeError (a producer that has no
      // typestr for the dtype: some torch versions for bfloat16) is passed over for DLPack
      // where the array has it; bfloat16 has no CUDA Array Interface typestr of its own
      // ("<V2" names any 2-byte record), so it arrives through DLPack only.
      const bool attribute_error = PyErr_ExceptionMatches(PyExc_AttributeError);
      const bool dlpack = has_dlpack(item);
      if (!attribute_error && !dlpack) throw py::error_already_set();
      PyErr_Clear();
      if (dlpack) return check_dlpack_array(arg, i, item, written, role);
      type_error(std::string(fn_) + ": " + label(arg, i) +
                 " must be a numpy.ndarray or a CUDA array (an object with "
                 "__cuda_array_interface__ or __dlpack__), got " + type_name(item));
    }
    const py::object cai = py::reinterpret_steal<py::object>(raw);
    enter_device_mode(arg, i, item);
    if (!PyDict_Check(cai.ptr())) bad_interface(arg, i, "not a dict");
    // A new reference (the checks below may run Python code: __bool__, __index__), or null.
    const auto field = [&](PyObject* k) {
      PyObject* r = PyDict_GetItemWithError(cai.ptr(), k);
      if (!r && PyErr_Occurred()) throw py::error_already_set();
      return py::reinterpret_borrow<py::object>(r);
    };
    const py::object stream_obj = field(key.stream);
    if (!stream_obj && has_dlpack(item))
      return check_dlpack_array(arg, i, item, written, role);  // Note [DLPack input]
    DeviceView v;
    // shape
    const py::object shape_obj = field(key.shape);
    if (!shape_obj || !PyTuple_Check(shape_obj.ptr())) bad_interface(arg, i, "'shape' must be a tuple");
    const Py_ssize_t nd_in = PyTuple_GET_SIZE(shape_obj.ptr());
    v.dims.resize(static_cast<size_t>(nd_in));
    for (Py_ssize_t k = 0; k < nd_in; ++k) {
      PyObject* h = PyTuple_GET_ITEM(shape_obj.ptr(), k);
      const Py_ssize_t n = PyLong_Check(h) ? PyLong_AsSsize_t(h) : -1;
      if (n < 0) {
        PyErr_Clear();  // an overflow is "not an integer >= 0" too
        bad_interface(arg, i, "'shape' must hold integers >= 0");
      }
      v.dims[static_cast<size_t>(k)] = n;
    }
    const int nd = static_cast<int>(v.dims.size());
    // dtype
    const py::object typestr_obj = field(key.typestr);
    if (!typestr_obj || !PyUnicode_Check(typestr_obj.ptr())) bad_interface(arg, i, "'typestr' must be a str");
    Py_ssize_t typestr_len = 0;
    const char* typestr = PyUnicode_AsUTF8AndSize(typestr_obj.ptr(), &typestr_len);
    if (!typestr) throw py::error_already_set();
    v.typestr.assign(typestr, static_cast<size_t>(typestr_len));
    v.elem = v.typestr == "<f4" ? kElemF32 : v.typestr == "<f8" ? kElemF64 : v.typestr == "<f2" ? kElemF16 : kNone;
    // strides: None or absent, or one integer per dimension
    const py::object strides_obj = field(key.strides);
    if (strides_obj && !strides_obj.is_none()) {
      if (!PyTuple_Check(strides_obj.ptr()) || static_cast<int>(PyTuple_GET_SIZE(strides_obj.ptr())) != nd)
        bad_interface(arg, i, "'strides' must be None or a tuple with one entry per dimension");
      v.strides.resize(static_cast<size_t>(nd));
      for (int k = 0; k < nd; ++k) {
        PyObject* h = PyTuple_GET_ITEM(strides_obj.ptr(), k);
        if (!PyLong_Check(h)) bad_interface(arg, i, "'strides' must hold integers");
        v.strides[static_cast<size_t>(k)] = PyLong_AsLongLong(h);
        if (PyErr_Occurred()) {
          PyErr_Clear();
          bad_interface(arg, i, "'strides' must hold 64-bit integers");
        }
      }
      v.has_strides = true;
    }
    const py::object mask = field(key.mask);
    if (mask && !mask.is_none()) {
      value_error(std::string(fn_) + ": " + label(arg, i) +
                  " is a masked CUDA array; masks are not supported");
    }
    // data = (pointer, read_only)
    const py::object data = field(key.data);
    if (!data || !PyTuple_Check(data.ptr()) || PyTuple_GET_SIZE(data.ptr()) != 2 ||
        !PyLong_Check(PyTuple_GET_ITEM(data.ptr(), 0)))
      bad_interface(arg, i, "'data' must be a tuple (pointer, read_only)");
    v.ptr = static_cast<uintptr_t>(PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(data.ptr(), 0)));
    if (PyErr_Occurred()) {  // negative, or wider than a pointer
      PyErr_Clear();
      bad_interface(arg, i, "'data' must be a tuple (pointer, read_only) with a pointer >= 0");
    }
    const int read_only = PyObject_IsTrue(PyTuple_GET_ITEM(data.ptr(), 1));
    if (read_only < 0) throw py::error_already_set();
    v.read_only = read_only != 0;
    // stream (v3): params[0]'s is the launch stream; the others are joined with it both ways
    // (Note [stream joins], src/cuda/cuda_backend.cu)
    if (stream_obj && !stream_obj.is_none()) {
      if (!PyLong_Check(stream_obj.ptr())) bad_interface(arg, i, "'stream' must be None or an integer");
      const auto st = static_cast<uintptr_t>(PyLong_AsUnsignedLongLong(stream_obj.ptr()));
      if (PyErr_Occurred()) {  // negative, or wider than a pointer
        PyErr_Clear();
        bad_interface(arg, i, "'stream' must be None or a cudaStream_t handle (an integer >= 0)");
      }
      if (st == 0) {
        value_error(std::string(fn_) + ": " + label(arg, i) +
                    " reports CUDA stream 0, which the CUDA Array Interface v3 disallows (use 1 "
                    "for the legacy default stream, 2 for the per-thread default stream)");
      }
      if (arg == 0 && i == 0) {
        dev_->stream = st;
      } else if (st != dev_->stream && std::find(dev_->wait_streams.begin(),
                                                 dev_->wait_streams.end(), st) ==
                                           dev_->wait_streams.end()) {
        dev_->wait_streams.push_back(st);
        dev_->wait_names.push_back(label(arg, i));
      }
    }
    return accept_device_array(arg, i, item, written, role, v);
  }

  // numpy's name of a DLPack dtype, for messages.
  static std::string dlpack_dtype_name(const DLDataType& t) {
    static const char* kCodes[] = {"int", "uint", "float", "opaque", "bfloat", "complex", "bool"};
    std::string s = t.code < 7 ? kCodes[t.code] : "code" + std::to_string(t.code) + "_";
    if (t.code != 6) s += std::to_string(t.bits);
    if (t.lanes != 1) s += "x" + std::to_string(t.lanes);
    return s;
  }

  // Note [DLPack input]
  __attribute__((noinline)) void* check_dlpack_array(int arg, int64_t i, PyObject* item, bool written, int role) {
    const py::handle h(item);
    const py::object where = h.attr("__dlpack_device__")();
    if (!PyTuple_Check(where.ptr()) || PyTuple_GET_SIZE(where.ptr()) != 2)
      bad_dlpack(arg, i, "__dlpack_device__() must return (device_type, device_id)");
    int dev[2];
    for (int k = 0; k < 2; ++k) {
      PyObject* o = PyTuple_GET_ITEM(where.ptr(), k);
      int overflow = 0;
      const long long x = PyLong_Check(o) && !is_bool(o) ? PyLong_AsLongLongAndOverflow(o, &overflow) : -1;
      if (x == -1 && PyErr_Occurred()) throw py::error_already_set();
      if (!PyLong_Check(o) || is_bool(o) || overflow != 0 || x < 0 || x > INT32_MAX)
        bad_dlpack(arg, i, "__dlpack_device__() must return (device_type, device_id), two ints >= 0, got " +
                           std::string(py::repr(where)));
      dev[k] = static_cast<int>(x);
    }
    const int dev_type = dev[0], dev_id = dev[1];
    if (dev_type == kDLCUDAHost) {
      value_error(std::string(fn_) + ": " + label(arg, i) + " is CUDA pinned host memory (DLPack "
                  "kDLCUDAHost), not CUDA device memory");
    }
    if (dev_type != kDLCUDA && dev_type != kDLCUDAManaged) {
      type_error(std::string(fn_) + ": " + label(arg, i) + " is a DLPack array on " +
                 (dev_type == kDLCPU ? std::string("the CPU") : "device type " + std::to_string(dev_type)) +
                 "; fastoptim takes numpy.ndarray for host memory (numpy.from_dlpack converts "
                 "without a copy) and CUDA arrays");
    }
    enter_device_mode(arg, i, item);
    const uintptr_t launch = dev_->stream != cuda::kStreamDefault ? dev_->stream : cuda::kStreamLegacy;
    py::object capsule = h.attr("__dlpack__")(py::arg("stream") = launch);
    held_.push_back(capsule);  // Note [references held]; its destructor calls the deleter
    if (!PyCapsule_IsValid(capsule.ptr(), "dltensor"))
      bad_dlpack(arg, i, "__dlpack__() must return an unconsumed 'dltensor' capsule");
    const auto* mt = static_cast<const DLManagedTensor*>(PyCapsule_GetPointer(capsule.ptr(), "dltensor"));
    if (!mt) throw py::error_already_set();
    const DLTensor& t = mt->dl_tensor;
    if (t.device.device_type != dev_type || t.device.device_id != dev_id)
      bad_dlpack(arg, i, "its device differs from __dlpack_device__()");
    if (t.ndim < 0 || (t.ndim > 0 && !t.shape)) bad_dlpack(arg, i, "no shape");
    DeviceView v;
    for (int k = 0; k < t.ndim; ++k) {
      if (t.shape[k] < 0) bad_dlpack(arg, i, "negative shape");
      v.dims.push_back(static_cast<py::ssize_t>(t.shape[k]));
    }
    const bool f = t.dtype.code == 2 && t.dtype.lanes == 1;  // kDLFloat
    const bool bf = t.dtype.code == 4 && t.dtype.lanes == 1;  // kDLBfloat
    v.elem = f && t.dtype.bits == 32 ? kElemF32 : f && t.dtype.bits == 64 ? kElemF64
           : f && t.dtype.bits == 16 ? kElemF16 : bf && t.dtype.bits == 16 ? kElemBF16 : kNone;
    v.dtype_name = dlpack_dtype_name(t.dtype);
    const int64_t itemsize = (t.dtype.bits / 8) * (t.dtype.lanes ? t.dtype.lanes : 1);
    if (t.strides) {
      v.has_strides = true;
      for (int k = 0; k < t.ndim; ++k) {
        int64_t bytes = 0;
        if (__builtin_mul_overflow(t.strides[k], itemsize, &bytes))
          bad_dlpack(arg, i, "stride " + std::to_string(t.strides[k]) + " overflows in bytes");
        v.strides.push_back(bytes);
      }
    }
    v.ptr = reinterpret_cast<uintptr_t>(t.data) + static_cast<uintptr_t>(t.byte_offset);
    v.device = dev_id;
    return accept_device_array(arg, i, item, written, role, v);
  }

  // The checks common to both interfaces.
  void* accept_device_array(int arg, int64_t i, PyObject* item, bool written, int role,
                            const DeviceView& v) {
    const int nd = static_cast<int>(v.dims.size());
    if (v.elem == kNone) {
      type_error(std::string(fn_) + ": " + label(arg, i) + " has dtype " + dtype_of(v.typestr, v.dtype_name) +
                 "; fastoptim supports float32, float64, float16 and bfloat16 on CUDA");
    }
    RoleDtype& r = roles_[role];  // as note_dtype; the dtype names are made for a message only
    if (r.elem == kNone) {
      r = {v.elem, arg, i, item};
      dev_->role_typestr[role] = v.typestr;
      dev_->role_dlpack_name[role] = v.dtype_name;
    } else if (r.elem != v.elem) {
      type_error(std::string(fn_) + ": " + label(arg, i) + " has dtype " + dtype_of(v.typestr, v.dtype_name) +
                 " but " + label(r.arg, r.index) + " has dtype " +
                 dtype_of(dev_->role_typestr[role], dev_->role_dlpack_name[role]) + "; " +
                 (kRoleRule[role] ? std::string(kRoleRule[role])
                                  : std::string("all ") + names_[arg].name + " of one call share one dtype"));
    }
    const int64_t itemsize = kElemSize[v.elem];
    // shape against params; a size whose bytes would pass the end of the address space (the
    // producer's claim) is refused: its span would wrap, and the overlap check miss it
    int64_t size = 1;
    if (std::find(v.dims.begin(), v.dims.end(), py::ssize_t{0}) != v.dims.end()) {
      size = 0;  // empty, whatever the other dimensions (numpy's rule)
    } else {
      bool too_big = false;
      for (py::ssize_t k : v.dims) too_big = too_big || __builtin_mul_overflow(size, int64_t{k}, &size);
      int64_t bytes = 0;
      too_big = too_big || __builtin_mul_overflow(size, itemsize, &bytes) ||
                static_cast<uint64_t>(bytes) > UINTPTR_MAX - v.ptr ||
                (arg == 0 && size > INT64_MAX - offsets_.back());
      if (too_big)
        value_error(std::string(fn_) + ": " + label(arg, i) + " has shape " +
                    shape_str(nd, v.dims.data()) + " at data pointer " + std::to_string(v.ptr) +
                    ", more bytes than the address space holds from there");
    }
    if (arg == 0) {
      offsets_.push_back(offsets_.back() + size);
      dev_->dims.insert(dev_->dims.end(), v.dims.begin(), v.dims.end());
      dev_->dims_start.push_back(dev_->dims.size());
    } else {
      const py::ssize_t* ref = dev_->dims.data() + dev_->dims_start[i];
      const int ref_nd = static_cast<int>(dev_->dims_start[i + 1] - dev_->dims_start[i]);
      if (ref_nd != nd || !std::equal(v.dims.begin(), v.dims.end(), ref)) {
        value_error(std::string(fn_) + ": " + label(arg, i) + " has shape " +
                    shape_str(nd, v.dims.data()) + " but " + label(0, i) + " has shape " +
                    shape_str(ref_nd, ref));
      }
    }
    // C-contiguity: no strides, or C strides (numpy's rule: size-1 dimensions and empty arrays
    // have no stride requirement)
    if (v.has_strides) {
      bool contiguous = true;
      int64_t expected = itemsize;
      for (int k = nd - 1; k >= 0 && size > 0; --k) {
        if (v.dims[k] != 1 && v.strides[k] != expected) contiguous = false;
        expected *= v.dims[k];
      }
      if (!contiguous) {
        value_error(std::string(fn_) + ": " + label(arg, i) +
                    " is not C-contiguous; fastoptim updates contiguous buffers in place (a "
                    "contiguous copy would not be updated)");
      }
    }
    if (written && v.read_only) {
      value_error(std::string(fn_) + ": " + label(arg, i) + " is read-only; it is updated in place");
    }
    if (size > 0 && (v.ptr == 0 || v.ptr % static_cast<uintptr_t>(itemsize) != 0)) {
      value_error(std::string(fn_) + ": " + label(arg, i) + " has data pointer " +
                  std::to_string(v.ptr) + ", which is not a valid address aligned to its itemsize (" +
                  std::to_string(itemsize) + " bytes)");
    }
    // resize + assign, not push_back: a second push_back call site changes how GCC compiles
    // the ndarray path's (measured: ~4 ns more per array).
    if (size > 0) {
      intervals_.resize(intervals_.size() + 1);
      intervals_.back() = {v.ptr, v.ptr + static_cast<uintptr_t>(size * itemsize), arg, i, written};
      if (v.device >= 0) dev_->known_devices.emplace_back(v.ptr, v.device);
    }
    return reinterpret_cast<void*>(v.ptr);
  }

  const char* fn_;
  std::vector<py::object> held_;  // Note [references held]
  int64_t n_ = 0;
  int mode_ = 0;
  std::unique_ptr<DeviceCall> dev_;
  std::vector<ArgNames> names_;
  std::vector<int64_t> offsets_;
  std::vector<PyObject*> ref_;
  std::vector<void*> slots_[kMaxSlots];
  std::vector<void*> copies_;
  std::deque<QuantStream> quant_;
  bool expect_non_negative_ = false;  // what the state slots of a quantized format point to
  RoleDtype roles_[kNumRoles];
  double grad_scale_ = 1.0;
  bool sr_ = false;
  uint32_t sr_key_ = 0;
  uint64_t sr_index0_ = 0;
  std::vector<Interval> intervals_;
};

void run(CallBuilder& call, RuleId rule, unsigned mask, const void* args) {
  call.check_overlaps();
  const Batch b = call.batch();
  if (call.on_device()) {
    call.launch_cuda(b, rule, mask, args);
    return;
  }
  if (call.total() >= kReleaseGilFrom) {
    py::gil_scoped_release release;
    execute(rule, mask, call.format(), b, args);
  } else {
    execute(rule, mask, call.format(), b, args);
  }
}

// ---- entry points: one per rule of FO_RULES, from its declaration (rules.h) ----------------
// All positional, in the declaration's order (python/fastoptim/functional.py passes them);
// param_copies (None, or the low-precision copies a copy format writes) is every rule's.
// _core.<name>(params, grads, <states...>, param_copies, [step,] <hyperparameters...>, <flags...>)
template <class D> constexpr size_t num_args() {
  return 3 + D::kStates.size() + (D::kStep == StepUse::kNone ? 0 : 1) + D::kHyper.size() +
         D::kFlags.size();
}

// The keyword options every rule takes (kernel_api.h, Note [load/store options]):
//   grad_scale=None            torch.amp's scale: grads are divided by it as they are loaded
//                              (multiplied by 1/grad_scale, exact for the powers of two
//                              GradScaler uses); finite and > 0
//   found_inf=None             a number (or 0-d/1-element array or tensor): nonzero, or NaN,
//                              leaves every array untouched, after every check (torch fused)
//   stochastic_rounding=None   (seed, counter) or (seed, counter, first_index), integers in
//                              [0, 2**64): bfloat16 params are stored with stochastic rounding
//                              keyed by (seed, counter), element i of the call (params
//                              concatenated) with index first_index + i (default 0)
//   compensation=None          bfloat16 arrays like params: Kahan-compensated bf16 params
struct CallOptions {
  double grad_scale = 1.0;
  bool skip = false;
  bool sr = false;
  uint64_t seed = 0, counter = 0, index0 = 0;
  py::object compensation;
};

uint64_t u64_arg(const char* fn, const char* name, PyObject* o) {
  if (!PyLong_Check(o) || is_bool(o))
    type_error(std::string(fn) + ": " + name + " must be an int, got " + type_name(o));
  const unsigned long long v = PyLong_AsUnsignedLongLong(o);
  if (v == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
    PyErr_Clear();
    value_error(std::string(fn) + ": " + name + " must be in [0, 2**64), got " +
                std::string(py::str(py::handle(o))));
  }
  return static_cast<uint64_t>(v);
}

CallOptions options_arg(const std::string& fn_name, const py::kwargs& kw) {
  const char* fn = fn_name.c_str();
  CallOptions o;
  for (const auto& item : kw) {
    const std::string key = py::str(item.first);
    // Held: converting it may run Python code (__float__, __index__) that could drop the
    // kwargs' reference.
    const py::object value = py::reinterpret_borrow<py::object>(item.second);
    PyObject* v = value.ptr();
    if (key == "grad_scale") {
      if (v == Py_None) continue;
      o.grad_scale = real_arg(fn, "grad_scale", v);
      if (!(o.grad_scale > 0.0) || !std::isfinite(o.grad_scale))
        value_error(fn_name + ": grad_scale must be finite and > 0, got " + fmt(o.grad_scale));
    } else if (key == "found_inf") {
      if (v == Py_None) continue;
      const double f = real_arg(fn, "found_inf", v);
      o.skip = f != 0.0;  // NaN too
    } else if (key == "stochastic_rounding") {
      if (v == Py_None) continue;
      if (!PyTuple_Check(v) || (PyTuple_GET_SIZE(v) != 2 && PyTuple_GET_SIZE(v) != 3))
        type_error(fn_name + ": stochastic_rounding must be None or a tuple (seed, counter) or "
                   "(seed, counter, first_index), got " + type_name(v) +
                   (PyTuple_Check(v) ? " of " + std::to_string(PyTuple_GET_SIZE(v)) + " items" : ""));
      o.sr = true;
      o.seed = u64_arg(fn, "stochastic_rounding seed", PyTuple_GET_ITEM(v, 0));
      o.counter = u64_arg(fn, "stochastic_rounding counter", PyTuple_GET_ITEM(v, 1));
      if (PyTuple_GET_SIZE(v) == 3)
        o.index0 = u64_arg(fn, "stochastic_rounding first_index", PyTuple_GET_ITEM(v, 2));
    } else if (key == "compensation") {
      if (v != Py_None) o.compensation = py::reinterpret_borrow<py::object>(v);
    } else {
      type_error(fn_name + ": unexpected keyword argument '" + key + "'");
    }
  }
  return o;
}

// The scalar arguments of one call of rule D: step, hyperparameters, flags, and the variant.
template <class D> struct Scalars {
  double h[D::kHyper.size() + 1];
  bool f[D::kFlags.size() + 1];
  int64_t step = 0;
  unsigned mask = 0;
  unsigned used = 0;  // the slots variant `mask` reads or writes
  CallValues values() const { return {h, f, step}; }
};

// Reads and checks the scalars of _core.<rule>'s positional arguments (step, hyperparameters,
// flags: everything after param_copies), D::check, and the variant.
template <class D> void parse_scalars(const std::string& fn_name, const py::args& a, Scalars<D>& s) {
  const char* fn = fn_name.c_str();
  constexpr size_t kArgs = num_args<D>();
  if (a.size() != kArgs)
    type_error(fn_name + ": expected " + std::to_string(kArgs) + " positional arguments, got " +
               std::to_string(a.size()) + " (call fastoptim." + fn_name + ", not _core)");
  size_t k = 3 + D::kStates.size();
  if constexpr (D::kStep != StepUse::kNone) s.step = step_arg(fn, a[k++].ptr(), D::kStep);
  for (size_t j = 0; j < D::kHyper.size(); ++j) {
    s.h[j] = real_arg(fn, D::kHyper[j].name, a[k++].ptr());
    check_range(fn, D::kHyper[j], s.h[j]);
  }
  for (size_t j = 0; j < D::kFlags.size(); ++j) s.f[j] = flag_arg(fn, D::kFlags[j], a[k++].ptr());
  if (const char* problem = D::check(s.values())) value_error(fn_name + ": " + problem);
  s.mask = D::mask(s.values());
  s.used = slots_of<D>(s.mask);
  if (s.used == 0)  // D::mask gave a variant D::reachable excludes: a bug in the declaration
    throw std::logic_error(fn_name + ": variant " + std::to_string(s.mask) + " was not compiled");
}

// Validates one call of rule D and fills `call`; `run_fn` then runs it (the CPU or CUDA kernel,
// or the CUDA kernel's emulation).
template <class D, class RunFn>
void call_rule(const std::string& fn_name, py::args a, const py::kwargs& kw, RunFn&& run_fn) {
  const char* fn = fn_name.c_str();
  Scalars<D> sc;
  parse_scalars<D>(fn_name, a, sc);
  const CallOptions opt = options_arg(fn_name, kw);
  const size_t copies_at = 2 + D::kStates.size();
  const unsigned mask = sc.mask, used = sc.used;
  CallBuilder call(fn);
  call.add(kParam, D::kParams, a[0], true);
  call.add(kGrad, D::kGrads, a[1], false);
  for (size_t j = 0; j < D::kStates.size(); ++j) {
    const int slot = kState0 + static_cast<int>(j);
    if (!(used & bit(slot))) continue;
    const StateSpec& st = D::kStates[j];
    if (a[2 + j].is_none())
      value_error(fn_name + ": " + st.name + " is required" + (*st.when ? " " : "") + st.when);
    call.expect_non_negative(st.non_negative);
    call.add(slot, st.name, a[2 + j], true);
  }
  if (!a[copies_at].is_none()) {
    if (opt.compensation)
      value_error(fn_name + ": param_copies and compensation exclude each other (a format "
                  "writes either a copy of the params or their compensation)");
    call.add_copies("param_copies", a[copies_at]);
  }
  if (opt.compensation) call.add_compensation("compensation", opt.compensation);
  const Format format = call.format();  // a TypeError for an unsupported combination
  if (opt.grad_scale != 1.0 || opt.sr) call.set_grad_scale(opt.grad_scale);
  if (opt.sr) {
    const FormatRow& row = row_of(format);
    if (row.param != kElemBF16 || row.comp != kNone)
      value_error(fn_name + ": stochastic_rounding rounds bfloat16 params, without compensation; "
                  "this call's params are not bfloat16 or it passes compensation");
    if (call.total() > 0 && static_cast<uint64_t>(call.total() - 1) > ~uint64_t{0} - opt.index0)
      value_error(fn_name + ": stochastic_rounding first_index " + std::to_string(opt.index0) +
                  " plus the call's " + std::to_string(call.total()) +
                  " elements passes 2**64 - 1, the largest element index");
    call.set_stochastic_rounding(sr_key_of(opt.seed, opt.counter), opt.index0);
  }
  if (opt.skip) {  // found_inf: everything checked, nothing written
    call.check_overlaps();
    return;
  }
  const typename D::Args args = D::args(sc.values());
  run_fn(call, RuleIdOf<D>::value, mask, &args);
}

template <class D> void def_rule(py::module_& m) {
  const std::string fn_name = std::string(D::kName) + "_";
  m.def(D::kName, [fn_name](py::args a, py::kwargs kw) {
    call_rule<D>(fn_name, std::move(a), kw, &run);
  });
}

// A call of one list of arrays (the reductions): grads checked like a rule's params.
CallBuilder reduction_call(const char* fn, py::handle grads, bool written) {
  CallBuilder call(fn);
  call.add(kParam, "grads", grads, written);
  if (call.on_device())
    type_error(std::string(fn) + ": grads are CUDA arrays; this function runs on the CPU only");
  call.check_overlaps();
  return call;
}
GradType grad_type(Elem e) {
  return e == kElemF64 ? kGradF64 : e == kElemBF16 ? kGradBF16 : e == kElemF16 ? kGradF16 : kGradF32;
}

// global_norm(grads): the L2 norm of all elements of all arrays, in fp64, deterministic.
double global_norm(py::handle grads) {
  CallBuilder call = reduction_call("global_norm", grads, false);
  const Batch b = call.batch();
  const GradType type = grad_type(call.first_elem());
  double sum;
  if (call.total() >= kReleaseGilFrom) {
    py::gil_scoped_release release;
    sum = sum_of_squares(type, b);
  } else {
    sum = sum_of_squares(type, b);
  }
  return std::sqrt(sum);
}

// unscale_and_check_(grads, inv_scale): grads *= inv_scale in place; True if any was not finite.
bool unscale_and_check(py::handle grads, py::handle inv_scale) {
  const double s = real_arg("unscale_and_check_", "inv_scale", inv_scale.ptr());
  if (!std::isfinite(s))
    value_error("unscale_and_check_: inv_scale must be finite, got " + fmt(s));
  CallBuilder call = reduction_call("unscale_and_check_", grads, true);
  const Batch b = call.batch();
  const GradType type = grad_type(call.first_elem());
  if (call.total() >= kReleaseGilFrom) {
    py::gil_scoped_release release;
    return unscale(type, b, s);
  }
  return unscale(type, b, s);
}

// ---- fastoptim.torch's pointer path (Note [pointer path]) ---------------------------------
// Note [pointer path]
//   _core._pointers(rule, args) takes, in args, _core.<rule>'s positional arguments, except that each
//   array argument is a list of data pointers (Python ints) or None, and that params is a
//   tuple (dtype name, element counts, pointers). fastoptim.torch checks its tensors from
//   cached metadata (CPU, dense, one dtype, each gradient with its parameter's shape and
//   strides) and so skips building a NumPy view of every gradient every step (Note [Views
//   are cached] in torch.py). What can still be checked here is, before the first write: the
//   counts, every pointer (non-null where there is data, aligned to the element size) and
//   that no written span overlaps any other span of the call (Note [aliasing]). The caller
//   holds the tensors for the duration of the call, which runs without the GIL.
//   Note [packed pointers]: each list of ints (the element counts, and every pointer list)
//   may instead be a bytes object of native 64-bit values, 8 bytes per tensor: fastoptim.torch
//   keeps its cached ones so and _torch_ext.gather returns them so, which spares making and
//   reading a Python int per tensor per array every step (thousands of cold objects).
//   (The format: src/cpp/packed.h.)

// The number of 8-byte values in the bytes object `seq` (a ValueError naming `what` if its size
// is not a multiple of 8).
int64_t packed_count(const std::string& fn, const char* what, PyObject* seq) {
  const Py_ssize_t size = PyBytes_GET_SIZE(seq);
  if (size % 8 != 0)
    value_error(fn + ": " + what + " is " + std::to_string(size) +
                " bytes; packed values take 8 bytes each");
  return static_cast<int64_t>(size / 8);
}

struct PointerArrays {
  explicit PointerArrays(const char* name) : fn(name) {}
  const char* fn;
  int64_t n = 0;
  int64_t itemsize = 0;
  std::vector<int64_t> offsets{0};
  std::vector<void*> slots[kMaxSlots];
  std::vector<Interval> intervals;
  const char* names[kMaxSlots] = {};

  std::string label(const Interval& a) const {
    return std::string(names[a.arg]) + "[" + std::to_string(a.index) + "]";
  }

  void add(int slot, const char* name, py::handle obj, bool written) {
    PyObject* seq = obj.ptr();
    const bool packed = PyBytes_CheckExact(seq);
    if (!packed && !PyList_Check(seq))
      type_error(std::string(fn) + ": " + name + " must be a list of data pointers or bytes, got " +
                 type_name(seq));
    const int64_t count = packed ? packed_count(fn, name, seq) : PyList_GET_SIZE(seq);
    if (count != n) {
      value_error(std::string(fn) + ": " + name + " has " + std::to_string(count) +
                  " pointer(s) but there are " + std::to_string(n) + " element counts");
    }
    names[slot] = name;
    std::vector<void*>& out = slots[slot];
    out.resize(n);
    for (int64_t i = 0; i < n; ++i) {
      uintptr_t ptr;
      if (packed) {
        ptr = static_cast<uintptr_t>(packed_at(seq, i));
      } else {
        ptr = reinterpret_cast<uintptr_t>(PyLong_AsVoidPtr(PyList_GET_ITEM(seq, i)));
        if (PyErr_Occurred()) throw py::error_already_set();
      }
      add_pointer_span(intervals, fn, [&] { return std::string(name) + "[" + std::to_string(i) + "]"; },
                       ptr, offsets[i + 1] - offsets[i], itemsize, slot, i, written);
      out[i] = reinterpret_cast<void*>(ptr);
    }
  }

  void check_overlaps() {
    check_no_overlap(fn, intervals, [this](const Interval& s) { return label(s); });
  }
};

template <class D>
void call_rule_pointers(const std::string& fn_name, py::args a, const py::kwargs& kw) {
  const char* fn = fn_name.c_str();
  Scalars<D> sc;
  parse_scalars<D>(fn_name, a, sc);
  const CallOptions opt = options_arg(fn_name, kw);
  if (opt.sr || opt.compensation)
    type_error(fn_name + ": stochastic_rounding and compensation are not supported here");
  const size_t copies_at = 2 + D::kStates.size();
  if (!a[copies_at].is_none()) type_error(fn_name + ": param_copies are not supported here");
  const unsigned mask = sc.mask, used = sc.used;
  // params: (dtype name, element counts, pointers)
  PyObject* head = a[0].ptr();
  if (!PyTuple_Check(head) || PyTuple_GET_SIZE(head) != 3 ||
      !PyUnicode_Check(PyTuple_GET_ITEM(head, 0)) ||
      !(PyList_Check(PyTuple_GET_ITEM(head, 1)) || PyBytes_CheckExact(PyTuple_GET_ITEM(head, 1))))
    type_error(fn_name + ": params must be a tuple (dtype name: str, element counts: list or "
               "bytes, pointers), got " + type_name(head));
  const std::string dtype = py::reinterpret_borrow<py::str>(PyTuple_GET_ITEM(head, 0));
  Format format = kF32;
  int64_t itemsize = 4;
  if (dtype == "float64") format = kF64, itemsize = 8;
  else if (dtype == "bfloat16") format = kBF16, itemsize = 2;
  else if (dtype == "float16") format = kF16, itemsize = 2;
  else if (dtype != "float32")
    type_error(fn_name + ": dtype must be 'float32', 'float64', 'bfloat16' or 'float16', got '" +
               dtype + "'");
  PointerArrays arrays(fn);
  arrays.itemsize = itemsize;
  PyObject* counts = PyTuple_GET_ITEM(head, 1);
  const bool packed = PyBytes_CheckExact(counts);  // Note [packed pointers]
  arrays.n = packed ? packed_count(fn_name, "the element counts", counts) : PyList_GET_SIZE(counts);
  arrays.offsets.reserve(arrays.n + 1);
  for (int64_t i = 0; i < arrays.n; ++i) {
    long long c;
    if (packed) {
      c = static_cast<long long>(packed_at(counts, i));  // (>= 2^63 reads as negative)
    } else {
      // Only ints: another object's __index__ would run Python code, which could change the
      // list under this loop (the pointers are read as ints too: PyLong_AsVoidPtr runs none).
      PyObject* item = PyList_GET_ITEM(counts, i);
      if (!PyLong_Check(item) || is_bool(item))
        type_error(fn_name + ": element counts must be ints, got " + type_name(item));
      c = PyLong_AsLongLong(item);
      if (c == -1 && PyErr_Occurred()) throw py::error_already_set();
    }
    if (c < 0)
      value_error(fn_name + ": element counts must be >= 0 (and below 2^63); count " +
                  std::to_string(i) + " is not");
    if (c > INT64_MAX - arrays.offsets.back())
      value_error(fn_name + ": element counts overflow: their sum exceeds 2^63 - 1");
    arrays.offsets.push_back(arrays.offsets.back() + c);
  }
  arrays.add(kParam, D::kParams, PyTuple_GET_ITEM(head, 2), true);
  arrays.add(kGrad, D::kGrads, a[1], false);
  for (size_t j = 0; j < D::kStates.size(); ++j) {
    const int slot = kState0 + static_cast<int>(j);
    if (!(used & bit(slot))) continue;
    if (a[2 + j].is_none())
      value_error(fn_name + ": " + D::kStates[j].name + " is required");
    arrays.add(slot, D::kStates[j].name, a[2 + j], true);
  }
  arrays.check_overlaps();
  if (opt.skip) return;  // found_inf: everything checked, nothing written
  Batch b;
  b.n_tensors = arrays.n;
  b.offsets = arrays.offsets.data();
  for (int s = 0; s < kMaxSlots; ++s)
    b.slots[s] = arrays.slots[s].empty() ? nullptr : arrays.slots[s].data();
  b.grad_scale_inv_d = 1.0 / opt.grad_scale;
  b.grad_scale_inv_f = static_cast<float>(b.grad_scale_inv_d);
  const typename D::Args args = D::args(sc.values());
  if (arrays.offsets.back() >= kReleaseGilFrom) {
    py::gil_scoped_release release;
    execute(RuleIdOf<D>::value, mask, format, b, &args);
  } else {
    execute(RuleIdOf<D>::value, mask, format, b, &args);
  }
}

void def_pointer_path(py::module_& m) {
  m.def(
      "_pointers",
      [](const std::string& rule, py::tuple args, py::kwargs kw) {
        const auto a = py::reinterpret_borrow<py::args>(args);
#define FO_POINTERS(D) \
  if (rule == D::kName) return call_rule_pointers<D>(rule + "_", a, kw);
        FO_UPDATE_RULES(FO_POINTERS)
#undef FO_POINTERS
        value_error("_pointers: unknown rule '" + rule + "'");
      },
      py::arg("rule"), py::arg("args"));
}
// ---- end of the pointer path ----------------------------------------------------------------

// The bandwidth ceiling of the benchmark: streams[k] (one array or a list) for k < reads;
// the first `writes` streams are read, modified and written in place.
void stream_rmw(py::list streams, int writes, double scale) {
  const int reads = static_cast<int>(streams.size());
  if (!(reads >= 2 && reads <= kMaxSlots && writes == reads - 1))
    value_error("stream_rmw: supported (streams, writes): (2,1), (3,2), (4,3), (5,4)");
  static const char* kNames[kMaxSlots] = {"streams[0]", "streams[1]", "streams[2]", "streams[3]",
                                          "streams[4]"};
  CallBuilder call("stream_rmw");
  for (int k = 0; k < reads; ++k) call.add(k, kNames[k], streams[k], k < writes);
  const Stream::Args a{scale};
  run(call, kRuleStream, static_cast<unsigned>(reads - 2), &a);
}

// The benchmarks' byte ceiling (kernel_api.h, Note [byte ceiling]): streams[j] read, written or
// both as modes[j] says ("r", "w", "rw"), `elements` elements in blocks of kByteBlock, each
// array contributing its nbytes / (elements / kByteBlock) bytes to a block.
void stream_bytes_entry(const py::list& streams, const py::list& modes, const py::object& elements_obj,
                        int64_t prefetch_ahead, int64_t run) {
  const char* fn = "stream_bytes";
  const Py_ssize_t k = streams.size();
  if (k < 1 || k > kMaxByteStreams)
    value_error(std::string(fn) + ": streams must hold 1 to " + std::to_string(kMaxByteStreams) +
                " arrays, got " + std::to_string(k));
  if (modes.size() != static_cast<size_t>(k))
    value_error(std::string(fn) + ": modes must hold one mode per stream (" + std::to_string(k) +
                "), got " + std::to_string(modes.size()));
  if (!PyLong_Check(elements_obj.ptr()) || is_bool(elements_obj.ptr()))
    type_error(std::string(fn) + ": elements must be an int, got " + type_name(elements_obj.ptr()));
  int overflow = 0;
  const long long elements = PyLong_AsLongLongAndOverflow(elements_obj.ptr(), &overflow);
  if (elements == -1 && PyErr_Occurred()) throw py::error_already_set();
  if (overflow != 0 || elements <= 0 || elements % kByteBlock != 0)
    value_error(std::string(fn) + ": elements must be a positive multiple of " +
                std::to_string(kByteBlock) + ", got " + py::str(elements_obj).cast<std::string>());
  const int64_t blocks = elements / kByteBlock;
  std::vector<py::array> held;  // Note [references held]: the list may change while the loop runs
  std::vector<Interval> spans;
  ByteStreams bs;
  bs.n = static_cast<int>(k);
  for (Py_ssize_t j = 0; j < k; ++j) {
    const std::string name = "streams[" + std::to_string(j) + "]";
    const py::object item = streams[static_cast<size_t>(j)];
    if (!py::isinstance<py::array>(item))
      type_error(std::string(fn) + ": " + name + " must be a numpy.ndarray, got " + type_name(item.ptr()));
    const py::object mode_obj = modes[static_cast<size_t>(j)];
    const std::string mode = py::isinstance<py::str>(mode_obj) ? mode_obj.cast<std::string>() : "";
    if (mode != "r" && mode != "w" && mode != "rw")
      value_error(std::string(fn) + ": modes[" + std::to_string(j) + "] must be 'r', 'w' or 'rw', got " +
                  py::repr(mode_obj).cast<std::string>());
    const py::array a = py::reinterpret_borrow<py::array>(item);
    if (!(a.flags() & py::array::c_style))
      value_error(std::string(fn) + ": " + name + " must be C-contiguous");
    const bool written = mode != "r";
    if (written && !a.writeable()) value_error(std::string(fn) + ": " + name + " is read-only");
    const int64_t nbytes = static_cast<int64_t>(a.nbytes());
    if (nbytes % blocks != 0 || (nbytes / blocks) % 64 != 0 || nbytes == 0)
      value_error(std::string(fn) + ": " + name + " has " + std::to_string(nbytes) +
                  " bytes, not a positive multiple of 64 bytes per block of " + std::to_string(kByteBlock) +
                  " of the " + std::to_string(elements) + " elements");
    bs.base[j] = static_cast<uint8_t*>(const_cast<void*>(a.data()));  // written only if writeable
    bs.block_bytes[j] = nbytes / blocks;
    bs.read[j] = mode != "w";
    bs.write[j] = written;
    const uintptr_t lo = reinterpret_cast<uintptr_t>(bs.base[j]);
    spans.push_back({lo, lo + static_cast<uintptr_t>(nbytes), static_cast<int>(j), 0, written});
    held.push_back(a);
  }
  if (prefetch_ahead < 0 || prefetch_ahead > kMaxPrefetchAhead)
    value_error(std::string(fn) + ": prefetch_ahead must be in 0.." + std::to_string(kMaxPrefetchAhead) +
                ", got " + std::to_string(prefetch_ahead));
  if (run < 1 || run > kMaxByteRun)
    value_error(std::string(fn) + ": run must be in 1.." + std::to_string(kMaxByteRun) + ", got " +
                std::to_string(run));
  check_no_overlap(fn, spans, [](const Interval& s) { return "streams[" + std::to_string(s.arg) + "]"; });
  bs.prefetch_ahead = prefetch_ahead;
  bs.run = run;
  uint32_t sink = 0;
  bs.sink = &sink;
  py::gil_scoped_release release;
  stream_bytes(bs, elements);
}

// What Python needs to know of every rule (tests check the registry is complete).
template <class D> py::dict rule_info() {
  py::dict d;
  py::list states, hyper, flags, non_negative;
  for (const StateSpec& st : D::kStates) {
    states.append(py::make_tuple(st.name, st.when));
    if (st.non_negative) non_negative.append(st.name);
  }
  for (const HyperSpec& hs : D::kHyper) {
    static const char* kRangeNames[] = {"non_negative", "unit_open", "unit_closed", "finite"};
    hyper.append(py::make_tuple(hs.name, kRangeNames[static_cast<int>(hs.range)]));
  }
  for (const char* name : D::kFlags) flags.append(name);
  static const char* kStepNames[] = {"none", "optional", "required"};
  d["arrays"] = py::make_tuple(D::kParams, D::kGrads);
  d["states"] = states;
  d["non_negative_states"] = non_negative;  // quantized with the unsigned map
  d["copies"] = "param_copies";
  d["step"] = kStepNames[static_cast<int>(D::kStep)];
  d["hyper"] = hyper;
  d["flags"] = flags;
  return d;
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
  // Note [outside runner] (runner.h): where fastoptim.torch installed torch's OpenMP runner,
  // updates go there when it can take them (else the pool).
  d["threading"] = fastoptim::runner() != nullptr
                       ? "torch's OpenMP threads (fastoptim.torch), else the caller-runs pool"
                       : "caller-runs pool";
  const cuda::RuntimeInfo ci = cuda::runtime_info();
  py::dict c;
  c["built"] = ci.built;
  c["device_count"] = ci.device_count;
  py::list names, capabilities;
  for (const std::string& name : ci.device_names) names.append(name);
  for (int cc : ci.compute_capabilities) capabilities.append(cc);
  c["devices"] = names;
  c["compute_capabilities"] = capabilities;
  c["runtime_version"] = ci.runtime_version;
  c["driver_version"] = ci.driver_version;
  c["architectures"] = ci.architectures;
  c["error"] = ci.error.empty() ? py::object(py::none()) : py::object(py::str(ci.error));
  d["cuda"] = c;
  return d;
}

// _core._convert (float32 -> format bits, uint16) and _core._widen (the reverse) with the
// conversions of the named ISA, on this thread.
// With sr_key (fp32 -> bfloat16 only): rounded stochastically, element i with element index
// sr_index + i (vec.h, Note [stochastic rounding]).
void convert_hook(const char* name, bool widen, const py::object& src, const py::object& dst,
                  const std::string& fmt, const std::string& isa,
                  const std::optional<uint32_t>& sr_key = std::nullopt, uint64_t sr_index = 0) {
  const auto checked = [&](const py::object& o, const char* what, bool f32) {
    const char* want = f32 ? "float32" : "uint16";
    if (!py::isinstance<py::array>(o))
      type_error(std::string(name) + ": " + what + " must be an ndarray");
    const auto a = py::reinterpret_borrow<py::array>(o);
    if (!a.dtype().equal(f32 ? py::dtype::of<float>() : py::dtype::of<uint16_t>()) ||
        !(a.flags() & py::array::c_style))
      type_error(std::string(name) + ": " + what + " must be a C-contiguous " + want + " array");
    return a;
  };
  const py::array s = checked(src, "src", !widen);
  py::array d = checked(dst, "dst", widen);
  if (d.size() != s.size() || !d.writeable())
    value_error(std::string(name) + ": dst must be writeable and of src's size");
  if (fmt != "bfloat16" && fmt != "float16")
    value_error(std::string(name) + ": fmt must be 'bfloat16' or 'float16', got '" + fmt + "'");
  if (sr_key && fmt != "bfloat16")
    value_error(std::string(name) + ": sr_key needs fmt='bfloat16'");
  try {
    // Everything read from the arrays is read before the GIL is released (another thread
    // could then reshape them, freeing their dimensions).
    void* out = d.mutable_data();
    const void* in = s.data();
    const int64_t n = static_cast<int64_t>(s.size());
    py::gil_scoped_release release;
    if (sr_key)
      run_convert_sr(isa, static_cast<const float*>(in), out, n, *sr_key, sr_index);
    else
      run_convert(isa, fmt == "bfloat16" ? kStorageBF16 : kStorageF16, widen, in, out, n);
  } catch (const std::invalid_argument& e) {
    value_error(e.what());
  }
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
#define FO_DEF(D) def_rule<D>(m);
  FO_UPDATE_RULES(FO_DEF)
#undef FO_DEF
  py::dict rules;
#define FO_INFO(D) rules[D::kName] = rule_info<D>();
  FO_UPDATE_RULES(FO_INFO)
#undef FO_INFO
  m.attr("rules") = rules;
  m.def("global_norm", &global_norm, arg("grads"));
  m.def("unscale_and_check_", &unscale_and_check, arg("grads"), arg("inv_scale"));
  m.def("stream_rmw", &stream_rmw, arg("streams"), arg("writes"), arg("scale") = 0.0);
  m.def("stream_bytes", &stream_bytes_entry, arg("streams"), arg("modes"), arg("elements"),
        arg("prefetch_ahead") = 0, arg("run") = 1);
  m.def("info", &info);
  m.def("set_isa", [](const std::string& name) {
    try {
      set_isa(name);
    } catch (const std::invalid_argument& e) {
      throw py::value_error(e.what());
    }
  });
  m.def("set_num_threads", [](const py::int_& n) {  // fastoptim.set_num_threads checks the type
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(n.ptr(), &overflow);
    if (overflow != 0 || v < 1 || v > kMaxThreads)
      throw py::value_error("set_num_threads: n must be in 1.." + std::to_string(kMaxThreads) +
                            ", got " + py::str(n).cast<std::string>());
    set_num_threads(static_cast<int>(v));
  });
  m.def("get_num_threads", &num_threads);
  cuda::def_plan_hooks(m);
  def_pointer_path(m);  // fastoptim.torch (Note [pointer path])
  py::class_<GradPointers>(m, "_GradPointers", "Gradients as data pointers (Note [grad pointers]).")
      .def(py::init([](py::handle dtype_template, py::handle pointers) {
             if (!py::isinstance<py::array>(dtype_template))
               type_error("_GradPointers: dtype_template must be a numpy.ndarray, got " +
                          type_name(dtype_template.ptr()));
             if (!PyList_Check(pointers.ptr()))
               type_error("_GradPointers: pointers must be a list of ints, got " + type_name(pointers.ptr()));
             GradPointers gp{py::reinterpret_borrow<py::object>(dtype_template), {}};
             const Py_ssize_t n = PyList_GET_SIZE(pointers.ptr());
             gp.ptrs.resize(static_cast<size_t>(n));
             for (Py_ssize_t i = 0; i < n; ++i) {
               PyObject* item = PyList_GET_ITEM(pointers.ptr(), i);
               if (!PyLong_CheckExact(item))  // (an int subclass's __index__ would run Python)
                 type_error("_GradPointers: pointers[" + std::to_string(i) + "] must be an int, got " +
                            type_name(item));
               gp.ptrs[static_cast<size_t>(i)] = reinterpret_cast<uintptr_t>(PyLong_AsVoidPtr(item));
               if (PyErr_Occurred()) throw py::error_already_set();
             }
             return gp;
           }),
           arg("dtype_template"), arg("pointers"))
      .def("__len__", [](const GradPointers& gp) { return gp.ptrs.size(); });
  // Note [prefetch hints]
  //   Each step, fastoptim.torch reads a few fields of every parameter and state tensor
  //   (their data pointers, Note [pointer path]). The previous step's kernels streamed through
  //   far more memory than the caches hold, so each of those objects misses, and the misses
  //   come one after another through torch's Python bindings. _prefetch(addresses) issues one
  //   prefetch per int64 address (the objects' addresses as fastoptim.torch last saw them)
  //   so that the misses overlap. A prefetch is a hint: it never faults and nothing is
  //   dereferenced here, so a stale address (a tensor freed or moved since) costs only the
  //   hint, and correctness never depends on it.
  m.def(
      "_prefetch",
      [](const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& addresses) {
        const int64_t* a = addresses.data();
        const py::ssize_t n = addresses.size();
        for (py::ssize_t i = 0; i < n; ++i)
          __builtin_prefetch(reinterpret_cast<const void*>(static_cast<uintptr_t>(a[i])), 0, 3);
      },
      arg("addresses"));
#if defined(FASTOPTIM_HAVE_CUDA)
  m.def(
      "_emulate_kernel",
      [](const std::string& rule, py::tuple args, int sm_count, int64_t chunk, int64_t block,
         int64_t grid, int64_t group, py::dict options) {
        const auto emulate = [&](CallBuilder& call, RuleId id, unsigned mask, const void* a) {
          const Format f = call.format();
          if (!runs_on_cuda(f))
            throw py::type_error("_emulate_kernel: the CUDA kernels do not run quantized states");
          call.check_overlaps();
          const Batch b = call.batch();
          py::gil_scoped_release release;
          cuda::emulate(id, mask, f, stream_types(f), b, a, sm_count, chunk, block, grid, group);
        };
        bool found = false;
#define FO_EMULATE(D)                                               \
  if (!found && rule == D::kName) {                                 \
    found = true;                                                   \
    call_rule<D>(rule + "_", py::reinterpret_borrow<py::args>(args),                       \
                 py::reinterpret_borrow<py::kwargs>(options), emulate);                    \
  }
        FO_UPDATE_RULES(FO_EMULATE)
#undef FO_EMULATE
        if (!found) throw py::value_error("_emulate_kernel: unknown rule '" + rule + "'");
      },
      arg("rule"), arg("args"), py::kw_only(), arg("sm_count") = 132, arg("chunk") = 0,
      arg("block") = 0, arg("grid") = 0, arg("group") = 0, arg("options") = py::dict(),
      "Test hook: run the CUDA launches of a call (launch groups, plan, RuleVisitor or "
      "MixedVisitor) on the CPU, in place on NumPy arrays. rule: a name of _core.rules; args: "
      "exactly the positional arguments of _core.<rule>; options: its keyword options "
      "(grad_scale, found_inf, stochastic_rounding, compensation); chunk/block/grid/group "
      "(tensors per launch): 0 = the launcher's choice.");
#endif
  // Tuning hook (Note [software prefetch], kernels.h): the prefetch distance of every later
  // call, in elements ahead for every format (0: no software prefetch), or None: the default,
  // by the width of the params (dispatch.cpp). Returns the previous setting (None for the
  // default). A tuning knob only: no result depends on it.
  m.def("_set_prefetch_ahead", [](py::object elements) -> py::object {
    const auto previous = [](int64_t p) -> py::object {
      return p == kAutoPrefetch ? py::object(py::none()) : py::object(py::int_(p));
    };
    if (elements.is_none()) return previous(set_prefetch_ahead(kAutoPrefetch));
    if (!py::isinstance<py::int_>(elements) || py::isinstance<py::bool_>(elements))
      type_error("_set_prefetch_ahead: elements must be an int or None, got " +
                 type_name(elements.ptr()));
    int overflow = 0;
    const long long e = PyLong_AsLongLongAndOverflow(elements.ptr(), &overflow);
    if (overflow != 0 || e < 0 || e > kMaxPrefetchAhead)
      value_error("_set_prefetch_ahead: elements must be in [0, " +
                  std::to_string(kMaxPrefetchAhead) + "], got " +
                  py::str(elements).cast<std::string>());
    return previous(set_prefetch_ahead(e));
  }, arg("elements"));
  // Test hook: how many threads a call over `total` elements uses (Note [small arrays ...]).
  m.def("_threads_for", [](int64_t total) { return threads_for(total); }, arg("total"));
  // Test hook: threads that ran chunks of the most recent parallel call (parallel.h).
  m.def("_last_threads_used", &last_threads_used);
  // Note [outside runner] (runner.h): fastoptim.torch installs the torch extension's runner, a
  // capsule named "fastoptim._runner"; None goes back to the pool. Returns whether one was set.
  m.def("_set_runner", [](const py::object& runner) {
    const bool had = fastoptim::runner() != nullptr;
    if (runner.is_none()) {
      set_runner(nullptr);
    } else if (PyCapsule_IsValid(runner.ptr(), "fastoptim._runner")) {
      void* fn = PyCapsule_GetPointer(runner.ptr(), "fastoptim._runner");
      set_runner(reinterpret_cast<RunnerFn>(fn));
    } else {
      type_error("_set_runner: runner must be a fastoptim._runner capsule or None, got " +
                 py::str(py::type::of(runner).attr("__name__")).cast<std::string>());
    }
    return had;
  }, arg("runner"));
  m.def("_has_runner", [] { return fastoptim::runner() != nullptr; });
  // Test hook: whether the most recent parallel call ran on the runner (runner.h).
  m.def("_last_run_outside", &last_run_outside);
  // Test hooks: one ISA's storage conversions over a whole array (vec.h, Note [storage formats]).
  using Str = const std::string&;
  m.def("_convert", [](py::object src, py::object dst, Str fmt, Str isa,
                       std::optional<uint32_t> sr_key, uint64_t sr_index) {
    convert_hook("_convert", false, src, dst, fmt, isa, sr_key, sr_index);
  }, arg("src"), arg("dst"), arg("fmt"), arg("isa"), py::kw_only(), arg("sr_key") = py::none(),
     arg("sr_index") = 0);
  m.def("_widen", [](py::object src, py::object dst, Str fmt, Str isa) {
    convert_hook("_widen", true, src, dst, fmt, isa);
  }, arg("src"), arg("dst"), arg("fmt"), arg("isa"));
}
