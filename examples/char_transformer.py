"""Convergence study on a transformer: a character-level GPT trained with AdamW whose states are
float32, bfloat16, int8 or int4, through the torch drop-in, as a user would write it.

Data: the source of some of Python's own standard-library modules (it ships with every
Python; the exact text depends on the Python version), characters outside printable ASCII
mapped to "?". The last 10% is held out for validation.

Model: a small decoder-only transformer (token and position embeddings, pre-LayerNorm blocks
of causal self-attention and a 4x MLP, a final LayerNorm and an untied output layer), trained
on random windows with next-character cross-entropy. Optimizers, from the same initial weights
on the same batches, with a linear warm-up through ``torch.optim.lr_scheduler.LambdaLR``:

* ``torch fused fp32``: ``torch.optim.AdamW(fused=True)``, the reference;
* ``fp32``: ``fastoptim.torch.AdamW`` (float32 states, the default);
* ``bf16``, ``int8``, ``int4``: ``fastoptim.torch.AdamW(state_dtype=...)``. As in the
  classes, tensors under ``fastoptim.quant.MIN_QUANTIZED_SIZE`` (4096) elements (LayerNorms and
  biases here) keep float32 states: the configuration a user gets.

Reported per configuration (mean over seeds): the training loss (mean of the last 10% of the
steps), the validation loss and next-character accuracy on a fixed set of held-out windows,
the optimizer's state memory (``state_nbytes()``) and the median optimizer step time.

    python examples/char_transformer.py --out docs/img           # about 10 minutes on 2 cores
    python examples/char_transformer.py --quick --out /tmp/ct     # a few seconds
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

try:
    import fastoptim
except ImportError:  # run from a checkout without installing: use ../python
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
    import fastoptim

import fastoptim.torch as ft

# Standard-library modules whose source is the corpus (all plain Python, about 1 MB together).
MODULES = ["argparse.py", "textwrap.py", "inspect.py", "dataclasses.py", "functools.py",
           "typing.py", "pathlib.py", "subprocess.py", "enum.py", "statistics.py"]
CONFIGS = ["torch fused fp32", "fp32", "bf16", "int8", "int4"]
# fp32: the drop-in's default (float32 params keep float32 states)
STATE_DTYPE = {"fp32": None, "bf16": "bfloat16", "int8": "int8", "int4": "int4"}
VOCAB = ["\n"] + [chr(c) for c in range(32, 127)] + ["?"]


def corpus(quick: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The training and validation character ids (int64)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "".join((stdlib / name).read_text(encoding="utf-8") for name in MODULES)
    if quick:
        text = text[:200_000]
    index = {c: i for i, c in enumerate(VOCAB)}
    unknown = index["?"]
    ids = torch.tensor([index.get(c, unknown) for c in text], dtype=torch.int64)
    n = int(0.9 * len(ids))
    return ids[:n], ids[n:]


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        a = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class CharGPT(nn.Module):
    def __init__(self, vocab: int, context: int, d: int, heads: int, layers: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
        return self.head(self.ln(self.blocks(x)))


def windows(ids: torch.Tensor, starts: torch.Tensor, context: int):
    offsets = starts[:, None] + torch.arange(context + 1)
    w = ids[offsets]
    return w[:, :-1], w[:, 1:]


def make_optimizer(config: str, model: nn.Module, hyper: dict):
    if config == "torch fused fp32":
        return torch.optim.AdamW(model.parameters(), fused=True, **hyper)
    return ft.AdamW(model.parameters(), state_dtype=STATE_DTYPE[config], **hyper)


def state_bytes(opt) -> int:
    if hasattr(opt, "state_nbytes"):
        return opt.state_nbytes()
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if isinstance(t, torch.Tensor))


def train(config: str, seed: int, args, data) -> dict:
    train_ids, val_ids = data
    torch.manual_seed(seed)
    model = CharGPT(len(VOCAB), args.context, args.d, args.heads, args.layers)
    hyper = dict(lr=args.lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    opt = make_optimizer(config, model, hyper)
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    gen = torch.Generator().manual_seed(1000 + seed)  # the batches: the same for every config
    val_gen = torch.Generator().manual_seed(7)
    val_starts = torch.randint(0, len(val_ids) - args.context - 1, (args.val_windows,),
                               generator=val_gen)
    vx, vy = windows(val_ids, val_starts, args.context)
    losses, val_curve, step_times = [], [], []

    def evaluate() -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            total, correct = 0.0, 0
            for i in range(0, len(vx), 64):
                logits = model(vx[i:i + 64])
                total += float(nn.functional.cross_entropy(
                    logits.flatten(0, 1), vy[i:i + 64].flatten(), reduction="sum"))
                correct += int((logits.argmax(-1) == vy[i:i + 64]).sum())
        model.train()
        return total / vy.numel(), 100.0 * correct / vy.numel()

    for step in range(1, args.steps + 1):
        starts = torch.randint(0, len(train_ids) - args.context - 1, (args.batch,), generator=gen)
        x, y = windows(train_ids, starts, args.context)
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        t0 = time.perf_counter()
        opt.step()
        step_times.append(time.perf_counter() - t0)
        sched.step()
        losses.append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            val_curve.append((step, *evaluate()))
    tail = max(1, args.steps // 10)
    return {"losses": losses, "val": val_curve, "train_loss": float(np.mean(losses[-tail:])),
            "val_loss": val_curve[-1][1], "val_acc": val_curve[-1][2],
            "state_bytes": state_bytes(opt), "step_ms": statistics.median(step_times) * 1e3,
            "params": sum(p.numel() for p in model.parameters()),
            "finite": all(math.isfinite(v) for v in losses)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/img")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="a tiny model, 60 steps, 1 seed")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    args.context, args.d, args.heads, args.layers = 64, 128, 4, 2
    args.batch, args.lr, args.eval_every, args.val_windows = 32, 2e-3, 100, 256
    if args.quick:
        args.steps, args.seeds, args.d, args.layers, args.eval_every = 60, 1, 64, 1, 20
        args.val_windows = 64
    data = corpus(args.quick)
    runs: dict[str, list[dict]] = {}
    for config in CONFIGS:
        runs[config] = []
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            runs[config].append(train(config, seed, args, data))
            print(f"{config:17s} seed {seed}: train loss {runs[config][-1]['train_loss']:.4f}, "
                  f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)

    def mean(config: str, key: str) -> float:
        return float(np.mean([r[key] for r in runs[config]]))

    base = "fp32"
    table = {}
    for config in CONFIGS:
        table[config] = {k: mean(config, k) for k in ("train_loss", "val_loss", "val_acc",
                                                      "state_bytes", "step_ms")}
        table[config]["train_loss_vs_fp32_pct"] = (table[config]["train_loss"]
                                                   / mean(base, "train_loss") - 1) * 100
        table[config]["val_acc_vs_fp32_points"] = table[config]["val_acc"] - mean(base, "val_acc")
        table[config]["state_bytes_vs_fp32"] = table[config]["state_bytes"] / mean(base,
                                                                                  "state_bytes")
    n_params = runs[base][0]["params"]
    print(f"\nCharacter-level GPT ({n_params:,} parameters: {args.layers} layers, d={args.d}, "
          f"context {args.context}), AdamW lr {args.lr}, {args.steps} steps of {args.batch} "
          f"windows, {args.seeds} seed(s) (mean)\n")
    print("| optimizer states | train loss | vs fastoptim fp32 | val loss | val accuracy % | "
          "vs fp32 (points) | state memory | step ms |")
    print("|---|---|---|---|---|---|---|---|")
    for config, row in table.items():
        print(f"| {config} | {row['train_loss']:.4f} | {row['train_loss_vs_fp32_pct']:+.2f}% | "
              f"{row['val_loss']:.4f} | {row['val_acc']:.2f} | "
              f"{row['val_acc_vs_fp32_points']:+.2f} | {row['state_bytes'] / 2**20:.2f} MiB "
              f"({row['state_bytes_vs_fp32']:.3f}x) | {row['step_ms']:.2f} |")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.4))
    styles = {"torch fused fp32": ("0.55", "--"), "fp32": ("k", "-"), "bf16": ("tab:blue", "-"),
              "int8": ("tab:green", "-"), "int4": ("tab:red", "-")}
    k = max(1, args.steps // 40)  # moving average of the per-step training loss
    fp32_curve = np.mean([r["losses"] for r in runs[base]], axis=0)
    smooth = lambda c: np.convolve(c, np.ones(k) / k, mode="valid")
    for config in CONFIGS:
        c, ls = styles[config]
        curve = np.mean([r["losses"] for r in runs[config]], axis=0)
        x = np.arange(k, len(curve) + 1)
        ax.plot(x, smooth(curve), color=c, linestyle=ls, label=config)
        val = np.mean([[v[1] for v in r["val"]] for r in runs[config]], axis=0)
        vx = [v[0] for v in runs[config][0]["val"]]
        ax.plot(vx, val, color=c, linestyle=ls, marker="o", markersize=3, linewidth=0.8)
        if config != base:
            ax2.plot(x, (smooth(curve) / smooth(fp32_curve) - 1) * 100, color=c, linestyle=ls,
                     label=config)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/char)")
    ax.set_title(f"AdamW state formats, char-level GPT ({n_params / 1e6:.2f}M params)\n"
                 f"lines: training loss ({k}-step mean); dots: validation loss")
    ax.legend()
    ax2.axhline(0.0, color="k", linewidth=0.8)
    ax2.set_xlabel("step")
    ax2.set_ylabel("training loss vs fastoptim fp32 (%)")
    ax2.set_title("gap to fp32 states (seed mean, same moving average)")
    lo, hi = np.percentile(np.concatenate([l.get_ydata() for l in ax2.lines[1:]]), [2, 98])
    ax2.set_ylim(min(lo, -1.0) * 1.2, max(hi, 1.0) * 1.2)
    ax2.legend()
    fig.tight_layout()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "char_transformer.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"\nwrote {path}")
    results = {"config": {k: getattr(args, k) for k in ("steps", "seeds", "context", "d", "heads",
                                                         "layers", "batch", "lr")},
               "params": n_params, "table": table, "figure": str(path),
               "runs": {c: [{k: v for k, v in r.items() if k != "losses"} for r in rs]
                        for c, rs in runs.items()}}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
