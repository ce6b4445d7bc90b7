"""lvllm plan and LVLLM_GPU_RESIDENT_MOE_LAYERS=auto: the arithmetic against cases computed by
hand from the published configs of Qwen3-30B-A3B and DeepSeek-V3, on given machine sizes."""

from __future__ import annotations

import importlib
import json
import logging
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from lvllm import envs, expert_stats, formats, plan, plan_command
from lvllm.lk.linear import planned_linear_bytes
from lvllm.config_keys import moe_layer_indices
from lvllm.model_shape import (ConfigError, ExpertSet, checkpoint_layer_bytes, float_on_lk, kv_cache_bytes,
                               model_shape, read_config)
from lvllm.placement import RESIDENT_VAR, LayerPath, Placement
from lvllm.settings import Settings

GIB = 2**30

# config.json of Qwen/Qwen3-30B-A3B and deepseek-ai/DeepSeek-V3 (the keys the plan reads).
QWEN3_30B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "decoder_sparse_step": 1,
    "head_dim": 128, "hidden_size": 2048, "intermediate_size": 6144, "max_position_embeddings": 40960,
    "mlp_only_layers": [], "moe_intermediate_size": 768, "num_attention_heads": 32, "num_experts": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 151936,
}
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "first_k_dense_replace": 3,
    "hidden_size": 7168, "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 163840,
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_routed_experts": 256, "n_shared_experts": 1,
    "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61,
    "num_key_value_heads": 128, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 129280,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}


def machine(ram, cores, bandwidth, gpus=0, gpu_gib=0, nodes=1):
    return plan.Machine(ram * GIB, cores, nodes, gpus, gpu_gib * GIB, bandwidth)


def row(result, mode):
    return next(r for r in result.rows if mode in r.modes)


# Qwen3-30B-A3B by hand. One expert: 3 x 2048 x 768 = 4,718,592 weights.
#   bf16: 2 bytes each = 9,437,184; layer (128 experts) 1,207,959,552.
#   int8 g256: + float32 scales, w13 1536 rows x 8 groups + w2 2048 x 3 = 18,432 -> 4,792,320.
#   int4 g128: half a byte + scale and offset (8 bytes) per group, 1536 x 16 + 2048 x 6 = 36,864
#              groups -> 2,359,296 + 294,912 = 2,654,208.
# Outside the experts: attention 2 x 2048 x 32 x 128 + 2 x 2048 x 4 x 128 = 18,874,368 a layer,
#   x 48 = 905,969,664 weights; embedding + LM head 2 x 151,936 x 2048 = 622,329,856; routers
#   48 x 2048 x 128 = 12,582,912; all bf16: 3,081,764,864 bytes.
# KV cache: 48 layers x K and V x 4 heads x 128 x 2 bytes = 98,304 bytes a token.
Q_EXPERT = {"bf16": 9_437_184, "int8": 4_792_320, "int4": 2_654_208}
Q_LAYER_BF16 = 128 * 9_437_184
Q_WEIGHTS = 3_081_764_864
Q_KV_TOKEN = 98_304
# Without a GPU, by LVLLM_DENSE_USE_WEIGHT (test_qwen3_30b_dense_bytes): (host RAM, a token reads).
Q_DENSE = {"TO_DTYPE": (Q_WEIGHTS, 2_459_435_008), "INT8": (1_883_648_000, 1_261_318_144),
           "INT4": (1_332_133_888, 709_804_032)}


def test_qwen3_30b_on_a_24_gib_gpu():
    shape = model_shape(QWEN3_30B)
    assert shape.moe_layers == tuple(range(48))
    result = plan.make_plan(shape, machine(ram=64, cores=16, bandwidth=100, gpus=1, gpu_gib=24), 32768)
    gpu = result.gpu
    assert gpu.usable == int(24 * GIB * 0.9) == 23_192_823_398
    assert (gpu.weights, gpu.kv_cache) == (Q_WEIGHTS, 32768 * Q_KV_TOKEN)
    # Prefill ring, bf16 lk layers: two slots of lk's layer + one unpacked layer in bf16.
    assert gpu.ring == 3 * Q_LAYER_BF16
    # 23,192,823,398 - 3,081,764,864 - 3,221,225,472 - 2 GiB margin - 3,623,878,656
    # = 11,118,470,758 -> 9 layers of 1,207,959,552.
    assert gpu.left == 11_118_470_758 and gpu.resident == tuple(range(9))
    assert result.lk_layers == tuple(range(9, 48)) and result.choice.modes == ("TO_DTYPE",)
    bf16 = row(result, "TO_DTYPE")
    assert bf16.held == 39 * Q_LAYER_BF16
    assert bf16.need == 41 * Q_LAYER_BF16   # + two layers in the checkpoint's format while loading
    assert bf16.tok_s == pytest.approx(100e9 / (39 * 8 * Q_EXPERT["bf16"]))   # 33.96 tok/s
    assert row(result, "INT8").tok_s == pytest.approx(100e9 / (39 * 8 * Q_EXPERT["int8"]))
    assert row(result, "INT4").held == 39 * 128 * Q_EXPERT["int4"]
    assert (result.threads, result.prefill_from) == (15, 512)
    text = plan_command.render(result, "/models/qwen3")
    for line in ("export LVLLM_MOE_USE_WEIGHT=TO_DTYPE", "export LVLLM_GPU_RESIDENT_MOE_LAYERS=0-8 ",
                 "export LK_THREADS=15 ", "export LVLLM_GPU_PREFILL_MIN_BATCH_SIZE=512",
                 "max-model-len: 32768", "compilation_config.max_cudagraph_capture_size: 496"):
        assert line in text
    assert "LVLLM_DENSE_USE_WEIGHT" not in text   # dense layers on the GPU: the variable is the CPU build's


