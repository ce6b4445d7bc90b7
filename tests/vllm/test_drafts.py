"""Speculative decoding drafts whose own MoE layers lk computes, run beside their target.

Each draft in architecture_table.DRAFTS_RUN is a tiny checkpoint of its target with the
draft's layers in it (a family's from examples/tiny/build_tiny_model.py --mtp-layers; a swept
target's from transformers plus with_mtp_layer; an EAGLE draft's a checkpoint of its own made
of the MTP layer), served by one vLLM instance with lk on, greedy and eager, the draft
proposing one token a step. What is checked, with no vLLM in the references:

- the draft model's MoE layers are on lk and computed there (the worker's draft model through
  collective_rpc, and lk's draft placement line), the target's layers on lk as usual;
- greedy speculative decoding is lossless, so every generated token must be transformers'
  float64 best after the same prefix (the target alone), and the prompt logprobs its;
- the draft's own computation: the first forwards of each draft MoE layer (input, vLLM's
  routing, lk's output, recorded in the worker) against the same experts in float64 from the
  checkpoint. Random tiny weights make the draft a poor guesser, so most proposals are
  rejected: the target's tokens alone would not notice a wrong draft (seen: halving the draft
  layer's router weights inside lk leaves them right), this check does (relative error 0.5);
- for one draft per method (Draft.own_path), every proposal must equal that of a second
  instance whose draft MoE runs on vLLM's own CPU path (LVLLM_DRAFT_MOE=DEVICE).

One instance per draft and setting, started once per module. Measured on 2 cores: 20-40 s per
lk instance, 20-30 s per own-path instance.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

import transformers_models

from architecture_table import BY_KEY, DRAFTS_BY_KEY, DRAFTS_RUN, DRAFTS_WITHOUT_MOE, FAMILY_TABLE, MOE_LAYER_CALL
from e2e_common import (EAGER_TORCH_ROPE, EXPERTS_TOL, CachedReference, TransformersReference,
                        assert_close_to_reference, assert_lk_ran, assert_matches_reference, attention_backend,
                        build_model, draft_lk_report, experts_float64, layer_index, record_draft_experts,
                        record_proposals, recorded_draft_experts, recorded_proposals, run_llm)

FAMILIES_BY_KEY = {f.key: f for f in FAMILY_TABLE}
SPECULATIVE_TOKENS = 1


def with_mtp_layer(model: Path, out: Path, own_tensors: tuple[str, ...]) -> Path:
    """``model`` (a transformers checkpoint) with one MTP layer after its decoder layers: a
    copy of its last decoder layer, every tensor perturbed (so a mixed-up layer shows), and
    the MTP layer's own tensors: norms near 1, eh_proj [H, 2H], copies of the embedding and
    the output head (as real checkpoints carry them)."""
    from safetensors.torch import load_file, save_file

    if (out / "config.json").exists():
        return out
    shutil.copytree(model, out)
    config = json.loads((out / "config.json").read_text())
    layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    tensors = load_file(out / "model.safetensors")
    generator = torch.Generator().manual_seed(1)
    last, mtp = f"model.layers.{layers - 1}.", f"model.layers.{layers}."
    for name in [n for n in tensors if n.startswith(last)]:
        source = tensors[name]
        noise = torch.randn(source.shape, generator=generator) * 0.3 * (source.std() if source.numel() > 1 else 1)
        tensors[mtp + name[len(last):]] = source + noise
    head = tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"])
    for own in own_tensors:
        if own == "eh_proj":
            value = torch.randn(hidden, 2 * hidden, generator=generator) / (2 * hidden) ** 0.5
        elif own == "embed_tokens":
            value = tensors["model.embed_tokens.weight"].clone()
        elif own == "shared_head.head":
            value = head.clone()
        else:   # a norm
            value = 1.0 + 0.05 * torch.randn(hidden, generator=generator)
        tensors[f"{mtp}{own}.weight"] = value.contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}, indent=2))
    return out


def eagle_checkpoint(model: Path, out: Path, architecture: str) -> Path:
    """An EAGLE draft checkpoint made of ``model``'s MTP layer (DeepSeek's layout): the layer's
    decoder tensors under ``layers.0.`` (vLLM still names the draft's layer N, after the
    target's), its enorm/hnorm, eh_proj as ``fc``, its head norm as
    ``norm``, its embedding and head copies as the draft's own; config.json the target's with
    one layer and ``architecture``."""
    from safetensors.torch import load_file, save_file

    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True)
    config = json.loads((model / "config.json").read_text())
    layer = f"model.layers.{config['num_hidden_layers']}."
    renamed = {"enorm.": "enorm.", "hnorm.": "hnorm.", "eh_proj.": "fc.", "shared_head.norm.": "norm.",
               "embed_tokens.": "embed_tokens.", "shared_head.head.": "lm_head."}
    tensors = {}
    for name, tensor in load_file(model / "model.safetensors").items():
        if not name.startswith(layer):
            continue
        rest = name[len(layer):]
        own = next((new + rest[len(old):] for old, new in renamed.items() if rest.startswith(old)), None)
        tensors[own or f"layers.0.{rest}"] = tensor
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    draft_config = {**config, "architectures": [architecture], "num_hidden_layers": 1}
    draft_config.pop("num_nextn_predict_layers")   # vLLM would take it as the draft's n_predict
    (out / "config.json").write_text(json.dumps(draft_config, indent=2))
    for other in model.iterdir():
        if other.suffix != ".safetensors" and other.name != "config.json" and other.is_file():
            shutil.copy(other, out / other.name)
    return out


def target_architecture(draft) -> str:
    return FAMILIES_BY_KEY[draft.target].architecture if draft.builder else BY_KEY[draft.target].name


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("drafts")

    def get(key: str) -> Path:
        draft = DRAFTS_BY_KEY[key]
        if draft.builder:
            model = build_model(root / key, *draft.builder)
        else:
            arch = BY_KEY[draft.target]
            target = transformers_models.build(root / f"{key}-target", arch.model_type, arch.name, arch.config,
                                               unused_weights=arch.unused_weights, extra_norms=arch.extra_norms)
            model = with_mtp_layer(target, root / key, draft.mtp_tensors)
        config = json.loads((model / "config.json").read_text())
        assert config["architectures"] == [target_architecture(draft)]
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
            dtype = FAMILIES_BY_KEY[draft.target].dtype if draft.builder else "float32"
            speculative = {"method": draft.method, "num_speculative_tokens": SPECULATIVE_TOKENS,
                           "attention_backend": attention_backend(model, dtype)}
            if draft.separate:
                speculative["model"] = str(eagle_checkpoint(model, model.with_name(model.name + "-draft"),
                                                            draft.separate))
            llm_kwargs = {"speculative_config": speculative}
            if not draft.builder and BY_KEY[draft.target].eager_rope_wrong:
                llm_kwargs.update(EAGER_TORCH_ROPE)
            start = time.monotonic()
            try:
                run = run_llm(model, lk=True, dtype=dtype, env={"LVLLM_DRAFT_MOE": draft_moe},
                              llm_kwargs=llm_kwargs,
                              prepare=lambda llm: (llm.collective_rpc(record_proposals),
                                                   llm.collective_rpc(record_draft_experts)),
                              inspect=lambda llm: (llm.collective_rpc(draft_lk_report),
                                                   llm.collective_rpc(recorded_proposals),
                                                   llm.collective_rpc(recorded_draft_experts)))
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
            cache[key] = CachedReference(TransformersReference(transformers_models.for_transformers(checkpoints(key))))
        return cache[key]

    return get


def draft_layers(report) -> dict[int, dict]:
    return {layer_index(name): layer for name, layer in report["lk_layers"].items()}


@pytest.mark.parametrize("key", list(DRAFTS_BY_KEY))
def test_draft_moe_on_lk_matches_reference(draft_runs, references, key):
    draft = DRAFTS_BY_KEY[key]
    run, seconds = draft_runs(key)
    print(f"{key}: {seconds:.0f} s")
    # The target model's MoE layers on lk, as its family's (or sweep's) run has them.
    target_layers = FAMILIES_BY_KEY[draft.target].moe_layers if draft.builder else BY_KEY[draft.target].moe_layers
    assert_lk_ran(run.report, set(target_layers))
    draft_reports, proposals, _ = run.inspected
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
        assert set(layers) == set(draft.module_layers or draft.draft_layers), draft_model
        for layer in layers.values():
            assert layer["forward_calls"] > 0 and layer["converted_while_loading"], layer
            assert tuple(layer["params"]["w13_weight"][0]) == (0,), layer
        assert steps and all(len(row) == SPECULATIVE_TOKENS for step in steps for row in step), steps
    # Greedy speculative decoding is lossless: the tokens are the target model's.
    if draft.builder:
        assert_matches_reference(run, references(key), FAMILIES_BY_KEY[draft.target])
    else:
        assert_close_to_reference(run, references(key))


@pytest.mark.parametrize("key", list(DRAFTS_BY_KEY))
def test_draft_experts_match_float64(draft_runs, checkpoints, key):
    """The draft's MoE layer as lk computed it in the run, forward by forward, against the
    same routed experts in float64 from the checkpoint (vLLM's routing as given)."""
    from safetensors.torch import load_file

    draft = DRAFTS_BY_KEY[key]
    run, _ = draft_runs(key)
    dtype = FAMILIES_BY_KEY[draft.target].dtype if draft.builder else "float32"
    tensors = load_file(checkpoints(key) / "model.safetensors")
    errors = []
    for worker in run.inspected[2]:
        assert set(map(layer_index, worker)) == set(draft.module_layers or draft.draft_layers), list(worker)
        for name, calls in worker.items():
            assert calls, f"{name}: never ran"
            for x, topk_ids, topk_weights, routed in calls:
                expected = experts_float64(tensors, draft.experts, x, topk_ids, topk_weights)
                error = float((routed.double() - expected).norm() / expected.norm())
                assert error < EXPERTS_TOL[dtype], (name, x.shape, error)
                errors.append(error)
    print(f"{key}: {len(errors)} forwards of the draft's experts, relative error up to {max(errors):.2g}")


@pytest.mark.parametrize("key", [d.key for d in DRAFTS_RUN if d.own_path])
def test_draft_proposals_match_vllms_own_path(draft_runs, key):
    """The draft's proposals with its MoE layers on lk are those vLLM's own CPU path makes."""
    run, _ = draft_runs(key)
    own, seconds = draft_runs(key, "DEVICE")
    print(f"{key} (draft MoE on vLLM's own path): {seconds:.0f} s")
    for draft_model in own.inspected[0]:
        assert draft_model["lk_layers"] == {}, draft_model
        draft = DRAFTS_BY_KEY[key]
        assert {layer_index(n) for n in draft_model["device_layers"]} == set(draft.module_layers or draft.draft_layers)
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

