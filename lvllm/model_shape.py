"""A MoE checkpoint's shape as its config.json states it: layers, expert shapes, attention,
the experts' stored format, the dense matrices. Read without vLLM, for ``lvllm plan`` and
``lvllm doctor``."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

from lvllm import formats
from lvllm.config_keys import (EXPERT_COUNT_KEYS, EXPERT_WIDTH_KEYS, LAYER_KEYS, TOP_K_KEYS, ConfigError,
                               expert_activation, first_set, moe_layer_indices)
from lvllm.dense_layout import DenseMatrix, dense_matrices_of
from lvllm.kv_layout import FULL, STATE, CacheLayer, cache_layers, sequence_bytes
from lvllm.placement import streams_in_gpu_prefill

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class ExpertStorage:
    """How the checkpoint stores the routed experts: lk's format name ("float" for the model
    dtype) and the inputs per scale of a quantized one."""

    format: str
    group: int | None = None
    scheme: str = "float"   # float, fp8-block, compressed-tensors, awq, gptq, mxfp4, nvfp4
    block: tuple[int, int] | None = None   # FP8 block: (rows, inputs) per scale
    zero_point: bool = False
    per_channel: bool = False   # GPTQ group_size -1: one scale per output (group: lk's repeat)
    float_projections: tuple[str, ...] = ()   # PROJECTIONS kinds the checkpoint leaves unquantized

    @property
    def bits(self) -> int:
        return 8 if self.format == "int8" else 4


@dataclass(frozen=True)
class ModelShape:
    architecture: str
    num_layers: int
    moe_layers: tuple[int, ...]
    hidden: int
    intermediate: int           # per routed expert
    experts: int
    top_k: int
    dtype: str                  # the model dtype vLLM computes in
    storage: ExpertStorage
    vocab: int
    tied_embeddings: bool
    dense: tuple[DenseMatrix, ...]   # every weight matrix outside the routed experts (lvllm.dense_layout)
    cache: tuple[CacheLayer, ...]    # what each layer keeps in the KV cache (lvllm.kv_layout)
    max_positions: int
    expert_activation: str = "silu"
    expert_biases: bool = False

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def streamed_prefill(self) -> bool:
        """Whether long prompts may stream this model's experts to the GPU."""
        return streams_in_gpu_prefill(self.expert_activation, self.expert_biases)


def _gptq_storage(quant: dict, where: str, hidden: int, intermediate: int) -> ExpertStorage:
    """GPTQ as vLLM 0.32 reads it (lvllm.vllm.gptq_source): 4 or 8 bits, sym, no desc_act
    with groups; group_size -1 per channel."""
    bits, group = quant.get("bits"), quant.get("group_size")
    if bits not in (4, 8) or quant.get("sym") is not True:
        raise ConfigError(f"{where}: GPTQ with bits {bits}, sym {quant.get('sym')} (vLLM 0.32 and "
                          "lk take bits 4 or 8 with sym: true)")
    if quant.get("desc_act") and group != -1:
        raise ConfigError(f"{where}: GPTQ with desc_act: true and group_size {group} (vLLM 0.32 "
                          "takes desc_act: false, or group_size -1)")
    name = "int8" if bits == 8 else "int4"
    if group == -1 and formats.per_channel_group(hidden, intermediate):
        return ExpertStorage(name, formats.per_channel_group(hidden, intermediate), "gptq", per_channel=True)
    if not isinstance(group, int) or group <= 0 or group % 16 or hidden % group or intermediate % group:
        raise ConfigError(f"{where}: GPTQ group_size {group} with hidden size {hidden} and expert "
                          f"intermediate size {intermediate} (lk takes a multiple of 16 dividing "
                          "both, or -1 where a multiple of 16 divides both)")
    return ExpertStorage(name, group, "gptq")


