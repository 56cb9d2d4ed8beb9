// fastoptim._torch_ext: torch tensors' metadata read in C++ for fastoptim.torch's step
// (Note [torch extension] in python/fastoptim/torch.py).
//
// Built only where torch is importable by the Python that builds fastoptim (src/torch/
// torch.cmake, FASTOPTIM_TORCH), against that torch's headers and libraries: it is loaded only
// under the torch it was built with (fastoptim/torch.py compares TORCH_VERSION,
// TORCH_GIT_VERSION and CXX11_ABI), and fastoptim.torch works without it, reading the same
// metadata through torch's Python bindings.
//
// Each function is a faster form of one pass of torch.py over a param group and answers
// exactly what that pass answers; where a function cannot answer (an object that is not a
// tensor, a tensor without storage, a mismatch), it says so and torch.py takes its own path,
// which finds and names the problem. Only plain tensors are read here (torch.Tensor and
// nn.Parameter, THPVariable_CheckExact): a subclass may override .grad or data_ptr() through
// Python, which torch's bindings honour and C++ would bypass, so any other object declines.
// (torch.py does not call in here while a TorchFunctionMode is active, for the same reason.)
// Nothing here writes to a tensor's memory; bump_versions changes only autograd version
// counters.

#include <torch/csrc/Dtype.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>

#include <Python.h>

#ifdef FASTOPTIM_TORCH_OPENMP
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <atomic>

#include "../cpp/runner.h"
#endif

#include "../cpp/packed.h"

#include <cstdint>
#include <new>
#include <optional>
#include <vector>

namespace {

// The value of an exact int, false when it does not fit in a long long (reported in a flag,
// not as a Python exception to clear).
bool exact_int(PyObject* obj, long long* out) {
  if (!PyLong_CheckExact(obj)) return false;  // (a subclass's __index__ runs Python)
  int overflow = 0;
  *out = PyLong_AsLongLongAndOverflow(obj, &overflow);
  return overflow == 0;
}

// A Python tuple or list of exact ints equal to `values`.
bool same_ints(PyObject* seq, c10::IntArrayRef values) {
  if (!PyTuple_Check(seq) && !PyList_Check(seq)) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  if (n != static_cast<Py_ssize_t>(values.size())) return false;
  PyObject** items = PySequence_Fast_ITEMS(seq);
  for (Py_ssize_t d = 0; d < n; ++d) {
    long long v;
    if (!exact_int(items[d], &v) || v != values[d]) return false;
  }
  return true;
}

bool is_list_of(PyObject* obj, Py_ssize_t n) { return PyList_Check(obj) && PyList_GET_SIZE(obj) == n; }

// Note [packed pointers] (src/cpp/bindings.cpp; the format: src/cpp/packed.h): n values.
bool is_packed_of(PyObject* obj, Py_ssize_t n) {
  return PyBytes_CheckExact(obj) && PyBytes_GET_SIZE(obj) == 8 * n;
}

using fastoptim::packed_at;

// Pointers as Note [packed pointers] has them.
PyObject* packed(const std::vector<void*>& ptrs) {
  return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(ptrs.data()),
                                   static_cast<Py_ssize_t>(8 * ptrs.size()));
}

PyObject* pointer(const at::Tensor& t) { return PyLong_FromVoidPtr(t.data_ptr()); }

// gather()'s answer when it declines.
PyObject* declined() { return Py_BuildValue("(OOOO)", Py_None, Py_None, Py_None, Py_None); }

// Note [lookahead prefetch]
//   Each pass below follows, for every item of a list, a chain of objects: a state dict, its
//   table, a tensor's Python object, its TensorImpl, its StorageImpl (for a param: its autograd
//   metadata, its gradient's TensorImpl, StorageImpl and Python object). The previous step's
//   kernels streamed far more memory than the caches hold, so every link misses, and each miss
//   was waited for before the next link's address was known. So while a pass checks item i, it
//   prefetches the chains of the items ahead, one link per kLookahead items: with L links, the
//   first link of item i + L * kLookahead, the second of the item kLookahead closer, and so on,
//   each read from what the link before brought in. A prefetch never faults and decides
//   nothing: the checks read everything again. warm_param starts each link again from the list
//   and keeps nothing (data_ptrs allocates as it goes); StateWalk keeps the values it found
//   (its comment), as no Python code runs in its loops. Measured on 2,000 tensors of 4,096
//   elements after a cache flush (median of 30, 1 thread): same_pointers 1.56 -> 0.62 ms (the
//   walk of values_of included), the gradients pass (grads, now part of gather) 0.79 -> 0.49,
//   data_ptrs 0.34 -> 0.17; the whole step, interleaved with the previous build of this file in
//   one process, 0.84-0.93x as long at 1 and 2 threads. 2 to 8 items per link measured the
//   same.
constexpr Py_ssize_t kLookahead = 4;

inline void prefetch(const void* p) { __builtin_prefetch(p, 0, 3); }

