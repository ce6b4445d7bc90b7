"""The hot-expert simulator (lvllm/hot_experts.py) against hand-computed splits, and its
synthetic counts against the distribution they are drawn from."""

from __future__ import annotations

import math

import pytest

from lvllm import hot_experts


def test_shares_and_decode_bounds_by_hand():
    # 2 layers of 4 experts, top-1, 1 GB an expert, 10 GB/s. Layer 0: [6, 2, 1, 1]; layer 1:
    # [1, 1, 1, 7]. One slot a layer: 6 + 7 of 20 picks on the GPU; the host reads
    # 2 layers x 1 pick x 7/20 x 1 GB a token: 10 / 0.7 = 14.29 tok/s. The same 2 GB hold no
    # whole layer (4 GB): 0 on the GPU, 10 / 2 = 5 tok/s. Two slots: 8 + 8 of 20; 4 GB hold
    # layer 0 whole (10 of 20 picks).
    counts = {0: [6, 2, 1, 1], 1: [1, 1, 1, 7]}
    one, two = hot_experts.splits(counts, top_k=1, expert_bytes=10**9, bandwidth_gbs=10, slot_options=(1, 2))
    assert (one.gpu_bytes, one.hot_share, one.layers, one.layer_share) == (2 * 10**9, 13 / 20, 0, 0)
    assert one.hot_tok_s == pytest.approx(10 / (2 * 7 / 20)) and one.layer_tok_s == pytest.approx(5)
    assert (two.hot_share, two.layers, two.layer_share) == (16 / 20, 1, 10 / 20)
    assert two.layer_tok_s == pytest.approx(10 / (2 * 0.5))
    assert hot_experts.splits(counts, 1, 10**9, 10, (4,))[0].hot_tok_s == math.inf


def test_synthetic_picks_follow_their_weights():
    """top-1: each expert is picked with its Zipf weight (within 5 standard deviations)."""
    tokens = 20000
    counts = hot_experts.synthetic_counts(1, 16, 1, skew=1.0, tokens=tokens, seed=3)[0]
    weights = hot_experts.zipf_probabilities(16, 1.0, seed=3 * 1000 + 0)
    for count, weight in zip(counts, weights.tolist()):
        assert abs(count - tokens * weight) < 5 * math.sqrt(tokens * weight * (1 - weight)) + 1


def test_uniform_routing_gains_nothing_and_strong_skew_most():
    uniform = hot_experts.synthetic_counts(4, 64, 4, skew=0.0, tokens=5000)
    assert all(sum(c) == 5000 * 4 for c in uniform.values())   # top-k distinct picks a token
    assert hot_experts.device_share(uniform, 16) == pytest.approx(0.25, abs=0.02)
    skewed = hot_experts.synthetic_counts(4, 64, 4, skew=3.0, tokens=5000)
    assert hot_experts.device_share(skewed, 8) > 0.9


@pytest.mark.parametrize("follow_traffic", [False, True])
def test_hot_experts_of_an_fp8_checkpoint_are_lks_values_in_the_model_dtype(tmp_path, monkeypatch, follow_traffic):
    """An FP8 layer's hot experts are unpacked from lk's memory into float32 slots (the model's
    dtype, not the checkpoint's): the file's 3 hottest, each the FP8 values times their scales
    exactly; vLLM's CPU kernel over them plus lk over the other pairs is the layer's float64
    output, to fp32 rounding. With swaps while serving (follow_traffic) likewise."""
    from types import SimpleNamespace

    import torch

    from lvllm import expert_stats
    from lvllm.hybrid import HybridExperts
    from lvllm.vllm import hot_device

    from .lk.helpers import TIGHT, random_fp8, random_routing, reference_moe

    experts, hidden, inter = 8, 128, 64
    (w13, ref13), (w2, ref2) = random_fp8(experts, 2 * inter, hidden, 128, 1), random_fp8(experts, hidden, inter, 128, 2)
    layer = HybridExperts(w13, w2, "silu", layer_name="model.layers.0.mlp.experts")
    identity = {"name": "m", "architectures": ["Qwen3MoeForCausalLM"], "num_hidden_layers": 1,
                "num_experts": experts, "top_k": 2}
    monkeypatch.setattr(hot_device, "model_identity", lambda moe_config: identity)
    counts = [5, 40, 1, 30, 2, 3, 50, 4]
    stats = tmp_path / "stats.json"
    expert_stats.write(stats, identity, "dp0-pp0", {0: counts})
    fake = SimpleNamespace(layer_name=layer.layer_name, activation=SimpleNamespace(value="silu"))
    moe_config = SimpleNamespace(has_bias=False, in_dtype=torch.float32)
    hot = hot_device.hot_set(fake, 0, w13, w2, 3, str(stats), moe_config, torch.device("cpu"), layer.engine,
                             follow_traffic=follow_traffic)
    assert sorted(hot.experts) == [1, 3, 6]
    x = torch.randn(16, hidden, generator=torch.Generator().manual_seed(3))
    ids, weights = random_routing(16, experts, 2, seed=4, id_dtype=torch.int64)
    lk_ids, device_ids, device_weights = hot.split(ids, weights)
    assert (lk_ids >= 0).sum() < ids.numel()   # some pairs are hot
    hot_only = torch.where(lk_ids < 0, ids, -1)
    device_out = hot.compute(x, device_weights, device_ids).double()
    hot_ref = reference_moe(ref13, ref2, x, hot_only.clamp(min=0), weights * (hot_only >= 0))
    assert ((device_out - hot_ref).abs() <= TIGHT * hot_ref.abs().max().item()).all()
    total = device_out + layer.engine.forward(x, lk_ids, weights).double()
    ref = reference_moe(ref13, ref2, x, ids, weights)
    assert ((total - ref).abs() <= 2 * TIGHT * ref.abs().max().item()).all()
