"""lk's torch ops (lk_moe_forward, lk_linear) with C++ kernels in front of their Python ones.

A compiled step's C++ wrapper calls these ops through the dispatcher three times a layer; each
Python kernel costs ~9 us there, most of it entering Python. The C++ kernels (csrc/lk_torch,
in lvllm/_torch_ops*.so) check the arguments as the Python ones do and run the engines through
lk's C entry points. While installed, every live engine of both registries is mirrored into
the kernels' table by id, and each new one as it is created; an engine's entry goes with it.

    from lvllm.lk import native_ops
    reason = native_ops.install()   # None once installed; else why the Python kernels stay
    native_ops.calls()              # forwards the C++ kernels ran, or None
    native_ops.totals()             # tensor [MoE forwards, ns, dense forwards, ns], or None
    native_ops.uninstall()          # the Python kernels back
"""

from __future__ import annotations

import weakref

import torch

from lvllm import _lk, torch_library
from lvllm.lk import _engines as moe_engines
from lvllm.lk.linear import _engines as linear_engines

_table = None  # the installed kernels' table (torch.classes.lvllm_cpu.LkOps)


def _add_moe(table, engine_id: int, engine) -> None:
    table.add_moe(engine_id, engine._native.address, engine.hidden_size)
    weakref.finalize(engine, table.remove_moe, engine_id).atexit = False


def _add_linear(table, engine_id: int, engine) -> None:
    table.add_linear(engine_id, engine._native.address, engine.inputs, engine.outputs)
    weakref.finalize(engine, table.remove_linear, engine_id).atexit = False


_REGISTRIES = ((moe_engines, _add_moe), (linear_engines, _add_linear))


def install() -> str | None:
    """Puts the C++ kernels in front (again, with a fresh table); returns None, or why they
    cannot run in this process."""
    global _table
    uninstall()
    if not torch_library.loaded():
        return torch_library.MISSING
    table = torch.classes.lvllm_cpu.LkOps(_lk.c_api_address())
    for registry, add in _REGISTRIES:
        for engine_id, engine in registry.items():
            add(table, engine_id, engine)
        registry.on_add = lambda engine_id, engine, add=add: add(table, engine_id, engine)
    with torch_library.overriding_kernels():
        table.install()
    _table = table
    return None


def uninstall() -> None:
    global _table
    for registry, _ in _REGISTRIES:
        registry.on_add = None
    if _table is not None:
        _table.uninstall()
        _table = None


def calls() -> int | None:
    """Forwards the C++ kernels ran since install; None while they are not installed."""
    return None if _table is None else int(_table.totals()[::2].sum())


def totals() -> torch.Tensor | None:
    """[MoE forwards, their ns, dense forwards, their ns] since install, an int64 tensor the C++
    kernels update in place (reading it calls nothing): lk's share of a step, which no Python
    sees; None while they are not installed."""
    return None if _table is None else _table.totals()