def _modelopt_storage(quant: dict, where: str) -> ExpertStorage:
    """NVIDIA ModelOpt as vLLM 0.32 reads it (lvllm.vllm.nvfp4_source): config.json's
    quantization_config, or hf_quant_config.json's {"quantization": {...}}; NVFP4 only, in
    groups of 16 (vLLM's default where the config names none)."""
    inner = quant["quantization"] if isinstance(quant.get("quantization"), dict) else quant
    algo, group = str(inner.get("quant_algo") or "").upper(), inner.get("group_size") or 16
    if algo not in ("NVFP4", "W4A16_NVFP4"):
        raise ConfigError(f"{where}: ModelOpt quant_algo {inner.get('quant_algo')!r} (lk takes NVFP4 and "
                          "W4A16_NVFP4 experts)")
    if group != 16:
        raise ConfigError(f"{where}: ModelOpt NVFP4 with group_size {group} (lk takes 16)")
    return ExpertStorage("nvfp4", 16, "nvfp4")


def expert_storage(quant: dict | None, where: str, model_type: str = "", hidden: int = 0,
                   intermediate: int = 0) -> ExpertStorage:
    """The experts' stored format from a quantization_config, refusing what lk cannot take."""
    if not quant:
        return ExpertStorage("float")
    method = str(quant.get("quant_method", "")).lower()
    if method == "gptq":
        return _gptq_storage(quant, where, hidden, intermediate)
    if method.startswith("modelopt") or (quant.get("producer") or {}).get("name") == "modelopt":
        return _modelopt_storage(quant, where)
    if method == "mxfp4" and model_type == "gpt_oss":   # the MXFP4 layout vLLM loads for lk
        return ExpertStorage("mxfp4", 32, "mxfp4")
    if method == "fp8" and quant.get("weight_block_size"):
        rows, inputs = quant["weight_block_size"]
        return ExpertStorage("fp8_e4m3", int(inputs), "fp8-block", (int(rows), int(inputs)))
    if method == "compressed-tensors":
        for group in (quant.get("config_groups") or {}).values():
            weights = group.get("weights") or {}
            if weights.get("num_bits") == 4 and weights.get("group_size"):
                return ExpertStorage("int4", int(weights["group_size"]), "compressed-tensors")
    if method == "awq" and quant.get("bits", 4) == 4 and quant.get("group_size"):
        return ExpertStorage("int4", int(quant["group_size"]), "awq",
                             zero_point=bool(quant.get("zero_point")))
    raise ConfigError(f"{where}: quantization_config {json.dumps(quant)[:200]} is not a format lk "
                      "takes (float, FP8 with weight_block_size, compressed-tensors pack-quantized "
                      "4-bit groups, AWQ 4-bit, GPTQ 4/8-bit, ModelOpt NVFP4, gpt-oss MXFP4)")


# A module of each PROJECTIONS kind by its checkpoint name after "model.layers.N.", probed against a
# compressed-tensors config's targets and ignore list (Kimi K2.5's names its attention, dense MLPs and
# shared experts in ignore, keeping them bf16; a "re:.*self_attn.*" pattern would name them as well).
PROJECTION_PROBES = {"attention": ("self_attn.o_proj",), "dense MLP": ("mlp.down_proj",),
                     "shared expert": ("mlp.shared_experts.down_proj", "mlp.shared_expert.down_proj")}


def _names_module(entries: list[str], module: str) -> bool:
    """Whether a compressed-tensors targets or ignore entry names the module as vLLM matches them
    (config_utils.is_equal_or_regex_match): the name itself, or a "re:" pattern matched from its start;
    targets' "Linear" names every projection."""
    return any(entry in (module, "Linear") or (entry.startswith("re:") and re.match(entry[3:], module))
               for entry in entries)


def compressed_float_projections(quant: dict, num_layers: int) -> tuple[str, ...]:
    """The PROJECTIONS kinds a compressed-tensors checkpoint stores unquantized: those no config
    group targets, or its ignore list names on some layer (probed on each: the checkpoints seen
    ignore a kind on every layer that has it, or on none)."""
    targets = [t for group in (quant.get("config_groups") or {}).values() for t in group.get("targets") or ()]
    ignore = [entry for entry in quant.get("ignore") or () if entry != "Linear"]
    modules = {kind: [f"model.layers.{i}.{probe}" for i in range(num_layers) for probe in probes]
               for kind, probes in PROJECTION_PROBES.items()}
    return tuple(kind for kind, names in modules.items()
                 if not any(_names_module(targets, m) for m in names) or any(_names_module(ignore, m) for m in names))


