"""fastoptim.torch with DTensor parameters: FSDP2 (``fully_shard``) over two gloo ranks, and
every drop-in on DTensors of a one-rank mesh (Note [DTensor and FSDP2] in fastoptim/torch.py).

The FSDP2 test starts this file as two processes on this machine (gloo, MASTER_ADDR=127.0.0.1,
a free port), configured by the environment variables torchrun sets, so it also runs as
``torchrun --nproc_per_node=2 tests/test_torch_fsdp.py OUT_DIR``. Each rank holds half of every
batch; FSDP2 reduce-scatters the mean gradient, and each rank's fastoptim.torch.AdamW updates
its shard of every parameter (the first layer has 33 rows, so the shards are uneven). The full
parameters and optimizer states, gathered at the end, must equal single-process
torch.optim.AdamW on the full batches within 1e-5.
"""

import sys
from datetime import timedelta
from pathlib import Path

import pytest
from dist_harness import gloo_or_skip, launch, reference_adamw, run_rank

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

STEPS = 10
BATCH = 16  # per step, split in two halves of 8
LR, WEIGHT_DECAY = 0.01, 0.1
TIMEOUT_S = 120  # per worker; a normal run takes a few seconds


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 33), torch.nn.Tanh(), torch.nn.Linear(33, 5))


def make_data():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, BATCH, 8, generator=gen), torch.randn(STEPS, BATCH, 5, generator=gen)


def worker(out_dir):
    """One rank: fully_shard on a CPU mesh + fastoptim.torch.AdamW on the DTensor params."""
    import fastoptim
    import fastoptim.torch as ft
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)  # two ranks share the machine
    fastoptim.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    model = make_model()
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    opt = ft.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
    xs, ys = make_data()
    half = BATCH // world
    for t in range(STEPS):
        x, y = xs[t, rank * half:(rank + 1) * half], ys[t, rank * half:(rank + 1) * half]
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    # States are DTensors sharded as their params (torch's layout); gather everything.
    params = [p.full_tensor().detach() for p in model.parameters()]
    states = []
    for p in model.parameters():
        state = opt.state[p]
        assert isinstance(state["exp_avg"], DTensor)
        assert state["exp_avg"].placements == p.placements
        assert not isinstance(state["step"], DTensor)
        states.append({"step": state["step"].item(),
                       "exp_avg": state["exp_avg"].full_tensor(),
                       "exp_avg_sq": state["exp_avg_sq"].full_tensor()})
    shard_rows = model[0].weight.to_local().shape[0]
    if rank == 0:
        torch.save({"params": params, "states": states, "shard_rows": shard_rows},
                   Path(out_dir) / "rank0.pt")
    dist.barrier()
    dist.destroy_process_group()


def reference():
    return reference_adamw(make_model, make_data, STEPS, LR, WEIGHT_DECAY)


def test_fsdp2_adamw_matches_single_process(tmp_path):
    gloo_or_skip()
    results = launch(__file__, [tmp_path], TIMEOUT_S)
    for rank, (code, out) in enumerate(results):
        assert code == 0, f"rank {rank} failed:\n{out[-3000:]}"
    saved = torch.load(tmp_path / "rank0.pt", weights_only=True)
    assert saved["shard_rows"] == 17  # really sharded: 33 rows, 17 + 16
    params, ref = reference()
    for got, want in zip(saved["params"], params):
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)
    for got, p in zip(saved["states"], params):
        want = ref.state[p]
        assert got["step"] == STEPS
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-7)


# ---- every drop-in on DTensors of a one-rank mesh, in this process --------------------------

NAMES = ["SGD", "RMSprop", "Adam", "AdamW", "Adagrad", "Adadelta", "NAdam", "RAdam", "Adamax",
         "ASGD", "Rprop"]
KWARGS = {"SGD": dict(lr=0.05, momentum=0.9), "RMSprop": dict(lr=0.01, centered=True),
          "Adagrad": dict(lr=0.05), "ASGD": dict(lr=0.05, t0=2)}


@pytest.fixture(scope="module")
def mesh():
    """A one-rank gloo process group and CPU mesh (torch.distributed.tensor needs one)."""
    gloo_or_skip()
    from torch.distributed.device_mesh import init_device_mesh

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", NAMES)
def test_every_dropin_steps_dtensor_params_like_torch(mesh, name):
    import fastoptim.torch as ft
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    gen = torch.Generator().manual_seed(0)
    plain = [torch.randn(s, generator=gen).requires_grad_() for s in ((6, 5), (17,))]
    sharded = [torch.nn.Parameter(distribute_tensor(p.detach().clone(), mesh, [Shard(0)]))
               for p in plain]
    kwargs = KWARGS.get(name, dict(lr=0.01))
    ref = getattr(torch.optim, name)(plain, foreach=False, **kwargs)
    opt = getattr(ft, name)(sharded, **kwargs)
    for _ in range(5):
        for p, q in zip(plain, sharded):
            g = torch.randn(p.shape, generator=gen)
            p.grad = g.clone()
            q.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
        ref.step()
        opt.step()
    for p, q in zip(plain, sharded):
        assert isinstance(q, DTensor)
        torch.testing.assert_close(q.full_tensor().detach(), p.detach(), rtol=1e-5, atol=1e-6)
        for key, want in ref.state[p].items():
            got = opt.state[q][key]
            if isinstance(got, DTensor):
                assert got.placements == q.placements
                got = got.full_tensor()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, check_dtype=False)


if __name__ == "__main__":
    run_rank(worker, sys.argv[1])
