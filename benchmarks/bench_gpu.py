"""lvllm's GPU path on one CUDA device, with torch alone (no vLLM needed).

    python benchmarks/bench_gpu.py [--hidden 2048 --inter 768 --experts 128 --topk 8]

Measures in one run, for one MoE layer shape (default Qwen3-30B-A3B):

1. the machine's pinned host-to-device bandwidth (the ceiling of streamed prefill);
2. hybrid decode per layer at 1/4/16 tokens, split into copy (D2H + H2D through pinned
   memory), CPU (lk alone), GPU (a shared-expert MLP alone) and wait (the stream idle
   while lk finishes), eager and replayed from a CUDA graph, each from --chain layers
   queued back to back; and the overlap gain: (CPU + copy + GPU) / hybrid layer time;
3. streamed prefill over --layers layers through the ring (--window): bytes streamed per
   second against the pinned bandwidth (copy-bound target >= 85%), with the experts'
   compute and without it; the experts' compute alone (weights resident), so each case
   says whether it is copy- or compute-bound and how close it comes to the slower of the
   two; the unpack kernel alone (panels to [E, 2I, H] / [E, H, I], dequantized for
   quantized layers); and the token count from which streaming beats lk's CPU prefill at
   every larger size measured; for each of --prefill-formats (quantized layers stream
   fewer bytes);
4. load-time quantization of one layer (LVLLM_MOE_USE_WEIGHT=INT8/INT4, from bf16 and
   from FP8 with a scale per 128 inputs of a row, as block checkpoints reach lk): the engine's own on lk's CPU threads against lvllm.lk.quant on the
   GPU (LVLLM_MOE_QUANT_ON_GPU=1) plus the engine taking the result; equal engine
   outputs checked.

Every figure is measured in this run; ratios compare figures of this run only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lvllm.gpu.plan import BatchPlan
from lvllm.gpu.ring import ExpertRing
from lvllm.gpu.stream import StreamQueue
from lvllm.hybrid import DeviceRoute, HybridExperts
from lvllm.formats import group_size
from lvllm.lk import MoEEngine, quant
from lvllm.lk.layout import PackedLayout

from bench_load import tensors_of
from bench_moe import to_fp8


def gpu_ms(run, repeats: int) -> float:
    """Median milliseconds of ``run`` on the current stream (CUDA events)."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def wall_ms(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def grouped_experts(x, w13, w2, topk_weights, topk_ids):
    """Routed experts on the GPU, tokens grouped by expert into one padded batch per expert
    and two batched matmuls (a stand-in for vLLM's fused-MoE kernel, which needs vLLM). One
    host synchronization (the largest group) per call."""
    experts, topk = w13.shape[0], topk_ids.shape[1]
    flat = topk_ids.flatten()
    order = flat.argsort(stable=True)
    sorted_ids = flat[order]
    counts = torch.bincount(flat, minlength=experts)
    first = counts.cumsum(0) - counts
    slot = torch.arange(flat.numel(), device=x.device) - first[sorted_ids]
    tokens = order // topk
    grouped = x.new_zeros(experts, int(counts.max()), x.shape[1])
    grouped[sorted_ids, slot] = x[tokens]
    gate, up = torch.bmm(grouped, w13.transpose(1, 2)).chunk(2, dim=-1)
    down = torch.bmm(torch.nn.functional.silu(gate) * up, w2.transpose(1, 2))
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    out.index_add_(0, tokens, down[sorted_ids, slot].float() * topk_weights.flatten()[order, None])
    return out.to(x.dtype)


def layer_weights(args, seed):
    """bf16 w13 [E, 2I, H] and w2 [E, H, I] of one layer of random experts."""
    generator = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(args.experts, 2 * args.inter, args.hidden, generator=generator)
           / args.hidden**0.5).bfloat16()
    w2 = (torch.randn(args.experts, args.hidden, args.inter, generator=generator)
          / args.inter**0.5).bfloat16()
    return w13, w2


