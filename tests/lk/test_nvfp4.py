"""NVFP4 experts (NVIDIA ModelOpt's layout) against a float64 reference computed here from
the raw codes, e4m3 scale bytes and row scales, sharing no code with the engine or with
lvllm.lk.nvfp4.

A weight is e2m1(code) x e4m3(scale of its 16 inputs) x weight_scale_2 of its tensor, the
even input's code in the low nibble (as lvllm.lk.mxfp4's test states for e2m1 packing;
ModelOpt packs NVFP4's codes alike). The engine rounds each group's scale once to fp32
(e4m3 x row scale), which the tight bound covers.
"""

from __future__ import annotations

import pytest
import torch

from lvllm import _lk
from lvllm.lk import MoEEngine, QuantizedWeights, nvfp4, planned_bytes, quant

from .helpers import (SUPPORTED_ISAS, TIGHT, activations_as_rounded, assert_converted_as_torch_does, assert_unpacks_to,
                      random_experts, random_routing, reference_moe)

GROUP = 16
STEPS = 127
# Against the float64 reference with unrounded activations: 8-bit activations per 16 inputs.
LOOSE = 2e-2


def e4m3_float64(bits: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn bytes -> float64: sign, 4 exponent bits (bias 7), 3 mantissa bits,
    exponent 0 subnormal; S.1111.111 NaN."""
    bits = bits.long()
    exponent, mantissa = (bits >> 3) & 15, (bits & 7).double()
    magnitude = torch.where(exponent == 0, mantissa / 8 * 2.0 ** -6,
                            (1 + mantissa / 8) * torch.pow(2.0, (exponent - 7).double()))
    magnitude = torch.where((bits & 0x7F) == 0x7F, torch.nan, magnitude)
    return torch.where(bits >= 128, -magnitude, magnitude)


def reference(w: QuantizedWeights) -> torch.Tensor:
    codes = torch.stack((w.values & 15, w.values >> 4), dim=-1).flatten(-2).long()
    exponent, mantissa = (codes >> 1) & 3, (codes & 1).double()
    magnitude = torch.where(exponent == 0, mantissa / 2, (1 + mantissa / 2) * torch.pow(2.0, (exponent - 1).double()))
    values = torch.where(codes >= 8, -magnitude, magnitude)
    scales = e4m3_float64(w.scales.view(torch.uint8)) * w.row_scales.double().unsqueeze(-1)
    return values * scales.repeat_interleave(GROUP, -1)


def random_nvfp4(experts, rows, cols, seed, scale_bytes=(0x20, 0x48)) -> QuantizedWeights:
    """Checkpoint-shaped NVFP4: every code, e4m3 scale bytes drawn from `scale_bytes`
    (inclusive; 0x20-0x48 is 2^-3..2^2), row scales per tensor of 8 rows, as w13's gate and
    up tensors (and w2's) each carry their own."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (experts, rows, cols // 2), generator=generator, dtype=torch.uint8)
    low, high = scale_bytes
    scales = torch.randint(low, high + 1, (experts, rows, cols // GROUP), generator=generator, dtype=torch.uint8)
    tensor_scales = torch.rand(experts, rows // 8, generator=generator) / 100 + 1e-3
    return QuantizedWeights(codes, scales.view(torch.float8_e4m3fn), GROUP,
                            row_scales=nvfp4.row_scales_of(tensor_scales, rows))


def on_grid(x: torch.Tensor) -> torch.Tensor:
    """Inputs on the engine's 8-bit activation grid, so that their rounding is not in doubt."""
    return activations_as_rounded(GROUP, STEPS)(x)[0].float().contiguous()


def assert_matches(engine, out, w13, w2, x, ids, weights):
    """Tight against the reference that rounds activations as the engine does, loose
    against the one that does not."""
    w13_ref, w2_ref = reference(w13), reference(w2)
    ref, slack = reference_moe(w13_ref, w2_ref, x, ids, weights, engine.activation,
                               round_activations=activations_as_rounded(GROUP, STEPS))
    out = out.double()
    assert torch.isfinite(out).all()
    assert ((out - ref).abs() <= TIGHT * ref.abs().max().item() + slack).all()
    unrounded = reference_moe(w13_ref, w2_ref, x, ids, weights, engine.activation)
    assert (out - unrounded).abs().max().item() <= LOOSE * unrounded.abs().max().item()


def make(experts, hidden, intermediate, seed, **kwargs):
    return random_nvfp4(experts, 2 * intermediate, hidden, seed, **kwargs), \
        random_nvfp4(experts, hidden, intermediate, seed + 1, **kwargs)


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
@pytest.mark.parametrize("tokens", [1, 2, 3])
@pytest.mark.parametrize("numa_nodes", [0, 2])
def test_decode(runtimes, isa, tokens, numa_nodes):
    # H = 208 (13 groups), I = 48 (3 groups): odd group counts; two nodes split I by groups.
    experts, hidden, intermediate = 5, 208, 48
    w13, w2 = make(experts, hidden, intermediate, seed=tokens)
    engine = MoEEngine(w13, w2, runtime=runtimes(isa=isa, numa_nodes=numa_nodes))
    assert engine.weight_format == "nvfp4" and engine.group_size == GROUP
    x = on_grid(torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(tokens)))
    ids, weights = random_routing(tokens, experts, 2, seed=tokens)
    assert_matches(engine, engine.forward(x, ids, weights), w13, w2, x, ids, weights)


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
def test_prefill(runtimes, isa):
    """Every expert gets more rows than a kernel call takes (a widened chunk and a short one
    after it), panels deeper than a widened block (H = 1088; AVX2 widens 1024 inputs)."""
    experts, tokens, hidden, intermediate = 2, 230, 1088, 64
    w13, w2 = make(experts, hidden, intermediate, seed=11)
    engine = MoEEngine(w13, w2, runtime=runtimes(isa=isa))
    x = on_grid(torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(11)))
    ids, weights = random_routing(tokens, experts, experts, seed=11)
    assert_matches(engine, engine.forward(x, ids, weights), w13, w2, x, ids, weights)


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
def test_every_row_count_of_a_pass(runtimes, isa):
    """1 to 14 rows on one expert: every count decode reads two panels side by side for,
    one pass takes, and the first that prefill widens or splits into passes."""
    experts, hidden, intermediate = 2, 160, 64
    w13, w2 = make(experts, hidden, intermediate, seed=3)
    engine = MoEEngine(w13, w2, runtime=runtimes(isa=isa))
    for tokens in range(1, 15):
        x = on_grid(torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(tokens)))
        ids = torch.ones(tokens, 1, dtype=torch.int32)
        weights = torch.rand(tokens, 1, generator=torch.Generator().manual_seed(tokens))
        assert_matches(engine, engine.forward(x, ids, weights), w13, w2, x, ids, weights)


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
def test_results_do_not_depend_on_the_batch(runtimes, isa):
    """A token's output is the same bits alone (decode) or among a prefill that widens a
    deep panel in several blocks (H = 2112)."""
    experts, hidden, intermediate, tokens = 3, 2112, 64, 260
    w13, w2 = make(experts, hidden, intermediate, seed=9)
    engine = MoEEngine(w13, w2, runtime=runtimes(isa=isa))
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(9))
    ids, weights = random_routing(tokens, experts, 2, seed=9)
    batch = engine.forward(x, ids, weights)
    for first, count in [(0, 1), (100, 3), (259, 1), (40, 70)]:
        rows = slice(first, first + count)
        assert torch.equal(engine.forward(x[rows], ids[rows], weights[rows]), batch[rows])


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
@pytest.mark.parametrize("tokens", [2, 40])
def test_scales_at_their_ends(runtimes, isa, tokens):
    """Every e4m3 scale but NaN (subnormals, negative ones, 0 and 448), row scales from
    2^-20 to 2^10 (gate and up apart), and every weight at 6 with activations at their
    largest (8 byte products of 24 x 127 per 16-bit lane)."""
    experts, hidden, intermediate = 2, 256, 96
    w13, w2 = make(experts, hidden, intermediate, seed=tokens, scale_bytes=(0, 0x7E))
    w13.scales.view(torch.uint8)[0, :, 0] = (torch.arange(2 * intermediate) % 127).to(torch.uint8) | 0x80
    w13.row_scales[0, :intermediate] = 2.0 ** -20
    w13.row_scales[1, intermediate:] = 2.0 ** 10
    w13.values[1, :, :8] = 0x77  # +6 +6 over the first group
    w2.values[1, :, :8] = 0x77
    engine = MoEEngine(w13, w2, activation="swigluoai", runtime=runtimes(isa=isa))
    x = on_grid(2 - torch.rand(tokens, hidden, generator=torch.Generator().manual_seed(tokens)) / 256)
    ids, weights = random_routing(tokens, experts, 2, seed=tokens)
    assert_matches(engine, engine.forward(x, ids, weights), w13, w2, x, ids, weights)


def test_nibble_order_and_scales():
    """Byte 0x21 holds input 0 = code 1 (0.5) and input 1 = code 2 (1.0); 0xF0 input 3 = code
    15 (-6); e4m3 0x40 is 2, 0x01 the smallest subnormal 2^-9; the row scale multiplies."""
    codes = torch.zeros(1, 2, 8, dtype=torch.uint8)
    codes[0, :, 0], codes[0, :, 1] = 0x21, 0xF0
    scales = torch.tensor([[[0x40], [0x01]]], dtype=torch.uint8).view(torch.float8_e4m3fn)
    row_scales = torch.tensor([[0.25, 4.0]])
    weights = QuantizedWeights(codes, scales, GROUP, row_scales=row_scales)
    expected = torch.zeros(2, 16, dtype=torch.float64)
    expected[:, :4] = torch.tensor([0.5, 1.0, 0.0, -6.0], dtype=torch.float64)
    expected[0] *= 2 * 0.25
    expected[1] *= 2.0 ** -9 * 4
    assert torch.equal(reference(weights)[0], expected)
    assert torch.equal(nvfp4.dequantize(codes, scales, row_scales)[0].double(), expected)


@pytest.mark.parametrize("nodes", [1, 2])
def test_engine_memory_unpacks_to_the_checkpoint_weights(runtimes, nodes):
    """The GPU prefill path's unpack (Triton's interpreter here) gives the dequantized
    checkpoint weights as torch computes them (each group's scale rounded once), every e4m3
    scale but NaN included."""
    experts, hidden, intermediate = 3, 96, 64
    w13, w2 = make(experts, hidden, intermediate, seed=nodes, scale_bytes=(0, 0x7E))
    w13.scales.view(torch.uint8)[1] |= 0x80   # negative scales too
    engine = MoEEngine(w13, w2, runtime=runtimes(threads=1, numa_nodes=nodes))
    assert_unpacks_to(engine, quant.dequantize(w13), quant.dequantize(w2))


@pytest.mark.parametrize("weight_format", ["bfloat16", "float32", "int8", "int4"])
def test_converted_at_load(runtimes, weight_format):
    """LVLLM_MOE_USE_WEIGHT=TO_DTYPE / INT8 / INT4: the engine dequantizes NVFP4 as torch does
    (lvllm.lk.quant, LVLLM_MOE_QUANT_ON_GPU) and stores or requantizes that."""
    experts, hidden, intermediate, group = 4, 128, 96, 32
    w13, w2 = make(experts, hidden, intermediate, seed=4)
    engine = MoEEngine(w13, w2, weight_format=weight_format, group_size=group, runtime=runtimes(numa_nodes=2))
    assert engine.weight_format == weight_format
    assert (quant.dequantize(w13).double() - reference(w13)).abs().max() <= 2 ** -23 * reference(w13).abs().max()
    x = torch.randn(9, hidden, generator=torch.Generator().manual_seed(4))
    ids, weights = random_routing(9, experts, 2, seed=4)
    assert_converted_as_torch_does(engine, runtimes(numa_nodes=2), w13, w2, x, ids, weights)


def test_planned_bytes_and_size(runtimes):
    experts, hidden, intermediate = 3, 224, 160
    runtime = runtimes(numa_nodes=3)
    w13, w2 = make(experts, hidden, intermediate, seed=2)
    engine = MoEEngine(w13, w2, runtime=runtime)
    assert planned_bytes(experts, hidden, intermediate, "nvfp4", GROUP, runtime) == engine.nbytes
    # 4.5 bits per weight as in the checkpoint, plus a line of row scales per panel and the
    # panels' padding to 64-byte lines
    checkpoint = sum(t.numel() for w in (w13, w2) for t in (w.values, w.scales))
    assert checkpoint <= engine.nbytes <= 1.25 * checkpoint


def test_errors(runtimes):
    runtime = runtimes()
    w13, w2 = make(2, 64, 32, seed=5)
    with pytest.raises(ValueError, match="NVFP4 groups are 16 inputs, got group_size 32"):
        MoEEngine(w13, QuantizedWeights(w2.values, w2.scales, 32, row_scales=w2.row_scales), runtime=runtime)
    with pytest.raises(ValueError, match="w2: nvfp4 weights need row_scales"):
        MoEEngine(w13, QuantizedWeights(w2.values, w2.scales, GROUP), runtime=runtime)
    with pytest.raises(ValueError, match=r"w2.row_scales must be \(2, 64\)"):
        MoEEngine(w13, QuantizedWeights(w2.values, w2.scales, GROUP, row_scales=w2.row_scales[:, :8].contiguous()),
                  runtime=runtime)
    with pytest.raises(ValueError, match="stores NVFP4 only from NVFP4 weights"):
        MoEEngine(*random_experts(2, 64, 32, torch.float32, seed=5), weight_format="nvfp4", group_size=16,
                  runtime=runtime)
    with pytest.raises(ValueError, match=r"w2.scales must be \(2, 64, 2\) e4m3 scales"):
        MoEEngine(w13, QuantizedWeights(w2.values, w2.scales[:, :, :1].contiguous(), GROUP,
                                        row_scales=w2.row_scales), runtime=runtime)


@pytest.mark.parametrize("weight_format", [None, "bfloat16", "int4"])
def test_nan_scales_are_refused(runtimes, weight_format):
    """Kept or converted, an e4m3 NaN scale or a row scale that is infinite or 2^20 and above
    (the engine keeps them times 2^104) is refused at load, where it lies named; torch's
    quantization (LVLLM_MOE_QUANT_ON_GPU) refuses them alike."""
    w13, w2 = make(2, 64, 64, seed=6)
    w2.scales.view(torch.uint8)[1, 3, 1] = 0xFF
    message = "expert 1, row 3, inputs 16-31 have a float8_e4m3fn NaN scale"
    with pytest.raises(ValueError, match="w2: " + message):
        MoEEngine(w13, w2, weight_format=weight_format, group_size=32, runtime=runtimes())
    with pytest.raises(ValueError, match=message):
        quant.quantize(w2, "int4", 32)
    for row_scale, shown in ((float("inf"), "inf"), (-2.0**20, "-1048576")):
        w13.row_scales[0, 5] = row_scale
        message = f"expert 0, row 5 has a weight_scale_2 of {shown}.*; lk takes finite ones below 2\\^20"
        with pytest.raises(ValueError, match="w13: " + message):
            MoEEngine(w13, make(2, 64, 64, seed=6)[1], weight_format=weight_format, group_size=32, runtime=runtimes())
        with pytest.raises(ValueError, match=message):
            quant.quantize(w13, "int4", 32)


def test_torch_quantizer_round_trips():
    """lvllm.lk.nvfp4.quantize (for tests and the tiny-model builder) picks ModelOpt's scales
    and the nearest code: values on a group's grid with the scales it would pick come back
    as they were, noisy ones within NVFP4's error."""
    w = torch.randn(2, 32, 64, generator=torch.Generator().manual_seed(7))
    codes, scales, tensor_scales = nvfp4.quantize(w)
    weights = QuantizedWeights(codes, scales, GROUP, row_scales=nvfp4.row_scales_of(tensor_scales, 32))
    assert tensor_scales.tolist() == (w.abs().flatten(1).amax(-1) / (6 * 448)).tolist()
    assert (scales.float() <= 448).all()
    error = (quant.dequantize(weights) - w).norm() / w.norm()
    assert error < 0.1


def test_format_name_and_code():
    assert _lk.format_names()[7] == "nvfp4"
