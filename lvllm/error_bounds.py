"""The relative error a correct path from a checkpoint to lk's output stays under, by lk's format
and the checkpoint's, and the verdict ``lvllm doctor`` gives an error against it."""

from __future__ import annotations

import torch

from lvllm import formats

# What a correct path's relative error stays under, in parts that add (per expert, over its rows):
# lk's output rounded to the model dtype once (unit roundoff), plus what lk's format costs.
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# Kept as the checkpoint has it: fp32 arithmetic only (tests/lk/helpers.py, TIGHT).
KEPT = 2e-5
# Quantized by lk at load from float or FP8 (tests/lk/helpers.py, LOOSE: twice the worst
# seen with random Gaussian weights when all three matrices are quantized).
QUANTIZED = {"int8": 0.04, "int4": 0.35}
# INT4 kept: lk rounds activations to 8 bits per group (kernels.h, activation_max), each by at most
# 1/254 of its group's largest, about 1% of a Gaussian row; inputs and hidden rows both: 3x that.
# NVFP4 kept: the same (its activation_max is INT4's).
INT4_ACTIVATIONS = 0.03
# MXFP4 kept (gpt-oss): activations rounded to 85 steps each side per group of 32 (kernels.h,
# activation_max), each by at most 1/170 of its group's largest: INT4_ACTIVATIONS scaled by 254 / 170.
MXFP4_ACTIVATIONS = INT4_ACTIVATIONS * 254 / 170
# INT8 kept (GPTQ 8-bit): activations rounded to int16 per group (activation_max 32767), each
# by at most 1/65534 of its group's largest: INT4_ACTIVATIONS scaled by 254 / 65534.
INT8_ACTIVATIONS = INT4_ACTIVATIONS * 254 / 65534
# Dense matrices quantized at load, each alone (QUANTIZED's bounds are a whole MoE layer's three):
# about twice the worst relative error measured with random Gaussian weights at real widths (2048 to
# 7168 inputs) on RMS-normed bf16 rows, one and eight at a time: INT8 0.0081 (groups 64 to 1024),
# INT4 0.12 (groups 32 to 512; about 0.10 with the default 128).
DENSE_QUANTIZED = {"int8": 0.016, "int4": 0.24}
WARN_FACTOR = 2.0    # between 1x and 2x the expected error: warn; beyond: fail


def expected_error(lk_format: str, source: str, model_dtype: torch.dtype) -> float:
    """source: the checkpoint's stored format (an lk format name, floats by their dtype)."""
    error = UNIT_ROUNDOFF[model_dtype]
    if lk_format in QUANTIZED and lk_format != source:
        return error + QUANTIZED[lk_format]
    if lk_format in ("int4", "nvfp4"):   # NVFP4's e2m1 codes multiply 8-bit activations as INT4's do
        return error + INT4_ACTIVATIONS
    if lk_format == "mxfp4":
        return error + MXFP4_ACTIVATIONS
    if lk_format == "int8":
        return error + INT8_ACTIVATIONS
    if lk_format != source and not formats.FORMATS[lk_format].quantized:   # weights rounded to it, 3 matrices
        return error + 3 * UNIT_ROUNDOFF[formats.FORMATS[lk_format].dtype] + KEPT
    return error + KEPT


def expected_dense_error(lk_format: str, stored: torch.dtype, model_dtype: torch.dtype) -> float:
    """One dense matrix stored in ``stored``, held by lk in ``lk_format`` (a float format: as vLLM holds it)."""
    error = UNIT_ROUNDOFF[model_dtype] * (1 if stored == model_dtype else 2)   # + the weights rounded to the model dtype
    return error + DENSE_QUANTIZED.get(lk_format, KEPT)


def verdict(error: float, expected: float) -> str:
    if not error <= WARN_FACTOR * expected:   # NaN fails too
        return "fail"
    return "pass" if error <= expected else "warn"