def make_layer(args, seed, weight_format="bfloat16"):
    """(HybridExperts, w13, w2): one layer of random experts kept by lk in ``weight_format``
    (bfloat16; int8/int4 quantized from bf16; fp8: FP8 experts with a scale per 128 inputs
    of a row, kept as they come, LVLLM_MOE_USE_WEIGHT=KEEP), and the bf16 weights it stands for."""
    w13, w2 = layer_weights(args, seed)
    if weight_format == "fp8":
        sources = to_fp8(w13), to_fp8(w2)
        layer = HybridExperts(*sources, "silu", layer_name=f"bench{seed}")
        return layer, *(quant.dequantize(source).bfloat16() for source in sources)
    layer = HybridExperts(w13, w2, "silu", layer_name=f"bench{seed}", weight_format=weight_format,
                          group_size=args.group_size)
    if weight_format in ("int8", "int4"):
        group = group_size(weight_format, args.group_size)
        w13, w2 = (quant.dequantize(quant.quantize(w, weight_format, group)).bfloat16()
                   for w in (w13, w2))
    return layer, w13, w2


def routing(args, tokens, seed, device="cuda"):
    generator = torch.Generator().manual_seed(seed)
    weights, ids = torch.topk(torch.softmax(torch.randn(tokens, args.experts, generator=generator), -1),
                              args.topk)
    x = torch.randn(tokens, args.hidden, generator=generator).bfloat16()
    return x.to(device), ids.to(device), weights.to(device)


def pinned_bandwidth_gbs(nbytes: int, repeats: int) -> float:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    device.copy_(host, non_blocking=True)
    return nbytes / gpu_ms(lambda: device.copy_(host, non_blocking=True), repeats) / 1e6


def decode(args, queue, results):
    """Per-layer figures from --chain hybrid layers queued back to back, as a model's layers
    are: the host queues ahead while the stream waits for lk, so a lone layer's Python
    overhead on an idle device is not counted as layer time."""
    layer, _, _ = make_layer(args, seed=1)
    layer.attach_gpu(queue)
    shared_up = torch.randn(args.hidden, 2 * args.shared_inter, device="cuda").bfloat16() / args.hidden**0.5
    shared_down = torch.randn(args.shared_inter, args.hidden, device="cuda").bfloat16() / args.shared_inter**0.5

    def shared(x):
        gate, up = (x @ shared_up).chunk(2, dim=-1)
        return (torch.nn.functional.silu(gate) * up) @ shared_down

    chain = args.chain
    for tokens in args.decode_tokens:
        x, ids, weights = routing(args, tokens, seed=tokens)
        host = [t.cpu() for t in (x, ids, weights)]
        pinned_in = torch.empty_like(host[0]).pin_memory()
        pinned_out = torch.empty_like(host[0]).pin_memory()
        out = torch.empty_like(x)

        def copies():
            for _ in range(chain):
                pinned_in.copy_(x, non_blocking=True)
                out.copy_(pinned_out, non_blocking=True)

        def hybrid_chain():
            for _ in range(chain):
                layer.forward(x, ids, weights, lambda: shared(x))

        def shared_chain():
            for _ in range(chain):
                shared(x)

        hybrid_chain()
        copy = gpu_ms(copies, args.repeats) / chain
        cpu = wall_ms(lambda: layer.engine.forward(*host), args.repeats)
        device = gpu_ms(shared_chain, args.repeats) / chain
        eager = gpu_ms(hybrid_chain, args.repeats) / chain
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            hybrid_chain()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            hybrid_chain()
        replay = gpu_ms(graph.replay, args.repeats) / chain
        row = dict(tokens=tokens, copy_ms=copy, cpu_ms=cpu, gpu_ms=device,
                   wait_ms=max(replay - copy - device, 0.0), eager_ms=eager, graph_ms=replay,
                   overlap_gain=(copy + cpu + device) / replay)
        results["decode"].append(row)
        print(f"decode {tokens:>3} tok: copy {copy:.3f} ms, CPU {cpu:.3f} ms, GPU {device:.3f} ms, "
              f"wait {row['wait_ms']:.3f} ms | layer eager {eager:.3f} ms, graph {replay:.3f} ms | "
              f"overlap gain {row['overlap_gain']:.2f}x (graph)")


def streaming_wins_from(rows: list[dict]) -> int | None:
    """The smallest measured token count from which streaming beats lk's CPU prefill at that
    size and at every larger one, or None. lk's time at small sizes moves by up to 2x from run to
    run on a shared host, so one lucky small size must not set the threshold."""
    threshold = None
    for row in sorted(rows, key=lambda r: r["tokens"], reverse=True):
        if row["with compute"]["ms_per_layer"] >= row["lk_cpu_ms_per_layer"]:
            break
        threshold = row["tokens"]
    return threshold


