"""How the built module sits in a process that also holds torch's C++ runtime."""

import shutil
import subprocess

import torch  # noqa: F401  loads the process's shared libstdc++ first, as in every real use

import lvllm._lk
from lvllm import lk


def test_module_exports_no_cxx_runtime_symbols():
    """A toolchain that links libstdc++ statically must not leave its symbols exported: the
    shared libstdc++ torch loads would take some of them over and split the runtime's state
    (seen on a GPU machine: the first std::ostringstream crashed)."""
    nm = shutil.which("nm")
    assert nm, "nm (binutils) is needed to inspect the module"
    exported = subprocess.run([nm, "-D", "--defined-only", lvllm._lk.__file__], capture_output=True,
                              text=True, check=True).stdout
    runtime = [line for line in exported.splitlines() if "_ZNSt6locale" in line or "_ZNSt8ios_base" in line]
    assert not runtime, runtime[:5]


def test_runtime_description_formats_numbers_after_torch_is_loaded():
    info = lk.runtime_info()
    assert f"{info['threads']} thread(s)" in info["description"]
    assert f"{info['numa_nodes']} " in info["description"]
