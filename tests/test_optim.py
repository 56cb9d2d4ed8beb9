"""The stateful classes of fastoptim.optim against the NumPy oracle (fastoptim.reference).

The oracle run below drives the reference functions exactly as torch.optim drives its
``_single_tensor_<name>``: states created once (zeros; Adagrad's ``sum`` full of
``initial_accumulator_value``), ``step`` = steps taken + 1, a callable lr evaluated at the
number of steps already taken. Every parameter and every state array is compared.
"""

import io
import itertools
import math
import os
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest

from fastoptim import optim, reference

DTYPES = [np.float32, np.float64]
SHAPES = [(3, 5), (17,), (1,), (0,)]
STEPS = 20

# torch.optim 2.13's constructor defaults.
DEFAULTS = {
    optim.SGD: dict(lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False,
                    maximize=False),
    optim.RMSprop: dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0,
                        centered=False, maximize=False),
    optim.Adam: dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False,
                     maximize=False, decoupled_weight_decay=False),
    optim.AdamW: dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                      maximize=False, decoupled_weight_decay=True),
    optim.Adagrad: dict(lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0,
                        eps=1e-10, maximize=False),
    optim.Adadelta: dict(lr=1.0, rho=0.9, eps=1e-6, weight_decay=0, maximize=False),
    optim.NAdam: dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, momentum_decay=4e-3,
                      decoupled_weight_decay=False, maximize=False),
    optim.RAdam: dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                      decoupled_weight_decay=False, maximize=False),
    optim.Adamax: dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, maximize=False),
    optim.ASGD: dict(lr=1e-2, lambd=1e-4, alpha=0.75, t0=1e6, weight_decay=0, maximize=False),
    optim.Rprop: dict(lr=1e-2, etas=(0.5, 1.2), step_sizes=(1e-6, 50), maximize=False),
}

# Every option of every class, alone and combined.
CASES = [
    (optim.SGD, {}),
    (optim.SGD, dict(lr=0.05, momentum=0.9)),
    (optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.3)),
    (optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    (optim.SGD, dict(lr=0.05, weight_decay=0.1)),
    (optim.SGD, dict(lr=0.05, momentum=0.5, weight_decay=0.01, nesterov=True, maximize=True)),
    (optim.RMSprop, {}),
    (optim.RMSprop, dict(alpha=0.9, eps=1e-6)),
    (optim.RMSprop, dict(momentum=0.9)),
    (optim.RMSprop, dict(centered=True)),
    (optim.RMSprop, dict(centered=True, momentum=0.5, weight_decay=0.1, maximize=True)),
    (optim.Adam, {}),
    (optim.Adam, dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6)),
    (optim.Adam, dict(amsgrad=True)),
    (optim.Adam, dict(weight_decay=0.1)),
    (optim.Adam, dict(amsgrad=True, weight_decay=0.1, maximize=True)),
    (optim.Adam, dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)),
    (optim.Adam, dict(amsgrad=True, weight_decay=0.1, decoupled_weight_decay=True, maximize=True)),
    (optim.AdamW, {}),
    (optim.AdamW, dict(weight_decay=0)),
    (optim.AdamW, dict(amsgrad=True)),
    (optim.AdamW, dict(lr=1e-2, weight_decay=0.1, maximize=True)),
    (optim.Adagrad, {}),
    (optim.Adagrad, dict(lr_decay=0.1)),
    (optim.Adagrad, dict(initial_accumulator_value=0.5)),
    (optim.Adagrad, dict(weight_decay=0.1, maximize=True, eps=1e-6)),
    (optim.Adadelta, {}),
    (optim.Adadelta, dict(rho=0.5, eps=1e-4)),
    (optim.Adadelta, dict(weight_decay=0.1, maximize=True)),
    (optim.NAdam, {}),
    (optim.NAdam, dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, momentum_decay=0.04)),
    (optim.NAdam, dict(lr=1e-2, weight_decay=0.1, maximize=True)),
    (optim.NAdam, dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True, maximize=True)),
    (optim.RAdam, {}),
    (optim.RAdam, dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    (optim.RAdam, dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True, maximize=True)),
    (optim.Adamax, {}),
    (optim.Adamax, dict(lr=1e-2, betas=(0.5, 0.9), eps=1e-4, weight_decay=0.1, maximize=True)),
    (optim.ASGD, {}),
    (optim.ASGD, dict(lr=0.05, lambd=0.01, alpha=0.5, t0=5)),  # averages from step 7 on
    (optim.ASGD, dict(lr=0.05, t0=5, weight_decay=0.1, maximize=True)),
    (optim.Rprop, {}),
    (optim.Rprop, dict(lr=0.05, etas=(0.3, 1.5), maximize=True)),
    (optim.Rprop, dict(lr=0.1, step_sizes=(0.05, 0.2))),
]

# One configuration per class that allocates every optional state.
FULL = {
    optim.SGD: dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    optim.RMSprop: dict(momentum=0.5, centered=True, weight_decay=0.01),
    optim.Adam: dict(lr=1e-2, amsgrad=True, weight_decay=0.01),
    optim.AdamW: dict(lr=1e-2, amsgrad=True),
    optim.Adagrad: dict(lr_decay=0.05, initial_accumulator_value=0.1),
    optim.Adadelta: dict(weight_decay=0.01),
    optim.NAdam: dict(lr=1e-2, weight_decay=0.01),
    optim.RAdam: dict(lr=1e-2, weight_decay=0.01),
    optim.Adamax: dict(lr=1e-2, weight_decay=0.01),
    optim.ASGD: dict(lr=0.05, t0=3),
    optim.Rprop: dict(lr=0.05),
}

# The scalar states each class writes into state_dict (Note [Scalar states] in optim.py).
SCALAR_STATES = {optim.NAdam: ("mu_product",), optim.ASGD: ("eta", "mu")}


def _case_id(case):
    cls, options = case
    return cls.__name__ + "".join(f"-{k}={v}" for k, v in options.items())


def tolerance(dtype):
    # The kernels fuse (FMA) and reorder the reference's operations, so every step may differ by
    # a few ulps; over 20 steps that stays below 1e-5 relative in float32 and 1e-12 in float64.
    # atol covers elements that pass near zero, where a relative bound says nothing.
    if np.dtype(dtype) == np.float32:
        return dict(rtol=1e-5, atol=1e-6)
    return dict(rtol=1e-12, atol=1e-14)


def make_params(shapes, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(dtype) for shape in shapes]


def make_grads(params, steps, seed=1):
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(p.shape).astype(p.dtype) for p in params] for _ in range(steps)]


def state_names(cls, hp):
    if cls in NEW_STATE_NAMES:
        return list(NEW_STATE_NAMES[cls])
    if cls is optim.SGD:
        return ["momentum_buffer"] if hp["momentum"] != 0 else []
    if cls is optim.RMSprop:
        return (["square_avg"] + (["momentum_buffer"] if hp["momentum"] > 0 else [])
                + (["grad_avg"] if hp["centered"] else []))
    if cls in (optim.Adam, optim.AdamW):
        return ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if hp["amsgrad"] else [])
    if cls is optim.Adagrad:
        return ["sum"]
    return ["square_avg", "acc_delta"]


NEW_STATE_NAMES = {optim.NAdam: ("exp_avg", "exp_avg_sq"), optim.RAdam: ("exp_avg", "exp_avg_sq"),
                   optim.Adamax: ("exp_avg", "exp_inf"), optim.ASGD: ("ax",),
                   optim.Rprop: ("prev", "step_size")}


