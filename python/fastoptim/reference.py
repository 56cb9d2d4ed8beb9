"""Plain NumPy oracle for the fused kernels of fastoptim.

Every function here has the signature of its twin in ``fastoptim`` (see docs/api.md) and
updates ``params`` and the state arrays in place. Each body is, line by line, the operation
order of torch.optim 2.13's ``_single_tensor_<name>`` (``torch/optim/<name>.py``), so the
results match torch up to floating-point rounding of its fused CPU loops.

Conventions:

* An array argument is one ``numpy.ndarray`` or a list/tuple of them; ``_as_list`` turns the
  first form into the second.
* Arithmetic stays in the arrays' own dtype. Hyperparameters and per-step scalars (bias
  corrections, decayed learning rates) are Python floats, which NumPy 2 treats as "weak"
  scalars, so a float32 array is never promoted to float64.
* ``grads`` are read only; ``g`` is a new array whenever the gradient is negated or decayed.
* Results are written back with in-place operators (``+=``, ``*=``, ``out=``).
* Scalar states that torch keeps as 0-d tensors (NAdam's ``mu_product``, ASGD's ``eta`` and
  ``mu``) are not arrays here: the caller carries them and passes their current value as a
  Python float. ``nadam_mu`` and ``asgd_next`` compute their per-step values exactly as torch
  does; a caller that must match torch bit for bit keeps them in torch's scalar dtype
  (float32 unless torch's default dtype is float64).

This module is a test oracle, not the product: it checks only what it needs to run (a
missing state list or step raises ValueError) and leaves argument validation to the kernels.
"""

from __future__ import annotations

import functools
import inspect
import operator
from collections.abc import Callable
from typing import Any, TypeVar, overload

import numpy as np
from numpy.typing import NDArray

from typing import TYPE_CHECKING

from .typing import ArrayOrList

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .typing import UpdateOptions

__all__ = ["sgd_", "rmsprop_", "adam_", "adamw_", "adagrad_", "adadelta_", "nadam_", "radam_",
           "adamax_", "asgd_", "rprop_", "lion_", "ema_", "nadam_mu", "asgd_next", "global_norm", "unscale_and_check_"]


@overload
def _as_list(arrays: None) -> None: ...
@overload
def _as_list(arrays: ArrayOrList) -> list[Any]: ...


def _as_list(arrays: Any) -> list[Any] | None:
    """Return ``arrays`` as a list: a single array becomes a one-element list."""
    if arrays is None:
        return None
    if isinstance(arrays, np.ndarray):
        return [arrays]
    return list(arrays)


def _require(arrays: ArrayOrList | None, name: str, when: str | None = None) -> list[Any]:
    """Return ``_as_list(arrays)``; raise ValueError when the state list is missing."""
    if arrays is None:
        raise ValueError(f"{name} is required" + (f" {when}" if when else ""))
    return _as_list(arrays)


def _require_step(step: int | None) -> int:
    """Return ``step`` as a Python int >= 1 (the step count after torch's increment)."""
    if step is None:
        raise ValueError("step is required")
    step = operator.index(step)
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    return step


# Note [storage formats]: the kernels compute bfloat16 and float16 data in float32 registers,
# widening at load and rounding to nearest even once at store (kernel_api.h). The oracle does
# the same thing in plain NumPy: every bfloat16/float16 array of a call is widened to a
# float32 working copy, the update runs unchanged on the copies (float32 arithmetic), and each
# written array is stored back with one cast (ml_dtypes and NumPy round to nearest even).
# ``param_copies`` (a copy format's low-precision copies of float32 params) get the params cast
# to their dtype after the update.
def _low_precision(dtype: np.dtype) -> bool:
    # by name: a bfloat16 array exists only where ml_dtypes is imported already, and importing
    # it here would add its start-up time to every `import fastoptim`
    return dtype == np.float16 or dtype.name == "bfloat16"