inline void prefetch_impl(const c10::TensorImpl* impl) {
  const char* c = reinterpret_cast<const char*>(impl);
  for (size_t k = 0; k < sizeof(c10::TensorImpl); k += 64) prefetch(c + k);
  prefetch(c + sizeof(c10::TensorImpl) - 1);
}

// The TensorImpl of a plain tensor (nullptr for anything else).
inline const c10::TensorImpl* impl_of(PyObject* t) {
  return THPVariable_CheckExact(t) ? THPVariable_Unpack(t).unsafeGetTensorImpl() : nullptr;
}

inline void prefetch_storage(const c10::TensorImpl* impl) {
  if (impl->has_storage()) {
    const char* s = reinterpret_cast<const char*>(impl->unsafe_storage().unsafeGetStorageImpl());
    prefetch(s);
    prefetch(s + 64);
  }
}

// Level `level` of param j's chain (Note [lookahead prefetch]): 0 the param's Python object,
// 1 its TensorImpl, 2 its StorageImpl and autograd metadata, and with `grad`: 3 its gradient's
// TensorImpl, 4 the gradient's StorageImpl and Python object.
void warm_param(PyObject* params, Py_ssize_t j, int level, bool grad) {
  if (j >= PyList_GET_SIZE(params)) return;
  PyObject* p = PyList_GET_ITEM(params, j);
  if (level == 0) return prefetch(p);
  const c10::TensorImpl* impl = impl_of(p);
  if (!impl) return;
  if (level == 1) return prefetch_impl(impl);
  const c10::AutogradMetaInterface* meta = grad ? impl->autograd_meta() : nullptr;
  if (level == 2) {
    prefetch_storage(impl);
    if (meta) {
      prefetch(meta);
      prefetch(reinterpret_cast<const char*>(meta) + 64);
    }
    return;
  }
  if (!meta || !meta->grad().defined()) return;
  const c10::TensorImpl* g = meta->grad().unsafeGetTensorImpl();
  if (level == 3) return prefetch_impl(g);
  prefetch_storage(g);
  if (PyObject* obj = g->pyobj_slot()->load_pyobj()) __builtin_prefetch(obj, 1, 3);
}

// Note [one walk]
//   A step asks three things of a group: each param's gradient (and whether all match the
//   cached metadata), each param's data pointer, and whether each state dict still holds the
//   bound tensors. gather() answers all three in one call: a loop over the state dicts
//   (StateWalk, what same_pointers does) and then one over the params, which reads each
//   param once for its gradient and its own pointer (grads and data_ptrs were two passes).
//   The loops run no Python code and call nothing that does: they allocate no Python object
//   and wrap no gradient (each is held as an at::Tensor). So nothing can change the lists or
//   free a state dict's values while they are read (StateWalk keeps the values it found a few
//   dicts ahead). The results are built after the loops, where an allocation may run a
//   collection (Note [gradients held]: no gradient is wrapped there any more).
//   Measured on 2,000 tensors of 4,096 elements and their Adam states, after a 128 MB stream
//   (medians of 30, the slow 2-core VM): the params' loop 0.77 ms, the dicts' 0.70, gather
//   1.39-1.58 (0.74 in cache) where grads, data_ptrs and same_pointers took 2.2-3.1 ms
//   (0.72-0.95). Two things were tried and not kept:
//   - One loop that visits dict i and param i together, so that the misses of both chains
//     are in flight at once: slower, 1.9-2.3 ms (1.46 in cache). The two lookaheads together
//     keep more lines in flight than the 32 KB L1 holds.
//   - Splitting the loops over two threads with a new thread per call (212 us to start and
//     join, median, on this VM, which wakes an idle core): it saved 0.46 ms after a cache
//     flush but cost 1 ms when torch's OpenMP threads were still spinning on the other core.
//     They now run on two of those threads instead (Note [split walk]).

// Note [gradients held]
//   gather returns the gradients as a Grads: a read-only sequence that holds them as
//   at::Tensors and wraps one as a Python object only when it is read (grads[i]: the tensor,
//   as p.grad gives it, or None). A gradient that backward made has no Python object until
//   something reads .grad, so returning them as a list made one per gradient per step (an
//   allocation each, and the collections they trigger): gather on 2,000 fresh gradients took
//   1.30 ms with the list and 1.02 with the Grads (medians of 30, the slow 2-core VM; 0.32 and
//   0.24 on gradients that already had Python objects). The step's fast path needs only their
//   pointers, and the Grads keeps them alive until the step returns, with the storages of
//   those whose pointers gather returned (a tensor does not keep its storage: HeldGrads).
// What a Grads holds: the gradients, and the storages of those whose pointers gather returned.
// A tensor does not keep its storage: Python code that runs between gather and the kernel (a
// hyperparameter's __float__, a collection's finalizer) may set_() or resize a gradient and
// free the memory the pointer names; holding the storage keeps it valid (the kernel then reads
// the gradient as it was when gathered).
struct HeldGrads {
  std::vector<at::Tensor> grads;
  std::vector<c10::Storage> storages;
};

struct GradsObject {
  PyObject_HEAD
  HeldGrads* held;  // owned
};

PyTypeObject* g_grads_type = nullptr;

