"""Quantized expert formats (INT8, INT4, FP8) against float64 references.

Each format is checked tightly against the reference computed from the weights it holds
(quantized and dequantized with torch by lvllm.lk.quant, independently of the C++ engine),
and loosely against the original float weights, which bounds the quantization error (the
tolerances and how they were derived: helpers.py, TIGHT* and LOOSE).
"""

from __future__ import annotations

import pytest
import torch

from lvllm import _lk, formats
from lvllm.lk import MoEEngine, QuantizedWeights, engine_group_size, make_runtime, planned_bytes, quant

from .helpers import (LOOSE, SUPPORTED_ISAS, activations_as_rounded, assert_close, assert_tight, random_experts,
                      random_fp8, random_inputs, random_int4, random_routing, reference_int4, reference_int8,
                      reference_moe, run_and_compare)


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
@pytest.mark.parametrize("weight_format, group", [("int8", 32), ("int8", 128), ("int4", 32), ("int4", 64)])
@pytest.mark.parametrize("source_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 5, 70])
def test_run_time_quantization(runtimes, isa, weight_format, group, source_dtype, tokens):
    # H = 200 and I = 72 leave a partial last group along both inputs.
    experts, hidden, intermediate = 6, 200, 72
    w13, w2 = random_experts(experts, hidden, intermediate, source_dtype, seed=group)
    engine = MoEEngine(w13, w2, weight_format=weight_format, group_size=group, runtime=runtimes(isa=isa))
    assert engine.weight_format == weight_format
    quantize = reference_int8 if weight_format == "int8" else reference_int4
    run_and_compare(engine, quantize(w13, group), quantize(w2, group), tokens, seed=tokens,
                    originals=(w13, w2), loose=LOOSE[weight_format])


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
@pytest.mark.parametrize("weight_format, group", [("int8", 256), ("int4", 128)])
@pytest.mark.parametrize("tokens", [1, 70])
def test_default_group_per_format(runtimes, isa, weight_format, group, tokens):
    """Without group_size the engine quantizes in the format's own group: H = 600 and
    I = 300 hold two and one whole INT8 groups of 256 and partial ones, so weights grouped
    otherwise would miss the tight reference."""
    experts, hidden, intermediate = 4, 600, 300
    w13, w2 = random_experts(experts, hidden, intermediate, torch.bfloat16, seed=tokens)
    engine = MoEEngine(w13, w2, weight_format=weight_format, runtime=runtimes(isa=isa))
    assert engine.group_size == group
    quantize = reference_int8 if weight_format == "int8" else reference_int4
    run_and_compare(engine, quantize(w13, group), quantize(w2, group), tokens, seed=tokens,
                    originals=(w13, w2), loose=LOOSE[weight_format])


@pytest.mark.parametrize("weight_format, requested, group",
                         [("int4", None, 32), ("int4", 64, 32), ("int8", None, 256), ("int8", 64, 64)])
def test_engine_group_size_is_the_engines(runtimes, weight_format, requested, group):
    """An INT4 checkpoint in groups of 32 keeps its groups as INT4 whatever the run-time
    group says, and is regrouped when converted to INT8: engine_group_size, which the vLLM
    adapter reports before the engine exists, says what the engine then uses."""
    w13, w2 = random_experts(2, 96, 64, torch.float32, seed=5)
    w13, w2 = (quant.quantize(w, "int4", 32) for w in (w13, w2))
    assert engine_group_size(w13, weight_format, requested) == group
    engine = MoEEngine(w13, w2, weight_format=weight_format, group_size=requested, runtime=runtimes())
    assert engine.group_size == group


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
@pytest.mark.parametrize("weight_format", ["int8", "int4"])
@pytest.mark.parametrize("tokens", [1, 3])
def test_integer_decode_edges(runtimes, isa, weight_format, tokens):
    # H = 1027 pads the last pair / four of rows with zeros; groups of 1024 run past the
    # integer kernels' 256-input flush span; I = 48 is one partial group.
    experts, hidden, intermediate, group = 3, 1027, 48, 1024
    w13, w2 = random_experts(experts, hidden, intermediate, torch.float32, seed=21)
    engine = MoEEngine(w13, w2, weight_format=weight_format, group_size=group, runtime=runtimes(isa=isa))
    quantize = reference_int8 if weight_format == "int8" else reference_int4
    run_and_compare(engine, quantize(w13, group), quantize(w2, group), tokens, seed=tokens)


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
@pytest.mark.parametrize("weight_format", ["int8", "int4"])
@pytest.mark.parametrize("tokens, experts", [(66, 1), (200, 3)])
def test_integer_formats_with_many_rows_per_expert(runtimes, isa, weight_format, tokens, experts):
    """Every expert gets more rows than one kernel call takes (64), the last call of each
    only a few: once crashed (a prefill-sized batch reached the integer kernels with no
    quantized activations)."""
    hidden, intermediate, group = 96, 64, 32
    w13, w2 = random_experts(experts, hidden, intermediate, torch.float32, seed=tokens)
    engine = MoEEngine(w13, w2, weight_format=weight_format, group_size=group, runtime=runtimes(isa=isa))
    quantize = reference_int8 if weight_format == "int8" else reference_int4
    run_and_compare(engine, quantize(w13, group), quantize(w2, group), tokens, seed=tokens)


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
@pytest.mark.parametrize("weight_format", ["int8", "int4"])
@pytest.mark.parametrize("numa_nodes", [0, 2])
def test_integer_results_do_not_depend_on_the_batch(runtimes, isa, weight_format, numa_nodes):
    """A token's output is the same bits whether its experts see it alone (decode) or among
    a prefill's hundreds of rows: a request's result must not depend on what else the
    server batches with it."""
    experts, hidden, intermediate, group, tokens = 4, 160, 96, 32, 300
    w13, w2 = random_experts(experts, hidden, intermediate, torch.float32, seed=5)
    engine = MoEEngine(w13, w2, weight_format=weight_format, group_size=group,
                       runtime=runtimes(isa=isa, numa_nodes=numa_nodes))
    x = torch.randn(tokens, hidden)
    ids, weights = random_routing(tokens, experts, 2, seed=6)
    batch = engine.forward(x, ids, weights)
    for first, count in [(0, 1), (7, 1), (150, 3), (299, 1), (40, 70)]:
        rows = slice(first, first + count)
        assert torch.equal(engine.forward(x[rows], ids[rows], weights[rows]), batch[rows])


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
@pytest.mark.parametrize("weight_format", ["int8", "int4"])
@pytest.mark.parametrize("group", [96, 1040])
def test_prefill_widening_over_deep_panels(runtimes, isa, weight_format, group):
    """Prefill widens a panel block by block where the kernels widen (the generic ones:
    whole groups of up to 16 KiB of 16-bit pairs, 512 inputs); a panel 2200 deep with
    group 96 spans five blocks, the last one partial, ending in a partial group and a
    partial block of rows. A group of 1040 fits no block, so that panel is multiplied unwidened. Either way
    a prefill's rows give the bits each row gives alone, and the float64 reference."""
    experts, hidden, intermediate, tokens = 2, 2200, 48, 40
    w13, w2 = random_experts(experts, hidden, intermediate, torch.float32, seed=group)
    engine = MoEEngine(w13, w2, weight_format=weight_format, group_size=group, runtime=runtimes(isa=isa))
    quantize = reference_int8 if weight_format == "int8" else reference_int4
    x = random_inputs(engine, tokens)
    ids, weights = random_routing(tokens, experts, 2, seed=group)
    batch = engine.forward(x, ids, weights)
    for row in (0, 17, 39):
        assert torch.equal(engine.forward(x[row:row + 1], ids[row:row + 1], weights[row:row + 1]), batch[row:row + 1])
    assert_tight(engine, batch, quantize(w13, group), quantize(w2, group), x, ids, weights)


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
@pytest.mark.parametrize("weight_format, value", [("int8", -128), ("int4", 0), ("int4", 15)])
def test_integer_sums_at_their_largest(runtimes, isa, weight_format, value):
    # Every weight at an end of its range (INT8 -128, as a checkpoint may hold; INT4 0 and
    # 15, which AVX2 multiplies as unsigned bytes) and every activation of one sign and
    # near its largest (INT4's round to 126 or 127): the integer dot products, and AVX2
    # INT4's 16-bit partial sums, reach their largest magnitude over a 1024-input group.
    experts, hidden, intermediate, group = 2, 1024, 1024, 1024

    def extreme(rows, cols):
        if weight_format == "int8":
            values = torch.full((experts, rows, cols), value, dtype=torch.int8)
            return QuantizedWeights(values, torch.full((experts, rows, 1), 1e-5), group)
        values = torch.full((experts, rows, cols), value, dtype=torch.uint8)
        scales = torch.full((experts, rows, 1), 1e-4)
        return QuantizedWeights(values, scales, group, -8 * scales)

    w13, w2 = extreme(2 * intermediate, hidden), extreme(hidden, intermediate)
    engine = MoEEngine(w13, w2, runtime=runtimes(isa=isa))
    assert engine.weight_format == weight_format
    x = 2 - torch.rand(2, hidden) / 256
    if weight_format == "int4":
        x = activations_as_rounded(group)(x)[0].float()
    ids = torch.tensor([[0, 1], [1, 0]], dtype=torch.int32)
    weights = torch.full((2, 2), 0.5)
    assert_tight(engine, engine.forward(x, ids, weights), *((w13, w2) if weight_format == "int4" else
                 (quant.dequantize(w13), quant.dequantize(w2))), x, ids, weights)


@pytest.mark.parametrize("numa_nodes", [2, 3])
@pytest.mark.parametrize("weight_format", ["int8", "int4"])
def test_quantized_virtual_nodes(runtimes, numa_nodes, weight_format):
    # I = 160 with group 32: node slices fall on group boundaries (5 groups over 2 or 3 nodes).
    experts, hidden, intermediate, group = 5, 96, 160, 32
    w13, w2 = random_experts(experts, hidden, intermediate, torch.bfloat16, seed=numa_nodes)
    engine = MoEEngine(w13, w2, weight_format=weight_format, group_size=group,
                       runtime=runtimes(numa_nodes=numa_nodes))
    quantize = reference_int8 if weight_format == "int8" else reference_int4
    run_and_compare(engine, quantize(w13, group), quantize(w2, group), 33, seed=numa_nodes)


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
@pytest.mark.parametrize("tokens", [1, 3, 40])
@pytest.mark.parametrize("numa_nodes", [0, 2])
def test_fp8_kept(runtimes, isa, tokens, numa_nodes):
    experts, hidden, intermediate, group = 5, 256, 256, 128
    w13, w13_ref = random_fp8(experts, 2 * intermediate, hidden, group, seed=1)
    w2, w2_ref = random_fp8(experts, hidden, intermediate, group, seed=2)
    engine = MoEEngine(w13, w2, runtime=runtimes(isa=isa, numa_nodes=numa_nodes))
    assert engine.weight_format == "fp8_e4m3"
    # 1 byte per weight plus one fp32 scale per 128: about a quarter of fp32
    assert engine.nbytes <= 1.1 * (w13.values.numel() + w2.values.numel())
    run_and_compare(engine, w13_ref, w2_ref, tokens, seed=tokens)


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("tokens", [64, 130, 200])
def test_fp8_prefill_widening_over_deep_panels(runtimes, isa, group, tokens):
    """Prefill widens FP8 panels to fp32 block by block on most ISAs (scales applied, in the
    Unpack's column order): 2200 inputs span several blocks and end in a partial group. 64
    rows per expert reach every ISA's widening; each row alone is unpacked in its passes.
    Each expert takes every token: widened chunks of an expert's rows are up to 128, so 130
    leaves 2 rows to passes that unpack, and 200 widens a second chunk of 72."""
    experts, hidden, intermediate = 2, 2200, 48
    w13, w13_ref = random_fp8(experts, 2 * intermediate, hidden, group, seed=23)
    w2, w2_ref = random_fp8(experts, hidden, intermediate, group, seed=24)
    engine = MoEEngine(w13, w2, runtime=runtimes(isa=isa))
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(group))
    ids, weights = random_routing(tokens, experts, 2, seed=group)
    assert_tight(engine, engine.forward(x, ids, weights).double(), w13_ref, w2_ref, x, ids, weights)
    rows = slice(5, 6)
    assert_tight(engine, engine.forward(x[rows], ids[rows], weights[rows]).double(), w13_ref, w2_ref, x[rows],
                 ids[rows], weights[rows])


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
@pytest.mark.parametrize("magnitude", [2.0**-30, 2.0**20])
@pytest.mark.parametrize("tokens", [1, 40])
def test_fp8_keeps_fp32_precision_for_small_and_large_activations(runtimes, isa, magnitude, tokens):
    """Unpacks may produce FP8 weights times a tiny constant (AVX2: 2^-120); products with
    small activations must not fall into fp32 denormals and lose bits (at 2^-30, gate's
    products would fall below the smallest denormal), nor large ones overflow (down's
    inputs here reach about magnitude^2)."""
    experts, hidden, intermediate, group = 3, 256, 128, 128
    w13, w13_ref = random_fp8(experts, 2 * intermediate, hidden, group, seed=21)
    w2, w2_ref = random_fp8(experts, hidden, intermediate, group, seed=22)
    engine = MoEEngine(w13, w2, runtime=runtimes(isa=isa))
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(tokens)) * magnitude
    ids, weights = random_routing(tokens, experts, 2, seed=tokens)
    out = engine.forward(x, ids, weights).double()
    assert torch.isfinite(out).all()
    assert_tight(engine, out, w13_ref, w2_ref, x, ids, weights)


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
@pytest.mark.parametrize("weight_format", ["bfloat16", "int8", "int4", "fp8_e4m3"])
def test_every_row_count_of_a_pass(runtimes, isa, weight_format):
    """One expert gets 1, 2, ... 14 rows: every count that decode reads two panels side by
    side for (gate and up, pairs of down panels), that one pass takes, and the first that
    prefill widens or splits into passes, on every ISA (their passes and pairs differ)."""
    experts, hidden, intermediate, group = 2, 160, 16 * 3 + 5, 32
    if weight_format == "fp8_e4m3":
        w13, w13_ref = random_fp8(experts, 2 * intermediate, hidden, group, seed=11)
        w2, w2_ref = random_fp8(experts, hidden, intermediate, group, seed=12)
        engine = MoEEngine(w13, w2, runtime=runtimes(isa=isa))
    else:
        w13_ref, w2_ref = random_experts(experts, hidden, intermediate, torch.float32, seed=13)
        engine = MoEEngine(w13_ref, w2_ref, weight_format=weight_format, group_size=group, runtime=runtimes(isa=isa))
        if weight_format == "int8":
            w13_ref, w2_ref = reference_int8(w13_ref, group), reference_int8(w2_ref, group)
        elif weight_format == "int4":
            w13_ref, w2_ref = reference_int4(w13_ref, group), reference_int4(w2_ref, group)
    for tokens in range(1, 15):
        x = random_inputs(engine, tokens)
        if weight_format == "bfloat16":
            x = x.bfloat16()
        ids = torch.ones(tokens, 1, dtype=torch.int32)
        weights = torch.rand(tokens, 1)
        out = engine.forward(x, ids, weights).double()
        if weight_format == "bfloat16":
            assert_close(out, reference_moe(w13_ref.bfloat16(), w2_ref.bfloat16(), x, ids, weights), torch.bfloat16)
        else:
            assert_tight(engine, out, w13_ref, w2_ref, x, ids, weights)


