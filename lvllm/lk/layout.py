"""The lk engine's packed weights, read back as [E, 2I, H] / [E, H, I] tensors.

The GPU prefill path copies an engine's own memory to the device as raw bytes (no second
copy in RAM) and unpacks it there with the Triton kernel below; the tests run the same
kernel on the CPU (Triton's interpreter) against the weights the engine was built from.

Layout (csrc/lk/moe_engine.h, csrc/lk/formats.h): node n holds rows [begin, begin + length)
of every expert's intermediate dimension. Its gate/up memory is [E][gate|up][panels] panels,
its down memory [E][hidden_panels] panels; a panel stores 16 output rows per input,
[depth][16], padded to 64 bytes. Quantized panels store their values (INT8 rows in pairs,
INT4 rows in fours, formats.h) and then per group of inputs a row of 16 fp32 scales (and
INT4 offsets; MXFP4: its e2m1 codes where INT4's nibbles lie and a row of 16 e8m0 bytes per
group; NVFP4: the codes, a row of 16 scale codes per group, then a line of 16 fp32 half row
scales, formats.h); they are dequantized in fp32 and rounded once to the compute dtype.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

PANEL_WIDTH = 16
_FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Input rows a quantized format stores together (formats.h rows_per_block) and bytes per row.
_ROWS_PER_BLOCK = {"int8": 2, "int4": 4, "fp8_e4m3": 1, "mxfp4": 4, "nvfp4": 4}
_BYTES_PER_ROW = {"int8": PANEL_WIDTH, "int4": PANEL_WIDTH // 2, "fp8_e4m3": PANEL_WIDTH, "mxfp4": PANEL_WIDTH // 2,
                  "nvfp4": PANEL_WIDTH // 2}
# How the kernel reads each format's stored values.
_VALUE_DTYPES = {"int8": torch.int8, "int4": torch.uint8, "fp8_e4m3": torch.float8_e4m3fn, "mxfp4": torch.uint8,
                 "nvfp4": torch.uint8}
_FORMAT_CODES = {"float": 0, "int8": 1, "int4": 2, "fp8_e4m3": 3, "mxfp4": 4, "nvfp4": 5}
_BYTE_SCALES = ("mxfp4", "nvfp4")


def _unpack_panels_kernel(values, metas, row_scales, out, count, panels, depth, rows, panel_values, panel_metas,
                          meta_start, row_scale_start, groups, group_size, out_matrix_stride, out_row_stride,
                          FORMAT: tl.constexpr, BLOCK_PANELS: tl.constexpr, BLOCK_INPUTS: tl.constexpr):
    """Panels count = M x panels, each ``panel_values`` values (``panel_metas`` fp32 words, the
    scales from word ``meta_start`` on; MXFP4, NVFP4: bytes; NVFP4's half row scales fp32
    words of ``row_scales`` from ``row_scale_start`` on) -> out [M, rows, depth], strided in M
    and rows, contiguous along depth."""
    panel = (tl.program_id(0) * BLOCK_PANELS + tl.arange(0, BLOCK_PANELS)).to(tl.int64)[:, None, None]
    k = (tl.program_id(1) * BLOCK_INPUTS + tl.arange(0, BLOCK_INPUTS))[None, :, None]
    j = tl.arange(0, 16)[None, None, :]
    row = (panel % panels) * 16 + j
    mask = (panel < count) & (k < depth) & (row < rows)
    panel_values_start = values + panel * panel_values
    if FORMAT == 0:  # float: [depth][16]
        w = tl.load(panel_values_start + k * 16 + j, mask=mask).to(tl.float32)
    else:
        if FORMAT == 1:  # int8, rows in pairs: byte 2j + (k & 1) of pair k // 2
            q = tl.load(panel_values_start + (k // 2) * 32 + 2 * j + (k % 2), mask=mask)
        elif FORMAT == 2 or FORMAT == 4 or FORMAT == 5:
            # int4, rows in fours: nibble j // 8 of byte 4 (j % 8) + 2 (r & 1) + (r >> 1) of
            # block k // 4, r = k % 4, stored as q ^ 8 (mxfp4: its e2m1 code as it is).
            packed = tl.load(panel_values_start + (k // 4) * 32 + 4 * (j % 8) + 2 * (k % 2) + (k % 4) // 2,
                             mask=mask)
            q = (packed >> (4 * (j // 8)).to(tl.uint8)) & 0xF
            if FORMAT == 2:
                q = q ^ 8
        else:  # fp8: [depth][16]
            q = tl.load(panel_values_start + k * 16 + j, mask=mask)
        scale = metas + panel * panel_metas + meta_start + (k // group_size) * 16 + j
        if FORMAT == 4 or FORMAT == 5:
            # e2m1: magnitude m = code & 7 is m / 2 below 2, else (2 + (m & 1)) 2^(m // 2 - 1) / 2.
            code = q.to(tl.int32)
            m = code & 7
            doubled = tl.where(m < 2, m, (2 + (m & 1)) << tl.maximum((m >> 1) - 1, 0))
            byte = tl.load(scale, mask=mask).to(tl.int32)
            if FORMAT == 4:
                # e8m0 e is 2^(e - 127), built from its bits (e = 0: the denormal 2^-127).
                value = tl.where(code >= 8, -0.5, 0.5) * doubled.to(tl.float32)
                w = value * tl.where(byte > 0, byte << 23, 1 << 22).to(tl.float32, bitcast=True)
            else:
                # A scale code shifted left by 20 is the scale's magnitude times 2^-104, the half
                # row scale is stored times 2^104 (a negative scale's codes come negated): their
                # product rounded once (as the engine), then the doubled value.
                half_row = tl.load(row_scales + panel * (panel_metas // 4) + row_scale_start + j, mask=mask)
                group_scale = (byte << 20).to(tl.float32, bitcast=True) * half_row
                w = tl.where(code >= 8, -1.0, 1.0) * doubled.to(tl.float32) * group_scale
        else:
            w = q.to(tl.float32) * tl.load(scale, mask=mask)
        if FORMAT == 2:
            w = w + tl.load(scale + groups * 16, mask=mask)
    target = out + (panel // panels) * out_matrix_stride + row.to(tl.int64) * out_row_stride + k
    if out.dtype.element_ty == tl.bfloat16:
        # Round to nearest even by hand: the compiled cast does, but Triton's interpreter (the
        # CPU tests) truncates.
        bits = w.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        tl.store(target, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(target, w.to(out.dtype.element_ty), mask=mask)


@functools.cache
def _kernel(device: torch.device):
    """The compiled kernel for CUDA tensors; Triton's interpreter for CPU ones."""
    if device.type == "cpu":
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(_unpack_panels_kernel)
    return triton.jit(_unpack_panels_kernel)


