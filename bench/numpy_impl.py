"""The NumPy baseline of the CPU benchmark: each update as a careful NumPy user writes it.

These are the same updates as :mod:`fastoptim.reference` (torch.optim 2.13's
``_single_tensor_<name>``), but written for speed instead of readability:

* every intermediate goes to a scratch buffer allocated ONCE, in ``__init__``, through the
  ufuncs' ``out=`` argument, so a step allocates no array;
* states are updated with in-place operators (``*=``, ``+=``);
* per-step scalars (bias corrections, step size) are Python floats computed once per step,
  and scalar factors are folded together where that saves a pass over the data.

Each scratch buffer is sized to the largest tensor and shared by all tensors of the list
(views made once), so in the many-tensors case it stays in cache. NumPy runs each ufunc on
one thread; every ufunc call is one pass over its operands.

An optimizer object binds its arrays once (``params``, ``grads`` and the states, each one
array or a list of same-shaped-per-index arrays, as in fastoptim's functional API) and
``step()`` applies one update in place, counting steps from 1 as torch does. Only the
hyperparameters the benchmark uses are offered (no ``maximize``). Per-step scalar states
(NAdam's ``mu_product``, ASGD's ``eta`` and ``mu``) are Python floats kept by the object, as
a stateful NumPy user keeps them. The benchmark checks every class against
:mod:`fastoptim.reference` before it times anything.
"""

import numpy as np

__all__ = ["SGD", "RMSprop", "Adam", "Adagrad", "Adadelta", "NAdam", "RAdam", "Adamax", "ASGD", "Lion",
           "Rprop"]


def _as_list(arrays):
    if arrays is None:
        return None
    if isinstance(arrays, np.ndarray):
        return [arrays]
    return list(arrays)


class _Optimizer:
    """Binds the arrays; makes ``n_scratch`` scratch buffers, one more for the decayed
    gradient ``g + l2*p`` when ``l2 != 0``, each with one view per tensor."""

    def __init__(self, params, grads, states, n_scratch, l2=0.0):
        self.params = _as_list(params)
        n = len(self.params)
        self.grads = _as_list(grads)
        self.states = [[None] * n if s is None else _as_list(s) for s in states]
        for arrays in (self.grads, *self.states):
            if len(arrays) != n:
                raise ValueError("all array lists must have the same length")
        self.step_count = 0
        self.l2 = float(l2)
        dtype = self.params[0].dtype if self.params else np.float32
        self.scratch = self._scratch(n_scratch + (self.l2 != 0), dtype)

    def _scratch(self, count, dtype):
        """``count`` buffers of ``dtype`` sized to the largest tensor; ``result[i][k]`` is the
        k-th viewed with the shape of tensor i."""
        largest = max((p.size for p in self.params), default=0)
        flat = [np.empty(largest, dtype) for _ in range(count)]
        return [tuple(f[: p.size].reshape(p.shape) for f in flat) for p in self.params]

    def _tensors(self):
        return zip(self.params, self.grads, *self.states, self.scratch)

    def _grad(self, p, g, scratch):
        """The gradient with L2 weight decay, ``g + l2*p``, in the last scratch buffer."""
        if self.l2 == 0:
            return g
        t = scratch[-1]
        np.multiply(p, self.l2, out=t)
        t += g
        return t


class SGD(_Optimizer):
    """torch.optim.SGD: ``p -= lr*g``, or heavy-ball/Nesterov momentum with dampening."""

    def __init__(self, params, grads, momentum_buffers=None, *, lr=1e-3, momentum=0.0,
                 dampening=0.0, nesterov=False, weight_decay=0.0):
        bufs = momentum_buffers if momentum != 0 else None
        super().__init__(params, grads, [bufs], 1, weight_decay)
        self.lr, self.momentum, self.dampening = float(lr), float(momentum), float(dampening)
        self.nesterov = bool(nesterov)

    def step(self):
        self.step_count += 1
        lr, mu = self.lr, self.momentum
        first = self.step_count == 1
        for p, g, buf, s in self._tensors():
            t = s[0]
            g = self._grad(p, g, s)
            if mu == 0:
                np.multiply(g, -lr, out=t)
                p += t
                continue
            if first:  # torch's "buffer is None" branch: the buffer starts as the gradient
                buf[...] = g
            else:
                buf *= mu
                if self.dampening == 0:
                    buf += g
                else:
                    np.multiply(g, 1 - self.dampening, out=t)
                    buf += t
            if self.nesterov:  # p -= lr*(g + momentum*buf)
                np.multiply(buf, mu, out=t)
                t += g
                t *= -lr
            else:
                np.multiply(buf, -lr, out=t)
            p += t


