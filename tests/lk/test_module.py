"""How the built module sits in a process that also holds torch's C++ runtime."""

import shutil
import subprocess

import pytest

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


def test_kernel_rate_probe_times_every_format_and_refuses_bad_requests():
    """benchmarks/bench_kernels.py's probe: runs every kernel of the best ISA, single and
    paired (decode's pairs, and the unit kernels where the ISA has them), on a panel whose
    depth is no multiple of the group (MXFP4, NVFP4: of 128; their groups of 32 and 16 are
    always whole), and names what it refuses."""
    isa = lvllm._lk.best_isa()
    for fmt in lvllm._lk.format_names():
        depth = 288 if fmt in ("mxfp4", "nvfp4") else 300
        for rows in (1, 3, 9, 16, 40):
            ns = lvllm._lk.measure_kernel_ns_per_panel_row(isa, fmt, rows, depth, seconds=0.01)
            assert 0 < ns < 1e5, (fmt, rows, ns)
            if lvllm._lk.kernel_reads_two_panels(isa, fmt, rows):
                ns = lvllm._lk.measure_kernel_ns_per_panel_row(isa, fmt, rows, depth, pair=True, seconds=0.01)
                assert 0 < ns < 1e5, (fmt, rows, ns)
            else:
                with pytest.raises(ValueError, match=f"does not read two panels side by side for {rows} rows"):
                    lvllm._lk.measure_kernel_ns_per_panel_row(isa, fmt, rows, depth, pair=True)
    with pytest.raises(ValueError, match="mxfp4 depth must be a multiple of 32"):
        lvllm._lk.measure_kernel_ns_per_panel_row(isa, "mxfp4", 1, 300)
    with pytest.raises(ValueError, match="nvfp4 depth must be a multiple of 16"):
        lvllm._lk.measure_kernel_ns_per_panel_row(isa, "nvfp4", 1, 296)
    # formats.h: values padded to 64 bytes, then one row of 16 fp32 scales per 128 inputs
    # (INT4: offsets too); 300 inputs make 3 groups.
    assert lvllm._lk.kernel_panel_bytes("bfloat16", 300) == 300 * 32
    assert lvllm._lk.kernel_panel_bytes("int8", 300) == 300 * 16 + 3 * 64
    assert lvllm._lk.kernel_panel_bytes("int4", 300) == (300 * 8 + 63) // 64 * 64 + 2 * 3 * 64
    with pytest.raises(ValueError, match="depth must be positive"):
        lvllm._lk.kernel_panel_bytes("int8", 0)
    with pytest.raises(ValueError, match="unknown weight format 'bf16'"):
        lvllm._lk.measure_kernel_ns_per_panel_row(isa, "bf16", 1, 256)
    with pytest.raises(ValueError, match="rows must be 1..64 for int8"):
        lvllm._lk.measure_kernel_ns_per_panel_row(isa, "int8", 0, 256)
    if isa != "AMX":
        with pytest.raises(ValueError, match="this CPU cannot run AMX kernels"):
            lvllm._lk.measure_kernel_ns_per_panel_row("AMX", "int8", 1, 256)
