"""The typed API: ``mypy --strict`` accepts tests/typed_usage.py (and with it the package
modules it imports) and rejects every marked line of tests/typed_error_usage.py; the
hand-written stub ``_core.pyi`` matches the compiled module; ``py.typed`` and the stub are
installed with the package."""
import ast
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fastoptim
from fastoptim import _core, functional, reference

TESTS = Path(__file__).resolve().parent
SOURCE = TESTS.parent / "python"  # the package source: its annotations and stub are checked
PACKAGE = Path(fastoptim.__file__).resolve().parent  # the package as imported (installed)
CUDA_ONLY = {"_emulate_kernel"}  # defined only where CUDA is built (bindings.cpp)


@pytest.fixture(scope="module")
def mypy(tmp_path_factory):
    """Run ``mypy --strict`` on one file against the source tree; returns (exit code, output)."""
    pytest.importorskip("mypy", reason="mypy is not installed (it is in the 'test' extra)")
    cache = tmp_path_factory.mktemp("mypy_cache")  # fresh: a stale cache hides a new stub
    env = dict(os.environ, MYPYPATH=str(SOURCE))
    # mypy silences errors in modules under a PYTHONPATH entry (as in site-packages); the
    # package's own modules must be checked, and mypy finds them through MYPYPATH.
    env.pop("PYTHONPATH", None)

    def run(path):
        proc = subprocess.run(
            [sys.executable, "-m", "mypy", "--strict", "--no-color-output", "--cache-dir",
             str(cache), str(path)],
            cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=600)
        return proc.returncode, proc.stdout + proc.stderr

    return run


def test_typed_usage_passes_mypy_strict(mypy):
    code, output = mypy(TESTS / "typed_usage.py")
    assert code == 0, output


def test_typed_usage_runs():
    import typed_usage
    typed_usage.main()


def test_mypy_rejects_each_deliberate_type_error(mypy):
    path = TESTS / "typed_error_usage.py"
    marked = {n for n, line in enumerate(path.read_text().splitlines(), 1)
              if line.endswith("# error")}
    assert len(marked) >= 10
    code, output = mypy(path)
    reported = {int(m.group(1)) for m in re.finditer(r"typed_error_usage\.py:(\d+): error:",
                                                     output)}
    assert code == 1, output
    assert reported == marked, output


def test_py_typed_and_the_stub_ship_with_the_package():
    assert (PACKAGE / "py.typed").is_file(), f"{PACKAGE} has no py.typed marker"
    assert (PACKAGE / "_core.pyi").is_file(), f"{PACKAGE} has no _core.pyi"


@pytest.mark.parametrize("name", reference.__all__)
def test_reference_annotations_are_the_functional_ones(name):
    assert inspect.signature(getattr(reference, name)) == inspect.signature(
        getattr(functional, name))


# -- the stub against the module ---------------------------------------------------------------

def _stub():
    """The stub's functions (name -> ast.FunctionDef), variables and classes; none when it is
    missing (test_py_typed_and_the_stub_ship_with_the_package reports that)."""
    path = PACKAGE / "_core.pyi"
    tree = ast.parse(path.read_text() if path.is_file() else "")
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    variables = {node.target.id for node in tree.body
                 if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)}
    classes = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    return functions, variables, classes


def test_stub_names_are_the_module_names():
    functions, variables, classes = _stub()
    runtime = {name for name in dir(_core) if not name.startswith("__")}
    if not _core.info()["cuda"]["built"]:
        assert not runtime & CUDA_ONLY
        runtime |= CUDA_ONLY
    assert set(functions) | variables | classes == runtime
    assert not set(functions) & variables
    for name in (set(functions) | classes) & runtime - CUDA_ONLY:
        assert callable(getattr(_core, name)), name
    for name in classes:
        assert isinstance(getattr(_core, name), type), name
    for name in variables:
        assert not callable(getattr(_core, name)), name


@pytest.mark.parametrize("rule", sorted(_core.rules))
def test_stub_rule_signature_is_the_declaration(rule):
    """Positional-only arguments in the declared order; a state is Optional exactly when the
    declaration says when it is needed, ``step`` when it is optional."""
    d = _core.rules[rule]
    expected = [(name, "ArrayOrList") for name in d["arrays"]]
    expected += [(name, "ArrayOrList | None" if when else "ArrayOrList")
                 for name, when in d["states"]]
    expected.append((d["copies"], "ArrayOrList | None"))
    if d["step"] != "none":
        expected.append(("step", "int | None" if d["step"] == "optional" else "int"))
    expected += [(name, "float") for name, _ in d["hyper"]]
    expected += [(name, "bool") for name in d["flags"]]

    fn = _stub()[0][rule]
    a = fn.args
    assert not (a.args or a.vararg or a.kwonlyargs or a.defaults), \
        f"_core.{rule} takes positional arguments only, without defaults"
    assert a.kwarg is not None and ast.unparse(a.kwarg.annotation) == "Unpack[UpdateOptions]", \
        f"_core.{rule} takes the load/store options as **options: Unpack[UpdateOptions]"
    assert [(arg.arg, ast.unparse(arg.annotation)) for arg in a.posonlyargs] == expected
    assert ast.unparse(fn.returns) == "None"


def _runtime_signature(name):
    """pybind11's signature line of _core.<name>, parsed as a Python def."""
    first = getattr(_core, name).__doc__.splitlines()[0]
    return ast.parse(f"def {first}: ...").body[0]


@pytest.mark.parametrize("name", sorted(set(_stub()[0]) - set(_core.rules)))
def test_stub_signature_is_pybind11s(name):
    if name not in dir(_core):
        pytest.skip(f"_core.{name} exists only where CUDA is built")
    stub, runtime = _stub()[0][name].args, _runtime_signature(name).args
    stub_positional = stub.posonlyargs + stub.args
    if all(re.fullmatch(r"arg\d+", a.arg) for a in runtime.args):  # unnamed in the binding
        assert len(stub.posonlyargs) == len(runtime.args) and not stub.args, name
    else:
        assert [a.arg for a in stub_positional] == [a.arg for a in runtime.args], name
    assert [a.arg for a in stub.kwonlyargs] == [a.arg for a in runtime.kwonlyargs], name
    assert not (stub.vararg or runtime.vararg), name
    # **options (the load/store options, fastoptim.typing.UpdateOptions) where pybind11 has
    # **kwargs, and nowhere else
    assert (stub.kwarg is None) == (runtime.kwarg is None), name
    if stub.kwarg is not None:
        assert ast.unparse(stub.kwarg.annotation) == "Unpack[UpdateOptions]", name
    assert list(map(ast.unparse, stub.defaults)) == list(map(ast.unparse, runtime.defaults))
    assert ([d and ast.unparse(d) for d in stub.kw_defaults]
            == [d and ast.unparse(d) for d in runtime.kw_defaults])
