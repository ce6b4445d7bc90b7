"""A checkpoint's quantized expert and dense tensors turned back into float64 values by each format's
own layout (GPTQ, AWQ, compressed-tensors, FP8 blocks, NVFP4, MXFP4), for lvllm.reference."""

from __future__ import annotations

from typing import Protocol

import torch


class CheckpointTensors(Protocol):
    """What is read here of lvllm.reference.CheckpointTensors: a tensor by name, whether it is there,
    and config.json's quantization_config."""

    quantization: dict

    def get(self, name: str) -> torch.Tensor: ...

    def __contains__(self, name: str) -> bool: ...

# AutoAWQ's GEMM packing: nibble i (bits 4i..4i+3) of a word holds column AWQ_ORDER[i] of its 8.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _nibbles(words: torch.Tensor, order=tuple(range(8))) -> torch.Tensor:
    """int32 [..., n] -> int64 [..., 8n] values 0..15; nibble i of word j is column 8j + order[i]."""
    values = torch.stack([(words.long() >> (4 * i)) & 15 for i in range(8)], dim=-1)
    placed = torch.empty_like(values)
    placed[..., list(order)] = values
    return placed.flatten(-2)


def _per_group(scales: torch.Tensor, group_rows: int, group_cols: int, rows: int, cols: int) -> torch.Tensor:
    return scales.double().repeat_interleave(group_rows, 0)[:rows].repeat_interleave(group_cols, 1)[:, :cols]


def _is_gptq(tensors: CheckpointTensors, stem: str) -> bool:
    """GPTQ packs `qweight` along the inputs (as many columns as `scales`), AWQ along the outputs."""
    return (f"{stem}.qweight" in tensors
            and tensors.get(f"{stem}.qweight").shape[1] == tensors.get(f"{stem}.scales").shape[1])


def gptq_bits(tensors: CheckpointTensors, stem: str) -> int:
    """Bits a weight of a GPTQ projection, from its tensors' shapes (`dynamic` may set them per
    module): qzeros pack the outputs, g_idx counts the inputs; else the config's."""
    outputs, words = tensors.get(f"{stem}.scales").shape[1], tensors.get(f"{stem}.qweight").shape[0]
    if f"{stem}.qzeros" in tensors:
        return 32 * tensors.get(f"{stem}.qzeros").shape[1] // outputs
    if f"{stem}.g_idx" in tensors:
        return 32 * words // tensors.get(f"{stem}.g_idx").shape[0]
    return int(tensors.quantization.get("bits", 4))


