"""What tests/lk's modules share: the ISA levels this CPU runs, the float64 reference of a
MoE layer, random experts, routing and quantized checkpoints, and the tolerances each format
is held to, with how they were derived.

lvllm's extension is imported here as the test modules import it (``from lvllm import _lk``),
so under the sanitizer run (``pytest -p lk_asan_loader``, Makefile ``test-asan``) these
helpers, like the tests, use the sanitizer build the plugin registered first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lvllm import _lk
from lvllm.lk import QuantizedWeights, quant
from lvllm.lk.layout import PackedLayout

# --------------------------------------------------------------------------------------
# float experts: the reference every format is checked against
# --------------------------------------------------------------------------------------

ISA_ORDER = _lk.isa_names()
SUPPORTED_ISAS = ISA_ORDER[: ISA_ORDER.index(_lk.best_isa()) + 1]

# Relative to the largest reference value. fp32 weights and outputs carry fp32 rounding
# only; 16-bit outputs are rounded once more at the end.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def reference_moe(w13, w2, x, topk_ids, topk_weights, activation="silu", alpha=1.702, limit=7.0,
                  round_activations=None, exact13=None, exact2=None, w13_bias=None, w2_bias=None):
    """out[t] = sum_j w[t, j] * (down_e(act(gate_e x_t + b) * (up_e x_t + b)) + b2_e), in float64.

    For an engine that quantizes activations: round_activations(rows) -> (rows, doubt)
    rounds the inputs of gate/up and of down as it does, except that exact13 / exact2 (parts
    of w13 / w2, as w13 / w2 are) multiply the unrounded inputs. doubt is the step by which
    an engine computing in fp32 may round an input otherwise (0 where it cannot); the
    reference then returns (out, slack): how far out may move by such steps in down."""
    w13, w2, x = w13.double(), w2.double(), x.double()
    weights = topk_weights.double()
    intermediate = w2.shape[2]

    def project(rows, w, exact):
        if round_activations is None:
            return rows @ w.T, None
        rounded, doubt = round_activations(rows)
        rounding = w if exact is None else w - exact.double()
        out = rounded @ rounding.T + (0 if exact is None else rows @ exact.double().T)
        return out, doubt @ rounding.abs().T

    out = torch.zeros_like(x)
    slack = torch.zeros_like(x)
    for expert in range(w13.shape[0]):
        token_idx, slot_idx = (topk_ids.long() == expert).nonzero(as_tuple=True)
        if token_idx.numel() == 0:
            continue
        gate_up, _ = project(x[token_idx], w13[expert], None if exact13 is None else exact13[expert])
        if w13_bias is not None:
            gate_up = gate_up + w13_bias[expert].double()
        gate, up = gate_up[:, :intermediate], gate_up[:, intermediate:]
        if activation == "silu":
            hidden = F.silu(gate) * up
        elif activation == "gelu":
            hidden = F.gelu(gate) * up
        elif activation == "gelu_tanh":
            hidden = F.gelu(gate, approximate="tanh") * up
        else:
            gate = gate.clamp(max=limit)
            up = up.clamp(-limit, limit)
            hidden = gate * torch.sigmoid(alpha * gate) * (up + 1)
        down, down_slack = project(hidden, w2[expert], None if exact2 is None else exact2[expert])
        if w2_bias is not None:
            down = down + w2_bias[expert].double()
        routing = weights[token_idx, slot_idx, None]
        out.index_add_(0, token_idx, down * routing)
        if down_slack is not None:
            slack.index_add_(0, token_idx, down_slack * routing.abs())
    return out if round_activations is None else (out, slack)


def random_experts(experts, hidden, intermediate, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    w13 = torch.randn(experts, 2 * intermediate, hidden, generator=generator) / hidden**0.5
    w2 = torch.randn(experts, hidden, intermediate, generator=generator) / intermediate**0.5
    return w13.to(dtype), w2.to(dtype)


def random_routing(tokens, experts, k, seed, id_dtype=torch.int32):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts, generator=generator)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=generator)
    return ids.to(id_dtype), weights


def assert_close(out, ref, dtype):
    assert not torch.isnan(out).any(), "engine produced NaN"
    scale = ref.abs().max().item()
    error = (out.double() - ref).abs().max().item()
    assert error <= TOLERANCE[dtype] * max(scale, 1e-30), f"max error {error:.3g} vs scale {scale:.3g}"


# --------------------------------------------------------------------------------------
# quantized formats (INT8, INT4, FP8): their references and tolerances
# --------------------------------------------------------------------------------------

# Engine output vs the float64 reference from its own dequantized weights, relative to the
# largest output. FP8 unpacks to fp32 and multiplies in fp32: fp32 rounding only.
TIGHT = 2e-5
# INT8 and INT4 kernels multiply the weights in integers with the activations rounded to
# int16 per weight group (once per forward): each activation moves by at most 2^-16 of its
# group's largest magnitude, finer than the bf16 rounding of any activation within 1/128 of
# that magnitude. Worst seen over test_formats.py: 9e-5 (both formats); the bound leaves
# about 2x. It is 40x below what INT8 weights themselves cost (LOOSE).
TIGHT_INTEGER = 2e-4
# INT4 rounds activations to 8 bits per group (kernels.h, activation_max) and multiplies
# each weight's offset from its group's midpoint (q - 8 steps) by them, the midpoint by the
# group's exact fp32 sum. Against a float64 reference that does the same, what is left is
# fp32 arithmetic, as for the float formats (worst seen over test_formats.py: 6e-7), plus the
# hidden activations that the engine's fp32 may round one step from where float64 does:
# those within DOUBT_STEPS of a tie, each allowed its step (without it, seen: 5e-3). INT4
# inputs are drawn on the 8-bit grid, so their rounding is never in doubt.
TIGHT_INT4 = TIGHT
DOUBT_STEPS = 1e-3
# Output error caused by quantizing all three matrices (||out - original|| / ||original||),
# worst seen with random Gaussian weights of test_formats.py's shapes over groups 32-128:
# INT8 0.02, INT4 0.20 (gate, up and down errors compound). Bounds leave about 2x margin.
LOOSE = {"int8": 0.04, "int4": 0.35}


def reference_int8(w: torch.Tensor, group: int) -> torch.Tensor:
    return quant.dequantize(quant.quantize(w, "int8", group))


def reference_int4(w: torch.Tensor, group: int) -> QuantizedWeights:
    return quant.quantize(w, "int4", group)


def activations_as_rounded(group: int, steps: int = 127):
    """The engine's 8-bit activation rounding: per row, groups of `group` inputs scaled so
    the largest magnitude is `steps` steps, rounded half to even. -> (rounded, doubt)."""

    def rounded(rows: torch.Tensor):
        length = rows.shape[-1]
        padded = F.pad(rows, (0, (-length) % group)).unflatten(-1, (-1, group))
        step = padded.abs().amax(-1, keepdim=True) / steps
        scaled = padded / torch.where(step > 0, step, 1)
        tie = ((scaled - scaled.floor()) - 0.5).abs() < DOUBT_STEPS
        doubt = torch.where(tie, step, 0)
        return (torch.round(scaled) * step).flatten(-2)[..., :length], doubt.flatten(-2)[..., :length]

    return rounded


def group_midpoints(weights: QuantizedWeights) -> torch.Tensor:
    """Per weight, the value of q = 8 in its group: the part the engine multiplies by the
    activations' exact sums."""
    cols = weights.values.shape[2]
    mid = 8 * weights.scales.double()
    if weights.offsets is not None:
        mid = mid + weights.offsets.double()
    return mid.repeat_interleave(weights.group_size, -1)[..., :cols]


