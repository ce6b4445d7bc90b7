"""Routing vLLM's CPU build lacks or gets wrong, for the layers lk computes.

vLLM's ``CPURouter`` covers softmax top-k, grouped top-k and custom routing functions. Outside
grouped top-k it has no correction bias: a layer that scores with a sigmoid (MiniMax-M2:
the bias added only to choose the experts) stops at an assertion there, and a softmax layer
with a bias (ERNIE 4.5) is routed as if the bias were zero, other experts than the
checkpoint's, silently. ``LkRunner`` gives such layers ``BiasedTopkRouter``: the same router
with the scheme the checkpoint defines.
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.fused_moe.router.cpu_router import CPURouter

SCORES = {"softmax": lambda logits: logits.softmax(dim=-1), "sigmoid": torch.sigmoid}


def biased_topk(router_logits: torch.Tensor, top_k: int, scoring_func: str, renormalize: bool,
                correction_bias: torch.Tensor | None, routed_scaling_factor: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Experts chosen by score (``scoring_func`` of the logits) plus ``correction_bias``;
    weighted by the score alone (renormalized over the chosen when asked), times
    ``routed_scaling_factor``."""
    scores = SCORES[scoring_func](router_logits.float())
    choice = scores if correction_bias is None else scores + correction_bias.float()
    topk_ids = choice.topk(top_k, dim=-1).indices
    topk_weights = scores.gather(1, topk_ids)
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    if routed_scaling_factor != 1.0:
        topk_weights = topk_weights * routed_scaling_factor
    return topk_weights, topk_ids.to(torch.int32)


def lacks_scheme(router) -> bool:
    """Whether ``router`` is vLLM's CPU router given a scheme it cannot compute or computes
    without the correction bias."""
    if type(router) is not CPURouter or router.use_grouped_topk or router.custom_routing_function is not None:
        return False
    return router.scoring_func == "sigmoid" or (
        router.scoring_func == "softmax" and router.e_score_correction_bias is not None)


class BiasedTopkRouter(CPURouter):
    """vLLM's CPU router (EPLB mapping, capture, index dtypes), routing by biased_topk."""

    @classmethod
    def take_over(cls, router: CPURouter) -> None:
        # Same state, one method more: the instance vLLM built keeps every reference to it.
        router.__class__ = cls

    def _compute_routing(self, hidden_states, router_logits, indices_type, *, input_ids=None):
        return biased_topk(router_logits, self.top_k, self.scoring_func, self.renormalize,
                           self.e_score_correction_bias, self.routed_scaling_factor)
