"""Fused, in-place optimizer updates.

Each function updates ``params`` and the optimizer states in place with ONE fused pass over
memory (AVX2/AVX-512 C++ on the CPU), for one array or a list of arrays per argument. The
algorithms, argument names and defaults are torch.optim's (torch 2.13, the
``_single_tensor_*`` functions); :mod:`fastoptim.reference` holds the same updates written
plainly in NumPy, and docs/api.md the full contract.

Every update also takes the keyword options of :class:`fastoptim.typing.UpdateOptions`
(docs/api.md, "Mixed precision"): ``grad_scale`` (torch.amp's scale; grads are divided by it
as they are loaded, in the same pass), ``found_inf`` (nonzero or NaN: every argument is
checked and nothing is written, as torch's fused optimizers do with GradScaler),
``stochastic_rounding=(seed, counter)`` or ``(seed, counter, first_index)`` (bfloat16 params
are stored with stochastic rounding, a pure function of seed, counter and element index,
``first_index`` plus the element's index in the call) and ``compensation`` (bfloat16 arrays like
params: Kahan-compensated bfloat16 params without fp32 master weights).

Everything is validated before the first byte is written: a bad call raises ``TypeError`` or
``ValueError`` naming the argument (``exp_avgs[3]``, ``beta2``, ...) and leaves every array
as it was. Non-finite gradients are not checked; NaN and Inf propagate as in torch.

The annotations are for static checkers only (``ArrayOrList``: :mod:`fastoptim.typing`);
nothing here checks them at run time, the kernels check the values.
"""
from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _core
from .typing import ArrayOrList

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .typing import UpdateOptions

__all__ = ["sgd_", "rmsprop_", "adam_", "adamw_", "adagrad_", "adadelta_", "nadam_", "radam_",
           "adamax_", "asgd_", "rprop_", "lion_", "ema_", "nadam_mu", "asgd_next", "global_norm", "unscale_and_check_"]

# Note [one declaration per rule]
#     Each function below passes its arguments positionally to ``_core.<rule>`` in the order of
#     the rule's declaration in src/cpp/rules.h (arrays, step, hyperparameters, flags), which
#     validates all of them; ``_core.rules`` describes each declaration, and
#     tests/test_registry.py checks that every declared rule has a function here with those
#     names, a reference, a class and a torch drop-in.


def sgd_(params: ArrayOrList, grads: ArrayOrList, momentum_buffers: ArrayOrList | None = None,
         *, step: int | None = None, lr: float = 1e-3, momentum: float = 0.0,
         dampening: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
         maximize: bool = False,
         param_copies: ArrayOrList | None = None,
         **options: Unpack[UpdateOptions]) -> None:
    """SGD with optional heavy-ball or Nesterov momentum (torch.optim.SGD).

    ``step`` (1-based) is required when ``momentum != 0``: at ``step == 1`` the buffer is set
    to the gradient (torch's first step), later ``buf = momentum*buf + (1-dampening)*g``.
    """
    _core.sgd(params, grads, momentum_buffers, param_copies, step, lr, momentum, dampening,
              weight_decay, nesterov, maximize, **options)


def rmsprop_(params: ArrayOrList, grads: ArrayOrList, square_avgs: ArrayOrList,
             grad_avgs: ArrayOrList | None = None, momentum_buffers: ArrayOrList | None = None,
             *, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
             weight_decay: float = 0.0, momentum: float = 0.0, centered: bool = False,
             maximize: bool = False,
             param_copies: ArrayOrList | None = None,
             **options: Unpack[UpdateOptions]) -> None:
    """RMSprop (torch.optim.RMSprop); ``grad_avgs`` when centered, ``momentum_buffers`` when
    momentum > 0 (torch initialises all states with zeros)."""
    _core.rmsprop(params, grads, square_avgs, grad_avgs, momentum_buffers, param_copies, lr,
                  alpha, eps, weight_decay, momentum, centered, maximize, **options)


def adam_(params: ArrayOrList, grads: ArrayOrList, exp_avgs: ArrayOrList,
          exp_avg_sqs: ArrayOrList, *, step: int, lr: float = 1e-3, beta1: float = 0.9,
          beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
          amsgrad: bool = False, max_exp_avg_sqs: ArrayOrList | None = None,
          maximize: bool = False, decoupled_weight_decay: bool = False,
          param_copies: ArrayOrList | None = None,
          **options: Unpack[UpdateOptions]) -> None:
    """Adam with bias correction and optional AMSGrad (torch.optim.Adam); L2 weight decay, or
    decoupled weight decay ``p *= 1 - lr*wd`` (AdamW) with ``decoupled_weight_decay=True``.

    ``step`` is the 1-based number of this step (torch's ``state["step"]`` after increment).
    """
    _core.adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, param_copies, step, lr,
               beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay,
               **options)


