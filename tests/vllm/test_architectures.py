"""MoE architectures beyond the families, swept with lk on against transformers in float64.

Each architecture's checkpoint is written by transformers' own config class and model
(transformers_models.py: 2 layers, hidden size 64, 8 experts, weights redrawn so every norm,
bias and correction bias is off its default), run once in vLLM with lk on (eager, float32)
and compared, token by token, with transformers' float64 forward of the same checkpoint,
within SWEEP_LOGPROB_TOL. Where the table says
vLLM's own CPU path computes the architecture wrong, that run is made too and must still be
wrong, so the claim cannot go stale. Multimodal models run text-only (architecture_table.TEXT_ONLY)
against transformers' whole model; MoE layers only image tokens reach (ERNIE-4.5-VL's vision
experts) are run by lk in the same instance on fixed rows, every expert against float64.
"""

from __future__ import annotations

import json

import pytest
import torch

import transformers_models
import vllm_models
from architecture_table import BY_KEY
from e2e_common import (EAGER_TORCH_ROPE, EXPERTS_TOL, SWEEP_LOGPROB_TOL, CachedReference, TransformersReference,
                        assert_close_to_reference, assert_plan_reads_kv_cache, deviations, experts_float64,
                        layer_index, run_every_expert, run_llm)


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


def assert_cpu_mrope_still_fails():
    """vLLM's CPU M-RoPE op on ERNIE-4.5-VL's rope fails on the offsets argument it passes, while
    the torch path the sweep takes runs (CPU_MROPE_OFFSETS)."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding.ernie45_vl_rope import Ernie4_5_VLRotaryEmbedding

    with set_current_vllm_config(VllmConfig()):
        rope = Ernie4_5_VLRotaryEmbedding(32, 32, 64, 10000.0, False, torch.float32, mrope_section=[6, 6, 4])
    positions = torch.arange(6)
    query, key = torch.randn(6, 64), torch.randn(6, 32)
    with pytest.raises(TypeError, match="positional arguments but 5 were given"):
        rope.forward_cpu(positions, query.clone(), key.clone())
    rope.forward_native(positions, query, key)


def run_settings(arch, model) -> dict:
    """vllm.LLM's arguments beyond run_llm's for the architecture's run."""
    settings = dict(EAGER_TORCH_ROPE) if arch.eager_rope_wrong or arch.eager_mrope_fails else {}
    if arch.wrapper:
        settings["language_model_only"] = True
    if "auto_map" in json.loads((model / "config.json").read_text()):
        settings["trust_remote_code"] = True
    return settings


def assert_image_experts_match_float64(model, arch, outputs):
    """The MoE layers for image tokens, which text prompts never reach, as lk holds them: every
    expert against the checkpoint's in float64. ERNIE-4.5-VL's checkpoints number a layer's vision
    experts after its moe_num_experts[0] text experts (vLLM's load_weights splits them so)."""
    from safetensors.torch import load_file

    tensors = load_file(model / "model.safetensors")
    text_experts = json.loads((model / "config.json").read_text())["moe_num_experts"][0]
    for worker in outputs:
        assert {layer_index(name) for name in worker} == set(arch.moe_layers), list(worker)
        for name, (x, ids, weights, routed) in worker.items():
            expected = experts_float64(tensors, f"model.layers.{layer_index(name)}.mlp.experts", x,
                                       ids + text_experts, weights)
            error = float((routed.double() - expected).norm() / expected.norm())
            assert error < EXPERTS_TOL["float32"], (name, error)


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
    if arch.eager_mrope_fails:
        assert_cpu_mrope_still_fails()
    llm_kwargs = run_settings(arch, model)
    image_experts = ((lambda llm: llm.collective_rpc(run_every_expert, args=(arch.vision_experts,)))
                     if arch.vision_experts else None)
    run = run_llm(model, lk=True, llm_kwargs=llm_kwargs, inspect=image_experts)
    for worker in run.report:
        assert {layer_index(n) for n in worker["lk_layers"]} == set(arch.moe_layers), worker
        assert worker["device_layers"] == {}, worker
        # Text prompts reach every MoE layer but those for image tokens, which lk holds as well.
        for_images = {n for n in worker["lk_layers"] if arch.vision_experts and f".{arch.vision_experts}." in n}
        assert bool(for_images) == bool(arch.vision_experts), worker
        assert all((layer["forward_calls"] > 0) == (name not in for_images)
                   for name, layer in worker["lk_layers"].items()), worker
        # lk read the correction bias from the checkpoint exactly where vLLM's loader skips it.
        assert all(layer["bias_from_checkpoint"] == bool(arch.skipped_bias)
                   for layer in worker["lk_layers"].values()), worker
    if arch.vision_experts:
        assert_image_experts_match_float64(model, arch, run.inspected)
    assert_plan_reads_kv_cache(model, run)
    reference = CachedReference(TransformersReference(transformers_models.for_transformers(model)))
    assert_close_to_reference(run, reference)
    if arch.own_path_wrong:
        own, _ = deviations(run_llm(model, lk=False, llm_kwargs=llm_kwargs), reference)
        assert max(own) > 100 * SWEEP_LOGPROB_TOL, f"vLLM's own path matches now ({max(own):.3g}): {arch.own_path_wrong}"
