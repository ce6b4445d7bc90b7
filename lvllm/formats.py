"""The weight formats lk keeps weights in: one vocabulary for every part of lvllm.

A format's ``name`` is the engine's (``lvllm._lk.format_names()``), its ``code`` the position
in that list (csrc/lk/formats.h), ``short`` what log lines show. ``LVLLM_MOE_USE_WEIGHT``
modes map onto names through :func:`resolve_format`, the one place that also settles the
quantization group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lvllm.envs import EnvError, WEIGHT_MODES

MODE_VAR = "LVLLM_MOE_USE_WEIGHT"


@dataclass(frozen=True)
class Format:
    name: str
    code: int
    short: str
    dtype: torch.dtype           # float formats: the tensor dtype; quantized: the stored values'
    quantized: bool
    default_group: int = 128     # inputs per scale when lk quantizes into this format itself


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("float32", 0, "fp32", torch.float32, False),
    Format("float16", 1, "fp16", torch.float16, False),
    Format("bfloat16", 2, "bf16", torch.bfloat16, False),
    # 256: the integer kernels turn their sums to fp32 every 256 inputs whatever the group
    # (kernels.h, kIntegerSpan), so smaller groups only add work (git log -p BENCHMARKS.md, "MoE layer").
    Format("int8", 3, "int8", torch.int8, True, 256),
    # 128: how 4-bit checkpoints (GPTQ, AWQ) commonly group.
    Format("int4", 4, "int4", torch.uint8, True, 128),
    Format("fp8_e4m3", 5, "fp8", torch.float8_e4m3fn, True),
    # OCP MXFP4 as gpt-oss ships it: e2m1 codes, two per byte, an e8m0 scale per 32 inputs;
    # kept as it comes, never quantized into (csrc/lk/formats.h).
    Format("mxfp4", 6, "mxfp4", torch.uint8, True, 32),
    # NVFP4 as NVIDIA ModelOpt ships it: the same codes, an e4m3 scale per 16 inputs and a
    # float32 scale per tensor; kept as it comes, never quantized into.
    Format("nvfp4", 7, "nvfp4", torch.uint8, True, 16),
)}
NAMES = tuple(FORMATS)
FLOAT_FORMAT_OF_DTYPE = {f.dtype: f.name for f in FORMATS.values() if not f.quantized}
# MXFP4's and NVFP4's values are uint8 as INT4's are: their byte scales tell them apart
# (lvllm.lk.QuantizedWeights.format), so INT4 keeps the dtype here.
QUANTIZED_FORMAT_OF_VALUES = {f.dtype: f.name for f in reversed(FORMATS.values()) if f.quantized}
# Activations and outputs: the float formats' codes.
DTYPE_CODES = {f.dtype: f.code for f in FORMATS.values() if not f.quantized}


def code(name: str) -> int:
    return FORMATS[name].code


def describe(name: str, group_size: int) -> str:
    """'bf16', 'fp8 g128', 'int4 g32': the format as log lines show it."""
    entry = FORMATS[name]
    return f"{entry.short} g{group_size}" if entry.quantized else entry.short


def group_size(name: str, requested: int | None = None) -> int:
    """Inputs per scale lk quantizes into ``name`` with: ``requested``, else the format's default."""
    return requested if requested is not None else FORMATS[name].default_group


def engine_group(name: str, source_name: str, source_group: int | None,
                 requested: int | None) -> int:
    """Inputs per scale of weights kept as ``name`` from a source in ``source_name`` grouped
    by ``source_group``: the source's own grouping when kept as it is, else group_size."""
    if name == source_name and source_group is not None:
        return source_group
    return group_size(name, requested)


def per_channel_group(hidden: int, intermediate: int) -> int:
    """The group lk repeats per-channel scales over (GPTQ's group_size -1): the largest
    multiple of 16 dividing both expert sizes, 0 where none does. One group serves both
    matrices, whose depths are the hidden and the intermediate size."""
    common = math.gcd(hidden, intermediate)
    return common if common % 16 == 0 else 0


@dataclass(frozen=True)
class Resolved:
    name: str
    group_size: int

    def describe(self) -> str:
        return describe(self.name, self.group_size)


def resolve_format(mode: str, source_name: str, model_dtype: torch.dtype,
                   source_group: int | None = None, requested_group: int | None = None) -> Resolved:
    """The format and group lk keeps experts stored as ``source_name`` (grouped by
    ``source_group``; "float": float tensors in the model dtype) in under
    ``LVLLM_MOE_USE_WEIGHT=mode`` and ``LVLLM_MOE_QUANT_GROUP_SIZE=requested_group``."""
    if source_name == "float":
        source_name = FLOAT_FORMAT_OF_DTYPE.get(model_dtype, source_name)
    if mode == "KEEP":
        name = source_name
    elif mode in ("INT8", "INT4"):
        name = mode.lower()
    elif mode == "TO_DTYPE":
        if model_dtype not in FLOAT_FORMAT_OF_DTYPE:
            raise EnvError(f"{MODE_VAR}=TO_DTYPE: lk cannot keep experts in {model_dtype}; "
                           "valid model dtypes: float32, float16, bfloat16")
        name = FLOAT_FORMAT_OF_DTYPE[model_dtype]
    else:
        raise EnvError(f"{MODE_VAR}={mode!r} is not valid: expected {', '.join(WEIGHT_MODES)}")
    return Resolved(name, engine_group(name, source_name, source_group, requested_group))


def fp8_block_scale_shapes(hidden: int, inter: int, block: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    """An FP8 block-quantized expert's scale grids, w13 [2I, H] then w2 [H, I], for blocks of
    (rows, inputs); gate and up rows are blocked apart, partial blocks count whole."""
    rows, inputs = block
    blocks = lambda n, b: -(-n // b)   # noqa: E731
    return (2 * blocks(inter, rows), blocks(hidden, inputs)), (blocks(hidden, rows), blocks(inter, inputs))
