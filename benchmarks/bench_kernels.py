"""What lk's panel kernels cost in arithmetic alone: one core, panel in cache.

    python benchmarks/bench_kernels.py [--isa AVX2] [--formats bfloat16,fp8_e4m3,...]
                                       [--rows 1,2,3,6] [--depth 2048] [--seconds 0.3] [--cpu N]
                                       [--bf16-inputs] [--against OTHER_LK_SO [--rounds 7]]

Whole-layer timings (bench_moe.py) are bound by memory in decode and move 20-30% between
runs on a shared machine; this isolates the part a kernel change can move. For each weight
format and row count it times the engine's multiplication of that many activation rows by
one random panel of 16 columns x depth inputs (widening the panel first where prefill
does; and, where the ISA has it, the gate+up pair reading two panels side by side),
pinned to one CPU, and prints:

* ns per panel row (16 weights) and the weight bytes one core could consume at that rate
  (decode: compare with the machine's read bandwidth per core);
* GFLOP/s and % of one core's fp32 FMA peak, measured in the same run (prefill passes).

The activations are random fp32 values; --bf16-inputs takes them on the bf16 grid, as a bf16
model's inputs to gate and up are, which the packed float kernels (AVX512_BF16, AMX)
multiply as one bf16 plane instead of two.

--against times a second build of the engine module (the lvllm/_lk*.so of another
checkout, e.g. a `git worktree` of the commit before a kernel change) in the same run:
each round times every case in a fresh process per build, the builds' order alternating
from round to round, and the table gives each build's fastest round and their ratio,
then every round's ratio. One process per build because the module cannot be loaded
twice into one; the fastest round because on a shared machine a round that another
tenant preempts only reads slower.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys


def load_engine_module(path: str | None):
    """The lvllm._lk built at `path`, or the installed one. Python keeps one extension module
    per name and process: once the installed lvllm._lk is imported, loading another file
    under that name gives the installed module back, so a process imports only the one
    it times."""
    if path is None:
        from lvllm import _lk

        return _lk
    spec = importlib.util.spec_from_file_location("lvllm._lk", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cases(lk, isa: str, formats: list[str], rows_list: list[int]) -> list[tuple[str, int, bool]]:
    """(format, rows, side by side) in table order: the gate+up pair where the ISA reads one."""
    out = []
    for fmt in formats:
        shapes = [(rows, False) for rows in rows_list] + [
            (rows, True) for rows in rows_list if lk.kernel_reads_two_panels(isa, fmt, rows)]
        out += [(fmt, rows, pair) for rows, pair in sorted(shapes)]
    return out


def compare(args, formats: list[str], rows_list: list[int]) -> int:
    """Both builds, one fresh process per build and round (module docstring)."""
    this = os.path.abspath(args.module or importlib.util.find_spec("lvllm._lk").origin)
    other = os.path.abspath(args.against)
    common = [sys.executable, os.path.abspath(__file__), "--emit-json", "--isa", args.isa, "--formats", args.formats,
              "--rows", args.rows, "--depth", str(args.depth), "--seconds", str(args.seconds), "--cpu", str(args.cpu)]
    if args.bf16_inputs:
        common.append("--bf16-inputs")
    timings: dict[str, list[dict]] = {this: [], other: []}
    for round_index in range(args.rounds):
        for module in ((this, other) if round_index % 2 == 0 else (other, this)):
            result = subprocess.run(common + ["--module", module], check=True, capture_output=True, text=True)
            timings[module].append(json.loads(result.stdout))
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(f"bench_kernels  {stamp}  {' '.join(sys.argv)}")
    print(f"A: {this}\nB: {other}\n{args.rounds} rounds, ns per panel row, CPU {args.cpu}, ISA {args.isa}, "
          f"panel depth {args.depth}")
    print()
    print("| format | rows | panels | A fastest | B fastest | B / A | B / A by round |")
    print("|---|---|---|---|---|---|---|")
    # A build may read panels side by side where the other does not: such cases get a "-".
    keys = list(timings[this][0]) + [key for key in timings[other][0] if key not in timings[this][0]]
    for key in keys:
        fmt, rows, pair = key.split(":")
        a = [t[key] for t in timings[this] if key in t]
        b = [t[key] for t in timings[other] if key in t]
        shape = f"| {fmt} | {rows} | {'2 side by side' if pair == 'pair' else '1'} |"
        if not (a and b):
            print(f"{shape} {f'{min(a):.3f}' if a else '-'} | {f'{min(b):.3f}' if b else '-'} | - | - |")
            continue
        by_round = " ".join(f"{y / x:.2f}" for x, y in zip(a, b))
        print(f"{shape} {min(a):.3f} | {min(b):.3f} | {min(b) / min(a):.3f} | {by_round} |")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--isa", help="kernel ISA (default: the best this CPU runs)")
    parser.add_argument("--formats", default="bfloat16,float16,fp8_e4m3,int8,int4",
                        help="comma list of weight formats (float32, float16, bfloat16, int8, int4, fp8_e4m3)")
    parser.add_argument("--rows", default="1,2,3,6", help="comma list of activation row counts")
    parser.add_argument("--depth", type=int, default=2048, help="panel depth (inputs)")
    parser.add_argument("--seconds", type=float, default=0.3, help="timing per case")
    parser.add_argument("--cpu", type=int, default=max(os.sched_getaffinity(0)),
                        help="CPU to pin to (default: the last allowed one)")
    parser.add_argument("--module", help="time the lvllm._lk built at this path instead of the installed one")
    parser.add_argument("--against", help="also time the lvllm._lk built at this path, alternating (module docstring)")
    parser.add_argument("--rounds", type=int, default=7, help="rounds per build with --against")
    parser.add_argument("--bf16-inputs", action="store_true",
                        help="activations on the bf16 grid (a bf16 model's inputs to gate and up)")
    parser.add_argument("--emit-json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for option, path in (("--module", args.module), ("--against", args.against)):
        if path is not None and not os.path.isfile(path):
            parser.error(f"{option} {path}: no such file; give the lvllm/_lk*.so of a built checkout")
    lk = load_engine_module(args.module)
    args.isa = (args.isa or lk.best_isa()).upper()

    formats = args.formats.split(",")
    unknown = [f for f in formats if f not in lk.format_names()]
    if unknown:
        parser.error(f"--formats: unknown {unknown}; valid: {lk.format_names()}")
    rows_list = [int(r) for r in args.rows.split(",")]
    for fmt in formats:
        try:
            most = lk.kernel_chunk_rows(args.isa, fmt)
        except ValueError as error:
            parser.error(f"--isa {args.isa}: {error}")
        beyond = [rows for rows in rows_list if not 1 <= rows <= most]
        if beyond:
            parser.error(f"--rows {beyond}: {fmt} on {args.isa} takes 1..{most} rows (the engine's chunk)")
    if args.cpu not in os.sched_getaffinity(0):
        parser.error(f"--cpu {args.cpu}: not among the allowed CPUs {sorted(os.sched_getaffinity(0))}")
    if args.against:
        if args.rounds < 1:
            parser.error(f"--rounds {args.rounds}: give at least 1")
        return compare(args, formats, rows_list)
    cpu = args.cpu
    os.sched_setaffinity(0, {cpu})
    # Passed only when asked for, so that --against still times builds older than the option.
    inputs = {"bf16_inputs": True} if args.bf16_inputs else {}
    if args.emit_json:
        print(json.dumps({f"{fmt}:{rows}:{'pair' if pair else 'one'}": min(
            lk.measure_kernel_ns_per_panel_row(args.isa, fmt, rows, args.depth, pair, args.seconds / 3, **inputs)
            for _ in range(3))
            for fmt, rows, pair in cases(lk, args.isa, formats, rows_list)}))
        return 0
    peak = lk.measure_fma_peak_gflops(1)

    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(f"bench_kernels  {stamp}  {' '.join(sys.argv)}")
    print(f"machine: {platform.processor() or platform.machine()}, pinned to CPU {cpu}, ISA {args.isa}, "
          f"panel depth {args.depth}, one core's fp32 FMA peak {peak:.1f} GFLOP/s"
          f"{', activations on the bf16 grid' if args.bf16_inputs else ''}")
    print()
    print("| format | rows | panels | ns per panel row | weight GB/s per core | GFLOP/s | % FMA peak |")
    print("|---|---|---|---|---|---|---|")
    for fmt, rows, pair in cases(lk, args.isa, formats, rows_list):
        row_bytes = lk.kernel_panel_bytes(fmt, args.depth) / args.depth
        ns = lk.measure_kernel_ns_per_panel_row(args.isa, fmt, rows, args.depth, pair, args.seconds, **inputs)
        gflops = 2 * rows * 16 / ns
        print(f"| {fmt} | {rows} | {'2 side by side' if pair else '1'} | {ns:.3f} | "
              f"{row_bytes / ns:.1f} | {gflops:.1f} | {100 * gflops / peak:.0f}% |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
