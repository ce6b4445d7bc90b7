"""``lvllm plan``'s command: its arguments and the report it prints (lvllm.plan computes it)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lvllm import envs, expert_stats, formats
from lvllm import plan as plan_module
from lvllm.envs import DENSE_WEIGHT_MODES, EnvError
from lvllm.layer_ranges import format_ranges
from lvllm.machine import probe_machine
from lvllm.model_shape import (ConfigError, ModelShape, dense_bytes, dense_weight_bytes, describe_cache,
                               model_shape, read_config)
from lvllm.plan import (GPU_UTILIZATION, MAX_GRAPH_TOKENS, HotAlternative, Plan, Ranks, gib_text, hot_alternative,
                        lk_rank_layer_bytes, make_plan, users_dense_mode)


def _storage(shape: ModelShape) -> str:
    storage = shape.storage
    if storage.format == "float":
        return f"{shape.dtype} experts"
    return f"{formats.describe(storage.format, storage.group)} experts ({storage.scheme})"


def hot_lines(hot: HotAlternative, plan: Plan, stats: Path) -> list[str]:
    """The resident layers' GPU memory as hot experts instead, from the statistics file."""
    layers = format_ranges(plan.gpu.resident)
    held = " and ".join(f"{hot.slots} of {expert_set.counted}" for expert_set in plan.shape.expert_sets)
    lines = [f"Hot experts instead ({stats}): the same memory holds {held} "
             f"in each of the {len(plan.shape.moe_layers)} MoE layers ({gib_text(hot.gpu_bytes)}): the GPU serves "
             f"{hot.hot_share:.0%} of the file's picks (resident layers [{layers}]: {hot.layer_share:.0%}); "
             f"decode bound {hot.hot_tok_s:.1f} tok/s (resident layers: {hot.layer_tok_s:.1f} tok/s)"]
    if not hot.ram_fits:
        lines.append("  but lk would then hold every MoE layer, which this RAM does not")
    elif hot.hot_tok_s > hot.layer_tok_s:
        lines.append(f"  to serve it so (slower than resident layers on an H200 so far, docs/gpu-path.md): "
                     f"LVLLM_HOT_EXPERTS={hot.slots} "
                     f"LVLLM_EXPERT_STATS={stats} LVLLM_GPU_RESIDENT_MOE_LAYERS= (or both auto)")
    return lines