_F = TypeVar("_F", bound=Callable[..., None])

_OPTIONS = ("grad_scale", "found_inf", "stochastic_rounding", "compensation")


# Note [stochastic rounding] (src/cpp/vec.h): the same counter-based generator in NumPy. The
# key is sr_key_of(seed, counter); element i of the call (its tensor's offset in the
# concatenation of all params plus its index in the tensor) gets the bits sr_hash(key, i), and
# a finite float32 x is stored as the top 16 bits of bits(x) + (sr_hash & 0xFFFF).
_M64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def sr_key_of(seed: int, counter: int) -> int:
    """The 32-bit key of one call's stochastic rounding."""
    return _splitmix64(_splitmix64(seed) ^ counter) >> 32


def sr_hash(key: int, index: NDArray[np.uint64]) -> NDArray[np.uint32]:
    """The random bits of elements ``index`` (uint64) under ``key``."""
    lo = (index & 0xFFFFFFFF).astype(np.uint32)
    hi = (index >> np.uint64(32)).astype(np.uint32)
    h = (lo * np.uint32(0x9E3779B1)) ^ (hi * np.uint32(0x85EBCA77)) ^ np.uint32(key)
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return h


def round_bf16_stochastic(x: NDArray[np.float32], key: int, first_index: int) -> NDArray[Any]:
    """float32 -> bfloat16 bits (uint16) with stochastic rounding; infinities and NaN round
    to nearest (NaN quieted), as the kernels do."""
    bits = np.ascontiguousarray(x, dtype=np.float32).reshape(-1).view(np.uint32)
    index = np.arange(first_index, first_index + bits.size, dtype=np.uint64)
    r = sr_hash(key, index) & np.uint32(0xFFFF)
    special = (bits & np.uint32(0x7FFFFFFF)) >= np.uint32(0x7F800000)
    out = ((bits + np.where(special, np.uint32(0), r)) >> np.uint32(16)).astype(np.uint16)
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    qnan = ((bits >> np.uint32(16)) & np.uint32(0x8000)).astype(np.uint16) | np.uint16(0x7FC0)
    return np.where(nan, qnan, out).reshape(np.shape(x))


def _formats(fn: _F) -> _F:
    """The storage formats and the load/store options around a float32 update (see the Notes
    above): grads are multiplied by float32(1/grad_scale) as they are loaded; found_inf != 0
    skips the call; compensation (Kahan) is added to bfloat16 params before the update and
    receives the rounding error of their store after it; stochastic_rounding=(seed, counter)
    or (seed, counter, first_index) stores bfloat16 params with the counter-based stochastic
    rounding, element indices starting at first_index (0)."""
    signature = inspect.signature(fn)
    first, read_only = next(iter(signature.parameters)), list(signature.parameters)[1]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        options = {name: kwargs.pop(name, None) for name in _OPTIONS}
        if options["found_inf"] is not None and float(options["found_inf"]) != 0:
            return  # nonzero or NaN: torch's fused optimizers leave everything untouched
        bound = signature.bind(*args, **kwargs)
        copies = bound.arguments.pop("param_copies", None)
        stored: list[tuple[np.ndarray, np.ndarray]] = []
        params_work: list[tuple[np.ndarray, np.ndarray]] = []
        comps = _as_list(options["compensation"])
        scale = options["grad_scale"]

        def widen(value: Any, name: str, index: int = 0) -> Any:
            if isinstance(value, np.ndarray):
                if name == read_only and scale is not None:
                    work_type = np.float64 if value.dtype == np.float64 else np.float32
                    work: NDArray[Any] = value.astype(work_type)
                    return work * work.dtype.type(1.0 / float(scale))
                if not _low_precision(value.dtype):
                    return value
                work = value.astype(np.float32)
                if name == first:  # the params
                    if comps is not None:
                        work += comps[index].astype(np.float32)
                    params_work.append((value, work))
                elif name != read_only:
                    stored.append((value, work))
                return work
            if isinstance(value, (list, tuple)) and all(isinstance(v, np.ndarray) for v in value):
                return [widen(v, name, k) for k, v in enumerate(value)]
            return value

        for name, value in list(bound.arguments.items()):
            bound.arguments[name] = widen(value, name)
        fn(*bound.args, **bound.kwargs)
        for original, work in stored:
            original[...] = work.astype(original.dtype)
        offset = 0
        for k, (original, work) in enumerate(params_work):
            if options["stochastic_rounding"] is not None:
                seed, counter, *index0 = options["stochastic_rounding"]
                bits = round_bf16_stochastic(work, sr_key_of(seed, counter),
                                             (index0[0] if index0 else 0) + offset)
                original.view(np.uint16)[...] = bits
            else:
                original[...] = work.astype(original.dtype)
            if comps is not None:
                comps[k][...] = (work - original.astype(np.float32)).astype(comps[k].dtype)
            offset += original.size
        if copies is not None:
            for copy, param in zip(_as_list(copies), _as_list(bound.arguments[first]), strict=True):
                copy[...] = param.astype(copy.dtype)

    return wrapper  # type: ignore[return-value]


