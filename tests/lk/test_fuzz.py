"""Fuzzing the engine's public entry (lvllm.lk.MoEEngine) for a fixed time budget.

Each case draws, from a seed: a shape within limits, a weight source (float of each dtype,
FP8 with group scales, an INT4 checkpoint) and a stored format (float, INT8 or INT4 at
several group sizes), an activation, a runtime (1-3 threads, lk's own pool or the caller's
OpenMP team, 0-4 virtual NUMA nodes), then several forwards: token counts from 0 to about
a pass of prefill, x of each float dtype, ids of either integer type with -1 and repeats,
tensors that start off their allocation's alignment. Valid forwards are checked against the
float64 reference; invalid ones (ids out of range, non-contiguous or mis-shaped tensors,
wrong dtypes) must raise a Python exception. Under `make test` this also runs against the
AddressSanitizer + UBSan build, so a memory error is a failure too.

`--fuzz-seconds` sets the budget (CI: 20 s per run); a failure prints the seed that
reproduces it (`--fuzz-seed`), which then becomes a regression case in REGRESSIONS.
"""

from __future__ import annotations

import itertools
import random
import time

import pytest
import torch

from lvllm.lk import MoEEngine, QuantizedWeights, quant

from .helpers import TOLERANCE, assert_close, assert_tight, random_fp8, random_inputs, random_int4, reference_moe

ACTIVATIONS = ("silu", "gelu", "swigluoai")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Stored float formats (their tolerance); the others (FP8, INT8, INT4) are held tightly.
STORED_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Seeds that once failed, run first every time (none has found an engine fault so far).
REGRESSIONS: tuple[int, ...] = ()


