# Type stub of the compiled module fastoptim._core (src/cpp/bindings.cpp,
# src/cuda/plan_hooks.cpp), written by hand. tests/test_typing.py checks it against the module:
# the same names (_emulate_kernel exists only where CUDA is built), each rule's positional
# arguments in the order and with the optionality that ``rules`` declares, and the parameter
# names pybind11 reports for the other functions.
#
# Each rule function validates everything itself (Note [one declaration per rule],
# functional.py); the annotations say what it accepts: arrays as in fastoptim.typing, a
# hyperparameter any real number (not bool), a flag a bool.
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from typing_extensions import Unpack

from .typing import ArrayOrList, UpdateOptions

#: rule name -> {"arrays": (params name, grads name), "states": [(name, when)], "step":
#: "none" | "optional" | "required", "hyper": [(name, range)], "flags": [name]}
rules: dict[str, dict[str, Any]]

def sgd(params: ArrayOrList, grads: ArrayOrList, momentum_buffers: ArrayOrList | None, param_copies: ArrayOrList | None,
        step: int | None, lr: float, momentum: float, dampening: float, weight_decay: float,
        nesterov: bool, maximize: bool, /,
        **options: Unpack[UpdateOptions]) -> None: ...
def rmsprop(params: ArrayOrList, grads: ArrayOrList, square_avgs: ArrayOrList,
            grad_avgs: ArrayOrList | None, momentum_buffers: ArrayOrList | None, param_copies: ArrayOrList | None, lr: float,
            alpha: float, eps: float, weight_decay: float, momentum: float, centered: bool,
            maximize: bool, /,
        **options: Unpack[UpdateOptions]) -> None: ...
def adam(params: ArrayOrList, grads: ArrayOrList, exp_avgs: ArrayOrList,
         exp_avg_sqs: ArrayOrList, max_exp_avg_sqs: ArrayOrList | None, param_copies: ArrayOrList | None, step: int, lr: float,
         beta1: float, beta2: float, eps: float, weight_decay: float, amsgrad: bool,
         maximize: bool, decoupled_weight_decay: bool, /,
        **options: Unpack[UpdateOptions]) -> None: ...
def adagrad(params: ArrayOrList, grads: ArrayOrList, state_sums: ArrayOrList, param_copies: ArrayOrList | None, step: int,
            lr: float, lr_decay: float, weight_decay: float, eps: float, maximize: bool,
            /,
        **options: Unpack[UpdateOptions]) -> None: ...
def adadelta(params: ArrayOrList, grads: ArrayOrList, square_avgs: ArrayOrList,
             acc_deltas: ArrayOrList, param_copies: ArrayOrList | None, lr: float, rho: float, eps: float, weight_decay: float,
             maximize: bool, /,
        **options: Unpack[UpdateOptions]) -> None: ...
def nadam(params: ArrayOrList, grads: ArrayOrList, exp_avgs: ArrayOrList,
          exp_avg_sqs: ArrayOrList, param_copies: ArrayOrList | None, step: int, mu_product: float, lr: float, beta1: float,
          beta2: float, eps: float, weight_decay: float, momentum_decay: float,
          decoupled_weight_decay: bool, maximize: bool, /,
        **options: Unpack[UpdateOptions]) -> None: ...
def radam(params: ArrayOrList, grads: ArrayOrList, exp_avgs: ArrayOrList,
          exp_avg_sqs: ArrayOrList, param_copies: ArrayOrList | None, step: int, lr: float, beta1: float, beta2: float,
          eps: float, weight_decay: float, decoupled_weight_decay: bool, maximize: bool,
          /,
        **options: Unpack[UpdateOptions]) -> None: ...
def adamax(params: ArrayOrList, grads: ArrayOrList, exp_avgs: ArrayOrList,
           exp_infs: ArrayOrList, param_copies: ArrayOrList | None, step: int, lr: float, beta1: float, beta2: float, eps: float,
           weight_decay: float, maximize: bool, /,
        **options: Unpack[UpdateOptions]) -> None: ...
def asgd(params: ArrayOrList, grads: ArrayOrList, axs: ArrayOrList, param_copies: ArrayOrList | None, eta: float, mu: float,
         lambd: float, weight_decay: float, maximize: bool, /,
        **options: Unpack[UpdateOptions]) -> None: ...