def test_qwen3_30b_on_cpu_only():
    shape = model_shape(QWEN3_30B)
    result = plan.make_plan(shape, machine(ram=40, cores=2, bandwidth=35), 4096)
    # 4096 x 98,304 = 384 MiB of KV cache -> VLLM_CPU_KVCACHE_SPACE=1 GiB, held in RAM with the
    # dense layers; bf16 needs 48 layers + 2 loading + 1 GiB + 3,081,764,864 = 57.1 GiB > 40.
    assert result.gpu is None and result.kv_space_gib == 1
    assert [(r.modes[0], r.dense_mode) for r in result.rows] == [
        ("TO_DTYPE", "TO_DTYPE"), ("INT8", "TO_DTYPE"), ("INT8", "INT8"), ("INT4", "TO_DTYPE"), ("INT4", "INT4")]
    assert row(result, "TO_DTYPE").need == 50 * Q_LAYER_BF16 + GIB + Q_WEIGHTS
    # INT8 experts with INT8 dense layers, the experts' bits: 27.4 + 2.25 + 1 + 1.75 = 32.4 GiB.
    int8_experts = 48 * 128 * Q_EXPERT["int8"]
    assert (result.choice.modes, result.choice.dense_mode) == (("INT8",), "INT8")
    assert result.choice.need == int8_experts + 2 * Q_LAYER_BF16 + GIB + Q_DENSE["INT8"][0]
    # Decode bound: the experts 8 of 128 a layer read, and the dense layers but the embedding.
    assert result.choice.tok_s == pytest.approx(35e9 / (48 * 8 * Q_EXPERT["int8"] + Q_DENSE["INT8"][1]))  # 11.3
    bf16_dense = result.rows[1]
    assert bf16_dense.need == int8_experts + 2 * Q_LAYER_BF16 + GIB + Q_WEIGHTS
    assert bf16_dense.tok_s == pytest.approx(35e9 / (48 * 8 * Q_EXPERT["int8"] + Q_DENSE["TO_DTYPE"][1]))  # 8.1
    text = plan_command.render(result, "m")
    assert "VLLM_CPU_KVCACHE_SPACE=1" in text and "VLLM_CPU_OMP_THREADS_BIND=0-1" in text
    assert "export LVLLM_DENSE_USE_WEIGHT=INT8" in text and "RESIDENT" not in text
    assert "TO_DTYPE 2.9 GiB (2.3 GiB a token), INT8 1.8 GiB (1.2 GiB a token), INT4 1.2 GiB (0.7 GiB a token)" in text

    # INT4 with INT4 dense: 48 x 128 x 2,654,208 + 2 bf16 layers + 1 GiB + 1,332,133,888 = 19.7 GiB.
    short = plan.make_plan(shape, machine(ram=19, cores=2, bandwidth=35), 4096)
    assert short.choice is None and not short.feasible
    smallest = plan_command.render(short, "m")
    assert "INT4 with LVLLM_DENSE_USE_WEIGHT=INT4" in smallest and "needs 19.7 GiB" in smallest, smallest


def test_expert_parallel_ranks_hold_their_share_of_the_experts(capsys, tmp_path):
    """--tensor-parallel-size 2 --expert-parallel on a host without a GPU: each rank's lk holds
    64 whole experts of every layer (Q_EXPERT by hand), the host the whole layer once, as
    without ranks; the settings bind each rank to its half of the cores."""
    shape = model_shape(QWEN3_30B)
    alone = plan.make_plan(shape, machine(ram=40, cores=16, bandwidth=35), 4096)
    ep = plan.make_plan(shape, machine(ram=40, cores=16, bandwidth=35), 4096, cpu_ranks=plan.Ranks(2, True))
    assert ep.choice.resolved == alone.choice.resolved and ep.choice.held == alone.choice.held
    int8 = formats.resolve_format("INT8", "float", torch.bfloat16)
    assert plan.lk_rank_layer_bytes(shape, int8, 1, plan.Ranks(2, True)) == 64 * Q_EXPERT["int8"]
    assert plan.lk_rank_layer_bytes(shape, int8, 1, plan.Ranks(3, True)) == 43 * Q_EXPERT["int8"]
    text = plan_command.render(ep, "m")
    assert f"Per rank of 2: lk holds 64 of the 128 experts of every layer, {48 * 64 * Q_EXPERT['int8'] / GIB:.1f} GiB" in text
    assert "VLLM_CPU_OMP_THREADS_BIND=0-7|8-15" in text and "export LK_THREADS" not in text
    assert "tensor-parallel-size: 2" in text and "enable-expert-parallel: true" in text
    # With GPUs the ranks are the GPUs, and lk takes expert parallelism on the CPU build only.
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_30B))
    with pytest.raises(SystemExit):
        plan_command.main(["--model", str(tmp_path), "--gpus", "2", "--gpu-memory", "24", "--ram", "64", "--cores", "16",
                   "--bandwidth", "35", "--expert-parallel"])
    assert "CPU build only" in capsys.readouterr().err


