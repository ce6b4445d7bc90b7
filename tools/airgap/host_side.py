"""The GPU host's side of the wheelhouse (standard library only): receive parts, unpack them
as they arrive, install the wheels into a venv over the host's python.

The wheelhouse is one xz-compressed tar stream of every wheel's unzipped files (member names
``<wheel file name>/<path in the wheel>``), cut into parts. ``follow`` reads the parts in order,
waiting for each to arrive, so decompression and installation run while later parts are still
in transfer; only the last part's wheels are left for the final step.
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import os
import queue
import re
import shutil
import subprocess
import tarfile
import threading
import time
import zipfile
from pathlib import Path

MANIFEST = "manifest.json"
CHUNK = 1 << 20
FOLLOW_STATE = "follow.json"


class AirgapError(Exception):
    """A step that cannot go on; the message says what is missing or wrong."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    if not path.exists():
        raise AirgapError(f"no {MANIFEST} in {directory}: it travels with the first transfer")
    return json.loads(path.read_text())


def receive(incoming: Path, parts: Path) -> list[str]:
    """Move every arrived part (and the manifest) from ``incoming`` into ``parts``, checking
    each part's hash on arrival; returns the parts still missing."""
    parts.mkdir(parents=True, exist_ok=True)
    incoming.mkdir(parents=True, exist_ok=True)
    if (incoming / MANIFEST).exists():
        shutil.copyfile(incoming / MANIFEST, parts / f".{MANIFEST}.tmp")
        os.replace(parts / f".{MANIFEST}.tmp", parts / MANIFEST)
    manifest = load_manifest(parts)
    expected = {p["name"]: p for p in manifest["parts"]}
    for arrived in sorted(incoming.iterdir()):
        if arrived.name == MANIFEST:
            continue
        part = expected.get(arrived.name)
        if part is None:
            raise AirgapError(f"{arrived} is not a part of this wheelhouse (its parts: "
                              f"{manifest['parts'][0]['name']} .. {manifest['parts'][-1]['name']})")
        if arrived.stat().st_size != part["bytes"] or sha256(arrived) != part["sha256"]:
            raise AirgapError(f"{arrived.name} arrived damaged (size or SHA-256 differs): send it again")
        # Copied then renamed: the follower sees a part whole or not at all.
        shutil.copyfile(arrived, parts / f".{arrived.name}.tmp")
        os.replace(parts / f".{arrived.name}.tmp", parts / arrived.name)
    return [name for name in expected if not (parts / name).exists()]


class PartsReader(io.RawIOBase):
    """The parts as one byte stream; a part not there yet is waited for, up to ``wait_s``."""

    def __init__(self, parts: Path, names: list[str], wait_s: float):
        self.parts, self.names, self.wait_s = parts, names, wait_s
        self.index, self.file = 0, None

    def readable(self) -> bool:
        return True

    def _open_next(self) -> bool:
        if self.index == len(self.names):
            return False
        path = self.parts / self.names[self.index]
        deadline = time.monotonic() + self.wait_s
        while not path.exists():
            if time.monotonic() > deadline:
                raise AirgapError(f"{path.name} did not arrive within {self.wait_s:.0f} s")
            time.sleep(0.2)
        self.file = path.open("rb")
        return True

    def readinto(self, buffer) -> int:
        while True:
            if self.file is None and not self._open_next():
                return 0
            count = self.file.readinto(buffer)
            if count:
                return count
            self.file.close()
            self.file, self.index = None, self.index + 1


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def site_packages(python: str) -> list[str]:
    code = "import site, sys; print('\\n'.join([*site.getsitepackages(), site.getusersitepackages()]))"
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line and Path(line).is_dir()]


def make_venv(venv: Path, python: str) -> None:
    """A venv whose own packages come first and the host python's after: a .pth file rather
    than --system-site-packages, which reaches only the base interpreter's packages when the
    host's python is itself a venv. Its pip is the host's, seen through that file (a python
    without ensurepip makes no venv with pip)."""
    if venv_python(venv).exists():
        return
    subprocess.run([python, "-m", "venv", "--without-pip", str(venv)], check=True)
    own = site_packages(str(venv_python(venv)))[0]
    (Path(own) / "airgap_host_packages.pth").write_text("\n".join(site_packages(python)) + "\n")


def install_wheels(venv: Path, wheels: list[Path]) -> None:
    subprocess.run([str(venv_python(venv)), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet",
                    "--disable-pip-version-check", *map(str, wheels)], check=True)


class Installer(threading.Thread):
    """Installs finished wheels in batches while the stream goes on."""

    def __init__(self, venv: Path):
        super().__init__(daemon=True)
        self.venv, self.todo, self.installed, self.error = venv, queue.Queue(), [], None

    def run(self) -> None:
        done = False
        while not done:
            batch = [self.todo.get()]
            while not self.todo.empty():
                batch.append(self.todo.get())
            done = batch[-1] is None
            wheels = [w for w in batch if w is not None]
            if wheels and self.error is None:
                try:
                    install_wheels(self.venv, wheels)
                    self.installed += [w.name for w in wheels]
                except subprocess.CalledProcessError as error:
                    self.error = f"pip could not install {', '.join(w.name for w in wheels)}: {error}"


