"""Expert weight quantization in torch, on any device, bit-identical to the engine's own.

The engine quantizes float weights itself when given ``weight_format="int8"/"int4"``; these
functions do the same arithmetic with torch so the work can run on a GPU at load time
(``LVLLM_MOE_QUANT_ON_GPU=1``) and the result be handed to the engine as
:class:`~lvllm.lk.QuantizedWeights`. Per group of ``group`` consecutive inputs of a row:

- int8: symmetric, scale = max|w| / 127, q = round(w / scale) in [-127, 127];
- int4: asymmetric, scale = (max - min) / 15, offset = min, q = round((w - min) / scale)
  in [0, 15];

rounding half to even, w / scale computed as w * (1 / scale) in fp32, as the engine does.
"""

from __future__ import annotations

import torch

from lvllm.lk import QuantizedWeights


def _groups(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, rows, cols] -> fp32 [E, rows, groups, group] zero-padded, and its validity mask."""
    experts, rows, cols = w.shape
    groups = -(-cols // group)
    padded = torch.zeros(experts, rows, groups * group, dtype=torch.float32, device=w.device)
    padded[..., :cols] = w.float()
    valid = torch.zeros(groups * group, dtype=torch.bool, device=w.device)
    valid[:cols] = True
    return padded.view(experts, rows, groups, group), valid.view(groups, group)


def quantize(w: torch.Tensor, weight_format: str, group: int) -> QuantizedWeights:
    """Quantizes float [E, rows, cols] weights; the result lives on the CPU."""
    if weight_format not in ("int8", "int4"):
        raise ValueError(f"quantize makes int8 or int4, not {weight_format!r}")
    if group < 16 or group % 16:
        raise ValueError(f"group must be a positive multiple of 16, got {group}")
    cols = w.shape[2]
    grouped, valid = _groups(w, group)
    if weight_format == "int8":
        scale = grouped.abs().amax(-1, keepdim=True) / 127
        inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
        q = torch.round(grouped * inverse).clamp_(-127, 127).to(torch.int8)
        offsets = None
    else:
        low = torch.where(valid, grouped, torch.inf).amin(-1, keepdim=True)
        high = torch.where(valid, grouped, -torch.inf).amax(-1, keepdim=True)
        scale = (high - low) / 15
        inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
        q = torch.round((grouped - low) * inverse).clamp_(0, 15).to(torch.uint8)
        offsets = low.squeeze(-1).cpu().contiguous()
    values = q.flatten(2)[..., :cols].cpu().contiguous()
    return QuantizedWeights(values, scale.squeeze(-1).cpu().contiguous(), group, offsets)


def dequantize(weights: QuantizedWeights) -> torch.Tensor:
    """The float32 values quantized weights stand for."""
    cols = weights.values.shape[2]
    scales = weights.scales.repeat_interleave(weights.group_size, -1)[..., :cols]
    values = weights.values.float() * scales
    if weights.offsets is not None:
        values += weights.offsets.repeat_interleave(weights.group_size, -1)[..., :cols]
    return values


def expand_block_scales(block_scales: torch.Tensor, rows: int, block_rows: int) -> torch.Tensor:
    """Block scales [E, ceil(rows / block_rows), groups] (as FP8 block checkpoints store
    `weight_scale_inv`) -> per-row group scales [E, rows, groups] in fp32."""
    return block_scales.float().repeat_interleave(block_rows, dim=1)[:, :rows].contiguous()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., n] -> uint8 [..., n, 8]: nibble i (bits 4i..4i+3) of each word."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & 0xF).to(torch.uint8)


def from_compressed_tensors_int4(packed: torch.Tensor, scales: torch.Tensor, cols: int, group: int) -> QuantizedWeights:
    """compressed-tensors pack-quantized symmetric W4A16: `weight_packed` int32
    [E, rows, ceil(cols / 8)] (value j of a row in nibble j % 8 of word j // 8, stored as
    q + 8), `weight_scale` [E, rows, cols / group]; weight = q * scale."""
    values = _nibbles(packed).flatten(-2)[..., :cols].contiguous()
    scales = scales.float().contiguous()
    return QuantizedWeights(values, scales, group, (-8 * scales).contiguous())


# AWQ packs 8 output columns per int32 in this order: nibble i holds column _AWQ_ORDER[i].
_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _awq_unpack(packed: torch.Tensor) -> torch.Tensor:
    """AWQ int32 [..., n] -> uint8 [..., 8 n] in column order."""
    nibbles = _nibbles(packed)
    columns = torch.empty_like(nibbles)
    columns[..., list(_AWQ_ORDER)] = nibbles
    return columns.flatten(-2)


def from_awq_int4(qweight: torch.Tensor, qzeros: torch.Tensor | None, scales: torch.Tensor, group: int) -> QuantizedWeights:
    """AWQ GEMM layout, input-major: `qweight` int32 [E, in, out / 8], `qzeros` int32
    [E, in / group, out / 8] (None: symmetric, zero point 8), `scales` [E, in / group, out];
    weight[out, in] = (q - zero) * scale. Returned as [E, out, in] rows."""
    values = _awq_unpack(qweight).transpose(1, 2).contiguous()
    scales = scales.float().transpose(1, 2).contiguous()
    if qzeros is None:
        zeros = torch.full_like(scales, 8.0)
    else:
        zeros = _awq_unpack(qzeros).float().transpose(1, 2)
    return QuantizedWeights(values, scales, group, (-zeros * scales).contiguous())
