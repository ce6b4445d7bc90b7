"""Same answers with lk on and off, on the real vLLM CPU engine, for each tiny MoE family.

float32: greedy tokens identical, prompt logprobs within 1e-3 (measured: ~3e-6).
bfloat16: both sides round to bf16 at different points (vLLM's CPU kernel vs lk), so the
yardstick is the float32 run: lk in bf16 must stay as close to it as vLLM's own bf16 MoE
does (within BF16_SLACK x vLLM's deviation + 0.05; measured on the tiny Qwen3-MoE: vLLM bf16
0.35, lk bf16 0.15 max prompt-logprob deviation), lk vs vLLM in bf16 within BF16_LOGPROB_TOL,
and the first BF16_SAME_PREFIX greedy tokens identical (tokens may part after a near tie).
The bounds are e2e_common's, which test_families and test_dense hold their runs to as well.

Every lk run also proves lk computed: each lk layer's engine counted forwards, and vLLM's
own copies of its expert weights are gone (zero-size host tensors).
"""

from __future__ import annotations

import re

import pytest

from e2e_common import (BF16_LOGPROB_TOL, BF16_SAME_PREFIX, BF16_SLACK, CPUS, F32_LOGPROB_TOL, FAMILIES, PROMPTS,
                        assert_lk_computed, assert_plan_reads_kv_cache, assert_upstream, layer_index,
                        max_logprob_diff, run_llm)

from lvllm.layer_ranges import format_ranges as format_layers

# Layers whose routed experts go to lk in the lk-on runs; deepseek_v2 also checks a resident
# spec: layer 0 is dense, layer 1 stays on vLLM's path, 2-3 run on lk.
LK_RUN = {
    "qwen3_moe": dict(resident=None, lk_layers={0, 1, 2, 3}),
    "qwen2_moe": dict(resident=None, lk_layers={0, 1, 2, 3}),
    "deepseek_v2": dict(resident="1", lk_layers={2, 3}),
    "mixtral": dict(resident=None, lk_layers={0, 1, 2, 3}),
}


def runs_on_openmp_team(summary: str, threads: int, cores: list[int]) -> bool:
    """The start-up line says lk runs ``threads`` threads, the worker's OpenMP team, on
    ``cores``."""
    return re.search(rf"\b{threads} threads \([^)]*OpenMP[^)]*\bcores {re.escape(format_layers(cores))}\)",
                     summary) is not None


def assert_step_levers(on_report, off_report, served_layers: int = 4):
    """lk on: each step's attention ops ran from C++ (LVLLM_CPU_NATIVE_ATTENTION), two a layer,
    none through vLLM's Python (its warm-up runs before the table exists); a model whose layers
    vLLM's CPU attention does not serve (MLA calls other ops) gets no table. Every lk forward,
    experts and dense layers, went through lk's ops' C++ kernels (LVLLM_CPU_NATIVE_LK_OPS). The
    step's shortcuts (LVLLM_CPU_STEP_SHORTCUTS) were taken. lk off: vLLM's own."""
    calls = on_report[0]["attention_calls"]
    if served_layers:
        assert calls["native"] > 0 and calls["native"] % (2 * served_layers) == 0, calls
        assert calls["vllm"] == 0, calls
    else:
        assert calls is None, calls
    for worker in on_report:
        forwards = [layer["forward_calls"] for layer in worker["lk_layers"].values()]
        forwards += [layer["forward_calls"] for layer in worker["dense_layers"]["lk"].values()]
        assert worker["native_lk_op_calls"] == sum(forwards) > 0, (worker["native_lk_op_calls"], forwards)
        # Batches of several requests take neither the one-token inputs nor, with 512 tokens in the
        # tiny models' vocabulary, numpy's argmax (test_cpu_step holds it against vLLM's at 152k).
        shortcuts = worker["step_shortcuts"]
        assert shortcuts["copy_to_gpu"] > 0 and shortcuts["slot_mapping"] > 0, shortcuts
    assert [w["attention_calls"] for w in off_report] == [None]
    assert [w["native_lk_op_calls"] for w in off_report] == [None]
    assert [w["step_shortcuts"] for w in off_report] == [None]


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_same_answers(llm_runs, tiny_model, family):
    spec = LK_RUN[family]
    off = llm_runs(family, lk=False)
    on = llm_runs(family, lk=True, resident=spec["resident"])
    assert_upstream(off.report)
    assert_plan_reads_kv_cache(tiny_model(family), off)
    moe_layers = {0, 1, 2, 3} - ({0} if family == "deepseek_v2" else set())
    assert_lk_computed(on.report, spec["lk_layers"], moe_layers - spec["lk_layers"])
    assert_step_levers(on.report, off.report, served_layers=0 if family == "deepseek_v2" else 4)
    assert on.tokens == off.tokens
    assert max_logprob_diff(on, off) < F32_LOGPROB_TOL
    # Random weights, but not degenerate: the greedy outputs are not one token repeated.
    assert any(len(set(t)) > 3 for t in off.tokens)
    assert len(on.tokens) == len(PROMPTS)
    # lk runs on the worker's OpenMP team, one thread per core vLLM bound the worker to.
    assert runs_on_openmp_team(on.report[0]["summary"], len(CPUS), CPUS), on.report[0]["summary"]


