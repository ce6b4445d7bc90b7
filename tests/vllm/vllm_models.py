"""Tiny random checkpoints of MoE architectures transformers 5.19 does not have, for the sweep
against vLLM's own CPU path (test_architectures_vllm.py).

Without transformers' model class there is nothing to write the checkpoint for us, so each
architecture lists its tensors here (name -> shape), named as the real checkpoints name them,
so that vLLM's own load_weights maps them (and vLLM's loader refuses a checkpoint that leaves
one of its parameters unfilled). The building blocks below (attention, MLP, experts) take the
names a family uses; weights are drawn as transformers_models.redraw draws them (seeded):

- every matrix and embedding with std 1/sqrt(fan_in) (unit-scale activations, spread logits,
  greedy decoding that does not collapse onto one token);
- every norm weight 1 + noise of 0.1, every other vector (bias, router correction bias)
  noise of 0.1, so a path that drops one cannot hide.

Real checkpoints of these families ship their config class as remote code; a tiny one carries
configuration_tiny.py (a PretrainedConfig keeping every key of config.json, a vision tower's
vision_config as a config of its own) under auto_map and is loaded with trust_remote_code. So
does a swept checkpoint whose real ones ship such a config for vLLM (checkpoint_config: ERNIE-4.5-VL),
its tensors written by transformers. The tokenizer is build_tiny_model.py's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import transformers_models
from architecture_table import BY_KEY, VLLM_BY_KEY
from transformers_models import COMMON, NOISE, _builder

CONFIG_FILE = "configuration_tiny.py"
CONFIG_SOURCE = '''"""A tiny test checkpoint's config: every key of config.json, as given."""
from transformers import PretrainedConfig


class TinyConfig(PretrainedConfig):
    model_type = "{model_type}"

    def __init__(self, vision_config=None, **kwargs):
        super().__init__(**kwargs)
        if vision_config is not None:   # vLLM reads a vision tower's settings as attributes
            self.vision_config = PretrainedConfig(**vision_config)
