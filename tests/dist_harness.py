"""What the two-process torch.distributed tests share (test_torch_distributed.py: DDP with
ZeroRedundancyOptimizer; test_torch_fsdp.py: FSDP2): starting the ranks as torchrun would, and
the single-process torch.optim.AdamW run they are compared with."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest


def gloo_or_skip():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script, args, timeout_s, world=2):
    """Start `world` processes of ``python script *args`` with the environment torchrun sets
    (gloo on 127.0.0.1, a free port); return their (returncode, output) pairs."""
    import fastoptim

    pythonpath = os.pathsep.join([str(Path(fastoptim.__file__).parents[1]),
                                  os.environ.get("PYTHONPATH", "")])
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, PYTHONPATH=pythonpath, MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script), *map(str, args)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    results = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=timeout_s)
            results.append((proc.returncode, out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results


def run_rank(worker, *args):
    """A rank's ``__main__``: run ``worker(*args)``, then leave with os._exit, skipping the
    interpreter's finalization. Under load a rank sometimes died there with SIGABRT and
    "terminate called without an active exception" after its work was done and
    destroy_process_group had returned (three times in this project's CI and sanitizer runs,
    never reproduced alone; no sanitizer report). Gloo's worker threads tearing down while
    the interpreter finalizes are the likely cause (pytorch/pytorch PR 179291 describes such
    an abort); it is not shown to be. What the test checks (the exit status of the work, the
    results rank 0 saved) is all decided before this exit."""
    import traceback

    code = 0
    try:
        worker(*args)
    except BaseException:  # noqa: BLE001 - reported as the rank's failure
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def reference_adamw(make_model, make_data, steps, lr, weight_decay):
    """Single process, full batches, torch.optim.AdamW: (params, optimizer)."""
    import torch

    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, foreach=False)
    xs, ys = make_data()
    for t in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(xs[t]), ys[t]).backward()
        opt.step()
    return list(model.parameters()), opt
