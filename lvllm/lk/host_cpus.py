"""Which host CPUs the lk runtime's workers use: read from the OpenMP runtime's settings, the
NUMA topology in sysfs and the process's affinity. Knows nothing of vLLM."""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import torch

NODES = Path("/sys/devices/system/node")


def parse_cpulist(text: str) -> set[int]:
    """'0-3,8 10' -> {0, 1, 2, 3, 8, 10} (sysfs and OpenMP CPU lists)."""
    cpus: set[int] = set()
    for part in re.split(r"[,\s]+", text.strip()):
        if part:
            first, _, last = part.partition("-")
            cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def openmp_team_cpus(environ=os.environ) -> set[int] | None:
    """The cores the OpenMP runtime was told to bind its threads to (None: not told).

    KMP_AFFINITY (Intel OpenMP) first, else GOMP_CPU_AFFINITY, else OMP_PLACES; vLLM's CPU
    worker exports the rank's share of the cores this way before it starts."""
    kmp = re.search(r"proclist=\[([^\]]*)\]", environ.get("KMP_AFFINITY", ""))
    try:
        if kmp:
            return parse_cpulist(kmp.group(1)) or None
        if environ.get("GOMP_CPU_AFFINITY"):
            return parse_cpulist(environ["GOMP_CPU_AFFINITY"]) or None
        places = environ.get("OMP_PLACES", "")
        if places.startswith("{"):
            return parse_cpulist(places.strip("{}")) or None
    except ValueError:
        return None
    return None


@contextmanager
def thread_affinity(cpus: set[int] | None):
    """Run the block with the calling thread allowed on ``cpus`` (when given): a runtime
    started inside sizes and pins its own workers from it."""
    saved = os.sched_getaffinity(0)
    if not cpus or cpus == saved:
        yield
        return
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)


def rank_cpus(node_cpus: dict[int, Sequence[int]], gpu_node: int | None,
              ranks_on_node: Sequence[int], rank: int, usable: Sequence[int]) -> list[int]:
    """The CPUs rank ``rank``'s lk pool uses.

    node_cpus: NUMA node -> its CPUs; gpu_node: the node the rank's GPU hangs off (None or -1:
    unknown); ranks_on_node: the local ranks whose GPUs share that node, this one included;
    usable: the process's allowed CPUs. Ranks sharing a node split its CPUs into contiguous,
    disjoint shares; without topology knowledge every usable CPU is returned.
    """
    allowed = list(usable)
    if gpu_node is None or gpu_node < 0 or gpu_node not in node_cpus:
        return sorted(allowed)
    local = sorted(set(node_cpus[gpu_node]) & set(allowed))
    if not local:
        return sorted(allowed)
    sharers = sorted(set(ranks_on_node) | {rank})
    index, count = sharers.index(rank), len(sharers)
    share = local[len(local) * index // count: len(local) * (index + 1) // count]
    return share or local


def node_cpus(root: Path = NODES) -> dict[int, list[int]]:
    """NUMA node -> its CPUs, from sysfs (empty where sysfs says nothing)."""
    return {int(path.name[4:]): sorted(parse_cpulist((path / "cpulist").read_text()))
            for path in root.glob("node[0-9]*")}


def usable_numa_nodes(root: Path = NODES) -> int:
    """NUMA nodes holding CPUs this process may use (1 where sysfs says nothing)."""
    usable = os.sched_getaffinity(0)
    return max(1, sum(1 for cpus in node_cpus(root).values() if usable.intersection(cpus)))


def gpu_rank_cpus(ranks: int) -> set[int]:
    """This process's share of the CPUs of its GPU's NUMA node, split among the ``ranks``
    local GPU ranks whose GPUs hang off the same node (local rank r drives GPU r)."""
    nodes = node_cpus()
    gpu_nodes = [gpu_numa_node(device) for device in range(ranks)]
    rank = torch.cuda.current_device()
    sharing = [r for r in range(ranks) if gpu_nodes[r] == gpu_nodes[rank]]
    return set(rank_cpus(nodes, gpu_nodes[rank], sharing, rank, sorted(os.sched_getaffinity(0))))


def gpu_numa_node(device: int) -> int | None:
    """The NUMA node of a GPU's PCI device (None where sysfs does not say)."""
    try:
        props = torch.cuda.get_device_properties(device)
        address = f"{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
        node = int(Path(f"/sys/bus/pci/devices/{address}/numa_node").read_text())
    except (AttributeError, OSError, ValueError):
        return None
    return node if node >= 0 else None
