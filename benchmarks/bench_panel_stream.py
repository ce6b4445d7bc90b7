"""What the INT4 panel layout costs a decode read from DRAM (panel_stream.cpp), against the
same bytes laid out with each group's scales beside its values, and a plain read of them.

    python benchmarks/bench_panel_stream.py [--rounds 5] [--panels-per-call 128] [--threads 2]

Builds panel_stream.cpp with the system C++ compiler (-O2 -march=native) into
build/bench/, runs it, and prints each round's GB/s, the medians, and two ratios: inline
over stored (what moving the scales beside their values would give this access pattern) and
stored over sequential (how much of the call-sized ceiling the stored layout reaches). lk's
own read-bandwidth probe (256 MB a thread, its best repetition) is measured before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "benchmarks" / "panel_stream.cpp"
BINARY = ROOT / "build" / "bench" / "panel_stream"


def build() -> Path:
    if not BINARY.exists() or BINARY.stat().st_mtime < SOURCE.stat().st_mtime:
        BINARY.parent.mkdir(parents=True, exist_ok=True)
        compiler = os.environ.get("CXX", "c++")
        # GCC 12's own AVX-512 headers trip -Wmaybe-uninitialized, as in cmake/LkSources.cmake.
        subprocess.run([compiler, "-O2", "-march=native", "-std=c++20", "-pthread", "-Wall", "-Wextra", "-Werror",
                        "-Wno-maybe-uninitialized", str(SOURCE), "-o", str(BINARY)], check=True)
    return BINARY


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--panels-per-call", type=int, default=128,
                        help="panels (16 columns x 2048 inputs, 18 KB) per thread per call; 128: a qkv share")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    binary = build()
    print(harness.header("bench_panel_stream", harness.machine(range(args.threads))))
    command = [str(binary), "--rounds", str(args.rounds), "--threads", str(args.threads),
               "--panels-per-call", str(args.panels_per_call)]
    run, (probe_before, probe_after) = harness.bracketed(
        lambda: subprocess.run(command, check=True, capture_output=True, text=True),
        lambda: harness.read_bandwidth_gbs(args.threads, 256 << 20, 5))
    print(run.stdout, end="")
    rows = [line.split()[1:] for line in run.stdout.splitlines()[1:]]
    stored, inline, sequential = (statistics.median(float(r[i]) for r in rows) for i in range(3))
    print(f"medians GB/s: stored {stored:.1f}, inline {inline:.1f}, sequential {sequential:.1f}; "
          f"inline / stored {inline / stored:.2f}x, stored / sequential {stored / sequential:.0%}; "
          f"lk's read probe {probe_before:.0f} GB/s before, {probe_after:.0f} after")


if __name__ == "__main__":
    main()
