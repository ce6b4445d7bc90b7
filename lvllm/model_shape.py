"""A MoE checkpoint's shape as its config.json states it: layers, expert shapes, attention,
the experts' stored format, the dense matrices. Read without vLLM, for ``lvllm plan`` and
``lvllm doctor``."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from lvllm import formats
from lvllm.checkpoint_storage import PROJECTION_KINDS, ExpertStorage, expert_storage, float_projections
from lvllm.config_keys import (EXPERT_COUNT_KEYS, EXPERT_WIDTH_KEYS, LAYER_KEYS, MODALITIES, MODALITY_RANGE_KEYS,
                               TOP_K_KEYS, ConfigError, expert_activation, first_set, moe_layer_indices)
from lvllm.dense_layout import DenseMatrix, dense_matrices_of
from lvllm.kv_layout import FULL, STATE, CacheLayer, cache_layers, layer_bytes, sequence_bytes
from lvllm.placement import streams_in_gpu_prefill

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class ExpertSet:
    """One kind of routed expert every MoE layer holds, behind its own router: vLLM builds a MoE
    layer (a FusedMoE, each its own lk engine) of each. Most models have one; ERNIE-4.5-VL, whose
    config counts experts per modality, a text set and a vision set."""

    modality: str   # "text" or "vision" where the config counts experts per modality, else ""
    count: int
    width: int      # each expert's intermediate size

    @property
    def counted(self) -> str:
        """"128 experts", "8 vision experts"."""
        return f"{self.count} {self.modality} experts" if self.modality else f"{self.count} experts"

    def describe(self, hidden: int) -> str:
        return f"{self.counted} of {hidden} x {self.width}"


@dataclass(frozen=True)
class ModelShape:
    architecture: str
    num_layers: int
    moe_layers: tuple[int, ...]
    hidden: int
    expert_sets: tuple[ExpertSet, ...]   # the first: the one text tokens route to
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
    def text_experts(self) -> ExpertSet:
        """The set a text token's top-k picks from: what decode reads, what routing statistics count."""
        return self.expert_sets[0]

    @property
    def streamed_prefill(self) -> bool:
        """Whether long prompts may stream this model's experts to the GPU."""
        return streams_in_gpu_prefill(self.expert_activation, self.expert_biases)


