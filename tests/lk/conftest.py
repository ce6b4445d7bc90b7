import pytest

from lvllm.lk import make_runtime


@pytest.fixture(scope="session")
def runtimes():
    """runtimes(threads=2, isa="", numa_nodes=0, workers="OWN"): one shared runtime per
    configuration."""
    cache = {}

    def get(threads=2, isa="", numa_nodes=0, workers="OWN"):
        key = (threads, isa, numa_nodes, workers)
        if key not in cache:
            cache[key] = make_runtime(threads=threads, binding="CPU_CORE", power_saving=False, isa=isa,
                                      numa_nodes=numa_nodes, workers=workers)
        return cache[key]

    return get
