"""Every ```python block of the user documentation runs against the current API.

The blocks are found by regex in README.md, docs/torch.md, docs/quantized_states.md,
docs/cuda.md and bench/README.md, so a block added to one of them is tested without touching
this file. Each block runs with ``exec`` in a fresh namespace, one top-level statement at a
time, as a REPL would; a statement that is a bare expression stores its value in ``_``.

Many blocks are fragments: they use names that the surrounding prose defines (``params``,
``model``, ``loader``...). ``EXAMPLES`` maps such a block, identified by its file and a short
distinctive substring of its text, to a small preamble run first in the same namespace
(small, realistic objects: float32 arrays of a few thousand elements, a tiny torch model, a
few batches), the modules it needs (skipped, with the reason, where they are missing) and an
optional light check of what the block computed. A block with no entry runs with no
preamble; an entry that names no block (or more than one) fails
``test_every_entry_names_one_block``, so the table cannot go stale.

A bare expression followed by a comment that is a Python literal (``sched(0), sched(50)  #
(0.0, 0.015)``) or a repr (``sched  # Warmup(...)``) is a claim about its value; it is
compared with the value the expression has (``check_claims``). Other comments are prose.

A preamble only supplies what the prose defines: a block that is wrong (not just a
fragment) is fixed in its doc, not papered over here.
"""

import ast
import dataclasses
import re
import textwrap
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "docs/torch.md", "docs/quantized_states.md", "docs/cuda.md",
        "bench/README.md"]

# A fenced block whose info string is python (or py), at any indentation (list items); the
# closing fence has the opening one's indentation.
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?:python|py)[ \t]*\n"
                   r"(?P<body>.*?)^(?P=indent)```[ \t]*$", re.MULTILINE | re.DOTALL)


@dataclasses.dataclass(frozen=True)
class Block:
    file: str
    line: int  # of the opening fence, 1-based
    text: str  # dedented: bench/README.md:294 is one indented line of bench_cpu.py's CASES

    @property
    def id(self):
        return f"{self.file}:{self.line}"


def find_blocks():
    blocks = []
    for name in DOCS:
        doc = (ROOT / name).read_text()
        for m in FENCE.finditer(doc):
            body = textwrap.dedent(m.group("body"))
            blocks.append(Block(name, doc.count("\n", 0, m.start()) + 1, body))
    return blocks


BLOCKS = find_blocks()


# ---- the preambles ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Example:
    file: str
    key: str  # a short substring found in this block only
    preamble: str = ""
    needs: tuple = ()  # modules to importorskip before the preamble
    check: Optional[Callable] = None  # check(namespace, stdout) after the block
    skip_unless: Optional[Callable] = None  # () -> a reason to skip, or None
    distributed: bool = False  # calls init_process_group("gloo") with env:// (torchrun's)
    fixtures: tuple = ()  # conftest fixtures whose values the block's namespace gets by name


TORCH_MODEL = """
import torch
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
"""

# A batch of each kind the torch blocks iterate over.
TORCH_BATCHES = """
gen = torch.Generator().manual_seed(1)
shard_of_the_data = [(torch.randn(8, 16, generator=gen), torch.randn(8, 4, generator=gen))
                     for _ in range(3)]
loss_fn = torch.nn.functional.mse_loss
"""


def check_readme_example(ns, out):
    assert np.isfinite(ns["p"]).all()
    assert "'isa'" in out and "'num_threads'" in out  # print(fo.backend_info())


def check_schedules(ns, out):
    assert ns["_"].shape == (1000,)  # sched.lrs(1000)


def check_mini_batches(ns, out):
    batches = ns["batches"]
    assert isinstance(batches, list) and batches
    assert sum(xb.shape[1] for xb, _ in batches) == ns["X"].shape[1]
    assert all(xb.shape[1] == yb.shape[1] for xb, yb in batches)


def check_ema(ns, out):
    assert ns["running"] == ns["smooth"].value and np.isfinite(ns["running"])
    shadow = ns["shadow"]
    assert shadow.t == ns["num_steps"]
    for got, want in zip(ns["eval_params"], shadow.corrected()):
        np.testing.assert_array_equal(got, want)


def check_torch_dropin(ns, out):
    import torch

    assert isinstance(ns["opt"], torch.optim.Optimizer)


def check_torch_loop(ns, out):
    opt = ns["opt"]
    steps = {int(opt.state[p]["step"]) for p in ns["model"].parameters()}
    assert steps == {len(ns["loader"])}
    assert ns["sched"].last_epoch == 1


def check_storage_options(ns, out):
    assert isinstance(ns["_"], int) and ns["_"] >= 0  # opt.state_nbytes()


