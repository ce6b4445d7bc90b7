"""``lvllm doctor``: does lk compute what the checkpoint says, on this machine, with these settings?

    lvllm doctor --model PATH [--layers 0,24,47]      # with the LVLLM_* / LK_* variables of serving

A few MoE layers across the depth are built and loaded as ``vllm serve`` would
(lvllm.vllm.single_layer: vLLM's quantization config and loader, lvllm's checkpoint sources,
resolve_format and LVLLM_MOE_USE_WEIGHT conversion, an lk engine). Every expert then runs on
hidden states like the model's (RMS-normed random rows and, where the checkpoint has them,
RMS-normed rows of its embedding, times the layer's post-attention norm), in one prefill batch
and in one-token decode calls, against a float64 reference computed from the checkpoint's own
tensors (lvllm.reference). Each layer's worst relative error ||lk - ref|| / ||ref|| is judged
against what its format should cost; then the machine's read bandwidth, lk's decode rate on
that layer, the ISA tier, threads and NUMA nodes. Exit status 1 when a layer fails.
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
from lvllm.envs import EnvError, format_ranges, layer_spec
from lvllm.model_shape import ConfigError, read_config
from lvllm.reference import CheckpointTensors, expert_layers, expert_output, expert_weights, stored_format
from lvllm.settings import Settings

TOKENS = 8           # rows per input kind, run through every expert
DECODE_CALLS = 4     # one-token calls, top-k experts each
SAMPLED_LAYERS = 3   # first, middle and last MoE layer

# What a correct path's relative error stays under, in parts that add (per expert, over its rows):
# lk's output rounded to the model dtype once (unit roundoff), plus what lk's format costs.
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# Kept as the checkpoint has it: fp32 arithmetic only (tests/lk/test_formats.py, TIGHT).
KEPT = 2e-5
# Quantized by lk at load from float or FP8 (tests/lk/test_formats.py, LOOSE: twice the worst
# seen with random Gaussian weights when all three matrices are quantized).
QUANTIZED = {"int8": 0.04, "int4": 0.35}
# INT4 kept: lk rounds activations to 8 bits per group (kernels.h, activation_max), each by at most
# 1/254 of its group's largest, about 1% of a Gaussian row; inputs and hidden rows both: 3x that.
INT4_ACTIVATIONS = 0.03
WARN_FACTOR = 2.0    # between 1x and 2x the expected error: warn; beyond: fail


def expected_error(lk_format: str, source: str, model_dtype: torch.dtype) -> float:
    """source: the checkpoint's stored format (an lk format name, floats by their dtype)."""
    error = UNIT_ROUNDOFF[model_dtype]
    if lk_format in QUANTIZED and lk_format != source:
        return error + QUANTIZED[lk_format]
    if lk_format == "int4":
        return error + INT4_ACTIVATIONS
    if lk_format != source and not formats.FORMATS[lk_format].quantized:   # weights rounded to it, 3 matrices
        return error + 3 * UNIT_ROUNDOFF[formats.FORMATS[lk_format].dtype] + KEPT
    return error + KEPT


def verdict(error: float, expected: float) -> str:
    if not error <= WARN_FACTOR * expected:   # NaN fails too
        return "fail"
    return "pass" if error <= expected else "warn"


@dataclass
class Check:
    layer: str
    inputs: str
    error: float
    worst_expert: int
    decode_error: float
    expected: float
    lk_format: str

    @property
    def verdict(self) -> str:
        return verdict(max(self.error, self.decode_error), self.expected)


def rms_normed(rows: torch.Tensor, norm: torch.Tensor | None) -> torch.Tensor:
    rows = rows.double()
    rows = rows / rows.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    return rows * norm.double() if norm is not None else rows


def input_sets(tensors: CheckpointTensors, layer, hidden: int, seed: int) -> dict[str, torch.Tensor]:
    """Hidden states like those reaching the layer's MoE, float64 [TOKENS, hidden] per kind."""
    generator = torch.Generator().manual_seed(seed)
    norm_name = f"{layer.prefix.rsplit('.', 2)[0]}.post_attention_layernorm.weight"
    norm = tensors.get(norm_name) if norm_name in tensors else None
    sets = {"rms-normed random": rms_normed(torch.randn(TOKENS, hidden, generator=generator), norm)}
    embedding = next((n for n in tensors.file_of if n.endswith("embed_tokens.weight")), None)
    if embedding is not None:
        table = tensors.get(embedding)
        ids = torch.randint(table.shape[0], (TOKENS,), generator=generator)
        sets["embeddings"] = rms_normed(table[ids], norm)
    return sets


