"""Installing lvllm into a vLLM process, and what it reports back.

``install`` puts lvllm's mixins (moe_layer.py) in front of vLLM's MoE layer classes:
``LkExperts`` before ``RoutedExperts`` and every subclass of it (gpt-oss's, DBRX's, the
Transformers backend's, any a later vLLM adds), ``LkRunner`` before ``MoERunner`` and its
subclasses. vLLM's ``register_oot`` looks classes up by name, so each class gets a variant
of its own under its own name; classes imported later (a model's module is imported when
the model is built) are found when the model's first submodule is assigned, before any MoE
layer exists. It also wraps dense-layer weight processing on the CPU build (dense.py).
"""

from __future__ import annotations

import torch
from vllm.model_executor.custom_op import op_registry_oot
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner
from vllm.model_executor.models.utils import extract_layer_index
from vllm.platforms import current_platform

from lvllm.lk import native_ops
from lvllm.placement import Placement
from lvllm.settings import Settings
from lvllm.vllm import compile_options, cpu_step, dense, inductor_openmp, native_attention, routing_stats
from lvllm.vllm.hot_updates import HotUpdater
from lvllm.vllm.installation import Installation, num_model_layers
from lvllm.vllm.moe_layer import LkExperts, LkMoEMethod, LkRunner

_MIXINS = ((RoutedExperts, LkExperts), (MoERunner, LkRunner))


class Variants:
    """lk's variant of each RoutedExperts / MoERunner class, registered under its name."""

    def __init__(self):
        self.variants: dict[type, type] = {}   # vLLM's class -> its variant
        self.ambiguous: set[str] = set()       # names two classes share: left unregistered
        self._seen = 0

    def register_new(self) -> None:
        classes = [cls for base, mixin in _MIXINS for cls in (base, *_subclasses(base))
                   if not issubclass(cls, mixin)]
        if len(classes) == self._seen:
            return
        self._seen = len(classes)
        for cls in classes:
            if cls in self.variants or cls.__name__ in self.ambiguous:
                continue
            mixin = next(m for base, m in _MIXINS if issubclass(cls, base))
            taken = op_registry_oot.get(cls.__name__)
            if taken is not None and taken.__bases__ == (mixin, cls):
                self.variants[cls] = taken   # made by an earlier installation in this process
                continue
            if taken is not None:
                if not issubclass(taken, mixin):
                    raise RuntimeError(
                        f"another vLLM plugin already replaced {cls.__name__} ({taken}); lvllm "
                        "cannot put MoE experts on lk alongside it. Disable one of them "
                        "(VLLM_PLUGINS lists the plugins to load) or set LVLLM_MOE_NUMA_ENABLED=0.")
                # Two classes of one name: vLLM would build either as the other's variant.
                del op_registry_oot[cls.__name__]
                self.ambiguous.add(cls.__name__)
                continue
            variant = type(cls.__name__, (mixin, cls), {"__module__": __name__,
                                                        "__qualname__": f"Lk[{cls.__qualname__}]"})
            cls.register_oot(variant)
            self.variants[cls] = variant


def _subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


def install(settings: Settings) -> Installation:
    """Put lvllm's mixins in front of vLLM's MoE classes in this process (once: a second
    call keeps the first installation, as vLLM may load plugins more than once)."""
    current = installation()
    if current is not None:
        return current
    installation_ = Installation(settings)
    if Installation.current is not None:   # one unregistered since (tests do)
        uninstall()
    Installation.current = installation_
    installation_.variants = Variants()
    installation_.variants.register_new()
    dense.install(installation_)
    compile_options.install(installation_)
    native_attention.install(installation_)
    cpu_step.install(installation_)
    inductor_openmp.install(installation_)
    if current_platform.is_cpu() and settings.native_lk_ops:
        reason = native_ops.install()
        installation_.log_once("native_lk_ops", "lvllm: lk's ops %s",
                               f"keep their Python kernels: {reason}" if reason
                               else "run through C++ kernels (LVLLM_CPU_NATIVE_LK_OPS=1)")
    installation_.refusal_hook = torch.nn.modules.module.register_module_module_registration_hook(
        watch_model_modules)
    return installation_


def uninstall() -> None:
    """Undo install in this process (tests): vLLM builds its own classes again."""
    for name, cls in list(op_registry_oot.items()):
        if isinstance(cls, type) and issubclass(cls, (LkExperts, LkRunner)):
            del op_registry_oot[name]
    dense.uninstall()
    routing_stats.remove_worker_hooks()
    compile_options.uninstall()
    native_attention.uninstall()
    cpu_step.uninstall()
    inductor_openmp.uninstall()
    native_ops.uninstall()
    if Installation.current is not None and Installation.current.refusal_hook is not None:
        Installation.current.refusal_hook.remove()
    Installation.current = None


def installation() -> Installation | None:
    """This process's installation (None when lvllm is not installed)."""
    registered = op_registry_oot.get("RoutedExperts")
    return Installation.current if registered is not None and issubclass(registered, LkExperts) else None


def placement() -> Placement | None:
    """This process's placement record (None when lvllm is not installed)."""
    current = installation()
    return current.placement if current is not None else None


def watch_model_modules(parent: torch.nn.Module, name: str, module: torch.nn.Module):
    """Called by torch for every submodule assigned while lvllm is installed: registers the
    variants of MoE classes imported since, and refuses an lk layer whose experts escaped
    them (a class of an ambiguous name, or one imported while the model was being built)."""
    current = installation()
    if current is None:
        return None
    current.variants.register_new()
    if not isinstance(module, RoutedExperts) or isinstance(module, LkExperts):
        return None
    layer_name, cls = module.layer_name, type(module)
    escaped = (f"the model builds them with {cls.__module__}.{cls.__qualname__}, which lvllm could "
               "not take over: its name is shared by another class, or it was defined after the "
               "model started building")
    current.placement_for_model_being_built().place(extract_layer_index(layer_name), layer_name,
                                                    num_model_layers(), lk_problems=lambda: [escaped])
    return None


def lk_report(model: torch.nn.Module) -> dict:
    """Where each MoE layer of a loaded model runs, and what lk has computed so far.

    Picklable by reference, so it can run inside vLLM's workers:
    ``LLM.apply_model(lvllm.vllm.lk_report)`` (needs VLLM_ALLOW_INSECURE_SERIALIZATION=1
    with multiprocess workers).
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
                "bias_from_checkpoint": method.bias_from_checkpoint,
                "forward_calls": engine.forward_calls,
                "nbytes": engine.nbytes,
                "num_experts": engine.num_experts,
                "hot_experts": method.experts.hot.experts if method.experts.hot else None,
                "params": params,
            }
        else:
            device_layers[name] = {"method": type(method).__name__, "params": params}
    current = installation()
    draft = current.draft_placement if current else None
    updater = HotUpdater.of(current) if current else None
    return {"lk_layers": lk_layers, "device_layers": device_layers,
            "hot_swaps": updater.swaps if updater is not None else None,
            "dense_layers": dense.dense_report(model),
            "compile_wrapper": current.compile_wrapper if current else None,
            "attention_calls": native_attention.calls(),
            "native_lk_op_calls": native_ops.calls(),
            "step_shortcuts": cpu_step.counts(),
            "summary": current.placement.summary if current else None,
            "draft": None if draft is None else {"lk_layers": dict(draft.lk_layers),
                                                 "device_layers": dict(draft.device_layers),
                                                 "summary": draft.summary}}
