"""The hybrid layer on a CUDA device: lk queued on the stream, CUDA graphs, the prefetch ring,
mixed batches. torch alone; the reference is the same experts in float32 torch on the GPU."""

import pytest
import torch

from gpu_common import inputs, make_layer, torch_experts
from lvllm.gpu.plan import BatchPlan
from lvllm.gpu.ring import ExpertRing
from lvllm.gpu.stream import StreamQueue
from lvllm.hybrid import DeviceRoute

E, H, I, K = 8, 256, 128, 2
BF16_TOL = dict(rtol=2e-2, atol=2e-2)


@pytest.fixture(scope="module")
def queue():
    return StreamQueue(max_tokens=64)


def shared_expert(x):
    """A device-side stand-in for the shared experts, queued between submit and wait."""
    return torch.nn.functional.silu(x.float() @ torch.ones(H, H, device=x.device) / H).to(x.dtype)


def test_hybrid_layer_matches_the_reference_without_host_synchronization(queue):
    layer, w13, w2 = make_layer(seed=1, experts=E, hidden=H, inter=I)
    layer.attach_gpu(queue)
    x, ids, weights = inputs(16, H, E, K, seed=1)
    layer.forward(x, ids, weights, lambda: shared_expert(x))  # staging allocated here
    torch.cuda.synchronize()
    calls = layer.engine.forward_calls
    torch.cuda.set_sync_debug_mode("error")  # any host synchronization raises
    try:
        shared, routed = layer.forward(x, ids, weights, lambda: shared_expert(x))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = torch_experts(x, w13.cuda(), w2.cuda(), weights, ids)
    torch.testing.assert_close(routed, expected, **BF16_TOL)
    torch.testing.assert_close(shared, shared_expert(x))
    assert layer.engine.forward_calls == calls + 1
    assert queue.native.take_error() == ""


def test_cpu_work_overlaps_device_work_queued_between_submit_and_wait(queue):
    """The device runs the shared part while lk computes: a long device job queued in between
    does not add its time to lk's."""
    layer, _, _ = make_layer(seed=2, experts=E, hidden=2048, inter=1024)
    layer.attach_gpu(queue)
    x, ids, weights = inputs(32, 2048, E, K, seed=2)
    big = torch.randn(4096, 4096, device="cuda")

    def device_work(repeats):
        for _ in range(repeats):
            big.matmul(big)

    def timed(run):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    layer.forward(x, ids, weights, lambda: None)
    lk_alone = min(timed(lambda: layer.forward(x, ids, weights, lambda: None)) for _ in range(3))
    repeats = 1
    while timed(lambda: device_work(repeats)) < lk_alone and repeats < 4096:
        repeats *= 2
    device_alone = min(timed(lambda: device_work(repeats)) for _ in range(3))
    both = min(timed(lambda: layer.forward(x, ids, weights, lambda: device_work(repeats))) for _ in range(3))
    assert both < 0.8 * (lk_alone + device_alone), (lk_alone, device_alone, both)


