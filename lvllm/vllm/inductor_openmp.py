"""Inductor's CPU kernels open their OpenMP region only when a shared loop has work for two
threads (LVLLM_CPU_SERIAL_ONE_ITERATION, lk on, CPU build).

At one token a step, most of inductor's kernels in vLLM's compiled forward share out a loop over
the tokens: one iteration, which one thread of the team runs while the region still wakes the
others and waits for them (#72). Each kernel's `#pragma omp parallel` gets an OpenMP `if` clause:
the region runs as before when any of its `omp for` loops has two iterations or more, and on the
calling thread alone otherwise, which is what the team did with it. The code inside is the same,
so results are the same bits. Regions whose loops cannot be read, whose bounds are not the
kernel's own integer arguments and literals, or whose code asks which thread runs it (beyond a
parallel reduction's slot) are left as inductor wrote them.
"""

from __future__ import annotations

import re

import torch
from torch._inductor.codegen import cpp as inductor_cpp
from vllm.platforms import current_platform

from lvllm.vllm.installation import Installation

CACHE_TAG = "lvllm-serial-one-iteration"

_PARALLEL = re.compile(r"^\s*#pragma omp parallel\b(.*)$")
_FOR_PRAGMA = re.compile(r"^\s*#pragma omp for\b(.*)$")
_COLLAPSE = re.compile(r"\bcollapse\((\d+)\)")
_LOOP = re.compile(r"^\s*for\(int64_t (\w+)=(.+?); \1<(.+?); \1\+=(.+)\)\s*$")
_INTEGER_ARGUMENT = re.compile(r"\bconst int64_t (\w+)\b")
_IDENTIFIER = re.compile(r"\b[A-Za-z_]\w*\b")
# Names inductor's index expressions use besides the kernel's arguments.
_EXPRESSION_NAMES = frozenset({"static_cast", "int64_t", "c10", "div_floor_integer", "std", "max", "min"})


def install(installation: Installation) -> None:
    """Rewrite the kernels inductor generates from now on in this process (CPU build, setting on);
    the newest installation decides, and otherwise inductor's own code generation is back."""
    generate = uninstall()
    if not (current_platform.is_cpu() and installation.settings.serial_one_iteration):
        return

    def codegen_group(group, *args, **kwargs):
        return serial_one_iteration(generate(group, *args, **kwargs))

    codegen_group.lvllm_wraps = generate
    inductor_cpp.KernelGroup.codegen_group = codegen_group
    installation.log_once("serial_one_iteration", "lvllm: inductor's OpenMP regions open only when a shared "
                          "loop has two iterations or more (LVLLM_CPU_SERIAL_ONE_ITERATION=1)")
    # Inductor's caches key compiled graphs by their inputs and config, not by this rewrite.
    tags = torch.compiler.config.cache_key_tag.split(",") if torch.compiler.config.cache_key_tag else []
    if CACHE_TAG not in tags:
        torch.compiler.config.cache_key_tag = ",".join([*tags, CACHE_TAG])


def uninstall():
    """Inductor's own kernel code generation back in place (and the cache tag removed); returns it."""
    generate = inductor_cpp.KernelGroup.codegen_group
    generate = getattr(generate, "lvllm_wraps", generate)
    inductor_cpp.KernelGroup.codegen_group = generate
    tags = [tag for tag in torch.compiler.config.cache_key_tag.split(",") if tag and tag != CACHE_TAG]
    torch.compiler.config.cache_key_tag = ",".join(tags)
    return generate


def serial_one_iteration(source: str) -> str:
    """The kernel source with an OpenMP `if` clause on every region it can bound."""
    arguments = set(_INTEGER_ARGUMENT.findall(source))
    lines = source.split("\n")
    for index, line in enumerate(lines):
        match = _PARALLEL.match(line)
        if not match or re.search(r"\bif\s*\(", match.group(1)):
            continue
        condition = _more_than_one_iteration(lines, index, arguments)
        if condition:
            lines[index] = f"{line.rstrip()} if({condition})"
    return "\n".join(lines)


def _more_than_one_iteration(lines: list[str], pragma: int, arguments: set[str]) -> str | None:
    """C++ true when some `omp for` of the region opened at lines[pragma] has two iterations or
    more; None when the region has no such loop or one of them cannot be read."""
    body = _region(lines, pragma)
    if body is None or _shares_work_by_hand(lines[body.start:body.stop]):
        return None
    conditions = []
    position = body.start
    while position < body.stop:
        match = _FOR_PRAGMA.match(lines[position])
        position += 1
        if not match:
            continue
        collapse = _COLLAPSE.search(match.group(1))
        for _ in range(int(collapse.group(1)) if collapse else 1):
            while position < body.stop and lines[position].strip() == "{":
                position += 1
            loop = _LOOP.match(lines[position]) if position < body.stop else None
            if loop is None:
                return None
            _, offset, size, step = loop.groups()
            if not all(_bounded_by(expression, arguments) for expression in (offset, size, step)):
                return None
            conditions.append(f"(({offset}) + ({step}) < ({size}))")
            position += 1
    return " || ".join(conditions) or None


def _region(lines: list[str], pragma: int) -> range | None:
    """The lines inside the braces that follow the pragma, or None if no block follows it."""
    start = pragma + 1
    if start >= len(lines) or lines[start].strip() != "{":
        return None
    depth = 0
    for index in range(start, len(lines)):
        depth += lines[index].count("{") - lines[index].count("}")
        if depth == 0:
            return range(start + 1, index)
    return None


def _shares_work_by_hand(body: list[str]) -> bool:
    """Whether the region's code asks which thread runs it beyond a parallel reduction's slot:
    such code may split its work by a fixed team size, which one thread would not cover."""
    for line in body:
        if line.strip() == "int tid = omp_get_thread_num();":
            continue
        if re.search(r"\bomp_get_\w+", line) or re.search(r"\btid\b", line.replace("_arr[tid]", "")):
            return True
    return False


def _bounded_by(expression: str, arguments: set[str]) -> bool:
    """Whether the expression names only the kernel's integer arguments and index helpers."""
    return all(name in arguments or name in _EXPRESSION_NAMES for name in _IDENTIFIER.findall(expression))
