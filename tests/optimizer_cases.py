"""What the numeric tests share: the table of cases (rule x hyperparameters), each rule's state
arguments, and which of them a case uses. test_functional.py runs the table against the
reference, test_reference.py (without ema) against torch.optim."""

# The state arguments of each functional update, in signature order (docs/api.md).
STATE_ARGS = {
    "sgd": ["momentum_buffers"],
    "rmsprop": ["square_avgs", "grad_avgs", "momentum_buffers"],
    "adam": ["exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"],
    "adamw": ["exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"],
    "adagrad": ["state_sums"],
    "adadelta": ["square_avgs", "acc_deltas"],
    "ema": [],
}


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
    ("adam", dict(lr=0.01, amsgrad=True, weight_decay=0.1, maximize=True)),
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
    ("ema", dict(beta=0.3)),
    ("ema", dict(beta=0.0)),
    ("ema", dict(beta=0.999)),
]