def reference_run(cls, options, params, grads_seq, first_step=0, states=None):
    """The oracle trajectory: ``(params, {name: [arrays]})`` after ``grads_seq``.

    Runs the reference functions with the hyperparameters ``DEFAULTS[cls] | options`` starting
    from ``first_step`` steps taken and ``states`` (fresh states when None).
    """
    hp = {**DEFAULTS[cls], **options}
    params = [p.copy() for p in params]
    if states is None:
        init = hp.get("initial_accumulator_value", 0)
        states = {name: [np.full_like(p, init) for p in params] for name in state_names(cls, hp)}
        if cls is optim.Rprop:
            states["step_size"] = [np.full_like(p, hp["lr"]) for p in params]
    else:
        states = {name: [a.copy() for a in arrays] for name, arrays in states.items()}
    # Scalar states, carried in float64 as the classes do.
    mu_product, eta, mu = 1.0, hp["lr"], 1.0
    for t, grads in enumerate(grads_seq, start=first_step):
        lr = hp["lr"](t) if callable(hp["lr"]) else hp["lr"]
        common = dict(lr=lr, weight_decay=hp.get("weight_decay", 0), maximize=hp["maximize"])
        if cls is optim.SGD:
            use_momentum = hp["momentum"] != 0
            reference.sgd_(params, grads, states.get("momentum_buffer"),
                           step=t + 1 if use_momentum else None, momentum=hp["momentum"],
                           dampening=hp["dampening"], nesterov=hp["nesterov"], **common)
        elif cls is optim.RMSprop:
            reference.rmsprop_(params, grads, states["square_avg"], states.get("grad_avg"),
                               states.get("momentum_buffer"), alpha=hp["alpha"], eps=hp["eps"],
                               momentum=hp["momentum"], centered=hp["centered"], **common)
        elif cls in (optim.Adam, optim.AdamW):
            fn = reference.adamw_ if hp["decoupled_weight_decay"] else reference.adam_
            fn(params, grads, states["exp_avg"], states["exp_avg_sq"], step=t + 1,
               beta1=hp["betas"][0], beta2=hp["betas"][1], eps=hp["eps"],
               amsgrad=hp["amsgrad"], max_exp_avg_sqs=states.get("max_exp_avg_sq"), **common)
        elif cls is optim.Adagrad:
            reference.adagrad_(params, grads, states["sum"], step=t + 1,
                               lr_decay=hp["lr_decay"], eps=hp["eps"], **common)
        elif cls is optim.NAdam:
            mu_product *= reference.nadam_mu(t + 1, hp["betas"][0], hp["momentum_decay"])
            reference.nadam_(params, grads, states["exp_avg"], states["exp_avg_sq"], step=t + 1,
                             mu_product=mu_product, beta1=hp["betas"][0], beta2=hp["betas"][1],
                             eps=hp["eps"], momentum_decay=hp["momentum_decay"],
                             decoupled_weight_decay=hp["decoupled_weight_decay"], **common)
        elif cls is optim.RAdam:
            reference.radam_(params, grads, states["exp_avg"], states["exp_avg_sq"], step=t + 1,
                             beta1=hp["betas"][0], beta2=hp["betas"][1], eps=hp["eps"],
                             decoupled_weight_decay=hp["decoupled_weight_decay"], **common)
        elif cls is optim.Adamax:
            reference.adamax_(params, grads, states["exp_avg"], states["exp_inf"], step=t + 1,
                              beta1=hp["betas"][0], beta2=hp["betas"][1], eps=hp["eps"],
                              **common)
        elif cls is optim.ASGD:
            reference.asgd_(params, grads, states["ax"], eta=eta, mu=mu, lambd=hp["lambd"],
                            **common)
            eta, mu = reference.asgd_next(t + 1, lr, hp["lambd"], hp["alpha"], hp["t0"])
        elif cls is optim.Rprop:
            reference.rprop_(params, grads, states["prev"], states["step_size"],
                             etaminus=hp["etas"][0], etaplus=hp["etas"][1],
                             step_size_min=hp["step_sizes"][0],
                             step_size_max=hp["step_sizes"][1], maximize=hp["maximize"])
        else:
            reference.adadelta_(params, grads, states["square_avg"], states["acc_delta"],
                                rho=hp["rho"], eps=hp["eps"], **common)
    return params, states


def assert_matches(opt, indices, params, ref_params, ref_states, dtype):
    tol = tolerance(dtype)
    for k, i in enumerate(indices):
        np.testing.assert_allclose(params[k], ref_params[k], **tol, err_msg=f"param {i}")
        assert sorted(opt.state[i]) == sorted(ref_states), f"state names of param {i}"
        for name, arrays in ref_states.items():
            np.testing.assert_allclose(opt.state[i][name], arrays[k], **tol,
                                       err_msg=f"state[{i}][{name!r}]")


def snapshot(opt):
    """Everything an optimizer holds, as plain copies (for 'nothing changed' checks)."""
    sd = opt.state_dict()
    params = [p.copy() for g in opt.param_groups for p in g["params"]]
    return sd, params


def assert_same_snapshot(a, b):
    (sd_a, params_a), (sd_b, params_b) = a, b
    assert sd_a["param_groups"] == sd_b["param_groups"]
    assert sd_a["state"].keys() == sd_b["state"].keys()
    for i, entry in sd_a["state"].items():
        assert entry.keys() == sd_b["state"][i].keys()
        assert entry["step"] == sd_b["state"][i]["step"]
        for name, arr in entry.items():
            if name != "step":
                np.testing.assert_array_equal(arr, sd_b["state"][i][name], strict=True)
    for pa, pb in zip(params_a, params_b, strict=True):
        np.testing.assert_array_equal(pa, pb, strict=True)


# -- construction ---------------------------------------------------------------------------


@pytest.mark.parametrize("cls", list(DEFAULTS), ids=lambda c: c.__name__)
def test_defaults_are_torchs(cls):
    p = np.zeros(3)
    opt = cls([p])
    assert opt.defaults == DEFAULTS[cls]
    group = opt.param_groups[0]
    assert {k: v for k, v in group.items() if k != "params"} == DEFAULTS[cls]
    assert group["params"][0] is p


def test_adamw_is_an_adam():
    assert isinstance(optim.AdamW([np.zeros(3)]), optim.Adam)


@pytest.mark.parametrize("cls, options, match", [
    (optim.SGD, dict(lr=-1.0), r"invalid lr: -1\.0"),
    (optim.SGD, dict(lr=math.nan), "invalid lr"),
    (optim.SGD, dict(lr=math.inf), "invalid lr"),
    (optim.SGD, dict(momentum=1.5), "invalid momentum"),
    (optim.SGD, dict(momentum=0.9, dampening=-0.1), "invalid dampening"),
    (optim.SGD, dict(weight_decay=-1e-3), "invalid weight_decay"),
    (optim.SGD, dict(nesterov=True), "nesterov"),
    (optim.SGD, dict(nesterov=True, momentum=0.9, dampening=0.1), "nesterov"),
    (optim.RMSprop, dict(alpha=1.5), "invalid alpha"),
    (optim.RMSprop, dict(eps=-1e-8), "invalid eps"),
    (optim.RMSprop, dict(momentum=math.nan), "invalid momentum"),
    (optim.Adam, dict(betas=(1.0, 0.999)), r"invalid betas\[0\]"),
    (optim.Adam, dict(betas=(0.9, -0.1)), r"invalid betas\[1\]"),
    (optim.AdamW, dict(weight_decay=math.inf), "invalid weight_decay"),
    (optim.Adagrad, dict(lr_decay=-0.1), "invalid lr_decay"),
    (optim.Adagrad, dict(initial_accumulator_value=-1.0), "invalid initial_accumulator_value"),
    (optim.Adadelta, dict(rho=1.1), "invalid rho"),
    (optim.NAdam, dict(momentum_decay=-1e-3), "invalid momentum_decay"),
    (optim.NAdam, dict(betas=(0.9, 1.0)), r"invalid betas\[1\]"),
    (optim.RAdam, dict(eps=math.nan), "invalid eps"),
    (optim.Adamax, dict(weight_decay=-0.1), "invalid weight_decay"),
    (optim.ASGD, dict(lambd=-1e-4), "invalid lambd"),
    (optim.ASGD, dict(alpha=math.inf), "invalid alpha"),
    (optim.ASGD, dict(t0=math.nan), "invalid t0"),
    (optim.ASGD, dict(lr=lambda t: -1.0), r"invalid param_groups\[0\]\['lr'\]\(0\)"),
    (optim.Rprop, dict(etas=(1.5, 2.0)), "invalid etas"),
    (optim.Rprop, dict(etas=(0.5, 0.9)), "invalid etas"),
    (optim.Rprop, dict(step_sizes=(-1e-6, 50)), r"invalid step_sizes\[0\]"),
])
def test_bad_hyperparameter_is_value_error(cls, options, match):
    with pytest.raises(ValueError, match=match):
        cls([np.zeros(3)], **options)


