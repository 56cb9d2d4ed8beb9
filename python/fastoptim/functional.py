"""Fused, in-place optimizer updates.

Each function updates ``params`` and the optimizer states in place with ONE fused pass over
memory (AVX2/AVX-512 C++ on the CPU), for one array or a list of arrays per argument. The
algorithms, argument names and defaults are torch.optim's (torch 2.13, the
``_single_tensor_*`` functions); :mod:`fastoptim.reference` holds the same updates written
plainly in NumPy, and docs/api.md the full contract.

Everything is validated before the first byte is written: a bad call raises ``TypeError`` or
``ValueError`` naming the argument (``exp_avgs[3]``, ``beta2``, ...) and leaves every array
as it was. Non-finite gradients are not checked; NaN and Inf propagate as in torch.
"""
from __future__ import annotations

from . import _core

__all__ = ["sgd_", "rmsprop_", "adam_", "adamw_", "adagrad_", "adadelta_", "ema_"]


def sgd_(params, grads, momentum_buffers=None, *, step=None, lr=1e-3, momentum=0.0,
         dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False):
    """SGD with optional heavy-ball or Nesterov momentum (torch.optim.SGD).

    ``step`` (1-based) is required when ``momentum != 0``: at ``step == 1`` the buffer is set
    to the gradient (torch's first step), later ``buf = momentum*buf + (1-dampening)*g``.
    """
    _core.sgd(params, grads, momentum_buffers, step, lr, momentum, dampening, weight_decay,
              nesterov, maximize)


def rmsprop_(params, grads, square_avgs, grad_avgs=None, momentum_buffers=None, *, lr=1e-2,
             alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False,
             maximize=False):
    """RMSprop (torch.optim.RMSprop); ``grad_avgs`` when centered, ``momentum_buffers`` when
    momentum > 0 (torch initialises all states with zeros)."""
    _core.rmsprop(params, grads, square_avgs, grad_avgs, momentum_buffers, lr, alpha, eps,
                  weight_decay, momentum, centered, maximize)


def adam_(params, grads, exp_avgs, exp_avg_sqs, *, step, lr=1e-3, beta1=0.9, beta2=0.999,
          eps=1e-8, weight_decay=0.0, amsgrad=False, max_exp_avg_sqs=None, maximize=False):
    """Adam with bias correction and optional AMSGrad (torch.optim.Adam); L2 weight decay.

    ``step`` is the 1-based number of this step (torch's ``state["step"]`` after increment).
    """
    _core.adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step, lr, beta1, beta2,
               eps, weight_decay, amsgrad, maximize, False)


def adamw_(params, grads, exp_avgs, exp_avg_sqs, *, step, lr=1e-3, beta1=0.9, beta2=0.999,
           eps=1e-8, weight_decay=1e-2, amsgrad=False, max_exp_avg_sqs=None, maximize=False):
    """AdamW (torch.optim.AdamW): Adam with decoupled weight decay ``p *= 1 - lr*wd``."""
    _core.adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step, lr, beta1, beta2,
               eps, weight_decay, amsgrad, maximize, True)


def adagrad_(params, grads, state_sums, *, step, lr=1e-2, lr_decay=0.0, weight_decay=0.0,
             eps=1e-10, maximize=False):
    """Adagrad (torch.optim.Adagrad); ``clr = lr / (1 + (step-1)*lr_decay)``."""
    _core.adagrad(params, grads, state_sums, step, lr, lr_decay, weight_decay, eps, maximize)


def adadelta_(params, grads, square_avgs, acc_deltas, *, lr=1.0, rho=0.9, eps=1e-6,
              weight_decay=0.0, maximize=False):
    """Adadelta (torch.optim.Adadelta)."""
    _core.adadelta(params, grads, square_avgs, acc_deltas, lr, rho, eps, weight_decay, maximize)


def ema_(averages, values, *, beta):
    """Exponentially weighted average in place: ``avg = beta*avg + (1-beta)*value``."""
    _core.ema(averages, values, beta)
