"""Lists of layers (and CPUs) written as users write them, '0-2,5,8-9'; envs.layer_spec reads them
(envs.py stays loadable on its own, by path, for setup.py)."""

from __future__ import annotations


def format_ranges(values) -> str:
    """[0, 1, 2, 5, 8, 9] -> '0-2,5,8-9', the syntax layer_spec reads (also for CPU lists);
    empty -> 'none'."""
    ordered = sorted(set(values))
    if not ordered:
        return "none"
    parts, start, prev = [], ordered[0], ordered[0]
    for index in ordered[1:] + [None]:
        if index is not None and index == prev + 1:
            prev = index
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if index is not None:
            start = prev = index
    return ",".join(parts)