class Case:
    """One drawn engine and the references its outputs are held to."""

    def __init__(self, seed: int, runtimes):
        rng = self.rng = random.Random(seed)
        self.seed = seed
        self.experts = rng.randint(1, 12)
        self.hidden = rng.choice((16, 32, 48, 64, 96, 128, 160, 256)) + rng.choice((0, 0, 5, 13))
        self.intermediate = rng.choice((16, 32, 48, 64, 128, 192)) + rng.choice((0, 0, 3, 16))
        self.activation = rng.choice(ACTIVATIONS)
        runtime = runtimes(threads=rng.randint(1, 3), numa_nodes=rng.choice((0, 0, 2, 3, 4)),
                           workers=rng.choice(("OWN", "OPENMP")))
        source = rng.choice(("float", "float", "fp8", "int4"))
        groups = [g for g in (16, 32, 64, 128) if g <= max(self.hidden, self.intermediate)]
        shapes = ((2 * self.intermediate, self.hidden), (self.hidden, self.intermediate))
        torch.manual_seed(seed)
        if source in ("fp8", "int4"):
            make = random_fp8 if source == "fp8" else random_int4
            group = rng.choice(groups)
            w13, w2 = (make(self.experts, r, c, group, seed + index)[0] for index, (r, c) in enumerate(shapes))
            self.w13_ref, self.w2_ref = w13, w2
            self.weight_format = rng.choice((source if source == "int4" else "fp8_e4m3", "bfloat16", "int8", "int4"))
        else:
            dtype = rng.choice(FLOAT_DTYPES)
            w13, w2 = (torch.randn(self.experts, r, c) / c**0.5 for r, c in shapes)
            w13, w2 = w13.to(dtype), w2.to(dtype)
            self.w13_ref, self.w2_ref = w13.float(), w2.float()
            self.weight_format = rng.choice((None, None, "int8", "int4"))
        self.group = rng.choice(groups)
        self.engine = MoEEngine(w13, w2, self.activation, weight_format=self.weight_format,
                                group_size=self.group, runtime=runtime)
        self._held_references()

    def _held_references(self):
        """The engine's own weights where it quantized or converted: what its arithmetic
        must match tightly."""
        stored = self.engine.weight_format
        if stored in ("int8", "int4"):
            if isinstance(self.w13_ref, QuantizedWeights) and self.w13_ref.format == stored == "int4":
                return   # the checkpoint's INT4 kept as it is
            w13, w2 = (quant.dequantize(w) if isinstance(w, QuantizedWeights) else w
                       for w in (self.w13_ref, self.w2_ref))
            held = [quant.quantize(w.float(), stored, self.engine.group_size) for w in (w13, w2)]
            self.w13_ref, self.w2_ref = held if stored == "int4" else [quant.dequantize(h) for h in held]
        elif isinstance(self.w13_ref, QuantizedWeights):
            self.w13_ref, self.w2_ref = quant.dequantize(self.w13_ref), quant.dequantize(self.w2_ref)
        if stored in ("bfloat16", "float16"):
            dtype = torch.bfloat16 if stored == "bfloat16" else torch.float16
            self.w13_ref, self.w2_ref = self.w13_ref.to(dtype).float(), self.w2_ref.to(dtype).float()

    def routing(self, tokens: int):
        rng, experts = self.rng, self.experts
        k = rng.randint(1, min(4, experts) + 1)
        ids = torch.tensor([[rng.randrange(-1, experts) for _ in range(k)] for _ in range(tokens)],
                           dtype=rng.choice((torch.int32, torch.int64))).view(tokens, k)
        weights = torch.rand(tokens, k)
        return ids, weights.to(rng.choice((torch.float32, torch.bfloat16)))

    def valid_forward(self):
        rng = self.rng
        tokens = rng.choice((0, 1, 1, 2, 3, 5, 8, 17, 40, 70))
        ids, weights = self.routing(tokens)
        stored = STORED_DTYPES.get(self.engine.weight_format)
        # Held to the tight bounds (helpers.assert_tight): float32 x (INT4's on its 8-bit grid).
        x = random_inputs(self.engine, tokens) if stored is None else torch.randn(tokens, self.hidden)
        if stored is not None:
            x = x.to(rng.choice(FLOAT_DTYPES))
        if rng.random() < 0.3:   # off the allocator's alignment by one element
            shifted = torch.empty(x.numel() + 1, dtype=x.dtype)[1:].view(x.shape)
            shifted.copy_(x)
            x = shifted
        out = self.engine.forward(x, ids, weights)
        assert out.shape == x.shape and out.dtype == x.dtype
        if tokens == 0:
            return
        if stored is None:
            assert_tight(self.engine, out.double(), self.w13_ref, self.w2_ref, x, ids, weights.float())
        else:
            ref = reference_moe(self.w13_ref, self.w2_ref, x.float(), ids, weights.float(), self.activation)
            assert_close(out, ref, max((x.dtype, stored), key=TOLERANCE.__getitem__))

    def invalid_forward(self):
        rng, tokens = self.rng, self.rng.randint(2, 9)   # 2+: a strided [1, k] tensor is contiguous
        ids, weights = self.routing(tokens)
        x = torch.randn(tokens, self.hidden)
        kind = rng.choice(("id too large", "id below -1", "strided x", "strided ids", "wrong width",
                           "wrong ids shape", "integer x", "float ids"))
        if kind == "id too large":
            ids[rng.randrange(tokens), 0] = self.experts + rng.randint(0, 1000)
        elif kind == "id below -1":
            ids[rng.randrange(tokens), 0] = -rng.randint(2, 1000)
        elif kind == "strided x":
            x = torch.randn(tokens, 2 * self.hidden)[:, ::2]
        elif kind == "strided ids":
            ids = torch.cat([ids, ids], dim=1)[:, ::2]
        elif kind == "wrong width":
            x = torch.randn(tokens, self.hidden + rng.randint(1, 8))
        elif kind == "wrong ids shape":
            ids = ids[:-1] if tokens > 1 else ids.view(-1)
        elif kind == "integer x":
            x = torch.ones(tokens, self.hidden, dtype=torch.int32)
        else:
            ids = ids.float()
        with pytest.raises((ValueError, IndexError, TypeError)):
            self.engine.forward(x, ids, weights)
            pytest.fail(f"{kind}: accepted (x {tuple(x.shape)} {x.dtype}, ids {tuple(ids.shape)} {ids.dtype})")


def run_case(seed: int, runtimes) -> None:
    case = Case(seed, runtimes)
    for _ in range(case.rng.randint(2, 5)):
        if case.rng.random() < 0.7:
            case.valid_forward()
        else:
            case.invalid_forward()


def test_fuzz_for_the_budget(runtimes, request):
    """The seeds that once failed, then fresh ones until the budget is spent."""
    budget = request.config.getoption("--fuzz-seconds")
    first = request.config.getoption("--fuzz-seed")
    start = time.monotonic()
    fresh = itertools.takewhile(lambda seed: seed == first or time.monotonic() - start < budget, itertools.count(first))
    cases = 0
    for seed in itertools.chain(REGRESSIONS, fresh):
        try:
            run_case(seed, runtimes)
        except BaseException as error:
            raise AssertionError(f"fuzz case failed: reproduce with --fuzz-seed {seed} --fuzz-seconds 0") from error
        cases += 1
    print(f"fuzz: {cases} cases ({len(REGRESSIONS)} regressions) in {time.monotonic() - start:.1f} s")