def rezip(tar: tarfile.TarFile, first: tarfile.TarInfo, wheels: Path) -> tuple[Path, tarfile.TarInfo | None]:
    """Write the wheel whose files start at ``first`` back as a wheel (stored, not deflated:
    pip reads either); returns it and the first member of the next wheel."""
    name = first.name.split("/", 1)[0]
    target = wheels / name
    partial = wheels / f".{name}.tmp"
    member = first
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        while member is not None and member.name.split("/", 1)[0] == name:
            info = zipfile.ZipInfo(member.name.split("/", 1)[1], time.gmtime(member.mtime)[:6])
            info.external_attr = (member.mode & 0xFFFF | 0o100000) << 16   # pip keeps the exec bit
            info.file_size = member.size
            with archive.open(info, "w", force_zip64=member.size >= 1 << 31) as out:
                shutil.copyfileobj(tar.extractfile(member), out, CHUNK)
            member = tar.next()
    os.replace(partial, target)
    return target, member


def follow(directory: Path, python: str, wait_s: float) -> dict:
    """Unpack and install the wheelhouse as its parts arrive; the state goes to follow.json."""
    parts, wheels, venv = directory / "parts", directory / "wheels", directory / "venv"
    state_path = directory / FOLLOW_STATE
    started = time.monotonic()
    state = {"status": "running", "pid": os.getpid(), "wheels": [], "seconds": 0.0}
    directory.mkdir(parents=True, exist_ok=True)

    def save(**changes) -> None:
        state.update(changes, seconds=round(time.monotonic() - started, 1))
        state_path.write_text(json.dumps(state, indent=1))

    save()
    try:
        deadline = time.monotonic() + wait_s
        while not (parts / MANIFEST).exists():
            if time.monotonic() > deadline:
                raise AirgapError(f"no {MANIFEST} in {parts} within {wait_s:.0f} s")
            time.sleep(0.2)
        manifest = load_manifest(parts)
        wheels.mkdir(parents=True, exist_ok=True)
        make_venv(venv, python)
        installer = Installer(venv)
        installer.start()
        reader = io.BufferedReader(PartsReader(parts, [p["name"] for p in manifest["parts"]], wait_s), CHUNK)
        with lzma.open(reader) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            member = tar.next()
            while member is not None:
                wheel, member = rezip(tar, member, wheels)
                installer.todo.put(wheel)
                save(wheels=state["wheels"] + [wheel.name])
            while stream.read(CHUNK):   # to the stream's end: xz checks its last block there
                pass
        installer.todo.put(None)
        installer.join()
        if installer.error:
            raise AirgapError(installer.error)
        expected = sorted(w["name"] for w in manifest["wheels"])
        if sorted(installer.installed) != expected:
            raise AirgapError(f"installed {len(installer.installed)} wheels, the manifest lists {len(expected)}")
        save(status="done", installed=len(installer.installed))
    except (AirgapError, OSError, lzma.LZMAError, tarfile.TarError, subprocess.CalledProcessError) as error:
        save(status="failed", error=f"{type(error).__name__}: {error}")
        raise AirgapError(str(error)) from error
    return state


def wait_followed(directory: Path, wait_s: float) -> dict:
    """The follower's final state, waiting up to ``wait_s`` for it to finish."""
    state_path = directory / FOLLOW_STATE
    deadline = time.monotonic() + wait_s
    while True:
        state = json.loads(state_path.read_text()) if state_path.exists() else {"status": "not started"}
        if state["status"] in ("done", "failed") or time.monotonic() > deadline:
            return state
        time.sleep(0.5)


def needed_sonames(library: Path) -> list[str]:
    """The NEEDED entries of an ELF shared library (readelf), [] where readelf is absent."""
    readelf = shutil.which("readelf")
    if readelf is None or not library.exists():
        return []
    out = subprocess.run([readelf, "-d", str(library)], capture_output=True, text=True).stdout
    return re.findall(r"\(NEEDED\).*\[(.+?)\]", out)


def missing_cuda_libraries(venv: Path) -> list[str]:
    """CUDA sonames torch's CUDA library needs that neither the environment's nvidia packages
    nor the host's loader path (ldconfig) provide."""
    probe = ("import importlib.util, pathlib, sys\n"
             "spec = importlib.util.find_spec('torch')\n"
             "print(pathlib.Path(spec.origin).parent / 'lib' / 'libtorch_cuda.so' if spec else '-')\n"
             "for d in sys.path:\n"
             "    print(d)\n")
    lines = subprocess.run([str(venv_python(venv)), "-c", probe], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    torch_cuda, site_dirs = Path(lines[0]), [Path(line) for line in lines[1:] if line]
    cuda = [name for name in needed_sonames(torch_cuda) if re.match(r"lib(cu|nv|nccl)", name)]
    available = set()
    for site_dir in site_dirs:
        available.update(p.name for p in (site_dir / "nvidia").rglob("*.so*"))
    ldconfig = shutil.which("ldconfig") or "/sbin/ldconfig"
    if Path(ldconfig).exists():
        out = subprocess.run([ldconfig, "-p"], capture_output=True, text=True).stdout
        available.update(re.findall(r"^\s*(\S+\.so[.\d]*)\s", out, re.MULTILINE))
    for directory in os.environ.get("LD_LIBRARY_PATH", "").split(":"):
        if directory:
            available.update(p.name for p in Path(directory).glob("*.so*"))
    return [name for name in cuda if name not in available]
