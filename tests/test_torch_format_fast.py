"""The format path's fast path (Note [Format fast path] in fastoptim/torch.py): a step with
storage options that finds every param, option, state object and memory as the last one left
them repeats that step's calls instead of checking and viewing each param again. Every test
runs the same steps on two optimizers, one with the fast path turned off, and compares every
bit of every param and state; the fast one must actually have taken the fast path where
nothing changed, and must have fallen back where something did.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastoptim.torch as ft  # noqa: E402

needs_ext = pytest.mark.skipif(ft._ext() is None,
                               reason="the fast path reads tensors through fastoptim._torch_ext")

SIZES = (5000, 300)  # quantized / float32 states with state_dtype="int8": two calls per step


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # (tests/conftest.py)


def params_of(dtype, sizes=SIZES):
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(n, generator=gen).to(dtype)) for n in sizes]


def set_grads(params, step, persistent=False):
    gen = torch.Generator().manual_seed(1000 + step)
    for p in params:
        g = (torch.randn(p.shape, generator=gen) * 0.1).to(p.dtype)
        if persistent and p.grad is not None:
            p.grad.copy_(g)
        else:
            p.grad = g


class Counted:
    """Wraps an optimizer's format step: records, per step, whether it took the fast path (or
    turns the fast path off)."""

    def __init__(self, opt, enabled=True):
        self.hits = []
        fast, step = opt._format_fast, opt._format_step

        def format_fast(scale):
            self.hits[-1] = taken = fast(scale) if enabled else False
            return taken

        def format_step(grads, scale):
            self.hits.append(False)
            step(grads, scale)
        opt._format_fast, opt._format_step = format_fast, format_step


def snapshot(opt):
    """Every param and state value of opt, as bytes (quantized states: codes and absmax)."""
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            out.append(("param", p.detach().view(-1).view(torch.uint8).clone()))
            for name, v in sorted(opt.state.get(p, {}).items()):
                if isinstance(v, dict):
                    out += [(name + ".codes", v["codes"].clone()),
                            (name + ".absmax", v["absmax"].clone())]
                elif isinstance(v, torch.Tensor):
                    out.append((name, v.detach().reshape(-1).view(torch.uint8).clone()
                                if v.dim() else v.clone()))
    return out


def assert_same(a, b):
    assert [k for k, _ in a] == [k for k, _ in b]
    for (k, x), (_, y) in zip(a, b):
        assert torch.equal(x, y), k


CONFIGS = {
    "adamw int8": (ft.AdamW, dict(lr=0.01, state_dtype="int8"), torch.float32),
    "adam int4 amsgrad": (ft.Adam, dict(lr=0.01, amsgrad=True, state_dtype="int4"),
                          torch.float32),
    "adamw bf16 states": (ft.AdamW, dict(lr=0.01, state_dtype="bfloat16"), torch.float32),
    "adam float32 states": (ft.Adam, dict(lr=0.01, state_dtype="float32"), torch.float32),
    "adamw bf16 master": (ft.AdamW, dict(lr=0.01, master_weights=True), torch.bfloat16),
    "adamw f16 master": (ft.AdamW, dict(lr=0.01, master_weights=True), torch.float16),
    "adamw bf16 sr int8": (ft.AdamW, dict(lr=0.01, stochastic_rounding=True, sr_seed=5,
                                          state_dtype="int8"), torch.bfloat16),
    "sgd bf16 sr": (ft.SGD, dict(lr=0.01, momentum=0.9, stochastic_rounding=True),
                    torch.bfloat16),
    "rmsprop int8": (ft.RMSprop, dict(lr=0.01, momentum=0.5, centered=True,
                                      state_dtype="int8"), torch.float32),
    "adagrad bf16 params": (ft.Adagrad, dict(lr=0.1, state_dtype="float32"), torch.bfloat16),
}


def pair(config, sizes=SIZES):
    cls, kwargs, dtype = CONFIGS[config]
    opts, counts, params = [], [], []
    for enabled in (True, False):
        ps = params_of(dtype, sizes)
        opt = cls(ps, **kwargs)
        counts.append(Counted(opt, enabled))
        opts.append(opt)
        params.append(ps)
    return opts, counts, params


def run(opts, params, steps, first=0, persistent=False):
    for step in range(first, first + steps):
        for opt, ps in zip(opts, params):
            set_grads(ps, step, persistent)
            opt.step()


@needs_ext
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("persistent", [False, True], ids=["new grads", "same grads"])
def test_fast_path_matches_the_format_path(config, persistent):
    opts, counts, params = pair(config)
    run(opts, params, 6, persistent=persistent)
    assert_same(snapshot(opts[0]), snapshot(opts[1]))
    # Step 1 makes the states (Adagrad's exist already), the first step that finds them
    # caches their arrays and records the plan; the rest are fast.
    hits = counts[0].hits
    assert len(hits) == 6 and hits[0] is False and all(hits[2:]), hits
    assert not any(counts[1].hits)


@needs_ext
def test_scalar_state_optimizers_never_take_it():
    ps = params_of(torch.float32)
    opt = ft.NAdam(ps, lr=0.01, state_dtype="int8")
    count = Counted(opt)
    for step in range(4):
        set_grads(ps, step)
        opt.step()
    assert not any(count.hits)


def _replace_state(opt, ps):
    st = opt.state[ps[0]]
    v = st["exp_avg"]
    st["exp_avg"] = ({k: (t.clone() if isinstance(t, torch.Tensor) else t) for k, t in v.items()}
                     if isinstance(v, dict) else v.clone())


def _move_param(opt, ps):
    ps[1].data = ps[1].data.clone()


def _move_state_memory(opt, ps):
    st = opt.state[ps[1]]  # a float32 state (300 elements): same object, new memory
    st["exp_avg"].data = st["exp_avg"].data.clone()


def _step_count(opt, ps):
    opt.state[ps[0]]["step"].fill_(10.0)


def _all_step_counts(opt, ps):
    for p in ps:
        opt.state[p]["step"].fill_(7.0)


def _lr(opt, ps):
    opt.param_groups[0]["lr"] *= 0.5


def _state_dtype(opt, ps):
    opt.param_groups[0]["state_dtype"] = "int4"


def _reload(opt, ps):
    opt.load_state_dict(opt.state_dict())


def _add_group(opt, ps):
    extra = torch.nn.Parameter(torch.full((4096,), 0.5))
    ps.append(extra)
    opt.add_param_group({"params": [extra], "lr": 0.02})


def _codes_replaced(opt, ps):
    q = opt.state[ps[0]]["exp_avg_sq"]
    q["codes"] = q["codes"].clone()


# mutation: (what it does, whether the next step is still fast, whether the steps after it
# are fast again)
MUTATIONS = {
    "state replaced": (_replace_state, False, True),
    "param memory moved": (_move_param, False, True),
    "state memory moved": (_move_state_memory, False, True),
    # the params' counts differ from then on; with "adamw int8" each param has a call of its
    # own (int8 and, below the size threshold, float32 states), each with its own count
    "one step count changed": (_step_count, True, True),
    "every step count changed": (_all_step_counts, True, True),  # read every step
    "lr changed": (_lr, True, True),  # the hyperparameters are read every step
    "state_dtype changed": (_state_dtype, False, True),
    "state_dict reloaded": (_reload, False, True),
    "param group added": (_add_group, False, True),
    "quantized codes replaced": (_codes_replaced, False, True),
}


@needs_ext
@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_changes_between_steps_fall_back_and_match(mutation):
    mutate, next_fast, later_fast = MUTATIONS[mutation]
    opts, counts, params = pair("adamw int8")
    run(opts, params, 4)
    for opt, ps in zip(opts, params):
        mutate(opt, ps)
    n = len(counts[0].hits)
    run(opts, params, 4, first=4)
    assert_same(snapshot(opts[0]), snapshot(opts[1]))
    after = counts[0].hits[n:]
    assert after and after[0] is next_fast, after
    assert after[-1] is later_fast, after


@needs_ext
@pytest.mark.parametrize("config", ["adamw bf16 states", "adamw bf16 sr int8", "sgd bf16 sr"])
def test_a_call_whose_params_come_to_differ_in_step_count_is_split_and_fast_again(config):
    """Three params in one call; the step count of one is edited: the recorded call no longer
    has one count, so that step takes the format path (one call per count), which records the
    split, and the steps after it are fast again."""
    opts, counts, params = pair(config, sizes=(5000, 6000, 7000))
    run(opts, params, 4)
    assert counts[0].hits[-1] is True
    for opt, ps in zip(opts, params):
        opt.state[ps[1]]["step"].fill_(10.0)
    run(opts, params, 4, first=4)
    assert_same(snapshot(opts[0]), snapshot(opts[1]))
    assert counts[0].hits[-4:] == [False, True, True, True], counts[0].hits
    assert [opts[0].state[p]["step"].item() for p in params[0]] == [8.0, 14.0, 8.0]


@needs_ext
def test_a_missing_gradient_falls_back():
    opts, counts, params = pair("adamw bf16 sr int8")
    run(opts, params, 3)
    for opt, ps in zip(opts, params):
        set_grads(ps, 3)
        ps[1].grad = None
        opt.step()
    assert counts[0].hits[-1] is False
    run(opts, params, 3, first=4)
    assert_same(snapshot(opts[0]), snapshot(opts[1]))
    # The params' step counts differ from then on: one call per count, recorded, and fast.
    assert counts[0].hits[-2:] == [True, True], counts[0].hits


def _freeze(ps, step):
    """Gradients for every param but the second (a frozen or unused param)."""
    set_grads(ps, step)
    ps[1].grad = None


@needs_ext
@pytest.mark.parametrize("config", ["adamw int8", "adamw bf16 sr int8", "sgd bf16 sr"])
def test_params_without_a_gradient_stay_on_the_fast_path(config):
    opts, counts, params = pair(config, sizes=(5000, 300, 6000, 64))
    for step in range(6):
        for opt, ps in zip(opts, params):
            _freeze(ps, step)
            opt.step()
    assert_same(snapshot(opts[0]), snapshot(opts[1]))
    assert counts[0].hits[-4:] == [True] * 4, counts[0].hits
    assert params[0][1].grad is None and 1 not in [i for i, p in enumerate(params[0])
                                                   if p in opts[0].state]
    # The frozen param gets a gradient: the format path (its first step: states made, then
    # one that records the calls, one per step count), and fast from then on.
    for step in range(6, 10):
        for opt, ps in zip(opts, params):
            set_grads(ps, step)
            opt.step()
    assert_same(snapshot(opts[0]), snapshot(opts[1]))
    assert counts[0].hits[-4:] == [False, False, True, True], counts[0].hits


@needs_ext
def test_a_group_without_gradients_stays_on_the_fast_path():
    opts, counts, params = [], [], []
    for enabled in (True, False):
        ps = params_of(torch.float32, (5000, 300, 4096))
        opt = ft.AdamW([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.1}], lr=0.01,
                       state_dtype="int8")
        counts.append(Counted(opt, enabled))
        opts.append(opt)
        params.append(ps)
    for step in range(5):
        for opt, ps in zip(opts, params):
            set_grads(ps[:2], step)  # the second group has no gradient
            opt.step()
    assert counts[0].hits[-3:] == [True] * 3, counts[0].hits
    for opt, ps in zip(opts, params):
        set_grads(ps, 5)  # now it has: falls back, and steps
        opt.step()
    assert counts[0].hits[-1] is False
    assert_same(snapshot(opts[0]), snapshot(opts[1]))
    assert opts[0].state[params[0][2]]["step"] == 1


@needs_ext
def test_amp_scale_on_the_fast_path():
    opts, counts, params = pair("adamw bf16 master")
    run(opts, params, 3)
    for opt, ps in zip(opts, params):
        set_grads(ps, 3)
        opt.grad_scale = torch.tensor(4.0)
        opt.step()
        opt.found_inf = torch.tensor(1.0)  # skipped: nothing changes
        opt.step()
        del opt.grad_scale, opt.found_inf
    assert_same(snapshot(opts[0]), snapshot(opts[1]))
    assert counts[0].hits[-1] is True


BAD_GRADIENTS = {
    # strided: not the param's layout
    "strided": (lambda ps: torch.randn(600)[::2], r"param_groups\[0\]\['params'\]\[1\].*strides"),
    # two calls (quantized and float32 states): the small param's gradient is a view of the
    # large param, which the other call writes
    "aliasing another call's param": (lambda ps: ps[0].detach()[:300], "memory"),
}


@needs_ext
@pytest.mark.parametrize("bad", list(BAD_GRADIENTS))
def test_a_bad_gradient_on_the_fast_path_raises_and_writes_nothing(bad):
    make, match = BAD_GRADIENTS[bad]
    opts, counts, params = pair("adamw int8")
    run(opts, params, 3)
    opt, ps = opts[0], params[0]
    before = snapshot(opt)
    set_grads(ps, 3)
    ps[1].grad = make(ps)
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert_same(snapshot(opt), before)
    assert counts[0].hits[-1] is False


@needs_ext
def test_the_plan_holds_no_gradient():
    import gc
    import weakref

    opts, counts, params = pair("adamw int8")
    run(opts, params, 4)
    refs = [weakref.ref(p.grad) for p in params[0]]
    opts[0].zero_grad(set_to_none=True)
    gc.collect()
    assert all(r() is None for r in refs)


@needs_ext
def test_many_tensors_step_is_fast_path_and_matches():
    opts, counts, params = pair("adamw bf16 states", sizes=(64,) * 40 + (5000,))
    run(opts, params, 5)
    assert_same(snapshot(opts[0]), snapshot(opts[1]))
    assert counts[0].hits[-3:] == [True] * 3
    assert np.isfinite(params[0][0].detach().numpy()).all()


@needs_ext
def test_gradients_that_require_grad_on_the_fast_path():
    # (backward(create_graph=True) leaves such gradients; NumPy cannot view them directly)
    opts, counts, params = pair("adamw f16 master")
    for step in range(5):
        for opt, ps in zip(opts, params):
            set_grads(ps, step)
            for p in ps:
                p.grad.requires_grad_()
            opt.step()
    assert_same(snapshot(opts[0]), snapshot(opts[1]))
    assert counts[0].hits[-3:] == [True] * 3, counts[0].hits
