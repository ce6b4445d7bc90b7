"""Build safety net: cmake/LkIsaCheck.cmake catches AVX-512 code shared with baseline code."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CXX = shutil.which("c++") or shutil.which("g++")
NM = shutil.which("nm")


def _cmake() -> str | None:
    try:
        import cmake  # the pip package of requirements/build.txt

        found = shutil.which("cmake", path=cmake.CMAKE_BIN_DIR)
    except (ImportError, AttributeError):
        found = None
    return found or shutil.which("cmake")


CMAKE = _cmake()
pytestmark = pytest.mark.skipif(
    not (CXX and NM and CMAKE and sys.platform.startswith("linux")),
    reason="needs a C++ compiler, nm and cmake",
)

HEADER = """
#pragma once
__attribute__((noinline)) inline float shared_sum(const float* x, int n) {
  float s = 0; for (int i = 0; i < n; ++i) s += x[i] * x[i]; return s;
}
"""
WIDE_SHARED = '#include "shared.h"\nfloat wide(const float* x) { return shared_sum(x, 64); }\n'
WIDE_PRIVATE = (
    "namespace { __attribute__((noinline)) float own(const float* x) {\n"
    "  float s = 0; for (int i = 0; i < 64; ++i) s += x[i]; return s; } }\n"
    "float wide(const float* x) { return own(x); }\n"
)
BASE = '#include "shared.h"\nfloat base(const float* x) { return shared_sum(x, 8); }\n'


def _compile(tmp: Path, name: str, source: str, *flags: str) -> Path:
    (tmp / f"{name}.cpp").write_text(source)
    obj = tmp / f"{name}.o"
    subprocess.run(
        [CXX, "-O2", "-fPIC", "-c", *flags, f"-I{tmp}", str(tmp / f"{name}.cpp"), "-o", str(obj)],
        check=True,
    )
    return obj


def _check(wide: Path, base: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CMAKE, f"-DNM={NM}", f"-DWIDE_OBJECTS={wide}", f"-DBASE_OBJECTS={base}",
         "-P", str(ROOT / "cmake" / "LkIsaCheck.cmake")],
        capture_output=True, text=True,
    )


def test_isa_check_fails_on_a_shared_inline_function(tmp_path):
    (tmp_path / "shared.h").write_text(HEADER)
    wide = _compile(tmp_path, "wide", WIDE_SHARED, "-mavx512f")
    base = _compile(tmp_path, "base", BASE)
    result = _check(wide, base)
    assert result.returncode != 0
    assert "_Z10shared_sumPKfi" in result.stderr


def test_isa_check_passes_when_wide_code_is_private(tmp_path):
    (tmp_path / "shared.h").write_text(HEADER)
    wide = _compile(tmp_path, "wide", WIDE_PRIVATE, "-mavx512f")
    base = _compile(tmp_path, "base", BASE)
    result = _check(wide, base)
    assert result.returncode == 0, result.stderr
