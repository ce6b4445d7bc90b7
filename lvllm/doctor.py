"""``lvllm doctor``: does lk compute what the checkpoint says, on this machine, with these settings?

    lvllm doctor --model PATH [--layers 0,24,47]      # with the LVLLM_* / LK_* variables of serving

A few MoE layers across the depth (each of vLLM's MoE layers in them: ERNIE-4.5-VL's text and
vision experts) are built and loaded as ``vllm serve`` would (lvllm.vllm.single_layer: vLLM's
quantization config and loader, lvllm's checkpoint sources, resolve_format and
LVLLM_MOE_USE_WEIGHT conversion, an lk engine). Every expert then runs on
hidden states like the model's (RMS-normed random rows and, where the checkpoint has them,
RMS-normed rows of its embedding, times the layer's post-attention norm; gpt-oss's clamped SwiGLU:
random rows scaled past its clamp too), in one prefill batch
and in one-token decode calls, against a float64 reference computed from the checkpoint's own
tensors (lvllm.reference). Each layer's worst relative error ||lk - ref|| / ||ref|| is judged
against what its format should cost. Where lk takes the dense layers (lvllm.vllm.dense), each float
matrix the checkpoint holds for those decoder layers (attention projections, shared experts, a
dense MLP; not the routers) and the LM head runs the same way in lk's ``LinearEngine``, in the
format serving holds it in (LVLLM_DENSE_USE_WEIGHT), against x @ W.T (+ bias) in float64. Then the
machine's read bandwidth, lk's decode rate on the last layer, the ISA tier, threads and NUMA
nodes. Exit status 1 when a layer or a dense matrix fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lvllm import formats
from lvllm.envs import EnvError, layer_spec
from lvllm.layer_ranges import format_ranges
from lvllm.error_bounds import UNIT_ROUNDOFF, expected_dense_error, expected_error, verdict
from lvllm.model_shape import ConfigError, read_config
from lvllm.reference import (CheckpointTensors, expert_layers, expert_output, expert_weights, layer_format,
                             swiglu_constants)
from lvllm.settings import Settings

TOKENS = 8           # rows per input kind, run through every expert
DECODE_CALLS = 4     # one-token calls, top-k experts each
SAMPLED_LAYERS = 3   # first, middle and last MoE layer
CLAMP_REACH = 3.0    # swigluoai layers: a row set whose largest gate or up output is 3x the clamp's limit

# Decoder-layer matrices lk's dense path leaves alone, by a part of their name (lvllm.vllm.dense,
# ModelShape.dense): the MoE routers (vLLM's GateLinear: mlp.gate, Gemma 4's
# router.proj, Granite's router.layer) and MLA's kv_b_proj. Qwen2-MoE's shared_expert_gate is
# quantized by serving but not checked: one output over a few rows gives no stable relative error
# (seen: a correct INT4 one at 0.29 in 4 one-token calls, 0.02-0.14 elsewhere).
UNCHECKED = frozenset({"gate", "router", "kv_b_proj", "shared_expert_gate"})
# A block's output projection takes the attention's or MLP's inner rows, not a layer norm's.
OUTPUT_PROJECTIONS = ("o_proj", "down_proj", "w2")
# Fused experts doctor reads: floats, and gpt-oss's MXFP4 blocks.
FUSED_FORMATS = ("float32", "float16", "bfloat16", "mxfp4")


@dataclass
class Check:
    layer: str
    inputs: str
    error: float
    worst_expert: int | None   # None: a dense matrix
    decode_error: float
    expected: float
    lk_format: str
    mismatch: str = ""   # a shape lk holds otherwise than the checkpoint stores it: fails whatever the error

    @property
    def verdict(self) -> str:
        return "fail" if self.mismatch else verdict(max(self.error, self.decode_error), self.expected)


def rms_normed(rows: torch.Tensor, norm: torch.Tensor | None) -> torch.Tensor:
    rows = rows.double()
    rows = rows / rows.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    return rows * norm.double() if norm is not None else rows


def input_sets(tensors: CheckpointTensors, layer, hidden: int, seed: int) -> dict[str, torch.Tensor]:
    """Hidden states like those reaching the layer's MoE, float64 [TOKENS, hidden] per kind."""
    generator = torch.Generator().manual_seed(seed)
    norm_name = f"{layer.decoder}.post_attention_layernorm.weight"
    norm = tensors.get(norm_name) if norm_name in tensors else None
    sets = {"rms-normed random": rms_normed(torch.randn(TOKENS, hidden, generator=generator), norm)}
    embedding = next((n for n in tensors.file_of if n.endswith("embed_tokens.weight")), None)
    if embedding is not None:
        table = tensors.get(embedding)
        ids = torch.randint(table.shape[0], (TOKENS,), generator=generator)
        sets["embeddings"] = rms_normed(table[ids], norm)
    return sets


