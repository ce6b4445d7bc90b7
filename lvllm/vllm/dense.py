"""vLLM's unquantized dense linear layers on lk's kernels, in vLLM's CPU build.

vLLM 0.32's CPU build multiplies a dense layer with oneDNN (or its small-GEMM kernel) where it
can build one for the weight's dtype; where it cannot, as for bf16 on CPUs without AVX-512
BF16, it keeps the weight and calls torch's ``F.linear``, which is several times slower than
lk's kernels (BENCHMARKS.md, "Dense layers"). ``LVLLM_DENSE_ON_LK`` decides which layers lk
takes: AUTO those vLLM left to ``F.linear``, ON every unquantized float layer, OFF none;
``LVLLM_ROUTERS_ON_LK`` adds the MoE routers (``GateLinear``), kept in their dtype, unless OFF:
at one token lk multiplies a router of a few KB faster than vLLM's kernel (docs/cpu-build.md).

The hook wraps the ``process_weights_after_loading`` of ``UnquantizedLinearMethod`` and of
``UnquantizedEmbeddingMethod`` (LM heads): vLLM's decision
runs first (AUTO), then lk copies the weight into a ``LinearEngine``, points the layer's
``cpu_linear`` (what vLLM's CPU ``apply`` calls) at ``torch.ops.lvllm.lk_linear`` and frees
vLLM's weight, as vLLM's own packed paths do.
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.fused_moe.router.gate_linear import GateLinear
from vllm.model_executor.layers.linear import UnquantizedLinearMethod
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, UnquantizedEmbeddingMethod
from vllm.platforms import current_platform

from lvllm import formats
from lvllm.envs import EnvError
from lvllm.vllm.installation import Installation

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def install(installation: Installation) -> None:
    """Wrap vLLM's dense-layer and LM-head weight processing (CPU build only); the newest
    installation's settings decide, and OFF leaves vLLM's own in place."""
    vllm_linear, vllm_embedding = uninstall()
    if not current_platform.is_cpu():
        if installation.settings.dense_weight_mode != "TO_DTYPE":
            raise EnvError(f"LVLLM_DENSE_USE_WEIGHT={installation.settings.dense_weight_mode} quantizes dense "
                           "layers for lk on vLLM's CPU build; with a GPU vLLM keeps them on the device: "
                           "unset it or set TO_DTYPE")
        return
    if installation.settings.dense_on_lk == "OFF":
        return

    def process_linear(method, layer: torch.nn.Module) -> None:
        _process(installation, vllm_linear, method, layer)

    def process_embedding(method, layer: torch.nn.Module) -> None:
        # An LM head only: an input embedding is read by lookups, not multiplied. A head tied
        # to the embedding that lk takes leaves the embedding's own reference to the weight alone.
        if isinstance(layer, ParallelLMHead):
            _process(installation, vllm_embedding, method, layer)
        else:
            vllm_embedding(method, layer)

    process_linear.lvllm_wraps = vllm_linear
    process_embedding.lvllm_wraps = vllm_embedding
    UnquantizedLinearMethod.process_weights_after_loading = process_linear
    UnquantizedEmbeddingMethod.process_weights_after_loading = process_embedding


def uninstall():
    """vLLM's own weight processing back in place; returns (linear's, embedding's)."""
    vllm_linear = _unwrapped(UnquantizedLinearMethod.process_weights_after_loading)
    vllm_embedding = _unwrapped(UnquantizedEmbeddingMethod.process_weights_after_loading)
    UnquantizedLinearMethod.process_weights_after_loading = vllm_linear
    UnquantizedEmbeddingMethod.process_weights_after_loading = vllm_embedding
    return vllm_linear, vllm_embedding


def _unwrapped(method):
    return getattr(method, "lvllm_wraps", method)


