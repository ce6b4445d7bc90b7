"""How a checkpoint stores its routed experts and its projections, from its quantization_config as
vLLM 0.32 reads it, refusing what lk cannot take: for ``lvllm plan`` and ``lvllm doctor``."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Callable

from lvllm import formats
from lvllm.config_keys import ConfigError


# Each kind of decoder-layer projection (a token mixer's, "attention", or an MLP's) by a module of it,
# its checkpoint name after "model.layers.N.", probed against the quantization config's rules for the
# modules it leaves unquantized (Kimi K2.5's ignore list names its attention, dense MLPs and shared
# experts, keeping them bf16). lvllm.dense_layout's other kinds are float in every checkpoint.
PROJECTION_KINDS = {"attention": ("self_attn.o_proj",), "dense MLP": ("mlp.down_proj",),
                    "shared expert": ("mlp.shared_experts.down_proj", "mlp.shared_expert.down_proj")}


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
    float_projections: tuple[str, ...] = tuple(PROJECTION_KINDS)   # projection kinds the checkpoint leaves unquantized

    @property
    def bits(self) -> int:
        return 8 if self.format == "int8" else 4


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


def _names_module(entries: list[str], module: str) -> bool:
    """Whether a compressed-tensors targets or ignore entry names the module as vLLM matches them
    (config_utils.is_equal_or_regex_match): the name itself, or a "re:" pattern matched from its start;
    targets' "Linear" names every projection."""
    return any(entry in (module, "Linear") or (entry.startswith("re:") and re.match(entry[3:], module))
               for entry in entries)


def _gptq_skips(dynamic: dict, module: str) -> bool:
    """gptq_utils.get_dynamic_override: the first rule matching the module decides; "-:" ones skip it."""
    for pattern in dynamic:
        if re.match(pattern.removeprefix("-:").removeprefix("+:"), module):
            return pattern.startswith("-:")
    return False


def _left_float(quant: dict, scheme: str) -> Callable[[str], bool]:
    """Whether the scheme's vLLM config leaves a module unquantized, by its rules: compressed-tensors'
    targets and ignore list, AWQ's modules_to_not_convert (substrings, auto_awq.py), FP8's
    ignored_layers or modules_to_not_convert (whole names, fp8.py), GPTQ's dynamic "-:" rules."""
    if scheme == "compressed-tensors":
        targets = [t for group in (quant.get("config_groups") or {}).values() for t in group.get("targets") or ()]
        ignore = [entry for entry in quant.get("ignore") or () if entry != "Linear"]
        return lambda module: not _names_module(targets, module) or _names_module(ignore, module)
    if scheme == "awq":
        skipped = quant.get("modules_to_not_convert") or ()
        return lambda module: any(name in module for name in skipped)
    if scheme == "fp8-block":
        skipped = quant.get("ignored_layers") or quant.get("modules_to_not_convert") or ()
        return lambda module: module in skipped
    if scheme == "gptq":
        return lambda module: _gptq_skips(quant.get("dynamic") or {}, module)
    # Float checkpoints; MXFP4 ones quantize the experts only; NVFP4 ones as vLLM's CPU build needs them,
    # their projections in exclude_modules (one that quantizes them is counted at the model dtype's bytes).
    return lambda module: True


def float_projections(quant: dict, scheme: str, num_layers: int) -> tuple[str, ...]:
    """The PROJECTION_KINDS a checkpoint stores unquantized, probed on each layer (the checkpoints
    seen leave a kind float on every layer that has it, or on none)."""
    left_float = _left_float(quant, scheme)
    return tuple(kind for kind, probes in PROJECTION_KINDS.items()
                 if any(left_float(f"model.layers.{i}.{probe}") for i in range(num_layers) for probe in probes))
