"""The float64 reference ``lvllm doctor`` holds lk to: a checkpoint's expert tensors read
straight from its safetensors files and dequantized here, by each format's published
layout, independently of lk and of vLLM's loader."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from lvllm.config_keys import EXPERT_COUNT_KEYS, MODALITIES, ConfigError, first_set
from lvllm.dequantize import dequantize, dequantize_mxfp4, stored_format

# model.layers.7.mlp.experts.12.gate_proj.weight_scale_inv -> prefix, layer, expert, projection, tensor
EXPERT_TENSOR = re.compile(r"^(?P<prefix>(?:.*\.)?layers\.(?P<layer>\d+)\.(?:.*\.)?experts)\.(?P<expert>\d+)\."
                           r"(?P<projection>[^.]+)\.(?P<tensor>[^.]+)$")
# (gate, up, down) projection names: Llama-style and Mixtral's.
PROJECTION_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
# model.layers.7.feed_forward.experts.down_proj -> the decoder layer's name, its index, the rest
DECODER_TENSOR = re.compile(r"^(?P<decoder>(?:.*\.)?layers\.(?P<layer>\d+))\.(?P<rest>.+)$")


class CheckpointTensors:
    """The tensors of a checkpoint directory's safetensors files, read one at a time."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        index = path / "model.safetensors.index.json"
        if index.is_file():
            self.file_of = {name: path / file for name, file in json.loads(index.read_text())["weight_map"].items()}
        else:
            self.file_of = {}
            for file in sorted(path.glob("*.safetensors")):
                with safe_open(str(file), "pt") as handle:
                    self.file_of.update(dict.fromkeys(handle.keys(), file))
        if not self.file_of:
            raise FileNotFoundError(f"{path} holds no *.safetensors files")
        self._open = {}
        config = path / "config.json"
        self.config = json.loads(config.read_text()) if config.is_file() else {}
        self.quantization = self.config.get("quantization_config") or {}

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def _handle(self, name: str):
        from safetensors import safe_open

        file = self.file_of[name]
        if file not in self._open:
            self._open[file] = safe_open(str(file), "pt")
        return self._open[file]

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def get_row(self, name: str, index: int) -> torch.Tensor:
        """``name``[index] alone read from the file (one expert of a fused [E, ...] tensor)."""
        return self._handle(name).get_slice(name)[index]

    def shape(self, name: str) -> list[int]:
        return self._handle(name).get_slice(name).get_shape()


@dataclass(frozen=True)
class FusedLayout:
    """A layer's routed experts stacked [E, ...] in a few tensors, named after the decoder layer
    (``layers.N.``), as the family's forward applies them: F.linear(x, W[e]), W[e] [outputs,
    inputs], or with ``inputs_first`` x @ W[e], W[e] [inputs, outputs]."""

    runner: str                   # vLLM's module of the layer's experts (after layers.N.)
    down: str                     # [E, H, I]
    gate_up: str | None = None    # [E, 2I, H]: gate's rows, then up's
    gate: str | None = None       # or each in its own [E, I, H]
    up: str | None = None
    inputs_first: bool = False
    interleaved: bool = False     # gate_up's outputs alternate gate, up, gate, up... (gpt-oss)
    biases: bool = False          # NAME_bias [E, outputs] beside gate_up and down (gpt-oss)
    mxfp4: bool = False           # each matrix as NAME_blocks and NAME_scales (dequantize_mxfp4)

    def stored(self, name: str) -> tuple[str, ...]:
        """The checkpoint's tensors of the matrix ``name``."""
        return (f"{name}_blocks", f"{name}_scales") if self.mxfp4 else (name,)

    @property
    def matrices(self) -> tuple[str, ...]:
        return tuple(name for name in (self.gate_up, self.gate, self.up, self.down) if name)

    @property
    def tensors(self) -> tuple[str, ...]:
        """The checkpoint's tensors of the layer's experts, the first of them ``down``'s."""
        weights = [stored for name in (self.down, *self.matrices[:-1]) for stored in self.stored(name)]
        return (*weights, *(f"{name}_bias" for name in (self.gate_up, self.down) if self.biases))