def refuse_experts_per_modality(config: dict, where: str = "config.json") -> None:
    """ConfigError where the config counts its experts per modality (ERNIE-4.5-VL: [text, vision],
    which vLLM builds as two MoE layers per decoder layer, of different widths): plan and doctor
    take one kind of expert per layer."""
    text = config.get("text_config") or config
    experts = first_set(text, *EXPERT_COUNT_KEYS)
    if isinstance(experts, list):
        raise ConfigError(f"{where}: experts per modality ({experts}: ERNIE-4.5-VL's text and vision experts, "
                          "two MoE layers per decoder layer in vLLM), which lvllm plan and doctor do not "
                          "split yet")


# What transformers' config classes fill in where config.json leaves it out (Qwen3-Next's layer_types
# from full_attention_interval, gpt-oss's alternation and window), which vLLM reads so.
COMPLETED_KEYS = ("layer_types", "sliding_window")


def completed(text: dict, model_type: str) -> dict:
    """The text config with COMPLETED_KEYS as transformers' config class for the model type sets
    them; as it stands where transformers has no class for it or cannot build it."""
    if all(text.get(key) is not None for key in COMPLETED_KEYS):
        return text
    from transformers import AutoConfig

    try:
        built = AutoConfig.for_model(model_type, **{k: v for k, v in text.items() if k != "model_type"})
    except Exception:   # noqa: BLE001 - no class for the model type, or a partial config it refuses
        return text
    return {**text, **{key: getattr(built, key, None) for key in COMPLETED_KEYS}}


def model_shape(config: dict, where: str = "config.json", dtype: str | None = None) -> ModelShape:
    """The shape of a MoE model from its Hugging Face config (``where`` names it in errors)."""
    refuse_experts_per_modality(config, where)
    text = config.get("text_config") or config
    experts = first_set(text, *EXPERT_COUNT_KEYS)
    if not experts and isinstance(text.get("ffn_config"), dict):
        raise ConfigError(f"{where}: DBRX's layout, its experts in ffn_config (moe_num_experts, moe_top_k, "
                          "ffn_hidden_size) and its attention in attn_config (kv_n_heads), which lvllm plan "
                          "does not read (vLLM 0.32 cannot load DBRX either: dbrx.py's load_weights)")
    if not experts:
        raise ConfigError(f"{where} describes no routed experts (no {', '.join(EXPERT_COUNT_KEYS)}): "
                          "lvllm plans only Mixture-of-Experts models")
    needed = [("hidden_size",), LAYER_KEYS, TOP_K_KEYS, ("vocab_size",), (*EXPERT_WIDTH_KEYS, "intermediate_size")]
    missing = [" or ".join(keys) for keys in needed if first_set(text, *keys) is None]
    if missing:
        raise ConfigError(f"{where} lacks {', '.join(missing)}")
    hidden, layers = int(text["hidden_size"]), int(first_set(text, *LAYER_KEYS))
    intermediate = int(first_set(text, *EXPERT_WIDTH_KEYS, "intermediate_size"))
    dtype = dtype or str(first_set(text, "torch_dtype", "dtype",
                                   default=first_set(config, "torch_dtype", "dtype", default="bfloat16")))
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"{where}: model dtype {dtype!r} is not one vLLM computes MoE in here "
                          f"(valid: {', '.join(DTYPE_BYTES)})")
    model_type = str(text.get("model_type", config.get("model_type", "")))
    typed = {**completed(text, model_type), "model_type": model_type}
    moe_layers = moe_layer_indices(text, layers)
    quant = config.get("quantization_config") or text.get("quantization_config")
    storage = expert_storage(quant, where, model_type, hidden, intermediate)
    if storage.scheme == "compressed-tensors":
        storage = replace(storage, float_projections=compressed_float_projections(quant, layers))
    return ModelShape(
        architecture=(config.get("architectures") or [config.get("model_type", "?")])[0],
        num_layers=layers, moe_layers=moe_layers, hidden=hidden,
        intermediate=intermediate, experts=int(experts), top_k=int(first_set(text, *TOP_K_KEYS)),
        dtype=dtype, storage=storage,
        vocab=int(text["vocab_size"]), tied_embeddings=bool(first_set(text, "tie_word_embeddings", default=False)),
        dense=dense_matrices_of(typed, where, layers, moe_layers, int(experts), intermediate),
        cache=cache_layers(typed, where, layers),
        max_positions=int(text.get("max_position_embeddings") or 4096),
        expert_activation=expert_activation(typed),
        expert_biases=model_type == "gpt_oss",   # gpt-oss's experts: biases and the clamped swiglu
    )


