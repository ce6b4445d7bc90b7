#!/usr/bin/env python3
"""Serving benchmark: lk on vs vLLM's own CPU MoE, same machine, same run.

For each model, starts `vllm serve` twice on 127.0.0.1 (LVLLM_MOE_NUMA_ENABLED=0, then 1)
with the same cores (VLLM_CPU_OMP_THREADS_BIND), and measures over streamed completions:

  TTFT      time from request to first streamed token (prompt of --prompt-tokens)
  decode    tokens/s of one stream after its first token (--concurrency streams at once;
            the aggregate is the sum over streams)
  RSS       resident memory of the server's whole process tree after the run

Models (built with examples/tiny/build_tiny_model.py, cached under --models-dir):
  tiny         the tests' tiny Qwen3-MoE (H 128, 8 experts)
  qwen3-30b    4 layers with Qwen3-30B-A3B's layer shapes (H 2048, 128 experts of I 768,
               top-8, 32 query / 4 KV heads of 128), bf16, small vocabulary: ~4.9 GB

    python benchmarks/bench_serve.py                      # both models, eager
    python benchmarks/bench_serve.py --models tiny --compiled --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from lvllm._vllm_cli import command_line

ROOT = Path(__file__).resolve().parents[1]
BUILDER = ROOT / "examples" / "tiny" / "build_tiny_model.py"

MODELS = {
    "tiny": ["--family", "qwen3_moe"],
    "qwen3-30b": ["--family", "qwen3_moe", "--dtype", "bfloat16", "--num-layers", "4",
                  "--hidden-size", "2048", "--moe-intermediate-size", "768",
                  "--num-experts", "128", "--top-k", "8", "--num-heads", "32",
                  "--num-kv-heads", "4", "--head-dim", "128"],
}
DTYPE = {"tiny": "float32", "qwen3-30b": "bfloat16"}


def build(models_dir: Path, name: str) -> Path:
    out = models_dir / name
    if not (out / "config.json").exists():
        print(f"building {name} in {out} ...", flush=True)
        subprocess.run([sys.executable, str(BUILDER), "--out", str(out), *MODELS[name]],
                       check=True)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss(pid: int) -> int:
    import psutil

    total = 0
    try:
        proc = psutil.Process(pid)
        for p in [proc, *proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
    except psutil.NoSuchProcess:
        pass
    return total


class Server:
    def __init__(self, model: Path, dtype: str, lk: bool, args, log: Path):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LVLLM_", "LK_"))}
        cores = args.cores or f"0-{os.cpu_count() - 1}"
        env.update({
            "LVLLM_MOE_NUMA_ENABLED": "1" if lk else "0",
            "VLLM_CPU_OMP_THREADS_BIND": cores,
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
            "VLLM_DISABLE_COMPILE_CACHE": "1",
        })
        command = [*command_line(), "serve", str(model), "--host", "127.0.0.1",
                   "--port", str(self.port), "--dtype", dtype, "--served-model-name", "bench",
                   "--max-model-len", str(args.prompt_tokens + args.decode_tokens + 64),
                   "--max-num-seqs", str(max(args.concurrency, 1)),
                   "--no-enable-prefix-caching"]
        if not args.compiled:
            command.append("--enforce-eager")
        self.log = log
        self.proc = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        deadline = time.time() + args.startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{log.read_text()[-3000:]}")
            try:
                if requests.get(f"{self.base}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError(f"server not up in time:\n{log.read_text()[-3000:]}")
            time.sleep(1)

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def stream_one(base: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    start = time.perf_counter()
    times = []
    with requests.post(f"{base}/v1/completions", json=body, stream=True, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line or line == b"data: [DONE]":
                continue
            chunk = json.loads(line.decode().removeprefix("data: "))
            # A token whose text is not complete yet (a partial UTF-8 byte sequence of a
            # random model) still arrives as a chunk: count chunks, not text.
            if chunk.get("choices"):
                times.append(time.perf_counter())
    ttft = times[0] - start
    decode = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")
    return {"ttft_s": ttft, "decode_tok_s": decode, "chunks": len(times)}


def measure(server: Server, args) -> dict:
    words = "the engine streams the weights in host memory before the next step ".split()
    prompt = " ".join(words[i % len(words)] for i in range(args.prompt_tokens))
    stream_one(server.base, prompt, 4)  # warm-up
    runs = []
    for _ in range(args.repeats):
        with ThreadPoolExecutor(args.concurrency) as pool:
            runs.append(list(pool.map(lambda _: stream_one(server.base, prompt,
                                                           args.decode_tokens),
                                      range(args.concurrency))))
    per_stream = [r for run in runs for r in run]
    return {
        "ttft_s": statistics.median(r["ttft_s"] for r in per_stream),
        "decode_tok_s_per_stream": statistics.median(r["decode_tok_s"] for r in per_stream),
        "decode_tok_s_total": statistics.median(sum(r["decode_tok_s"] for r in run)
                                                for run in runs),
        "rss_gib": tree_rss(server.proc.pid) / 2**30,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
    parser.add_argument("--models-dir", type=Path,
                        default=Path(tempfile.gettempdir()) / "lvllm-bench-models")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compiled", action="store_true",
                        help="torch.compile (default: --enforce-eager)")
    parser.add_argument("--cores", default="",
                        help="VLLM_CPU_OMP_THREADS_BIND for both runs (default: all cores)")
    parser.add_argument("--startup-timeout", type=int, default=900)
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args(argv)

    results = []
    for name in args.models:
        model = build(args.models_dir, name)
        for lk in (False, True):
            label = "lk" if lk else "vllm-cpu-moe"
            log = args.models_dir / f"{name}-{label}.log"
            print(f"[{name}] {label}: starting server (log {log})", flush=True)
            server = Server(model, DTYPE[name], lk, args, log)
            try:
                row = {"model": name, "moe": label, **measure(server, args)}
            finally:
                server.stop()
            results.append(row)
            print(json.dumps(row), flush=True)

    print(f"\n{'model':<10} {'MoE':<13} {'TTFT s':>8} {'decode tok/s':>13} "
          f"{'total tok/s':>12} {'RSS GiB':>8}")
    for r in results:
        print(f"{r['model']:<10} {r['moe']:<13} {r['ttft_s']:>8.3f} "
              f"{r['decode_tok_s_per_stream']:>13.2f} {r['decode_tok_s_total']:>12.2f} "
              f"{r['rss_gib']:>8.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
