"""vLLM's dense layers on lk (LVLLM_DENSE_ON_LK, LVLLM_DENSE_USE_WEIGHT), on the real vLLM
CPU engine.

AUTO must take exactly the layers upstream vLLM leaves to torch's F.linear on this CPU
(read from an lk-off run), and every one it takes must have run on lk. ON takes every
unquantized layer: in float32, answers match vLLM's own path (oneDNN) as closely as lk's MoE
does (compiled: test_equivalence.test_compiled_same_answers). INT8 / INT4 everywhere (experts and dense layers) is checked
against transformers' float64 forward of the same checkpoint, beside lk with bf16 dense
layers and the same experts, which bounds what quantizing the dense layers adds.
"""

from __future__ import annotations

import statistics

import pytest
import torch

from e2e_common import (F32_LOGPROB_TOL, CachedReference, TransformersReference, build_model, deviations,
                        max_logprob_diff, run_llm)


def test_quantized_dense_layers_are_refused_with_a_gpu(monkeypatch):
    """INT8/INT4 dense layers are lk's on the CPU build only: with a GPU start-up stops and
    names the variable, rather than serving unquantized layers silently."""
    import types

    from lvllm.envs import EnvError
    from lvllm.settings import Settings
    from lvllm.vllm import dense

    monkeypatch.setattr(dense, "current_platform", types.SimpleNamespace(is_cpu=lambda: False))
    for method in (dense.UnquantizedLinearMethod, dense.UnquantizedEmbeddingMethod):   # restored after
        monkeypatch.setattr(method, "process_weights_after_loading", method.process_weights_after_loading)
    with pytest.raises(EnvError, match="LVLLM_DENSE_USE_WEIGHT=INT4 .* with a GPU .* TO_DTYPE"):
        dense.install(types.SimpleNamespace(settings=Settings(dense_weight_mode="INT4")))
    dense.install(types.SimpleNamespace(settings=Settings()))   # the default: vLLM's own, untouched
    assert not hasattr(dense.UnquantizedLinearMethod.process_weights_after_loading, "lvllm_wraps")


def lk_dense(run) -> dict:
    return run.report[0]["dense_layers"]["lk"]


def routers(run) -> set[str]:
    """The routers of the MoE layers lk computed (``model.layers.N.mlp.gate``, Qwen's names)."""
    return {name.split(".mlp.")[0] + ".mlp.gate" for name in run.report[0]["lk_layers"]}


def test_auto_takes_what_vllm_leaves_to_torch_linear(llm_runs):
    off = llm_runs("qwen3_moe", lk=False, dtype="bfloat16")
    on = llm_runs("qwen3_moe", lk=True, dtype="bfloat16")
    left_to_torch = set(off.report[0]["dense_layers"]["torch_linear"])
    # ... and the routers (LVLLM_ROUTERS_ON_LK), in bf16 as they are.
    assert routers(on) and set(lk_dense(on)) == left_to_torch | routers(on)
    assert all(lk_dense(on)[name]["format"] == "bf16" for name in routers(on))
    assert on.report[0]["dense_layers"]["torch_linear"] == []
    assert off.report[0]["dense_layers"]["lk"] == {}
    # oneDNN builds no bf16 matmul on an AVX2-only CPU: there the attention projections and
    # the LM head reach F.linear.
    if torch.backends.cpu.get_cpu_capability() == "AVX2":
        assert {"lm_head", "model.layers.0.self_attn.qkv_proj", "model.layers.3.self_attn.o_proj"} <= left_to_torch
    for name, layer in lk_dense(on).items():
        assert layer["forward_calls"] > 0, f"{name}: lk never ran"
        assert layer["nbytes"] > 0


def test_float32_leaves_vllm_only_the_routers_in_auto(llm_runs, tiny_model):
    """In float32 vLLM has a kernel for every dense layer: AUTO takes none but the routers, in
    float32; with LVLLM_ROUTERS_ON_LK=0 it takes none at all."""
    on = llm_runs("qwen3_moe", lk=True)
    assert set(lk_dense(on)) == routers(on) and routers(on)
    assert all(layer["format"] == "fp32" and layer["forward_calls"] > 0 for layer in lk_dense(on).values())
    assert on.report[0]["dense_layers"]["torch_linear"] == []
    without = run_llm(tiny_model("qwen3_moe"), lk=True, env={"LVLLM_ROUTERS_ON_LK": "0"})
    assert lk_dense(without) == {} and without.report[0]["dense_layers"]["torch_linear"] == []
    assert without.tokens == on.tokens


