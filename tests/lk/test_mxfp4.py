"""MXFP4 experts (OCP microscaling, as gpt-oss ships them) against a float64 reference
computed from the raw blocks and e8m0 scales by lvllm.dequantize.dequantize_mxfp4, which
shares no code with the engine or with lvllm.lk.mxfp4.

Nibble order and scale: the low nibble of a byte is the even input, the high nibble the odd
one, and a weight is e2m1(code) * 2^(scale - 127), as Hugging Face transformers reads
gpt-oss's `*_blocks` / `*_scales` (src/transformers/integrations/mxfp4.py,
convert_moe_packed_tensors: `sub[:, 0::2] = lut[blk & 0x0F]`, `sub[:, 1::2] = lut[blk >> 4]`,
`torch.ldexp(sub, scales - 127)`), blocks shaped [E, out, in / 32, 16].
"""

from __future__ import annotations

import pytest
import torch

from lvllm import _lk
from lvllm.lk import MoEEngine, QuantizedWeights, mxfp4, planned_bytes, quant
from lvllm.dequantize import dequantize_mxfp4

from .helpers import (SUPPORTED_ISAS, TIGHT, activations_as_rounded, assert_converted_as_torch_does, assert_unpacks_to,
                      random_experts, random_routing, reference_moe)

GROUP = 32
# The engine rounds MXFP4's activations to 85 steps each side per group of 32, so that a
# group's 16 byte products per 16-bit lane (weights biased to 0..24) cannot pass 2^15.
STEPS = 85
# Against the float64 reference with unrounded activations: 1-3% of the largest output
# (worst seen: 3.1e-2, on rows that 127 steps would leave within 1.4e-2).
LOOSE = 4e-2


