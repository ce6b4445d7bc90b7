"""Routing statistics (LVLLM_EXPERT_STATS) on the real vLLM CPU engine: the counts written are
the router picks a float64 forward of the checkpoint makes for the tokens the run processed, in
every path (lk layers and a resident one), without changing an answer; a restarted worker goes on
from its file and refuses another model's. (Kept when `vllm serve` stops: test_shutdown.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from e2e_common import F32_LOGPROB_TOL, TransformersReference, max_logprob_diff, run_llm

from lvllm import expert_stats

# Router logits of the k-th and (k+1)-th expert closer than this, in the float64 forward, make a
# token's pick ambiguous between vLLM's float32 and float64: such a token may move one pick.
NEAR_TIE = 1e-3


def reference_picks(model, runs) -> tuple[dict[int, list[int]], dict[int, int]]:
    """Per layer: how often the float64 forward's router picks each expert over the tokens vLLM
    ran (each prompt, then each generated token but the last), and how many picks were near ties."""
    reference = TransformersReference(model)
    top_k = reference.model.config.num_experts_per_tok
    counts: dict[int, torch.Tensor] = {}
    near_ties: dict[int, int] = {}
    for prompt_ids, generated in zip(runs.prompt_token_ids, runs.tokens):
        ids = torch.tensor([prompt_ids + generated[:-1]])
        with torch.no_grad():
            logits = reference.model(ids, use_cache=False, output_router_logits=True).router_logits
        for layer, layer_logits in enumerate(logits):
            ranked = layer_logits.double().sort(dim=-1, descending=True).values
            picks = layer_logits.topk(top_k, dim=-1).indices.reshape(-1)
            into = counts.setdefault(layer, torch.zeros(layer_logits.shape[-1], dtype=torch.int64))
            into += torch.bincount(picks, minlength=layer_logits.shape[-1])
            gap = ranked[:, top_k - 1] - ranked[:, top_k]
            near_ties[layer] = near_ties.get(layer, 0) + int((gap < NEAR_TIE).sum())
    return {layer: c.tolist() for layer, c in counts.items()}, near_ties


def test_counts_are_the_routers_picks_in_every_path(llm_runs, tiny_model, tmp_path, monkeypatch):
    """Layer 1 resident (vLLM's CPU kernel), 0, 2, 3 on lk: each layer's counts equal the
    float64 reference's picks, a near tie aside; the answers are those of lk off."""
    stats = tmp_path / "stats.json"
    monkeypatch.setenv("LVLLM_EXPERT_STATS", str(stats))
    monkeypatch.setenv("LVLLM_EXPERT_STATS_INTERVAL", "0")
    model = tiny_model("qwen3_moe")
    run = run_llm(model, lk=True, resident="1", eager=False,
                  inspect=lambda llm: llm.collective_rpc("lvllm_write_expert_stats"))
    off = llm_runs("qwen3_moe", lk=False)
    assert run.tokens == off.tokens
    assert max_logprob_diff(run, off) < F32_LOGPROB_TOL

    data = json.loads(stats.read_text())
    assert list(data["writers"]) == ["dp0-pp0"]
    assert data["model"] == {"name": str(model), "architectures": ["Qwen3MoeForCausalLM"],
                             "num_hidden_layers": 4, "num_experts": 8, "top_k": 2}
    counted = expert_stats.layer_totals(data)
    expected, near_ties = reference_picks(model, run)
    assert sorted(counted) == sorted(expected) == [0, 1, 2, 3]
    tokens = sum(len(p) + len(g) - 1 for p, g in zip(run.prompt_token_ids, run.tokens))
    for layer in expected:
        assert sum(counted[layer]) == 2 * tokens, layer
        assert near_ties[layer] <= tokens // 10, (layer, near_ties)   # the check keeps its teeth
        moved = sum(abs(a - b) for a, b in zip(counted[layer], expected[layer]))
        assert moved <= 2 * near_ties[layer], (layer, counted[layer], expected[layer], near_ties[layer])


class Router:
    def __init__(self, picks: torch.Tensor):
        self.picks = picks

    def select_experts(self, hidden_states):
        return torch.ones_like(self.picks, dtype=torch.float32), self.picks


def counter_with_layers(path, picks: dict[int, list[list[int]]], writes: bool = True):
    """A RoutingCounter over stand-in runners whose routers pick ``picks[layer]``, each asked once."""
    from lvllm.vllm.routing_stats import RoutingCounter

    counter = RoutingCounter(str(path), 0, writer="dp0-pp0", writes=writes)
    model = {"name": "m", "architectures": ["X"], "num_hidden_layers": 4, "num_experts": 4, "top_k": 2}
    runners = {}
    for layer, layer_picks in picks.items():
        runners[layer] = torch.nn.Module()
        runners[layer].router = Router(torch.tensor(layer_picks, dtype=torch.int32))
        counter.attach(runners[layer], layer, model)
    counter.start()
    for runner in runners.values():
        runner.router.select_experts(None)
    return counter


def test_a_restarted_worker_goes_on_from_its_file(tmp_path):
    path = tmp_path / "stats.json"
    counter_with_layers(path, {2: [[0, 1], [1, 3]]}).write(final=True)
    counter_with_layers(path, {2: [[1, 2]]}).write(final=True)
    assert expert_stats.layer_totals(json.loads(path.read_text())) == {2: [1, 3, 1, 1]}


def test_only_the_first_tensor_parallel_rank_writes(tmp_path):
    path = tmp_path / "stats.json"
    counter_with_layers(path, {0: [[0, 1]]}, writes=False).write(final=True)
    assert not path.exists()


def test_another_models_file_is_refused_at_start(tmp_path):
    path = tmp_path / "stats.json"
    expert_stats.write(path, {"name": "m", "architectures": ["X"], "num_hidden_layers": 4,
                              "num_experts": 16, "top_k": 2}, "dp0-pp0", {0: [0] * 16})
    with pytest.raises(expert_stats.StatsFileError, match=r"its num_experts is 16, this model's 4"):
        counter_with_layers(path, {0: [[0, 1]]})
