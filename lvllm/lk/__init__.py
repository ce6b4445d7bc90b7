"""Python face of the lk engine: routed MoE experts computed on the CPU.

    from lvllm.lk import MoEEngine
    engine = MoEEngine(w13, w2, activation="silu")   # w13 [E, 2I, H], w2 [E, H, I]
    out = engine.forward(x, topk_ids, topk_weights)  # x [T, H] -> [T, H]
    pending = engine.submit(x, topk_ids, topk_weights); ...; out = pending.wait()

Weights are bf16/fp16/fp32 tensors, or :class:`QuantizedWeights` (FP8 e4m3 with group
scales, INT8, INT4 with scales and offsets, MXFP4 blocks with e8m0 scales, NVFP4 codes with
e4m3 scales and row scales); ``weight_format``
picks how the engine stores them ("int8"/"int4" quantize float weights at load, in groups
of ``group_size`` inputs, by default the format's own: lvllm.formats).

Tensors are checked here and handed to the C++ engine as data pointers. All engines of a
process share one runtime (worker pool, kernels, scratch; lvllm.lk.runtime), configured
from the LK_* variables. ``torch.ops.lvllm.lk_moe_forward`` wraps ``forward`` as a
custom op with a fake implementation, so models traced by Dynamo call it without breaking
the graph.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass

import torch

from lvllm import _lk, formats
from lvllm.lk import mxfp4, nvfp4
from lvllm.lk.runtime import default_runtime, default_threads, make_runtime, runtime_info

__all__ = ["MoEEngine", "PendingForward", "QuantizedWeights", "default_runtime", "default_threads",
           "engine_group_size", "make_runtime", "planned_bytes", "runtime_info", "ACTIVATIONS",
           "WEIGHT_FORMATS"]

WEIGHT_FORMATS = formats.NAMES
if tuple(_lk.format_names()) != WEIGHT_FORMATS:
    raise ImportError(f"lvllm._lk's formats {_lk.format_names()} differ from lvllm.formats "
                      f"{WEIGHT_FORMATS}: rebuild the engine (make build)")
_ID_DTYPES = (torch.int32, torch.int64)
ACTIVATIONS = {"silu": 0, "gelu": 1, "swigluoai": 2, "gelu_tanh": 3}


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


# The checks below run on every forward: their messages are formatted only on failure.
def _check_cpu_contiguous(name: str, tensor: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU, got device {tensor.device}")
    if not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first)")


def _dtype_code(name: str, tensor: torch.Tensor) -> int:
    code = formats.DTYPE_CODES.get(tensor.dtype)
    if code is None:
        raise ValueError(f"{name} has dtype {tensor.dtype}; supported: float32, float16, bfloat16")
    return code


@dataclass
class QuantizedWeights:
    """Quantized [E, rows, cols] weights: value = q * scales[..., col // group_size] (+ offsets).

    values: float8_e4m3fn (FP8), int8 (INT8) or uint8 holding one INT4 value 0..15 per byte;
    scales (and, for INT4, offsets): float32 [E, rows, ceil(cols / group_size)].
    MXFP4 (uint8 scales): values are the checkpoint's blocks and scales its e8m0 bytes,
    group_size 32 (lvllm.lk.mxfp4). NVFP4 (float8_e4m3fn scales of uint8 values): values
    the checkpoint's codes, scales its e4m3 scales, group_size 16, and row_scales float32
    [E, rows] the per-tensor scale of each row (lvllm.lk.nvfp4).
    """

    values: torch.Tensor
    scales: torch.Tensor
    group_size: int
    offsets: torch.Tensor | None = None
    row_scales: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        if self.format == "mxfp4":
            return mxfp4.logical_shape(self.values)
        return nvfp4.logical_shape(self.values) if self.format == "nvfp4" else self.values.shape

    @property
    def format(self) -> str:
        if self.scales.dtype == torch.uint8:  # e8m0 exponents
            return "mxfp4"
        if self.scales.dtype == torch.float8_e4m3fn and self.values.dtype == torch.uint8:
            return "nvfp4"
        return formats.QUANTIZED_FORMAT_OF_VALUES[self.values.dtype]

    def native_args(self, name: str) -> tuple:
        if self.format == "mxfp4":
            mxfp4.check(self.values, self.scales, self.group_size, name)
            return (self.values.data_ptr(), formats.code("mxfp4"), self.scales.data_ptr(), 0, self.group_size)
        if self.format == "nvfp4":
            nvfp4.check(self.values, self.scales, self.row_scales, self.group_size, name)
            return (self.values.data_ptr(), formats.code("nvfp4"), self.scales.data_ptr(),
                    self.row_scales.data_ptr(), self.group_size)
        _check_cpu_contiguous(f"{name}.values", self.values)
        _require(
            self.values.dtype in formats.QUANTIZED_FORMAT_OF_VALUES,
            f"{name}.values has dtype {self.values.dtype}; supported: float8_e4m3fn, int8, uint8 (int4)",
        )
        _require(self.values.dim() == 3, f"{name}.values must be [E, rows, cols], got {tuple(self.values.shape)}")
        _require(
            self.group_size >= 16 and self.group_size % 16 == 0,
            f"{name}.group_size must be a positive multiple of 16, got {self.group_size}",
        )
        experts, rows, cols = self.values.shape
        meta_shape = (experts, rows, -(-cols // self.group_size))
        metas = [("scales", self.scales)]
        if self.format == "int4":
            _require(self.offsets is not None, f"{name}: int4 weights need offsets")
            metas.append(("offsets", self.offsets))
        for label, meta in metas:
            _check_cpu_contiguous(f"{name}.{label}", meta)
            _require(meta.dtype == torch.float32, f"{name}.{label} must be float32, got {meta.dtype}")
            _require(
                tuple(meta.shape) == meta_shape,
                f"{name}.{label} must be {meta_shape} for group size {self.group_size}, got {tuple(meta.shape)}",
            )
        offsets = self.offsets.data_ptr() if self.format == "int4" else 0
        return (self.values.data_ptr(), formats.code(self.format), self.scales.data_ptr(), offsets,
                self.group_size)


def _weight_args(name: str, weights: torch.Tensor | QuantizedWeights) -> tuple[tuple, str]:
    """(native source args, the source's format name)."""
    if isinstance(weights, QuantizedWeights):
        return weights.native_args(name), weights.format
    _check_cpu_contiguous(name, weights)
    code = _dtype_code(name, weights)
    return (weights.data_ptr(), code, 0, 0, 0), WEIGHT_FORMATS[code]


class EngineRegistry:
    """Live engines of one kind by id: custom ops name the engine they call by its id."""

    def __init__(self, kind: str):
        self._kind = kind
        self._live: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._ids = itertools.count()
        # Told of each new engine while the ops' C++ kernels are installed (lvllm.lk.native_ops).
        self.on_add = None

    def add(self, engine) -> int:
        engine_id = next(self._ids)
        self._live[engine_id] = engine
        if self.on_add is not None:
            self.on_add(engine_id, engine)
        return engine_id

    def get(self, engine_id: int):
        engine = self._live.get(engine_id)
        if engine is None:
            raise ValueError(f"no live {self._kind} with id {engine_id}")
        return engine

    def items(self) -> list:
        """(id, engine) of the live engines, oldest first."""
        return sorted(self._live.items())

    def live(self) -> list:
        """The live engines, oldest first."""
        return [engine for _, engine in self.items()]


_engines = EngineRegistry("lk engine")


class PendingForward:
    """A submitted forward; keeps its tensors alive until ``wait`` returns the output."""

    def __init__(self, engine: "MoEEngine", ticket: int, keep_alive: tuple, output: torch.Tensor):
        self._engine = engine
        self._ticket = ticket
        self._keep_alive = keep_alive
        self._output = output

    def wait(self) -> torch.Tensor:
        if self._keep_alive is not None:
            self._engine._native.wait(self._ticket)
            self._keep_alive = None
        return self._output


def engine_group_size(w13: torch.Tensor | QuantizedWeights, weight_format: str, requested: int | None = None) -> int:
    """The group an engine of ``weight_format`` built from ``w13`` quantizes in
    (lvllm.formats.engine_group: w13's own where it is kept as it is)."""
    if isinstance(w13, QuantizedWeights):
        return formats.engine_group(weight_format, w13.format, w13.group_size, requested)
    return formats.group_size(weight_format, requested)


def planned_bytes(experts: int, hidden: int, intermediate: int, weight_format: str, group_size: int,
                  runtime: _lk.Runtime | None = None) -> int:
    """Bytes of host RAM an engine of this shape and format will hold (``MoEEngine.nbytes``)
    on ``runtime``'s NUMA nodes (None: the default runtime), known before any is allocated."""
    nodes = (runtime or default_runtime()).numa_nodes
    return _lk.planned_weight_bytes(experts, hidden, intermediate, formats.code(weight_format),
                                    group_size, nodes)


def _bias(name: str, bias: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    _require(tuple(bias.shape) == shape, f"{name} must be {list(shape)}, got {list(bias.shape)}")
    _require(bias.device.type == "cpu" and bias.is_floating_point(),
             f"{name} must be a floating-point CPU tensor, got {bias.dtype} on {bias.device}")
    return bias.detach().to(torch.float32).contiguous()


class MoEEngine:
    """One MoE layer's routed experts held by the lk engine (weights copied at creation)."""

    def __init__(
        self,
        w13: torch.Tensor | QuantizedWeights,
        w2: torch.Tensor | QuantizedWeights,
        activation: str = "silu",
        *,
        weight_format: str | None = None,
        group_size: int | None = None,
        swiglu_alpha: float = 1.702,
        swiglu_limit: float = 7.0,
        w13_bias: torch.Tensor | None = None,
        w2_bias: torch.Tensor | None = None,
        runtime: _lk.Runtime | None = None,
    ):
        w13_args, w13_format = _weight_args("w13", w13)
        w2_args, w2_format = _weight_args("w2", w2)
        _require(len(w13.shape) == 3, f"w13 must be [E, 2I, H], got shape {tuple(w13.shape)}")
        _require(len(w2.shape) == 3, f"w2 must be [E, H, I], got shape {tuple(w2.shape)}")
        experts, double_intermediate, hidden = w13.shape
        _require(
            double_intermediate % 2 == 0 and double_intermediate > 0,
            f"w13's second dimension is gate rows then up rows (2I), got {double_intermediate}",
        )
        intermediate = double_intermediate // 2
        _require(
            tuple(w2.shape) == (experts, hidden, intermediate),
            f"w2 must be [E, H, I] = {(experts, hidden, intermediate)} to match w13 "
            f"{tuple(w13.shape)}, got {tuple(w2.shape)}",
        )
        _require(w13_format == w2_format, f"w13 ({w13_format}) and w2 ({w2_format}) must share a format")
        weight_format = weight_format or w13_format
        _require(
            weight_format in WEIGHT_FORMATS,
            f"weight_format {weight_format!r} is not supported; valid: {', '.join(WEIGHT_FORMATS)}",
        )
        _require(
            weight_format != "fp8_e4m3" or w13_format == "fp8_e4m3",
            "the engine keeps FP8 weights only from FP8 checkpoints",
        )
        group_size = engine_group_size(w13, weight_format, group_size)
        _require(group_size >= 16 and group_size % 16 == 0, f"group_size must be a positive multiple of 16, got {group_size}")
        _require(
            activation in ACTIVATIONS,
            f"activation {activation!r} is not supported; valid: {', '.join(ACTIVATIONS)}",
        )
        self.runtime = runtime if runtime is not None else default_runtime()
        self.num_experts = experts
        self.hidden_size = hidden
        self.intermediate_size = intermediate
        self.weight_format = weight_format
        self.group_size = group_size
        self.activation = activation
        # Copied by the engine; float32 so the sums get them unrounded.
        biases = [None if b is None else _bias(name, b, shape)
                  for name, b, shape in (("w13_bias", w13_bias, (experts, 2 * intermediate)),
                                         ("w2_bias", w2_bias, (experts, hidden)))]
        self.has_biases = any(b is not None for b in biases)
        self._native = _lk.Engine(
            self.runtime, w13_args, w2_args, experts, hidden, intermediate,
            formats.code(weight_format), group_size, ACTIVATIONS[activation], swiglu_alpha, swiglu_limit,
            *(0 if b is None else b.data_ptr() for b in biases),
        )
        self.engine_id = _engines.add(self)

    @property
    def forward_calls(self) -> int:
        """Forwards submitted so far, by any path (tests read it to prove lk computed a layer)."""
        return self._native.forward_calls

    @property
    def nbytes(self) -> int:
        """Bytes of expert weights the engine holds (its own layout, padding included)."""
        return self._native.weight_bytes

    def submit(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        out: torch.Tensor | None = None,
    ) -> PendingForward:
        """Starts the forward on the workers and returns at once."""
        _check_cpu_contiguous("x", x)
        _check_cpu_contiguous("topk_ids", topk_ids)
        _check_cpu_contiguous("topk_weights", topk_weights)
        if x.dim() != 2 or x.shape[1] != self.hidden_size:
            raise ValueError(f"x must be [tokens, {self.hidden_size}], got shape {tuple(x.shape)}")
        tokens = x.shape[0]
        if topk_ids.dim() != 2 or topk_ids.shape[0] != tokens or topk_ids.shape[1] < 1:
            raise ValueError(f"topk_ids must be [{tokens}, k] with k >= 1, got shape {tuple(topk_ids.shape)}")
        if topk_ids.dtype not in _ID_DTYPES:
            raise ValueError(f"topk_ids has dtype {topk_ids.dtype}; supported: int32, int64")
        if topk_weights.shape != topk_ids.shape:
            raise ValueError(
                f"topk_weights must have topk_ids' shape {tuple(topk_ids.shape)}, got {tuple(topk_weights.shape)}"
            )
        if out is None:
            out = torch.empty_like(x)
        else:
            _check_cpu_contiguous("out", out)
            if out.shape != x.shape:
                raise ValueError(f"out must be {tuple(x.shape)}, got {tuple(out.shape)}")
        ticket = self._native.submit(
            x.data_ptr(), _dtype_code("x", x), tokens,
            topk_ids.data_ptr(), topk_ids.dtype == torch.int64, topk_ids.shape[1],
            topk_weights.data_ptr(), _dtype_code("topk_weights", topk_weights),
            out.data_ptr(), _dtype_code("out", out),
        )
        return PendingForward(self, ticket, (x, topk_ids, topk_weights), out)

    def forward(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """out[t] = sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t]); ids of -1 skipped."""
        return self.submit(x, topk_ids, topk_weights, out).wait()

    __call__ = forward


# Defined through torch.library.Library rather than the custom_op decorator, whose Python
# wrapping every MoE layer of every decode step would pay (benchmarks/bench_call_overhead.py).
_LIBRARY = torch.library.Library("lvllm", "DEF")
_LIBRARY.define("lk_moe_forward(Tensor x, Tensor topk_ids, Tensor topk_weights, int engine_id) -> Tensor")


def _lk_moe_forward(
    x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, engine_id: int
) -> torch.Tensor:
    return _engines.get(engine_id).forward(x.contiguous(), topk_ids.contiguous(), topk_weights.contiguous())


def _lk_moe_forward_fake(
    x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, engine_id: int
) -> torch.Tensor:
    return torch.empty_like(x)


_LIBRARY.impl("lk_moe_forward", _lk_moe_forward, "CPU")
torch.library.register_fake("lvllm::lk_moe_forward", _lk_moe_forward_fake, lib=_LIBRARY)
