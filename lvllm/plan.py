"""``lvllm plan``: the settings to serve a MoE checkpoint on this machine (or on the sizes
given), from the model's config and plain arithmetic; and what
``LVLLM_GPU_RESIDENT_MOE_LAYERS=auto`` resolves to at start-up (``gpu_fit``).

    lvllm plan --model PATH [--gpu-memory GiB] [--gpus N] [--ram GiB] [--max-model-len N]
               [--tensor-parallel-size N [--expert-parallel]]   (without a GPU)

GPU: per rank, vLLM's share of the GPU (``gpu-memory-utilization``) less the weights outside
the routed experts, the KV cache of one sequence of ``--max-model-len`` tokens, a margin and,
where long prompts stream experts, the prefetch ring; what is left holds whole MoE layers in
the checkpoint's format, the first ones. Host RAM: per LVLLM_MOE_USE_WEIGHT value, what lk
holds for the other layers plus two layers in the checkpoint's format while loading (as the
start-up check, lvllm.memory.check_budget, counts it); without a GPU also the KV cache and the
dense layers, per LVLLM_DENSE_USE_WEIGHT value. Decode bound: read bandwidth over the bytes
one token reads on the CPU: the routed experts', and without a GPU the dense layers'.
With a routing statistics file (``--stats``) and a GPU, the same GPU memory as hot experts
(LVLLM_HOT_EXPERTS: copies in the model's dtype in every MoE layer) is set beside the
resident layers: the share of the file's picks each puts on the GPU and the decode bound left.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from lvllm import envs, formats
from lvllm.expert_stats import device_share
from lvllm.envs import EnvError
from lvllm.layer_ranges import format_ranges
from lvllm.machine import Machine
from lvllm.memory import GIB
from lvllm.model_shape import (ExpertSet, ModelShape, checkpoint_layer_bytes, checkpoint_set_bytes, dense_bytes,
                               dense_weight_bytes, kv_cache_bytes)
from lvllm.settings import default_threads

# vLLM's share of each GPU that the plan hands it (gpu-memory-utilization).
GPU_UTILIZATION = 0.90
# GPU memory kept back for activations, CUDA graphs and the CUDA context: a margin, not a
# measurement (vLLM measures the real peak at start-up and gives the rest to the KV cache).
GPU_MARGIN = 2 * GIB
# Prompt tokens from which streaming a layer's experts to the GPU beat lk's CPU prefill, per
# lk format: BENCHMARKS.md, "GPU prefill streaming" (H100 + 16-vCPU Xeon with AMX; INT8's
# 128-256 taken at 256). float16 copies bf16's bytes; float32, not measured, twice them.
# MXFP4 and NVFP4 not measured: INT4's, which streams about as many bytes.
GPU_PREFILL_FROM = {"bfloat16": 512, "float16": 512, "float32": 1024, "int8": 256, "int4": 128,
                    "fp8_e4m3": 128, "mxfp4": 128, "nvfp4": 128}
# vLLM captures decode CUDA graphs up to 512 tokens by default; batches that replay one keep lk.
MAX_GRAPH_TOKENS = 512
# Preference among the formats that fit, by the checkpoint's: docs/formats.md.
PREFERENCE = {"float": ("TO_DTYPE", "INT8", "INT4"), "fp8_e4m3": ("KEEP", "INT8", "INT4", "TO_DTYPE"),
              "int4": ("KEEP", "TO_DTYPE"),
              # GPTQ 8-bit: KEEP is INT8 with the checkpoint's own integers and scales.
              "int8": ("KEEP", "INT4", "TO_DTYPE"),
              # KEEP: the same values as TO_DTYPE in a quarter of the RAM, faster both ways.
              "mxfp4": ("KEEP", "TO_DTYPE"),
              # KEEP: the checkpoint's values in 4.5 bits a weight, faster decode (prefill below
              # bf16's at long prompts on a CPU with AMX tiles: docs/formats.md).
              "nvfp4": ("KEEP", "TO_DTYPE")}


@dataclass(frozen=True)
class GpuFit:
    """Per-rank GPU memory and the MoE layers that stay there."""

    resident: tuple[int, ...]
    gpu_memory: int
    utilization: float
    tokens: int         # the KV cache's
    weights: int
    kv_cache: int
    layer: int          # one resident layer's experts
    ring: int = 0
    reason: str = ""

    @property
    def usable(self) -> int:
        return int(self.gpu_memory * self.utilization)

    @property
    def left(self) -> int:
        """Bytes for resident layers (the ring taken off)."""
        return self.usable - self.weights - self.kv_cache - GPU_MARGIN - self.ring

    @property
    def ring_fits(self) -> bool:
        return self.ring == 0 or self.left >= 0

    def describe(self) -> str:
        ring = f" - {gib_text(self.ring)} prefill ring" if self.ring else ""
        return (f"{gib_text(self.usable)} ({self.utilization:.2f} of {gib_text(self.gpu_memory)}) - "
                f"{gib_text(self.weights)} weights - {gib_text(self.kv_cache)} KV cache for {self.tokens} tokens"
                f" - {gib_text(GPU_MARGIN)} margin{ring}: {self.reason}; resident [{format_ranges(self.resident)}]")


@dataclass(frozen=True)
class Ranks:
    """vLLM's tensor-parallel ranks (one per GPU; on the CPU build --tensor-parallel-size, each
    on its share of the cores), and whether they split the experts (--enable-expert-parallel)
    rather than every expert's intermediate rows."""

    size: int = 1
    expert_parallel: bool = False