@_formats
def sgd_(params: ArrayOrList, grads: ArrayOrList, momentum_buffers: ArrayOrList | None = None,
         *, step: int | None = None, lr: float = 1e-3, momentum: float = 0.0,
         dampening: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
         maximize: bool = False,
         param_copies: ArrayOrList | None = None,
         **options: Unpack[UpdateOptions]) -> None:
    """SGD with optional momentum, dampening, Nesterov momentum and L2 weight decay."""
    lr, momentum, dampening, weight_decay = map(float, (lr, momentum, dampening, weight_decay))
    params, grads = _as_list(params), _as_list(grads)
    if momentum != 0:
        buffer_list = _require(momentum_buffers, "momentum_buffers", "when momentum != 0")
        step = _require_step(step)
    else:
        buffer_list = [None] * len(params)

    for p, grad, buf in zip(params, grads, buffer_list, strict=True):
        g = -grad if maximize else grad
        if weight_decay != 0:
            g = g + weight_decay * p
        if momentum != 0:
            if step == 1:
                # torch's "buffer is None" branch: the first buffer is the gradient itself.
                buf[...] = g
            else:
                buf *= momentum
                buf += (1 - dampening) * g
            if nesterov:
                g = g + momentum * buf
            else:
                g = buf
        p += -lr * g


@_formats
def rmsprop_(params: ArrayOrList, grads: ArrayOrList, square_avgs: ArrayOrList,
             grad_avgs: ArrayOrList | None = None, momentum_buffers: ArrayOrList | None = None,
             *, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
             weight_decay: float = 0.0, momentum: float = 0.0, centered: bool = False,
             maximize: bool = False,
             param_copies: ArrayOrList | None = None,
             **options: Unpack[UpdateOptions]) -> None:
    """RMSprop, optionally centered and with momentum."""
    lr, alpha, eps, weight_decay, momentum = map(float, (lr, alpha, eps, weight_decay, momentum))
    params, grads = _as_list(params), _as_list(grads)
    square_avgs = _require(square_avgs, "square_avgs")
    n = len(params)
    grad_avg_list = (_require(grad_avgs, "grad_avgs", "when centered") if centered
                     else [None] * n)
    if momentum > 0:
        buffer_list = _require(momentum_buffers, "momentum_buffers", "when momentum > 0")
    else:
        buffer_list = [None] * n

    for p, grad, square_avg, grad_avg, buf in zip(
        params, grads, square_avgs, grad_avg_list, buffer_list, strict=True
    ):
        g = -grad if maximize else grad
        if weight_decay != 0:
            g = g + weight_decay * p
        square_avg *= alpha
        square_avg += (1 - alpha) * g * g
        if centered:
            grad_avg += (1 - alpha) * (g - grad_avg)
            avg = np.sqrt(square_avg - grad_avg * grad_avg)
        else:
            avg = np.sqrt(square_avg)
        avg += eps
        if momentum > 0:
            buf *= momentum
            buf += g / avg
            p += -lr * buf
        else:
            p += -lr * g / avg


