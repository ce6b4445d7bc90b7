"""One MoE layer of a checkpoint built and loaded as ``vllm serve`` would, without a server:
vLLM's config of the model (its quantization config included), vLLM's FusedMoE with lvllm's
classes installed, vLLM's own weight loading, and lvllm's conversion to lk. ``lvllm doctor``
checks what comes out."""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from dataclasses import replace

from lvllm.config_keys import ConfigError
from lvllm.settings import Settings


@contextmanager
def model_context(model: str, dtype: str, settings: Settings, trust_remote_code: bool = False):
    """vLLM's config of ``model`` made current in a one-rank process, with lvllm installed under
    ``settings``; yields (vllm_config, installation). ``trust_remote_code``: as vllm serve's."""
    from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state
    from vllm.utils.torch_utils import set_default_torch_dtype

    from lvllm.vllm.hooks import install
    from lvllm.vllm.installation import Installation

    settings = replace(settings, enabled=True)
    install(settings)
    # A fresh record per call: a process that checks several times (tests) keeps its settings apart.
    installation = Installation(settings)
    installation.refusal_hook = Installation.current.refusal_hook
    installation.variants = Installation.current.variants
    Installation.current = installation
    try:
        model_config = ModelConfig(model=model, dtype=dtype, trust_remote_code=trust_remote_code)
    except ValueError as refusal:   # pydantic's ValidationError: vLLM cannot inspect or build the architecture
        reasons = [entry["msg"] for entry in getattr(refusal, "errors", lambda: [])()] or [str(refusal)]
        raise ConfigError(f"{model}: vLLM's ModelConfig refuses it here: {'; '.join(reasons)}") from None
    vllm_config = VllmConfig(model_config=model_config)
    with set_current_vllm_config(vllm_config), set_default_torch_dtype(vllm_config.model_config.dtype):
        if not parallel_state.model_parallel_is_initialized():
            parallel_state.init_distributed_environment(
                world_size=1, rank=0, local_rank=0, backend="gloo",
                distributed_init_method=f"file://{tempfile.mkdtemp()}/rendezvous")
            parallel_state.initialize_model_parallel(1, 1)
        yield vllm_config, installation


def experts_per_token(vllm_config) -> int:
    """Top-k as vLLM's model builds its MoE layers: ModelConfig's reading, which takes no moe_k
    (model_arch_config_convertor.py:208-219) and so gives 0 for ERNIE-4.5-VL's config where no alias
    maps it, else the moe_k its model reads (ernie45_vl_moe.py:267)."""
    model_config = vllm_config.model_config
    return model_config.get_num_experts_per_tok() or int(getattr(model_config.hf_text_config, "moe_k", 0))


def runner_weights(layer, tensors):
    """(name under the runner, tensor) of ``layer``'s experts as the family's vLLM loader hands
    them to the runner: a tensor per expert by its name, numbered from 0 in its set (ERNIE-4.5-VL's
    load_weights renumbers its vision experts so); fused, vLLM's own reading: gate and up
    as experts.gate_up_proj and down as experts.down_proj, which the runner splits and orients
    (granitemoe.py's names; llama4.py's transpose is the runner's is_fused_checkpoint_transposed),
    or a stack per projection expert by expert (step3_text.py)."""
    fused = layer.fused
    if fused is None:
        start = len(layer.checkpoint_prefix) + 1
        return ((f"{layer.stored_expert(name)}.{name[start:].split('.', 1)[1]}", tensors.get(name))
                for name in layer.tensor_names(tensors))
    stored = {name: tensors.get(f"{layer.decoder}.{name}") for name in fused.tensors}
    if fused.gate_up:
        return [("gate_up_proj", stored[fused.gate_up]), ("down_proj", stored[fused.down])]
    return ((f"{e}.{projection}.weight", stack[e]) for projection, stack in
            (("gate_proj", stored[fused.gate]), ("up_proj", stored[fused.up]), ("down_proj", stored[fused.down]))
            for e in range(layer.experts))


