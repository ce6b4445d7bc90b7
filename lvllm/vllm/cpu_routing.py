"""Routing vLLM's CPU build lacks, for the layers lk computes.

vLLM's ``CPURouter`` covers softmax top-k, grouped top-k and custom routing functions; a
layer that scores with a sigmoid outside grouped top-k (MiniMax-M2: sigmoid scores, the
correction bias added only to choose the experts) stops at an assertion there, lk or not.
``LkRunner`` gives such layers ``SigmoidTopkRouter``: the same router with that scheme.
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.fused_moe.router.cpu_router import CPURouter


def sigmoid_topk(router_logits: torch.Tensor, top_k: int, renormalize: bool,
                 correction_bias: torch.Tensor | None, routed_scaling_factor: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Experts chosen by sigmoid score plus ``correction_bias``; weighted by the score alone
    (renormalized over the chosen when asked), times ``routed_scaling_factor``."""
    scores = router_logits.float().sigmoid()
    choice = scores if correction_bias is None else scores + correction_bias.float()
    topk_ids = choice.topk(top_k, dim=-1).indices
    topk_weights = scores.gather(1, topk_ids)
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    if routed_scaling_factor != 1.0:
        topk_weights = topk_weights * routed_scaling_factor
    return topk_weights, topk_ids.to(torch.int32)


def lacks_scheme(router) -> bool:
    """Whether ``router`` is vLLM's CPU router given a scheme it cannot compute."""
    return (type(router) is CPURouter and not router.use_grouped_topk
            and router.custom_routing_function is None and router.scoring_func == "sigmoid")


class SigmoidTopkRouter(CPURouter):
    """vLLM's CPU router (EPLB mapping, capture, index dtypes), routing by sigmoid_topk."""

    @classmethod
    def take_over(cls, router: CPURouter) -> None:
        # Same state, one method more: the instance vLLM built keeps every reference to it.
        router.__class__ = cls

    def _compute_routing(self, hidden_states, router_logits, indices_type, *, input_ids=None):
        return sigmoid_topk(router_logits, self.top_k, self.renormalize,
                            self.e_score_correction_bias, self.routed_scaling_factor)