@pytest.mark.parametrize("weight_format", [None, "bfloat16", "int4"])
def test_fp8_nan_weights_are_refused(runtimes, weight_format):
    """Kept as FP8 or converted: the NaN code is refused at load, where it lies named."""
    w13, _ = random_fp8(2, 64, 32, 32, seed=6)
    w2, _ = random_fp8(2, 32, 32, 32, seed=7)
    w2.values.view(torch.uint8)[1, 3, 5] = 0xFF  # -NaN
    with pytest.raises(ValueError, match=r"w2: expert 1, row 3, input 5 holds a float8_e4m3fn NaN"):
        MoEEngine(w13, w2, weight_format=weight_format, group_size=32, runtime=runtimes())


@pytest.mark.parametrize("weight_format", ["bfloat16", "float32", "int4", "int8"])
def test_fp8_converted(runtimes, weight_format):
    experts, hidden, intermediate, group = 4, 128, 128, 128
    w13, w13_ref = random_fp8(experts, 2 * intermediate, hidden, group, seed=3)
    w2, w2_ref = random_fp8(experts, hidden, intermediate, group, seed=4)
    engine = MoEEngine(w13, w2, weight_format=weight_format, group_size=32, runtime=runtimes())
    if weight_format == "bfloat16":
        refs = w13_ref.bfloat16(), w2_ref.bfloat16()
    elif weight_format == "int4":
        refs = reference_int4(w13_ref, 32), reference_int4(w2_ref, 32)
    elif weight_format == "int8":
        refs = reference_int8(w13_ref, 32), reference_int8(w2_ref, 32)
    else:
        refs = w13_ref, w2_ref
    run_and_compare(engine, *refs, 9, seed=5)


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("tokens", [2, 30])
def test_int4_checkpoint_kept(runtimes, isa, group, tokens):
    experts, hidden, intermediate = 4, 256, 128
    w13, w13_ref = random_int4(experts, 2 * intermediate, hidden, group, seed=6)
    w2, w2_ref = random_int4(experts, hidden, intermediate, group, seed=7)
    engine = MoEEngine(w13, w2, runtime=runtimes(isa=isa, numa_nodes=2))
    assert engine.weight_format == "int4" and engine.group_size == group
    run_and_compare(engine, w13, w2, tokens, seed=tokens)


