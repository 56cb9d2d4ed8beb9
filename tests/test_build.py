"""What the CPU kernels of _core carry, read from the module file (objdump; no timing), and
which ISAs' symbols the units outside the ISAs name (compiled here, read with nm).

Note [software prefetch] (src/cpp/kernels.h): the vector body of every span prefetches each
stream it reads. From 0385c53 on, GCC compiled that prefetch away (it sat alone in a generic
lambda) and no test saw it: only a benchmark did, as all-fp16 AdamW at half its ceiling. This
test disassembles the module and requires a prefetch in every vector instantiation of the
span driver (run_range).

Skipped, with the reason, where objdump is missing or the module has no symbol table: a wheel
that pip installs is stripped (scikit-build-core's install.strip), while the builds of
tools/dev_build.sh and tools/sanitize.sh keep their symbols.
"""

import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

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


# The units of _core that are not an ISA's own (isa_*.cpp) are compiled in every build; they
# may name the table fillers of an ISA only under that ISA's FASTOPTIM_HAVE_* definition, or a
# build without the ISA does not import (undefined symbol). Seen once: kernel_api.h held a
# constexpr table of every ISA's fillers, which no optimising build emits but emulate.cpp
# (compiled at -O0 in CUDA builds) did, so a CUDA build with FASTOPTIM_NO_AVX2=ON failed at
# import. No CI configuration builds that combination; this compiles each unit as such a build
# would (CUDA on, no vector ISA, -O0) and reads its undefined symbols.
_SRC = Path(__file__).resolve().parent.parent / "src"
_VECTOR_FILLER = re.compile(r"fill_table_(avx2|avx512|avx512bf16)_shard\d")


def _compile_units(units, defines, out_dir):
    """{unit name: undefined symbols (mangled)} of each unit compiled with `defines` at -O0."""
    cxx = os.environ.get("CXX") or shutil.which("g++")
    if cxx is None or shutil.which("nm") is None:
        pytest.skip("no C++ compiler (g++ or $CXX) or nm")
    pybind11 = pytest.importorskip("pybind11", reason="pybind11 is needed to compile the units")
    flags = ["-std=c++17", "-O0", "-w", *(f"-D{d}=1" for d in defines),
             f"-I{_SRC / 'cpp'}", f"-I{_SRC / 'cuda'}", f"-I{pybind11.get_include()}",
             f"-I{sysconfig.get_paths()['include']}"]
    jobs = {u.name: (subprocess.Popen([cxx, *flags, "-c", str(u), "-o", str(out_dir / (u.name + ".o"))],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
            for u in units}
    undefined = {}
    for name, job in jobs.items():
        log = job.communicate()[0]
        assert job.returncode == 0, f"{name} did not compile:\n{log[-3000:]}"
        undefined[name] = subprocess.run(["nm", "-u", str(out_dir / (name + ".o"))], check=True,
                                         capture_output=True, text=True).stdout.split()
    return undefined


def test_units_outside_the_isas_name_only_compiled_fillers(tmp_path):
    if not (_SRC / "cpp" / "dispatch.cpp").is_file():
        pytest.skip("the C++ sources are not beside the tests (an installed copy of the tests)")
    units = sorted(p for d in ("cpp", "cuda") for p in (_SRC / d).glob("*.cpp")
                   if not p.name.startswith("isa_"))
    assert {"dispatch.cpp", "bindings.cpp", "emulate.cpp"} <= {u.name for u in units}
    undefined = _compile_units(units, ["FASTOPTIM_HAVE_CUDA"], tmp_path)
    named = {u: [s for s in syms if _VECTOR_FILLER.search(s)] for u, syms in undefined.items()}
    assert not any(named.values()), f"fillers of ISAs this build lacks: {named}"
    # the check can see a filler: with every ISA defined, dispatch.cpp names all of them
    full = _compile_units([_SRC / "cpp" / "dispatch.cpp"],
                          ["FASTOPTIM_HAVE_AVX2", "FASTOPTIM_HAVE_AVX512", "FASTOPTIM_HAVE_AVX512BF16"],
                          tmp_path)
    found = {m.group(0) for s in full["dispatch.cpp"] for m in [_VECTOR_FILLER.search(s)] if m}
    assert len(found) == 3 * 4, sorted(found)
