"""The registry is complete: every rule declared in src/cpp/rules.h (``_core.rules``) has a
functional update that passes its arguments in the declared order, a reference oracle with the
same signature, a NumPy class, a torch drop-in and rows in the case table; and nothing exists
that the declarations do not know (Note [one declaration per rule], functional.py)."""

import inspect

import pytest

import fastoptim
from fastoptim import _core, functional, optim, reference
from optimizer_cases import CASES

RULES = sorted(_core.rules)
OPTIMIZERS = [r for r in RULES if r != "ema"]


def declared_order(rule):
    """The positional arguments of _core.<rule>, by name, in the declaration's order."""
    d = _core.rules[rule]
    names = list(d["arrays"]) + [name for name, _ in d["states"]] + [d["copies"]]
    if d["step"] != "none":
        names.append("step")
    names += [name for name, _ in d["hyper"]] + list(d["flags"])
    return names


class _Recorder:
    def __getattr__(self, name):
        def record(*args, **options):
            self.call = (name, args)
            self.options = options
        return record


def test_every_declared_rule_has_a_functional_update_and_nothing_else_does():
    exported = {name[:-1] for name in functional.__all__ if name.endswith("_")}
    assert exported - {"adamw", "unscale_and_check"} == set(RULES)
    for rule in RULES:
        assert getattr(fastoptim, rule + "_") is getattr(functional, rule + "_")


@pytest.mark.parametrize("rule", RULES)
def test_functional_passes_the_declared_arguments_in_order(rule, monkeypatch):
    fn = getattr(functional, rule + "_")
    params = inspect.signature(fn).parameters
    names = declared_order(rule)
    missing = [n for n in names if n not in params]
    assert not missing, f"{rule}_ lacks declared arguments {missing}"
    assert params["options"].kind is inspect.Parameter.VAR_KEYWORD
    # arguments accepted for torch's signature that the kernel does not take are checked in
    # Python (functional._check_unread), so they get valid values
    unread = {"asgd": ("lr", "alpha", "t0"), "rprop": ("lr",)}.get(rule, ())
    sentinels = {n: 1.0 if n in unread else object() for n in params if n != "options"}
    options = {name: object() for name in ("grad_scale", "found_inf", "stochastic_rounding",
                                           "compensation")}
    recorder = _Recorder()
    monkeypatch.setattr(functional, "_core", recorder)
    fn(**sentinels, **options)
    called, args = recorder.call
    assert called == rule
    assert list(args) == [sentinels[n] for n in names]
    assert recorder.options == options  # the load/store options reach the kernel as keywords


@pytest.mark.parametrize("rule", RULES)
def test_reference_has_the_functional_signature(rule):
    ours = inspect.signature(getattr(functional, rule + "_"))
    theirs = inspect.signature(getattr(reference, rule + "_"))
    assert ours == theirs


@pytest.mark.parametrize("rule", OPTIMIZERS)
def test_every_optimizer_has_a_numpy_class_and_a_torch_drop_in(rule):
    pytest.importorskip("torch")
    import fastoptim.torch as fo_torch
    for module in (optim, fo_torch):
        classes = [c for c in vars(module).values()
                   if inspect.isclass(c) and c.__name__.lower() == rule]
        assert len(classes) == 1, f"{module.__name__} has no class for {rule}"
        assert classes[0].__name__ in module.__all__


@pytest.mark.parametrize("rule", RULES)
def test_case_table_switches_every_flag_on(rule):
    rows = [hyper for r, hyper in CASES if r == rule]
    assert rows, f"no case for {rule}"
    for flag in _core.rules[rule]["flags"]:
        if rule == "adam" and flag == "decoupled_weight_decay":
            continue  # adamw_ rows, and adam rows that set it, both count
        assert any(hyper.get(flag) for hyper in rows), f"{rule}: no case with {flag}=True"