def random_mxfp4(experts, rows, cols, seed, exponents=(118, 123)) -> QuantizedWeights:
    """Checkpoint-shaped MXFP4: every code, and scales drawn from `exponents` (inclusive)."""
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (experts, rows, cols // GROUP, GROUP // 2), generator=generator, dtype=torch.uint8)
    low, high = exponents
    scales = torch.randint(low, high + 1, (experts, rows, cols // GROUP), generator=generator, dtype=torch.uint8)
    return QuantizedWeights(blocks, scales, GROUP)


def reference(w: QuantizedWeights) -> torch.Tensor:
    return dequantize_mxfp4(w.values, w.scales)


def on_grid(x: torch.Tensor) -> torch.Tensor:
    """Inputs on the engine's 8-bit activation grid, so that their rounding is not in doubt."""
    return activations_as_rounded(GROUP, STEPS)(x)[0].float().contiguous()


def assert_matches(engine, out, w13, w2, x, ids, weights):
    """Tight against the reference that rounds activations as the engine does (exact integer
    products; fp32 rounding and hidden activations within a step of a tie remain), and
    loose against the one that does not."""
    w13_ref, w2_ref = reference(w13), reference(w2)
    ref, slack = reference_moe(w13_ref, w2_ref, x, ids, weights, engine.activation,
                               round_activations=activations_as_rounded(GROUP, STEPS))
    out = out.double()
    assert torch.isfinite(out).all()
    assert ((out - ref).abs() <= TIGHT * ref.abs().max().item() + slack).all()
    unrounded = reference_moe(w13_ref, w2_ref, x, ids, weights, engine.activation)
    assert (out - unrounded).abs().max().item() <= LOOSE * unrounded.abs().max().item()


def make(experts, hidden, intermediate, seed, **kwargs):
    return random_mxfp4(experts, 2 * intermediate, hidden, seed, **kwargs), \
        random_mxfp4(experts, hidden, intermediate, seed + 1, **kwargs)


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
@pytest.mark.parametrize("tokens", [1, 2, 3, 4])
@pytest.mark.parametrize("numa_nodes", [0, 2])
def test_decode(runtimes, isa, tokens, numa_nodes):
    # H = 224 (7 groups), I = 96 (3 groups): odd group counts; two nodes split I by groups.
    experts, hidden, intermediate = 5, 224, 96
    w13, w2 = make(experts, hidden, intermediate, seed=tokens)
    engine = MoEEngine(w13, w2, runtime=runtimes(isa=isa, numa_nodes=numa_nodes))
    assert engine.weight_format == "mxfp4" and engine.group_size == GROUP
    x = on_grid(torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(tokens)))
    ids, weights = random_routing(tokens, experts, 2, seed=tokens)
    assert_matches(engine, engine.forward(x, ids, weights), w13, w2, x, ids, weights)


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
@pytest.mark.parametrize("tokens, experts", [(230, 2), (67, 1)])
def test_prefill(runtimes, isa, tokens, experts):
    """Every expert gets more rows than a kernel call takes (128: a widened chunk and a short
    one after it, or 67 rows: one chunk widened), deep panels spanning several widened
    blocks (H = 1088: 34 groups; AVX2 widens 1024 inputs at a time)."""
    hidden, intermediate = 1088, 64
    w13, w2 = make(experts, hidden, intermediate, seed=tokens)
    engine = MoEEngine(w13, w2, runtime=runtimes(isa=isa))
    x = on_grid(torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(tokens)))
    ids, weights = random_routing(tokens, experts, experts, seed=tokens)
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
@pytest.mark.parametrize("hidden", [192, 2112])
def test_results_do_not_depend_on_the_batch(runtimes, isa, hidden):
    """Integer sums: a token's output is the same bits alone (decode) or among a prefill,
    also where prefill widens a deep panel in several blocks (H = 2112: 66 groups)."""
    experts, intermediate, tokens = 3, 64, 260
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
def test_scales_far_apart_and_at_their_ends(runtimes, isa, tokens):
    """Scales spread over 2^-27..2^13 from group to group (each group's sums scaled on
    their own), a row of e8m0 0 (2^-127, read as 0: its weights are below 2^-124) and every
    weight at 6 with activations near their largest (the 16-bit partial sums' largest)."""
    experts, hidden, intermediate = 2, 256, 96
    w13, w2 = make(experts, hidden, intermediate, seed=tokens, exponents=(100, 140))
    w13.scales[0, 5] = 0
    w13.values[1, :, :2] = 0x77  # +6 +6 times inputs all at +85 steps: 16 * 24 * 85 per lane
    w2.values[1, :, :2] = 0x77
    w2.scales[1, :, :2] = 120
    engine = MoEEngine(w13, w2, activation="swigluoai", runtime=runtimes(isa=isa))
    x = on_grid(2 - torch.rand(tokens, hidden, generator=torch.Generator().manual_seed(tokens)) / 256)
    ids, weights = random_routing(tokens, experts, 2, seed=tokens)
    assert_matches(engine, engine.forward(x, ids, weights), w13, w2, x, ids, weights)


def test_nibble_order_and_scale():
    """Byte 0x21 holds input 0 = code 1 (0.5) and input 1 = code 2 (1.0); code 15 is -6;
    scale 128 doubles (see the module docstring for the source)."""
    blocks = torch.zeros(1, 1, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0, 0], blocks[0, 0, 0, 1] = 0x21, 0xF0
    scales = torch.tensor([[[128]]], dtype=torch.uint8)
    expected = torch.zeros(32, dtype=torch.float64)
    expected[:4] = torch.tensor([1.0, 2.0, 0.0, -12.0])
    assert torch.equal(dequantize_mxfp4(blocks, scales)[0, 0], expected)
    assert torch.equal(mxfp4.dequantize(blocks, scales)[0, 0].double(), expected)


@pytest.mark.parametrize("nodes", [1, 2])
def test_engine_memory_unpacks_to_the_checkpoint_weights(runtimes, nodes):
    """The GPU prefill path's unpack (Triton's interpreter here) gives the dequantized
    checkpoint weights exactly, e8m0 0 (2^-127) included."""
    experts, hidden, intermediate = 3, 96, 64
    w13, w2 = make(experts, hidden, intermediate, seed=nodes, exponents=(0, 140))
    engine = MoEEngine(w13, w2, runtime=runtimes(threads=1, numa_nodes=nodes))
    assert_unpacks_to(engine, reference(w13), reference(w2))


@pytest.mark.parametrize("weight_format", ["bfloat16", "float32", "int8", "int4"])
def test_converted_at_load(runtimes, weight_format):
    """LVLLM_MOE_USE_WEIGHT=TO_DTYPE / INT8 / INT4: the engine dequantizes MXFP4 exactly and
    stores or requantizes that, as torch does it (lvllm.lk.quant, LVLLM_MOE_QUANT_ON_GPU)."""
    experts, hidden, intermediate, group = 4, 128, 96, 32
    w13, w2 = make(experts, hidden, intermediate, seed=4)
    engine = MoEEngine(w13, w2, weight_format=weight_format, group_size=group, runtime=runtimes(numa_nodes=2))
    assert engine.weight_format == weight_format
    assert torch.equal(quant.dequantize(w13).double(), reference(w13))
    x = on_grid(torch.randn(9, hidden, generator=torch.Generator().manual_seed(4)))
    ids, weights = random_routing(9, experts, 2, seed=4)
    assert_converted_as_torch_does(engine, runtimes(numa_nodes=2), w13, w2, x, ids, weights)


def test_planned_bytes_and_size(runtimes):
    experts, hidden, intermediate = 3, 224, 160
    runtime = runtimes(numa_nodes=3)
    w13, w2 = make(experts, hidden, intermediate, seed=2)
    engine = MoEEngine(w13, w2, runtime=runtime)
    assert planned_bytes(experts, hidden, intermediate, "mxfp4", GROUP, runtime) == engine.nbytes
    # 4.25 bits per weight as in the checkpoint, plus the panels' padding to 64-byte lines
    checkpoint = sum(t.numel() for w in (w13, w2) for t in (w.values, w.scales))
    assert checkpoint <= engine.nbytes <= 1.1 * checkpoint


def test_errors(runtimes):
    runtime = runtimes()
    w13, w2 = make(2, 64, 32, seed=5)
    with pytest.raises(ValueError, match="MXFP4 groups are 32 inputs, got group_size 64"):
        MoEEngine(w13, QuantizedWeights(w2.values, w2.scales, 64), runtime=runtime)
    # Kept as MXFP4, the checkpoint's groups win over a requested one; the engine itself
    # refuses any other.
    assert MoEEngine(w13, w2, group_size=64, runtime=runtime).group_size == GROUP
    with pytest.raises(ValueError, match="w13: MXFP4 groups are 32 inputs, got group size 64"):
        _lk.Engine(runtime, w13.native_args("w13"), w2.native_args("w2"), 2, 64, 32, 6, 64, 0, 1.702, 7.0)
    with pytest.raises(ValueError, match="stores MXFP4 only from MXFP4 weights"):
        MoEEngine(*random_experts(2, 64, 32, torch.float32, seed=5), weight_format="mxfp4", group_size=32,
                  runtime=runtime)
    with pytest.raises(ValueError, match=r"w2.scales must be \(2, 64, 1\) e8m0 bytes"):
        MoEEngine(w13, QuantizedWeights(w2.values, w2.scales[:, :32].contiguous(), 32), runtime=runtime)
    with pytest.raises(ValueError, match="whole groups of 32 inputs, got 48"):
        MoEEngine(w13, QuantizedWeights(torch.zeros(2, 64, 24, dtype=torch.uint8),
                                        torch.zeros(2, 64, 1, dtype=torch.uint8), 32), runtime=runtime)


@pytest.mark.parametrize("weight_format", [None, "bfloat16", "int4"])
def test_nan_scales_are_refused(runtimes, weight_format):
    """Kept or converted, the e8m0 NaN byte is refused at load, where it lies named; torch's
    quantization (LVLLM_MOE_QUANT_ON_GPU) refuses it alike."""
    w13, w2 = make(2, 64, 64, seed=6)
    w2.scales[1, 3, 1] = 255
    message = r"expert 1, row 3, inputs 32-63 have the e8m0 NaN scale \(255\)"
    with pytest.raises(ValueError, match="w2: " + message):
        MoEEngine(w13, w2, weight_format=weight_format, group_size=32, runtime=runtimes())
    with pytest.raises(ValueError, match=message):
        quant.quantize(w2, "int4", 32)


def test_torch_quantizer_round_trips():
    """lvllm.lk.mxfp4.quantize (for benchmarks) picks OCP's shared exponent and the nearest
    code: values already on a group's grid come back as they were."""
    w13, _ = make(2, 64, 32, seed=7)
    weights = quant.dequantize(w13)
    blocks, scales = mxfp4.quantize(weights)
    assert torch.equal(mxfp4.dequantize(blocks, scales), weights)
    noisy = weights * (1 + torch.rand(weights.shape, generator=torch.Generator().manual_seed(7)) / 20)
    blocks, scales = mxfp4.quantize(noisy)
    error = (mxfp4.dequantize(blocks, scales) - noisy).norm() / noisy.norm()
    assert error < 0.1


def test_format_name_and_code():
    assert _lk.format_names()[6] == "mxfp4"
