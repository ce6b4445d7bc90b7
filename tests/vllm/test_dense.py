"""vLLM's dense layers on lk (LVLLM_DENSE_ON_LK), on the real vLLM CPU engine.

AUTO must take exactly the layers upstream vLLM leaves to torch's F.linear on this CPU
(read from an lk-off run), and every one it takes must have run on lk. ON takes every
unquantized layer: in float32 and compiled, answers match vLLM's own path (oneDNN) as
closely as lk's MoE does.
"""

from __future__ import annotations

import torch

from e2e_common import build_model, run_llm
from test_equivalence import F32_LOGPROB_TOL, max_logprob_diff


def lk_dense(run) -> dict:
    return run.report[0]["dense_layers"]["lk"]


def test_auto_takes_what_vllm_leaves_to_torch_linear(llm_runs):
    off = llm_runs("qwen3_moe", lk=False, dtype="bfloat16")
    on = llm_runs("qwen3_moe", lk=True, dtype="bfloat16")
    left_to_torch = set(off.report[0]["dense_layers"]["torch_linear"])
    assert set(lk_dense(on)) == left_to_torch
    assert on.report[0]["dense_layers"]["torch_linear"] == []
    assert off.report[0]["dense_layers"]["lk"] == {}
    # oneDNN builds no bf16 matmul on an AVX2-only CPU: there the attention projections and
    # the LM head reach F.linear.
    if torch.backends.cpu.get_cpu_capability() == "AVX2":
        assert {"lm_head", "model.layers.0.self_attn.qkv_proj", "model.layers.3.self_attn.o_proj"} <= left_to_torch
    for name, layer in lk_dense(on).items():
        assert layer["forward_calls"] > 0, f"{name}: lk never ran"
        assert layer["nbytes"] > 0


def test_float32_does_not_leave_vllm_in_auto(llm_runs):
    on = llm_runs("qwen3_moe", lk=True)
    assert lk_dense(on) == {} and on.report[0]["dense_layers"]["torch_linear"] == []


def test_on_compiled_same_answers(llm_runs):
    """qwen2_moe: attention with bias, a dense shared expert and its gate, all on lk inside
    torch.compile's graph."""
    off = llm_runs("qwen2_moe", lk=False, eager=False)
    on = llm_runs("qwen2_moe", lk=True, eager=False, dense="ON")
    dense = lk_dense(on)
    for name in ("lm_head", "model.layers.0.self_attn.qkv_proj", "model.layers.0.self_attn.o_proj",
                 "model.layers.0.mlp.shared_expert.gate_up_proj", "model.layers.0.mlp.shared_expert.down_proj",
                 "model.layers.0.mlp.shared_expert_gate"):
        assert dense[name]["forward_calls"] > 0, name
    assert on.tokens == off.tokens
    assert max_logprob_diff(on, off) < F32_LOGPROB_TOL


def test_a_head_tied_to_the_embedding_leaves_lookups_intact(tmp_path_factory):
    """lk takes the LM head of a model whose config ties it to the input embedding; the
    embedding keeps its weight for lookups, and the answers are vLLM's."""
    model = build_model(tmp_path_factory.mktemp("tied") / "model", "qwen3_moe", "--tie-word-embeddings")
    off = run_llm(model, lk=False)
    on = run_llm(model, lk=True, dense="ON")
    assert lk_dense(on)["lm_head"]["forward_calls"] > 0
    assert on.tokens == off.tokens
    assert max_logprob_diff(on, off) < F32_LOGPROB_TOL
