"""Options of the whole suite, and how pytest-xdist splits it (make test: -n 2 --dist loadgroup)."""

from pathlib import Path

import pytest

# The tests that start vLLM instances (tests/vllm) run one after another on one worker, with
# the session's cached models and runs; everything else runs beside them on the other. (With
# test_families beside them too, two vLLM instances at once on two cores: 1486 s against 1369.)
VLLM_TESTS = Path(__file__).parent / "vllm"


def pytest_addoption(parser):
    parser.addoption("--sigterms", type=int, default=2,
                     help="servers stopped with SIGTERM under open streams in tests/vllm/test_shutdown.py")
    parser.addoption("--fuzz-seconds", type=float, default=20.0,
                     help="time budget of tests/lk/test_fuzz.py (it runs at least one case)")
    parser.addoption("--fuzz-seed", type=int, default=0, help="first seed of tests/lk/test_fuzz.py")


def pytest_collection_modifyitems(config, items):
    for item in items:
        group = "vllm" if VLLM_TESTS in Path(item.path).parents else "rest"
        item.add_marker(pytest.mark.xdist_group(group))
