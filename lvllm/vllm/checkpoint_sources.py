"""How a checkpoint stores a MoE layer's routed experts, and how lk takes them.

An ``ExpertSource`` (expert_source_base.py) says which params vLLM's loader fills for the
layer (the same names, shapes and attributes vLLM's own quant method would create, so vLLM's
weight loading runs unchanged) and turns them into the engine's inputs. Here: the FP8-block,
compressed-tensors INT4, AWQ INT4 and MXFP4 sources, and ``expert_source``, which picks the
source from the layer's quantization config (these, gptq_source.py's or nvfp4_source.py's),
as vLLM would pick its quant method.
"""

from __future__ import annotations

import dataclasses

import torch
from vllm.model_executor.layers.fused_moe.routed_experts import FusedMoeWeightScaleSupported
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
    UnquantizedFusedMoEMethod,
)
from vllm.model_executor.layers.quantization.base_config import resolve_quant_method
from vllm.model_executor.layers.quantization.utils.quant_utils import is_layer_skipped
from vllm.platforms import current_platform

from lvllm import formats
from lvllm.placement import activation_problems
from lvllm.vllm.expert_source_base import ExpertSource
from lvllm.vllm.gptq_source import gptq_source
from lvllm.vllm.nvfp4_source import nvfp4_source


def bias_params(num_experts, hidden, inter):
    """Expert biases (gpt-oss), as vLLM creates them for ``has_bias`` layers; float32, which
    lk keeps them in, so a bf16 checkpoint's are taken unrounded."""
    return {"w13_bias": ((num_experts, 2 * inter), torch.float32, {}),
            "w2_bias": ((num_experts, hidden), torch.float32, {})}


def gate_up_halves(w):
    """w13 (or its bias) with gate and up rows interleaved, as vLLM's swigluoai reads them,
    reordered into lk's gate rows then up rows: a tensor, or every row-indexed tensor of an
    lvllm.lk.QuantizedWeights."""
    if isinstance(w, torch.Tensor):
        return torch.cat([w[:, 0::2], w[:, 1::2]], dim=1)
    rows = w.values.shape[:2]
    return dataclasses.replace(w, **{
        field.name: gate_up_halves(value) for field in dataclasses.fields(w)
        if isinstance(value := getattr(w, field.name), torch.Tensor) and value.shape[:2] == rows})


class Fp8BlockSource(ExpertSource):
    """FP8 e4m3 weights with one float32 `weight_scale_inv` per block_n x block_k block,
    as vLLM's Fp8MoEMethod (block quant) creates and loads them."""

    format = "fp8_e4m3"
    label = "FP8 block-quantized experts"

    def __init__(self, block):
        self.block_n, self.block_k = block
        self.group = self.block_k

    def params(self, num_experts, hidden, inter, params_dtype):
        block = {"quant_method": FusedMoeWeightScaleSupported.BLOCK.value}
        w13_scales, w2_scales = formats.fp8_block_scale_shapes(hidden, inter, (self.block_n, self.block_k))
        return {
            "w13_weight": ((num_experts, 2 * inter, hidden), torch.float8_e4m3fn, {}),
            "w2_weight": ((num_experts, hidden, inter), torch.float8_e4m3fn, {}),
            "w13_weight_scale_inv": ((num_experts, *w13_scales), torch.float32, block),
            "w2_weight_scale_inv": ((num_experts, *w2_scales), torch.float32, block),
        }

    def engine_inputs(self, layer):
        from lvllm.lk import QuantizedWeights
        from lvllm.lk.quant import expand_block_scales

        w13, w2 = layer.w13_weight.data, layer.w2_weight.data
        inter = w2.shape[2]
        gate_scales, up_scales = layer.w13_weight_scale_inv.data.chunk(2, dim=1)
        w13_scales = torch.cat([expand_block_scales(gate_scales, inter, self.block_n),
                                expand_block_scales(up_scales, inter, self.block_n)], dim=1)
        w2_scales = expand_block_scales(layer.w2_weight_scale_inv.data, w2.shape[1],
                                        self.block_n)
        return (QuantizedWeights(w13.contiguous(), w13_scales, self.block_k),
                QuantizedWeights(w2.contiguous(), w2_scales, self.block_k))


