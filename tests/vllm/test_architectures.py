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

import pytest
import torch

import transformers_models
import vllm_models
from architecture_table import BY_KEY
from e2e_common import (EAGER_TORCH_ROPE, SWEEP_LOGPROB_TOL, CachedReference, TransformersReference,
                        assert_close_to_reference, deviations, layer_index, run_llm)


def assert_cpu_rope_still_wrong():
    """vLLM's CPU RoPE op on a (tokens, heads, head_dim) query, against its torch RoPE: a
    one-head key comes out right, the two-head query does not (CPU_ROPE_3D)."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    with set_current_vllm_config(VllmConfig()):
        rope = RotaryEmbedding(32, 32, 64, 10000.0, True, torch.float32)
    positions = torch.arange(6)
    query, key = torch.randn(6, 2, 32), torch.randn(6, 1, 32)
    native_q, native_k = rope.forward_native(positions, query.clone(), key.clone())
    cpu_q, cpu_k = rope.forward_cpu(positions, query.clone(), key.clone())
    assert torch.allclose(cpu_k, native_k, atol=1e-5)
    assert not torch.allclose(cpu_q, native_q, atol=1e-2), "vLLM's CPU RoPE op is right now: drop eager_rope_wrong"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("architectures")

    def get(key: str):
        model = vllm_models.swept_checkpoint(root, key)
        assert json.loads((model / "config.json").read_text())["architectures"] == [BY_KEY[key].name]
        return model

    return get


@pytest.mark.parametrize("key", list(BY_KEY))
def test_lk_on_matches_transformers(checkpoints, key):
    arch = BY_KEY[key]
    model = checkpoints(key)
    if arch.eager_rope_wrong:
        assert_cpu_rope_still_wrong()
    llm_kwargs = EAGER_TORCH_ROPE if arch.eager_rope_wrong else None
    run = run_llm(model, lk=True, llm_kwargs=llm_kwargs)
    for worker in run.report:
        assert {layer_index(n) for n in worker["lk_layers"]} == set(arch.moe_layers), worker
        assert worker["device_layers"] == {}, worker
        assert all(layer["forward_calls"] > 0 for layer in worker["lk_layers"].values()), worker
        # lk read the correction bias from the checkpoint exactly where vLLM's loader skips it.
        assert all(layer["bias_from_checkpoint"] == bool(arch.skipped_bias)
                   for layer in worker["lk_layers"].values()), worker
    reference = CachedReference(TransformersReference(transformers_models.for_transformers(model)))
    assert_close_to_reference(run, reference)
    if arch.own_path_wrong:
        own, _ = deviations(run_llm(model, lk=False, llm_kwargs=llm_kwargs), reference)
        assert max(own) > 100 * SWEEP_LOGPROB_TOL, f"vLLM's own path matches now ({max(own):.3g}): {arch.own_path_wrong}"