void grads_dealloc(PyObject* self) {
  PyTypeObject* type = Py_TYPE(self);
  delete reinterpret_cast<GradsObject*>(self)->held;  // (may free a tensor and its object)
  type->tp_free(self);
  Py_DECREF(type);  // (a heap type)
}

Py_ssize_t grads_len(PyObject* self) {
  return static_cast<Py_ssize_t>(reinterpret_cast<GradsObject*>(self)->held->grads.size());
}

PyObject* grads_item(PyObject* self, Py_ssize_t i) {
  const std::vector<at::Tensor>& grads = reinterpret_cast<GradsObject*>(self)->held->grads;
  if (i < 0 || i >= static_cast<Py_ssize_t>(grads.size())) {
    PyErr_SetString(PyExc_IndexError, "Grads index out of range");
    return nullptr;
  }
  if (!grads[i].defined()) Py_RETURN_NONE;
  try {
    return THPVariable_Wrap(grads[i]);
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    return nullptr;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

PyType_Slot kGradsSlots[] = {
    {Py_tp_dealloc, reinterpret_cast<void*>(grads_dealloc)},
    {Py_sq_length, reinterpret_cast<void*>(grads_len)},
    {Py_sq_item, reinterpret_cast<void*>(grads_item)},
    {Py_tp_doc,
     const_cast<char*>("gather's gradients: grads[i] is param i's .grad (Note [gradients held]).")},
    {0, nullptr},
};

PyType_Spec kGradsSpec = {"fastoptim._torch_ext.Grads", sizeof(GradsObject), 0,
                          Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION, kGradsSlots};

// A new Grads holding `grads` and `storages` (nullptr, an exception set, on failure).
PyObject* new_grads(std::vector<at::Tensor>&& grads, std::vector<c10::Storage>&& storages) {
  PyObject* self = g_grads_type->tp_alloc(g_grads_type, 0);
  if (!self) return nullptr;
  auto* held = new (std::nothrow) HeldGrads{std::move(grads), std::move(storages)};  // (moves: no throw)
  if (!held) {
    Py_TYPE(self)->tp_free(self);
    Py_DECREF(g_grads_type);  // (tp_alloc took a reference to the heap type)
    return PyErr_NoMemory();
  }
  reinterpret_cast<GradsObject*>(self)->held = held;
  return self;
}

// What gather's loops found (they set these only to false).
struct Found {
  bool read = true;   // every param a plain tensor torch could read (else gather declines)
  bool match = true;  // every gradient present and matching its metadata
  bool plain = true;  // every param with storage
  bool same = true;   // every state dict holding the bound tensors (StateWalk)
};

// The params' side of gather(): param i's gradient, checked against dtypes[i], shapes[i] and
// strides[i] (what torch.py's _grads_match asks, the gradient's Python type included, read from
// its Python object where it has one), and param i's data pointer. warm() and visit() run no
// Python code (Note [one walk]); visit may throw c10::Error (a tensor torch cannot read).
class ParamWalk {
 public:
  ParamWalk(PyObject* params, PyObject* dtypes, PyObject* shapes, PyObject* strides)
      : params_(params), dtypes_(dtypes), shapes_(shapes), strides_(strides),
        n_(PyList_GET_SIZE(params)), grads_(static_cast<size_t>(n_)),
        storages_(static_cast<size_t>(n_)), gptrs_(static_cast<size_t>(n_)),
        pptrs_(static_cast<size_t>(n_)) {}

  // Note [lookahead prefetch]: the links of the params ahead of item i (i may be negative).
  void warm(Py_ssize_t i) const {
    for (int level = 0; level < 5; ++level)
      if (const Py_ssize_t j = i + (5 - level) * kLookahead; j >= 0)
        warm_param(params_, j, level, true);
    if (const Py_ssize_t j = i + 5 * kLookahead; j >= 0 && j < n_) {
      prefetch(PyList_GET_ITEM(shapes_, j));
      prefetch(PyList_GET_ITEM(strides_, j));
    }
  }

  // Reads item i into the vectors and f.
  void visit(Py_ssize_t i, Found& f) {
    PyObject* p = PyList_GET_ITEM(params_, i);
    if (!THPVariable_CheckExact(p)) {
      f.read = false;
      return;
    }
    const at::Tensor& param = THPVariable_Unpack(p);
    if (param.has_storage()) {
      pptrs_[i] = param.data_ptr();
    } else {
      f.plain = false;
    }
    // A param given another shape at the same address (p.data = p.data[:n]) while its
    // gradient still has the old one, which matches the cache: no param pointers, so that
    // torch.py compares the params with their caches (Note [A param's layout changed under
    // its cache]). shapes_[i] is the param's shape when the cache was made.
    if (!same_ints(PyList_GET_ITEM(shapes_, i), param.sizes())) f.plain = false;
    const at::Tensor& g = grads_[i] = param.grad();
    if (!g.defined()) {
      f.match = false;
      return;
    }
    if (f.match) {
      PyObject* dtype = PyList_GET_ITEM(dtypes_, i);
      // (a gradient whose Python object is of a subclass: torch.py's path, a type it checks;
      // one without a Python object would be wrapped as a torch.Tensor)
      PyObject* obj = g.unsafeGetTensorImpl()->pyobj_slot()->load_pyobj();
      f.match = (!obj || Py_TYPE(obj) == reinterpret_cast<PyTypeObject*>(THPVariableClass)) &&
                THPDtype_Check(dtype) &&
                g.scalar_type() == reinterpret_cast<THPDtype*>(dtype)->scalar_type &&
                g.layout() == c10::kStrided && g.device().is_cpu() && !g.is_neg() &&
                !g.is_conj() && g.has_storage() &&
                same_ints(PyList_GET_ITEM(shapes_, i), g.sizes()) &&
                same_ints(PyList_GET_ITEM(strides_, i), g.strides());
      // (a storage freed or shrunk under the gradient, as FSDP resizes storages to 0: its
      // pointer would be null or name too little memory; torch.py's path refuses it by name)
      f.match = f.match && g.storage().nbytes() >= static_cast<size_t>(g.storage_offset() + g.numel()) *
                                                       static_cast<size_t>(g.itemsize());
      if (f.match) {
        gptrs_[i] = g.data_ptr();
        storages_[i] = g.storage();  // (its line was just read for data_ptr: a cheap copy)
      }
    }
  }

  // (grads, gradient pointers or None, param pointers or None, same), built after the loops
  // (f: what they found): building them may run Python code (a collection), which can no
  // longer change what was read. grads: a Grads holding the gradients (grads_ until here).
  PyObject* result(Found f, PyObject* same, bool pack) {
    const auto out = [pack](const std::vector<void*>& ptrs) {
      return pack ? packed(ptrs) : pointer_list(ptrs);
    };
    PyObject* grads = new_grads(std::move(grads_), std::move(storages_));
    PyObject* gptrs = grads && f.match ? out(gptrs_) : Py_XNewRef(Py_None);
    PyObject* pptrs = grads && f.plain ? out(pptrs_) : Py_XNewRef(Py_None);
    if (!grads || !gptrs || !pptrs) {
      Py_XDECREF(grads);
      Py_XDECREF(gptrs);
      Py_XDECREF(pptrs);
      return nullptr;
    }
    return Py_BuildValue("(NNNO)", grads, gptrs, pptrs, same);
  }

 private:
  static PyObject* pointer_list(const std::vector<void*>& ptrs) {
    PyObject* out = PyList_New(static_cast<Py_ssize_t>(ptrs.size()));
    if (!out) return nullptr;
    for (size_t i = 0; i < ptrs.size(); ++i) {
      PyObject* ptr = PyLong_FromVoidPtr(ptrs[i]);
      if (!ptr) {
        Py_DECREF(out);  // (slots never set are NULL, which list deallocation skips)
        return nullptr;
      }
      PyList_SET_ITEM(out, static_cast<Py_ssize_t>(i), ptr);
    }
    return out;
  }

  PyObject *params_, *dtypes_, *shapes_, *strides_;
  Py_ssize_t n_;
  std::vector<at::Tensor> grads_;  // held until the results are built
  std::vector<c10::Storage> storages_;  // of the gradients whose pointers are returned
  std::vector<void*> gptrs_, pptrs_;
};

// The values of the exact-str keys `keys` in the exact dict d, into out[0..len(keys)), found by
// walking d's entries (PyDict_Next) instead of looking each key up. False when one is missing
// or when d has a key that is not an exact str. With only exact-str keys, a lookup would find
// the entry whose key equals it in content, which is what this finds (identity first), and
// unlike a lookup (which calls a colliding key's __eq__) the walk never runs Python code.
bool values_of(PyObject* d, PyObject* keys, PyObject** out) {
  const Py_ssize_t n_keys = PyTuple_GET_SIZE(keys);
  for (Py_ssize_t k = 0; k < n_keys; ++k) out[k] = nullptr;
  Py_ssize_t pos = 0, found = 0;
  PyObject *key, *value;  // borrowed
  while (PyDict_Next(d, &pos, &key, &value)) {
    if (!PyUnicode_CheckExact(key)) return false;
    for (Py_ssize_t k = 0; k < n_keys; ++k) {
      PyObject* want = PyTuple_GET_ITEM(keys, k);
      if (!out[k] && (key == want || PyUnicode_Compare(key, want) == 0)) {
        out[k] = value;
        ++found;
        break;
      }
    }
  }
  return found == n_keys;
}

// same_pointers' comparison, one dict at a time (same_pointers and gather loop over it):
// whether dicts[i][keys[k]] is a tensor whose data_ptr() is expected[k][i]. Runs no Python
// code (values_of, exact_int: Note [one walk]), so the values found for a dict stay valid
// until its tensors are read, a few dicts later (Note
// [lookahead prefetch]: each dict's chain is followed kLookahead dicts apart per level: the
// dict, its table, its values with their expected ints, their TensorImpls, their
// StorageImpls, then the check).
class StateWalk {
 public:
  // The first item to visit: the lookahead starts this far before dict 0.
  static constexpr Py_ssize_t kFirst = -3 * kLookahead;

  // False when the arguments cannot compare equal: dicts not a list of n, keys not exact
  // strs, expected not one list of n per key.
  bool init(PyObject* dicts, PyObject* keys, PyObject* expected, Py_ssize_t n) {
    if (!PyList_Check(dicts) || PyList_GET_SIZE(dicts) != n ||
        PyTuple_GET_SIZE(expected) != PyTuple_GET_SIZE(keys))
      return false;
    dicts_ = dicts;
    keys_ = keys;
    expected_ = expected;
    n_ = n;
    n_keys_ = PyTuple_GET_SIZE(keys);
    for (Py_ssize_t k = 0; k < n_keys_; ++k) {
      PyObject* want = PyTuple_GET_ITEM(expected, k);
      if (!PyUnicode_CheckExact(PyTuple_GET_ITEM(keys, k)) ||
          !(is_list_of(want, n) || is_packed_of(want, n)))
        return false;
    }
    ring_.assign(static_cast<size_t>(kRing * n_keys_), nullptr);
    return true;
  }

  // Prefetches the links of the dicts ahead of item i and, for i >= 0, compares dict i: false
  // at a mismatch (or a dict that values_of declines).
  bool visit(Py_ssize_t i) {
    const auto in = [&](Py_ssize_t j) { return j >= 0 && j < n_; };
    try {
      if (const Py_ssize_t j = i + 5 * kLookahead; in(j)) prefetch(PyList_GET_ITEM(dicts_, j));
      if (const Py_ssize_t j = i + 4 * kLookahead; in(j)) {
        PyObject* d = PyList_GET_ITEM(dicts_, j);
        if (PyDict_CheckExact(d)) {
          const auto* o = reinterpret_cast<const PyDictObject*>(d);
          prefetch(o->ma_keys);
          prefetch(reinterpret_cast<const char*>(o->ma_keys) + 64);
          if (o->ma_values) prefetch(o->ma_values);
        }
      }
      if (const Py_ssize_t j = i + 3 * kLookahead; in(j)) {
        PyObject* d = PyList_GET_ITEM(dicts_, j);
        if (!PyDict_CheckExact(d) || !values_of(d, keys_, values(j))) return false;
        for (Py_ssize_t k = 0; k < n_keys_; ++k) {
          prefetch(values(j)[k]);
          if (PyObject* want = PyTuple_GET_ITEM(expected_, k); PyList_Check(want))
            prefetch(PyList_GET_ITEM(want, j));  // (packed values: one sequential stream)
        }
      }
      if (const Py_ssize_t j = i + 2 * kLookahead; in(j)) each_impl(j, prefetch_impl);
      if (const Py_ssize_t j = i + kLookahead; in(j)) each_impl(j, prefetch_storage);
      if (!in(i)) return true;
      for (Py_ssize_t k = 0; k < n_keys_; ++k) {
        PyObject* t = values(i)[k];
        PyObject* expected = PyTuple_GET_ITEM(expected_, k);
        unsigned long long want;
        if (PyList_Check(expected)) {
          long long v;  // (a pointer at or above 2^63 would not fit: then False, declined)
          if (!exact_int(PyList_GET_ITEM(expected, i), &v)) return false;
          want = static_cast<unsigned long long>(v);
        } else {
          want = packed_at(expected, i);
        }
        if (!THPVariable_CheckExact(t)) return false;
        const at::Tensor& tensor = THPVariable_Unpack(t);
        if (!tensor.has_storage() || reinterpret_cast<uintptr_t>(tensor.data_ptr()) != want)
          return false;
      }
      return true;
    } catch (const std::exception&) {  // c10::Error
      return false;
    }
  }

 private:
  // The values of dicts j - 3 kLookahead .. j, by j modulo kRing.
  static constexpr Py_ssize_t kRing = 4 * kLookahead;
  PyObject** values(Py_ssize_t j) { return ring_.data() + (j % kRing) * n_keys_; }
  template <class Fn> void each_impl(Py_ssize_t j, Fn&& fn) {
    for (Py_ssize_t k = 0; k < n_keys_; ++k)
      if (const c10::TensorImpl* impl = impl_of(values(j)[k])) fn(impl);
  }

  PyObject *dicts_ = nullptr, *keys_ = nullptr, *expected_ = nullptr;
  Py_ssize_t n_ = 0, n_keys_ = 0;
  std::vector<PyObject*> ring_;
};

// same_pointers(dicts, keys, expected) -> bool
//   StateWalk over every dict: torch.py's `list(map(data_ptr, map(itemgetter(key), dicts))) ==
//   expected[k]` for each key, where a missing key or a non-tensor value is False (torch.py
//   then takes its own path). keys: a tuple of exact str; expected: a tuple of lists of exact
//   ints (or their packed bytes: Note [packed pointers]). False too when a dict is not an
//   exact dict or has a key that is not an exact str (values_of): then nothing here runs
//   Python code (no lookup calls a key's __eq__, only exact ints are read), so no object can
//   change or go away during the call.
PyObject* same_pointers(PyObject*, PyObject* args) {
  PyObject *dicts, *keys, *expected;
  if (!PyArg_ParseTuple(args, "OO!O!", &dicts, &PyTuple_Type, &keys, &PyTuple_Type, &expected))
    return nullptr;
  StateWalk walk;
  if (!PyList_Check(dicts)) Py_RETURN_FALSE;
  const Py_ssize_t n = PyList_GET_SIZE(dicts);
  if (!walk.init(dicts, keys, expected, n)) Py_RETURN_FALSE;
  for (Py_ssize_t i = StateWalk::kFirst; i < n; ++i)
    if (!walk.visit(i)) Py_RETURN_FALSE;
  Py_RETURN_TRUE;
}

// Note [split walk]
//   gather's two loops read different objects (the state dicts and their tensors; the params
//   and their gradients), so with `threads` >= 2 they run at once on two of torch's OpenMP
//   threads: the dicts on thread 1, the params on the calling thread, each with its own L1
//   for its lookahead (Note [one walk]: one thread interleaving both chains was slower). The
//   team is the one the update's kernel then runs on (Note [outside runner]), so a team that
//   was asleep is woken here instead of there. Neither loop runs Python code, and the calling
//   thread keeps the GIL while both run, so no Python code runs anywhere until both are done.
//   The dicts' thread takes no Python reference and allocates no Python object: it reads
//   dicts, lists, ints and tensors (values_of, exact_int, THPVariable_Unpack), and a state's
//   data_ptr() is C++ only (it may materialize a copy-on-write storage, as it would on one
//   thread). The params' loop, on the calling thread, holds each gradient as an at::Tensor.
//   Each loop writes only its own results. Used from kSplitMin
//   params, where the dicts' loop after a cache flush (about 0.35 us per dict here) outweighs
//   waking a sleeping thread (about 120 us); never inside a parallel region or where torch has
//   one thread. The answer is the same either way: each loop's result depends on its own
//   objects only.
constexpr Py_ssize_t kSplitMin = 512;

// Whether the last gather split its loops (for the tests: last_gather_split()).
bool g_last_split = false;

// Whether gather may run its loops on two of torch's OpenMP threads (Note [split walk]).
bool may_split(int threads, Py_ssize_t n) {
#ifdef FASTOPTIM_TORCH_OPENMP
  if (threads < 2 || n < kSplitMin) return false;
  at::internal::lazy_init_num_threads();
  return !omp_in_parallel() && !at::in_parallel_region() && omp_get_max_threads() >= 2;
#else
  (void)threads;
  (void)n;
  return false;
#endif
}

// gather(params, dtypes, shapes, strides, dicts, keys, expected, threads=1, packed=False)
//     -> (grads, grad pointers, param pointers, same)
//   Note [one walk]. grads: each param's .grad (None where it has none); grad pointers: the
//   gradients' data pointers when EVERY param has a gradient that is a plain torch.Tensor
//   (type exactly torch.Tensor), strided, on the CPU, with dtypes[i], shape shapes[i] and
//   strides strides[i], and neither its negative nor its conjugate bit set (what torch.py's
//   _grads_match asks), else None; param pointers: each param's data_ptr(), None when one has
//   no storage; same: same_pointers(dicts, keys, expected), or None when dicts is None. All
//   four None when params is not a list of plain tensors or the metadata lists do not match
//   it. threads: how many threads the two loops may use (Note [split walk]). expected[k] may
//   be a list of ints or their packed bytes, and with packed=True both pointer answers come
//   packed (Note [packed pointers]).
PyObject* gather(PyObject*, PyObject* args) {
  PyObject *params, *dtypes, *shapes, *strides, *dicts, *keys, *expected;
  int threads = 1, pack = 0;
  if (!PyArg_ParseTuple(args, "OOOOOO!O!|ip", &params, &dtypes, &shapes, &strides, &dicts,
                        &PyTuple_Type, &keys, &PyTuple_Type, &expected, &threads, &pack))
    return nullptr;
  if (!PyList_Check(params)) return declined();
  const Py_ssize_t n = PyList_GET_SIZE(params);
  if (!is_list_of(dtypes, n) || !is_list_of(shapes, n) || !is_list_of(strides, n))
    return declined();
  StateWalk states;
  const bool compare = dicts != Py_None;
  Found f;
  f.same = compare && states.init(dicts, keys, expected, n);
  std::optional<ParamWalk> walk;
  try {
    walk.emplace(params, dtypes, shapes, strides);
  } catch (const std::exception&) {  // bad_alloc
    return declined();
  }
  // Each loop catches what it throws (c10::Error: e.g. a gradient torch cannot read; nothing
  // may leave an OpenMP region) and reports it as found: the dicts' as not the same, the
  // params' as not read (declined).
  const auto walk_states = [&]() -> bool {
    for (Py_ssize_t i = StateWalk::kFirst; i < n; ++i)
      if (!states.visit(i)) return false;  // (visit catches its own)
    return true;
  };
  const auto walk_params = [&]() {
    try {
      for (Py_ssize_t i = -5 * kLookahead; i < n && f.read; ++i) {  // (warm: 5 links ahead)
        walk->warm(i);
        if (i >= 0) walk->visit(i, f);
      }
    } catch (const std::exception&) {
      f.read = false;
    }
  };
  g_last_split = false;
  if (f.same && may_split(threads, n)) {
#ifdef FASTOPTIM_TORCH_OPENMP
    bool same = true;    // (thread 1's; read after the region's barrier)
    int split_team = 0;  // (thread 0's)
#pragma omp parallel num_threads(2)
    {
      // (a team of one, where the runtime gives no second thread: thread 0 runs both)
      if (omp_get_thread_num() == 0) {
        split_team = omp_get_num_threads();
        walk_params();
      }
      if (omp_get_thread_num() == 1 || omp_get_num_threads() == 1) same = walk_states();
    }
    f.same = same;
    g_last_split = split_team == 2;
#endif
  } else {
    if (f.same) f.same = walk_states();
    walk_params();
  }
  if (!f.read) return declined();
  // (may run Python code: nothing above is read again)
  return walk->result(f, !compare ? Py_None : f.same ? Py_True : Py_False, pack);
}

// data_ptrs(tensors) -> list[int] | None: each tensor's data_ptr(); None when one is not a plain
// tensor or has no storage (torch.py then maps Tensor.data_ptr, which raises as torch does).
PyObject* data_ptrs(PyObject*, PyObject* args) {
  PyObject* tensors;
  if (!PyArg_ParseTuple(args, "O", &tensors)) return nullptr;
  if (!PyList_Check(tensors)) Py_RETURN_NONE;
  const Py_ssize_t n = PyList_GET_SIZE(tensors);
  PyObject* out = PyList_New(n);
  if (!out) return nullptr;
  try {
    for (Py_ssize_t i = 0; i < n; ++i) {
      // (Measured at every item: an allocation may run a collection, and its finalizers
      // Python code that changes the list.)
      if (PyList_GET_SIZE(tensors) == n)
        for (int level = 0; level < 3; ++level)
          warm_param(tensors, i + (3 - level) * kLookahead, level, false);
      PyObject* t = PyList_GET_SIZE(tensors) == n ? PyList_GET_ITEM(tensors, i) : nullptr;
      if (!t || !THPVariable_CheckExact(t) || !THPVariable_Unpack(t).has_storage()) {
        Py_DECREF(out);  // (slots never set are NULL, which list deallocation skips)
        Py_RETURN_NONE;
      }
      PyObject* ptr = pointer(THPVariable_Unpack(t));
      if (!ptr) throw python_error();
      PyList_SET_ITEM(out, i, ptr);
    }
  } catch (...) {
    Py_DECREF(out);
    if (!PyErr_Occurred()) Py_RETURN_NONE;
    return nullptr;
  }
  return out;
}

// same_entries(d, keys, values) -> bool: whether the dict d holds exactly the entries
//   keys[i]: values[i], in that order, by identity: torch.py's `list(d) == keys` and
//   `list(d.values()) == values` compared with `is` (_state_unchanged), for an exact dict or
//   defaultdict (torch.py checks the type: a subclass may iterate otherwise). Reads only the
//   dict's table and the lists' item arrays, never the objects they point to, which the last
//   step's streams have evicted (their reference counts, which list() would write, included).
PyObject* same_entries(PyObject*, PyObject* args) {
  PyObject *d, *keys, *values;
  if (!PyArg_ParseTuple(args, "O!O!O!", &PyDict_Type, &d, &PyList_Type, &keys, &PyList_Type,
                        &values))
    return nullptr;
  const Py_ssize_t n = PyDict_GET_SIZE(d);
  if (PyList_GET_SIZE(keys) != n || PyList_GET_SIZE(values) != n) Py_RETURN_FALSE;
  Py_ssize_t pos = 0, i = 0;
  PyObject *key, *value;  // borrowed; compared as addresses only
  while (PyDict_Next(d, &pos, &key, &value)) {
    if (i >= n || key != PyList_GET_ITEM(keys, i) || value != PyList_GET_ITEM(values, i))
      Py_RETURN_FALSE;
    ++i;
  }
  return PyBool_FromLong(i == n);
}

// last_gather_split() -> bool: whether the last gather ran its loops on two threads.
PyObject* last_gather_split(PyObject*, PyObject*) { return PyBool_FromLong(g_last_split); }

// bump_versions(tensors): torch.autograd.graph.increment_version(tensors) (the autograd
// version counter of each tensor; tensors made under inference_mode have none and are skipped,
// as there). Returns False, having bumped nothing, when one is not a plain tensor, and False
// when torch raises on the way (then torch.py calls increment_version, which raises the same;
// a counter bumped twice is harmless).
PyObject* bump_versions(PyObject*, PyObject* args) {
  PyObject* tensors;
  if (!PyArg_ParseTuple(args, "O", &tensors)) return nullptr;
  if (!PyList_Check(tensors)) Py_RETURN_FALSE;
  const Py_ssize_t n = PyList_GET_SIZE(tensors);
  try {
    for (Py_ssize_t i = 0; i < n; ++i)
      if (!THPVariable_CheckExact(PyList_GET_ITEM(tensors, i))) Py_RETURN_FALSE;
    for (Py_ssize_t i = 0; i < n; ++i) {
      // Note [lookahead prefetch]: the tensors ahead, their TensorImpls and version counters
      // (a VariableVersion is one intrusive_ptr to its counter, c10/core/TensorImpl.h).
      if (i + 3 * kLookahead < n) prefetch(PyList_GET_ITEM(tensors, i + 3 * kLookahead));
      if (i + 2 * kLookahead < n)
        prefetch_impl(THPVariable_Unpack(PyList_GET_ITEM(tensors, i + 2 * kLookahead)).unsafeGetTensorImpl());
      if (i + kLookahead < n) {
        static_assert(sizeof(c10::VariableVersion) == sizeof(void*), "one pointer to the counter");
        const c10::VariableVersion& v =
            THPVariable_Unpack(PyList_GET_ITEM(tensors, i + kLookahead)).unsafeGetTensorImpl()->version_counter();
        __builtin_prefetch(*reinterpret_cast<void* const*>(&v), 1, 3);
      }
      const at::Tensor& t = THPVariable_Unpack(PyList_GET_ITEM(tensors, i));
      if (!t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
    }
  } catch (const std::exception&) {
    Py_RETURN_FALSE;
  }
  Py_RETURN_TRUE;
}

#ifdef FASTOPTIM_TORCH_OPENMP
// Note [outside runner] (src/cpp/runner.h): fastoptim's chunks on torch's OpenMP threads. The
// team is torch's (no num_threads clause, as in at::parallel_for: torch sets each thread's
// OpenMP thread count to its own); its first min(n_threads, n_chunks) threads claim chunks
// from one counter, the calling thread (thread 0) among them. Declines (0) inside a parallel
// region, and when torch has one thread or fewer than fastoptim asks for (then fastoptim's
// pool runs them, with the threads it was told to use).
int omp_runner(int n_threads, int64_t n_chunks, fastoptim::ChunkFn chunk, const void* job) {
  at::internal::lazy_init_num_threads();
  if (omp_in_parallel() || at::in_parallel_region()) return 0;
  const int team = omp_get_max_threads();
  if (team <= 1 || n_threads > team) return 0;
  const int64_t claimers = std::min<int64_t>(n_threads, n_chunks);
  std::atomic<int64_t> next{0};
  std::atomic<int> used{0};
#pragma omp parallel
  {
    if (omp_get_thread_num() < claimers) {
      bool ran = false;
      for (int64_t k; (k = next.fetch_add(1, std::memory_order_relaxed)) < n_chunks; ran = true)
        chunk(job, k);
      if (ran) used.fetch_add(1, std::memory_order_relaxed);
    }
  }
  return used.load(std::memory_order_relaxed);
}
#endif

PyMethodDef kMethods[] = {
    {"gather", gather, METH_VARARGS,
     "Each param's .grad, their pointers when all match, the params' pointers, same_pointers."},
    {"same_pointers", same_pointers, METH_VARARGS,
     "Whether dicts[i][keys[k]].data_ptr() == expected[k][i] for every i and k."},
    {"data_ptrs", data_ptrs, METH_VARARGS, "Each tensor's data_ptr(), or None."},
    {"bump_versions", bump_versions, METH_VARARGS, "Bump each tensor's autograd version."},
    {"same_entries", same_entries, METH_VARARGS,
     "Whether dict d's entries are keys[i]: values[i], in order, by identity."},
    {"last_gather_split", last_gather_split, METH_NOARGS,
     "Whether the last gather ran its two loops on two threads (Note [split walk])."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_torch_ext", nullptr, -1, kMethods,
                       nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__torch_ext() {
  PyObject* m = PyModule_Create(&kModule);
  if (!m) return nullptr;
  if (PyModule_AddStringConstant(m, "TORCH_VERSION", FASTOPTIM_TORCH_VERSION) < 0 ||
      PyModule_AddStringConstant(m, "TORCH_GIT_VERSION", FASTOPTIM_TORCH_GIT_VERSION) < 0 ||
      PyModule_AddIntConstant(m, "CXX11_ABI", _GLIBCXX_USE_CXX11_ABI) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  g_grads_type = reinterpret_cast<PyTypeObject*>(PyType_FromSpec(&kGradsSpec));
  if (!g_grads_type ||
      PyModule_AddObjectRef(m, "Grads", reinterpret_cast<PyObject*>(g_grads_type)) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
#ifdef FASTOPTIM_TORCH_OPENMP
  // Note [outside runner]: what fastoptim.torch hands to _core._set_runner.
  PyObject* runner =
      PyCapsule_New(reinterpret_cast<void*>(&omp_runner), "fastoptim._runner", nullptr);
  if (!runner || PyModule_AddObject(m, "runner", runner) < 0) {
    Py_XDECREF(runner);
    Py_DECREF(m);
    return nullptr;
  }
#endif
  return m;
}