def render(plan: Plan, model: str, stats: Path | None = None, counts: dict | None = None) -> str:
    shape, machine, gpu = plan.shape, plan.machine, plan.gpu
    tp = max(1, machine.gpus)
    lines = [
        f"lvllm plan: {model} ({shape.architecture}, {_storage(shape)})",
        f"  model: {shape.num_layers} layers, {len(shape.moe_layers)} MoE: "
        f"{' and '.join(expert_set.describe(shape.hidden) for expert_set in shape.expert_sets)}, "
        f"{shape.top_k} per token, {shape.dtype}; "
        f"{gib_text(dense_weight_bytes(shape))} outside the routed experts; {describe_cache(shape)}",
        f"  machine: {gib_text(machine.ram)} RAM ({machine.notes.get('ram', 'given')}), {machine.cores} cores, "
        f"{machine.numa_nodes} NUMA node(s), "
        + (f"{machine.gpus} GPU(s) of {gib_text(machine.gpu_memory)} ({machine.notes.get('gpu', 'given')})"
           if machine.gpus else "no GPU")
        + f", read bandwidth {machine.bandwidth_gbs:.1f} GB/s ({machine.notes.get('bandwidth', 'given')})",
        "",
    ]
    if gpu is not None:
        lines.append(f"GPU, per rank of {tp}: {gpu.describe()}")
        hot = hot_alternative(plan, counts) if counts else None
        if hot is not None:
            lines += hot_lines(hot, plan, stats)
        elif counts:
            lines.append(f"Hot experts ({stats}): none fit beside the KV cache, or the experts are not SiLU "
                         "without biases (what LVLLM_HOT_EXPERTS takes)")
    if gpu is None:
        lines += [f"Host RAM also holds {plan.kv_space_gib} GiB of KV cache (VLLM_CPU_KVCACHE_SPACE) and the weights "
                  f"outside the experts, by LVLLM_DENSE_USE_WEIGHT (embedding and routers stay {shape.dtype}):",
                  "  " + ", ".join(f"{mode} {gib_text(dense_bytes(shape, mode, group=plan.dense_group))} "
                                   f"({gib_text(dense_bytes(shape, mode, True, plan.dense_group))} "
                                   "a token)" for mode in DENSE_WEIGHT_MODES)]
    if plan.lk_layers:
        dense = f"  {'LVLLM_DENSE_USE_WEIGHT':<22}" if gpu is None else ""
        lines += [f"Host RAM for the {len(plan.lk_layers)} lk layer(s) [{format_ranges(plan.lk_layers)}], "
                  f"{gib_text(machine.ram)} available:",
                  f"  {'LVLLM_MOE_USE_WEIGHT':<22}{'format':<11}{'lk holds':>11}{dense}{'needs':>11}  fits  "
                  "decode bound"]
        lines += [f"  {' / '.join(r.modes):<22}{r.resolved.describe():<11}{gib_text(r.held):>11}"
                  + (f"  {r.dense_mode:<22}" if r.dense_mode else "")
                  + f"{gib_text(r.need):>11}  {'yes ' if r.fits(machine.ram) else 'no  '}  {r.tok_s:.1f} tok/s"
                  for r in plan.rows]
    if plan.lk_layers and plan.choice and plan.ranks.size > 1:
        rank = len(plan.lk_layers) * lk_rank_layer_bytes(shape, plan.choice.resolved, machine.numa_nodes, plan.ranks)
        split = (" and ".join(f"{-(-s.count // plan.ranks.size)} of the {s.counted}" for s in shape.expert_sets)
                 + " of every layer"
                 if plan.ranks.expert_parallel else f"1/{plan.ranks.size} of every expert")
        lines.append(f"Per rank of {plan.ranks.size}: lk holds {split}, {gib_text(rank)} in "
                     f"{plan.choice.resolved.describe()}, on {max(1, machine.cores // plan.ranks.size)} cores")
    lines.append("")
    return "\n".join(lines + settings_lines(plan, model))


