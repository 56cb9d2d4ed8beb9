"""fastoptim.torch against torch's own optimizer database (torch.testing._internal).

``optim_db`` describes every torch.optim optimizer: the constructor configurations torch tests
it with (``optim_inputs_func``) and the inputs that must fail, with the exception type and a
message regex (``optim_error_inputs_func``). Each OptimizerInfo whose class has a twin of the
same name in fastoptim.torch is run here, so an optimizer added to fastoptim.torch (NAdam,
RAdam, Adamax, ASGD, Rprop, ...) is picked up without editing this file:

- every CPU configuration, also with each of torch's global flags (``foreach``, ``fused``,
  ``differentiable``) the info lists for the CPU: torch's class and ours built with the same
  arguments on the same float64 parameters, a few steps with the same gradients (through a
  closure where the optimizer requires one), then every parameter, every state entry and every
  param_group value compared (rtol 1e-12);
- every CPU error input: ours raises (or warns) the same type with a message matching torch's
  regex, at construction or at ``step()``, as torch's own ``TestOptimRenewed.test_errors``
  checks torch.

What fastoptim refuses by design (capturable, differentiable, complex, sparse, non-CPU
tensors) is skipped with the reason. torch's test module imports the ``expecttest`` package;
without it every test here skips, saying so.
"""

import copy

import pytest

torch = pytest.importorskip("torch")
try:
    from torch.testing._internal import common_optimizers
except ImportError as err:  # expecttest, which torch's test utilities import, is missing
    pytest.skip(f"torch's optimizer database cannot be imported ({err}); "
                f"`pip install expecttest` to run these tests", allow_module_level=True)

import fastoptim.torch as ft  # noqa: E402

OptimizerErrorEnum = common_optimizers.OptimizerErrorEnum
DEVICE = "cpu"
STEPS = 5
SHAPES = [(4, 3), (7,), (1,), (0,)]


def _twin(info):
    cls = getattr(ft, info.optim_cls.__name__, None)
    if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer):
        return cls
    return None


INFOS = [info for info in common_optimizers.optim_db if _twin(info) is not None]


def _configs(info):
    """torch's CPU configurations of ``info``, plus one per global flag it lists for the CPU
    (torch's helper for that is private: without it, the configurations alone)."""
    expand = getattr(common_optimizers, "_get_optim_inputs_including_global_cliquey_kwargs",
                     None)
    if expand is None:
        return info.optim_inputs_func(device=DEVICE)
    return expand(DEVICE, None, info)


def _error_inputs(info):
    return info.optim_error_inputs_func(device=DEVICE, dtype=torch.float32)


def _cases(inputs_of, infos):
    # The inputs are made again in each test (index k): they hold tensors a test may change.
    return [pytest.param(info, k, id=f"{info.name}-{k}-{desc}")
            for info in infos
            for k, desc in enumerate(x.desc if hasattr(x, "desc")
                                     else x.optimizer_error_input.desc
                                     for x in inputs_of(info))]


# -- what fastoptim refuses by design --------------------------------------------------------

def _tensors(params):
    """The tensors of an OptimizerInput's params (tensors, or param-group dicts)."""
    for item in params:
        if isinstance(item, dict):
            yield from _tensors(item["params"])
        elif isinstance(item, (list, tuple)):
            yield from _tensors(item)
        else:
            yield item


def _refused(optim_input):
    """Why fastoptim refuses this configuration, or None."""
    kwargs = optim_input.kwargs
    if kwargs.get("capturable"):
        return "capturable=True: fastoptim's CUDA launch takes step counts from the host"
    if kwargs.get("differentiable"):
        return "differentiable=True: fastoptim's kernels update in place, outside autograd"
    for t in _tensors(optim_input.params or []):
        if t.is_complex():
            return "complex parameters: fastoptim has float32 and float64 kernels only"
        if t.layout is not torch.strided:
            return "sparse parameters: fastoptim updates dense tensors only"
        if t.device.type != "cpu":
            return f"{t.device.type} parameters: this harness runs the CPU configurations"
    return None