def _adam(params: ArrayOrList, grads: ArrayOrList, exp_avgs: ArrayOrList,
          exp_avg_sqs: ArrayOrList, max_exp_avg_sqs: ArrayOrList | None, *, step: int,
          lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, amsgrad: bool,
          maximize: bool, decoupled_weight_decay: bool) -> None:
    """Adam and AdamW: torch's ``_single_tensor_adam`` (AdamW passes decoupled=True)."""
    lr, beta1, beta2, eps, weight_decay = map(float, (lr, beta1, beta2, eps, weight_decay))
    step = _require_step(step)
    params, grads = _as_list(params), _as_list(grads)
    exp_avgs = _require(exp_avgs, "exp_avgs")
    exp_avg_sqs = _require(exp_avg_sqs, "exp_avg_sqs")
    if amsgrad:
        max_sq_list = _require(max_exp_avg_sqs, "max_exp_avg_sqs", "when amsgrad=True")
    else:
        max_sq_list = [None] * len(params)

    # Per-step scalars, once per call, as Python floats.
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5

    for p, grad, exp_avg, exp_avg_sq, max_exp_avg_sq in zip(
        params, grads, exp_avgs, exp_avg_sqs, max_sq_list, strict=True
    ):
        g = -grad if maximize else grad
        if weight_decay != 0:
            if decoupled_weight_decay:
                p *= 1 - lr * weight_decay
            else:
                g = g + weight_decay * p
        exp_avg += (1 - beta1) * (g - exp_avg)
        exp_avg_sq *= beta2
        exp_avg_sq += (1 - beta2) * g * g
        if amsgrad:
            np.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
            denom = np.sqrt(max_exp_avg_sq) / bias_correction2_sqrt + eps
        else:
            denom = np.sqrt(exp_avg_sq) / bias_correction2_sqrt + eps
        p += -step_size * exp_avg / denom


@_formats
def adam_(params: ArrayOrList, grads: ArrayOrList, exp_avgs: ArrayOrList,
          exp_avg_sqs: ArrayOrList, *, step: int, lr: float = 1e-3, beta1: float = 0.9,
          beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
          amsgrad: bool = False, max_exp_avg_sqs: ArrayOrList | None = None,
          maximize: bool = False, decoupled_weight_decay: bool = False,
          param_copies: ArrayOrList | None = None,
          **options: Unpack[UpdateOptions]) -> None:
    """Adam, optionally AMSGrad; L2 weight decay added to the gradient, or decoupled
    ``p *= 1 - lr*weight_decay`` (torch.optim.Adam's ``decoupled_weight_decay``)."""
    _adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step=step, lr=lr,
          beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
          maximize=maximize, decoupled_weight_decay=bool(decoupled_weight_decay))


@_formats
def adamw_(params: ArrayOrList, grads: ArrayOrList, exp_avgs: ArrayOrList,
           exp_avg_sqs: ArrayOrList, *, step: int, lr: float = 1e-3, beta1: float = 0.9,
           beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 1e-2,
           amsgrad: bool = False, max_exp_avg_sqs: ArrayOrList | None = None,
           maximize: bool = False,
           param_copies: ArrayOrList | None = None,
           **options: Unpack[UpdateOptions]) -> None:
    """AdamW: Adam with decoupled weight decay ``p *= 1 - lr*weight_decay``."""
    _adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step=step, lr=lr,
          beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
          maximize=maximize, decoupled_weight_decay=True)


