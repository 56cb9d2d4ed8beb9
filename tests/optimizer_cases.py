"""What the numeric tests share: the table of cases (rule x hyperparameters), each rule's state
arguments, which of them a case uses, the value torch starts each state with, and the per-step
scalars some rules take (step; NAdam's mu_product; ASGD's eta and mu). test_functional.py runs
the table against the reference, test_reference.py (without ema) against torch.optim."""

import inspect

import numpy as np

from fastoptim import reference

# The state arguments of each functional update, in signature order (docs/api.md).
STATE_ARGS = {
    "sgd": ["momentum_buffers"],
    "rmsprop": ["square_avgs", "grad_avgs", "momentum_buffers"],
    "adam": ["exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"],
    "adamw": ["exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"],
    "adagrad": ["state_sums"],
    "adadelta": ["square_avgs", "acc_deltas"],
    "nadam": ["exp_avgs", "exp_avg_sqs"],
    "radam": ["exp_avgs", "exp_avg_sqs"],
    "adamax": ["exp_avgs", "exp_infs"],
    "asgd": ["axs"],
    "rprop": ["prevs", "step_sizes"],
    "lion": ["exp_avgs"],
    "ema": [],
}

# Rules whose update takes ``step`` (the 1-based number of this step, torch's state["step"]
# after its increment).
STEP_RULES = {"sgd", "adam", "adamw", "adagrad", "nadam", "radam", "adamax"}


def case_id(case):
    rule, hyper = case
    return rule + "".join(f"-{k}={v}" for k, v in hyper.items())


def active_states(rule, hyper):
    """The state arguments this case uses (optional states only when their option is on)."""
    names = list(STATE_ARGS[rule])
    if rule == "sgd" and not hyper.get("momentum"):
        names.remove("momentum_buffers")
    if rule == "rmsprop":
        if not hyper.get("centered"):
            names.remove("grad_avgs")
        if not hyper.get("momentum"):
            names.remove("momentum_buffers")
    if rule in ("adam", "adamw") and not hyper.get("amsgrad"):
        names.remove("max_exp_avg_sqs")
    return names


def initial_state(rule, name, hyper):
    """The value every element of state argument ``name`` starts with (torch's init).

    Zeros, except Adagrad's ``initial_accumulator_value``, Rprop's step sizes (``lr``), and
    SGD's momentum buffer, which torch does not have before step 1: NaN proves that step 1
    overwrites it without reading it.
    """
    if rule == "adagrad" and name == "state_sums":
        return float(hyper.get("initial_accumulator_value", 0.0))
    if rule == "rprop" and name == "step_sizes":
        return float(full_hyper(rule, hyper)["lr"])
    if rule == "sgd" and name == "momentum_buffers":
        return np.nan
    return 0.0


def full_hyper(rule, hyper):
    """``hyper`` completed with the reference function's defaults."""
    parameters = inspect.signature(getattr(reference, rule + "_")).parameters
    defaults = {k: v.default for k, v in parameters.items()
                if v.default is not inspect.Parameter.empty}
    return {**defaults, **hyper}


def initial_scalars(rule, hyper, dtype=np.float64):
    """The 0-d scalar states torch starts with (mu_product = 1; eta = lr, mu = 1), as 0-d
    arrays of ``dtype``: torch's scalar dtype (float32 unless its default dtype is float64)."""
    if rule == "nadam":
        return {"mu_product": np.array(1.0, dtype)}
    if rule == "asgd":
        return {"eta": np.array(full_hyper(rule, hyper)["lr"], dtype),
                "mu": np.array(1.0, dtype)}
    return {}


def step_kwargs(rule, hyper, step, scalars):
    """The keyword arguments of step ``step`` besides the arrays and ``hyper``, and the scalar
    states after it: ``(kwargs, scalars_after)``. ``scalars`` comes from ``initial_scalars``
    (step 1) or the previous call; it is not modified.

    NAdam multiplies mu_product by this step's mu BEFORE the update (and passes the product);
    ASGD's update uses the current eta and mu and advances them AFTER it. Both are rounded to
    the scalars' dtype as torch's 0-d states are (``mu_product *= mu`` in that dtype;
    ``eta.copy_(...)`` from a double).
    """
    kwargs = {"step": step} if rule in STEP_RULES else {}
    if rule == "nadam":
        h = full_hyper(rule, hyper)
        mu_product = scalars["mu_product"].copy()
        mu_product *= reference.nadam_mu(step, h["beta1"], h["momentum_decay"])
        kwargs["mu_product"] = float(mu_product)
        return kwargs, {"mu_product": mu_product}
    if rule == "asgd":
        h = full_hyper(rule, hyper)
        kwargs["eta"], kwargs["mu"] = float(scalars["eta"]), float(scalars["mu"])
        eta, mu = reference.asgd_next(step, h["lr"], h["lambd"], h["alpha"], h["t0"])
        dtype = scalars["eta"].dtype
        return kwargs, {"eta": np.array(eta, dtype), "mu": np.array(mu, dtype)}
    return kwargs, dict(scalars)



def scalar_kwargs(rule, hyper, step):
    """``step`` and the per-step scalars (NAdam's mu_product, ASGD's eta and mu) of step
    ``step``, carried from step 1 as a stateful caller does (``step_kwargs``)."""
    kwargs, scalars = {}, initial_scalars(rule, hyper)
    for s in range(1, step + 1):
        kwargs, scalars = step_kwargs(rule, hyper, s, scalars)
    return kwargs

