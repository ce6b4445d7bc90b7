"""lvllm.lk.layout reads an engine's own packed memory back as the weights it was built from
(what the GPU prefill path copies to the device and unpacks there)."""

import pytest
import torch

from lvllm.lk import MoEEngine
from lvllm.lk.layout import PackedLayout, streamable


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("nodes", [1, 2, 3])
@pytest.mark.parametrize("hidden,inter", [(40, 48), (37, 23)])
def test_unpacked_engine_memory_is_the_original_weights(runtimes, dtype, nodes, hidden, inter):
    experts = 3
    w13 = torch.randn(experts, 2 * inter, hidden).to(dtype)
    w2 = torch.randn(experts, hidden, inter).to(dtype)
    expected13, expected2 = w13.clone(), w2.clone()
    engine = MoEEngine(w13, w2, "silu", runtime=runtimes(threads=1, numa_nodes=nodes))
    w13.zero_(), w2.zero_()  # the engine holds its own copy
    layout, views = PackedLayout.of(engine)
    assert layout.nbytes == engine.nbytes == sum(view.numel() for view in views)
    assert len(layout.parts) == nodes
    got13 = torch.full_like(expected13, float("nan"))
    got2 = torch.full_like(expected2, float("nan"))
    layout.unpack(torch.cat(views), got13, got2)
    assert torch.equal(got13, expected13)
    assert torch.equal(got2, expected2)


def test_views_keep_the_engine_memory_alive(runtimes):
    w13, w2 = torch.randn(2, 32, 16), torch.randn(2, 16, 16)
    engine = MoEEngine(w13, w2, "silu", runtime=runtimes(threads=1))
    layout, views = PackedLayout.of(engine)
    del engine
    got13, got2 = torch.empty_like(w13), torch.empty_like(w2)
    layout.unpack(torch.cat(views), got13, got2)
    assert torch.equal(got13, w13) and torch.equal(got2, w2)


def test_quantized_engines_are_refused_by_name(runtimes):
    assert streamable("bfloat16") and not streamable("int8")
    engine = MoEEngine(torch.randn(2, 32, 32), torch.randn(2, 32, 16), "silu", weight_format="int8",
                       group_size=16, runtime=runtimes(threads=1))
    with pytest.raises(ValueError, match="experts kept as int8 cannot be unpacked on the device"):
        PackedLayout.of(engine)