def settings_lines(plan: Plan, model: str) -> list[str]:
    shape, machine, gpu = plan.shape, plan.machine, plan.gpu
    if gpu is not None and gpu.left < 0:
        return [f"No plan: {gpu.reason}. More GPU memory, more GPUs or a smaller --max-model-len."]
    if plan.lk_layers and plan.choice is None:
        least = min(plan.rows, key=lambda row: row.need)
        dense = f" with LVLLM_DENSE_USE_WEIGHT={least.dense_mode}" if least.dense_mode else ""
        return [f"No plan: no LVLLM_MOE_USE_WEIGHT value fits {gib_text(machine.ram)} of RAM (the smallest, "
                f"{least.modes[0]}{dense}, needs {gib_text(least.need)}). More RAM, more GPU memory or a smaller "
                "--max-model-len."]
    env = [f"export LVLLM_MOE_NUMA_ENABLED={1 if plan.lk_layers else 0}"]
    if plan.lk_layers:
        env.append(f"export LVLLM_MOE_USE_WEIGHT={plan.choice.modes[0]}")
        if plan.choice.dense_mode:
            env.append(f"export LVLLM_DENSE_USE_WEIGHT={plan.choice.dense_mode}")
        if gpu is not None:
            layers = format_ranges(gpu.resident).replace("none", "")
            env += [f"export LVLLM_GPU_RESIDENT_MOE_LAYERS={layers}   # what =auto picks with these settings",
                    f"export LK_THREADS={plan.threads}   # per rank: its cores less one per 16 for vLLM"]
        if plan.prefill_from:
            env.append(f"export LVLLM_GPU_PREFILL_MIN_BATCH_SIZE={plan.prefill_from}")
    if gpu is None:
        share = max(1, machine.cores // plan.ranks.size)
        bind = "|".join(f"{r * share}-{r * share + share - 1}" for r in range(plan.ranks.size))
        env += [f"export VLLM_CPU_KVCACHE_SPACE={plan.kv_space_gib}",
                f"export VLLM_CPU_OMP_THREADS_BIND={bind}   # lk runs on each worker's {share} threads"]
    config = [f"model: {model}", f"dtype: {shape.dtype}", f"max-model-len: {plan.max_model_len}"]
    if plan.ranks.size > 1 or gpu is not None:
        config.append(f"tensor-parallel-size: {plan.ranks.size}")
    if plan.ranks.expert_parallel:
        config.append("enable-expert-parallel: true")
    if gpu is not None:
        config.append(f"gpu-memory-utilization: {GPU_UTILIZATION:.2f}")
    if plan.prefill_from:
        config.append("compilation_config.max_cudagraph_capture_size: "
                      f"{min(MAX_GRAPH_TOKENS, plan.prefill_from - 16)}")
    return ["# environment", *env, "", "# config.yaml", *config]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lvllm plan", description=plan_module.__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="local checkpoint directory (config.json)")
    for name, kind, text in (("--gpu-memory", float, "GiB per GPU (default: the GPUs found)"),
                             ("--gpus", int, "GPUs, one tensor-parallel rank each"),
                             ("--ram", float, "GiB of host RAM for lvllm (default: available now)"),
                             ("--cores", int, "CPU cores (default: this process's)"),
                             ("--numa-nodes", int, "NUMA nodes (default: sysfs)"),
                             ("--bandwidth", float, "read bandwidth, GB/s (default: lk's probe)"),
                             ("--max-model-len", int, "tokens per sequence (default: the config's)")):
        parser.add_argument(name, type=kind, help=text)
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                        help="model dtype (default: the config's)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="without a GPU: vLLM CPU ranks on this host, each on its share of the cores")
    parser.add_argument("--stats", type=Path,
                        help="a routing statistics file of this model (LVLLM_EXPERT_STATS): weigh hot experts "
                             "(LVLLM_HOT_EXPERTS) against the resident layers")
    parser.add_argument("--expert-parallel", action="store_true",
                        help="the ranks split the experts (vLLM's --enable-expert-parallel; CPU build only)")
    args = parser.parse_args(argv)
    for name in ("gpu_memory", "gpus", "ram", "cores", "numa_nodes", "bandwidth", "max_model_len",
                 "tensor_parallel_size"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            parser.error(f"--{name.replace('_', '-')} must be above 0, got {value}")
    try:
        config, where = read_config(args.model)
        shape = model_shape(config, str(where), args.dtype)
        machine = probe_machine(args.ram, args.cores, args.numa_nodes, args.gpus, args.gpu_memory,
                                args.bandwidth)
        users_dense = users_dense_mode()
        dense_group = envs.get("LVLLM_DENSE_QUANT_GROUP_SIZE")
    except (ConfigError, EnvError) as error:
        parser.error(str(error))
    if machine.gpus and (args.expert_parallel or args.tensor_parallel_size > 1):
        parser.error("--expert-parallel and --tensor-parallel-size are for hosts without a GPU: with GPUs "
                     "each is one rank (--gpus), and lk takes expert parallelism on vLLM's CPU build only")
    counts = read_stats(parser, args.stats, shape, machine.gpus) if args.stats else None
    plan = make_plan(shape, machine, args.max_model_len, users_dense, dense_group,
                     Ranks(args.tensor_parallel_size, args.expert_parallel))
    print(render(plan, args.model, args.stats, counts))
    return 0 if plan.feasible else 1


def read_stats(parser, path: Path, shape: ModelShape, gpus: int) -> dict[int, list[int]]:
    """The per-layer counts of ``path``, refused when they are another model's or there is no GPU."""
    if not gpus:
        parser.error("--stats weighs hot experts on a GPU: give --gpus and --gpu-memory, or run it on the GPU host")
    try:
        data = expert_stats.read(path)
    except expert_stats.StatsFileError as error:
        parser.error(f"--stats: {error}")
    if data is None:
        parser.error(f"--stats {path}: no such file")
    model = data["model"]
    for field, value in (("num_experts", shape.text_experts.count), ("top_k", shape.top_k),
                         ("num_hidden_layers", shape.num_layers)):
        if model.get(field) != value:
            parser.error(f"--stats {path}: its model has {field} {model.get(field)}, this one {value}")
    return expert_stats.layer_totals(data)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
