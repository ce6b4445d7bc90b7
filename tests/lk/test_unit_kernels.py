"""The unit kernels of prefill (csrc/lk/kernels/x86/unit_gemm.h), on every unit the
CPU has: AMX tiles (x86/amx) and AVX512_BF16 pair products (x86/avx512_bf16).

INT8 and INT4 (AMX only) must give the bits of the AVX512_VNNI kernels, which the rest of
tests/lk holds to float64 references: the tiles compute the same integer sums and finish
them with the same fp32 operations. bf16 and FP8 multiply each fp32 activation as the sum
of two bf16 values (the second skipped where it is zero for every row), which leaves it
within 2^-18 of the activation: held to the float64 reference as the fp32 formats are.
"""

from __future__ import annotations

import pytest
import torch

from lvllm.lk import MoEEngine, QuantizedWeights, quant

from .helpers import SUPPORTED_ISAS, TIGHT, random_experts, random_fp8, reference_moe

needs_amx = pytest.mark.skipif("AMX" not in SUPPORTED_ISAS, reason="this CPU has no AMX tiles")
# The ISAs whose float formats multiply staged rows on a unit.
FLOAT_UNITS = [pytest.param(isa, marks=pytest.mark.skipif(isa not in SUPPORTED_ISAS, reason=f"this CPU has no {isa}"))
               for isa in ("AVX512_BF16", "AMX")]

# Rows per expert around every edge of the unit kernels: the fewest they take (bf16 6,
# INT8 9, INT4 12, csrc/lk/kernels/x86/{amx,avx512_bf16}/*.cpp), a pass of 8 rows of the
# AVX512_BF16 unit and last passes of 1, 4 and 7 rows after one (9, 12 and 15), one tile
# of 16 rows and its neighbours, two to four tiles (one or two AMX passes), the integer
# formats' chunk of 64 rows and their second chunk, the float formats' five to eight tiles
# (three and four passes), their chunk of 128 rows, and their second chunk.
ROW_COUNTS = [6, 8, 9, 12, 15, 16, 17, 31, 32, 33, 47, 48, 49, 63, 64, 65, 70, 81, 97, 113, 127, 128, 135]


def routing_with_row_counts(counts: list[int]):
    """Expert e gets counts[e] tokens, each token one expert (k = 1)."""
    ids = torch.cat([torch.full((n,), e, dtype=torch.int32) for e, n in enumerate(counts)])[:, None]
    return ids, torch.rand(ids.shape[0], 1, generator=torch.Generator().manual_seed(sum(counts)))


@needs_amx
@pytest.mark.parametrize("weight_format", ["int8", "int4"])
@pytest.mark.parametrize("hidden, intermediate, group", [(96, 64, 32), (1040, 200, 128), (300, 272, 272),
                                                         (1027, 48, 1024)])
@pytest.mark.parametrize("numa_nodes", [0, 2])
def test_integer_tiles_give_the_vnni_bits(runtimes, weight_format, hidden, intermediate, group, numa_nodes):
    # Depths with partial groups, groups of several integer spans (1040 = 4 spans of 256 +
    # 16), one group a panel deep (272), and an INT8 panel ending in half a quad (1027).
    experts = len(ROW_COUNTS)
    w13, w2 = random_experts(experts, hidden, intermediate, torch.float32, seed=hidden)
    ids, weights = routing_with_row_counts(ROW_COUNTS)
    x = torch.randn(ids.shape[0], hidden, generator=torch.Generator().manual_seed(group))
    outputs = {}
    for isa in ("AVX512_VNNI", "AMX"):
        engine = MoEEngine(w13, w2, weight_format=weight_format, group_size=group,
                           runtime=runtimes(isa=isa, numa_nodes=numa_nodes))
        outputs[isa] = engine.forward(x, ids, weights)
    assert torch.equal(outputs["AMX"], outputs["AVX512_VNNI"])


@pytest.mark.parametrize("hidden, intermediate", [(79, 53), (300, 200), (2048, 96)])
@pytest.mark.parametrize("numa_nodes", [0, 2])
@pytest.mark.parametrize("on_bf16_grid", [False, True])
@pytest.mark.parametrize("isa", FLOAT_UNITS)
def test_bf16_unit_against_float64(runtimes, hidden, intermediate, numa_nodes, on_bf16_grid, isa):
    # Odd depths (the last row pairs with padding), partial blocks of 128 inputs, and a
    # panel many blocks deep. Inputs that bf16 holds exactly (as a bf16 model's are) leave
    # gate and up a zero second plane, which is skipped; down's inputs, computed in fp32,
    # need both. (fp32 inputs keep the outputs fp32, free of a last rounding to bf16.)
    # Rounded to bf16 once, as vLLM's AMX MoE kernel rounds them, the activations would
    # miss this bound about 100-fold.
    experts = len(ROW_COUNTS)
    w13, w2 = random_experts(experts, hidden, intermediate, torch.bfloat16, seed=hidden)
    ids, weights = routing_with_row_counts(ROW_COUNTS)
    x = torch.randn(ids.shape[0], hidden, generator=torch.Generator().manual_seed(intermediate))
    if on_bf16_grid:
        x = x.bfloat16().float()
    engine = MoEEngine(w13, w2, runtime=runtimes(isa=isa, numa_nodes=numa_nodes))
    ref = reference_moe(w13, w2, x, ids, weights)
    out = engine.forward(x, ids, weights).double()
    assert ((out - ref).abs() <= TIGHT * ref.abs().max().item()).all()


