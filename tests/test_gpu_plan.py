"""The GPU path's decisions (lvllm.gpu.plan), without a GPU."""

import random

import pytest

from lvllm.gpu.plan import (
    Copy,
    RingSchedule,
    Unpack,
    capture_overlap_warning,
    plan_batch,
)
from lvllm.lk.host_cpus import node_cpus, openmp_team_cpus, parse_cpulist, rank_cpus, usable_numa_nodes


# --------------------------------------------------------------------------------------
# which tokens go where
# --------------------------------------------------------------------------------------

def test_small_batches_captures_and_off_stay_on_lk():
    assert not plan_batch(4096, [4096], min_batch=0, capturing=False).gpu_prefill
    assert not plan_batch(4096, [4096], min_batch=512, capturing=True).gpu_prefill
    assert not plan_batch(300, [1, 1, 298], min_batch=512, capturing=False).gpu_prefill
    assert plan_batch(512, [512], min_batch=512, capturing=False).gpu_prefill


def test_mixed_batch_keeps_decode_rows_on_lk_wherever_they_are():
    # Requests in row order: a decode, a 600-token prefill chunk, two decodes, another chunk.
    plan = plan_batch(1206, [1, 600, 1, 1, 600], min_batch=1000, capturing=False)
    assert plan.gpu_prefill
    assert plan.lk_rows == (0, 601, 602)
    # Prefill tokens are counted without the decodes: 1200 >= 1000, but not >= 1201.
    assert not plan_batch(1206, [1, 600, 1, 1, 600], min_batch=1201, capturing=False).gpu_prefill


def test_padding_rows_follow_the_prefill_rows_uncounted():
    plan = plan_batch(1040, [1, 1000], min_batch=1000, capturing=False)
    assert plan.gpu_prefill and plan.lk_rows == (0,)
    assert not plan_batch(1040, [1, 999], min_batch=1000, capturing=False).gpu_prefill


def test_unknown_request_lengths_count_every_row_as_prefill():
    plan = plan_batch(2048, None, min_batch=1024, capturing=False)
    assert plan.gpu_prefill and plan.lk_rows == ()


def test_speculative_decodes_count_as_decodes_when_asked():
    plan = plan_batch(1003, [3, 1000], min_batch=1000, capturing=False, decode_query_len=3)
    assert plan.lk_rows == (0, 1, 2)


def test_threshold_inside_the_captured_sizes_is_flagged():
    assert capture_overlap_warning(0, 512) is None
    assert capture_overlap_warning(2048, 512) is None
    warning = capture_overlap_warning(256, 512)
    assert "LVLLM_GPU_PREFILL_MIN_BATCH_SIZE=256" in warning and "512" in warning


# --------------------------------------------------------------------------------------
# the prefetch ring, run on a simulated device
# --------------------------------------------------------------------------------------

class SimulatedDevice:
    """Two streams that make progress in a random interleaving, with CUDA's event rule: a
    wait issued on the host waits for the event's latest record issued before it."""

    def __init__(self, slots, seed):
        self.random = random.Random(seed)
        self.streams = {"copy": [], "compute": []}
        self.issued = {}     # event -> records issued
        self.completed = {}  # event -> records completed
        self.slots = [None] * slots
        self.seen = []       # (position, what the unpack read)

    def record(self, stream, event):
        self.issued[event] = self.issued.get(event, 0) + 1
        self.streams[stream].append(("record", event))

    def wait(self, stream, event):
        self.streams[stream].append(("wait", event, self.issued.get(event, 0)))

    def work(self, stream, action):
        self.streams[stream].append(("work", action))

    def run(self, until_idle=True):
        while any(self.streams.values()):
            ready = [name for name, queue in self.streams.items() if queue and self._ready(queue[0])]
            assert ready, "deadlock: both streams wait"
            queue = self.streams[self.random.choice(ready)]
            step = queue.pop(0)
            if step[0] == "record":
                self.completed[step[1]] = self.completed.get(step[1], 0) + 1
            elif step[0] == "work":
                step[1]()
            if not until_idle and self.random.random() < 0.3:
                return

    def _ready(self, step):
        return step[0] != "wait" or self.completed.get(step[1], 0) >= step[2]


def play(schedule, device, forwards=2):
    """Issue what ExpertRing issues for the schedule, letting the device progress at random
    between host steps; every unpack must read its own layer's data."""

    def issue(step, forward):
        if isinstance(step, Copy):
            device.wait("copy", ("unpacked", step.slot))
            device.work("copy", lambda: device.slots.__setitem__(step.slot, (forward, step.position)))
            device.record("copy", ("copied", step.slot))
        else:
            device.wait("compute", ("copied", step.slot))
            device.work("compute", lambda: device.seen.append(((forward, step.position),
                                                               device.slots[step.slot])))
            # The compute stream is done with the slot: poison it.
            device.work("compute", lambda: device.slots.__setitem__(step.slot, "poison"))
            device.record("compute", ("unpacked", step.slot))

    for forward in range(forwards):
        for step in schedule.start():
            issue(step, forward)
        for position in range(schedule.layers):
            for step in schedule.acquire(position):
                issue(step, forward)
            device.run(until_idle=False)
    device.run()
    return device.seen