def past_the_clamp(expert, rows: torch.Tensor, limit: float) -> torch.Tensor:
    """``rows`` scaled so that ``expert``'s gate and up outputs reach CLAMP_REACH x swigluoai's
    ``limit``: gpt-oss's clamp, which the model-like rows leave untouched (seen on the tiny
    checkpoints: an activation without it passed)."""
    largest = torch.cat([rows @ expert.gate.T, rows @ expert.up.T], dim=1).abs().max()
    return rows * (CLAMP_REACH * limit / largest)


def check_layer(method, layer, tensors: CheckpointTensors, dtype: torch.dtype, top_k: int, seed: int) -> list[Check]:
    """lk's outputs of every expert of ``layer`` against the float64 reference."""
    experts, engine = method.experts, method.experts.engine
    expected = expected_error(engine.weight_format, layer_format(tensors, layer), dtype)
    swiglu = swiglu_constants(tensors.config)
    sets = input_sets(tensors, layer, engine.hidden_size, seed)
    if engine.activation == "swigluoai":
        sets["past the clamp"] = past_the_clamp(expert_weights(tensors, layer, 0), sets["rms-normed random"], swiglu[1])
    # What the model hands lk, in its dtype; the reference takes the same values.
    inputs = {kind: x.to(dtype) for kind, x in sets.items()}
    refs = {kind: torch.empty(layer.experts, TOKENS, engine.hidden_size, dtype=torch.float64) for kind in inputs}
    mismatch = ""
    for e in range(layer.experts):   # one expert's float64 weights at a time: a layer's would not fit
        expert = expert_weights(tensors, layer, e)
        # vLLM's loader fills a wider MoE layer's first rows from narrower tensors without a word
        # (routed_experts.py _load_w13, _load_w2): the same outputs from a layer built too wide.
        if expert.gate.shape[0] != engine.intermediate_size:
            mismatch = f"lk holds experts {engine.intermediate_size} wide, the checkpoint's are {expert.gate.shape[0]}"
        for kind, x in inputs.items():
            refs[kind][e] = expert_output(expert, x.double(), engine.activation, swiglu)
    checks = []
    generator = torch.Generator().manual_seed(seed)
    for kind, x in inputs.items():
        ref = refs[kind]
        ids = torch.arange(layer.experts, dtype=torch.int32).repeat_interleave(TOKENS)[:, None]
        out = experts.forward(x.repeat(layer.experts, 1), ids, torch.ones(ids.shape), run_shared=lambda: None)[1]
        out = out.double().view(layer.experts, TOKENS, -1)
        per_expert = (out - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)
        worst = int(per_expert.nan_to_num(float("inf")).argmax())
        decode_out, decode_ref = [], []
        for t in range(DECODE_CALLS):
            chosen = torch.randperm(layer.experts, generator=generator)[:top_k]
            gates = torch.rand(len(chosen), generator=generator).softmax(0)
            decode_out.append(experts.forward(x[t:t + 1], chosen[None].int(), gates[None].float(),
                                              run_shared=lambda: None)[1][0].double())
            decode_ref.append((gates.double()[:, None] * ref[chosen, t]).sum(0))
        decode_error = float((torch.stack(decode_out) - torch.stack(decode_ref)).norm() / torch.stack(decode_ref).norm())
        checks.append(Check(layer.prefix, kind, float(per_expert[worst]), worst, decode_error, expected,
                            formats.describe(engine.weight_format, engine.group_size), mismatch))
    return checks


