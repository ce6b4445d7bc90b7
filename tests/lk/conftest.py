import pytest

from lvllm.lk import make_runtime


@pytest.fixture(scope="session")
def runtimes():
    """runtimes(threads=2, isa="", numa_nodes=0): one shared runtime per configuration."""
    cache = {}

    def get(threads=2, isa="", numa_nodes=0):
        key = (threads, isa, numa_nodes)
        if key not in cache:
            cache[key] = make_runtime(threads=threads, binding="CPU_CORE", power_saving=False, isa=isa,
                                      numa_nodes=numa_nodes)
        return cache[key]

    return get
