"""vLLM general plugin entry point (``vllm.general_plugins``: ``lvllm = lvllm.plugin:register``).

vLLM calls ``register()`` once per process: API server, EngineCore and every worker.
It checks every LVLLM_* / LK_* variable first, so a bad value stops start-up with a
message naming the variable (an exception raised here propagates out of vLLM's
``load_general_plugins``; only a failing *import* of this module is merely logged).
With ``LVLLM_MOE_NUMA_ENABLED=0`` (the default) nothing else happens and vLLM runs as
upstream; with 1 the MoE classes are swapped (lvllm.vllm_adapter).
"""

from __future__ import annotations

from lvllm import envs


def register() -> None:
    envs.validate_all()
    if not envs.get("LVLLM_MOE_NUMA_ENABLED"):
        return
    from lvllm import vllm_adapter

    vllm_adapter.install()
