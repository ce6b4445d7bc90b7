"""pytest plugin: run the tests against the sanitizer build of lvllm._lk.

The editable install keeps the normal (release) module next to lvllm/__init__.py, and it must
stay there: a sanitizer build can only be loaded into a process that has the ASan runtime
preloaded. For the sanitizer run, `make test-asan` builds a second module under build/lk-asan
and starts pytest with

    LD_PRELOAD="<libasan.so> <libstdc++.so.6>" ASAN_OPTIONS=detect_leaks=0 ASAN_LK_MODULE=<.so> \
        python -m pytest -p lk_asan_loader tests/lk      (with cmake/ on PYTHONPATH)

This plugin is imported before any conftest or test module, loads the file named by
ASAN_LK_MODULE as ``lvllm._lk`` and registers it, so every ``import lvllm._lk`` in the
session gets the sanitizer build. It refuses to run if the module cannot be loaded that way,
so a sanitizer run never silently tests the release build.
"""

from __future__ import annotations

import importlib.util
import os
import sys

MODULE = "lvllm._lk"


def _load() -> str:
    path = os.environ.get("ASAN_LK_MODULE")
    if not path or not os.path.isfile(path):
        raise RuntimeError(f"lk_asan_loader: ASAN_LK_MODULE={path!r} is not a file")
    if MODULE in sys.modules:
        raise RuntimeError(f"lk_asan_loader: {MODULE} was imported before the plugin ran")
    import lvllm

    spec = importlib.util.spec_from_file_location(MODULE, path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"lk_asan_loader: cannot load {path} as {MODULE}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE] = module
    spec.loader.exec_module(module)
    lvllm._lk = module
    return path


_PATH = _load()


def pytest_report_header(config):
    return f"lvllm._lk: sanitizer build {_PATH}"


def pytest_sessionfinish(session, exitstatus):
    loaded = sys.modules.get(MODULE)
    if loaded is None or getattr(loaded, "__file__", None) != _PATH:
        raise RuntimeError(f"lk_asan_loader: {MODULE} was replaced during the session")