class CompressedTensorsInt4Source(ExpertSource):
    """compressed-tensors pack-quantized symmetric W4A16 experts, laid out as vLLM's
    CompressedTensorsWNA16MoEMethod creates them: N-first `weight_packed` int32
    [E, N, K / 8], `weight_scale` [E, N, K / group], `weight_shape`."""

    format = "int4"
    optional = frozenset({"w13_weight_shape", "w2_weight_shape"})
    label = "compressed-tensors W4A16 experts"

    def __init__(self, group: int):
        self.group = group

    def params(self, num_experts, hidden, inter, params_dtype):
        g = self.group
        group = {"is_transposed": False, "quant_method": "group"}
        # Scales in float32, not the model dtype vLLM uses: lk keeps float32 scales, so
        # the checkpoint's are taken without a rounding step.
        return {
            "w13_weight_packed": ((num_experts, 2 * inter, hidden // 8), torch.int32, group),
            "w2_weight_packed": ((num_experts, hidden, inter // 8), torch.int32, group),
            "w13_weight_scale": ((num_experts, 2 * inter, hidden // g), torch.float32, group),
            "w2_weight_scale": ((num_experts, hidden, inter // g), torch.float32, group),
            "w13_weight_shape": ((num_experts, 2), torch.float32, group),
            "w2_weight_shape": ((num_experts, 2), torch.float32, group),
        }

    def engine_inputs(self, layer):
        from lvllm.lk.quant import from_compressed_tensors_int4

        return tuple(
            from_compressed_tensors_int4(getattr(layer, f"{w}_weight_packed").data,
                                         getattr(layer, f"{w}_weight_scale").data,
                                         getattr(layer, f"{w}_weight_packed").shape[2] * 8,
                                         self.group)
            for w in ("w13", "w2"))


class AwqInt4Source(ExpertSource):
    """AutoAWQ GEMM 4-bit experts, laid out as vLLM's AutoAWQMoEMethod creates them:
    input-major (`is_transposed`) `qweight` int32 [E, K, N / 8] in AWQ's nibble order,
    `scales` [E, K / group, N], `qzeros` int32 [E, K / group, N / 8]."""

    format = "int4"

    def __init__(self, group: int, zero_point: bool):
        self.group = group
        self.zero_point = zero_point
        if zero_point:
            self.label = "AWQ INT4 experts with zero points (zero_point: true)"
        else:
            self.label = "symmetric AWQ INT4 experts"
            self.optional = frozenset({"w13_qzeros", "w2_qzeros"})

    def params(self, num_experts, hidden, inter, params_dtype):
        g = self.group
        group = {"is_transposed": True, "quant_method": "group"}
        # qzeros exist even for symmetric checkpoints (vLLM creates them too), so those
        # that store them load; they are read only with zero_point. Scales in float32 as
        # for compressed-tensors: AWQ stores float16 scales, which bf16 would round.
        return {
            "w13_qweight": ((num_experts, hidden, 2 * inter // 8), torch.int32, group),
            "w2_qweight": ((num_experts, inter, hidden // 8), torch.int32, group),
            "w13_scales": ((num_experts, hidden // g, 2 * inter), torch.float32, group),
            "w2_scales": ((num_experts, inter // g, hidden), torch.float32, group),
            "w13_qzeros": ((num_experts, hidden // g, 2 * inter // 8), torch.int32, group),
            "w2_qzeros": ((num_experts, inter // g, hidden // 8), torch.int32, group),
        }

    def engine_inputs(self, layer):
        from lvllm.lk.quant import from_awq_int4

        return tuple(
            from_awq_int4(getattr(layer, f"{w}_qweight").data,
                          getattr(layer, f"{w}_qzeros").data if self.zero_point else None,
                          getattr(layer, f"{w}_scales").data, self.group)
            for w in ("w13", "w2"))


class Mxfp4Source(ExpertSource):
    """OCP MXFP4 experts as gpt-oss ships them and vLLM's GptOssMxfp4MoEMethod creates them:
    `weight` uint8 [E, N, K / 2] (two e2m1 codes a byte), `weight_scale` uint8 e8m0
    [E, N, K / 32]; the model's loader copies whole layers into them."""

    format = "mxfp4"
    group = 32
    label = "MXFP4 experts (gpt-oss)"

    def params(self, num_experts, hidden, inter, params_dtype):
        g = self.group
        return {
            "w13_weight": ((num_experts, 2 * inter, hidden // 2), torch.uint8, {}),
            "w2_weight": ((num_experts, hidden, inter // 2), torch.uint8, {}),
            "w13_weight_scale": ((num_experts, 2 * inter, hidden // g), torch.uint8, {}),
            "w2_weight_scale": ((num_experts, hidden, inter // g), torch.uint8, {}),
        }

    def engine_inputs(self, layer):
        from lvllm.lk import QuantizedWeights

        return tuple(QuantizedWeights(getattr(layer, f"{w}_weight").data,
                                      getattr(layer, f"{w}_weight_scale").data, self.group)
                     for w in ("w13", "w2"))


def expert_source(layer, prefix, quant_config, problems: list[str]) -> ExpertSource | None:
    """How the checkpoint stores ``layer``'s experts, as vLLM would load them; what lk cannot
    take is added to ``problems`` (and None returned)."""
    if quant_config is None:
        return ExpertSource()
    from vllm.model_executor.layers.quantization.fp8 import Fp8Config

    if type(quant_config) is Fp8Config:
        # Decided from the config, as Fp8Config.get_quant_method does: building
        # vLLM's Fp8MoEMethod would pick a device kernel backend this host may lack.
        if is_layer_skipped(prefix=prefix, ignored_layers=quant_config.ignored_layers,
                            fused_mapping=quant_config.packed_modules_mapping,
                            match_mode=quant_config.ignored_layers_match_mode):
            return ExpertSource()
        block = quant_config.weight_block_size
        if quant_config.store_dtype is None and block is not None:
            bn, bk = block
            inter = layer.moe_config.intermediate_size_per_partition
            if bk % 16 or inter % bn or inter % bk:
                problems.append(f"FP8 blocks {bn}x{bk} with an intermediate size per "
                                f"rank of {inter} (lk: block sizes that divide it, "
                                f"multiples of 16)")
            return Fp8BlockSource(block)
        problems.append("FP8 experts without 2-D block scales (lk takes FP8 "
                        "checkpoints with weight_block_size, e.g. [128, 128])")
        return None
    if quant_config.get_name() == "compressed-tensors":
        return _compressed_tensors_source(layer, prefix, quant_config, problems)
    if quant_config.get_name() == "auto_awq":  # what vLLM makes of quant_method "awq"
        return _awq_source(layer, prefix, quant_config, problems)
    if quant_config.get_name() == "gpt_oss_mxfp4":   # vLLM's name for gpt-oss's "mxfp4"
        return _mxfp4_source(layer, prefix, quant_config, problems)
    if quant_config.get_name() == "auto_gptq":   # what vLLM makes of quant_method "gptq"
        return gptq_source(layer, prefix, quant_config, problems)
    if quant_config.get_name() == "modelopt_fp4":   # ModelOpt's quant_algo "NVFP4" / "W4A16_NVFP4"
        return nvfp4_source(layer, prefix, quant_config, problems)
    method = resolve_quant_method(quant_config, layer, prefix)
    if method is None or isinstance(method, UnquantizedFusedMoEMethod):
        return ExpertSource()
    problems.append(f"{quant_config.get_name()} quantized experts "
                    f"({type(method).__name__}); lk takes float, FP8 block-quantized, "
                    "compressed-tensors W4A16 symmetric, AWQ INT4, GPTQ 4/8-bit symmetric, ModelOpt "
                    "NVFP4 and gpt-oss MXFP4 experts")
    return None


def _compressed_tensors_source(layer, prefix, quant_config, problems):
    """The scheme vLLM's CompressedTensorsMoEMethod.get_moe_method would read."""
    quant_config._add_fused_moe_to_target_scheme_map()
    scheme = quant_config.get_scheme_dict(layer, f"{prefix}.0.{layer.ckpt_gate_proj_name}")
    if scheme is None:
        return ExpertSource()
    weights, inputs = scheme.get("weights"), scheme.get("input_activations")
    inter = layer.moe_config.intermediate_size_per_partition
    group = getattr(weights, "group_size", None) or 0
    ok = (weights is not None and inputs is None and weights.num_bits == 4
          and str(getattr(weights.type, "value", weights.type)) == "int"
          and str(getattr(weights.strategy, "value", weights.strategy)) == "group"
          and weights.symmetric and scheme.get("format") == "pack-quantized"
          and group % 16 == 0 and group > 0 and inter % group == 0
          and layer.moe_config.hidden_dim % group == 0
          and getattr(weights, "actorder", None) in (None, "static"))
    if not ok:
        problems.append(
            f"compressed-tensors experts {scheme.get('format')} "
            f"{weights!r} with input activations {inputs!r} (lk takes pack-quantized "
            "symmetric 4-bit int weights with group strategy, group a multiple of 16 "
            "dividing the hidden and per-rank intermediate sizes, no activation "
            "quantization)")
        return None
    return CompressedTensorsInt4Source(group)


def _mxfp4_source(layer, prefix, quant_config, problems):
    # As vLLM's Mxfp4Config, whose ignored_layers apply to linear layers only.
    hidden = layer.moe_config.hidden_dim
    inter = layer.moe_config.intermediate_size_per_partition
    if hidden % Mxfp4Source.group or inter % Mxfp4Source.group:
        problems.append(f"MXFP4 experts with hidden size {hidden} and per-rank intermediate size "
                        f"{inter} (lk: both multiples of {Mxfp4Source.group})")
        return None
    return Mxfp4Source()


def _awq_source(layer, prefix, quant_config, problems):
    """As AutoAWQConfig.get_quant_method decides, without building vLLM's AWQ MoE
    method (it picks a device kernel backend)."""
    if is_layer_skipped(prefix, quant_config.modules_to_not_convert,
                        match_mode="substring"):
        return ExpertSource()
    group, hidden = quant_config.group_size, layer.moe_config.hidden_dim
    inter = layer.moe_config.intermediate_size_per_partition
    version = str(quant_config.full_config.get("version", "gemm")).lower()
    if (version != "gemm" or group <= 0 or group % 16 or hidden % group
            or inter % group):
        problems.append(
            f"AWQ experts (version {version!r}, group_size {group}) with hidden size "
            f"{hidden} and per-rank intermediate size {inter} (lk takes AWQ GEMM 4-bit "
            "experts, symmetric or with zero points, group_size a multiple of 16 "
            "dividing both sizes)")
        return None
    return AwqInt4Source(group, bool(quant_config.zero_point))


def lk_problems(layer, moe_config) -> list[str]:
    """Every reason beside the checkpoint's format (expert_source) that lk cannot compute
    ``layer``'s experts; lvllm.placement refuses the layer with them."""
    problems = activation_problems(moe_config.activation.value, moe_config.is_act_and_mul)
    clamped = {name: getattr(moe_config, name, None)
               for name in ("swiglu_limit", "swiglu_alpha", "swiglu_beta")}
    if moe_config.activation.value == "swigluoai":
        clamped.pop("swiglu_limit")   # lk's swigluoai takes these two
        clamped.pop("swiglu_alpha")
    if any(value not in (None, 0) for value in clamped.values()):
        problems.append(f"activation {moe_config.activation.value!r} with "
                        f"{', '.join(f'{k}={v}' for k, v in clamped.items() if v not in (None, 0))}")
    if layer.apply_router_weight_on_input and moe_config.experts_per_token != 1:
        problems.append(f"router weight applied on the input with top-{moe_config.experts_per_token} routing "
                        "(top-1 only, as vLLM's own kernels)")
    if moe_config.moe_parallel_config.use_ep and not current_platform.is_cpu():
        problems.append("expert parallelism on the CUDA build (run with lk only on vLLM's CPU build so far)")
    if moe_config.is_lora_enabled:
        problems.append("MoE LoRA")
    return problems
