"""MoE architectures beyond the families, swept with lk on against transformers in float64.

Each architecture's checkpoint is written by transformers' own config class and model
(transformers_models.py: 2 layers, hidden size 64, 8 experts, weights redrawn so every norm,
bias and correction bias is off its default), run once in vLLM with lk on (eager, float32)
and compared, token by token, with transformers' float64 forward of the same checkpoint,
within SWEEP_LOGPROB_TOL. Where the table says
vLLM's own CPU path computes the architecture wrong, that run is made too and must still be
wrong, so the claim cannot go stale.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field

import pytest

import transformers_models
from e2e_common import CachedReference, TransformersReference, deviations, layer_index, run_llm


# float32 rounding (6e-8 relative) over 2 layers of dot products up to 128 long moves unit-scale
# logits by about 1e-6 (measured: 3e-7 to 3.2e-6); the families' looser F32_LOGPROB_TOL would
# pass GELU's erf form for Gemma 4's tanh form (3.7e-4 apart).
SWEEP_LOGPROB_TOL = 1e-4


@dataclass(frozen=True)
class Architecture:
    name: str                        # vLLM's registered architecture (config.json "architectures")
    model_type: str                  # transformers' config class
    config: dict = field(default_factory=dict)   # beyond transformers_models.COMMON
    moe_layers: frozenset[int] = frozenset({0, 1})
    own_path_wrong: str = ""         # why vLLM's own CPU path computes it wrong (its run must differ)

    @property
    def key(self) -> str:
        return self.name


EXPERTS = {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64}

SWEPT = (
    Architecture("Ernie4_5_MoeForCausalLM", "ernie4_5_moe",
                 {"moe_num_experts": 8, "moe_k": 2, "moe_intermediate_size": 64, "moe_num_shared_experts": 1,
                  "moe_layer_start_index": 0, "moe_layer_end_index": 1},
                 own_path_wrong="vLLM's CPU router drops the softmax router's e_score_correction_bias "
                                "(vllm/model_executor/layers/fused_moe/router/cpu_router.py, _softmax_topk), "
                                "so other experts are picked than the checkpoint's; lk routes with it"),
    Architecture("Llama4ForCausalLM", "llama4_text",
                 {"num_local_experts": 8, "num_experts_per_tok": 1, "intermediate_size": 64,
                  "intermediate_size_mlp": 128, "interleave_moe_layer_step": 1, "moe_layers": [0, 1],
                  "no_rope_layers": [1, 0], "layer_types": ["chunked_attention", "full_attention"],
                  "attention_chunk_size": 128}),
    Architecture("Gemma4ForCausalLM", "gemma4_text",
                 {"enable_moe_block": True, "num_experts": 8, "top_k_experts": 2, "moe_intermediate_size": 64,
                  "hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 512,
                  "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 64}),
)
BY_KEY = {a.key: a for a in SWEPT}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("architectures")

    def get(key: str):
        arch = BY_KEY[key]
        model = transformers_models.build(root / key, arch.model_type, arch.name, arch.config)
        assert json.loads((model / "config.json").read_text())["architectures"] == [arch.name]
        return model

    return get


def assert_close_to_reference(run, reference) -> str:
    prompt, shortfalls = deviations(run, reference)
    described = (f"prompt logprobs max {max(prompt):.3g}, median {statistics.median(prompt):.3g}; "
                 f"greedy tokens' shortfalls {[round(max(s), 4) for s in shortfalls]}")
    assert any(len(set(tokens)) > 3 for tokens in run.tokens), f"degenerate greedy output: {run.tokens}"
    assert max(prompt) < SWEEP_LOGPROB_TOL, described
    assert max(max(s) for s in shortfalls) <= SWEEP_LOGPROB_TOL, described
    return described


@pytest.mark.parametrize("key", list(BY_KEY))
def test_lk_on_matches_transformers(checkpoints, key):
    arch = BY_KEY[key]
    model = checkpoints(key)
    run = run_llm(model, lk=True)
    for worker in run.report:
        assert {layer_index(n) for n in worker["lk_layers"]} == set(arch.moe_layers), worker
        assert worker["device_layers"] == {}, worker
        assert all(layer["forward_calls"] > 0 for layer in worker["lk_layers"].values()), worker
    reference = CachedReference(TransformersReference(model))
    assert_close_to_reference(run, reference)
    if arch.own_path_wrong:
        own, _ = deviations(run_llm(model, lk=False), reference)
        assert max(own) > 100 * SWEEP_LOGPROB_TOL, f"vLLM's own path matches now ({max(own):.3g}): {arch.own_path_wrong}"