def dense_inputs(tensors: CheckpointTensors, layer) -> list[tuple[str, str | None]]:
    """(matrix, the layer norm before it or None) for the float dense matrices lk may hold of
    ``layer``'s decoder layer, by checkpoint name (NAME.weight); which are float shows when read."""
    decoder = layer.decoder
    found = []
    for name in sorted(tensors.file_of):
        stem = name.removesuffix(".weight")
        last = stem.rsplit(".", 1)[-1]
        if (stem == name or not stem.startswith(f"{decoder}.") or stem.startswith(f"{layer.checkpoint_prefix}.")
                or not UNCHECKED.isdisjoint(stem.split(".")) or "norm" in last):
            continue
        norm = "input_layernorm" if "attn" in stem.removeprefix(decoder) else "post_attention_layernorm"
        found.append((stem, None if last in OUTPUT_PROJECTIONS else f"{decoder}.{norm}.weight"))
    return found


def head_input(tensors: CheckpointTensors, layer) -> tuple[str, str] | None:
    """(the LM head, the final norm): lm_head, else the embedding a tied head shares."""
    names = sorted(tensors.file_of)
    head = (next((n for n in names if n.endswith("lm_head.weight")), None)
            or next((n for n in names if n.endswith("embed_tokens.weight")), None))
    root = layer.decoder.rsplit(".layers.", 1)[0]
    return (head.removesuffix(".weight"), f"{root}.norm.weight") if head else None


def dense_row_name(stem: str) -> str:
    return f"{stem} (tied LM head)" if stem.endswith("embed_tokens") else stem