@pytest.mark.parametrize("window", [1, 2, 3])
@pytest.mark.parametrize("seed", range(20))
def test_ring_never_overwrites_a_slot_before_its_unpack(window, seed):
    schedule = RingSchedule(layers=9, window=window)
    seen = play(schedule, SimulatedDevice(schedule.slots, seed))
    assert [wanted for wanted, _ in seen] == [(f, p) for f in range(2) for p in range(9)]
    assert all(wanted == got for wanted, got in seen)


def test_simulation_catches_a_ring_one_slot_short():
    """The check above can fail: with window slots instead of window + 1, a copy overtakes
    the unpack of the slot's previous layer in some interleaving."""

    class Short(RingSchedule):
        def __init__(self, layers, window):
            super().__init__(layers, window)
            self.slots = window

    broken = 0
    for seed in range(20):
        schedule = Short(layers=9, window=2)
        seen = play(schedule, SimulatedDevice(schedule.slots, seed))
        broken += any(wanted != got for wanted, got in seen)
    assert broken > 0


def test_ring_copies_are_issued_window_layers_ahead():
    schedule = RingSchedule(layers=5, window=2)
    assert schedule.start() == [Copy(0, 0), Copy(1, 1), Copy(2, 2)]
    assert schedule.acquire(0) == [Unpack(0, 0)]
    assert schedule.acquire(1) == [Copy(3, 0), Unpack(1, 1)]
    assert schedule.acquire(2) == [Copy(4, 1), Unpack(2, 2)]
    assert schedule.acquire(3) == [Unpack(3, 0)]
    assert schedule.acquire(4) == [Unpack(4, 1)]


def test_ring_refuses_out_of_order_positions_and_bad_windows():
    schedule = RingSchedule(layers=4, window=1)
    schedule.start()
    schedule.acquire(0)
    with pytest.raises(RuntimeError, match="expected 1, got 2"):
        schedule.acquire(2)
    with pytest.raises(IndexError):
        schedule.acquire(7)
    with pytest.raises(ValueError, match="window must be >= 1"):
        RingSchedule(layers=4, window=0)
    assert RingSchedule(layers=2, window=4).slots == 2  # never more slots than layers


# --------------------------------------------------------------------------------------
# CPUs of a tensor-parallel rank
# --------------------------------------------------------------------------------------

NODES = {0: list(range(0, 8)), 1: list(range(8, 16))}


def test_ranks_sharing_a_node_split_its_cpus():
    shares = [rank_cpus(NODES, 0, [0, 1], rank, range(16)) for rank in (0, 1)]
    assert shares == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert rank_cpus(NODES, 1, [2], 2, range(16)) == list(range(8, 16))


def test_rank_cpus_respect_the_allowed_set_and_unknown_topology():
    assert rank_cpus(NODES, 1, [0], 0, [2, 3, 9, 10]) == [9, 10]
    assert rank_cpus(NODES, None, [0], 0, [5, 1]) == [1, 5]
    assert rank_cpus(NODES, -1, [0], 0, [5, 1]) == [1, 5]
    # The GPU's node has no allowed CPU (a restricted cpuset): use what is allowed.
    assert rank_cpus(NODES, 1, [0], 0, [1, 2]) == [1, 2]


def test_openmp_team_cpus_as_vllm_exports_them():
    assert parse_cpulist("0-3,8 10") == {0, 1, 2, 3, 8, 10}
    assert openmp_team_cpus({"KMP_AFFINITY": "granularity=fine,explicit,proclist=[4-5,7]"}) == {4, 5, 7}
    assert openmp_team_cpus({"GOMP_CPU_AFFINITY": "2,3"}) == {2, 3}
    assert openmp_team_cpus({"OMP_PLACES": "{0-1}"}) == {0, 1}
    assert openmp_team_cpus({"OMP_PLACES": "cores"}) is None
    assert openmp_team_cpus({}) is None
    assert openmp_team_cpus({"GOMP_CPU_AFFINITY": "x"}) is None


def test_numa_nodes_from_sysfs(tmp_path):
    import os

    usable = sorted(os.sched_getaffinity(0))
    for node, cpus in ((0, f"{usable[0]}"), (1, "4096-4097")):
        (tmp_path / f"node{node}").mkdir()
        (tmp_path / f"node{node}" / "cpulist").write_text(cpus + "\n")
    assert node_cpus(tmp_path) == {0: [usable[0]], 1: [4096, 4097]}
    assert usable_numa_nodes(tmp_path) == 1          # node 1 holds none of this process's CPUs
    assert usable_numa_nodes(tmp_path / "absent") == 1
