"""lvllm's settings: every variable of lvllm.envs read once into one object, passed down."""

from __future__ import annotations

from dataclasses import dataclass

from lvllm import envs


def default_threads(cores: int | None = None) -> int:
    """lk's threads when LK_THREADS is unset: the usable cores (or ``cores``) minus one per 16
    for the host's own threads, at least 1."""
    cores = envs.usable_cpus() if cores is None else cores
    return max(1, cores - cores // 16)


@dataclass(frozen=True)
class LkSettings:
    """How the lk engine's runtime runs (the LK_* variables)."""

    threads: int | None = None        # None: default_threads(), or torch's for OPENMP workers
    workers: str = "AUTO"             # AUTO, OPENMP or OWN
    binding: str = "CPU_CORE"
    power_saving: bool = False
    isa: str = ""                     # empty: the best the CPU supports
    numa_nodes: int | None = None     # None: the machine's real nodes

    @classmethod
    def from_env(cls) -> "LkSettings":
        return cls(threads=envs.get("LK_THREADS"), workers=envs.get("LK_WORKERS"),
                   binding=envs.get("LK_THREAD_BINDING"), power_saving=envs.get("LK_POWER_SAVING"),
                   isa=envs.get("LK_ISA"), numa_nodes=envs.get("LK_NUMA_NODES"))


@dataclass(frozen=True)
class Settings:
    """The run-time LVLLM_* variables (build-time ones are setup.py's)."""

    enabled: bool = False
    resident_layers: frozenset[int] | str = frozenset()   # or envs.AUTO
    gpu_prefill_min_batch: int = 0
    gpu_prefetch_window: int = 1
    dense_on_lk: str = "AUTO"
    dense_weight_mode: str = "TO_DTYPE"
    routers_on_lk: bool = True            # LVLLM_ROUTERS_ON_LK
    dense_group_size: int | None = None   # None: the format's default (lvllm.formats)
    draft_moe: str = "LK"
    cpp_wrapper: bool = True              # LVLLM_CPU_CPP_WRAPPER
    native_attention: bool = True         # LVLLM_CPU_NATIVE_ATTENTION
    native_lk_ops: bool = True            # LVLLM_CPU_NATIVE_LK_OPS
    step_shortcuts: str = "ON"            # LVLLM_CPU_STEP_SHORTCUTS: ON, OFF, CHECK
    serial_one_iteration: bool = True     # LVLLM_CPU_SERIAL_ONE_ITERATION
    weight_mode: str = "TO_DTYPE"
    quant_group_size: int | None = None   # None: the format's default (lvllm.formats)
    quant_on_gpu: bool = False
    ram_budget_gib: float | None = None
    expert_stats: str | None = None       # LVLLM_EXPERT_STATS' path
    expert_stats_interval_min: float = 10.0
    hot_experts: int | str = 0            # LVLLM_HOT_EXPERTS: per lk layer, or envs.AUTO
    hot_experts_update: int = 0           # steps between re-rankings; 0: static
    hot_experts_swaps: int = 1            # per layer and re-ranking
    hot_experts_decay: float = 0.9        # weight the earlier picks keep per re-ranking
    lk: LkSettings = LkSettings()

    @classmethod
    def from_env(cls) -> "Settings":
        """Every variable checked (unknown LVLLM_*/LK_* names included), then read."""
        envs.validate_all()
        if envs.get("LVLLM_DENSE_ON_LK") == "OFF" and envs.get("LVLLM_DENSE_USE_WEIGHT") != "TO_DTYPE":
            raise envs.EnvError(
                f"LVLLM_DENSE_USE_WEIGHT={envs.get('LVLLM_DENSE_USE_WEIGHT')} quantizes dense layers on lk, "
                "but LVLLM_DENSE_ON_LK=OFF keeps them off lk: set LVLLM_DENSE_ON_LK to AUTO or ON, "
                "or LVLLM_DENSE_USE_WEIGHT to TO_DTYPE")
        if envs.get("LVLLM_HOT_EXPERTS") and not envs.get("LVLLM_EXPERT_STATS"):
            raise envs.EnvError(
                f"LVLLM_HOT_EXPERTS={envs.get('LVLLM_HOT_EXPERTS')} picks each layer's hottest experts "
                "from a routing statistics file: set LVLLM_EXPERT_STATS to one (a run with it set "
                "writes it), or LVLLM_HOT_EXPERTS to 0")
        if envs.get("LVLLM_HOT_EXPERTS_UPDATE") and not envs.get("LVLLM_HOT_EXPERTS"):
            raise envs.EnvError(
                f"LVLLM_HOT_EXPERTS_UPDATE={envs.get('LVLLM_HOT_EXPERTS_UPDATE')} re-ranks hot experts, "
                "but LVLLM_HOT_EXPERTS=0 keeps none: set LVLLM_HOT_EXPERTS to the slots per layer, "
                "or LVLLM_HOT_EXPERTS_UPDATE to 0")
        return cls(
            enabled=envs.get("LVLLM_MOE_NUMA_ENABLED"),
            resident_layers=envs.get("LVLLM_GPU_RESIDENT_MOE_LAYERS"),
            gpu_prefill_min_batch=envs.get("LVLLM_GPU_PREFILL_MIN_BATCH_SIZE"),
            gpu_prefetch_window=envs.get("LVLLM_GPU_PREFETCH_WINDOW"),
            dense_on_lk=envs.get("LVLLM_DENSE_ON_LK"),
            dense_weight_mode=envs.get("LVLLM_DENSE_USE_WEIGHT"),
            routers_on_lk=envs.get("LVLLM_ROUTERS_ON_LK"),
            dense_group_size=envs.get("LVLLM_DENSE_QUANT_GROUP_SIZE"),
            draft_moe=envs.get("LVLLM_DRAFT_MOE"),
            cpp_wrapper=envs.get("LVLLM_CPU_CPP_WRAPPER"),
            native_attention=envs.get("LVLLM_CPU_NATIVE_ATTENTION"),
            native_lk_ops=envs.get("LVLLM_CPU_NATIVE_LK_OPS"),
            step_shortcuts=envs.get("LVLLM_CPU_STEP_SHORTCUTS"),
            serial_one_iteration=envs.get("LVLLM_CPU_SERIAL_ONE_ITERATION"),
            weight_mode=envs.get("LVLLM_MOE_USE_WEIGHT"),
            quant_group_size=envs.get("LVLLM_MOE_QUANT_GROUP_SIZE"),
            quant_on_gpu=envs.get("LVLLM_MOE_QUANT_ON_GPU"),
            ram_budget_gib=envs.get("LVLLM_MOE_RAM_BUDGET"),
            expert_stats=envs.get("LVLLM_EXPERT_STATS"),
            expert_stats_interval_min=envs.get("LVLLM_EXPERT_STATS_INTERVAL"),
            hot_experts=envs.get("LVLLM_HOT_EXPERTS"),
            hot_experts_update=envs.get("LVLLM_HOT_EXPERTS_UPDATE"),
            hot_experts_swaps=envs.get("LVLLM_HOT_EXPERTS_SWAPS"),
            hot_experts_decay=envs.get("LVLLM_HOT_EXPERTS_DECAY"),
            lk=LkSettings.from_env(),
        )
