"""The routing statistics file (lvllm/expert_stats.py): writers share one file without losing
each other's counts, another model's file is refused naming what differs, the summary's share
is the hand-computed one. (Counting inside vLLM: tests/vllm/test_expert_stats.py.)"""

from __future__ import annotations

import json
import threading

import pytest

from lvllm import expert_stats

MODEL = {"name": "/models/a", "architectures": ["Qwen3MoeForCausalLM"], "num_hidden_layers": 4,
         "num_experts": 4, "top_k": 2}


def test_stages_and_data_parallel_ranks_share_one_file(tmp_path):
    """Pipeline stages hold other layers (kept side by side); data-parallel ranks the same
    layers (summed); a writer writing again replaces only its own entry."""
    path = tmp_path / "stats.json"
    expert_stats.write(path, MODEL, "dp0-pp0", {0: [1, 0, 0, 1], 1: [2, 0, 0, 0]})
    expert_stats.write(path, MODEL, "dp0-pp1", {2: [0, 5, 0, 1]})
    expert_stats.write(path, MODEL, "dp1-pp0", {0: [0, 3, 0, 1], 1: [0, 0, 0, 4]})
    expert_stats.write(path, MODEL, "dp0-pp0", {0: [2, 0, 0, 2], 1: [4, 0, 0, 0]})
    data = json.loads(path.read_text())
    assert sorted(data["writers"]) == ["dp0-pp0", "dp0-pp1", "dp1-pp0"]
    assert expert_stats.layer_totals(data) == {0: [2, 3, 0, 3], 1: [4, 0, 0, 4], 2: [0, 5, 0, 1]}


def test_concurrent_writers_lose_nothing(tmp_path):
    path = tmp_path / "stats.json"
    writers = [threading.Thread(target=expert_stats.write,
                                args=(path, MODEL, f"dp{rank}-pp0", {0: [rank, 1, 0, 0]}))
               for rank in range(8)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    assert expert_stats.layer_totals(expert_stats.read(path)) == {0: [sum(range(8)), 8, 0, 0]}


def test_another_models_file_is_refused_naming_the_difference(tmp_path):
    path = tmp_path / "stats.json"
    expert_stats.write(path, MODEL, "dp0-pp0", {0: [1, 1, 0, 0]})
    data = expert_stats.read(path)
    expert_stats.check_model(data, {**MODEL, "name": "/elsewhere/a"}, path)   # moved: the same model
    with pytest.raises(expert_stats.StatsFileError, match=r"its num_hidden_layers is 4, this model's 48"):
        expert_stats.check_model(data, {**MODEL, "num_hidden_layers": 48}, path)


@pytest.mark.parametrize("content", ["not json", '{"format": "other"}', "[1, 2]"])
def test_a_file_that_is_not_statistics_is_named(tmp_path, content):
    path = tmp_path / "stats.json"
    path.write_text(content)
    with pytest.raises(expert_stats.StatsFileError, match=str(path)):
        expert_stats.read(path)
    assert expert_stats.read(tmp_path / "absent.json") is None


def test_the_hottest_share_by_hand(tmp_path):
    # 20 experts a layer: the hottest 10% are 2 of them. Layer 0: 30 + 20 of 100 picks;
    # layer 1 (uniform): 5 + 5 of 100. Together 60 of 200.
    layers = {0: [30, 20, 10, 10, 10, 5, 5, 5, 5] + [0] * 11, 1: [5] * 20}
    assert [sum(counts) for counts in layers.values()] == [100, 100]
    per_layer, share = expert_stats.hot_share(layers)
    assert (per_layer, share) == (2, pytest.approx(60 / 200))
    line = expert_stats.summary(layers, tmp_path / "s.json")
    assert "2 MoE layer(s), 200 token-expert picks" in line
    assert "the hottest 10% of experts (2 of 20 per layer) took 30% of them" in line
    assert expert_stats.hot_share({}) == (0, 0.0)


@pytest.mark.parametrize("padded", [False, True])
def test_the_count_op_counts_real_rows_only(padded):
    """A CUDA graph replays a captured size: the rows vLLM pads the batch with (its
    ``is_padding`` mask) pass the router too, with any ids, but are no tokens."""
    torch = pytest.importorskip("torch")
    from lvllm.routing_count import count_routed

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 6, (9, 3), generator=generator, dtype=torch.int32)
    mask = torch.zeros(9, dtype=torch.bool)
    if padded:
        mask[5:] = True
        ids[5:] = torch.tensor([-1, 6, 1 << 30], dtype=torch.int32)   # what such rows may hold
    counts = torch.zeros(6, dtype=torch.int64)
    count_routed(counts, ids, mask if padded else None)
    count_routed(counts, ids, mask if padded else None)   # it accumulates
    expected = [0] * 6
    for row, picks in enumerate(ids.tolist()):
        if not mask[row]:
            for expert in picks:
                expected[expert] += 2
    assert counts.tolist() == expected