@pytest.mark.parametrize("cls, options, match", [
    (optim.SGD, dict(lr="0.1"), "lr must be a real number"),
    (optim.Adam, dict(betas=(0.9, 0.99, 0.9)), "betas must be a pair"),
    (optim.Adam, dict(amsgrad=1), "amsgrad must be a bool"),
    (optim.RMSprop, dict(maximize="yes"), "maximize must be a bool"),
    (optim.Adam, dict(decoupled_weight_decay=1), "decoupled_weight_decay must be a bool"),
    (optim.NAdam, dict(decoupled_weight_decay="no"), "decoupled_weight_decay must be a bool"),
    (optim.Rprop, dict(etas=(0.5,)), "etas must be a pair"),
    (optim.Rprop, dict(step_sizes=1e-6), "step_sizes must be a pair"),
    (optim.Rprop, dict(lr=lambda t: 0.1), "lr only sets the initial step sizes"),
])
def test_badly_typed_hyperparameter_is_type_error(cls, options, match):
    with pytest.raises(TypeError, match=match):
        cls([np.zeros(3)], **options)


def test_bad_group_hyperparameter_names_the_group():
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['lr'\]"):
        optim.Adam([{"params": [np.zeros(3)]}, {"params": [np.zeros(2)], "lr": -1.0}])


@pytest.mark.parametrize("params, error, match", [
    ([np.zeros(3, dtype=np.int32)], TypeError, "dtype int32"),
    ([np.zeros(3, dtype=np.longdouble)], TypeError, "dtype float128"),
    ([np.zeros(3, dtype=np.complex64)], TypeError, "dtype complex64"),
    ([[0.0, 1.0]], TypeError, "must be a numpy.ndarray"),
    ([np.zeros((4, 4))[:, ::2]], ValueError, "not C-contiguous"),
    ([np.broadcast_to(np.zeros(1), (3,))], ValueError, "not C-contiguous|not writeable"),
    ([], ValueError, "empty parameter list"),
    (np.zeros(3), TypeError, "wrap a single array in a list"),
    ([np.zeros(3), {"params": [np.zeros(3)]}], TypeError, "not a mix"),
    ([{"params": {1, 2}}], TypeError, "not a set"),
    ([{"lr": 0.1}], ValueError, "no 'params'"),
])
def test_bad_params(params, error, match):
    with pytest.raises(error, match=match):
        optim.Adam(params)


def test_masked_array_param_is_refused():
    masked = np.ma.masked_array(np.zeros(3), mask=[False, True, False])
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[1\] is a numpy.ma"):
        optim.SGD([np.zeros(2), masked])
    opt = optim.SGD([np.zeros(2)])
    with pytest.raises(TypeError, match=r"param_groups\[1\]\['params'\]\[0\] is a numpy.ma"):
        opt.add_param_group({"params": [masked]})
    assert len(opt.param_groups) == 1 and len(opt.state) == 1


def test_read_only_param():
    p = np.zeros(3)
    p.flags.writeable = False
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\] is not writeable"):
        optim.SGD([p])


def test_same_or_overlapping_params_are_rejected():
    p = np.zeros(10)
    with pytest.raises(ValueError, match="overlap"):
        optim.Adam([p, p])
    with pytest.raises(ValueError, match="overlap"):
        optim.Adam([{"params": [p[:6]]}, {"params": [p[4:]]}])
    optim.Adam([p[:5], p[5:]])  # adjacent, disjoint views are fine


def test_group_params_may_be_a_single_array():
    p = np.zeros(3)
    opt = optim.SGD([{"params": p}])
    assert opt.param_groups[0]["params"][0] is p


def test_repr_is_torchs():
    assert repr(optim.Adam([np.zeros(3)], lr=0.5)) == (
        "Adam (\nParameter Group 0\n    amsgrad: False\n    betas: (0.9, 0.999)\n"
        "    decoupled_weight_decay: False\n    eps: 1e-08\n    lr: 0.5\n    maximize: False\n"
        "    weight_decay: 0\n)"
    )


# -- trajectories against the oracle --------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_reference(case, dtype):
    cls, options = case
    params = make_params(SHAPES, dtype)
    grads_seq = make_grads(params, STEPS)
    ref_params, ref_states = reference_run(cls, options, params, grads_seq)
    opt = cls(params, **options)
    for grads in grads_seq:
        opt.step(grads)
    assert_matches(opt, range(len(params)), params, ref_params, ref_states, dtype)
    assert all(entry["step"] == STEPS for entry in opt.state_dict()["state"].values())


def test_param_groups_with_their_own_hyperparameters():
    params = make_params(SHAPES, np.float64)
    originals = [p.copy() for p in params]
    grads_seq = make_grads(params, STEPS)
    groups = [dict(lr=0.1, momentum=0.9), dict(lr=0.01), dict(momentum=0.5, nesterov=True)]
    opt = optim.SGD([{"params": params[0:2], **groups[0]}, {"params": params[2:3], **groups[1]},
                     {"params": params[3:], **groups[2]}], lr=0.05)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.01, 0.05]
    for grads in grads_seq:
        opt.step(grads)
    for slc, options in zip([slice(0, 2), slice(2, 3), slice(3, 4)], groups):
        options = {"lr": 0.05, **options}
        sub = [g[slc] for g in grads_seq]
        ref_params, ref_states = reference_run(optim.SGD, options, originals[slc], sub)
        indices = range(len(params))[slc]
        assert_matches(opt, indices, params[slc], ref_params, ref_states, np.float64)
    assert "momentum_buffer" not in opt.state[2]


def test_mixed_dtypes_across_and_within_groups():
    # Group 0 interleaves float32 and float64 (two calls, non-contiguous indices); group 1 is
    # float64 only.
    p32 = make_params([(7,), (3, 3)], np.float32)
    p64 = make_params([(5,), (9,)], np.float64, seed=3)
    params = [p32[0], p64[0], p32[1], p64[1]]
    originals = [p.copy() for p in params]
    grads_seq = make_grads(params, STEPS)
    opt = optim.Adam([{"params": params[:3]}, {"params": params[3:], "lr": 1e-2}], amsgrad=True)
    for grads in grads_seq:
        opt.step(grads)
    for i, options in [(0, {}), (1, {}), (2, {}), (3, {"lr": 1e-2})]:
        options = {"amsgrad": True, **options}
        ref_params, ref_states = reference_run(optim.Adam, options, [originals[i]],
                                               [[g[i]] for g in grads_seq])
        assert_matches(opt, [i], [params[i]], ref_params, ref_states, params[i].dtype)


class _CallCounter:
    """Stands in for fastoptim.functional: forwards to it and records every call."""

    def __init__(self, functional):
        self.calls = []
        self._functional = functional

    def __getattr__(self, name):
        fn = getattr(self._functional, name)

        def record(params, *args, **kwargs):
            self.calls.append((name, params))
            return fn(params, *args, **kwargs)

        return record


def test_one_call_per_group_and_dtype_with_lists(monkeypatch):
    counter = _CallCounter(optim.F)
    monkeypatch.setattr(optim, "F", counter)
    a32, b32, c64, d64, e32 = make_params([(3,), (4,), (5,), (6,), (7,)], np.float32)
    c64, d64 = c64.astype(np.float64), d64.astype(np.float64)
    opt = optim.AdamW([{"params": [a32, c64, b32, d64]}, {"params": [e32], "lr": 0.1}])
    grads = [np.ones_like(p) for p in (a32, c64, b32, d64, e32)]
    opt.step(grads)
    names = [name for name, _ in counter.calls]
    assert names == ["adamw_"] * 3
    lists = [params for _, params in counter.calls]
    assert all(isinstance(p, list) for p in lists)
    assert [[id(x) for x in p] for p in lists] == [[id(a32), id(b32)], [id(c64), id(d64)],
                                                   [id(e32)]]


