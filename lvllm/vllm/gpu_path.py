"""The GPU path of a CUDA worker: lk forwards queued on the CUDA stream and, with
LVLLM_GPU_PREFILL_MIN_BATCH_SIZE, the ring that streams experts to the GPU for long
prompts, computed there by vLLM's fused-MoE kernel."""

from __future__ import annotations

import torch
from vllm.config import get_current_vllm_config

from lvllm.gpu.plan import capture_overlap_warning, plan_batch
from lvllm.hybrid import ALL_ROWS_ON_LK, DeviceRoute, HybridExperts
from lvllm.placement import LayerPath
from lvllm.settings import Settings
from lvllm.vllm.installation import Installation, logger


class GpuPath:
    """This worker's GPU side (lvllm.gpu.stream, lvllm.gpu.ring)."""

    def __init__(self, settings: Settings):
        from lvllm.gpu.ring import ExpertRing
        from lvllm.gpu.stream import StreamQueue

        config = get_current_vllm_config()
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.queue = StreamQueue(config.scheduler_config.max_num_batched_tokens)
        self.min_batch = settings.gpu_prefill_min_batch
        self.ring = (ExpertRing(self.device, settings.gpu_prefetch_window)
                     if self.min_batch else None)
        speculative = config.speculative_config
        self.decode_query_len = 1 + ((speculative.num_speculative_tokens or 0) if speculative else 0)
        self.dtype = config.model_config.dtype  # streamed experts are unpacked into it
        self._context = None
        self._route = ALL_ROWS_ON_LK
        warning = capture_overlap_warning(
            self.min_batch, config.compilation_config.max_cudagraph_capture_size or 0)
        if warning:
            logger.warning("lvllm: %s", warning)

    @classmethod
    def of(cls, installation: Installation) -> GpuPath:
        """The installation's GpuPath, made on the first call (the first lk layer on CUDA)."""
        if installation.gpu is None:
            installation.gpu = cls(installation.settings)
        return installation.gpu

    def attach(self, experts: HybridExperts, layer, path: LayerPath) -> None:
        """Queue the layer's lk work on CUDA streams; a streamed layer also joins the ring."""
        activation = layer.activation

        def gpu_experts(x, w13, w2, topk_weights, topk_ids):
            from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts

            return fused_experts(x, w13, w2, topk_weights, topk_ids, activation=activation)

        streamed = path is LayerPath.LK_STREAMED and self.ring is not None
        if path is LayerPath.LK and self.ring is not None:   # lvllm.placement.streams_in_gpu_prefill
            logger.info("lvllm: %s has expert biases or gpt-oss's activation, which the streamed "
                        "GPU prefill does not compute: lk computes its long prompts too",
                        experts.layer_name)
        experts.attach_gpu(self.queue, self.ring if streamed else None, gpu_experts, self.dtype)

    def allocate(self) -> None:
        if self.ring is None:
            return
        self.ring.allocate()
        logger.info(
            "lvllm: GPU prefill from %d prefill tokens: %d layer(s) streamed %d ahead through "
            "%.3f GiB of GPU buffers on %s, unpacked into %s", self.min_batch, self.ring.layers,
            self.ring.window, self.ring.device_bytes() / 2**30, self.device, self.dtype)

    def route(self, num_tokens: int) -> DeviceRoute:
        """This forward's split between lk and the streamed experts (decided once per forward)."""
        from vllm.forward_context import get_forward_context, is_forward_context_available

        if (self.ring is None or self.ring.layers == 0 or num_tokens < self.min_batch
                or not is_forward_context_available()):
            return ALL_ROWS_ON_LK
        context = get_forward_context()
        if context is not self._context:
            # No reading of device tensors while a graph is captured: it would fail there.
            capturing = torch.cuda.is_current_stream_capturing()
            plan = plan_batch(num_tokens, None if capturing else _query_lens(context),
                              self.min_batch, capturing, self.decode_query_len)
            self._context, self._route = context, DeviceRoute.of(plan, num_tokens, self.device)
            if plan.gpu_prefill:
                self.ring.start()
        return self._route

def padding_rows(num_tokens: int) -> torch.Tensor | None:
    """vLLM's mask of the rows it padded a batch with (a persistent buffer, so captured graphs
    read each replay's mask); None where the forward has none of this size."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    mask = get_forward_context().is_padding
    return mask if mask is not None and mask.shape[0] == num_tokens else None


def _query_lens(context) -> list[int] | None:
    """Tokens per request in row order, from the attention metadata (None: unknown). Reads a
    device tensor, so only forwards long enough to stream get here."""
    metadata = context.attn_metadata
    if not isinstance(metadata, dict):
        return None   # no metadata (profile run) or micro-batches
    for entry in metadata.values():
        starts = getattr(entry, "query_start_loc", None)
        if isinstance(starts, torch.Tensor):
            starts = starts.tolist()
            return [end - begin for begin, end in zip(starts, starts[1:])]
    return None