# Read from each family's forward (transformers 5.19), which the checkpoint feeds as stored.
FUSED_LAYOUTS = (
    # Llama 4, Llama4TextExperts: bmm(x, gate_up_proj [E, H, 2I]).chunk(2, dim=-1) gives gate, up;
    # bmm(h, down_proj [E, I, H]).
    FusedLayout("feed_forward.experts", "feed_forward.experts.down_proj",
                gate_up="feed_forward.experts.gate_up_proj", inputs_first=True),
    # Gemma 4, Gemma4TextExperts: F.linear(x, gate_up_proj[e]).chunk(2, dim=-1) gives gate, up;
    # F.linear(h, down_proj[e]).
    FusedLayout("experts", "experts.down_proj", gate_up="experts.gate_up_proj"),
    # Granite MoE (-Shared, -Hybrid): transformers loads input_linear.weight as
    # experts.gate_up_proj, output_linear.weight as down_proj (conversion_mapping.py), applied as
    # Gemma 4's (GraniteMoeExperts).
    FusedLayout("block_sparse_moe.experts", "block_sparse_moe.output_linear.weight",
                gate_up="block_sparse_moe.input_linear.weight"),
    # Step-3 (no transformers model): a [E, outputs, inputs] stack per projection, W[e] expert e's
    # Linear weight (vLLM's step3_text.py load_weights; Step-3.5's MoELinear: F.linear(x, weight[e])).
    FusedLayout("moe.experts", "moe.down_proj.weight", gate="moe.gate_proj.weight", up="moe.up_proj.weight"),
    # Aria, AriaExperts: Llama 4's layout, which its checkpoints name experts.fc1.weight and
    # fc2.weight (transformers renames them gate_up_proj and down_proj, conversion_mapping.py).
    FusedLayout("mlp.experts", "mlp.experts.fc2.weight", gate_up="mlp.experts.fc1.weight", inputs_first=True),
    # gpt-oss, GptOssExperts: x @ gate_up_proj[e] [H, 2I] + gate_up_proj_bias[e], gate its even
    # outputs and up its odd ones; h @ down_proj[e] [I, H] + down_proj_bias[e].
    FusedLayout("mlp.experts", "mlp.experts.down_proj", gate_up="mlp.experts.gate_up_proj", inputs_first=True,
                interleaved=True, biases=True),
    # gpt-oss's MXFP4 checkpoints: the same matrices [E, outputs, inputs / 32, 16] (transformers'
    # convert_moe_packed_tensors turns them into the float layout above), biases in float.
    FusedLayout("mlp.experts", "mlp.experts.down_proj", gate_up="mlp.experts.gate_up_proj", interleaved=True,
                biases=True, mxfp4=True),
)


@dataclass(frozen=True)
class ExpertLayer:
    """One MoE layer of vLLM's (a FusedMoE) in a decoder layer: its routed experts in the checkpoint."""

    index: int
    prefix: str                        # vLLM's name of the layer's experts: model.layers.N.mlp.experts
    experts: int
    names: tuple[str, ...] = ()        # a tensor per expert: the checkpoint's gate, up, down projection names
    fused: FusedLayout | None = None   # else how its few fused tensors hold them
    # One of a decoder layer's expert sets per modality (MODALITIES: ERNIE-4.5-VL's), numbered on
    # under one checkpoint prefix (vision experts after text ones): that prefix, the number of the
    # set's expert 0 there.
    modality: str = ""
    stored_prefix: str | None = None
    first: int = 0

    @property
    def decoder(self) -> str:
        """The decoder layer's name: model.layers.N."""
        return self.prefix[:self.prefix.index(f"layers.{self.index}.")] + f"layers.{self.index}"

    @property
    def checkpoint_prefix(self) -> str:
        """Where the checkpoint keeps its tensors per expert: ``checkpoint_prefix``.E.gate_proj.weight..."""
        return self.stored_prefix or self.prefix

    def stem(self, expert: int, which: int) -> str:
        """A tensor per expert: ``expert``'s gate (0), up (1) or down (2) projection."""
        return f"{self.checkpoint_prefix}.{self.first + expert}.{self.names[which]}"

    def stored_expert(self, name: str) -> int | None:
        """The layer's number of the expert whose tensor ``name`` is (with its scales, where
        quantized); None for any other tensor."""
        head, _, rest = name.partition(f"{self.checkpoint_prefix}.")
        number = rest.split(".")[0]
        if head or not number.isdigit() or not 0 <= int(number) - self.first < self.experts:
            return None
        return int(number) - self.first

    def tensor_names(self, tensors: CheckpointTensors) -> list[str]:
        """The checkpoint's tensors of the layer's routed experts (with their scales, where quantized)."""
        if self.fused:
            return [f"{self.decoder}.{name}" for name in self.fused.tensors]
        return [name for name in tensors.file_of if self.stored_expert(name) is not None]


