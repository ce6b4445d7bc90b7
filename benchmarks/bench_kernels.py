"""What lk's panel kernels cost in arithmetic alone: one core, panel in cache.

    python benchmarks/bench_kernels.py [--isa AVX2] [--formats bfloat16,fp8_e4m3,...]
                                       [--rows 1,2,3,6] [--depth 2048] [--seconds 0.3] [--cpu N]

Whole-layer timings (bench_moe.py) are bound by memory in decode and move 20-30% between
runs on a shared machine; this isolates the part a kernel change can move. For each weight
format and row count it times the engine's multiplication of that many activation rows by
one random panel of 16 columns x depth inputs (widening the panel first where prefill
does; and, where the ISA has it, the gate+up pair reading two panels side by side),
pinned to one CPU, and prints:

* ns per panel row (16 weights) and the weight bytes one core could consume at that rate
  (decode: compare with the machine's read bandwidth per core);
* GFLOP/s and % of one core's fp32 FMA peak, measured in the same run (prefill passes).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

from lvllm import _lk


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--isa", default=_lk.best_isa(), help="kernel ISA (default: the best this CPU runs)")
    parser.add_argument("--formats", default="bfloat16,float16,fp8_e4m3,int8,int4",
                        help="comma list of weight formats (" + ", ".join(_lk.format_names()) + ")")
    parser.add_argument("--rows", default="1,2,3,6", help="comma list of activation row counts")
    parser.add_argument("--depth", type=int, default=2048, help="panel depth (inputs)")
    parser.add_argument("--seconds", type=float, default=0.3, help="timing per case")
    parser.add_argument("--cpu", type=int, default=max(os.sched_getaffinity(0)),
                        help="CPU to pin to (default: the last allowed one)")
    args = parser.parse_args()
    args.isa = args.isa.upper()

    formats = args.formats.split(",")
    unknown = [f for f in formats if f not in _lk.format_names()]
    if unknown:
        parser.error(f"--formats: unknown {unknown}; valid: {_lk.format_names()}")
    rows_list = [int(r) for r in args.rows.split(",")]
    if args.cpu not in os.sched_getaffinity(0):
        parser.error(f"--cpu {args.cpu}: not among the allowed CPUs {sorted(os.sched_getaffinity(0))}")
    cpu = args.cpu
    os.sched_setaffinity(0, {cpu})
    peak = _lk.measure_fma_peak_gflops(1)

    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(f"bench_kernels  {stamp}  {' '.join(sys.argv)}")
    print(f"machine: {platform.processor() or platform.machine()}, pinned to CPU {cpu}, ISA {args.isa}, "
          f"panel depth {args.depth}, one core's fp32 FMA peak {peak:.1f} GFLOP/s")
    print()
    print("| format | rows | panels | ns per panel row | weight GB/s per core | GFLOP/s | % FMA peak |")
    print("|---|---|---|---|---|---|---|")
    for fmt in formats:
        pair_rows = _lk.kernel_pair_rows(args.isa, fmt)
        row_bytes = _lk.kernel_panel_bytes(fmt, args.depth) / args.depth
        shapes = [(rows, False) for rows in rows_list]
        shapes += [(rows, True) for rows in rows_list if rows <= pair_rows]
        for rows, pair in sorted(shapes):
            ns = _lk.measure_kernel_ns_per_panel_row(args.isa, fmt, rows, args.depth, pair, args.seconds)
            gflops = 2 * rows * 16 / ns
            print(f"| {fmt} | {rows} | {'2 side by side' if pair else '1'} | {ns:.3f} | "
                  f"{row_bytes / ns:.1f} | {gflops:.1f} | {100 * gflops / peak:.0f}% |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
