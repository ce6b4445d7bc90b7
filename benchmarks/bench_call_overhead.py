"""lk's fixed cost per forward: a layer so small that the call is all there is.

    python benchmarks/bench_call_overhead.py [--calls 2000]

Times back-to-back submit+wait of a 1-token forward on 8 experts of H 256, I 128 through the
native engine (no Python argument checks), through lvllm.lk.MoEEngine.forward and through
the custom op torch.ops.lvllm.lk_moe_forward (what the CPU build's MoE layers call), for
each thread count up to the usable cores, on lk's own pool with idle workers spinning
(LK_POWER_SAVING=0) and sleeping (1), and on the calling thread's OpenMP team
(LK_WORKERS=OPENMP, what vLLM's CPU worker uses). Decode of a real model pays this once per
MoE layer and token.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from lvllm.lk import MoEEngine, make_runtime


def per_call_us(call, calls: int) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    experts, hidden, inter = 8, 256, 128
    w13 = torch.randn(experts, 2 * inter, hidden).bfloat16()
    w2 = torch.randn(experts, hidden, inter).bfloat16()
    x, ids, weights = torch.randn(1, hidden).bfloat16(), torch.tensor([[0, 1]]), torch.rand(1, 2)
    out = torch.empty_like(x)
    print("threads  workers          native us/call  MoEEngine.forward us/call  custom op us/call")
    for threads in range(1, len(os.sched_getaffinity(0)) + 1):
        torch.set_num_threads(threads)
        for workers, power_saving, label in (("OWN", False, "own, spinning"), ("OWN", True, "own, sleeping"),
                                             ("OPENMP", False, "OpenMP team")):
            runtime = make_runtime(threads=threads, power_saving=power_saving, workers=workers)
            engine = MoEEngine(w13, w2, "silu", runtime=runtime)
            native = engine._native
            native_args = (x.data_ptr(), 2, 1, ids.data_ptr(), True, 2, weights.data_ptr(), 0, out.data_ptr(), 2)
            per_call_us(lambda: native.wait(native.submit(*native_args)), 200)
            raw = per_call_us(lambda: native.wait(native.submit(*native_args)), args.calls)
            wrapped = per_call_us(lambda: engine.forward(x, ids, weights, out), args.calls)
            op = per_call_us(lambda: torch.ops.lvllm.lk_moe_forward(x, ids, weights, engine.engine_id), args.calls)
            print(f"{threads:>7}  {label:<15}  {raw:>14.1f}  {wrapped:>25.1f}  {op:>17.1f}")


if __name__ == "__main__":
    main()
