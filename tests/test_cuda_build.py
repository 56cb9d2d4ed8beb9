"""What the CUDA build of _core carries, read from the module file (no GPU needed).

* Kernel images: SASS for sm_75 (T4), sm_80 (A100) and sm_90 (H100), and compute_90 PTX that
  newer GPUs JIT-compile (cuobjdump's listings of the embedded fatbinary).
* The CUDA runtime is linked statically: no libcudart or libcuda among the module's dynamic
  dependencies, so the module imports without a driver (docs/cuda.md, Note [runtime policy]).

Skipped, with the reason, for a build without CUDA, for a build whose architectures were
chosen by hand (CMAKE_CUDA_ARCHITECTURES/CUDAARCHS), or where the binutils are missing.
"""

import os
import shutil
import subprocess

import pytest

from fastoptim import _core

CUDA = _core.info()["cuda"]
DEFAULT_ARCHS = "75-real,80-real,90"

pytestmark = pytest.mark.skipif(not CUDA["built"], reason="fastoptim was built without CUDA")


def _tool(name):
    """The tool from $<NAME> (e.g. CUOBJDUMP=/path/to/cuobjdump), PATH, or /usr/local/cuda."""
    path = (os.environ.get(name.upper()) or shutil.which(name)
            or shutil.which(f"/usr/local/cuda/bin/{name}"))
    if path is None:
        pytest.skip(f"{name} is not installed (set {name.upper()}=/path/to/{name})")
    return path


def _run(*cmd):
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def test_default_architectures():
    if CUDA["architectures"] != DEFAULT_ARCHS:
        pytest.skip(f"built for {CUDA['architectures']!r} by request, not the default")
    elf = _run(_tool("cuobjdump"), "--list-elf", _core.__file__)
    ptx = _run(_tool("cuobjdump"), "--list-ptx", _core.__file__)
    for sm in ("sm_75", "sm_80", "sm_90"):
        assert f".{sm}." in elf, f"no {sm} SASS in the module"
    assert "sm_86" not in elf and "sm_100" not in elf
    assert ".sm_90." in ptx, "no compute_90 PTX in the module (newer GPUs need it)"
    assert ".sm_75." not in ptx and ".sm_80." not in ptx, "PTX only for the newest target"


def test_runtime_linked_statically():
    needed = _run(_tool("readelf"), "-d", _core.__file__)
    libs = [line for line in needed.splitlines() if "NEEDED" in line]
    assert libs, "readelf found no dynamic section"
    assert not [l for l in libs if "libcudart" in l or "libcuda." in l], libs
