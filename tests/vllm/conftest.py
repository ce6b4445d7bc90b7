"""Session fixtures of the end-to-end tests (helpers: e2e_common.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def _ready() -> str | None:
    for module in ("vllm", "lvllm._lk"):
        if importlib.util.find_spec(module) is None:
            return f"needs {module}"
    import torch

    if torch.cuda.is_available():
        return "these end-to-end tests target vLLM's CPU build"
    return None


SKIP_REASON = _ready()
if SKIP_REASON:
    collect_ignore_glob = ["test_*.py"]
else:
    from e2e_common import RunResult, build_model, run_llm


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")

    def get(family: str) -> Path:
        return build_model(root / family, family)

    return get


@pytest.fixture(scope="session")
def llm_runs(tiny_model):
    """Cached runs keyed by their settings: each vLLM instance starts once per session."""
    cache: dict[tuple, RunResult] = {}

    def get(family: str, **settings) -> RunResult:
        key = (family, tuple(sorted(settings.items())))
        if key not in cache:
            cache[key] = run_llm(tiny_model(family), **settings)
        return cache[key]

    return get


@pytest.fixture
def sigterms(request) -> int:
    return request.config.getoption("--sigterms")
