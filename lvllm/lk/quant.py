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

import dataclasses

from lvllm.lk import QuantizedWeights, mxfp4, nvfp4


# Experts quantized per step: enough for a whole layer of a small model, few enough that a
# DeepSeek-V3 layer (30 GB as fp32) never sits on the device at once.
CHUNK_FLOAT_BYTES = 256 << 20


def _pinned(staging: dict, name: str, like: torch.Tensor) -> torch.Tensor:
    """A pinned host tensor shaped like ``like``, from the buffer kept in ``staging`` under
    ``name`` (grown when too small): one chunk's worth, reused every other chunk."""
    buffer = staging.get(name)
    if buffer is None or buffer.numel() < like.numel():
        buffer = staging[name] = torch.empty(like.numel(), dtype=like.dtype, pin_memory=True)
    return buffer[:like.numel()].view(like.shape)


def _upload(t: torch.Tensor, device: torch.device, staging: dict, name: str) -> torch.Tensor:
    """t on ``device``. Host tensors go to a GPU through pinned memory that torch fills
    with all its threads: a pageable copy runs at the driver's single-threaded pace."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    host = _pinned(staging, name, t)
    host.copy_(t)
    return host.to(device, non_blocking=True)


def _experts_on(device, w, start: int, end: int, staging: dict) -> torch.Tensor:
    """Experts [start, end) on ``device``: float weights as they are, QuantizedWeights
    dequantized to float32 there as the engine does."""
    if not isinstance(w, QuantizedWeights):
        return _upload(w[start:end], device, staging, "values")
    part = dataclasses.replace(w, **{
        field.name: _upload(tensor[start:end], device, staging, field.name) for field in dataclasses.fields(w)
        if isinstance(tensor := getattr(w, field.name), torch.Tensor)})
    return dequantize(part)


def _refuse_fp8_nan(w) -> None:
    """Raises, naming the first one, if FP8 weights hold the e4m3fn NaN code (S.1111.111),
    as the engine does: quantizers saturate to +-448, so it means a damaged checkpoint."""
    for expert, codes in enumerate(w.values.view(torch.uint8)):
        found = ((codes & 0x7F) == 0x7F).nonzero()
        if len(found):
            row, col = found[0].tolist()
            raise ValueError(f"expert {expert}, row {row}, input {col} holds a float8_e4m3fn NaN; "
                             "lk needs finite weights")


def quantize(w, weight_format: str, group: int, device=None) -> QuantizedWeights:
    """Quantizes [E, rows, cols] experts, float or QuantizedWeights (dequantized first, as
    the engine does), on ``device`` (default: where they are), a few experts at a time so
    the fp32 working set stays near CHUNK_FLOAT_BYTES; the result lives on the CPU."""
    if weight_format not in ("int8", "int4"):
        raise ValueError(f"quantize makes int8 or int4, not {weight_format!r}")
    if group < 16 or group % 16:
        raise ValueError(f"group must be a positive multiple of 16, got {group}")
    if device is None:
        device = w.values.device if isinstance(w, QuantizedWeights) else w.device
    device = torch.device(device)
    if isinstance(w, QuantizedWeights) and w.format == "mxfp4":
        mxfp4.refuse_nan(w.scales)
    if isinstance(w, QuantizedWeights) and w.format == "nvfp4":
        nvfp4.refuse_nonfinite(w.scales, w.row_scales)
    experts, rows, cols = w.shape
    groups = -(-cols // group)
    # Results come back from a GPU straight into pinned memory: pageable memory, or pinned
    # staging plus a host copy, costs more than the quantization. torch's pinned cache hands
    # these blocks to the next layer's call; release_pinned_memory() ends that.
    on_gpu = device.type == "cuda"
    values = torch.empty(experts, rows, cols, dtype=torch.int8 if weight_format == "int8" else torch.uint8,
                         pin_memory=on_gpu)
    scales = torch.empty(experts, rows, groups, pin_memory=on_gpu)
    offsets = torch.empty(experts, rows, groups, pin_memory=on_gpu) if weight_format == "int4" else None
    step = max(1, CHUNK_FLOAT_BYTES // (rows * groups * group * 4))
    # CUDA divides by a Python number as a multiply by its reciprocal, one bit off the
    # engine's division at times; dividing by tensors divides on every device.
    levels = torch.tensor(127.0 if weight_format == "int8" else 15.0, device=device)
    one = torch.tensor(1.0, device=device)
    # Two sets of staging buffers: the host fills one with the next chunk while the GPU
    # copies up, quantizes and copies back the chunk in the other. A set is refilled once
    # the upload that read it (its event) is done.
    staging, uploaded = [{}, {}], [None, None]
    # FP8 NaN codes decode to NaN: seen on the device without waiting, named at the end.
    nan_seen = torch.zeros((), dtype=torch.bool, device=device)
    for index, start in enumerate(range(0, experts, step)):
        end, turn = min(experts, start + step), index % 2
        if uploaded[turn] is not None:
            uploaded[turn].synchronize()
        # A copy (the steps below work in place), its last group padded with its own last
        # value, which keeps that group's min and max.
        grouped = torch.empty(end - start, rows, groups * group, device=device)
        grouped[..., :cols] = _experts_on(device, w, start, end, staging[turn])
        if on_gpu:
            uploaded[turn] = torch.cuda.Event()
            uploaded[turn].record()
        if isinstance(w, QuantizedWeights) and w.values.dtype == torch.float8_e4m3fn:
            nan_seen |= grouped[..., :cols].isnan().any()
        grouped[..., cols:] = grouped[..., cols - 1:cols]
        grouped = grouped.view(end - start, rows, groups, group)
        low, high = torch.aminmax(grouped, dim=-1, keepdim=True)
        if weight_format == "int8":  # symmetric: q in [-127, 127]
            scale = torch.maximum(low.abs(), high.abs()) / levels
            inverse = torch.where(scale > 0, one / scale, 0.0)
            q = grouped.mul_(inverse).round_().clamp_(-127, 127).to(torch.int8)
        else:  # asymmetric: q in [0, 15] spans [low, high]
            scale = (high - low) / levels
            inverse = torch.where(scale > 0, one / scale, 0.0)
            q = grouped.sub_(low).mul_(inverse).round_().clamp_(0, 15).to(torch.uint8)
            offsets[start:end].copy_(low.squeeze(-1), non_blocking=on_gpu)
        values[start:end].copy_(q.flatten(2)[..., :cols], non_blocking=on_gpu)
        scales[start:end].copy_(scale.squeeze(-1), non_blocking=on_gpu)
    if on_gpu:
        torch.cuda.current_stream(device).synchronize()
    if nan_seen:
        _refuse_fp8_nan(w)
    return QuantizedWeights(values, scales, group, offsets)


def release_pinned_memory() -> None:
    """Hands the pinned host memory quantize() used on a GPU back to the system. torch keeps
    freed pinned blocks for reuse, which suits a load's layers one after the other (one
    layer's results: 0.7 GB for Qwen3-30B-A3B, about 12 GiB for DeepSeek-V3), not serving."""
    if torch.cuda.is_available():
        torch._C._host_emptyCache()