def random_int4(experts, rows, cols, group, seed):
    """A checkpoint-style INT4 tensor: values 0..15, per-group scales and offsets."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 16, (experts, rows, cols), generator=generator, dtype=torch.uint8)
    groups = -(-cols // group)
    scales = (torch.rand(experts, rows, groups, generator=generator) + 0.5) / (8 * cols**0.5)
    weights = QuantizedWeights(values, scales, group, -8 * scales)
    return weights, quant.dequantize(weights)


def random_fp8(experts, rows, cols, group, seed):
    """FP8 e4m3 values with per-group scales (block-quantized checkpoints expand to this)."""
    generator = torch.Generator().manual_seed(seed)
    # Saturated to the format's range as quantizers do (torch < 2.13 turns overflow into NaN).
    values = (torch.randn(experts, rows, cols, generator=generator) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    values.view(torch.uint8)[0, 0, :8] = torch.arange(8, dtype=torch.uint8)  # subnormals and zero
    groups = -(-cols // group)
    scales = (torch.rand(experts, rows, groups, generator=generator) + 0.5) / (100 * cols**0.5)
    weights = QuantizedWeights(values, scales, group)
    return weights, quant.dequantize(weights)


def assert_tight(engine, out, w13_ref, w2_ref, x, ids, weights):
    """out against the float64 reference from the engine's own weights: dequantized
    tensors, or INT4's QuantizedWeights, whose activation rounding it then follows."""
    if isinstance(w13_ref, QuantizedWeights):
        assert engine.weight_format == "int4"
        ref, slack = reference_moe(quant.dequantize(w13_ref), quant.dequantize(w2_ref), x, ids, weights,
                                   engine.activation,
                                   round_activations=activations_as_rounded(engine.group_size),
                                   exact13=group_midpoints(w13_ref), exact2=group_midpoints(w2_ref))
        bound = TIGHT_INT4 * ref.abs().max().item() + slack
    else:
        ref = reference_moe(w13_ref, w2_ref, x, ids, weights, engine.activation)
        bound = (TIGHT_INTEGER if engine.weight_format == "int8" else TIGHT) * ref.abs().max().item()
    assert ((out.double() - ref).abs() <= bound).all()