def read_config(model: str | Path) -> tuple[dict, Path]:
    """(config.json's content, its path) of a checkpoint directory given as ``--model``."""
    path = Path(model).expanduser()
    config = path / "config.json" if path.is_dir() else path
    if not config.is_file():
        raise ConfigError(f"--model {model}: no {config} (give a local checkpoint directory holding "
                          "config.json; Hugging Face repo ids are not fetched)")
    try:
        content = json.loads(config.read_text())
        # ModelOpt before 0.31 states its quantization in hf_quant_config.json only (vLLM reads it there).
        side = config.parent / "hf_quant_config.json"
        if "quantization_config" not in content and side.is_file():
            content["quantization_config"] = json.loads(side.read_text())
        return content, config
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"{config} is not readable JSON: {error}") from None


# --------------------------------------------------------------------------------------
# bytes
# --------------------------------------------------------------------------------------

def checkpoint_layer_bytes(shape: ModelShape, experts: int | None = None, tp: int = 1) -> int:
    """One MoE layer's routed experts as vLLM holds them before lk converts them (and as a
    device-resident layer keeps them): lvllm.vllm.checkpoint_sources' params."""
    e = shape.experts if experts is None else experts
    h, i = shape.hidden, shape.intermediate // tp
    weights = 3 * h * i
    storage = shape.storage
    if storage.scheme == "float":
        return e * weights * shape.dtype_bytes
    if storage.scheme == "fp8-block":
        (rows13, inputs13), (rows2, inputs2) = formats.fp8_block_scale_shapes(h, i, storage.block)
        return e * (weights + 4 * (rows13 * inputs13 + rows2 * inputs2))
    groups = weights // storage.group
    if storage.scheme == "mxfp4":   # two e2m1 codes a byte, one e8m0 byte a group (biases left out)
        return e * (weights // 2 + groups)
    if storage.scheme == "nvfp4":   # one e4m3 byte a group; weight_scale_2 and input_scale: 3 float32 each
        return e * (weights // 2 + groups + 4 * 6)
    if storage.scheme == "compressed-tensors":   # int32 words of 8 values, float32 scales, shapes
        return e * (weights // 2 + 4 * groups + 2 * 2 * 4)
    if storage.scheme == "gptq":   # bits a weight, float32 scales, qzeros of as many bits a scale
        scales = 2 * i + h if storage.per_channel else groups
        return e * (weights * storage.bits // 8 + 4 * scales + scales * storage.bits // 8)
    return e * (weights // 2 + 4 * groups + groups // 2)   # AWQ: + int32 qzeros, 8 per word


# Decoder-layer projections (a token mixer's, "attention", or an MLP's): a quantized checkpoint
# stores them as it stores the experts; lvllm.dense_layout's other kinds stay float.
PROJECTIONS = ("attention", "dense MLP", "shared expert")
# Checkpoint schemes whose projections stay float (MXFP4 checkpoints quantize the experts only;
# NVFP4 ones as vLLM's CPU build needs them, their projections in exclude_modules: one that
# quantizes them is counted here at the model dtype's bytes).
FLOAT_PROJECTIONS = ("float", "mxfp4", "nvfp4")


def quantized_projection(shape: ModelShape, matrix: DenseMatrix) -> bool:
    """Whether the checkpoint stores the matrix as it stores the experts."""
    return (matrix.kind in PROJECTIONS and shape.storage.scheme not in FLOAT_PROJECTIONS
            and matrix.kind not in shape.storage.float_projections)


def stored_bytes(shape: ModelShape, matrix: DenseMatrix) -> int:
    """A matrix's bytes as the checkpoint loads it: quantized projections take the experts' stored
    bytes per weight (FP8 and 8-bit integers: 1, 4-bit integers: 0.5), the rest the model dtype."""
    if quantized_projection(shape, matrix):
        eight_bits = shape.storage.scheme == "fp8-block" or shape.storage.format == "int8"
        return int(matrix.weights * (1 if eight_bits else 0.5))
    return matrix.weights * shape.dtype_bytes


def float_on_lk(shape: ModelShape, matrix: DenseMatrix) -> bool:
    """Whether LVLLM_DENSE_USE_WEIGHT's INT8 / INT4 quantize it: float in the checkpoint and lk takes it."""
    return matrix.on_lk and not quantized_projection(shape, matrix)


def tied_head(shape: ModelShape, matrix: DenseMatrix) -> bool:
    """An LM head tied to the embedding: vLLM holds one tensor for both."""
    return matrix.kind == "LM head" and shape.tied_embeddings


def dense_weight_bytes(shape: ModelShape, tp: int = 1) -> int:
    """Weights outside the routed experts as the checkpoint loads them (as they sit on the GPU), per rank."""
    return sum(stored_bytes(shape, m) for m in shape.dense if not tied_head(shape, m)) // tp


def state_bytes(shape: ModelShape, gpus: int) -> int:
    """Bytes a value of a recurrent state: float32 on CPU-only hosts, where vLLM's CPU platform sets
    mamba_ssm_cache_dtype to float32 (on CPUs with AVX-512 BF16; an upper bound on others), else
    the model dtype."""
    return shape.dtype_bytes if gpus else 4


def kv_cache_bytes(shape: ModelShape, tokens: int, gpus: int = 0) -> int:
    """The KV cache and states one sequence of ``tokens`` holds, per rank of ``gpus`` (0: CPU only)."""
    return sequence_bytes(shape.cache, tokens, shape.dtype_bytes, state_bytes(shape, gpus), max(1, gpus))


def kv_token_bytes(shape: ModelShape) -> int:
    """K and V a token adds in the layers that keep the whole sequence."""
    return sum(layer.count * layer.kv_heads * layer.head_elements * shape.dtype_bytes
               for layer in shape.cache if layer.kind == FULL)


def describe_cache(shape: ModelShape) -> str:
    """The KV cache per token of the layers that keep every token, then what the windowed and
    state layers keep, for plan's summary."""
    full = sum(layer.count for layer in shape.cache if layer.kind == FULL)
    parts = [f"KV cache {kv_token_bytes(shape) / 1024:.1f} KiB per token in {full} layer(s)"]
    for layer in shape.cache:
        if layer.kind == STATE:
            size = kv_cache_bytes(replace(shape, cache=(replace(layer, count=1),)), 0)
            parts.append(f"{layer.count} state layer(s) of {size / 1024:.1f} KiB per sequence")
        elif layer.kind != FULL:
            per_token = layer.kv_heads * layer.head_elements * shape.dtype_bytes
            parts.append(f"{layer.count} {layer.kind} layer(s) of {per_token / 1024:.1f} KiB per token "
                         f"over the last {layer.window} tokens")
    return ", ".join(parts)


def _lk_dense_bytes(matrix: DenseMatrix, mode: str, group: int | None) -> int:
    """What lk holds of a matrix quantized by LVLLM_DENSE_USE_WEIGHT=mode (INT8 or INT4) in groups
    of ``group`` inputs (None: the format's default)."""
    from lvllm.lk.linear import planned_linear_bytes

    name = mode.lower()
    return matrix.count * planned_linear_bytes(matrix.outputs, matrix.inputs, name, formats.group_size(name, group))


def dense_bytes(shape: ModelShape, mode: str, per_token: bool = False, group: int | None = None) -> int:
    """The host's bytes of the weights outside the routed experts under LVLLM_DENSE_USE_WEIGHT=mode
    (no GPU) and LVLLM_DENSE_QUANT_GROUP_SIZE=group; ``per_token``: those a decode token reads
    (all but the embedding, of which one row)."""
    total = 0
    for matrix in shape.dense:
        quantized = mode != "TO_DTYPE" and float_on_lk(shape, matrix)
        if per_token and matrix.kind == "embedding":
            continue
        if not per_token and tied_head(shape, matrix) and not quantized:   # the embedding's tensor
            continue
        total += _lk_dense_bytes(matrix, mode, group) if quantized else stored_bytes(shape, matrix)
    return total
