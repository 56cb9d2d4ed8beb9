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

This module is a test oracle, not the product: it checks only what it needs to run (a
missing state list or step raises ValueError) and leaves argument validation to the kernels.
"""

import operator

import numpy as np

__all__ = ["sgd_", "rmsprop_", "adam_", "adamw_", "adagrad_", "adadelta_", "ema_"]


def _as_list(arrays):
    """Return ``arrays`` as a list: a single array becomes a one-element list."""
    if arrays is None:
        return None
    if isinstance(arrays, np.ndarray):
        return [arrays]
    return list(arrays)


def _require(arrays, name, when=None):
    """Return ``_as_list(arrays)``; raise ValueError when the state list is missing."""
    if arrays is None:
        raise ValueError(f"{name} is required" + (f" {when}" if when else ""))
    return _as_list(arrays)


def _require_step(step):
    """Return ``step`` as a Python int >= 1 (the step count after torch's increment)."""
    if step is None:
        raise ValueError("step is required")
    step = operator.index(step)
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    return step


def sgd_(params, grads, momentum_buffers=None, *, step=None, lr=1e-3, momentum=0.0,
         dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False):
    """SGD with optional momentum, dampening, Nesterov momentum and L2 weight decay."""
    lr, momentum, dampening, weight_decay = map(float, (lr, momentum, dampening, weight_decay))
    params, grads = _as_list(params), _as_list(grads)
    if momentum != 0:
        momentum_buffers = _require(momentum_buffers, "momentum_buffers", "when momentum != 0")
        step = _require_step(step)
    else:
        momentum_buffers = [None] * len(params)

    for p, grad, buf in zip(params, grads, momentum_buffers, strict=True):
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


def rmsprop_(params, grads, square_avgs, grad_avgs=None, momentum_buffers=None, *, lr=1e-2,
             alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False,
             maximize=False):
    """RMSprop, optionally centered and with momentum."""
    lr, alpha, eps, weight_decay, momentum = map(float, (lr, alpha, eps, weight_decay, momentum))
    params, grads = _as_list(params), _as_list(grads)
    square_avgs = _require(square_avgs, "square_avgs")
    n = len(params)
    grad_avgs = _require(grad_avgs, "grad_avgs", "when centered") if centered else [None] * n
    if momentum > 0:
        momentum_buffers = _require(momentum_buffers, "momentum_buffers", "when momentum > 0")
    else:
        momentum_buffers = [None] * n

    for p, grad, square_avg, grad_avg, buf in zip(
        params, grads, square_avgs, grad_avgs, momentum_buffers, strict=True
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


def _adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, *, step, lr, beta1, beta2,
          eps, weight_decay, amsgrad, maximize, decoupled_weight_decay):
    """Adam and AdamW: torch's ``_single_tensor_adam`` (AdamW passes decoupled=True)."""
    lr, beta1, beta2, eps, weight_decay = map(float, (lr, beta1, beta2, eps, weight_decay))
    step = _require_step(step)
    params, grads = _as_list(params), _as_list(grads)
    exp_avgs = _require(exp_avgs, "exp_avgs")
    exp_avg_sqs = _require(exp_avg_sqs, "exp_avg_sqs")
    if amsgrad:
        max_exp_avg_sqs = _require(max_exp_avg_sqs, "max_exp_avg_sqs", "when amsgrad=True")
    else:
        max_exp_avg_sqs = [None] * len(params)

    # Per-step scalars, once per call, as Python floats.
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5

    for p, grad, exp_avg, exp_avg_sq, max_exp_avg_sq in zip(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, strict=True
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


def adam_(params, grads, exp_avgs, exp_avg_sqs, *, step, lr=1e-3, beta1=0.9, beta2=0.999,
          eps=1e-8, weight_decay=0.0, amsgrad=False, max_exp_avg_sqs=None, maximize=False):
    """Adam with L2 weight decay added to the gradient, optionally AMSGrad."""
    _adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step=step, lr=lr,
          beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
          maximize=maximize, decoupled_weight_decay=False)


def adamw_(params, grads, exp_avgs, exp_avg_sqs, *, step, lr=1e-3, beta1=0.9, beta2=0.999,
           eps=1e-8, weight_decay=1e-2, amsgrad=False, max_exp_avg_sqs=None, maximize=False):
    """AdamW: Adam with decoupled weight decay ``p *= 1 - lr*weight_decay``."""
    _adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step=step, lr=lr,
          beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
          maximize=maximize, decoupled_weight_decay=True)


def adagrad_(params, grads, state_sums, *, step, lr=1e-2, lr_decay=0.0, weight_decay=0.0,
             eps=1e-10, maximize=False):
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


def adadelta_(params, grads, square_avgs, acc_deltas, *, lr=1.0, rho=0.9, eps=1e-6,
              weight_decay=0.0, maximize=False):
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


def ema_(averages, values, *, beta):
    """Exponential moving average ``avg = beta*avg + (1-beta)*value``, as a lerp."""
    beta = float(beta)
    for avg, value in zip(_as_list(averages), _as_list(values), strict=True):
        avg += (1 - beta) * (value - avg)
