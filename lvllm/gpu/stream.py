"""Routed experts computed by lk in the order of a CUDA stream.

``StreamQueue.submit`` queues, on the current stream, the copies of the hidden states and
routing into pinned host memory and a host function that starts the lk job; the returned
``QueuedForward.wait`` queues a host function that waits for the job and the copy of the
result back. The calling thread never blocks, work queued in between (shared experts) runs on
the device while the CPU computes, and the sequence can be captured in a CUDA graph: a
replay re-runs it on the data then in the captured buffers. Rows flagged in ``padding`` (a
graph captured for more tokens than the replay carries) cost no CPU work and come back zero.
"""

from __future__ import annotations

import torch

from lvllm import _lk, formats
from lvllm.lk import MoEEngine

DRIVER_LIBRARY = "libcuda.so.1"


class _Staging:
    """Pinned host buffers for up to ``tokens`` rows of ``row_bytes`` and ``topk`` ids."""

    def __init__(self, tokens: int, row_bytes: int, topk: int):
        self.tokens, self.row_bytes, self.topk = tokens, row_bytes, topk
        pinned = dict(dtype=torch.uint8, pin_memory=True)
        self.buffers = [torch.empty(tokens * row_bytes, **pinned),          # input
                        torch.empty(tokens * topk * 4, **pinned),           # topk ids
                        torch.empty(tokens * topk * 4, **pinned),           # topk weights
                        torch.empty(max(tokens, 1), **pinned),              # padding
                        torch.empty(tokens * row_bytes, **pinned)]          # output
        self.native = _lk.HostStaging(*(b.data_ptr() for b in self.buffers),
                                      io_bytes=tokens * row_bytes, topk_bytes=tokens * topk * 4,
                                      padding_bytes=max(tokens, 1))

    def fits(self, tokens: int, row_bytes: int, topk: int) -> bool:
        return tokens <= self.tokens and row_bytes <= self.row_bytes and topk <= self.topk


class QueuedForward:
    """A routed-expert forward queued on a stream; ``wait`` queues its end."""

    def __init__(self, queue: "StreamQueue", handle: int, output: torch.Tensor, keep_alive: tuple):
        self._queue, self._handle, self._output = queue, handle, output
        self._keep_alive = keep_alive

    def wait(self) -> torch.Tensor:
        """The output on the device, valid in the order of the current stream (which must be
        the stream ``submit`` ran on)."""
        if self._handle is not None:
            stream = torch.cuda.current_stream(self._output.device).cuda_stream
            self._queue.native.finish(stream, self._handle, self._output.data_ptr())
            self._handle = self._keep_alive = None
        return self._output


class StreamQueue:
    """lk forwards queued on CUDA streams, for one process (its pinned staging is shared by
    every layer: the stream orders their uses)."""

    def __init__(self, max_tokens: int, driver_library: str = DRIVER_LIBRARY):
        self.native = _lk.StreamedForwards(_lk.CudaDriver(driver_library))
        self.max_tokens = max_tokens
        self._staging: _Staging | None = None
        # Replaced staging stays alive: queued work and captured graphs still point at it.
        self._retired: list[_Staging] = []

    def _staging_for(self, tokens: int, row_bytes: int, topk: int, capturing: bool) -> _Staging:
        if self._staging is None or not self._staging.fits(tokens, row_bytes, topk):
            if capturing and self._staging is not None:
                raise RuntimeError(f"{tokens} tokens do not fit lvllm's pinned staging "
                                   f"({self._staging.tokens}) while a CUDA graph is captured")
            old = self._staging
            self._staging = _Staging(max(tokens, self.max_tokens, old.tokens if old else 0),
                                     max(row_bytes, old.row_bytes if old else 0),
                                     max(topk, old.topk if old else 0))
            if old is not None:
                self._retired.append(old)
        return self._staging

    def submit(self, engine: MoEEngine, x: torch.Tensor, topk_ids: torch.Tensor,
               topk_weights: torch.Tensor, padding: torch.Tensor | None = None) -> QueuedForward:
        """Queue ``engine``'s forward of x [T, H] on the current CUDA stream (see module doc)."""
        error = self.native.take_error()
        if error:
            raise RuntimeError(f"lk failed in a forward queued on a CUDA stream: {error}")
        if x.dtype not in formats.DTYPE_CODES or x.dim() != 2 or x.shape[1] != engine.hidden_size:
            raise ValueError(f"x must be [tokens, {engine.hidden_size}] float32/float16/bfloat16, "
                             f"got {tuple(x.shape)} {x.dtype}")
        tokens, topk = x.shape[0], topk_ids.shape[-1]
        if tuple(topk_ids.shape) != (tokens, topk) or tuple(topk_weights.shape) != (tokens, topk):
            raise ValueError(f"topk_ids and topk_weights must be [{tokens}, k], got "
                             f"{tuple(topk_ids.shape)} and {tuple(topk_weights.shape)}")
        if padding is not None and tuple(padding.shape) != (tokens,):
            raise ValueError(f"padding must be [{tokens}] bool, got {tuple(padding.shape)}")
        capturing = torch.cuda.is_current_stream_capturing()
        staging = self._staging_for(tokens, x.shape[1] * x.element_size(), topk, capturing)
        x = x.contiguous()
        ids = topk_ids.to(torch.int32).contiguous()
        weights = topk_weights.to(torch.float32).contiguous()
        padding = padding.to(torch.bool).contiguous() if padding is not None else None
        output = torch.empty_like(x)
        stream = torch.cuda.current_stream(x.device).cuda_stream
        handle = self.native.begin(
            stream, engine._native, x.data_ptr(), formats.DTYPE_CODES[x.dtype], tokens,
            ids.data_ptr(), weights.data_ptr(), topk,
            padding.data_ptr() if padding is not None else 0, staging.native, capturing,
        )
        return QueuedForward(self, handle, output, (x, ids, weights, padding))