def check_layer(method, layer, tensors: CheckpointTensors, dtype: torch.dtype, top_k: int, seed: int) -> list[Check]:
    """lk's outputs of every expert of ``layer`` against the float64 reference."""
    experts, engine = method.experts, method.experts.engine
    expected = expected_error(engine.weight_format, stored_format(tensors, layer.stem(0, 0)), dtype)
    # What the model hands lk, in its dtype; the reference takes the same values.
    inputs = {kind: x.to(dtype) for kind, x in input_sets(tensors, layer, engine.hidden_size, seed).items()}
    refs = {kind: torch.empty(layer.experts, TOKENS, engine.hidden_size, dtype=torch.float64) for kind in inputs}
    for e in range(layer.experts):   # one expert's float64 weights at a time: a layer's would not fit
        weights = expert_weights(tensors, layer, e)
        for kind, x in inputs.items():
            refs[kind][e] = expert_output(*weights, x.double(), engine.activation)
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
                            formats.describe(engine.weight_format, engine.group_size)))
    return checks


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


def run(model: str, settings: Settings, chosen: frozenset[int] | None = None, dtype: str = "auto",
        out=sys.stdout) -> int:
    from lvllm import _lk
    from lvllm.lk import runtime_info
    from lvllm.vllm.single_layer import load_layer, model_context

    path = Path(model).expanduser()
    read_config(path)
    tensors = CheckpointTensors(path)
    layers = expert_layers(tensors)
    if not layers:
        raise ConfigError(f"{path}: no per-expert tensors (layers.N....experts.E.gate_proj/w1...) in its "
                          "safetensors files")
    missing = sorted((chosen or frozenset()) - set(layers))
    if missing:
        raise ConfigError(f"--layers {format_ranges(missing)}: not MoE layers of {path} "
                          f"(those are {format_ranges(layers)})")
    picked = sorted(chosen) if chosen else sample(sorted(layers))
    settings = replace(settings, resident_layers=frozenset(), gpu_prefill_min_batch=0)
    checks, method = [], None
    with model_context(str(path), dtype, settings) as (vllm_config, _):
        model_dtype = vllm_config.model_config.dtype
        top_k = vllm_config.model_config.hf_text_config.num_experts_per_tok
        stored = stored_format(tensors, layers[picked[0]].stem(0, 0))
        print(f"lvllm doctor: {path} ({', '.join(vllm_config.model_config.architectures)}, "
              f"{str(model_dtype).removeprefix('torch.')}, experts stored as {stored}), "
              f"LVLLM_MOE_USE_WEIGHT={settings.weight_mode}; MoE layers {format_ranges(picked)} of "
              f"{format_ranges(layers)}", file=out)
        print(f"  {'layer':<34}{'lk format':<11}{'inputs':<19}{'error (expert)':>16}{'decode':>10}"
              f"{'expected':>10}  verdict", file=out)
        for index in picked:
            method = None   # one layer in lk at a time
            method = load_layer(vllm_config, layers[index], tensors)
            for check in check_layer(method, layers[index], tensors, model_dtype, top_k, seed=index):
                checks.append(check)
                print(f"  {check.layer:<34}{check.lk_format:<11}{check.inputs:<19}"
                      f"{check.error:>10.2e} ({check.worst_expert:>3}){check.decode_error:>10.2e}"
                      f"{check.expected:>10.1e}  {check.verdict}", file=out)
        engine, info = method.experts.engine, runtime_info()
        bandwidth = _lk.measure_read_bandwidth_gbs(info["threads"], 128 << 20, 3)
        rate, calls = decode_rate(engine, top_k, model_dtype)
        print(f"machine: read bandwidth {bandwidth:.1f} GB/s (lk's probe, {info['threads']} threads); lk decode "
              f"{rate:.2g} GB/s on {layers[picked[-1]].prefix} ({formats.describe(engine.weight_format, engine.group_size)}, "
              f"{engine.nbytes / 2**20:.1f} MiB, 1 token x {top_k} experts, median of {calls} calls: "
              f"{rate / bandwidth:.0%} of the read bandwidth); ISA {info['isa']}, {info['threads']} threads "
              f"({info['workers']}), {info['numa_nodes']} NUMA node(s)", file=out)
    failed = sorted({c.layer for c in checks if c.verdict == "fail"})
    warned = sorted({c.layer for c in checks if c.verdict == "warn"})
    print("result: " + (f"FAIL in {', '.join(failed)}" if failed else "warn in " + ", ".join(warned) if warned
                        else f"pass ({len(picked)} layers)"), file=out)
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
    args = parser.parse_args(argv)
    try:
        chosen = layer_spec(args.layers) if args.layers else None
    except ValueError:
        parser.error(f"--layers {args.layers!r}: expected layer indices and ranges, e.g. '0,24,47' or '0-3'")
    try:
        return run(args.model, Settings.from_env(), chosen, args.dtype)
    except (ConfigError, EnvError, FileNotFoundError) as error:
        parser.error(str(error))
