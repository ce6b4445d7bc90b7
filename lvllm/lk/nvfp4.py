"""NVFP4 experts as NVIDIA ModelOpt checkpoints hold them, for :class:`lvllm.lk.QuantizedWeights`.

A projection W [out, in] is ``weight`` uint8 [E, out, in / 2]: two e2m1 codes per byte, the
even input's in the low nibble (the codes of lvllm.lk.mxfp4); ``weight_scale``
float8_e4m3fn [E, out, in / 16]: one scale per 16 inputs; and ``weight_scale_2``, one
float32 per tensor, which lk takes per row (``row_scales`` float32 [E, out]) so that an
expert's gate and up keep their own. A weight is e2m1(code) x scale x row_scale. The engine
keeps them (scale bytes re-coded, csrc/lk/formats.h) or converts them at load; :func:`dequantize`
is the same arithmetic in torch.
"""

from __future__ import annotations

import torch

from lvllm.lk.mxfp4 import E2M1_VALUES, packed_e2m1

GROUP = 16
E4M3_MAX = 448.0
E2M1_MAX = 6.0
# The engine folds a power of two into the row scales it keeps (csrc/lk/formats.h).
ROW_SCALE_LIMIT = 2.0**20


def logical_shape(codes: torch.Tensor) -> torch.Size:
    """[E, rows, cols] of the weights ``codes`` [E, rows, cols / 2] holds."""
    return torch.Size((*codes.shape[:2], 2 * codes.shape[2])) if codes.dim() == 3 else codes.shape


def check(codes: torch.Tensor, scales: torch.Tensor, row_scales, group_size: int, name: str) -> None:
    """Raises ValueError naming what of ``name`` the engine cannot read as NVFP4."""

    def require(condition: bool, message: str) -> None:
        if not condition:
            raise ValueError(f"{name}{message}")

    require(group_size == GROUP, f": NVFP4 groups are {GROUP} inputs, got group_size {group_size}")
    require(row_scales is not None, ": nvfp4 weights need row_scales (the per-tensor weight_scale_2 of each row)")
    for label, tensor, dtype in (("values", codes, torch.uint8), ("scales", scales, torch.float8_e4m3fn),
                                 ("row_scales", row_scales, torch.float32)):
        require(isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu" and tensor.is_contiguous(),
                f".{label}: nvfp4 {label} must be a contiguous CPU tensor")
        require(tensor.dtype == dtype, f".{label} must be {dtype} for nvfp4, got {tensor.dtype}")
    require(codes.dim() == 3, f".values must be nvfp4 codes [E, rows, cols / 2], got {tuple(codes.shape)}")
    experts, rows, cols = logical_shape(codes)
    require(cols % GROUP == 0, f": nvfp4 rows come in whole groups of {GROUP} inputs, got {cols}")
    require(tuple(scales.shape) == (experts, rows, cols // GROUP),
            f".scales must be {(experts, rows, cols // GROUP)} e4m3 scales, got {tuple(scales.shape)}")
    require(tuple(row_scales.shape) == (experts, rows),
            f".row_scales must be {(experts, rows)}, got {tuple(row_scales.shape)}")


def refuse_nonfinite(scales: torch.Tensor, row_scales: torch.Tensor, name: str = "") -> None:
    """Raises, naming the first one, where a scale is NaN or a row scale not below ROW_SCALE_LIMIT
    in magnitude, as the engine does."""
    prefix = f"{name}: " if name else ""
    found = ((scales.view(torch.uint8) & 0x7F) == 0x7F).nonzero()
    if len(found):
        expert, row, group = found[0].tolist()
        raise ValueError(f"{prefix}expert {expert}, row {row}, inputs {group * GROUP}-{group * GROUP + GROUP - 1} "
                         "have a float8_e4m3fn NaN scale; lk needs finite weights")
    found = (~(row_scales.abs() < ROW_SCALE_LIMIT)).nonzero()
    if len(found):
        expert, row = found[0].tolist()
        raise ValueError(f"{prefix}expert {expert}, row {row} has a weight_scale_2 of {row_scales[expert, row]}; "
                         "lk takes finite ones below 2^20 in magnitude")


def dequantize(codes: torch.Tensor, scales: torch.Tensor, row_scales: torch.Tensor) -> torch.Tensor:
    """float32 [E, rows, cols] weights on the device of ``codes``: each group's scale times
    its row scale rounded once to fp32, as the engine's kernels multiply them."""
    experts, rows, cols = logical_shape(codes)
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    values = torch.stack((table[(codes & 0xF).long()], table[(codes >> 4).long()]), dim=-1).flatten(-2)
    group_scales = scales.float() * row_scales.unsqueeze(-1)
    return values * group_scales.repeat_interleave(GROUP, -1)


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float [E, rows, cols] (cols a multiple of 16) -> (codes [E, rows, cols / 2], scales
    [E, rows, cols / 16] e4m3, tensor scales float32 [E]) as ModelOpt makes them: the tensor
    scale amax / (6 x 448), each group's scale its amax / 6 / tensor scale rounded to e4m3,
    each value w / (scale x tensor scale) rounded to the nearest e2m1 code (ties to the even
    code), saturated at 6. For tests, benchmarks and the tiny-model builder: lk never
    quantizes into NVFP4."""
    experts, rows, cols = w.shape
    if cols % GROUP:
        raise ValueError(f"nvfp4 rows come in whole groups of {GROUP} inputs, got {cols}")
    w = w.float()
    tensor_scale = w.abs().flatten(1).amax(-1) / (E2M1_MAX * E4M3_MAX)
    tensor_scale = torch.where(tensor_scale > 0, tensor_scale, torch.ones_like(tensor_scale))
    groups = w.reshape(experts, rows, cols // GROUP, GROUP)
    block = groups.abs().amax(-1) / E2M1_MAX / tensor_scale.view(-1, 1, 1)
    scales = block.clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    divisor = (scales.float() * tensor_scale.view(-1, 1, 1)).unsqueeze(-1)
    scaled = torch.where(divisor > 0, groups / divisor, torch.zeros_like(groups))
    codes = packed_e2m1(scaled).reshape(experts, rows, cols // 2)
    return codes.contiguous(), scales.contiguous(), tensor_scale.contiguous()


def row_scales_of(tensor_scales: torch.Tensor, rows: int) -> torch.Tensor:
    """Per-tensor scales [E] (or [E, parts], each part an equal run of rows: w1 and w3 of a
    w13) as the per-row scales [E, rows] lk takes."""
    per_part = tensor_scales.float().reshape(tensor_scales.shape[0], -1)
    return per_part.repeat_interleave(rows // per_part.shape[1], dim=1).contiguous()
