"""The base of every expert source, in a module of its own so that the sources
(checkpoint_sources.py, gptq_source.py, nvfp4_source.py) build on it and
checkpoint_sources.expert_source picks among them without an import going back."""

from __future__ import annotations


class ExpertSource:
    """Experts stored as float tensors (any float checkpoint; vLLM casts to params_dtype)."""

    format = "float"   # engine format name, or "float" for the model dtype
    group: int | None = None   # inputs per scale of a quantized checkpoint
    # params a checkpoint of this format may lack (vLLM creates them all the same)
    optional: frozenset[str] = frozenset()
    label = "float experts"

    def params(self, num_experts, hidden, inter, params_dtype):
        """name -> (shape, dtype, extra weight attrs): what vLLM's method would create."""
        return {
            "w13_weight": ((num_experts, 2 * inter, hidden), params_dtype, {}),
            "w2_weight": ((num_experts, hidden, inter), params_dtype, {}),
        }

    def engine_inputs(self, layer):
        """(w13, w2) for lvllm.lk.MoEEngine: float tensors or QuantizedWeights."""
        return layer.w13_weight.data, layer.w2_weight.data