def expert_sets_of(text: dict, where: str, num_layers: int, moe_layers: tuple[int, ...]) -> tuple[ExpertSet, ...]:
    """The routed experts' count and width: one set, or one per modality where the config lists
    them so (ERNIE-4.5-VL, MODALITIES), each set in every MoE layer."""
    counts, widths = first_set(text, *EXPERT_COUNT_KEYS), first_set(text, *EXPERT_WIDTH_KEYS, "intermediate_size")
    if not isinstance(counts, list):
        return (ExpertSet("", int(counts), int(widths)),)
    if not (isinstance(widths, list) and len(counts) == len(widths) == len(MODALITIES)):
        raise ConfigError(f"{where}: experts per modality {counts} of widths {widths} (lvllm reads a count and "
                          f"a width for each of {', '.join(MODALITIES)}, as ERNIE-4.5-VL lists them)")
    for i, modality in enumerate(MODALITIES):
        ranges = {key: text[key][i] for key in MODALITY_RANGE_KEYS if isinstance(text.get(key), list)}
        layers = moe_layer_indices({**text, **ranges}, num_layers)
        if layers != moe_layers:
            raise ConfigError(f"{where}: {modality} experts in layers {list(layers)} of the MoE layers "
                              f"{list(moe_layers)} (lvllm plan takes every expert set in every MoE layer)")
    return tuple(ExpertSet(modality, int(count), int(width))
                 for modality, count, width in zip(MODALITIES, counts, widths))


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
    text = config.get("text_config") or config
    if not first_set(text, *EXPERT_COUNT_KEYS) and isinstance(text.get("ffn_config"), dict):
        raise ConfigError(f"{where}: DBRX's layout, its experts in ffn_config (moe_num_experts, moe_top_k, "
                          "ffn_hidden_size) and its attention in attn_config (kv_n_heads), which lvllm plan "
                          "does not read (vLLM 0.32 cannot load DBRX either: dbrx.py's load_weights)")
    if not first_set(text, *EXPERT_COUNT_KEYS):
        raise ConfigError(f"{where} describes no routed experts (no {', '.join(EXPERT_COUNT_KEYS)}): "
                          "lvllm plans only Mixture-of-Experts models")
    needed = [("hidden_size",), LAYER_KEYS, TOP_K_KEYS, ("vocab_size",), (*EXPERT_WIDTH_KEYS, "intermediate_size")]
    missing = [" or ".join(keys) for keys in needed if first_set(text, *keys) is None]
    if missing:
        raise ConfigError(f"{where} lacks {', '.join(missing)}")
    hidden, layers = int(text["hidden_size"]), int(first_set(text, *LAYER_KEYS))
    dtype = dtype or str(first_set(text, "torch_dtype", "dtype",
                                   default=first_set(config, "torch_dtype", "dtype", default="bfloat16")))
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"{where}: model dtype {dtype!r} is not one vLLM computes MoE in here "
                          f"(valid: {', '.join(DTYPE_BYTES)})")
    model_type = str(text.get("model_type", config.get("model_type", "")))
    typed = {**completed(text, model_type), "model_type": model_type}
    moe_layers = moe_layer_indices(text, layers)
    sets = expert_sets_of(text, where, layers, moe_layers)
    quant = config.get("quantization_config") or text.get("quantization_config")
    formats_of_sets = {expert_storage(quant, where, model_type, hidden, expert_set.width) for expert_set in sets}
    if len(formats_of_sets) > 1:
        raise ConfigError(f"{where}: the expert sets' widths give them different formats ({formats_of_sets}): lk "
                          "takes one per model")
    storage = formats_of_sets.pop()
    storage = replace(storage, float_projections=float_projections(quant or {}, storage.scheme, layers))
    return ModelShape(
        architecture=(config.get("architectures") or [config.get("model_type", "?")])[0],
        num_layers=layers, moe_layers=moe_layers, hidden=hidden,
        expert_sets=sets, top_k=int(first_set(text, *TOP_K_KEYS)),
        dtype=dtype, storage=storage,
        vocab=int(text["vocab_size"]), tied_embeddings=bool(first_set(text, "tie_word_embeddings", default=False)),
        dense=dense_matrices_of(typed, where, layers, moe_layers, tuple(expert_set.count for expert_set in sets),
                                sets[0].width),
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

def checkpoint_layer_bytes(shape: ModelShape, tp: int = 1) -> int:
    """One MoE layer's routed experts, every set's, as vLLM holds them before lk converts them (and
    as a device-resident layer keeps them)."""
    return sum(checkpoint_set_bytes(shape, expert_set, tp) for expert_set in shape.expert_sets)


def checkpoint_set_bytes(shape: ModelShape, expert_set: ExpertSet, tp: int = 1) -> int:
    """One expert set of a MoE layer as vLLM holds it before lk converts it: lvllm.vllm.checkpoint_sources'
    params of its FusedMoE (gpt-oss's expert biases in float32, bias_params)."""
    e, h, i = expert_set.count, shape.hidden, expert_set.width // tp
    biases = e * (2 * i + h) * 4 if shape.expert_biases else 0
    return biases + _stored_experts_bytes(shape, e, h, i)


def _stored_experts_bytes(shape: ModelShape, e: int, h: int, i: int) -> int:
    weights = 3 * h * i
    storage = shape.storage
    if storage.scheme == "float":
        return e * weights * shape.dtype_bytes
    if storage.scheme == "fp8-block":
        (rows13, inputs13), (rows2, inputs2) = formats.fp8_block_scale_shapes(h, i, storage.block)
        return e * (weights + 4 * (rows13 * inputs13 + rows2 * inputs2))
    groups = weights // storage.group
    if storage.scheme == "mxfp4":   # two e2m1 codes a byte, one e8m0 byte a group
        return e * (weights // 2 + groups)
    if storage.scheme == "nvfp4":   # one e4m3 byte a group; weight_scale_2 and input_scale: 3 float32 each
        return e * (weights // 2 + groups + 4 * 6)
    if storage.scheme == "compressed-tensors":   # int32 words of 8 values, float32 scales, shapes
        return e * (weights // 2 + 4 * groups + 2 * 2 * 4)
    if storage.scheme == "gptq":   # bits a weight, float32 scales, qzeros of as many bits a scale
        scales = 2 * i + h if storage.per_channel else groups
        return e * (weights * storage.bits // 8 + 4 * scales + scales * storage.bits // 8)
    return e * (weights // 2 + 4 * groups + groups // 2)   # AWQ: + int32 qzeros, 8 per word


def quantized_projection(shape: ModelShape, matrix: DenseMatrix) -> bool:
    """Whether the checkpoint stores the matrix as it stores the experts."""
    return matrix.kind in PROJECTION_KINDS and matrix.kind not in shape.storage.float_projections


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
    return sequence_bytes(tuple(layer for layer in shape.cache if layer.kind == FULL), 1, shape.dtype_bytes, 0)


def describe_cache(shape: ModelShape) -> str:
    """The KV cache per token of the layers that keep every token, then what the windowed and
    state layers keep, for plan's summary."""
    full = sum(layer.count for layer in shape.cache if layer.kind == FULL)
    parts = [f"KV cache {kv_token_bytes(shape) / 1024:.1f} KiB per token in {full} layer(s)"]
    for layer in shape.cache:
        one = layer_bytes(layer, 1, shape.dtype_bytes, state_bytes(shape, gpus=0)) / 1024
        if layer.kind == STATE:
            parts.append(f"{layer.count} state layer(s) of {one:.1f} KiB per sequence")
        elif layer.kind != FULL:
            parts.append(f"{layer.count} {layer.kind} layer(s) of {one:.1f} KiB per token "
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