def lk_rank_set_bytes(shape: ModelShape, expert_set: ExpertSet, resolved: formats.Resolved, nodes: int = 1,
                      ranks: Ranks = Ranks()) -> int:
    """What the busiest rank's lk engine holds of one expert set of a MoE layer
    (lvllm._lk.planned_weight_bytes): with expert parallelism whole experts, E / ranks of them
    rounded up; else each expert's 1 / ranks of the intermediate rows."""
    from lvllm import _lk

    experts, inter = ((-(-expert_set.count // ranks.size), expert_set.width) if ranks.expert_parallel
                      else (expert_set.count, expert_set.width // ranks.size))
    return _lk.planned_weight_bytes(experts, shape.hidden, inter, formats.code(resolved.name),
                                    resolved.group_size, nodes)


def lk_set_bytes(shape: ModelShape, expert_set: ExpertSet, resolved: formats.Resolved, nodes: int = 1,
                 ranks: Ranks = Ranks()) -> int:
    """What lk holds of one expert set of a MoE layer over all ranks: the whole set once when they
    split the experts, else every rank's slice of each."""
    if ranks.expert_parallel:
        return lk_rank_set_bytes(shape, expert_set, resolved, nodes)
    return ranks.size * lk_rank_set_bytes(shape, expert_set, resolved, nodes, ranks)


def lk_rank_layer_bytes(shape: ModelShape, resolved: formats.Resolved, nodes: int = 1,
                        ranks: Ranks = Ranks()) -> int:
    """What the busiest rank's lk holds of one MoE layer: every expert set's engine."""
    return sum(lk_rank_set_bytes(shape, expert_set, resolved, nodes, ranks) for expert_set in shape.expert_sets)


def lk_layer_bytes(shape: ModelShape, resolved: formats.Resolved, nodes: int = 1, ranks: Ranks = Ranks()) -> int:
    """What lk holds of one MoE layer over all ranks, every expert set's."""
    return sum(lk_set_bytes(shape, expert_set, resolved, nodes, ranks) for expert_set in shape.expert_sets)


def dense_modes(resolved: formats.Resolved, users: str | None) -> tuple[str, ...]:
    """LVLLM_DENSE_USE_WEIGHT values to weigh with experts kept in ``resolved``, the one to pick
    last: the user's, else TO_DTYPE and, for INT8 / INT4 experts, the same bits (llama.cpp's Q8_0 / Q4_0)."""
    if users:
        return (users,)
    same = resolved.name.upper()
    return ("TO_DTYPE", same) if same in ("INT8", "INT4") else ("TO_DTYPE",)


def users_dense_mode() -> str | None:
    """This shell's LVLLM_DENSE_USE_WEIGHT, TO_DTYPE under LVLLM_DENSE_ON_LK=OFF (which allows no
    other), else None: the plan picks."""
    if "LVLLM_DENSE_USE_WEIGHT" in os.environ:
        return envs.get("LVLLM_DENSE_USE_WEIGHT")
    return "TO_DTYPE" if envs.get("LVLLM_DENSE_ON_LK") == "OFF" else None


def resolve(shape: ModelShape, mode: str, group: int | None = None) -> formats.Resolved:
    """lvllm.formats.resolve_format for this checkpoint, as LkMoEMethod.resolve_format asks it."""
    return formats.resolve_format(mode, shape.storage.format, getattr(torch, shape.dtype),
                                  shape.storage.group, group)


def gib_text(value: int) -> str:
    return f"{value / GIB:.1f} GiB"


def gpu_fit(shape: ModelShape, gpu_memory: int, tp: int, max_model_len: int, lk_format: formats.Resolved,
            prefill_window: int | None, utilization: float = GPU_UTILIZATION, nodes: int = 1) -> GpuFit:
    """The first MoE layers whose routed experts fit each of ``tp`` GPUs of ``gpu_memory``
    bytes; ``prefill_window``: the ring's window when long prompts stream the other layers'
    experts (None: no streaming)."""
    moe = shape.moe_layers
    fit = GpuFit((), gpu_memory, utilization, max_model_len, dense_weight_bytes(shape, tp),
                 kv_cache_bytes(shape, max_model_len, tp), checkpoint_layer_bytes(shape, tp=tp))
    if fit.left >= len(moe) * fit.layer:   # every layer resident: nothing left to stream
        return replace(fit, resident=moe, reason="every MoE layer fits")
    if fit.left < 0:
        held = gib_text(fit.weights + fit.kv_cache + GPU_MARGIN)
        return replace(fit, reason="the GPU does not hold even the weights outside the experts and the "
                                   f"KV cache ({held} of {gib_text(fit.usable)})")
    if prefill_window is not None:
        # lvllm.gpu.ring.ExpertRing.device_bytes: each expert set streams as a layer of its own, into
        # slots as large as the largest and one unpacked copy of the largest.
        slot = max(lk_rank_set_bytes(shape, s, lk_format, nodes, Ranks(tp)) for s in shape.expert_sets)
        unpacked = max(s.count * 3 * shape.hidden * (s.width // tp) * shape.dtype_bytes for s in shape.expert_sets)
        ring = (prefill_window + 1) * slot + unpacked
        fit = replace(fit, ring=ring)
        if fit.left < 0:
            return replace(fit, reason=f"the prefill ring ({gib_text(ring)}) does not fit")
    count = fit.left // fit.layer
    return replace(fit, resident=moe[:count],
                   reason=f"{count} of {len(moe)} MoE layers of {gib_text(fit.layer)} in {gib_text(fit.left)}")


@dataclass(frozen=True)
class FormatRow:
    modes: tuple[str, ...]
    resolved: formats.Resolved
    held: int       # lk's bytes for every lk layer
    need: int       # with the load's transient and what else the host holds
    tok_s: float    # decode bound
    dense_mode: str | None = None   # LVLLM_DENSE_USE_WEIGHT (None: the dense layers are on the GPU)

    def fits(self, ram: int) -> bool:
        return self.need <= ram


@dataclass(frozen=True)
class Plan:
    shape: ModelShape
    machine: Machine
    max_model_len: int
    gpu: GpuFit | None
    lk_layers: tuple[int, ...]
    rows: tuple[FormatRow, ...]
    choice: FormatRow | None
    kv_space_gib: int           # CPU only: VLLM_CPU_KVCACHE_SPACE
    threads: int                # LK_THREADS per rank
    prefill_from: int           # LVLLM_GPU_PREFILL_MIN_BATCH_SIZE (0: off)
    dense_group: int | None = None   # LVLLM_DENSE_QUANT_GROUP_SIZE (None: each format's default)
    ranks: Ranks = Ranks()

    @property
    def feasible(self) -> bool:
        return (self.gpu is None or self.gpu.left >= 0) and (not self.lk_layers or self.choice is not None)


def host_row(shape: ModelShape, resolved: formats.Resolved, modes: tuple[str, ...], lk_layers: int,
             machine: Machine, kv_cache: int, dense_mode: str | None = None,
             dense_group: int | None = None, ranks: Ranks = Ranks()) -> FormatRow:
    # As lvllm.memory.check_budget counts the load: two of vLLM's MoE layers, the largest expert set's.
    transient = 2 * max(checkpoint_set_bytes(shape, s) for s in shape.expert_sets) if lk_layers else 0
    layer = lk_layer_bytes(shape, resolved, machine.numa_nodes, ranks)
    dense = dense_bytes(shape, dense_mode, group=dense_group) if dense_mode else 0
    dense_read = dense_bytes(shape, dense_mode, per_token=True, group=dense_group) if dense_mode else 0
    text = shape.text_experts   # a decode token reads top-k of the text experts in each lk layer
    expert_read = lk_set_bytes(shape, text, resolved, machine.numa_nodes, ranks) / text.count
    per_token = lk_layers * shape.top_k * expert_read + dense_read
    tok_s = machine.bandwidth_gbs * 1e9 / per_token if per_token else float("inf")
    return FormatRow(modes, resolved, lk_layers * layer, lk_layers * layer + transient + kv_cache + dense, tok_s,
                     dense_mode)


def host_rows(shape: ModelShape, lk_layers: int, machine: Machine, kv_cache: int,
              users_dense: str | None, dense_group: int | None = None,
              ranks: Ranks = Ranks()) -> tuple[FormatRow, ...]:
    """A row per lk format and, without a GPU, per LVLLM_DENSE_USE_WEIGHT value to weigh with it."""
    return tuple(host_row(shape, resolved, modes, lk_layers, machine, kv_cache, dense, dense_group, ranks)
                 for resolved, modes in candidate_formats(shape).items()
                 for dense in ((None,) if machine.gpus else dense_modes(resolved, users_dense)))


def candidate_formats(shape: ModelShape) -> dict[formats.Resolved, tuple[str, ...]]:
    """The lk formats this checkpoint can be kept in, in order of preference, with the
    LVLLM_MOE_USE_WEIGHT values that give each."""
    found: dict[formats.Resolved, tuple[str, ...]] = {}
    for mode in PREFERENCE[shape.storage.format]:
        try:
            resolved = resolve(shape, mode)
        except EnvError:
            continue
        found[resolved] = found.get(resolved, ()) + (mode,)
    return found


def _fit_gpu(shape: ModelShape, machine: Machine, max_model_len: int, resolved: formats.Resolved) -> GpuFit:
    """Resident layers with the prefill ring where it fits and the layers stream, else without it."""
    tp = max(1, machine.gpus)
    bare = gpu_fit(shape, machine.gpu_memory, tp, max_model_len, resolved, None)
    if not shape.streamed_prefill:
        return replace(bare, reason=f"{bare.reason}; no GPU prefill: the streamed prefill does not compute "
                                    "expert biases or gpt-oss's activation (lk computes long prompts)")
    fit = gpu_fit(shape, machine.gpu_memory, tp, max_model_len, resolved, 1, nodes=machine.numa_nodes)
    if fit.ring_fits:
        return fit
    return replace(bare, reason=f"{bare.reason}; no GPU prefill: {fit.reason}")


def make_plan(shape: ModelShape, machine: Machine, max_model_len: int | None = None,
              users_dense: str | None = None, dense_group: int | None = None,
              cpu_ranks: Ranks = Ranks()) -> Plan:
    """The first lk format (in order of preference) whose layers fit the RAM, with the GPU's
    resident layers and prefill ring for that format; without a GPU, with the dense layers in
    ``users_dense`` (LVLLM_DENSE_USE_WEIGHT; None: dense_modes' pick), quantized in groups of
    ``dense_group`` inputs (LVLLM_DENSE_QUANT_GROUP_SIZE), on ``cpu_ranks`` (with GPUs: one
    rank per GPU)."""
    max_model_len = max_model_len or shape.max_positions
    ranks = Ranks(machine.gpus) if machine.gpus else cpu_ranks
    gpu, kv_space = None, 0
    if not machine.gpus:
        kv_space = max(1, -(-kv_cache_bytes(shape, max_model_len) // GIB))
    for resolved in candidate_formats(shape):
        if machine.gpus:
            gpu = _fit_gpu(shape, machine, max_model_len, resolved)
        lk_layers = tuple(i for i in shape.moe_layers if gpu is None or i not in gpu.resident)
        rows = host_rows(shape, len(lk_layers), machine, kv_space * GIB, users_dense, dense_group, ranks)
        choice = [row for row in rows if row.resolved == resolved][-1]   # dense_modes' pick comes last
        if not lk_layers or choice.fits(machine.ram):
            break
    else:
        choice = None
    per_rank = max(1, machine.cores // ranks.size)
    prefill = GPU_PREFILL_FROM[choice.resolved.name] if choice and gpu and gpu.ring else 0
    return Plan(shape, machine, max_model_len, gpu, lk_layers, rows, choice if lk_layers else None, kv_space,
                default_threads(per_rank), prefill, dense_group, ranks)


@dataclass(frozen=True)
class HotAlternative:
    """The GPU memory of the resident layers spent on hot experts in every MoE layer instead."""

    slots: int            # experts per layer (LVLLM_HOT_EXPERTS)
    gpu_bytes: int        # what they take, per rank
    hot_share: float      # of the file's picks, on the GPU
    layer_share: float    # of the file's picks, in the resident layers
    hot_tok_s: float      # decode bound, every MoE layer on lk less the hot pairs
    layer_tok_s: float    # decode bound, the resident layers' plan
    ram_fits: bool        # lk holding every MoE layer


def hot_expert_bytes(shape: ModelShape, tp: int) -> int:
    """One hot slot of a MoE layer on a rank's GPU, an expert's copy in each expert set (each its
    own FusedMoE and hot slots): in the model's dtype, whatever the checkpoint's format (quantized
    experts are unpacked from lk's memory)."""
    return sum(3 * shape.hidden * (s.width // tp) * shape.dtype_bytes for s in shape.expert_sets)


def hot_slots(shape: ModelShape, gpu_bytes: int, tp: int) -> int:
    """Hot experts a MoE layer that ``gpu_bytes`` of each rank's GPU hold in every MoE layer;
    0 for experts LVLLM_HOT_EXPERTS does not take (other activations than SiLU, biases)."""
    if shape.expert_activation != "silu" or shape.expert_biases or gpu_bytes <= 0:
        return 0
    fewest = min(expert_set.count for expert_set in shape.expert_sets)
    return min(fewest, gpu_bytes // (len(shape.moe_layers) * hot_expert_bytes(shape, tp)))


def picks_shares(shape: ModelShape, counts: dict[int, list[int]], resident, slots: int) -> tuple[float, float]:
    """(share of the file's picks in the ``resident`` layers, share on ``slots`` hot experts a layer)."""
    ordered = {layer: counts.get(layer, [0] * shape.text_experts.count) for layer in shape.moe_layers}
    picks = sum(map(sum, ordered.values()))
    layer_share = sum(sum(ordered[layer]) for layer in resident) / picks if picks else 0.0
    return layer_share, device_share(ordered, slots)


def auto_split(shape: ModelShape, fit: GpuFit, tp: int, counts: dict[int, list[int]],
               resident_auto: bool, resident: frozenset[int] = frozenset()) -> tuple[frozenset[int], int, str]:
    """LVLLM_HOT_EXPERTS=auto: (resident layers, hot slots a layer, why). The GPU memory left for
    resident layers (after ``resident`` when they are listed) goes to hot slots; with
    LVLLM_GPU_RESIDENT_MOE_LAYERS=auto too, to whichever of the two puts more of the file's
    picks (``counts``) on the GPU, whole layers where neither does (no file yet)."""
    given = frozenset(fit.resident) if resident_auto else resident
    left = fit.left if resident_auto else fit.left - len(resident) * fit.layer
    slots = hot_slots(shape, left, tp)
    if not slots:
        return given, 0, (f"no hot experts: {gib_text(max(0, left))} left does not hold one a layer"
                          if shape.expert_activation == "silu" and not shape.expert_biases else
                          "no hot experts: they take SiLU experts without biases")
    if not resident_auto:
        return given, slots, f"{slots} hot experts a layer in the {gib_text(left)} left after resident layers"
    layer_share, hot_share = picks_shares(shape, counts, fit.resident, slots)
    if hot_share > layer_share:
        return frozenset(), slots, (f"{slots} hot experts a layer hold {hot_share:.0%} of the file's picks, "
                                    f"whole layers [{format_ranges(fit.resident)}] {layer_share:.0%}")
    return given, 0, (f"whole layers [{format_ranges(fit.resident)}] hold {layer_share:.0%} of the file's picks, "
                      f"{slots} hot experts a layer {hot_share:.0%}")


def hot_alternative(plan: Plan, counts: dict[int, list[int]]) -> HotAlternative | None:
    """None without a GPU, a fitting plan, experts LVLLM_HOT_EXPERTS takes or room for a hot
    expert in each layer."""
    shape, machine, gpu, choice = plan.shape, plan.machine, plan.gpu, plan.choice
    if gpu is None or gpu.left < 0 or choice is None:
        return None
    tp = max(1, machine.gpus)
    moe = shape.moe_layers
    expert = hot_expert_bytes(shape, tp)
    slots = hot_slots(shape, gpu.left, tp)
    if slots < 1:
        return None
    layer_share, hot_share = picks_shares(shape, counts, gpu.resident, slots)
    every_layer = host_row(shape, choice.resolved, choice.modes, len(moe), machine, 0, ranks=plan.ranks)
    # The host reads only the pairs the GPU does not serve.
    hot_tok_s = every_layer.tok_s / (1 - hot_share) if hot_share < 1 else float("inf")
    return HotAlternative(slots, slots * len(moe) * expert, hot_share, layer_share, hot_tok_s, choice.tok_s,
                          every_layer.fits(machine.ram))
