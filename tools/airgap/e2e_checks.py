#!/usr/bin/env python3
"""End-to-end checks of a `vllm serve` install, lk on against lk off; results in OUT_DIR.

    python tools/airgap/e2e_checks.py OUT_DIR [--device cuda|cpu] [--quick] [--models-dir DIR]

Run with the Python of the venv that holds vLLM and lvllm (tools/airgap/host.sh runs it last,
on the offline GPU host). Each configuration below is one `vllm serve` process (the venv's
`vllm` command, a config file written beside its log), started, asked over HTTP, stopped with
SIGTERM; the servers run one after the other.

Models, built with the repository's own builders and cached in --models-dir:
  tiny   examples/tiny/build_tiny_model.py's default Qwen3-MoE (4 layers), served in float32
  8l     benchmarks/bench_model.py's Qwen3-30B-A3B-shaped model with 8 layers, served in
         bfloat16 (about 10 GB; left out by --quick)

Configurations, per model (the reference of every comparison is vllm-eager):
  vllm-eager            LVLLM_MOE_NUMA_ENABLED=0, eager: vLLM's own MoE (on CUDA every expert
                        on the GPU; on the CPU build vLLM's CPU MoE)
  vllm-graphs           CUDA: lk off with vLLM's default compilation and CUDA graphs, the
                        timing reference of the graph modes below
  lk-eager              LVLLM_MOE_NUMA_ENABLED=1, eager
  lk-full-decode-only   CUDA: compilation_config.cudagraph_mode FULL_DECODE_ONLY
  lk-piecewise          CUDA: compilation_config.cudagraph_mode PIECEWISE
  lk-resident-0-1       CUDA: LVLLM_GPU_RESIDENT_MOE_LAYERS=0-1, eager
  lk-prefill-w1, -w2    CUDA: LVLLM_GPU_PREFILL_MIN_BATCH_SIZE below the long prompt's length
                        and LVLLM_GPU_PREFETCH_WINDOW 1 and 2, eager
With --device cpu the CUDA configurations are reported as skipped, never as passed.

What each server is asked and what is checked:
  serve      healthy within --startup-timeout, every request answered, exit status 0 after
             SIGTERM, no process of its group left behind, and its log free of tracebacks,
             CUDA errors, CUDA out-of-memory and ERROR lines
  placement  lk on: lvllm's load line names the expected lk layers (and device layers for
             resident); lk off: no lk layer
  outputs    four short prompts and one long one, greedy (temperature 0, ignore_eos), with the
             prompt tokens' logprobs, compared with vllm-eager's answers by the model's
             criterion (CRITERIA below, the bounds of tests/vllm/test_equivalence.py)
  mixed      lk servers: four streams decoding when a long prompt arrives; every stream ends
             with all its tokens and [DONE], the long prompt is answered
  ring       lk-prefill-*: the log line "lvllm: GPU prefill from" (the ring's allocation)
             comes before vLLM's KV cache sizing, and the first long prompt is answered
  figures    one stream on the long prompt: TTFT and decode tok/s (median of the rounds),
             against vllm-eager (eager configurations) or vllm-graphs (graph modes)

Writes OUT_DIR/summary.json and OUT_DIR/summary.md (commit, date, device, each check with
pass/fail/skipped and why, the figures with their reference and ratio), each server's config
and log in OUT_DIR/servers, its answers in OUT_DIR/outputs. Exit status 1 when a check failed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY_BUILDER = ROOT / "examples" / "tiny" / "build_tiny_model.py"
BENCH_MODEL = ROOT / "benchmarks" / "bench_model.py"

# The bounds of tests/vllm/test_equivalence.py (its docstring says why; tests/test_e2e_checks.py
# keeps these equal to its constants).
F32_LOGPROB_TOL = 1e-3
BF16_LOGPROB_TOL = 0.75
BF16_SAME_PREFIX = 4
CRITERIA = {
    "exact": (f"float32: greedy token ids identical for every prompt, prompt-token logprobs "
              f"within {F32_LOGPROB_TOL:g} (tests/vllm/test_equivalence.py F32_LOGPROB_TOL)"),
    "bf16": (f"bfloat16: the first {BF16_SAME_PREFIX} greedy tokens identical for every prompt "
             f"(tokens may part after a near tie), prompt-token logprobs within "
             f"{BF16_LOGPROB_TOL:g} (tests/vllm/test_equivalence.py BF16_SAME_PREFIX, "
             f"BF16_LOGPROB_TOL)"),
}

PROMPTS = [
    "the router sends the batch",
    "Question 7: what loads",
    "every expert computes the hidden state in host memory.",
    "A thread writes some memory before the next step, then the engine checks the output.",
]
LONG_SENTENCES = [
    "The engine reads the weights of each expert from host memory.",
    "A router picks eight experts for every token of the prompt.",
    "Our server streams the output to the user while the next request waits.",
    "Each core splits its share of the batch and joins the others at once.",
    "Question 12: what holds the hidden state between two layers?",
    "The cache keeps the attention keys of every token it has seen.",
]

LOG_PROBLEMS = ("Traceback", "CUDA error", "CUDA out of memory", "OutOfMemoryError",
                "nanobind: leaked")
KV_SIZING_LINES = ("Available KV cache memory", "KV cache size:")
RING_LINE = "lvllm: GPU prefill from"
NEEDS_CUDA = "skipped: needs CUDA"
REFERENCE_NOTE = {
    "cuda": ("References: vllm-eager and vllm-graphs are lk off, vLLM holding every expert on "
             "the GPU (eager; vLLM's default compilation and CUDA graphs)."),
    "cpu": "Reference: vllm-eager is lk off, vLLM's own CPU MoE.",
}


# --------------------------------------------------------------------------------------
# the matrix
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    key: str
    dtype: str
    criterion: str
    layers: int
    max_model_len: int
    long_tokens: int          # the long prompt has at least this many tokens
    prefill_min_batch: int    # LVLLM_GPU_PREFILL_MIN_BATCH_SIZE of lk-prefill-*, below long_tokens


MODELS = {
    "tiny": ModelSpec("tiny", "float32", "exact", 4, 512, 256, 128),
    "8l": ModelSpec("8l", "bfloat16", "bf16", 8, 2048, 1024, 512),
}


@dataclass(frozen=True)
class ServerSpec:
    name: str
    lk: bool
    mode: str = "eager"               # eager, FULL_DECODE_ONLY, PIECEWISE, or vllm-default
    cuda_only: bool = False
    resident: str | None = None       # LVLLM_GPU_RESIDENT_MOE_LAYERS
    prefetch_window: int | None = None  # set: GPU prefill with this LVLLM_GPU_PREFETCH_WINDOW
    compare: bool = True              # outputs against vllm-eager
    mixed: bool = False
    timing_reference: str | None = "vllm-eager"


REFERENCE = "vllm-eager"
SERVERS = [
    ServerSpec(REFERENCE, lk=False, compare=False, timing_reference=None),
    ServerSpec("vllm-graphs", lk=False, mode="vllm-default", cuda_only=True, compare=False,
               timing_reference=None),
    ServerSpec("lk-eager", lk=True, mixed=True),
    ServerSpec("lk-full-decode-only", lk=True, mode="FULL_DECODE_ONLY", cuda_only=True,
               mixed=True, timing_reference="vllm-graphs"),
    ServerSpec("lk-piecewise", lk=True, mode="PIECEWISE", cuda_only=True, mixed=True,
               timing_reference="vllm-graphs"),
    ServerSpec("lk-resident-0-1", lk=True, cuda_only=True, resident="0-1"),
    ServerSpec("lk-prefill-w1", lk=True, cuda_only=True, prefetch_window=1, mixed=True),
    ServerSpec("lk-prefill-w2", lk=True, cuda_only=True, prefetch_window=2, mixed=True),
]


@dataclass(frozen=True)
class Sizes:
    output_tokens: int   # greedy tokens per prompt compared
    mixed_tokens: int    # tokens of each of the four streams of the mixed batch
    decode_tokens: int   # tokens of the timed stream
    rounds: int          # timed rounds (after one warm-up)


FULL = Sizes(output_tokens=16, mixed_tokens=256, decode_tokens=64, rounds=3)
QUICK = Sizes(output_tokens=8, mixed_tokens=32, decode_tokens=8, rounds=1)


# --------------------------------------------------------------------------------------
# pure parts: comparison, results, rendering
# --------------------------------------------------------------------------------------

def compare_outputs(candidate: list[dict], reference: list[dict], criterion: str) -> tuple[bool, str]:
    """Whether ``candidate``'s answers match ``reference``'s by ``criterion`` ("exact" or
    "bf16"); each answer: {"prompt_token_ids", "token_ids", "prompt_logprobs"}."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}")
    if len(candidate) != len(reference):
        return False, f"{len(candidate)} answers against {len(reference)}"
    worst, parted = 0.0, []
    for i, (a, b) in enumerate(zip(candidate, reference)):
        if a["prompt_token_ids"] != b["prompt_token_ids"]:
            return False, f"prompt {i}: different prompt token ids"
        if len(a["prompt_logprobs"]) != len(b["prompt_logprobs"]):
            return False, f"prompt {i}: prompt logprobs of different lengths"
        for x, y in zip(a["prompt_logprobs"], b["prompt_logprobs"]):
            worst = max(worst, abs(x - y))
        if criterion == "exact":
            same = a["token_ids"] == b["token_ids"]
        else:
            head = b["token_ids"][:BF16_SAME_PREFIX]
            same = len(head) == BF16_SAME_PREFIX and a["token_ids"][:BF16_SAME_PREFIX] == head
        if not same:
            parted.append(i)
    tol = F32_LOGPROB_TOL if criterion == "exact" else BF16_LOGPROB_TOL
    what = "greedy tokens identical" if criterion == "exact" else f"first {BF16_SAME_PREFIX} tokens identical"
    figures = f"max prompt-logprob difference {worst:.3g} (bound {tol:g})"
    if parted:
        return False, f"tokens differ for prompt(s) {parted}; {figures}"
    if not worst < tol:
        return False, f"{what}, but {figures}"
    same = sum(a["token_ids"] == b["token_ids"] for a, b in zip(candidate, reference))
    return True, f"{what} ({same}/{len(reference)} prompts fully identical); {figures}"


