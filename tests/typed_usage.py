"""A typed user of fastoptim: tests/test_typing.py runs ``mypy --strict`` on this file (which
must pass) and then ``main()`` (which must run). Every annotated local below states a return
type of the public API, so a wrong annotation in the package fails the mypy run."""
from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

import fastoptim
from fastoptim import optim, reference
from fastoptim.data import iter_mini_batches, random_mini_batches
from fastoptim.ema import EMA, ModelEMA
from fastoptim.schedules import CosineDecay, ReduceLROnPlateau, Schedule, Warmup
from fastoptim.typing import ArrayOrList


def loss_and_grads(w: NDArray[np.float64], b: NDArray[np.float64], X: NDArray[Any],
                   y: NDArray[Any]) -> tuple[float, list[NDArray[np.float64]]]:
    """Mean squared error of ``X @ w + b`` and its gradients."""
    residual = X @ w + b - y
    loss = float(np.mean(residual**2))
    grad_w: NDArray[np.float64] = 2.0 * X.T @ residual / len(y)
    grad_b: NDArray[np.float64] = np.array([2.0 * np.mean(residual)])
    return loss, [grad_w, grad_b]


def functional_steps() -> None:
    params = [np.ones(5, dtype=np.float32), np.ones((2, 3), dtype=np.float32)]
    grads = [np.full(5, 0.5, dtype=np.float32), np.full((2, 3), 0.5, dtype=np.float32)]
    exp_avgs = [np.zeros_like(p) for p in params]
    exp_avg_sqs = [np.zeros_like(p) for p in params]
    for step in range(1, 4):
        fastoptim.adam_(params, grads, exp_avgs, exp_avg_sqs, step=step, lr=1e-2)
    # One array, not a list; optional state left out; a tuple is a list of arrays too.
    single: NDArray[np.float64] = np.ones(4)
    fastoptim.sgd_(single, np.ones(4), lr=0.1)
    buffers: ArrayOrList = (np.zeros(4),)
    fastoptim.sgd_((single,), (np.ones(4),), buffers, step=1, lr=0.1, momentum=0.9)

    # The oracle takes the same arguments.
    expected = [p.copy() for p in params]
    ref_avgs = [np.zeros_like(p) for p in params]
    ref_sqs = [np.zeros_like(p) for p in params]
    reference.adam_(expected, grads, ref_avgs, ref_sqs, step=1, lr=1e-2)

    mu_product = reference.nadam_mu(1, 0.9, 4e-3)
    fastoptim.nadam_(params, grads, exp_avgs, exp_avg_sqs, step=1, mu_product=mu_product)
    eta: float
    mu: float
    eta, mu = fastoptim.functional.asgd_next(1, 1e-2, 1e-4, 0.75, 1e6)
    axs = [p.copy() for p in params]
    fastoptim.asgd_(params, grads, axs, eta=eta, mu=mu)

    # Mixed-precision options: AMP scaling, clipping folded into grad_scale, reductions.
    norm: float = fastoptim.global_norm(grads)
    fastoptim.adam_(params, grads, exp_avgs, exp_avg_sqs, step=4, grad_scale=max(1.0, norm),
                    found_inf=np.float32(0.0))
    found: bool = fastoptim.unscale_and_check_(grads, 1.0)
    assert not found


def train() -> tuple[float, float]:
    """Fits a linear model; returns the first and the last mini-batch loss."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((64, 5))
    y = X @ np.arange(1.0, 6.0) + 0.5
    w: NDArray[np.float64] = np.zeros(5)
    b: NDArray[np.float64] = np.zeros(1)

    schedule: Schedule = Warmup(CosineDecay(1e-1, decay_steps=200), warmup_steps=10)
    first_lr: float = schedule(0)
    assert first_lr == 0.0
    opt = optim.Adam([w, b], lr=schedule, weight_decay=0.0)
    plateau = ReduceLROnPlateau(1e-2, patience=2)
    groups = optim.SGD([{"params": [np.zeros(3)], "lr": plateau}], momentum=0.9)
    shadow = ModelEMA([w, b], beta=0.9)
    smooth = EMA(0.9)

    losses: list[float] = []
    for epoch in range(50):
        batches: list[tuple[NDArray[Any], NDArray[Any]]] = random_mini_batches(
            X, y, 16, seed=epoch)
        for X_batch, y_batch in batches:
            loss, grads = loss_and_grads(w, b, X_batch, y_batch)
            losses.append(loss)
            opt.step(grads)
            shadow.update()
            smooth.update(loss)
        groups.step([np.zeros(3)])
        plateau.observe(smooth.value)
    for X_batch, y_batch in iter_mini_batches(X, y, 32, seed=None):
        assert X_batch.shape[0] == y_batch.shape[0]

    averaged: list[NDArray[Any]] = shadow.corrected()
    assert [a.shape for a in averaged] == [w.shape, b.shape]
    state: dict[str, Any] = opt.state_dict()
    opt.load_state_dict(state)
    return losses[0], losses[-1]


def main() -> None:
    info: dict[str, Any] = fastoptim.backend_info()
    threads: int = fastoptim.get_num_threads()
    fastoptim.set_num_threads(threads)
    assert info["num_threads"] == threads
    functional_steps()
    first, last = train()
    assert last < first / 100


if __name__ == "__main__":
    main()
