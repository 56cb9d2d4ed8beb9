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

#include <cstdint>
#include <vector>

namespace {

// A Python tuple or list of exact ints equal to `values`.
bool same_ints(PyObject* seq, c10::IntArrayRef values) {
  if (!PyTuple_Check(seq) && !PyList_Check(seq)) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  if (n != static_cast<Py_ssize_t>(values.size())) return false;
  PyObject** items = PySequence_Fast_ITEMS(seq);
  for (Py_ssize_t d = 0; d < n; ++d) {
    if (!PyLong_CheckExact(items[d])) return false;  // (a subclass's __index__ runs Python)
    const long long v = PyLong_AsLongLong(items[d]);
    if (v == -1 && PyErr_Occurred()) {
      PyErr_Clear();
      return false;
    }
    if (v != values[d]) return false;
  }
  return true;
}

bool is_list_of(PyObject* obj, Py_ssize_t n) { return PyList_Check(obj) && PyList_GET_SIZE(obj) == n; }

PyObject* pointer(const at::Tensor& t) { return PyLong_FromVoidPtr(t.data_ptr()); }

PyObject* neither() { return Py_BuildValue("(OO)", Py_None, Py_None); }

// Note [lookahead prefetch]
//   Each pass below follows, for every item of a list, a chain of objects: a state dict, its
//   table, a tensor's Python object, its TensorImpl, its StorageImpl (for a param: its
//   autograd metadata, its gradient's TensorImpl, StorageImpl and Python object). The previous
//   step's kernels streamed far more memory than the caches hold, so every link misses, and
//   each miss was waited for before the next link's address was known. So while a pass checks
//   item i, it prefetches the chains of the items ahead, one link per kLookahead items: with
//   L links, the first link of item i + L * kLookahead, the second of the item kLookahead
//   closer, and so on, each read from what the link before brought in. A prefetch never faults and
//   decides nothing: the checks read everything again. grads() may run Python code (wrapping
//   a gradient allocates, and a collection may run finalizers), so warm_param starts each link
//   again from the list and keeps nothing; same_pointers runs no Python code and keeps the
//   values it found (its comment). Measured on 2,000 tensors of 4,096 elements after a cache
//   flush (median of 30, 1 thread): same_pointers 1.56 -> 0.62 ms (the walk of values_of
//   included), grads 0.79 -> 0.49, data_ptrs 0.34 -> 0.17; the whole step, interleaved
//   with the previous build of this file in one process, 0.84-0.93x as long at 1 and 2
//   threads. 2 to 8 items per link measured the same.
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

// grads(params, dtypes, shapes, strides) -> (grads, pointers)
//   grads: each param's .grad (None where it has none); pointers: the gradients' data pointers
//   when EVERY param has a gradient that is a plain torch.Tensor (type exactly torch.Tensor),
//   strided, on the CPU, with dtypes[i], shape shapes[i] and strides strides[i], and neither its
//   negative nor its conjugate bit set: what torch.py's _grads_match asks. Otherwise None.
//   (None, None) when params is not a list of tensors or the other lists do not match it.
PyObject* grads(PyObject*, PyObject* args) {
  PyObject *params, *dtypes, *shapes, *strides;
  if (!PyArg_ParseTuple(args, "OOOO", &params, &dtypes, &shapes, &strides)) return nullptr;
  if (!PyList_Check(params)) return neither();
  const Py_ssize_t n = PyList_GET_SIZE(params);
  if (!is_list_of(dtypes, n) || !is_list_of(shapes, n) || !is_list_of(strides, n)) return neither();
  PyObject* out = PyList_New(n);
  PyObject* ptrs = PyList_New(n);
  if (!out || !ptrs) {
    Py_XDECREF(out);
    Py_XDECREF(ptrs);
    return nullptr;
  }
  const auto lists_fit = [&] {
    return is_list_of(params, n) && is_list_of(dtypes, n) && is_list_of(shapes, n) &&
           is_list_of(strides, n);
  };
  bool match = true;
  try {
    for (Py_ssize_t i = 0; i < n; ++i) {
      // Measured at every item: allocating (the lists above, a wrapped gradient) may run a
      // collection, whose finalizers may run Python code that changes the lists.
      if (!lists_fit()) {
        Py_DECREF(out);
        Py_DECREF(ptrs);
        return neither();
      }
      // Note [lookahead prefetch]
      for (int level = 0; level < 5; ++level)
        warm_param(params, i + (5 - level) * kLookahead, level, true);
      if (i + 5 * kLookahead < n) {  // (lists_fit: the three have n items)
        prefetch(PyList_GET_ITEM(shapes, i + 5 * kLookahead));
        prefetch(PyList_GET_ITEM(strides, i + 5 * kLookahead));
      }
      PyObject* p = PyList_GET_ITEM(params, i);
      if (!THPVariable_CheckExact(p)) {
        Py_DECREF(out);
        Py_DECREF(ptrs);
        return neither();
      }
      // A copy, not a reference into the param's autograd metadata: THPVariable_Wrap may run
      // Python code (a collection) that could replace the param's gradient.
      const at::Tensor g = THPVariable_Unpack(p).grad();
      if (!g.defined()) {
        Py_INCREF(Py_None);
        PyList_SET_ITEM(out, i, Py_None);
        match = false;
        continue;
      }
      PyObject* obj = THPVariable_Wrap(g);
      if (!obj) throw python_error();
      PyList_SET_ITEM(out, i, obj);
      // ... and that code may change the lists themselves: then torch.py's own pass answers.
      if (!lists_fit()) {
        Py_DECREF(out);
        Py_DECREF(ptrs);
        return neither();
      }
      if (!match) continue;
      PyObject* dtype = PyList_GET_ITEM(dtypes, i);
      match = Py_TYPE(obj) == reinterpret_cast<PyTypeObject*>(THPVariableClass) &&
              THPDtype_Check(dtype) &&
              g.scalar_type() == reinterpret_cast<THPDtype*>(dtype)->scalar_type &&
              g.layout() == c10::kStrided && g.device().is_cpu() && !g.is_neg() &&
              !g.is_conj() && g.has_storage() &&
              same_ints(PyList_GET_ITEM(shapes, i), g.sizes()) &&
              same_ints(PyList_GET_ITEM(strides, i), g.strides());
      if (match) {
        PyObject* ptr = pointer(g);
        if (!ptr) throw python_error();
        PyList_SET_ITEM(ptrs, i, ptr);
      }
    }
  } catch (const python_error&) {
    Py_DECREF(out);
    Py_DECREF(ptrs);
    return nullptr;
  } catch (const std::exception&) {  // c10::Error: e.g. a gradient torch cannot read
    Py_DECREF(out);
    Py_DECREF(ptrs);
    return neither();
  }
  if (!match) {
    Py_DECREF(ptrs);  // (slots never set are NULL, which list deallocation skips)
    Py_INCREF(Py_None);
    ptrs = Py_None;
  }
  return Py_BuildValue("(NN)", out, ptrs);
}

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

// same_pointers(dicts, keys, expected) -> bool
//   Whether dicts[i][keys[k]] is a tensor whose data_ptr() is expected[k][i], for every i and
//   k: torch.py's `list(map(data_ptr, map(itemgetter(key), dicts))) == expected[k]` for each
//   key, where a missing key or a non-tensor value is False (torch.py then takes its own
//   path). keys: a tuple of exact str; expected: a tuple of lists of exact ints. False too when
//   a dict is not an exact dict or has a key that is not an exact str (values_of): then
//   nothing here runs Python code (no lookup calls a key's __eq__, only exact ints are read),
//   so no object can change or go away during the call, and the values found for a dict stay
//   valid until its tensors are read, a few dicts later (Note [lookahead prefetch]: each
//   dict's chain is followed kLookahead dicts apart per level: the dict, its table, its values
//   with their expected ints, their TensorImpls, their StorageImpls, then the check).
PyObject* same_pointers(PyObject*, PyObject* args) {
  PyObject *dicts, *keys, *expected;
  if (!PyArg_ParseTuple(args, "OO!O!", &dicts, &PyTuple_Type, &keys, &PyTuple_Type, &expected))
    return nullptr;
  const Py_ssize_t n_keys = PyTuple_GET_SIZE(keys);
  if (!PyList_Check(dicts) || PyTuple_GET_SIZE(expected) != n_keys) Py_RETURN_FALSE;
  const Py_ssize_t n = PyList_GET_SIZE(dicts);
  for (Py_ssize_t k = 0; k < n_keys; ++k)
    if (!PyUnicode_CheckExact(PyTuple_GET_ITEM(keys, k)) ||
        !is_list_of(PyTuple_GET_ITEM(expected, k), n))
      Py_RETURN_FALSE;
  // The values of dicts j - 3 kLookahead .. j, by j modulo kRing.
  constexpr Py_ssize_t kRing = 4 * kLookahead;
  std::vector<PyObject*> ring(static_cast<size_t>(kRing * n_keys));
  const auto values = [&](Py_ssize_t j) { return ring.data() + (j % kRing) * n_keys; };
  const auto each_impl = [&](Py_ssize_t j, auto&& fn) {
    if (j < 0 || j >= n) return;
    for (Py_ssize_t k = 0; k < n_keys; ++k)
      if (const c10::TensorImpl* impl = impl_of(values(j)[k])) fn(impl);
  };
  try {
    for (Py_ssize_t i = -3 * kLookahead; i < n; ++i) {
      if (const Py_ssize_t j = i + 5 * kLookahead; j >= 0 && j < n) prefetch(PyList_GET_ITEM(dicts, j));
      if (const Py_ssize_t j = i + 4 * kLookahead; j >= 0 && j < n) {
        PyObject* d = PyList_GET_ITEM(dicts, j);
        if (PyDict_CheckExact(d)) {
          const auto* o = reinterpret_cast<const PyDictObject*>(d);
          prefetch(o->ma_keys);
          prefetch(reinterpret_cast<const char*>(o->ma_keys) + 64);
          if (o->ma_values) prefetch(o->ma_values);
        }
      }
      if (const Py_ssize_t j = i + 3 * kLookahead; j >= 0 && j < n) {
        PyObject* d = PyList_GET_ITEM(dicts, j);
        if (!PyDict_CheckExact(d) || !values_of(d, keys, values(j))) Py_RETURN_FALSE;
        for (Py_ssize_t k = 0; k < n_keys; ++k) {
          prefetch(values(j)[k]);
          prefetch(PyList_GET_ITEM(PyTuple_GET_ITEM(expected, k), j));
        }
      }
      each_impl(i + 2 * kLookahead, prefetch_impl);
      each_impl(i + kLookahead, prefetch_storage);
      if (i < 0) continue;
      for (Py_ssize_t k = 0; k < n_keys; ++k) {
        PyObject* t = values(i)[k];
        PyObject* want_int = PyList_GET_ITEM(PyTuple_GET_ITEM(expected, k), i);
        if (!THPVariable_CheckExact(t) || !PyLong_CheckExact(want_int)) Py_RETURN_FALSE;
        const at::Tensor& tensor = THPVariable_Unpack(t);
        if (!tensor.has_storage()) Py_RETURN_FALSE;
        void* want = PyLong_AsVoidPtr(want_int);
        if (!want && PyErr_Occurred()) {
          PyErr_Clear();
          Py_RETURN_FALSE;
        }
        if (tensor.data_ptr() != want) Py_RETURN_FALSE;
      }
    }
  } catch (const std::exception&) {
    Py_RETURN_FALSE;
  }
  Py_RETURN_TRUE;
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

PyMethodDef kMethods[] = {
    {"grads", grads, METH_VARARGS, "Each param's .grad and, when all match, their pointers."},
    {"same_pointers", same_pointers, METH_VARARGS,
     "Whether dicts[i][keys[k]].data_ptr() == expected[k][i] for every i and k."},
    {"data_ptrs", data_ptrs, METH_VARARGS, "Each tensor's data_ptr(), or None."},
    {"bump_versions", bump_versions, METH_VARARGS, "Bump each tensor's autograd version."},
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
  return m;
}
