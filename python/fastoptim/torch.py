"""torch.optim drop-ins backed by fastoptim's fused kernels (CPU tensors; CUDA tensors where
fastoptim is built with CUDA).

``fastoptim.torch.SGD``, ``RMSprop``, ``Adam``, ``AdamW``, ``Adagrad``, ``Adadelta``, ``NAdam``,
``RAdam``, ``Adamax``, ``ASGD`` and ``Rprop`` are
``torch.optim.Optimizer`` subclasses with torch 2.13's constructor arguments, defaults, param
groups, ``zero_grad``, closures, hooks and ``state_dict`` layout (state keys ``step``,
``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, ``momentum_buffer``, ``square_avg``,
``grad_avg``, ``sum``, ``acc_delta``, ``exp_inf``, ``ax``, ``prev``, ``step_size`` and the 0-d
``mu_product``, ``eta``, ``mu``: Note [Scalar states]), so checkpoints move both ways between
``torch.optim.X`` and ``fastoptim.torch.X`` and learning-rate schedulers work unchanged. Each
``step()`` makes ONE fused call per (param group, dtype, device), on the tensors' memory
(Note [pointer path]); CUDA tensors go to the CUDA kernels through DLPack.
``import fastoptim`` never imports torch; this module does. Four keyword options on every
drop-in, ``master_weights``, ``stochastic_rounding`` (with ``sr_seed``) and ``state_dtype``,
choose how params and states are stored (Note [Storage options]).

Note [Views are cached]
    Building a NumPy view costs about a microsecond, so the views of parameters and states are
    built once and kept per param group, with the ``data_ptr()`` of every tensor they view.
    Each step compares those pointers with the current ones (one C-level pass over the params,
    and one per state name over the state dicts, with no tuple per param): a parameter whose
    memory moved (``p.data = ...``, ``share_memory_()``, ZeRO bucket views) or a state tensor
    that was replaced or moved (``load_state_dict``, ZeroRedundancyOptimizer writing
    ``optim.state[p]``, ``state[...].data = ...``, ``share_memory_()``, a hand edit) is
    re-viewed before use. No cheaper signal exists: ``.data =`` and ``share_memory_()`` keep
    the Python object and its version counter and change only the memory, so every pointer is
    read every step. Gradients are viewed afresh every step: ``zero_grad()`` replaces them,
    unless the pointer path takes them (below).

Note [Step store moves]
    The step counts of a group are views of one tensor (Note [Steps live in one tensor per
    group]), which the step reads and writes through a NumPy view. ``share_memory_()`` or a
    growing ``resize_()`` on any ``state[p]["step"]`` moves that tensor's memory and frees the
    old one, under the NumPy view. So each step first compares the tensor's ``data_ptr()`` with
    the view's, and views it again when they differ (the scalar states of NAdam and ASGD
    likewise, ``_ScalarStore.refresh``); every param is then rebound, since its ``step`` view
    moved too.

Note [pointer path]
    Building a gradient's NumPy view costs 0.5-1 us, per gradient per step. When a whole group
    steps in one call and every gradient is a plain dense CPU tensor with its parameter's dtype,
    shape and strides (compared as lists of metadata), the call passes data pointers instead:
    ``_core._pointers(rule, args)`` (src/cpp/bindings.cpp) takes the same arguments as
    ``_core.<rule>`` with lists of pointers for the arrays, and checks the counts, the pointers
    and that nothing it writes overlaps anything else of the call before it writes. The
    parameters' and states' pointers are the cached ones (Note [Views are cached]). ``_P`` holds
    :mod:`fastoptim.functional`'s own update functions bound to those entries, so both paths
    pass the same arguments in the same order. Any other gradient (a subclass, another dtype or
    layout, a negative view) takes the NumPy path, which checks it and names the param. This
    object holds the tensors while the kernel runs without the GIL.
    What it saves is smaller than the view: each tensor a step touches from Python (a
    parameter's pointer and ``.grad``, a state's pointer, a gradient's class, dtype, shape,
    device, strides, negative bit and pointer, the version counter) costs 40-100 ns in torch's
    Python bindings even when cached, and as much again in cache misses: the previous update
    streamed through far more memory than the caches hold. The misses on the params, states and
    state dicts, whose addresses do not change from step to step, are overlapped by prefetching
    those addresses at the start of the step (Note [prefetch hints] in src/cpp/bindings.cpp;
    ``_GroupCache.prefetch``, built once the same tensors have stepped a few times). Those reads
    are what fastoptim._torch_ext does in C++ where it is built (Note [torch extension]).

Note [torch extension]
    ``fastoptim._torch_ext`` (src/torch/torch_ext.cpp) is built against the headers and
    libraries of the torch that the installing Python has (src/torch/torch.cmake) and loaded
    (``_X``) only under that very torch version, unless ``FASTOPTIM_TORCH_EXT=0``. It reads
    tensors' metadata from torch's C++ objects instead of through torch's Python bindings. In
    ``_gather``, one call over a group (``gather``, Note [one walk] in the C++) returns the
    gradients, their pointers when every one matches its param's cached dtype, shape and strides
    and is a plain dense CPU tensor (what ``_grads_match`` checks), the params' data pointers
    (for ``_cache``) and whether every state key's tensor is the bound one (for
    ``_check_bound``, which then compares nothing). After the kernel, ``bump_versions`` stands
    in for ``increment_version``. Where that call could not be made (a rebuilt cache, a param
    bound anew), ``data_ptrs`` and ``same_pointers`` answer the one question. Each answers
    exactly what the Python pass answers, or declines (None or False: a non-tensor, a missing
    key, a mismatch), and the Python pass then runs and finds and names the problem as before.
    It reads only plain tensors (``torch.Tensor`` and ``nn.Parameter``) and is not called while
    a TorchFunctionMode is active (``_ext()``): a subclass or a mode may override ``.grad`` or
    ``data_ptr()`` in Python, which torch's bindings honour and C++ reads would not;
    tests/test_torch_ext.py compares them on a zoo of tensors, and the pointer path's tests run
    with and without it. The gradients come back as a ``Grads`` (Note [gradients held]): a
    sequence that holds them while the kernel runs without the GIL and wraps one as a Python
    object only when it is read, which the pointer path never does. Its two loops may run on
    two of torch's threads (Note [split walk]), and ``same_entries`` compares ``self.state``
    with the last step's snapshot (``_state_unchanged``). A dict lookup (a key's ``__eq__``) or
    an allocation (a collection) may run Python code that changes the lists it was given or
    drops a state dict: it walks each dict's entries instead of looking keys up (declining a
    dict with a key that is not an exact str), reads only exact ints, and allocates only once
    everything is read, so it never reads a freed object (tests/test_torch_ext.py runs such
    cases with ``PYTHONMALLOC=debug``). What it saves and what remains (cache misses on
    torch's objects, which every step must read since any of them may have changed):
    docs/torch.md, Performance.

Note [A param's layout changed under its cache]
    A group's cache is re-made when a param's data pointer changes (Note [Views are cached]),
    which is all a step reads of the params. ``p.data = p.data[:4]`` or ``.view(2, 4)`` keeps
    the pointer and changes the shape, and the gradient then disagrees with the cached views.
    Reading every param's shape and strides every step in Python would cost much of what the
    pointer path saves, so the step compares them only when something was refused: each cache
    that no longer matches its params is dropped and the step runs once more from the start
    (nothing has been written: every check precedes the first write). A gradient computed
    BEFORE the change agrees with the cache, though, and the step would write the old extent:
    ``_torch_ext.gather`` (which reads each param anyway) compares the params' shapes with the
    cache's and returns no param pointers on a difference, and the caches are then checked and
    dropped before the step goes on. Without the extension that case is not caught. A refusal that fresh caches do not
    cure is raised, e.g. a state whose shape no longer matches its param (torch.optim refuses
    that too).

Note [DTensor and FSDP2]
    ``fully_shard`` (FSDP2) and tensor parallelism hand the optimizer DTensor parameters and
    gradients. The update is elementwise, so each rank updates its local shard
    (``DTensor._local_tensor``, what ``to_local()`` returns, without its 15 us of autograd
    bookkeeping): the views, pointers and checks of a group with a DTensor use the local
    tensors. A DTensor param's states are created as torch creates them,
    ``torch.zeros_like(param)``: DTensors with the param's mesh and placements, so
    ``state_dict()`` and distributed checkpointing see torch's layout; the kernel writes their
    local shards. (Plain CPU params of 1 MiB or more get placed states instead: Note [state
    placement], _placement.py.) ``step`` stays a plain 0-d tensor, as
    in torch.

Note [Steps live in one tensor per group]
    torch keeps ``state[p]["step"]`` as a 0-d float32 tensor per parameter and adds 1 to each
    (about 3 us per tensor on the CPU). Here each group owns one 1-D step tensor and
    ``state[p]["step"]`` is a 0-d view of its element: a real tensor in torch's dtype that
    ``state_dict``, ``torch.save`` and ``torch.optim`` read and write as usual, while a step
    advances every parameter that had a gradient with one NumPy operation. A step tensor from a
    checkpoint is copied into the group's tensor when it is first used.

Note [All or nothing]
    A step checks everything before the first kernel call: every parameter that has a gradient
    (float32 or float64, CPU and contiguous or dense in another order such as channels_last, or
    CUDA and contiguous), every gradient (dense, the parameter's device, dtype, shape and
    layout), every group's
    hyperparameters (the kernel's own checks, run on empty lists whenever they change) and the
    step counts the kernels will get (a checkpoint may hold a negative one). The kernels check
    memory overlaps within their own call only, so when the step makes several calls it also
    checks, across all of them, that no gradient shares memory with a parameter, state or step
    count that the step writes, and that none of those overlap each other: the byte spans of
    what the step writes are kept sorted (and cached while the same tensors step), so each
    gradient costs one data_ptr() and one binary search. When the step is ONE kernel call,
    that call's own checks, which run before it writes, stand in for these Python checks, and
    a failure is diagnosed again to name the parameter. A bad input raises
    ``TypeError``/``ValueError`` naming ``param_groups[g]['params'][i]`` and leaves params,
    states and steps as they were. Steps advance, and the params' autograd version counters
    are bumped, after the kernels ran.

Note [torch-only flags]
    ``foreach``, ``fused``, ``capturable`` and ``differentiable`` choose torch implementations;
    fastoptim has one (fused, CPU, outside autograd). ``foreach`` and ``fused`` (wherever torch
    accepts them) take any value and change nothing: the update is always one fused call per
    (param group, dtype). The combinations torch itself rejects still raise torch's errors
    (``fused`` with ``foreach`` or ``differentiable``: RuntimeError; a Tensor ``lr`` or beta with
    ``foreach=True``: ValueError). ``capturable=True`` and ``differentiable=True`` are a
    ``ValueError``: fastoptim cannot do what they ask. All four keys stay in ``param_groups``
    as given, so a ``state_dict`` has torch's layout; values loaded from a torch checkpoint are
    kept for the round trip and ignored, except ``differentiable=True``, which ``step`` refuses.

Note [AMP]
    The drop-ins set ``_step_supports_amp_scaling``, as torch's fused optimizers do, so
    ``torch.amp.GradScaler.step`` does not unscale the gradients itself: it sets
    ``optimizer.grad_scale`` and ``optimizer.found_inf`` and calls ``step()``. A nonzero (or
    NaN) ``found_inf`` skips the step entirely: params, states and step counts stay as they are
    (torch fused increments its steps and takes the increment back). Otherwise the kernels
    divide every gradient by ``grad_scale`` as they load it (a multiplication by
    ``float32(1/grad_scale)``, exact for GradScaler's powers of two), in the same single pass;
    the gradients in memory stay scaled (torch's fused CPU kernels write the unscaled ones
    back; code that reads .grad after the step must unscale it itself).

Note [SGD's first momentum step]
    torch creates ``momentum_buffer`` from the first (decayed, sign-adjusted) gradient. The
    kernel does the same when it is called with ``step=1``: a parameter without a buffer gets a
    fresh buffer and ``step=1``, the others ``step=2``, in separate calls when they are mixed.
    The new buffer enters ``state`` only after its kernel call has run.
"""

from __future__ import annotations

import collections
import itertools
import math
import operator
import os
import sys
import types
import weakref
from bisect import bisect_left
from collections.abc import Callable, Iterable
from itertools import chain, compress, repeat
from types import SimpleNamespace
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.autograd.graph import increment_version

from . import _core, _placement
from . import functional as F
from .optim import Optimizer as _NumPyOptimizer
from .optim import _check_state_dtype, _non_negative_names
from .quant import MIN_QUANTIZED_SIZE, QuantizedState

__all__ = ["SGD", "RMSprop", "Adam", "AdamW", "Adagrad", "Adadelta", "NAdam", "RAdam", "Adamax",
           "ASGD", "Rprop", "Lion", "dequantized_state_dict"]

_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _np(t: torch.Tensor) -> np.ndarray:
    """A NumPy view of a CPU tensor; bfloat16 as ml_dtypes.bfloat16 (NumPy has none)."""
    if t.dtype == torch.bfloat16:
        import ml_dtypes
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()
_grad_of = operator.attrgetter("grad")
_stride = torch.Tensor.stride
_is_neg = torch.Tensor.is_neg
# What a gradient must share with its parameter for the pointer path (Note [pointer path]):
# class, dtype, shape, device, strides and no negative bit. (The layout needs no check:
# stride() raises for a sparse or other non-strided tensor.)
_dtype = operator.attrgetter("dtype")
_shape = operator.attrgetter("shape")
_is_cpu = operator.attrgetter("is_cpu")
_data_ptr = torch.Tensor.data_ptr
_untyped_storage = torch.Tensor.untyped_storage
_to_numpy = torch.Tensor.numpy
# What a gradient's view must share with its parameter's view: class, dtype, shape, strides.
_view_meta = operator.attrgetter("__class__", "dtype", "shape", "strides")


def _meta(view: Any) -> tuple[Any, ...]:
    """A view's class, dtype, shape and layout: a NumPy view, or a CUDA tensor (which the
    kernels take through DLPack)."""
    if isinstance(view, np.ndarray):
        return _view_meta(view)
    return (view.__class__, view.dtype, view.shape, view.stride(), view.device)


def _contiguous(view: Any) -> bool:
    return bool(view.flags.c_contiguous if isinstance(view, np.ndarray) else view.is_contiguous())


def _param_view(p: torch.Tensor) -> Any:
    """What the kernels update for parameter p: a NumPy view, or the CUDA tensor itself."""
    if p.is_cuda:
        if p.is_neg():
            raise RuntimeError("its negative bit is set")
        return p.detach()
    return _np(p.detach())


_CUDA: list[bool] = []


def _cuda_ready() -> bool:
    """Whether fastoptim was built with CUDA and sees a device (looked up once)."""
    if not _CUDA:
        info = _core.info()["cuda"]
        _CUDA.append(bool(info["built"]) and info["device_count"] > 0)
    return _CUDA[0]



def _entry(entry: Callable[..., None], rule: str) -> Callable[..., None]:
    return lambda *args, **options: entry(rule, args, **options)


def _pointer_functional() -> Any:
    """fastoptim.functional's updates calling ``_core._pointers(rule, args)`` (Note [pointer
    path]): the same function bodies, so the same positional arguments in the same order, with
    ``_core`` bound to the pointer entries. None when the compiled module predates them."""
    entry = getattr(_core, "_pointers", None)
    if entry is None:
        return None
    core = SimpleNamespace(**{name: _entry(entry, name) for name in _core.rules})
    env = dict(vars(F), _core=core)
    updates = {}
    for name in F.__all__:
        f = getattr(F, name)
        if "_core" not in f.__code__.co_names:
            continue
        g = types.FunctionType(f.__code__, env, name, f.__defaults__, f.__closure__)
        g.__kwdefaults__ = f.__kwdefaults__
        updates[name] = g
    return SimpleNamespace(**updates)


_P = _pointer_functional()


def _torch_extension() -> Any:
    """fastoptim._torch_ext (Note [torch extension]) when it was built against this very torch
    (version, commit and C++ ABI) and ``FASTOPTIM_TORCH_EXT`` is not ``0``; else None, and the
    step reads the same metadata through torch's Python bindings."""
    import os
    if os.environ.get("FASTOPTIM_TORCH_EXT", "1") == "0":
        return None
    try:
        from . import _torch_ext
    except ImportError:
        return None
    same = (_torch_ext.TORCH_VERSION == torch.__version__
            and _torch_ext.TORCH_GIT_VERSION == str(torch.version.git_version)
            and _torch_ext.CXX11_ABI == int(torch._C._GLIBCXX_USE_CXX11_ABI))
    return _torch_ext if same else None


_X = _torch_extension()
# Note [outside runner] (src/cpp/runner.h): updates on torch's OpenMP threads, unless
# FASTOPTIM_TORCH_OPENMP=0.
if (_X is not None and getattr(_X, "runner", None) is not None and hasattr(_core, "_set_runner")
        and os.environ.get("FASTOPTIM_TORCH_OPENMP", "1") != "0"):
    _core._set_runner(_X.runner)
_function_mode = torch._C._is_torch_function_mode_enabled


def _ext() -> Any:
    """``_X``, except while a TorchFunctionMode is active: a mode may override what torch's
    Python bindings return (``.grad``, ``data_ptr()``), which C++ reads would bypass."""
    return None if _X is None or _function_mode() else _X


# Note [prefetch hints] (src/cpp/bindings.cpp); None when the compiled module predates it.
_PREFETCH: Callable[[np.ndarray], None] | None = getattr(_core, "_prefetch", None)
#: steps a group's tensors must have stepped unchanged before their addresses are gathered
_PREFETCH_AFTER = 3

# Note [torch.compile]
#     Dynamo cannot trace a step (NumPy, the compiled kernels, the caches), and a graph break
#     there would warn in every compiled training step. So, while torch.compile traces,
#     ``step()`` collects the params that have gradients and emits one custom op,
#     ``fastoptim::optimizer_step_(key, where, params, grads)``, which declares that it mutates
#     the params; ``key`` names the optimizer (a weak registry) and ``where`` each param's
#     (group, index). At run time the op runs the ordinary step with the gradients it was given
#     (not ``.grad``, which a compiled graph may not have written back yet), so hyperparameters
#     are read when the op runs: a scheduler's new ``lr`` causes no recompilation. Should the
#     compiler hand the op copies of the params instead of the params (functionalization
#     without reinplacing), the updated values are copied into them, so that the graph's
#     copy-back writes the same values.
_LIVE: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
_KEYS = itertools.count(1)


def _register(opt: Any) -> int:
    key = next(_KEYS)
    _LIVE[key] = opt
    return key


def _optimizer_step(key: int, where: list[int], params: list[torch.Tensor],
                    grads: list[torch.Tensor]) -> None:
    opt = _LIVE.get(key)
    if opt is None:
        raise RuntimeError("fastoptim.torch: the optimizer of this compiled step no longer "
                           "exists")
    groups = opt.param_groups
    by_group: dict[int, list[Any]] = {gi: [None] * len(g["params"]) for gi, g in enumerate(groups)}
    for k, g in enumerate(grads):
        by_group[where[2 * k]][where[2 * k + 1]] = g
    opt._step(by_group)
    with torch.no_grad():
        for k, q in enumerate(params):
            p = groups[where[2 * k]]["params"][where[2 * k + 1]]
            if q is not p and _local_ptr(q) != _local_ptr(p):
                q.copy_(p)


try:
    _optimizer_step_op = torch.library.custom_op(
        "fastoptim::optimizer_step_", _optimizer_step, mutates_args=("params",))
    _optimizer_step_op.register_fake(lambda key, where, params, grads: None)
except RuntimeError:  # this module imported a second time (importlib.reload)
    pass

