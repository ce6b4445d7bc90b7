"""Options of the whole suite."""


def pytest_addoption(parser):
    parser.addoption("--sigterms", type=int, default=2,
                     help="servers stopped with SIGTERM under open streams in tests/vllm/test_shutdown.py")
    parser.addoption("--fuzz-seconds", type=float, default=20.0,
                     help="time budget of tests/lk/test_fuzz.py (it runs at least one case)")
    parser.addoption("--fuzz-seed", type=int, default=0, help="first seed of tests/lk/test_fuzz.py")
