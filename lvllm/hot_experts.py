"""Choosing each MoE layer's hot experts (LVLLM_HOT_EXPERTS), and what the GPU's memory buys
when it holds them instead of whole layers.

``HotRanking`` re-ranks one layer's experts while serving (LVLLM_HOT_EXPERTS_UPDATE) from its
running pick counts. ``splits`` models the static placement to size it: the share of the
router's picks the device would serve and the decode bound that leaves the host, from routing
statistics (LVLLM_EXPERT_STATS) or a synthetic skew; batch-1 decode, the host reading the
experts the device does not hold at its read bandwidth; the device's own time is left out (it
reads its slots an order of magnitude faster, and at the same time).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lvllm.expert_stats import device_share


def zipf_probabilities(experts: int, skew: float, seed: int) -> torch.Tensor:
    """Each expert's routing weight: rank r (1-based, the ranks shuffled) weighs r^-skew;
    skew 0 is uniform."""
    ranks = torch.randperm(experts, generator=torch.Generator().manual_seed(seed)) + 1
    weights = ranks.double() ** -skew
    return weights / weights.sum()


def synthetic_counts(num_layers: int, experts: int, top_k: int, skew: float, tokens: int,
                     seed: int = 0) -> dict[int, list[int]]:
    """Counts of ``tokens`` tokens, each picking ``top_k`` distinct experts per layer, drawn
    without replacement by the layer's Zipf weights (its own ranking per layer)."""
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for layer in range(num_layers):
        weights = zipf_probabilities(experts, skew, seed * 1000 + layer)
        picks = torch.multinomial(weights.expand(tokens, -1), top_k, replacement=False, generator=generator)
        layers[layer] = torch.bincount(picks.reshape(-1), minlength=experts).tolist()
    return layers


@dataclass(frozen=True)
class Split:
    """One use of ``gpu_bytes`` of GPU memory: hot-expert slots in every layer, or whole layers."""

    slots: int                 # per layer
    gpu_bytes: int
    hot_share: float           # of all picks, on the device with hot experts
    hot_tok_s: float           # decode bound with hot experts
    layers: int                # whole layers the same memory holds
    layer_share: float
    layer_tok_s: float


def splits(counts: dict[int, list[int]], top_k: int, expert_bytes: int, bandwidth_gbs: float,
           slot_options: tuple[int, ...]) -> list[Split]:
    """For each number of slots per layer: the device's share and the host's decode bound with
    hot experts, and with whole layers of the same memory (the first layers, as
    LVLLM_GPU_RESIDENT_MOE_LAYERS takes them, their picks all on the device)."""
    num_layers = len(counts)
    experts = max(len(c) for c in counts.values())
    ordered = [counts[layer] for layer in sorted(counts)]

    def tok_s(host_share: float) -> float:
        per_token = num_layers * top_k * host_share * expert_bytes
        return bandwidth_gbs * 1e9 / per_token if per_token else math.inf

    rows = []
    for slots in slot_options:
        gpu_bytes = slots * num_layers * expert_bytes
        whole = min(num_layers, gpu_bytes // (experts * expert_bytes))
        picks = sum(map(sum, ordered))
        layer_share = sum(map(sum, ordered[:whole])) / picks if picks else 0.0
        hot = device_share(counts, slots)
        rows.append(Split(slots, gpu_bytes, hot, tok_s(1 - hot), whole, layer_share, tok_s(1 - layer_share)))
    return rows


class HotRanking:
    """One layer's experts ranked by decayed picks: at each re-ranking the earlier score is
    multiplied by ``decay`` and the picks counted since the last one are added; the slots
    should hold the ``slots`` best scored (ties to the lower id) of those picked at all."""

    def __init__(self, num_experts: int, slots: int, decay: float, max_swaps: int):
        self.slots, self.decay, self.max_swaps = slots, decay, max_swaps
        self.score = torch.zeros(num_experts, dtype=torch.float64)
        self.seen = torch.zeros(num_experts, dtype=torch.int64)

    def swaps(self, counts: torch.Tensor, resident: list[int]) -> list[tuple[int, int]]:
        """(slot, expert) moves, hottest incoming first, at most ``max_swaps``: ``counts`` the
        layer's running totals (a restart from zero counts as new picks), ``resident`` each
        slot's expert (-1: free). An incoming expert takes a free slot, else the slot of the
        coldest resident that fell out of the best ``slots``."""
        counts = counts.to(torch.int64)
        new = counts if bool((counts < self.seen).any()) else counts - self.seen
        self.seen = counts.clone()
        self.score = self.score * self.decay + new.double()
        order = sorted(range(len(self.score)), key=lambda e: (-self.score[e].item(), e))
        wanted = [e for e in order[:self.slots] if self.score[e] > 0]
        incoming = [e for e in wanted if e not in resident]
        free = [slot for slot, e in enumerate(resident) if e < 0]
        leaving = sorted((slot for slot, e in enumerate(resident) if e >= 0 and e not in wanted),
                         key=lambda slot: (self.score[resident[slot]].item(), resident[slot]))
        targets = free + leaving
        return list(zip(targets, incoming[:self.max_swaps]))
