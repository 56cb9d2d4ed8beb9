"""fastoptim.torch inside torch.compile (Note [torch.compile] in fastoptim/torch.py).

``opt.step()`` compiled with ``fullgraph=True`` (any graph break is an error) under the eager,
aot_eager (functionalization) and inductor backends: no warning, and the parameters and states
equal eager torch.optim's after several steps, with a learning rate changed between them (a
scheduler's own wrapper of ``step`` is outside what dynamo traces, for torch.optim too).
"""

import warnings

import pytest

torch = pytest.importorskip("torch")

import fastoptim.torch as ft  # noqa: E402

STEPS = 4


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def ours(caught):
    """The recorded warnings that fastoptim or a graph break caused. (torch warns about its
    own internals on a first compilation, e.g. inductor's use of torch.jit.script_method.)"""
    return [str(w.message) for w in caught
            if "fastoptim" in w.filename or "graph break" in str(w.message).lower()]


def make_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).requires_grad_() for s in ((8, 5), (5,), (33,))]


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
@pytest.mark.parametrize("name", ["AdamW", "SGD", "RMSprop", "NAdam"])
def test_compiled_step_has_no_graph_break_and_matches_torch(backend, name):
    kwargs = {"AdamW": dict(lr=0.01, weight_decay=0.1), "SGD": dict(lr=0.05, momentum=0.9),
              "RMSprop": dict(lr=0.01), "NAdam": dict(lr=0.01)}[name]
    expected, actual = make_params(), make_params()
    ref = getattr(torch.optim, name)(expected, foreach=False, **kwargs)
    opt = getattr(ft, name)(actual, **kwargs)

    @torch.compile(backend=backend, fullgraph=True)
    def compiled_step():
        opt.step()

    gen = torch.Generator().manual_seed(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(STEPS):
            for p, q in zip(expected, actual):
                g = torch.randn(p.shape, generator=gen)
                p.grad, q.grad = g.clone(), g.clone()
            ref.step()
            compiled_step()
            for o in (ref, opt):
                o.param_groups[0]["lr"] *= 0.5
    assert ours(caught) == []
    for p, q in zip(expected, actual):
        torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-5, atol=1e-6)
        for key, want in ref.state[p].items():
            torch.testing.assert_close(opt.state[q][key], want, rtol=1e-5, atol=1e-6)


def test_compiled_training_step_with_backward_matches_eager():
    """A whole training step compiled: forward, backward, step (backward may split the graph,
    which torch.compile does silently; the step adds no break and no warning)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    twin = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    twin.load_state_dict(model.state_dict())
    opt = ft.AdamW(model.parameters(), lr=0.01)
    ref = torch.optim.AdamW(twin.parameters(), lr=0.01, foreach=False)

    @torch.compile(backend="aot_eager")
    def train_step(x, y):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss

    gen = torch.Generator().manual_seed(2)
    # Recorded, not raised: an error raised inside dynamo is an internal error, and dynamo
    # itself reads loss.grad (a warning it hides) while it resumes after backward().
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(STEPS):
            x, y = torch.randn(4, 6, generator=gen), torch.randn(4, 2, generator=gen)
            train_step(x, y)
            ref.zero_grad()
            torch.nn.functional.mse_loss(twin(x), y).backward()
            ref.step()
    assert ours(caught) == []
    for p, q in zip(twin.parameters(), model.parameters()):
        torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-5, atol=1e-6)