@pytest.mark.parametrize("hidden, intermediate, group",
                         [(384, 256, 128), (300, 208, 64), (262, 90, 64), (2048, 96, 128)])
@pytest.mark.parametrize("numa_nodes", [0, 2])
@pytest.mark.parametrize("isa", FLOAT_UNITS)
def test_fp8_unit_against_float64(runtimes, hidden, intermediate, group, numa_nodes, isa):
    # FP8 checkpoints' 128-input blocks, smaller groups over a partial last one (262 and 90
    # inputs: an odd number of weight-tile rows, widened two at a time), and a deep panel;
    # random_fp8 puts subnormals and zero in every tensor.
    experts = len(ROW_COUNTS)
    w13, w13_ref = random_fp8(experts, 2 * intermediate, hidden, group, seed=hidden)
    w2, w2_ref = random_fp8(experts, hidden, intermediate, group, seed=intermediate)
    ids, weights = routing_with_row_counts(ROW_COUNTS)
    x = torch.randn(ids.shape[0], hidden, generator=torch.Generator().manual_seed(group))
    engine = MoEEngine(w13, w2, runtime=runtimes(isa=isa, numa_nodes=numa_nodes))
    assert engine.weight_format == "fp8_e4m3"
    ref = reference_moe(w13_ref, w2_ref, x, ids, weights)
    out = engine.forward(x, ids, weights).double()
    assert ((out - ref).abs() <= TIGHT * ref.abs().max().item()).all()


def fp8_with_scales_of_group_1(rows, scale_of_group_1, seed):
    """random_fp8 weights of `rows` rows, four groups of 128 deep: groups 0, 2 and 3 with
    their scales times 2^20 (sums far from zero), group 1 with its own, but
    `scale_of_group_1` in row 0. Returns them and the dequantized tensor."""
    weights, _ = random_fp8(len(ROW_COUNTS), rows, 512, 128, seed=seed)
    scales = weights.scales.clone() * 2.0**20
    scales[:, :, 1] = weights.scales[:, :, 1]
    scales[:, 0, 1] = scale_of_group_1
    weights = QuantizedWeights(weights.values, scales, weights.group_size)
    return weights, quant.dequantize(weights)


# The AVX512_BF16 unit runs an FP8 panel's sums over its whole depth in units of each
# group's scales (csrc/lk/kernels/x86/unit_gemm.h, multiply_floats). A zero scale would
# divide by zero, and the smallest normal one, far more than 2^32 below the others, would
# overflow the sums: both fail without the check that sends such panels to the
# block-by-block walk. 2^-20 (about 2^29 below the others) stays within the range the sums
# run over, so it tests the chain of scale ratios itself; it fails if the ratio is left out.
@pytest.mark.parametrize("scale_of_group_1", [0.0, torch.finfo(torch.float32).tiny, 2.0**-20])
@pytest.mark.parametrize("isa", FLOAT_UNITS)
def test_fp8_unit_with_scales_far_apart(runtimes, scale_of_group_1, isa):
    w13, w13_ref = fp8_with_scales_of_group_1(2 * 512, scale_of_group_1, seed=1)
    w2, w2_ref = fp8_with_scales_of_group_1(512, scale_of_group_1, seed=2)
    ids, weights = routing_with_row_counts(ROW_COUNTS)
    x = torch.randn(ids.shape[0], 512, generator=torch.Generator().manual_seed(3))
    engine = MoEEngine(w13, w2, runtime=runtimes(isa=isa))
    ref = reference_moe(w13_ref, w2_ref, x, ids, weights)
    out = engine.forward(x, ids, weights).double()
    assert ((out - ref).abs() <= TIGHT * ref.abs().max().item()).all()


def two_experts_sharing_every_token():
    """Down accumulates every expert of a token into one output row: two experts of 40
    rows share every token, so each unit call adds to what the other wrote."""
    experts, hidden, intermediate = 2, 256, 128
    w13, w2 = random_experts(experts, hidden, intermediate, torch.float32, seed=3)
    tokens = 40
    ids = torch.tensor([[0, 1]] * tokens, dtype=torch.int32)
    weights = torch.rand(tokens, 2, generator=torch.Generator().manual_seed(4))
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(5))
    return w13, w2, x, ids, weights


@pytest.mark.parametrize("isa", FLOAT_UNITS)
def test_bf16_unit_accumulates_into_partial_outputs(runtimes, isa):
    w13, w2, x, ids, weights = two_experts_sharing_every_token()
    w13, w2 = w13.bfloat16(), w2.bfloat16()
    ref = reference_moe(w13, w2, x, ids, weights)
    out = MoEEngine(w13, w2, runtime=runtimes(isa=isa)).forward(x, ids, weights).double()
    assert ((out - ref).abs() <= TIGHT * ref.abs().max().item()).all()


@needs_amx
@pytest.mark.parametrize("weight_format", ["int8", "int4"])
def test_integer_tiles_accumulate_into_partial_outputs(runtimes, weight_format):
    w13, w2, x, ids, weights = two_experts_sharing_every_token()
    outputs = [MoEEngine(w13, w2, weight_format=weight_format, group_size=64, runtime=runtimes(isa=isa))
               .forward(x, ids, weights) for isa in ("AVX512_VNNI", "AMX")]
    assert torch.equal(outputs[0], outputs[1])
