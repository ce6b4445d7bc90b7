"""The weight matrices outside a MoE checkpoint's routed experts as vLLM 0.32 builds them, read from
config.json for ``lvllm plan``: each decoder layer's token mixer (attention, MLA, Step-3's attention,
a Mamba-2 or short-convolution layer) and dense MLPs, the MoE layers' shared experts and routers,
the LM head and the embedding. Norms, biases and other vectors are left out. Where a family's vLLM
model code reads these otherwise than the common keys, LAYOUTS says how (each entry names the file)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

from lvllm.config_keys import ConfigError, first_set

# A shared expert's width where the config gives it whole, and the count of expert-wide shared
# experts where it gives that instead (DeepSeek n_, ERNIE and Aria moe_num_, Ling, AFMoE, EXAONE,
# HY-V3 and Cohere2 num_shared_experts), each as wide as moe_shared_expert_intermediate_size
# (Ling) or else as a routed expert.
SHARED_WIDTH_KEYS = ("shared_expert_intermediate_size", "share_expert_dim", "shared_intermediate_size")
SHARED_COUNT_KEYS = ("n_shared_experts", "moe_num_shared_experts", "num_shared_experts")
# Older configs' layer_types names, as transformers renames them before vLLM reads them
# (transformers/configuration_utils.py, _LEGACY_LAYER_TYPE_REMAP).
LEGACY_LAYER_KINDS = {"mamba": "linear_attention", "attention": "full_attention"}


@dataclass(frozen=True)
class DenseMatrix:
    """A weight matrix outside the routed experts as vLLM builds it: [outputs, inputs], ``count``
    of them (one a layer that has it)."""

    name: str
    outputs: int
    inputs: int
    count: int
    kind: str               # "attention" (a token mixer's projection), "dense MLP", "shared expert",
                            # "convolution", "router", "LM head" or "embedding"
    on_lk: bool = True      # whether lk's dense path may take it (lvllm.vllm.dense)

    @property
    def weights(self) -> int:
        return self.outputs * self.inputs * self.count


@dataclass(frozen=True)
class Heads:
    """One layer's attention: query heads, K/V heads, query/key and value head sizes."""

    heads: int
    kv_heads: int
    head_dim: int
    v_head_dim: int


