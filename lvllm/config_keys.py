"""Where each MoE family's config.json states what ``lvllm plan`` and ``lvllm doctor`` read: the
experts' count, top-k and width, the layers, which of them are MoE, the experts' activation, as
vLLM's model code for each family reads them."""

from __future__ import annotations


class ConfigError(ValueError):
    """A checkpoint directory or config lvllm cannot plan for; the message names the file."""


def first_set(config: dict, *names: str, default=None):
    """The value of the first of ``names`` the config sets (not None)."""
    for name in names:
        if config.get(name) is not None:
            return config[name]
    return default


# A quantity's config keys, tried in order: the common name, then the families' own, as vLLM's
# model code reads them (ERNIE 4.5 moe_num_experts and moe_k; Gemma 4 top_k_experts and
# expert_intermediate_size; LongCat-Flash moe_topk and expert_ffn_hidden_size; Step-3 moe_top_k;
# HY-V3 expert_hidden_dim, which vLLM reads where transformers reads moe_intermediate_size).
EXPERT_COUNT_KEYS = ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts")
TOP_K_KEYS = ("num_experts_per_tok", "moe_k", "top_k_experts", "moe_topk", "moe_top_k")
EXPERT_WIDTH_KEYS = ("expert_hidden_dim", "moe_intermediate_size", "expert_intermediate_size", "expert_ffn_hidden_size")
# LongCat-Flash: vLLM builds num_layers decoder layers (two attention blocks and one MoE each),
# which transformers' num_hidden_layers counts twice.
LAYER_KEYS = ("num_layers", "num_hidden_layers")
# Every step-th layer, counting from 1, is MoE: Qwen-MoE (but mlp_only_layers), ERNIE 4.5 (from
# moe_layer_start_index to moe_layer_end_index, -1: the last), Llama 4.
MOE_STEP_KEYS = ("decoder_sparse_step", "moe_layer_interval", "interleave_moe_layer_step")
# ERNIE-4.5-VL counts its experts per modality: moe_num_experts, moe_intermediate_size and the
# MODALITY_RANGE_KEYS are lists in this order (ernie45_vl_moe.py:207-310 builds text_experts from their
# first values, vision_experts from their second).
MODALITIES = ("text", "vision")
MODALITY_RANGE_KEYS = ("moe_layer_start_index", "moe_layer_end_index")
# transformers' activation names that vLLM's MoE layers (and lk) call otherwise.
ACTIVATION_NAMES = {"gelu_pytorch_tanh": "gelu_tanh"}


def moe_layer_indices(config: dict, num_layers: int) -> tuple[int, ...]:
    """Decoder layers whose MLP is a MoE block, by each family's config keys."""
    if "mlp_layer_types" in config:   # Laguna, EXAONE-MoE, HY-V3, GLM-4.7-Flash: a kind per layer
        return tuple(i for i, kind in enumerate(config["mlp_layer_types"][:num_layers]) if kind == "sparse")
    if isinstance(config.get("moe_layer_freq"), list):   # MiMo-V2: a flag per layer
        return tuple(i for i, moe in enumerate(config["moe_layer_freq"][:num_layers]) if moe)
    if "moe_layers_enum" in config:   # Step-3: the MoE layers listed, "1,2,3"
        listed = config["moe_layers_enum"]
        return tuple(sorted(i for i in map(int, listed.split(",") if isinstance(listed, str) else listed)
                            if i < num_layers))
    if "num_dense_layers" in config:   # AFMoE, LFM2-MoE: dense first layers
        return tuple(range(int(config["num_dense_layers"]), num_layers))
    if "first_k_dense_replace" in config or "moe_layer_freq" in config:   # DeepSeek
        dense, every = config.get("first_k_dense_replace", 0), config.get("moe_layer_freq", 1)
        return tuple(i for i in range(num_layers) if i >= dense and i % every == 0)
    if any(k in config for k in (*MOE_STEP_KEYS, "mlp_only_layers", "moe_layer_start_index", "moe_layer_end_index")):
        step, dense = first_set(config, *MOE_STEP_KEYS) or 1, set(config.get("mlp_only_layers") or ())
        start, end = config.get("moe_layer_start_index", 0), config.get("moe_layer_end_index", -1)
        # A range per modality: a layer in either has a MoE block (ernie45_vl_moe.py:418-440).
        start, end = (min(start) if isinstance(start, list) else start), (max(end) if isinstance(end, list) else end)
        end = num_layers - 1 if end == -1 else min(end, num_layers - 1)
        return tuple(i for i in range(start, end + 1) if i not in dense and (i + 1) % step == 0)
    return tuple(range(num_layers))


def expert_activation(text: dict) -> str:
    """The experts' activation as vLLM's MoE layer and lk name it (gpt-oss's clamped swiglu: swigluoai)."""
    if text.get("model_type") == "gpt_oss":
        return "swigluoai"
    name = str(first_set(text, "hidden_act", "hidden_activation", default="silu"))
    return ACTIVATION_NAMES.get(name, name)
