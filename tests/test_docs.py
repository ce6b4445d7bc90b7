"""The guide's links: every relative link in README.md, BENCHMARKS.md and docs/ reaches a file
of this tree and, where it names one, a heading of that file (as GitHub renders the anchors)."""

from __future__ import annotations

import re
from pathlib import Path

from tests.helpers import ROOT

LINK = re.compile(r"\[[^\]]*\]\(([^()\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")


def documents(root: Path) -> list[Path]:
    return sorted([root / "README.md", root / "BENCHMARKS.md", *(root / "docs").glob("*.md")])


def prose_lines(text: str) -> list[str]:
    """The lines a reader sees as text: fenced and indented code blocks left out."""
    kept, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced and not line.startswith("    "):
            kept.append(line)
    return kept


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(document: Path) -> set[str]:
    found, seen = set(), {}
    for line in prose_lines(document.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if match:
            base = anchor(match.group(1))
            count = seen.get(base, 0)
            found.add(base if count == 0 else f"{base}-{count}")   # repeated headings get -1, -2, ...
            seen[base] = count + 1
    return found


def broken_links(document: Path, root: Path) -> list[str]:
    broken = []
    text = "\n".join(prose_lines(document.read_text(encoding="utf-8")))   # a link's text may wrap
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):   # http:, https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        reached = (document.parent / path).resolve() if path else document
        if not reached.exists() or root.resolve() not in reached.parents:
            broken.append(f"{document.relative_to(root)}: {target} (no such file in the tree)")
        elif fragment and reached.suffix == ".md" and fragment not in anchors(reached):
            broken.append(f"{document.relative_to(root)}: {target} (no heading '{fragment}')")
    return broken


def test_every_relative_link_resolves():
    docs = documents(ROOT)
    assert len(docs) > 5
    broken = [entry for document in docs for entry in broken_links(document, ROOT)]
    assert broken == []


def test_the_checker_finds_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "BENCHMARKS.md").write_text("# Results\n\n## Whole model\n")
    (tmp_path / "docs" / "guide.md").write_text("# Guide\n\n## Dense layers (`LVLLM_X`)\n\n## Dense layers (`LVLLM_X`)\n")
    (tmp_path / "README.md").write_text(
        "# lvllm\n\n"
        "[ok](BENCHMARKS.md#whole-model) [ok](docs/guide.md#dense-layers-lvllm_x-1) [ok](#lvllm)\n"
        "[web](https://example.com/x.md) [gone](docs/absent.md) [no\nheading](BENCHMARKS.md#load)\n"
        "    [indented code](docs/absent-too.md)\n"
        "```\n[fenced code](docs/absent-too.md)\n```\n")
    found = [entry for document in documents(tmp_path) for entry in broken_links(document, tmp_path)]
    assert found == ["README.md: docs/absent.md (no such file in the tree)",
                     "README.md: BENCHMARKS.md#load (no heading 'load')"]
