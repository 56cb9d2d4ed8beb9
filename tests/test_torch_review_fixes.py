"""Fixes from a review of fastoptim.torch (docs/torch.md): a master weight kept while the param
steps without it is dropped, so turning ``master_weights`` on again starts from the param; the
load_state_dict hooks see the whole state dict and run around the whole load; 0-d scalar states
(NAdam's ``mu_product``, ASGD's ``eta`` and ``mu``) keep their dtype through a checkpoint of a
drop-in with storage options; a ``state_dtype`` turned from ``"int8"``/``"int4"`` to None
dequantizes the states; a refused step takes back the states its planning made or converted.
Expected values come from the update rule (SGD without momentum: ``p - lr * g`` in float32,
rounded to nearest), from torch.optim, or from an uninterrupted run.
"""

import copy

import pytest

torch = pytest.importorskip("torch")

import fastoptim.torch as ft  # noqa: E402
from test_torch_formats import assert_same, assert_same_state, bits, roundtrip  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # (tests/conftest.py)


def grad(shape, step, dtype):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(shape, generator=gen).to(dtype)


def sgd(p, g, lr=0.5):
    """SGD without momentum in float32 (lr * g is exact at lr=0.5): the master's update."""
    return p.detach().float() - lr * g.float()


# ---- master weights turned off and on ---------------------------------------------------------

@pytest.mark.parametrize("off", [{}, {"state_dtype": "float32"}], ids=["plain", "format"])
def test_master_weights_turned_off_and_on_start_from_the_param(off):
    """While master_weights is off the param is the truth: the steps taken meanwhile stay, and
    the option turned on again starts a new master from the param (a kept master would undo
    them). ``off``: the options meanwhile (none: torch's path; state_dtype: the format path)."""
    p = torch.nn.Parameter(torch.randn(1000, generator=torch.Generator().manual_seed(0))
                           .bfloat16())
    opt = ft.SGD([p], lr=0.5, master_weights=True)
    p.grad = g = grad(p.shape, 0, torch.bfloat16)
    want = sgd(p, g)
    opt.step()
    assert_same(opt.state[p]["master_weight"], want)
    assert_same(p.detach(), want.bfloat16())

    group = opt.param_groups[0]
    group["master_weights"] = False
    group.update(off)
    p.grad = g.to_sparse()  # refused: nothing written, the master stays until a step runs
    with pytest.raises(TypeError, match=r"\['params'\]\[0\]: its gradient is sparse"):
        opt.step()
    assert "master_weight" in opt.state[p]
    for s in range(1, 4):
        p.grad = g = grad(p.shape, s, torch.bfloat16)
        want = sgd(p, g).bfloat16()
        opt.step()
        assert_same(p.detach(), want)
        assert "master_weight" not in opt.state.get(p, {})
    assert all("master_weight" not in v for v in opt.state_dict()["state"].values())

    group["master_weights"] = True
    p.grad = g = grad(p.shape, 4, torch.bfloat16)
    want = sgd(p, g)
    opt.step()
    assert_same(opt.state[p]["master_weight"], want)
    assert_same(p.detach(), want.bfloat16())


