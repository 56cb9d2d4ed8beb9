"""The storage formats of the case table's tests (tests/test_formats.py, and the CUDA kernels'
tests/test_cuda_formats.py): the formats' dtypes and the states and grads the tests start from."""

import ml_dtypes
import numpy as np

import optimizer_cases as cases
from optimizer_cases import CASES, active_states

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)
LOW = (BF16, F16)

# name: (params, grads, states, param_copies or None)
FORMATS = {
    "bfloat16": (BF16, BF16, BF16, None),
    "float16": (F16, F16, F16, None),
    "bf16-f32states": (BF16, BF16, F32, None),
    "f16-f32states": (F16, F16, F32, None),
    "f32-bf16grads": (F32, BF16, F32, None),
    "f32-f16grads": (F32, F16, F32, None),
    "f32-bf16grads-copy": (F32, BF16, F32, BF16),
    "f32-f16grads-copy": (F32, F16, F32, F16),
    "f32-bf16states": (F32, F32, BF16, None),
}
FULL_CASES = [case for i, case in enumerate(CASES)
              if i + 1 == len(CASES) or CASES[i + 1][0] != case[0]]


def grad_name(rule):
    return "values" if rule == "ema" else "grads"


def first_name(rule):
    return "averages" if rule == "ema" else "params"


def make_state(rule, hyper, fmt, shapes, rng):
    """Params (and states as torch starts them) in the format's dtypes, plus param_copies."""
    p_dt, _, s_dt, c_dt = FORMATS[fmt]
    state = {first_name(rule): [rng.uniform(-2, 2, s).astype(np.float32).astype(p_dt)
                                for s in shapes]}
    for name in active_states(rule, hyper):
        fill = 0.1 if rule == "adagrad" else cases.initial_state(rule, name, hyper)
        state[name] = [np.full(s, fill, np.float32).astype(s_dt) for s in shapes]
    if c_dt is not None:
        state["param_copies"] = [np.zeros(s, c_dt) for s in shapes]
    return state


def make_grads(rule, fmt, shapes, rng):
    """|grad| in [0.5, 2] of random sign, some exact zeros (test_functional.py's data)."""
    g_dt = FORMATS[fmt][1]
    out = []
    for s in shapes:
        g = rng.choice([-1.0, 1.0], s) * rng.uniform(0.5, 2.0, s)
        g.reshape(-1)[int(rng.integers(7))::7] = 0.0
        g = g.astype(np.float32).astype(g_dt)
        g.flags.writeable = False
        out.append(g)
    return out


def update(module, rule, hyper, state, grads, step):
    kwargs = {name: arrays for name, arrays in state.items() if name != first_name(rule)}
    kwargs.update(cases.scalar_kwargs(rule, hyper, step))
    getattr(module, rule + "_")(state[first_name(rule)], grads, **kwargs, **hyper)


def copy_state(state):
    return {name: [a.copy() for a in arrays] for name, arrays in state.items()}
