"""The lk engine's packed weights, read back as [E, 2I, H] / [E, H, I] tensors.

The GPU prefill path copies an engine's own memory to the device as raw bytes (no second
copy in RAM) and unpacks it there with the torch ops below; the same ops run on the CPU in
the tests, against the weights the engine was built from.

Layout (csrc/lk/moe_engine.h, csrc/lk/formats.h): node n holds rows [begin, begin + length)
of every expert's intermediate dimension. Its gate/up memory is [E][gate|up][panels] panels,
its down memory [E][hidden_panels] panels; a panel stores 16 output rows per input,
[depth][16], padded to 64 bytes. Quantized panels store their values (INT8 rows in pairs,
INT4 rows in fours, formats.h) and then per group of inputs a row of 16 fp32 scales (and
INT4 offsets); they are dequantized in fp32 into the compute dtype, a few experts at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PANEL_WIDTH = 16
_FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Input rows a quantized format stores together (formats.h rows_per_block) and bytes per row.
_ROWS_PER_BLOCK = {"int8": 2, "int4": 4, "fp8_e4m3": 1}
_BYTES_PER_ROW = {"int8": PANEL_WIDTH, "int4": PANEL_WIDTH // 2, "fp8_e4m3": PANEL_WIDTH}
# Dequantizing takes fp32 scratch; a layer is done in chunks of experts whose scratch stays
# within this share of the unpacked layer.
_SCRATCH_SHARE = 4
_SCRATCH_BYTES_PER_WEIGHT = 8  # the fp32 values, plus INT4's nibble temporaries


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

    @property
    def experts_per_chunk(self) -> int:
        """Experts dequantized together (all of them for float formats: no scratch)."""
        if not self.quantized:
            return self.experts
        expert_scratch = 3 * self.intermediate * self.hidden * _SCRATCH_BYTES_PER_WEIGHT
        return max(1, min(self.experts, self.unpacked_bytes // _SCRATCH_SHARE // expert_scratch))

    @property
    def scratch_bytes(self) -> int:
        """Transient device memory one unpack() takes besides blob, w13 and w2 (an upper bound)."""
        if not self.quantized:
            return 0
        # One chunk of one projection at a time; gate/up (2I x H) is the larger.
        return self.experts_per_chunk * 2 * self.intermediate * self.hidden * _SCRATCH_BYTES_PER_WEIGHT

    def unpack(self, blob: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> None:
        """Fill w13 [E, 2I, H] and w2 [E, H, I] (``dtype``, blob's device) from blob, the uint8
        concatenation of the views ``of`` returned.

        Panels are written straight into strided views of w13 and w2: besides scratch_bytes,
        no temporary as large as the layer, so the ring's GPU memory is what it reports."""
        experts, hidden, inter = self.experts, self.hidden, self.intermediate
        gate_up_rows = w13.view(experts, 2, inter, hidden)
        chunk = self.experts_per_chunk
        for part in self.parts:
            if part.length == 0:
                continue
            rows = slice(part.begin, part.begin + part.length)
            gate_up = (blob[part.gate_up_offset:part.gate_up_offset + part.gate_up_bytes]
                       .view(experts, 2, part.panels, part.gate_up_panel_bytes))
            down = (blob[part.down_offset:part.down_offset + part.down_bytes]
                    .view(experts, self.hidden_panels, part.down_panel_bytes))
            for first in range(0, experts, chunk):
                some = slice(first, first + chunk)
                _copy_panels(self._panel_weights(gate_up[some], hidden), gate_up_rows[some, :, rows], part.length)
                _copy_panels(self._panel_weights(down[some], part.length), w2[some, :, rows], hidden)

    def _panel_weights(self, panels: torch.Tensor, depth: int) -> torch.Tensor:
        """uint8 panels [..., panel bytes] -> their weights [..., depth, 16]: the stored
        values for float formats (a view), fp32 dequantized values for the others."""
        if not self.quantized:
            values = panels.view(_FLOAT_DTYPES[self.weight_format])
            return values[..., :depth * PANEL_WIDTH].unflatten(-1, (depth, PANEL_WIDTH))
        block = _ROWS_PER_BLOCK[self.weight_format]
        padded = -(-depth // block) * block
        value_bytes = -(-padded * _BYTES_PER_ROW[self.weight_format] // 64) * 64
        values = panels[..., :padded * _BYTES_PER_ROW[self.weight_format]]
        if self.weight_format == "fp8_e4m3":
            q = values.view(torch.float8_e4m3fn).unflatten(-1, (padded, PANEL_WIDTH))
        elif self.weight_format == "int8":
            # Byte 2j + (k & 1) of pair k // 2 is q[k][j].
            q = values.view(torch.int8).unflatten(-1, (padded // 2, PANEL_WIDTH, 2)).transpose(-1, -2)
            q = q.flatten(-3, -2)
        else:
            # Nibble 4 * word + n of a block of four rows (low nibble first) is q[r][j] - 8 for
            # word 2 * (j % 8) + (r & 1), n = 2 * (r >> 1) + j // 8: as digits of the nibble
            # index, (j % 8, r & 1, r >> 1, j // 8), which a reordering of axes makes (r, j).
            nibbles = torch.stack((values & 0xF, values >> 4), dim=-1) ^ 8
            q = nibbles.reshape(*values.shape[:-1], padded // 4, 8, 2, 2, 2)
            q = q.movedim((-2, -3, -1, -4), (-4, -3, -2, -1)).flatten(-2).flatten(-3, -2).flatten(-3, -2)
        groups = -(-depth // self.group_size)
        weights = torch.zeros(*panels.shape[:-1], groups * self.group_size, PANEL_WIDTH,
                              dtype=torch.float32, device=panels.device)
        weights[..., :depth, :] = q[..., :depth, :]
        metas = panels[..., value_bytes:].view(torch.float32).unflatten(-1, (-1, PANEL_WIDTH))
        grouped = weights.unflatten(-2, (groups, self.group_size))
        grouped.mul_(metas[..., :groups, None, :])
        if self.weight_format == "int4":
            grouped.add_(metas[..., groups:2 * groups, None, :])
        return weights[..., :depth, :]


def _copy_panels(panels: torch.Tensor, target: torch.Tensor, rows: int) -> None:
    """panels [..., P, depth, 16] (output row p * 16 + j, input k at [p, k, j]) into target
    [..., rows, depth], rows <= P * 16: whole panels, then the last panel's first rows."""
    whole, tail = divmod(rows, PANEL_WIDTH)
    dim = target.dim() - 2
    if whole:
        target.narrow(dim, 0, whole * PANEL_WIDTH).unflatten(dim, (whole, PANEL_WIDTH)).copy_(
            panels.narrow(dim, 0, whole).transpose(-1, -2))
    if tail:
        target.narrow(dim, whole * PANEL_WIDTH, tail).copy_(
            panels.select(dim, whole)[..., :tail].transpose(-1, -2))
