"""tests/gpu: lvllm's GPU path with torch alone (no vLLM), on a CUDA device.

Where torch sees no CUDA device they are reported as skipped, never as passed;
benchmarks/gpu_session.sh builds lk and runs them on a GPU machine.
"""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="tests/gpu need a CUDA device")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)