def dequantize(weights: QuantizedWeights) -> torch.Tensor:
    """The float32 values quantized weights stand for."""
    if weights.format == "mxfp4":
        return mxfp4.dequantize(weights.values, weights.scales)
    if weights.format == "nvfp4":
        return nvfp4.dequantize(weights.values, weights.scales, weights.row_scales)
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


def from_gptq(qweight: torch.Tensor, scales: torch.Tensor, bits: int, group: int) -> QuantizedWeights:
    """GPTQ symmetric experts (vLLM 0.32's only GPTQ grid: the stored zero points are not
    read, the zero point is 2^(bits - 1)), input-major: `qweight` int32
    [E, in * bits / 32, out], input 32 / bits * r + i of word r in bits bits * i on;
    `scales` [E, in / stored group, out]; weight[out, in] = (q - 2^(bits - 1)) * scale.
    Returned as [E, out, in] rows in lk's INT4 (4 bits) or INT8 (8 bits) in groups of
    ``group`` inputs, which must divide the stored group (per-channel scales repeat)."""
    if bits not in (4, 8):
        raise ValueError(f"GPTQ bits must be 4 or 8, got {bits}")
    experts, _, outputs = qweight.shape
    per_word, inputs = 32 // bits, qweight.shape[1] * (32 // bits)
    stored_group = inputs // scales.shape[1]
    if stored_group * scales.shape[1] != inputs or stored_group % group:
        raise ValueError(f"GPTQ scales {tuple(scales.shape)} for {inputs} inputs: the group of "
                         f"{group} inputs must divide the stored one")
    values = torch.empty(experts, outputs, inputs, dtype=torch.uint8 if bits == 4 else torch.int8)
    by_input = values.transpose(1, 2)   # [E, in, out] view of the rows' storage
    mask, zero = (1 << bits) - 1, 1 << (bits - 1)
    for i in range(per_word):   # one input of every word at a time: small temporaries
        codes = (qweight >> (bits * i)) & mask
        by_input[:, i::per_word] = codes if bits == 4 else codes - zero
    scales = scales.float().repeat_interleave(stored_group // group, 1).transpose(1, 2).contiguous()
    offsets = (-zero * scales).contiguous() if bits == 4 else None
    return QuantizedWeights(values, scales, group, offsets)