def load_layer(vllm_config, layer, tensors):
    """Build ``layer`` (lvllm.reference.ExpertLayer) with vLLM's FusedMoE and fill it from the
    checkpoint's ``tensors`` through vLLM's loader (gpt-oss's: its model's own); returns its lk
    method (LkMoEMethod, whose ``experts`` lk now holds)."""
    build = _gpt_oss_layer if vllm_config.model_config.hf_text_config.model_type == "gpt_oss" else _moe_layer
    routed = build(vllm_config, layer, tensors)
    method = routed.quant_method
    if method.experts is None:
        method.process_weights_after_loading(routed)
    # vLLM's forward context would keep every layer built so far, and its memory, alive.
    vllm_config.compilation_config.static_forward_context.pop(layer.prefix, None)
    return method


def _routed_experts(runner, layer):
    """The runner's RoutedExperts, which lk must have taken."""
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    from lvllm.vllm.moe_layer import LkMoEMethod

    routed = next(m for m in runner.modules() if isinstance(m, RoutedExperts))
    if not isinstance(routed.quant_method, LkMoEMethod):
        raise RuntimeError(f"{layer.prefix}: vLLM kept its own {type(routed.quant_method).__name__}; "
                           "lk did not take the layer")
    return routed


def _moe_layer(vllm_config, layer, tensors):
    """The layer built as the family's vLLM model builds it, filled by RoutedExperts.load_weights."""
    from vllm.model_executor.layers.fused_moe.layer import FusedMoEFactory

    from lvllm.config_keys import MODALITIES, expert_activation

    config = vllm_config.model_config.hf_text_config
    gate, up, down = layer.names or ("gate_proj", "up_proj", "down_proj")
    width = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    if isinstance(width, list):   # per modality (ERNIE-4.5-VL): the set's, as vLLM's model builds it
        width = width[MODALITIES.index(layer.modality)]
    runner = FusedMoEFactory(
        num_experts=layer.experts, top_k=experts_per_token(vllm_config),
        hidden_size=config.hidden_size, intermediate_size=width,
        quant_config=vllm_config.quant_config, prefix=layer.prefix, ckpt_names=(gate, down, up),
        activation=expert_activation(config.to_dict()),
        is_fused_checkpoint_transposed=bool(layer.fused and layer.fused.inputs_first))
    routed = _routed_experts(runner, layer)
    weights = runner_weights(layer, tensors)
    if vllm_config.quant_config is not None:   # as the model's loader maps them (GPTQ drops g_idx)
        weights = vllm_config.quant_config.get_checkpoint_weight_mapper().apply(weights)
    for _ in routed.load_weights(weights):
        pass
    return routed


def _gpt_oss_layer(vllm_config, layer, tensors):
    """gpt-oss's MLP block (vLLM's MLPBlock: its GptOssRoutedExperts, biases, swigluoai) filled by
    vLLM's GptOssModel.load_weights from the checkpoint's tensors, renamed by GptOssForCausalLM's
    mapper: that loader, not the runner's, reads gpt-oss's fused layout (float experts transposed and
    copied in, MXFP4 blocks through the runner's weight_loader)."""
    from torch import nn
    from vllm.model_executor.models.gpt_oss import GptOssForCausalLM, GptOssModel, MLPBlock

    class DecoderLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = MLPBlock(vllm_config, layer.index, prefix=f"{layer.decoder}.mlp")

    class LayerAlone(GptOssModel):
        """GptOssModel's loader over this one decoder layer's MLP block (its __init__ would build the model)."""

        def __init__(self):
            nn.Module.__init__(self)
            self.config = vllm_config.model_config.hf_config
            self.parallel_config = vllm_config.parallel_config
            self.layers = nn.ModuleDict({str(layer.index): DecoderLayer()})

    model = LayerAlone()
    routed = _routed_experts(model.layers[str(layer.index)].mlp.experts, layer)
    root = layer.decoder[:-len(f"layers.{layer.index}")]   # "model.": GptOssForCausalLM's child
    stored = ((name, tensors.get(name)) for name in layer.tensor_names(tensors))
    model.load_weights((name.removeprefix(root), tensor)
                       for name, tensor in GptOssForCausalLM.hf_to_vllm_mapper.apply(stored))
    return routed
