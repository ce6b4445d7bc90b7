"""Counting each MoE layer's router picks inside vLLM's workers (LVLLM_EXPERT_STATS).

``RoutingCounter.attach`` gives a MoE runner a counter buffer and wraps its router, so every
path that asks the router (lk, resident layers, streamed prefill) counts, with
lvllm/routing_count.py's op, leaving out the rows vLLM padded the batch with. Start-up's
dummy batches are dropped when the worker is ready (``start``). Files, merging and the
summary: lvllm/expert_stats.py.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch
from vllm.config import get_current_vllm_config

from lvllm import expert_stats
from lvllm.routing_count import count_routed
from lvllm.vllm.gpu_path import padding_rows
from lvllm.vllm.installation import Installation

logger = logging.getLogger("vllm.lvllm")

BUFFER = "lvllm_routed_counts"


class RoutingCounter:
    """One worker's counts of its MoE layers' router picks, and its entry of the file."""

    def __init__(self, path: str, interval_min: float, writer: str, writes: bool, counts: bool | None = None):
        self.path, self.interval_s = Path(path), interval_min * 60
        # Tensor-parallel ranks > 0 see the first rank's picks: they write nothing, and count
        # only for their own hot experts' re-ranking (``counts``).
        self.writer, self.writes = writer, writes
        self.counting = writes if counts is None else counts
        self.runners: dict[int, torch.nn.Module] = {}
        self.model: dict = {}
        self.base: dict[int, list[int]] = {}   # this writer's counts from an earlier run
        self._started = False
        self._stop = threading.Event()

    @classmethod
    def of(cls, installation: Installation) -> RoutingCounter | None:
        """This worker's RoutingCounter (LVLLM_EXPERT_STATS; None without it), made once the
        ranks are known: the first MoE layer asks."""
        settings = installation.settings
        if settings.expert_stats is None:
            return None
        if installation.routing_counter is None:
            from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank

            data_rank = get_current_vllm_config().parallel_config.data_parallel_rank
            installation.routing_counter = cls(
                settings.expert_stats, settings.expert_stats_interval_min,
                writer=f"dp{data_rank}-pp{get_pp_group().rank_in_group}",
                writes=get_tensor_model_parallel_rank() == 0,
                counts=get_tensor_model_parallel_rank() == 0 or settings.hot_experts_update > 0)
        return installation.routing_counter

    def attach(self, runner: torch.nn.Module, layer_index: int, model: dict) -> None:
        """Count the picks of ``runner``'s router from now on."""
        if not self.counting:
            return
        if not self.runners:
            install_worker_hooks()
        runner.register_buffer(BUFFER, torch.zeros(model["num_experts"], dtype=torch.int64),
                               persistent=False)
        runner.lvllm_routing_counter = self
        self.runners[layer_index], self.model = runner, model
        select = runner.router.select_experts

        def select_and_count(*args, **kwargs):
            topk_weights, topk_ids = select(*args, **kwargs)
            count_routed(getattr(runner, BUFFER), topk_ids, padding_rows(topk_ids.shape[0]))
            return topk_weights, topk_ids

        runner.router.select_experts = select_and_count

    def start(self) -> None:
        """The worker is ready: drop start-up's picks, go on from this writer's earlier counts
        (refused when the file is another model's), write every interval."""
        if self._started:
            return
        self._started = True
        for runner in self.runners.values():
            getattr(runner, BUFFER).zero_()
        data = expert_stats.read(self.path)
        if data is not None:
            expert_stats.check_model(data, self.model, self.path)
            layers = data["writers"].get(self.writer, {}).get("layers", {})
            self.base = {int(layer): counts for layer, counts in layers.items()}
        if self.writes and self.interval_s > 0:
            threading.Thread(target=self._write_every_interval, name="lvllm-expert-stats",
                             daemon=True).start()

    def counts(self) -> dict[int, list[int]]:
        """Each attached layer's counts, earlier runs' included."""
        snapshot = {}
        for layer, runner in sorted(self.runners.items()):
            live = getattr(runner, BUFFER).cpu().tolist()
            earlier = self.base.get(layer, [0] * len(live))
            snapshot[layer] = [a + b for a, b in zip(earlier, live)]
        return snapshot

    def live_counts(self, layer_index: int) -> torch.Tensor:
        """The layer's counts since start-up, where its router runs."""
        return getattr(self.runners[layer_index], BUFFER)

    def write(self, final: bool = False) -> None:
        if not self.runners or not self.writes:
            return
        counts = self.counts()
        expert_stats.write(self.path, self.model, self.writer, counts)
        if final and not self._stop.is_set():
            self._stop.set()
            logger.info(expert_stats.summary(counts, self.path))

    def _write_every_interval(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.write()
            except OSError as error:   # a full disk must not stop serving
                logger.warning("lvllm: could not write %s: %s", self.path, error)


def counter_of(worker) -> RoutingCounter | None:
    """The RoutingCounter of a vLLM worker's model (None: not counting)."""
    for module in worker.model_runner.get_model().modules():
        counter = module.__dict__.get("lvllm_routing_counter")
        if counter is not None:
            return counter
    return None


def install_worker_hooks() -> None:
    """In this worker process: counting starts when the worker has warmed up (the last step
    of start-up); the file is written when the worker shuts down in order, and at once on
    ``collective_rpc("lvllm_write_expert_stats")`` (what `vllm serve` asks before it kills
    its engine)."""
    from vllm.v1.worker.worker_base import WorkerBase

    def start_counting(worker):
        counter = counter_of(worker)
        if counter is not None:
            counter.start()

    run_after_in_subclasses(WorkerBase, "compile_or_warm_up_model", start_counting)
    run_after_in_subclasses(WorkerBase, "shutdown", write_expert_stats, before=True)
    WorkerBase.lvllm_write_expert_stats = write_expert_stats


def run_after_in_subclasses(base, name: str, hook, before: bool = False) -> None:
    """``hook(worker)`` after (or before) method ``name`` of ``base`` and of every subclass
    defining its own."""
    for cls in _subclasses(base):
        _run_after(cls, name, hook, before)


def remove_worker_hooks() -> None:
    """The workers' own methods back in place in this process (tests)."""
    from vllm.v1.worker.worker_base import WorkerBase

    for cls in _subclasses(WorkerBase):
        for name, method in list(vars(cls).items()):
            if getattr(method, "_lvllm_hook", False):
                setattr(cls, name, method.lvllm_wraps)
    if "lvllm_write_expert_stats" in vars(WorkerBase):
        del WorkerBase.lvllm_write_expert_stats


def _subclasses(cls) -> list:
    return [cls] + [sub for direct in cls.__subclasses__() for sub in _subclasses(direct)]


def _run_after(cls, name: str, hook, before: bool = False) -> None:
    """Call ``hook(worker)`` after (or before) ``cls``'s own method ``name``, once per class."""
    original = cls.__dict__.get(name)
    if original is None or getattr(original, "_lvllm_hook", False):
        return

    def method(self, *args, **kwargs):
        if before:
            hook(self)
        result = original(self, *args, **kwargs)
        if not before:
            hook(self)
        return result

    method._lvllm_hook = True  # type: ignore[attr-defined]
    method.lvllm_wraps = original  # type: ignore[attr-defined]
    setattr(cls, name, method)


def write_expert_stats(worker) -> None:
    try:
        counter = counter_of(worker)
    except AttributeError:   # a worker shut down before it had a model
        return
    if counter is not None:
        counter.write(final=True)
