"""Deliberate type errors: tests/test_typing.py requires ``mypy --strict`` to reject EVERY line
marked ``# error`` below, and nothing else. Never run; it would raise at the first call."""
from __future__ import annotations

import numpy as np

import fastoptim
from fastoptim import optim, reference
from fastoptim.ema import EMA
from fastoptim.schedules import CosineDecay

params = [np.ones(3)]
grads = [np.ones(3)]
fastoptim.sgd_(params, grads, lr="0.1")  # error
fastoptim.adam_(params, grads, params, params)  # error
fastoptim.adam_(params, grads, [1.0, 2.0], params, step=1)  # error
fastoptim.rmsprop_(params, grads, params, bogus=True)  # error
reference.lion_(params, grads, params, maximize="yes")  # error
fastoptim.set_num_threads("2")  # error
threads: str = fastoptim.get_num_threads()  # error
fastoptim.adam_(params, grads, params, params, step=1, stochastic_rounding=5)  # error
fastoptim.sgd_(params, grads, grad_scale="2")  # error
optim.Adam(params, lr="1e-3")  # error
optim.SGD(params).step("grads")  # error
EMA(0.9).update("x")  # error
CosineDecay(1e-2, decay_steps=1.5)  # error