_REFUSED = {
    "capturable": "fastoptim's CUDA launch takes its step counts from the host, so it cannot "
                  "be captured in a CUDA graph",
    "differentiable": "the fused kernels update tensors in place, outside autograd",
}


def _dtensor_class() -> type | None:
    # A DTensor exists only once its module is imported, so this never imports it.
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def _local(t: Any) -> Any:
    """A DTensor's local shard (Note [DTensor and FSDP2]); any other object as it is."""
    dtensor = _dtensor_class()
    return t._local_tensor if dtensor is not None and isinstance(t, dtensor) else t


def _local_ptr(t: torch.Tensor) -> int:
    return int(_local(t).data_ptr())


def _check_flags(cls: str, *, foreach: Any = None, fused: Any = None, capturable: Any = False,
                 differentiable: Any = False) -> None:
    """torch's own checks of its implementation flags, then fastoptim's refusals
    (Note [torch-only flags])."""
    if fused:
        if differentiable:
            raise RuntimeError("`fused` does not support `differentiable`")
        if foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    for name, value in (("capturable", capturable), ("differentiable", differentiable)):
        if value:
            raise ValueError(f"{cls}: {name}={value!r} is not supported ({_REFUSED[name]}); "
                             f"leave it at its default")


def _scalar(value: Any) -> Any:
    """A hyperparameter as a Python number (torch allows 1-element tensors for lr and betas)."""
    return value.item() if isinstance(value, torch.Tensor) else value


def _placeable(p: torch.Tensor, nbytes: int) -> bool:
    """Whether a state of nbytes for param p is placed (Note [state placement]): p a plain
    contiguous CPU tensor and the state at least _placement.MIN_BYTES."""
    return (type(p) in (torch.Tensor, torch.nn.Parameter) and p.device.type == "cpu"
            and p.layout == torch.strided and nbytes >= _placement.MIN_BYTES
            and p.is_contiguous())


def _state_like(p: torch.Tensor, name: str, fill: float = 0.0,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """A state tensor for param p, as ``torch.full_like(p, fill, dtype=dtype,
    memory_format=torch.preserve_format)`` makes it, placed off the param's page offset (Note
    [state placement], _placement.py) when p is a plain contiguous CPU tensor of at least
    _placement.MIN_BYTES; a view of a buffer one page larger then."""
    dtype = p.dtype if dtype is None else dtype
    nbytes = p.numel() * dtype.itemsize
    if _placeable(p, nbytes):
        buf = torch.empty(nbytes + _placement.PAGE, dtype=torch.uint8, device=p.device)
        off = _placement.offset(p.data_ptr(), buf.data_ptr(), dtype.itemsize,
                                _placement.slot_of(name))
        if off is not None:
            # p's own strides, as preserve_format keeps them (a contiguous tensor's size-1
            # dimensions may have any stride, e.g. a channels_last 1x1 convolution's weight)
            return (buf[off:off + nbytes].view(dtype).as_strided(p.shape, p.stride())
                    .fill_(fill))
    return torch.full_like(p, fill, dtype=dtype, memory_format=torch.preserve_format)


def _scalar_dtype() -> torch.dtype:
    # torch's _get_scalar_dtype() for non-fused optimizers: the dtype of state["step"].
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _is_dense(t: torch.Tensor) -> bool:
    """Whether t's elements fill one gap-free block of memory, in some dimension order."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _flat(view: np.ndarray) -> np.ndarray:
    # A dense array with non-negative strides starts at its lowest address, so its memory is the
    # 1-D array of its size from there, in memory order: the same order for a parameter, its
    # gradient and its states, which share one layout.
    return np.lib.stride_tricks.as_strided(view, shape=(view.size,), strides=(view.itemsize,))


def _problem(t: torch.Tensor) -> tuple[type[Exception], str] | None:
    """Why fastoptim cannot use this tensor (exception type, text), or None."""
    if t.layout is not torch.strided:
        what = "sparse" if t.is_sparse else str(t.layout).replace("torch.", "")
        return TypeError, f"is {what}; fastoptim supports dense (strided) tensors only"
    if t.device.type == "cuda":
        if not _cuda_ready():
            return ValueError, (f"is on {t.device}, but this fastoptim was built without CUDA "
                                f"or sees no CUDA device (docs/cuda.md); use CPU tensors or "
                                f"torch.optim")
        if t.dtype in _SUPPORTED_DTYPES and not t.is_contiguous():
            return ValueError, (f"is not contiguous (shape {tuple(t.shape)}, strides "
                                f"{t.stride()}); fastoptim needs contiguous CUDA tensors")
    elif t.device.type != "cpu":
        return ValueError, (f"is on {t.device}: fastoptim.torch has no {t.device.type.upper()} "
                            f"backend (CPU tensors, and CUDA tensors where fastoptim is built "
                            f"with CUDA)")
    if t.is_complex():
        return TypeError, (f"is complex ({t.dtype}); fastoptim supports float32, float64, "
                           f"bfloat16 and float16")
    if t.dtype not in _SUPPORTED_DTYPES:
        return TypeError, (f"has dtype {t.dtype}; fastoptim.torch supports float32, float64, "
                           f"bfloat16 and float16")
    if not (t.is_contiguous() or _is_dense(t)):
        return ValueError, (f"is not contiguous (shape {tuple(t.shape)}, strides {t.stride()}); "
                            f"fastoptim needs contiguous tensors (or dense ones such as "
                            f"channels_last)")
    if _no_memory(t):
        return ValueError, _NO_MEMORY
    return None


_NO_MEMORY = ("has no memory for its elements (its storage was freed or resized, as FSDP does "
              "between steps)")


def _no_memory(t: torch.Tensor) -> bool:
    """Whether a dense tensor's storage is smaller than its elements need: resized to 0 (FSDP
    frees a param's storage between steps) or shrunk. Its data pointer is then null or names
    too little memory, and its NumPy view is a buffer NumPy made (the update would be lost)."""
    return bool(t.numel()) and t.device.type != "meta" and (
        t.untyped_storage().nbytes() < (t.storage_offset() + t.numel()) * t.element_size())


def _same_sharding(t: Any, p: torch.Tensor) -> bool:
    """Whether state t is sharded as parameter p is (both plain tensors, or both DTensors with
    one global shape, mesh and placements)."""
    dtensor = _dtensor_class()
    if dtensor is None or not (isinstance(t, dtensor) or isinstance(p, dtensor)):
        return True
    return (isinstance(t, dtensor) and isinstance(p, dtensor) and t.shape == p.shape
            and t.device_mesh == p.device_mesh and t.placements == p.placements)


def _same_layout(t: Any, p: torch.Tensor) -> bool:
    """Whether a state tensor can be used as it is for parameter p."""
    return (isinstance(t, torch.Tensor) and t.layout is torch.strided and t.device == p.device
            and t.dtype == p.dtype and t.shape == p.shape and t.stride() == p.stride()
            and not t.requires_grad and not t.is_neg() and not t.is_conj())


class _GroupCache:
    """The NumPy views of one param group (Note [Views are cached])."""

    __slots__ = ("group", "names", "ptrs", "packed_ptrs", "dtensor", "locals", "grad_types",
                 "grad_dtypes", "shapes", "strides",
                 "numels", "fmt", "views", "metas", "errors", "flat", "dtypes", "kinds",
                 "one_dtype", "dicts", "gen", "svs", "bound", "pending", "store", "store_np",
                 "store_ptr", "full", "nbytes", "spans", "prefetch", "reused")

    def __init__(self, group: dict[str, Any], names: tuple[str, ...], ptrs: list[int],
                 with_step: bool) -> None:
        params = group["params"]
        n = len(params)
        dtensor = _dtensor_class()
        #: whether a param is a DTensor: then the update runs on the local shards
        self.dtensor = dtensor is not None and any(isinstance(p, dtensor) for p in params)
        #: the tensors the kernel updates: the params, or their local shards
        self.locals = list(map(_local, params)) if self.dtensor else params
        self.group = group
        self.names = names
        self.ptrs = list(map(_data_ptr, self.locals)) if self.dtensor else ptrs
        self.packed_ptrs = _pack(self.ptrs)
        self.views: list[np.ndarray | None] = [None] * n
        self.metas: list[tuple[Any, ...] | None] = [None] * n
        self.errors: list[tuple[type[Exception], str] | None] = [None] * n
        self.flat: set[int] = set()
        self.dtypes: list[Any] = [None] * n
        #: (dtype, device): the params of one kernel call share both
        self.kinds: list[Any] = [None] * n
        self.nbytes: list[int] = [0] * n
        for i, p in enumerate(self.locals):
            self.errors[i] = _problem(p)
            if self.errors[i] is not None:
                continue
            try:
                view = _param_view(p)
            except RuntimeError as err:  # e.g. a parameter with its negative bit set
                self.errors[i] = (ValueError, f"cannot be viewed as a NumPy array ({err})")
                continue
            self.metas[i] = _meta(view)
            self.dtypes[i] = view.dtype
            self.kinds[i] = (view.dtype, p.device)
            self.nbytes[i] = view.nbytes
            if not _contiguous(view):
                self.flat.add(i)
                view = _flat(view)
            self.views[i] = view
        self.one_dtype = len(set(self.kinds)) == 1
        #: what each gradient must match for the pointer path (Note [pointer path])
        self.grad_types = [torch.Tensor] * n
        self.grad_dtypes = [p.dtype for p in self.locals]
        self.shapes = list(map(_shape, self.locals))
        self.strides = list(map(_stride, self.locals))
        self.numels = list(map(torch.Tensor.numel, self.locals))
        self.fmt = str(self.dtypes[0]) if self.one_dtype and n else ""
        #: per param: its ``state`` dict as last looked up, valid while ``gen`` is the
        #: optimizer's (Note [Views are cached]).
        self.dicts: list[dict[str, Any] | None] = [None] * n
        self.gen = -1
        #: per param: its state views in ``names`` order, and the data_ptr()s of the state
        #: tensors they view (``names`` then ``step``); None while unbound.
        self.svs: list[tuple[np.ndarray, ...] | None] = [None] * n
        self.bound: list[tuple[int, ...] | None] = [None] * n
        #: SGD momentum buffers made for this step; they enter ``state`` after the kernel ran.
        self.pending: dict[int, torch.Tensor] = {}
        self.store = torch.zeros(n, dtype=_scalar_dtype()) if with_step else None
        self.store_np = self.store.numpy() if with_step else None
        #: where ``store_np`` views ``store`` (Note [Step store moves])
        self.store_ptr = self.store.data_ptr() if with_step else 0
        #: every param's views and pointers, once all are bound (``_complete``).
        self.full: _Full | None = None
        #: the addresses of the objects a step reads, for ``_core._prefetch`` (Note [prefetch
        #: hints]); None until ``full`` has served ``_PREFETCH_AFTER`` steps unchanged (gathering
        #: them costs about 1 us per tensor), and after it changes.
        self.prefetch: tuple[np.ndarray, list[np.ndarray]] | None = None
        #: how many steps in a row ``full`` has served unchanged
        self.reused = 0
        #: per param: the byte spans [lo, hi) it and its bound states occupy, with what they
        #: are; None until needed and after any (re)binding (Note [All or nothing]).
        self.spans: list[list[tuple[int, int, str | None]]] | None = None


class _Full(NamedTuple):
    """A group's arrays once every param's state is bound."""

    views: list[np.ndarray]  #: the params' views
    states: dict[str, list[np.ndarray]]  #: name -> the states' views
    by_key: list[list[int]]  #: per state key (``_getter``'s order): the bound pointers
    pby_key: tuple[bytes, ...]  #: the same, packed (Note [packed pointers] in bindings.cpp)
    #: the params for the pointer path: (dtype name, element counts, pointers), packed
    pointers: tuple[str, bytes, bytes]
    pstates: dict[str, bytes]  #: name -> the states' pointers, packed


def _complete(c: _GroupCache, keys: int) -> _Full:
    """The group's full-call arrays (``keys``: how many state tensors each param has bound,
    0 when its states have not been bound)."""
    if c.full is None:
        names = c.names
        by_key = [[b[k] for b in c.bound] for k in range(keys)]
        c.full = _Full(
            c.views, {name: [sv[k] for sv in c.svs] for k, name in enumerate(names)},
            by_key, tuple(map(_pack, by_key)), (c.fmt, _pack(c.numels), c.packed_ptrs),
            {name: _pack([b[k] for b in c.bound]) for k, name in enumerate(names)})
    return c.full


def _grad_ptrs(item: _Gathered) -> Iterable[int]:
    """The gradients' data pointers, in ``item.grads``' order: the ones gather read when it has
    them (every gradient then; no gradient wrapped, Note [gradients held])."""
    if type(item.gptrs) is bytes:
        return _unpack(item.gptrs)
    return item.gptrs if item.gptrs is not None else map(_data_ptr, item.grads)


def _pack(values: list[int]) -> bytes:
    """Ints >= 0 (pointers, element counts) as native 64-bit values (Note [packed pointers] in
    src/cpp/bindings.cpp)."""
    return np.array(values, dtype=np.uint64).tobytes()


def _unpack(packed: bytes) -> list[int]:
    return np.frombuffer(packed, dtype=np.uint64).tolist()


class _Gathered:
    """One group's part of a step: its params with gradients, and the gradients' views once
    a call needs them."""

    __slots__ = ("gi", "group", "cache", "idx", "grads", "views", "hyper", "checked", "gptrs",
                 "same")

    def __init__(self, gi: int, group: dict[str, Any], cache: _GroupCache, idx: range | list[int],
                 grads: list[Any], hyper: dict[str, Any]) -> None:
        self.gi = gi
        self.group = group
        self.cache = cache
        self.idx = idx
        self.grads = grads
        self.views: list[np.ndarray] | None = None
        self.hyper = hyper
        self.checked = False
        #: the gradients' data pointers when _torch_ext found them all matching their params
        #: (Note [torch extension]), else None
        self.gptrs: list[int] | bytes | None = None
        #: ``(c.full, c.dicts)`` when _torch_ext found every state dict holding its bound
        #: tensors (``_check_bound``), else None
        self.same: tuple[Any, Any] | None = None


class _Written:
    """The memory one step writes: params, their states and the groups' step counts.

    ``entries`` are the spans ``(lo, hi, gi, i, what)`` sorted by ``lo`` (``i`` -1 for a
    group's step counts, ``what`` a state name or None for the param); ``grads`` the step's
    gradients in order as ``(gi, i, nbytes)``. A gradient at ``ptr`` overlaps a span iff the
    last span starting before ``ptr + nbytes`` reaches, or an earlier one reached, past
    ``ptr``: so the starts and the running maximum of the ends are kept, both led by a sentinel.
    """

    # Below this many gradients a Python loop is cheaper than NumPy's fixed costs.
    VECTOR_FROM = 48

    __slots__ = ("entries", "grads", "starts", "reach", "sizes", "arrays")

    def __init__(self, entries: list[tuple[Any, ...]], grads: list[tuple[int, int, int]]) -> None:
        self.entries = entries
        self.grads = grads
        self.starts = [-1] + [e[0] for e in entries]
        reach = -1
        self.reach = [-1] + [reach := max(reach, e[1]) for e in entries]
        self.sizes = [n for _, _, n in grads]
        self.arrays: tuple[np.ndarray, ...] | None = None

    def first_hit(self, ptrs: Iterable[int]) -> int | None:
        """The index of the first gradient (data pointers ``ptrs``) overlapping a span."""
        starts, reach, count = self.starts, self.reach, len(self.sizes)
        if count < self.VECTOR_FROM:
            for j, (ptr, n) in enumerate(zip(ptrs, self.sizes)):
                if n and reach[bisect_left(starts, ptr + n) - 1] > ptr:
                    return j
            return None
        if self.arrays is None:
            self.arrays = (np.array(starts, dtype=np.int64), np.array(reach, dtype=np.int64),
                           np.array(self.sizes, dtype=np.int64))
        starts_np, reach_np, sizes = self.arrays
        lo = np.fromiter(ptrs, dtype=np.int64, count=count)
        hit = reach_np[np.searchsorted(starts_np, lo + sizes) - 1] > lo
        hit &= sizes > 0
        return int(hit.argmax()) if hit.any() else None


# ---------------------------------------------------------------------------------------------
# Storage options: master weights, stochastic rounding, state dtypes.
#
# Note [Storage options]
#     Every drop-in takes four keyword options, kept per param group (so a group may override
#     them): ``master_weights`` (bool), ``stochastic_rounding`` (bool), ``sr_seed`` (int in
#     [0, 2**64)) and ``state_dtype`` (None, "float32", "bfloat16", "int8", "int4": the NumPy
#     classes' values and checks, fastoptim.optim, Note [State dtypes]). With all of them at
#     their defaults a step takes the path of the Notes above. Otherwise the step takes the
#     format path (``_format_step``): per parameter it finds (or makes) the storage the options
#     ask for, groups the parameters into one fused call per (param group, storage, step),
#     checks every call with ``found_inf=1`` (the kernels check every argument and write
#     nothing), checks across calls that no gradient shares memory with anything a call
#     writes, then runs the calls and only then enters new states and step counts into
#     ``state``. A param's views (param or master, copy, states) are cached with what they were
#     built from (``_format_sig``: the param's memory and layout, the options, each state object
#     and its memory), and rebuilt when any of it changes; gradients are checked and viewed
#     every step. About 20 us per tensor in all, so a step that finds everything as the last
#     one left it takes the fast path instead (Note [Format fast path]).
#
#     * ``master_weights``: a bfloat16/float16 param keeps ``state["master_weight"]``, a float32
#       copy made from the param at its first step. The kernel updates the master with the
#       low-precision gradient (float32 states) and writes the param, rounded to nearest even,
#       in the same pass (the ``param_copies`` format, docs/api.md). float32 and float64 params
#       are their own master: the option changes nothing for them.
#     * ``stochastic_rounding``: bfloat16 params are stored with stochastic rounding, key
#       ``(sr_seed, step)`` where ``step`` is the param's step count after this step
#       (``state["step"]``; SGD and Lion, which keep none in torch, keep one with this option).
#       The bits equal ``fastoptim.functional`` called with the group's bfloat16 params that
#       step, in group order, as one list, with ``stochastic_rounding=(sr_seed, step)``, when
#       they share one storage. With ``state_dtype="int8"``/``"int4"`` a group's quantized
#       (large) and float32-state (small) params are separate calls: each call's element
#       indices continue where the group's earlier calls of that step ended (the
#       ``first_index`` of ``stochastic_rounding=(seed, counter, first_index)``), so no two
#       elements of one step share their random bits.
#       float32/float64 params are rounded as usual; float16 params are a ValueError.
#     * ``state_dtype``: "int8"/"int4" states are stored as a dict of tensors
#       (``_qdict``): ``codes`` (uint8), ``absmax`` (float32), ``bits``, ``non_negative``,
#       ``shape``, so ``torch.save``/``torch.load(weights_only=True)`` take them.
#       ``dequantized_state_dict`` gives torch.optim's float32 layout; ``load_state_dict``
#       accepts either form and converts to the optimizer's own storage.
#
#     torch's ``load_state_dict`` casts every state tensor to its param's dtype; master weights,
#     float32 states of low-precision params and quantized states would not survive that, so
#     ``load_state_dict`` sets them aside, lets torch load the rest, and puts them back. The
#     storage options are the loading optimizer's own: a checkpoint's options are not taken.

# Note [Format fast path]
#     The format path checks and views each param afresh every step: about 30 us per tensor
#     (2,000 tensors of 4,096: 60 ms of Python around a 10 ms kernel). Most steps repeat the
#     previous one: the same params, options, state objects and memory, new gradients. So a
#     format step on the params' own ``.grad``, whose arrays all came from the cache (no state
#     made or converted, no non-contiguous param), whose stepping params of a group all had
#     one master_weights setting, and which is not a scalar-state optimizer
#     (NAdam, ASGD), is recorded (``_format_record``: ``_FormatPlan``,
#     the calls with their param and state arrays; per group ``_FormatGroup``, what they were
#     built from). The next step takes ``_format_fast`` when, with fastoptim._torch_ext's C++
#     reads (Note [torch extension]; without the extension there is no fast path):
#     * the param groups, each group's ``params`` list and storage options are the recorded
#       ones (identity; the options by value and type), and its hyperparameters pass
#       ``_dry_run`` (read every step, so an lr schedule stays fast);
#     * the params without a gradient are the recorded ones (frozen or unused params: they do
#       not step, as on the format path), and every other param has a gradient that is a plain
#       dense CPU tensor with the param's recorded dtype, shape and strides, without the
#       negative or conjugate bit (``_torch_ext.gather``);
#     * every param's data pointer, state dict (not looked up again while ``self.state``
#       holds the same keys and dicts, as objects, as after the last format step), state
#       object (each bound key, the master weight) and that state's data pointer (a
#       quantized state: its codes' and absmax's, and its bits, non_negative and shape) is
#       the recorded one; a param's or a state's dtype, shape and strides are not read
#       again (they change without a new pointer only through ``.data =`` with a
#       reinterpreting view of the same memory);
#     * the step counts are the recorded tensors at the recorded addresses, each valid
#       (read through NumPy views of them, written back the same way: their version counters
#       are not bumped, as in Note [Steps live in one tensor per group]), and the params of
#       each call whose kernel step or stochastic-rounding counter is the count still share
#       one (the format path made one call per count: params that sat out steps, as above,
#       differ from the others from then on, and keep to their own calls).
#     It then hands each call its gradients as data pointers (``_core._GradPointers``, Note
#     [grad pointers] in src/cpp/bindings.cpp; a NumPy view of each cost about 2 us per tensor,
#     a quarter of the step on 2,000 small tensors), holding the gradients until the calls
#     return, checks with more than one call that no gradient overlaps anything a call writes
#     (against the recorded spans, in NumPy) and every call with ``found_inf=1``, and runs the
#     recorded calls with the new gradients and step. Anything else returns False before
#     anything is written, the format path runs, and records again. The plan holds the state
#     objects and arrays the format cache holds anyway, and no gradient.
#     tests/test_torch_format_fast.py runs each configuration and each change between steps on
#     two optimizers, one with the fast path turned off, and compares every bit.

_FORMAT_DEFAULTS: dict[str, Any] = {"master_weights": False, "stochastic_rounding": False,
                                    "sr_seed": 0, "state_dtype": None}
_LOW = (torch.bfloat16, torch.float16)
_NON_NEGATIVE: list[frozenset[str]] = []


def _non_negative(name: str) -> bool:
    """Whether state ``name`` is stored with the non-negative map (rules.h, looked up once)."""
    if not _NON_NEGATIVE:
        _NON_NEGATIVE.append(_non_negative_names())
    return name in _NON_NEGATIVE[0]


_NP_DTYPES: dict[torch.dtype, np.dtype] = {}


def _np_dtype(dtype: torch.dtype) -> np.dtype:
    """The NumPy dtype of a torch dtype's views (``_np``)."""
    found = _NP_DTYPES.get(dtype)
    if found is None:
        found = _NP_DTYPES[dtype] = _np(torch.empty(0, dtype=dtype)).dtype
    return found


def _check_formats(group: dict[str, Any], where: str) -> None:
    """The storage options of a group (or a constructor's), checked; ``where`` prefixes the
    message."""
    for name in ("master_weights", "stochastic_rounding"):
        value = _opt(group, name)
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{where}{name} must be a bool, got {value!r}")
    seed = _opt(group, "sr_seed")
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"{where}sr_seed must be an int, got {seed!r}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"{where}sr_seed must be in [0, 2**64), got {seed}")
    try:
        sd = _check_state_dtype(_opt(group, "state_dtype"))
    except (TypeError, ValueError) as err:
        raise type(err)(f"{where}{err}") from None
    if _opt(group, "master_weights") and _opt(group, "stochastic_rounding"):
        raise ValueError(f"{where}master_weights=True and stochastic_rounding=True exclude "
                         f"each other (with master weights the low-precision param is a "
                         f"copy rounded to nearest); choose one")
    if _opt(group, "master_weights") and sd not in (None, "float32"):
        raise ValueError(f"{where}master_weights=True keeps float32 states; state_dtype must "
                         f"be None or 'float32', got {sd!r}")


def _opt(group: dict[str, Any], name: str) -> Any:
    """A group's storage option (absent: its default)."""
    return group.get(name, _FORMAT_DEFAULTS[name])


def _format_defaults(cls: str, master_weights: Any, stochastic_rounding: Any, sr_seed: Any,
                     state_dtype: Any) -> dict[str, Any]:
    """The constructor's storage options, checked: all four when one differs from its
    default, else none (then ``param_groups`` have exactly torch's keys)."""
    options = {"master_weights": master_weights, "stochastic_rounding": stochastic_rounding,
               "sr_seed": sr_seed, "state_dtype": state_dtype}
    _check_formats(options, f"{cls}: ")
    if all(options[k] is v or (type(options[k]) is type(v) and options[k] == v)
           for k, v in _FORMAT_DEFAULTS.items()):
        return {}
    return options


def _formats_on(group: dict[str, Any]) -> bool:
    return bool(group.get("master_weights") or group.get("stochastic_rounding")
                or group.get("state_dtype") is not None)


def _is_qdict(value: Any) -> bool:
    return isinstance(value, dict) and "codes" in value and "absmax" in value


def _qdict(q: Any) -> dict[str, Any]:
    """A QuantizedState as the dict of tensors kept in ``state`` (sharing its memory)."""
    return {"codes": torch.from_numpy(q.codes), "absmax": torch.from_numpy(q.absmax),
            "bits": q.bits, "non_negative": q.non_negative, "shape": tuple(q.shape)}


def _qstate(d: Any, where: str) -> Any:
    """The QuantizedState (NumPy views of the tensors) of a quantized state dict, checked."""
    for key in ("codes", "absmax", "bits", "non_negative", "shape"):
        if key not in d:
            raise ValueError(f"{where} is a quantized state without {key!r}")
    codes, absmax = d["codes"], d["absmax"]
    for key, t, dtype in (("codes", codes, torch.uint8), ("absmax", absmax, torch.float32)):
        if (not isinstance(t, torch.Tensor) or t.dtype != dtype or t.dim() != 1
                or t.device.type != "cpu" or not t.is_contiguous()):
            raise TypeError(f"{where}[{key!r}] must be a contiguous 1-D CPU tensor of dtype "
                            f"{dtype}")
    if not isinstance(d["non_negative"], (bool, np.bool_)):  # bool("no") would be True
        raise TypeError(f"{where}['non_negative'] must be a bool, got "
                        f"{type(d['non_negative']).__name__}")
    try:
        return QuantizedState(codes.detach().numpy(), absmax.detach().numpy(), d["bits"],
                              tuple(d["shape"]), bool(d["non_negative"]))
    except (TypeError, ValueError) as err:
        raise type(err)(f"{where}: {err}") from None


def _qcopy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in d.items()}


