"""What the GPU tests and benchmarks/bench_gpu.py share: layers, routing, a torch reference."""

import torch

from lvllm.hybrid import HybridExperts


def torch_experts(x, w13, w2, topk_weights, topk_ids):
    """Routed experts (silu gate) in float32 torch on x's device: the GPU experts function
    given to the hybrid layer in tests, and their reference."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for expert in topk_ids.unique().tolist():
        if expert < 0:
            continue
        rows, slots = (topk_ids == expert).nonzero(as_tuple=True)
        gate, up = (x[rows].float() @ w13[expert].float().T).chunk(2, dim=-1)
        down = (torch.nn.functional.silu(gate) * up) @ w2[expert].float().T
        out.index_add_(0, rows, down * topk_weights[rows, slots, None].float())
    return out.to(x.dtype)


def make_layer(seed=0, experts=8, hidden=256, inter=128):
    """(HybridExperts, w13, w2): bf16 random experts of one layer, held by lk."""
    generator = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=generator) / hidden**0.5).bfloat16()
    w2 = (torch.randn(experts, hidden, inter, generator=generator) / inter**0.5).bfloat16()
    return HybridExperts(w13.clone(), w2.clone(), "silu", layer_name=f"layer{seed}"), w13, w2


def routing(tokens, experts, topk, seed, device="cuda"):
    generator = torch.Generator().manual_seed(seed)
    weights, ids = torch.topk(torch.softmax(torch.randn(tokens, experts, generator=generator), -1), topk)
    return ids.to(device), weights.to(device)


def inputs(tokens, hidden, experts, topk, seed, device="cuda"):
    generator = torch.Generator().manual_seed(seed + 1000)
    x = torch.randn(tokens, hidden, generator=generator).bfloat16().to(device)
    return (x, *routing(tokens, experts, topk, seed, device))
