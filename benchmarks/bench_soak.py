#!/usr/bin/env python3
"""Soak: a served model with lk on under streaming clients for minutes, as an operator runs it.

`vllm serve` (lvllm's command, LVLLM_MOE_NUMA_ENABLED=1) of the tiny model of examples/tiny
(default) or of bench_model's Qwen3-30B-A3B-shaped model with --layers layers; --clients
threads each send streaming completions back to back for --minutes: random prompts of 1-300
words, 1-128 output tokens. Of each client's requests, one in ABORT_EVERY is dropped by the
client after a few chunks (a user closing the tab) and one in MALFORMED_EVERY is malformed
(must get a 4xx, and the server must go on serving). Every SAMPLE_SECONDS the resident
memory of the server's processes (API server, engine, workers) is sampled.

It reports requests completed, aborted and rejected, errors (a valid request that did not
end with [DONE], a 5xx, a 4xx for a valid request, a malformed one accepted), output
tokens/s, request latency, and RSS over time: after the first minute (warm-up) against the
end. Last, with the clients still streaming, SIGTERM: how long the server takes to exit, its
status, and whether every open stream saw its end. The verdict line is what the results page
records: errors 0, RSS growth after warm-up under RSS_GROWTH_LIMIT, exit within 10 s.

    python benchmarks/bench_soak.py                       # tiny model, 8 clients, 10 minutes
    python benchmarks/bench_soak.py --layers 4 --minutes 30 --json soak.json
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_model  # noqa: E402  (the server and the model builder)
import harness  # noqa: E402

ABORT_EVERY = 10
MALFORMED_EVERY = 25
SAMPLE_SECONDS = 10
WARM_UP_SECONDS = 60
RSS_GROWTH_LIMIT = 0.05
SHUTDOWN_BOUND = 10.0
WORDS = ("the experts of each layer are read once per token so memory bandwidth sets the pace of "
         "decode while prefill is bound by compute and the router picks eight of many").split()
MALFORMED = (
    ({"prompt": "x", "max_tokens": -1}, "negative max_tokens"),
    ({"prompt": "x", "temperature": "hot"}, "a string temperature"),
    ({"max_tokens": 4}, "no prompt"),
    ({"prompt": "x", "model": "no-such-model"}, "an unknown model"),
)


class Tally:
    """What the clients saw, counted under one lock."""

    def __init__(self):
        self.lock = threading.Lock()
        self.completed = self.aborted = self.rejected = self.tokens = 0
        self.latencies: list[float] = []
        self.errors: list[str] = []

    def add(self, **counts) -> None:
        with self.lock:
            for name, value in counts.items():
                if name == "latency":
                    self.latencies.append(value)
                elif name == "error":
                    self.errors.append(value)
                else:
                    setattr(self, name, getattr(self, name) + value)


def stream_completion(session, base: str, rng: random.Random, abort: bool) -> tuple[int, bool]:
    """One streaming request read to its end (or dropped after 3 chunks when ``abort``):
    (chunks, whether [DONE] came)."""
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 300)))
    body = {"model": "bench", "prompt": prompt, "max_tokens": rng.randint(1, 128), "stream": True,
            "temperature": rng.choice([0.0, 0.7])}
    chunks = 0
    with session.post(f"{base}/v1/completions", json=body, stream=True, timeout=120) as response:
        if response.status_code != 200:
            raise RuntimeError(f"status {response.status_code}: {response.text[:200]}")
        for line in response.iter_lines():
            if not line:
                continue
            data = line.decode().removeprefix("data: ")
            if data == "[DONE]":
                return chunks, True
            if "error" in json.loads(data):
                raise RuntimeError(f"error event: {data[:200]}")
            chunks += 1
            if abort and chunks == 3:
                return chunks, False
    return chunks, False


def client(index: int, base: str, until: float, tally: Tally, stop: threading.Event) -> None:
    import requests

    rng, session, sent = random.Random(index), requests.Session(), 0
    while time.time() < until and not stop.is_set():
        sent += 1
        try:
            if sent % MALFORMED_EVERY == 0:
                body, what = MALFORMED[(sent // MALFORMED_EVERY) % len(MALFORMED)]
                status = session.post(f"{base}/v1/completions", json={"model": "bench", **body}, timeout=30).status_code
                if 400 <= status < 500:
                    tally.add(rejected=1)
                else:
                    tally.add(error=f"client {index}: {what} answered {status}")
                continue
            abort, started = sent % ABORT_EVERY == 0, time.monotonic()
            chunks, done = stream_completion(session, base, rng, abort)
            if abort:
                tally.add(aborted=1)
            elif done:
                tally.add(completed=1, tokens=chunks, latency=time.monotonic() - started)
            else:
                tally.add(error=f"client {index}: a stream closed without [DONE] after {chunks} chunks")
        except Exception as error:  # noqa: BLE001 (every failure a client can see is counted)
            if not stop.is_set():
                tally.add(error=f"client {index}: {type(error).__name__}: {str(error)[:200]}")


def family_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        total = 0
        for process in (root, *root.children(recursive=True)):
            try:
                total += process.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total
    except psutil.NoSuchProcess:
        return 0


def sample_rss(pid: int, until: float, samples: list, stop: threading.Event) -> None:
    start = time.time()
    while time.time() < until and not stop.wait(SAMPLE_SECONDS):
        samples.append((time.time() - start, family_rss(pid)))


def shut_down_under_load(server, base: str) -> dict:
    """SIGTERM with a stream per client open: exit time, status, and how each stream ended."""
    import requests

    endings, lock = [], threading.Lock()

    def one() -> None:
        try:
            body = {"model": "bench", "prompt": "go on", "max_tokens": 1000, "stream": True, "ignore_eos": True}
            with requests.post(f"{base}/v1/completions", json=body, stream=True, timeout=60) as response:
                ending = "closed without [DONE]"
                for line in response.iter_lines():
                    if line.endswith(b"[DONE]"):
                        ending = "[DONE]"
                        break
        except requests.RequestException as error:
            ending = f"broken: {type(error).__name__}"
        with lock:
            endings.append(ending)

    streams = [threading.Thread(target=one) for _ in range(4)]
    for thread in streams:
        thread.start()
    time.sleep(2)
    sent = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    try:
        status = server.proc.wait(60)
    except Exception:  # noqa: BLE001 (a hang is a result)
        status = None
    exited = time.monotonic() - sent
    for thread in streams:
        thread.join(60)
    return {"exit_s": exited, "status": status, "stream_endings": endings}


def report(tally: Tally, samples: list, seconds: float, shutdown: dict) -> dict:
    warm = [rss for t, rss in samples if t >= WARM_UP_SECONDS] or [rss for _, rss in samples]
    first, last = (statistics.median(warm[:3]), statistics.median(warm[-3:])) if warm else (0, 0)
    latencies = sorted(tally.latencies) or [0.0]
    result = {
        "seconds": seconds, "completed": tally.completed, "aborted": tally.aborted, "rejected": tally.rejected,
        "errors": len(tally.errors), "error_examples": tally.errors[:10], "output_tok_s": tally.tokens / seconds,
        "latency_p50_s": latencies[len(latencies) // 2], "latency_p99_s": latencies[int(len(latencies) * 0.99)],
        "rss_after_warm_up_gib": first / 2**30, "rss_end_gib": last / 2**30,
        "rss_max_gib": max((rss for _, rss in samples), default=0) / 2**30,
        "rss_growth": (last - first) / first if first else 0.0,
        "rss_samples": [(round(t), rss) for t, rss in samples], **shutdown,
    }
    print(f"requests: {tally.completed} completed, {tally.aborted} dropped by their client, {tally.rejected} "
          f"malformed rejected (4xx); errors {len(tally.errors)}")
    for example in tally.errors[:10]:
        print(f"  {example}")
    print(f"output {result['output_tok_s']:.1f} tok/s; request latency p50 {result['latency_p50_s']:.2f} s, "
          f"p99 {result['latency_p99_s']:.2f} s")
    print("RSS of the server's processes (GiB) every minute: " + " ".join(
        f"{rss / 2**30:.2f}" for t, rss in samples if int(t) % 60 < SAMPLE_SECONDS))
    print(f"RSS after warm-up {first / 2**30:.2f} GiB, at the end {last / 2**30:.2f} GiB "
          f"({result['rss_growth']:+.1%}), highest {result['rss_max_gib']:.2f} GiB")
    print(f"SIGTERM with {len(shutdown['stream_endings'])} streams open: exited in {shutdown['exit_s']:.1f} s with "
          f"status {shutdown['status']}; streams: {', '.join(shutdown['stream_endings'])}")
    ok = (not tally.errors and result["rss_growth"] < RSS_GROWTH_LIMIT and shutdown["status"] == 0
          and shutdown["exit_s"] <= SHUTDOWN_BOUND and all(e == "[DONE]" for e in shutdown["stream_endings"]))
    print(f"verdict: {'pass' if ok else 'FAIL'} (errors 0, RSS growth after warm-up < {RSS_GROWTH_LIMIT:.0%}, "
          f"exit within {SHUTDOWN_BOUND:.0f} s with status 0, every stream ended)")
    result["pass"] = ok
    return result


def tiny_model(models_dir: Path) -> Path:
    out = models_dir / "tiny-qwen3-moe"
    if not (out / "config.json").exists():
        subprocess.run([sys.executable, str(bench_model.BUILDER), "--out", str(out)], check=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, help="bench_model's Qwen3-30B-A3B-shaped model (default: the tiny model)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--config", default="lk-bf16", choices=list(bench_model.CONFIGS))
    parser.add_argument("--cores", default=harness.cpus_text(harness.allowed_cpus()))
    parser.add_argument("--eager", action="store_true", help="--enforce-eager (default: torch.compile)")
    parser.add_argument("--models-dir", type=Path, default=Path(tempfile.gettempdir()) / "lvllm-bench-models")
    parser.add_argument("--startup-timeout", type=int, default=1200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.clients < 1 or args.minutes <= 0:
        parser.error("--clients must be >= 1 and --minutes > 0")
    args.models_dir.mkdir(parents=True, exist_ok=True)
    model = bench_model.build(args.models_dir, args.layers) if args.layers else tiny_model(args.models_dir)
    print(harness.header("bench_soak", harness.machine(harness.parse_cpus(args.cores))), flush=True)
    print(f"{model.name}, {args.config}, {args.clients} clients, {args.minutes:g} minutes", flush=True)
    log = args.models_dir / "soak-server.log"
    server = bench_model.Server(model, args.config, args, log)
    base = f"http://127.0.0.1:{server.port}"
    tally, samples, stop = Tally(), [], threading.Event()
    start = time.time()
    until = start + args.minutes * 60
    threads = [threading.Thread(target=client, args=(i, base, until, tally, stop)) for i in range(args.clients)]
    threads.append(threading.Thread(target=sample_rss, args=(server.proc.pid, until, samples, stop)))
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.time() - start
        shutdown = shut_down_under_load(server, base)
    finally:
        stop.set()
        server.close()
    result = report(tally, samples, seconds, shutdown)
    print(f"server log: {log}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