def dequantized_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` with every quantized state (``state_dtype="int8"``/``"int4"``) replaced
    by the float32 tensor it holds: torch.optim's layout, which ``torch.optim.X`` loads. The
    rest is shared with ``state_dict``, not copied. The way back is ``load_state_dict`` of a
    drop-in with ``state_dtype="int8"`` (or ``"int4"``), which quantizes float states."""
    if not isinstance(state_dict, dict) or "state" not in state_dict:
        raise TypeError("state_dict must be an optimizer state_dict (a dict with 'state')")
    state = {}
    for key, entry in state_dict["state"].items():
        state[key] = {name: (torch.from_numpy(_qstate(v, f"state[{key!r}][{name!r}]")
                                              .to_float().copy())
                             if _is_qdict(v) else v) for name, v in entry.items()}
    return dict(state_dict, state=state)


def _format_sig(group: dict[str, Any], names: tuple[str, ...], p: torch.Tensor,
                state: dict[str, Any] | None) -> tuple[Any, ...] | None:
    """What a param's cached format arrays were built from (Note [Storage options]): the
    param's memory and layout, the options, and each state object with its memory; None when
    a state is missing or not a tensor or quantized dict (the arrays are then built anew)."""
    if not state:
        return None
    master = bool(_opt(group, "master_weights")) and p.dtype in _LOW
    parts: list[Any] = [p.data_ptr(), p.dtype, p.shape, p.stride(), names,
                        _opt(group, "master_weights"), _opt(group, "stochastic_rounding"),
                        _opt(group, "state_dtype")]
    for name in names + (("master_weight",) if master else ()):
        v: Any = state.get(name)
        if type(v) is torch.Tensor:
            parts.append((id(v), v.data_ptr(), v.dtype, v.stride()))
        elif _is_qdict(v):
            codes, absmax = v["codes"], v["absmax"]
            if not (isinstance(codes, torch.Tensor) and isinstance(absmax, torch.Tensor)):
                return None
            parts.append((id(v), id(codes), id(absmax), codes.data_ptr(), absmax.data_ptr(),
                          v.get("bits"), v.get("non_negative"), v.get("shape")))
        else:
            return None
    return tuple(parts)


class _FormatEntry:
    """One param of a format step: its kernel arrays and what enters ``state`` after it."""

    __slots__ = ("p", "param", "grad", "copy", "states", "new", "step", "scalars", "written",
                 "drop_master")

    def __init__(self, p: torch.Tensor) -> None:
        self.p = p
        #: the kernel's params (the master weights, or the params), grads and param_copies
        self.param: Any = None
        self.grad: Any = None
        self.copy: Any = None
        self.states: dict[str, Any] = {}
        #: state entries made or converted for this step (entered after the calls)
        self.new: dict[str, Any] = {}
        self.step: float | None = None
        self.scalars: dict[str, torch.Tensor] = {}
        #: the arrays the call writes (for the check across calls)
        self.written: list[tuple[np.ndarray, str]] = []
        #: whether ``state["master_weight"]`` leaves ``state`` after the step (a step without
        #: master weights: Note [Storage options])
        self.drop_master = False


_QMETA = operator.itemgetter("bits", "non_negative", "shape")


class _FormatGroup:
    """One param group as the last format step left it (Note [Format fast path])."""

    __slots__ = ("group", "params", "n", "idx", "none", "sub", "options", "option_types",
                 "names", "pptrs", "dtypes", "shapes", "strides", "dicts", "keys",
                 "steps", "step_ptrs", "step_views", "nbytes")

    def __init__(self, group: dict[str, Any], params: list[Any]) -> None:
        self.group, self.params, self.n = group, params, len(params)
        #: the params that step (all, or those with a gradient: ``idx``, and per param
        #: whether it has none, ``none``); every list below follows ``sub``
        self.sub: list[Any] = params
        self.idx: list[int] | None = None
        self.none: list[bool] | None = None
        #: per bound state key: (key, its objects, those that are tensors and their pointers,
        #: those that are quantized states, their codes' and absmax's pointers and their bits,
        #: non_negative and shape)
        self.keys: list[tuple[Any, ...]] = []
        self.steps: list[torch.Tensor] | None = None


class _FormatCall(NamedTuple):
    """One kernel call of a recorded format step; ``positions``: its params' indices among the
    group's stepping params (``_FormatGroup.sub``)."""
    gi: int
    master: bool
    sr: bool
    positions: list[int]
    pos: np.ndarray  # (the same, for NumPy indexing)
    params: list[np.ndarray]
    copies: list[np.ndarray] | None
    states: dict[str, list[Any]]
    #: a 0-size array of the gradients' dtype: the call takes them as data pointers (Note
    #: [grad pointers] in src/cpp/bindings.cpp), with no NumPy view of each
    gtemplate: np.ndarray


class _FormatPlan(NamedTuple):
    groups: list[_FormatGroup | None]
    calls: list[_FormatCall]
    #: the spans the calls write, sorted by start, and the running maximum of their ends
    starts: np.ndarray
    ends: np.ndarray


def _span_of(a: np.ndarray) -> tuple[int, int]:
    lo = int(a.__array_interface__["data"][0])
    return lo, lo + int(a.nbytes)


class _FusedOptimizer(torch.optim.Optimizer):
    """torch.optim's bookkeeping around fastoptim's fused update.

    Subclasses set ``_with_step`` (``state`` holds ``step``), ``_kernel_step`` (the kernel needs
    it), ``_flag_defaults`` (torch's ``__setstate__`` defaults) and define
    ``_state_names(group)``, ``_hyper(group)`` and ``_call(group, hyper, step, params, grads,
    states)``.
    """

    _with_step = True
    _kernel_step = False
    _flag_defaults: dict[str, Any] = {}
    #: torch.amp.GradScaler hands the step ``grad_scale`` and ``found_inf`` (Note [AMP]).
    _step_supports_amp_scaling = True

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        self._reset_caches()
        super().__init__(params, defaults)

    def _reset_caches(self) -> None:
        self._compile_key = _register(self)
        self._caches: dict[int, _GroupCache] = {}
        #: per group: the hyperparameters the kernel last accepted (Note [All or nothing])
        self._checked: dict[int, tuple[Any, ...]] = {}
        #: ``_state_snapshot()`` at the end of the last step, and a generation number that
        #: changes whenever it no longer matches: then the per-param dicts are looked up.
        self._snapshot: tuple[Any, list[Any], list[Any]] | None = None
        self._gen = 0
        #: the spans the last checked step wrote, and what they were computed from
        self._written_cache: tuple[list[Any], _Written] | None = None
        #: id(param) -> (param, _format_sig, options, arrays) (Note [Storage options])
        self._format_cache: dict[int, tuple[Any, ...]] = {}
        #: the last format step, for the next one to repeat (Note [Format fast path])
        self._format_plan: _FormatPlan | None = None
        #: ``_state_snapshot()`` when the plan was recorded or last repeated
        self._format_snap: tuple[Any, list[Any], list[Any]] | None = None
        #: state names -> one itemgetter per bound key (``_key_getters``)
        self._getters: dict[tuple[str, ...], tuple[Callable[[Any], Any], ...]] = {}
        #: whether ``state`` may hold a ``master_weight`` (a loaded one, or a format step's)
        #: that a step without storage options must drop (``_step``)
        self._masters = True
        #: what this step's planning entered into ``state`` (``_enter``), undone if the step
        #: is refused: (the dict, the key, the value before or _ABSENT)
        self._undo: list[tuple[Any, Any, Any]] = []

    # -- torch.optim.Optimizer overrides --------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            gi = len(self.param_groups) - 1
            _check_formats(self.param_groups[-1], f"{self._where(gi)}: ")
            self._dry_run(self.param_groups[-1], gi)
        except Exception:
            self.param_groups.pop()
            raise

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        defaults = getattr(self, "defaults", {})
        for group in self.param_groups:
            for key, value in self._flag_defaults.items():
                group.setdefault(key, value)
            for key in _FORMAT_DEFAULTS:
                if key in defaults:
                    group.setdefault(key, defaults[key])
        self._reset_caches()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model and returns the
                loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if torch.compiler.is_compiling():
            self._traced_step()
        else:
            self._step(None)
        return loss

    def _traced_step(self) -> None:
        """``step()`` as torch.compile traces it: one custom op (Note [torch.compile])."""
        where: list[int] = []
        params, grads = [], []
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if p.grad is not None:
                    where += [gi, i]
                    params.append(p)
                    grads.append(p.grad)
        if params:
            torch.ops.fastoptim.optimizer_step_(self._compile_key, where, params, grads)

    def _amp_scale(self) -> float | None:
        """Note [AMP]: None when ``found_inf`` says to skip the step, else the grad scale
        (1.0 without one)."""
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and float(found_inf) != 0:  # nonzero or NaN
            return None
        grad_scale = getattr(self, "grad_scale", None)
        if grad_scale is None:
            return 1.0
        scale = float(grad_scale)
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"{type(self).__name__}: grad_scale must be finite and > 0, "
                             f"got {scale}")
        return scale

    def _step(self, grads: dict[int, list[Any]] | None, retry: bool = True) -> None:
        """The step; ``grads``: per group index, the gradients to use instead of ``.grad``.
        ``retry``: whether a refusal may be retried once with fresh caches (Note [A param's
        layout changed under its cache])."""
        scale = self._amp_scale()
        if scale is None:
            return  # an overflow: params, states and steps stay as they are (torch fused)
        if any(map(_formats_on, self.param_groups)):
            self._masters = True
            self._format_step(grads, scale)
            return
        if _PREFETCH is not None:  # Note [prefetch hints]
            for c in self._caches.values():
                if c.prefetch is not None:
                    _PREFETCH(c.prefetch[0])  # the params; their states in _check_bound
        snapshot = self._snapshot
        if not self._state_unchanged(snapshot):
            self._gen += 1
            snapshot = None
        self._snapshot = None  # (until the step is done: an error leaves none)
        gathered = []
        for gi, group in enumerate(self.param_groups):
            item = self._gather(gi, group, None if grads is None else grads[gi])
            if item is not None:
                gathered.append(item)
        if scale != 1.0:
            for item in gathered:
                item.hyper = dict(item.hyper, grad_scale=scale)
        if self._undo:  # (left by a step interrupted while planning: not this step's)
            self._undo.clear()
        try:
            calls = [call for item in gathered for call in self._plan(item)]
            if len(calls) == 1:
                # One call: the kernel checks every array before it writes (docs/api.md).
                try:
                    calls[0]()
                except (TypeError, ValueError):
                    # The same problem, named after the param (the kernel counts within its
                    # call).
                    for item in gathered:
                        if not item.checked:
                            self._check_grads(item)
                    self._check_aliases(gathered)
                    raise
            else:
                for item in gathered:
                    if not item.checked:
                        self._check_grads(item)
                self._check_aliases(gathered)
        except Exception as err:
            # Nothing is written yet: every check runs before the first write. What planning
            # entered into ``state`` (fresh states, converted ones) is taken back too
            # (docs/torch.md: on error no state changes).
            for mapping, key, before in reversed(self._undo):
                if before is _ABSENT:
                    mapping.pop(key, None)
                else:
                    mapping[key] = before
            self._undo.clear()
            if (isinstance(err, (TypeError, ValueError)) and retry
                    and self._drop_stale_caches()):
                self._step(grads, retry=False)
                return
            raise
        if self._undo:
            self._undo.clear()
        if len(calls) > 1:
            for call in calls:
                call()
        self._snapshot = self._state_resnapshot(snapshot)
        masters = self._masters
        for item in gathered:
            group, idx = item.group, item.idx
            params = group["params"]
            stepped = params if len(idx) == len(params) else [params[i] for i in idx]
            if masters:
                # Note [Storage options]: this step moved the params without master weights;
                # a master kept from before (the option turned off, or loaded) is stale, and
                # the option turned on again starts from the param.
                for p in stepped:
                    state = self.state.get(p)
                    if state:
                        state.pop("master_weight", None)
            x = _ext()
            if x is None or not isinstance(stepped, list) or not x.bump_versions(stepped):
                increment_version(stepped)
            if item.cache.dtensor:
                increment_version([_local(p) for p in stepped if _local(p) is not p])
        if masters:
            self._masters = any("master_weight" in state for state in self.state.values()
                                if isinstance(state, dict))

    def _state_snapshot(self) -> tuple[Any, list[Any], list[Any]]:
        """``self.state``, its keys and its values (the per-param dicts), as objects."""
        return self.state, list(self.state), list(self.state.values())

    def _state_unchanged(self, snapshot: tuple[Any, list[Any], list[Any]] | None) -> bool:
        """Whether ``self.state`` maps the same params to the same dicts as at ``snapshot``.
        The keys count too: a dict moved to another key in the last place keeps the values."""
        if snapshot is None or snapshot[0] is not self.state:
            return False
        x = _ext()
        if x is not None and type(self.state) in _PLAIN_DICTS:
            # the same comparison, reading the dict's table and not the objects (cold after a
            # step: Note [torch extension])
            return x.same_entries(self.state, snapshot[1], snapshot[2])
        return (_same_objects(snapshot[2], list(self.state.values()))
                and _same_objects(snapshot[1], list(self.state)))

    def _state_resnapshot(self, snapshot: tuple[Any, list[Any], list[Any]] | None,
                          ) -> tuple[Any, list[Any], list[Any]]:
        """``_state_snapshot()``: ``snapshot`` itself while ``self.state`` still matches it (the
        same objects, without a reference taken to each again)."""
        if snapshot is not None and self._state_unchanged(snapshot):
            return snapshot
        return self._state_snapshot()

    def _drop_stale_caches(self) -> bool:
        """Note [A param's layout changed under its cache]: forget every group cache whose
        params' shapes, strides or dtypes are no longer the ones it recorded; whether any was."""
        stale = []
        for key, c in self._caches.items():
            if c.dtensor:
                continue
            try:
                if (list(map(_shape, c.locals)) != c.shapes
                        or list(map(_stride, c.locals)) != c.strides
                        or list(map(_dtype, c.locals)) != c.grad_dtypes):
                    stale.append(key)
            except RuntimeError:  # e.g. a param without strides now: the refusal stands
                continue
        for key in stale:
            del self._caches[key]
        return bool(stale)

    # -- storage options (Note [Storage options]) ---------------------------------------------

    def state_nbytes(self) -> int:
        """Bytes held by ``state``: every state tensor (master weights and step counts
        included) and the codes and absmax of quantized states."""
        total = 0
        for entry in self.state.values():
            for value in entry.values():
                if _is_qdict(value):
                    value = (value["codes"], value["absmax"])
                elif isinstance(value, torch.Tensor):
                    value = (value,)
                else:
                    continue
                total += sum(int(_local(t).numel()) * t.element_size() for t in value)
        return total

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``, except that master weights, the float32 states of
        low-precision params and quantized states are loaded as saved rather than cast to the
        param's dtype, and that the storage options stay this optimizer's own
        (Note [Storage options]). A quantized state loaded into a group without
        ``state_dtype="int8"``/``"int4"`` is dequantized now; other conversions happen at
        the next step. The load-state-dict hooks run as torch runs them: the pre-hooks on (a
        shallow copy of) the whole dict, which one may replace, the post-hooks once every
        entry is in."""
        # torch's order (Optimizer.load_state_dict). torch's own load below would run them on
        # the dict without the entries set aside, and the post-hooks before those are back, so
        # it runs without hooks.
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        pre, post = (self._optimizer_load_state_dict_pre_hooks,
                     self._optimizer_load_state_dict_post_hooks)
        self._optimizer_load_state_dict_pre_hooks = collections.OrderedDict()
        self._optimizer_load_state_dict_post_hooks = collections.OrderedDict()
        try:
            self._load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks = pre
            self._optimizer_load_state_dict_post_hooks = post
        for post_hook in post.values():
            post_hook(self)

    def _load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``load_state_dict`` after its pre-hooks (with torch's hooks off)."""
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("state"), dict):
            return super().load_state_dict(state_dict)
        mine = [{k: g[k] for k in _FORMAT_DEFAULTS if k in g} for g in self.param_groups]
        saved_groups = state_dict.get("param_groups", [])
        try:
            saved_ids = list(chain.from_iterable(g["params"] for g in saved_groups))
        except (TypeError, KeyError):
            return super().load_state_dict(state_dict)
        params = [(gi, p) for gi, g in enumerate(self.param_groups) for p in g["params"]]
        id_map = dict(zip(saved_ids, params)) if len(saved_ids) == len(params) else {}
        kept: dict[Any, dict[str, Any]] = {}
        stripped: dict[Any, Any] = {}
        for key, entry in state_dict["state"].items():
            where = f"{type(self).__name__}: state_dict['state'][{key!r}]"
            if key not in id_map or not isinstance(entry, dict):
                stripped[key] = entry
                continue
            gi, p = id_map[key]
            formats = _formats_on(mine[gi])
            aside = {}
            dropped = set()
            for name, value in entry.items():
                if (name == "master_weight" and isinstance(value, torch.Tensor)
                        and value.dtype != torch.float32):
                    # torch.optim cast it to the param's dtype and never updates it: stale.
                    dropped.add(name)
                elif _is_qdict(value):
                    q = _qstate(value, f"{where}[{name!r}]")
                    if q.shape != tuple(p.shape):
                        raise ValueError(f"{where}[{name!r}] has shape {q.shape}, its "
                                         f"parameter {tuple(p.shape)}")
                    if not np.isfinite(q.absmax).all() or (q.absmax < 0).any():
                        # as the NumPy classes' load_state_dict
                        raise ValueError(f"{where}[{name!r}]['absmax'] must be finite and >= 0")
                    aside[name] = value
                elif (isinstance(value, torch.Tensor) and name != "step"
                      and (formats or name == "master_weight")):
                    # A 0-d state other than a master is a scalar state (NAdam's mu_product,
                    # ASGD's eta and mu): kept in its saved dtype, as torch keeps "step" (cast
                    # to a bfloat16 param's dtype, a resumed run would lose bits). "step"
                    # itself is left to torch.
                    if value.shape != p.shape and (value.dim() > 0 or name == "master_weight"):
                        raise ValueError(f"{where}[{name!r}] has shape {tuple(value.shape)}, "
                                         f"its parameter {tuple(p.shape)}")
                    aside[name] = value
            stripped[key] = {k: v for k, v in entry.items()
                             if k not in aside and k not in dropped}
            if aside:
                kept[key] = aside
        super().load_state_dict(dict(state_dict, state=stripped))
        for group, options in zip(self.param_groups, mine):
            for key in _FORMAT_DEFAULTS:
                group.pop(key, None)
            group.update(options)
        with torch.no_grad():
            for key, aside in kept.items():
                gi, p = id_map[key]
                state = self.state[p]
                formats = _formats_on(self.param_groups[gi])
                for name, value in aside.items():
                    if _is_qdict(value):
                        if formats:
                            state[name] = _qcopy(value)
                        else:
                            x = torch.from_numpy(_qstate(value, name).to_float())
                            state[name] = torch.empty_like(
                                p, memory_format=torch.preserve_format).copy_(x)
                    else:
                        state[name] = value.detach().to(p.device, copy=True)
            self._place_states()
        self._reset_caches()

    def _place_states(self) -> None:
        """Moves each loaded state tensor that starts at its param's offset within a page
        into a placed copy (Note [state placement], _placement.py): a checkpoint's tensors are
        separate allocations, which alias as a fresh optimizer's states would not. Only states
        with the param's element size: with another (float32 states of bfloat16 params) the
        two streams' distance changes along the arrays and they alias only in passing. States
        that the next step converts (_format_convert) are allocated as torch allocates them."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                for name, t in list(state.items()):
                    if (type(t) is torch.Tensor and t.shape == p.shape
                            and t.element_size() == p.element_size()
                            and t.device.type == "cpu" and t.layout == torch.strided
                            and t.is_contiguous()
                            and _placeable(p, t.numel() * t.element_size())
                            and (t.data_ptr() - p.data_ptr()) % _placement.PAGE == 0):
                        state[name] = _state_like(p, name, dtype=t.dtype).copy_(t)

    def _format_init_value(self, group: dict[str, Any], name: str) -> float:
        """The value a fresh state starts with (torch's initialisation)."""
        return 0.0

    def _format_storage(self, group: dict[str, Any], p: torch.Tensor, master: bool) -> Any:
        """What a param's states are stored as: a torch dtype, or 8 or 4 (quantized)."""
        sd = _opt(group, "state_dtype")
        if master:
            return torch.float32
        if sd is None:
            return p.dtype
        if sd in ("int8", "int4"):
            if p.numel() < MIN_QUANTIZED_SIZE:
                return torch.float32
            return 8 if sd == "int8" else 4
        return torch.float32 if sd == "float32" else torch.bfloat16

    def _format_fresh(self, group: dict[str, Any], p: torch.Tensor, name: str,
                      storage: Any) -> Any:
        value = self._format_init_value(group, name)
        if isinstance(storage, int):
            return _qdict(QuantizedState.from_float(
                np.full(tuple(p.shape), value, np.float32), storage, _non_negative(name)))
        return _state_like(p, name, value, storage)

    def _format_convert(self, where: str, p: torch.Tensor, name: str, t: Any,
                        storage: Any) -> Any:
        """State ``t`` in ``storage`` (itself when it already is), checked."""
        label = f"{where}: state[{name!r}]"
        non_negative = _non_negative(name)
        if _is_qdict(t):
            q = _qstate(t, label)
            if q.shape != tuple(p.shape):
                raise ValueError(f"{label} has shape {q.shape}, the parameter "
                                 f"{tuple(p.shape)}")
            if isinstance(storage, int) and (q.bits, q.non_negative) == (storage, non_negative):
                return t
            x = q.to_float()
        elif isinstance(t, torch.Tensor):
            if t.shape != p.shape:
                raise ValueError(f"{label} has shape {tuple(t.shape)}, the parameter "
                                 f"{tuple(p.shape)}")
            if not t.is_floating_point():
                raise TypeError(f"{label} has dtype {t.dtype}; a state must be a float tensor")
            if not isinstance(storage, int):
                if (type(t) is torch.Tensor and t.dtype == storage and t.device == p.device
                        and t.stride() == p.stride() and not t.requires_grad
                        and not t.is_neg() and not t.is_conj()):
                    return t
                return torch.empty_like(p, dtype=storage,
                                        memory_format=torch.preserve_format).copy_(t.detach())
            x = t.detach().to("cpu", torch.float32).contiguous().numpy()
        else:
            raise TypeError(f"{label} must be a tensor or a quantized state (a dict of codes "
                            f"and absmax), got {type(t).__name__}")
        if isinstance(storage, int):
            return _qdict(QuantizedState.from_float(np.asarray(x, np.float32), storage,
                                                    non_negative))
        return torch.empty_like(p, dtype=storage, memory_format=torch.preserve_format).copy_(
            torch.from_numpy(np.ascontiguousarray(x, np.float32)).reshape(p.shape))

    def _format_kernel_step(self, names: tuple[str, ...], fresh: set[str],
                            step: float | None) -> Any:
        """The ``step`` argument of a param's kernel call in a format step."""
        return int(step) if self._kernel_step and step is not None else None

    def _format_scalars(self, group: dict[str, Any], state: dict[str, Any] | None,
                        step: float) -> tuple[tuple[float, ...], dict[str, torch.Tensor]]:
        """Scalar states (NAdam, ASGD): the kernel's values and the tensors after the step."""
        return (), {}

    def _format_entry(self, gi: int, group: dict[str, Any], names: tuple[str, ...], i: int,
                      p: torch.Tensor, g: Any) -> tuple[_FormatEntry, tuple[Any, ...]]:
        """Param i's arrays for a format step, checked, and its call's key."""
        where = self._where(gi, i)
        dtensor = _dtensor_class()
        if dtensor is not None and (isinstance(p, dtensor) or isinstance(g, dtensor)):
            raise ValueError(f"{where}: master_weights, stochastic_rounding and state_dtype "
                             f"do not support DTensor parameters")
        problem = _problem(p)
        if problem is not None:
            raise problem[0](f"{where} {problem[1]}")
        if p.device.type != "cpu":
            raise ValueError(f"{where} is on {p.device}: master_weights, stochastic_rounding "
                             f"and state_dtype run on the CPU only")
        if not isinstance(g, torch.Tensor):
            raise TypeError(f"{where}: its gradient must be a tensor, got {type(g).__name__}")
        problem = _problem(g)
        if problem is not None:
            raise problem[0](f"{where}: its gradient {problem[1]}")
        if g.device != p.device:
            raise ValueError(f"{where}: its gradient is on {g.device}, the parameter on "
                             f"{p.device}")
        if g.dtype != p.dtype:
            raise TypeError(f"{where}: its gradient has dtype {g.dtype}, the parameter {p.dtype}")
        if g.shape != p.shape:
            raise ValueError(f"{where}: its gradient has shape {tuple(g.shape)}, the parameter "
                             f"{tuple(p.shape)}")
        if g.stride() != p.stride() and not (p.is_contiguous() and g.is_contiguous()):
            raise ValueError(f"{where}: its gradient has strides {g.stride()}, the parameter "
                             f"{p.stride()}; fastoptim needs one memory layout for both")
        state = self.state.get(p)
        sig = _format_sig(group, names, p, state)
        hit = self._format_cache.get(id(p))
        if hit is not None and sig is not None and hit[0] is p and hit[1] == sig:
            # Note [Storage options]: the same param, options and state objects as when these
            # arrays were built and checked.
            master, sr, kdtype, storage, flat = hit[2]
            e = _FormatEntry(p)
            e.param, e.copy, e.states, e.written = hit[3]
            fresh: set[str] = set()
        else:
            master, sr, kdtype, storage, flat, e, fresh = self._format_arrays(
                where, group, names, p, state)
            if sig is not None and not e.new and not fresh and not e.drop_master:
                self._format_cache[id(p)] = (p, sig, (master, sr, kdtype, storage, flat),
                                             (e.param, e.copy, e.states, e.written))
        with_step = self._with_step or bool(_opt(group, "stochastic_rounding"))
        if with_step:
            before = state.get("step") if state else None
            e.step = (0.0 if before is None else float(before)) + 1
            if not (e.step >= 1 and math.isfinite(e.step)):
                raise ValueError(f"{where}: its state['step'] is {e.step - 1}; it must be a step "
                                 f"count >= 0")
        e.grad = _np(g.detach().resolve_neg() if g.is_neg() else g.detach())
        if flat:
            e.grad = _flat(e.grad)
        kstep = self._format_kernel_step(names, fresh, e.step)
        if isinstance(self, _ScalarStateOptimizer) and e.step is not None:
            values, e.scalars = self._format_scalars(group, state, e.step)
            kstep = (kstep,) + values
        counter = int(e.step) if sr and e.step is not None else None
        key = (gi, kdtype, master, storage, kstep, counter)
        return e, key

    def _format_arrays(self, where: str, group: dict[str, Any], names: tuple[str, ...],
                       p: torch.Tensor, state: dict[str, Any] | None) -> tuple[Any, ...]:
        """Param p's kernel arrays (param or master, copy, states), made or converted as the
        options ask and checked; new objects go to ``e.new``."""
        master = bool(_opt(group, "master_weights")) and p.dtype in _LOW
        sr = bool(_opt(group, "stochastic_rounding")) and p.dtype != torch.float32 \
            and p.dtype != torch.float64
        if sr and p.dtype != torch.bfloat16:
            raise ValueError(f"{where} has dtype {p.dtype}; stochastic_rounding=True rounds "
                             f"bfloat16 params (float32 and float64 ones are rounded as usual)")
        kdtype = torch.float32 if master else p.dtype
        sd = _opt(group, "state_dtype")
        if sd is not None:
            shim = SimpleNamespace(_state_dtype=sd)
            probe = SimpleNamespace(dtype=_np_dtype(kdtype), size=p.numel())
            _NumPyOptimizer._check_state_format(shim, where, probe)  # type: ignore[arg-type]
        storage = self._format_storage(group, p, master)
        flat = not p.is_contiguous()
        if isinstance(storage, int) and flat:
            raise ValueError(f"{where} is not contiguous (strides {p.stride()}); quantized "
                             f"states need a contiguous parameter")
        e = _FormatEntry(p)
        fresh = set()
        view = (lambda a: _flat(a)) if flat else (lambda a: a)
        for name in names:
            t = state.get(name) if state else None
            if t is None:
                obj = self._format_fresh(group, p, name, storage)
                fresh.add(name)
            else:
                obj = self._format_convert(where, p, name, t, storage)
            if obj is not t:
                e.new[name] = obj
            if _is_qdict(obj):
                q = _qstate(obj, name)
                e.states[name] = q
                e.written += [(q.codes, f"state[{name!r}]"), (q.absmax, f"state[{name!r}]")]
            else:
                e.states[name] = view(_np(obj))
                e.written.append((e.states[name], f"state[{name!r}]"))
        if master:
            mw = state.get("master_weight") if state else None
            if mw is None:
                mw = torch.empty_like(p, dtype=torch.float32,
                                      memory_format=torch.preserve_format).copy_(p.detach())
                e.new["master_weight"] = mw
            else:
                obj = self._format_convert(where, p, "master_weight", mw, torch.float32)
                if obj is not mw:
                    e.new["master_weight"] = mw = obj
            e.param = view(_np(mw))
            e.copy = view(_np(p.detach()))
            e.written += [(e.param, "state['master_weight']"), (e.copy, "the parameter")]
        else:
            e.param = view(_np(p.detach()))
            e.written.append((e.param, "the parameter"))
            # This step moves the param without the master that ``state`` may still hold
            # (master_weights turned off, or a checkpoint's): stale after it, so dropped.
            e.drop_master = state is not None and "master_weight" in state
        return master, sr, kdtype, storage, flat, e, fresh

    def _format_step(self, grads: dict[int, list[Any]] | None, scale: float) -> None:
        """A step with storage options (Note [Storage options]): checks everything, then
        runs one call per (group, storage, step) and enters the new states."""
        if grads is None and self._format_plan is not None and self._format_fast(scale):
            return
        self._format_plan = None
        buckets: dict[tuple[Any, ...], list[_FormatEntry]] = {}
        hypers = {}
        stepping: dict[int, list[int]] = {}  # per group, the params with a gradient
        for gi, group in enumerate(self.param_groups):
            params = group["params"]
            gl = list(map(_grad_of, params)) if grads is None else grads[gi]
            idx = [i for i, g in enumerate(gl) if g is not None]
            stepping[gi] = idx
            if not idx:
                continue
            _check_formats(group, f"{self._where(gi)}: ")
            hyper = self._dry_run(group, gi)
            if scale != 1.0:
                hyper = dict(hyper, grad_scale=scale)
            hypers[gi] = hyper
            names = self._state_names(group)
            for i in idx:
                e, key = self._format_entry(gi, group, names, i, params[i], gl[i])
                buckets.setdefault(key, []).append(e)
        calls = []
        sr_next: dict[tuple[int, int], int] = {}  # (group, counter) -> next element index
        for key, entries in buckets.items():
            gi, _, master, _, kstep, counter = key
            group = self.param_groups[gi]
            hyper = dict(hypers[gi])
            if master:
                hyper["param_copies"] = [e.copy for e in entries]
            if counter is not None:
                first = sr_next.get((gi, counter), 0)
                sr_next[(gi, counter)] = first + sum(e.param.size for e in entries)
                hyper["stochastic_rounding"] = (int(_opt(group, "sr_seed")), counter, first)
            names = self._state_names(group)
            args = (F, group, hyper, kstep, [e.param for e in entries],
                    [e.grad for e in entries], {n: [e.states[n] for e in entries] for n in names})
            self._format_check(gi, args, entries)
            calls.append(args)
        if len(calls) > 1:
            self._format_aliases(buckets)
        for args in calls:
            self._call(*args)
        stepped = []
        for entries in buckets.values():
            for e in entries:
                state = self.state[e.p]
                if e.step is not None:
                    old = state.get("step")
                    if isinstance(old, torch.Tensor) and old.dim() == 0:
                        old.fill_(e.step)  # in place, as torch's step_t += 1
                    else:
                        state["step"] = torch.tensor(e.step, dtype=_scalar_dtype())
                for name, value in e.scalars.items():
                    old = state.get(name)
                    if isinstance(old, torch.Tensor) and old.dim() == 0:
                        old.copy_(value)
                    else:
                        state[name] = value
                for name, value in e.new.items():
                    state[name] = value
                if e.drop_master:
                    del state["master_weight"]
                stepped.append(e.p)
        if stepped:
            increment_version(stepped)
        self._snapshot = None
        if grads is None and stepped:
            self._format_plan = self._format_record(buckets, stepping)
            self._format_snap = self._state_snapshot()

    def _format_check(self, gi: int, args: tuple[Any, ...], entries: list[_FormatEntry]) -> None:
        """The call's arguments, checked by the kernel with ``found_inf=1`` (nothing written);
        an error names the param."""
        fn, group, hyper, kstep, params, grads, states = args
        try:
            self._call(fn, group, dict(hyper, found_inf=1.0), kstep, params, grads, states)
            return
        except (TypeError, ValueError) as err:
            first = err
        for k, e in enumerate(entries):
            one = dict(hyper, found_inf=1.0)
            if "param_copies" in one:
                one["param_copies"] = [e.copy]
            try:
                self._call(fn, group, one, kstep, [e.param], [e.grad],
                           {n: [v[k]] for n, v in states.items()})
            except (TypeError, ValueError) as err:
                i = next(j for j, q in enumerate(group["params"]) if q is e.p)
                raise type(err)(f"{self._where(gi, i)}: {err}") from None
        raise type(first)(f"{self._where(gi)}: {first}") from None

    def _format_aliases(self, buckets: dict[tuple[Any, ...], list[_FormatEntry]]) -> None:
        """Across calls: nothing a call writes overlaps anything another call writes or
        reads as a gradient (each kernel checks its own call)."""
        spans = []
        grads = []
        for key, entries in buckets.items():
            gi = key[0]
            params = self.param_groups[gi]["params"]
            for e in entries:
                i = next(j for j, q in enumerate(params) if q is e.p)
                for a, what in e.written:
                    if a.nbytes:
                        spans.append(_span_of(a) + (f"{what} of {self._where(gi, i)}",))
                if e.grad.nbytes:
                    grads.append(_span_of(e.grad) + (f"{self._where(gi, i)}: its gradient",))
        spans.sort()
        for (lo0, hi0, w0), (lo1, hi1, w1) in zip(spans, spans[1:]):
            if lo1 < hi0:
                raise ValueError(f"{type(self).__name__}: {w1} and {w0} overlap in memory; "
                                 f"each is updated in place, so they must not share memory")
        starts = [s[0] for s in spans]
        for lo, hi, what in grads:
            k = bisect_left(starts, hi) - 1
            if k >= 0 and spans[k][1] > lo:
                raise ValueError(f"{what} shares memory with {spans[k][2]}, which this step "
                                 f"updates; a gradient must not alias a parameter or an "
                                 f"optimizer state (pass a copy)")

    def _format_record(self, buckets: dict[tuple[Any, ...], list[_FormatEntry]],
                       stepping: dict[int, list[int]]) -> _FormatPlan | None:
        """What the next step needs to repeat this format step on the fast path (Note [Format
        fast path]), or None where it cannot: called after a step on the params' own
        gradients; ``stepping``: per group, the indices of the params that had one."""
        x = _ext()
        if x is None or isinstance(self, _ScalarStateOptimizer):
            return None
        position: dict[int, tuple[int, int]] = {}  # id(param) -> (group, index among stepping)
        for gi, group in enumerate(self.param_groups):
            params = group["params"]
            for j, i in enumerate(stepping.get(gi, ())):
                position[id(params[i])] = (gi, j)
        groups: list[_FormatGroup | None] = [None] * len(self.param_groups)
        masters: dict[int, set[bool]] = {}
        steps: dict[int, set[float | None]] = {}
        views: dict[int, list[Any]] = {}
        calls = []
        spans = []
        for key, entries in buckets.items():
            gi, _, master, _, _, counter = key
            positions = []
            for e in entries:
                hit = self._format_cache.get(id(e.p))
                if (e.new or e.scalars or hit is None or hit[0] is not e.p
                        or hit[3][0] is not e.param or hit[2][4]):
                    return None  # states made this step, or arrays not cached, or flat
                _, i = position[id(e.p)]
                positions.append(i)
                views.setdefault(gi, []).append((i, e.grad.nbytes))
                spans += [_span_of(a) for a, _ in e.written if a.nbytes]
                steps.setdefault(gi, set()).add(e.step)
            masters.setdefault(gi, set()).add(master)
            states = {n: [e.states[n] for e in entries] for n in entries[0].states}
            calls.append(_FormatCall(gi, master, counter is not None, positions,
                                     np.array(positions, dtype=np.intp),
                                     [e.param for e in entries],
                                     [e.copy for e in entries] if master else None, states,
                                     # (the call ran: its grads share one dtype)
                                     np.empty(0, entries[0].grad.dtype)))
        for gi, group in enumerate(self.param_groups):
            params = group["params"]
            if not params:
                continue
            if not isinstance(params, list) or gi not in stepping:
                return None
            r = _FormatGroup(group, params)
            idx = stepping[gi]
            if len(idx) < len(params):  # some params have no gradient: the same ones next time
                r.idx = idx
                r.none = [True] * len(params)
                for i in idx:
                    r.none[i] = False
                r.sub = [params[i] for i in idx]
                if not idx:
                    groups[gi] = r
                    continue
            if len(masters.get(gi, ())) != 1 or (None in steps[gi] and len(steps[gi]) > 1):
                return None
            sub = r.sub
            r.options = tuple(_opt(group, k) for k in _FORMAT_DEFAULTS)
            r.option_types = tuple(map(type, r.options))
            r.names = self._state_names(group)
            r.pptrs = x.data_ptrs(sub)
            r.dtypes, r.shapes = list(map(_dtype, sub)), list(map(_shape, sub))
            r.strides = list(map(_stride, sub))
            r.dicts = list(map(self.state.get, sub))
            if r.pptrs is None or any(d is None for d in r.dicts):
                return None
            r.nbytes = [0] * len(sub)
            for j, nbytes in views[gi]:
                r.nbytes[j] = nbytes
            keys = r.names + (("master_weight",) if True in masters[gi] else ())
            try:
                for key in keys:
                    objs = list(map(operator.itemgetter(key), r.dicts))
                    tensors = [v for v in objs if type(v) is torch.Tensor]
                    qdicts = [v for v in objs if _is_qdict(v)]
                    if len(tensors) + len(qdicts) != len(objs):
                        return None
                    ptrs = x.data_ptrs(tensors)
                    codes = x.data_ptrs(list(map(operator.itemgetter("codes"), qdicts)))
                    absmax = x.data_ptrs(list(map(operator.itemgetter("absmax"), qdicts)))
                    if ptrs is None or codes is None or absmax is None:
                        return None
                    r.keys.append((key, objs, tensors, ptrs, qdicts, (codes, absmax),
                                   list(map(_QMETA, qdicts))))
                if None not in steps[gi]:  # (one count per param; calls share theirs)
                    r.steps = list(map(operator.itemgetter("step"), r.dicts))
                    r.step_ptrs = x.data_ptrs(r.steps)
                    if (r.step_ptrs is None or any(t.dim() != 0 for t in r.steps)
                            or len({t.dtype for t in r.steps}) != 1
                            or r.steps[0].dtype not in (torch.float32, torch.float64)):
                        return None
                    r.step_views = list(map(_to_numpy, r.steps))
            except KeyError:
                return None
            groups[gi] = r
        spans.sort()
        starts = np.array([lo for lo, _ in spans], dtype=np.int64)
        ends = np.maximum.accumulate(np.array([hi for _, hi in spans], dtype=np.int64))
        return _FormatPlan(groups, calls, starts, ends)

    def _format_fast(self, scale: float) -> bool:
        """Note [Format fast path]: the step, when every param, option, state object and
        memory is the one the last format step recorded; False (nothing written) otherwise."""
        plan, x = self._format_plan, _ext()
        if x is None or plan is None or len(self.param_groups) != len(plan.groups):
            return False
        hypers, grads, steps, gstarts, gbytes = {}, {}, {}, [], []
        # the params' state dicts: the recorded ones while ``self.state`` maps the same params
        # to the same dicts as after the last format step (two lists of objects), else looked
        # up (a param's hash is Python code: about 0.2 us a lookup)
        same_state = self._state_unchanged(self._format_snap)
        for gi, (group, r) in enumerate(zip(self.param_groups, plan.groups)):
            params = group["params"]
            if r is None:
                if params:
                    return False
                continue
            if group is not r.group or params is not r.params or len(params) != r.n:
                return False
            if r.none is not None:
                # the same params without a gradient as recorded, and the others the same
                if list(map(operator.is_, map(_grad_of, params), repeat(None))) != r.none:
                    return False
                if not r.idx:
                    continue  # (no gradient at all: the format path skips the group)
                if not _same_objects([params[i] for i in r.idx], r.sub):
                    return False
            sub = r.sub
            options = tuple(_opt(group, k) for k in _FORMAT_DEFAULTS)
            if options != r.options or tuple(map(type, options)) != r.option_types:
                return False
            hyper = self._dry_run(group, gi)  # (raises as the format path would)
            if self._state_names(group) != r.names:
                return False
            # The gradients against the params' recorded dtypes, shapes and strides, and the
            # params' memory (a param's metadata is not read again: see the Note).
            gl, gptrs, pptrs, _ = x.gather(sub, r.dtypes, r.shapes, r.strides, None, (), ())
            if gptrs is None or pptrs != r.pptrs:
                return False
            if not same_state and not _same_objects(list(map(self.state.get, sub)), r.dicts):
                return False
            dicts = r.dicts
            try:
                for key, objs, tensors, ptrs, qdicts, qptrs, qmeta in r.keys:
                    # the same objects as recorded (so the recorded sub-lists are the current
                    # tensors and quantized states), with the same memory
                    if (not _same_objects(list(map(operator.itemgetter(key), dicts)), objs)
                            or x.data_ptrs(tensors) != ptrs):
                        return False
                    if qdicts and (not x.same_pointers(qdicts, ("codes", "absmax"), qptrs)
                                   or list(map(_QMETA, qdicts)) != qmeta):
                        return False
                if r.steps is not None:
                    vals = list(map(operator.itemgetter("step"), dicts))
                    if not _same_objects(vals, r.steps) or x.data_ptrs(vals) != r.step_ptrs:
                        return False
                    # each param's new count, as the format path's float(old) + 1 (their
                    # memory checked just above)
                    new = np.array(r.step_views, dtype=np.float64) + 1
                    if not (new >= 1).all() or not np.isfinite(new).all():
                        return False  # (the format path names a bad count)
                    steps[gi] = new
            except (KeyError, TypeError):
                return False
            hypers[gi] = hyper if scale == 1.0 else dict(hyper, grad_scale=scale)
            grads[gi] = (gl, gptrs)  # (gl: the gradients, held until the calls return)
            gstarts += gptrs
            gbytes += r.nbytes
        calls = []
        sr_next: dict[tuple[int, int], int] = {}  # (group, counter) -> next element index
        for c in plan.calls:
            group, r = self.param_groups[c.gi], plan.groups[c.gi]
            hyper = dict(hypers[c.gi])
            step = None
            if c.gi in steps:
                # A call's params stepped together (its kernel step or stochastic-rounding
                # counter is theirs): one count, as when recorded, unless edited since.
                counts = steps[c.gi][c.pos]
                step = float(counts[0])
                if (self._kernel_step or c.sr) and (counts != step).any():
                    return False
            if c.master:
                hyper["param_copies"] = c.copies
            if c.sr:
                first = sr_next.get((c.gi, int(step)), 0)
                sr_next[(c.gi, int(step))] = first + sum(a.size for a in c.params)
                hyper["stochastic_rounding"] = (int(_opt(group, "sr_seed")), int(step), first)
            gptrs = grads[c.gi][1]
            calls.append((F, group, hyper, self._format_kernel_step(r.names, set(), step),
                          c.params, _core._GradPointers(c.gtemplate, [gptrs[i] for i in c.positions]),
                          c.states))
        if len(calls) > 1:
            # Across calls (each kernel checks its own): no gradient overlaps a written span
            # (those are the recorded ones, checked then), and every call's arguments.
            lo = np.array(gstarts, dtype=np.int64)
            k = np.searchsorted(plan.starts, lo + np.array(gbytes, dtype=np.int64)) - 1
            if ((k >= 0) & (plan.ends[np.maximum(k, 0)] > lo)).any():
                return False
            for args in calls:
                fn, group, hyper, *rest = args
                try:
                    self._call(fn, group, dict(hyper, found_inf=1.0), *rest)
                except (TypeError, ValueError):
                    return False
        for args in calls:
            self._call(*args)
        for gi, r in enumerate(plan.groups):
            if r is None or not r.sub:
                continue
            if r.steps is not None:
                for a, step in zip(r.step_views, steps[gi]):  # as the format path's
                    a[()] = step                             # fill_(old + 1)
            if not x.bump_versions(r.sub):
                increment_version(r.sub)
        self._snapshot = None
        self._format_snap = self._state_resnapshot(self._format_snap)
        return True

    # -- subclass hooks -------------------------------------------------------------------------

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        """The state tensors a param of this group has, ``step`` aside, in torch's order."""
        raise NotImplementedError

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        """The group's hyperparameters as keyword arguments of the functional update."""
        raise NotImplementedError

    def _call(self, fn: Any, group: dict[str, Any], hyper: dict[str, Any], step: Any,
              params: list[np.ndarray], grads: list[np.ndarray],
              states: dict[str, list[np.ndarray]]) -> None:
        raise NotImplementedError

    def _init_state(self, group: dict[str, Any], p: torch.Tensor) -> dict[str, Any]:
        """torch's lazy state initialisation for a param's first step."""
        state: dict[str, Any] = {"step": torch.zeros((), dtype=_scalar_dtype())}
        formats = _formats_on(group)
        master = formats and bool(_opt(group, "master_weights")) and p.dtype in _LOW
        for name in self._state_names(group):
            state[name] = (self._format_fresh(group, p, name,
                                              self._format_storage(group, p, master))
                           if formats else self._new_state(p, name))
        return state

    def _new_state(self, p: torch.Tensor, name: str) -> torch.Tensor:
        return _state_like(p, name)

    def _missing_state(self, c: _GroupCache, i: int, p: torch.Tensor, name: str,
                       state: dict[str, Any]) -> torch.Tensor:
        """A state the group needs but the param lacks (a flag turned on after its first step)."""
        t = self._new_state(p, name)
        self._enter(state, name, t)
        return t

    def _step_key(self, c: _GroupCache, i: int, new_step: Any) -> int | None:
        """The ``step`` argument of param i's kernel call."""
        return int(new_step) if self._kernel_step else None

    def _commit(self, c: _GroupCache, ids: list[int]) -> None:
        """After a kernel call: enter the states made for it into ``state`` (SGD)."""

    def _enter(self, mapping: Any, key: Any, value: Any) -> None:
        """``mapping[key] = value`` while a step is planned (``self.state``, or a param's state
        dict), undone if the step is refused."""
        self._undo.append((mapping, key, mapping.get(key, _ABSENT)))
        mapping[key] = value

    # -- the step -------------------------------------------------------------------------------

    def _where(self, gi: int, i: int | None = None) -> str:
        where = f"{type(self).__name__}: param_groups[{gi}]"
        return where if i is None else f"{where}['params'][{i}]"

    def _dry_run(self, group: dict[str, Any], gi: int) -> dict[str, Any]:
        """The group's kernel arguments, checked by the kernel itself on empty lists."""
        if group.get("differentiable"):
            raise ValueError(f"{self._where(gi)}: differentiable=True is not supported "
                             f"({_REFUSED['differentiable']})")
        hyper = self._hyper(group)
        names = self._state_names(group)
        checked = self._checked.get(id(group))
        if checked is not None and checked[0] is group and checked[1] == (hyper, names):
            return hyper
        try:
            self._call(F, group, hyper, 1, [], [], {name: [] for name in names})
        except (TypeError, ValueError) as err:
            raise type(err)(f"{self._where(gi)}: {err}") from None
        self._checked[id(group)] = (group, (hyper, names))
        return hyper

    def _cache(self, group: dict[str, Any], ptrs: list[int] | bytes | None = None,
               ) -> _GroupCache:
        """The group's cache, rebuilt when its params or state names changed. ``ptrs``: the
        params' data pointers, when _torch_ext's gather has just read them (packed or not)."""
        names = self._state_names(group)
        c = self._caches.get(id(group))
        if type(ptrs) is bytes:
            if (c is not None and c.group is group and c.names == names
                    and c.packed_ptrs == ptrs):
                return c
            ptrs = _unpack(ptrs)
        dtensor = c is not None and c.dtensor
        x = _ext()
        if ptrs is None:
            ptrs = x.data_ptrs(group["params"]) if x is not None and not dtensor else None
        if ptrs is None:
            try:
                ptrs = list(map(_local_ptr if dtensor else _data_ptr, group["params"]))
            except RuntimeError:  # a param without storage (sparse, mkldnn): name it
                gi = next(k for k, g in enumerate(self.param_groups) if g is group)
                for i, p in enumerate(group["params"]):
                    problem = _problem(_local(p) if dtensor else p)
                    if problem is not None:
                        raise problem[0](f"{self._where(gi, i)} {problem[1]}") from None
                raise
        if c is None or c.group is not group or c.names != names or c.ptrs != ptrs:
            c = _GroupCache(group, names, ptrs, self._with_step)
            self._caches[id(group)] = c
        return c

    def _gather(self, gi: int, group: dict[str, Any],
                grads: list[Any] | None = None) -> _Gathered | None:
        """Check one group's gradients (``.grad``, or ``grads``), parameters and
        hyperparameters; writes nothing."""
        params = group["params"]
        gptrs = pptrs = same = known = None
        x = _ext() if grads is None and _P is not None else None
        if x is not None:
            # Note [torch extension]: the gradients and, when they all match the cached
            # metadata of their params, their pointers, the params' pointers, and whether the
            # state dicts hold the bound tensors, in one C++ call.
            known = self._caches.get(id(group))
            if known is not None and not known.dtensor:
                full = known.full
                if (known.gen == self._gen and full is not None and full.by_key
                        and isinstance(known.dicts, list)):
                    bound = (known.dicts, self._keys(known.names), full.pby_key)
                else:
                    bound = (None, (), ())
                # (the two loops may run on two of torch's threads when the update does:
                # Note [split walk])
                threads = (_core.get_num_threads()
                           if bound[0] is not None and _core._has_runner() else 1)
                grads, gptrs, pptrs, same = x.gather(params, known.grad_dtypes, known.shapes,
                                                     known.strides, *bound, threads, True)
                # (_check_bound's comparison, when it found them all bound)
                same = (full, known.dicts) if same is True else None
                if pptrs is None and self._drop_stale_caches():
                    # a param's shape changed at the same address (gather compares them):
                    # its cache is gone; the gradients are compared with the new one
                    gptrs = same = None
                    known = None
        if grads is None:
            grads = list(map(_grad_of, params))
        if gptrs is not None or all(map(operator.is_not, grads, repeat(None))):
            # (pointers come back only when every param has a gradient)
            idx: range | list[int] = range(len(params))
        else:
            idx = list(compress(range(len(params)), map(operator.is_not, grads, repeat(None))))
            if not idx:
                return None
            grads = [grads[i] for i in idx]
        hyper = self._dry_run(group, gi)
        c = self._cache(group, pptrs)
        if c.dtensor:
            grads = list(map(_local, grads))
        if any(c.errors):
            for i in idx:
                if c.errors[i] is not None:
                    kind, text = c.errors[i]
                    raise kind(f"{self._where(gi, i)} {text}")
        item = _Gathered(gi, group, c, idx, grads, hyper)
        if c is known:  # (a rebuilt cache may expect other metadata)
            item.gptrs = gptrs
            item.same = same
        return item

    def _views(self, item: _Gathered) -> list[np.ndarray]:
        """The gradients' NumPy views, for the calls that take them (Note [pointer path])."""
        if item.views is not None:
            return item.views
        c, idx, grads = item.cache, item.idx, item.grads
        try:
            gv = list(map(_to_numpy, grads))
        except (TypeError, RuntimeError):
            gv = [self._grad_view(item.gi, i, g) for i, g in zip(idx, grads)]
        for i, g in zip(idx, grads):
            if _no_memory(g):  # (its NumPy view would be a buffer NumPy made: _no_memory)
                raise ValueError(f"{self._where(item.gi, i)}: its gradient {_NO_MEMORY}")
        item.views = gv
        if c.flat:
            # The kernel sees 1-D views here, so it cannot check the layouts: check them now.
            self._check_grads(item)
            for j, i in enumerate(idx):
                if i in c.flat:
                    gv[j] = _flat(gv[j])
        return gv

    def _grads_match(self, item: _Gathered) -> bool:
        """Whether every gradient of a whole group is a plain dense CPU tensor with its
        parameter's dtype, shape and strides: then the kernel can take data pointers."""
        c, grads = item.cache, item.grads
        if item.gptrs is not None:  # _torch_ext checked the same (Note [torch extension])
            item.checked = True
            return True
        try:
            # One C-level pass per attribute, each compared with the params' list: no tuple
            # per gradient (a type, a dtype and a bool are compared by identity).
            if (_P is None or list(map(type, grads)) != c.grad_types
                    or list(map(_dtype, grads)) != c.grad_dtypes
                    or list(map(_shape, grads)) != c.shapes
                    or not all(map(_is_cpu, grads))
                    or list(map(_stride, grads)) != c.strides or any(map(_is_neg, grads))):
                return False
        except RuntimeError:  # no strides: a sparse (or other non-strided) gradient
            return False
        item.checked = True
        return True

    def _check_grads(self, item: _Gathered) -> None:
        """Each gradient against its parameter (dtype, shape, layout); raises naming the param."""
        c, idx, gv = item.cache, item.idx, self._views(item)
        metas = c.metas if len(idx) == len(c.metas) else [c.metas[i] for i in idx]
        if list(map(_meta, gv)) != metas:
            params = item.group["params"]
            for j, i in enumerate(idx):
                self._check_grad(item.gi, i, c.locals[i], item.grads[j], gv[j], c)
        item.checked = True

    def _grad_view(self, gi: int, i: int, g: torch.Tensor) -> np.ndarray:
        problem = _problem(g)
        if problem is not None:
            kind, text = problem
            raise kind(f"{self._where(gi, i)}: its gradient {text}")
        g = g.detach()  # a gradient that requires grad (backward with create_graph=True)
        g = g.resolve_neg() if g.is_neg() else g
        return g if g.is_cuda else _np(g)

    def _check_grad(self, gi: int, i: int, p: torch.Tensor, g: torch.Tensor, view: np.ndarray,
                    c: _GroupCache) -> None:
        where = self._where(gi, i)
        if g.device != p.device:
            raise ValueError(f"{where}: its gradient is on {g.device}, the parameter on "
                             f"{p.device}")
        if view.dtype != c.dtypes[i]:
            raise TypeError(f"{where}: its gradient has dtype {g.dtype}, the parameter {p.dtype}")
        if view.shape != c.metas[i][2]:
            raise ValueError(f"{where}: its gradient has shape {tuple(view.shape)}, the parameter "
                             f"{c.metas[i][2]}")
        if i in c.flat:
            if g.stride() != p.stride():
                raise ValueError(f"{where}: its gradient has strides {g.stride()}, the parameter "
                                 f"{p.stride()}; fastoptim needs one memory layout for both")
        elif not _contiguous(view):
            raise ValueError(f"{where}: its gradient is not contiguous (strides {g.stride()}); "
                             f"fastoptim needs contiguous gradients")

    def _keys(self, names: tuple[str, ...]) -> tuple[str, ...]:
        """The keys of a param's state tensors that a step binds, in ``c.bound``'s order."""
        return names + ("step",) if self._with_step else names

    def _key_getters(self, names: tuple[str, ...]) -> tuple[Callable[[Any], Any], ...]:
        """One ``itemgetter`` per key of ``_keys(names)`` (cached)."""
        found = self._getters.get(names)
        if found is None:
            found = self._getters[names] = tuple(map(operator.itemgetter,
                                                     self._keys(names)))
        return found

    def _getter(self, names: tuple[str, ...]) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
        keys = self._keys(names)
        if len(keys) == 1:
            key = keys[0]
            return lambda d: (d[key],)
        return operator.itemgetter(*keys)

    def _plan(self, item: _Gathered) -> list[Callable[[], None]]:
        """Bind the group's states and return its kernel calls (Note [All or nothing])."""
        group, c, idx, hyper = item.group, item.cache, item.idx, item.hyper
        everyone = len(idx) == len(group["params"])
        if c.names or self._with_step:
            self._check_bound(group, c, idx, everyone, item.same)
        if c.pending or not everyone or not c.one_dtype:
            return self._plan_split(item)
        if c.full is None:
            c.reused = 0
        elif c.prefetch is None and _PREFETCH is not None:
            c.reused += 1
            if c.reused >= _PREFETCH_AFTER:  # the same tensors step after step
                c.prefetch = self._addresses(c)
        full = _complete(c, len(self._keys(c.names)) if c.names or self._with_step else 0)
        store_np = c.store_np
        step = self._step_key(c, -1, None) if not self._kernel_step else None
        if self._kernel_step:
            new = store_np + store_np.dtype.type(1)
            low = new.min()
            if not low >= 1:
                self._bad_step(item, new)
            if low != new.max():
                return self._plan_split(item)
            step = int(low)
        held: Any = None
        gargs: Any = None
        if self._grads_match(item):
            if item.gptrs is not None:  # (gather's Grads holds the storages they point into)
                gargs = item.gptrs
            else:
                gargs = list(map(_data_ptr, item.grads))
                if 0 in gargs and any(not ptr and g.numel()
                                      for ptr, g in zip(gargs, item.grads)):
                    gargs = None  # a storage resized to 0: the views' path names it (_views)
                else:
                    # A tensor does not keep its storage: Python code that runs before the
                    # kernel (a hyperparameter's __float__) may set_() a gradient and free the
                    # memory a pointer names. (NumPy views need nothing: .numpy() holds an alias.)
                    held = list(map(_untyped_storage, item.grads))
        if gargs is not None:
            fn: Any = _P
            pargs, states = full.pointers, full.pstates  # (packed: Note [packed pointers])
        else:
            fn, pargs, gargs, states = F, full.views, self._views(item), full.states

        def run(held: Any = held) -> None:  # (held: bound to run, alive until it returns)
            self._call(fn, group, hyper, step, pargs, gargs, states)
            if store_np is not None:
                store_np[...] += store_np.dtype.type(1)
        return [run]

    def _addresses(self, c: _GroupCache) -> tuple[np.ndarray, list[np.ndarray]]:
        """Where the objects a step reads live (Note [prefetch hints]): for the params, and for
        each bound state key (the state dicts with the first), each tensor's Python object,
        TensorImpl (its first 256 bytes) and StorageImpl. Hints only: nothing depends on them
        being right or current."""
        def where(tensors: Iterable[Any], out: list[int]) -> np.ndarray:
            for t in tensors:
                impl = t._cdata
                out += (id(t), impl, impl + 64, impl + 128, impl + 192,
                        t.untyped_storage()._cdata)
            return np.array(out, dtype=np.int64)

        keys = []
        try:
            params = where(c.locals, [])
            if c.full is not None and c.full.by_key:
                dicts = list(map(id, c.dicts))
                for k, get in enumerate(self._key_getters(c.names)):
                    keys.append(where(map(_local, map(get, c.dicts)), dicts if k == 0 else []))
        except Exception:  # e.g. a tensor without storage: no hints
            return np.zeros(0, dtype=np.int64), []
        return params, keys

    def _check_bound(self, group: dict[str, Any], c: _GroupCache, idx: range | list[int],
                     everyone: bool, same: tuple[Any, Any] | None = None) -> None:
        """Bind every param of idx whose state tensors are not the ones its views show.
        ``same``: ``(c.full, c.dicts)`` as they were when _torch_ext's gather found every
        state dict holding the bound tensors (Note [torch extension])."""
        params = group["params"]
        if c.store is not None and _data_ptr(c.store) != c.store_ptr:
            # Note [Step store moves]: store_np views freed memory; view the store again
            # before anything reads or writes it (every param is then rebound below).
            c.store_np = c.store.numpy()
            c.store_ptr = _data_ptr(c.store)
            c.full = None
            c.prefetch = None
            c.spans = None
        if c.gen != self._gen:
            c.dicts = list(map(self.state.get, params))
            c.gen = self._gen
        dicts = c.dicts if everyone else [c.dicts[i] for i in idx]
        ptr = _local_ptr if c.dtensor else _data_ptr
        full = c.full
        if everyone and full is not None and full.by_key:
            # The common case: one list of pointers per state key, no tuple per param.
            if same is not None and same[0] is full and same[1] is c.dicts:
                return  # compared in _gather's pass, and nothing has been bound since
            x = _ext()
            if (x is not None and not c.dtensor and isinstance(dicts, list)
                    and x.same_pointers(dicts, self._keys(c.names), tuple(full.by_key))):
                return  # Note [torch extension]: the comparison below, in C++
            hints = c.prefetch[1] if c.prefetch is not None else ()
            try:
                for k, (get, expected) in enumerate(zip(self._key_getters(c.names),
                                                        full.by_key)):
                    if k < len(hints):  # each key's tensors just before they are read
                        _PREFETCH(hints[k])
                    if list(map(ptr, map(get, dicts))) != expected:
                        break
                else:
                    return
            except (TypeError, KeyError, AttributeError):
                pass
        else:
            getter = self._getter(c.names)
            try:
                current = list(map(ptr, chain.from_iterable(map(getter, dicts))))
            except (TypeError, KeyError, AttributeError):
                current = None
            if current is not None:
                bound = c.bound if everyone else [c.bound[i] for i in idx]
                expected = None if None in bound else list(chain.from_iterable(bound))
                if current == expected:
                    return
        getter = self._getter(c.names)
        with torch.no_grad():  # binding may create or convert state tensors
            for j, i in enumerate(idx):
                if c.bound[i] is None or _bound_ptrs(dicts[j], getter, c.dtensor) != c.bound[i]:
                    self._bind(group, c, i, params[i])

    def _bind(self, group: dict[str, Any], c: _GroupCache, i: int, p: torch.Tensor) -> None:
        """Complete param i's state, bring it to the param's layout, and view it."""
        state = self.state.get(p)
        if not state:
            state = self._init_state(group, p)
            if state:
                self._enter(self.state, p, state)
        c.dicts[i] = self.state.get(p)
        views = []
        ptrs = []
        for name in c.names:
            t = state.get(name)
            if t is None:
                t = self._missing_state(c, i, p, name, state)
            elif _is_qdict(t):
                # A quantized state in a group whose state_dtype is now None: dequantized to
                # the param's dtype, as load_state_dict does with one (docs/torch.md).
                gi = next(k for k, g in enumerate(self.param_groups) if g is group)
                label = f"{self._where(gi, i)}: state[{name!r}]"
                q = _qstate(t, label)
                if q.shape != tuple(p.shape):
                    raise ValueError(f"{label} has shape {q.shape}, the parameter "
                                     f"{tuple(p.shape)}")
                new = _state_like(p, name)
                new.copy_(torch.from_numpy(q.to_float()))
                self._enter(state, name, new)
                t = new
            elif not (_same_layout(_local(t), c.locals[i]) and _same_sharding(t, p)):
                # e.g. loaded from a checkpoint saved elsewhere
                if t.shape != p.shape:
                    raise ValueError(f"{type(self).__name__}: state[{name!r}] of a parameter of "
                                     f"shape {tuple(p.shape)} has shape {tuple(t.shape)}")
                new = _state_like(p, name)
                new.copy_(t.detach())
                self._enter(state, name, new)
                t = new
            local = _local(t)
            view = local.detach() if local.is_cuda else _np(local)
            views.append(_flat(view) if i in c.flat else view)
            ptrs.append(local.data_ptr())
        if self._with_step:
            step = state.get("step")
            c.store_np[i] = 0.0 if step is None else float(step)
            view = c.store[i]
            self._enter(state, "step", view)
            ptrs.append(view.data_ptr())
        c.svs[i] = tuple(views)
        c.bound[i] = None if i in c.pending else tuple(ptrs)
        c.full = None
        c.prefetch = None
        c.spans = None

    def _plan_split(self, item: _Gathered) -> list[Callable[[], None]]:
        """One call per (dtype, kernel step) for a group whose params differ in either."""
        group, c, idx, hyper = item.group, item.cache, item.idx, item.hyper
        gv = self._views(item)
        new = None
        if self._with_step:
            new = c.store_np[np.asarray(idx, dtype=np.intp)] + c.store_np.dtype.type(1)
            if self._kernel_step and new.size and not new.min() >= 1:
                self._bad_step(item, new)
        buckets: dict[tuple[Any, ...], list[int]] = {}
        for j, i in enumerate(idx):
            key = (c.kinds[i], self._step_key(c, i, None if new is None else new[j]))
            buckets.setdefault(key, []).append(j)
        calls = []
        for (_, step), js in buckets.items():
            ids = [idx[j] for j in js]
            states = {name: [c.svs[i][k] for i in ids] for k, name in enumerate(c.names)}
            calls.append(self._split_call(group, c, hyper, step, ids, [gv[j] for j in js],
                                          states))
        return calls

    def _bad_step(self, item: _Gathered, new: np.ndarray) -> None:
        """Raise for the first param of item whose step count the kernel would refuse (a
        checkpoint's negative or NaN ``step``): before any call writes."""
        j = next(j for j, value in enumerate(new) if not value >= 1)
        raise ValueError(f"{self._where(item.gi, item.idx[j])}: its state['step'] is "
                         f"{new[j] - 1}; it must be a step count >= 0")

    def _spans(self, c: _GroupCache) -> list[list[tuple[int, int, str | None]]]:
        """Per param of the group: the byte spans of the param and of its bound states."""
        spans = []
        for i, nbytes in enumerate(c.nbytes):
            mine = []
            if nbytes:
                mine.append((c.ptrs[i], c.ptrs[i] + nbytes, None))
                for name, ptr in zip(c.names, c.bound[i] or ()):
                    mine.append((ptr, ptr + nbytes, name))
            spans.append(mine)
        return spans

    def _written(self, gathered: list[_Gathered]) -> _Written:
        """What the step writes (cached while the same params with the same bound states step);
        raises if two of those overlap."""
        key = []
        for item in gathered:
            c = item.cache
            if c.spans is None:
                c.spans = self._spans(c)
            key.append((item.gi, c.spans, c.store, item.idx))
        cached = self._written_cache
        if (cached is not None and len(cached[0]) == len(key)
                and all(a[0] == b[0] and a[1] is b[1] and a[2] is b[2] and a[3] == b[3]
                        for a, b in zip(cached[0], key))):
            return cached[1]
        entries = []
        grads = []
        for item in gathered:
            c = item.cache
            for i in item.idx:
                entries += [(lo, hi, item.gi, i, what) for lo, hi, what in c.spans[i]]
                grads.append((item.gi, i, c.nbytes[i]))
            if c.store is not None and c.store.numel():
                lo = c.store.data_ptr()
                entries.append((lo, lo + c.store.nbytes, item.gi, -1, None))
        entries.sort(key=operator.itemgetter(0))
        widest = (-1, -1, 0, 0, None)
        for entry in entries:
            if entry[0] < widest[1]:
                raise ValueError(f"{type(self).__name__}: {self._label(*entry[2:])} and "
                                 f"{self._label(*widest[2:])} overlap in memory; each is "
                                 f"updated in place, so they must not share memory")
            if entry[1] > widest[1]:
                widest = entry
        written = _Written(entries, grads)
        self._written_cache = (key, written)
        return written

    def _label(self, gi: int, i: int, what: str | None) -> str:
        if i < 0:
            return f"the step counts of param_groups[{gi}]"
        where = f"param_groups[{gi}]['params'][{i}]"
        return where if what is None else f"state[{what!r}] of {where}"

    def _check_aliases(self, gathered: list[_Gathered]) -> None:
        """No gradient may share memory with a param, state or step count that the step
        writes, and none of those with another (Note [All or nothing]): the kernels check
        overlaps within their own call only, so across calls it is checked here."""
        if not gathered:
            return
        written = self._written(gathered)
        j = written.first_hit(chain.from_iterable(map(_grad_ptrs, gathered)))
        if j is None:
            return
        gi, i, _ = written.grads[j]
        lo = _data_ptr(next(g for item in gathered if item.gi == gi
                            for k, g in zip(item.idx, item.grads) if k == i))
        hi = lo + written.grads[j][2]
        other = next(e for e in written.entries if e[0] < hi and lo < e[1])
        what = ("the parameter itself" if other[2:] == (gi, i, None)
                else self._label(*other[2:]))
        raise ValueError(f"{self._where(gi, i)}: its gradient shares memory with {what}, which "
                         f"this step updates; a gradient must not alias a parameter or an "
                         f"optimizer state (pass a copy)")

    def _split_call(self, group: dict[str, Any], c: _GroupCache, hyper: dict[str, Any],
                    step: int | None, ids: list[int], grads: list[Any],
                    states: dict[str, list[Any]]) -> Callable[[], None]:
        pviews = [c.views[i] for i in ids]
        store_np = c.store_np
        sel = np.asarray(ids, dtype=np.intp)

        def run() -> None:
            self._call(F, group, hyper, step, pviews, grads, states)
            if store_np is not None:
                store_np[sel] += store_np.dtype.type(1)
            self._commit(c, ids)
        return run


#: ``_FusedOptimizer._undo``'s "no such key"
_ABSENT = object()

#: the types of ``self.state`` whose entries _torch_ext.same_entries may read directly
_PLAIN_DICTS = (dict, collections.defaultdict)


def _same_objects(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(map(operator.is_, a, b))


def _bound_ptrs(state: dict[str, Any] | None,
                getter: Callable[[dict[str, Any]], tuple[Any, ...]],
                dtensor: bool) -> tuple[int, ...] | None:
    try:
        return tuple(map(_local_ptr if dtensor else _data_ptr, getter(state)))
    except (TypeError, KeyError, AttributeError):
        return None


# ---------------------------------------------------------------------------------------------
# The optimizers: torch 2.13's signatures, defaults, argument checks and param_group keys.

# Each constructor checks its arguments in torch's order, with torch's messages, so that the
# first bad argument raises what torch raises.

def _check_lr(lr: Any) -> None:
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")


def _check_eps(eps: Any) -> None:
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")


def _check_weight_decay(weight_decay: Any) -> None:
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def _check_betas(betas: Any) -> None:
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")


class SGD(_FusedOptimizer):
    """torch.optim.SGD (momentum, dampening, Nesterov, weight decay, maximize), fused.

    See Note [SGD's first momentum step]; ``state`` holds ``momentum_buffer`` only, and only
    when ``momentum != 0``, as in torch.
    """

    _with_step = False
    _flag_defaults = {"nesterov": False, "maximize": False, "foreach": None,
                      "differentiable": False, "fused": False}

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 1e-3,
                 momentum: float = 0, dampening: float = 0,
                 weight_decay: float | torch.Tensor = 0, nesterov: bool = False, *,
                 maximize: bool = False, foreach: bool | None = None,
                 differentiable: bool = False, fused: bool | None = None,
                 master_weights: bool = False, stochastic_rounding: bool = False,
                 sr_seed: int = 0, state_dtype: str | None = None) -> None:
        _check_lr(lr)
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        _check_weight_decay(weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        _check_flags(type(self).__name__, foreach=foreach, fused=fused,
                     differentiable=differentiable)
        defaults = {"lr": lr, "momentum": momentum, "dampening": dampening,
                    "weight_decay": weight_decay, "nesterov": nesterov, "maximize": maximize,
                    "foreach": foreach, "differentiable": differentiable, "fused": fused}
        defaults.update(_format_defaults(type(self).__name__, master_weights,
                                         stochastic_rounding, sr_seed, state_dtype))
        super().__init__(params, defaults)

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        return {"lr": _scalar(group["lr"]), "momentum": group["momentum"],
                "dampening": group["dampening"], "nesterov": group["nesterov"],
                "weight_decay": _scalar(group["weight_decay"]), "maximize": group["maximize"]}

    def _call(self, fn: Any, group: dict[str, Any], hyper: dict[str, Any], step: Any,
              params: list[np.ndarray], grads: list[np.ndarray],
              states: dict[str, list[np.ndarray]]) -> None:
        fn.sgd_(params, grads, states.get("momentum_buffer"), step=step, **hyper)

    def _init_state(self, group: dict[str, Any], p: torch.Tensor) -> dict[str, Any]:
        return {}

    def _missing_state(self, c: _GroupCache, i: int, p: torch.Tensor, name: str,
                       state: dict[str, Any]) -> torch.Tensor:
        # torch's "no buffer yet": a new buffer that the kernel fills at step 1.
        c.pending[i] = t = self._new_state(p, name)
        return t

    def _step_key(self, c: _GroupCache, i: int, new_step: Any) -> int | None:
        if not c.names:
            return None
        return 1 if i in c.pending else 2

    def _format_kernel_step(self, names: tuple[str, ...], fresh: set[str],
                            step: float | None) -> Any:
        if not names:
            return None
        return 1 if "momentum_buffer" in fresh else 2

    def _commit(self, c: _GroupCache, ids: list[int]) -> None:
        if not c.pending:
            return
        params = c.group["params"]
        for i in ids:
            buf = c.pending.pop(i, None)
            if buf is not None:
                self.state[params[i]]["momentum_buffer"] = buf
                c.dicts[i] = self.state[params[i]]
                c.bound[i] = (_local_ptr(buf),)
                c.full = None
                c.prefetch = None
                c.spans = None


class RMSprop(_FusedOptimizer):
    """torch.optim.RMSprop (centered, momentum, weight decay, maximize), fused."""

    _flag_defaults = {"momentum": 0, "centered": False, "foreach": None, "maximize": False,
                      "differentiable": False, "capturable": False}

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 1e-2,
                 alpha: float = 0.99, eps: float = 1e-8, weight_decay: float = 0,
                 momentum: float = 0, centered: bool = False, capturable: bool = False,
                 foreach: bool | None = None, maximize: bool = False,
                 differentiable: bool = False,
                 *, master_weights: bool = False, stochastic_rounding: bool = False,
                 sr_seed: int = 0, state_dtype: str | None = None) -> None:
        _check_lr(lr)
        _check_eps(eps)
        if not 0.0 <= momentum:
            raise ValueError(f"Invalid momentum value: {momentum}")
        _check_weight_decay(weight_decay)
        if not 0.0 <= alpha:
            raise ValueError(f"Invalid alpha value: {alpha}")
        _check_flags(type(self).__name__, foreach=foreach, capturable=capturable,
                     differentiable=differentiable)
        defaults = {"lr": lr, "momentum": momentum, "alpha": alpha, "eps": eps,
                    "centered": centered, "weight_decay": weight_decay,
                    "capturable": capturable, "foreach": foreach, "maximize": maximize,
                    "differentiable": differentiable}
        defaults.update(_format_defaults(type(self).__name__, master_weights,
                                         stochastic_rounding, sr_seed, state_dtype))
        super().__init__(params, defaults)

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return (("square_avg",) + (("momentum_buffer",) if group["momentum"] > 0 else ())
                + (("grad_avg",) if group["centered"] else ()))

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        return {"lr": _scalar(group["lr"]), "alpha": group["alpha"], "eps": group["eps"],
                "weight_decay": group["weight_decay"], "momentum": group["momentum"],
                "centered": group["centered"], "maximize": group["maximize"]}

    def _call(self, fn: Any, group: dict[str, Any], hyper: dict[str, Any], step: Any,
              params: list[np.ndarray], grads: list[np.ndarray],
              states: dict[str, list[np.ndarray]]) -> None:
        fn.rmsprop_(params, grads, states["square_avg"], states.get("grad_avg"),
                   states.get("momentum_buffer"), **hyper)


class Adam(_FusedOptimizer):
    """torch.optim.Adam (AMSGrad, L2 or decoupled weight decay, maximize), fused."""

    _kernel_step = True
    _flag_defaults = {"amsgrad": False, "maximize": False, "foreach": None,
                      "capturable": False, "differentiable": False,
                      "decoupled_weight_decay": False, "fused": None}

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 1e-3,
                 betas: tuple[float | torch.Tensor, float | torch.Tensor] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, amsgrad: bool = False, *,
                 foreach: bool | None = None, maximize: bool = False, capturable: bool = False,
                 differentiable: bool = False, fused: bool | None = None,
                 decoupled_weight_decay: bool = False,
                 master_weights: bool = False, stochastic_rounding: bool = False,
                 sr_seed: int = 0, state_dtype: str | None = None) -> None:
        if isinstance(lr, torch.Tensor) and foreach and not capturable:
            raise ValueError(
                "lr as a Tensor is not supported for capturable=False and foreach=True")
        _check_lr(lr)
        _check_eps(eps)
        _check_betas(betas)
        _check_weight_decay(weight_decay)
        # torch's rule: isinstance(b, float) (a Python int is refused) or both Tensors.
        if not (all(isinstance(b, float) for b in betas[:2])
                or all(isinstance(b, torch.Tensor) for b in betas[:2])):
            raise ValueError("betas must be either both floats or both Tensors")
        for k in (0, 1):
            if isinstance(betas[k], torch.Tensor):
                if foreach and not capturable:
                    raise ValueError(f"betas[{k}] as a Tensor is not supported for "
                                     f"capturable=False and foreach=True")
                if betas[k].numel() != 1:
                    raise ValueError(f"Tensor betas[{k}] must be 1-element")
        _check_flags(type(self).__name__, foreach=foreach, fused=fused, capturable=capturable,
                     differentiable=differentiable)
        # torch keeps a Tensor beta as a 0-d tensor (_to_scalar), a float as it is.
        betas = tuple(b.squeeze() if isinstance(b, torch.Tensor) and b.dim() != 0 else b
                      for b in betas)
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                    "amsgrad": amsgrad, "maximize": maximize, "foreach": foreach,
                    "capturable": capturable, "differentiable": differentiable, "fused": fused,
                    "decoupled_weight_decay": decoupled_weight_decay}
        defaults.update(_format_defaults(type(self).__name__, master_weights,
                                         stochastic_rounding, sr_seed, state_dtype))
        super().__init__(params, defaults)

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ())

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        beta1, beta2 = group["betas"]
        return {"lr": _scalar(group["lr"]), "beta1": _scalar(beta1), "beta2": _scalar(beta2),
                "eps": group["eps"], "weight_decay": group["weight_decay"],
                "amsgrad": group["amsgrad"], "maximize": group["maximize"]}

    def _call(self, fn: Any, group: dict[str, Any], hyper: dict[str, Any], step: Any,
              params: list[np.ndarray], grads: list[np.ndarray],
              states: dict[str, list[np.ndarray]]) -> None:
        update = fn.adamw_ if group["decoupled_weight_decay"] else fn.adam_
        update(params, grads, states["exp_avg"], states["exp_avg_sq"], step=step,
               max_exp_avg_sqs=states.get("max_exp_avg_sq"), **hyper)


class AdamW(Adam):
    """torch.optim.AdamW: Adam with decoupled weight decay (default 1e-2), fused."""

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 1e-3,
                 betas: tuple[float | torch.Tensor, float | torch.Tensor] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False, foreach: bool | None = None, capturable: bool = False,
                 differentiable: bool = False, fused: bool | None = None,
                 master_weights: bool = False, stochastic_rounding: bool = False,
                 sr_seed: int = 0, state_dtype: str | None = None) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable,
                         differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, master_weights=master_weights,
                         stochastic_rounding=stochastic_rounding, sr_seed=sr_seed,
                         state_dtype=state_dtype)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True


class Adagrad(_FusedOptimizer):
    """torch.optim.Adagrad (lr decay, weight decay, initial accumulator, maximize), fused.

    As in torch, ``state`` (``step`` and ``sum`` at ``initial_accumulator_value``) is created
    for every parameter at construction.
    """

    _kernel_step = True
    _flag_defaults = {"foreach": None, "maximize": False, "differentiable": False,
                      "fused": None}

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 1e-2,
                 lr_decay: float = 0, weight_decay: float = 0,
                 initial_accumulator_value: float = 0, eps: float = 1e-10,
                 foreach: bool | None = None, *, maximize: bool = False,
                 differentiable: bool = False, fused: bool | None = None,
                 master_weights: bool = False, stochastic_rounding: bool = False,
                 sr_seed: int = 0, state_dtype: str | None = None) -> None:
        _check_lr(lr)
        if not 0.0 <= lr_decay:
            raise ValueError(f"Invalid lr_decay value: {lr_decay}")
        _check_weight_decay(weight_decay)
        if not 0.0 <= initial_accumulator_value:
            raise ValueError(
                f"Invalid initial_accumulator_value value: {initial_accumulator_value}")
        _check_eps(eps)
        _check_flags(type(self).__name__, foreach=foreach, fused=fused,
                     differentiable=differentiable)
        defaults = {"lr": lr, "lr_decay": lr_decay, "eps": eps, "weight_decay": weight_decay,
                    "initial_accumulator_value": initial_accumulator_value,
                    "foreach": foreach, "maximize": maximize,
                    "differentiable": differentiable, "fused": fused}
        defaults.update(_format_defaults(type(self).__name__, master_weights,
                                         stochastic_rounding, sr_seed, state_dtype))
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p] = self._init_state(group, p)

    def _new_state(self, p: torch.Tensor, name: str) -> torch.Tensor:
        # torch fills ``sum`` from the constructor's value, whatever the group says.
        return _state_like(p, name, self.defaults["initial_accumulator_value"])

    def _format_init_value(self, group: dict[str, Any], name: str) -> float:
        return float(self.defaults["initial_accumulator_value"])

    def share_memory(self) -> None:
        """Calls tensor.share_memory_() on the state sum tensors."""
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["sum"].share_memory_()

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("sum",)

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        return {"lr": _scalar(group["lr"]), "lr_decay": group["lr_decay"],
                "weight_decay": group["weight_decay"], "eps": group["eps"],
                "maximize": group["maximize"]}

    def _call(self, fn: Any, group: dict[str, Any], hyper: dict[str, Any], step: Any,
              params: list[np.ndarray], grads: list[np.ndarray],
              states: dict[str, list[np.ndarray]]) -> None:
        fn.adagrad_(params, grads, states["sum"], step=step, **hyper)


class Adadelta(_FusedOptimizer):
    """torch.optim.Adadelta (weight decay, maximize), fused."""

    _flag_defaults = {"foreach": None, "maximize": False, "differentiable": False,
                      "capturable": False}

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 1.0, rho: float = 0.9,
                 eps: float = 1e-6, weight_decay: float = 0, foreach: bool | None = None, *,
                 capturable: bool = False, maximize: bool = False,
                 differentiable: bool = False,
                 master_weights: bool = False, stochastic_rounding: bool = False,
                 sr_seed: int = 0, state_dtype: str | None = None) -> None:
        _check_lr(lr)
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"Invalid rho value: {rho}")
        _check_eps(eps)
        _check_weight_decay(weight_decay)
        _check_flags(type(self).__name__, foreach=foreach, capturable=capturable,
                     differentiable=differentiable)
        defaults = {"lr": lr, "rho": rho, "eps": eps, "weight_decay": weight_decay,
                    "maximize": maximize, "capturable": capturable, "foreach": foreach,
                    "differentiable": differentiable}
        defaults.update(_format_defaults(type(self).__name__, master_weights,
                                         stochastic_rounding, sr_seed, state_dtype))
        super().__init__(params, defaults)

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("square_avg", "acc_delta")

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        return {"lr": _scalar(group["lr"]), "rho": group["rho"], "eps": group["eps"],
                "weight_decay": group["weight_decay"], "maximize": group["maximize"]}

    def _call(self, fn: Any, group: dict[str, Any], hyper: dict[str, Any], step: Any,
              params: list[np.ndarray], grads: list[np.ndarray],
              states: dict[str, list[np.ndarray]]) -> None:
        fn.adadelta_(params, grads, states["square_avg"], states["acc_delta"], **hyper)


# ---------------------------------------------------------------------------------------------
# NAdam, RAdam, Adamax, ASGD, Rprop.
#
# Note [Scalar states]
#     NAdam's ``mu_product`` and ASGD's ``eta`` and ``mu`` are 0-d tensors per parameter in
#     torch, created in torch's scalar dtype (``_scalar_dtype()``); torch's load_state_dict
#     casts them to the parameter's dtype, so a group may hold both float32 and float64 ones.
#     Like ``step`` (Note [Steps live in one tensor per group]), each is a 0-d view into a
#     per-group store: one float32 and one float64 1-D tensor per name, the view taken from the
#     store of the tensor's dtype, so that every update rounds exactly as torch's does
#     (``mu_product *= mu`` in the tensor's dtype; ``eta.copy_(torch.as_tensor(...))``, i.e.
#     through the default dtype into the tensor's). A step updates both stores with one NumPy
#     operation each (the unused slot of a parameter is never read).
#     The kernel takes one value of each scalar per call. The params of a group are therefore
#     called in buckets of equal (dtype, step, scalar values): one call in the usual case, more
#     when the values differ (a torch checkpoint whose parameters skipped different steps, or
#     whose scalars were cast to different parameter dtypes). Every bucket's values are checked
#     by the kernel (on empty lists) before the first call of the step.


class _ScalarStore:
    """The scalar states of one param group's params (Note [Scalar states])."""

    __slots__ = ("cache", "tensors", "arrays", "ptrs", "wide")

    def __init__(self, cache: _GroupCache, names: tuple[str, ...]) -> None:
        n = len(cache.ptrs)
        self.cache = cache
        #: name -> (float32 store, float64 store), and their NumPy views
        self.tensors = {name: (torch.zeros(n, dtype=torch.float32),
                               torch.zeros(n, dtype=torch.float64)) for name in names}
        self.arrays = {name: (t32.numpy(), t64.numpy())
                       for name, (t32, t64) in self.tensors.items()}
        #: name -> where ``arrays`` view the stores (Note [Step store moves])
        self.ptrs = {name: (t32.data_ptr(), t64.data_ptr())
                     for name, (t32, t64) in self.tensors.items()}
        #: name -> per param: whether its tensor is a view of the float64 store
        self.wide = {name: np.zeros(n, dtype=bool) for name in names}

    def refresh(self) -> None:
        """View again any store whose memory moved (Note [Step store moves])."""
        for name, (t32, t64) in self.tensors.items():
            ptrs = (t32.data_ptr(), t64.data_ptr())
            if ptrs != self.ptrs[name]:
                self.arrays[name] = (t32.numpy(), t64.numpy())
                self.ptrs[name] = ptrs

    def bind(self, i: int, name: str, value: Any) -> torch.Tensor:
        """Hold ``value`` (param i's ``state[name]`` as found) and return the view to store in
        ``state``: in the value's dtype, or torch's scalar dtype for a non-tensor (as torch's
        ``__setstate__`` converts it)."""
        if isinstance(value, torch.Tensor) and value.dtype in _SUPPORTED_DTYPES:
            wide = value.dtype == torch.float64
        else:
            wide = _scalar_dtype() == torch.float64
        self.wide[name][i] = wide
        self.arrays[name][wide][i] = float(value)
        return self.tensors[name][wide][i]

    def values(self, name: str, sel: np.ndarray) -> np.ndarray:
        """The current values of params ``sel``, as float64."""
        narrow, wide = self.arrays[name]
        return np.where(self.wide[name][sel], wide[sel], narrow[sel])

    def write(self, name: str, sel: np.ndarray, narrow: np.ndarray, wide: np.ndarray) -> None:
        self.arrays[name][0][sel] = narrow
        self.arrays[name][1][sel] = wide


class _ScalarStateOptimizer(_FusedOptimizer):
    """A drop-in whose params also have 0-d scalar states (Note [Scalar states]).

    Subclasses set ``_scalar_names`` (torch's order) and define ``_initial_scalars(group)``
    (torch's fresh 0-d tensors), ``_dry_scalars(group, hyper)`` (the kernel's scalar arguments
    for the hyperparameter check) and ``_scalar_plan(group, store, sel, steps)``.
    """

    _kernel_step = True
    _scalar_names: tuple[str, ...] = ()

    def _reset_caches(self) -> None:
        super()._reset_caches()
        self._scalar_stores: dict[int, _ScalarStore] = {}

    def _initial_scalars(self, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _dry_scalars(self, group: dict[str, Any], hyper: dict[str, Any]) -> dict[str, float]:
        raise NotImplementedError

    def _scalar_plan(self, group: dict[str, Any], store: _ScalarStore, sel: np.ndarray,
                     steps: np.ndarray
                     ) -> tuple[dict[str, np.ndarray], dict[str, tuple[Any, ...]]]:
        """For params ``sel`` about to take steps ``steps``: the kernel's scalar arguments per
        param (name -> float64 array) and the scalars after the step (name -> (float32 array,
        float64 array), the values for either store)."""
        raise NotImplementedError

    def _init_state(self, group: dict[str, Any], p: torch.Tensor) -> dict[str, Any]:
        state: dict[str, Any] = {"step": torch.zeros((), dtype=_scalar_dtype())}
        state.update(self._initial_scalars(group))
        for name in self._state_names(group):
            state[name] = self._new_state(p, name)
        return state

    def _keys(self, names: tuple[str, ...]) -> tuple[str, ...]:
        return names + ("step",) + self._scalar_names

    def _store(self, c: _GroupCache) -> _ScalarStore:
        store = self._scalar_stores.get(id(c.group))
        if store is None or store.cache is not c:
            store = self._scalar_stores[id(c.group)] = _ScalarStore(c, self._scalar_names)
        return store

    def _bind(self, group: dict[str, Any], c: _GroupCache, i: int, p: torch.Tensor) -> None:
        super()._bind(group, c, i, p)
        state = self.state[p]
        store = self._store(c)
        ptrs = []
        fresh = None
        for name in self._scalar_names:
            value = state.get(name)
            if value is None:  # e.g. a hand-made state: start it as torch would
                fresh = fresh or self._initial_scalars(group)
                value = fresh[name]
            view = store.bind(i, name, value)
            self._enter(state, name, view)
            ptrs.append(view.data_ptr())
        if c.bound[i] is not None:
            c.bound[i] += tuple(ptrs)

    def _kernel_args(self, group: dict[str, Any], hyper: dict[str, Any],
                     step: int | tuple[Any, ...]) -> tuple[int, dict[str, float]]:
        """``_call``'s step: a planned ``(step, *scalars)``, or the hyperparameter check's 1."""
        if isinstance(step, tuple):
            return step[0], dict(zip(self._scalar_names, step[1:]))
        return step, self._dry_scalars(group, hyper)

    def _plan(self, item: _Gathered) -> list[Callable[[], None]]:
        group, c, idx, hyper = item.group, item.cache, item.idx, item.hyper
        gv = self._views(item)
        everyone = len(idx) == len(group["params"])
        self._store(c).refresh()  # before _check_bound may write to it
        self._check_bound(group, c, idx, everyone)
        if everyone:  # the base class's cache of the bound state
            _complete(c, len(self._keys(c.names)))
        store = self._store(c)
        sel = np.asarray(idx, dtype=np.intp)
        steps = c.store_np[sel] + c.store_np.dtype.type(1)
        args, after = self._scalar_plan(group, store, sel, steps)
        columns = [args[name] for name in self._scalar_names]
        # (dtype, (step, *scalars)) -> positions in idx
        buckets: dict[tuple[Any, ...], list[int]] = {}
        if c.one_dtype and _distinct(steps) == 1 and all(_distinct(a) == 1 for a in columns):
            key = (int(steps[0]),) + tuple(float(a[0]) for a in columns)
            buckets[(None, key)] = list(range(len(idx)))
        else:
            for j, i in enumerate(idx):
                key = (int(steps[j]),) + tuple(float(a[j]) for a in columns)
                buckets.setdefault((c.kinds[i], key), []).append(j)
        calls = []
        for (_, key), js in buckets.items():
            try:  # the scalars, checked by the kernel before anything is written
                self._call(F, group, hyper, key, [], [], {name: [] for name in c.names})
            except (TypeError, ValueError) as err:
                raise type(err)(f"{self._where(item.gi)}: {err}") from None
            ids = [idx[j] for j in js]
            if len(js) == len(c.views):
                states = c.full.states
            else:
                states = {name: [c.svs[i][k] for i in ids] for k, name in enumerate(c.names)}
            run = self._split_call(group, c, hyper, key, ids, [gv[j] for j in js], states)
            picked = np.asarray(js, dtype=np.intp)
            calls.append(_then_write(run, store, sel[picked],
                                     {name: (narrow[picked], wide[picked])
                                      for name, (narrow, wide) in after.items()}))
        return calls


def _distinct(values: np.ndarray) -> int:
    """0, 1 or 2: no value, one value, more than one."""
    return 0 if values.size == 0 else 1 + int(values.min() != values.max())


def _then_write(run: Callable[[], None], store: _ScalarStore, sel: np.ndarray,
                after: dict[str, tuple[np.ndarray, np.ndarray]]) -> Callable[[], None]:
    def call() -> None:
        run()
        for name, (narrow, wide) in after.items():
            store.write(name, sel, narrow, wide)
    return call


class NAdam(_ScalarStateOptimizer):
    """torch.optim.NAdam (momentum decay, L2 or decoupled weight decay, maximize), fused.

    ``state`` holds ``step``, ``mu_product`` (Note [Scalar states]), ``exp_avg`` and
    ``exp_avg_sq``, as in torch.
    """

    _scalar_names = ("mu_product",)
    _flag_defaults = {"maximize": False, "foreach": None, "capturable": False,
                      "differentiable": False, "decoupled_weight_decay": False}

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 2e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, momentum_decay: float = 4e-3,
                 decoupled_weight_decay: bool = False, *, foreach: bool | None = None,
                 maximize: bool = False, capturable: bool = False,
                 differentiable: bool = False,
                 master_weights: bool = False, stochastic_rounding: bool = False,
                 sr_seed: int = 0, state_dtype: str | None = None) -> None:
        _check_flags(type(self).__name__, foreach=foreach, capturable=capturable,
                           differentiable=differentiable)
        _check_lr(lr)
        _check_eps(eps)
        _check_betas(betas)
        _check_weight_decay(weight_decay)
        if not 0.0 <= momentum_decay:
            raise ValueError(f"Invalid momentum_decay value: {momentum_decay}")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                    "momentum_decay": momentum_decay,
                    "decoupled_weight_decay": decoupled_weight_decay, "maximize": maximize,
                    "foreach": foreach, "capturable": capturable,
                    "differentiable": differentiable}
        defaults.update(_format_defaults(type(self).__name__, master_weights,
                                         stochastic_rounding, sr_seed, state_dtype))
        super().__init__(params, defaults)

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        beta1, beta2 = group["betas"]
        return {"lr": _scalar(group["lr"]), "beta1": _scalar(beta1), "beta2": _scalar(beta2),
                "eps": group["eps"], "weight_decay": group["weight_decay"],
                "momentum_decay": group["momentum_decay"],
                "decoupled_weight_decay": group["decoupled_weight_decay"],
                "maximize": group["maximize"]}

    def _initial_scalars(self, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"mu_product": torch.tensor(1.0, dtype=_scalar_dtype())}

    def _dry_scalars(self, group: dict[str, Any], hyper: dict[str, Any]) -> dict[str, float]:
        return {"mu_product": F.nadam_mu(1.0, hyper["beta1"], hyper["momentum_decay"])}

    def _format_scalars(self, group: dict[str, Any], state: dict[str, Any] | None,
                        step: float) -> tuple[tuple[float, ...], dict[str, torch.Tensor]]:
        # torch: mu_product *= mu, in the tensor's dtype, before the update reads it.
        mp = state.get("mu_product") if state else None
        if not isinstance(mp, torch.Tensor):
            mp = self._initial_scalars(group)["mu_product"]
        mu = F.nadam_mu(step, _scalar(group["betas"][0]), group["momentum_decay"])
        new = mp.detach() * mu
        return (float(new),), {"mu_product": new}

    def _scalar_plan(self, group: dict[str, Any], store: _ScalarStore, sel: np.ndarray,
                     steps: np.ndarray
                     ) -> tuple[dict[str, np.ndarray], dict[str, tuple[Any, ...]]]:
        # torch: mu_product *= mu (in the tensor's dtype) BEFORE the update, which reads it.
        beta1, momentum_decay = _scalar(group["betas"][0]), group["momentum_decay"]
        narrow, wide = (a[sel] for a in store.arrays["mu_product"])
        if _distinct(steps) == 1:
            mu: Any = F.nadam_mu(float(steps[0]), beta1, momentum_decay)
            narrow, wide = narrow * mu, wide * mu
        else:
            mu = np.array([F.nadam_mu(float(s), beta1, momentum_decay) for s in steps])
            narrow, wide = narrow * mu.astype(np.float32), wide * mu
        args = np.where(store.wide["mu_product"][sel], wide, narrow)
        return {"mu_product": args}, {"mu_product": (narrow, wide)}

    def _call(self, fn: Any, group: dict[str, Any], hyper: dict[str, Any], step: Any,
              params: list[np.ndarray], grads: list[np.ndarray],
              states: dict[str, list[np.ndarray]]) -> None:
        step, scalars = self._kernel_args(group, hyper, step)
        fn.nadam_(params, grads, states["exp_avg"], states["exp_avg_sq"], step=step, **scalars,
                 **hyper)


class RAdam(_FusedOptimizer):
    """torch.optim.RAdam (rectification, L2 or decoupled weight decay, maximize), fused."""

    _kernel_step = True
    _flag_defaults = {"foreach": None, "maximize": False, "differentiable": False,
                      "decoupled_weight_decay": False, "capturable": False}

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, decoupled_weight_decay: bool = False, *,
                 foreach: bool | None = None, maximize: bool = False, capturable: bool = False,
                 differentiable: bool = False,
                 master_weights: bool = False, stochastic_rounding: bool = False,
                 sr_seed: int = 0, state_dtype: str | None = None) -> None:
        _check_flags(type(self).__name__, foreach=foreach, capturable=capturable,
                           differentiable=differentiable)
        _check_lr(lr)
        _check_eps(eps)
        _check_betas(betas)
        _check_weight_decay(weight_decay)
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                    "maximize": maximize, "foreach": foreach, "capturable": capturable,
                    "decoupled_weight_decay": decoupled_weight_decay,
                    "differentiable": differentiable}
        defaults.update(_format_defaults(type(self).__name__, master_weights,
                                         stochastic_rounding, sr_seed, state_dtype))
        super().__init__(params, defaults)

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        beta1, beta2 = group["betas"]
        return {"lr": _scalar(group["lr"]), "beta1": _scalar(beta1), "beta2": _scalar(beta2),
                "eps": group["eps"], "weight_decay": group["weight_decay"],
                "decoupled_weight_decay": group["decoupled_weight_decay"],
                "maximize": group["maximize"]}

    def _call(self, fn: Any, group: dict[str, Any], hyper: dict[str, Any], step: Any,
              params: list[np.ndarray], grads: list[np.ndarray],
              states: dict[str, list[np.ndarray]]) -> None:
        fn.radam_(params, grads, states["exp_avg"], states["exp_avg_sq"], step=step, **hyper)


class Adamax(_FusedOptimizer):
    """torch.optim.Adamax (weight decay, maximize), fused."""

    _kernel_step = True
    _flag_defaults = {"foreach": None, "maximize": False, "differentiable": False,
                      "capturable": False}

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 2e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, foreach: bool | None = None, *,
                 maximize: bool = False, differentiable: bool = False,
                 capturable: bool = False,
                 master_weights: bool = False, stochastic_rounding: bool = False,
                 sr_seed: int = 0, state_dtype: str | None = None) -> None:
        _check_flags(type(self).__name__, foreach=foreach, capturable=capturable,
                           differentiable=differentiable)
        _check_lr(lr)
        _check_eps(eps)
        _check_betas(betas)
        _check_weight_decay(weight_decay)
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                    "foreach": foreach, "maximize": maximize, "differentiable": differentiable,
                    "capturable": capturable}
        defaults.update(_format_defaults(type(self).__name__, master_weights,
                                         stochastic_rounding, sr_seed, state_dtype))
        super().__init__(params, defaults)

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("exp_avg", "exp_inf")

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        beta1, beta2 = group["betas"]
        return {"lr": _scalar(group["lr"]), "beta1": _scalar(beta1), "beta2": _scalar(beta2),
                "eps": group["eps"], "weight_decay": group["weight_decay"],
                "maximize": group["maximize"]}

    def _call(self, fn: Any, group: dict[str, Any], hyper: dict[str, Any], step: Any,
              params: list[np.ndarray], grads: list[np.ndarray],
              states: dict[str, list[np.ndarray]]) -> None:
        fn.adamax_(params, grads, states["exp_avg"], states["exp_inf"], step=step, **hyper)


class ASGD(_ScalarStateOptimizer):
    """torch.optim.ASGD (averaging from step ``t0``, weight decay, maximize), fused.

    ``state`` holds ``step``, ``eta``, ``mu`` (Note [Scalar states]) and ``ax``, as in torch.
    Unlike torch, a negative ``lambd`` is refused (the kernel's range is ``lambd >= 0``).
    """

    _scalar_names = ("eta", "mu")
    _flag_defaults = {"foreach": None, "maximize": False, "differentiable": False,
                      "capturable": False}

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 1e-2,
                 lambd: float = 1e-4, alpha: float = 0.75, t0: float = 1e6,
                 weight_decay: float = 0, foreach: bool | None = None, maximize: bool = False,
                 differentiable: bool = False, capturable: bool = False,
                 *, master_weights: bool = False, stochastic_rounding: bool = False,
                 sr_seed: int = 0, state_dtype: str | None = None) -> None:
        _check_flags(type(self).__name__, foreach=foreach, capturable=capturable,
                           differentiable=differentiable)
        _check_lr(lr)
        _check_weight_decay(weight_decay)
        defaults = {"lr": lr, "lambd": lambd, "alpha": alpha, "t0": t0,
                    "weight_decay": weight_decay, "foreach": foreach, "maximize": maximize,
                    "differentiable": differentiable, "capturable": capturable}
        defaults.update(_format_defaults(type(self).__name__, master_weights,
                                         stochastic_rounding, sr_seed, state_dtype))
        super().__init__(params, defaults)

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("ax",)

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        return {"lambd": group["lambd"], "weight_decay": group["weight_decay"],
                "maximize": group["maximize"]}

    def _initial_scalars(self, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        lr = group["lr"]
        if isinstance(lr, torch.Tensor) and lr.dim() != 0:
            lr = lr.squeeze()
        return {"eta": torch.as_tensor(lr, dtype=_scalar_dtype()).clone().detach(),
                "mu": torch.ones((), dtype=_scalar_dtype())}

    def _dry_scalars(self, group: dict[str, Any], hyper: dict[str, Any]) -> dict[str, float]:
        return {"eta": float(_scalar(group["lr"])), "mu": 1.0}

    def _format_scalars(self, group: dict[str, Any], state: dict[str, Any] | None,
                        step: float) -> tuple[tuple[float, ...], dict[str, torch.Tensor]]:
        # The update reads the current eta and mu; torch then sets them from the step count.
        fresh = None
        now = []
        for name in self._scalar_names:
            value = state.get(name) if state else None
            if not isinstance(value, torch.Tensor):
                fresh = fresh or self._initial_scalars(group)
                value = fresh[name]
            now.append(value)
        lr, lambd, alpha, t0 = group["lr"], group["lambd"], group["alpha"], group["t0"]
        if isinstance(lr, torch.Tensor) and lr.dim() != 0:
            lr = lr.squeeze()
        after = {"eta": now[0].detach().clone().copy_(
                     torch.as_tensor(lr / ((1 + lambd * lr * step) ** alpha))),
                 "mu": now[1].detach().clone().copy_(torch.as_tensor(1 / max(1, step - t0)))}
        return (float(now[0]), float(now[1])), after

    def _scalar_plan(self, group: dict[str, Any], store: _ScalarStore, sel: np.ndarray,
                     steps: np.ndarray
                     ) -> tuple[dict[str, np.ndarray], dict[str, tuple[Any, ...]]]:
        # The update reads the current eta and mu; torch then sets them from the step count,
        # computed exactly as torch does (a tensor lr computes in its dtype) and rounded through
        # the default dtype (torch.as_tensor) into each tensor's dtype.
        lr, lambd, alpha, t0 = group["lr"], group["lambd"], group["alpha"], group["t0"]
        if isinstance(lr, torch.Tensor) and lr.dim() != 0:
            lr = lr.squeeze()
        after: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        values = {}
        for s in np.unique(steps).tolist():
            eta = torch.as_tensor(lr / ((1 + lambd * lr * s) ** alpha)).item()
            mu = torch.as_tensor(1 / max(1, s - t0)).item()
            values[s] = (eta, mu)
        for k, name in enumerate(self._scalar_names):
            wide = np.array([values[s][k] for s in steps.tolist()], dtype=np.float64)
            after[name] = (wide.astype(np.float32), wide)
        args = {name: store.values(name, sel) for name in self._scalar_names}
        return args, after

    def _call(self, fn: Any, group: dict[str, Any], hyper: dict[str, Any], step: Any,
              params: list[np.ndarray], grads: list[np.ndarray],
              states: dict[str, list[np.ndarray]]) -> None:
        _, scalars = self._kernel_args(group, hyper, step)
        fn.asgd_(params, grads, states["ax"], **scalars, **hyper)


class Rprop(_FusedOptimizer):
    """torch.optim.Rprop (etas, step size bounds, maximize), fused.

    ``step_size`` starts filled with the group's lr when a param's state is created (its first
    step), as in torch; lr does not enter the update otherwise.
    """

    _flag_defaults = {"foreach": None, "maximize": False, "differentiable": False,
                      "capturable": False}

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 1e-2,
                 etas: tuple[float, float] = (0.5, 1.2),
                 step_sizes: tuple[float, float] = (1e-6, 50), *, capturable: bool = False,
                 foreach: bool | None = None, maximize: bool = False,
                 differentiable: bool = False,
                 master_weights: bool = False, stochastic_rounding: bool = False,
                 sr_seed: int = 0, state_dtype: str | None = None) -> None:
        _check_flags(type(self).__name__, foreach=foreach, capturable=capturable,
                           differentiable=differentiable)
        _check_lr(lr)
        if not 0.0 < etas[0] < 1.0 < etas[1]:
            raise ValueError(f"Invalid eta values: {etas[0]}, {etas[1]}")
        defaults = {"lr": lr, "etas": etas, "step_sizes": step_sizes, "foreach": foreach,
                    "maximize": maximize, "differentiable": differentiable,
                    "capturable": capturable}
        defaults.update(_format_defaults(type(self).__name__, master_weights,
                                         stochastic_rounding, sr_seed, state_dtype))
        super().__init__(params, defaults)

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("prev", "step_size")

    def _format_init_value(self, group: dict[str, Any], name: str) -> float:
        return float(_scalar(group["lr"])) if name == "step_size" else 0.0

    def _fresh(self, group: dict[str, Any], p: torch.Tensor, name: str) -> torch.Tensor:
        if name == "step_size":
            return _state_like(p, name, _scalar(group["lr"]))
        return _state_like(p, name)

    def _init_state(self, group: dict[str, Any], p: torch.Tensor) -> dict[str, Any]:
        return {"step": torch.zeros((), dtype=_scalar_dtype()),
                "prev": self._fresh(group, p, "prev"),
                "step_size": self._fresh(group, p, "step_size")}

    def _missing_state(self, c: _GroupCache, i: int, p: torch.Tensor, name: str,
                       state: dict[str, Any]) -> torch.Tensor:
        t = self._fresh(c.group, p, name)
        self._enter(state, name, t)
        return t

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        (etaminus, etaplus), (step_size_min, step_size_max) = group["etas"], group["step_sizes"]
        return {"etaminus": etaminus, "etaplus": etaplus, "step_size_min": step_size_min,
                "step_size_max": step_size_max, "maximize": group["maximize"]}

    def _call(self, fn: Any, group: dict[str, Any], hyper: dict[str, Any], step: Any,
              params: list[np.ndarray], grads: list[np.ndarray],
              states: dict[str, list[np.ndarray]]) -> None:
        fn.rprop_(params, grads, states["prev"], states["step_size"], **hyper)


class Lion(_FusedOptimizer):
    """Lion (Chen et al. 2023; :func:`fastoptim.lion_`), fused. torch.optim has no Lion: the
    arguments and the state (``exp_avg`` only, no ``step``) are lion-pytorch's, so its
    checkpoints load."""

    _with_step = False
    _flag_defaults = {"maximize": False, "foreach": None, "fused": None}

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 1e-4,
                 betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0, *,
                 maximize: bool = False, foreach: bool | None = None,
                 fused: bool | None = None,
                 master_weights: bool = False, stochastic_rounding: bool = False,
                 sr_seed: int = 0, state_dtype: str | None = None) -> None:
        _check_flags(type(self).__name__, foreach=foreach, fused=fused)
        _check_lr(lr)
        _check_betas(betas)
        _check_weight_decay(weight_decay)
        defaults = {"lr": lr, "betas": betas, "weight_decay": weight_decay, "maximize": maximize,
                    "foreach": foreach, "fused": fused}
        defaults.update(_format_defaults(type(self).__name__, master_weights,
                                         stochastic_rounding, sr_seed, state_dtype))
        super().__init__(params, defaults)

    def _init_state(self, group: dict[str, Any], p: torch.Tensor) -> dict[str, Any]:
        return {"exp_avg": self._new_state(p, "exp_avg")}

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("exp_avg",)

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        beta1, beta2 = group["betas"]
        return {"lr": _scalar(group["lr"]), "beta1": _scalar(beta1), "beta2": _scalar(beta2),
                "weight_decay": _scalar(group["weight_decay"]), "maximize": group["maximize"]}

    def _call(self, fn: Any, group: dict[str, Any], hyper: dict[str, Any], step: Any,
              params: list[np.ndarray], grads: list[np.ndarray],
              states: dict[str, list[np.ndarray]]) -> None:
        fn.lion_(params, grads, states["exp_avg"], **hyper)
