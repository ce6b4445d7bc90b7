"""vLLM's CPU attention ops run from C++ (LVLLM_CPU_NATIVE_ATTENTION, lk on, CPU build).

A compiled decode step calls vLLM's KV cache update and attention ops twice a layer, and each
call runs vLLM's Python: the forward context, the layer, its cache and its metadata looked up,
the cache re-viewed, then vLLM's C++ kernel (#72: 51-62 us an op around 21 us of kernel).
lvllm/_torch_ops*.so (csrc/vllm_cpu) keeps what those lookups find in a table, each layer's
cache views and constants after the cache is allocated, each attention group's metadata at the
start of a step, and registers kernels over vLLM's ops that call vLLM's own C++ kernels from
it. A layer the table does not hold, or a forward outside a step (vLLM's warm-up and dummy
runs, a draft model's), goes to vLLM's Python, registered again under lvllm_cpu's namespace.
"""

from __future__ import annotations

import functools
import weakref

import torch
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import attention as vllm_attention
from vllm.platforms import current_platform
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl, CPUAttentionMetadata
from vllm.v1.worker.cpu_model_runner import CPUModelRunner

from lvllm import torch_library
from lvllm.vllm import compile_options
from lvllm.vllm.compile_options import LAYER_NAME_VARIABLE
from lvllm.vllm.installation import Installation

_VLLM_OPS = ("unified_attention_with_output", "unified_kv_cache_update")
_FALLBACK_NAMESPACE = "lvllm_cpu"


def install(installation: Installation) -> None:
    """Wrap the CPU model runner's KV cache allocation (the table is built after it) and its
    model forward (the step's metadata around it); the newest installation decides."""
    uninstall()
    if not (current_platform.is_cpu() and installation.settings.native_attention):
        return
    compile_options.use_string_layer_names()
    vllm_init_cache, vllm_forward = CPUModelRunner.initialize_kv_cache, CPUModelRunner._model_forward

    def initialize_kv_cache(runner, *args, **kwargs):
        vllm_init_cache(runner, *args, **kwargs)
        runner.lvllm_attention = AttentionTable.for_runner(runner, installation)

    def model_forward(runner, *args, **kwargs):
        table = getattr(runner, "lvllm_attention", None)
        if table is None:
            return vllm_forward(runner, *args, **kwargs)
        table.begin_step()
        try:
            return vllm_forward(runner, *args, **kwargs)
        finally:
            table.native.end_step()

    initialize_kv_cache.lvllm_wraps = vllm_init_cache
    model_forward.lvllm_wraps = vllm_forward
    CPUModelRunner.initialize_kv_cache = initialize_kv_cache
    CPUModelRunner._model_forward = model_forward


def uninstall() -> None:
    """vLLM's own runner methods back in place (one CPUModelRunner inherits: deleted)."""
    for name in ("initialize_kv_cache", "_model_forward"):
        method = CPUModelRunner.__dict__.get(name)
        if not hasattr(method, "lvllm_wraps"):
            continue
        if method.lvllm_wraps is getattr(super(CPUModelRunner, CPUModelRunner), name, None):
            delattr(CPUModelRunner, name)
        else:
            setattr(CPUModelRunner, name, method.lvllm_wraps)


