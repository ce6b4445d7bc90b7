"""Speculative decoding drafts whose own MoE layers lk computes, run beside their target.

Each draft in architecture_table.DRAFTS_RUN is a tiny checkpoint of its target family with the
draft's layers in it (examples/tiny/build_tiny_model.py), served by one vLLM instance with lk
on, greedy and eager, the draft proposing one token a step. What is checked, with no vLLM
in the reference:

- the draft model's MoE layers are on lk and computed there (the worker's draft model through
  collective_rpc, and lk's draft placement line), the target's layers on lk as usual;
- greedy speculative decoding is lossless, so every generated token must be transformers'
  float64 best after the same prefix (the target alone), and the prompt logprobs its;
- the draft's own computation: each step's proposals must be those of a second instance
  where the draft's MoE runs on vLLM's own CPU path (LVLLM_DRAFT_MOE=DEVICE), the target
  unchanged. Random tiny weights make the draft a poor guesser, so most proposals are
  rejected: the target's tokens alone would not notice a wrong draft, the proposals do.

One instance per draft and setting, started once per module.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from architecture_table import (DRAFTS_BY_KEY, DRAFTS_CANNOT_RUN, DRAFTS_RUN, DRAFTS_WITHOUT_MOE, FAMILY_TABLE,
                                MOE_LAYER_CALL)
from e2e_common import (CachedReference, TransformersReference, attention_backend, build_model, draft_lk_report,
                        layer_index, record_proposals, recorded_proposals, run_llm)
from test_families import LIMITATIONS, assert_lk_ran, assert_matches_reference

FAMILIES_BY_KEY = {f.key: f for f in FAMILY_TABLE}
SPECULATIVE_TOKENS = 1


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("drafts")

    def get(key: str) -> Path:
        draft = DRAFTS_BY_KEY[key]
        model = build_model(root / key, *draft.builder)
        config = json.loads((model / "config.json").read_text())
        assert config["architectures"] == [FAMILIES_BY_KEY[draft.target].architecture]
        return model

    return get


@pytest.fixture(scope="module")
def draft_runs(checkpoints):
    """run(key, draft_moe): the target with its draft, lk on, the draft's MoE layers where
    LVLLM_DRAFT_MOE says; (result, seconds), started once (a failed start is raised again)."""
    cache = {}

    def get(key: str, draft_moe: str = "LK"):
        if (key, draft_moe) not in cache:
            draft, model = DRAFTS_BY_KEY[key], checkpoints(key)
            family = FAMILIES_BY_KEY[draft.target]
            speculative = {"method": draft.method, "num_speculative_tokens": SPECULATIVE_TOKENS,
                           "attention_backend": attention_backend(model, family.dtype)}
            start = time.monotonic()
            try:
                run = run_llm(model, lk=True, dtype=family.dtype, env={"LVLLM_DRAFT_MOE": draft_moe},
                              llm_kwargs={"speculative_config": speculative},
                              prepare=lambda llm: llm.collective_rpc(record_proposals),
                              inspect=lambda llm: (llm.collective_rpc(draft_lk_report),
                                                   llm.collective_rpc(recorded_proposals)))
                cache[key, draft_moe] = (run, time.monotonic() - start)
            except Exception as error:   # noqa: BLE001 - kept for the next test that asks
                cache[key, draft_moe] = error
        if isinstance(cache[key, draft_moe], Exception):
            raise cache[key, draft_moe]
        return cache[key, draft_moe]

    return get


@pytest.fixture(scope="module")
def references(checkpoints):
    cache = {}

    def get(key: str) -> CachedReference:
        if key not in cache:
            cache[key] = CachedReference(TransformersReference(checkpoints(key)))
        return cache[key]

    return get


def draft_layers(report) -> dict[int, dict]:
    return {layer_index(name): layer for name, layer in report["lk_layers"].items()}


@pytest.mark.parametrize("key", list(DRAFTS_BY_KEY))
def test_draft_moe_on_lk_matches_reference(draft_runs, references, key):
    draft = DRAFTS_BY_KEY[key]
    family = FAMILIES_BY_KEY[draft.target]
    run, seconds = draft_runs(key)
    print(f"{key}: {seconds:.0f} s")
    # The target model's MoE layers on lk, as its family's run has them.
    assert_lk_ran(run.report, set(family.moe_layers))
    draft_reports, proposals = run.inspected
    for target, draft_model, steps in zip(run.report, draft_reports, proposals):
        placement = target.get("draft")
        assert placement is not None, "lk_report names no draft model placement"
        assert not placement["device_layers"], placement
        assert {layer_index(n) for n in placement["lk_layers"].values()} == set(draft.draft_layers), placement
        assert f"{len(draft.draft_layers)} MoE layer(s) on lk" in placement["summary"], placement
        # The draft model in the worker: its MoE layers on lk, computed, vLLM's copies freed.
        assert draft_model is not None, "no draft model in the worker"
        assert draft_model["device_layers"] == {}, draft_model
        layers = draft_layers(draft_model)
        assert set(layers) == set(draft.draft_layers), draft_model
        for layer in layers.values():
            assert layer["forward_calls"] > 0 and layer["converted_while_loading"], layer
            assert tuple(layer["params"]["w13_weight"][0]) == (0,), layer
        assert steps and all(len(row) == SPECULATIVE_TOKENS for step in steps for row in step), steps
    # Greedy speculative decoding is lossless: the tokens are the target model's.
    assert_matches_reference(run, references(key), family)


@pytest.mark.parametrize("key", [d.key for d in DRAFTS_RUN if d.own_path])
def test_draft_proposals_match_vllms_own_path(draft_runs, key):
    """The draft's proposals with its MoE layers on lk are those vLLM's own CPU path makes."""
    run, _ = draft_runs(key)
    own, seconds = draft_runs(key, "DEVICE")
    print(f"{key} (draft MoE on vLLM's own path): {seconds:.0f} s")
    for draft_model in own.inspected[0]:
        assert draft_model["lk_layers"] == {}, draft_model
        assert {layer_index(n) for n in draft_model["device_layers"]} == set(DRAFTS_BY_KEY[key].draft_layers)
    assert own.tokens == run.tokens
    lk_steps, own_steps = run.inspected[1], own.inspected[1]
    assert lk_steps == own_steps, "the draft proposes otherwise with its MoE on lk"
    # Not vacuous: the draft proposes more than one token over the run.
    assert len({t for step in lk_steps[0] for row in step for t in row}) > 3, lk_steps


@pytest.mark.parametrize("architecture", sorted(DRAFTS_WITHOUT_MOE))
def test_drafts_without_moe_layers_of_their_own(architecture):
    """The drafts recorded as dense: vLLM's module still has the line that makes the draft's
    layers dense and calls no MoE layer itself (cheap: source only)."""
    from vllm.model_executor.models import registry

    module, line, _ = DRAFTS_WITHOUT_MOE[architecture]
    models = Path(registry.__file__).parent
    assert line in (models / f"{module}.py").read_text(), (module, line)
    draft_module = registry._VLLM_MODELS[architecture][0]
    assert not MOE_LAYER_CALL.search((models / f"{draft_module}.py").read_text()), draft_module


@pytest.mark.parametrize("architecture", sorted(DRAFTS_CANNOT_RUN))
def test_recorded_reasons_drafts_cannot_run_still_hold(architecture):
    LIMITATIONS[DRAFTS_CANNOT_RUN[architecture][1]]()