def adamw_(params: ArrayOrList, grads: ArrayOrList, exp_avgs: ArrayOrList,
           exp_avg_sqs: ArrayOrList, *, step: int, lr: float = 1e-3, beta1: float = 0.9,
           beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 1e-2,
           amsgrad: bool = False, max_exp_avg_sqs: ArrayOrList | None = None,
           maximize: bool = False,
           param_copies: ArrayOrList | None = None,
           **options: Unpack[UpdateOptions]) -> None:
    """AdamW (torch.optim.AdamW): Adam with decoupled weight decay ``p *= 1 - lr*wd``."""
    _core.adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, param_copies, step, lr,
               beta1, beta2, eps, weight_decay, amsgrad, maximize, True, **options)


def adagrad_(params: ArrayOrList, grads: ArrayOrList, state_sums: ArrayOrList, *, step: int,
             lr: float = 1e-2, lr_decay: float = 0.0, weight_decay: float = 0.0,
             eps: float = 1e-10, maximize: bool = False,
             param_copies: ArrayOrList | None = None,
             **options: Unpack[UpdateOptions]) -> None:
    """Adagrad (torch.optim.Adagrad); ``clr = lr / (1 + (step-1)*lr_decay)``."""
    _core.adagrad(params, grads, state_sums, param_copies, step, lr, lr_decay, weight_decay,
                  eps, maximize, **options)


def adadelta_(params: ArrayOrList, grads: ArrayOrList, square_avgs: ArrayOrList,
              acc_deltas: ArrayOrList, *, lr: float = 1.0, rho: float = 0.9, eps: float = 1e-6,
              weight_decay: float = 0.0, maximize: bool = False,
              param_copies: ArrayOrList | None = None,
              **options: Unpack[UpdateOptions]) -> None:
    """Adadelta (torch.optim.Adadelta)."""
    _core.adadelta(params, grads, square_avgs, acc_deltas, param_copies, lr, rho, eps,
                   weight_decay, maximize, **options)


def nadam_mu(step: float, beta1: float, momentum_decay: float) -> float:
    """NAdam's momentum coefficient ``mu_step = beta1 * (1 - 0.5 * 0.96**(step*momentum_decay))``
    (torch.optim.NAdam); ``mu_product`` is the running product of these."""
    mu: float = beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))
    return mu


def nadam_(params: ArrayOrList, grads: ArrayOrList, exp_avgs: ArrayOrList,
           exp_avg_sqs: ArrayOrList, *, step: int, mu_product: float, lr: float = 2e-3,
           beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
           weight_decay: float = 0.0, momentum_decay: float = 4e-3,
           decoupled_weight_decay: bool = False, maximize: bool = False,
           param_copies: ArrayOrList | None = None,
           **options: Unpack[UpdateOptions]) -> None:
    """NAdam (torch.optim.NAdam), with L2 or decoupled weight decay.

    ``mu_product`` is ``nadam_mu(1) * ... * nadam_mu(step)``, this step included: torch's
    ``state["mu_product"]`` after its update (a stateful caller keeps it; the classes do).
    """
    _core.nadam(params, grads, exp_avgs, exp_avg_sqs, param_copies, step, mu_product, lr, beta1,
                beta2, eps, weight_decay, momentum_decay, decoupled_weight_decay, maximize,
                **options)


def radam_(params: ArrayOrList, grads: ArrayOrList, exp_avgs: ArrayOrList,
           exp_avg_sqs: ArrayOrList, *, step: int, lr: float = 1e-3, beta1: float = 0.9,
           beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
           decoupled_weight_decay: bool = False, maximize: bool = False,
           param_copies: ArrayOrList | None = None,
           **options: Unpack[UpdateOptions]) -> None:
    """RAdam (torch.optim.RAdam): Adam with the variance rectification, which is off while the
    approximated SMA length ``rho_t <= 5`` (the first steps)."""
    _core.radam(params, grads, exp_avgs, exp_avg_sqs, param_copies, step, lr, beta1, beta2, eps,
                weight_decay, decoupled_weight_decay, maximize, **options)


def adamax_(params: ArrayOrList, grads: ArrayOrList, exp_avgs: ArrayOrList,
            exp_infs: ArrayOrList, *, step: int, lr: float = 2e-3, beta1: float = 0.9,
            beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
            maximize: bool = False,
            param_copies: ArrayOrList | None = None,
            **options: Unpack[UpdateOptions]) -> None:
    """Adamax (torch.optim.Adamax): Adam with the infinity norm ``exp_inf``."""
    _core.adamax(params, grads, exp_avgs, exp_infs, param_copies, step, lr, beta1, beta2, eps,
                 weight_decay, maximize, **options)


def _check_unread(fn: str, **values: Any) -> None:
    """The checks the kernels make of their scalars, for arguments an update accepts (as
    torch's does) but never reads: each a real number, ``t0`` not NaN, the rest finite and
    >= 0."""
    for name, x in values.items():
        if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Real):
            raise TypeError(f"{fn}: {name} must be a real number, got {type(x).__name__}")
        try:
            v = float(x)
        except OverflowError:
            raise ValueError(f"{fn}: {name} is too large for a float") from None
        if name == "t0" and math.isnan(v):
            raise ValueError(f"{fn}: t0 must not be NaN")
        if name != "t0" and not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{fn}: {name} must be a finite number >= 0, got {v}")


