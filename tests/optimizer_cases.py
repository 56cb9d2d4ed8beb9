"""What the kernel-vs-reference tests share: each rule's state arguments and which of them a
case uses. (Each test file keeps its own table of cases: they test different things.)"""

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
