"""state_dtype on the NumPy classes (fastoptim.optim, Note [State dtypes]): which tensors get
quantized states, that a class step is the functional update on those states, the memory the
states hold, and state_dict round trips in the compressed form and through torch's fp32 layout."""

import ml_dtypes
import numpy as np
import pytest

import fastoptim
from fastoptim import optim
from fastoptim.quant import MIN_QUANTIZED_SIZE, QuantizedState

BIG, SMALL = (70, 73), (10,)  # 5110 elements (>= 4096: quantized), 10 (kept float32)

# class -> constructor keywords that switch on every state it has
CLASSES = {
    optim.SGD: dict(lr=0.01, momentum=0.9),
    optim.RMSprop: dict(lr=0.01, momentum=0.9, centered=True),
    optim.Adam: dict(lr=0.01, amsgrad=True),
    optim.AdamW: dict(lr=0.01),
    optim.Adagrad: dict(lr=0.1, initial_accumulator_value=0.1),
    optim.Adadelta: dict(),
    optim.NAdam: dict(lr=0.01),
    optim.RAdam: dict(lr=0.01),
    optim.Adamax: dict(lr=0.01),
    optim.ASGD: dict(lr=0.01, t0=1),
    optim.Rprop: dict(lr=0.01),
    optim.Lion: dict(lr=0.001),
}


def make(cls, state_dtype, seed=0):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(BIG).astype(np.float32),
              rng.standard_normal(SMALL).astype(np.float32)]
    return params, cls(params, state_dtype=state_dtype, **CLASSES[cls])


def grads(seed):
    rng = np.random.default_rng(100 + seed)
    return [rng.standard_normal(BIG).astype(np.float32),
            rng.standard_normal(SMALL).astype(np.float32)]


@pytest.mark.parametrize("state_dtype", ["int8", "int4"])
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_big_tensors_quantized_small_kept_float32(cls, state_dtype):
    params, opt = make(cls, state_dtype)
    bits = 8 if state_dtype == "int8" else 4
    for name, st in opt.state[0].items():
        assert isinstance(st, QuantizedState) and st.bits == bits and st.shape == BIG, name
    for name, st in opt.state[1].items():
        assert isinstance(st, np.ndarray) and st.dtype == np.float32, name
    _, ref = make(cls, None)
    for s in range(3):
        g = grads(s)
        opt.step(g)
        ref.step(g)
    # quantized states track the float32 run (not bit for bit: a few code steps apart)
    assert np.isfinite(params[0]).all()
    moved = np.abs(ref.param_groups[0]["params"][0] - make(cls, None)[0][0]).mean()
    assert np.abs(params[0] - ref.param_groups[0]["params"][0]).mean() <= 0.25 * moved + 1e-7
    # the small tensor's float32 states give exactly the float32 run
    assert params[1].tobytes() == ref.param_groups[0]["params"][1].tobytes()


def test_class_step_is_the_functional_update():
    params, opt = make(optim.AdamW, "int8")
    p0 = [p.copy() for p in params]
    m = [QuantizedState.zeros(BIG, 8), np.zeros(SMALL, np.float32)]
    v = [QuantizedState.zeros(BIG, 8, non_negative=True), np.zeros(SMALL, np.float32)]
    for s in range(1, 4):
        g = grads(s)
        opt.step(g)
        fastoptim.adamw_(p0[0], g[0], m[0], v[0], step=s, lr=0.01)
        fastoptim.adamw_(p0[1], g[1], m[1], v[1], step=s, lr=0.01)
    assert params[0].tobytes() == p0[0].tobytes() and params[1].tobytes() == p0[1].tobytes()
    assert opt.state[0]["exp_avg"].codes.tobytes() == m[0].codes.tobytes()
    assert opt.state[0]["exp_avg_sq"].absmax.tobytes() == v[0].absmax.tobytes()


@pytest.mark.parametrize("state_dtype, ratio", [("int8", 0.27), ("int4", 0.15),
                                                ("bfloat16", 0.5), ("float32", 1.0)])