def test_grads_as_tuple_or_single_array():
    p, q = make_params([(5,)], np.float64)[0], make_params([(5,)], np.float64)[0]
    g = make_grads([p], 1)[0][0]
    optim.SGD([p], lr=0.1).step(g)
    optim.SGD([q], lr=0.1).step((g,))
    np.testing.assert_array_equal(p, q)


def test_callable_lr_is_a_schedule():
    seen = []

    def lr(t):
        seen.append(t)
        return 0.1 * 0.5**t

    params = make_params(SHAPES, np.float64)
    grads_seq = make_grads(params, STEPS)
    ref_params, ref_states = reference_run(optim.Adam, {"lr": lambda t: 0.1 * 0.5**t}, params,
                                           grads_seq)
    opt = optim.Adam(params, lr=lr)
    for grads in grads_seq:
        opt.step(grads)
    assert seen == list(range(STEPS))
    assert_matches(opt, range(len(params)), params, ref_params, ref_states, np.float64)


def test_callable_lr_per_group_next_to_a_float():
    p, q = make_params([(4,), (4,)], np.float64)
    opt = optim.SGD([{"params": [p], "lr": lambda t: 1.0 + t}, {"params": [q], "lr": 0.5}])
    p0, q0 = p.copy(), q.copy()
    ones = [np.ones(4), np.ones(4)]
    opt.step(ones)
    opt.step(ones)
    np.testing.assert_array_equal(p, p0 - 1.0 - 2.0)
    np.testing.assert_array_equal(q, q0 - 0.5 - 0.5)


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf])
def test_bad_callable_lr_value_changes_nothing(bad):
    params = make_params([(4,), (3,)], np.float32)
    opt = optim.Adam([{"params": params[:1]}, {"params": params[1:],
                                                "lr": lambda t: bad if t == 3 else 0.1}])
    grads = make_grads(params, 1)[0]
    for _ in range(3):
        opt.step(grads)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['lr'\]\(3\)"):
        opt.step(grads)
    assert_same_snapshot(before, snapshot(opt))


def test_unchanged_hyperparameters_are_checked_once(monkeypatch):
    """Note [Hyperparameters checked once]: a group is checked again only when a value changed
    (type or value), or when it has one that could change in place (betas in a list)."""
    params = make_params([(4,), (3,)], np.float32)
    opt = optim.Adam([{"params": params[:1]}, {"params": params[1:], "betas": [0.8, 0.9]}])
    checked = []
    real = opt._check_group
    monkeypatch.setattr(opt, "_check_group", lambda group, where: (checked.append(where),
                                                                   real(group, where)))
    grads = make_grads(params, 1)[0]
    for _ in range(3):
        opt.step(grads)
    # group 0 once; group 1 (a list of betas) every step
    assert checked == ["param_groups[0]", "param_groups[1]", "param_groups[1]",
                       "param_groups[1]"]
    opt.param_groups[0]["lr"] = 0.01  # a new value: checked again, once
    opt.step(grads)
    opt.step(grads)
    assert checked.count("param_groups[0]") == 2


@pytest.mark.parametrize("edit, error, match", [
    (lambda g: g[0].update(lr=-1.0), ValueError, r"param_groups\[0\]\['lr'\]"),
    (lambda g: g[0].update(maximize=0), TypeError, r"param_groups\[0\]\['maximize'\]"),
    (lambda g: g[0].update(amsgrad=1), TypeError, r"param_groups\[0\]\['amsgrad'\]"),
    (lambda g: g[0].update(eps=np.float32(math.nan)), ValueError, r"\['eps'\]"),
    (lambda g: g[0].update(betas=(0.9, 1)), ValueError, r"\['betas'\]\[1\]"),
    (lambda g: g[0].pop("eps"), ValueError, "has no hyperparameter 'eps'"),
    (lambda g: g[1]["betas"].__setitem__(0, 1.5), ValueError, r"param_groups\[1\]\['betas'\]"),
])
def test_a_hyperparameter_edited_after_steps_is_checked_with_nothing_written(edit, error, match):
    params = make_params([(4,), (3,)], np.float32)
    opt = optim.Adam([{"params": params[:1]}, {"params": params[1:], "betas": [0.8, 0.9]}])
    grads = make_grads(params, 1)[0]
    for _ in range(3):
        opt.step(grads)
    edit(opt.param_groups)
    before = snapshot(opt)
    with pytest.raises(error, match=match):
        opt.step(grads)
    assert_same_snapshot(before, snapshot(opt))


def test_param_groups_edits_take_effect_like_torch():
    p = make_params([(6,)], np.float64)[0]
    p0 = p.copy()
    opt = optim.SGD([p], lr=0.1)
    opt.step([np.ones(6)])
    opt.param_groups[0]["lr"] = 0.25
    opt.step([np.ones(6)])
    np.testing.assert_array_equal(p, p0 - 0.1 - 0.25)


def test_option_needing_new_state_after_construction_is_rejected():
    params = make_params([(6,)], np.float32)
    opt = optim.Adam(params)
    opt.step([np.ones(6, np.float32)])
    before = snapshot(opt)
    opt.param_groups[0]["amsgrad"] = True
    with pytest.raises(ValueError, match="max_exp_avg_sq"):
        opt.step([np.ones(6, np.float32)])
    opt.param_groups[0]["amsgrad"] = False
    assert_same_snapshot(before, snapshot(opt))
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr'\]"):
        opt.step([np.ones(6, np.float32)])


@pytest.mark.parametrize("grads, error, match", [
    (lambda g: g[:-1], ValueError, "expects 3 gradients"),
    (lambda g: g[0], TypeError, "single array"),
    (lambda g: {0: g[0]}, TypeError, "list of numpy arrays"),
    (lambda g: g[:2] + [g[2].astype(np.float64)], TypeError, r"grads\[2\]"),
    (lambda g: g[:2] + [g[2][:-1]], ValueError, r"grads\[2\]"),
    (lambda g: g[:2] + [list(g[2])], TypeError, r"grads\[2\]"),
    (lambda g: g[:2] + [np.repeat(g[2], 2)[::2]], ValueError, r"grads\[2\] is not C-contiguous"),
])
def test_bad_grads_change_nothing(grads, error, match):
    # Two groups: the last group's bad gradient must not leave the first group updated.
    params = make_params([(5,), (4,), (3,)], np.float32)
    opt = optim.Adam([{"params": params[:2]}, {"params": params[2:]}])
    good = make_grads(params, 1)[0]
    opt.step(good)
    before = snapshot(opt)
    with pytest.raises(error, match=match):
        opt.step(grads(good))
    assert_same_snapshot(before, snapshot(opt))


def test_unusual_but_valid_grads_across_calls():
    # Several calls, so step() checks the gradients itself: an ndarray subclass and a size-1
    # dimension with an arbitrary stride (still C-contiguous) must be accepted.
    class Grad(np.ndarray):
        pass

    params = make_params([(1, 3), (4,)], np.float64)
    expected = [p - 0.1 for p in params]
    opt = optim.SGD([{"params": params[:1]}, {"params": params[1:]}], lr=0.1)
    odd = np.lib.stride_tricks.as_strided(np.ones(3), shape=(1, 3), strides=(1000, 8))
    assert odd.flags.c_contiguous and odd.strides != params[0].strides
    opt.step([odd, np.ones(4).view(Grad)])
    for p, e in zip(params, expected):
        np.testing.assert_array_equal(p, e)


