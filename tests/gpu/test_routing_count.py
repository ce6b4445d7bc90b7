"""The routing-statistics op (lvllm/routing_count.py) captured in a CUDA graph: each replay
counts the real rows of that replay's batch, whatever the padding rows hold."""

import torch

from lvllm.routing_count import count_routed


def reference(ids: torch.Tensor, padding: torch.Tensor, experts: int) -> torch.Tensor:
    real = ids[~padding].reshape(-1).cpu().long()
    return torch.bincount(real, minlength=experts)


def test_count_in_a_cuda_graph_skips_padding_rows():
    experts, rows, top_k = 8, 16, 2
    counts = torch.zeros(experts, dtype=torch.int64, device="cuda")
    ids = torch.zeros(rows, top_k, dtype=torch.int32, device="cuda")
    padding = torch.zeros(rows, dtype=torch.bool, device="cuda")
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ids.fill_(1 << 30)   # what a padding row may hold while the graph is captured
        padding.fill_(True)
        with torch.cuda.graph(graph):
            count_routed(counts, ids, padding)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert counts.sum().item() == 0

    generator = torch.Generator().manual_seed(0)
    expected = torch.zeros(experts, dtype=torch.int64)
    for real in (1, 5, 16):
        step = torch.randint(0, experts, (rows, top_k), generator=generator, dtype=torch.int32)
        step[real:] = -7   # garbage beyond the real rows
        mask = torch.arange(rows) >= real
        ids.copy_(step)
        padding.copy_(mask)
        graph.replay()
        expected += reference(step, mask, experts)
    torch.cuda.synchronize()
    assert counts.cpu().tolist() == expected.tolist()