class RMSprop(_Optimizer):
    """torch.optim.RMSprop, optionally centered and with momentum."""

    def __init__(self, params, grads, square_avgs, grad_avgs=None, momentum_buffers=None, *,
                 lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                 centered=False):
        states = [square_avgs, grad_avgs if centered else None,
                  momentum_buffers if momentum > 0 else None]
        super().__init__(params, grads, states, 1, weight_decay)
        self.lr, self.alpha, self.eps = float(lr), float(alpha), float(eps)
        self.momentum, self.centered = float(momentum), bool(centered)

    def step(self):
        self.step_count += 1
        lr, a, mu = self.lr, self.alpha, self.momentum
        for p, g, sq, ga, buf, s in self._tensors():
            t = s[0]
            g = self._grad(p, g, s)
            sq *= a  # square_avg = alpha*square_avg + (1-alpha)*g*g
            np.multiply(g, 1 - a, out=t)
            t *= g
            sq += t
            if self.centered:
                np.subtract(g, ga, out=t)  # grad_avg += (1-alpha)*(g - grad_avg)
                t *= 1 - a
                ga += t
                np.multiply(ga, ga, out=t)  # avg = sqrt(square_avg - grad_avg^2) + eps
                np.subtract(sq, t, out=t)
                np.sqrt(t, out=t)
            else:
                np.sqrt(sq, out=t)
            t += self.eps
            if mu > 0:  # buf = momentum*buf + g/avg; p -= lr*buf
                np.divide(g, t, out=t)
                buf *= mu
                buf += t
                np.multiply(buf, -lr, out=t)
            else:  # p -= lr*g/avg, as p += g/(-avg/lr)
                t *= -1 / lr
                np.divide(g, t, out=t)
            p += t


class Adam(_Optimizer):
    """torch.optim.Adam (``decoupled=False``: L2 decay) and AdamW (``decoupled=True``)."""

    def __init__(self, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=None, *, lr=1e-3,
                 beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False,
                 decoupled=False):
        states = [exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else None]
        super().__init__(params, grads, states, 1, 0.0 if decoupled else weight_decay)
        self.lr, self.beta1, self.beta2 = float(lr), float(beta1), float(beta2)
        self.eps = float(eps)
        self.decay = float(weight_decay) if decoupled else 0.0
        self.amsgrad = bool(amsgrad)

    def step(self):
        self.step_count += 1
        lr, b1, b2 = self.lr, self.beta1, self.beta2
        step_size = lr / (1 - b1**self.step_count)
        bias_correction2_sqrt = (1 - b2**self.step_count) ** 0.5
        # p -= step_size * exp_avg / (sqrt(v)/bc2_sqrt + eps), written as p += exp_avg / q
        # with q = sqrt(v)*c + d: two scalar passes fewer than torch's order.
        c = -1 / (bias_correction2_sqrt * step_size)
        d = -self.eps / step_size
        for p, g, m, v, vmax, s in self._tensors():
            t = s[0]
            if self.decay != 0:  # AdamW: p *= 1 - lr*weight_decay
                p *= 1 - lr * self.decay
            g = self._grad(p, g, s)
            np.subtract(g, m, out=t)  # exp_avg += (1-beta1)*(g - exp_avg)  (torch's lerp)
            t *= 1 - b1
            m += t
            v *= b2  # exp_avg_sq = beta2*exp_avg_sq + (1-beta2)*g*g
            np.multiply(g, 1 - b2, out=t)
            t *= g
            v += t
            if self.amsgrad:
                np.maximum(vmax, v, out=vmax)
                np.sqrt(vmax, out=t)
            else:
                np.sqrt(v, out=t)
            t *= c
            t += d
            np.divide(m, t, out=t)
            p += t