def _two_groups_two_dtypes(cls):
    """Every state allocated, two groups of (float32, float64) params of one shape, so that a
    gradient can alias another group's arrays; four fused calls per step, in the order
    group 0 float32, group 0 float64, group 1 float32, group 1 float64."""
    p32 = make_params([(6,), (6,)], np.float32, seed=3)
    p64 = make_params([(6,), (6,)], np.float64, seed=4)
    opt = cls([{"params": [p32[0], p64[0]]}, {"params": [p32[1], p64[1]], "lr": 0.01}],
              **FULL[cls])
    for grads in make_grads(_params_of(opt), 2):
        opt.step(grads)
    return opt, _params_of(opt), make_grads(_params_of(opt), 1, seed=9)[0]


def _any_state(opt, i):
    return next(iter(opt.state[i].values()))


# Bad gradients of the SECOND fused call (group 0's float64 parameter, grads[1]) or, where it
# reads what an earlier call wrote, of the last one (grads[3]).
BAD_LATER_GRADS = {
    "own param": (lambda opt, ps, g: {1: ps[1]}, ValueError, r"grads\[1\] shares memory with "
                  r"param_groups\[0\]\['params'\]\[1\]"),
    "own param view": (lambda opt, ps, g: {1: ps[1][:]}, ValueError, r"grads\[1\] shares"),
    "own state": (lambda opt, ps, g: {1: _any_state(opt, 1)}, ValueError,
                  r"grads\[1\] shares memory with state\[1\]"),
    "later group's param": (lambda opt, ps, g: {1: ps[3]}, ValueError,
                            r"grads\[1\] shares memory with param_groups\[1\]"),
    "earlier call's param": (lambda opt, ps, g: {3: ps[1]}, ValueError,
                             r"grads\[3\] shares memory with param_groups\[0\]\['params'\]\[1\]"),
    "earlier call's state": (lambda opt, ps, g: {3: _any_state(opt, 1)}, ValueError,
                             r"grads\[3\] shares memory with state\[1\]"),
    "dtype": (lambda opt, ps, g: {1: g[1].astype(np.float32)}, TypeError, r"grads\[1\] has dtype"),
    "shape": (lambda opt, ps, g: {1: g[1][:-1]}, ValueError, r"grads\[1\] has shape"),
    "not contiguous": (lambda opt, ps, g: {1: np.repeat(g[1], 2)[::2]}, ValueError,
                       r"grads\[1\] is not C-contiguous"),
    "not an array": (lambda opt, ps, g: {1: list(g[1])}, TypeError, r"grads\[1\] must be"),
    "masked": (lambda opt, ps, g: {1: np.ma.masked_array(g[1], mask=g[1] > 0)}, TypeError,
               r"grads\[1\] is a numpy.ma.MaskedArray"),
}


@pytest.mark.parametrize("bad", list(BAD_LATER_GRADS))
@pytest.mark.parametrize("cls", list(FULL), ids=lambda c: c.__name__)
def test_bad_grad_in_a_later_call_changes_nothing(cls, bad):
    # Note [All or nothing]: the first call must not run when a later call would fail (or, for
    # an alias of what an earlier call wrote, would read the updated values).
    opt, params, grads = _two_groups_two_dtypes(cls)
    replace, error, match = BAD_LATER_GRADS[bad]
    for i, g in replace(opt, params, grads).items():
        grads[i] = g
    before = snapshot(opt)
    with pytest.raises(error, match=match):
        opt.step(grads)
    assert_same_snapshot(before, snapshot(opt))


def test_grads_sharing_memory_with_each_other_or_other_arrays_are_fine():
    # Only what the step writes is off limits: gradients may be views of one buffer (also a
    # buffer that holds the parameters elsewhere), or the very same array twice.
    buf = np.arange(40, dtype=np.float64) / 4  # exact in binary: so is every update below
    params = [buf[:5], buf[5:10]]
    opt = optim.SGD([{"params": params[:1]}, {"params": params[1:]}], lr=0.5)
    expected = [p - 0.5 * buf[20:25] for p in params]
    opt.step([buf[20:25], buf[20:25]])
    for p, e in zip(params, expected):
        np.testing.assert_array_equal(p, e)


def test_masked_grad_in_a_single_call_is_refused():
    params = make_params([(4,)], np.float64)
    opt = optim.Adam(params)
    before = snapshot(opt)
    with pytest.raises(TypeError, match=r"grads\[0\] is a numpy.ma.MaskedArray"):
        opt.step([np.ma.masked_array(np.ones(4), mask=[0, 1, 0, 0])])
    assert_same_snapshot(before, snapshot(opt))


def test_bad_grad_in_a_single_call_changes_nothing():
    # One group, one dtype: the kernel's own checks run before it writes.
    params = make_params([(5,), (4,)], np.float32)
    opt = optim.Adam(params)
    good = make_grads(params, 1)[0]
    opt.step(good)
    before = snapshot(opt)
    with pytest.raises(TypeError):
        opt.step([good[0], good[1].astype(np.float64)])
    assert_same_snapshot(before, snapshot(opt))


# -- states ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", list(FULL), ids=lambda c: c.__name__)
def test_states_are_allocated_once(cls):
    params = make_params(SHAPES, np.float32)
    opt = cls(params, **FULL[cls])
    before = {(i, name): (id(arr), arr.ctypes.data) for i, entry in opt.state.items()
              for name, arr in entry.items()}
    grads_seq = make_grads(params, 10)
    for grads in grads_seq[:5]:
        opt.step(grads)
    opt.load_state_dict(opt.state_dict())
    for grads in grads_seq[5:]:
        opt.step(grads)
    after = {(i, name): (id(arr), arr.ctypes.data) for i, entry in opt.state.items()
             for name, arr in entry.items()}
    assert after == before
    assert len(before) == len(params) * len(state_names(cls, {**DEFAULTS[cls], **FULL[cls]}))


def test_add_param_group_starts_its_own_step_count():
    # As in torch, parameters added later start from step 0 (fresh bias correction for Adam).
    params = make_params([(5,), (6,)], np.float64)
    originals = [p.copy() for p in params]
    grads_seq = make_grads(params, 6)
    opt = optim.Adam(params[:1], lr=1e-2)
    for grads in grads_seq[:3]:
        opt.step(grads[:1])
    opt.add_param_group({"params": params[1:], "lr": 1e-3})
    for grads in grads_seq[3:]:
        opt.step(grads)
    assert [e["step"] for e in opt.state_dict()["state"].values()] == [6, 3]
    ref0 = reference_run(optim.Adam, {"lr": 1e-2}, originals[:1], [g[:1] for g in grads_seq])
    ref1 = reference_run(optim.Adam, {}, originals[1:], [g[1:] for g in grads_seq[3:]])
    assert_matches(opt, [0], params[:1], *ref0, np.float64)
    assert_matches(opt, [1], params[1:], *ref1, np.float64)
    with pytest.raises(ValueError, match="overlap"):
        opt.add_param_group({"params": [params[0]]})
    assert len(opt.param_groups) == 2 and len(opt.state) == 2


def test_adagrad_initial_accumulator_value_per_group():
    p, q = make_params([(3,), (3,)], np.float64)
    opt = optim.Adagrad([{"params": [p]}, {"params": [q], "initial_accumulator_value": 2.0}],
                        initial_accumulator_value=0.5)
    np.testing.assert_array_equal(opt.state[0]["sum"], np.full(3, 0.5))
    np.testing.assert_array_equal(opt.state[1]["sum"], np.full(3, 2.0))


def test_no_allocation_per_step():
    # numpy reports its buffers to tracemalloc: a per-step temporary of a 2^20-element parameter
    # (4 MiB) would show in the peak; the lists built per step are a few hundred bytes.
    params = make_params([(1 << 20,), (1000,)], np.float32)
    grads = make_grads(params, 1)[0]
    opt = optim.Adam([{"params": params[:1]}, {"params": params[1:], "lr": lambda t: 1e-3}],
                     amsgrad=True)
    opt.step(grads)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(5):
            opt.step(grads)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak - base < 64 * 1024