# (rule, hyperparameters). Every option of every rule is switched on in at least one case;
# the LAST case of each rule switches on everything at once ("full" cases, used by the
# subset tests below).
CASES = [
    ("sgd", dict()),
    ("sgd", dict(lr=0.05, maximize=True)),
    ("sgd", dict(lr=0.05, weight_decay=0.1)),
    ("sgd", dict(lr=0.05, momentum=0.9)),
    ("sgd", dict(lr=0.05, momentum=0.9, dampening=0.3)),
    ("sgd", dict(lr=0.05, momentum=0.9, nesterov=True)),
    ("sgd", dict(lr=0.05, momentum=0.8, dampening=0.5, weight_decay=0.1, maximize=True)),
    ("sgd", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1, maximize=True)),
    ("rmsprop", dict()),
    ("rmsprop", dict(lr=0.01, alpha=0.5, eps=1e-3, maximize=True)),
    ("rmsprop", dict(lr=0.01, weight_decay=0.1)),
    ("rmsprop", dict(lr=0.01, momentum=0.9)),
    ("rmsprop", dict(lr=0.01, centered=True)),
    ("rmsprop", dict(lr=0.01, centered=True, momentum=0.9, weight_decay=0.1, maximize=True)),
    ("adam", dict()),
    ("adam", dict(lr=0.01, beta1=0.8, beta2=0.99, eps=1e-6, maximize=True)),
    ("adam", dict(lr=0.01, weight_decay=0.1)),
    ("adam", dict(lr=0.01, beta1=0.0, amsgrad=True)),
    ("adam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    ("adam", dict(lr=0.01, amsgrad=True, weight_decay=0.1, maximize=True)),
    ("adam", dict(lr=0.01, amsgrad=True, weight_decay=0.1, decoupled_weight_decay=True,
                  maximize=True)),
    ("adamw", dict()),
    ("adamw", dict(lr=0.01, weight_decay=0.0)),
    ("adamw", dict(lr=0.01, beta1=0.5, beta2=0.9, amsgrad=True)),
    ("adamw", dict(lr=0.01, weight_decay=0.1, amsgrad=True, maximize=True)),
    ("adagrad", dict()),
    ("adagrad", dict(lr=0.1, lr_decay=0.05)),
    ("adagrad", dict(lr=0.1, weight_decay=0.1, maximize=True)),
    ("adagrad", dict(lr=0.1, lr_decay=0.01, weight_decay=0.1, eps=1e-6, maximize=True)),
    ("adadelta", dict()),
    ("adadelta", dict(lr=0.5, rho=0.5, eps=1e-4)),
    ("adadelta", dict(weight_decay=0.1)),
    ("adadelta", dict(lr=2.0, rho=0.95, weight_decay=0.1, maximize=True)),
    ("nadam", dict()),
    ("nadam", dict(lr=0.01, beta1=0.8, beta2=0.99, eps=1e-6, maximize=True)),
    ("nadam", dict(lr=0.01, momentum_decay=0.04)),
    ("nadam", dict(lr=0.01, weight_decay=0.1)),
    ("nadam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    ("nadam", dict(lr=0.01, beta1=0.8, beta2=0.99, eps=1e-6, momentum_decay=0.04,
                   weight_decay=0.1, decoupled_weight_decay=True, maximize=True)),
    # RAdam is unrectified while rho_t <= 5: the first 5 steps with beta2=0.999 or 0.99.
    ("radam", dict()),
    ("radam", dict(lr=0.01, beta1=0.8, beta2=0.99, eps=1e-6, maximize=True)),
    ("radam", dict(lr=0.01, weight_decay=0.1)),
    ("radam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    ("radam", dict(lr=0.01, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1,
                   decoupled_weight_decay=True, maximize=True)),
    ("adamax", dict()),
    ("adamax", dict(lr=0.01, beta1=0.8, beta2=0.99, eps=1e-6, maximize=True)),
    ("adamax", dict(lr=0.01, weight_decay=0.1)),
    ("adamax", dict(lr=0.01, beta1=0.5, beta2=0.9, eps=1e-4, weight_decay=0.1, maximize=True)),
    # t0=10: mu = 1/(step - t0) < 1 from step 12 on, so the averaging branch runs too.
    ("asgd", dict()),
    ("asgd", dict(lr=0.05, lambd=0.01, alpha=0.5, t0=10)),
    ("asgd", dict(lr=0.05, weight_decay=0.1, maximize=True)),
    ("asgd", dict(lr=0.05, lambd=0.01, alpha=0.9, t0=10, weight_decay=0.1, maximize=True)),
    ("rprop", dict()),
    ("rprop", dict(lr=0.05, etaminus=0.3, etaplus=1.5)),
    # Bounds close to lr: random-sign gradients drive step sizes to both within a few steps.
    ("rprop", dict(lr=0.1, step_size_min=0.05, step_size_max=0.2)),
    ("rprop", dict(lr=0.1, etaminus=0.3, etaplus=1.5, step_size_min=0.05, step_size_max=0.3,
                   maximize=True)),
    ("lion", dict()),
    ("lion", dict(lr=0.01, beta1=0.5, beta2=0.9)),
    ("lion", dict(lr=0.01, weight_decay=0.5)),
    ("lion", dict(lr=0.01, beta1=0.95, beta2=0.98, weight_decay=0.1, maximize=True)),
    ("ema", dict(beta=0.3)),
    ("ema", dict(beta=0.0)),
    ("ema", dict(beta=0.999)),
]