@pytest.mark.parametrize("weight_format", ["int8", "int4"])
@pytest.mark.parametrize("source", ["bfloat16", "float32", "fp8_e4m3"])
@pytest.mark.parametrize("experts_per_step", [3, None])
def test_torch_quantization_is_bit_identical_to_the_engines(runtimes, monkeypatch, weight_format, source,
                                                           experts_per_step):
    # What LVLLM_MOE_QUANT_ON_GPU relies on: quantizing with torch (on any device, a few
    # experts per step) and handing the engine the result gives exactly the engine's own
    # quantization. A partial last group (200 inputs, group 32), a constant group (INT4
    # scale 0) and a zero group; 3 experts per step leaves a short last step.
    experts, hidden, intermediate, group = 4, 200, 96, 32
    if experts_per_step:
        monkeypatch.setattr(quant, "CHUNK_FLOAT_BYTES", experts_per_step * 2 * intermediate * 224 * 4)
    if source == "fp8_e4m3":
        w13, _ = random_fp8(experts, 2 * intermediate, hidden, 128, seed=11)
        w2, _ = random_fp8(experts, hidden, intermediate, 128, seed=12)
    else:
        w13, w2 = random_experts(experts, hidden, intermediate, getattr(torch, source), seed=11)
        w13[0, 0, :32] = 0.25
        w13[1, 3, 32:64] = 0
    # Two virtual nodes split I by the stored groups alone, whatever the source's groups.
    runtime = runtimes(numa_nodes=2)
    own = MoEEngine(w13, w2, weight_format=weight_format, group_size=group, runtime=runtime)
    prequantized = MoEEngine(quant.quantize(w13, weight_format, group), quant.quantize(w2, weight_format, group),
                             runtime=runtime)
    assert prequantized.nbytes == own.nbytes
    x = torch.randn(40, hidden)
    ids, weights = random_routing(40, experts, 2, seed=12)
    assert torch.equal(own.forward(x, ids, weights), prequantized.forward(x, ids, weights))