def test_state_nbytes(state_dtype, ratio):
    rng = np.random.default_rng(0)
    p = [rng.standard_normal(1 << 16).astype(np.float32)]
    fp32 = optim.Adam([p[0].copy()]).state_nbytes()
    assert fp32 == 2 * 4 * (1 << 16)
    assert optim.Adam(p, state_dtype=state_dtype).state_nbytes() <= ratio * fp32


def test_bfloat16_states_run_and_stay_bfloat16():
    params, opt = make(optim.Adam, "bfloat16")
    opt.step(grads(0))
    assert all(st.dtype == ml_dtypes.bfloat16 for e in opt.state.values() for st in e.values())


@pytest.mark.parametrize("state_dtype", ["int8", "int4"])
@pytest.mark.parametrize("cls", [optim.Adam, optim.NAdam, optim.ASGD, optim.Rprop, optim.SGD],
                         ids=lambda c: c.__name__)
def test_state_dict_round_trips(cls, state_dtype):
    params, opt = make(cls, state_dtype)
    opt.step(grads(0))
    sd = opt.state_dict()
    assert isinstance(sd["state"][0][next(iter(opt.state[0]))], QuantizedState)
    params2, opt2 = make(cls, state_dtype)
    for a, b in zip(params2, params):
        a[...] = b
    opt2.load_state_dict(sd)
    for s in (1, 2):
        opt.step(grads(s))
        opt2.step(grads(s))
    for a, b in zip(params, params2):
        assert a.tobytes() == b.tobytes()
    # the saved objects are copies: stepping did not change them
    assert sd["state"][0] is not opt.state[0]


def test_state_dict_converts_to_and_from_float32():
    params, opt = make(optim.Adam, "int8")
    opt.step(grads(0))
    sd = opt.state_dict()
    # to torch's fp32 layout: every QuantizedState -> its float array
    fp = {"param_groups": sd["param_groups"],
          "state": {i: {k: (v.to_float() if isinstance(v, QuantizedState) else v)
                        for k, v in e.items()} for i, e in sd["state"].items()}}
    _, f32 = make(optim.Adam, None)
    f32.load_state_dict(fp)
    np.testing.assert_array_equal(f32.state[0]["exp_avg"], opt.state[0]["exp_avg"].to_float())
    # and back: float arrays load into quantized states (quantized on the way)
    _, q = make(optim.Adam, "int8")
    q.load_state_dict(fp)
    assert q.state[0]["exp_avg"].codes.tobytes() == opt.state[0]["exp_avg"].codes.tobytes()
    assert q.state[0]["exp_avg_sq"].absmax.tobytes() == opt.state[0]["exp_avg_sq"].absmax.tobytes()


def test_load_state_dict_checks_quantized_entries_before_writing():
    params, opt = make(optim.Adam, "int8")
    opt.step(grads(0))
    sd = opt.state_dict()
    before = opt.state[0]["exp_avg"].codes.copy()
    bad = dict(sd, state={**sd["state"], 0: {**sd["state"][0],
                                             "exp_avg": QuantizedState.zeros(BIG, 4)}})
    with pytest.raises(ValueError, match="bits=4"):
        opt.load_state_dict(bad)
    bad = dict(sd, state={**sd["state"], 0: {**sd["state"][0], "exp_avg": np.zeros((3,))}})
    with pytest.raises(ValueError, match="has shape"):
        opt.load_state_dict(bad)
    assert opt.state[0]["exp_avg"].codes.tobytes() == before.tobytes()


def test_bad_state_dtype():
    p = [np.zeros(MIN_QUANTIZED_SIZE, np.float32)]
    with pytest.raises(ValueError, match="state_dtype must be"):
        optim.Adam(p, state_dtype="int2")
    with pytest.raises(TypeError, match="state_dtype must be None or a str"):
        optim.Adam(p, state_dtype=8)
    for dtype in (np.float64, np.float16):
        with pytest.raises(TypeError, match="int8'? needs float32 or bfloat16 params"):
            optim.Adam([np.zeros(MIN_QUANTIZED_SIZE, dtype)], state_dtype="int8")
    with pytest.raises(TypeError, match="needs float32 or bfloat16 params"):
        optim.Adam([np.zeros(4, np.float64)], state_dtype="bfloat16")
