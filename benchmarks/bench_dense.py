#!/usr/bin/env python3
"""Dense layers: lk's LinearEngine against what vLLM's CPU build multiplies them with.

The reference is vLLM's own choice for this CPU: a linear module's weight handed to
``vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm`` exactly as vLLM's
``UnquantizedLinearMethod`` does, then its ``cpu_linear`` called (oneDNN where it builds a
kernel for the dtype, its small-GEMM kernel for small weights, else torch's F.linear; the
path taken is printed). Shapes: Qwen3-30B-A3B's attention (qkv 2048 -> 5120, o 4096 ->
2048), router (2048 -> 128) and LM head (2048 -> 151936), bf16. Rows 1, 4, 16 (decode
batches) and 128, 512 (prefill). Several copies of each weight rotate, so no call finds
its weight in cache. Both run on the same OpenMP threads (torch's, on --threads cores), in
--rounds alternating rounds (vLLM's calls, then lk's); "lk vs vLLM" is the median over rounds
of the two rounds' median times. The read bandwidth is lk's probe, measured in the same run.

    python benchmarks/bench_dense.py
    python benchmarks/bench_dense.py --rows 1,16 --shapes qkv,lm_head --dtype float16
"""

from __future__ import annotations

import argparse
import os
import statistics

import harness

SHAPES = {"qkv": (5120, 2048), "o": (2048, 4096), "router": (128, 2048), "lm_head": (151936, 2048)}
COPIES_BYTES = 256 << 20   # at least this many bytes of weight copies per shape


def vllm_linear(weight):
    """The module vLLM's CPU dispatch has prepared for `weight`, and the path it took."""
    import torch
    from vllm.model_executor.layers import utils

    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    utils.dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
    names = getattr(getattr(layer.cpu_linear, "__code__", None), "co_names", ())
    path = ("oneDNN" if "onednn_mm" in names else "small-GEMM kernel" if "weight_packed_linear_cpu" in names
            else "zentorch" if "zentorch_linear_unary" in names else "torch F.linear")
    return layer, path


def alternating(reference, lk, calls: int, warmups: int, rounds: int) -> tuple[float, float, float]:
    """(vLLM's median seconds, lk's, the median over rounds of vLLM's round median over lk's),
    after ``warmups`` untimed calls of each."""
    harness.time_calls(reference, 0, warmups)
    harness.time_calls(lk, 0, warmups)
    per_round = max(1, calls // rounds)
    times = harness.alternate({"vllm": lambda: harness.time_calls(reference, per_round),
                               "lk": lambda: harness.time_calls(lk, per_round)}, rounds)
    ratio = harness.paired_ratio(zip(times["lk"], times["vllm"]), statistics.median, higher_is_better=False)
    vllm_s, lk_s = (statistics.median(t for r in times[name] for t in r) for name in ("vllm", "lk"))
    return vllm_s, lk_s, ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"of {', '.join(SHAPES)}")
    parser.add_argument("--rows", default="1,4,16,128,512")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--threads", type=int, default=len(harness.allowed_cpus()))
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of vLLM's calls and lk's")
    args = parser.parse_args()
    cpus = harness.allowed_cpus()[: args.threads]
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", harness.cpus_text(cpus))
    print(harness.header("bench_dense", harness.machine(cpus)), flush=True)

    import torch
    from vllm.platforms import current_platform

    from lvllm import _lk
    from lvllm.lk import make_runtime
    from lvllm.lk.linear import LinearEngine

    current_platform.import_kernels()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    runtime = make_runtime(threads=args.threads, workers="OPENMP")
    bandwidth = harness.read_bandwidth_gbs(args.threads, 256 << 20, 5)
    print(f"{_lk.best_isa()} ({runtime.describe()}), torch {torch.__version__}, {args.dtype}, "
          f"read bandwidth {bandwidth:.1f} GB/s, {args.rounds} alternating rounds")
    print("\n".join(harness.table_head(["layer", "N x K", "rows", "vLLM's path", "vLLM ms", "lk ms", "lk vs vLLM",
                                        "lk GB/s (% of read)", "lk GFLOP/s"])))
    generator = torch.Generator().manual_seed(0)
    for shape in args.shapes.split(","):
        outputs, inputs = SHAPES[shape]
        weight_bytes = outputs * inputs * dtype.itemsize
        copies = max(1, min(8, COPIES_BYTES // weight_bytes + 1))
        weights = [(torch.randn(outputs, inputs, generator=generator) / inputs ** 0.5).to(dtype) for _ in range(copies)]
        engines = [LinearEngine(w, runtime=runtime) for w in weights]
        modules, path = zip(*(vllm_linear(w.clone()) for w in weights))
        del weights
        for rows in map(int, args.rows.split(",")):
            x = torch.randn(rows, inputs, generator=generator).to(dtype)

            def reference(i):
                module = modules[i % copies]
                module.cpu_linear(x, module.weight, None)

            def lk(i):
                engines[i % copies].forward(x)

            large = rows * outputs * inputs > 1e11   # F.linear takes seconds per call
            calls, warmups = (2, 1) if large else (20, 3)
            vllm_s, lk_s, lk_vs_vllm = alternating(reference, lk, calls, warmups, args.rounds)
            gbs = weight_bytes / lk_s / 1e9
            print(harness.table_row([
                shape, f"{outputs} x {inputs}", rows, path[0], f"{vllm_s * 1e3:.3f}", f"{lk_s * 1e3:.3f}",
                harness.ratio_cell(lk_vs_vllm), f"{gbs:.1f} ({gbs / bandwidth:.0%})",
                f"{2 * rows * outputs * inputs / lk_s / 1e9:.0f}"]), flush=True)
        del engines, modules


if __name__ == "__main__":
    main()
