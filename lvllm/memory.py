"""Host memory for the experts: what the process may still use, what the experts will take,
and buffers that go back to the kernel as soon as they are dropped.

Independent of vLLM: lvllm.vllm gathers the layers' sizes and calls in.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lvllm import envs

BUDGET_VAR = "LVLLM_MOE_RAM_BUDGET"
GIB = 2**30


# --------------------------------------------------------------------------------------
# what the process may still use
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Available:
    bytes: int
    where: str   # what limits it, for messages


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text in ("", "max") else int(text)


def _stat(path: Path, key: str) -> int:
    """The number after ``key`` in a file of "key value [unit]" lines (memory.stat,
    /proc/meminfo); 0 where it is missing."""
    try:
        for line in path.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 2 and fields[0] == key:
                return int(fields[1])
    except (OSError, ValueError):
        pass
    return 0


def _cgroup_levels(root: Path, own: str) -> list[Path]:
    """The process's cgroup directory under ``root`` and every ancestor up to ``root``
    (a container that sees its own cgroup as the root has only that one)."""
    path = root / own.lstrip("/")
    if not path.is_dir():
        path = root
    levels = [path]
    while path != root and root in path.parents:
        path = path.parent
        levels.append(path)
    return levels


def _cgroup_headroom(cgroup_file: Path = Path("/proc/self/cgroup"),
                     v2_root: Path = Path("/sys/fs/cgroup"),
                     v1_root: Path = Path("/sys/fs/cgroup/memory")) -> tuple[int, str] | None:
    """(bytes the tightest memory cgroup of this process still allows, its description):
    limit - usage + the page cache it may reclaim (inactive files), v2 or v1; None where no
    limit is set."""
    try:
        lines = cgroup_file.read_text().splitlines()
    except OSError:
        return None
    best = None
    for line in lines:
        _, controllers, own = line.split(":", 2)
        if controllers == "":   # v2 unified hierarchy
            levels = _cgroup_levels(v2_root, own)
            files = ("memory.max", "memory.current", "memory.stat", "inactive_file")
        elif "memory" in controllers.split(","):
            levels = _cgroup_levels(v1_root, own)
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "memory.stat", "total_inactive_file")
        else:
            continue
        for level in levels:
            limit = _read_int(level / files[0])
            if limit is None or limit >= 1 << 60:   # v1 writes "no limit" as a huge number
                continue
            usage = _read_int(level / files[1]) or 0
            headroom = limit - usage + _stat(level / files[2], files[3])
            if best is None or headroom < best[0]:
                best = (headroom, f"cgroup {level} limit {limit / GIB:.1f} GiB, {usage / GIB:.1f} GiB in use")
    return best


def _mem_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    return _stat(meminfo, "MemAvailable:") * 1024 or None


def available() -> Available:
    """Memory this process may still take: the machine's MemAvailable, or less where a
    memory cgroup (a container's limit) allows less."""
    system = _mem_available()
    cgroup = _cgroup_headroom()
    if cgroup is not None and (system is None or cgroup[0] < system):
        return Available(max(0, cgroup[0]), cgroup[1])
    return Available(system or 0, "MemAvailable")


# --------------------------------------------------------------------------------------
# what the experts will take
# --------------------------------------------------------------------------------------

@dataclass
class LayerMemory:
    """One lk layer: its experts as the checkpoint loads them, and as lk holds them in each
    format it could be asked for (LVLLM_MOE_USE_WEIGHT value -> bytes)."""

    checkpoint_bytes: int
    held_bytes: dict[str, int] = field(default_factory=dict)


def check_budget(layers: list[LayerMemory], mode: str, budget_gib: float | None = None, extra: int = 0,
                 extra_label: str = "", ranks: int = 1, room: Available | None = None) -> str:
    """Refuse (envs.EnvError) a load that would not fit; returns the line to log otherwise.

    Needed, per rank: what lk will hold in ``mode`` plus, while loading, two layers in the
    checkpoint's format (vLLM fills a layer, lk converts it, vLLM's copy is freed), plus
    ``extra`` (what else the process will still allocate, e.g. vLLM's CPU KV cache); times
    ``ranks`` processes of this machine doing the same; ``budget_gib``: LVLLM_MOE_RAM_BUDGET."""
    room = room or available()
    limit, where = room.bytes, room.where
    if budget_gib is not None and budget_gib * GIB < limit:
        limit, where = int(budget_gib * GIB), f"{BUDGET_VAR}={budget_gib:g}"
    transient = 2 * max((layer.checkpoint_bytes for layer in layers), default=0)

    def need(candidate: str) -> int:
        return ranks * (sum(layer.held_bytes[candidate] for layer in layers) + transient + extra)

    parts = (f"{sum(layer.held_bytes[mode] for layer in layers) / GIB:.2f} GiB of experts in lk + "
             f"{transient / GIB:.2f} GiB while two layers load in the checkpoint's format"
             + (f" + {extra / GIB:.2f} GiB {extra_label}" if extra else "")
             + (f", for each of {ranks} ranks" if ranks > 1 else ""))
    if need(mode) <= limit:
        return (f"lvllm: {len(layers)} MoE layer(s) need {need(mode) / GIB:.2f} GiB of host RAM "
                f"({parts}); {limit / GIB:.2f} GiB available ({where})")
    fitting = [f"{candidate} ({need(candidate) / GIB:.2f} GiB)" for candidate in layers[0].held_bytes
               if candidate != mode and need(candidate) <= limit]
    advice = (f"LVLLM_MOE_USE_WEIGHT values that fit: {', '.join(fitting)}" if fitting else
              "No LVLLM_MOE_USE_WEIGHT value fits: keep more layers on the GPU "
              "(LVLLM_GPU_RESIDENT_MOE_LAYERS), use more memory, or more ranks")
    raise envs.EnvError(
        f"lvllm: the routed experts of {len(layers)} MoE layer(s) would need {need(mode) / GIB:.2f} GiB "
        f"of host RAM with LVLLM_MOE_USE_WEIGHT={mode} ({parts}), but {limit / GIB:.2f} GiB is available "
        f"({where}). {advice}. Start-up stopped before loading the experts.")


# --------------------------------------------------------------------------------------
# buffers the kernel gets back when they are dropped
# --------------------------------------------------------------------------------------

def returnable_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor in its own anonymous mapping: its pages are taken only as
    they are written, and all go back to the kernel (munmap) when the last reference to it
    is dropped, whatever allocator the process preloads (vLLM's CPU worker runs tcmalloc,
    which may keep freed spans)."""
    count = math.prod(shape)
    if count == 0:
        return torch.empty(shape, dtype=dtype, device="cpu")
    nbytes = count * dtype.itemsize
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0x20))
    return torch.frombuffer(buffer, dtype=dtype, count=count).view(shape)

