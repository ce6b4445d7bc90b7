"""lvllm.memory: the room a process has (cgroups v1 and v2, MemAvailable), the budget check
that refuses a load before it starts, and buffers that go back to the kernel."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from lvllm import envs, memory
from lvllm.memory import GIB, Available, LayerMemory, check_budget
from lvllm.settings import Settings

MIB = 2**20


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_takes_the_tightest_level_and_counts_reclaimable_cache(tmp_path):
    root = tmp_path / "v2"
    write(root / "pod" / "memory.max", f"{8 * GIB}\n")
    write(root / "pod" / "memory.current", f"{2 * GIB}\n")
    write(root / "pod" / "memory.stat", f"anon {GIB}\ninactive_file {GIB // 2}\n")
    write(root / "pod" / "app" / "memory.max", "max\n")   # no limit of its own
    write(root / "pod" / "app" / "memory.current", f"{GIB}\n")
    write(tmp_path / "cgroup", "0::/pod/app\n")
    headroom, where = memory._cgroup_headroom(tmp_path / "cgroup", v2_root=root, v1_root=tmp_path / "none")
    assert headroom == 8 * GIB - 2 * GIB + GIB // 2
    assert "limit 8.0 GiB" in where and str(root / "pod") in where


def test_cgroup_v1_ignores_the_no_limit_value(tmp_path):
    root = tmp_path / "v1"
    write(root / "memory.limit_in_bytes", "9223372036854771712\n")
    write(root / "job" / "memory.limit_in_bytes", f"{3 * GIB}\n")
    write(root / "job" / "memory.usage_in_bytes", f"{GIB}\n")
    write(root / "job" / "memory.stat", "cache 0\ntotal_inactive_file 1024\n")
    write(tmp_path / "cgroup", "12:cpu,cpuacct:/job\n7:memory:/job\n")
    assert memory._cgroup_headroom(tmp_path / "cgroup", v2_root=tmp_path / "none", v1_root=root)[0] == \
        2 * GIB + 1024
    # A container that sees its own cgroup as the root.
    write(tmp_path / "cgroup", "7:memory:/elsewhere\n")
    assert memory._cgroup_headroom(tmp_path / "cgroup", v2_root=tmp_path / "none", v1_root=root) is None


def test_mem_available_reads_meminfo(tmp_path):
    write(tmp_path / "meminfo", "MemTotal:       24684108 kB\nMemAvailable:   23000000 kB\n")
    assert memory._mem_available(tmp_path / "meminfo") == 23000000 * 1024
    assert memory.available().bytes > 0   # this machine's


def layers(count, checkpoint, **held):
    return [LayerMemory(checkpoint, dict(held)) for _ in range(count)]


def test_a_fitting_load_says_what_it_counted():
    line = check_budget(layers(4, GIB, TO_DTYPE=GIB, INT4=GIB // 4), "TO_DTYPE",
                        room=Available(7 * GIB, "MemAvailable"))
    # 4 GiB held + 2 layers of 1 GiB while loading = 6 GiB <= 7 GiB
    assert "need 6.00 GiB" in line and "7.00 GiB available (MemAvailable)" in line


def test_refusal_gives_the_figures_and_the_formats_that_fit():
    experts = layers(48, 1152 * MIB, TO_DTYPE=1152 * MIB, KEEP=1152 * MIB, INT8=600 * MIB, INT4=320 * MIB)
    with pytest.raises(envs.EnvError) as refused:
        check_budget(experts, "TO_DTYPE", extra=GIB, extra_label="for vLLM's KV cache",
                     room=Available(22 * GIB, "cgroup /sys/fs/cgroup/memory/x limit 24.0 GiB, 2.0 GiB in use"))
    message = str(refused.value)
    assert "LVLLM_MOE_USE_WEIGHT=TO_DTYPE" in message
    assert "57.25 GiB of host RAM" in message
    assert "54.00 GiB of experts" in message and "2.25 GiB while two layers load" in message
    assert "+ 1.00 GiB for vLLM's KV cache" in message
    assert "22.00 GiB is available" in message and "cgroup /sys/fs/cgroup/memory/x limit 24.0 GiB" in message
    # INT4: 15 GiB + 2.25 + 1 fits; INT8: 28.1 + 3.25 does not; KEEP is TO_DTYPE's size.
    assert "values that fit: INT4 (18.25 GiB)" in message and "INT8 (" not in message


def test_nothing_fits():
    with pytest.raises(envs.EnvError, match="No LVLLM_MOE_USE_WEIGHT value fits"):
        check_budget(layers(2, GIB, TO_DTYPE=GIB, INT4=GIB // 4), "INT4", room=Available(GIB, "MemAvailable"))


def test_ranks_of_one_machine_share_its_memory():
    experts = layers(2, GIB, TO_DTYPE=GIB)
    room = Available(int(4.5 * GIB), "MemAvailable")
    assert check_budget(experts, "TO_DTYPE", room=room)            # 4 GiB
    with pytest.raises(envs.EnvError, match="for each of 2 ranks"):
        check_budget(experts, "TO_DTYPE", ranks=2, room=room)      # 8 GiB


def test_the_budget_variable_only_lowers(monkeypatch):
    experts = layers(1, GIB, TO_DTYPE=GIB, INT4=GIB // 4)
    room = Available(10 * GIB, "MemAvailable")
    monkeypatch.setenv("LVLLM_MOE_RAM_BUDGET", "2.5")
    with pytest.raises(envs.EnvError, match=r"2.50 GiB is available \(LVLLM_MOE_RAM_BUDGET=2.5\).*INT4"):
        check_budget(experts, "TO_DTYPE", Settings.from_env().ram_budget_gib, room=room)   # 3 GiB > 2.5
    monkeypatch.setenv("LVLLM_MOE_RAM_BUDGET", "100")
    assert "10.00 GiB available (MemAvailable)" in check_budget(
        experts, "TO_DTYPE", Settings.from_env().ram_budget_gib, room=room)
    monkeypatch.setenv("LVLLM_MOE_RAM_BUDGET", "-1")
    with pytest.raises(envs.EnvError, match="LVLLM_MOE_RAM_BUDGET='-1' is not valid"):
        Settings.from_env()


def anon_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def test_returnable_buffers_take_pages_when_written_and_give_them_back():
    size = 256 * MIB
    before = anon_rss()
    tensor = memory.returnable_empty((size // 2,), torch.bfloat16)
    assert anon_rss() - before < 16 * MIB        # nothing taken before it is written
    parameter = torch.nn.Parameter(tensor, requires_grad=False)
    del tensor
    parameter.data.fill_(1.5)
    assert anon_rss() - before > size - 16 * MIB
    assert parameter.sum().item() == 1.5 * size // 2
    # vLLM's loader keeps the Parameter: swapping its data must return the pages.
    parameter.data = torch.empty(0, dtype=torch.bfloat16)
    gc.collect()
    assert anon_rss() - before < 16 * MIB
    assert memory.returnable_empty((0, 4), torch.float8_e4m3fn).shape == (0, 4)