def test_loaded_master_is_dropped_by_a_step_without_master_weights():
    """A master-weights checkpoint loaded into a drop-in without master weights: a param that
    steps loses its (now stale) master, one without a gradient keeps it; with the option turned
    on, the first starts from the param and the second goes on from the loaded master."""
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen).bfloat16()) for n in (1000, 300)]
    opt = ft.SGD(params, lr=0.5, master_weights=True)
    for p in params:
        p.grad = grad(p.shape, 0, torch.bfloat16)
    opt.step()
    sd = roundtrip(opt.state_dict())
    loaded = [sd["state"][k]["master_weight"] for k in (0, 1)]

    a, b = (torch.nn.Parameter(p.detach().clone()) for p in params)
    plain = ft.SGD([a, b], lr=0.5)
    plain.load_state_dict(sd)
    assert_same(plain.state[a]["master_weight"], loaded[0])  # loaded as saved
    for s in (1, 2):
        a.grad = g = grad(a.shape, s, torch.bfloat16)
        want = sgd(a, g).bfloat16()
        plain.step()
        assert_same(a.detach(), want)
    assert "master_weight" not in plain.state[a]
    assert_same(plain.state[b]["master_weight"], loaded[1])

    plain.param_groups[0]["master_weights"] = True
    ga, gb = grad(a.shape, 3, torch.bfloat16), grad(b.shape, 3, torch.bfloat16)
    want_a, want_b = sgd(a, ga), loaded[1] - 0.5 * gb.float()
    a.grad, b.grad = ga, gb
    plain.step()
    assert_same(plain.state[a]["master_weight"], want_a)
    assert_same(a.detach(), want_a.bfloat16())
    assert_same(plain.state[b]["master_weight"], want_b)
    assert_same(b.detach(), want_b.bfloat16())


# ---- load_state_dict hooks --------------------------------------------------------------------

@pytest.mark.parametrize("dtype, options", [
    (torch.float32, {}),
    (torch.bfloat16, {"master_weights": True}),
    (torch.float32, {"state_dtype": "float32"}),
    (torch.float32, {"state_dtype": "int8"}),
], ids=["plain", "master", "float32", "int8"])
def test_load_state_dict_hooks_see_the_whole_state(dtype, options):
    """As torch.optim's: the pre-hooks get (a copy of) the whole dict, master weights and
    quantized states included, and the dict one returns is the one loaded; the post-hooks run
    once every entry and the optimizer's options are in. Each runs once."""
    p = torch.nn.Parameter(torch.randn(5000, generator=torch.Generator().manual_seed(2))
                           .to(dtype))
    opt = ft.Adam([p], lr=1e-2, **options)
    p.grad = grad(p.shape, 0, dtype)
    opt.step()
    sd = roundtrip(opt.state_dict())
    keys = sorted(sd["state"][0])
    assert "exp_avg" in keys
    seen = []

    def pre(o, d):
        assert o is opt and d is not sd  # (torch's shallow copy)
        seen.append(("pre", sorted(d["state"][0])))
        d = copy.copy(d)
        d["state"] = {0: dict(d["state"][0], exp_avg=torch.zeros(p.shape))}
        return d

    def post(o):
        state = o.state[p]
        seen.append(("post", sorted(state), {k: o.param_groups[0].get(k) for k in options}))
        assert isinstance(state["exp_avg"], torch.Tensor)
        assert not state["exp_avg"].any()

    opt.register_load_state_dict_pre_hook(pre)
    opt.register_load_state_dict_post_hook(post)
    opt.load_state_dict(sd)
    assert seen == [("pre", keys), ("post", keys, options)]
    assert not opt.state[p]["exp_avg"].any()
    if options.get("master_weights"):
        assert_same(opt.state[p]["master_weight"], sd["state"][0]["master_weight"])


# ---- scalar states through a checkpoint -------------------------------------------------------

@pytest.mark.parametrize("options", [{"master_weights": True}, {"state_dtype": "float32"}],
                         ids=["master", "float32"])
@pytest.mark.parametrize("name, kwargs", [("NAdam", {"lr": 0.01}),
                                          ("ASGD", {"lr": 0.05, "t0": 0})])
def test_scalar_states_resume_with_the_same_bits(name, kwargs, options):
    """Drop-in -> torch.save/torch.load(weights_only=True) -> drop-in, bfloat16 params: the
    float32 scalar states load as float32 (as torch keeps ``step``, not cast to the param's
    dtype), and the run continues as the uninterrupted one, bit for bit."""
    gen = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen).bfloat16()) for n in (1000, 37)]

    def make(ps):
        return getattr(ft, name)(ps, **kwargs, **options)

    def run(o, ps, first):
        for s in range(first, first + 3):
            for p in ps:
                p.grad = grad(p.shape, s, torch.bfloat16)
            o.step()

    opt = make(params)
    run(opt, params, 0)
    sd = roundtrip(opt.state_dict())
    saved = [p.detach().clone() for p in params]
    run(opt, params, 3)  # the uninterrupted run

    params2 = [torch.nn.Parameter(p) for p in saved]
    opt2 = make(params2)
    opt2.load_state_dict(sd)
    for q in params2:
        for k in opt2._scalar_names:
            assert opt2.state[q][k].dtype == torch.float32, k
    run(opt2, params2, 3)
    for p, q in zip(params, params2):
        assert_same(q.detach(), p.detach())
        assert_same_state(opt2.state[q], opt.state[p])


