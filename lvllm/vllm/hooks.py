"""Installing lvllm into a vLLM process, and what it reports back.

``install`` registers ``LkRoutedExperts`` and ``LkMoERunner`` in place of vLLM's classes
(``register_oot``: instantiated for every model), wraps dense-layer weight processing on the
CPU build (lvllm.vllm.dense) and watches for models that bring their own experts class.
"""

from __future__ import annotations

import torch
from vllm.model_executor.custom_op import op_registry_oot
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner
from vllm.model_executor.models.utils import extract_layer_index

from lvllm.placement import RESIDENT_VAR, Placement, UnsupportedLayer
from lvllm.settings import Settings
from lvllm.vllm import dense
from lvllm.vllm.installation import Installation, num_model_layers
from lvllm.vllm.moe_layer import LkMoEMethod, LkMoERunner, LkRoutedExperts

_CLASSES = {"RoutedExperts": (RoutedExperts, LkRoutedExperts), "MoERunner": (MoERunner, LkMoERunner)}


def install(settings: Settings) -> Installation:
    """Swap vLLM's MoE classes for lvllm's in this process (once: a second call keeps the
    first installation, as vLLM may load plugins more than once)."""
    if op_registry_oot.get("RoutedExperts") is LkRoutedExperts:
        return LkRoutedExperts.installation
    for name in _CLASSES:
        if name in op_registry_oot:
            raise RuntimeError(
                f"another vLLM plugin already replaced {name} ({op_registry_oot[name]}); "
                "lvllm cannot put MoE experts on lk alongside it. Disable one of them "
                "(VLLM_PLUGINS lists the plugins to load) or set LVLLM_MOE_NUMA_ENABLED=0."
            )
    installation = Installation(settings)
    if LkRoutedExperts.installation is not None:   # one unregistered since (tests do)
        LkRoutedExperts.installation.refusal_hook.remove()
    LkRoutedExperts.installation = installation
    for vllm_class, ours in _CLASSES.values():
        vllm_class.register_oot(ours)
    dense.install(installation)
    installation.refusal_hook = torch.nn.modules.module.register_module_module_registration_hook(
        refuse_model_own_experts)
    return installation


def installation() -> Installation | None:
    """This process's installation (None when lvllm is not installed)."""
    return LkRoutedExperts.installation if op_registry_oot.get("RoutedExperts") is LkRoutedExperts else None


def placement() -> Placement | None:
    """This process's placement record (None when lvllm is not installed)."""
    current = installation()
    return current.placement if current is not None else None


def refuse_model_own_experts(parent: torch.nn.Module, name: str, module: torch.nn.Module):
    """Refuse, as the model is built, an lk layer whose experts are a model's own class.

    ``register_oot`` swaps ``RoutedExperts`` by class name, so a model that brings its own
    subclass (gpt-oss, DBRX, vLLM's Transformers backend) keeps vLLM's experts, which would
    quietly fill the device with weights the user asked to keep in host memory. Called by
    torch for every submodule assigned while lvllm is installed.
    """
    current = installation()
    if current is None or not isinstance(module, RoutedExperts) or isinstance(module, LkRoutedExperts):
        return None
    layer_name = module.layer_name
    if current.placement.place(extract_layer_index(layer_name), layer_name, num_model_layers()).on_lk:
        cls = type(module)
        raise UnsupportedLayer(
            f"{layer_name}: this model builds its routed experts with its own class "
            f"{cls.__module__}.{cls.__qualname__}, which lvllm does not replace, so lk cannot "
            f"take them. Keep the layer on the device by listing its index in {RESIDENT_VAR}, "
            "or set LVLLM_MOE_NUMA_ENABLED=0."
        )
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
                "forward_calls": engine.forward_calls,
                "nbytes": engine.nbytes,
                "params": params,
            }
        else:
            device_layers[name] = {"method": type(method).__name__, "params": params}
    current = placement()
    return {"lk_layers": lk_layers, "device_layers": device_layers,
            "dense_layers": dense.dense_report(model),
            "summary": current.summary if current else None}
