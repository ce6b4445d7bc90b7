"""Exact shortcuts through vLLM's CPU step outside the forward (LVLLM_CPU_STEP_SHORTCUTS).

At batch 1 the step around the forward is ~1.8 ms of small operations, each slowed by caches the
forward has just evicted (#72). Three of them do work the CPU build does not need, or do it the
slow way, and are replaced here where their result is the same bit for bit:

- ``CpuGpuBuffer.copy_to_gpu``: on the CPU runner a buffer's device tensor is its host tensor
  (CPUModelRunner._postprocess_tensors), so vLLM copies each onto itself, seven times a step.
- ``BlockTable.compute_slot_mapping``: vLLM launches a kernel whose OpenMP region wakes every core
  for one token; numpy computes the same slots (single context-parallel rank, token-to-slot mode,
  aliased buffers).
- ``Sampler.greedy_sample``: vLLM's CPU argmax reads a 152k-entry row in ~130 us where numpy's
  takes ~12; both give the first maximum. Rows holding NaN keep vLLM's kernel.

Anything outside those conditions runs vLLM's own method.
"""

from __future__ import annotations

import numpy as np
import torch
from vllm.platforms import current_platform
from vllm.v1.sample.sampler import Sampler
from vllm.v1.utils import CpuGpuBuffer
from vllm.v1.worker.block_table import BlockTable, SlotMappingMode

from lvllm.vllm.installation import Installation

# How often each shortcut was taken since install (lk_report; tests prove they ran).
taken = dict.fromkeys(("copy_to_gpu", "slot_mapping", "greedy_sample"), 0)


def install(installation: Installation) -> None:
    uninstall()
    if not (current_platform.is_cpu() and installation.settings.step_shortcuts):
        return
    taken.update(dict.fromkeys(taken, 0))
    vllm_copy, vllm_slots, vllm_greedy = (CpuGpuBuffer.copy_to_gpu, BlockTable.compute_slot_mapping,
                                          Sampler.greedy_sample)

    def copy_to_gpu(buffer, n=None):
        if buffer.gpu is not buffer.cpu:
            return vllm_copy(buffer, n)
        taken["copy_to_gpu"] += 1
        return buffer.gpu if n is None else buffer.gpu[:n]

    def compute_slot_mapping(table, num_reqs, query_start_loc, positions):
        if not _plain_slots(table, query_start_loc, positions):
            return vllm_slots(table, num_reqs, query_start_loc, positions)
        taken["slot_mapping"] += 1
        _slots(table, num_reqs, query_start_loc.numpy(), positions.numpy())

    def greedy_sample(logits):
        picks = _first_maxima(logits)
        if picks is None:
            return vllm_greedy(logits)
        taken["greedy_sample"] += 1
        return picks

    for owner, name, vllm, ours in ((CpuGpuBuffer, "copy_to_gpu", vllm_copy, copy_to_gpu),
                                    (BlockTable, "compute_slot_mapping", vllm_slots, compute_slot_mapping),
                                    (Sampler, "greedy_sample", vllm_greedy, staticmethod(greedy_sample))):
        ours.lvllm_wraps = vllm
        setattr(owner, name, ours)


def uninstall() -> None:
    for owner, name in ((CpuGpuBuffer, "copy_to_gpu"), (BlockTable, "compute_slot_mapping"),
                        (Sampler, "greedy_sample")):
        method = owner.__dict__[name]   # a function, or greedy_sample's staticmethod
        vllm = getattr(method, "lvllm_wraps", None)
        if vllm is not None:
            setattr(owner, name, staticmethod(vllm) if isinstance(method, staticmethod) else vllm)


def _plain_slots(table: BlockTable, query_start_loc: torch.Tensor, positions: torch.Tensor) -> bool:
    return (table.slot_mapping_mode == SlotMappingMode.TOKEN_TO_KV_SLOT and table.dcp_world_size == 1
            and table.block_table.gpu is table.block_table.cpu and table.slot_mapping.gpu is table.slot_mapping.cpu
            and query_start_loc.device.type == "cpu" and positions.device.type == "cpu")


def _slots(table: BlockTable, num_reqs: int, query_start_loc: np.ndarray, positions: np.ndarray) -> None:
    """Token t of request r at position p goes to slot block_table[r, p // B] * B + p % B."""
    block = table.block_size
    if num_reqs == 1:
        rows = 0
    else:
        rows = np.repeat(np.arange(num_reqs), np.diff(query_start_loc[: num_reqs + 1]))
    blocks = table.block_table.np[rows, positions // block].astype(np.int64)
    table.slot_mapping.np[: positions.shape[0]] = blocks * block + positions % block


def _first_maxima(logits: torch.Tensor) -> torch.Tensor | None:
    """Each row's first maximum as vLLM's CPU argmax returns it (int64), or None where numpy
    cannot stand in for it (another dtype or device, a NaN)."""
    if logits.dtype != torch.float32 or logits.dim() != 2 or logits.device.type != "cpu":
        return None
    rows = logits.numpy()
    picks = rows.argmax(axis=-1)
    if np.isnan(rows[np.arange(rows.shape[0]), picks]).any():
        return None
    return torch.from_numpy(picks)


def counts() -> dict[str, int] | None:
    """How often each shortcut was taken in this process; None while they are not installed."""
    return dict(taken) if hasattr(CpuGpuBuffer.copy_to_gpu, "lvllm_wraps") else None