def test_graph_capture_replays_new_inputs_with_fewer_real_tokens(queue):
    layer, w13, w2 = make_layer(seed=3, experts=E, hidden=H, inter=I)
    layer.attach_gpu(queue)
    captured = 8
    x = torch.zeros(captured, H, dtype=torch.bfloat16, device="cuda")
    ids = torch.zeros(captured, K, dtype=torch.int64, device="cuda")
    weights = torch.zeros(captured, K, device="cuda")
    padding = torch.zeros(captured, dtype=torch.bool, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up, as vLLM does before capturing
        layer.forward(x, ids, weights, lambda: shared_expert(x), padding=padding)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        shared_out, routed_out = layer.forward(x, ids, weights, lambda: shared_expert(x), padding=padding)
    records = queue.native.records
    for real, seed in ((8, 30), (3, 31), (1, 32), (5, 33)):
        new_x, new_ids, new_weights = inputs(real, H, E, K, seed)
        x.normal_()
        x[:real] = new_x
        ids.fill_(10_000)  # garbage in padding rows: lk must never route them
        ids[:real] = new_ids
        weights[:real] = new_weights
        padding.fill_(True)
        padding[:real] = False
        graph.replay()
        torch.cuda.synchronize()
        assert queue.native.take_error() == ""
        expected = torch_experts(new_x, w13.cuda(), w2.cuda(), new_weights, new_ids)
        torch.testing.assert_close(routed_out[:real], expected, **BF16_TOL)
        assert not routed_out[real:].any()
        torch.testing.assert_close(shared_out, shared_expert(x))
    assert queue.native.records == records  # replays reuse the captured records


@pytest.mark.parametrize("window", [1, 2])
def test_ring_streams_every_layer_with_its_own_weights(queue, window):
    """>= 8 layers with distinct weights through a ring of window + 1 slots; the unpacked
    buffer is poisoned after each layer, and heavy device work between layers lets the copy
    stream run as far ahead as the events allow: a slot overwritten too early, or a layer
    computed before its copy landed, gives the wrong layer's (or NaN) output."""
    layers = [make_layer(seed=10 + i, experts=E, hidden=H, inter=I) for i in range(9)]
    ring = ExpertRing(torch.device("cuda"), window)
    for layer, _, _ in layers:
        layer.attach_gpu(queue, ring, torch_experts)
    before = torch.cuda.memory_allocated()
    ring.allocate()
    # What the adapter reserves before vLLM sizes its KV cache is what the ring takes
    # (up to the allocator's 512-byte rounding of each of its window + 2 buffers).
    taken = torch.cuda.memory_allocated() - before
    assert 0 <= taken - ring.device_bytes() < 512 * (window + 2), (taken, ring.device_bytes())
    big = torch.randn(2048, 2048, device="cuda")
    x, ids, weights = inputs(64, H, E, K, seed=5)
    route = DeviceRoute.of(BatchPlan(gpu_prefill=True), 64, "cuda")
    for forward in range(2):
        ring.start()
        for index, (layer, w13, w2) in enumerate(layers):
            calls = layer.engine.forward_calls
            _, routed = layer.forward(x, ids, weights, lambda: None, route=route)
            expected = torch_experts(x, w13.cuda(), w2.cuda(), weights, ids)
            torch.testing.assert_close(routed, expected, **BF16_TOL, msg=f"forward {forward} layer {index}")
            assert layer.engine.forward_calls == calls  # no lk work for a fully streamed batch
            for unpacked in ring._unpacked.values():
                unpacked.fill_(float("nan"))
            for _ in range(1 + index % 3):
                big.matmul(big)
    ring.close()


def test_ring_streams_quantized_layers_dequantized_on_the_device(queue):
    """INT8, INT4 and FP8 layers stream their engine's own bytes and are dequantized into
    bf16 on the device, with no scratch beyond what the ring reports; the reference is lvllm.lk.quant's
    dequantized weights (the engine's own arithmetic) in float32 torch."""
    from lvllm.hybrid import HybridExperts
    from lvllm.lk import QuantizedWeights, quant

    generator = torch.Generator().manual_seed(50)
    ring = ExpertRing(torch.device("cuda"), 1)
    layers = []
    for index, weight_format in enumerate(["int8", "int4", "fp8_e4m3", "int4"]):
        w13 = torch.randn(E, 2 * I, H, generator=generator) / H**0.5
        w2 = torch.randn(E, H, I, generator=generator) / I**0.5
        if weight_format == "fp8_e4m3":
            def fp8(w, group=128):  # w13 and w2 share the engine's group size
                scales = w.unflatten(-1, (-1, group)).abs().amax(-1) / 448
                values = (w / scales.repeat_interleave(group, -1)).to(torch.float8_e4m3fn)
                return QuantizedWeights(values, scales.contiguous(), group)
            w13, w2 = fp8(w13), fp8(w2)
            ref13, ref2 = quant.dequantize(w13), quant.dequantize(w2)
            layer = HybridExperts(w13, w2, "silu", layer_name=f"fp8-{index}")
        else:
            ref13 = quant.dequantize(quant.quantize(w13, weight_format, 32))
            ref2 = quant.dequantize(quant.quantize(w2, weight_format, 32))
            layer = HybridExperts(w13, w2, "silu", layer_name=f"{weight_format}-{index}",
                                  weight_format=weight_format, group_size=32)
        layer.attach_gpu(queue, ring, torch_experts, torch.bfloat16)
        layers.append((layer, ref13.bfloat16().cuda(), ref2.bfloat16().cuda()))
    before = torch.cuda.memory_allocated()
    ring.allocate()
    taken = torch.cuda.memory_allocated() - before
    assert 0 <= taken - ring.device_bytes() < 512 * 3, (taken, ring.device_bytes())
    x, ids, weights = inputs(48, H, E, K, seed=50)
    route = DeviceRoute.of(BatchPlan(gpu_prefill=True), 48, "cuda")
    ring.start()
    for layer, ref13, ref2 in layers:
        _, routed = layer.forward(x, ids, weights, lambda: None, route=route)
        torch.testing.assert_close(routed, torch_experts(x, ref13, ref2, weights, ids), **BF16_TOL,
                                   msg=layer.layer_name)
    ring.close()


@pytest.mark.parametrize("weight_format", ["bfloat16", "float32", "int8", "int4", "fp8_e4m3"])
def test_compiled_unpack_writes_the_engine_arithmetic_bit_for_bit(weight_format):
    """The ring's unpack kernel compiled for the device against lvllm.lk.quant's dequantized
    weights (the engine's own arithmetic) and the float originals: equal bits in every dtype
    the GPU computes in, so the kernel neither fuses q * scale + offset into an FMA nor
    rounds differently from torch. Two NUMA node parts, a partial group and a half-empty
    INT4 block (hidden 40), more than one 128-input block per panel (inter 160)."""
    from lvllm.lk import MoEEngine, QuantizedWeights, make_runtime, quant
    from lvllm.lk.layout import PackedLayout

    experts, hidden, inter, group = 4, 40, 160, 32
    generator = torch.Generator().manual_seed(60)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=generator)
    w2 = torch.randn(experts, hidden, inter, generator=generator)
    runtime = make_runtime(threads=1, binding="CPU_CORE", power_saving=False, numa_nodes=2)
    if weight_format in ("bfloat16", "float32"):
        dtype = getattr(torch, weight_format)
        w13, w2 = w13.to(dtype), w2.to(dtype)
        expected13, expected2 = w13.float(), w2.float()
        engine = MoEEngine(w13, w2, "silu", runtime=runtime)
    elif weight_format == "fp8_e4m3":
        def fp8(w):
            scales = torch.rand(experts, w.shape[1], -(-w.shape[2] // group), generator=generator) + 0.5
            return QuantizedWeights((w * 50).clamp(-448, 448).to(torch.float8_e4m3fn), scales, group)
        w13, w2 = fp8(w13), fp8(w2)
        expected13, expected2 = quant.dequantize(w13), quant.dequantize(w2)
        engine = MoEEngine(w13, w2, "silu", runtime=runtime)
    else:
        expected13 = quant.dequantize(quant.quantize(w13, weight_format, group))
        expected2 = quant.dequantize(quant.quantize(w2, weight_format, group))
        engine = MoEEngine(w13, w2, "silu", weight_format=weight_format, group_size=group, runtime=runtime)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        layout, views = PackedLayout.of(engine, dtype)
        assert len(layout.parts) == 2
        got13 = torch.full((experts, 2 * inter, hidden), float("nan"), dtype=dtype, device="cuda")
        got2 = torch.full((experts, hidden, inter), float("nan"), dtype=dtype, device="cuda")
        layout.unpack(torch.cat(views).cuda(), got13, got2)
        assert torch.equal(got13.cpu(), expected13.to(dtype)), dtype
        assert torch.equal(got2.cpu(), expected2.to(dtype)), dtype


@pytest.mark.parametrize("weight_format", ["int8", "int4"])
@pytest.mark.parametrize("source", ["bfloat16", "float16", "float32", "fp8_e4m3"])
def test_quantization_on_the_device_gives_the_engines_bits(monkeypatch, weight_format, source):
    """LVLLM_MOE_QUANT_ON_GPU=1: lvllm.lk.quant run on the device, a few experts per step,
    against the engine's own CPU quantization (an engine built from the result has the same
    size and gives bit-equal outputs) and against the same function on the CPU (equal
    tensors). A partial last group (hidden 200, group 32), a constant group (INT4 scale 0),
    a zero group, magnitudes from 1e-20 to 1e20, and a short last step."""
    from lvllm.lk import MoEEngine, QuantizedWeights, make_runtime, quant

    experts, hidden, inter, group = 5, 200, 96, 32
    monkeypatch.setattr(quant, "CHUNK_FLOAT_BYTES", 2 * (2 * inter) * 224 * 4)  # two experts of w13
    generator = torch.Generator().manual_seed(70)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=generator) / hidden**0.5
    w2 = torch.randn(experts, hidden, inter, generator=generator) / inter**0.5
    if source == "fp8_e4m3":
        def fp8(w):
            scales = torch.rand(experts, w.shape[1], -(-w.shape[2] // 128), generator=generator) + 0.5
            return QuantizedWeights((w * 200).clamp(-448, 448).to(torch.float8_e4m3fn), scales, 128)
        w13, w2 = fp8(w13), fp8(w2)
    else:
        w13[0, 0, :32] = 0.25
        w13[1, 3, 32:64] = 0
        w13[2, 5] *= 1e20 if source == "float32" else 1e4
        w13[3, 7] *= 1e-20 if source == "float32" else 1e-4
        w13, w2 = w13.to(getattr(torch, source)), w2.to(getattr(torch, source))
    runtime = make_runtime(threads=2, binding="NONE", power_saving=False, numa_nodes=2)
    on_device = [quant.quantize(w, weight_format, group, "cuda") for w in (w13, w2)]
    on_cpu = [quant.quantize(w, weight_format, group, "cpu") for w in (w13, w2)]
    for got, expected in zip(on_device, on_cpu):
        assert got.values.device.type == "cpu"
        assert torch.equal(got.values, expected.values) and torch.equal(got.scales, expected.scales)
        assert (got.offsets is None) == (weight_format == "int8")
        assert got.offsets is None or torch.equal(got.offsets, expected.offsets)
    own = MoEEngine(w13, w2, "silu", weight_format=weight_format, group_size=group, runtime=runtime)
    given = MoEEngine(*on_device, "silu", runtime=runtime)
    assert given.nbytes == own.nbytes
    x = torch.randn(40, hidden, generator=generator)
    ids = torch.stack([torch.randperm(experts, generator=generator)[:2] for _ in range(40)]).int()
    weights = torch.rand(40, 2, generator=generator)
    assert torch.equal(given.forward(x, ids, weights), own.forward(x, ids, weights))


def test_pinned_results_are_released_after_the_load():
    """quantize() hands its results back in pinned memory, which torch caches for the next
    layer; release_pinned_memory() (called once the last lk layer is loaded) returns it."""
    from lvllm.lk import quant

    def pinned_bytes():
        return torch.cuda.host_memory_stats()["allocated_bytes.current"]

    quant.release_pinned_memory()
    in_use = pinned_bytes()  # what other tests' live objects hold
    result = quant.quantize(torch.randn(4, 256, 512).bfloat16(), "int4", 128, "cuda")
    assert result.values.is_pinned()
    del result
    assert pinned_bytes() > in_use
    quant.release_pinned_memory()
    assert pinned_bytes() == in_use


def test_mixed_batch_splits_decode_rows_to_lk_and_merges(queue):
    layer, w13, w2 = make_layer(seed=40, experts=E, hidden=H, inter=I)
    ring = ExpertRing(torch.device("cuda"), 1)
    layer.attach_gpu(queue, ring, torch_experts)
    ring.allocate()
    tokens = 40
    x, ids, weights = inputs(tokens, H, E, K, seed=40)
    plan = BatchPlan(gpu_prefill=True, lk_rows=(0, 7, 8, 39))
    route = DeviceRoute.of(plan, tokens, "cuda")
    calls = layer.engine.forward_calls
    ring.start()
    _, routed = layer.forward(x, ids, weights, lambda: None, route=route)
    expected = torch_experts(x, w13.cuda(), w2.cuda(), weights, ids)
    torch.testing.assert_close(routed, expected, **BF16_TOL)  # synchronizes: lk's submit has run
    assert layer.engine.forward_calls == calls + 1  # the decode rows went to lk
    # The lk rows are lk's own result, bit for bit.
    lk_rows = torch.tensor(plan.lk_rows, device="cuda")
    alone = layer.engine.forward(x[lk_rows].cpu(), ids[lk_rows].cpu(), weights[lk_rows].cpu())
    assert torch.equal(routed[lk_rows].cpu(), alone)
    ring.close()
