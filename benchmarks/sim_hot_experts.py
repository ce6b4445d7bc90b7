"""Hot experts against whole layers for the same GPU memory, simulated (lvllm/hot_experts.py):
each layer's hottest experts on the GPU, or the first layers whole, and what each leaves the
host to read per decode token.

    python benchmarks/sim_hot_experts.py [--skews 0,0.5,1.0] [--format int4] [--stats FILE]

Shape: Qwen3-30B-A3B (48 MoE layers of 128 experts, top-8, H 2048, I 768) unless --stats gives
measured counts (LVLLM_EXPERT_STATS' file: its layers and experts; --layers etc. still give the
expert's size). Synthetic counts: every token picks top-k distinct experts per layer, drawn by
Zipf weights of --skew (rank^-skew, each layer its own ranking; 0 is uniform). The reference of
each row is the whole-layer split of the same GPU memory; the host's read bandwidth is lk's
probe, measured in this run. A model of a placement lvllm does not run yet.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from lvllm import expert_stats, formats, hot_experts  # noqa: E402

GIB = 1 << 30


def expert_bytes(hidden: int, intermediate: int, fmt: str) -> int:
    """One expert's three matrices as lk holds them (lk's own planner)."""
    from lvllm import _lk

    name = {"bf16": "bfloat16", "int8": "int8", "int4": "int4"}[fmt]
    found = formats.FORMATS[name]
    group = found.default_group if found.quantized else 0
    return _lk.planned_weight_bytes(1, hidden, intermediate, found.code, group, 1)


def table(counts: dict[int, list[int]], args, nbytes: int, bandwidth: float) -> list[str]:
    experts = max(len(c) for c in counts.values())
    slots = sorted({max(1, round(share * experts)) for share in args.slot_shares})
    rows = []
    for split in hot_experts.splits(counts, args.top_k, nbytes, bandwidth, tuple(slots)):
        rows.append((f"{split.slots} ({split.slots / experts:.0%})", f"{split.gpu_bytes / GIB:.1f}",
                     f"{split.hot_share:.0%}", f"{split.hot_tok_s:.1f}",
                     f"{split.layers}", f"{split.layer_share:.0%}", f"{split.layer_tok_s:.1f}",
                     harness.ratio_cell(split.hot_tok_s / split.layer_tok_s)))
    return harness.markdown_table(
        ["slots a layer", "GPU GiB", "hot experts: picks on GPU", "decode bound tok/s",
         "whole layers", "picks on GPU", "decode bound tok/s", "hot / whole"], rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=768)
    parser.add_argument("--format", choices=("bf16", "int8", "int4"), default="int4")
    parser.add_argument("--skews", default="0,0.5,1.0", help="Zipf exponents of the synthetic counts")
    parser.add_argument("--tokens", type=int, default=20000, help="synthetic tokens per layer")
    parser.add_argument("--slot-shares", type=float, nargs="+", default=[0.05, 0.10, 0.25, 0.50])
    parser.add_argument("--stats", type=Path, help="an LVLLM_EXPERT_STATS file: its counts instead")
    parser.add_argument("--bandwidth", type=float, help="host read bandwidth, GB/s (default: measured)")
    args = parser.parse_args(argv)

    facts = harness.machine()
    print(harness.header("sim_hot_experts", facts))
    bandwidth = args.bandwidth or harness.read_bandwidth_gbs()
    nbytes = expert_bytes(args.hidden, args.intermediate, args.format)
    print(f"expert: H {args.hidden}, I {args.intermediate}, {args.format}: {nbytes / (1 << 20):.2f} MiB; "
          f"top-{args.top_k}; host read bandwidth {bandwidth:.1f} GB/s"
          f" ({'given' if args.bandwidth else 'lk probe'})")
    if args.stats:
        data = expert_stats.read(args.stats)
        if data is None:
            parser.error(f"--stats: {args.stats} does not exist")
        counts = expert_stats.layer_totals(data)
        print(f"\n{args.stats}: {len(counts)} layers, {json.dumps(data.get('model', {}))}")
        print("\n".join(table(counts, args, nbytes, bandwidth)))
        return 0
    for skew in (float(s) for s in args.skews.split(",")):
        counts = hot_experts.synthetic_counts(args.layers, args.experts, args.top_k, skew, args.tokens)
        per_layer, share = expert_stats.hot_share(counts)
        print(f"\nskew {skew:g}: {args.layers} layers x {args.experts} experts, {args.tokens} tokens; "
              f"the hottest {per_layer} experts of a layer take {share:.0%} of its picks")
        print("\n".join(table(counts, args, nbytes, bandwidth)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