class AttentionTable:
    """One model runner's table: the layers it holds, one representative layer a group (whose
    metadata and slot mapping every layer of the group shares), and the C++ table."""

    # The table whose kernels are installed, weakly: the runner owns it, and with it the KV cache
    # its views keep alive; when the runner goes, its kernels go and vLLM's Python is back.
    _installed: weakref.ref | None = None

    @classmethod
    def installed(cls) -> "AttentionTable | None":
        return None if cls._installed is None else cls._installed()

    def __init__(self, native, representatives: list[str]):
        self.native = native
        self.representatives = representatives

    @classmethod
    def for_runner(cls, runner, installation: Installation) -> "AttentionTable | None":
        """The table of the runner's attention layers vLLM's CPU attention serves plainly,
        installed over vLLM's ops; None (vLLM's Python throughout) where it cannot be or would
        hold no layer."""
        reason = _unavailable()
        if reason:
            installation.log_once("native_attention", "lvllm: vLLM's attention ops keep their Python: %s",
                                  reason)
            return None
        layers = runner.vllm_config.compilation_config.static_forward_context
        native = torch.classes.lvllm_cpu.AttentionTable()
        representatives, served = [], 0
        for attention_groups in runner.attn_groups:
            for group in attention_groups:
                names = [name for name in group.layer_names if _served(layers.get(name))]
                for name in names:
                    _add_layer(native, name, layers[name], len(representatives))
                if names:
                    representatives.append(names[0])
                served += len(names)
        if not representatives:
            return None
        previous = cls.installed()
        if previous is not None:
            previous.native.uninstall()
        with torch_library.overriding_kernels():
            native.install(*(f"vllm::{op}" for op in _VLLM_OPS), *_fallbacks())
        table = cls(native, representatives)
        cls._installed = weakref.ref(table)
        installation.log_once("native_attention", "lvllm: vLLM's attention ops from C++ on %d of %d "
                              "attention layers (LVLLM_CPU_NATIVE_ATTENTION=1)", served,
                              sum(isinstance(layer, vllm_attention.Attention) for layer in layers.values()))
        return table

    def begin_step(self) -> None:
        """Each group's metadata of the forward context, where it is the plain metadata the
        table's kernels take; a group left out runs vLLM's Python this step."""
        context = get_forward_context()
        metadata, slot_mapping = context.attn_metadata, context.slot_mapping
        if not (isinstance(metadata, dict) and isinstance(slot_mapping, dict)):
            return
        for group, layer in enumerate(self.representatives):
            step = metadata.get(layer)
            slots = slot_mapping.get(layer)
            if (type(step) is CPUAttentionMetadata and slots is not None and step.dynamic_causal is None
                    and step.encoder_cache is None and step.scheduler_metadata is not None):
                self.native.begin_step(group, step.num_actual_tokens, step.query_start_loc, step.seq_lens,
                                       step.block_table, step.scheduler_metadata, bool(step.causal), slots)

    def calls(self) -> dict[str, int]:
        native, vllm = self.native.calls()
        return {"native": native, "vllm": vllm}


def _served(layer) -> bool:
    """A decoder layer of vLLM's CPU attention with its own bf16/fp16/fp32 cache and none of
    the features the table does not carry."""
    if not isinstance(layer, vllm_attention.Attention) or type(layer.impl) is not CPUAttentionBackendImpl:
        return False
    impl = layer.impl
    return (impl.attn_type == AttentionType.DECODER and impl.kv_sharing_target_layer_name is None
            and impl.sinks is None and impl.alibi_slopes is None and impl.kv_cache_dtype == "auto"
            and layer.query_quant is None and not layer.attn_backend.forward_includes_kv_cache_update
            and layer.kv_cache.dim() == 4)


def _add_layer(native, name: str, layer, group: int) -> None:
    impl = layer.impl
    # vLLM's CPU cache: [blocks, KV heads, block size, 2 x head size], K then V in each row.
    blocks, kv_heads, block_size, _ = layer.kv_cache.shape
    key_cache, value_cache = layer.kv_cache.view(blocks, kv_heads, block_size * 2, -1).chunk(2, dim=2)
    native.add_layer(name, key_cache, value_cache, impl.scale, float(impl.logits_soft_cap),
                     impl.sliding_window, layer.isa, layer._k_scale_float, layer._v_scale_float, group)


def _unavailable() -> str | None:
    """Why the table cannot run in this process, or None."""
    schema = str(torch.ops.vllm.unified_attention_with_output.default._schema)
    if "str layer_name" not in schema:
        return (f"this process's vLLM names layers with opaque objects ({LAYER_NAME_VARIABLE} was read "
                f"before lvllm loaded); set {LAYER_NAME_VARIABLE}=0 before the process starts, or "
                "LVLLM_CPU_NATIVE_ATTENTION=0")
    if not torch_library.loaded():
        return torch_library.MISSING
    return None


@functools.cache
def _fallbacks() -> tuple[str, str]:
    """vLLM's Python implementations of its two ops, under lvllm_cpu's namespace with vLLM's
    schemas, for the calls the table hands back."""
    library = torch.library.Library(_FALLBACK_NAMESPACE, "FRAGMENT")
    names = []
    for op in _VLLM_OPS:
        schema = str(getattr(torch.ops.vllm, op).default._schema).split("::", 1)[1]
        library.define(schema)
        library.impl(op, getattr(vllm_attention, op), "CPU")
        names.append(f"{_FALLBACK_NAMESPACE}::{op}")
    _fallbacks.library = library   # registrations last as long as the Library object
    return tuple(names)


def calls() -> dict[str, int] | None:
    """The installed table's calls so far (run from C++, handed to vLLM's Python); None
    without a table."""
    table = AttentionTable.installed()
    return None if table is None else table.calls()