def test_bfloat16_close_answers(llm_runs):
    f32 = llm_runs("qwen3_moe", lk=False)
    off = llm_runs("qwen3_moe", lk=False, dtype="bfloat16")
    on = llm_runs("qwen3_moe", lk=True, dtype="bfloat16")
    assert_lk_computed(on.report, {0, 1, 2, 3})
    assert "(bf16," in on.report[0]["summary"]
    vllm_error = max_logprob_diff(off, f32)
    assert max_logprob_diff(on, f32) <= BF16_SLACK * vllm_error + 0.05
    assert max_logprob_diff(on, off) < BF16_LOGPROB_TOL
    for a, b in zip(on.tokens, off.tokens):
        assert a[:BF16_SAME_PREFIX] == b[:BF16_SAME_PREFIX]


def test_compiled_same_answers(llm_runs):
    """torch.compile (Dynamo + Inductor on CPU): lk sits in opaque custom ops, the dense
    layers' too (qwen2_moe: attention with bias, a dense shared expert and its gate, all on
    lk); with lk on inductor's C++ wrapper runs the forward (LVLLM_CPU_CPP_WRAPPER, the
    default), lk off vLLM's own Python one."""
    off = llm_runs("qwen2_moe", lk=False, eager=False)
    on = llm_runs("qwen2_moe", lk=True, eager=False, dense="ON", cpp_wrapper=True)
    assert_lk_computed(on.report, {0, 1, 2, 3})
    dense = on.report[0]["dense_layers"]["lk"]
    for name in ("lm_head", "model.layers.0.self_attn.qkv_proj", "model.layers.0.self_attn.o_proj",
                 "model.layers.0.mlp.shared_expert.gate_up_proj", "model.layers.0.mlp.shared_expert.down_proj",
                 "model.layers.0.mlp.shared_expert_gate"):
        assert dense[name]["forward_calls"] > 0, name
    assert [w["compile_wrapper"] for w in on.report] == ["cpp"]
    assert [w["compile_wrapper"] for w in off.report] == [None]
    assert_step_levers(on.report, off.report)
    assert on.tokens == off.tokens
    assert max_logprob_diff(on, off) < F32_LOGPROB_TOL
    # And compiled agrees with eager.
    eager = llm_runs("qwen2_moe", lk=True)
    assert on.tokens == eager.tokens


def test_tensor_parallel_2(llm_runs):
    """TP=2: each rank's engine holds its slice of every expert; answers match TP=1."""
    tp1 = llm_runs("qwen3_moe", lk=False)
    tp2 = llm_runs("qwen3_moe", lk=True, tp=2)
    assert len(tp2.report) == 2
    # Each rank's engine runs on its own worker's OpenMP team, on that rank's share of the
    # cores (run_llm binds rank r to the r-th share).
    share = max(1, len(CPUS) // 2)
    for rank, worker in enumerate(tp2.report):
        cores = [CPUS[(rank * share + i) % len(CPUS)] for i in range(share)]
        assert runs_on_openmp_team(worker["summary"], share, cores), worker["summary"]
    assert_lk_computed(tp2.report, {0, 1, 2, 3})
    assert tp2.tokens == tp1.tokens
    assert max_logprob_diff(tp2, tp1) < F32_LOGPROB_TOL


def test_expert_parallel_2(llm_runs, tiny_model):
    """EP=2 (TP=2 with enable_expert_parallel): each rank's lk holds only the experts vLLM's
    expert map gives it, half of them; answers match lk off at TP=2 without EP (vLLM's CPU
    MoE kernels take no expert map, so lk off cannot run EP here)."""
    tp2_off = llm_runs("qwen3_moe", lk=False, tp=2)
    one_rank = llm_runs("qwen3_moe", lk=True)
    ep2 = run_llm(tiny_model("qwen3_moe"), lk=True, tp=2, llm_kwargs={"enable_expert_parallel": True})
    assert len(ep2.report) == 2
    assert_lk_computed(ep2.report, {0, 1, 2, 3})
    whole = {layer_index(n): v for n, v in one_rank.report[0]["lk_layers"].items()}
    for worker in ep2.report:
        for name, layer in worker["lk_layers"].items():
            assert 2 * layer["num_experts"] == whole[layer_index(name)]["num_experts"], (name, layer)
            assert 2 * layer["nbytes"] == whole[layer_index(name)]["nbytes"], (name, layer)
    assert ep2.tokens == tp2_off.tokens
    assert max_logprob_diff(ep2, tp2_off) < F32_LOGPROB_TOL


def test_pipeline_parallel_2(llm_runs, tiny_model):
    """PP=2: each stage's lk holds only its own layers, LVLLM_GPU_RESIDENT_MOE_LAYERS keeps
    naming the model's layer indices, each stage logs its placement, answers match PP=1.
    Compiled: in eager mode vLLM's CPU runner (0.32) never sizes a later stage's input
    buffers (it does so in the compile warm-up) and fails with lk on or off."""
    pp1 = llm_runs("qwen3_moe", lk=False)
    pp2 = run_llm(tiny_model("qwen3_moe"), lk=True, eager=False, resident="1",
                  llm_kwargs={"pipeline_parallel_size": 2})
    assert len(pp2.report) == 2
    stages = [({0}, {1}, "0-1"), ({2, 3}, set(), "2-3")]
    for rank, (worker, (on_lk, on_device, layers)) in enumerate(zip(pp2.report, stages)):
        assert_lk_computed([worker], on_lk, on_device)
        # The stage, the model layers it holds, and its MoE layers on lk (assert_lk_computed).
        assert re.search(rf"\bstage {rank} of 2\b[^:]*\bmodel layers {layers}\b", worker["summary"]), worker["summary"]
        assert "non-MoE" not in worker["summary"]
    assert pp2.tokens == pp1.tokens
    assert max_logprob_diff(pp2, pp1) < F32_LOGPROB_TOL