def _bytes(memory: memoryview) -> torch.Tensor:
    # A node may hold no rows of a small I; torch.frombuffer refuses empty buffers.
    return torch.frombuffer(memory, dtype=torch.uint8) if len(memory) else torch.empty(0, dtype=torch.uint8)


@dataclass(frozen=True)
class NodePart:
    """One NUMA node's share of a layer: its rows of I and where its bytes go in the blob."""

    begin: int
    length: int
    panels: int
    gate_up_offset: int
    gate_up_bytes: int
    gate_up_panel_bytes: int
    down_offset: int
    down_bytes: int
    down_panel_bytes: int


@dataclass(frozen=True)
class PackedLayout:
    """Where one engine's weights lie once its node parts are concatenated into one blob."""

    experts: int
    hidden: int
    intermediate: int
    weight_format: str
    group_size: int
    dtype: torch.dtype  # what unpack() writes: the dtype the GPU computes in
    hidden_panels: int
    parts: tuple[NodePart, ...]
    nbytes: int

    @classmethod
    def of(cls, engine, dtype: torch.dtype | None = None) -> tuple["PackedLayout", list[torch.Tensor]]:
        """The layout of an lvllm.lk.MoEEngine and uint8 views of its memory, in blob order
        (each view keeps the engine's memory alive). ``dtype``: what to unpack into (None:
        the engine's own float format; quantized engines need one)."""
        if dtype is None:
            if engine.weight_format not in _FLOAT_DTYPES:
                raise ValueError(f"experts kept as {engine.weight_format} are dequantized when "
                                 "unpacked: name the dtype to unpack into")
            dtype = _FLOAT_DTYPES[engine.weight_format]
        if dtype not in _FLOAT_DTYPES.values():
            raise ValueError(f"cannot unpack into {dtype}; valid: {', '.join(map(str, _FLOAT_DTYPES.values()))}")
        parts, views, offset = [], [], 0
        for piece in engine._native.packed_slices():
            gate_up, down = _bytes(piece["gate_up"]), _bytes(piece["down"])
            parts.append(NodePart(
                begin=piece["begin"], length=piece["length"], panels=piece["panels"],
                gate_up_offset=offset, gate_up_bytes=gate_up.numel(),
                gate_up_panel_bytes=piece["gate_up_panel_bytes"],
                down_offset=offset + gate_up.numel(), down_bytes=down.numel(),
                down_panel_bytes=piece["down_panel_bytes"],
            ))
            views += [gate_up, down]
            offset += gate_up.numel() + down.numel()
        layout = cls(engine.num_experts, engine.hidden_size, engine.intermediate_size,
                     engine.weight_format, engine.group_size, dtype, engine._native.hidden_panels,
                     tuple(parts), offset)
        return layout, views

    @property
    def quantized(self) -> bool:
        return self.weight_format not in _FLOAT_DTYPES

    @property
    def unpacked_bytes(self) -> int:
        return 3 * self.experts * self.intermediate * self.hidden * self.dtype.itemsize

    def unpack(self, blob: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> None:
        """Fill w13 [E, 2I, H] and w2 [E, H, I] (``dtype``, blob's device) from blob, the uint8
        concatenation of the views ``of`` returned.

        One kernel per node part and projection reads the panels once and writes the weights
        straight into strided views of w13 and w2: no temporary, so the ring's GPU memory is
        what it reports, and a quantized layer costs one read of its bytes and one write of
        its weights, a small fraction of its host-to-device copy."""
        experts, hidden = self.experts, self.hidden
        matrices13 = w13.view(experts * 2, self.intermediate, hidden)
        for part in self.parts:
            if part.length == 0:
                continue
            rows = slice(part.begin, part.begin + part.length)
            self._unpack_panels(blob[part.gate_up_offset:part.gate_up_offset + part.gate_up_bytes],
                                part.gate_up_panel_bytes, part.panels, hidden, matrices13[:, rows])
            self._unpack_panels(blob[part.down_offset:part.down_offset + part.down_bytes],
                                part.down_panel_bytes, self.hidden_panels, part.length, w2[:, :, rows])

    def unpack_expert(self, views: list[torch.Tensor], expert: int, w13: torch.Tensor, w2: torch.Tensor) -> None:
        """Fill w13 [1, 2I, H] and w2 [1, H, I] (``dtype``, any device) with expert ``expert``
        from ``views`` (as ``of`` returned them): its panels, a slice of each node part,
        copied to that device and unpacked there as ``unpack`` does (a hot expert's swap)."""
        matrices13 = w13.view(2, self.intermediate, self.hidden)
        for index, part in enumerate(self.parts):
            if part.length == 0:
                continue
            gate_up_bytes = 2 * part.panels * part.gate_up_panel_bytes
            down_bytes = self.hidden_panels * part.down_panel_bytes
            gate_up = views[2 * index][expert * gate_up_bytes:(expert + 1) * gate_up_bytes].to(w13.device)
            down = views[2 * index + 1][expert * down_bytes:(expert + 1) * down_bytes].to(w2.device)
            rows = slice(part.begin, part.begin + part.length)
            self._unpack_panels(gate_up, part.gate_up_panel_bytes, part.panels, self.hidden, matrices13[:, rows])
            self._unpack_panels(down, part.down_panel_bytes, self.hidden_panels, part.length, w2[:, :, rows])

    def _unpack_panels(self, panel_bytes: torch.Tensor, bytes_per_panel: int, panels: int, depth: int,
                       target: torch.Tensor) -> None:
        """uint8 [M, panels, bytes_per_panel] panels of ``depth`` inputs -> target [M, rows, depth]
        (output row p * 16 + j of matrix m is column j of its panel p)."""
        matrices, rows, _ = target.shape
        if self.quantized:
            values = panel_bytes.view(_VALUE_DTYPES[self.weight_format])
            block = _ROWS_PER_BLOCK[self.weight_format]
            padded = -(-depth // block) * block
            value_bytes = -(-padded * _BYTES_PER_ROW[self.weight_format] // 64) * 64
            format_code = _FORMAT_CODES[self.weight_format]
            if self.weight_format in _BYTE_SCALES:  # rows of e8m0 / e4m3 bytes
                metas, meta_start, meta_size = panel_bytes, value_bytes, 1
            else:
                metas, meta_start, meta_size = panel_bytes.view(torch.float32), value_bytes // 4, 4
            groups = -(-depth // self.group_size)
            row_scale_start = (value_bytes + -(-groups * PANEL_WIDTH // 64) * 64) // 4
        else:
            values = panel_bytes.view(_FLOAT_DTYPES[self.weight_format])
            metas, meta_start, meta_size, format_code = values, 0, 4, _FORMAT_CODES["float"]
            row_scale_start = 0
        count = matrices * panels
        if target.device.type == "cpu":
            # The interpreter (the tests) runs one program at a time in numpy, so a program
            # takes as many panels as keep its arrays near a million weights.
            block_inputs = min(triton.next_power_of_2(depth), 1 << 12)
            block_panels = min(triton.next_power_of_2(count), max(1, (1 << 16) // block_inputs))
        else:
            block_panels, block_inputs = 1, 128  # a program writes 16 rows of 128 inputs
        grid = (triton.cdiv(count, block_panels), triton.cdiv(depth, block_inputs))
        groups = -(-depth // self.group_size) if self.quantized else 0
        _kernel(target.device)[grid](
            values, metas, panel_bytes.view(torch.float32), target, count, panels, depth, rows,
            bytes_per_panel // values.element_size(), bytes_per_panel // meta_size, meta_start, row_scale_start, groups,
            max(self.group_size, 1), target.stride(0), target.stride(1),
            FORMAT=format_code, BLOCK_PANELS=block_panels, BLOCK_INPUTS=block_inputs,
            # Without fusion, w = q * scale + offset rounds as torch's (and the engine's) two steps.
            enable_fp_fusion=False)