def check_ddp(ns, out):
    opt, model = ns["opt"], ns["model"]
    assert all(int(opt.optim.state[p]["step"]) == len(ns["shard_of_the_data"])
               for p in model.parameters())


def check_fsdp(ns, out):
    from torch.distributed.tensor import DTensor

    opt, model = ns["opt"], ns["model"]
    assert all(isinstance(p, DTensor) for p in model.parameters())
    assert all(int(opt.state[p]["step"]) == len(ns["shard_of_the_data"])
               for p in model.parameters())


def check_compile(ns, out):
    # The block only defines the compiled function; the doc's claim is that it compiles with
    # fullgraph=True (a graph break would raise), so call it once.
    import torch

    before = [p.detach().clone() for p in ns["model"].parameters()]
    try:
        ns["optimizer_step"]()
    finally:
        torch._dynamo.reset()
    assert any(not torch.equal(a, p) for a, p in zip(before, ns["model"].parameters()))


def check_quantized(ns, out):
    assert np.isfinite(ns["p"]).all()
    assert ns["m"].absmax.max() > 0 and ns["v"].absmax.max() > 0  # the states were written


def check_bench_case(ns, out):
    (case,) = ns["_"]  # the line is an element of CASES, trailing comma included
    assert case in ns["bench"].CASES


def cuda_missing():
    import fastoptim

    cuda = fastoptim._core.info()["cuda"]
    if not cuda["built"]:
        return f"fastoptim was built without CUDA ({cuda.get('error')})"
    if not cuda["device_count"]:
        return "no CUDA device is visible"
    return None


EXAMPLES = [
    Example("README.md", "fo.adam_(p, g, m, v, step=step", check=check_readme_example),
    Example("README.md", "S.Warmup(S.CosineDecay(", check=check_schedules, preamble="""
import numpy as np
rng = np.random.default_rng(0)
params = [rng.standard_normal(n).astype(np.float32) for n in (4096, 256, 10)]
"""),
    Example("README.md", "random_mini_batches(X, Y, 64", check=check_mini_batches, preamble="""
import numpy as np
rng = np.random.default_rng(0)
X = rng.standard_normal((20, 300)).astype(np.float32)
Y = rng.integers(0, 2, (1, 300)).astype(np.float32)
X_rows, y = X.T.copy(), Y[0].astype(np.int64)
num_epochs = 2
"""),
    Example("README.md", "shadow = ModelEMA(params", check=check_ema, preamble="""
import numpy as np
import fastoptim as fo
rng = np.random.default_rng(0)
losses = list(np.linspace(2.0, 0.5, 50) + 0.1 * rng.standard_normal(50))
params = [rng.standard_normal(n).astype(np.float32) for n in (4096, 256, 10)]
opt = fo.Adam(params, lr=1e-3)
grads = [2 * p for p in params]
num_steps = 20
eval_params = [np.empty_like(p) for p in params]
"""),
    Example("README.md", "# then as torch.optim.AdamW",
            needs=("torch",), preamble=TORCH_MODEL, check=check_torch_dropin),
    Example("docs/torch.md", "for x, y in loader:", needs=("torch",), check=check_torch_loop,
            preamble="""
import torch
gen = torch.Generator().manual_seed(1)
loader = [(torch.randn(32, 64, generator=gen), torch.randint(0, 10, (32,), generator=gen))
          for _ in range(4)]
"""),
    # fp32_model: big enough (4,096 elements) for state_dtype="int8" to quantize its weight.
    Example("docs/torch.md", "master_weights=True)          # fp32 masters", needs=("torch",),
            check=check_storage_options, preamble=TORCH_MODEL + """
fp32_model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                 torch.nn.Linear(128, 10))
"""),
    Example("docs/torch.md", "ZeroRedundancyOptimizer(model.parameters()", needs=("torch",),
            distributed=True, check=check_ddp, preamble="""
import torch

def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
""" + TORCH_BATCHES),
    Example("docs/torch.md", "fully_shard(model, mesh=mesh)", needs=("torch",), distributed=True,
            check=check_fsdp, preamble="""
import torch
import torch.distributed as dist

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh()) for _ in range(2))
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)

torch.manual_seed(0)
model = Net()
""" + TORCH_BATCHES),
    Example("docs/torch.md", "@torch.compile(fullgraph=True)", needs=("torch",),
            check=check_compile, preamble=TORCH_MODEL + """
import fastoptim.torch as ft
opt = ft.AdamW(model.parameters(), lr=1e-3)
for p in model.parameters():
    p.grad = torch.ones_like(p)
"""),
    Example("docs/quantized_states.md", "QuantizedState.zeros(p.shape, bits=8)",
            check=check_quantized, preamble="""
import numpy as np
import fastoptim
rng = np.random.default_rng(0)
p = rng.standard_normal(8192).astype(np.float32)
g = rng.standard_normal(8192).astype(np.float32)
t = 1
"""),
    Example("docs/cuda.md", "import cupy as cp", needs=("cupy",), skip_unless=cuda_missing),
    Example("bench/README.md", 'Case("lion", "Lion", "lion_"', check=check_bench_case,
            fixtures=("bench",), preamble="Case, _lr = bench.Case, bench._lr\n"),
]


