"""lvllm.lk.layout reads an engine's own packed memory back as the weights it was built from
(what the GPU prefill path copies to the device and unpacks there)."""

import pytest
import torch

from lvllm.lk import MoEEngine, QuantizedWeights, quant
from lvllm.lk.layout import PackedLayout

from .helpers import assert_unpacks_to


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


def fp8_weights(experts, rows, cols, group, generator):
    values = (torch.randn(experts, rows, cols, generator=generator) * 100).clamp(-448, 448)
    scales = torch.rand(experts, rows, -(-cols // group), generator=generator) + 0.5
    return QuantizedWeights(values.to(torch.float8_e4m3fn), scales, group)


@pytest.mark.parametrize("weight_format", ["int8", "int4", "fp8_e4m3"])
@pytest.mark.parametrize("nodes", [1, 2])
@pytest.mark.parametrize("hidden,inter,group", [(64, 48, 32), (40, 96, 32), (160, 64, 128)])
def test_quantized_engine_memory_unpacks_to_its_dequantized_weights(runtimes, weight_format, nodes,
                                                                    hidden, inter, group):
    """The device dequantizes what the engine holds, exactly as lvllm.lk.quant does (the
    engine's own arithmetic); hidden 40 leaves a partial group and an INT4 block of four
    rows half empty."""
    experts = 16
    generator = torch.Generator().manual_seed(hidden + inter)
    if weight_format == "fp8_e4m3":
        w13 = fp8_weights(experts, 2 * inter, hidden, group, generator)
        w2 = fp8_weights(experts, hidden, inter, group, generator)
        expected13, expected2 = quant.dequantize(w13), quant.dequantize(w2)
        engine = MoEEngine(w13, w2, "silu", runtime=runtimes(threads=1, numa_nodes=nodes))
    else:
        w13 = torch.randn(experts, 2 * inter, hidden, generator=generator)
        w2 = torch.randn(experts, hidden, inter, generator=generator)
        expected13 = quant.dequantize(quant.quantize(w13, weight_format, group))
        expected2 = quant.dequantize(quant.quantize(w2, weight_format, group))
        engine = MoEEngine(w13, w2, "silu", weight_format=weight_format, group_size=group,
                           runtime=runtimes(threads=1, numa_nodes=nodes))
    assert_unpacks_to(engine, expected13, expected2)


def test_float_engines_unpack_into_another_dtype(runtimes):
    w13, w2 = torch.randn(2, 32, 16), torch.randn(2, 16, 16)
    engine = MoEEngine(w13, w2, "silu", runtime=runtimes(threads=1))
    layout, views = PackedLayout.of(engine, torch.bfloat16)
    got13, got2 = torch.empty_like(w13, dtype=torch.bfloat16), torch.empty_like(w2, dtype=torch.bfloat16)
    layout.unpack(torch.cat(views), got13, got2)
    assert torch.equal(got13, w13.bfloat16()) and torch.equal(got2, w2.bfloat16())


def test_quantized_engines_need_a_dtype_to_unpack_into(runtimes):
    engine = MoEEngine(torch.randn(2, 32, 32), torch.randn(2, 32, 16), "silu", weight_format="int8",
                       group_size=16, runtime=runtimes(threads=1))
    with pytest.raises(ValueError, match="experts kept as int8 are dequantized when unpacked"):
        PackedLayout.of(engine)
    with pytest.raises(ValueError, match="cannot unpack into torch.int8"):
        PackedLayout.of(engine, torch.int8)
