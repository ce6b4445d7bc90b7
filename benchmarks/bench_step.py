#!/usr/bin/env python3
"""Where one decode step goes on vLLM's CPU build at batch 1: lk's calls against vLLM's part
(scheduling, input preparation, attention, the forward's other ops and Python, logits,
sampling, output processing), the cost that more cores never shrink.

The model: Qwen3-30B-A3B's layer shapes (H 2048, 32 query / 4 KV heads of 128, top-8 of
--experts experts of I 768), --layers layers, bf16, random weights (build_tiny_model.py,
cached under --models-dir). vLLM's part depends on the layer count, not on the experts' size,
so --experts 16 measures a 48-layer model in a few GB.

Each configuration runs in a child process with the engine in it
(VLLM_ENABLE_V1_MULTIPROCESSING=0), on --cores. perf_counter timers wrap, on their classes (the
model runner's once the plugin has put its own methods in, each timed as the phase it replaces):
LLMEngine.step (one token as the user gets it), EngineCore.step, the scheduler's schedule and
update_from_output, the model runner's phases (execute_model, _update_states, _prepare_inputs,
_build_attention_metadata, _preprocess, _model_forward, sample_tokens, _sample,
_bookkeeping_sync), inductor's compiled graph (CompiledFxGraph.__call__: its kernels from its
wrapper, so that what the forward's other ops keep is the Python that enters it: vLLM's and
dynamo's code passing every weight as an input), vLLM's CPU attention, the logits processor,
and lk's engines' forward
(experts and dense layers; with lk's ops in C++, which no Python sees, the time their kernels
total in the forward and the logits). Each phase's time is its own, the phases it calls taken out, so
the parts add up to the token. The timers cost about 1 us each (about 30 a step at 8
layers). A step: one of --tokens decode tokens of one stream after its prefill; figures are
medians over the steps of --runs generations.

vLLM's part = the token's time less lk's calls. Reference in the same run: the same model
with lk off (`vllm`: LVLLM_MOE_NUMA_ENABLED=0, vLLM's own MoE and dense kernels), whose
token time stands beside each configuration's; `lk-int4-all-python-wrapper` is lk-int4-all
compiled with inductor's Python wrapper (LVLLM_CPU_CPP_WRAPPER=0), what the C++ one saves;
`lk-int4-all-python-attention` is lk-int4-all with vLLM's attention ops through their Python
(LVLLM_CPU_NATIVE_ATTENTION=0); with them from C++, the "attention" phase reads 0 and their
kernels' time counts in the forward's other ops; `lk-int4-all-python-lk-ops` is lk-int4-all with
lk's ops through their Python kernels (LVLLM_CPU_NATIVE_LK_OPS=0); `lk-int4-all-no-shortcuts`
without the step's shortcuts (LVLLM_CPU_STEP_SHORTCUTS=OFF); `lk-int4-all-vllm-routers` with
vLLM's kernel for the MoE routers (LVLLM_ROUTERS_ON_LK=0), whose time then counts in the
forward's other ops instead of lk's dense layers.
Start-up: the LLM() call, compilation included (vLLM's and inductor's caches empty).

    python benchmarks/bench_step.py                  # 8 layers: lk-int4-all, its five variants, vllm
    python benchmarks/bench_step.py --layers 48 --experts 16 --configs lk-int4-all
    python benchmarks/bench_step.py --eager --json step.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_model  # noqa: E402
import harness  # noqa: E402

REFERENCE = "vllm"
MAX_MODEL_LEN = 512
# bench_model's configurations, and lk-int4-all with inductor's Python wrapper (vLLM's own) or
# with vLLM's kernel for the routers.
CONFIGS = {**bench_model.CONFIGS,
           "lk-int4-all-python-wrapper": {**bench_model.CONFIGS["lk-int4-all"], "LVLLM_CPU_CPP_WRAPPER": "0"},
           "lk-int4-all-vllm-routers": {**bench_model.CONFIGS["lk-int4-all"], "LVLLM_ROUTERS_ON_LK": "0"}}

# (label, module, class, method): the phases timed, outermost first.
PHASES = (
    ("output processing", "vllm.v1.engine.llm_engine", "LLMEngine", "step"),
    ("engine core", "vllm.v1.engine.core", "EngineCore", "step"),
    ("schedule", "vllm.v1.core.sched.scheduler", "Scheduler", "schedule"),
    ("update from output", "vllm.v1.core.sched.scheduler", "Scheduler", "update_from_output"),
    ("execute model", "vllm.v1.worker.cpu_model_runner", "CPUModelRunner", "execute_model"),
    ("update states", "vllm.v1.worker.cpu_model_runner", "CPUModelRunner", "_update_states"),
    ("prepare inputs", "vllm.v1.worker.cpu_model_runner", "CPUModelRunner", "_prepare_inputs"),
    ("attention metadata", "vllm.v1.worker.cpu_model_runner", "CPUModelRunner", "_build_attention_metadata"),
    ("preprocess", "vllm.v1.worker.cpu_model_runner", "CPUModelRunner", "_preprocess"),
    ("forward, other ops", "vllm.v1.worker.cpu_model_runner", "CPUModelRunner", "_model_forward"),
    ("forward, compiled graph", "torch._inductor.output_code", "CompiledFxGraph", "__call__"),
    ("attention", "vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackendImpl", "forward"),
    ("logits", "vllm.model_executor.layers.logits_processor", "LogitsProcessor", "forward"),
    ("sample tokens", "vllm.v1.worker.cpu_model_runner", "CPUModelRunner", "sample_tokens"),
    ("sample", "vllm.v1.worker.cpu_model_runner", "CPUModelRunner", "_sample"),
    ("bookkeeping", "vllm.v1.worker.cpu_model_runner", "CPUModelRunner", "_bookkeeping_sync"),
    ("lk experts", "lvllm.lk", "MoEEngine", "forward"),
    ("lk dense", "lvllm.lk.linear", "LinearEngine", "forward"),
)
TOKEN = PHASES[0][0]
RUNNER = "CPUModelRunner"   # its phases' timers go on once lvllm's plugin has changed it
LK_PARTS = ("lk experts", "lk dense")
# The phases whose ops call lk: with lk's ops in C++ (LVLLM_CPU_NATIVE_LK_OPS) no Python sees
# those calls, and their time, which the kernels total, moves from the phase to LK_PARTS.
NATIVE_LK_PHASES = ("forward, other ops", "forward, compiled graph", "logits")
# vLLM's part inside the model's forward: what grows with the layers.
FORWARD_PARTS = ("forward, other ops", "forward, compiled graph", "attention")


class PhaseClock:
    """Each phase's own time (its callees' taken out), summed per step."""

    def __init__(self, now=time.perf_counter):
        self.now = now
        self.own: dict[str, float] = {}
        self.stack: list[list] = []   # [label, start, time spent in callees]
        self.steps: list[dict[str, float]] = []
        self.native_totals = None     # lvllm.lk.native_ops.totals(), as numpy

    def native_seconds(self) -> tuple[float, float]:
        """lk's experts' and dense layers' seconds in the C++ kernels so far."""
        if self.native_totals is None:
            return 0.0, 0.0
        return self.native_totals[1] * 1e-9, self.native_totals[3] * 1e-9

    def wrap(self, label: str, method):
        native = label in NATIVE_LK_PHASES

        @functools.wraps(method)
        def timed(*args, **kwargs):
            native_start = self.native_seconds()
            # [label, start, time spent in callees, lk's kernel seconds inside those callees]
            frame = [label, self.now(), 0.0, (0.0,) * len(LK_PARTS)]
            self.stack.append(frame)
            try:
                return method(*args, **kwargs)
            finally:
                elapsed = self.now() - frame[1]
                self.stack.pop()
                own = elapsed - frame[2]
                spent = [end - start for start, end in zip(native_start, self.native_seconds())]
                if native:   # lk's kernels outside the callees, which took theirs out already
                    for part, whole, inner in zip(LK_PARTS, spent, frame[3]):
                        own -= whole - inner
                        self.own[part] = self.own.get(part, 0.0) + whole - inner
                self.own[label] = self.own.get(label, 0.0) + own
                if self.stack:
                    parent = self.stack[-1]
                    parent[2] += elapsed
                    parent[3] = tuple(a + b for a, b in zip(parent[3], spent))
                else:   # a token's step ended
                    self.steps.append(self.own)
                    self.own = {}
        return timed

    def install(self, runner: bool) -> None:
        """The model runner's phases (runner) or the others."""
        import importlib

        for label, module, cls, method in PHASES:
            if (cls == RUNNER) == runner:
                owner = getattr(importlib.import_module(module), cls)
                setattr(owner, method, self.wrap(label, getattr(owner, method)))


