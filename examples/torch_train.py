"""Train a PyTorch MLP on scikit-learn's digits with fastoptim.torch.AdamW.

The same network (64-256-128-10, ReLU) starts twice from the same initial weights and sees the
same mini-batches in the same order: once with ``fastoptim.torch.AdamW``, once with
``torch.optim.AdamW(fused=True)``. Both are stepped in turn inside one loop, so the step-time
columns were measured under the same machine load. Only ``optimizer.step()`` is timed (both
include torch's per-step hook wrapper, about 35 us here). The data is
``sklearn.datasets.load_digits`` (bundled with scikit-learn, no download).

``main(argv)`` returns the results as a dict (``--json FILE`` also writes it); a table goes to
stdout.

    python examples/torch_train.py                 # 10 epochs, a few seconds
    python examples/torch_train.py --epochs 30 --json /tmp/digits.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    import fastoptim
except ImportError:  # run from a checkout without installing: use ../python
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
    import fastoptim

import fastoptim.torch as ft


def load_digits(seed: int):
    """Train/test tensors: 8x8 images scaled to [0, 1], 80/20 split, labels 0..9."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    X, y = sklearn_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(
        X / 16.0, y, test_size=0.2, random_state=seed, stratify=y)
    as_x = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.long)  # noqa: E731
    return as_x(X_train), as_y(y_train), as_x(X_test), as_y(y_test)


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                               torch.nn.Linear(256, 128), torch.nn.ReLU(),
                               torch.nn.Linear(128, 10))


def accuracy(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(X).argmax(dim=1) == y).float().mean().item()


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for torch and for fastoptim (default 1: the model is "
                             "small, more threads only add synchronisation)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or args.threads < 1:
        raise SystemExit("--epochs, --batch-size and --threads must be >= 1")
    threads = torch.get_num_threads(), fastoptim.get_num_threads()
    torch.set_num_threads(args.threads)
    fastoptim.set_num_threads(args.threads)
    try:
        return train(args)
    finally:
        torch.set_num_threads(threads[0])
        fastoptim.set_num_threads(threads[1])


def train(args) -> dict:
    X, y, X_test, y_test = load_digits(args.seed)
    runs = {}
    for key in ("fastoptim", "torch_fused"):
        model = make_model(args.seed)  # the same initial weights for both
        params = model.parameters()
        if key == "fastoptim":
            opt = ft.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay,
                                    fused=True)
        runs[key] = (model, opt)
    n_params = sum(p.numel() for p in runs["fastoptim"][0].parameters())
    print(f"fastoptim {fastoptim.__version__} ({fastoptim.backend_info()['isa']}), torch "
          f"{torch.__version__}: digits, {len(X)} training / {len(X_test)} test images, "
          f"MLP 64-256-128-10 ({n_params} parameters), batch {args.batch_size}, "
          f"{args.threads} thread(s)")

    header = (f"{'epoch':>5} | {'fastoptim.torch.AdamW':^33} | "
              f"{'torch.optim.AdamW(fused=True)':^33}"
              f"\n{'':>5} | {'loss':>8}{'test acc':>10}{'step':>15} | {'loss':>8}{'test acc':>10}"
              f"{'step':>15}")
    print(header)
    print("-" * 77)
    gen = torch.Generator().manual_seed(args.seed)
    epochs = []
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(X), generator=gen)
        losses = {key: [] for key in runs}
        step_times = {key: [] for key in runs}
        for start in range(0, len(X), args.batch_size):
            batch = order[start:start + args.batch_size]
            for key, (model, opt) in runs.items():
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(X[batch]), y[batch])
                loss.backward()
                t0 = time.perf_counter()
                opt.step()
                step_times[key].append(time.perf_counter() - t0)
                losses[key].append(loss.item())
        row = {"epoch": epoch}
        for key, (model, _) in runs.items():
            row[key] = {"loss": statistics.fmean(losses[key]),
                        "train_accuracy": accuracy(model, X, y),
                        "test_accuracy": accuracy(model, X_test, y_test),
                        "step_us_median": 1e6 * statistics.median(step_times[key])}
        epochs.append(row)
        cells = [f"{row[k]['loss']:>8.4f}{100 * row[k]['test_accuracy']:>9.1f}%"
                 f"{row[k]['step_us_median']:>12.1f} us" for k in runs]
        print(f"{epoch:>5} | " + " | ".join(cells))

    (model_a, _), (model_b, _) = runs.values()
    max_diff = max((a - b).abs().max().item()
                   for a, b in zip(model_a.parameters(), model_b.parameters()))
    print(f"largest parameter difference after training: {max_diff:.2e}  "
          f"(median step time per epoch; the machine's load shows in it)")
    results = {"epochs": epochs, "max_param_difference": max_diff, "parameters": n_params,
               "batch_size": args.batch_size, "threads": args.threads,
               "torch": torch.__version__,
               "fastoptim": fastoptim.__version__, "isa": fastoptim.backend_info()["isa"]}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
