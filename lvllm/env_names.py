"""Which environment names look like lvllm's but are not declared (typos), for lvllm.envs."""

from __future__ import annotations

from typing import Iterable


def _edit_distance(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def nearest(key: str, declared: Iterable[str]) -> str | None:
    """The declared name ``key`` most likely misspells: within 2 edits of it whatever the
    case (1 for names shorter than 8 characters), else None."""
    upper = key.upper()
    best = min(declared, key=lambda name: _edit_distance(upper, name))
    distance = _edit_distance(upper, best)
    return best if 0 < distance <= (2 if len(best) >= 8 else 1) or (distance == 0 and key != best) else None


def _vllm_variables() -> frozenset[str]:
    """vLLM's own variables (VLLM_TARGET_DEVICE is one edit from ours), where vLLM is here."""
    try:
        from vllm.envs import environment_variables
    except ImportError:
        return frozenset()
    return frozenset(environment_variables)


def unknown_names(environ: Iterable[str], declared: Iterable[str]) -> list[str]:
    """The names in ``environ`` with our prefixes (LVLLM_, LK_, any case) or a near miss of a
    declared one, that are neither declared nor vLLM's, each with its likely meaning."""
    declared, theirs = list(declared), _vllm_variables()
    hints = []
    for key in sorted(environ):
        if key in declared or key in theirs:
            continue
        near = nearest(key, declared)
        if key.upper().startswith(("LVLLM_", "LK_")) or near is not None:
            hints.append(f"{key} (did you mean {near}?)" if near else key)
    return hints
