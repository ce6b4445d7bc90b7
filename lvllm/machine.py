"""This machine's figures as ``lvllm plan`` weighs them: RAM, cores, NUMA nodes, GPUs, read
bandwidth, each measured here or given."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lvllm import envs
from lvllm.lk.host_cpus import usable_numa_nodes
from lvllm.memory import GIB, available
from lvllm.model_shape import ConfigError


@dataclass(frozen=True)
class Machine:
    ram: int            # bytes lvllm may take
    cores: int
    numa_nodes: int
    gpus: int
    gpu_memory: int     # bytes per GPU (0: none)
    bandwidth_gbs: float
    notes: dict = field(default_factory=dict)   # where each figure came from



def probe_machine(ram_gib: float | None = None, cores: int | None = None, nodes: int | None = None,
                  gpus: int | None = None, gpu_memory_gib: float | None = None,
                  bandwidth_gbs: float | None = None) -> Machine:
    """This machine's figures, each replaced by the value given where one is."""
    notes = {}
    if ram_gib is None:
        room = available()
        ram, notes["ram"] = room.bytes, room.where
    else:
        ram, notes["ram"] = int(ram_gib * GIB), "given"
    cores = cores or envs.usable_cpus()
    nodes = nodes or usable_numa_nodes()
    if gpu_memory_gib is None and torch.cuda.is_available():
        gpus = gpus or torch.cuda.device_count()
        memory = min(torch.cuda.get_device_properties(i).total_memory for i in range(gpus))
        notes["gpu"] = torch.cuda.get_device_name(0)
    elif gpu_memory_gib is None:
        if gpus:
            raise ConfigError("--gpus needs --gpu-memory on a machine without a visible GPU")
        gpus, memory, notes["gpu"] = 0, 0, "none found"
    else:
        gpus, memory, notes["gpu"] = gpus or 1, int(gpu_memory_gib * GIB), "given"
    if bandwidth_gbs is None:
        from lvllm import _lk

        bandwidth_gbs = _lk.measure_read_bandwidth_gbs(cores, 128 << 20, 3)
        notes["bandwidth"] = f"lk's probe, {cores} threads"
    else:
        notes["bandwidth"] = "given"
    return Machine(ram, cores, nodes, gpus, memory, bandwidth_gbs, notes)
