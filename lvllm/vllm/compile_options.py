"""vLLM's CPU forward compiled with inductor's C++ wrapper (LVLLM_CPU_CPP_WRAPPER, lk on).

inductor's default wrapper is Python: every decode step runs a line of it per kernel and op of
every layer (#72). Its C++ wrapper calls them from C++, but cannot pass the opaque objects vLLM
names layers with on torch >= 2.11 ("arg type PyObject is not yet supported by
custom_op_wrapper"); VLLM_USE_LAYERNAME=0 makes them plain strings, and vLLM reads it once, at
import, before plugins load. So lvllm sets it for the processes started after its plugin loads
(the engine core and workers of `vllm serve` and of `LLM`), and asks for the C++ wrapper in a
process whose vLLM took string layer names, when the model's compile wrapper is made.
"""

from __future__ import annotations

import os

from vllm.compilation.wrapper import TorchCompileWithNoGuardsWrapper
from vllm.config import get_current_vllm_config
from vllm.platforms import current_platform
from vllm.utils import torch_utils

from lvllm.vllm.installation import Installation

LAYER_NAME_VARIABLE = "VLLM_USE_LAYERNAME"


def install(installation: Installation) -> None:
    """Wrap the compile wrapper's construction (CPU build with LVLLM_CPU_CPP_WRAPPER=1); the
    newest installation decides, and otherwise vLLM's own is left in place."""
    vllm_init = uninstall()
    if not (current_platform.is_cpu() and installation.settings.cpp_wrapper):
        return
    use_string_layer_names()

    def init(wrapper, *args, **kwargs):
        choose_wrapper(installation, get_current_vllm_config().compilation_config)
        vllm_init(wrapper, *args, **kwargs)

    init.lvllm_wraps = vllm_init
    TorchCompileWithNoGuardsWrapper.__init__ = init


def use_string_layer_names() -> None:
    """Plain string layer names for the processes started from now on (a user's value kept)."""
    os.environ.setdefault(LAYER_NAME_VARIABLE, "0")


def uninstall():
    """vLLM's own construction back in place; returns it."""
    vllm_init = getattr(TorchCompileWithNoGuardsWrapper.__init__, "lvllm_wraps",
                        TorchCompileWithNoGuardsWrapper.__init__)
    TorchCompileWithNoGuardsWrapper.__init__ = vllm_init
    return vllm_init


def choose_wrapper(installation: Installation, compilation_config) -> None:
    """The C++ wrapper for an inductor compile where this process's layer names are strings;
    installation.compile_wrapper records which wrapper the model compiles with."""
    if compilation_config.backend != "inductor":
        return
    if torch_utils.LayerNameType is str:
        compilation_config.inductor_compile_config["cpp_wrapper"] = True
        installation.compile_wrapper = "cpp"
        installation.log_once("cpp_wrapper", "lvllm: torch.compile with inductor's C++ wrapper "
                              "(LVLLM_CPU_CPP_WRAPPER=1)")
        return
    installation.compile_wrapper = "python"
    installation.log_once(
        "cpp_wrapper", "lvllm: torch.compile keeps inductor's Python wrapper: this process's vLLM names layers "
        "with opaque objects, which the C++ wrapper cannot pass (vLLM reads %s when it is imported, before "
        "lvllm loads); set %s=0 before the process starts, or LVLLM_CPU_CPP_WRAPPER=0",
        LAYER_NAME_VARIABLE, LAYER_NAME_VARIABLE)
