"""Routing statistics: how many tokens each MoE layer sent to each of its experts.

The file ``LVLLM_EXPERT_STATS`` names is JSON users keep and pass on::

    {"format": "lvllm-expert-stats", "version": 1,
     "model": {"name": ..., "architectures": [...], "num_hidden_layers": L, "top_k": k},
     "writers": {"dp0-pp0": {"updated": "2026-11-27T05:00:00+00:00",
                             "layers": {"3": [count of expert 0, count of expert 1, ...], ...}},
                 ...}}

A count is one (token, expert) pick of the router. Each process that counts owns one writer
entry (its data-parallel rank and pipeline stage; tensor-parallel ranks see the same picks and
only the first writes); a layer's counts are the sum over the writers holding it. Writers
replace only their own entry, under a lock, so the stages of one server share one file, and a
restarted server goes on from its own entry.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

FORMAT = "lvllm-expert-stats"
VERSION = 1
HOT_SHARE = 0.10   # the summary's "hottest" experts: this share of each layer's


class StatsFileError(ValueError):
    """The statistics file cannot be used for this model; the message says why."""


def _lock(path: Path):
    handle = open(path.with_name(path.name + ".lock"), "a+")
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def read(path: Path) -> dict | None:
    """The file's content, None when there is no file; StatsFileError when it is not one."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise StatsFileError(f"{path} is not a routing statistics file: {error}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
        raise StatsFileError(f"{path} is not a routing statistics file (format {FORMAT!r}, "
                             f"version {VERSION})")
    return data


def check_model(data: dict, model: dict, path: Path) -> None:
    """Refuse statistics written for another model (name aside: a moved checkpoint is the same)."""
    theirs = data.get("model", {})
    for key, value in model.items():
        if key != "name" and theirs.get(key) != value:
            raise StatsFileError(f"{path} holds statistics of another model: its {key} is "
                                 f"{theirs.get(key)!r}, this model's {value!r} (model "
                                 f"{theirs.get('name')!r}); give another path or remove the file")


def layer_totals(data: dict) -> dict[int, list[int]]:
    """Each layer's counts summed over the writers holding it."""
    totals: dict[int, list[int]] = {}
    for writer in data.get("writers", {}).values():
        for layer, counts in writer.get("layers", {}).items():
            into = totals.setdefault(int(layer), [0] * len(counts))
            for expert, count in enumerate(counts):
                into[expert] += int(count)
    return totals


def write(path: Path, model: dict, writer: str, layers: dict[int, list[int]]) -> None:
    """Replace ``writer``'s entry of the file at ``path`` by ``layers`` (atomically, locked)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = _lock(path)
    try:
        data = read(path) or {"format": FORMAT, "version": VERSION, "writers": {}}
        data["model"] = model
        data["writers"][writer] = {
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "layers": {str(layer): counts for layer, counts in sorted(layers.items())}}
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as file:
            json.dump(data, file)
        os.replace(temporary, path)
    finally:
        lock.close()


def hot_share(layers: dict[int, list[int]], share: float = HOT_SHARE) -> tuple[int, float]:
    """(experts per layer counted as hot, the share of all picks they took): the hottest
    ``share`` of each layer's experts (at least one), summed over the layers."""
    experts = max((len(counts) for counts in layers.values()), default=0)
    per_layer = max(1, math.ceil(share * experts)) if experts else 0
    return per_layer, device_share(layers, per_layer)


def hottest(counts: list[int], n: int) -> list[int]:
    """The ``n`` most picked experts (the lower index first among equals), in index order."""
    ranked = sorted(range(len(counts)), key=lambda e: (-counts[e], e))
    return sorted(ranked[:n])


def device_share(layers: dict[int, list[int]], slots: int) -> float:
    """The share of all picks that fall on each layer's ``slots`` most picked experts."""
    hot = sum(sum(counts[e] for e in hottest(counts, slots)) for counts in layers.values())
    picks = sum(sum(counts) for counts in layers.values())
    return hot / picks if picks else 0.0


def summary(layers: dict[int, list[int]], path: Path) -> str:
    experts = max((len(counts) for counts in layers.values()), default=0)
    per_layer, share = hot_share(layers)
    picks = sum(sum(counts) for counts in layers.values())
    return (f"lvllm: routing statistics of {len(layers)} MoE layer(s), {picks} token-expert picks: "
            f"the hottest {HOT_SHARE:.0%} of experts ({per_layer} of {experts} per layer) took "
            f"{share:.0%} of them; written to {path}")
