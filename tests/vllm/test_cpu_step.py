"""LVLLM_CPU_STEP_SHORTCUTS against vLLM's own kernels on the same inputs: the KV cache slots of a
step's tokens and greedy sampling, bit for bit; vLLM's methods back after uninstall. (A whole
model's steps with CHECK, each shortcut against vLLM's code from the same state, and its outputs
against lk off: test_equivalence.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import vllm._custom_ops  # noqa: F401  (registers torch.ops._C)
from e2e_common import F32_LOGPROB_TOL, MAX_TOKENS, PROMPTS, max_logprob_diff, run_llm
from vllm.utils import cpu_triton_utils
from vllm.v1.sample.sampler import Sampler
from vllm.v1.utils import CpuGpuBuffer
from vllm.v1.worker.block_table import BlockTable
from vllm.v1.worker.cpu_model_runner import CPUModelRunner

from lvllm.settings import Settings
from lvllm.vllm import cpu_step
from lvllm.vllm.installation import Installation

BLOCK, BLOCKS_PER_REQ, MAX_BATCHED = 16, 8, 64


@pytest.fixture
def installed():
    cpu_step.uninstall()   # an in-process LLM of an earlier test in this worker leaves them installed
    vllm_methods = (CpuGpuBuffer.copy_to_gpu, BlockTable.compute_slot_mapping, Sampler.__dict__["greedy_sample"])
    cpu_step.install(Installation(Settings()))
    assert "_prepare_inputs" in CPUModelRunner.__dict__
    yield
    cpu_step.uninstall()
    assert (CpuGpuBuffer.copy_to_gpu, BlockTable.compute_slot_mapping,
            Sampler.__dict__["greedy_sample"].__func__) == (*vllm_methods[:2], vllm_methods[2].__func__)
    assert "_prepare_inputs" not in CPUModelRunner.__dict__   # vLLM's, inherited, shows through
    assert cpu_step.counts() is None


def cpu_block_table() -> BlockTable:
    """A block table as the CPU runner holds it: each buffer's device tensor is its host tensor."""
    table = BlockTable(block_size=BLOCK, max_num_reqs=4, max_num_blocks_per_req=BLOCKS_PER_REQ,
                       max_num_batched_tokens=MAX_BATCHED, pin_memory=False, device=torch.device("cpu"),
                       cp_kv_cache_interleave_size=1)
    table.block_table.gpu = table.block_table.cpu
    table.slot_mapping.gpu = table.slot_mapping.cpu
    table.block_table.np[:] = np.random.default_rng(0).integers(0, 5000, size=table.block_table.np.shape)
    return table


@pytest.mark.parametrize("scheduled", [[1], [1, 1, 1, 1], [3, 1, 5], [40]])
def test_slot_mapping_is_vllms(installed, scheduled):
    table = cpu_block_table()
    rng = np.random.default_rng(len(scheduled))
    query_start_loc = torch.tensor([0, *np.cumsum(scheduled)], dtype=torch.int32)
    positions = torch.from_numpy(np.concatenate(
        [rng.integers(0, BLOCK * BLOCKS_PER_REQ - n) + np.arange(n) for n in scheduled]))
    table.slot_mapping.np[:] = -7   # what neither writes stays
    cpu_triton_utils._compute_slot_mapping_kernel_impl(
        len(positions), MAX_BATCHED, query_start_loc, positions, table.block_table.cpu, BLOCKS_PER_REQ,
        table.slot_mapping.cpu, BLOCK)
    expected = table.slot_mapping.np.copy()
    table.slot_mapping.np[:] = -7
    table.compute_slot_mapping(len(scheduled), query_start_loc, positions)
    assert np.array_equal(table.slot_mapping.np, expected)
    assert cpu_step.counts()["slot_mapping"] == 1


def test_greedy_sample_is_vllms(installed):
    vllm_greedy = Sampler.__dict__["greedy_sample"].lvllm_wraps
    rng = torch.Generator().manual_seed(0)
    rows = torch.randn(6, 151936, generator=rng).round(decimals=1)   # many ties for the maximum
    rows[1] = float("-inf")
    rows[2, 7] = rows[2, 9] = float("inf")
    rows[3, :4] = rows[3].max() + 1
    for logits in (rows, rows[:1], rows[:, :cpu_step.NUMPY_ARGMAX_FROM], rows[:, :512]):
        picks = Sampler.greedy_sample(logits)
        assert picks.dtype == torch.int64 and torch.equal(picks, vllm_greedy(logits))
    assert cpu_step.counts()["greedy_sample"] == 3   # rows of 512: vLLM's kernel, the faster there
    with_nan = rows.clone()
    with_nan[4, 100] = float("nan")
    assert torch.equal(Sampler.greedy_sample(with_nan), vllm_greedy(with_nan))
    assert cpu_step.counts()["greedy_sample"] == 3   # vLLM's kernel took the NaN too


def test_copy_to_gpu_of_an_aliased_buffer_copies_nothing(installed):
    buffer = CpuGpuBuffer(8, dtype=torch.int32, device=torch.device("cpu"), pin_memory=False)
    buffer.np[:] = np.arange(8)
    assert buffer.copy_to_gpu(3).data_ptr() == buffer.gpu.data_ptr()   # a separate device tensor: copied
    assert torch.equal(buffer.gpu[:3], buffer.cpu[:3]) and cpu_step.counts()["copy_to_gpu"] == 0
    buffer.gpu = buffer.cpu
    assert torch.equal(buffer.copy_to_gpu(5), torch.arange(5, dtype=torch.int32))
    assert cpu_step.counts()["copy_to_gpu"] == 1


def test_check_stops_at_a_shortcut_unlike_vllm(monkeypatch):
    cpu_step.install(Installation(Settings(step_shortcuts="CHECK")))
    try:
        logits = torch.randn(2, cpu_step.NUMPY_ARGMAX_FROM, generator=torch.Generator().manual_seed(1))
        assert torch.equal(Sampler.greedy_sample(logits), logits.argmax(dim=-1))
        monkeypatch.setattr(cpu_step, "_first_maxima", lambda rows: torch.zeros(2, dtype=torch.int64))
        with pytest.raises(cpu_step.ShortcutMismatch, match="greedy_sample left the picks"):
            Sampler.greedy_sample(logits)
    finally:
        cpu_step.uninstall()


def test_one_request_at_a_time_takes_every_shortcut_with_vllms_results(llm_runs, tiny_model):
    """max_num_seqs=1: every decode step is one request and one token, so the inputs shortcut
    runs each step, under CHECK (e2e_common) against vLLM's _prepare_inputs from the same state;
    the answers are lk off's."""
    off = llm_runs("qwen3_moe", lk=False)
    alone = run_llm(tiny_model("qwen3_moe"), lk=True, llm_kwargs={"max_num_seqs": 1})
    shortcuts = alone.report[0]["step_shortcuts"]
    assert shortcuts["prepare_inputs"] >= len(PROMPTS) * (MAX_TOKENS - 1), shortcuts
    assert shortcuts["copy_to_gpu"] > 0 and shortcuts["slot_mapping"] > 0, shortcuts
    assert shortcuts["greedy_sample"] == 0, shortcuts   # 512-token vocabulary: vLLM's argmax is faster
    assert alone.tokens == off.tokens
    assert max_logprob_diff(alone, off) < F32_LOGPROB_TOL