def fused_layers(tensors: CheckpointTensors) -> dict[int, ExpertLayer]:
    """The layers whose routed experts the checkpoint stacks in a FUSED_LAYOUTS layout."""
    layers = {}
    for name in tensors.file_of:
        match = DECODER_TENSOR.match(name)
        if not match:
            continue
        decoder, index = match["decoder"], int(match["layer"])
        # Stacked [E, ...] (MXFP4's blocks have one dimension more), and all of the layout's tensors there.
        layout = next((f for f in FUSED_LAYOUTS if f.tensors[0] == match["rest"]
                       and len(tensors.shape(name)) == 3 + f.mxfp4
                       and all(f"{decoder}.{tensor}" in tensors for tensor in f.tensors)), None)
        if layout is not None:
            layers[index] = ExpertLayer(index, f"{decoder}.{layout.runner}", tensors.shape(name)[0], fused=layout)
    return layers


def modality_sets(layer: ExpertLayer, counts) -> tuple[ExpertLayer, ...]:
    """The layer's experts as vLLM builds its MoE layers: one, or where the config counts them per
    modality (ERNIE-4.5-VL: ``counts`` in MODALITIES' order, numbered on under one prefix), a MoE
    layer of each, named as vLLM's ernie45_vl_moe.py names them (mlp.text_experts, mlp.vision_experts)."""
    if not isinstance(counts, list):
        return (layer,)
    if sum(counts) != layer.experts or len(counts) != len(MODALITIES):
        raise ConfigError(f"{layer.prefix}: {layer.experts} experts stored, which the config counts per modality "
                          f"as {counts} ({', '.join(MODALITIES)})")
    parent, starts = layer.prefix.rsplit(".", 1)[0], [sum(counts[:i]) for i in range(len(counts))]
    return tuple(replace(layer, prefix=f"{parent}.{modality}_experts", experts=count, modality=modality,
                         stored_prefix=layer.prefix, first=start)
                 for modality, count, start in zip(MODALITIES, counts, starts))


def expert_layers(tensors: CheckpointTensors) -> dict[int, tuple[ExpertLayer, ...]]:
    """The checkpoint's MoE layers, each as vLLM's MoE layers in it (modality_sets): their routed
    experts one tensor per expert, or else stacked as one of FUSED_LAYOUTS."""
    found: dict[int, tuple[str, set[int], set[str]]] = {}
    for name in tensors.file_of:
        match = EXPERT_TENSOR.match(name)
        if match:
            prefix, experts, projections = found.setdefault(int(match["layer"]), (match["prefix"], set(), set()))
            experts.add(int(match["expert"]))
            projections.add(match["projection"])
    layers = {}
    for index, (prefix, experts, projections) in found.items():
        names = next((n for n in PROJECTION_NAMES if set(n) <= projections), None)
        if names is not None:
            layers[index] = ExpertLayer(index, prefix, max(experts) + 1, names)
    counts = first_set(tensors.config.get("text_config") or tensors.config, *EXPERT_COUNT_KEYS)
    return {index: modality_sets(layer, counts) for index, layer in (layers or fused_layers(tensors)).items()}


def layer_format(tensors: CheckpointTensors, layer: ExpertLayer) -> str:
    """How the checkpoint stores the layer's experts, as stored_format names it."""
    if layer.fused:
        return "mxfp4" if layer.fused.mxfp4 else str(
            tensors.get_row(f"{layer.decoder}.{layer.fused.down}", 0).dtype).removeprefix("torch.")
    return stored_format(tensors, layer.stem(0, 0))