def random_inputs(engine, tokens):
    """Random inputs; on INT4's 8-bit grid for INT4 engines (see TIGHT_INT4)."""
    x = torch.randn(tokens, engine.hidden_size)
    return activations_as_rounded(engine.group_size)(x)[0].float().contiguous() if engine.weight_format == "int4" else x


def run_and_compare(engine, w13_ref, w2_ref, tokens, seed, originals=None, loose=None):
    x = random_inputs(engine, tokens)
    ids, weights = random_routing(tokens, engine.num_experts, min(4, engine.num_experts), seed=seed)
    out = engine.forward(x, ids, weights).double()
    assert not torch.isnan(out).any()
    assert_tight(engine, out, w13_ref, w2_ref, x, ids, weights)
    if originals is not None:
        original = reference_moe(*originals, x, ids, weights)
        assert (out - original).norm().item() <= loose * original.norm().item()


# --------------------------------------------------------------------------------------
# packed memory (lvllm.lk.layout)
# --------------------------------------------------------------------------------------


def assert_unpacks_to(engine, expected13, expected2):
    """The engine's packed memory, unpacked in fp32 and in bf16, is exactly these weights, the
    whole layer (the GPU prefill ring) and each expert alone (a hot expert's swap)."""
    for dtype in (torch.float32, torch.bfloat16):
        layout, views = PackedLayout.of(engine, dtype)
        assert layout.nbytes == engine.nbytes
        got13 = torch.full(expected13.shape, float("nan"), dtype=dtype)
        got2 = torch.full(expected2.shape, float("nan"), dtype=dtype)
        layout.unpack(torch.cat(views), got13, got2)
        assert torch.equal(got13, expected13.to(dtype)), engine.weight_format
        assert torch.equal(got2, expected2.to(dtype)), engine.weight_format
        for expert in range(expected13.shape[0]):
            one13 = torch.full((1, *expected13.shape[1:]), float("nan"), dtype=dtype)
            one2 = torch.full((1, *expected2.shape[1:]), float("nan"), dtype=dtype)
            layout.unpack_expert(views, expert, one13, one2)
            assert torch.equal(one13[0], expected13[expert].to(dtype)), (engine.weight_format, expert)
            assert torch.equal(one2[0], expected2[expert].to(dtype)), (engine.weight_format, expert)


def assert_converted_as_torch_does(engine, runtime, w13, w2, x, ids, weights):
    """An engine that converted quantized checkpoint experts at load (LVLLM_MOE_USE_WEIGHT=
    TO_DTYPE / INT8 / INT4) computes the weights torch's conversion gives (lvllm.lk.quant,
    LVLLM_MOE_QUANT_ON_GPU): float formats against float64 of those, INT8 / INT4 against their
    float64 quantization and bit for bit against an engine given torch's quantized weights."""
    from lvllm.lk import MoEEngine

    weight_format, group = engine.weight_format, engine.group_size
    w13_float, w2_float = quant.dequantize(w13), quant.dequantize(w2)
    out = engine.forward(x, ids, weights)
    if weight_format in ("bfloat16", "float32"):
        dtype = getattr(torch, weight_format)
        assert_close(out, reference_moe(w13_float.to(dtype), w2_float.to(dtype), x, ids, weights), dtype)
        return
    quantize = reference_int8 if weight_format == "int8" else reference_int4
    if weight_format == "int8":
        ref = reference_moe(quantize(w13_float, group), quantize(w2_float, group), x, ids, weights)
        assert (out.double() - ref).abs().max().item() <= 2e-4 * ref.abs().max().item()
    prequantized = MoEEngine(quant.quantize(w13, weight_format, group), quant.quantize(w2, weight_format, group),
                             runtime=runtime)
    assert torch.equal(prequantized.forward(x, ids, weights), out)