def child(model: str, tokens: int, runs: int, eager: bool) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"   # engine and worker in this process
    clock = PhaseClock()
    clock.install(runner=False)   # before the engine keeps bound methods of them
    started = time.perf_counter()
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype="bfloat16", enforce_eager=eager, max_model_len=MAX_MODEL_LEN, max_num_seqs=1,
              seed=0, enable_prefix_caching=False, disable_log_stats=True)
    # After the plugin: the runner's timers wrap the methods in effect, lvllm's where it replaced vLLM's.
    clock.install(runner=True)
    from lvllm.lk import native_ops

    totals = native_ops.totals()
    clock.native_totals = None if totals is None else totals.numpy()
    params = SamplingParams(temperature=0, max_tokens=1 + tokens, ignore_eos=True)
    prompt = {"prompt_token_ids": [5, 17, 29, 41]}
    start_s = time.perf_counter() - started
    llm.generate([prompt], params, use_tqdm=False)   # warm-up
    decode_steps = []
    for _ in range(runs):
        clock.steps = []
        llm.generate([prompt], params, use_tqdm=False)
        # The steps carrying a token: the first is the prefill; a last empty step may follow.
        carrying = [s for s in clock.steps if "execute model" in s]
        decode_steps += carrying[1:1 + tokens]
    labels = sorted({label for step in decode_steps for label in step})

    def median_ms(of) -> float:
        return statistics.median(of(step) for step in decode_steps) * 1e3

    print("RESULT " + json.dumps({
        "steps": len(decode_steps),
        "start_s": start_s,
        "parts_ms": {label: median_ms(lambda step: step.get(label, 0.0)) for label in labels},
        "token_ms": median_ms(lambda step: sum(step.values())),
        "vllm_part_ms": median_ms(lambda step: sum(step.values()) - sum(step.get(p, 0.0) for p in LK_PARTS)),
        "in_forward_ms": median_ms(lambda step: sum(step.get(p, 0.0) for p in FORWARD_PARTS)),
    }), flush=True)


