"""What the CPU kernels of _core carry, read from the module file (objdump; no timing).

Note [software prefetch] (src/cpp/kernels.h): the vector body of every span prefetches each
stream it reads. From 0385c53 on, GCC compiled that prefetch away (it sat alone in a generic
lambda) and no test saw it: only a benchmark did, as all-fp16 AdamW at half its ceiling. This
test disassembles the module and requires a prefetch in every vector instantiation of the
span driver (run_range).

Skipped, with the reason, where objdump is missing or the module has no symbol table: a wheel
that pip installs is stripped (scikit-build-core's install.strip), while the builds of
tools/dev_build.sh and tools/sanitize.sh keep their symbols.
"""

import re
import shutil
import subprocess

import pytest

from fastoptim import _core

_FUNC = re.compile(r"^[0-9a-f]+ <(.*)>:$")


def _functions(path):
    """{demangled name: disassembly text} of every function in the module."""
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) is not installed")
    if "no symbols" in subprocess.run(["nm", path], capture_output=True, text=True).stderr:
        pytest.skip("the module is stripped (a pip-installed wheel); a dev build keeps symbols")
    out = subprocess.run([objdump, "-d", "--no-show-raw-insn", "-C", path],
                         check=True, capture_output=True, text=True).stdout
    funcs, name, body = {}, None, []
    for line in out.splitlines():
        m = _FUNC.match(line)
        if m:
            if name is not None:
                funcs[name] = "\n".join(body)
            name, body = m.group(1), []
        elif name is not None:
            body.append(line)
    if name is not None:
        funcs[name] = "\n".join(body)
    return funcs


def test_every_vector_span_prefetches():
    funcs = _functions(_core.__file__)
    spans = {n: b for n, b in funcs.items() if "::run_range<" in n}
    if not spans:
        pytest.skip("no run_range symbols in the module (stripped of local symbols)")
    # The AVX2 and AVX-512 instantiations use ymm/zmm registers; the scalar ones do not.
    vector = {n: b for n, b in spans.items() if re.search(r"%[yz]mm", b)}
    assert len(vector) >= 100, f"only {len(vector)} vector run_range bodies found"
    missing = sorted(n for n, b in vector.items() if "prefetch" not in b)
    assert not missing, (f"{len(missing)} of {len(vector)} vector run_range bodies have no "
                         f"prefetch, e.g. {missing[0][:200]}")
