"""NVFP4 experts of NVIDIA ModelOpt checkpoints (``quant_algo: "NVFP4"``) on lk.

vLLM 0.32 reads them through ``ModelOptNvFp4Config`` (its name "modelopt_fp4"), from
config.json's ``quantization_config`` (``quant_method: "modelopt"``, ``ignore``) or, for
checkpoints of ModelOpt before 0.31, from hf_quant_config.json (``{"producer": {"name":
"modelopt"}, "quantization": {"quant_algo", "group_size", "kv_cache_quant_algo",
"exclude_modules"}}``). Its MoE method, ``ModelOptNvFp4FusedMoE``, picks a device kernel
when it is built and finds none on vLLM's CPU build ("No NvFp4 MoE backend supports the
deployment configuration"), so the choice is made here from the config, as
``ModelOptQuantConfigBase.get_quant_method`` makes it: a layer its ``exclude_modules``
names is float, any other holds NVFP4 experts.

Per projection the checkpoint holds ``weight`` uint8 [out, in / 2] (two e2m1 codes a byte,
the even input's low), ``weight_scale`` float8_e4m3fn [out, in / 16], ``weight_scale_2``
(float32, the whole projection's) and ``input_scale`` (float32, for W4A4 kernels). lk keeps
codes and group scales as they are and takes ``weight_scale_2`` per row, gate rows with
w1's and up rows with w3's: exactly the checkpoint's weights, where vLLM's GPU kernels use
w1's for both (and warn when they differ). lk computes with the activations as they come,
as W4A16 does: ``input_scale`` is loaded and not read, so a W4A4 checkpoint's answers differ
from vLLM's GPU path by its activation rounding. ``quant_algo: "W4A16_NVFP4"`` holds the
same tensors and is taken the same way.
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.fused_moe.routed_experts import FusedMoeWeightScaleSupported

from lvllm.vllm.expert_source_base import ExpertSource

GROUP = 16   # NVFP4: one e4m3 scale per 16 inputs


class Nvfp4Source(ExpertSource):
    """ModelOpt NVFP4 experts as vLLM's ModelOptNvFp4FusedMoE creates their params: `weight`
    uint8 [E, N, K / 2], `weight_scale` float8_e4m3fn [E, N, K / 16], `weight_scale_2`
    float32 [E, 2] for w13 (w1's, w3's) and [E] for w2, `input_scale` likewise."""

    format = "nvfp4"
    group = GROUP
    # Read by W4A4 kernels only; vLLM creates them, checkpoints of weight-only NVFP4 may lack them.
    optional = frozenset({"w13_input_scale", "w2_input_scale"})
    label = "ModelOpt NVFP4 experts"

    def params(self, num_experts, hidden, inter, params_dtype):
        # vLLM's own method marks none of these: its loader recognises ModelOpt methods by
        # class name. For lk's method the attributes steer the same loader to the same
        # places: block scales sliced as the weights are, per-tensor scales one per shard.
        block = {"quant_method": FusedMoeWeightScaleSupported.BLOCK.value}
        tensor = {"quant_method": FusedMoeWeightScaleSupported.TENSOR.value}
        return {
            "w13_weight": ((num_experts, 2 * inter, hidden // 2), torch.uint8, {}),
            "w2_weight": ((num_experts, hidden, inter // 2), torch.uint8, {}),
            "w13_weight_scale": ((num_experts, 2 * inter, hidden // GROUP), torch.float8_e4m3fn, block),
            "w2_weight_scale": ((num_experts, hidden, inter // GROUP), torch.float8_e4m3fn, block),
            "w13_weight_scale_2": ((num_experts, 2), torch.float32, tensor),
            "w2_weight_scale_2": ((num_experts,), torch.float32, tensor),
            "w13_input_scale": ((num_experts, 2), torch.float32, tensor),
            "w2_input_scale": ((num_experts,), torch.float32, tensor),
        }

    def engine_inputs(self, layer):
        from lvllm.lk import QuantizedWeights

        return tuple(QuantizedWeights(codes, scales, GROUP, row_scales=row_scales)
                     for codes, scales, row_scales in nvfp4_tensors(layer))


def nvfp4_tensors(layer) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], ...]:
    """(codes, e4m3 group scales, float32 row scales [E, rows]) of w13 and of w2, as the loader
    filled them: w13's first half of rows scaled by w1's weight_scale_2, the second by w3's."""
    from lvllm.lk.nvfp4 import row_scales_of

    found = []
    for w in ("w13", "w2"):
        codes = getattr(layer, f"{w}_weight").data
        row_scales = row_scales_of(getattr(layer, f"{w}_weight_scale_2").data, codes.shape[1])
        found.append((codes.contiguous(), getattr(layer, f"{w}_weight_scale").data.contiguous(), row_scales))
    return tuple(found)


def nvfp4_source(layer, prefix, quant_config, problems) -> ExpertSource | None:
    """As ModelOptNvFp4Config.get_quant_method decides for a MoE layer, without building
    vLLM's method (it picks a device kernel, which the CPU build lacks)."""
    if quant_config.is_layer_excluded(prefix):   # exclude_modules (config.json: ignore) names it
        return ExpertSource()
    group = getattr(quant_config, "group_size", GROUP)
    hidden = layer.moe_config.hidden_dim
    inter = layer.moe_config.intermediate_size_per_partition
    if group != GROUP:
        problems.append(f"ModelOpt NVFP4 experts with group_size {group} (lk takes group_size {GROUP}, "
                        "one e4m3 scale per 16 inputs)")
        return None
    if hidden % GROUP or inter % GROUP:
        problems.append(f"ModelOpt NVFP4 experts with hidden size {hidden} and per-rank intermediate size "
                        f"{inter} (lk: both multiples of {GROUP})")
        return None
    return Nvfp4Source()
