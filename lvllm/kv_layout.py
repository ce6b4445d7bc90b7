"""What each decoder layer of a MoE checkpoint keeps in vLLM 0.32's KV cache, read from config.json
for ``lvllm plan``: K and V of every token (MLA: one latent), of the whole sequence or of a window
of it (sliding-window and chunked local attention), or a fixed state per sequence (Mamba-2, short
convolutions, Gated DeltaNet). Where a family's vLLM model code reads these otherwise than the
common keys, WINDOWS and STATES say how (each entry names the file)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from lvllm.config_keys import ConfigError
from lvllm.dense_layout import LEGACY_LAYER_KINDS, layout_of, mla_dims

FULL, SLIDING, CHUNKED, STATE = "full attention", "sliding window", "chunked local attention", "state"


@dataclass(frozen=True)
class CacheLayer:
    """One layer's cache (``count`` such layers): ``kv_heads`` heads of ``head_elements`` (K and V
    together) a token, kept for the last ``window`` tokens (0: all); or, for STATE, a convolution
    state of ``conv_elements`` and a recurrent one of ``ssm_elements`` per sequence, split over
    tensor-parallel ranks as vLLM splits heads."""

    kind: str
    kv_heads: int = 0
    head_elements: int = 0
    window: int = 0
    conv_elements: int = 0
    ssm_elements: int = 0
    count: int = 1


def mamba2_state(text: dict) -> CacheLayer:
    """granitemoehybrid.py -> mamba_mixer2.py, mamba_utils.mamba2_state_shape: the convolution over
    the inner channels and B, C (mamba_d_conv - 1 tokens), one d_head x d_state matrix per head."""
    channels = int(text["mamba_expand"]) * int(text["hidden_size"]) + 2 * int(text["mamba_n_groups"]) * int(
        text["mamba_d_state"])
    return CacheLayer(STATE, conv_elements=(int(text["mamba_d_conv"]) - 1) * channels,
                      ssm_elements=int(text["mamba_n_heads"]) * int(text["mamba_d_head"]) * int(text["mamba_d_state"]))


def short_conv_state(text: dict) -> CacheLayer:
    """lfm2_moe.py -> short_conv.py, mamba_utils.short_conv_state_shape: conv_L_cache - 1 tokens of the
    hidden channels."""
    return CacheLayer(STATE, conv_elements=(int(text["conv_L_cache"]) - 1) * int(text["hidden_size"]))


def gated_delta_net_state(text: dict) -> CacheLayer:
    """qwen3_next.py (Qwen3.5's qwen3_5.py builds the same layer), mamba_utils.gated_delta_net_state_shape:
    the convolution over q, k and v (linear_conv_kernel_dim - 1 tokens), a key x value matrix per value head."""
    keys, values = int(text["linear_num_key_heads"]), int(text["linear_num_value_heads"])
    key_dim, value_dim = int(text["linear_key_head_dim"]), int(text["linear_value_head_dim"])
    return CacheLayer(STATE, conv_elements=(int(text["linear_conv_kernel_dim"]) - 1) * (2 * keys * key_dim
                                                                                      + values * value_dim),
                      ssm_elements=values * value_dim * key_dim)


# model_type -> layer_types kind -> the state that kind of layer keeps.
STATES: dict[str, dict[str, Callable[[dict], CacheLayer]]] = {
    "granitemoehybrid": {"linear_attention": mamba2_state},   # granitemoehybrid.py:322-325
    "lfm2_moe": {"conv": short_conv_state},                   # lfm2_moe.py:343
    "qwen3_next": {"linear_attention": gated_delta_net_state},
    "qwen3_5_moe_text": {"linear_attention": gated_delta_net_state},
}


def layer_kind(text: dict, layer: int) -> str:
    kinds = text.get("layer_types") or ()
    kind = kinds[layer] if layer < len(kinds) else ""
    return LEGACY_LAYER_KINDS.get(kind, kind)


def typed_window(text: dict, layer: int) -> tuple[str, int]:
    """By layer_types, the window config.json's sliding_window (or attention_chunk_size); a model
    without them takes sliding_window on every layer where set (vLLM's cache_config fallback,
    attention.py), unless use_sliding_window is false (transformers clears it then)."""
    kind = layer_kind(text, layer)
    if kind == "sliding_attention":
        return SLIDING, int(text["sliding_window"])
    if kind == "chunked_attention":
        return CHUNKED, int(text["attention_chunk_size"])
    if not kind and text.get("sliding_window") and text.get("use_sliding_window") is not False:
        return SLIDING, int(text["sliding_window"])
    return FULL, 0


def exaone_window(text: dict, layer: int) -> tuple[str, int]:
    """exaone_moe.py:234-246: a window per layer (sliding_windows) where given."""
    if layer_kind(text, layer) == "full_attention":
        return FULL, 0
    windows = text.get("sliding_windows")
    return SLIDING, int(windows[layer] if windows else text["sliding_window"])


def cohere2_window(text: dict, layer: int) -> tuple[str, int]:
    """cohere2_moe.py:207-213: a window one token wider than sliding_window."""
    kind, window = typed_window(text, layer)
    return kind, window + 1 if kind == SLIDING else 0


def mimo_v2_window(text: dict, layer: int) -> tuple[str, int]:
    """mimo_v2.py:298, 375-409: hybrid_layer_pattern 1 layers see sliding_window_size tokens (-1: all)."""
    size = int(text.get("sliding_window_size", -1))
    return (SLIDING, size) if text["hybrid_layer_pattern"][layer] == 1 and size > -1 else (FULL, 0)


def llama4_window(text: dict, layer: int) -> tuple[str, int]:
    """llama4.py: the RoPE layers (no_rope_layers[layer] set) attend within attention_chunk_size."""
    rope = text.get("no_rope_layers") or [1] * (layer + 1)
    chunk = text.get("attention_chunk_size")
    return (CHUNKED, int(chunk)) if chunk and rope[layer] else (FULL, 0)


def step3p5_window(text: dict, layer: int) -> tuple[str, int]:
    """step3p5.py:150-165: sliding layers by layer_types, else every even layer."""
    kinds = text.get("layer_types")
    sliding = kinds[layer] == "sliding_attention" if kinds else layer % 2 == 0
    return (SLIDING, int(text["sliding_window"])) if sliding and text.get("sliding_window") else (FULL, 0)


# model_type -> (config, layer) -> the attention's kind and window, where typed_window's reading is not vLLM's.
WINDOWS: dict[str, Callable[[dict, int], tuple[str, int]]] = {
    "exaone_moe": exaone_window,
    "cohere2_moe": cohere2_window,
    "mimo_v2": mimo_v2_window,
    "llama4_text": llama4_window,
    "step3p5": step3p5_window,
}


def layer_cache(text: dict, layer: int, layout, mla: dict | None, states: dict, window_of) -> CacheLayer:
    state = states.get(layer_kind(text, layer))
    if state:
        return state(text)
    if mla:   # one latent a token, every rank the whole of it
        return CacheLayer(FULL, 1, mla["kv_lora_rank"] + mla["qk_rope_head_dim"])
    heads = layout.heads(text, layer)
    kind, window = window_of(text, layer)
    return CacheLayer(kind, heads.kv_heads, heads.head_dim + heads.v_head_dim, window)


def cache_layers(text: dict, where: str, num_layers: int) -> tuple[CacheLayer, ...]:
    """Every decoder layer's cache as vLLM 0.32 builds it, equal layers counted together."""
    layout, mla, model_type = layout_of(text, where), mla_dims(text), str(text.get("model_type", ""))
    states, window_of = STATES.get(model_type, {}), WINDOWS.get(model_type, typed_window)
    counts: dict[CacheLayer, int] = {}
    for layer in range(num_layers):
        try:
            found = layer_cache(text, layer, layout, mla, states, window_of)
        except KeyError as missing:
            raise ConfigError(f"{where}: {model_type} layer {layer} ({layer_kind(text, layer) or 'attention'}) "
                              f"needs {missing} in the config") from None
        counts[found] = counts.get(found, 0) + layout.blocks
    return tuple(replace(layer, count=count) for layer, count in counts.items())


def layer_bytes(layer: CacheLayer, tokens: int, dtype_bytes: int, state_bytes: int, tp: int = 1) -> int:
    """What one such layer keeps of a sequence of ``tokens`` on each of ``tp`` ranks: K and V in the
    model dtype (a KV head split by fewer ranks is replicated), a state's recurrent part in
    ``state_bytes`` a value."""
    if layer.kind == STATE:
        return (layer.conv_elements * dtype_bytes + layer.ssm_elements * state_bytes) // tp
    kept = min(tokens, layer.window) if layer.window else tokens
    return kept * -(-layer.kv_heads // tp) * layer.head_elements * dtype_bytes


def sequence_bytes(layers: tuple[CacheLayer, ...], tokens: int, dtype_bytes: int, state_bytes: int,
                   tp: int = 1) -> int:
    """What one sequence of ``tokens`` keeps in every layer, per rank (layer_bytes)."""
    return sum(layer.count * layer_bytes(layer, tokens, dtype_bytes, state_bytes, tp) for layer in layers)
