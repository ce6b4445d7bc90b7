#!/usr/bin/env python3
"""A full-depth model larger than this machine's RAM, served with INT4 experts.

Writes a 48-layer Qwen3-30B-A3B-shaped random checkpoint (bf16: about 58 GB on disk; FP8
block-quantized experts: about 30 GB) with examples/tiny/build_tiny_model.py streaming its
shards, loads it with LVLLM_MOE_USE_WEIGHT=INT4 (each layer converted as soon as vLLM's
loader has filled it), and reports, per checkpoint:

  load       seconds to a ready LLM, and the phases vLLM logs (weights with lk's
             conversions, engine set-up, torch.compile); lk's conversions alone
  RSS        peak and final resident memory of the process (all of it, and anonymous
             memory alone: the checkpoint's pages in the page cache are the kernel's to drop)
  decode     tokens/s of one stream, against the bound the read bandwidth (lk's probe,
             measured in the same rounds) sets for the bytes a token reads: 8 INT4 experts per
             layer plus the dense weights, in bf16 or as lk holds them
  TTFT       first token of a 512-token prompt

--config lk-int4-all quantizes the dense layers to INT4 as well (LVLLM_DENSE_USE_WEIGHT), and
--llama-cpp adds llama.cpp beside it on the same cores (benchmarks/llama_cpp_anchor.py): the
checkpoint converted to GGUF Q8_0 and requantized to Q4_0 (a bf16 GGUF would not fit the disk
beside the checkpoint), timed by llama-bench; prefill tok/s is 512 / TTFT 512 on our side.

Each checkpoint (and its GGUFs) is deleted after its run (--keep keeps them).

    python benchmarks/bench_full_depth.py                   # bf16 and FP8 checkpoints
    python benchmarks/bench_full_depth.py --checkpoints bf16 --eager --json out.json
    python benchmarks/bench_full_depth.py --checkpoints fp8 --config lk-int4-all --llama-cpp
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_model  # noqa: E402  (the model builder and the offline child)
import harness  # noqa: E402
import llama_cpp_anchor  # noqa: E402

CHECKPOINTS = {"bf16": [], "fp8": ["--quantize", "fp8-block-experts"]}
GB = 1e9


def build(directory: Path, layers: int, checkpoint: str) -> tuple[Path, float]:
    out = directory / f"qwen3-30b-a3b-{layers}l-{checkpoint}"
    start = time.perf_counter()
    subprocess.run([sys.executable, str(bench_model.BUILDER), "--out", str(out), "--num-layers", str(layers),
                    *bench_model.BUILDER_ARGS, "--fast-random", *CHECKPOINTS[checkpoint]],
                   check=True, stdout=subprocess.DEVNULL)
    return out, time.perf_counter() - start


def measure(model: Path, args) -> dict:
    child = bench_model.OfflineChild(model, args.config, args)
    try:
        rounds = [child.round() for _ in range(args.rounds)]
    finally:
        child.close()
    return {"info": child.info, "rounds": rounds}


def row(checkpoint: str, result: dict) -> str:
    info, rounds = result["info"], result["rounds"]
    median = harness.median
    bytes_per_token = info["moe_bytes_per_token"] + result["dense_bytes"] - info.get("dense_bytes_saved", 0)
    decode = median(1e3 / r["decode_ms"] for r in rounds)
    bound = median(max(r["bandwidth_gbs"]) * GB / bytes_per_token for r in rounds)
    peak, loaded = info["peak_rss"], info["loaded_rss"]
    phases = ", ".join(f"{name} {seconds:.0f}" for name, seconds in info["phases_s"].items())
    return harness.table_row([
        checkpoint, f"{result['disk_bytes'] / GB:.1f}", f"{info['load_s']:.0f} ({phases})",
        f"{info['lk_convert_s']:.0f}", f"{peak['VmRSS:'] / GB:.1f} / {peak['RssAnon:'] / GB:.1f}",
        f"{loaded['VmRSS:'] / GB:.1f} / {loaded['RssAnon:'] / GB:.1f}", f"{decode:.1f}",
        f"{bound:.1f} ({bytes_per_token / GB:.2f} GB/token)", f"{decode / bound:.0%}",
        f"{median(r['ttft_512_s'] for r in rounds):.2f}"])


def llama_cpp_q4_0(model: Path, args) -> dict:
    """llama-bench on ``model`` as Q4_0, on --cores. Made from a Q8_0 GGUF; unless --keep, the
    checkpoint goes once that is written (the three do not fit a 80 GB disk together), and
    the GGUFs after the run."""
    llama = llama_cpp_anchor.LlamaCpp(args.llama_cpp_dir)
    llama.setup()
    threads = len(harness.parse_cpus(args.cores))
    try:
        llama.gguf(model, "q8_0", threads)
        if not args.keep:
            shutil.rmtree(model)
        gguf = llama.gguf(model, "q4_0", threads)
        llama.gguf_path(model, "q8_0").unlink()
        return llama.bench(gguf, args.cores, args.rounds)
    finally:
        if not args.keep:
            for fmt in llama_cpp_anchor.FORMATS:
                llama.gguf_path(model, fmt).unlink(missing_ok=True)


def llama_cpp_row(checkpoint: str, result: dict) -> str:
    theirs, rounds = result["llama.cpp"], result["rounds"]
    decode = harness.median(1e3 / r["decode_ms"] for r in rounds)
    prefill = harness.median(llama_cpp_anchor.PROMPT_TOKENS / r["ttft_512_s"] for r in rounds)
    return harness.table_row([
        checkpoint, f"{decode:.1f}", f"{theirs['decode_tok_s']:.1f}",
        harness.ratio_cell(harness.ratio(decode, theirs["decode_tok_s"])), f"{prefill:.0f}",
        f"{theirs['prefill_tok_s']:.0f}", harness.ratio_cell(harness.ratio(prefill, theirs["prefill_tok_s"])),
        f"{theirs['gguf_bytes'] / GB:.1f}"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", default="bf16,fp8", help=f"comma-separated, of {', '.join(CHECKPOINTS)}")
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="where the checkpoints are written (needs about 60 GB free)")
    parser.add_argument("--cores", default=harness.cpus_text(harness.allowed_cpus()), help="VLLM_CPU_OMP_THREADS_BIND")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--eager", action="store_true", help="--enforce-eager (default: torch.compile)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--config", default="lk-int4", choices=("lk-int4", "lk-int4-all"),
                        help="lk-int4-all: dense layers in INT4 too")
    parser.add_argument("--llama-cpp", action="store_true", help="llama.cpp's Q4_0 beside us, same cores")
    parser.add_argument("--llama-cpp-dir", type=Path, default=llama_cpp_anchor.DEFAULT_DIR)
    args = parser.parse_args(argv)
    checkpoints = harness.choices(parser, "--checkpoints", args.checkpoints, CHECKPOINTS)
    mode = "eager" if args.eager else "torch.compile"
    print(harness.header("bench_full_depth", harness.machine(harness.parse_cpus(args.cores))), flush=True)
    print(f"{args.layers} layers, {args.config}, {mode}", flush=True)
    results = {}
    for checkpoint in checkpoints:
        print(f"[{checkpoint}] writing the checkpoint ...", flush=True)
        model, build_s = build(args.dir, args.layers, checkpoint)
        try:
            disk = sum(f.stat().st_size for f in model.glob("*.safetensors"))
            print(f"[{checkpoint}] {disk / GB:.1f} GB written in {build_s:.0f} s; loading ...", flush=True)
            results[checkpoint] = {**measure(model, args), "disk_bytes": disk, "build_s": build_s,
                                   "dense_bytes": bench_model.dense_bytes_per_token(model)}
            if args.llama_cpp:
                results[checkpoint]["llama.cpp"] = llama_cpp_q4_0(model, args)
        finally:
            if not args.keep:
                shutil.rmtree(model, ignore_errors=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))

    print()
    print("\n".join(harness.table_head(["checkpoint", "on disk GB", "load s (phases)", "lk conversions s",
                                        "peak RSS GB (all / anon)", "final RSS GB (all / anon)", "decode tok/s",
                                        "bound tok/s", "of bound", "TTFT 512 s"])))
    for checkpoint, result in results.items():
        print(row(checkpoint, result))
    if args.llama_cpp:
        print(f"\n{args.config} against llama.cpp Q4_0 (llama-bench -p 512 -n 128), same cores\n")
        print("\n".join(harness.table_head(["checkpoint", "decode tok/s", "llama.cpp", "ratio", "prefill tok/s (512)",
                                            "llama.cpp", "ratio", "GGUF GB"])))
        for checkpoint, result in results.items():
            print(llama_cpp_row(checkpoint, result))


if __name__ == "__main__":
    main()