_RSS_SCRIPT = textwrap.dedent("""
    import resource
    import sys

    import numpy as np

    from fastoptim import optim


    def peak_rss_kib():
        # VmHWM is this process's own peak. ru_maxrss would do, except that Linux carries the
        # parent's peak over fork and exec into it, which can hide this loop's growth.
        try:
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1])
        except OSError:
            pass
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS


    rng = np.random.default_rng(0)
    param = rng.standard_normal(1 << 20).astype(np.float32)
    grad = rng.standard_normal(1 << 20).astype(np.float32)
    opt = optim.Adam([param], lr=1e-4)
    grads = [grad]
    for _ in range(10):
        opt.step(grads)
    before = peak_rss_kib()
    for _ in range(1000):
        opt.step(grads)
    print(before, peak_rss_kib())
""")


def test_peak_rss_does_not_grow_over_1000_steps():
    # The "no allocation per step": after 10 warm-up steps, 1000 more steps of a
    # 2^20-element Adam must not raise the peak RSS by more than 1 MiB. A fresh interpreter, so
    # the peak is this loop's and not an earlier test's.
    if sys.platform == "win32":
        pytest.skip("no resource module on Windows")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    before, after = map(int, out.stdout.split())
    assert after - before <= 1024, f"peak RSS grew by {after - before} KiB"


# -- state_dict -----------------------------------------------------------------------------


def _full_opt(cls, lr=None, seed=0):
    """A two-group optimizer over float32 and float64 parameters with every state allocated."""
    p32 = make_params([(3, 5), (17,)], np.float32, seed=seed)
    p64 = make_params([(9,), (0,)], np.float64, seed=seed + 1)
    options = dict(FULL[cls])
    if lr is not None:
        options["lr"] = lr
    second_lr = options.get("lr", DEFAULTS[cls]["lr"]) * 0.5
    return cls([{"params": [p32[0], p64[0]]}, {"params": [p32[1], p64[1]], "lr": second_lr}],
               **options)


def _params_of(opt):
    return [p for g in opt.param_groups for p in g["params"]]


@pytest.mark.parametrize("cls", list(FULL), ids=lambda c: c.__name__)
def test_state_dict_round_trip_is_exact(cls):
    opt = _full_opt(cls)
    grads_seq = make_grads(_params_of(opt), 12)
    for grads in grads_seq[:5]:
        opt.step(grads)
    sd = opt.state_dict()
    saved_params = [p.copy() for p in _params_of(opt)]
    for grads in grads_seq[5:]:
        opt.step(grads)

    fresh = _full_opt(cls, lr=0.123, seed=7)
    for p, saved in zip(_params_of(fresh), saved_params):
        p[...] = saved
    fresh.load_state_dict(sd)
    assert [g["lr"] for g in fresh.param_groups] == [g["lr"] for g in opt.param_groups]
    for grads in grads_seq[5:]:
        fresh.step(grads)
    assert_same_snapshot(snapshot(opt), snapshot(fresh))


def test_state_dict_layout_and_deep_copy():
    schedule = lambda t: 0.1  # noqa: E731
    params = make_params([(3,), (4,)], np.float64)
    opt = optim.Adam([{"params": params[:1]}, {"params": params[1:], "lr": schedule}],
                     amsgrad=True)
    opt.step(make_grads(params, 1)[0])
    sd = opt.state_dict()
    assert list(sd) == ["state", "param_groups"]
    assert sorted(sd["state"]) == [0, 1]
    assert sd["state"][1].keys() == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert sd["state"][0]["step"] == 1 and type(sd["state"][0]["step"]) is int
    assert [g["params"] for g in sd["param_groups"]] == [[0], [1]]
    assert sd["param_groups"][1]["lr"] is schedule
    assert sd["param_groups"][0]["betas"] == (0.9, 0.999)
    for i in (0, 1):
        for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert not np.shares_memory(sd["state"][i][name], opt.state[i][name])
    saved = sd["state"][0]["exp_avg"].copy()
    opt.step(make_grads(params, 1, seed=5)[0])
    np.testing.assert_array_equal(sd["state"][0]["exp_avg"], saved)
    sd["param_groups"][0]["lr"] = 5.0
    assert opt.param_groups[0]["lr"] == 1e-3


def _corrupt(sd, how):
    """A copy of ``sd`` broken in its LAST group/parameter, so that a partial load would show."""
    last = max(sd["state"])
    if how == "group count":
        sd["param_groups"] = sd["param_groups"][:-1]
    elif how == "param count":
        sd["param_groups"][-1]["params"] = sd["param_groups"][-1]["params"][:-1]
    elif how == "shape":
        sd["state"][last]["exp_avg"] = np.zeros(3, sd["state"][last]["exp_avg"].dtype)
    elif how == "dtype":
        sd["state"][last]["exp_avg_sq"] = sd["state"][last]["exp_avg_sq"].astype(np.float16)
    elif how == "not an array":
        sd["state"][last]["exp_avg_sq"] = sd["state"][last]["exp_avg_sq"].tolist()
    elif how == "missing state":
        del sd["state"][last]["max_exp_avg_sq"]
    elif how == "extra state":
        sd["state"][last]["momentum_buffer"] = sd["state"][last]["exp_avg"].copy()
    elif how == "missing entry":
        del sd["state"][last]
    elif how == "steps differ":
        sd["state"][last]["step"] += 1
    elif how == "negative step":
        for i in sd["param_groups"][-1]["params"]:
            sd["state"][i]["step"] = -1
    elif how == "float step":
        for i in sd["param_groups"][-1]["params"]:
            sd["state"][i]["step"] = 2.0
    elif how == "bad hyperparameter":
        sd["param_groups"][-1]["betas"] = (0.9, 1.0)
    elif how == "missing hyperparameter":
        del sd["param_groups"][-1]["eps"]
    elif how == "duplicate index":
        sd["param_groups"][-1]["params"][0] = sd["param_groups"][0]["params"][0]
    elif how == "no state":
        del sd["state"]
    return sd


@pytest.mark.parametrize("how", [
    "group count", "param count", "shape", "dtype", "not an array", "missing state",
    "extra state", "missing entry", "steps differ", "negative step", "float step",
    "bad hyperparameter", "missing hyperparameter", "duplicate index", "no state",
])
def test_load_state_dict_errors_change_nothing(how):
    opt = _full_opt(optim.Adam)
    grads_seq = make_grads(_params_of(opt), 3)
    for grads in grads_seq:
        opt.step(grads)
    other = _full_opt(optim.Adam, lr=0.3, seed=11)
    for grads in grads_seq * 2:
        other.step(grads)
    before = snapshot(opt)
    with pytest.raises((ValueError, TypeError)) as info:
        opt.load_state_dict(_corrupt(other.state_dict(), how))
    assert "state_dict" in str(info.value) or "parameter index" in str(info.value)
    assert_same_snapshot(before, snapshot(opt))


class _Uncopyable:
    def __deepcopy__(self, memo):
        raise RuntimeError("cannot be copied")


class _UncopyableLr(float):
    """A valid lr whose deep copy fails."""

    def __deepcopy__(self, memo):
        raise RuntimeError("cannot be copied")


class _LrCopiedInvalid(float):
    """A valid lr whose deep copy is not."""

    def __deepcopy__(self, memo):
        return -1.0


@pytest.mark.parametrize("how, error, match", [
    ("uncopyable extra key", RuntimeError, "cannot be copied"),
    ("uncopyable lr", RuntimeError, "cannot be copied"),
    ("lr copied invalid", ValueError, r"state_dict\['param_groups'\]\[1\]\['lr'\]"),
])
def test_load_state_dict_copies_hyperparameters_before_writing(how, error, match):
    # The checkpoint's LAST group is the bad one: a load that copied arrays or earlier groups
    # first would leave the checkpoint's states with the old steps, or a group without "lr".
    opt = _full_opt(optim.Adam)
    grads_seq = make_grads(_params_of(opt), 3)
    for grads in grads_seq:
        opt.step(grads)
    other = _full_opt(optim.Adam, lr=0.3, seed=11)
    for grads in grads_seq * 2:
        other.step(grads)
    sd = other.state_dict()
    if how == "uncopyable extra key":
        sd["param_groups"][-1]["note"] = _Uncopyable()
    elif how == "uncopyable lr":
        sd["param_groups"][-1]["lr"] = _UncopyableLr(0.1)
    else:
        sd["param_groups"][-1]["lr"] = _LrCopiedInvalid(0.1)
    before = snapshot(opt)
    with pytest.raises(error, match=match):
        opt.load_state_dict(sd)
    assert_same_snapshot(before, snapshot(opt))
    assert all("lr" in group for group in opt.param_groups)