# ---- state_dtype turned back to None ----------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("state_dtype", ["int8", "int4"])
def test_quantized_states_dequantized_when_state_dtype_is_turned_off(state_dtype, dtype):
    """state_dtype "int8"/"int4" -> None: the next step dequantizes the states to the param's
    dtype, as loading the quantized state_dict into a drop-in without state_dtype does, and
    the step is that drop-in's (for float32 params, torch.optim's on the dequantized states)."""
    p = torch.nn.Parameter(torch.randn(5000, generator=torch.Generator().manual_seed(4))
                           .to(dtype))
    opt = ft.Adam([p], lr=1e-2, state_dtype=state_dtype)
    for s in range(2):
        p.grad = grad(p.shape, s, dtype)
        opt.step()
    sd = roundtrip(opt.state_dict())
    assert isinstance(sd["state"][0]["exp_avg"], dict)

    q = torch.nn.Parameter(p.detach().clone())
    plain = ft.Adam([q], lr=1e-2)
    plain.load_state_dict(sd)  # (dequantized when loaded: docs/torch.md)
    r = torch.nn.Parameter(p.detach().clone())
    ref = torch.optim.Adam([r], lr=1e-2, foreach=False)
    ref.load_state_dict(ft.dequantized_state_dict(sd))

    opt.param_groups[0]["state_dtype"] = None
    for s in range(2, 4):
        for x in (p, q, r):
            x.grad = grad(p.shape, s, dtype)
        opt.step()
        plain.step()
        ref.step()
    assert_same(p.detach(), q.detach())
    assert_same_state(opt.state[p], plain.state[q])
    assert opt.state[p]["exp_avg"].dtype == dtype and float(opt.state[p]["step"]) == 4
    if dtype == torch.float32:
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-5, atol=1e-6)
        for k, v in ref.state[r].items():
            torch.testing.assert_close(opt.state[p][k], v, rtol=1e-5, atol=1e-6)


def test_refused_step_keeps_the_quantized_states():
    """state_dtype -> None and a step refused for another param: nothing is written, the
    quantized states included (the dequantized ones made while planning are taken back)."""
    gen = torch.Generator().manual_seed(5)
    a = torch.nn.Parameter(torch.randn(5000, generator=gen))
    b = torch.nn.Parameter(torch.randn(7, generator=gen))
    opt = ft.Adam([a, b], lr=1e-2, state_dtype="int8")
    a.grad, b.grad = grad(a.shape, 0, torch.float32), grad(b.shape, 0, torch.float32)
    opt.step()
    before = {k: v for k, v in opt.state[a].items()}
    codes = before["exp_avg"]["codes"].clone()
    pa = a.detach().clone()
    opt.param_groups[0]["state_dtype"] = None
    b.grad = grad(b.shape, 1, torch.float32).to_sparse()
    with pytest.raises(TypeError, match=r"\['params'\]\[1\]: its gradient is sparse"):
        opt.step()
    assert all(opt.state[a][k] is v for k, v in before.items()) and list(opt.state[a]) == list(
        before)
    assert torch.equal(opt.state[a]["exp_avg"]["codes"], codes)
    assert_same(a.detach(), pa)


# ---- a refused step leaves state as it was ----------------------------------------------------

@pytest.mark.parametrize("name, refusal", [("Adam", "sparse"), ("Rprop", "sparse"),
                                           ("Adam", "alias"), ("NAdam", "alias")])