def common_heads(text: dict, layer: int = 0, heads: int | None = None) -> Heads:
    heads = heads or int(text.get("num_attention_heads") or 1)
    head_dim = int(text.get("head_dim") or text["hidden_size"] // heads)
    return Heads(heads, int(text.get("num_key_value_heads") or heads), head_dim, head_dim)


def laguna_heads(text: dict, layer: int) -> Heads:
    """laguna.py:493-506: num_attention_heads_per_layer[layer] query heads."""
    per_layer = text.get("num_attention_heads_per_layer")
    return common_heads(text, layer, int(per_layer[layer]) if per_layer else None)


def mimo_v2_heads(text: dict, layer: int) -> Heads:
    """mimo_v2.py:380-407: sliding-window layers (hybrid_layer_pattern 1) take the swa_ keys;
    V heads may be narrower (v_head_dim)."""
    if text["hybrid_layer_pattern"][layer] == 1:
        head_dim = int(text["swa_head_dim"])
        return Heads(int(text["swa_num_attention_heads"]), int(text["swa_num_key_value_heads"]), head_dim,
                     int(text.get("swa_v_head_dim") or head_dim))
    common = common_heads(text)
    return replace(common, v_head_dim=int(text.get("v_head_dim") or common.head_dim))


def step3_heads(text: dict, layer: int) -> Heads:
    """step3_text.py:162-164, 237: one K/V head."""
    return replace(common_heads(text), kv_heads=1)


def step3p5_heads(text: dict, layer: int) -> Heads:
    """step3p5.py:412-436: num_attention_groups K/V heads; layers of attention_other_setting's
    attention_type take its heads, groups and head size."""
    other, kinds = text.get("attention_other_setting") or {}, text.get("layer_types") or ()
    own = other if other and layer < len(kinds) and kinds[layer] == other.get("attention_type") else {}
    heads = int(own.get("num_attention_heads") or text["num_attention_heads"])
    head_dim = int(own.get("head_dim") or text.get("head_dim") or int(text["hidden_size"]) // heads)
    return Heads(heads, int(own.get("num_attention_groups") or text["num_attention_groups"]), head_dim, head_dim)


# transformers' Gemma4TextConfig: full-attention layers' head size where the config names none.
GEMMA4_GLOBAL_HEAD_DIM = 512


def gemma4_heads(text: dict, layer: int) -> Heads:
    """gemma4.py:578-580: per_layer_config[layer]'s head size and K/V heads, which transformers'
    Gemma4TextConfig sets on full-attention layers from global_head_dim and (attention_k_eq_v)
    num_global_key_value_heads. K = V layers are still built with a V part (gemma4.py:423)."""
    common = common_heads(text)
    # transformers writes it with the overrides that differ from the common keys only, maybe none.
    overrides = {int(i): o for i, o in (text.get("per_layer_config") or {}).items()}
    if "per_layer_config" not in text and (text.get("layer_types") or [""] * (layer + 1))[layer] == "full_attention":
        kv_heads = text.get("num_global_key_value_heads") if text.get("attention_k_eq_v") else None
        overrides[layer] = {"head_dim": text.get("global_head_dim") or GEMMA4_GLOBAL_HEAD_DIM,
                            "num_key_value_heads": kv_heads}
    own = overrides.get(layer, {})
    head_dim = int(own.get("head_dim") or common.head_dim)
    return Heads(common.heads, int(own.get("num_key_value_heads") or common.kv_heads), head_dim, head_dim)


def mla_dims(text: dict) -> dict | None:
    """MLA's sizes (DeepSeek-V2's attention) where kv_lora_rank is set."""
    if not text.get("kv_lora_rank"):
        return None
    return {k: int(text.get(k) or 0) for k in ("kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                                               "v_head_dim")}


def mla_attention(text: dict, mla: dict) -> list[DenseMatrix]:
    """As vLLM's DeepseekV2MLAAttention fuses it (fused_qkv_a_proj where q_lora_rank is set)."""
    h, heads = int(text["hidden_size"]), int(text.get("num_attention_heads") or 1)
    qk, latent = mla["qk_nope_head_dim"] + mla["qk_rope_head_dim"], mla["kv_lora_rank"] + mla["qk_rope_head_dim"]
    if mla["q_lora_rank"]:
        q = [DenseMatrix("fused_qkv_a_proj", mla["q_lora_rank"] + latent, h, 1, "attention"),
             DenseMatrix("q_b_proj", heads * qk, mla["q_lora_rank"], 1, "attention")]
    else:
        q = [DenseMatrix("q_proj", heads * qk, h, 1, "attention"),
             DenseMatrix("kv_a_proj_with_mqa", latent, h, 1, "attention")]
    # kv_b_proj: vLLM's CPU MLA reads its weight itself, so lk leaves it in the model dtype.
    return q + [DenseMatrix("kv_b_proj", heads * (mla["qk_nope_head_dim"] + mla["v_head_dim"]), mla["kv_lora_rank"],
                            1, "attention", on_lk=False),
                DenseMatrix("o_proj", h, heads * mla["v_head_dim"], 1, "attention")]


def qkv_attention(text: dict, heads: Heads) -> list[DenseMatrix]:
    """q, k and v fused as vLLM's QKVParallelLinear, and o."""
    h, n, kv = int(text["hidden_size"]), heads.heads, heads.kv_heads
    return [DenseMatrix("qkv_proj", (n + kv) * heads.head_dim + kv * heads.v_head_dim, h, 1, "attention"),
            DenseMatrix("o_proj", h, n * heads.v_head_dim, 1, "attention")]


def step3_attention(text: dict, heads: Heads) -> list[DenseMatrix]:
    """step3_text.py:161-193: one K/V head; the queries through share_q_dim, then wq to every head."""
    h, head_dim, n = int(text["hidden_size"]), heads.head_dim, heads.heads
    q = int(text.get("share_q_dim") or head_dim)
    return [DenseMatrix("qkv_proj", q + 2 * head_dim, h, 1, "attention"),
            DenseMatrix("wq", n * head_dim, q, 1, "attention"),
            DenseMatrix("o_proj", h, n * head_dim, 1, "attention")]


def granite_mamba2(text: dict) -> list[DenseMatrix]:
    """granitemoehybrid.py:73-89, mamba_mixer2.py:343-500: MambaMixer2, mamba_expand x hidden wide;
    its conv1d (a [channels, kernel] weight vLLM unsqueezes to 3-D) is never quantized."""
    h = int(text["hidden_size"])
    inner, states = int(text["mamba_expand"]) * h, 2 * int(text["mamba_n_groups"]) * int(text["mamba_d_state"])
    return [DenseMatrix("in_proj", 2 * inner + states + int(text["mamba_n_heads"]), h, 1, "attention"),
            DenseMatrix("conv1d", inner + states, int(text["mamba_d_conv"]), 1, "convolution", on_lk=False),
            DenseMatrix("out_proj", h, inner, 1, "attention")]


def lfm2_short_conv(text: dict) -> list[DenseMatrix]:
    """lfm2_moe.py:343, short_conv.py:57-81: ShortConv's B, C, x projection, its conv_L_cache-wide
    convolution (3-D, never quantized) and out projection."""
    h = int(text["hidden_size"])
    return [DenseMatrix("in_proj", 3 * h, h, 1, "attention"),
            DenseMatrix("conv", h, int(text["conv_L_cache"]), 1, "convolution", on_lk=False),
            DenseMatrix("out_proj", h, h, 1, "attention")]


def gated_delta_net(text: dict) -> list[DenseMatrix]:
    """qwen3_next.py -> qwen_gdn_linear_attn.py:502-590: q, k, v and the output gate z in one projection,
    the decay and beta gates (b, a) a value head each, the convolution over q, k and v (3-D, never
    quantized) and the out projection."""
    h = int(text["hidden_size"])
    keys = int(text["linear_num_key_heads"]) * int(text["linear_key_head_dim"])
    values = int(text["linear_num_value_heads"]) * int(text["linear_value_head_dim"])
    return [DenseMatrix("in_proj_qkvz", 2 * keys + 2 * values, h, 1, "attention"),
            DenseMatrix("in_proj_ba", 2 * int(text["linear_num_value_heads"]), h, 1, "attention"),
            DenseMatrix("conv1d", 2 * keys + values, int(text["linear_conv_kernel_dim"]), 1, "convolution",
                        on_lk=False),
            DenseMatrix("out_proj", h, values, 1, "attention")]


def no_gate(text: dict, heads: Heads) -> int:
    return 0


def laguna_gate(text: dict, heads: Heads) -> int:
    """laguna.py:331-347: g_proj, a gate per head (gating true or "per-head") or per channel."""
    gating = text.get("gating")
    if not gating:
        return 0
    return heads.heads if gating is True or gating == "per-head" else heads.heads * heads.head_dim


def qwen3_next_gate(text: dict, heads: Heads) -> int:
    return heads.heads * heads.head_dim if text.get("attn_output_gate", True) else 0


@dataclass(frozen=True)
class Layout:
    """Where a family's vLLM model code builds the decoder otherwise than the common reading
    (QKV attention or MLA on every layer, a dense MLP on the layers that are not MoE,
    intermediate_size wide, the shared experts by SHARED_WIDTH_KEYS or SHARED_COUNT_KEYS)."""

    heads: Callable[[dict, int], Heads] = common_heads
    attention: Callable[[dict, Heads], list[DenseMatrix]] = qkv_attention   # where not MLA
    attention_gate: Callable[[dict, Heads], int] = no_gate   # outputs of the attention's output gate
    mixers: dict = field(default_factory=dict)        # layer_types kind -> its token mixer (not attention)
    blocks: int = 1                 # attention blocks and dense MLPs a decoder layer
    dense_width: tuple[str, ...] = ("intermediate_size",)
    mlp_on_moe_layers: bool = False   # a dense MLP beside the MoE block on MoE layers too
    shared_experts: int | None = None   # a count of shared experts whatever the config says
    shared_whole: bool = False      # moe_shared_expert_intermediate_size is every shared expert's width together
    shared_gate: bool = True        # Qwen2-MoE's sigmoid gate where shared_expert_intermediate_size is set
    refused: tuple[tuple[str, str], ...] = ()   # (key, what vLLM builds for it): refused where set


LAYOUTS = {
    # llama4.py:100-113, 352: one intermediate_size-wide shared expert on every MoE layer; dense
    # layers intermediate_size_mlp wide.
    "llama4_text": Layout(dense_width=("intermediate_size_mlp",), shared_experts=1),
    # gemma4.py:578-665: per-layer head sizes, and a dense MLP beside the MoE block on every layer.
    "gemma4_text": Layout(heads=gemma4_heads, mlp_on_moe_layers=True, refused=(
        ("hidden_size_per_layer_input", "per-layer input embeddings (embed_tokens_per_layer and each layer's "
                                        "per_layer_input_gate and per_layer_projection, gemma4.py:674-700)"),
        ("num_kv_shared_layers", "KV-shared layers (q_proj only, double-wide MLPs under use_double_wide_mlp, "
                                 "gemma4.py:405-420, 596-607)"))),
    # longcat_flash.py:267-310: two MLA blocks and two ffn_hidden_size-wide MLPs beside each MoE block.
    "longcat_flash": Layout(blocks=2, dense_width=("ffn_hidden_size",), mlp_on_moe_layers=True),
    "step3_text": Layout(heads=step3_heads, attention=step3_attention),   # step3_text.py:161-193
    # step3p5.py:190-230: g_proj, a gate per head where use_head_wise_attn_gate.
    "step3p5": Layout(heads=step3p5_heads,
                      attention_gate=lambda text, heads: heads.heads if text.get("use_head_wise_attn_gate") else 0),
    # qwen3_next.py:315-330: the queries' output gate (attn_output_gate, on unless false); linear_attention
    # layers are Gated DeltaNet. Qwen3.5's text model (qwen3_5.py) builds the same layers.
    "qwen3_next": Layout(attention_gate=qwen3_next_gate, mixers={"linear_attention": gated_delta_net}),
    "qwen3_5_moe_text": Layout(attention_gate=qwen3_next_gate, mixers={"linear_attention": gated_delta_net}),
    # afmoe.py:216-221: gate_proj, a gate per attention output channel.
    "afmoe": Layout(attention_gate=lambda text, heads: heads.heads * heads.head_dim),
    # laguna.py:184-194: its shared expert has no sigmoid gate.
    "laguna": Layout(heads=laguna_heads, attention_gate=laguna_gate, shared_gate=False),
    "mimo_v2": Layout(heads=mimo_v2_heads),   # mimo_v2.py:380-407
    # cohere2_moe.py:351-357: dense layers prefix_dense_intermediate_size wide where set.
    "cohere2_moe": Layout(dense_width=("prefix_dense_intermediate_size", "intermediate_size")),
    # param2moe.py:309-320: moe_shared_expert_intermediate_size counts every shared expert.
    "param2moe": Layout(shared_whole=True),
    # granitemoehybrid.py:322-325: linear_attention layers are Mamba-2.
    "granitemoehybrid": Layout(mixers={"linear_attention": granite_mamba2}),
    "lfm2_moe": Layout(mixers={"conv": lfm2_short_conv}),   # lfm2_moe.py:343
}


def layout_of(text: dict, where: str) -> Layout:
    """The family's Layout, refusing a config that sets what it does not model."""
    model_type = str(text.get("model_type", ""))
    layout = LAYOUTS.get(model_type, Layout())
    for key, what in layout.refused:
        if text.get(key):
            raise ConfigError(f"{where}: {model_type} with {key} {text[key]}: lvllm plan does not model its {what}")
    return layout


def shared_width(text: dict, layout: Layout, expert_width: int) -> int:
    """A MoE layer's shared experts, as one MLP's width (0: none)."""
    whole = first_set(text, *SHARED_WIDTH_KEYS)
    if whole is not None:
        return int(whole)
    count = layout.shared_experts if layout.shared_experts is not None else int(
        first_set(text, *SHARED_COUNT_KEYS, default=0))
    each = text.get("moe_shared_expert_intermediate_size")
    if each and layout.shared_whole:
        return int(each) if count else 0
    return count * int(each or expert_width)


def _mlp(prefix: str, width: int, hidden: int, count: int, kind: str) -> list[DenseMatrix]:
    return [DenseMatrix(f"{prefix}gate_up_proj", 2 * width, hidden, count, kind),
            DenseMatrix(f"{prefix}down_proj", hidden, width, count, kind)]


def layer_matrices(text: dict, layout: Layout, layer: int, moe: bool, routers: tuple[int, ...], expert_width: int,
                   mla: dict | None) -> list[DenseMatrix]:
    """One decoder layer's matrices outside its routed experts; ``routers``: each expert set's experts
    (a router each), ``expert_width``: the first set's width."""
    h, blocks = int(text["hidden_size"]), layout.blocks
    kinds = text.get("layer_types") or ()
    kind = kinds[layer] if layer < len(kinds) else ""
    mixer = layout.mixers.get(LEGACY_LAYER_KINDS.get(kind, kind))
    if mixer:
        found = mixer(text)
    elif mla:
        found = mla_attention(text, mla)
    else:
        heads = layout.heads(text, layer)
        found = layout.attention(text, heads) + [
            DenseMatrix("attention_gate", layout.attention_gate(text, heads), h, 1, "attention")]
    found = [replace(m, count=blocks) for m in found]
    if not moe or layout.mlp_on_moe_layers:
        found += _mlp("", int(first_set(text, *layout.dense_width, default=0)), h, blocks, "dense MLP")
    if moe:
        width = shared_width(text, layout, expert_width)
        # A router per expert set, a GateLinear (lk leaves it); longcat_flash.py:157: it also scores
        # zero_expert_num zero experts.
        found += [*_mlp("shared_expert.", width, h, 1, "shared expert"),
                  *(DenseMatrix("gate", experts + int(text.get("zero_expert_num") or 0), h, 1, "router", on_lk=False)
                    for experts in routers)]
        # Qwen2-MoE's sigmoid gate on the shared expert: a ReplicatedLinear, which lk takes.
        gated = layout.shared_gate and "shared_expert_intermediate_size" in text
        found.append(DenseMatrix("shared_expert_gate", 1, h, 1 if gated and width else 0, "router"))
    return found


def dense_matrices_of(text: dict, where: str, num_layers: int, moe_layers: tuple[int, ...], routers: tuple[int, ...],
                      expert_width: int) -> tuple[DenseMatrix, ...]:
    """Every weight matrix outside the routed experts, those of a shape counted together (in the
    order the layers first have them), then the LM head and the embedding."""
    layout, mla = layout_of(text, where), mla_dims(text)
    counts: dict[DenseMatrix, int] = {}
    for layer in range(num_layers):
        for m in layer_matrices(text, layout, layer, layer in moe_layers, routers, expert_width, mla):
            one = replace(m, count=1)
            counts[one] = counts.get(one, 0) + m.count
    vocab, h = int(text["vocab_size"]), int(text["hidden_size"])
    matrices = [replace(m, count=count) for m, count in counts.items()] + [
        DenseMatrix("lm_head", vocab, h, 1, "LM head"),
        DenseMatrix("embed_tokens", vocab, h, 1, "embedding", on_lk=False)]
    return tuple(m for m in matrices if m.weights)