@dataclass(frozen=True)
class Expert:
    """One routed expert in float64: gate and up [I, H], down [H, I], and where the family has
    them (gpt-oss) their biases."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None


def _fused_expert(tensors: CheckpointTensors, layer: ExpertLayer, expert: int) -> Expert:
    """Expert ``expert`` sliced out of a fused layer's tensors."""
    layout = layer.fused

    def row(name: str) -> torch.Tensor:
        return tensors.get_row(f"{layer.decoder}.{name}", expert)

    def matrix(name: str) -> torch.Tensor:   # [outputs, inputs]
        if layout.mxfp4:
            blocks, scales = layout.stored(name)
            return dequantize_mxfp4(row(blocks), row(scales))
        w = row(name).double()
        return w.T if layout.inputs_first else w

    def gate_and_up(stacked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:   # split along the outputs
        return (stacked[0::2], stacked[1::2]) if layout.interleaved else stacked.chunk(2, dim=0)

    gate, up = gate_and_up(matrix(layout.gate_up)) if layout.gate_up else (matrix(layout.gate), matrix(layout.up))
    if not layout.biases:
        return Expert(gate, up, matrix(layout.down))
    gate_bias, up_bias = gate_and_up(row(f"{layout.gate_up}_bias").double())
    return Expert(gate, up, matrix(layout.down), gate_bias, up_bias, row(f"{layout.down}_bias").double())


def expert_weights(tensors: CheckpointTensors, layer: ExpertLayer, expert: int) -> Expert:
    """Expert ``expert`` of the layer in float64."""
    if layer.fused:
        weights = _fused_expert(tensors, layer, expert)
    else:
        weights = Expert(*(dequantize(tensors, layer.stem(expert, which)) for which in range(3)))
    gate, up, down = weights.gate, weights.up, weights.down
    if up.shape != gate.shape or down.shape != gate.T.shape:   # a layout misread
        raise ValueError(f"{layer.prefix}: expert {expert}'s gate {tuple(gate.shape)}, up {tuple(up.shape)} and "
                         f"down {tuple(down.shape)} do not make one expert")
    return weights


# The experts' activations as vLLM's MoE layer and lk name them (gelu_tanh: Gemma 4's), of (gate, up).
ACTIVATIONS = {"silu": lambda g, u: F.silu(g) * u, "gelu": lambda g, u: F.gelu(g) * u,
               "gelu_tanh": lambda g, u: F.gelu(g, approximate="tanh") * u}


def swiglu_constants(config: dict) -> tuple[float, float]:
    """gpt-oss's swigluoai (alpha, limit): the config's swiglu_alpha and swiglu_limit, else
    transformers' GptOssConfig defaults (1.702, 7.0)."""
    text = config.get("text_config") or config
    return float(text.get("swiglu_alpha", 1.702)), float(text.get("swiglu_limit", 7.0))


def swiglu_oai(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's clamped SwiGLU: gate clipped above at ``limit``, up to [-limit, limit] and
    shifted by one; gate * sigmoid(alpha * gate) * (up + 1)."""
    gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return gate * torch.sigmoid(alpha * gate) * (up + 1)


def expert_output(expert: Expert, x: torch.Tensor, activation: str = "silu",
                  swiglu: tuple[float, float] | None = None) -> torch.Tensor:
    """down(act(gate x + b, up x + b)) + b for float64 rows x [T, H]; ``swiglu``: swigluoai's
    (alpha, limit), as swiglu_constants reads them."""

    def linear(w, bias, rows):
        return rows @ w.T if bias is None else rows @ w.T + bias

    gate, up = linear(expert.gate, expert.gate_bias, x), linear(expert.up, expert.up_bias, x)
    if activation == "swigluoai":
        if swiglu is None:
            raise ValueError("swigluoai needs its (alpha, limit): swiglu_constants(config)")
        hidden = swiglu_oai(gate, up, *swiglu)
    else:
        hidden = ACTIVATIONS[activation](gate, up)
    return linear(expert.down, expert.down_bias, hidden)
