"""The op that counts router picks (LVLLM_EXPERT_STATS): ``torch.ops.lvllm.count_routed``.

A custom op, so torch.compile leaves it alone and CUDA graphs capture it like any kernel; it adds
one per (token, expert) pick on the picks' device. Rows that are no tokens are left out: those
flagged in ``padding`` (vLLM pads a CUDA graph's batch to a captured size) and any pick outside
[0, num_experts), which such rows may hold (seen while vLLM captured its graphs on an H100).
"""

from __future__ import annotations

import torch

_LIBRARY = torch.library.Library("lvllm", "FRAGMENT")
_LIBRARY.define("count_routed(Tensor(a!) counts, Tensor topk_ids, Tensor? padding) -> ()")


def _count_routed(counts: torch.Tensor, topk_ids: torch.Tensor, padding: torch.Tensor | None) -> None:
    if topk_ids.device.type == "cpu":
        # No graphs here, so every id is a pick; a decode step's cost matters (~8 us a layer).
        if padding is not None and bool(padding.any()):
            topk_ids = topk_ids[~padding]
        ids = topk_ids.reshape(-1)
        counts.index_add_(0, ids, counts.new_ones(()).expand(ids.numel()))
        return
    ids = topk_ids.reshape(-1)   # sync-free, so that a CUDA graph captures it
    real = (ids >= 0) & (ids < counts.shape[0])
    if padding is not None:
        real &= ~padding.unsqueeze(1).expand(topk_ids.shape).reshape(-1)
    counts.index_add_(0, torch.where(real, ids, 0), real.to(counts.dtype))


_LIBRARY.impl("count_routed", _count_routed, "CompositeExplicitAutograd")
torch.library.register_fake("lvllm::count_routed", lambda counts, topk_ids, padding: None, lib=_LIBRARY)


def count_routed(counts: torch.Tensor, topk_ids: torch.Tensor, padding: torch.Tensor | None) -> None:
    """Add ``topk_ids``' picks ([tokens, top_k]) to ``counts`` ([num_experts], int64)."""
    torch.ops.lvllm.count_routed(counts, topk_ids, padding)
