"""GPTQ experts (GPTQModel / AutoGPTQ checkpoints, ``quant_method: "gptq"``) on lk.

vLLM 0.32 reads every GPTQ checkpoint through one config, ``AutoGPTQConfig`` (its name
"auto_gptq"), whose MoE method finds no kernel on vLLM's CPU build. What that config accepts
is what lk takes, decided here as it decides: 4 or 8 bits, ``sym: true`` only (asymmetric
checkpoints are refused when vLLM parses the config, for every layer), ``desc_act: true``
only with ``group_size: -1`` (where it changes nothing; with groups vLLM refuses it when it
parses the config, and drops every ``.g_idx`` tensor at load), per-module overrides and
exclusions from GPTQModel's ``dynamic`` field. The stored zero points are not read: a
symmetric GPTQ grid's zero point is 2^(bits - 1), which is how vLLM's GPTQ kernels read it.

lk keeps the checkpoint's integers and scales exactly: 4 bits as INT4 (the values, the scale,
and an offset of -8 x scale), 8 bits as INT8 (q - 128 and the scale; INT8 has no offsets,
which a symmetric grid does not need). Per-channel scales (``group_size: -1``) repeat over
groups of the largest multiple of 16 dividing both expert sizes.
"""

from __future__ import annotations

import copy

import torch
from vllm.model_executor.layers.fused_moe.routed_experts import FusedMoeWeightScaleSupported

from lvllm.formats import per_channel_group
from lvllm.vllm.expert_source_base import ExpertSource


class GptqSource(ExpertSource):
    """GPTQ experts as vLLM's AutoGPTQMoEMethod creates their params: input-major
    (`is_transposed`) `qweight` int32 [E, K * bits / 32, N], `scales` [E, K / group, N]
    (one row per expert with per-channel scales), `qzeros` int32 [E, K / group, N * bits / 32]."""

    def __init__(self, bits: int, stored_group: int, group: int):
        self.bits = bits
        self.stored_group = stored_group   # -1: per channel
        self.group = group                 # lk's: stored_group, or what per-channel repeats over
        self.format = "int4" if bits == 4 else "int8"
        # Zero points exist in every GPTQ checkpoint and vLLM creates them; a symmetric
        # grid's are fixed, so they are loaded but not read.
        self.optional = frozenset({"w13_qzeros", "w2_qzeros"})
        grouping = "per-channel" if stored_group == -1 else f"group_size {stored_group}"
        self.label = f"symmetric GPTQ {bits}-bit experts ({grouping})"

    def params(self, num_experts, hidden, inter, params_dtype):
        pack = 32 // self.bits
        if self.stored_group == -1:
            groups13 = groups2 = 1
            strategy = FusedMoeWeightScaleSupported.CHANNEL.value
        else:
            groups13, groups2 = hidden // self.stored_group, inter // self.stored_group
            strategy = FusedMoeWeightScaleSupported.GROUP.value
        attrs = {"is_transposed": True, "quant_method": strategy}
        # Scales in float32 rather than vLLM's model dtype: lk keeps float32 scales, so the
        # checkpoint's float16 ones are taken without a rounding step.
        return {
            "w13_qweight": ((num_experts, hidden // pack, 2 * inter), torch.int32, attrs),
            "w2_qweight": ((num_experts, inter // pack, hidden), torch.int32, attrs),
            "w13_scales": ((num_experts, groups13, 2 * inter), torch.float32, attrs),
            "w2_scales": ((num_experts, groups2, hidden), torch.float32, attrs),
            "w13_qzeros": ((num_experts, groups13, 2 * inter // pack), torch.int32, attrs),
            "w2_qzeros": ((num_experts, groups2, hidden // pack), torch.int32, attrs),
        }

    def engine_inputs(self, layer):
        from lvllm.lk.quant import from_gptq

        return tuple(from_gptq(getattr(layer, f"{w}_qweight").data, getattr(layer, f"{w}_scales").data,
                               self.bits, self.group)
                     for w in ("w13", "w2"))


def gptq_source(layer, prefix, quant_config, problems) -> ExpertSource | None:
    """As AutoGPTQConfig.get_quant_method decides for a MoE layer, without building vLLM's
    method (it picks a device kernel, which the CPU build lacks)."""
    from vllm.model_executor.layers.quantization.utils.gptq_utils import (get_dynamic_override,
                                                                          override_config)

    if get_dynamic_override(quant_config, layer_name=prefix) is False:   # a "-:" rule: not quantized
        return ExpertSource()
    config = copy.deepcopy(quant_config)
    override_config(config, prefix=prefix)   # "+:" rules; raises, as vLLM does, on what it refuses
    bits, group = config.weight_bits, config.group_size
    hidden = layer.moe_config.hidden_dim
    inter = layer.moe_config.intermediate_size_per_partition
    sizes = f"hidden size {hidden} and per-rank intermediate size {inter}"
    if config.desc_act:
        problems.append("GPTQ experts with desc_act: true (activation order) and group_size "
                        f"{group}: lk takes desc_act: false, or group_size -1")
        return None
    if not config.is_sym or bits not in (4, 8):
        problems.append(f"GPTQ experts with bits {bits}, sym {config.is_sym} (lk takes 4 or 8 "
                        "bits, sym: true)")
        return None
    pack = 32 // bits
    if group == -1:
        lk_group = per_channel_group(hidden, inter)
        if not lk_group or hidden % pack or inter % pack:
            problems.append(f"GPTQ experts with per-channel scales (group_size -1) and {sizes} "
                            "(lk: sizes with a common divisor that is a multiple of 16)")
            return None
        return GptqSource(bits, -1, lk_group)
    if group <= 0 or group % 16 or hidden % group or inter % group:
        problems.append(f"GPTQ experts with group_size {group} and {sizes} (lk takes group_size "
                        "-1, or a multiple of 16 dividing both sizes)")
        return None
    return GptqSource(bits, group, group)
