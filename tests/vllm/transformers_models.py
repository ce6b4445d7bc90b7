"""Tiny random checkpoints of any architecture transformers has, written by transformers itself.

The architecture sweep (test_architectures.py) needs one checkpoint per MoE architecture vLLM
registers; writing each layout by hand, as build_tiny_model.py does for the families, would
repeat transformers. Here transformers' own config class (small sizes given per architecture)
builds its own model, whose weights are drawn again so that the test can fail:

- every matrix and embedding with std 1/sqrt(fan_in) (activations keep unit scale, the logits
  spread and greedy decoding does not collapse onto one token);
- every vector (norms, biases, routers' correction biases, parameter or buffer) as its initial
  value plus noise of 0.1 (1 + noise for norms): a bias or correction left at zero would hide
  a path that drops it.

The tokenizer is build_tiny_model.py's.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import torch

BUILDER = Path(__file__).resolve().parents[2] / "examples" / "tiny" / "build_tiny_model.py"
VOCAB = 512
# Sizes every sweep checkpoint shares; an architecture's own entries override them.
COMMON = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "max_position_embeddings": 512,
          "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
NOISE = 0.1
TRANSFORMERS_COPY = "transformers"


def _builder():
    spec = importlib.util.spec_from_file_location("build_tiny_model", BUILDER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def redraw(model: torch.nn.Module, seed: int) -> None:
    """Every tensor the checkpoint saves: parameters and persistent buffers (some routers keep
    their correction bias as a buffer)."""
    generator = torch.Generator().manual_seed(seed)
    saved = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, param in sorted(saved.items(), key=lambda item: item[0]):
            if not param.is_floating_point():
                continue
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float64)
            if param.dim() >= 2:
                param.copy_(noise / param.shape[-1] ** 0.5)
            else:
                param.copy_(param.double() + NOISE * noise)


def for_transformers(checkpoint: Path) -> Path:
    """The checkpoint transformers' own model loads (build's, or its whole copy)."""
    copy = checkpoint / TRANSFORMERS_COPY
    return copy if copy.is_dir() else checkpoint


def model_class(model_type: str):
    """transformers' auto class that builds the whole model of a config's ``model_type``: the
    causal LM, or a multimodal model's ForConditionalGeneration."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return AutoModelForCausalLM if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else AutoModelForImageTextToText


def build(out: Path, model_type: str, architecture: str, config: dict, seed: int = 0,
          unused_weights: str = "", extra_norms: tuple[str, ...] = (), wrapper: dict | None = None,
          keep_copy: bool = False) -> Path:
    """The checkpoint in ``out`` (kept when already there): ``model_type``'s config with
    COMMON and ``config`` (a multimodal model's: its text_config, with ``wrapper``'s keys
    beside), ``architecture`` as its architectures entry, float32, without the
    tensors whose names match ``unused_weights`` (ones transformers allocates but never uses)
    and with the hidden-size norm weights ``extra_norms`` (ones real checkpoints carry and
    transformers' model lacks), drawn as redraw draws a norm. ``keep_copy``: transformers'
    own copy too, whatever the caller then makes of the checkpoint's config."""
    if (out / "config.json").exists():
        return out
    from transformers import CONFIG_MAPPING

    out.mkdir(parents=True, exist_ok=True)
    vocab = _builder().build_tokenizer(out, VOCAB)
    settings = {**COMMON, **config, "vocab_size": vocab}
    config_class = CONFIG_MAPPING[model_type]
    if wrapper:
        text_config = config_class.sub_configs["text_config"](**settings)
        hf_config = config_class(text_config=text_config, **wrapper)
    else:
        hf_config = config_class(**settings)
    torch.manual_seed(seed)
    model = model_class(model_type).from_config(hf_config, dtype=torch.float32)
    redraw(model, seed)
    model.save_pretrained(out)
    if keep_copy or unused_weights or extra_norms:
        # transformers loads only what it wrote: its reference reads the checkpoint as written.
        model.save_pretrained(out / TRANSFORMERS_COPY)
    if unused_weights or extra_norms:
        from safetensors.torch import load_file, save_file

        tensors = load_file(out / "model.safetensors")
        if unused_weights:
            tensors = {name: t for name, t in tensors.items() if not re.search(unused_weights, name)}
        generator = torch.Generator().manual_seed(seed + 1)
        for name in extra_norms:
            noise = torch.randn(settings["hidden_size"], generator=generator, dtype=torch.float64)
            tensors[name] = (1 + NOISE * noise).to(torch.float32)
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    # save_pretrained names transformers' class (PhimoeForCausalLM); checkpoints name vLLM's.
    saved = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**saved, "architectures": [architecture]}, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": settings["eos_token_id"], "pad_token_id": settings["pad_token_id"]}, indent=2))
    return out
