"""Where each MoE layer's routed experts run, and which layers lk refuses: decided here.

A layer listed in LVLLM_GPU_RESIDENT_MOE_LAYERS (or, with ``auto``, one that lvllm.plan fits on
the GPU, asked once the model is known) keeps vLLM's own experts on the device;
every other one goes to lk, or stops start-up when lk cannot compute it (``Placement.place``
with the layer's problems, gathered by lvllm.vllm.checkpoint_sources). On a GPU with
LVLLM_GPU_PREFILL_MIN_BATCH_SIZE set, an lk layer whose experts the GPU's fused kernel can
compute (``streams_in_gpu_prefill``) also joins the ring that streams its experts to the GPU
for long prompts. Which *tokens* of a forward take the streamed experts is lvllm.gpu.plan's
per-forward decision.
"""

from __future__ import annotations

import enum
import os
import threading
from dataclasses import dataclass, field
from typing import Callable

from lvllm import envs
from lvllm.layer_ranges import format_ranges
from lvllm.settings import Settings

RESIDENT_VAR = "LVLLM_GPU_RESIDENT_MOE_LAYERS"

# What lk computes: gated activations (gate rows then up rows in w13).
LK_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "swigluoai")


class UnsupportedLayer(envs.EnvError):
    """A layer lvllm was asked to put on lk but cannot; says what to do instead."""


def activation_problems(activation: str, gated: bool = True) -> list[str]:
    """Why lk cannot compute experts of this activation (empty: it can)."""
    if gated and activation in LK_ACTIVATIONS:
        return []
    return [f"activation {activation!r} (lk: {', '.join(LK_ACTIVATIONS)}, gated)"]


def streams_in_gpu_prefill(activation: str, has_biases: bool) -> bool:
    """Whether a layer's experts may be streamed to the GPU for long prompts: the streamed
    experts run vLLM's fused kernel on lk's [gate; up] layout, without biases or gpt-oss's
    clamped activation (such layers compute their long prompts on lk)."""
    return not has_biases and activation != "swigluoai"


def refuse(layer_name: str, problems: list[str]) -> None:
    """Stop start-up for an lk layer with problems, naming each and the way out."""
    if problems:
        raise UnsupportedLayer(
            f"{layer_name}: lk cannot compute this layer's routed experts ({'; '.join(problems)}). "
            f"Keep it on the device by listing its index in {RESIDENT_VAR}, or set "
            "LVLLM_MOE_NUMA_ENABLED=0.")


class LayerPath(enum.Enum):
    DEVICE = "device"             # vLLM's own experts, resident on the device
    LK = "lk"                     # routed experts on lk, every token
    LK_STREAMED = "lk+streamed"   # on lk; long prompts' tokens on the GPU, experts streamed

    @property
    def on_lk(self) -> bool:
        return self is not LayerPath.DEVICE


def check_resident_layers(resident: frozenset[int], num_layers: int) -> None:
    """Refuse resident layer indices the model does not have."""
    beyond = sorted(i for i in resident if i >= num_layers)
    if beyond:
        raise envs.EnvError(
            f"{RESIDENT_VAR}={os.environ.get(RESIDENT_VAR, '')!r} names layer(s) "
            f"{', '.join(map(str, beyond))}, but the model has {num_layers} layers "
            f"(valid indices 0-{num_layers - 1})."
        )