def _dequantize_gptq(tensors: CheckpointTensors, stem: str) -> torch.Tensor:
    """GPTQ: `qweight` [in * bits / 32, out], input 32 / bits * r + i in bits bits * i on of
    word r; `scales` [groups, out]; input k in group g_idx[k] (act-order), k // group without
    g_idx; zero point 2^(bits - 1): a symmetric grid, the only one vLLM 0.32 loads (its stored
    qzeros, zero - 1 in checkpoint_format "gptq", are not read). -> [out, in]."""
    bits, words = gptq_bits(tensors, stem), tensors.get(f"{stem}.qweight").long() & 0xFFFFFFFF
    per_word, mask = 32 // bits, (1 << bits) - 1
    q = torch.stack([(words >> (bits * i)) & mask for i in range(per_word)], dim=1).flatten(0, 1)
    scales = tensors.get(f"{stem}.scales").double()
    inputs = q.shape[0]
    g_idx = (tensors.get(f"{stem}.g_idx").long() if f"{stem}.g_idx" in tensors
             else torch.arange(inputs) // (inputs // scales.shape[0]))
    if not tensors.quantization.get("sym", True):
        raise ValueError(f"{stem}: GPTQ with sym: false, which vLLM 0.32 does not load")
    return ((q - (1 << (bits - 1))) * scales[g_idx]).T.contiguous()


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """FP4 e2m1 codes 0..15 -> float64: sign bit 3, exponent bits 2-1 (bias 1; 0: subnormal,
    mantissa x 0.5), mantissa bit 0. Magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6."""
    codes = codes.long()
    sign = torch.where(codes >= 8, -1.0, 1.0).double()
    exponent, mantissa = ((codes >> 1) & 3).double(), (codes & 1).double()
    return sign * torch.where(exponent == 0, 0.5 * mantissa, (1.0 + 0.5 * mantissa) * torch.pow(2.0, exponent - 1))


def e4m3_values(scales: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn bytes -> float64, from the bits: sign bit 7, exponent bits 6-3 (bias 7;
    0: subnormal, mantissa / 8 x 2^-6), mantissa bits 2-0; S.1111.111 is NaN (no infinities)."""
    bits = scales.view(torch.uint8).long()
    sign = torch.where(bits >= 128, -1.0, 1.0).double()
    exponent, mantissa = ((bits >> 3) & 15).double(), (bits & 7).double()
    value = torch.where(exponent == 0, mantissa / 8 * 2.0**-6, (1 + mantissa / 8) * torch.pow(2.0, exponent - 7))
    return torch.where((bits & 127) == 127, torch.nan, sign * value)


def _dequantize_nvfp4(tensors: CheckpointTensors, stem: str) -> torch.Tensor:
    """NVIDIA ModelOpt NVFP4: `weight` uint8 [out, in / 2], two e2m1 codes a byte, the even
    input's in the low nibble; `weight_scale` float8_e4m3fn [out, in / 16]; `weight_scale_2`
    float32, the projection's own: w = e2m1 x scale x scale_2. -> [out, in]."""
    packed = tensors.get(f"{stem}.weight")
    codes = torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)
    scales = e4m3_values(tensors.get(f"{stem}.weight_scale"))
    group = codes.shape[1] // scales.shape[1]
    return e2m1_values(codes) * scales.repeat_interleave(group, 1) * tensors.get(f"{stem}.weight_scale_2").double()


def dequantize(tensors: CheckpointTensors, stem: str) -> torch.Tensor:
    """One projection [out, in] in float64, by the tensors the checkpoint holds for it."""
    if f"{stem}.weight_scale_2" in tensors:
        return _dequantize_nvfp4(tensors, stem)
    if _is_gptq(tensors, stem):
        return _dequantize_gptq(tensors, stem)
    if f"{stem}.qweight" in tensors:   # AutoAWQ GEMM: input-major, (q - zero) * scale per group of inputs
        q = _nibbles(tensors.get(f"{stem}.qweight"), AWQ_ORDER)
        scales = tensors.get(f"{stem}.scales").double()
        group = q.shape[0] // scales.shape[0]
        zeros = (_nibbles(tensors.get(f"{stem}.qzeros"), AWQ_ORDER) if f"{stem}.qzeros" in tensors
                 else torch.full_like(scales, 8, dtype=torch.long))
        w = (q - zeros.repeat_interleave(group, 0)) * scales.repeat_interleave(group, 0)
        return w.T.contiguous()
    if f"{stem}.weight_packed" in tensors:   # compressed-tensors pack-quantized: offset-binary nibbles
        q = _nibbles(tensors.get(f"{stem}.weight_packed")) - 8
        scales = tensors.get(f"{stem}.weight_scale")
        rows, cols = q.shape
        if f"{stem}.weight_shape" in tensors:
            rows, cols = (int(v) for v in tensors.get(f"{stem}.weight_shape"))
        q = q[:rows, :cols]
        return q * _per_group(scales, 1, -(-cols // scales.shape[1]), rows, cols)
    w = tensors.get(f"{stem}.weight")
    if w.dtype == torch.float8_e4m3fn:   # FP8 with weight_scale_inv per block: w = q * scale
        scales = tensors.get(f"{stem}.weight_scale_inv")
        rows, cols = w.shape
        return w.double() * _per_group(scales, -(-rows // scales.shape[0]), -(-cols // scales.shape[1]), rows, cols)
    return w.double()


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """OCP MXFP4 as gpt-oss stores a projection W [out, in] (and HF transformers'
    convert_moe_packed_tensors reads it): ``blocks`` uint8 [..., out, in / 32, 16], two e2m1
    codes per byte, the even input's in the low nibble; ``scales`` uint8 [..., out, in / 32],
    e8m0: 2^(byte - 127), 255 NaN. -> float64 [..., out, in]."""
    codes = torch.stack((blocks & 15, blocks >> 4), dim=-1).flatten(-2)  # [..., in / 32, 32]
    scale = torch.pow(2.0, scales.double() - 127)
    scale = torch.where(scales == 255, torch.nan, scale)
    return (e2m1_values(codes) * scale.unsqueeze(-1)).flatten(-2)


def stored_format(tensors: CheckpointTensors, stem: str) -> str:
    """How the checkpoint stores a projection, as an lk format name (floats by their dtype)."""
    if f"{stem}.weight_scale_2" in tensors:
        return "nvfp4"
    if _is_gptq(tensors, stem):
        return "int8" if gptq_bits(tensors, stem) == 8 else "int4"
    if f"{stem}.qweight" in tensors or f"{stem}.weight_packed" in tensors:
        return "int4"
    dtype = tensors.get(f"{stem}.weight").dtype
    return "fp8_e4m3" if dtype == torch.float8_e4m3fn else str(dtype).removeprefix("torch.")
