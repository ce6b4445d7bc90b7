"""Options of the whole suite, and how pytest-xdist splits it (make test: -n 2)."""

import os

import torch

# vLLM reads it once, at import: this process's vLLM names layers with plain strings, as every
# process lvllm's plugin starts does, so that one-rank instances run in it with lk's attention
# table (tests/vllm/e2e_common.py run_llm).
os.environ.setdefault("VLLM_USE_LAYERNAME", "0")

# Modules taking llm_runs' cached vLLM instances (tests/vllm/conftest.py) run as one unit on
# one worker, so that each instance starts once; every other module is a unit of its own (its
# module-scoped instances start once), handed to whichever worker is free; engine tests
# (tests/lk) and the architecture sweeps, whose tests share no instance, go one by one: small
# units that fill both workers at the end. Each worker runs on its own core: a tiny model's
# vLLM instance runs as fast on one core as on two (test_architectures: 58 s against 60),
# while two instances on the same cores slow each other (their OpenMP threads spin on them).
SHARED_INSTANCES = "vllm/shared-instances"
SHARING_LLM_RUNS = {f"vllm/test_{name}.py" for name in ("equivalence", "quantized", "dense", "hot_experts",
                                                        "expert_stats", "two_nodes")}
ONE_TEST_UNITS = ("lk/", "vllm/test_architectures.py", "vllm/test_architectures_vllm.py")
# Units started first, longest first (as measured), so that no long one starts last.
LONGEST_FIRST = [SHARED_INSTANCES, "vllm/test_families.py", "vllm/test_drafts.py", "test_pip_install.py",
                 "vllm/test_server.py", "vllm/test_shutdown.py"]


def work_unit(nodeid: str) -> str:
    """The unit of scheduling a test belongs to (xdist's scope)."""
    module = nodeid.split("::", 1)[0].removeprefix("tests/")
    if module in SHARING_LLM_RUNS:
        return SHARED_INSTANCES
    return nodeid if module.startswith(ONE_TEST_UNITS) else module


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class WorkUnits(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return WorkUnits(config, log)


def pytest_addoption(parser):
    parser.addoption("--sigterms", type=int, default=2,
                     help="servers stopped with SIGTERM under open streams in tests/vllm/test_shutdown.py")
    parser.addoption("--fuzz-seconds", type=float, default=20.0,
                     help="time budget of tests/lk/test_fuzz.py (it runs at least one case)")
    parser.addoption("--fuzz-seed", type=int, default=0, help="first seed of tests/lk/test_fuzz.py")


def pytest_configure(config):
    """An xdist worker keeps to its share of the cores (its children, vLLM's included, too)."""
    workers = getattr(config, "workerinput", {}).get("workercount", 1)
    cpus = sorted(os.sched_getaffinity(0))
    if workers > 1 and len(cpus) >= workers:
        index = int(config.workerinput["workerid"].removeprefix("gw"))
        os.sched_setaffinity(0, cpus[index::workers])
        torch.set_num_threads(len(cpus[index::workers]))


def pytest_collection_modifyitems(config, items):
    """The longest units first (xdist queues units in the order of their first test)."""
    rank = {unit: index for index, unit in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(work_unit(item.nodeid), len(rank)))
