"""Exact shortcuts through vLLM's CPU step outside the forward (LVLLM_CPU_STEP_SHORTCUTS).

At batch 1 the step around the forward is ~1.8 ms of small operations, each slowed by caches the
forward has just evicted (#72). Four of them do work the CPU build does not need, or do it the
slow way, and are replaced here where their result is the same bit for bit:

- ``_prepare_inputs`` for one request scheduled one token (a decode step at batch 1): vLLM's
  general batch code (~25 numpy and torch operations) reduced to the dozen values it writes.
- ``CpuGpuBuffer.copy_to_gpu``: on the CPU runner a buffer's device tensor is its host tensor
  (CPUModelRunner._postprocess_tensors), so vLLM copies each onto itself, seven times a step.
- ``BlockTable.compute_slot_mapping``: vLLM launches a kernel whose OpenMP region wakes every core
  for one token; numpy computes the same slots (single context-parallel rank, token-to-slot mode,
  aliased buffers).
- ``Sampler.greedy_sample``: vLLM's CPU argmax reads a 152k-entry row in ~130 us where numpy's
  takes ~17; both give the first maximum. Rows holding NaN, and rows too short for numpy's
  call to pay, keep vLLM's kernel.

Anything outside those conditions runs vLLM's own method. CHECK runs vLLM's method too, from the
same state, and raises on the first value that differs.
"""

from __future__ import annotations

import numpy as np
import torch
from vllm.platforms import current_platform
from vllm.v1.sample.sampler import Sampler
from vllm.v1.utils import CpuGpuBuffer
from vllm.v1.worker.block_table import BlockTable, SlotMappingMode
from vllm.v1.worker.cpu_model_runner import CPUModelRunner

from lvllm.vllm.installation import Installation

# How often each shortcut was taken since install (lk_report; tests prove they ran).
taken = dict.fromkeys(("prepare_inputs", "copy_to_gpu", "slot_mapping", "greedy_sample"), 0)
# Logits rows from which numpy's argmax beats vLLM's (Zen 4, one row: 6.2 against 6.0 us at 4096
# entries, 6.9 against 16.2 at 16384, 17 against 130 at 151936).
NUMPY_ARGMAX_FROM = 4096
# The runner's CpuGpuBuffers _prepare_inputs writes.
_INPUT_BUFFERS = ("input_ids", "query_start_loc", "prev_positions", "discard_request_mask", "num_accepted_tokens",
                  "req_indices", "query_pos", "num_scheduled_tokens")
# Its plain tensors (each the runner's "device" tensor, on the CPU).
_INPUT_TENSORS = ("optimistic_seq_lens_cpu", "num_computed_tokens", "positions", "seq_lens")


class ShortcutMismatch(RuntimeError):
    """LVLLM_CPU_STEP_SHORTCUTS=CHECK found a shortcut's result unlike vLLM's."""


def install(installation: Installation) -> None:
    uninstall()
    mode = installation.settings.step_shortcuts
    if not current_platform.is_cpu() or mode == "OFF":
        return
    taken.update(dict.fromkeys(taken, 0))
    check = mode == "CHECK"
    vllm_inputs, vllm_copy, vllm_slots, vllm_greedy = (
        CPUModelRunner._prepare_inputs, CpuGpuBuffer.copy_to_gpu, BlockTable.compute_slot_mapping,
        Sampler.greedy_sample)

    def prepare_inputs(runner, scheduler_output, num_scheduled_tokens):
        if not _one_token_step(runner, scheduler_output):
            return vllm_inputs(runner, scheduler_output, num_scheduled_tokens)
        taken["prepare_inputs"] += 1
        if not check:
            return _one_token_inputs(runner)
        return _checked("_prepare_inputs", lambda: _input_state(runner),
                        lambda: vllm_inputs(runner, scheduler_output, num_scheduled_tokens),
                        lambda: _one_token_inputs(runner))

    def copy_to_gpu(buffer, n=None):
        if buffer.gpu is not buffer.cpu:
            return vllm_copy(buffer, n)
        taken["copy_to_gpu"] += 1
        return buffer.gpu if n is None else buffer.gpu[:n]

    def compute_slot_mapping(table, num_reqs, query_start_loc, positions):
        if not _plain_slots(table, query_start_loc, positions):
            return vllm_slots(table, num_reqs, query_start_loc, positions)
        taken["slot_mapping"] += 1
        ours = lambda: _slots(table, num_reqs, query_start_loc.numpy(), positions.numpy())  # noqa: E731
        if not check:
            return ours()
        return _checked("compute_slot_mapping", lambda: {"slot_mapping": table.slot_mapping.cpu},
                        lambda: vllm_slots(table, num_reqs, query_start_loc, positions), ours)

    def greedy_sample(logits):
        picks = _first_maxima(logits)
        if picks is None:
            return vllm_greedy(logits)
        taken["greedy_sample"] += 1
        if check:
            _same("greedy_sample", "the picks", vllm_greedy(logits), picks)
        return picks

    for owner, name, vllm, ours in ((CPUModelRunner, "_prepare_inputs", vllm_inputs, prepare_inputs),
                                    (CpuGpuBuffer, "copy_to_gpu", vllm_copy, copy_to_gpu),
                                    (BlockTable, "compute_slot_mapping", vllm_slots, compute_slot_mapping),
                                    (Sampler, "greedy_sample", vllm_greedy, staticmethod(greedy_sample))):
        ours.lvllm_wraps = vllm
        setattr(owner, name, ours)