def check(name: str, status: str, reason: str) -> dict:
    assert status in ("pass", "fail", "skipped"), status
    return {"name": name, "status": status, "reason": reason}


def ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference:
        return None
    return value / reference


def _fmt(value, digits: int = 1, suffix: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}{suffix}"


def render_markdown(summary: dict) -> str:
    """summary.md from summary.json's content."""
    checks = summary["checks"]
    counts = {s: sum(c["status"] == s for c in checks) for s in ("pass", "fail", "skipped")}
    dirty = " (working tree with uncommitted changes)" if summary.get("dirty") else ""
    lines = [
        "# lvllm end-to-end checks",
        "",
        f"- commit: {summary['commit']}{dirty}",
        f"- date: {summary['date']}",
        f"- device: {summary['device']['kind']}, {summary['device']['name']}",
        f"- versions: vllm {summary.get('vllm')}, torch {summary.get('torch')}",
        f"- run: {'quick (tiny model, short outputs)' if summary['quick'] else 'full'}; "
        f"`{summary['command']}`",
        f"- result: **{'PASS' if counts['fail'] == 0 else 'FAIL'}**: {counts['pass']} passed, "
        f"{counts['fail']} failed, {counts['skipped']} skipped",
        "",
        "Output criteria (against vllm-eager, lk off):",
        "",
        *(f"- {name}: {text}" for name, text in summary["criteria"].items()),
        "",
        "## Checks",
        "",
        "| check | result | reason |",
        "| --- | --- | --- |",
    ]
    for c in checks:
        reason = c["reason"].replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {c['name']} | {c['status']} | {reason} |")
    lines += ["", "## Servers", "", "| server | mode | lk env | exit status | up in s | log |",
              "| --- | --- | --- | --- | --- | --- |"]
    for s in summary["servers"]:
        env = " ".join(f"{k}={v}" for k, v in s["env"].items()) or "-"
        lines.append(f"| {s['model']}/{s['name']} | {s['mode']} | {env} | {s['exit_status']} | "
                     f"{_fmt(s.get('startup_s'), 0)} | {s['log']} |")
    lines += ["", "## Figures", ""]
    figures = summary["figures"]
    if figures:
        lines += [
            f"One stream: TTFT of the long prompt, then decode tok/s over its tokens; median of "
            f"the timed rounds after one warm-up. Ratios: lk against its reference (decode: "
            f"higher is better; TTFT: lower is better). Device: {summary['device']['name']}. "
            f"{REFERENCE_NOTE[summary['device']['kind']]}"
            + (" Quick run: a smoke test of the timing code (one short round), not a measurement."
               if summary["quick"] else ""),
            "",
            "| model | server | prompt tokens | decoded | rounds | decode tok/s | vs ref | "
            "TTFT ms | vs ref | reference |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for f in figures:
            lines.append(
                f"| {f['model']} | {f['server']} | {f['prompt_tokens']} | {f['decode_tokens']} | "
                f"{f['rounds']} | {_fmt(f['decode_tok_s'])} | {_fmt(f.get('decode_ratio'), 2, 'x')} | "
                f"{_fmt(f['ttft_ms'])} | {_fmt(f.get('ttft_ratio'), 2, 'x')} | "
                f"{f.get('reference') or '-'} |")
    else:
        lines.append("No figures (no server answered the timed requests).")
    return "\n".join(lines) + "\n"


def expected_placement(model: ModelSpec, resident: str | None) -> tuple[str, str]:
    """Two parts of lvllm's load line for ``model`` with ``resident`` layers on the device:
    the lk layers (its start) and the device layers."""
    from lvllm.envs import format_ranges

    device = set()
    if resident:
        first, _, last = resident.partition("-")
        device = set(range(int(first), int(last or first) + 1))
    lk = [i for i in range(model.layers) if i not in device]
    return f"lvllm: {len(lk)} MoE layer(s) on lk [{format_ranges(lk)}]", \
        f"; {len(device)} on the device [{format_ranges(sorted(device))}]"


def log_problems(text: str) -> list[str]:
    found = [needle for needle in LOG_PROBLEMS if needle in text]
    errors = [line.strip() for line in text.splitlines() if " ERROR " in line]
    if errors:
        found.append(f"{len(errors)} ERROR line(s), first: {errors[0][:200]}")
    return found


def ring_before_kv(text: str) -> tuple[bool, str]:
    lines = text.splitlines()
    ring = next((i for i, line in enumerate(lines) if RING_LINE in line), None)
    kv = next((i for i, line in enumerate(lines) if any(k in line for k in KV_SIZING_LINES)), None)
    if ring is None:
        return False, f"no {RING_LINE!r} line in the log"
    if kv is None:
        return False, "no KV cache sizing line in the log"
    said = lines[ring][lines[ring].index(RING_LINE):]
    if ring < kv:
        return True, f"log line {ring + 1} ({said!r}) before the KV cache sizing at line {kv + 1}"
    return False, f"ring at log line {ring + 1}, after the KV cache sizing at line {kv + 1}"


# --------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------

def build_models(models_dir: Path, keys: list[str]) -> dict[str, Path]:
    models_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    if "tiny" in keys:
        out = models_dir / "tiny-qwen3_moe"
        if not (out / "config.json").exists():
            subprocess.run([sys.executable, str(TINY_BUILDER), "--out", str(out),
                            "--family", "qwen3_moe"], check=True)
        paths["tiny"] = out
    if "8l" in keys:
        spec = importlib.util.spec_from_file_location("bench_model", BENCH_MODEL)
        bench_model = importlib.util.module_from_spec(spec)
        sys.modules.setdefault("bench_model", bench_model)
        spec.loader.exec_module(bench_model)
        paths["8l"] = bench_model.build(models_dir, MODELS["8l"].layers)
    return paths


def long_prompt(model: Path, tokens: int) -> str:
    """Sentences until the model's tokenizer counts at least ``tokens`` tokens."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    text, i = "", 0
    while len(tokenizer.encode(text).ids) < tokens:
        text += (" " if text else "") + LONG_SENTENCES[i % len(LONG_SENTENCES)]
        i += 1
    return text


# --------------------------------------------------------------------------------------
# a server
# --------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(device: str, overrides: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LVLLM_", "LK_"))}
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["VLLM_DISABLE_COMPILE_CACHE"] = "1"
    if device == "cpu":
        # The settings tests/vllm/test_server.py starts its servers with.
        cpus = sorted(os.sched_getaffinity(0))
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cpus)) if len(cpus) > 1 else "nobind"
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    env.update(overrides)
    return env


def lk_env(spec: ServerSpec, model: ModelSpec) -> dict[str, str]:
    env = {"LVLLM_MOE_NUMA_ENABLED": "1" if spec.lk else "0"}
    if spec.resident:
        env["LVLLM_GPU_RESIDENT_MOE_LAYERS"] = spec.resident
    if spec.prefetch_window:
        env["LVLLM_GPU_PREFILL_MIN_BATCH_SIZE"] = str(model.prefill_min_batch)
        env["LVLLM_GPU_PREFETCH_WINDOW"] = str(spec.prefetch_window)
    return env


def write_config(path: Path, model_path: Path, model: ModelSpec, spec: ServerSpec, port: int) -> None:
    entries = {
        "model": str(model_path), "served-model-name": "e2e", "host": "127.0.0.1", "port": port,
        "dtype": model.dtype, "max-model-len": model.max_model_len, "max-num-seqs": 8,
        "enable-prefix-caching": False, "seed": 0,
    }
    if spec.mode == "eager":
        entries["enforce-eager"] = True
    elif spec.mode != "vllm-default":
        entries["compilation_config.cudagraph_mode"] = spec.mode
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in entries.items()))


def _group_alive(pgid: int) -> list[int]:
    """Processes of group ``pgid`` that are not zombies."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(entry.name))
    return alive


class Server:
    def __init__(self, model_path: Path, model: ModelSpec, spec: ServerSpec, device: str,
                 out: Path, startup_timeout: float):
        from lvllm._vllm_cli import command_line

        self.spec, self.model = spec, model
        stem = f"{model.key}-{spec.name}"
        self.config = out / "servers" / f"{stem}.yaml"
        self.log = out / "servers" / f"{stem}.log"
        self.config.parent.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.lk_env = lk_env(spec, model)
        write_config(self.config, model_path, model, spec, self.port)
        self.started = time.time()
        self.startup_s = None
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [*command_line(), "serve", "--config", str(self.config)], stdout=log,
                stderr=subprocess.STDOUT, env=server_env(device, self.lk_env), cwd=str(ROOT),
                start_new_session=True)
        self.startup_timeout = startup_timeout

    def wait_healthy(self) -> None:
        deadline = self.started + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited with status {self.proc.returncode} before /health answered")
            try:
                with urllib.request.urlopen(f"{self.base}/health", timeout=5) as r:
                    if r.status == 200:
                        self.startup_s = time.time() - self.started
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.time() > deadline:
                raise RuntimeError(f"/health did not answer within {self.startup_timeout:.0f} s")
            time.sleep(1)

    def stop(self) -> tuple[int | None, list[str]]:
        """SIGTERM, as a service manager stops it; returns (exit status, problems)."""
        problems = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                problems.append("still running 120 s after SIGTERM: killed")
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        else:
            problems.append(f"had already exited (status {self.proc.returncode}) before SIGTERM")
        deadline = time.time() + 30
        while (alive := _group_alive(self.proc.pid)) and time.time() < deadline:
            time.sleep(0.5)
        if alive:
            problems.append(f"{len(alive)} process(es) of its group left behind: killed")
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode, problems

    # requests ---------------------------------------------------------------------------

    def _body(self, prompt: str, max_tokens: int, **extra) -> bytes:
        body = {"model": "e2e", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True, **extra}
        return json.dumps(body).encode()

    def _post(self, data: bytes, timeout: float = 900):
        request = urllib.request.Request(f"{self.base}/v1/completions", data=data,
                                         headers={"Content-Type": "application/json"})
        return urllib.request.urlopen(request, timeout=timeout)

    def complete(self, prompt: str, max_tokens: int) -> dict:
        """A greedy answer with the logprob of each prompt token (after the first)."""
        with self._post(self._body(prompt, max_tokens, prompt_logprobs=0)) as r:
            choice = json.load(r)["choices"][0]
        prompt_ids = choice["prompt_token_ids"]
        logprobs = [entry[str(token)]["logprob"]
                    for entry, token in zip(choice["prompt_logprobs"][1:], prompt_ids[1:])]
        return {"prompt_token_ids": prompt_ids, "token_ids": choice["token_ids"],
                "text": choice["text"], "prompt_logprobs": logprobs}

    def stream(self, prompt: str, max_tokens: int, on_token=None) -> dict:
        """A streamed greedy answer: token count, arrival times, whether [DONE] came."""
        sent = time.perf_counter()
        times, count, done, errors = [], 0, False, []
        with self._post(self._body(prompt, max_tokens, stream=True)) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    errors.append(str(chunk["error"])[:200])
                    continue
                for choice in chunk.get("choices", []):
                    n = len(choice.get("token_ids") or [])
                    if n:
                        count += n
                        times.append((time.perf_counter() - sent, n))
                        if on_token is not None:
                            on_token()
        return {"tokens": count, "times": times, "done": done, "errors": errors}