def rprop(params: ArrayOrList, grads: ArrayOrList, prevs: ArrayOrList, step_sizes: ArrayOrList, param_copies: ArrayOrList | None,
          etaminus: float, etaplus: float, step_size_min: float, step_size_max: float,
          maximize: bool, /,
        **options: Unpack[UpdateOptions]) -> None: ...
def lion(params: ArrayOrList, grads: ArrayOrList, exp_avgs: ArrayOrList, param_copies: ArrayOrList | None, lr: float,
         beta1: float, beta2: float, weight_decay: float, maximize: bool, /,
        **options: Unpack[UpdateOptions]) -> None: ...
def ema(averages: ArrayOrList, values: ArrayOrList, param_copies: ArrayOrList | None, beta: float, /,
        **options: Unpack[UpdateOptions]) -> None: ...

def stream_rmw(streams: list[ArrayOrList], writes: int, scale: float = 0.0) -> None: ...
def stream_bytes(streams: list[NDArray[Any]], modes: list[str], elements: int,
                 prefetch_ahead: int = 0, run: int = 1) -> None: ...
def info() -> dict[str, Any]: ...
def global_norm(grads: ArrayOrList) -> float: ...
def unscale_and_check_(grads: ArrayOrList, inv_scale: float) -> bool: ...
def set_isa(name: str, /) -> None: ...
def set_num_threads(n: int, /) -> None: ...
def get_num_threads() -> int: ...

# fastoptim.torch's pointer path (Note [pointer path], bindings.cpp): args are _core.<rule>'s
# arguments with lists of data pointers for the arrays, params as (dtype, counts, pointers).
def _pointers(rule: str, args: tuple[Any, ...], **options: Unpack[UpdateOptions]) -> None: ...

class _GradPointers:
    """Gradients as data pointers (Note [grad pointers] in src/cpp/bindings.cpp)."""
    def __init__(self, dtype_template: NDArray[Any], pointers: list[int]) -> None: ...
    def __len__(self) -> int: ...
# Note [prefetch hints] (bindings.cpp): one prefetch per int64 address; never dereferenced.
def _prefetch(addresses: NDArray[np.int64] | Sequence[int], /) -> None: ...
# Note [outside runner] (src/cpp/runner.h): a "fastoptim._runner" capsule (the torch extension's
# ``runner``) or None (the pool); returns whether a runner was set before.
def _set_runner(runner: object) -> bool: ...
def _has_runner() -> bool: ...

# Test hooks (tests/test_threads.py, tests/test_launch_plan.py, tests/test_cuda.py,
# tests/test_formats_convert.py).
def _threads_for(total: int) -> int: ...
def _set_prefetch_ahead(elements: int | None) -> int | None: ...
def _last_threads_used() -> int: ...
def _last_run_outside() -> bool: ...
# One ISA's storage conversions (src/cpp/vec.h): float32 -> format bits, and back; with sr_key,
# bfloat16 rounded stochastically, element i with element index sr_index + i.
def _convert(src: NDArray[np.float32], dst: NDArray[np.uint16],
             fmt: Literal["bfloat16", "float16"], isa: str, *, sr_key: int | None = None,
             sr_index: int = 0) -> None: ...
def _widen(src: NDArray[np.uint16], dst: NDArray[np.float32],
           fmt: Literal["bfloat16", "float16"], isa: str) -> None: ...
def _plan_coverage(sizes: Sequence[int], align_offsets: Sequence[int] | None = None, *,
                   itemsize: int | Sequence[int] = 4, slot_mask: int = 31, sm_count: int = 132, chunk: int = 0,
                   block: int = 0, grid: int = 0, group: int = 0,
                   chunks: Sequence[int] | None = None,
                   blocks: Sequence[int] | None = None) -> dict[str, Any]: ...
def _cuda_capture_problem(launch: tuple[str, int], waits: Sequence[tuple[str, int]],
                          names: Sequence[str]) -> str: ...
def _cuda_device_switch(has_context: bool, context_device: int, target: int) -> tuple[bool, bool]: ...
# Only where CUDA is built (FASTOPTIM_HAVE_CUDA).
def _emulate_kernel(rule: str, args: tuple[Any, ...], *, sm_count: int = 132, chunk: int = 0,
                    block: int = 0, grid: int = 0, group: int = 0,
                    options: dict[str, Any] = {}) -> None: ...