def test_torch_quantization_refuses_fp8_nan():
    w, _ = random_fp8(3, 8, 64, 32, seed=13)
    w.values.view(torch.uint8)[2, 5, 40] = 0xFF
    with pytest.raises(ValueError, match="expert 2, row 5, input 40 holds a float8_e4m3fn NaN"):
        quant.quantize(w, "int4", 32)


def test_expand_block_scales():
    blocks = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    assert quant.expand_block_scales(blocks, rows=3, block_rows=2).tolist() == [[[1, 2], [1, 2], [3, 4]]]


def test_format_errors():
    runtime = make_runtime(threads=1, binding="NONE", power_saving=True, isa="", numa_nodes=0)
    w13, w2 = random_experts(2, 32, 16, torch.bfloat16, seed=8)
    with pytest.raises(ValueError, match="weight_format 'int3'"):
        MoEEngine(w13, w2, weight_format="int3", runtime=runtime)
    with pytest.raises(ValueError, match="group_size must be a positive multiple of 16"):
        MoEEngine(w13, w2, weight_format="int4", group_size=24, runtime=runtime)
    with pytest.raises(ValueError, match="FP8 weights only from FP8"):
        MoEEngine(w13, w2, weight_format="fp8_e4m3", runtime=runtime)
    fp8, _ = random_fp8(2, 32, 32, 32, seed=9)
    with pytest.raises(ValueError, match=r"w13.scales must be \(2, 32, 1\)"):
        MoEEngine(QuantizedWeights(fp8.values, fp8.scales[..., :0].contiguous(), 32), w2, runtime=runtime)
    int4, _ = random_int4(2, 32, 16, 16, seed=10)
    with pytest.raises(ValueError, match="int4 weights need offsets"):
        MoEEngine(w13, QuantizedWeights(int4.values, int4.scales, 16), runtime=runtime)
    with pytest.raises(ValueError, match="must share a format"):
        MoEEngine(w13, int4, runtime=runtime)


