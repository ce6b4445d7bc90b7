"""Options of the whole suite, and how pytest-xdist splits it (make test: -n 2 --dist loadgroup)."""

import os
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).parent
# make test's two pytest-xdist workers each take one of two groups of about equal time, each
# worker on its own share of the cores. The tiny models' vLLM instances run as fast on one
# core as on two (test_architectures: 58 s against 60), while two instances on the same cores
# slow each other (their OpenMP threads spin on them). Modules sharing llm_runs' cached
# instances (tests/vllm/conftest.py) stay in one group, so each instance starts once.
FIRST_GROUP = {f"vllm/test_{name}.py" for name in ("equivalence", "quantized", "dense", "hot_experts",
                                                   "expert_stats", "load_memory")} | {
    "test_pip_install.py", "test_airgap.py", "test_e2e_checks.py", "test_gpu_whole_model.py"}


def pytest_addoption(parser):
    parser.addoption("--sigterms", type=int, default=2,
                     help="servers stopped with SIGTERM under open streams in tests/vllm/test_shutdown.py")
    parser.addoption("--fuzz-seconds", type=float, default=20.0,
                     help="time budget of tests/lk/test_fuzz.py (it runs at least one case)")
    parser.addoption("--fuzz-seed", type=int, default=0, help="first seed of tests/lk/test_fuzz.py")


def pytest_configure(config):
    """An xdist worker keeps to its share of the cores (its children, vLLM's included, too)."""
    workers = getattr(config, "workerinput", {}).get("workercount", 1)
    cpus = sorted(os.sched_getaffinity(0))
    if workers > 1 and len(cpus) >= workers:
        index = int(config.workerinput["workerid"].removeprefix("gw"))
        os.sched_setaffinity(0, cpus[index::workers])
        torch.set_num_threads(len(cpus[index::workers]))


# Before xdist's own hook, which reads the groups into the test ids.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        group = "first" if Path(item.path).relative_to(TESTS).as_posix() in FIRST_GROUP else "second"
        item.add_marker(pytest.mark.xdist_group(group))