class Adagrad(_Optimizer):
    """torch.optim.Adagrad with learning-rate decay ``clr = lr / (1 + (step-1)*lr_decay)``."""

    def __init__(self, params, grads, state_sums, *, lr=1e-2, lr_decay=0.0, weight_decay=0.0,
                 eps=1e-10):
        super().__init__(params, grads, [state_sums], 1, weight_decay)
        self.lr, self.lr_decay, self.eps = float(lr), float(lr_decay), float(eps)

    def step(self):
        self.step_count += 1
        clr = self.lr / (1 + (self.step_count - 1) * self.lr_decay)
        for p, g, state_sum, s in self._tensors():
            t = s[0]
            g = self._grad(p, g, s)
            np.multiply(g, g, out=t)  # sum += g*g
            state_sum += t
            np.sqrt(state_sum, out=t)  # p -= clr*g/(sqrt(sum) + eps), as p += g/(-std/clr)
            t += self.eps
            t *= -1 / clr
            np.divide(g, t, out=t)
            p += t


class Adadelta(_Optimizer):
    """torch.optim.Adadelta."""

    def __init__(self, params, grads, square_avgs, acc_deltas, *, lr=1.0, rho=0.9, eps=1e-6,
                 weight_decay=0.0):
        super().__init__(params, grads, [square_avgs, acc_deltas], 2, weight_decay)
        self.lr, self.rho, self.eps = float(lr), float(rho), float(eps)

    def step(self):
        self.step_count += 1
        lr, rho, eps = self.lr, self.rho, self.eps
        for p, g, sq, acc, s in self._tensors():
            t, delta = s[0], s[1]
            g = self._grad(p, g, s)
            sq *= rho  # square_avg = rho*square_avg + (1-rho)*g*g
            np.multiply(g, 1 - rho, out=t)
            t *= g
            sq += t
            np.add(sq, eps, out=t)  # std = sqrt(square_avg + eps)
            np.sqrt(t, out=t)
            np.add(acc, eps, out=delta)  # delta = sqrt(acc_delta + eps) / std * g
            np.sqrt(delta, out=delta)
            np.divide(delta, t, out=delta)
            delta *= g
            acc *= rho  # acc_delta = rho*acc_delta + (1-rho)*delta*delta
            np.multiply(delta, 1 - rho, out=t)
            t *= delta
            acc += t
            if lr == 1:
                p -= delta
            else:
                delta *= -lr
                p += delta


class NAdam(_Optimizer):
    """torch.optim.NAdam, with L2 weight decay or (``decoupled_weight_decay=True``) decoupled.
    ``mu_product`` is torch's scalar state, kept here as a Python float."""

    def __init__(self, params, grads, exp_avgs, exp_avg_sqs, *, lr=2e-3, beta1=0.9, beta2=0.999,
                 eps=1e-8, weight_decay=0.0, momentum_decay=4e-3, decoupled_weight_decay=False):
        decoupled = bool(decoupled_weight_decay)
        super().__init__(params, grads, [exp_avgs, exp_avg_sqs], 2,
                         0.0 if decoupled else weight_decay)
        self.lr, self.beta1, self.beta2 = float(lr), float(beta1), float(beta2)
        self.eps, self.momentum_decay = float(eps), float(momentum_decay)
        self.decay = float(weight_decay) if decoupled else 0.0
        self.mu_product = 1.0

    def _mu(self, step):
        return self.beta1 * (1.0 - 0.5 * (0.96 ** (step * self.momentum_decay)))

    def step(self):
        self.step_count += 1
        n, lr, b1, b2 = self.step_count, self.lr, self.beta1, self.beta2
        mu, mu_next = self._mu(n), self._mu(n + 1)
        self.mu_product *= mu
        grad_coef = -lr * (1 - mu) / (1 - self.mu_product)
        exp_avg_coef = -lr * mu_next / (1 - self.mu_product * mu_next)
        # p += grad_coef*g/denom + exp_avg_coef*exp_avg/denom with denom = sqrt(v/bc2) + eps,
        # written as p += (g + r*exp_avg) / q with q = sqrt(v)*c + d: one division, not two.
        c = 1 / ((1 - b2**n) ** 0.5 * grad_coef)
        d = self.eps / grad_coef
        r = exp_avg_coef / grad_coef
        for p, g, m, v, s in self._tensors():
            t, u = s[0], s[1]
            if self.decay != 0:  # p *= 1 - lr*weight_decay
                p *= 1 - lr * self.decay
            g = self._grad(p, g, s)
            np.subtract(g, m, out=t)  # exp_avg += (1-beta1)*(g - exp_avg)
            t *= 1 - b1
            m += t
            v *= b2  # exp_avg_sq = beta2*exp_avg_sq + (1-beta2)*g*g
            np.multiply(g, 1 - b2, out=t)
            t *= g
            v += t
            np.sqrt(v, out=t)
            t *= c
            t += d
            np.multiply(m, r, out=u)
            u += g
            np.divide(u, t, out=u)
            p += u


