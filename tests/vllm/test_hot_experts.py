"""Hot experts (LVLLM_HOT_EXPERTS) on the real vLLM CPU engine: each lk layer's most picked
experts in the routing statistics file run on vLLM's own CPU MoE kernel (the stand-in for the
GPU), lk the other pairs; the answers are those of lk off, in eager and compiled mode."""

from __future__ import annotations

import json

import pytest

from e2e_common import F32_LOGPROB_TOL, build_model, max_logprob_diff, run_llm

from lvllm import expert_stats

HOT = 3


def write_stats(path, model) -> dict[int, list[int]]:
    """A statistics file for ``model`` whose hottest experts differ from layer to layer; the
    expected hot set of each layer."""
    config = json.loads((model / "config.json").read_text())
    layers, experts = config["num_hidden_layers"], config["num_experts"]
    counts = {layer: [100 * ((3 * e + layer) % experts) + e for e in range(experts)] for layer in range(layers)}
    identity = {"name": str(model), "architectures": config["architectures"], "num_hidden_layers": layers,
                "num_experts": experts, "top_k": config["num_experts_per_tok"]}
    expert_stats.write(path, identity, "dp0-pp0", counts)
    return {layer: sorted(sorted(range(experts), key=lambda e: -c[e])[:HOT]) for layer, c in counts.items()}


# lk off eager is the reference of both (the suite's cached runs; compiled lk off answers the same).
# Qwen2-MoE's slots are filled as re-ranking fills them (from lk's memory), never re-ranked here.
@pytest.mark.parametrize("family, eager, update", [("qwen3_moe", False, 0), ("qwen2_moe", True, 10**6)])
def test_hot_experts_answer_as_lk_off(llm_runs, tiny_model, tmp_path, monkeypatch, family, eager, update):
    model = tiny_model(family)
    off = llm_runs(family, lk=False)
    monkeypatch.setenv("LVLLM_HOT_EXPERTS_UPDATE", str(update))
    stats = tmp_path / "stats.json"
    expected = write_stats(stats, model)
    monkeypatch.setenv("LVLLM_EXPERT_STATS", str(stats))
    monkeypatch.setenv("LVLLM_EXPERT_STATS_INTERVAL", "0")
    monkeypatch.setenv("LVLLM_HOT_EXPERTS", str(HOT))
    hot = run_llm(model, lk=True, eager=eager)
    layers = hot.report[0]["lk_layers"]
    found = {int(name.split(".layers.")[1].split(".")[0]): entry["hot_experts"] for name, entry in layers.items()}
    assert found == expected
    assert hot.tokens == off.tokens
    assert max_logprob_diff(hot, off) < F32_LOGPROB_TOL


def test_hot_experts_swapped_while_serving_answer_as_lk_off(llm_runs, tiny_model, tmp_path, monkeypatch):
    """LVLLM_HOT_EXPERTS_UPDATE=1 without a statistics file: every layer's slots start free and
    are re-ranked after every step (one swap a layer), each swap copying an expert out of lk's
    memory while the next step runs and mapped a step later, while the prompts generate;
    compiled, the answers are still lk off's, and more swaps happened than the slots take
    (experts were replaced, not only filled in)."""
    family, slots = "qwen3_moe", 2
    model = tiny_model(family)
    off = llm_runs(family, lk=False)
    monkeypatch.setenv("LVLLM_EXPERT_STATS", str(tmp_path / "stats.json"))   # written at the end
    monkeypatch.setenv("LVLLM_EXPERT_STATS_INTERVAL", "0")
    monkeypatch.setenv("LVLLM_HOT_EXPERTS", str(slots))
    monkeypatch.setenv("LVLLM_HOT_EXPERTS_UPDATE", "1")
    monkeypatch.setenv("LVLLM_HOT_EXPERTS_SWAPS", "1")
    monkeypatch.setenv("LVLLM_HOT_EXPERTS_DECAY", "0.5")
    hot = run_llm(model, lk=True, eager=False)
    report = hot.report[0]
    layers = report["lk_layers"].values()
    # A swap begun at the last step is still being written (mapped at the next step): -1.
    assert layers and all(sum(expert >= 0 for expert in entry["hot_experts"]) >= slots - 1 for entry in layers)
    assert report["hot_swaps"] > slots * len(layers)
    assert hot.tokens == off.tokens
    assert max_logprob_diff(hot, off) < F32_LOGPROB_TOL


def test_hot_experts_found_from_traffic_are_the_favoured_ones(tmp_path, monkeypatch):
    """A DeepSeek-V3 whose router favours two experts of each MoE layer (their selection bias
    raised: every token picks them, and a third expert of top-k 3 elsewhere): re-ranked from traffic every 2 steps without a statistics
    file, each layer's two slots end up holding exactly those, and the file written at the end
    ranks them first, each picked once per computed token."""
    model = build_model(tmp_path / "favoured", "deepseek_v3", "--favoured-experts", "2", "--top-k", "3")
    favoured = {int(layer): experts for layer, experts in
                json.loads((model / "favoured_experts.json").read_text()).items()}
    stats = tmp_path / "stats.json"
    monkeypatch.setenv("LVLLM_EXPERT_STATS", str(stats))
    monkeypatch.setenv("LVLLM_EXPERT_STATS_INTERVAL", "0")
    monkeypatch.setenv("LVLLM_HOT_EXPERTS", "2")
    monkeypatch.setenv("LVLLM_HOT_EXPERTS_UPDATE", "2")
    run = run_llm(model, lk=True, eager=True,
                  inspect=lambda llm: llm.collective_rpc("lvllm_write_expert_stats"))
    found = {int(name.split(".layers.")[1].split(".")[0]): sorted(entry["hot_experts"])
             for name, entry in run.report[0]["lk_layers"].items()}
    assert found == favoured
    counts = expert_stats.layer_totals(expert_stats.read(stats))
    tokens = sum(len(ids) + len(out) - 1 for ids, out in zip(run.prompt_token_ids, run.tokens))
    for layer, experts in favoured.items():
        assert sorted(expert_stats.hottest(counts[layer], 2)) == experts
        assert [counts[layer][e] for e in experts] == [tokens, tokens]


def test_hot_experts_need_a_statistics_file(monkeypatch):
    from lvllm import envs
    from lvllm.settings import Settings

    monkeypatch.delenv("LVLLM_EXPERT_STATS", raising=False)
    monkeypatch.setenv("LVLLM_HOT_EXPERTS", "4")
    with pytest.raises(envs.EnvError, match="LVLLM_HOT_EXPERTS=4.*LVLLM_EXPERT_STATS"):
        Settings.from_env()