def asgd_next(step: float, lr: float, lambd: float, alpha: float,
              t0: float) -> tuple[float, float]:
    """ASGD's ``(eta, mu)`` after step ``step`` (torch.optim.ASGD): the values the NEXT step
    uses. They start at ``(lr, 1.0)``."""
    return lr / ((1 + lambd * lr * step) ** alpha), 1 / max(1, step - t0)


def asgd_(params: ArrayOrList, grads: ArrayOrList, axs: ArrayOrList, *, eta: float, mu: float,
          lr: float = 1e-2, lambd: float = 1e-4, alpha: float = 0.75, t0: float = 1e6,
          weight_decay: float = 0.0, maximize: bool = False,
          param_copies: ArrayOrList | None = None,
          **options: Unpack[UpdateOptions]) -> None:
    """Averaged SGD (torch.optim.ASGD): ``p *= 1 - lambd*eta; p -= eta*g``, then the average
    ``ax`` moves towards ``p`` by ``mu`` (``ax = p`` when ``mu == 1``).

    ``eta`` and ``mu`` are torch's per-step scalars ``state["eta"]``, ``state["mu"]``, which
    the caller advances after each step with :func:`asgd_next`; ``lr``, ``alpha`` and ``t0``
    enter only there and are accepted here for symmetry with torch.optim.ASGD.
    """
    _check_unread("asgd_", lr=lr, alpha=alpha, t0=t0)
    _core.asgd(params, grads, axs, param_copies, eta, mu, lambd, weight_decay, maximize, **options)


def rprop_(params: ArrayOrList, grads: ArrayOrList, prevs: ArrayOrList,
           step_sizes: ArrayOrList, *, lr: float = 1e-2, etaminus: float = 0.5,
           etaplus: float = 1.2, step_size_min: float = 1e-6, step_size_max: float = 50.0,
           maximize: bool = False,
           param_copies: ArrayOrList | None = None,
           **options: Unpack[UpdateOptions]) -> None:
    """Rprop (torch.optim.Rprop, ``etas=(etaminus, etaplus)``, ``step_sizes=(min, max)``).

    ``step_sizes`` start filled with ``lr`` (torch's state init), ``prevs`` with zeros; ``lr``
    itself does not enter the update.
    """
    _check_unread("rprop_", lr=lr)
    _core.rprop(params, grads, prevs, step_sizes, param_copies, etaminus, etaplus,
                step_size_min, step_size_max, maximize, **options)


def lion_(params: ArrayOrList, grads: ArrayOrList, exp_avgs: ArrayOrList, *, lr: float = 1e-4,
          beta1: float = 0.9, beta2: float = 0.99, weight_decay: float = 0.0,
          maximize: bool = False,
          param_copies: ArrayOrList | None = None,
          **options: Unpack[UpdateOptions]) -> None:
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms")::

        c = beta1*m + (1-beta1)*g;  p = p*(1 - lr*wd) - lr*sign(c);  m = beta2*m + (1-beta2)*g

    ``sign(0) = 0`` (as ``torch.sign``; also for NaN): an element whose interpolation ``c`` is
    exactly zero is only decayed. ``exp_avgs`` (the paper's ``m``) start at zero.
    """
    _core.lion(params, grads, exp_avgs, param_copies, lr, beta1, beta2, weight_decay, maximize,
    **options)


def ema_(averages: ArrayOrList, values: ArrayOrList, *, beta: float,
         param_copies: ArrayOrList | None = None,
         **options: Unpack[UpdateOptions]) -> None:
    """Exponentially weighted average in place: ``avg = beta*avg + (1-beta)*value``."""
    _core.ema(averages, values, param_copies, beta, **options)


def global_norm(grads: ArrayOrList) -> float:
    """The L2 norm of all elements of all arrays, in one pass (float32, float64, float16 or
    bfloat16; all arrays of one dtype).

    Squares are summed in float64 in a fixed order (blocks of 16,384 elements of each array,
    16 interleaved accumulators per block, blocks added in order), so the result is the same
    bit for bit whatever the thread count or ISA. Inf or NaN anywhere gives inf or NaN.
    For global-norm clipping at no extra pass, fold ``min(1, max_norm / (norm + 1e-6))`` into
    an update's ``grad_scale`` (as its reciprocal: ``grad_scale = 1 / factor``).
    """
    norm: float = _core.global_norm(grads)
    return norm


def unscale_and_check_(grads: ArrayOrList, inv_scale: float) -> bool:
    """torch.amp's unscale, fused: ``g *= inv_scale`` in place for every array (in float32,
    float64 for float64 arrays, rounded back to the arrays' dtype), and returns True when any
    element was inf or NaN (torch's ``_amp_foreach_non_finite_check_and_unscale_``)."""
    found: bool = _core.unscale_and_check_(grads, inv_scale)
    return found
