"""Loading within RAM: each MoE layer's experts go to lk as soon as vLLM's loader has filled
them, so host memory peaks at the final size plus about two layers in the checkpoint's
format, not at the checkpoint's size; a load that cannot fit is refused before it starts.

The model: 8 MoE layers of 64 experts (H 1024, I 512), bf16: 201 MB of experts per layer,
1.6 GB in all, served with INT4 experts (about 57 MB per layer). Each run is a child process
with the worker in it and a small KV cache; the test samples its anonymous RSS while it
loads. With the experts converted after the whole model had loaded (as before), the first
test saw a peak of 2027 MiB against 938 MiB loaded, and the second was killed (-9).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from e2e_common import BASE_ENV, build_model

CHILD = Path(__file__).with_name("load_child.py")
LAYERS, EXPERTS, HIDDEN, INTER = 8, 64, 1024, 512
LAYER_CHECKPOINT = EXPERTS * 3 * HIDDEN * INTER * 2
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("load") / "model", "qwen3_moe", "--dtype", "bfloat16",
                       "--num-layers", str(LAYERS), "--num-experts", str(EXPERTS), "--top-k", "4",
                       "--hidden-size", str(HIDDEN), "--moe-intermediate-size", str(INTER),
                       "--fast-random")


class Child:
    """load_child.py in a process of its own; ``peak`` is the largest anonymous RSS seen."""

    def __init__(self, model: Path, cgroup: Path | None = None, **env):
        environment = {k: v for k, v in os.environ.items() if not k.startswith(("LVLLM_", "LK_"))}
        environment.update(BASE_ENV)
        # The child sizes its KV cache small itself: a larger one, allocated after the load,
        # would hide the load's peak behind the final size.
        environment.pop("VLLM_CPU_KVCACHE_SPACE")
        environment.update({"LVLLM_MOE_NUMA_ENABLED": "1", "LVLLM_MOE_USE_WEIGHT": "INT4", **env})
        command = [sys.executable, str(CHILD), str(model)]
        if cgroup is not None:   # the child joins the cgroup before it execs python
            command = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh", *command]
        self.proc = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.peak = 0
        sampler = threading.Thread(target=self._sample, daemon=True)
        sampler.start()
        self.output = self.proc.communicate(timeout=600)[0]
        sampler.join()

    def _sample(self) -> None:
        status = Path(f"/proc/{self.proc.pid}/status")
        while self.proc.poll() is None:
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("RssAnon:"):
                        self.peak = max(self.peak, int(line.split()[1]) * 1024)
            except OSError:
                return
            time.sleep(0.02)

    def line(self, tag: str) -> str:
        for line in self.output.splitlines():
            if line.startswith(tag + " "):
                return line[len(tag) + 1:]
        raise AssertionError(f"no {tag} line (exit {self.proc.returncode}):\n{self.output[-4000:]}")


@pytest.fixture(scope="module")
def unconstrained(model):
    return Child(model)


def test_peak_is_final_plus_about_two_layers(unconstrained):
    loaded = int(unconstrained.line("LOADED"))
    summary = json.loads(unconstrained.line("SUMMARY"))
    assert f"{LAYERS} MoE layer(s) on lk" in summary and "(int4 g128," in summary
    # Today's old path held every layer in bf16 before converting the first: its peak
    # exceeded the final RSS by the checkpoint's experts less what lk keeps (~1.15 GB).
    assert unconstrained.peak - loaded < 3 * LAYER_CHECKPOINT, \
        f"peak {unconstrained.peak / 2**20:.0f} MiB, loaded {loaded / 2**20:.0f} MiB"
    assert "need" in unconstrained.output and "GiB available" in unconstrained.output


def cgroup_v1_writable() -> bool:
    return os.geteuid() == 0 and os.access(CGROUP_ROOT, os.W_OK)


@pytest.mark.skipif(not cgroup_v1_writable(), reason="needs root and a writable cgroup v1 memory hierarchy")
def test_loads_under_a_limit_the_whole_checkpoint_would_exceed(model, unconstrained):
    loaded = int(unconstrained.line("LOADED"))
    # Room for the final size, two layers in bf16 and slack for the page cache; the old
    # path needs the final size plus every layer's bf16 less lk's INT4 copies.
    limit = loaded + 2 * LAYER_CHECKPOINT + 256 * 2**20
    assert limit < loaded + LAYERS * LAYER_CHECKPOINT - LAYERS * LAYER_CHECKPOINT // 4
    cgroup = CGROUP_ROOT / f"lvllm-test-{os.getpid()}"
    cgroup.mkdir()
    try:
        (cgroup / "memory.limit_in_bytes").write_text(str(limit))
        limited = Child(model, cgroup)
        assert limited.proc.returncode == 0, f"killed or failed under {limit} bytes:\n{limited.output[-3000:]}"
        assert limited.line("TOKENS") == unconstrained.line("TOKENS")
    finally:
        for _ in range(50):   # the cgroup empties once its last process has exited
            try:
                cgroup.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def test_refused_before_loading_with_the_formats_that_fit(model):
    # With two bf16 layers in flight and the model's other weights: bf16 experts need 1.88
    # GiB, INT8 1.15 GiB, INT4 0.81 GiB; the budget is 1 GiB.
    refused = Child(model, LVLLM_MOE_USE_WEIGHT="TO_DTYPE", LVLLM_MOE_RAM_BUDGET="1")
    assert refused.proc.returncode != 0
    assert "would need" in refused.output and "LVLLM_MOE_USE_WEIGHT=TO_DTYPE" in refused.output
    assert "1.00 GiB is available (LVLLM_MOE_RAM_BUDGET=1)" in refused.output
    assert "values that fit: INT4 (" in refused.output and "INT8 (" not in refused.output
    # Stopped before the first layer reached lk: no start-up line.
    assert "MoE layer(s) on lk [" not in refused.output
