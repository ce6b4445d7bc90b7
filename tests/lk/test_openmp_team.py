"""LK_WORKERS=OPENMP: the engine's jobs run on the caller's OpenMP team (torch's runtime).

Results against the float64 reference as for lk's own pool, and proof that no thread of
lk's own is started: the team is the one torch's kernels use."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from lvllm.lk import MoEEngine, QuantizedWeights, make_runtime, quant

from .helpers import SUPPORTED_ISAS, assert_close, random_experts, random_routing, reference_moe, run_and_compare


def thread_ids() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/task")}


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
@pytest.mark.parametrize("threads, numa_nodes", [(1, 0), (2, 0), (2, 3), (3, 2)])
@pytest.mark.parametrize("tokens", [1, 6, 130])
def test_float_experts_match_the_reference(runtimes, isa, threads, numa_nodes, tokens):
    # Three threads on a two-core machine: the team grows past the cores and still computes.
    experts, hidden, intermediate, k = 9, 16 * 9 + 5, 16 * 5 + 3, 4
    w13, w2 = random_experts(experts, hidden, intermediate, torch.bfloat16, seed=tokens)
    runtime = runtimes(threads=threads, isa=isa, numa_nodes=numa_nodes, workers="OPENMP")
    assert (runtime.workers, runtime.threads) == ("OPENMP", threads)
    engine = MoEEngine(w13, w2, runtime=runtime)
    x = torch.randn(tokens, hidden, dtype=torch.bfloat16)
    ids, weights = random_routing(tokens, experts, k, seed=tokens + 1)
    assert_close(engine.forward(x, ids, weights), reference_moe(w13, w2, x, ids, weights), torch.bfloat16)


@pytest.mark.parametrize("weight_format", ["int8", "int4"])
@pytest.mark.parametrize("tokens", [1, 70])
def test_quantized_experts_match_the_reference(runtimes, weight_format, tokens):
    # Integer formats quantize gate/up's output per group inside the job: the task that
    # completes a group must see every other task's values on a team as on the pool.
    experts, hidden, intermediate = 6, 128, 96
    w13, w2 = random_experts(experts, hidden, intermediate, torch.float32, seed=3)
    engine = MoEEngine(w13, w2, weight_format=weight_format, group_size=32,
                       runtime=runtimes(numa_nodes=2, workers="OPENMP"))
    references = [quant.quantize(w, weight_format, 32) for w in (w13, w2)]
    if weight_format == "int8":
        references = [quant.dequantize(r) for r in references]
    run_and_compare(engine, *references, tokens=tokens, seed=4)


def test_no_thread_of_its_own(runtimes):
    """The team is torch's: once torch has run a parallel op, lk starts no thread, and the
    description names the OpenMP runtime it found."""
    torch.ones(1 << 20).sum()  # torch's team exists from here on
    before = thread_ids()
    runtime = runtimes(threads=torch.get_num_threads(), workers="OPENMP")
    w13, w2 = random_experts(8, 64, 32, torch.float32, seed=5)
    engine = MoEEngine(w13, w2, runtime=runtime)
    x = torch.randn(40, 64)
    ids, weights = random_routing(40, 8, 2, seed=5)
    for _ in range(3):
        assert_close(engine.forward(x, ids, weights), reference_moe(w13, w2, x, ids, weights), torch.float32)
    assert thread_ids() == before
    assert "OpenMP team" in runtime.describe() and "gomp" in runtime.describe()


def test_own_pool_starts_its_threads(runtimes):
    """The check above can fail: lk's own pool does start threads."""
    before = thread_ids()
    runtime = make_runtime(threads=2, workers="OWN")
    assert len(thread_ids() - before) == 2 and runtime.workers == "OWN"


def test_from_another_python_thread(runtimes):
    w13, w2 = random_experts(5, 48, 32, torch.float32, seed=6)
    engine = MoEEngine(w13, w2, runtime=runtimes(workers="OPENMP"))
    x = torch.randn(9, 48)
    ids, weights = random_routing(9, 5, 2, seed=6)
    results = []
    thread = threading.Thread(target=lambda: results.append(engine.forward(x, ids, weights)))
    thread.start()
    thread.join()
    assert_close(results[0], reference_moe(w13, w2, x, ids, weights), torch.float32)


def test_caller_float_modes_are_kept_and_not_used():
    """FP8 subnormal weights unpack through fp32 denormals: right on a team whose caller
    flushes denormals, and the caller's flushing is back in force afterwards."""
    experts, hidden, intermediate, group = 2, 64, 32, 32
    generator = torch.Generator().manual_seed(11)

    def subnormal_fp8(rows, cols):
        magnitude = torch.randint(1, 8, (experts, rows, cols), generator=generator, dtype=torch.uint8)
        values = magnitude.view(torch.float8_e4m3fn)
        weights = QuantizedWeights(values, torch.full((experts, rows, cols // group), 2.0**12), group)
        return weights, quant.dequantize(weights)

    (w13, w13_ref), (w2, w2_ref) = subnormal_fp8(2 * intermediate, hidden), subnormal_fp8(hidden, intermediate)
    engine = MoEEngine(w13, w2, runtime=make_runtime(threads=1, workers="OPENMP"))
    tiny = torch.tensor([1e-40])
    assert torch.set_flush_denormal(True)
    try:
        run_and_compare(engine, w13_ref, w2_ref, tokens=3, seed=3)
        assert (tiny * 1.0).item() == 0.0  # still flushing on the calling thread
    finally:
        torch.set_flush_denormal(False)
    assert (tiny * 1.0).item() != 0.0


_ONE_TASK_SCRIPT = """
import os, torch
from lvllm.lk import make_runtime
from lvllm.lk.linear import LinearEngine

def threads():
    return len(os.listdir("/proc/self/task"))

torch.manual_seed(0)
runtime = make_runtime(threads=2, workers="OPENMP")
x = torch.randn(1, 256, dtype=torch.bfloat16)
weights = {outputs: (torch.randn(outputs, 256) / 16).to(torch.bfloat16) for outputs in (16, 64)}
before = threads()
router = LinearEngine(weights[16], runtime=runtime)   # one panel of 16 outputs: one task a phase
out_one = router.forward(x)
after_one = threads()
wide = LinearEngine(weights[64], runtime=runtime)     # four panels, split over the two threads
out_wide = wide.forward(x)
after_wide = threads()
for out, outputs in ((out_one, 16), (out_wide, 64)):
    reference = x.double() @ weights[outputs].double().T
    error = (out.double() - reference).abs().max().item()
    assert error <= 0.02 * reference.abs().max().item(), (outputs, error)
print(before, after_one, after_wide)
"""


def test_one_task_jobs_run_on_the_calling_thread():
    """A job with one task a phase (a small router at one token) runs on the calling thread:
    in a fresh process it computes the layer without starting the OpenMP team, and a job of
    two tasks does start it (so the check can fail); both against float64."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, "-c", _ONE_TASK_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    before, after_one, after_wide = map(int, result.stdout.split()[-3:])
    assert after_one == before
    assert after_wide == before + 1
