"""fastoptim.torch.AdamW as the local optimizer of ZeroRedundancyOptimizer under DDP.

Two processes on this machine (gloo, MASTER_ADDR=127.0.0.1, a free port) train a small MLP
for 20 steps; each rank holds half of every batch, so DDP's averaged gradient is the
full-batch gradient, and ZeRO shards the AdamW states over the two ranks. The final
parameters, and the consolidated optimizer state, must equal single-process training with
torch.optim.AdamW on the full batches.

The worker is this file run as a script, configured by the environment variables torchrun
sets (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so it also runs as
``torchrun --nproc_per_node=2 tests/test_torch_distributed.py OUT_DIR``.
"""

import sys
from datetime import timedelta
from pathlib import Path

import pytest
from dist_harness import gloo_or_skip, launch, reference_adamw, run_rank

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

STEPS = 20
BATCH = 32  # per step, split in two halves of 16
LR, WEIGHT_DECAY = 0.01, 0.1
TIMEOUT_S = 90  # per worker; a normal run takes a few seconds


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


def make_data():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, BATCH, 8, generator=gen), torch.randn(STEPS, BATCH, 4, generator=gen)


def worker(out_dir, bucket_view=False):
    """One rank: DDP + ZeroRedundancyOptimizer(optimizer_class=fastoptim.torch.AdamW)."""
    import fastoptim
    import fastoptim.torch as ft
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)  # two ranks share the machine
    fastoptim.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    model = DistributedDataParallel(make_model())
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=ft.AdamW, lr=LR,
                                  weight_decay=WEIGHT_DECAY,
                                  parameters_as_bucket_view=bucket_view)
    assert isinstance(opt.optim, ft.AdamW)
    xs, ys = make_data()
    half = BATCH // world
    for t in range(STEPS):
        x, y = xs[t, rank * half:(rank + 1) * half], ys[t, rank * half:(rank + 1) * half]
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    opt.consolidate_state_dict(to=0)
    if rank == 0:
        torch.save({"params": [p.detach() for p in model.module.parameters()],
                    "optim": opt.state_dict(),
                    "local_params": len(opt.optim.param_groups[0]["params"])},
                   Path(out_dir) / "rank0.pt")
    dist.barrier()
    dist.destroy_process_group()


def reference():
    return reference_adamw(make_model, make_data, STEPS, LR, WEIGHT_DECAY)


@pytest.mark.parametrize("bucket_view", [False, True], ids=["params", "bucket_view"])
def test_zero_redundancy_adamw_matches_single_process(tmp_path, bucket_view):
    """With parameters_as_bucket_view=True, ZeRO re-points every parameter's .data into its
    flat buckets after constructing the local fastoptim.torch.AdamW."""
    gloo_or_skip()
    results = launch(__file__, [tmp_path] + (["bucket_view"] if bucket_view else []), TIMEOUT_S)
    for rank, (code, out) in enumerate(results):
        assert code == 0, f"rank {rank} failed:\n{out[-3000:]}"
    saved = torch.load(tmp_path / "rank0.pt", weights_only=True)
    params, ref = reference()
    # ZeRO really sharded: rank 0's local AdamW holds only part of the parameters.
    assert 0 < saved["local_params"] < len(params)
    for got, want in zip(saved["params"], params):
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)
    # The consolidated state is torch's layout, with the reference's values.
    want_state = ref.state_dict()["state"]
    got_state = saved["optim"]["state"]
    assert got_state.keys() == want_state.keys()
    for index, entry in want_state.items():
        assert got_state[index].keys() == entry.keys()
        assert got_state[index]["step"].item() == STEPS
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(got_state[index][key], entry[key], rtol=1e-4, atol=1e-7)


if __name__ == "__main__":
    run_rank(worker, sys.argv[1], "bucket_view" in sys.argv[2:])