def _process(installation: Installation, vllm_process, method, layer: torch.nn.Module) -> None:
    settings = installation.settings
    router = isinstance(layer, GateLinear)
    if router and settings.routers_on_lk and _lk_can_take(layer):
        _move_to_lk(installation, layer, None, "LVLLM_ROUTERS_ON_LK=1: MoE routers")
        return
    quantized = settings.dense_weight_mode != "TO_DTYPE" and not router
    if quantized and _lk_can_take(layer):
        _move_to_lk(installation, layer, settings.dense_weight_mode.lower(),
                    f"LVLLM_DENSE_USE_WEIGHT={settings.dense_weight_mode}")
        return
    if settings.dense_on_lk == "ON" and _lk_can_take(layer):
        _move_to_lk(installation, layer, None, "LVLLM_DENSE_ON_LK=ON")
        return
    vllm_process(method, layer)
    if settings.dense_on_lk == "AUTO" and _lk_can_take(layer) and _vllm_calls_torch_linear(layer):
        _move_to_lk(installation, layer, None,
                    "LVLLM_DENSE_ON_LK=AUTO: vLLM's CPU build has no kernel of its own for them here")


def _vllm_calls_torch_linear(layer: torch.nn.Module) -> bool:
    """Whether vLLM's CPU dispatch left the layer to torch's F.linear (its fallback where it
    could build no kernel of its own for the weight)."""
    call = getattr(layer, "cpu_linear", None)
    if call is torch.nn.functional.linear:
        return True
    names = getattr(getattr(call, "__code__", None), "co_names", ())
    return "functional" in names and "linear" in names


def _lk_can_take(layer: torch.nn.Module) -> bool:
    weight = getattr(layer, "weight", None)
    return (isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.numel() > 0
            and weight.device.type == "cpu" and weight.dtype in _FLOAT_DTYPES
            # MLA's kv_b_proj: vLLM reads its weight elsewhere and keeps F.linear on purpose.
            and not getattr(layer, "_cpu_skip_gemm_dispatch", False))


def _move_to_lk(installation: Installation, layer: torch.nn.Module, weight_format: str | None, why: str) -> None:
    """Hands the layer's weight to an lk engine in ``weight_format`` (None: as it is)."""
    from lvllm.lk.linear import LinearEngine

    installation.lk_runtime()
    weight = layer.weight
    engine = LinearEngine(weight.data.contiguous(), weight_format, installation.settings.dense_group_size)
    layer.lk_linear = engine
    engine_id, outputs = engine.engine_id, engine.outputs
    layer.cpu_linear = lambda x, _weight, bias: torch.ops.lvllm.lk_linear(x, bias, engine_id, outputs)
    layer.weight = torch.nn.Parameter(torch.empty(0, dtype=weight.dtype), requires_grad=False)
    dtype = formats.FLOAT_FORMAT_OF_DTYPE[weight.dtype]
    held = "as they are" if weight_format is None else f"as {engine.describe()}"
    installation.log_once(f"dense {held}", "lvllm: vLLM's unquantized dense layers in %s run on lk %s (%s)",
                          formats.describe(dtype, 0), held, why)


def dense_report(model: torch.nn.Module) -> dict:
    """The model's dense layers (and LM head) by who multiplies them: ``lk`` (per layer
    name, forwards run, bytes, format and number of weights held) and ``torch_linear``
    (names of those lk could take that vLLM left to torch's F.linear)."""
    lk, torch_linear = {}, []
    for name, module in model.named_modules():
        if hasattr(module, "lk_linear"):
            engine = module.lk_linear
            lk[name] = {"forward_calls": engine.forward_calls, "nbytes": engine.nbytes, "format": engine.describe(),
                        "weights": engine.outputs * engine.inputs}
            continue
        method = getattr(module, "quant_method", None)
        takeable = isinstance(method, UnquantizedLinearMethod) or isinstance(module, ParallelLMHead)
        if takeable and _lk_can_take(module) and _vllm_calls_torch_linear(module):
            torch_linear.append(name)
    return {"lk": lk, "torch_linear": torch_linear}