def uninstall() -> None:
    for owner, name in ((CPUModelRunner, "_prepare_inputs"), (CpuGpuBuffer, "copy_to_gpu"),
                        (BlockTable, "compute_slot_mapping"), (Sampler, "greedy_sample")):
        method = owner.__dict__.get(name)   # a function, or greedy_sample's staticmethod
        vllm = getattr(method, "lvllm_wraps", None)
        if vllm is None:
            continue
        if vllm is getattr(super(owner, owner), name, None):   # inherited: ours goes, vLLM's shows through
            delattr(owner, name)
        else:
            setattr(owner, name, staticmethod(vllm) if isinstance(method, staticmethod) else vllm)


def counts() -> dict[str, int] | None:
    """How often each shortcut was taken in this process; None while they are not installed."""
    return dict(taken) if hasattr(CpuGpuBuffer.copy_to_gpu, "lvllm_wraps") else None


def _checked(name: str, state, vllm, ours):
    """vLLM's call and ours from the same state (state() -> the tensors they write, by name):
    ours must leave every one of them, and return, what vLLM's does."""
    before = {key: tensor.clone() for key, tensor in state().items()}
    expected = vllm()
    after_vllm = {key: tensor.clone() for key, tensor in state().items()}
    for key, tensor in state().items():
        tensor.copy_(before[key])
    result = ours()
    for key, tensor in state().items():
        _same(name, key, after_vllm[key], tensor)
    for index, (want, got) in enumerate(zip(expected or (), result or ())):
        _same(name, f"result {index}", want, got)
    return result


def _same(name: str, what: str, want, got) -> None:
    if isinstance(want, torch.Tensor):
        equal = isinstance(got, torch.Tensor) and want.dtype == got.dtype and torch.equal(want, got)
    else:
        equal = want == got
    if not equal:
        raise ShortcutMismatch(f"LVLLM_CPU_STEP_SHORTCUTS=CHECK: {name} left {what} as {got!r}, vLLM's code as "
                               f"{want!r}; set LVLLM_CPU_STEP_SHORTCUTS=OFF and report it")


def _one_token_step(runner, scheduler_output) -> bool:
    """One request scheduled one token, without the features whose inputs _one_token_inputs does
    not write (prompt embeddings, async scheduling, pipeline receives; the runner's own in
    _one_token_runner)."""
    batch = runner.input_batch   # remade when the KV cache is: its block tables are checked each step
    return (batch.num_reqs == 1 and scheduler_output.total_num_scheduled_tokens == 1
            and not batch.req_prompt_embeds and batch.prev_sampled_token_ids is None
            and runner._pp_recv_work is None and _one_token_runner(runner)
            and all(t.block_table.gpu is t.block_table.cpu for t in batch.block_table.block_tables))


def _one_token_runner(runner) -> bool:
    """Whether the runner's configuration lets _one_token_inputs stand in for vLLM's (no
    speculative decoding, M-RoPE, prompt embeddings or LoRA; its buffers' device tensors are
    their host tensors): fixed when the runner is made, so decided once."""
    ready = runner.__dict__.get("lvllm_one_token_inputs")
    if ready is None:
        ready = runner.lvllm_one_token_inputs = (
            runner.speculative_config is None and not runner.uses_mrope and not runner.enable_prompt_embeds
            and not runner.lora_config and runner.num_accepted_tokens_event is None
            and all(getattr(runner, name).gpu is getattr(runner, name).cpu for name in _INPUT_BUFFERS))
    return ready


def _one_token_inputs(runner) -> tuple[torch.Tensor, None, int]:
    """What vLLM's _prepare_inputs writes and returns for one request at position p (the tokens
    it has computed) scheduled one token: that token, position p, sequence length p + 1."""
    batch = runner.input_batch
    position = int(batch.num_computed_tokens_cpu[0])
    runner.query_pos.np[0] = 0
    runner.input_ids.np[0] = batch.token_ids_cpu[0, position]
    runner.query_start_loc.np[0] = 0
    runner.query_start_loc.np[1:] = 1
    optimistic = runner.optimistic_seq_lens_cpu.numpy()
    optimistic[0] = position + 1
    optimistic[1:] = 0
    runner._compute_prev_positions(1)
    runner.discard_request_mask.np[0] = position + 1 < runner.requests[batch.req_ids[0]].num_tokens
    runner.num_accepted_tokens.np.fill(1)
    runner.num_computed_tokens.numpy()[0] = position
    runner.req_indices.np[0] = 0
    runner.num_scheduled_tokens.np[0] = 1
    runner.positions.numpy()[0] = position
    seq_lens = runner.seq_lens.numpy()
    seq_lens[0] = position + 1
    seq_lens[1:] = 0
    batch.block_table.compute_slot_mapping(1, runner.query_start_loc.gpu[:2], runner.positions[:1])
    return torch.zeros(1, dtype=runner.query_start_loc.gpu.dtype), None, 1


def _input_state(runner) -> dict[str, torch.Tensor]:
    state = {name: getattr(runner, name).cpu for name in _INPUT_BUFFERS}
    state.update((name, getattr(runner, name)) for name in _INPUT_TENSORS)
    state.update((f"slot_mapping {index}", table.slot_mapping.cpu)
                 for index, table in enumerate(runner.input_batch.block_table.block_tables))
    return state


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
    cannot stand in for it (another dtype or device, a NaN) or would be slower (short rows)."""
    if (logits.dtype != torch.float32 or logits.dim() != 2 or logits.device.type != "cpu"
            or logits.shape[1] < NUMPY_ARGMAX_FROM):
        return None
    rows = logits.numpy()
    picks = rows.argmax(axis=-1)
    if np.isnan(rows[np.arange(rows.shape[0]), picks]).any():
        return None
    return torch.from_numpy(picks)