def test_load_state_dict_needing_unallocated_state_is_rejected():
    params = make_params([(4,)], np.float64)
    opt = optim.Adam(params)
    sd = optim.Adam(make_params([(4,)], np.float64), amsgrad=True).state_dict()
    before = snapshot(opt)
    with pytest.raises(ValueError, match="max_exp_avg_sq"):
        opt.load_state_dict(sd)
    assert_same_snapshot(before, snapshot(opt))


# -- torch ----------------------------------------------------------------------------------

TORCH_CASES = [
    (optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    (optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.2, maximize=True)),
    (optim.RMSprop, dict(momentum=0.5, centered=True, weight_decay=0.01)),
    (optim.Adam, {}),
    (optim.Adam, dict(lr=1e-2, amsgrad=True, weight_decay=0.1, maximize=True)),
    (optim.AdamW, dict(lr=1e-2, amsgrad=True)),
    (optim.Adagrad, dict(lr_decay=0.05, initial_accumulator_value=0.1, weight_decay=0.01)),
    (optim.Adadelta, dict(weight_decay=0.01, maximize=True)),
]


@pytest.mark.parametrize("case", TORCH_CASES, ids=_case_id)
def test_matches_torch(case):
    torch = pytest.importorskip("torch")
    cls, options = case
    params = make_params(SHAPES, np.float32)
    grads_seq = make_grads(params, STEPS)
    tparams = [torch.tensor(p.copy()) for p in params]
    topt = getattr(torch.optim, cls.__name__)(tparams, **options)
    opt = cls(params, **options)
    for grads in grads_seq:
        opt.step(grads)
        for tp, g in zip(tparams, grads):
            tp.grad = torch.tensor(g)
        topt.step()
    tol = tolerance(np.float32)
    for i, (p, tp) in enumerate(zip(params, tparams)):
        np.testing.assert_allclose(p, tp.numpy(), **tol, err_msg=f"param {i}")
        tstate = topt.state[tp]
        for name, arr in opt.state[i].items():
            np.testing.assert_allclose(arr, tstate[name].numpy(), **tol,
                                       err_msg=f"state[{i}][{name!r}]")
        if "step" in tstate:
            assert int(tstate["step"]) == STEPS


@pytest.mark.parametrize("cls", list(DEFAULTS), ids=lambda c: c.__name__)
def test_defaults_match_installed_torch(cls):
    torch = pytest.importorskip("torch")
    import inspect

    signature = inspect.signature(getattr(torch.optim, cls.__name__))
    for name, value in DEFAULTS[cls].items():
        if name in signature.parameters:  # AdamW has no decoupled_weight_decay argument
            assert signature.parameters[name].default == value, name
    # The param_group keys, less the flags that choose a torch implementation.
    torch_defaults = getattr(torch.optim, cls.__name__)([torch.zeros(1)]).defaults
    flags = {"foreach", "fused", "capturable", "differentiable"}
    assert {k: v for k, v in torch_defaults.items() if k not in flags} == DEFAULTS[cls]


# -- NAdam, RAdam, Adamax, ASGD, Rprop; Adam's decoupled_weight_decay ------------------------

def _combos(**choices):
    """Every combination of the given option values, as kwargs dicts."""
    names = list(choices)
    return [dict(zip(names, values)) for values in itertools.product(*choices.values())]


# Every option combination of each new class (and Adam's new option) against torch.optim.
NEW_TORCH_CASES = (
    [(optim.NAdam, dict(lr=1e-2, **c)) for c in _combos(
        weight_decay=[0, 0.1], decoupled_weight_decay=[False, True], maximize=[False, True])]
    + [(optim.NAdam, dict(betas=(0.8, 0.99), eps=1e-6, momentum_decay=0.04))]
    + [(optim.RAdam, dict(lr=1e-2, **c)) for c in _combos(
        weight_decay=[0, 0.1], decoupled_weight_decay=[False, True], maximize=[False, True])]
    + [(optim.RAdam, dict(betas=(0.8, 0.99), eps=1e-6))]
    + [(optim.Adamax, dict(lr=1e-2, **c)) for c in _combos(
        weight_decay=[0, 0.1], maximize=[False, True])]
    + [(optim.Adamax, dict(betas=(0.5, 0.9), eps=1e-4))]
    + [(optim.ASGD, dict(lr=0.05, **c)) for c in _combos(
        t0=[1e6, 10], weight_decay=[0, 0.1], maximize=[False, True])]
    + [(optim.ASGD, dict(lr=0.05, lambd=0.01, alpha=0.5, t0=10))]
    + [(optim.Rprop, dict(lr=0.05, **c)) for c in _combos(
        etas=[(0.5, 1.2), (0.3, 1.5)], step_sizes=[(1e-6, 50), (0.02, 0.1)],
        maximize=[False, True])]
    + [(optim.Adam, dict(lr=1e-2, **c)) for c in _combos(
        amsgrad=[False, True], weight_decay=[0, 0.1], decoupled_weight_decay=[False, True])]
)


@pytest.fixture
def torch_float64():
    """torch with float64 as its default dtype, so that its 0-d scalar states (mu_product, eta,
    mu) are float64 like the classes' (Note [Scalar states])."""
    torch = pytest.importorskip("torch")
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield torch
    finally:
        torch.set_default_dtype(default)


def _assert_matches_torch(opt, topt, params, tparams, dtype):
    tol = tolerance(dtype)
    sd = opt.state_dict()["state"]
    for i, (p, tp) in enumerate(zip(params, tparams)):
        np.testing.assert_allclose(p, tp.numpy(), **tol, err_msg=f"param {i}")
        tstate = topt.state[tp]
        assert list(sd[i]) == list(tstate), f"state names of param {i}"
        for name, value in tstate.items():
            if value.dim() == 0:  # step and the scalar states: torch's values exactly
                assert sd[i][name] == value.item(), f"state[{i}][{name!r}]"
            else:
                np.testing.assert_allclose(sd[i][name], value.numpy(), **tol,
                                           err_msg=f"state[{i}][{name!r}]")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", NEW_TORCH_CASES, ids=_case_id)
def test_new_classes_match_torch_every_step(case, dtype, torch_float64):
    torch = torch_float64
    cls, options = case
    params = make_params(SHAPES, dtype)
    tparams = [torch.tensor(p.copy()) for p in params]
    topt = getattr(torch.optim, cls.__name__)(tparams, foreach=False, **options)
    opt = cls(params, **options)
    for grads in make_grads(params, 50):
        opt.step(grads)
        for tp, g in zip(tparams, grads):
            tp.grad = torch.tensor(g)
        topt.step()
        _assert_matches_torch(opt, topt, params, tparams, dtype)


def _to_torch(sd, torch):
    return {"state": {i: {k: torch.tensor(v) for k, v in entry.items()}
                      for i, entry in sd["state"].items()},
            "param_groups": [dict(g) for g in sd["param_groups"]]}


def _from_torch(sd):
    def value(k, v):
        if k == "step":
            return int(v.item())
        return v.item() if v.dim() == 0 else v.numpy().copy()
    return {"state": {i: {k: value(k, v) for k, v in entry.items()}
                      for i, entry in sd["state"].items()},
            "param_groups": [{k: v for k, v in g.items()
                              if k not in ("foreach", "fused", "capturable", "differentiable")}
                             for g in sd["param_groups"]]}