# --------------------------------------------------------------------------------------
# what is asked of a server
# --------------------------------------------------------------------------------------

def mixed_batch(server: Server, short: list[str], long: str, tokens: int) -> tuple[bool, str]:
    """Four streams decoding when the long prompt arrives: all finish, nothing fails."""
    started = [threading.Event() for _ in range(4)]
    results: list[dict | None] = [None] * 4
    failures: list[str] = []

    def run(i: int) -> None:
        try:
            results[i] = server.stream(short[i % len(short)], tokens, on_token=started[i].set)
        except Exception as exc:  # noqa: BLE001 - reported as the check's reason
            failures.append(f"stream {i}: {exc!r}")
        finally:
            started[i].set()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    for event in started:
        event.wait(900)
    decoding = sum(r is None for r in results)
    try:
        answer = server.complete(long, 4)
        long_ok = len(answer["token_ids"]) == 4
    except Exception as exc:  # noqa: BLE001
        failures.append(f"long prompt: {exc!r}")
        long_ok, answer = False, None
    for t in threads:
        t.join(900)
    for i, r in enumerate(results):
        if r is not None and (r["tokens"] != tokens or not r["done"] or r["errors"]):
            failures.append(f"stream {i}: {r['tokens']}/{tokens} tokens, [DONE] {r['done']}, "
                            f"errors {r['errors']}")
    if decoding < 4:
        failures.append(f"only {decoding} of 4 streams were still decoding when the long prompt "
                        "was sent")
    if failures or not long_ok:
        return False, "; ".join(failures) or "long prompt not answered in full"
    return True, (f"4 streams of {tokens} tokens decoding when a {len(answer['prompt_token_ids'])}-token "
                  "prompt arrived; all streams complete with [DONE], the long prompt answered")