def test_refused_step_makes_no_state(name, refusal):
    """A step refused for param 1 (a sparse gradient, or one that is param 0's memory) leaves
    no state for param 0 either; the next, good step is torch.optim's."""
    gen = torch.Generator().manual_seed(6)
    init = [torch.randn(10, generator=gen), torch.randn(5, generator=gen)]
    a, b = (torch.nn.Parameter(t.clone()) for t in init)
    opt = getattr(ft, name)([a, b])
    a.grad = grad(a.shape, 0, torch.float32)
    if refusal == "sparse":
        b.grad = grad(b.shape, 0, torch.float32).to_sparse()
        match = r"\['params'\]\[1\]: its gradient is sparse"
    else:
        b.grad = a.detach()[:5]
        match = r"\['params'\]\[1\]: its gradient shares memory"
    with pytest.raises((TypeError, ValueError), match=match):
        opt.step()
    assert len(opt.state) == 0  # (len: opt.state[a] would make an entry)
    assert opt.state_dict()["state"] == {}

    refs = [torch.nn.Parameter(t.clone()) for t in init]
    ref = getattr(torch.optim, name)(refs, foreach=False)
    for x, y in zip((a, b), refs):
        x.grad = grad(x.shape, 1, torch.float32)
        y.grad = x.grad.clone()
    opt.step()
    ref.step()
    for x, y in zip((a, b), refs):
        torch.testing.assert_close(x.detach(), y.detach(), rtol=1e-5, atol=1e-6)
        assert sorted(opt.state[x]) == sorted(ref.state[y])


def test_refused_step_keeps_loaded_state_objects():
    """After load_state_dict (a torch.optim checkpoint), a refused step leaves every state
    object of the other params in place: planning's ``step`` views are taken back."""
    gen = torch.Generator().manual_seed(7)
    init = [torch.randn(5, generator=gen), torch.randn(7, generator=gen)]
    src = [torch.nn.Parameter(t.clone()) for t in init]
    torch_opt = torch.optim.Adam(src, foreach=False)
    for x in src:
        x.grad = grad(x.shape, 0, torch.float32)
    torch_opt.step()
    a, b = (torch.nn.Parameter(x.detach().clone()) for x in src)
    opt = ft.Adam([a, b])
    opt.load_state_dict(roundtrip(torch_opt.state_dict()))
    before = {k: v for k, v in opt.state[a].items()}
    a.grad, b.grad = grad(a.shape, 1, torch.float32), grad(b.shape, 1, torch.float32).to_sparse()
    with pytest.raises(TypeError, match=r"\['params'\]\[1\]: its gradient is sparse"):
        opt.step()
    assert list(opt.state[a]) == list(before)
    assert all(opt.state[a][k] is v for k, v in before.items())

    b.grad = grad(b.shape, 1, torch.float32)
    for x in src:
        x.grad = grad(x.shape, 1, torch.float32)
    opt.step()
    torch_opt.step()
    for x, y in zip((a, b), src):
        torch.testing.assert_close(x.detach(), y.detach(), rtol=1e-5, atol=1e-6)
        assert float(opt.state[x]["step"]) == 2


@pytest.mark.parametrize("flag", ["no", 0, None])
def test_quantized_state_with_a_non_bool_non_negative_is_refused(flag):
    """bool(d["non_negative"]) took "no" as True."""
    p = torch.nn.Parameter(torch.ones(8192))
    opt = ft.Adam([p], lr=0.1, state_dtype="int8")
    p.grad = torch.full_like(p, 0.5)
    opt.step()
    sd = opt.state_dict()
    before = {k: v["codes"].clone() for k, v in opt.state[p].items() if isinstance(v, dict)}
    sd["state"][0]["exp_avg_sq"]["non_negative"] = flag
    with pytest.raises(TypeError, match=r"\['non_negative'\] must be a bool"):
        opt.load_state_dict(sd)
    for k, codes in before.items():
        assert torch.equal(opt.state[p][k]["codes"], codes)
