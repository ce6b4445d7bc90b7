"""A router correction bias the model's loader leaves at zero, read from the checkpoint for the
layers lk computes."""

from __future__ import annotations

from lvllm.vllm.installation import Installation, building_draft_model


def load_skipped_correction_bias(layer, installation: Installation) -> bool:
    """Read from the checkpoint a router correction bias the model's loader left at zero
    (Laguna: vLLM keeps it under ``routed_experts`` and drops the checkpoint's
    ``<layer>.e_score_correction_bias`` as an unexpected ``_bias``, on every platform), so that
    the layer is routed as the checkpoint says. True when it did."""
    bias = getattr(layer, "e_score_correction_bias", None)
    if bias is None or bool(bias.any()) or building_draft_model():
        return False
    name = f"{layer.layer_name}.e_score_correction_bias"
    checkpoint = installation.checkpoint_tensors()
    if checkpoint is None or name not in checkpoint:
        return False
    loaded = checkpoint.get(name)
    if loaded.shape != bias.shape:
        raise ValueError(f"{name}: the checkpoint's tensor has shape {tuple(loaded.shape)}, the layer's "
                         f"router takes {tuple(bias.shape)}")
    bias.data.copy_(loaded.to(bias.dtype))
    installation.log_once("correction bias", "lvllm: the routers' correction bias read from the checkpoint "
                          "(%s and the like): the model's loader leaves it at zero", name)
    return True
