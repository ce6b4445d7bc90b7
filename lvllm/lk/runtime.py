"""The lk runtime (worker threads, kernels, scratch) every engine of a process shares."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import torch

from lvllm import _lk, envs
from lvllm.settings import LkSettings, default_threads

logger = logging.getLogger("lvllm")
_oversubscription_warned: set[tuple[int, int]] = set()
_lock = threading.Lock()
_default: tuple[_lk.Runtime, LkSettings] | None = None


def default_runtime(auto_workers: str = "OWN", settings: LkSettings | None = None) -> _lk.Runtime:
    """The process's runtime, created from ``settings`` (None: the LK_* variables) on first
    use; ``auto_workers`` is what LK_WORKERS=AUTO means for the caller (OWN or OPENMP). A
    later call that gives other settings is refused: the runtime cannot change under engines."""
    global _default
    with _lock:
        if _default is None:
            settings = settings or LkSettings.from_env()
            _default = make_runtime(workers=resolve_workers(auto_workers, settings),
                                    settings=settings), settings
        elif settings is not None and settings != _default[1]:
            raise RuntimeError(f"lk's runtime of this process was made from {_default[1]}; "
                               f"it cannot be made again from {settings}")
        return _default[0]


def resolve_workers(auto: str, settings: LkSettings) -> str:
    """LK_WORKERS with AUTO replaced by ``auto``."""
    return auto if settings.workers == "AUTO" else settings.workers


def make_runtime(
    threads: int | None = None,
    binding: str | None = None,
    power_saving: bool | None = None,
    isa: str | None = None,
    numa_nodes: int | None = None,
    workers: str | None = None,
    settings: LkSettings | None = None,
) -> _lk.Runtime:
    """A runtime; arguments left None come from ``settings`` (None: the LK_* variables;
    LK_WORKERS=AUTO: OWN).

    ``workers="OPENMP"`` runs every job on the calling thread's OpenMP team (torch's
    runtime), by default as many threads as torch uses."""
    settings = settings or LkSettings.from_env()
    workers = workers or resolve_workers("OWN", settings)
    if threads is None:
        threads = settings.threads or (
            torch.get_num_threads() if workers == "OPENMP" else default_threads())
    binding = binding if binding is not None else settings.binding
    power_saving = power_saving if power_saving is not None else settings.power_saving
    isa = isa if isa is not None else settings.isa
    numa_nodes = numa_nodes if numa_nodes is not None else (settings.numa_nodes or 0)
    _warn_oversubscription(threads)
    try:
        return _lk.Runtime(threads, binding, power_saving, isa, numa_nodes, workers)
    except ValueError as error:
        if "ISA" in str(error):
            raise envs.EnvError(f"LK_ISA={isa!r}: {error}") from None
        raise
    except RuntimeError as error:   # a worker thread could not be created (std::system_error)
        raise envs.EnvError(f"lk could not start {threads} worker threads ({error}); lower LK_THREADS "
                            f"(now {os.environ.get('LK_THREADS', 'unset')}; valid: "
                            f"{envs.VARIABLES['LK_THREADS'].valid})") from None


def _warn_oversubscription(threads: int) -> None:
    cpus = envs.usable_cpus()
    if threads > cpus and (threads, cpus) not in _oversubscription_warned:
        _oversubscription_warned.add((threads, cpus))
        logger.warning("lk: %d threads on the %d CPU(s) this process may use (LK_THREADS): the extra "
                       "threads only take turns on the same cores", threads, cpus)


def runtime_info() -> dict[str, Any]:
    runtime = default_runtime()
    return {
        "isa": runtime.isa,
        "threads": runtime.threads,
        "workers": runtime.workers,
        "numa_nodes": runtime.numa_nodes,
        "cpus": runtime.cpus,
        "virtual_nodes": runtime.virtual_nodes,
        "binding": _default[1].binding,
        "description": runtime.describe(),
    }
