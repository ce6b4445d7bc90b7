"""lvllm.reference: checkpoint tensors dequantized by hand-computed cases of each layout, and
lvllm.error_bounds' verdicts and error budget (no vLLM needed)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from lvllm import doctor, error_bounds
from lvllm.dequantize import dequantize, stored_format
from lvllm.reference import CheckpointTensors, expert_layers

# One int32 word with nibbles 0..7 from the lowest bits up.
WORD = 0x76543210


def checkpoint(tmp_path, tensors: dict) -> CheckpointTensors:
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return CheckpointTensors(tmp_path)


def test_compressed_tensors_nibbles_in_order_offset_by_8(tmp_path):
    # weight_packed [2 rows, 1 word]: row 0 holds 0..7 -> -8..-1; row 1 all 15 -> 7; scales per
    # group of 4 inputs: row 0 (1, 2), row 1 (0.5, 0.5).
    tensors = checkpoint(tmp_path, {
        "p.weight_packed": torch.tensor([[WORD], [-1]], dtype=torch.int32),
        "p.weight_scale": torch.tensor([[1.0, 2.0], [0.5, 0.5]], dtype=torch.bfloat16),
        "p.weight_shape": torch.tensor([2, 8]),
    })
    expected = [[-8, -7, -6, -5, -8, -6, -4, -2], [3.5] * 8]
    assert dequantize(tensors, "p").tolist() == expected
    assert stored_format(tensors, "p") == "int4"


def test_awq_nibbles_in_awq_order_input_major(tmp_path):
    # qweight [2 inputs, 1 word of 8 outputs]: nibble i -> output column (0, 2, 4, 6, 1, 3, 5, 7)[i],
    # so input 0 reads outputs 0..7 as 0, 4, 1, 5, 2, 6, 3, 7; input 1 is all 9. One group of
    # both inputs: zeros from qzeros (all 8 but output 1: 0), scales 1 (output 7: 3).
    zeros = 0x88808888 - (1 << 32)   # as int32; nibble 4 (output 1) is 0
    scales = torch.ones(1, 8, dtype=torch.float16)
    scales[0, 7] = 3
    tensors = checkpoint(tmp_path, {"p.qweight": torch.tensor([[WORD], [-0x66666667]], dtype=torch.int32),
                                    "p.qzeros": torch.tensor([[zeros]], dtype=torch.int32), "p.scales": scales})
    assert torch.tensor(-0x66666667, dtype=torch.int32).item() & 0xFFFFFFFF == 0x99999999
    w = dequantize(tensors, "p")   # [outputs, inputs]
    assert w[:, 0].tolist() == [-8, 4, -7, -3, -6, -2, -5, -3]
    assert w[:, 1].tolist() == [1, 9, 1, 1, 1, 1, 1, 3]
    symmetric = checkpoint(tmp_path, {"p.qweight": torch.tensor([[WORD]], dtype=torch.int32),
                                      "p.scales": torch.ones(1, 8, dtype=torch.float16)})
    assert dequantize(symmetric, "p")[:, 0].tolist() == [-8, -4, -7, -3, -6, -2, -5, -1]


def test_gptq_inputs_packed_in_order_zero_point_from_bits(tmp_path):
    # 4 bits (8 inputs in g_idx, one word): qweight [1 word, 2 outputs]; output 0 reads inputs
    # 0..7 as 0..7, output 1 all 15; zero point 8 (sym). Two groups of 4 inputs: scales (1, 0.5)
    # for output 0, (2, 2) for output 1.
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq",
                                                                              "bits": 4, "sym": True}}))
    tensors = checkpoint(tmp_path, {"p.qweight": torch.tensor([[WORD, -1]], dtype=torch.int32),
                                    "p.scales": torch.tensor([[1.0, 2.0], [0.5, 2.0]], dtype=torch.float16),
                                    "p.g_idx": torch.tensor([0, 0, 0, 0, 1, 1, 1, 1], dtype=torch.int32)})
    assert dequantize(tensors, "p").tolist() == [[-8, -7, -6, -5, -2, -1.5, -1, -0.5], [14] * 8]
    assert stored_format(tensors, "p") == "int4"
    # g_idx puts each input in its group (act-order): inputs 0 and 7 swap groups.
    tensors = checkpoint(tmp_path, {"p.qweight": torch.tensor([[WORD, -1]], dtype=torch.int32),
                                    "p.scales": torch.tensor([[1.0, 2.0], [0.5, 2.0]], dtype=torch.float16),
                                    "p.g_idx": torch.tensor([1, 0, 0, 0, 1, 1, 1, 0], dtype=torch.int32)})
    assert dequantize(tensors, "p")[0].tolist() == [-4, -7, -6, -5, -2, -1.5, -1, -1]
    # 8 bits (4 inputs in g_idx): bytes 0x00, 0x80, 0xFF, 0x7F of one word are inputs 0..3:
    # -128, 0, 127, -1.
    tensors = checkpoint(tmp_path, {"p.qweight": torch.tensor([[0x7FFF8000]], dtype=torch.int32),
                                    "p.scales": torch.tensor([[0.5]], dtype=torch.float16),
                                    "p.g_idx": torch.zeros(4, dtype=torch.int32)})
    assert dequantize(tensors, "p").tolist() == [[-64, 0, 63.5, -0.5]]
    assert stored_format(tensors, "p") == "int8"
    # Bits from qzeros (zero - 1 = 127 in each byte, 4 outputs a word; not read when sym).
    tensors = checkpoint(tmp_path, {"p.qweight": torch.full((1, 8), 0x7FFF8000, dtype=torch.int32),
                                    "p.scales": torch.ones(1, 8, dtype=torch.float16),
                                    "p.qzeros": torch.full((1, 2), 0x7F7F7F7F, dtype=torch.int32)})
    assert dequantize(tensors, "p")[:, 0].tolist() == [-128] * 8


def test_fp8_blocks_scale_their_tile(tmp_path):
    q = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 448.0], [4.0, 4.0, 4.0]]).to(torch.float8_e4m3fn)
    # 2x2 blocks: rows 0-1 / 2, columns 0-1 / 2.
    scales = torch.tensor([[1.0, 10.0], [0.25, 0.5]])
    tensors = checkpoint(tmp_path, {"p.weight": q, "p.weight_scale_inv": scales})
    assert dequantize(tensors, "p").tolist() == [[1, 2, 30], [-1, 0.5, 4480], [1, 1, 2]]
    assert stored_format(tensors, "p") == "fp8_e4m3"


def test_nvfp4_codes_low_nibble_first_e4m3_scales_times_the_tensor_scale(tmp_path):
    # One row of 32 inputs, two groups of 16. Bytes 0x10, 0x32, ... 0xFE hold codes 0..15 in
    # input order (the even input's low): magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6, then negated.
    # Group scales (e4m3 bytes): 0x38 = 2^(7-7) = 1 and 0x01 = 1/8 x 2^-6 (the smallest
    # subnormal); tensor scale 3.
    packed = torch.tensor([[0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE] * 2], dtype=torch.uint8)
    scales = torch.tensor([[0x38, 0x01]], dtype=torch.uint8).view(torch.float8_e4m3fn)
    tensors = checkpoint(tmp_path, {"p.weight": packed, "p.weight_scale": scales,
                                    "p.weight_scale_2": torch.tensor(3.0), "p.input_scale": torch.tensor(0.5)})
    magnitudes = [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    codes = magnitudes + [-m for m in magnitudes]
    assert dequantize(tensors, "p").tolist() == [[3 * v for v in codes] + [3 * 2**-9 * v for v in codes]]
    assert stored_format(tensors, "p") == "nvfp4"


def test_nvfp4_as_lk_reads_it(tmp_path):
    """The reference's own decoding against lvllm.lk.nvfp4's, on what lvllm.lk.nvfp4.quantize
    (ModelOpt's rounding) makes of random projections of magnitudes 1e-3 to 1e2, then with
    every e4m3 byte but NaN's as a group scale."""
    from lvllm.lk import nvfp4

    generator = torch.Generator().manual_seed(0)
    w = torch.randn(2, 16, 128, generator=generator) * torch.logspace(-3, 2, 16).view(1, 16, 1)
    codes, scales, tensor_scales = nvfp4.quantize(w)
    every_byte = torch.arange(256, dtype=torch.uint8)
    every_byte = every_byte[(every_byte & 127) != 127].view(torch.float8_e4m3fn)
    for case, case_scales in (("rounded", scales), ("every byte", scales.clone())):
        if case == "every byte":
            case_scales.view(-1)[:every_byte.numel()] = every_byte
        names = {}
        for e in range(2):
            names.update({f"x.{e}.weight": codes[e], f"x.{e}.weight_scale": case_scales[e],
                          f"x.{e}.weight_scale_2": tensor_scales[e].clone()})
        ours = torch.stack([dequantize(checkpoint(tmp_path, names), f"x.{e}") for e in range(2)])
        lk = nvfp4.dequantize(codes, case_scales, nvfp4.row_scales_of(tensor_scales, 16))
        # lk rounds each group scale times the tensor scale once to float32, then the product
        # with the e2m1 value (exact: 4 bits more) once more: within 2 float32 roundings.
        assert torch.allclose(ours, lk.double(), rtol=2 * 2**-24, atol=0), case
        assert torch.isfinite(ours).all() and (ours != 0).any(), case


def test_expert_layers_from_tensor_names(tmp_path):
    w = torch.zeros(2, 2, dtype=torch.bfloat16)
    names = {f"model.layers.{layer}.block_sparse_moe.experts.{e}.{p}.weight": w.clone()
             for layer in (1, 3) for e in range(4) for p in ("w1", "w2", "w3")}
    names["model.layers.0.mlp.down_proj.weight"] = w.clone()
    layers = expert_layers(checkpoint(tmp_path, names))
    assert sorted(layers) == [1, 3] and len(layers[3]) == 1
    layer = layers[3][0]
    assert layer.prefix == "model.layers.3.block_sparse_moe.experts" and layer.experts == 4
    assert layer.stem(2, 1) == "model.layers.3.block_sparse_moe.experts.2.w3"


def test_experts_counted_per_modality_are_split_into_vllms_moe_layers(tmp_path):
    """ERNIE-4.5-VL numbers a layer's vision experts after its text experts under one prefix; its
    config counts them per modality: each set is one of vLLM's MoE layers, by vLLM's name."""
    names = {f"model.layers.1.mlp.experts.{e}.{p}.weight": torch.full((4 if e < 3 else 2, 2), float(e))
             for e in range(5) for p in ("gate_proj", "up_proj")}
    names.update({f"model.layers.1.mlp.experts.{e}.down_proj.weight": torch.zeros(2, 4 if e < 3 else 2)
                  for e in range(5)})
    (tmp_path / "config.json").write_text(json.dumps({"moe_num_experts": [3, 2]}))
    text, vision = expert_layers(checkpoint(tmp_path, names))[1]
    assert (text.prefix, text.experts, text.first) == ("model.layers.1.mlp.text_experts", 3, 0)
    assert (vision.prefix, vision.experts, vision.first) == ("model.layers.1.mlp.vision_experts", 2, 3)
    tensors = CheckpointTensors(tmp_path)
    assert vision.stem(1, 0) == "model.layers.1.mlp.experts.4.gate_proj"
    assert sorted(vision.tensor_names(tensors)) == sorted(n for n in names if ".experts.3." in n or ".experts.4." in n)
    (tmp_path / "config.json").write_text(json.dumps({"moe_num_experts": [4, 2]}))
    with pytest.raises(ValueError, match=r"5 experts stored, which the config counts per modality as \[4, 2\]"):
        expert_layers(CheckpointTensors(tmp_path))


def _bmm_experts(module, x, expert):
    """Llama 4's experts: every expert's batch at once (bmm), the rows given to each."""
    experts = module.gate_up_proj.shape[0]
    return module(x.repeat(experts, 1)).view(experts, len(x), -1)[expert]


def _routed_experts(module, x, expert):
    """Gemma 4's, Granite's and Aria's experts: the rows routed to ``expert`` alone, weight 1."""
    return module(x, torch.full((len(x), 1), expert), torch.ones(len(x), 1, dtype=x.dtype))


# transformers' expert modules of the fused families, their config and checkpoint tensor names
# (after model.layers.0.) for their gate_up_proj and down_proj parameters: H 8, I 6, 3 experts.
FUSED_FAMILIES = {
    "Llama 4": ("llama4", "Llama4TextExperts", "Llama4TextConfig", {"intermediate_size": 6, "num_local_experts": 3},
                ("feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"), _bmm_experts),
    "Gemma 4": ("gemma4", "Gemma4TextExperts", "Gemma4TextConfig", {"moe_intermediate_size": 6, "num_experts": 3},
                ("experts.gate_up_proj", "experts.down_proj"), _routed_experts),
    # transformers renames the checkpoint's input_linear and output_linear (conversion_mapping.py).
    "Granite MoE": ("granitemoe", "GraniteMoeExperts", "GraniteMoeConfig",
                    {"intermediate_size": 6, "num_local_experts": 3},
                    ("block_sparse_moe.input_linear.weight", "block_sparse_moe.output_linear.weight"), _routed_experts),
    # Aria's [E, H, 2I] and [E, I, H] as Llama 4's, under the checkpoint's fc1 and fc2 (transformers
    # renames them, conversion_mapping.py); its config wants heads dividing the hidden size.
    "Aria": ("aria", "AriaExperts", "AriaTextConfig", {"intermediate_size": 6, "moe_num_experts": 3,
                                                       "num_attention_heads": 2},
             ("mlp.experts.fc1.weight", "mlp.experts.fc2.weight"), _routed_experts),
}


@pytest.mark.parametrize("family", FUSED_FAMILIES)
def test_fused_experts_compute_what_transformers_forward_does(tmp_path, family):
    """Each fused layout against transformers' own forward of the family's experts, fed the same
    checkpoint tensors (hidden 8, experts 6 wide: a transposed reading cannot fit)."""
    import importlib

    from lvllm.config_keys import expert_activation
    from lvllm.reference import expert_output, expert_weights

    module_name, experts_class, config_class, sizes, names, forward = FUSED_FAMILIES[family]
    modeling = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
    config = getattr(importlib.import_module("transformers"), config_class)(hidden_size=8, **sizes)
    module = getattr(modeling, experts_class)(config).double()
    generator = torch.Generator().manual_seed(0)
    stored = {}
    for name, parameter in zip(names, (module.gate_up_proj, module.down_proj)):
        parameter.data = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
        stored[f"model.layers.0.{name}"] = parameter.data.clone()
    tensors = checkpoint(tmp_path, stored)
    (layer,) = expert_layers(tensors)[0]
    x = torch.randn(5, 8, generator=generator, dtype=torch.float64)
    for expert in range(3):
        ours = expert_output(expert_weights(tensors, layer, expert), x, expert_activation(config.to_dict()))
        with torch.no_grad():
            assert torch.allclose(ours, forward(module, x, expert), rtol=1e-12, atol=1e-12), (family, expert)


@pytest.mark.parametrize("stored", ["float", "mxfp4"])
def test_gpt_oss_experts_compute_what_transformers_forward_does(tmp_path, stored):
    """gpt-oss's experts against transformers' GptOssExperts, fed the same checkpoint tensors:
    gate_up_proj [E, H, 2I] (gate and up interleaved) or its MXFP4 blocks and scales [E, 2I, H / 32,
    ...] (the module's float parameters: transformers' own convert_moe_packed_tensors), the biases,
    and the clamped SwiGLU with the config's alpha and limit (not transformers' defaults). H 32,
    I 64: a transposed or halved reading cannot fit; rows scaled so some outputs pass the clamp."""
    from transformers import GptOssConfig
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    from lvllm.config_keys import expert_activation
    from lvllm.reference import expert_output, expert_weights, swiglu_constants

    config = GptOssConfig(hidden_size=32, intermediate_size=64, num_local_experts=3, swiglu_alpha=1.5,
                          swiglu_limit=5.0)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    module = GptOssExperts(config).double()
    generator = torch.Generator().manual_seed(0)
    names = {"gate_up_proj": module.gate_up_proj, "gate_up_proj_bias": module.gate_up_proj_bias,
             "down_proj": module.down_proj, "down_proj_bias": module.down_proj_bias}
    saved = {}
    for name, parameter in names.items():
        if stored == "mxfp4" and not name.endswith("_bias"):   # [E, outputs, inputs / 32, 16]; e8m0 2^-4..2^-1
            outputs, inputs = parameter.shape[2], parameter.shape[1]
            blocks = torch.randint(0, 256, (3, outputs, inputs // 32, 16), generator=generator, dtype=torch.uint8)
            scales = torch.randint(123, 127, (3, outputs, inputs // 32), generator=generator, dtype=torch.uint8)
            saved.update({f"{name}_blocks": blocks, f"{name}_scales": scales})
            parameter.data = convert_moe_packed_tensors(blocks, scales, dtype=torch.float64)
        else:
            parameter.data = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
            saved[name] = parameter.data.clone()
    tensors = checkpoint(tmp_path, {f"model.layers.0.mlp.experts.{name}": t for name, t in saved.items()})
    (layer,) = expert_layers(tensors)[0]
    assert layer.experts == 3 and layer.fused.mxfp4 == (stored == "mxfp4")
    x = 2 * torch.randn(5, 32, generator=generator, dtype=torch.float64)
    gate_up = x @ module.gate_up_proj.data + module.gate_up_proj_bias.data[:, None]   # [E, T, 2I]
    assert (gate_up > 5).any() and (gate_up < -5).any(), "no output reaches the clamp"
    for expert in range(3):
        ours = expert_output(expert_weights(tensors, layer, expert), x, expert_activation(config.to_dict()),
                             swiglu_constants(config.to_dict()))
        with torch.no_grad():
            theirs = _routed_experts(module, x, expert)
        assert torch.allclose(ours, theirs, rtol=1e-12, atol=1e-12), (stored, expert)


def test_fused_experts_other_than_float_are_refused_by_doctor(tmp_path):
    """Step-3's FP8 checkpoints stack their experts as float8 with block scales: doctor's fused
    reading takes floats only, and says so rather than read the codes as values."""
    from lvllm.model_shape import ConfigError

    stack = torch.zeros(2, 4, 4).to(torch.float8_e4m3fn)
    tensors = checkpoint(tmp_path, {f"model.layers.1.moe.{p}.weight": stack.clone()
                                    for p in ("gate_proj", "up_proj", "down_proj")})
    with pytest.raises(ConfigError, match="fused experts stored as float8_e4m3fn"):
        doctor.readable_layers(tmp_path, tensors)


@pytest.mark.parametrize("lk_format, source, dtype, expected", [
    ("bfloat16", "bfloat16", torch.bfloat16, 2**-8 + 2e-5),              # kept: output rounding
    ("bfloat16", "float32", torch.bfloat16, 2**-8 + 3 * 2**-8 + 2e-5),   # each matrix rounded to bf16
    ("float32", "float32", torch.float32, 2**-24 + 2e-5),
    ("fp8_e4m3", "fp8_e4m3", torch.bfloat16, 2**-8 + 2e-5),
    ("int8", "bfloat16", torch.bfloat16, 2**-8 + 0.04),
    ("int4", "fp8_e4m3", torch.bfloat16, 2**-8 + 0.35),
    ("int4", "int4", torch.float16, 2**-11 + 0.03),                     # activations on 8 bits
    ("nvfp4", "nvfp4", torch.bfloat16, 2**-8 + 0.03),                   # likewise
    ("mxfp4", "mxfp4", torch.bfloat16, 2**-8 + 0.03 * 254 / 170),       # activations at 85 steps, not 127
    ("bfloat16", "nvfp4", torch.bfloat16, 2**-8 + 3 * 2**-8 + 2e-5),    # dequantized to bf16
    ("int8", "int8", torch.float16, 2**-11 + 0.03 * 254 / 65534),       # activations on 16 bits
])
def test_expected_error_adds_its_parts(lk_format, source, dtype, expected):
    assert error_bounds.expected_error(lk_format, source, dtype) == pytest.approx(expected)


def test_verdicts():
    assert [error_bounds.verdict(e, 0.01) for e in (0.005, 0.01, 0.015, 0.02, 0.021, float("nan"))] == [
        "pass", "pass", "warn", "warn", "fail", "fail"]


def test_sampled_layers_span_the_depth():
    assert doctor.sample(list(range(3, 61))) == [3, 31, 60]
    assert doctor.sample([1, 2]) == [1, 2]
