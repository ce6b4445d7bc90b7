"""How fast lk takes one MoE layer's experts at load: packing, conversion and run-time
quantization, on the CPU.

    python benchmarks/bench_load.py [--experts 128 --hidden 2048 --inter 768 --repeats 3]

For each source (what vLLM's loader hands over) and stored format (what
LVLLM_MOE_USE_WEIGHT asks for), the time to build the engine, per layer, and the GB/s of
source read. The reference, measured in the same run with the same number of threads: torch
copying the same source bytes into fresh memory, page faults included, the floor any
packing pays. lk uses LK_THREADS (default: one per core but one).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from lvllm.formats import group_size
from lvllm.lk import MoEEngine, QuantizedWeights, default_runtime, quant

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_moe import to_fp8  # noqa: E402  (one definition of the benchmarks' FP8 experts)

# (source, stored format): the conversions LVLLM_MOE_USE_WEIGHT makes, docs/formats.md's table.
CASES = [
    ("bfloat16", "bfloat16"), ("bfloat16", "int8"), ("bfloat16", "int4"),
    ("fp8_e4m3", "fp8_e4m3"), ("fp8_e4m3", "bfloat16"), ("fp8_e4m3", "int8"), ("fp8_e4m3", "int4"),
    ("int4", "int4"),
]


def tensors_of(w) -> list[torch.Tensor]:
    if isinstance(w, QuantizedWeights):
        return [t for t in (w.values, w.scales, w.offsets) if t is not None]
    return [w]


def median_ms(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append((time.perf_counter() - start) * 1e3)
        del result
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--inter", type=int, default=768)
    parser.add_argument("--group-size", type=int, default=None,
                        help="INT8/INT4 group (LVLLM_MOE_QUANT_GROUP_SIZE; default: the format's own)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    runtime = default_runtime()
    torch.set_num_threads(runtime.threads)
    generator = torch.Generator().manual_seed(0)
    w13 = (torch.randn(args.experts, 2 * args.inter, args.hidden, generator=generator) / args.hidden**0.5).bfloat16()
    w2 = (torch.randn(args.experts, args.hidden, args.inter, generator=generator) / args.inter**0.5).bfloat16()
    sources = {"bfloat16": (w13, w2), "fp8_e4m3": (to_fp8(w13), to_fp8(w2)),
               "int4": tuple(quant.quantize(w, "int4", group_size("int4", args.group_size)) for w in (w13, w2))}
    print(f"lk: {runtime.describe()}; layer E {args.experts}, H {args.hidden}, I {args.inter}; "
          f"torch threads {torch.get_num_threads()}")
    print("\n| source | stored | ms/layer | source GB/s | copy ms | copy GB/s | vs copy |\n|---|---|---:|---:|---:|---:|---:|")
    rows = []
    for source, stored in CASES:
        s13, s2 = sources[source]
        source_tensors = tensors_of(s13) + tensors_of(s2)
        nbytes = sum(t.numel() * t.element_size() for t in source_tensors)
        kwargs = {} if stored == source else {"weight_format": stored, "group_size": args.group_size}
        build_ms = median_ms(lambda: MoEEngine(s13, s2, "silu", runtime=runtime, **kwargs), args.repeats)
        copy_ms = median_ms(lambda: [torch.empty_like(t).copy_(t) for t in source_tensors], args.repeats)
        row = dict(source=source, stored=stored, ms=build_ms, source_gbs=nbytes / build_ms / 1e6,
                   copy_ms=copy_ms, copy_gbs=nbytes / copy_ms / 1e6, vs_copy=copy_ms / build_ms)
        rows.append(row)
        print(f"| {source} | {stored} | {build_ms:.0f} | {row['source_gbs']:.1f} | {copy_ms:.0f} | "
              f"{row['copy_gbs']:.1f} | {row['vs_copy']:.2f}x |")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(dict(lk=runtime.describe(), args=vars(args), rows=rows), out, indent=2)


if __name__ == "__main__":
    main()