def timing(server: Server, long: str, sizes: Sizes) -> dict:
    server.stream(long, 2)  # warm-up
    ttfts, rates = [], []
    for _ in range(sizes.rounds):
        r = server.stream(long, sizes.decode_tokens)
        if not r["done"] or r["errors"] or r["tokens"] != sizes.decode_tokens:
            raise RuntimeError(f"timed stream: {r['tokens']} tokens, errors {r['errors']}")
        (first, n_first), (last, _) = r["times"][0], r["times"][-1]
        ttfts.append(first * 1000)
        if last > first:
            rates.append((r["tokens"] - n_first) / (last - first))
    return {"ttft_ms": statistics.median(ttfts),
            "decode_tok_s": statistics.median(rates) if rates else None}


@dataclass
class Run:
    """One server's answers and checks."""
    model: ModelSpec
    spec: ServerSpec
    checks: list[dict] = field(default_factory=list)
    outputs: list[dict] | None = None
    figures: dict | None = None
    record: dict | None = None


def run_server(model_path: Path, model: ModelSpec, spec: ServerSpec, args, sizes: Sizes,
               prompts: list[str], reference: Run | None) -> Run:
    run = Run(model, spec)
    name = f"{model.key}/{spec.name}"
    print(f"== {name}", flush=True)
    server = Server(model_path, model, spec, args.device, args.out, args.startup_timeout)
    trouble: list[str] = []
    mixed = (check(f"{name}: mixed batch", "fail", "not run: the server failed first (its serve check says why)")
             if spec.mixed else None)
    try:
        server.wait_healthy()
        run.outputs = [server.complete(p, sizes.output_tokens) for p in prompts]
        (args.out / "outputs").mkdir(exist_ok=True)
        (args.out / "outputs" / f"{model.key}-{spec.name}.json").write_text(json.dumps(run.outputs, indent=1))
        if spec.mixed:
            ok, why = mixed_batch(server, prompts[:4], prompts[-1], sizes.mixed_tokens)
            mixed = check(f"{name}: mixed batch", "pass" if ok else "fail", why)
        run.figures = timing(server, prompts[-1], sizes)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a failed check
        trouble.append(f"{type(exc).__name__}: {exc}")
    finally:
        status, problems = server.stop()
    trouble += problems
    text = server.log.read_text(errors="replace")
    if status != 0:
        trouble.append(f"exit status {status}")
    found = log_problems(text)
    if found:
        trouble.append("log has " + ", ".join(found))
    up = f"healthy in {server.startup_s:.0f} s" if server.startup_s is not None else "never healthy"
    run.checks.append(check(
        f"{name}: serve", "fail" if trouble else "pass",
        "; ".join(trouble) + f" ({up}; log {server.log.name})" if trouble else
        f"{up}, {len(prompts)} prompts answered, exit status 0 after SIGTERM, no process left, "
        "log without tracebacks/CUDA errors/OOM/ERROR lines"))
    run.record = {"model": model.key, "name": spec.name, "mode": spec.mode, "env": server.lk_env,
                  "exit_status": status, "startup_s": server.startup_s,
                  "log": str(server.log.relative_to(args.out)),
                  "config": str(server.config.relative_to(args.out))}

    # placement: lvllm's load line
    if spec.lk:
        head, tail = expected_placement(model, spec.resident)
        line = next((ln for ln in text.splitlines() if head in ln), None)
        ok = line is not None and tail in line
        run.checks.append(check(f"{name}: lk placement", "pass" if ok else "fail",
                                f"log says {line[line.index('lvllm:'):][:400]!r}" if line else
                                f"no {head!r} line in the log"))
    else:
        ok = "MoE layer(s) on lk" not in text
        run.checks.append(check(f"{name}: lk off", "pass" if ok else "fail",
                                "no layer on lk" if ok else "the log shows lk layers with lk off"))
    if spec.prefetch_window:
        ok, why = ring_before_kv(text)
        long_answered = run.outputs is not None
        tokens = len(run.outputs[-1]["prompt_token_ids"]) if long_answered else None
        if ok and not long_answered:
            ok, why = False, why + "; the long prompt was not answered"
        elif ok:
            why += (f"; first long prompt ({tokens} tokens >= LVLLM_GPU_PREFILL_MIN_BATCH_SIZE="
                    f"{model.prefill_min_batch}) answered")
        run.checks.append(check(f"{name}: ring sized before the KV cache", "pass" if ok else "fail", why))
    if spec.compare:
        label = f"{name}: outputs vs {REFERENCE} ({model.criterion})"
        if run.outputs is None:
            run.checks.append(check(label, "fail", "this server gave no answers"))
        elif reference is None or reference.outputs is None:
            run.checks.append(check(label, "fail", f"{REFERENCE} gave no answers to compare with"))
        else:
            ok, why = compare_outputs(run.outputs, reference.outputs, model.criterion)
            run.checks.append(check(label, "pass" if ok else "fail", why))
    if mixed is not None:
        run.checks.append(mixed)
    return run