@_formats
def adagrad_(params: ArrayOrList, grads: ArrayOrList, state_sums: ArrayOrList, *, step: int,
             lr: float = 1e-2, lr_decay: float = 0.0, weight_decay: float = 0.0,
             eps: float = 1e-10, maximize: bool = False,
             param_copies: ArrayOrList | None = None,
             **options: Unpack[UpdateOptions]) -> None:
    """Adagrad with learning-rate decay ``clr = lr / (1 + (step-1)*lr_decay)``."""
    lr, lr_decay, weight_decay, eps = map(float, (lr, lr_decay, weight_decay, eps))
    step = _require_step(step)
    params, grads = _as_list(params), _as_list(grads)
    state_sums = _require(state_sums, "state_sums")

    clr = lr / (1 + (step - 1) * lr_decay)

    for p, grad, state_sum in zip(params, grads, state_sums, strict=True):
        g = -grad if maximize else grad
        if weight_decay != 0:
            g = g + weight_decay * p
        state_sum += g * g
        std = np.sqrt(state_sum) + eps
        p += -clr * g / std


@_formats
def adadelta_(params: ArrayOrList, grads: ArrayOrList, square_avgs: ArrayOrList,
              acc_deltas: ArrayOrList, *, lr: float = 1.0, rho: float = 0.9, eps: float = 1e-6,
              weight_decay: float = 0.0, maximize: bool = False,
              param_copies: ArrayOrList | None = None,
              **options: Unpack[UpdateOptions]) -> None:
    """Adadelta."""
    lr, rho, eps, weight_decay = map(float, (lr, rho, eps, weight_decay))
    params, grads = _as_list(params), _as_list(grads)
    square_avgs = _require(square_avgs, "square_avgs")
    acc_deltas = _require(acc_deltas, "acc_deltas")

    for p, grad, square_avg, acc_delta in zip(params, grads, square_avgs, acc_deltas,
                                              strict=True):
        g = -grad if maximize else grad
        if weight_decay != 0:
            g = g + weight_decay * p
        square_avg *= rho
        square_avg += (1 - rho) * g * g
        std = np.sqrt(square_avg + eps)
        delta = np.sqrt(acc_delta + eps)
        delta = delta / std * g
        acc_delta *= rho
        acc_delta += (1 - rho) * delta * delta
        p += -lr * delta


def nadam_mu(step: float, beta1: float, momentum_decay: float) -> float:
    """NAdam's momentum cache ``mu_t = beta1*(1 - 0.5*0.96**(t*momentum_decay))``, a float.

    torch multiplies its 0-d ``mu_product`` state by ``nadam_mu(step, ...)`` before the update
    of step ``step``; ``nadam_`` takes that product (this step's mu included).
    """
    mu: float = float(beta1) * (1.0 - 0.5 * (0.96 ** (step * float(momentum_decay))))
    return mu


@_formats
def nadam_(params: ArrayOrList, grads: ArrayOrList, exp_avgs: ArrayOrList,
           exp_avg_sqs: ArrayOrList, *, step: int, mu_product: float, lr: float = 2e-3,
           beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
           weight_decay: float = 0.0, momentum_decay: float = 4e-3,
           decoupled_weight_decay: bool = False, maximize: bool = False,
           param_copies: ArrayOrList | None = None,
           **options: Unpack[UpdateOptions]) -> None:
    """NAdam (Dozat 2016) with torch's momentum decay schedule.

    ``mu_product`` is ``mu_1 * ... * mu_step`` (``nadam_mu``), this step's mu included.
    """
    lr, beta1, beta2, eps, weight_decay, momentum_decay = map(
        float, (lr, beta1, beta2, eps, weight_decay, momentum_decay))
    step = _require_step(step)
    if mu_product is None:
        raise ValueError("mu_product is required")
    mu_product = float(mu_product)
    params, grads = _as_list(params), _as_list(grads)
    exp_avgs = _require(exp_avgs, "exp_avgs")
    exp_avg_sqs = _require(exp_avg_sqs, "exp_avg_sqs")

    bias_correction2 = 1 - beta2**step
    mu = nadam_mu(step, beta1, momentum_decay)
    mu_next = nadam_mu(step + 1, beta1, momentum_decay)
    mu_product_next = mu_product * mu_next
    grad_coef = -lr * (1.0 - mu) / (1.0 - mu_product)
    exp_avg_coef = (-lr * mu_next) / (1.0 - mu_product_next)

    for p, grad, exp_avg, exp_avg_sq in zip(params, grads, exp_avgs, exp_avg_sqs, strict=True):
        g = -grad if maximize else grad
        if weight_decay != 0:
            if decoupled_weight_decay:
                p *= 1 - lr * weight_decay
            else:
                g = g + weight_decay * p
        exp_avg += (1 - beta1) * (g - exp_avg)
        exp_avg_sq *= beta2
        exp_avg_sq += (1 - beta2) * g * g
        denom = np.sqrt(exp_avg_sq / bias_correction2)
        denom += eps
        p += grad_coef * g / denom
        p += exp_avg_coef * exp_avg / denom


