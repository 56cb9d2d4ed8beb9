"""Convergence study: AdamW with fp32, bf16, int8 and int4 optimizer states on the same model and
data, plus the paper's dynamic quantization map (Dettmers et al. 2022) against fastoptim's
closed-form map (python/fastoptim/quant.py).

Model: a torch MLP 64-256-256-10 (about 85k parameters) on scikit-learn's digits (1437 training
and 360 test images, a fixed split), cross-entropy, mini-batches of 64, AdamW (lr 1e-3, weight
decay 1e-2). torch computes the gradients; the update is fastoptim's, in place on numpy views
of the torch parameters:

* ``fp32``, ``bf16``: float32 / bfloat16 state arrays, fastoptim.adamw_;
* ``int8``, ``int4``: fastoptim.quant.QuantizedState states, fastoptim.adamw_ (the fused kernel);
* ``int8 dynamic``, ``int4 dynamic`` (the paper's dynamic map, quant.quantize_dynamic) and
  ``int8 sqrt``, ``int4 sqrt`` (a square-root companding map, measured, not shipped): float32
  states passed through the map's quantizer and dequantizer after every step (simulated
  storage; the update itself is the float32 kernel).

Every tensor's states are quantized here, biases included (the classes would keep float32
states below 4096 elements): the study is meant to be hard on the formats. Each configuration
runs with three seeds (initial weights and batch order); curves are seed means of the
training-set loss after every epoch. A second table measures the quantization error of each
map on the Adam states at the end of the fp32 run: the relative error of m, of sqrt(v), and of
the update direction m / (sqrt(v) + eps) that Adam takes.

    python examples/quantized_states.py --out docs/img        # about a minute
    python examples/quantized_states.py --quick --out /tmp/q   # a few seconds
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

try:
    import fastoptim
except ImportError:  # run from a checkout without installing: use ../python
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
    import fastoptim

import ml_dtypes
import torch
from sklearn.datasets import load_digits

from fastoptim import quant
from fastoptim.quant import QuantizedState

CONFIGS = ["fp32", "bf16", "int8", "int4", "int8 dynamic", "int4 dynamic", "int8 sqrt",
           "int4 sqrt"]
HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2)


def data():
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    n = int(0.8 * len(y))
    return (torch.from_numpy(x[:n]), torch.from_numpy(y[:n]), torch.from_numpy(x[n:]),
            torch.from_numpy(y[n:]))


def round_trip(config, x, non_negative):
    """x after storage in a simulated map (dynamic: the paper's; sqrt: square-root companding)."""
    bits = 8 if config.startswith("int8") else 4
    flat = x.reshape(-1)
    if config.endswith("dynamic"):
        codes, absmax = quant.quantize_dynamic(flat, bits, not non_negative)
        return quant.dequantize_dynamic(codes, absmax, flat.size, bits,
                                        not non_negative).reshape(x.shape)
    return companding(flat, bits, non_negative).reshape(x.shape)


def make_states(config, params):
    if config == "fp32" or config.endswith(("dynamic", "sqrt")):
        return [np.zeros(p.shape, np.float32) for p in params for _ in (0, 1)]
    if config == "bf16":
        return [np.zeros(p.shape, ml_dtypes.bfloat16) for p in params for _ in (0, 1)]
    bits = 8 if config.startswith("int8") else 4
    return [QuantizedState.zeros(p.shape, bits, non_negative=k == 1)
            for p in params for k in (0, 1)]


def train(config, seed, epochs, batch=64):
    xtr, ytr, xte, yte = data()
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 10))
    tparams = list(model.parameters())
    for p in tparams:
        p.grad = torch.zeros_like(p)
    params = [p.data.numpy() for p in tparams]
    grads = [p.grad.numpy() for p in tparams]
    states = make_states(config, params)
    m, v = states[0::2], states[1::2]
    loss_fn = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    curve, step = [], 0
    for _ in range(epochs):
        for idx in torch.randperm(len(ytr), generator=gen).split(batch):
            for p in tparams:
                p.grad.zero_()
            loss_fn(model(xtr[idx]), ytr[idx]).backward()
            step += 1
            fastoptim.adamw_(params, grads, m, v, step=step, **HYPER)
            if config.endswith(("dynamic", "sqrt")):  # simulated storage: store, read back
                for x in m:
                    x[...] = round_trip(config, x, False)
                for x in v:
                    x[...] = round_trip(config, x, True)
        with torch.no_grad():
            curve.append(float(loss_fn(model(xtr), ytr)))
    with torch.no_grad():
        acc = float((model(xte).argmax(1) == yte).float().mean()) * 100
    return curve, acc, (m, v) if config == "fp32" else None