def figures_table(runs: dict[tuple[str, str], Run], sizes: Sizes, prompt_tokens: dict[str, int]) -> list[dict]:
    rows = []
    for (model, name), run in runs.items():
        if run.figures is None:
            continue
        ref_name = run.spec.timing_reference
        ref = runs.get((model, ref_name)) if ref_name else None
        ref_figures = ref.figures if ref is not None else None
        rows.append({
            "model": model, "server": name, "mode": run.spec.mode,
            "prompt_tokens": prompt_tokens[model], "decode_tokens": sizes.decode_tokens,
            "rounds": sizes.rounds, **run.figures,
            "reference": ref_name if ref_figures else None,
            "decode_ratio": ratio(run.figures["decode_tok_s"], ref_figures and ref_figures["decode_tok_s"]),
            "ttft_ratio": ratio(run.figures["ttft_ms"], ref_figures and ref_figures["ttft_ms"]),
        })
    return rows


# --------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------

def git(*argv: str) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(ROOT), *argv], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def probe_cuda() -> str | None:
    """The GPU's name, asked in a child so this process holds no CUDA context; None without one."""
    code = ("import torch\nif torch.cuda.is_available(): print(torch.cuda.get_device_name(0))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    name = out.stdout.strip()
    return name or None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {len(os.sched_getaffinity(0))} CPUs"
    except OSError:
        pass
    return "unknown CPU"


def version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for summary.json, summary.md, logs")
    parser.add_argument("--device", choices=("cuda", "cpu"),
                        help="default: cuda where torch sees a GPU, else cpu")
    parser.add_argument("--quick", action="store_true", help="tiny model only, short outputs")
    parser.add_argument("--models-dir", type=Path, default=ROOT / "build" / "e2e-models",
                        help="where the random models are built (and kept for later runs)")
    parser.add_argument("--startup-timeout", type=float, default=900,
                        help="seconds a server may take to answer /health")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    gpu = probe_cuda() if args.device != "cpu" else None
    args.device = args.device or ("cuda" if gpu else "cpu")
    if args.device == "cuda" and not gpu:
        print("--device cuda: torch sees no GPU", file=sys.stderr)
        return 2
    sizes = QUICK if args.quick else FULL
    model_keys = ["tiny"] if args.quick else ["tiny", "8l"]
    checks: list[dict] = []
    if args.quick:
        checks.append(check("8l: every configuration", "skipped", "skipped: --quick (tiny model only)"))

    paths = build_models(args.models_dir, model_keys)
    runs: dict[tuple[str, str], Run] = {}
    prompt_tokens = {}
    for key in model_keys:
        model = MODELS[key]
        prompts = [*PROMPTS, long_prompt(paths[key], model.long_tokens)]
        reference = None
        for spec in SERVERS:
            if spec.cuda_only and args.device != "cuda":
                checks.append(check(f"{key}/{spec.name}", "skipped", NEEDS_CUDA))
                continue
            run = run_server(paths[key], model, spec, args, sizes, prompts, reference)
            if spec.name == REFERENCE:
                reference = run
            runs[(key, spec.name)] = run
            checks += run.checks
            for c in run.checks:
                print(f"   {c['status']:7} {c['name']}: {c['reason']}", flush=True)
        if reference is not None and reference.outputs:
            prompt_tokens[key] = len(reference.outputs[-1]["prompt_token_ids"])
        else:
            prompt_tokens[key] = None

    commit = git("rev-parse", "HEAD") or "unknown (no git repository)"
    summary = {
        "commit": commit,
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": {"kind": args.device, "name": gpu if args.device == "cuda" else cpu_name()},
        "vllm": version("vllm", "vllm-cpu"), "torch": version("torch"),
        "quick": args.quick,
        "command": " ".join(["python", "tools/airgap/e2e_checks.py", *(argv if argv is not None else sys.argv[1:])]),
        "criteria": {MODELS[k].key: CRITERIA[MODELS[k].criterion] for k in model_keys},
        "checks": checks,
        "servers": [run.record for run in runs.values()],
        "figures": figures_table(runs, sizes, prompt_tokens),
    }
    summary["passed"] = all(c["status"] != "fail" for c in checks)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    (args.out / "summary.md").write_text(render_markdown(summary))
    print(render_markdown(summary))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