def lk_dense_weight(stem: str, stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What serving hands lk of the dense matrix ``stem``: the checkpoint's tensor as vLLM's
    loader casts it (tests damage one here, as a broken conversion would)."""
    return stored.to(dtype).contiguous()


def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T (+ bias) in float64, a slice of the weight's rows at a time (an LM head whole
    in float64 would take GBs)."""
    step = max(1, (1 << 24) // weight.shape[1])
    out = torch.cat([x.double() @ weight[i:i + step].double().T for i in range(0, weight.shape[0], step)], dim=1)
    return out + bias.double() if bias is not None else out


def check_dense(tensors: CheckpointTensors, stem: str, norm_name: str | None, dtype: torch.dtype,
                settings: Settings, seed: int) -> Check | None:
    """lk's output of one dense matrix against the float64 reference; None where the checkpoint
    does not hold it as a float matrix (a quantized projection is vLLM's, not lk's)."""
    from lvllm.lk.linear import LinearEngine

    stored = tensors.get(f"{stem}.weight")
    if stored.dim() != 2 or stored.dtype not in UNIT_ROUNDOFF:
        return None
    bias = tensors.get(f"{stem}.bias") if f"{stem}.bias" in tensors else None
    norm = tensors.get(norm_name) if norm_name in tensors else None
    norm = norm if norm is not None and norm.shape == (stored.shape[1],) else None
    quantized = settings.dense_weight_mode != "TO_DTYPE"
    engine = LinearEngine(lk_dense_weight(stem, stored, dtype), settings.dense_weight_mode.lower() if quantized
                          else None, settings.dense_group_size if quantized else None)
    generator = torch.Generator().manual_seed(seed)
    x = rms_normed(torch.randn(TOKENS, stored.shape[1], generator=generator), norm).to(dtype)
    ref = linear_reference(x, stored, bias)
    lk_bias = bias.to(dtype) if bias is not None else None
    out = engine.forward(x, lk_bias).double()
    decode = torch.cat([engine.forward(x[t:t + 1], lk_bias) for t in range(DECODE_CALLS)]).double()
    error = float((out - ref).norm() / ref.norm())
    decode_error = float((decode - ref[:DECODE_CALLS]).norm() / ref[:DECODE_CALLS].norm())
    return Check(dense_row_name(stem), "rms-normed random", error, None, decode_error,
                 expected_dense_error(engine.weight_format, stored.dtype, dtype), engine.describe())


def dense_plan(settings: Settings, model_dtype: torch.dtype, device_type: str) -> tuple[str, bool]:
    """(doctor's line about the dense matrices, whether lk holds them to be checked); ``device_type``:
    vLLM's (lk takes dense layers in its CPU build only)."""
    mode, dtype = settings.dense_weight_mode, str(model_dtype).removeprefix("torch.")
    if device_type != "cpu":
        return "dense matrices: on the GPU (vLLM's GPU build), not lk's: not checked", False
    if settings.dense_on_lk == "OFF":
        return "dense matrices: LVLLM_DENSE_ON_LK=OFF keeps them off lk: not checked", False
    if mode != "TO_DTYPE":
        held = formats.describe(mode.lower(), formats.group_size(mode.lower(), settings.dense_group_size))
        return (f"dense matrices: LVLLM_DENSE_USE_WEIGHT={mode}: the float ones of these layers and the LM head, "
                f"quantized at load to {held} as serving does; routers and embedding stay in {dtype}"), True
    if settings.dense_on_lk == "ON":
        return f"dense matrices: LVLLM_DENSE_ON_LK=ON: lk holds the float ones as stored (not quantized), in {dtype}", True
    return (f"dense matrices: LVLLM_DENSE_ON_LK=AUTO: checked as stored (not quantized), in {dtype}, as lk holds "
            "those vLLM's CPU build leaves to torch's F.linear (which ones, vllm serve's log says)"), True


def print_check(check: Check, width: int, out) -> None:
    expert = f" ({check.worst_expert:>3})" if check.worst_expert is not None else " " * 6
    print(f"  {check.layer:<{width}}{check.lk_format:<11}{check.inputs:<19}{check.error:>10.2e}{expert}"
          f"{check.decode_error:>10.2e}{check.expected:>10.1e}  {check.verdict}"
          + (f": {check.mismatch}" if check.mismatch else ""), file=out)


def decode_rate(engine, top_k: int, dtype: torch.dtype, seconds: float = 0.5) -> tuple[float, int]:
    """(GB/s, calls): one-token forwards of ``top_k`` random experts, bytes read over the median call."""
    x = torch.randn(1, engine.hidden_size).to(dtype)
    per_call = top_k * engine.nbytes / engine.num_experts
    times, start = [], time.perf_counter()
    for call in range(1000):
        ids = torch.randperm(engine.num_experts)[:top_k][None].int()
        begin = time.perf_counter()
        engine.forward(x, ids, torch.full(ids.shape, 1.0 / top_k))
        if call >= 3:   # the first calls wake the workers
            times.append(time.perf_counter() - begin)
        if len(times) >= 5 and time.perf_counter() - start > seconds:
            break
    return per_call / sorted(times)[len(times) // 2] / 1e9, len(times)


def sample(layers: list[int], count: int = SAMPLED_LAYERS) -> list[int]:
    """``count`` layers spread over the depth, first and last included."""
    if len(layers) <= count:
        return layers
    return sorted({layers[round(i * (len(layers) - 1) / (count - 1))] for i in range(count)})


def readable_layers(path: Path, tensors: CheckpointTensors) -> dict:
    """The checkpoint's MoE layers (by index, each its lvllm.reference.ExpertLayer per expert set);
    ConfigError where doctor reads none of them."""
    layers = expert_layers(tensors)
    if not layers:
        raise ConfigError(f"{path}: no expert tensors doctor reads in its safetensors files (one per expert: "
                          "layers.N....experts.E.gate_proj/w1...; fused as Llama 4, Gemma 4, Granite MoE, "
                          "Step-3, Aria or gpt-oss store them)")
    fused = next((layer for sets in layers.values() for layer in sets if layer.fused), None)
    if fused and layer_format(tensors, fused) not in FUSED_FORMATS:
        raise ConfigError(f"{path}: fused experts stored as {layer_format(tensors, fused)} (doctor reads fused "
                          f"experts in {', '.join(FUSED_FORMATS)})")
    return layers


def run(model: str, settings: Settings, chosen: frozenset[int] | None = None, dtype: str = "auto",
        out=sys.stdout, trust_remote_code: bool = False) -> int:
    from lvllm import _lk
    from lvllm.lk import runtime_info
    from lvllm.vllm.single_layer import experts_per_token, load_layer, model_context

    path = Path(model).expanduser()
    read_config(path)
    tensors = CheckpointTensors(path)
    layers = readable_layers(path, tensors)
    missing = sorted((chosen or frozenset()) - set(layers))
    if missing:
        raise ConfigError(f"--layers {format_ranges(missing)}: not MoE layers of {path} "
                          f"(those are {format_ranges(layers)})")
    picked = sorted(chosen) if chosen else sample(sorted(layers))
    settings = replace(settings, resident_layers=frozenset(), gpu_prefill_min_batch=0)
    dense = {index: dense_inputs(tensors, layers[index][0]) for index in picked}
    head = head_input(tensors, layers[picked[-1]][0])
    width = max([34] + [len(layer.prefix) + 2 for index in picked for layer in layers[index]]
                + [len(dense_row_name(stem)) + 2 for inputs in [*dense.values(), [head] if head else []]
                   for stem, _ in inputs])
    checks, method = [], None
    with model_context(str(path), dtype, settings, trust_remote_code) as (vllm_config, installation):
        model_dtype = vllm_config.model_config.dtype
        top_k = experts_per_token(vllm_config)
        stored = layer_format(tensors, layers[picked[0]][0])
        dense_line, dense_on_lk = dense_plan(settings, model_dtype, vllm_config.device_config.device_type)
        print(f"lvllm doctor: {path} ({', '.join(vllm_config.model_config.architectures)}, "
              f"{str(model_dtype).removeprefix('torch.')}, experts stored as {stored}), "
              f"LVLLM_MOE_USE_WEIGHT={settings.weight_mode}; MoE layers {format_ranges(picked)} of "
              f"{format_ranges(layers)}", file=out)
        print(dense_line, file=out)
        print(f"  {'layer':<{width}}{'lk format':<11}{'inputs':<19}{'error (expert)':>16}{'decode':>10}"
              f"{'expected':>10}  verdict", file=out)
        for index in picked:
            layer_checks = []
            for layer in layers[index]:   # each of vLLM's MoE layers in it (ERNIE-4.5-VL: text, vision)
                method = None   # one layer in lk at a time
                method = load_layer(vllm_config, layer, tensors)
                layer_checks += check_layer(method, layer, tensors, model_dtype, top_k, seed=index)
            if dense_on_lk:
                installation.lk_runtime()   # the runtime serving's dense layers run on
                inputs = dense[index] + ([head] if head and index == picked[-1] else [])
                layer_checks += [c for i, (stem, norm) in enumerate(inputs)
                                 if (c := check_dense(tensors, stem, norm, model_dtype, settings, index * 100 + i))]
            for check in layer_checks:
                checks.append(check)
                print_check(check, width, out)
        engine, info = method.experts.engine, runtime_info()
        bandwidth = _lk.measure_read_bandwidth_gbs(info["threads"], 128 << 20, 3)
        rate, calls = decode_rate(engine, top_k, model_dtype)
        print(f"machine: read bandwidth {bandwidth:.1f} GB/s (lk's probe, {info['threads']} threads); lk decode "
              f"{rate:.2g} GB/s on {layer.prefix} ({formats.describe(engine.weight_format, engine.group_size)}, "
              f"{engine.nbytes / 2**20:.1f} MiB, 1 token x {top_k} experts, median of {calls} calls: "
              f"{rate / bandwidth:.0%} of the read bandwidth); ISA {info['isa']}, {info['threads']} threads "
              f"({info['workers']}), {info['numa_nodes']} NUMA node(s)", file=out)
    failed = sorted({c.layer for c in checks if c.verdict == "fail"})
    warned = sorted({c.layer for c in checks if c.verdict == "warn"})
    matrices = len({c.layer for c in checks if c.worst_expert is None})
    print("result: " + (f"FAIL in {', '.join(failed)}" if failed else "warn in " + ", ".join(warned) if warned
                        else f"pass ({len(picked)} MoE layer{'s' * (len(picked) != 1)}, {matrices} dense "
                             f"matri{'ces' if matrices != 1 else 'x'})"), file=out)
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    # vLLM's INFO lines about building a layer are noise in doctor's report; set before vLLM
    # is imported (it reads the level once), in this command's process only.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    parser = argparse.ArgumentParser(prog="lvllm doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="local checkpoint directory")
    parser.add_argument("--layers", help="MoE layers to check, e.g. '0,24,47' (default: first, middle, last)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                        help="model dtype, as vllm serve --dtype")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the checkpoint's own config code, as vllm serve --trust-remote-code")
    args = parser.parse_args(argv)
    try:
        chosen = layer_spec(args.layers) if args.layers else None
    except ValueError:
        parser.error(f"--layers {args.layers!r}: expected layer indices and ranges, e.g. '0,24,47' or '0-3'")
    try:
        return run(args.model, Settings.from_env(), chosen, args.dtype,
                   trust_remote_code=args.trust_remote_code)
    except (ConfigError, EnvError, FileNotFoundError) as error:
        parser.error(str(error))
