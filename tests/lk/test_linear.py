"""lk's dense linear engine against float64 math: every ISA level this CPU runs, weight and
activation dtypes, INT8 and INT4 weights quantized at load, shapes that leave partial
panels, bias, both kinds of workers, NUMA splits, and the custom op inside a compiled graph."""

from __future__ import annotations

import pytest
import torch

from lvllm.lk import quant
from lvllm.lk.linear import LinearEngine, planned_linear_bytes

from .helpers import LOOSE, SUPPORTED_ISAS, TIGHT, TIGHT_INTEGER, activations_as_rounded

# Relative to the output's largest magnitude: fp32 sums over up to 2048 inputs, then the
# output rounded to its dtype.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = x.double() @ weight.double().T
    return out + bias.double() if bias is not None else out


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    error = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    assert error <= TOLERANCE[dtype], f"relative error {error:.2e} above {TOLERANCE[dtype]:.0e}"


def random_layer(outputs: int, inputs: int, dtype: torch.dtype, seed: int):
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(outputs, inputs, generator=generator) / inputs ** 0.5).to(dtype)
    bias = torch.randn(outputs, generator=generator).to(dtype)
    return weight, bias


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 17, 64, 65, 200])
def test_matches_reference_per_isa_and_dtype(runtimes, isa, dtype, rows):
    weight, bias = random_layer(1000, 100, dtype, seed=rows)
    engine = LinearEngine(weight, runtime=runtimes(isa=isa))
    x = torch.randn(rows, 100).to(dtype)
    out = engine.forward(x, bias)
    assert out.dtype == dtype and out.shape == (rows, 1000)
    assert_close(out, reference(x, weight, bias), dtype)


@pytest.mark.parametrize("workers", ["OWN", "OPENMP"])
@pytest.mark.parametrize("shape", [(40, 37), (17, 2048), (5120, 256), (1, 16)])
@pytest.mark.parametrize("rows", [1, 9, 130])
def test_shapes_and_workers(runtimes, workers, shape, rows):
    weight, _ = random_layer(*shape, torch.bfloat16, seed=sum(shape))
    engine = LinearEngine(weight, runtime=runtimes(workers=workers))
    x = torch.randn(rows, shape[1], dtype=torch.bfloat16)
    assert_close(engine.forward(x), reference(x, weight, None), torch.bfloat16)


@pytest.mark.parametrize("numa_nodes", [2, 3])
def test_virtual_numa_nodes_split_the_outputs(runtimes, numa_nodes):
    weight, bias = random_layer(300, 64, torch.float32, seed=numa_nodes)
    engine = LinearEngine(weight, runtime=runtimes(numa_nodes=numa_nodes))
    x = torch.randn(5, 64)
    assert_close(engine.forward(x, bias), reference(x, weight, bias), torch.float32)


def test_mixed_dtypes_and_leading_dimensions(runtimes):
    weight, bias = random_layer(48, 32, torch.bfloat16, seed=3)
    engine = LinearEngine(weight, runtime=runtimes())
    x = torch.randn(2, 3, 32)  # float32 activations, bf16 weights and bias
    out = engine.forward(x, bias.float())
    assert out.shape == (2, 3, 48) and out.dtype == torch.float32
    assert_close(out, reference(x.reshape(6, 32), weight, bias).reshape(2, 3, 48), torch.float32)


def test_weight_is_copied(runtimes):
    weight, _ = random_layer(64, 32, torch.float32, seed=4)
    kept = weight.clone()
    engine = LinearEngine(weight, runtime=runtimes())
    weight.zero_()
    del weight
    x = torch.randn(4, 32)
    assert_close(engine.forward(x), reference(x, kept, None), torch.float32)
    assert engine.nbytes >= 64 * 32 * 4


def test_zero_rows(runtimes):
    engine = LinearEngine(torch.randn(8, 16), runtime=runtimes())
    assert engine.forward(torch.empty(0, 16)).shape == (0, 8)


def test_custom_op_compiles_without_graph_breaks(runtimes):
    weight, bias = random_layer(72, 48, torch.float32, seed=5)
    engine = LinearEngine(weight, runtime=runtimes())

    def layer(x, b):
        return torch.relu(torch.ops.lvllm.lk_linear(x, b, engine.engine_id, engine.outputs)) + 1

    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    x = torch.randn(7, 48)
    ref = torch.relu(reference(x, weight, bias)) + 1
    assert_close(compiled(x, bias), ref, torch.float32)
    assert_close(compiled(x, None), torch.relu(reference(x, weight, None)) + 1, torch.float32)
    torch.library.opcheck(torch.ops.lvllm.lk_linear, (x, bias, engine.engine_id, engine.outputs))


