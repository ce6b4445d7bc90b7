"""The lk engine's packed weights, read back as [E, 2I, H] / [E, H, I] tensors.

The GPU prefill path copies an engine's own memory to the device as raw bytes (no second
copy in RAM) and unpacks it there with the torch ops below; the same ops run on the CPU in
the tests, against the weights the engine was built from.

Layout (csrc/lk/moe_engine.h, csrc/lk/formats.h): node n holds rows [begin, begin + length)
of every expert's intermediate dimension. Its gate/up memory is [E][gate|up][panels] panels,
its down memory [E][hidden_panels] panels; a panel stores 16 output rows interleaved per
input, [depth][16], padded to 64 bytes. Float formats only: quantized panels carry scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PANEL_WIDTH = 16
_FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def streamable(weight_format: str) -> bool:
    """Whether experts kept in ``weight_format`` can be unpacked on the device."""
    return weight_format in _FLOAT_DTYPES


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
    dtype: torch.dtype
    hidden_panels: int
    parts: tuple[NodePart, ...]
    nbytes: int

    @classmethod
    def of(cls, engine) -> tuple["PackedLayout", list[torch.Tensor]]:
        """The layout of a float-format lvllm.lk.MoEEngine and uint8 views of its memory,
        in blob order (each view keeps the engine's memory alive)."""
        if not streamable(engine.weight_format):
            raise ValueError(f"experts kept as {engine.weight_format} cannot be unpacked on the "
                             f"device (float formats only: {', '.join(_FLOAT_DTYPES)})")
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
                     _FLOAT_DTYPES[engine.weight_format], engine._native.hidden_panels,
                     tuple(parts), offset)
        return layout, views

    def unpack(self, blob: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> None:
        """Fill w13 [E, 2I, H] and w2 [E, H, I] (this layout's dtype, blob's device) from
        blob, the uint8 concatenation of the views ``of`` returned.

        Panels are copied straight into strided views of w13 and w2: no temporary as large
        as the layer, so the ring's GPU memory is exactly what device_bytes() reports."""
        experts, hidden, inter = self.experts, self.hidden, self.intermediate
        element = torch.finfo(self.dtype).bits // 8
        gate_up_rows = w13.view(experts, 2, inter, hidden)
        for part in self.parts:
            if part.length == 0:
                continue
            rows = slice(part.begin, part.begin + part.length)
            panels = (blob[part.gate_up_offset:part.gate_up_offset + part.gate_up_bytes]
                      .view(self.dtype)
                      .view(experts, 2, part.panels, part.gate_up_panel_bytes // element))
            panels = panels[..., :hidden * PANEL_WIDTH].unflatten(-1, (hidden, PANEL_WIDTH))
            _copy_panels(panels, gate_up_rows[:, :, rows], part.length)
            panels = (blob[part.down_offset:part.down_offset + part.down_bytes]
                      .view(self.dtype)
                      .view(experts, self.hidden_panels, part.down_panel_bytes // element))
            panels = panels[..., :part.length * PANEL_WIDTH].unflatten(-1, (part.length, PANEL_WIDTH))
            _copy_panels(panels, w2[:, :, rows], hidden)


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
