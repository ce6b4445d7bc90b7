"""lvllm/_torch_ops*.so, the C++ that links torch (lk's ops: csrc/lk_torch; vLLM's CPU attention
ops: csrc/vllm_cpu), built by `make build` for the CPU against the venv's torch."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import warnings
from pathlib import Path

import torch

MISSING = ("lvllm/_torch_ops*.so is not built (`make build` builds it with the venv's torch; "
           "pip's isolated builds cannot)")


@functools.cache
def loaded() -> bool:
    """Loads the library into torch once; False where it was not built."""
    spec = importlib.util.find_spec("lvllm._torch_ops")
    if spec is None or spec.origin is None:
        return False
    torch.ops.load_library(Path(spec.origin))
    return True


@contextlib.contextmanager
def overriding_kernels():
    """torch warns when a kernel takes another's place for one key; here that is the point."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="(?s).*Overriding a previously registered kernel")
        yield
