"""Experts streamed to the GPU for long prompts.

Each streamed layer's lk engine memory (pinned in place with cudaHostRegister: no second
copy in RAM, whatever the format) is copied as raw bytes into a ring of ``window + 1`` GPU
buffers on a side stream, ``window`` layers ahead of the layer being computed, and unpacked
(quantized formats: dequantized) by one kernel on the compute stream into one [E, 2I, H] /
[E, H, I] pair in the compute dtype that vLLM's fused-MoE kernel (or any other
``gpu_experts`` function) reads; quantized layers copy fewer bytes, so they stream
faster. Events order the two streams: an unpack waits for its slot's copy, a copy waits for
the slot's previous unpack. The schedule is lvllm.gpu.plan.RingSchedule; this module only
turns it into CUDA work.
"""

from __future__ import annotations

import torch

from lvllm.gpu.plan import Copy, RingSchedule, Unpack
from lvllm.lk import MoEEngine
from lvllm.lk.layout import PackedLayout


class _Pinned:
    """Host memory registered with CUDA for as long as this object lives."""

    def __init__(self, views: list[torch.Tensor]):
        self.views = []
        cudart = torch.cuda.cudart()
        for view in views:
            if view.numel() == 0:
                continue
            error = cudart.cudaHostRegister(view.data_ptr(), view.numel(), 0)
            if int(error) != 0:
                self.close()
                raise RuntimeError(f"cudaHostRegister of {view.numel()} bytes of lk expert "
                                   f"memory failed ({error}); is the memlock limit too low?")
            self.views.append(view)

    def close(self) -> None:
        cudart = torch.cuda.cudart()
        for view in self.views:
            cudart.cudaHostUnregister(view.data_ptr())
        self.views = []


class ExpertRing:
    """The prefetch ring of one process (one device)."""

    def __init__(self, device: torch.device, window: int):
        self.device = torch.device(device)
        self.window = window
        self._layers: list[tuple[PackedLayout, list[torch.Tensor]]] = []
        self._pinned: _Pinned | None = None
        self.schedule: RingSchedule | None = None

    def add(self, engine: MoEEngine, dtype: torch.dtype | None = None) -> int:
        """Register a streamed layer (in forward order), to be unpacked into ``dtype`` (None:
        the engine's float format); returns its ring position."""
        if self.schedule is not None:
            raise RuntimeError("layers must be added to the ring before allocate()")
        self._layers.append(PackedLayout.of(engine, dtype))
        return len(self._layers) - 1

    @property
    def layers(self) -> int:
        return len(self._layers)

    def device_bytes(self) -> int:
        """GPU memory streaming takes: the ring slots and one unpacked layer per dtype."""
        if not self._layers:
            return 0
        layouts = [layout for layout, _ in self._layers]
        blob = max(layout.nbytes for layout in layouts)
        unpacked = sum(max(layout.unpacked_bytes for layout in layouts if layout.dtype == dtype)
                       for dtype in {layout.dtype for layout in layouts})
        return min(self.window + 1, self.layers) * blob + unpacked

    def allocate(self) -> None:
        """Pin the engines' memory and take the GPU buffers (call before vLLM measures free
        memory for its KV cache, so they are accounted for)."""
        if self.schedule is not None or not self._layers:
            return
        self.schedule = RingSchedule(self.layers, self.window)
        self._pinned = _Pinned([view for _, views in self._layers for view in views])
        blob = max(layout.nbytes for layout, _ in self._layers)
        self._slots = [torch.empty(blob, dtype=torch.uint8, device=self.device)
                       for _ in range(self.schedule.slots)]
        self._unpacked = {
            dtype: torch.empty(max(layout.unpacked_bytes for layout, _ in self._layers
                                   if layout.dtype == dtype) // dtype.itemsize, dtype=dtype, device=self.device)
            for dtype in {layout.dtype for layout, _ in self._layers}
        }
        self._copy_stream = torch.cuda.Stream(self.device)
        self._copied = [torch.cuda.Event() for _ in self._slots]
        self._unpacked_events = [torch.cuda.Event() for _ in self._slots]

    def close(self) -> None:
        if self._pinned is not None:
            torch.cuda.synchronize(self.device)
            self._pinned.close()
            self._pinned = None

    def start(self) -> None:
        """A forward that streams begins: issue the first copies now."""
        for copy in self.schedule.start():
            self._copy(copy)

    def weights(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``position``'s (w13, w2) on the device, in the current stream's order; valid
        until the next call."""
        for step in self.schedule.acquire(position):
            if isinstance(step, Copy):
                self._copy(step)
            else:
                weights = self._unpack(step)
        return weights

    def _copy(self, step: Copy) -> None:
        slot = self._slots[step.slot]
        self._copy_stream.wait_event(self._unpacked_events[step.slot])
        with torch.cuda.stream(self._copy_stream):
            offset = 0
            for view in self._layers[step.position][1]:
                slot[offset:offset + view.numel()].copy_(view, non_blocking=True)
                offset += view.numel()
        self._copied[step.slot].record(self._copy_stream)

    def _unpack(self, step: Unpack) -> tuple[torch.Tensor, torch.Tensor]:
        layout = self._layers[step.position][0]
        experts, inter, hidden = layout.experts, layout.intermediate, layout.hidden
        flat = self._unpacked[layout.dtype]
        w13 = flat[:2 * experts * inter * hidden].view(experts, 2 * inter, hidden)
        w2 = flat[2 * experts * inter * hidden:3 * experts * inter * hidden].view(experts, hidden, inter)
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(self._copied[step.slot])
        layout.unpack(self._slots[step.slot], w13, w2)
        self._unpacked_events[step.slot].record(compute)
        return w13, w2