class RAdam(_Optimizer):
    """torch.optim.RAdam: Adam's step with the variance rectification once ``rho_t > 5``,
    before that (steps 1 to 5 with beta2 = 0.999) the bias-corrected momentum alone."""

    def __init__(self, params, grads, exp_avgs, exp_avg_sqs, *, lr=1e-3, beta1=0.9, beta2=0.999,
                 eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False):
        decoupled = bool(decoupled_weight_decay)
        super().__init__(params, grads, [exp_avgs, exp_avg_sqs], 1,
                         0.0 if decoupled else weight_decay)
        self.lr, self.beta1, self.beta2 = float(lr), float(beta1), float(beta2)
        self.eps = float(eps)
        self.decay = float(weight_decay) if decoupled else 0.0

    def step(self):
        self.step_count += 1
        n, lr, b1, b2 = self.step_count, self.lr, self.beta1, self.beta2
        bias_correction1, bias_correction2 = 1 - b1**n, 1 - b2**n
        rho_inf = 2 / (1 - b2) - 1
        rho_t = rho_inf - 2 * n * b2**n / bias_correction2
        rectified = rho_t > 5.0
        if rectified:
            # p -= step_size * exp_avg / (sqrt(v) + eps), as p += exp_avg / q with
            # q = sqrt(v)*c + d (as in Adam).
            rect = ((rho_t - 4) * (rho_t - 2) * rho_inf
                    / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
            step_size = lr * rect * bias_correction2**0.5 / bias_correction1
            c, d = -1 / step_size, -self.eps / step_size
        for p, g, m, v, s in self._tensors():
            t = s[0]
            if self.decay != 0:
                p *= 1 - lr * self.decay
            g = self._grad(p, g, s)
            np.subtract(g, m, out=t)
            t *= 1 - b1
            m += t
            v *= b2
            np.multiply(g, 1 - b2, out=t)
            t *= g
            v += t
            if rectified:
                np.sqrt(v, out=t)
                t *= c
                t += d
                np.divide(m, t, out=t)
            else:  # p -= lr * exp_avg / bias_correction1
                np.multiply(m, -lr / bias_correction1, out=t)
            p += t


class Adamax(_Optimizer):
    """torch.optim.Adamax."""

    def __init__(self, params, grads, exp_avgs, exp_infs, *, lr=2e-3, beta1=0.9, beta2=0.999,
                 eps=1e-8, weight_decay=0.0):
        super().__init__(params, grads, [exp_avgs, exp_infs], 1, weight_decay)
        self.lr, self.beta1, self.beta2 = float(lr), float(beta1), float(beta2)
        self.eps = float(eps)

    def step(self):
        self.step_count += 1
        b1, b2 = self.beta1, self.beta2
        clr = self.lr / (1 - b1**self.step_count)
        for p, g, m, u, s in self._tensors():
            t = s[0]
            g = self._grad(p, g, s)
            np.subtract(g, m, out=t)  # exp_avg += (1-beta1)*(g - exp_avg)
            t *= 1 - b1
            m += t
            u *= b2  # exp_inf = max(beta2*exp_inf, |g| + eps)
            np.abs(g, out=t)
            t += self.eps
            np.maximum(u, t, out=u)
            # p -= clr*exp_avg/exp_inf, as p += exp_avg/(-exp_inf/clr)
            np.multiply(u, -1 / clr, out=t)
            np.divide(m, t, out=t)
            p += t


class ASGD(_Optimizer):
    """torch.optim.ASGD. ``eta`` and ``mu`` are torch's scalar states, kept here as Python
    floats: this step uses the current values, which are advanced after it. While ``mu == 1``
    (torch's default ``t0 = 1e6``: the first million steps) the average is a copy of ``p``."""

    def __init__(self, params, grads, axs, *, lr=1e-2, lambd=1e-4, alpha=0.75, t0=1e6,
                 weight_decay=0.0):
        super().__init__(params, grads, [axs], 1, weight_decay)
        self.lr, self.lambd, self.alpha, self.t0 = float(lr), float(lambd), float(alpha), float(t0)
        self.eta, self.mu = self.lr, 1.0

    def step(self):
        self.step_count += 1
        eta, mu = self.eta, self.mu
        for p, g, ax, s in self._tensors():
            t = s[0]
            g = self._grad(p, g, s)
            p *= 1 - self.lambd * eta  # p = p*(1 - lambd*eta) - eta*g
            np.multiply(g, -eta, out=t)
            p += t
            if mu != 1:  # ax += (p - ax)*mu
                np.subtract(p, ax, out=t)
                t *= mu
                ax += t
            else:
                np.copyto(ax, p)
        n, lr = self.step_count, self.lr
        self.eta = lr / ((1 + self.lambd * lr * n) ** self.alpha)
        self.mu = 1 / max(1, n - self.t0)


class Rprop(_Optimizer):
    """torch.optim.Rprop. ``step_sizes`` start filled with torch's ``lr``, ``prevs`` with
    zeros. Written for finite gradients (torch's ``sign(NaN) = 0`` is not reproduced)."""

    def __init__(self, params, grads, prevs, step_sizes, *, etaminus=0.5, etaplus=1.2,
                 step_size_min=1e-6, step_size_max=50.0):
        super().__init__(params, grads, [prevs, step_sizes], 1)
        self.etaminus, self.etaplus = float(etaminus), float(etaplus)
        self.step_size_min, self.step_size_max = float(step_size_min), float(step_size_max)
        self.masks = self._scratch(2, np.bool_)

    def step(self):
        self.step_count += 1
        for (p, g, prev, size, s), (kept, changed) in zip(self._tensors(), self.masks):
            t = s[0]
            np.multiply(g, prev, out=t)  # the factor: etaplus (g*prev > 0), etaminus (< 0), 1
            np.greater(t, 0, out=kept)
            np.less(t, 0, out=changed)
            t.fill(1)
            np.copyto(t, self.etaplus, where=kept)
            np.copyto(t, self.etaminus, where=changed)
            size *= t  # step_size = clamp(step_size*factor, min, max)
            np.clip(size, self.step_size_min, self.step_size_max, out=size)
            np.copyto(prev, g)  # prev = g, or 0 where the sign changed (no move there)
            np.copyto(prev, 0, where=changed)
            np.sign(prev, out=t)  # p -= sign(prev)*step_size
            t *= size
            p -= t


class Lion(_Optimizer):
    """Lion (Chen et al. 2023): ``p = p*(1 - lr*wd) - lr*sign(beta1*m + (1-beta1)*g)``, then
    ``m = beta2*m + (1-beta2)*g``. Written for finite gradients (np.sign(NaN) is NaN)."""

    def __init__(self, params, grads, exp_avgs, *, lr=1e-4, beta1=0.9, beta2=0.99,
                 weight_decay=0.0):
        super().__init__(params, grads, [exp_avgs], 1)
        self.lr, self.beta1, self.beta2 = float(lr), float(beta1), float(beta2)
        self.decay = 1 - self.lr * float(weight_decay)

    def step(self):
        self.step_count += 1
        b1, b2 = self.beta1, self.beta2
        for p, g, m, s in self._tensors():
            t = s[0]
            np.subtract(g, m, out=t)  # c = m + (1-beta1)*(g - m)
            t *= 1 - b1
            t += m
            np.sign(t, out=t)
            t *= -self.lr
            if self.decay != 1:
                p *= self.decay
            p += t
            np.subtract(g, m, out=t)  # m += (1-beta2)*(g - m)
            t *= 1 - b2
            m += t