def entries_for(block):
    return [e for e in EXAMPLES if e.file == block.file and e.key in block.text]


# ---- running a block -------------------------------------------------------------------------

def claimed_value(comment):
    """The value a comment claims for the expression before it: ("literal", value),
    ("repr", text), or None for prose."""
    text = comment.strip()
    try:
        return "literal", ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    if re.fullmatch(r"[A-Z]\w*\(.*\)", text):
        return "repr", text
    return None


def check_claim(source, value, claim):
    kind, want = claim
    if kind == "repr":
        assert repr(value) == want, f"{source!r} is {value!r}, the doc says {want}"
    else:
        assert value == pytest.approx(want, rel=1e-9, abs=1e-12), \
            f"{source!r} is {value!r}, the doc says {want!r}"


def run_source(source, ns, filename):
    """exec ``source`` in ``ns`` one top-level statement at a time. A bare expression's value
    goes to ``ns['_']``, and is compared with the comment on its last line when that comment
    is a literal or a repr."""
    lines = source.splitlines()
    tree = ast.parse(source, filename)
    for stmt in tree.body:
        if isinstance(stmt, ast.Expr):
            code = compile(ast.Expression(stmt.value), filename, "eval")
            value = eval(code, ns)  # noqa: S307 - the doc's own example
            ns["_"] = value
            last = lines[stmt.end_lineno - 1]
            tail = last[stmt.end_col_offset:]
            if tail.lstrip().startswith("#"):
                claim = claimed_value(tail.lstrip()[1:])
                if claim is not None:
                    check_claim(ast.get_source_segment(source, stmt), value, claim)
        else:
            exec(compile(ast.Module([stmt], type_ignores=[]), filename, "exec"), ns)  # noqa: S102


@pytest.fixture
def gloo_env(monkeypatch):
    """torchrun's environment for a one-process gloo group; the group is destroyed after."""
    import torch.distributed as dist
    from dist_harness import free_port, gloo_or_skip

    gloo_or_skip()
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
                           LOCAL_RANK="0", WORLD_SIZE="1").items():
        monkeypatch.setenv(key, value)
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.id)
def test_doc_block_runs(block, request, capsys):
    found = entries_for(block)
    assert len(found) <= 1, f"{block.id} matches several entries: {[e.key for e in found]}"
    entry = found[0] if found else Example(block.file, "")
    for module in entry.needs:
        if module == "torch":
            request.getfixturevalue("one_torch_thread")  # importorskip("torch"), one thread
        else:
            pytest.importorskip(module, reason=f"{block.id} needs {module} (not installed)")
    reason = entry.skip_unless() if entry.skip_unless else None
    if reason:
        pytest.skip(f"{block.id}: {reason}")
    if entry.distributed:
        request.getfixturevalue("gloo_env")
    ns = {"__name__": "__docs_example__"}
    ns.update((name, request.getfixturevalue(name)) for name in entry.fixtures)
    run_source(entry.preamble, ns, f"<preamble of {block.id}>")
    run_source(block.text, ns, block.id)
    if entry.check is not None:
        entry.check(ns, capsys.readouterr().out)


def test_blocks_are_found():
    """The regex sees the blocks (a fence it missed would go untested)."""
    for name in DOCS:
        fences = len(re.findall(r"^[ \t]*```(?:python|py)[ \t]*$", (ROOT / name).read_text(),
                                re.MULTILINE))
        assert fences == sum(b.file == name for b in BLOCKS), name
    assert len(BLOCKS) >= 13


def test_every_entry_names_one_block():
    """No stale entry: each one's substring is in exactly one block of its file."""
    for entry in EXAMPLES:
        matches = [b.id for b in BLOCKS if b.file == entry.file and entry.key in b.text]
        assert len(matches) == 1, (f"EXAMPLES entry ({entry.file!r}, {entry.key!r}) names "
                                   f"{len(matches)} blocks: {matches}")
