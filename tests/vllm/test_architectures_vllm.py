"""MoE architectures transformers 5.19 does not have, swept with lk on against vLLM's own CPU
path (lk off) on the same checkpoint.

Each checkpoint is written by vllm_models.py (2 layers, hidden size 64, 8 experts, seeded random
weights with every norm, bias and router correction bias off its default, tensors named as the
real checkpoints name them) and run twice in vLLM, eager, float32: lk on, then lk off. lk must
have computed every MoE layer (lk_report), the greedy outputs must not be degenerate, the greedy
tokens must be the same and every prompt logprob within VLLM_LOGPROB_TOL of the lk-off run's.
"""

from __future__ import annotations

import pytest

import vllm_models
from architecture_table import VLLM_BY_KEY
from e2e_common import assert_plan_reads_kv_cache, assert_upstream, layer_index, run_llm

# Both runs are float32 and differ only in how the routed experts are summed (lk's kernels vs
# vLLM's CPU MoE kernel): float32 rounding (6e-8 relative) over 2 layers of dot products up to
# 128 long moves unit-scale logits by about 1e-6 (test_architectures measures 3e-7 to 3.2e-6
# against float64); 1e-4 leaves room for that and none for a wrong expert, weight or bias
# (each moves logprobs by 1e-2 and more).
VLLM_LOGPROB_TOL = 1e-4
# vllm_models' checkpoints carry their config class as remote code.
REMOTE_CONFIG = {"trust_remote_code": True}
# MiMo-V2: its sliding-window layer has attention sinks, which LVLLM_CPU_NATIVE_ATTENTION leaves
# to vLLM's Python; its full-attention layer runs from C++: both paths in one step.
BOTH_ATTENTION_PATHS = {"MiMoV2ForCausalLM"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_architectures")

    return lambda key: vllm_models.swept_checkpoint(root, key)


def lk_off_deviation(lk, own) -> float:
    assert [len(p) for p in lk.prompt_logprobs] == [len(p) for p in own.prompt_logprobs]
    return max(abs(a - b) for pa, pb in zip(lk.prompt_logprobs, own.prompt_logprobs) for a, b in zip(pa, pb))


@pytest.mark.parametrize("key", list(VLLM_BY_KEY))
def test_lk_on_matches_lk_off(checkpoints, key):
    arch = VLLM_BY_KEY[key]
    model = checkpoints(key)
    run = run_llm(model, lk=True, llm_kwargs=REMOTE_CONFIG)
    for worker in run.report:
        assert {layer_index(n) for n in worker["lk_layers"]} == set(arch.moe_layers), worker
        assert worker["device_layers"] == {}, worker
        assert all(layer["forward_calls"] > 0 for layer in worker["lk_layers"].values()), worker
        assert not any(layer["bias_from_checkpoint"] for layer in worker["lk_layers"].values()), worker
    assert any(len(set(tokens)) > 3 for tokens in run.tokens), f"degenerate greedy output: {run.tokens}"
    assert_plan_reads_kv_cache(model, run)
    calls = run.report[0]["attention_calls"]
    if key in BOTH_ATTENTION_PATHS:
        assert calls["native"] > 0 and calls["vllm"] > 0, calls
    own = run_llm(model, lk=False, llm_kwargs=REMOTE_CONFIG)
    assert_upstream(own.report)
    deviation = lk_off_deviation(run, own)
    assert deviation < VLLM_LOGPROB_TOL, f"prompt logprobs {deviation:.3g} from lk off"
    assert run.tokens == own.tokens, f"greedy tokens differ (prompt logprobs {deviation:.3g} apart)"
    print(f"{key}: prompt logprobs {deviation:.3g} from lk off; attention calls {calls}")