def quantized_reference(weight: torch.Tensor, weight_format: str, group: int) -> torch.Tensor:
    """The weight as the engine holds it, quantized and dequantized by lvllm.lk.quant (torch,
    independent of the C++ packer)."""
    return quant.dequantize(quant.quantize(weight[None].float(), weight_format, group))[0]


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
@pytest.mark.parametrize("weight_format", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 5, 70])
def test_quantized_weights_per_isa(runtimes, isa, weight_format, rows):
    """Tight against float64 of the weights the engine holds; INT4's activations drawn on its
    8-bit grid so the kernels' activation rounding is exact (helpers.TIGHT_INT4)."""
    group = 64
    weight, bias = random_layer(200, 320, torch.bfloat16, seed=rows)
    engine = LinearEngine(weight, weight_format, group, runtime=runtimes(isa=isa))
    assert (engine.weight_format, engine.group_size, engine.describe()) == (weight_format, group, f"{weight_format} g64")
    x = torch.randn(rows, 320)
    if weight_format == "int4":
        x = activations_as_rounded(group)(x)[0].float().contiguous()
    out = engine.forward(x, bias.float())
    ref = reference(x, quantized_reference(weight, weight_format, group), bias)
    bound = TIGHT_INTEGER if weight_format == "int8" else TIGHT
    assert ((out.double() - ref).abs() <= bound * ref.abs().max()).all()


@pytest.mark.parametrize("weight_format", ["int8", "int4"])
@pytest.mark.parametrize("shape, group", [((37, 100), 32), ((300, 2048), 128), ((64, 4096), 256)])
def test_quantized_error_against_the_float_weights(runtimes, weight_format, shape, group):
    """Partial panels and groups, real widths; the error against the original weights is the
    quantization's own (below what it costs a whole MoE layer: helpers.LOOSE)."""
    weight, bias = random_layer(*shape, torch.bfloat16, seed=shape[0])
    engine = LinearEngine(weight, weight_format, group, runtime=runtimes(numa_nodes=2))
    x = torch.randn(9, shape[1], dtype=torch.bfloat16)
    out = engine.forward(x, bias).double()
    ref = reference(x, weight, bias)
    assert (out - ref).norm() / ref.norm() < LOOSE[weight_format] / 2
    assert engine.nbytes == planned_linear_bytes(*shape, weight_format, group)


def test_default_groups_and_planned_bytes(runtimes):
    weight, _ = random_layer(64, 512, torch.bfloat16, seed=6)
    assert LinearEngine(weight, "int8", runtime=runtimes()).group_size == 256
    assert LinearEngine(weight, "int4", runtime=runtimes()).group_size == 128
    assert LinearEngine(weight, runtime=runtimes()).nbytes == planned_linear_bytes(64, 512, "bfloat16") == 64 * 512 * 2
    # INT4: half a byte per weight plus an fp32 scale and offset per 16 columns and group.
    assert planned_linear_bytes(64, 512, "int4", 128) == 4 * (512 * 8 + 4 * 2 * 64)


class TestBadInput:
    def test_formats_a_layer_cannot_be_kept_in(self, runtimes):
        weight = torch.zeros(8, 32)
        with pytest.raises(ValueError, match="'int8' or 'int4'"):
            LinearEngine(weight, "fp8_e4m3", runtime=runtimes())
        with pytest.raises(ValueError, match="multiple of 16"):
            LinearEngine(weight, "int8", 24, runtime=runtimes())

    def test_quantized_or_integer_weights_are_refused(self, runtimes):
        with pytest.raises(ValueError, match="float32, float16, bfloat16"):
            LinearEngine(torch.zeros(8, 16, dtype=torch.int8), runtime=runtimes())

    def test_weight_must_be_two_dimensional(self, runtimes):
        with pytest.raises(ValueError, match=r"\[outputs, inputs\]"):
            LinearEngine(torch.zeros(2, 8, 16), runtime=runtimes())

    def test_wrong_input_width_and_bias(self, runtimes):
        engine = LinearEngine(torch.zeros(8, 16), runtime=runtimes())
        with pytest.raises(ValueError, match=r"x must be \[\.\.\., 16\]"):
            engine.forward(torch.zeros(2, 15))
        with pytest.raises(ValueError, match=r"bias must be \[8\]"):
            engine.forward(torch.zeros(2, 16), torch.zeros(7))