@pytest.mark.parametrize("direction", ["torch_to_numpy", "numpy_to_torch"])
@pytest.mark.parametrize("cls", [optim.NAdam, optim.RAdam, optim.Adamax, optim.ASGD,
                                 optim.Rprop], ids=lambda c: c.__name__)
def test_new_classes_checkpoints_move_to_and_from_torch(cls, direction, torch_float64):
    """A torch state_dict (converted to arrays and floats) loads into the class and back, through
    torch.save/torch.load; training then goes on as the first optimizer does."""
    torch = torch_float64
    options = dict(FULL[cls])
    params = make_params(SHAPES, np.float64)
    grads_seq = make_grads(params, 16)
    tparams = [torch.tensor(p.copy()) for p in params]
    topt = getattr(torch.optim, cls.__name__)(tparams, foreach=False, **options)
    opt = cls(params, **options)
    for grads in grads_seq[:8]:
        opt.step(grads)
        for tp, g in zip(tparams, grads):
            tp.grad = torch.tensor(g)
        topt.step()
    buffer = io.BytesIO()
    if direction == "torch_to_numpy":
        torch.save(topt.state_dict(), buffer)
        buffer.seek(0)
        resumed = [tp.numpy().copy() for tp in tparams]
        second = cls(resumed, **options)
        second.load_state_dict(_from_torch(torch.load(buffer, weights_only=True)))
        for grads in grads_seq[8:]:
            second.step(grads)
            for tp, g in zip(tparams, grads):
                tp.grad = torch.tensor(g)
            topt.step()
            _assert_matches_torch(second, topt, resumed, tparams, np.float64)
    else:
        torch.save(_to_torch(opt.state_dict(), torch), buffer)
        buffer.seek(0)
        resumed = [torch.tensor(p.copy()) for p in params]
        second = getattr(torch.optim, cls.__name__)(resumed, foreach=False, **options)
        second.load_state_dict(torch.load(buffer, weights_only=True))
        for grads in grads_seq[8:]:
            opt.step(grads)
            for tp, g in zip(resumed, grads):
                tp.grad = torch.tensor(g)
            second.step()
            _assert_matches_torch(opt, second, params, resumed, np.float64)


@pytest.mark.parametrize("how", ["groups differ", "missing", "out of range", "not a number"])
def test_load_state_dict_scalar_state_errors_change_nothing(how):
    opt = _full_opt(optim.NAdam)
    grads_seq = make_grads(_params_of(opt), 3)
    for grads in grads_seq:
        opt.step(grads)
    sd = opt.state_dict()
    last = max(sd["state"])
    if how == "groups differ":
        sd["state"][last]["mu_product"] *= 0.5
        match = "different 'mu_product' values"
    elif how == "missing":
        del sd["state"][last]["mu_product"]
        match = r"\['mu_product'\] is missing"
    elif how == "out of range":
        for i in sd["param_groups"][-1]["params"]:
            sd["state"][i]["mu_product"] = 1.0
        match = "invalid .*mu_product"
    else:
        for i in sd["param_groups"][-1]["params"]:
            sd["state"][i]["mu_product"] = "0.5"
        match = "mu_product.*must be a real number"
    before = snapshot(opt)
    with pytest.raises((ValueError, TypeError), match=match):
        opt.load_state_dict(sd)
    assert_same_snapshot(before, snapshot(opt))


def test_scalar_states_are_per_group_and_restart_with_add_param_group():
    params = make_params([(5,), (6,)], np.float64)
    grads_seq = make_grads(params, 6)
    opt = optim.ASGD(params[:1], lr=0.05, t0=1)
    for grads in grads_seq[:3]:
        opt.step(grads[:1])
    opt.add_param_group({"params": params[1:], "lr": 0.1})
    for grads in grads_seq[3:]:
        opt.step(grads)
    sd = opt.state_dict()["state"]
    assert (sd[0]["step"], sd[1]["step"]) == (6, 3)
    assert sd[0]["eta"] == reference.asgd_next(6, 0.05, 1e-4, 0.75, 1)[0]
    assert sd[1]["eta"] == reference.asgd_next(3, 0.1, 1e-4, 0.75, 1)[0]
    assert (sd[0]["mu"], sd[1]["mu"]) == (1 / 5, 1 / 2)


def test_asgd_callable_lr_starts_eta_at_lr_0():
    schedule = lambda t: 0.1 * 0.5**t  # noqa: E731
    params = make_params([(4,)], np.float64)
    opt = optim.ASGD(params, lr=schedule)
    assert opt.state_dict()["state"][0]["eta"] == 0.1
    opt.step(make_grads(params, 1)[0])
    assert opt.state_dict()["state"][0]["eta"] == reference.asgd_next(1, 0.1, 1e-4, 0.75, 1e6)[0]
    assert opt.param_groups[0]["lr"] is schedule


def test_rprop_step_size_starts_at_the_groups_lr():
    p, q = make_params([(3,), (4,)], np.float32)
    opt = optim.Rprop([{"params": [p]}, {"params": [q], "lr": 0.5}], lr=0.1)
    np.testing.assert_array_equal(opt.state[0]["step_size"], np.full(3, 0.1, np.float32))
    np.testing.assert_array_equal(opt.state[1]["step_size"], np.full(4, 0.5, np.float32))
    np.testing.assert_array_equal(opt.state[1]["prev"], np.zeros(4, np.float32))


def test_adam_decoupled_weight_decay_is_adamw():
    params = make_params(SHAPES, np.float64)
    twins = [p.copy() for p in params]
    a = optim.Adam(params, lr=1e-2, weight_decay=0.1, amsgrad=True, decoupled_weight_decay=True)
    w = optim.AdamW(twins, lr=1e-2, weight_decay=0.1, amsgrad=True)
    for grads in make_grads(params, 10):
        a.step(grads)
        w.step(grads)
    assert_same_snapshot(snapshot(a), snapshot(w))


# ---- Lion (no torch.optim twin: checked against fastoptim.reference) --------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("options", [{}, {"lr": 0.01, "betas": (0.5, 0.9)},
                                     {"lr": 0.01, "weight_decay": 0.3, "maximize": True}])
def test_lion_matches_reference_over_50_steps(options, dtype):
    rng = np.random.default_rng(0)
    shapes = [(7,), (3, 5), (1,)]
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    ref = [p.copy() for p in params]
    ref_m = [np.zeros_like(p) for p in params]
    opt = optim.Lion([{"params": params[:2]}, {"params": params[2:], "lr": 0.05}], **options)
    beta1, beta2 = options.get("betas", (0.9, 0.99))
    hyper = dict(beta1=beta1, beta2=beta2, weight_decay=options.get("weight_decay", 0.0),
                 maximize=options.get("maximize", False))
    for _ in range(50):
        grads = [rng.standard_normal(s).astype(dtype) for s in shapes]
        opt.step(grads)
        reference.lion_(ref[:2], grads[:2], ref_m[:2], lr=options.get("lr", 1e-4), **hyper)
        reference.lion_(ref[2:], grads[2:], ref_m[2:], lr=0.05, **hyper)
        for i, (p, r, m) in enumerate(zip(params, ref, ref_m)):
            # atol: exp_avg cancels towards 0 (the kernel's fma rounds once, NumPy twice)
            tol = 1e-6 if dtype == np.float32 else 1e-14
            np.testing.assert_allclose(p, r, rtol=tol, atol=tol)
            np.testing.assert_allclose(opt.state[i]["exp_avg"], m, rtol=tol, atol=tol)


def test_lion_state_dict_round_trip():
    rng = np.random.default_rng(1)
    p = rng.standard_normal(10)
    opt = optim.Lion([p], lr=0.01)
    opt.step([rng.standard_normal(10)])
    saved = opt.state_dict()
    assert set(saved["state"][0]) == {"step", "exp_avg"}
    assert saved["param_groups"][0]["betas"] == (0.9, 0.99)
    q = p.copy()
    twin = optim.Lion([q], lr=0.5)
    twin.load_state_dict(saved)
    g = rng.standard_normal(10)
    opt.step([g])
    twin.step([g])
    assert np.array_equal(p, q)
