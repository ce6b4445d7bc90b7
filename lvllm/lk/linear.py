"""Dense linear layers on lk's kernels: ``out = x @ weight.T (+ bias)``.

    from lvllm.lk.linear import LinearEngine
    engine = LinearEngine(weight)          # weight [N, K]: float32, float16 or bfloat16
    engine = LinearEngine(weight, "int8")  # or "int4": quantized at load, per group of inputs
    out = engine.forward(x, bias)          # x [..., K] -> [..., N] in x's dtype

The weight is copied into the engine's panels as it is, or quantized into INT8 / INT4 in
groups of ``group_size`` inputs (default: the format's, lvllm.formats) exactly as the MoE
engine quantizes experts; sums are fp32.
``torch.ops.lvllm.lk_linear`` wraps ``forward`` as a custom op with a fake implementation,
so graphs traced by Dynamo call it without breaking.
"""

from __future__ import annotations

import torch

from lvllm import _lk, formats
from lvllm.lk import EngineRegistry, _check_cpu_contiguous, _dtype_code, _weight_args, default_runtime

__all__ = ["LinearEngine", "planned_linear_bytes"]


class LinearEngine:
    """One dense linear layer's weight held by the lk engine (copied at creation)."""

    def __init__(self, weight: torch.Tensor, weight_format: str | None = None, group_size: int | None = None, *,
                 runtime: _lk.Runtime | None = None):
        args, source_format = _weight_args("weight", weight)
        if weight.dim() != 2:
            raise ValueError(f"weight must be [outputs, inputs], got shape {tuple(weight.shape)}")
        self.weight_format = weight_format or source_format
        if self.weight_format not in (source_format, "int8", "int4"):
            raise ValueError(f"weight_format must be None (as stored), 'int8' or 'int4', got {weight_format!r}")
        quantized = self.weight_format != source_format
        self.group_size = formats.group_size(self.weight_format, group_size) if quantized else 0
        self.runtime = runtime if runtime is not None else default_runtime()
        self.outputs, self.inputs = weight.shape
        self.dtype = weight.dtype
        self._native = _lk.LinearEngine(self.runtime, args, self.outputs, self.inputs,
                                        formats.code(self.weight_format), self.group_size)
        self.engine_id = _engines.add(self)

    @property
    def forward_calls(self) -> int:
        """Forwards run so far, by any path (tests read it to prove lk computed a layer)."""
        return self._native.forward_calls

    @property
    def nbytes(self) -> int:
        return self._native.weight_bytes

    def describe(self) -> str:
        """'bf16', 'int8 g256': the format held, as log lines show it."""
        return formats.describe(self.weight_format, self.group_size)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # Called per layer per step: the common case (CPU, contiguous, known dtype) costs
        # only attribute reads; anything else is checked and named before the engine runs.
        rows = x.reshape(-1, self.inputs) if x.dim() != 2 else x
        if x.shape[-1] != self.inputs:
            raise ValueError(f"x must be [..., {self.inputs}], got shape {tuple(x.shape)}")
        if not rows.is_contiguous() or rows.device.type != "cpu":
            rows = rows.contiguous()
            _check_cpu_contiguous("x", rows)
        code = formats.DTYPE_CODES.get(rows.dtype)
        if code is None:
            code = _dtype_code("x", rows)
        bias_address = bias_code = 0
        if bias is not None:
            bias = bias.contiguous()
            _check_cpu_contiguous("bias", bias)
            if bias.shape != (self.outputs,):
                raise ValueError(f"bias must be [{self.outputs}], got shape {tuple(bias.shape)}")
            bias_address, bias_code = bias.data_ptr(), _dtype_code("bias", bias)
        out = torch.empty((rows.shape[0], self.outputs), dtype=rows.dtype)
        self._native.forward(rows.data_ptr(), code, rows.shape[0], bias_address, bias_code, out.data_ptr(), code)
        return out if x.dim() == 2 else out.view(*x.shape[:-1], self.outputs)

    __call__ = forward


def planned_linear_bytes(outputs: int, inputs: int, weight_format: str, group_size: int = 0) -> int:
    """Bytes of host RAM a LinearEngine of this shape and format holds, before it exists."""
    return _lk.planned_linear_bytes(outputs, inputs, formats.code(weight_format), group_size)


_engines = EngineRegistry("lk linear engine")


_LIBRARY = torch.library.Library("lvllm", "FRAGMENT")
_LIBRARY.define("lk_linear(Tensor x, Tensor? bias, int engine_id, int outputs) -> Tensor")


def _lk_linear(x: torch.Tensor, bias: torch.Tensor | None, engine_id: int, outputs: int) -> torch.Tensor:
    return _engines.get(engine_id).forward(x, bias)


def _lk_linear_fake(x: torch.Tensor, bias: torch.Tensor | None, engine_id: int, outputs: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], outputs)


_LIBRARY.impl("lk_linear", _lk_linear, "CPU")
torch.library.register_fake("lvllm::lk_linear", _lk_linear_fake, lib=_LIBRARY)