@_formats
def radam_(params: ArrayOrList, grads: ArrayOrList, exp_avgs: ArrayOrList,
           exp_avg_sqs: ArrayOrList, *, step: int, lr: float = 1e-3, beta1: float = 0.9,
           beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
           decoupled_weight_decay: bool = False, maximize: bool = False,
           param_copies: ArrayOrList | None = None,
           **options: Unpack[UpdateOptions]) -> None:
    """RAdam (Liu et al. 2019): Adam with the variance rectified once ``rho_t > 5``; before
    that (the first steps), SGD with the bias-corrected momentum."""
    lr, beta1, beta2, eps, weight_decay = map(float, (lr, beta1, beta2, eps, weight_decay))
    step = _require_step(step)
    params, grads = _as_list(params), _as_list(grads)
    exp_avgs = _require(exp_avgs, "exp_avgs")
    exp_avg_sqs = _require(exp_avg_sqs, "exp_avg_sqs")

    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    # The maximum length of the approximated SMA, and its length at this step.
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * (beta2**step) / bias_correction2
    rectified = rho_t > 5.0
    if rectified:
        rect = ((rho_t - 4) * (rho_t - 2) * rho_inf
                / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
        bias_correction2_sqrt = bias_correction2**0.5

    for p, grad, exp_avg, exp_avg_sq in zip(params, grads, exp_avgs, exp_avg_sqs, strict=True):
        g = -grad if maximize else grad
        if weight_decay != 0:
            if decoupled_weight_decay:
                p *= 1 - lr * weight_decay
            else:
                g = g + weight_decay * p
        exp_avg += (1 - beta1) * (g - exp_avg)
        exp_avg_sq *= beta2
        exp_avg_sq += (1 - beta2) * g * g
        bias_corrected_exp_avg = exp_avg / bias_correction1
        if rectified:
            # torch's ``float / tensor`` is ``tensor.reciprocal() * float``: two roundings.
            adaptive_lr = (1 / (np.sqrt(exp_avg_sq) + eps)) * bias_correction2_sqrt
            p -= bias_corrected_exp_avg * lr * adaptive_lr * rect
        else:
            p -= bias_corrected_exp_avg * lr


@_formats
def adamax_(params: ArrayOrList, grads: ArrayOrList, exp_avgs: ArrayOrList,
            exp_infs: ArrayOrList, *, step: int, lr: float = 2e-3, beta1: float = 0.9,
            beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
            maximize: bool = False,
            param_copies: ArrayOrList | None = None,
            **options: Unpack[UpdateOptions]) -> None:
    """Adamax (Kingma & Ba 2015, sec. 7): Adam with the infinity norm ``max(beta2*u, |g|+eps)``."""
    lr, beta1, beta2, eps, weight_decay = map(float, (lr, beta1, beta2, eps, weight_decay))
    step = _require_step(step)
    params, grads = _as_list(params), _as_list(grads)
    exp_avgs = _require(exp_avgs, "exp_avgs")
    exp_infs = _require(exp_infs, "exp_infs")

    clr = lr / (1 - beta1**step)

    for p, grad, exp_avg, exp_inf in zip(params, grads, exp_avgs, exp_infs, strict=True):
        g = -grad if maximize else grad
        if weight_decay != 0:
            g = g + weight_decay * p
        exp_avg += (1 - beta1) * (g - exp_avg)
        exp_inf *= beta2
        # NaN in either operand propagates (np.maximum, like torch.maximum).
        np.maximum(exp_inf, np.abs(g) + eps, out=exp_inf)
        p += -clr * exp_avg / exp_inf


def asgd_next(step: float, lr: float, lambd: float, alpha: float,
              t0: float) -> tuple[float, float]:
    """ASGD's ``(eta, mu)`` after step ``step``, as torch sets its 0-d states (Python floats):
    ``eta = lr / (1 + lambd*lr*step)**alpha``, ``mu = 1 / max(1, step - t0)``."""
    lr, lambd, alpha, t0 = map(float, (lr, lambd, alpha, t0))
    eta = lr / ((1 + lambd * lr * step) ** alpha)
    mu = 1 / max(1, step - t0)
    return eta, float(mu)


@_formats
def asgd_(params: ArrayOrList, grads: ArrayOrList, axs: ArrayOrList, *, eta: float, mu: float,
          lr: float = 1e-2, lambd: float = 1e-4, alpha: float = 0.75, t0: float = 1e6,
          weight_decay: float = 0.0, maximize: bool = False,
          param_copies: ArrayOrList | None = None,
          **options: Unpack[UpdateOptions]) -> None:
    """Averaged SGD (Polyak & Juditsky 1992) as torch.optim.ASGD.

    ``eta`` and ``mu`` are the values torch holds before this step (``lr`` and 1 at the first
    step); the caller advances them afterwards with ``asgd_next``. ``lr``, ``alpha`` and ``t0``
    enter only through them.
    """
    eta, mu, lambd, weight_decay = map(float, (eta, mu, lambd, weight_decay))
    params, grads = _as_list(params), _as_list(grads)
    axs = _require(axs, "axs")

    for p, grad, ax in zip(params, grads, axs, strict=True):
        g = -grad if maximize else grad
        if weight_decay != 0:
            g = g + weight_decay * p
        p *= 1 - lambd * eta
        p += -eta * g
        if mu != 1:
            ax += (p - ax) * mu
        else:
            ax[...] = p


def _torch_sign(x: NDArray[Any]) -> NDArray[Any]:
    """``torch.sign``: -1, 0 or 1, and 0 for NaN (``np.sign(NaN)`` is NaN).

    Note [Rprop and NaN]: through this, a NaN gradient leaves its step size as it is and
    does not move its param (sign 0); ``prev`` keeps the NaN, so the next step's g*prev is
    NaN and keeps the step size again, while the param moves by sign(g)*step_size as usual.
    An infinite gradient moves the param by one step size: sign(inf) = 1, and on the first
    step inf*prev = inf*0 = NaN keeps the step size.
    """
    sign: NDArray[Any] = np.sign(x)
    sign[np.isnan(sign)] = 0
    return sign


@_formats
def rprop_(params: ArrayOrList, grads: ArrayOrList, prevs: ArrayOrList,
           step_sizes: ArrayOrList, *, lr: float = 1e-2, etaminus: float = 0.5,
           etaplus: float = 1.2, step_size_min: float = 1e-6, step_size_max: float = 50.0,
           maximize: bool = False,
           param_copies: ArrayOrList | None = None,
           **options: Unpack[UpdateOptions]) -> None:
    """Rprop (Riedmiller & Braun 1993), torch's variant: where the gradient changed sign the
    step size shrinks by ``etaminus`` and that element does not move; where it kept its sign
    it grows by ``etaplus``; ``sign(0) = 0`` keeps the step size, and so does a NaN
    gradient, which moves nothing (torch's sign(NaN) = 0, see ``_torch_sign``).

    ``lr`` only initialises ``step_sizes`` (torch: ``full_like(p, lr)``); the update never
    reads it.
    """
    etaminus, etaplus = float(etaminus), float(etaplus)
    step_size_min, step_size_max = float(step_size_min), float(step_size_max)
    params, grads = _as_list(params), _as_list(grads)
    prevs = _require(prevs, "prevs")
    step_sizes = _require(step_sizes, "step_sizes")

    for p, grad, prev, step_size in zip(params, grads, prevs, step_sizes, strict=True):
        g = -grad if maximize else grad.copy()
        sign = _torch_sign(g * prev)
        # torch overwrites the signs with the factors in this order and later finds the
        # shrunk elements by ``sign == etaminus``; as 0 < etaminus < 1 < etaplus (torch
        # checks), those are exactly the elements whose sign was negative.
        shrink = sign < 0
        sign[sign > 0] = etaplus
        sign[shrink] = etaminus
        sign[sign == 0] = 1
        step_size *= sign
        np.clip(step_size, step_size_min, step_size_max, out=step_size)
        # Where the sign changed, the gradient counts as zero: no move, and prev = 0.
        g[shrink] = 0
        p -= _torch_sign(g) * step_size
        prev[...] = g


@_formats
def lion_(params: ArrayOrList, grads: ArrayOrList, exp_avgs: ArrayOrList, *, lr: float = 1e-4,
          beta1: float = 0.9, beta2: float = 0.99, weight_decay: float = 0.0,
          maximize: bool = False,
          param_copies: ArrayOrList | None = None,
          **options: Unpack[UpdateOptions]) -> None:
    """Lion, Algorithm 2 of Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"
    (arXiv:2302.06675), with decoupled weight decay as there, and ``sign`` as ``torch.sign``
    (``sign(0) = 0``, and 0 for NaN)."""
    lr, beta1, beta2, weight_decay = map(float, (lr, beta1, beta2, weight_decay))
    params, grads = _as_list(params), _as_list(grads)
    exp_avgs = _require(exp_avgs, "exp_avgs")

    for p, grad, m in zip(params, grads, exp_avgs, strict=True):
        g = -grad if maximize else grad
        c = beta1 * m + (1 - beta1) * g  # the interpolation whose sign is the update
        if weight_decay != 0:
            p *= 1 - lr * weight_decay
        p -= lr * _torch_sign(c)
        m *= beta2
        m += (1 - beta2) * g


@_formats
def ema_(averages: ArrayOrList, values: ArrayOrList, *, beta: float,
         param_copies: ArrayOrList | None = None,
         **options: Unpack[UpdateOptions]) -> None:
    """Exponential moving average ``avg = beta*avg + (1-beta)*value``, as a lerp."""
    beta = float(beta)
    for avg, value in zip(_as_list(averages), _as_list(values), strict=True):
        avg += (1 - beta) * (value - avg)


def global_norm(grads: ArrayOrList) -> float:
    """The L2 norm of all elements of all arrays: sqrt of the float64 sum of squares."""
    total = 0.0
    for g in _as_list(grads):
        w = g.astype(np.float64)
        total += float(np.sum(w * w))
    return float(np.sqrt(total))


def unscale_and_check_(grads: ArrayOrList, inv_scale: float) -> bool:
    """``g *= inv_scale`` (float32 math; float64 for float64 arrays); True if any element was
    inf or NaN before."""
    found = False
    for g in _as_list(grads):
        work_type = np.float64 if g.dtype == np.float64 else np.float32
        w = g.astype(work_type)
        found = found or not bool(np.all(np.isfinite(w)))
        g[...] = (w * work_type(inv_scale)).astype(g.dtype)
    return found