def companding(x, bits, non_negative):
    """A square-root companding map, block-wise like the others (measured, not shipped):
    signed x = absmax * sign(q) * (q/M)^2, non-negative x = absmax * ((q+1)/L)^4."""
    b = quant.BLOCK[bits]
    n = x.size
    pad = np.zeros(-(-n // b) * b, np.float32)
    pad[:n] = x
    blk = pad.reshape(-1, b)
    am = np.abs(blk).max(1, keepdims=True)
    a = np.abs(blk) / np.where(am > 0, am, 1)
    if non_negative:
        lv = 2 ** bits
        q = np.clip(np.rint(lv * a ** 0.25) - 1, 0, lv - 1)
        y = am * ((q + 1) / lv) ** 4
    else:
        lv = 2 ** (bits - 1) - 1
        q = np.rint(lv * np.sqrt(a))
        y = am * np.sign(blk) * (q / lv) ** 2
    return y.reshape(-1)[:n].astype(np.float32)


def map_errors(m, v, eps=1e-8):
    """Relative errors of each map on the fp32 run's final Adam states."""
    m = np.concatenate([x.reshape(-1) for x in m])
    v = np.concatenate([x.reshape(-1) for x in v])
    rows = []
    for bits in (8, 4):
        for name in ("small float (fastoptim)", "dynamic (paper)", "sqrt companding"):
            if name == "sqrt companding":
                mq, vq = companding(m, bits, False), companding(v, bits, True)
            elif name.startswith("small"):
                mq = QuantizedState.from_float(m, bits).to_float()
                vq = QuantizedState.from_float(v, bits, non_negative=True).to_float()
            else:
                mq = quant.dequantize_dynamic(*quant.quantize_dynamic(m, bits, True), m.size,
                                              bits, True)
                vq = quant.dequantize_dynamic(*quant.quantize_dynamic(v, bits, False), v.size,
                                              bits, False)
            u, uq = m / (np.sqrt(v) + eps), mq / (np.sqrt(vq) + eps)
            rows.append((bits, name,
                         np.abs(mq - m).sum() / np.abs(m).sum(),
                         np.abs(np.sqrt(vq) - np.sqrt(v)).sum() / np.sqrt(v).sum(),
                         np.abs(uq - u).sum() / np.abs(u).sum(),
                         float((vq == 0).mean()) * 100))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/img")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="3 epochs, 1 seed")
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs, args.seeds = 3, 1
    fastoptim.set_num_threads(1)
    results, fp32_states = {}, None
    for config in CONFIGS:
        runs = []
        for seed in range(args.seeds):
            curve, acc, st = train(config, seed, args.epochs)
            runs.append((curve, acc))
            if st is not None and fp32_states is None:
                fp32_states = st
        results[config] = runs
        print(f"{config:14s} done", file=sys.stderr)
    base_loss = np.mean([r[0][-1] for r in results["fp32"]])
    base_acc = np.mean([r[1] for r in results["fp32"]])
    print(f"\nAdamW on digits, MLP 64-256-256-10, {args.epochs} epochs, {args.seeds} seeds "
          "(mean; min-max over seeds)\n")
    print("| states | final train loss | vs fp32 | test accuracy % | vs fp32 (points) |")
    print("|---|---|---|---|---|")
    for config, runs in results.items():
        losses = [r[0][-1] for r in runs]
        accs = [r[1] for r in runs]
        print(f"| {config} | {np.mean(losses):.4g} ({min(losses):.4g}-{max(losses):.4g}) | "
              f"{(np.mean(losses) / base_loss - 1) * 100:+.1f}% | {np.mean(accs):.2f} "
              f"({min(accs):.1f}-{max(accs):.1f}) | {np.mean(accs) - base_acc:+.2f} |")
    print("\nQuantization error on the fp32 run's final Adam states (relative L1):\n")
    print("| bits | map | m | sqrt(v) | m/(sqrt(v)+eps) | v read back as 0 |")
    print("|---|---|---|---|---|---|")
    for bits, name, em, ev, eu, z in map_errors(*fp32_states):
        print(f"| {bits} | {name} | {em:.4f} | {ev:.4f} | {eu:.4f} | {z:.2f}% |")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = {"fp32": ("k", "-"), "bf16": ("tab:blue", "-"), "int8": ("tab:green", "-"),
              "int4": ("tab:red", "-"), "int8 dynamic": ("tab:green", ":"),
              "int4 dynamic": ("tab:red", ":"), "int8 sqrt": ("tab:green", "--"),
              "int4 sqrt": ("tab:red", "--")}
    for config, runs in results.items():
        curve = np.mean([r[0] for r in runs], axis=0)
        c, ls = styles[config]
        ax.plot(np.arange(1, len(curve) + 1), curve, color=c, linestyle=ls, label=config)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss (full training set)")
    ax.set_title("AdamW state formats, digits MLP (mean of seeds)")
    ax.legend()
    fig.tight_layout()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "quantized_states_loss.png", dpi=110)
    print(f"\nwrote {out / 'quantized_states_loss.png'}")
    return results


if __name__ == "__main__":
    main()