def test_a_head_tied_to_the_embedding_leaves_lookups_intact(tmp_path_factory):
    """lk takes the LM head of a model whose config ties it to the input embedding; the
    embedding keeps its weight for lookups, and the answers are vLLM's."""
    model = build_model(tmp_path_factory.mktemp("tied") / "model", "qwen3_moe", "--tie-word-embeddings")
    off = run_llm(model, lk=False)
    on = run_llm(model, lk=True, dense="ON")
    assert lk_dense(on)["lm_head"]["forward_calls"] > 0
    assert on.tokens == off.tokens
    assert max_logprob_diff(on, off) < F32_LOGPROB_TOL


# Prompt-logprob deviation from float64 on qwen2_moe (bf16, random weights), median / max, as
# measured: lk bf16 0.017 / 0.054; INT8 experts 0.015 / 0.12, INT8 everywhere 0.018 / 0.12;
# INT4 experts 0.085 / 0.30, INT4 everywhere 0.42 / 1.07 (random weights spread every group
# evenly, so INT4's 16 levels cost each matrix ~10%, compounding over the layers). Bounds:
# about 2x the worst seen, and INT8 dense layers may add little to INT8 experts' median.
QUANTIZED_DENSE = {"INT8": (0.05, 0.3), "INT4": (0.8, 2.2)}
INT8_DENSE_MEDIAN_GROWTH = 0.02


@pytest.fixture(scope="module")
def qwen2_reference(tiny_model):
    return CachedReference(TransformersReference(tiny_model("qwen2_moe")))


@pytest.mark.parametrize("weight", ["INT8", "INT4"])
def test_quantized_dense_layers_against_float64(llm_runs, qwen2_reference, weight):
    """Every float dense layer (attention with bias, the shared expert and its gate, the LM
    head) on lk in the asked format, the routers in bf16; answers within the format's cost
    of float64."""
    everywhere = llm_runs("qwen2_moe", lk=True, dtype="bfloat16", weight=weight, dense_weight=weight)
    dense = lk_dense(everywhere)
    expected = f"{weight.lower()} g{256 if weight == 'INT8' else 128}"
    for name in ("lm_head", "model.layers.0.self_attn.qkv_proj", "model.layers.3.self_attn.o_proj",
                 "model.layers.0.mlp.shared_expert.gate_up_proj", "model.layers.0.mlp.shared_expert.down_proj",
                 "model.layers.0.mlp.shared_expert_gate"):
        assert dense[name]["format"] == expected and dense[name]["forward_calls"] > 0, (name, dense[name])
    # Routers stay as they are, in bf16 (LVLLM_ROUTERS_ON_LK).
    assert routers(everywhere) and all(dense[name]["format"] == "bf16" for name in routers(everywhere)), dense
    # Held bytes follow the format: INT4 a quarter of bf16's plus scales, INT8 a half.
    qkv = dense["model.layers.0.self_attn.qkv_proj"]
    assert qkv["nbytes"] < (0.3 if weight == "INT4" else 0.55) * 2 * qkv["weights"]

    median_bound, max_bound = QUANTIZED_DENSE[weight]
    prompt, _ = deviations(everywhere, qwen2_reference)
    described = f"{weight} everywhere: median {statistics.median(prompt):.3g}, max {max(prompt):.3g}"
    assert statistics.median(prompt) < median_bound, described
    assert max(prompt) < max_bound, described
    if weight == "INT8":  # against the same INT8 experts with bf16 dense layers
        baseline, _ = deviations(llm_runs("qwen2_moe", lk=True, dtype="bfloat16", weight=weight), qwen2_reference)
        assert statistics.median(prompt) <= statistics.median(baseline) + INT8_DENSE_MEDIAN_GROWTH, (
            described, statistics.median(baseline))