@dataclass
class Placement:
    """Per-process record of where each MoE layer's routed experts run.

    Built while the model is constructed (``place``), filled in as weights are handed
    to lk (``loaded``), summarised in one log line once every lk layer is loaded.
    """

    resident: frozenset[int] | str   # envs.AUTO until the first layer is placed
    streams: bool = False   # lk layers also stream their experts to the GPU for long prompts
    lk_layers: dict[int, str] = field(default_factory=dict)      # index -> layer name
    device_layers: dict[int, str] = field(default_factory=dict)
    unstreamed: set[int] = field(default_factory=set)   # lk layers streams_in_gpu_prefill keeps on lk
    loaded_bytes: dict[int, int] = field(default_factory=dict)   # index -> engine bytes
    weight_format: str = ""
    progress_bar: bool | None = None   # None: tqdm shows it where stderr is a TTY
    num_layers: int | None = None
    summary: str | None = None
    convert_seconds: float = 0.0
    # With resident AUTO: gives the resident layers of the model being built (lvllm.vllm).
    auto_resident: Callable[[], frozenset[int]] | None = None
    # Under pipeline parallelism: (this stage, stages, the model layers it builds).
    stage: tuple[int, int, range] | None = None
    # A speculative draft model's record: LVLLM_DRAFT_MOE puts all its layers on the device
    # (DEVICE) or on lk (LK), named in the log line; indices are the draft's own.
    draft: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _bar: object = field(default=None, repr=False)

    @classmethod
    def from_settings(cls, settings: Settings, on_cuda: bool = False) -> "Placement":
        return cls(resident=settings.resident_layers,
                   streams=on_cuda and settings.gpu_prefill_min_batch > 0)

    @classmethod
    def for_draft(cls, settings: Settings, on_cuda: bool = False) -> "Placement":
        return cls(resident=frozenset(), streams=on_cuda and settings.gpu_prefill_min_batch > 0,
                   draft=settings.draft_moe)

    def place(self, layer_index: int, layer_name: str, num_layers: int | None,
              lk_problems: Callable[[], list[str]] = list, streamable: bool = True) -> LayerPath:
        """Record a MoE layer and decide its path; a layer bound for lk with ``lk_problems()``
        (asked only then) stops start-up. ``streamable``: streams_in_gpu_prefill's answer."""
        path = self._record(layer_index, layer_name, num_layers, streamable)
        if path.on_lk:
            refuse(layer_name, lk_problems())
        return path

    def _record(self, layer_index: int, layer_name: str, num_layers: int | None,
                streamable: bool) -> LayerPath:
        with self._lock:
            if self.resident == envs.AUTO:
                if self.auto_resident is None:
                    raise RuntimeError(f"{RESIDENT_VAR}=auto needs the model's plan (Placement.auto_resident)")
                self.resident = frozenset(self.auto_resident())
            if num_layers is not None and self.num_layers is None:
                check_resident_layers(self.resident, num_layers)
                self.num_layers = num_layers
            on_device = self.draft == "DEVICE" or layer_index in self.resident
            (self.device_layers if on_device else self.lk_layers)[layer_index] = layer_name
            if not streamable:
                self.unstreamed.add(layer_index)
            return self.path_of(layer_index)

    def path_of(self, layer_index: int) -> LayerPath:
        """The path ``place`` decided for a layer."""
        if layer_index in self.device_layers:
            return LayerPath.DEVICE
        streamed = self.streams and layer_index not in self.unstreamed
        return LayerPath.LK_STREAMED if streamed else LayerPath.LK

    def loading(self, what: str) -> None:
        """A layer's experts are about to be converted for lk: show the progress bar
        (one per process, over its lk layers; tqdm stays quiet where stderr is no TTY)."""
        with self._lock:
            if self._bar is None and self.progress_bar is not False and self.summary is None:
                from tqdm import tqdm

                self._bar = tqdm(total=len(self.lk_layers), unit="layer",
                                 disable=None if self.progress_bar is None else False,
                                 desc=f"lvllm: MoE experts to lk ({what})", leave=False)

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
        not_moe = sorted(i for i in self.resident - set(self.device_layers)
                         if self.stage is None or i in self.stage[2])
        where = f"draft model (LVLLM_DRAFT_MOE={self.draft}): " if self.draft else ""
        if self.stage is not None:
            rank, ranks, layers = self.stage
            where += (f"pipeline stage {rank} of {ranks} (model layers "
                      f"{format_ranges(layers)}): ")
        line = (
            f"lvllm: {where}{len(self.lk_layers)} MoE layer(s) on lk [{format_ranges(self.lk_layers)}] "
            f"({self.weight_format}, {gib:.3f} GiB in RAM, converted in {self.convert_seconds:.1f} s, "
            f"{_threads(runtime)}, "
            f"{runtime.get('numa_nodes')} NUMA node(s), ISA {runtime.get('isa')}); "
            f"{len(self.device_layers)} on the device [{format_ranges(self.device_layers)}]"
        )
        if not_moe:
            line += f"; {RESIDENT_VAR} also names non-MoE layer(s) {format_ranges(not_moe)}"
        return line


def _threads(runtime: dict) -> str:
    """'2 threads (the worker's OpenMP threads, cores 0-1)' or '62 threads (lk's own, ...)'."""
    whose = "the worker's OpenMP threads" if runtime.get("workers") == "OPENMP" else "lk's own"
    cores = f", cores {format_ranges(runtime['cpus'])}" if runtime.get("cpus") else ""
    return f"{runtime.get('threads')} threads ({whose}{cores})"