def test_qwen3_30b_dense_bytes():
    """The weights outside the experts by hand, as the model names them: per layer q [4096, 2048],
    k and v [512, 2048], o [2048, 4096] = 18,874,368 weights and the router [128, 2048] (kept
    bf16); the LM head [151936, 2048]; the embedding as large, in RAM but not read per token."""
    shape = model_shape(QWEN3_30B)
    assert [(m.name, m.outputs, m.inputs, m.count) for m in shape.dense] == [
        ("qkv_proj", 5120, 2048, 48), ("o_proj", 2048, 4096, 48), ("gate", 128, 2048, 48),
        ("lm_head", 151936, 2048, 1), ("embed_tokens", 151936, 2048, 1)]
    attention, router, head = [(4096, 2048), (512, 2048), (512, 2048), (2048, 4096)], 128 * 2048, 151936 * 2048
    assert sum(n * k for n, k in attention) == 18_874_368
    assert plan.dense_bytes(shape, "TO_DTYPE", per_token=True) == 2 * (48 * 18_874_368 + 48 * router + head)
    # INT8 g256: a byte a weight and a float32 scale per 256 inputs; INT4 g128: half a byte and a
    # float32 scale and offset per 128 inputs.
    for mode, size in (("INT8", lambda n, k: n * (k + 4 * k // 256)),
                       ("INT4", lambda n, k: n * (k // 2 + 8 * k // 128))):
        lk = [planned_linear_bytes(n, k, mode.lower(), formats.group_size(mode.lower())) for n, k in attention]
        assert lk == [size(n, k) for n, k in attention]
        read = 48 * sum(lk) + size(151936, 2048) + 48 * 2 * router
        assert (plan.dense_bytes(shape, mode), plan.dense_bytes(shape, mode, per_token=True)) == (read + 2 * head, read)
    assert {mode: (plan.dense_bytes(shape, mode), plan.dense_bytes(shape, mode, True)) for mode in Q_DENSE} == Q_DENSE
    # Tied: vLLM's head is the embedding's tensor, read per token all the same; lk's INT4 head is a copy.
    tied = model_shape({**QWEN3_30B, "tie_word_embeddings": True})
    assert plan.dense_bytes(tied, "TO_DTYPE") == Q_WEIGHTS - 2 * head
    assert plan.dense_bytes(tied, "TO_DTYPE", per_token=True) == Q_DENSE["TO_DTYPE"][1]
    assert plan.dense_bytes(tied, "INT4") == Q_DENSE["INT4"][0]


def test_deepseek_like_dense_bytes():
    """DeepSeek-V3's shape in bf16 (MLA, 3 dense layers, a shared expert): per layer
    fused_qkv_a [1536 + 576, 7168], q_b [128 x 192, 1536], kv_b [128 x 256, 512] (vLLM's CPU MLA
    reads it itself: bf16), o [7168, 128 x 128]; dense MLP [2 x 18432, 7168] + [7168, 18432];
    shared expert [2 x 2048, 7168] + [7168, 2048]; router [256, 7168]; LM head [129280, 7168]."""
    shape = model_shape({**DEEPSEEK_V3, "quantization_config": None})
    kinds = {m.name: (m.outputs, m.inputs, m.count, m.on_lk) for m in shape.dense}
    assert kinds["fused_qkv_a_proj"] == (2112, 7168, 61, True) and kinds["kv_b_proj"] == (32768, 512, 61, False)
    assert kinds["gate_up_proj"] == (36864, 7168, 3, True)
    assert kinds["shared_expert.down_proj"] == (7168, 2048, 58, True)
    int4 = lambda n, k: n * k * 9 // 16   # half a byte + 8 bytes per 128 inputs
    layer = int4(2112, 7168) + int4(24576, 1536) + 2 * 32768 * 512 + int4(7168, 16384)
    assert layer == 129_363_968
    read = (61 * layer + 3 * (int4(36864, 7168) + int4(7168, 18432)) + 58 * (int4(4096, 7168) + int4(7168, 2048))
            + 58 * 2 * 256 * 7168 + int4(129280, 7168))
    assert plan.dense_bytes(shape, "INT4", per_token=True) == read == 10_730_991_616
    assert plan.dense_bytes(shape, "INT4") == read + 2 * 129280 * 7168
    # The FP8 checkpoint's projections stay FP8: INT4 takes only its bf16 LM head.
    fp8 = model_shape(DEEPSEEK_V3)
    assert plan.dense_bytes(fp8, "TO_DTYPE") == D_WEIGHTS
    assert plan.dense_bytes(fp8, "INT4") == D_WEIGHTS - 2 * 129280 * 7168 + int4(129280, 7168)


def test_compressed_tensors_projections_by_targets_and_ignore():
    """A compressed-tensors checkpoint stores its attention, dense MLPs and shared experts in 4 bits
    where a config group targets them ("Linear": every linear layer) and its ignore list (names, or
    "re:" patterns matched from the name's start, as vLLM's compressed-tensors config matches them)
    names none of them; else in the model dtype, as a float checkpoint's."""
    def shape(targets, ignore):
        group = {"targets": targets, "weights": {"num_bits": 4, "group_size": 32}}
        quant = {"quant_method": "compressed-tensors", "config_groups": {"group_0": group}, "ignore": ignore}
        return model_shape({**DEEPSEEK_V3, "quantization_config": quant})

    every = ("attention", "dense MLP", "shared expert")
    by_pattern = ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", r"re:.*mlp\.(gate|up|gate_up|down)_proj.*"]
    assert shape(["Linear"], ["lm_head", "re:.*mlp.gate$"]).storage.float_projections == ()
    assert shape(["Linear"], by_pattern).storage.float_projections == every
    assert shape(["re:.*mlp.experts.*"], []).storage.float_projections == every
    assert shape(["Linear"], ["model.layers.60.self_attn.o_proj"]).storage.float_projections == ("attention",)
    float_checkpoint = plan.dense_weight_bytes(model_shape({**DEEPSEEK_V3, "quantization_config": None}))
    assert plan.dense_weight_bytes(shape(["Linear"], by_pattern)) == float_checkpoint


def test_the_users_dense_format_is_kept(monkeypatch):
    monkeypatch.delenv("LVLLM_DENSE_USE_WEIGHT", raising=False)
    monkeypatch.delenv("LVLLM_DENSE_ON_LK", raising=False)
    assert plan.users_dense_mode() is None
    monkeypatch.setenv("LVLLM_DENSE_ON_LK", "OFF")   # allows TO_DTYPE only
    assert plan.users_dense_mode() == "TO_DTYPE"
    monkeypatch.setenv("LVLLM_DENSE_USE_WEIGHT", "int4")
    assert plan.users_dense_mode() == "INT4"
    monkeypatch.setenv("LVLLM_DENSE_USE_WEIGHT", "Q4")
    with pytest.raises(envs.EnvError, match="LVLLM_DENSE_USE_WEIGHT"):
        plan.users_dense_mode()
    result = plan.make_plan(model_shape(QWEN3_30B), machine(ram=40, cores=2, bandwidth=35), 4096, "TO_DTYPE")
    assert [r.dense_mode for r in result.rows] == ["TO_DTYPE"] * 3 and result.choice.modes == ("INT8",)
    assert result.choice.need == 48 * 128 * Q_EXPERT["int8"] + 2 * Q_LAYER_BF16 + GIB + Q_WEIGHTS
    assert "export LVLLM_DENSE_USE_WEIGHT=TO_DTYPE" in plan_command.render(result, "m")


def test_the_users_dense_group_is_counted():
    """LVLLM_DENSE_QUANT_GROUP_SIZE=32: INT4's float32 scale and offset come every 32 inputs, not
    128, a quarter byte a weight more in RAM and in what a token reads."""
    shape = model_shape(QWEN3_30B)
    weights = sum(m.count * m.outputs * m.inputs for m in shape.dense if float_on_lk(shape, m))
    for per_token in (False, True):
        extra = plan.dense_bytes(shape, "INT4", per_token, 32) - plan.dense_bytes(shape, "INT4", per_token)
        assert extra == weights * 8 // 32 - weights * 8 // 128
    ram = machine(ram=40, cores=2, bandwidth=35)
    default, grouped = (plan.make_plan(shape, ram, 4096, "INT4", group) for group in (None, 32))
    assert grouped.choice.need - default.choice.need == weights * 8 // 32 - weights * 8 // 128
    assert grouped.dense_group == 32 and grouped.choice.tok_s < default.choice.tok_s


# DeepSeek-V3 by hand (FP8 128x128 blocks; bf16 model dtype). One expert: 3 x 7168 x 2048 =
#   44,040,192 weights. Checkpoint layer: 256 x (44,040,192 + 4 x (32 x 56 + 56 x 16) block
#   scales) = 11,277,041,664. lk's fp8 g128: scales per 128 inputs of a row, 4096 x 56 +
#   7168 x 16 = 344,064 -> 45,416,448 an expert, 11,626,610,688 a layer.
# Outside the experts: MLA per layer q 7168 x 1536 + 1536 x 128 x 192, kv_a 7168 x 576, kv_b
#   512 x 128 x 256, o 128 x 128 x 7168 = 187,105,280 x 61 layers = 11,413,422,080; 3 dense
#   MLPs 3 x 3 x 7168 x 18432 = 1,189,085,184; 58 shared experts x 44,040,192 = 2,554,331,136:
#   15,156,838,400 FP8 bytes; embedding + LM head 2 x 129,280 x 7168 and routers 58 x 7168 x
#   256 = 1,959,788,544 bf16 weights: 3,919,577,088 bytes. Total 19,076,415,488.
# KV cache (MLA latent 512 + rope 64, bf16): 61 x 576 x 2 = 70,272 bytes a token.
D_CKPT_LAYER = 11_277_041_664
D_FP8_LAYER = 256 * 45_416_448
D_WEIGHTS = 19_076_415_488
D_KV_TOKEN = 70_272


def test_deepseek_v3_on_one_80_gib_gpu():
    shape = model_shape(DEEPSEEK_V3)
    assert shape.moe_layers == tuple(range(3, 61)) and shape.storage.format == "fp8_e4m3"
    assert checkpoint_layer_bytes(shape) == D_CKPT_LAYER
    result = plan.make_plan(shape, machine(ram=768, cores=64, bandwidth=200, gpus=1, gpu_gib=80, nodes=2), 32768)
    gpu = result.gpu
    assert (gpu.weights, gpu.kv_cache) == (D_WEIGHTS, 32768 * D_KV_TOKEN)
    # Ring for KEEP (fp8): 2 x 11,626,610,688 + unpacked bf16 256 x 44,040,192 x 2 = 45,801,799,680;
    # 77,309,411,328 - 19,076,415,488 - 2,302,672,896 - 2 GiB - ring = 7,981,039,616 < one layer.
    assert gpu.ring == 2 * D_FP8_LAYER + 256 * 44_040_192 * 2
    assert gpu.left == 7_981_039_616 and gpu.resident == ()
    keep = result.choice
    assert keep.modes == ("KEEP",) and keep.resolved.describe() == "fp8 g128"
    assert keep.held == 58 * D_FP8_LAYER and keep.need == 58 * D_FP8_LAYER + 2 * D_CKPT_LAYER  # 649.0 GiB
    assert keep.tok_s == pytest.approx(200e9 / (58 * 8 * 45_416_448))   # 9.49 tok/s
    assert row(result, "TO_DTYPE").held == 58 * 256 * 44_040_192 * 2   # 1218 GiB: does not fit
    assert not row(result, "TO_DTYPE").fits(768 * GIB)
    assert (result.threads, result.prefill_from) == (60, 128)


def test_deepseek_v3_on_eight_gpus():
    shape = model_shape(DEEPSEEK_V3)
    result = plan.make_plan(shape, machine(ram=512, cores=64, bandwidth=200, gpus=8, gpu_gib=80, nodes=2), 32768)
    gpu = result.gpu
    # Per rank: intermediate 2048 / 8 = 256; checkpoint layer 256 x (3 x 7168 x 256 + 4 x
    # (2 x 2 x 56 + 56 x 2)) = 1,409,630,208; weights / 8 = 2,384,551,936; MLA's KV cache is
    # not split; ring 2 x lk's fp8 layer / 8 + unpacked 256 x 3 x 7168 x 256 x 2 = 5,725,224,960.
    assert gpu.layer == 1_409_630_208 and gpu.weights == D_WEIGHTS // 8
    assert gpu.kv_cache == 32768 * D_KV_TOKEN and gpu.ring == 5_725_224_960
    # 77,309,411,328 - 2,384,551,936 - 2,302,672,896 - 2 GiB - 5,725,224,960 = 64,749,477,888
    # -> 45 layers: 3-47 resident, 13 on lk.
    assert gpu.left == 64_749_477_888 and gpu.resident == tuple(range(3, 48))
    assert result.lk_layers == tuple(range(48, 61)) and result.threads == 8
    assert result.choice.need == 13 * D_FP8_LAYER + 2 * D_CKPT_LAYER


# An ERNIE-4.5-VL config in Baidu's layout: experts, widths and MoE layers per modality [text, vision]
# (the layer ranges clipped to the 28 layers: 1-27 both).
ERNIE_VL = {
    "architectures": ["Ernie4_5_VLMoeForConditionalGeneration"], "model_type": "ernie4_5_moe_vl",
    "hidden_size": 2560, "intermediate_size": 12288, "num_hidden_layers": 28, "num_attention_heads": 20,
    "num_key_value_heads": 4, "head_dim": 128, "moe_num_experts": [64, 64], "moe_intermediate_size": [1536, 512],
    "moe_k": 6, "moe_num_shared_experts": 2, "moe_layer_start_index": [1, 1], "moe_layer_end_index": [29, 28],
    "moe_layer_interval": 1, "vocab_size": 103424, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "max_position_embeddings": 131072,
}
# A text expert 3 x 2560 x 1536 x 2 bytes = 23,592,960 in bf16, a vision expert 3 x 2560 x 512 x 2 =
# 7,864,320; a MoE layer holds 64 of each: 1,509,949,440 + 503,316,480 = 2,013,265,920.
E_TEXT_EXPERT, E_VISION_EXPERT = 23_592_960, 7_864_320
E_LAYER = 64 * (E_TEXT_EXPERT + E_VISION_EXPERT)


def test_ernie_vl_counts_its_text_and_vision_experts():
    """Both expert sets in every byte count, each its own MoE layer in vLLM (and lk engine): the
    layer's bytes are both sets'; a decode token reads top-k text experts; the prefill ring's slots and
    the load's two layers are the text set's (the larger); two routers a layer; a hot slot in each set."""
    from lvllm.dense_layout import DenseMatrix
    from lvllm.model_shape import dense_bytes

    shape = model_shape(ERNIE_VL)
    assert shape.moe_layers == tuple(range(1, 28))
    assert shape.expert_sets == (ExpertSet("text", 64, 1536), ExpertSet("vision", 64, 512))
    assert checkpoint_layer_bytes(shape) == E_LAYER
    assert DenseMatrix("gate", 64, 2560, 54, "router", on_lk=False) in shape.dense
    assert plan.hot_expert_bytes(shape, 1) == E_TEXT_EXPERT + E_VISION_EXPERT

    cpu = plan.make_plan(shape, machine(ram=256, cores=16, bandwidth=100), 8192)
    bf16 = next(r for r in cpu.rows if r.modes == ("TO_DTYPE",) and r.dense_mode == "TO_DTYPE")
    assert bf16.held == 27 * E_LAYER
    assert bf16.need == 27 * E_LAYER + 2 * 64 * E_TEXT_EXPERT + cpu.kv_space_gib * GIB + dense_bytes(shape, "TO_DTYPE")
    assert bf16.tok_s == pytest.approx(100e9 / (27 * 6 * E_TEXT_EXPERT + dense_bytes(shape, "TO_DTYPE", True)))

    gpu = plan.make_plan(shape, machine(ram=256, cores=16, bandwidth=100, gpus=1, gpu_gib=24), 8192).gpu
    assert gpu.layer == E_LAYER and gpu.ring == 3 * 64 * E_TEXT_EXPERT   # two bf16 slots + one unpacked

    ep = plan.make_plan(shape, machine(ram=256, cores=16, bandwidth=100), 8192, cpu_ranks=plan.Ranks(2, True))
    text = plan_command.render(ep, "m")
    assert "27 MoE: 64 text experts of 2560 x 1536 and 64 vision experts of 2560 x 512, 6 per token" in text
    assert "lk holds 32 of the 64 text experts and 32 of the 64 vision experts of every layer" in text
    with pytest.raises(ConfigError, match=r"vision experts in layers \[1, 2, 3, 4, 5\] of the MoE layers \[1, "):
        model_shape({**ERNIE_VL, "moe_layer_end_index": [29, 5]})


def test_every_layer_on_the_gpu_needs_no_lk():
    result = plan.make_plan(model_shape(QWEN3_30B), machine(ram=8, cores=2, bandwidth=35, gpus=1, gpu_gib=80), 4096)
    assert result.gpu.resident == tuple(range(48)) and result.lk_layers == () and result.feasible
    assert "export LVLLM_MOE_NUMA_ENABLED=0" in plan_command.render(result, "m")


def test_a_gpu_too_small_for_the_rest_of_the_model_is_no_plan():
    result = plan.make_plan(model_shape(QWEN3_30B), machine(ram=64, cores=2, bandwidth=35, gpus=1, gpu_gib=4), 4096)
    assert not result.feasible and "No plan: the GPU does not hold" in plan_command.render(result, "m")


def test_the_checkpoint_layer_bytes_are_what_vllm_creates():
    """model_shape's byte count against the params lvllm.vllm.checkpoint_sources creates."""
    pytest.importorskip("vllm")
    from lvllm.vllm.checkpoint_sources import (AwqInt4Source, CompressedTensorsInt4Source, Fp8BlockSource, Mxfp4Source,
                                               bias_params)
    from lvllm.vllm.expert_source_base import ExpertSource
    from lvllm.vllm.gptq_source import GptqSource

    cases = [({}, ExpertSource()), (DEEPSEEK_V3["quantization_config"], Fp8BlockSource((128, 128))),
             ({"quant_method": "mxfp4"}, Mxfp4Source()),
             ({"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {"num_bits": 4, "group_size": 32}}}},
              CompressedTensorsInt4Source(32)),
             ({"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True}, AwqInt4Source(64, True)),
             ({**QWEN3_GPTQ, "bits": 8, "group_size": 32}, GptqSource(8, 32, 32)),
             ({**QWEN3_GPTQ, "group_size": -1}, GptqSource(4, -1, 256))]
    for quant, source in cases:
        model_type = "gpt_oss" if quant.get("quant_method") == "mxfp4" else "qwen3_moe"
        shape = model_shape({**QWEN3_30B, "model_type": model_type, "quantization_config": quant})
        params = source.params(128, 2048, 768, torch.bfloat16)
        if model_type == "gpt_oss":   # a has_bias layer: LkMoEMethod.create_weights adds the biases
            params = {**params, **bias_params(128, 2048, 768)}
        expected = sum(torch.Size(s).numel() * d.itemsize for s, d, _ in params.values())
        assert checkpoint_layer_bytes(shape) == expected, quant


# quantization_config as GPTQModel writes it for Qwen's GPTQ-Int4 releases.
QWEN3_GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False,
              "checkpoint_format": "gptq", "lm_head": False, "pack_dtype": "int32"}


@pytest.mark.parametrize("quant, storage, per_weight", [
    # 4 bits + a float32 scale and offset per 128 inputs as lk holds it.
    ({}, ("int4", 128, False), 0.5 + 8 / 128),
    # 8 bits + a float32 scale per 32 inputs (INT8 has no offsets).
    ({"bits": 8, "group_size": 32}, ("int8", 32, False), 1 + 4 / 32),
    # Per channel: the scale repeated over groups of gcd(2048, 768) = 256.
    ({"group_size": -1}, ("int4", 256, True), 0.5 + 8 / 256),
])
def test_gptq_experts_are_kept_as_int4_or_int8(quant, storage, per_weight):
    shape = model_shape({**QWEN3_30B, "quantization_config": {**QWEN3_GPTQ, **quant}})
    assert (shape.storage.format, shape.storage.group, shape.storage.per_channel) == storage
    assert shape.storage.scheme == "gptq"
    keep = row(plan.make_plan(shape, machine(ram=96, cores=2, bandwidth=35), 4096), "KEEP")
    assert keep.held == pytest.approx(48 * 128 * 3 * 2048 * 768 * per_weight, rel=1e-3)


@pytest.mark.parametrize("quant, fact", [
    ({"sym": False}, "sym False"), ({"bits": 3}, "bits 3"), ({"desc_act": True}, "desc_act: true and group_size 128"),
    ({"group_size": 24}, "group_size 24"),
])
def test_gptq_configs_vllm_or_lk_refuse_name_the_field(quant, fact):
    with pytest.raises(ConfigError, match=f"x/config.json: GPTQ .*{fact}"):
        model_shape({**QWEN3_30B, "quantization_config": {**QWEN3_GPTQ, **quant}}, "x/config.json")


GPT_OSS_120B = {
    "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": 2880,
    "intermediate_size": 2880, "num_local_experts": 128, "num_experts_per_tok": 4,
    "num_hidden_layers": 36, "vocab_size": 201088, "num_attention_heads": 64,
    "num_key_value_heads": 8, "head_dim": 64, "max_position_embeddings": 131072,
    "torch_dtype": "bfloat16", "quantization_config": {"quant_method": "mxfp4"},
}


def test_gpt_oss_mxfp4_keeps_its_experts_as_stored():
    """One expert: 3 x 2880 x 2880 = 24,883,200 weights, 12,441,600 code bytes + 777,600 e8m0
    scales as the checkpoint holds them, and its biases, 2 x 2880 + 2880 float32 values (34,560
    bytes); KEEP holds the same values as TO_DTYPE in about a quarter of the RAM, so the plan takes it."""
    shape = model_shape(GPT_OSS_120B)
    assert (shape.storage.format, shape.storage.group, shape.moe_layers) == ("mxfp4", 32, tuple(range(36)))
    assert checkpoint_layer_bytes(shape) == 128 * (12_441_600 + 777_600 + 34_560)
    result = plan.make_plan(shape, machine(ram=96, cores=2, bandwidth=35), 4096)
    assert result.choice.modes[0] == "KEEP" and result.choice.resolved.name == "mxfp4"
    # 4.25 bits a weight (4-bit codes, an 8-bit scale per 32) against bf16's 16.
    assert row(result, "KEEP").held / row(result, "TO_DTYPE").held == pytest.approx(4.25 / 16, rel=0.01)
    with pytest.raises(ConfigError, match="not a format lk takes"):   # MXFP4 vLLM loads otherwise
        model_shape({**GPT_OSS_120B, "model_type": "other", "architectures": ["X"]})


def test_gpt_oss_reserves_no_prefill_ring():
    """gpt-oss's layers never stream (the streamed prefill lacks its expert biases and clamped
    activation), so a 48 GB GPU holds layers where the ring would have been."""
    shape = model_shape(GPT_OSS_120B)
    assert not shape.streamed_prefill and model_shape(QWEN3_30B).streamed_prefill
    result = plan.make_plan(shape, machine(ram=96, cores=16, bandwidth=35, gpus=1, gpu_gib=48), 32768)
    assert result.gpu.ring == 0 and result.prefill_from == 0 and result.lk_layers
    assert "no GPU prefill: the streamed prefill does not compute expert biases" in result.gpu.reason
    keep = plan.resolve(shape, "KEEP")
    assert result.gpu.resident == plan.gpu_fit(shape, 48 * GIB, 1, 32768, keep, None).resident
    ringed = plan.gpu_fit(shape, 48 * GIB, 1, 32768, keep, 1)
    assert ringed.ring > 0 and len(ringed.resident) < len(result.gpu.resident)


def test_moe_layers_by_the_rules_of_vllms_model_code():
    """The rules the sweep's tiny checkpoints (every layer, or the first one dense) leave
    untried: Llama 4's interleave step (vLLM's llama4.py: (i + 1) % step == 0), ERNIE 4.5's
    start, end (-1: the last) and interval (ernie45_moe.py), Step-3's list (step3_text.py)."""
    assert moe_layer_indices({"interleave_moe_layer_step": 2, "moe_layers": [0, 1, 2]}, 6) == (1, 3, 5)
    ernie = {"moe_layer_start_index": 1, "moe_layer_end_index": -1, "moe_layer_interval": 1}
    assert moe_layer_indices(ernie, 4) == (1, 2, 3)
    assert moe_layer_indices({**ernie, "moe_layer_end_index": 5, "moe_layer_interval": 2}, 8) == (1, 3, 5)
    assert moe_layer_indices({"moe_layers_enum": "4,5,6"}, 6) == (4, 5)
    # LongCat-Flash: num_layers decoder layers, whatever transformers' num_hidden_layers says.
    longcat = model_shape({**QWEN3_30B, "num_layers": 3, "num_hidden_layers": 6, "num_experts": None,
                           "n_routed_experts": 4, "num_experts_per_tok": None, "moe_topk": 2,
                           "moe_intermediate_size": None, "expert_ffn_hidden_size": 16})
    assert (longcat.num_layers, longcat.moe_layers, longcat.expert_sets, longcat.top_k) == (
        3, (0, 1, 2), (ExpertSet("", 4, 16),), 2)


def test_gemma4_full_attention_read_as_transformers_config_sets_it():
    """vLLM's Gemma 4 layers take their head size and K/V heads (for the weights and the KV cache) from per_layer_config
    (gemma4.py:578-580), which transformers' Gemma4TextConfig derives from global_head_dim and,
    with attention_k_eq_v, num_global_key_value_heads (512 and the common heads where unset): a
    config.json without per_layer_config is planned as the config class's own dict of it."""
    from transformers import Gemma4TextConfig

    sizes = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "enable_moe_block": True,
             "num_experts": 8, "top_k_experts": 2, "moe_intermediate_size": 32, "hidden_size_per_layer_input": 0,
             "layer_types": ["sliding_attention", "full_attention", "full_attention"], "sliding_window": 64}
    for own in ({}, {"global_head_dim": 64}, {"global_head_dim": 16},   # as the common head size: no overrides
                {"global_head_dim": 64, "num_global_key_value_heads": 1, "attention_k_eq_v": True}):
        raw = {"model_type": "gemma4_text", **sizes, **own}
        derived = Gemma4TextConfig(**sizes, **own).to_dict()
        assert "per_layer_config" not in raw and "per_layer_config" in derived
        assert model_shape(raw).dense == model_shape(derived).dense, own
        assert model_shape(raw).cache == model_shape(derived).cache, own


# Qwen3-Next-80B-A3B's config.json: no layer_types (transformers' config class makes every
# full_attention_interval-th layer full attention, the others Gated DeltaNet).
QWEN3_NEXT_80B = {"architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next", "hidden_size": 2048,
                  "num_hidden_layers": 48, "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256,
                  "full_attention_interval": 4, "linear_num_key_heads": 16, "linear_num_value_heads": 32,
                  "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4,
                  "num_experts": 512, "num_experts_per_tok": 10, "moe_intermediate_size": 512,
                  "shared_expert_intermediate_size": 512, "intermediate_size": 5120, "vocab_size": 151936,
                  "torch_dtype": "bfloat16"}
def test_kv_cache_of_hybrid_and_windowed_models():
    """A sequence's KV cache and states (test_architectures and test_families hold each layer's
    reading to vLLM's own KV cache spec): Qwen3-Next's 12 attention layers keep K and V of every
    token, its 36 Gated DeltaNet layers a fixed state; gpt-oss's sliding layers 128 tokens (GPT_OSS_120B
    names neither layer_types nor sliding_window: transformers' config class sets both)."""
    qwen = model_shape(QWEN3_NEXT_80B)
    # Attention: 12 layers x 2 K/V heads x (256 + 256) x 2 bytes = 24,576 bytes a token. A DeltaNet
    # layer: convolution 3 x (2 x 16 x 128 + 32 x 128) x 2 bytes = 49,152; state 32 x 128 x 128 =
    # 524,288 values, float32 on a CPU-only host (2,097,152), bf16 on a GPU (1,048,576).
    assert kv_cache_bytes(qwen, 32768) == 32768 * 24_576 + 36 * (49_152 + 2_097_152) == 882_573_312
    assert kv_cache_bytes(qwen, 32768, gpus=1) == 32768 * 24_576 + 36 * (49_152 + 1_048_576) == 844_824_576
    # Two GPUs: one K/V head each, half of each state.
    assert kv_cache_bytes(qwen, 32768, gpus=2) == 32768 * 12_288 + 36 * (49_152 + 1_048_576) // 2
    oss = model_shape(GPT_OSS_120B)
    # 18 full and 18 sliding layers of 8 K/V heads x (64 + 64) x 2 bytes = 2,048 bytes a token each.
    assert kv_cache_bytes(oss, 4096) == 18 * 2_048 * 4096 + 18 * 2_048 * 128 == 155_713_536
    assert kv_cache_bytes(oss, 100) == 36 * 2_048 * 100
    assert "KV cache 36.0 KiB per token in 18 layer(s), 18 sliding window layer(s) of 2.0 KiB per token over " \
           "the last 128 tokens" in plan_command.render(plan.make_plan(oss, machine(ram=512, cores=64, bandwidth=300),
                                                                      4096), "/models/gpt-oss")


def test_bad_input_is_refused_with_the_file_and_what_is_valid(tmp_path):
    with pytest.raises(ConfigError, match="no experts|describes no routed experts"):
        model_shape({"hidden_size": 8, "num_hidden_layers": 2}, "x/config.json")
    with pytest.raises(ConfigError, match="x/config.json: quantization_config .*hqq.* not a format lk takes"):
        model_shape({**QWEN3_30B, "quantization_config": {"quant_method": "hqq", "bits": 4}}, "x/config.json")
    with pytest.raises(ConfigError, match="--model .*missing.*config.json"):
        read_config(tmp_path / "missing")
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_30B))
    done = subprocess.run([sys.executable, "-m", "lvllm._vllm_cli", "plan", "--model", str(tmp_path), "--ram", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--ram must be above 0" in done.stderr
    done = subprocess.run([sys.executable, "-m", "lvllm._vllm_cli", "plan", "--model", str(tmp_path), "--ram", "19",
                           "--bandwidth", "35", "--cores", "2", "--max-model-len", "4096"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "No plan" in done.stdout, done.stdout
    assert "LVLLM_MOE_USE_WEIGHT" in done.stdout and "fits 19.0 GiB" in done.stdout, done.stdout


# --------------------------------------------------------------------------------------
# LVLLM_GPU_RESIDENT_MOE_LAYERS=auto
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw", ["auto", "AUTO", " Auto "])
def test_auto_parses(monkeypatch, raw):
    monkeypatch.setenv(RESIDENT_VAR, raw)
    assert Settings.from_env().resident_layers == envs.AUTO


def test_placement_asks_for_the_auto_layers_once():
    asked = []
    placement = Placement(resident=envs.AUTO, auto_resident=lambda: asked.append(1) or frozenset({0, 1}))
    paths = [placement.place(i, f"model.layers.{i}.mlp.experts", 4) for i in range(4)]
    assert paths == [LayerPath.DEVICE, LayerPath.DEVICE, LayerPath.LK, LayerPath.LK] and asked == [1]


def _vllm_process(monkeypatch, config: dict, cuda: bool, gpu_gib: float = 24):
    """lvllm.vllm.installation as a vLLM worker sees it: the model's config, the platform, the GPU."""
    pytest.importorskip("vllm")
    installation = importlib.import_module("lvllm.vllm.installation")   # lvllm.vllm.installation is also a function

    hf = SimpleNamespace(to_dict=lambda: dict(config))
    vllm_config = SimpleNamespace(
        model_config=SimpleNamespace(hf_config=hf, model="/models/m", dtype=torch.bfloat16, max_model_len=32768),
        parallel_config=SimpleNamespace(tensor_parallel_size=1),
        cache_config=SimpleNamespace(gpu_memory_utilization=0.9))
    monkeypatch.setattr(installation, "get_current_vllm_config", lambda: vllm_config)
    monkeypatch.setattr(installation.current_platform, "is_cuda", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _: SimpleNamespace(total_memory=int(gpu_gib * GIB)))
    return installation


def test_auto_resolves_to_the_plans_layers(monkeypatch, caplog):
    installation = _vllm_process(monkeypatch, QWEN3_30B, cuda=True)
    settings = Settings(resident_layers=envs.AUTO, gpu_prefill_min_batch=512)   # the plan's settings
    expected = plan.make_plan(model_shape(QWEN3_30B), machine(64, 16, 100, gpus=1, gpu_gib=24), 32768).gpu.resident
    with caplog.at_level(logging.INFO, logger="vllm.lvllm"):
        assert installation.auto_split(settings) == (frozenset(expected), 0) == (frozenset(range(9)), 0)
    assert "=auto: MoE layers [0-8] resident on cuda:0" in caplog.text and "prefill ring" in caplog.text
    # Without streaming, the ring's 3.6 GB hold 3 more layers (14,742,349,414 / 1,207,959,552).
    assert installation.auto_split(Settings(resident_layers=envs.AUTO))[0] == frozenset(range(12))


def test_auto_on_cpu_means_no_resident_layers(monkeypatch, caplog):
    installation = _vllm_process(monkeypatch, QWEN3_30B, cuda=False)
    with caplog.at_level(logging.INFO, logger="vllm.lvllm"):
        assert installation.auto_split(Settings(resident_layers=envs.AUTO, hot_experts=envs.AUTO)) == (frozenset(), 0)
    assert "=auto and LVLLM_HOT_EXPERTS=auto: no resident MoE layers, no hot experts (no GPU" in caplog.text


def test_hot_experts_auto_takes_the_resident_layers_memory_where_it_serves_more_picks():
    """lvllm.plan.auto_split: Qwen3-30B-A3B on 24 GiB without a prefill ring, 12 resident layers,
    or their memory as 32 hot experts a layer. A skewed statistics file puts more picks on the hot
    experts (Zipf 1: 70% where the 12 layers hold 25%); a uniform one does not: layers stay."""
    from lvllm.hot_experts import synthetic_counts

    shape = model_shape(QWEN3_30B)
    fit = plan.gpu_fit(shape, 24 * GIB, 1, 32768, plan.resolve(shape, "TO_DTYPE", None), None)
    slots = plan.hot_slots(shape, fit.left, 1)
    assert slots == fit.left // (48 * (checkpoint_layer_bytes(shape) // 128)) and fit.resident == tuple(range(12))
    skewed = synthetic_counts(48, 128, 8, skew=1.0, tokens=2000)
    resident, hot, why = plan.auto_split(shape, fit, 1, skewed, resident_auto=True)
    layer_share, hot_share = plan.picks_shares(shape, skewed, fit.resident, slots)
    assert (resident, hot) == (frozenset(), slots) and hot_share > 0.6 > 0.3 > layer_share
    assert f"hold {hot_share:.0%} of the file's picks, whole layers [0-11] {layer_share:.0%}" in why
    uniform = {layer: [100] * 128 for layer in range(48)}
    assert plan.auto_split(shape, fit, 1, uniform, resident_auto=True)[:2] == (frozenset(range(12)), 0)
    # Resident layers listed: the hot slots take what is left after them.
    resident, hot, _ = plan.auto_split(shape, fit, 1, uniform, resident_auto=False, resident=frozenset({0, 1}))
    assert resident == {0, 1} and hot == plan.hot_slots(shape, fit.left - 2 * fit.layer, 1) < slots
    # An FP8 checkpoint's hot experts are bf16 copies unpacked from lk: as many slots as bf16's.
    fp8 = model_shape(QWEN3_30B | {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}})
    assert plan.hot_slots(fp8, fit.left, 1) == slots == fit.left // (48 * Q_EXPERT["bf16"])
    assert plan.auto_split(fp8, fit, 1, skewed, resident_auto=True)[1] == slots
    gelu = model_shape(QWEN3_30B | {"hidden_act": "gelu"})
    assert gelu.expert_activation != "silu" and plan.hot_slots(gelu, fit.left, 1) == 0


def test_hot_experts_auto_on_a_gpu_reads_the_statistics_file(monkeypatch, tmp_path, caplog):
    from lvllm.hot_experts import synthetic_counts

    installation = _vllm_process(monkeypatch, QWEN3_30B, cuda=True)
    stats = tmp_path / "stats.json"
    expert_stats.write(stats, {"name": "/models/m"}, "dp0-pp0", synthetic_counts(48, 128, 8, skew=1.0, tokens=2000))
    settings = Settings(resident_layers=envs.AUTO, hot_experts=envs.AUTO, expert_stats=str(stats))
    with caplog.at_level(logging.INFO, logger="vllm.lvllm"):
        resident, hot = installation.auto_split(settings)
    assert resident == frozenset() and hot > 8
    assert f"MoE layers [none] resident, {hot} hot experts a layer on cuda:0" in caplog.text
    assert installation.auto_split(Settings(hot_experts=envs.AUTO))[0] == frozenset()   # no file: slots anyway
    monkeypatch.setenv("LVLLM_HOT_EXPERTS", "auto")
    monkeypatch.setenv("LVLLM_EXPERT_STATS", str(stats))
    assert Settings.from_env().hot_experts == envs.AUTO


def test_the_command_lists_lvllms_subcommands_before_vllms_help(capsys):
    from lvllm._vllm_cli import LVLLM_COMMANDS, lvllm_command

    assert lvllm_command(["lvllm", "--help"]) is None   # vLLM's parser prints its own help next
    listed = capsys.readouterr().out
    assert all(f"lvllm {name} --model PATH" in listed for name in LVLLM_COMMANDS) and set(LVLLM_COMMANDS) == {"plan", "doctor"}


def test_hot_experts_weighed_against_the_resident_layers(tmp_path, capsys):
    """--stats: the resident layers' GPU memory as hot experts in all 48 layers, by hand: each
    layer's 4 favoured experts took 10 picks of the 164 (10 x 4 + 124 x 1); the slots are what
    the memory holds at 9,437,184 bytes a bf16 expert; host reads shrink by the GPU's share."""
    shape = model_shape(QWEN3_30B)
    result = plan.make_plan(shape, machine(ram=96, cores=16, bandwidth=100, gpus=1, gpu_gib=24), 32768)
    counts = {layer: [10] * 4 + [1] * 124 for layer in range(48)}
    hot = plan.hot_alternative(result, counts)
    slots = result.gpu.left // (48 * Q_EXPERT["bf16"])
    assert hot.slots == slots > 4
    assert hot.hot_share == pytest.approx((40 + slots - 4) / 164)
    assert hot.layer_share == pytest.approx(len(result.gpu.resident) / 48)
    lk_expert = plan.lk_layer_bytes(shape, result.choice.resolved) / 128
    assert hot.hot_tok_s == pytest.approx(100e9 / (48 * 8 * lk_expert * (1 - hot.hot_share)))
    assert hot.layer_tok_s == result.choice.tok_s and hot.hot_tok_s > hot.layer_tok_s

    (tmp_path / "config.json").write_text(json.dumps(QWEN3_30B))
    identity = {"name": "x", "architectures": ["Qwen3MoeForCausalLM"], "num_hidden_layers": 48,
                "num_experts": 128, "top_k": 8}
    expert_stats.write(tmp_path / "stats.json", identity, "dp0-pp0", counts)
    args = ["--model", str(tmp_path), "--ram", "96", "--cores", "16", "--bandwidth", "100", "--stats",
            str(tmp_path / "stats.json")]
    plan_command.main(args + ["--gpus", "1", "--gpu-memory", "24", "--max-model-len", "32768"])
    text = capsys.readouterr().out
    assert f"holds {slots} of 128 experts in each of the 48 MoE layers" in text
    assert f"LVLLM_HOT_EXPERTS={slots} LVLLM_EXPERT_STATS={tmp_path / 'stats.json'}" in text
    with pytest.raises(SystemExit):
        plan_command.main(args)   # no GPU
    assert "--stats weighs hot experts on a GPU" in capsys.readouterr().err
    expert_stats.write(tmp_path / "other.json", {**identity, "num_experts": 64}, "dp0-pp0", {0: [1] * 64})
    with pytest.raises(SystemExit):
        plan_command.main(args[:-1] + [str(tmp_path / "other.json"), "--gpus", "1", "--gpu-memory", "24"])
    assert "its model has num_experts 64, this one 128" in capsys.readouterr().err
