"""MXFP4 experts as checkpoints hold them (OCP microscaling; gpt-oss's ``*_blocks`` and
``*_scales``), for :class:`lvllm.lk.QuantizedWeights`.

A projection W [out, in] is ``blocks`` uint8 [E, out, in / 32, 16] (or [E, out, in / 2]):
two e2m1 codes per byte, the even input's in the low nibble, each code sign bit 3 then the
magnitudes (0, 0.5, 1, 1.5, 2, 3, 4, 6); and ``scales`` uint8 [E, out, in / 32]: one e8m0
byte per 32 inputs, 2^(byte - 127) (255 is NaN, which lk refuses). The engine keeps them
as they are (csrc/lk/formats.h) or converts them to another format at load;
:func:`dequantize` is the same arithmetic in torch (``LVLLM_MOE_QUANT_ON_GPU``).
"""

from __future__ import annotations

import torch

GROUP = 32
NAN_SCALE = 255
# e2m1 code -> value.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def logical_shape(blocks: torch.Tensor) -> torch.Size:
    """[E, rows, cols] of the weights ``blocks`` holds: [E, rows, cols / 32, 16] or [E, rows, cols / 2]."""
    if blocks.dim() == 4:
        return torch.Size((*blocks.shape[:2], blocks.shape[2] * 2 * blocks.shape[3]))
    if blocks.dim() == 3:
        return torch.Size((*blocks.shape[:2], 2 * blocks.shape[2]))
    return blocks.shape


def check(blocks: torch.Tensor, scales: torch.Tensor, group_size: int, name: str) -> None:
    """Raises ValueError naming what of ``name`` the engine cannot read as MXFP4."""

    def require(condition: bool, message: str) -> None:
        if not condition:
            raise ValueError(f"{name}{message}")

    for label, tensor in (("blocks", blocks), ("scales", scales)):
        require(isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu" and tensor.is_contiguous(),
                f".{label}: mxfp4 {label} must be a contiguous CPU tensor")
        require(tensor.dtype == torch.uint8, f".{label} must be uint8 for mxfp4, got {tensor.dtype}")
    require(group_size == GROUP, f": MXFP4 groups are {GROUP} inputs, got group_size {group_size}")
    require((blocks.dim() == 4 and blocks.shape[3] == GROUP // 2) or blocks.dim() == 3,
            f".values must be mxfp4 blocks [E, rows, cols / 32, 16] or [E, rows, cols / 2], "
            f"got {tuple(blocks.shape)}")
    experts, rows, cols = logical_shape(blocks)
    require(cols % GROUP == 0, f": mxfp4 rows come in whole groups of {GROUP} inputs, got {cols}")
    require(tuple(scales.shape) == (experts, rows, cols // GROUP),
            f".scales must be {(experts, rows, cols // GROUP)} e8m0 bytes, got {tuple(scales.shape)}")


def refuse_nan(scales: torch.Tensor, name: str = "") -> None:
    """Raises, naming the first one, where an e8m0 scale is the NaN byte, as the engine does."""
    found = (scales == NAN_SCALE).nonzero()
    if len(found):
        expert, row, group = found[0].tolist()
        prefix = f"{name}: " if name else ""
        raise ValueError(f"{prefix}expert {expert}, row {row}, inputs {group * GROUP}-{group * GROUP + GROUP - 1} "
                         "have the e8m0 NaN scale (255); lk needs finite weights")


def dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 [E, rows, cols] weights, exact (but for scales whose products overflow fp32),
    on the device of ``blocks``."""
    experts, rows, cols = logical_shape(blocks)
    codes = blocks.reshape(experts, rows, cols // 2)
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    values = torch.stack((table[(codes & 0xF).long()], table[(codes >> 4).long()]), dim=-1).flatten(-2)
    return values * _powers(scales).repeat_interleave(GROUP, -1)


def _powers(scales: torch.Tensor) -> torch.Tensor:
    """2^(e - 127) for e8m0 bytes e < 255, exact: built from its bits, e in the exponent
    field (e = 0: the denormal 2^-127)."""
    exponents = scales.to(torch.int32)
    return torch.where(exponents > 0, exponents << 23, 1 << 22).view(torch.float32)


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float [E, rows, cols] (cols a multiple of 32) -> (blocks [E, rows, cols / 32, 16],
    scales [E, rows, cols / 32]) as OCP MX quantizers make them: per group the scale
    2^(floor(log2(amax)) - 2), each value rounded to the nearest e2m1 code (ties to the
    even code), saturated at 6. For benchmarks and tests: lk never quantizes into MXFP4."""
    experts, rows, cols = w.shape
    if cols % GROUP:
        raise ValueError(f"mxfp4 rows come in whole groups of {GROUP} inputs, got {cols}")
    groups = w.float().reshape(experts, rows, cols // GROUP, GROUP)
    amax = groups.abs().amax(-1, keepdim=True)
    exponent = torch.where(amax > 0, torch.floor(torch.log2(amax)) - 2, torch.full_like(amax, -127))
    scales = (exponent.clamp(-127, 127) + 127).to(torch.uint8)
    blocks = packed_e2m1(groups / _powers(scales)).reshape(experts, rows, cols // GROUP, GROUP // 2)
    return blocks.contiguous(), scales.squeeze(-1).contiguous()


def packed_e2m1(scaled: torch.Tensor) -> torch.Tensor:
    """Values already divided by their scale -> the nearest e2m1 codes (a tie to the even
    code, saturated at 6), two a byte along the last dimension, the even input's low."""
    scaled = scaled.clamp(-6, 6)
    midpoints = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    magnitude = scaled.abs()
    codes = torch.bucketize(magnitude, midpoints)  # a tie goes to the lower code
    tie_to_odd = (codes % 2 == 1) & (magnitude == midpoints[codes.clamp(max=6)])
    codes = (codes + tie_to_odd.long()).to(torch.uint8) | ((scaled < 0).to(torch.uint8) << 3)
    codes = codes.reshape(*codes.shape[:-1], -1, 2)
    return codes[..., 0] | (codes[..., 1] << 4)