def prefill(args, queue, results, bandwidth, weight_format):
    built = [make_layer(args, seed=100 + i, weight_format=weight_format) for i in range(args.layers)]
    layers = [layer for layer, _, _ in built]
    resident = built[0][1].cuda(), built[0][2].cuda()  # layer 0's experts, for compute alone
    del built
    ring = ExpertRing(torch.device("cuda"), args.window)
    compute = {"with compute": grouped_experts,
               "copy only": lambda x, w13, w2, tw, ti: torch.zeros_like(x)}
    for layer in layers:
        layer.attach_gpu(queue, ring, grouped_experts, torch.bfloat16)
    ring.allocate()
    streamed_bytes = sum(layer.engine.nbytes for layer in layers)
    # The unpack kernel alone (a layer's bytes already on the device): what streaming adds to
    # the copy besides the experts' compute.
    layout, views = PackedLayout.of(layers[0].engine, torch.bfloat16)
    blob = torch.cat(views).cuda()
    unpacked13, unpacked2 = torch.empty_like(resident[0]), torch.empty_like(resident[1])
    unpack_ms = gpu_ms(lambda: layout.unpack(blob, unpacked13, unpacked2), 10)
    assert torch.equal(unpacked13, resident[0]) and torch.equal(unpacked2, resident[1])  # the weights lk holds
    del blob, unpacked13, unpacked2
    print(f"unpack {weight_format}: {unpack_ms:.2f} ms/layer ({layout.nbytes / unpack_ms / 1e6:.0f} GB/s of "
          f"{weight_format} read, {layout.unpacked_bytes / unpack_ms / 1e6:.0f} GB/s of bf16 written)")
    results["unpack_ms_per_layer"][weight_format] = unpack_ms
    for tokens in args.prefill_tokens:
        x, ids, weights = routing(args, tokens, seed=tokens)
        route = DeviceRoute.of(BatchPlan(gpu_prefill=True), tokens, "cuda")
        host = [t.cpu() for t in (x, ids, weights)]
        lk_out = layers[0].engine.forward(*host)
        gpu_out = grouped_experts(x, *resident, weights, ids).cpu()
        # The stand-in must compute what lk computes, or its timings mean nothing.
        torch.testing.assert_close(gpu_out.float(), lk_out.float(), rtol=3e-2, atol=3e-2)
        row = dict(format=weight_format, tokens=tokens,
                   compute_alone_ms=gpu_ms(lambda: grouped_experts(x, *resident, weights, ids), 5))
        for label, function in compute.items():
            for layer in layers:
                layer.gpu_experts = function

            def forward():
                ring.start()
                for layer in layers:
                    layer.forward(x, ids, weights, lambda: None, route=route)

            forward()
            ms = gpu_ms(forward, max(3, args.repeats // 10))
            row[label] = dict(ms_per_layer=ms / len(layers),
                              gbs=streamed_bytes / ms / 1e6,
                              of_pinned=streamed_bytes / ms / 1e6 / bandwidth)
        row["lk_cpu_ms_per_layer"] = wall_ms(lambda: layers[0].engine.forward(*host), 5)
        copy_ms = streamed_bytes / len(layers) / bandwidth / 1e6
        row["bound"] = "copy" if copy_ms >= row["compute_alone_ms"] else "compute"
        streamed = row["with compute"]["ms_per_layer"]
        row["of_ideal"] = max(copy_ms, row["compute_alone_ms"]) / streamed
        results["prefill"].append(row)
        print(f"prefill {weight_format} {tokens:>5} tok: streamed {streamed:.2f} ms/layer ({row['bound']}-bound: copy "
              f"{copy_ms:.2f} ms at pinned H2D, compute alone {row['compute_alone_ms']:.2f} ms; "
              f"{row['of_ideal']:.0%} of the slower of the two) | "
              f"{row['copy only']['of_pinned']:.0%} of pinned H2D copy-only, "
              f"{row['with compute']['of_pinned']:.0%} with compute | lk CPU "
              f"{row['lk_cpu_ms_per_layer']:.2f} ms/layer")
    rows = [r for r in results["prefill"] if r["format"] == weight_format]
    results["streaming_overtakes_cpu_at"][weight_format] = streaming_wins_from(rows)
    print(f"{weight_format}: streaming overtakes lk's CPU prefill from "
          f"{results['streaming_overtakes_cpu_at'][weight_format]} tokens on (of those measured)")
    ring.close()


def load(args, results):
    """Run-time quantization of one layer, both ways, from bf16 and from FP8 blocks."""
    w13, w2 = layer_weights(args, seed=7)
    sources = {"bfloat16": (w13, w2), "fp8_e4m3": (to_fp8(w13), to_fp8(w2))}
    x, ids, weights = (t.cpu() for t in routing(args, 16, seed=7))
    for source, (s13, s2) in sources.items():
        tensors = tensors_of(s13) + tensors_of(s2)
        for weight_format in ("int8", "int4"):
            def own():
                return MoEEngine(s13, s2, "silu", weight_format=weight_format, group_size=args.group_size)

            def on_gpu():
                group = group_size(weight_format, args.group_size)
                return [quant.quantize(w, weight_format, group, "cuda") for w in (s13, s2)]

            quantized = on_gpu()
            given = MoEEngine(*quantized, "silu")
            assert torch.equal(given.forward(x, ids, weights), own().forward(x, ids, weights)), (source, weight_format)
            del given
            cpu_ms = wall_ms(own, 3)
            quantize_ms = wall_ms(on_gpu, 3)
            take_ms = wall_ms(lambda: MoEEngine(*quantized, "silu"), 3)
            row = dict(source=source, format=weight_format, engine_cpu_ms=cpu_ms, quantize_gpu_ms=quantize_ms,
                       source_h2d_ms=wall_ms(lambda: ([t.cuda() for t in tensors], torch.cuda.synchronize()), 3),
                       engine_takes_ms=take_ms, gain=cpu_ms / (quantize_ms + take_ms))
            results["load"].append(row)
            print(f"load {source} -> {weight_format}: engine on the CPU {cpu_ms:.0f} ms/layer | quantize on the "
                  f"GPU {quantize_ms:.0f} ms (of which the source's pageable copy {row['source_h2d_ms']:.0f} ms) "
                  f"+ engine takes it {take_ms:.0f} ms | GPU path {row['gain']:.2f}x as fast")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--inter", type=int, default=768)
    parser.add_argument("--shared-inter", type=int, default=768)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--layers", type=int, default=8, help="streamed layers per prefill forward")
    parser.add_argument("--chain", type=int, default=8, help="hybrid layers per timed decode forward")
    parser.add_argument("--window", type=int, default=1)
    parser.add_argument("--decode-tokens", type=lambda s: [int(t) for t in s.split(",")], default=[1, 4, 16])
    parser.add_argument("--prefill-tokens", type=lambda s: [int(t) for t in s.split(",")],
                        default=[64, 256, 1024, 4096, 8192])
    parser.add_argument("--prefill-formats", type=lambda s: s.split(","), default=["bfloat16", "int4", "fp8"],
                        help="how lk keeps the streamed layers: bfloat16, int8, int4, fp8")
    parser.add_argument("--group-size", type=int, default=None,
                        help="int8/int4 quantization group (default: the engine's for the format)")
    parser.add_argument("--sections", type=lambda s: s.split(","), default=["decode", "prefill", "load"],
                        help="which of decode, prefill, load to run")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    from lvllm import lk

    results = dict(device=torch.cuda.get_device_name(), lk=lk.runtime_info(), args=vars(args),
                   decode=[], prefill=[], streaming_overtakes_cpu_at={}, unpack_ms_per_layer={}, load=[])
    bandwidth = pinned_bandwidth_gbs(1 << 30, args.repeats)
    results["pinned_h2d_gbs"] = bandwidth
    print(f"{results['device']}; lk {results['lk']}; pinned host-to-device {bandwidth:.1f} GB/s")
    queue = StreamQueue(max_tokens=max(args.prefill_tokens))
    if "decode" in args.sections:
        decode(args, queue, results)
    if "prefill" in args.sections:
        for weight_format in args.prefill_formats:
            prefill(args, queue, results, bandwidth, weight_format)
    if "load" in args.sections:
        load(args, results)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)


if __name__ == "__main__":
    main()