def measure(config: str, model: Path, args) -> dict:
    env = bench_model.model_env(config, args.cores, CONFIGS)
    command = [sys.executable, __file__, "--child", str(model), "--tokens", str(args.tokens), "--runs", str(args.runs)]
    # A first start: inductor's own cache of compiled kernels and wrappers, empty for each child.
    with tempfile.TemporaryDirectory(prefix="lvllm-bench-inductor-") as inductor_cache:
        done = subprocess.run(command + (["--eager"] if args.eager else []),
                              env={**env, "TORCHINDUCTOR_CACHE_DIR": inductor_cache}, capture_output=True,
                              text=True, timeout=3600)
    results = [line[len("RESULT "):] for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not results:
        raise SystemExit(f"{config} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(results[-1])


def report(results: dict, layers: int) -> list[str]:
    configs = list(results)
    labels = [label for label, *_ in PHASES if any(label in r["parts_ms"] for r in results.values())]
    lines = harness.markdown_table(["part of a decode step, ms", *configs],
                                   [[label, *(f"{results[c]['parts_ms'].get(label, 0.0):.3f}" for c in configs)]
                                    for label in labels])
    reference = results.get(REFERENCE)
    lines.append(harness.table_row(["**token**", *(f"**{results[c]['token_ms']:.2f}**" for c in configs)]))
    lines.append(harness.table_row(["vLLM's part (token less lk's calls)",
                                    *(f"{results[c]['vllm_part_ms']:.2f}" for c in configs)]))
    lines.append(harness.table_row(["start-up s (LLM(), compile cache off)",
                                    *(f"{results[c]['start_s']:.1f}" for c in configs)]))
    if reference:
        lines.append(harness.table_row(["token vs vllm", *(harness.ratio_cell(
            harness.ratio(results[c]["token_ms"], reference["token_ms"], higher_is_better=False)) for c in configs)]))
    for c in configs:
        in_forward = results[c]["in_forward_ms"]
        lines.append(f"\n{c}: vLLM's part {results[c]['vllm_part_ms']:.2f} ms = in the forward {in_forward:.2f} "
                     f"({in_forward / layers:.3f} a layer of {layers}) + outside it "
                     f"{results[c]['vllm_part_ms'] - in_forward:.2f}")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=bench_model.EXPERTS)
    parser.add_argument("--configs",
                        default=f"lk-int4-all,lk-int4-all-no-shortcuts,lk-int4-all-python-lk-ops,"
                                f"lk-int4-all-python-attention,lk-int4-all-python-wrapper,lk-int4-all-vllm-routers,"
                                f"{REFERENCE}")
    parser.add_argument("--tokens", type=int, default=32, help="decode tokens a generation")
    parser.add_argument("--runs", type=int, default=3, help="generations measured")
    parser.add_argument("--eager", action="store_true", help="enforce_eager (default: torch.compile)")
    parser.add_argument("--cores", default=harness.cpus_text(harness.allowed_cpus()))
    parser.add_argument("--models-dir", type=Path, default=harness.REPO / "build" / "bench-models")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.tokens, args.runs, args.eager)
        return
    configs = harness.choices(parser, "--configs", args.configs, CONFIGS)
    model = bench_model.build(args.models_dir, args.layers, experts=args.experts)
    print(harness.header("bench_step", harness.machine(harness.parse_cpus(args.cores))))
    results = {config: measure(config, model, args) for config in configs}
    print("\n".join(report(results, args.layers)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