# -- configurations ---------------------------------------------------------------------------

def _fresh_params(seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for s in SHAPES]


def _clone(params):
    """A copy of a params argument (tensors or param-group dicts) with fresh leaf tensors."""
    def leaf(t):
        return t.detach().clone().requires_grad_(t.requires_grad or t.is_floating_point())
    out = []
    for item in params:
        if isinstance(item, dict):
            group = dict(item)
            group["params"] = [leaf(t) for t in _tensors([item["params"]])]
            out.append(group)
        else:
            out.append(leaf(item))
    return out


def _same_value(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same_value, a, b))
    return type(a) is type(b) and a == b


def _assert_same(ours, theirs):
    our_params = list(_tensors(ours.param_groups))
    torch_params = list(_tensors(theirs.param_groups))
    assert len(our_params) == len(torch_params)
    for i, (q, p) in enumerate(zip(our_params, torch_params)):
        # Values of O(0.1..10) after a few fp64 steps: the kernels' fused multiply-adds and
        # order change the last bits only; atol is for elements that pass near zero.
        torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-12, atol=1e-14,
                                   msg=lambda m, i=i: f"param {i}: {m}")
        mine, want = ours.state.get(q, {}), theirs.state.get(p, {})
        assert mine.keys() == want.keys(), f"state keys of param {i}"
        for key, value in want.items():
            torch.testing.assert_close(mine[key], value, rtol=1e-12, atol=1e-14,
                                       msg=lambda m, i=i, key=key: f"state[{i}][{key!r}]: {m}")
    for g, (mine, want) in enumerate(zip(ours.param_groups, theirs.param_groups)):
        assert mine.keys() == want.keys(), f"param_groups[{g}] keys"
        for key in want.keys() - {"params"}:
            assert _same_value(mine[key], want[key]), (
                f"param_groups[{g}][{key!r}]: {mine[key]!r} != {want[key]!r}")


@pytest.mark.parametrize("info, k", _cases(_configs, INFOS))
def test_config_matches_torch(info, k):
    optim_input = _configs(info)[k]
    reason = _refused(optim_input)
    if reason:
        pytest.skip(reason)
    base = optim_input.params if optim_input.params is not None else _fresh_params(seed=k)
    theirs = info.optim_cls(_clone(base), **copy.deepcopy(optim_input.kwargs))
    ours = _twin(info)(_clone(base), **copy.deepcopy(optim_input.kwargs))
    torch_params = list(_tensors(theirs.param_groups))
    our_params = list(_tensors(ours.param_groups))

    gen = torch.Generator().manual_seed(100 + k)
    for _ in range(STEPS):
        grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in torch_params]

        def closure(params, grads=grads):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            return sum((p.detach() * g).sum() for p, g in zip(params, grads))

        if info.step_requires_closure:
            theirs.step(lambda: closure(torch_params))
            ours.step(lambda: closure(our_params))
        else:
            closure(torch_params)
            closure(our_params)
            theirs.step()
            ours.step()
    _assert_same(ours, theirs)


# -- error inputs -----------------------------------------------------------------------------

@pytest.mark.parametrize("info, k", _cases(_error_inputs, [
    info for info in INFOS if info.optim_error_inputs_func is not None]))
def test_error_input_raises_like_torch(info, k):
    error_input = _error_inputs(info)[k]
    optim_input = error_input.optimizer_error_input
    params, kwargs = optim_input.params, optim_input.kwargs
    cls = _twin(info)
    if issubclass(error_input.error_type, Warning):
        expect = pytest.warns(error_input.error_type, match=error_input.error_regex)
    else:
        expect = pytest.raises(error_input.error_type, match=error_input.error_regex)
    if error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
        with expect:
            cls(params, **kwargs)
    elif error_input.error_on == OptimizerErrorEnum.STEP_ERROR:
        opt = cls(params, **kwargs)
        with expect:
            opt.step()
    else:
        raise NotImplementedError(f"unknown error_on {error_input.error_on}")
