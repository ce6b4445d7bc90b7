"""lk's torch ops through their C++ kernels (lvllm.lk.native_ops): the same outputs as the
float64 reference and as the Python kernels, the same errors for bad arguments, engines found
by id as they come and go, the Python kernels back after uninstall."""

from __future__ import annotations

import gc

import pytest
import torch

from lvllm.lk import MoEEngine, native_ops
from lvllm.lk.linear import LinearEngine

from .helpers import assert_close, random_experts, random_routing, reference_moe


@pytest.fixture
def installed():
    assert native_ops.install() is None  # built by `make build`: its absence is a failure here
    yield
    native_ops.uninstall()


def moe_op(engine, x, ids, weights):
    return torch.ops.lvllm.lk_moe_forward(x, ids, weights, engine.engine_id)


def linear_op(engine, x, bias):
    return torch.ops.lvllm.lk_linear(x, bias, engine.engine_id, engine.outputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_moe_forward_matches_reference_and_python_kernel(runtimes, installed, dtype, ids_dtype):
    experts, hidden, intermediate, tokens, k = 9, 79, 53, 7, 3
    w13, w2 = random_experts(experts, hidden, intermediate, dtype, seed=31)
    engine = MoEEngine(w13, w2, runtime=runtimes())  # created after install: mirrored as it comes
    x = torch.randn(tokens, hidden).to(dtype)
    ids, weights = random_routing(tokens, experts, k, seed=32)
    ids = ids.to(ids_dtype)
    ids[2, 1] = -1  # a skipped slot
    calls = native_ops.calls()
    out = moe_op(engine, x, ids, weights)
    assert native_ops.calls() == calls + 1 and engine.forward_calls == 1
    assert out.dtype == dtype and out.shape == x.shape
    kept = ids.clamp(min=0)
    assert_close(out, reference_moe(w13, w2, x, kept, weights * (ids >= 0)), dtype)
    assert torch.equal(out, engine.forward(x, ids, weights))  # the Python path's bits
    # Non-contiguous arguments are made contiguous, as the Python kernel does.
    wide = torch.cat([x, x], dim=1)[:, :hidden]
    assert torch.equal(moe_op(engine, wide, ids.T.contiguous().T, weights), out)


def test_linear_matches_reference_and_python_kernel(runtimes, installed):
    weight = torch.randn(40, 48, dtype=torch.bfloat16)
    bias = torch.randn(40, dtype=torch.bfloat16)
    engine = LinearEngine(weight, runtime=runtimes())
    x = torch.randn(2, 3, 48, dtype=torch.bfloat16)
    out = linear_op(engine, x, bias)
    assert out.shape == (2, 3, 40) and out.dtype == torch.bfloat16
    assert_close(out, (x.double() @ weight.double().T + bias.double()), torch.bfloat16)
    assert torch.equal(out, engine.forward(x, bias))
    assert torch.equal(linear_op(engine, x[0], None), engine.forward(x[0]))
    assert engine.forward_calls == 4 and native_ops.calls() == 2


def test_engines_made_before_install_are_found(runtimes):
    w13, w2 = random_experts(4, 32, 16, torch.float32, seed=33)
    engine = MoEEngine(w13, w2, runtime=runtimes())
    x = torch.randn(3, 32)
    ids, weights = random_routing(3, 4, 2, seed=34)
    expected = engine.forward(x, ids, weights)
    assert native_ops.install() is None
    try:
        assert torch.equal(moe_op(engine, x, ids, weights), expected)
        assert native_ops.calls() == 1
    finally:
        native_ops.uninstall()
    assert native_ops.calls() is None
    assert torch.equal(moe_op(engine, x, ids, weights), expected)  # the Python kernel again
    assert engine.forward_calls == 3


def test_bad_arguments_named_as_the_python_kernels_name_them(runtimes, installed):
    w13, w2 = random_experts(4, 32, 16, torch.float32, seed=35)
    engine = MoEEngine(w13, w2, runtime=runtimes())
    linear = LinearEngine(torch.randn(8, 32), runtime=runtimes())
    x = torch.randn(3, 32)
    ids, weights = random_routing(3, 4, 2, seed=36)
    cases = [
        (lambda: moe_op(engine, x[:, :16], ids, weights), ValueError, r"x must be \[tokens, 32\]"),
        (lambda: moe_op(engine, x, ids[:2], weights), ValueError, r"topk_ids must be \[3, k\]"),
        (lambda: moe_op(engine, x, ids.float(), weights), ValueError, "supported: int32, int64"),
        (lambda: moe_op(engine, x, ids, weights[:, :1]), ValueError, "topk_weights must have topk_ids' shape"),
        (lambda: moe_op(engine, x.double(), ids, weights), ValueError, "supported: float32, float16, bfloat16"),
        (lambda: moe_op(engine, x, ids + 4, weights), IndexError, "valid ids are -1"),
        (lambda: torch.ops.lvllm.lk_moe_forward(x, ids, weights, 10**6), ValueError, "no live lk engine"),
        (lambda: linear_op(linear, torch.randn(3, 16), None), ValueError, r"x must be \[\.\.\., 32\]"),
        (lambda: linear_op(linear, x, torch.randn(5)), ValueError, r"bias must be \[8\]"),
        (lambda: torch.ops.lvllm.lk_linear(x, None, linear.engine_id, 9), ValueError, "has 8 outputs"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    assert native_ops.calls() == 0


def test_a_collected_engine_leaves_the_table(runtimes, installed):
    w13, w2 = random_experts(4, 32, 16, torch.float32, seed=37)
    engine = MoEEngine(w13, w2, runtime=runtimes())
    engine_id = engine.engine_id
    del engine
    gc.collect()
    x = torch.randn(3, 32)
    ids, weights = random_routing(3, 4, 2, seed=38)
    with pytest.raises(ValueError, match=f"no live lk engine with id {engine_id}"):
        torch.ops.lvllm.lk_moe_forward(x, ids, weights, engine_id)


def test_compiled_graph_calls_the_cpp_kernels(runtimes, installed):
    w13, w2 = random_experts(8, 64, 40, torch.float32, seed=39)
    engine = MoEEngine(w13, w2, runtime=runtimes())
    linear = LinearEngine(torch.randn(64, 64), runtime=runtimes())

    def layer(x, router_logits):
        weights, ids = torch.topk(torch.softmax(router_logits, dim=-1), 2)
        return moe_op(engine, linear_op(linear, x, None), ids.to(torch.int32), weights) + x

    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    x, logits = torch.randn(6, 64), torch.randn(6, 8)
    assert torch.equal(compiled(x, logits), layer(x, logits))
    moe_calls, moe_ns, dense_calls, dense_ns = native_ops.totals().tolist()
    assert moe_calls == dense_calls == 2 and moe_ns > 0 and dense_ns > 0
    weights, ids = torch.topk(torch.softmax(logits, dim=-1), 2)
    torch.library.opcheck(torch.ops.lvllm.lk_moe_forward, (x, ids.to(torch.int32), weights, engine.engine_id))
    torch.library.opcheck(torch.ops.lvllm.lk_linear, (x, None, linear.engine_id, linear.outputs))