def test_format_names_match_the_engine():
    assert _lk.format_names() == ["float32", "float16", "bfloat16", "int8", "int4", "fp8_e4m3", "mxfp4", "nvfp4"]


def test_compressed_tensors_int4_checkpoint(runtimes):
    # tests/lk need torch alone; compressed-tensors comes with vLLM (always there in CI).
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    pack_to_int32 = helpers.pack_to_int32

    experts, hidden, intermediate, group = 3, 128, 64, 32
    generator = torch.Generator().manual_seed(13)

    def checkpoint(rows, cols):
        q = torch.randint(-8, 8, (experts, rows, cols), generator=generator, dtype=torch.int8)
        scale = (torch.rand(experts, rows, cols // group, generator=generator) + 0.5) / (8 * cols**0.5)
        weight = q.float() * scale.repeat_interleave(group, -1)
        return quant.from_compressed_tensors_int4(pack_to_int32(q, 4), scale.to(torch.bfloat16).float(), cols,
                                                  group), weight, scale

    w13, w13_float, _ = checkpoint(2 * intermediate, hidden)
    w2, w2_float, _ = checkpoint(hidden, intermediate)
    assert torch.allclose(quant.dequantize(w13), w13_float, rtol=1e-2)  # scales went through bf16
    engine = MoEEngine(w13, w2, runtime=runtimes())
    run_and_compare(engine, w13, w2, 7, seed=13)


@pytest.mark.parametrize("zero_points", [True, False])
def test_awq_int4_checkpoint(runtimes, zero_points):
    experts, hidden, intermediate, group = 2, 64, 32, 32
    generator = torch.Generator().manual_seed(14)
    order = (0, 2, 4, 6, 1, 3, 5, 7)  # AWQ's column order within a packed word

    def pack(columns):  # [..., n] values 0..15 -> int32 [..., n / 8], AWQ order
        words = columns.to(torch.int32).unflatten(-1, (-1, 8))
        return sum(words[..., order[i]] << (4 * i) for i in range(8)).to(torch.int32)

    def checkpoint(in_features, out_features):
        q = torch.randint(0, 16, (experts, in_features, out_features), generator=generator)
        zeros = torch.randint(0, 16, (experts, in_features // group, out_features), generator=generator)
        if not zero_points:
            zeros.fill_(8)
        scales = (torch.rand(experts, in_features // group, out_features, generator=generator) + 0.5) / 64
        weight = (q - zeros.repeat_interleave(group, 1)).float() * scales.repeat_interleave(group, 1)
        converted = quant.from_awq_int4(pack(q), pack(zeros) if zero_points else None, scales.half(), group)
        return converted, weight.transpose(1, 2)

    w13, w13_float = checkpoint(hidden, 2 * intermediate)
    w2, w2_float = checkpoint(intermediate, hidden)
    assert torch.allclose(quant.dequantize(w13), w13_float, rtol=2e-3, atol=1e-6)
    engine = MoEEngine(w13, w2, runtime=runtimes())
    run_and_compare(engine, w13, w2, 5, seed=14)


@pytest.mark.parametrize("bits, stored_group", [(4, 32), (8, 64), (4, -1), (8, -1)])
def test_gptq_checkpoint(runtimes, bits, stored_group):
    # GPTQ's symmetric layout, input-major: input 32 / bits * r + i of a column in bits
    # bits * i on of word r; scale per group of inputs (-1: one for all), zero point
    # 2^(bits - 1). Per-channel scales repeat over lk's per_channel_group (64 here).
    experts, hidden, intermediate = 2, 128, 64
    lk_group = formats.per_channel_group(hidden, intermediate) if stored_group == -1 else stored_group
    generator = torch.Generator().manual_seed(15 + bits)
    per_word, top = 32 // bits, (1 << bits) - 1

    def checkpoint(in_features, out_features):
        q = torch.randint(0, top + 1, (experts, in_features, out_features), generator=generator)
        q[:, 0, 0], q[:, 1, 0] = 0, top   # the grid's ends: -8 / -128 and 7 / 127
        words = sum(q[:, i::per_word].long() << (bits * i) for i in range(per_word))
        packed = (words - ((words >> 31) << 32)).to(torch.int32)
        group = in_features if stored_group == -1 else stored_group
        scales = ((torch.rand(experts, in_features // group, out_features, generator=generator) + 0.5)
                  / (2**bits * in_features**0.5)).half()
        weight = (q - (1 << (bits - 1))).double() * scales.double().repeat_interleave(group, 1)
        converted = quant.from_gptq(packed, scales, bits, lk_group)
        return converted, weight.transpose(1, 2)

    w13, w13_float = checkpoint(hidden, 2 * intermediate)
    w2, w2_float = checkpoint(intermediate, hidden)
    for converted, expected in ((w13, w13_float), (w2, w2_float)):
        assert converted.format == ("int4" if bits == 4 else "int8")
        assert torch.equal(quant.dequantize(converted).double(), expected)   # exact: fp16 scales
    engine = MoEEngine(w13, w2, runtime=runtimes())
    assert engine.weight_format == w13.format and engine.group_size == w13.group_size
    refs = (w13, w2) if bits == 4 else (quant.dequantize(w13), quant.dequantize(w2))
    run_and_compare(engine, *refs, 5, seed=bits)


def test_fp8_subnormals_survive_a_creator_thread_that_flushes_denormals():
    """Unpacking FP8 through fp32 denormals must not depend on the MXCSR of the thread that
    happened to create the pool (torch.set_flush_denormal sets DAZ/FTZ, threads inherit it)."""
    experts, hidden, intermediate, group = 2, 64, 32, 32
    generator = torch.Generator().manual_seed(11)

    def subnormal_fp8(rows, cols):
        magnitude = torch.randint(1, 8, (experts, rows, cols), generator=generator, dtype=torch.uint8)
        sign = torch.randint(0, 2, (experts, rows, cols), generator=generator, dtype=torch.uint8) << 7
        values = (magnitude | sign).view(torch.float8_e4m3fn)
        weights = QuantizedWeights(values, torch.full((experts, rows, cols // group), 2.0**12), group)
        return weights, quant.dequantize(weights)

    (w13, w13_ref), (w2, w2_ref) = subnormal_fp8(2 * intermediate, hidden), subnormal_fp8(hidden, intermediate)
    assert torch.set_flush_denormal(True)
    try:
        runtime = make_runtime(threads=2)
    finally:
        torch.set_flush_denormal(False)
    run_and_compare(MoEEngine(w13, w2, runtime=runtime), w13_ref, w2_ref, tokens=3, seed=3)


@pytest.mark.parametrize("weight_format, group", [("float32", 128), ("bfloat16", 128), ("int8", 256), ("int8", 48),
                                                  ("int4", 128), ("int4", 32), ("fp8_e4m3", 64)])
@pytest.mark.parametrize("numa_nodes", [0, 2, 3])
def test_planned_bytes_are_what_the_engine_holds(runtimes, weight_format, group, numa_nodes):
    # What lvllm's RAM budget adds up before loading: every format, uneven node slices.
    experts, hidden, intermediate = 3, 16 * 12 + 8, 16 * 9 + 5
    runtime = runtimes(numa_nodes=numa_nodes)
    if weight_format == "fp8_e4m3":
        w13, w2 = (random_fp8(experts, rows, cols, group, seed=1)[0]
                   for rows, cols in ((2 * intermediate, hidden), (hidden, intermediate)))
    else:
        w13, w2 = random_experts(experts, hidden, intermediate, torch.float32, seed=1)
    engine = MoEEngine(w13, w2, weight_format=weight_format, group_size=group, runtime=runtime)
    assert planned_bytes(experts, hidden, intermediate, weight_format, group, runtime) == engine.nbytes