'''
ROPE = {"rope_type": "default", "rope_theta": 10000.0}


# --------------------------------------------------------------------------------------
# building blocks: name -> shape
# --------------------------------------------------------------------------------------

def mlp(prefix: str, hidden: int, inner: int, names=("gate_proj", "up_proj", "down_proj"),
        bias: bool = False) -> dict:
    gate, up, down = names
    shapes = {f"{prefix}.{gate}.weight": (inner, hidden), f"{prefix}.{up}.weight": (inner, hidden),
              f"{prefix}.{down}.weight": (hidden, inner)}
    if bias:
        shapes.update({f"{prefix}.{gate}.bias": (inner,), f"{prefix}.{up}.bias": (inner,),
                       f"{prefix}.{down}.bias": (hidden,)})
    return shapes


def experts(prefix: str, hidden: int, inner: int, count: int,
            names=("gate_proj", "up_proj", "down_proj")) -> dict:
    """``prefix``.E.gate_proj/up_proj/down_proj.weight for each expert E."""
    shapes = {}
    for e in range(count):
        shapes.update(mlp(f"{prefix}.{e}", hidden, inner, names))
    return shapes


def attention(prefix: str, hidden: int, heads: int, kv_heads: int, head_dim: int,
              names=("q_proj", "k_proj", "v_proj", "o_proj"), qkv_bias: bool = False,
              v_head_dim: int | None = None) -> dict:
    q, k, v, o = names
    v_dim = v_head_dim or head_dim
    shapes = {f"{prefix}.{q}.weight": (heads * head_dim, hidden),
              f"{prefix}.{k}.weight": (kv_heads * head_dim, hidden),
              f"{prefix}.{v}.weight": (kv_heads * v_dim, hidden),
              f"{prefix}.{o}.weight": (hidden, heads * v_dim)}
    if qkv_bias:
        shapes.update({f"{prefix}.{q}.bias": (heads * head_dim,), f"{prefix}.{k}.bias": (kv_heads * head_dim,),
                       f"{prefix}.{v}.bias": (kv_heads * v_dim,)})
    return shapes


def fused_attention(prefix: str, hidden: int, heads: int, kv_heads: int, head_dim: int,
                    qkv: str = "query_key_value", out: str = "dense", qkv_bias: bool = False) -> dict:
    shapes = {f"{prefix}.{qkv}.weight": ((heads + 2 * kv_heads) * head_dim, hidden),
              f"{prefix}.{out}.weight": (hidden, heads * head_dim)}
    if qkv_bias:
        shapes[f"{prefix}.{qkv}.bias"] = ((heads + 2 * kv_heads) * head_dim,)
    return shapes


def mla(prefix: str, c: dict) -> dict:
    """DeepSeek-V2/V3's multi-head latent attention (q LoRA when q_lora_rank is set)."""
    hidden, heads = c["hidden_size"], c["num_attention_heads"]
    nope, rope, v, rank = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"], c["kv_lora_rank"]
    shapes = {}
    if c.get("q_lora_rank"):
        shapes.update({f"{prefix}.q_a_proj.weight": (c["q_lora_rank"], hidden),
                       f"{prefix}.q_a_layernorm.weight": (c["q_lora_rank"],),
                       f"{prefix}.q_b_proj.weight": (heads * (nope + rope), c["q_lora_rank"])})
    else:
        shapes[f"{prefix}.q_proj.weight"] = (heads * (nope + rope), hidden)
    shapes.update({f"{prefix}.kv_a_proj_with_mqa.weight": (rank + rope, hidden),
                   f"{prefix}.kv_a_layernorm.weight": (rank,),
                   f"{prefix}.kv_b_proj.weight": (heads * (nope + v), rank),
                   f"{prefix}.o_proj.weight": (hidden, heads * v)})
    return shapes


def norms(prefix: str, size: int, *names: str) -> dict:
    return {f"{prefix}.{name}.weight": (size,) for name in names}


# --------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------

def draw(shapes: dict, seed: int) -> dict:
    """The tensors, in name order from one seeded generator (see the module's docstring)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in sorted(shapes.items()):
        noise = torch.randn(shape, generator=generator, dtype=torch.float64)
        if len(shape) >= 2:
            value = noise / shape[-1] ** 0.5
        elif "norm" in name.rsplit(".", 2)[-2]:
            value = 1 + NOISE * noise
        else:
            value = NOISE * noise
        tensors[name] = value.to(torch.float32).contiguous()
    return tensors


def has_config_class(model_type: str) -> bool:
    """transformers or vLLM has the model type's config class (no remote code then)."""
    from transformers import CONFIG_MAPPING
    from vllm.transformers_utils.config import _CONFIG_REGISTRY

    return model_type in CONFIG_MAPPING or model_type in _CONFIG_REGISTRY


def swept_checkpoint(root: Path, key: str) -> Path:
    """The tiny checkpoint of a swept architecture in ``root / key`` (kept when already there):
    transformers writes BY_KEY's (with the config vLLM reads in the layout real checkpoints ship
    where they differ: checkpoint_config), ``write`` VLLM_BY_KEY's from their tensor lists."""
    if key in BY_KEY:
        arch = BY_KEY[key]
        out = transformers_models.build(root / key, arch.model_type, arch.name, arch.config,
                                        unused_weights=arch.unused_weights, extra_norms=arch.extra_norms,
                                        wrapper=arch.wrapper, keep_copy=bool(arch.checkpoint_config))
        if arch.checkpoint_config:
            saved = json.loads((transformers_models.for_transformers(out) / "config.json").read_text())
            write_config(out, globals()[arch.checkpoint_config](saved))
        return out
    arch = VLLM_BY_KEY[key]
    return write(root / key, arch.name, arch.model_type, arch.config, globals()[arch.tensors])


def write_config(out: Path, config_json: dict) -> None:
    """config.json, and configuration_tiny.py under auto_map where neither transformers nor vLLM
    has the model type's config class."""
    model_type = config_json["model_type"]
    if not has_config_class(model_type):
        (out / CONFIG_FILE).write_text(CONFIG_SOURCE.format(model_type=model_type))
        config_json = {**config_json, "auto_map": {"AutoConfig": f"{CONFIG_FILE.removesuffix('.py')}.TinyConfig"}}
    (out / "config.json").write_text(json.dumps(config_json, indent=2))


def write(out: Path, architecture: str, model_type: str, config: dict, shapes, seed: int = 0) -> Path:
    """The checkpoint in ``out`` (kept when already there): config.json (COMMON, then
    ``config``; the real vocabulary size), configuration_tiny.py where neither transformers nor
    vLLM has the model type's config class, the tokenizer, and
    ``shapes(config)``'s tensors drawn from ``seed``."""
    if (out / "config.json").exists():
        return out
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    vocab = _builder().build_tokenizer(out, COMMON["vocab_size"])
    settings = {**COMMON, "rope_parameters": dict(ROPE), "rms_norm_eps": 1e-6, "hidden_act": "silu",
                **config, "vocab_size": vocab}
    save_file(draw(shapes(settings), seed), str(out / "model.safetensors"), metadata={"format": "pt"})
    write_config(out, {**settings, "architectures": [architecture], "model_type": model_type, "torch_dtype": "float32"})
    (out / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": settings["eos_token_id"], "pad_token_id": settings["pad_token_id"]}, indent=2))
    return out


# --------------------------------------------------------------------------------------
# the families' tensors, as their checkpoints name them (c: the config)
# --------------------------------------------------------------------------------------

def _moe_layers(c: dict, dense_key: str = "first_k_dense_replace"):
    return [(i, i >= c.get(dense_key, 0)) for i in range(c["num_hidden_layers"])]


def deepseek_v1(c: dict) -> dict:
    """DeepSeek-MoE (v1): MHA, dense first layers, softmax router, shared experts."""
    h, shapes = c["hidden_size"], {}
    for i, moe in _moe_layers(c):
        p = f"model.layers.{i}"
        shapes.update(attention(f"{p}.self_attn", h, c["num_attention_heads"], c["num_key_value_heads"],
                                h // c["num_attention_heads"]))
        shapes.update(norms(p, h, "input_layernorm", "post_attention_layernorm"))
        if moe:
            shapes[f"{p}.mlp.gate.weight"] = (c["n_routed_experts"], h)
            shapes.update(experts(f"{p}.mlp.experts", h, c["moe_intermediate_size"], c["n_routed_experts"]))
            shapes.update(mlp(f"{p}.mlp.shared_experts", h, c["moe_intermediate_size"] * c["n_shared_experts"]))
        else:
            shapes.update(mlp(f"{p}.mlp", h, c["intermediate_size"]))
    return _ends(c, shapes)


def bailing(c: dict) -> dict:
    """Ling (BailingMoe v1/v2, Sarvam-MoE): fused query_key_value, dense first layers,
    word_embeddings, shared experts, the router's expert_bias when enabled."""
    h, hd, shapes = c["hidden_size"], c["head_dim"], {}
    for i, moe in _moe_layers(c):
        p = f"model.layers.{i}"
        shapes.update(fused_attention(f"{p}.attention", h, c["num_attention_heads"], c["num_key_value_heads"], hd,
                                      qkv_bias=c.get("use_qkv_bias", False)))
        if c.get("use_qk_norm"):
            shapes.update(norms(f"{p}.attention", hd, "query_layernorm", "key_layernorm"))
        shapes.update(norms(p, h, "input_layernorm", "post_attention_layernorm"))
        if moe:
            shapes[f"{p}.mlp.gate.weight"] = (c["num_experts"], h)
            if c.get("moe_router_enable_expert_bias"):
                shapes[f"{p}.mlp.gate.expert_bias"] = (c["num_experts"],)
            shapes.update(experts(f"{p}.mlp.experts", h, c["moe_intermediate_size"], c["num_experts"]))
            if c.get("num_shared_experts"):
                shared = c.get("moe_shared_expert_intermediate_size", c["moe_intermediate_size"])
                shapes.update(mlp(f"{p}.mlp.shared_experts", h, shared * c["num_shared_experts"]))
        else:
            shapes.update(mlp(f"{p}.mlp", h, c["intermediate_size"]))
    return _ends(c, shapes, embed="model.word_embeddings.weight")


def _ends(c: dict, shapes: dict, embed: str = "model.embed_tokens.weight") -> dict:
    h = c["hidden_size"]
    shapes.update({embed: (c["vocab_size"], h), "model.norm.weight": (h,)})
    if not c.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (c["vocab_size"], h)
    return shapes


def sarvam_mla(c: dict) -> dict:
    """Sarvam's MLA model: DeepSeek-V3's layout (MLA, dense first layers, sigmoid router with
    its correction bias, shared experts)."""
    h, shapes = c["hidden_size"], {}
    for i, moe in _moe_layers(c):
        p = f"model.layers.{i}"
        shapes.update(mla(f"{p}.self_attn", c))
        shapes.update(norms(p, h, "input_layernorm", "post_attention_layernorm"))
        if moe:
            shapes[f"{p}.mlp.gate.weight"] = (c["num_experts"], h)
            shapes[f"{p}.mlp.gate.e_score_correction_bias"] = (c["num_experts"],)
            shapes.update(experts(f"{p}.mlp.experts", h, c["moe_intermediate_size"], c["num_experts"]))
            shared = c.get("moe_shared_expert_intermediate_size", c["moe_intermediate_size"])
            shapes.update(mlp(f"{p}.mlp.shared_experts", h, shared * c["num_shared_experts"]))
        else:
            shapes.update(mlp(f"{p}.mlp", h, c["intermediate_size"]))
    return _ends(c, shapes)


def openpangu(c: dict) -> dict:
    """openPangu: MLA (Ultra-MoE), sink attention (param_sink_number) or GQA attention;
    dense first layers, sigmoid router with its correction bias (`mlp.e_score_correction_bias`,
    as vLLM's loader maps it), shared experts, sandwich norms when set."""
    h, shapes = c["hidden_size"], {}
    heads, kv = c["num_attention_heads"], c.get("num_key_value_heads", c["num_attention_heads"])
    for i, moe in _moe_layers(c):
        p = f"model.layers.{i}"
        if "kv_lora_rank" in c:
            shapes.update(mla(f"{p}.self_attn", c))
        elif c.get("param_sink_number"):
            qk, v = c["qk_nope_dim"] + c["qk_rope_dim"], c["v_channels"]
            # one qkv_proj: vLLM's loader maps q_proj/k_proj/v_proj to QKV shard ids "q"/"k"/"v",
            # which the sink attention's qkv_proj (MergedColumnParallelLinear) refuses
            shapes.update({f"{p}.self_attn.qkv_proj.weight": ((heads + kv) * qk + kv * v, h),
                           f"{p}.self_attn.o_proj.weight": (h, heads * v),
                           f"{p}.self_attn.k_layernorm.weight": (qk,),
                           f"{p}.self_attn.param_sink_key": (c["param_sink_number"], kv, qk)})
            if c.get("param_sink_with_value"):
                shapes[f"{p}.self_attn.param_sink_value"] = (c["param_sink_number"], kv, v)
        else:
            shapes.update(attention(f"{p}.self_attn", h, heads, kv, c["head_dim"], qkv_bias=c.get("qkv_bias", False)))
        shapes.update(norms(p, h, "input_layernorm", "post_attention_layernorm"))
        if c.get("sandwich_norm"):
            shapes.update(norms(p, h, "pre_mlp_layernorm", "post_mlp_layernorm"))
        if moe:
            shapes[f"{p}.mlp.gate.weight"] = (c["n_routed_experts"], h)
            if c.get("router_enable_expert_bias"):
                shapes[f"{p}.mlp.e_score_correction_bias"] = (c["n_routed_experts"],)
            shapes.update(experts(f"{p}.mlp.experts", h, c["moe_intermediate_size"], c["n_routed_experts"]))
            if c.get("n_shared_experts"):
                shapes.update(mlp(f"{p}.mlp.shared_experts", h, c["moe_intermediate_size"] * c["n_shared_experts"]))
        else:
            shapes.update(mlp(f"{p}.mlp", h, c["intermediate_size"]))
    return _ends(c, shapes)


def step3_text(c: dict) -> dict:
    """Step-3's text model: one shared K/V head, queries through a low-rank share_q_dim and
    inter_norm then wq; experts stacked as [E, ...] tensors under `moe.`, a shared expert."""
    h, hd, q, shapes = c["hidden_size"], c["head_dim"], c["share_q_dim"], {}
    moe_layers = {int(i) for i in c["moe_layers_enum"].split(",")}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.self_attn.q_proj.weight": (q, h), f"{p}.self_attn.k_proj.weight": (hd, h),
                       f"{p}.self_attn.v_proj.weight": (hd, h), f"{p}.self_attn.inter_norm.weight": (q,),
                       f"{p}.self_attn.wq.weight": (c["num_attention_heads"] * hd, q),
                       f"{p}.self_attn.o_proj.weight": (h, c["num_attention_heads"] * hd)})
        shapes.update(norms(p, h, "input_layernorm", "post_attention_layernorm"))
        if i in moe_layers:
            e, inner = c["moe_num_experts"], c["moe_intermediate_size"]
            shapes.update({f"{p}.moe.gate.weight": (e, h), f"{p}.moe.gate_proj.weight": (e, inner, h),
                           f"{p}.moe.up_proj.weight": (e, inner, h), f"{p}.moe.down_proj.weight": (e, h, inner)})
            shapes.update(mlp(f"{p}.share_expert", h, c["share_expert_dim"]))
        else:
            shapes.update(mlp(f"{p}.mlp", h, c["intermediate_size"]))
    return _ends(c, shapes)


def mistral_large_3(c: dict) -> dict:
    """Mistral-Large-3 in Mistral's own tensor names (consolidated.safetensors: tok_embeddings,
    layers.N.attention.wq_a ..., feed_forward.w1/w2/w3, experts.E.w1/w2/w3, output), which
    vLLM's MistralLarge3ForCausalLM maps onto DeepSeek-V3's; MLA with q LoRA, a dense first
    layer, softmax top-k, shared experts."""
    h, heads, shapes = c["hidden_size"], c["num_attention_heads"], {}
    nope, rope, v, rank = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"], c["kv_lora_rank"]
    names = ("w1", "w3", "w2")
    for i, moe in _moe_layers(c):
        p = f"layers.{i}"
        shapes.update({f"{p}.attention.wq_a.weight": (c["q_lora_rank"], h),
                       f"{p}.attention.q_a_norm.weight": (c["q_lora_rank"],),
                       f"{p}.attention.wq_b.weight": (heads * (nope + rope), c["q_lora_rank"]),
                       f"{p}.attention.wkv_a_with_mqa.weight": (rank + rope, h),
                       f"{p}.attention.kv_a_norm.weight": (rank,),
                       f"{p}.attention.wkv_b.weight": (heads * (nope + v), rank),
                       f"{p}.attention.wo.weight": (h, heads * v)})
        shapes.update(norms(p, h, "attention_norm", "ffn_norm"))
        if moe:
            shapes[f"{p}.gate.weight"] = (c["n_routed_experts"], h)
            shapes.update(experts(f"{p}.experts", h, c["moe_intermediate_size"], c["n_routed_experts"], names))
            shapes.update(mlp(f"{p}.shared_experts", h, c["moe_intermediate_size"] * c["n_shared_experts"], names))
        else:
            shapes.update(mlp(f"{p}.feed_forward", h, c["intermediate_size"], names))
    shapes.update({"tok_embeddings.weight": (c["vocab_size"], h), "norm.weight": (h,),
                   "output.weight": (c["vocab_size"], h)})
    return shapes


def mimo_v2(c: dict) -> dict:
    """MiMo-V2: sliding-window layers (hybrid_layer_pattern 1) with their own head counts and
    attention-sink biases, full-attention layers, MoE where moe_layer_freq says, sigmoid grouped
    top-k with the gate's correction bias."""
    h, shapes = c["hidden_size"], {}
    for i in range(c["num_hidden_layers"]):
        p, swa = f"model.layers.{i}", c["hybrid_layer_pattern"][i] == 1
        heads, kv, hd, vd = ((c["swa_num_attention_heads"], c["swa_num_key_value_heads"], c["swa_head_dim"],
                              c.get("swa_v_head_dim")) if swa
                             else (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], c.get("v_head_dim")))
        shapes.update(attention(f"{p}.self_attn", h, heads, kv, hd, qkv_bias=c["attention_bias"], v_head_dim=vd))
        if swa and c.get("add_swa_attention_sink_bias"):
            shapes[f"{p}.self_attn.attention_sink_bias"] = (heads,)
        shapes.update(norms(p, h, "input_layernorm", "post_attention_layernorm"))
        if c["moe_layer_freq"][i]:
            shapes[f"{p}.mlp.gate.weight"] = (c["n_routed_experts"], h)
            shapes[f"{p}.mlp.gate.e_score_correction_bias"] = (c["n_routed_experts"],)
            shapes.update(experts(f"{p}.mlp.experts", h, c["moe_intermediate_size"], c["n_routed_experts"]))
        else:
            shapes.update(mlp(f"{p}.mlp", h, c["intermediate_size"]))
    return _ends(c, shapes)


# --------------------------------------------------------------------------------------
# configs as real checkpoints ship them for vLLM, from transformers' config of the same model
# --------------------------------------------------------------------------------------

ERNIE45_VL_TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                        "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "hidden_act",
                        "use_bias", "moe_k", "moe_intermediate_size", "moe_num_shared_experts", "bos_token_id",
                        "eos_token_id", "pad_token_id")
ERNIE45_VL_TOKEN_KEYS = ("image_start_token_id", "image_end_token_id", "video_start_token_id", "video_end_token_id")


def ernie45_vl_remote_config(saved: dict) -> dict:
    """ERNIE-4.5-VL as Baidu's checkpoints describe it (remote code, model_type ernie4_5_moe_vl),
    the only layout vLLM reads: the text model's keys at the top, expert counts per modality (text,
    vision), the MoE layers as an index range per modality, 3-D RoPE as the time axis's share of
    the frequencies (freq_allocation; height and width split the rest), the vision tower's sizes
    in its own names, and the resampler's (pixel_hidden_size, spatial/temporal_conv_size)."""
    text, vision = saved["text_config"], saved["vision_config"]
    sparse = [i for i, kind in enumerate(text["mlp_layer_types"]) if kind == "sparse"]
    assert sparse == list(range(sparse[0], sparse[-1] + 1)), "vLLM takes one range of MoE layers"
    height, width, time = text["rope_parameters"]["mrope_section"]
    assert height == width == (text["head_dim"] // 2 - time) // 2, "vLLM splits the non-time frequencies evenly"
    return {**{key: text[key] for key in ERNIE45_VL_TEXT_KEYS}, **{key: saved[key] for key in ERNIE45_VL_TOKEN_KEYS},
            "architectures": saved["architectures"], "model_type": "ernie4_5_moe_vl", "torch_dtype": "float32",
            "tie_word_embeddings": saved["tie_word_embeddings"], "rope_theta": text["rope_parameters"]["rope_theta"],
            "freq_allocation": time, "moe_num_experts": [text["moe_num_experts"]] * 2,
            "moe_layer_start_index": [sparse[0]] * 2, "moe_layer_end_index": [sparse[-1]] * 2,
            "moe_layer_interval": 1, "im_patch_id": saved["image_token_id"],
            "pixel_hidden_size": vision["hidden_size"], "spatial_conv_size": vision["spatial_merge_size"],
            "temporal_conv_size": vision["temporal_merge_size"], "use_temporal_conv": True,
            "vision_config": {"depth": vision["depth"], "embed_dim": vision["hidden_size"],
                              "hidden_size": vision["hidden_size"], "hidden_act": vision["hidden_act"],
                              "mlp_ratio": vision["intermediate_size"] / vision["hidden_size"],
                              "num_heads": vision["num_heads"], "in_channels": vision["in_channels"],
                              "patch_size": vision["patch_size"], "spatial_merge_size": vision["spatial_merge_size"]}}
