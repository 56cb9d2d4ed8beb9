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

// A strong reference, released at the end of its scope.
struct Held {
  PyObject* obj;
  ~Held() { Py_DECREF(obj); }
};

PyObject* neither() { return Py_BuildValue("(OO)", Py_None, Py_None); }

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

// same_pointers(dicts, keys, expected) -> bool
//   Whether dicts[i][keys[k]] is a tensor whose data_ptr() is expected[k][i], for every i and
//   k: torch.py's `list(map(data_ptr, map(itemgetter(key), dicts))) == expected[k]` for each
//   key, where a missing key or a non-tensor value is False (torch.py then takes its own
//   path). keys: a tuple of str; expected: a tuple of lists of ints. One pass over the dicts
//   for all keys: each dict is looked up while it is in cache. A lookup may run Python code
//   (a key's __eq__) that changes the lists or drops the dict: each dict is held by a
//   reference while it is looked up, each list is measured again before it is read, each
//   tensor is read before the next lookup, and only exact ints are read (an int subclass's
//   __index__ could run more). Staging the reads to overlap their cache misses (all the
//   lookups, then all the TensorImpls, ...) was tried and measured no faster in the step.
PyObject* same_pointers(PyObject*, PyObject* args) {
  PyObject *dicts, *keys, *expected;
  if (!PyArg_ParseTuple(args, "OO!O!", &dicts, &PyTuple_Type, &keys, &PyTuple_Type, &expected))
    return nullptr;
  const Py_ssize_t n_keys = PyTuple_GET_SIZE(keys);
  if (!PyList_Check(dicts) || PyTuple_GET_SIZE(expected) != n_keys) Py_RETURN_FALSE;
  const Py_ssize_t n = PyList_GET_SIZE(dicts);
  for (Py_ssize_t k = 0; k < n_keys; ++k)
    if (!PyList_Check(PyTuple_GET_ITEM(expected, k))) Py_RETURN_FALSE;
  try {
    for (Py_ssize_t i = 0; i < n; ++i) {
      // (Also measured here: releasing the last dict's reference may have run Python code.)
      if (PyList_GET_SIZE(dicts) != n) Py_RETURN_FALSE;
      PyObject* d = PyList_GET_ITEM(dicts, i);
      if (!PyDict_Check(d)) Py_RETURN_FALSE;
      Py_INCREF(d);
      const Held held{d};
      const bool same = [&] {
        for (Py_ssize_t k = 0; k < n_keys; ++k) {
          PyObject* t = PyDict_GetItemWithError(d, PyTuple_GET_ITEM(keys, k));  // borrowed
          if (!t) return false;  // missing, or an error (raised below)
          PyObject* want_list = PyTuple_GET_ITEM(expected, k);
          if (!is_list_of(want_list, n) || !THPVariable_CheckExact(t)) return false;
          PyObject* want_int = PyList_GET_ITEM(want_list, i);
          if (!PyLong_CheckExact(want_int)) return false;
          const at::Tensor& tensor = THPVariable_Unpack(t);
          if (!tensor.has_storage()) return false;
          void* want = PyLong_AsVoidPtr(want_int);
          if (!want && PyErr_Occurred()) {
            PyErr_Clear();
            return false;
          }
          if (tensor.data_ptr() != want) return false;
        }
        return true;
      }();
      if (PyErr_Occurred()) return nullptr;
      if (!same || PyList_GET_SIZE(dicts) != n) Py_RETURN_FALSE;
    }
  } catch (const python_error&) {
    return nullptr;
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
