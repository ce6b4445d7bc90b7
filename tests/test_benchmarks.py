"""benchmarks/bench_kernels.py times the engine build it is given."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import lvllm._lk

ROOT = Path(__file__).resolve().parents[1]


def loaded_file(path: str | None) -> str:
    """__file__ of what bench_kernels.load_engine_module(path) loads, in a fresh process as
    bench_kernels runs it."""
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); import bench_kernels; "
        "print(bench_kernels.load_engine_module(sys.argv[2] or None).__file__)"
    )
    done = subprocess.run([sys.executable, "-c", script, str(ROOT / "benchmarks"), path or ""],
                          check=True, capture_output=True, text=True)
    return done.stdout.strip()


def test_another_build_is_the_one_timed(tmp_path):
    # Until b7df917 the installed module came back under the other build's path's name,
    # and --against timed one build against itself.
    other = tmp_path / Path(lvllm._lk.__file__).name
    shutil.copy(lvllm._lk.__file__, other)
    assert loaded_file(str(other)) == str(other)
    assert loaded_file(None) == str(Path(lvllm._lk.__file__).resolve())
