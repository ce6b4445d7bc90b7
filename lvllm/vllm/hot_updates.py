"""LVLLM_HOT_EXPERTS_UPDATE: each lk layer's hot experts re-ranked while serving.

After every engine step of a vLLM worker (its ``execute_model``), ``HotUpdater.step`` maps the
experts whose writes began a step earlier, and every ``every_steps`` steps each layer's
HotRanking reads the layer's running pick counts (the routing statistics buffer, one host read
per layer) and the layer's HotSet begins at most LVLLM_HOT_EXPERTS_SWAPS swaps: a slot leaves
the map at once, its new expert is written meanwhile (on CUDA on a side stream, beside the next
step's forward) and mapped at the next step. Slots and map are fixed tensors, so captured CUDA
graphs stay valid.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from lvllm.hot_experts import HotRanking
from lvllm.hybrid import HotSet

logger = logging.getLogger("vllm.lvllm")
FIRST_SWAPS = "lvllm: hot experts re-ranked, first swaps at step"


class HotUpdater:
    """One worker's re-ranking of its layers' hot experts."""

    def __init__(self, every_steps: int, max_swaps: int, decay: float):
        self.every_steps, self.max_swaps, self.decay = every_steps, max_swaps, decay
        self.layers: dict[int, tuple[HotSet, HotRanking, Callable[[], torch.Tensor]]] = {}
        self.steps = self.swaps = 0

    @classmethod
    def of(cls, installation) -> HotUpdater | None:
        """This worker's HotUpdater (LVLLM_HOT_EXPERTS_UPDATE; None without it), made on the
        first call; ``installation`` an lvllm.vllm.installation.Installation."""
        settings = installation.settings
        if not settings.hot_experts_update:
            return None
        if installation.hot_updater is None:
            installation.hot_updater = cls(settings.hot_experts_update, settings.hot_experts_swaps,
                                           settings.hot_experts_decay)
        return installation.hot_updater

    def add(self, layer_index: int, hot: HotSet, counts: Callable[[], torch.Tensor]) -> None:
        """Re-rank ``hot`` from ``counts()``, the layer's running pick counts."""
        if not self.layers:
            install_worker_hook()
        ranking = HotRanking(hot.slot_of.shape[0], len(hot.experts), self.decay, self.max_swaps)
        self.layers[layer_index] = (hot, ranking, counts)

    def step(self) -> None:
        self.steps += 1
        for hot, _, _ in self.layers.values():
            hot.finish_swaps()
        if self.steps % self.every_steps:
            return
        before = self.swaps
        for layer_index, (hot, ranking, counts) in sorted(self.layers.items()):
            for slot, expert in ranking.swaps(counts().cpu(), hot.experts):
                logger.debug("lvllm: layer %d: hot slot %d: expert %d in place of %d", layer_index, slot, expert,
                             hot.experts[slot])
                hot.begin_swap(slot, expert)
                self.swaps += 1
        if before == 0 and self.swaps:
            logger.info("%s %d: %d swap(s) over %d layer(s), every %d steps from now on (debug log: each)",
                        FIRST_SWAPS, self.steps, self.swaps, len(self.layers), self.every_steps)


def updater_of(worker) -> HotUpdater | None:
    # Deferred: importing this module (the e2e checks read FIRST_SWAPS) imports nothing of vLLM.
    from lvllm.vllm.installation import Installation

    installation = Installation.current
    return HotUpdater.of(installation) if installation is not None else None


def install_worker_hook() -> None:
    """After each ``execute_model`` of this process's workers: the updater's step."""
    from vllm.v1.worker.worker_base import WorkerBase

    from lvllm.vllm.routing_stats import run_after_in_subclasses

    def step(worker):
        updater = updater_of(worker)
        if updater is not None:
            updater.step()

    run_after_in_subclasses(WorkerBase, "execute_model", step)
