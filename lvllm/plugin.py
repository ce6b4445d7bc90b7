"""vLLM general plugin entry point (``vllm.general_plugins``: ``lvllm = lvllm.plugin:register``).

vLLM calls ``register()`` once per process: API server, EngineCore and every worker.
It reads every LVLLM_* / LK_* variable first (lvllm.settings), so a bad value stops start-up
with a message naming the variable (an exception raised here propagates out of vLLM's
``load_general_plugins``; only a failing *import* of this module is merely logged).
In the engine and workers spawned from lvllm's ``vllm`` command it also ignores Ctrl-C
(lvllm.vllm.command.ignore_interrupts_in_engine). With ``LVLLM_MOE_NUMA_ENABLED=0`` (the
default) nothing else happens and vLLM runs as upstream; with 1 lvllm is installed into vLLM
(lvllm.vllm).
"""

from __future__ import annotations

from lvllm.settings import Settings
from lvllm.vllm import command


def register() -> None:
    settings = Settings.from_env()
    command.ignore_interrupts_in_engine()
    if not settings.enabled:
        return
    from lvllm.vllm.hooks import install

    install(settings)
