#!/usr/bin/env python3
"""Bring vLLM's CUDA build and lvllm to a GPU host without network, one transfer at a time.

On a machine with network (any OS, no GPU needed):

    python tools/airgap/wheelhouse.py build --target-pip-list tools/airgap/hosts/cuda-image.txt --python 3.12

resolves vLLM's CUDA build (and the torch it pins) for the host's Python and platform, keeps
only what serving a text MoE model with lk imports (see left_out), packs the wheels' files
into one xz stream, cuts it into parts of at most --part-mib MiB, one per transfer folder under
build/airgap/outgoing, and prints the lease plan: which folder each call carries, the command
it runs and the time it is expected to take.

On the host, in a copy of this repository (only the standard library is needed), each
transfer runs `bash tools/airgap/host.sh receive FOLDER`: the first one starts, in the
background, the unpacking of the stream as parts arrive, the build of lk and tests/gpu; the
last call runs `bash tools/airgap/host.sh finish OUT_DIR`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import host_side  # noqa: E402  (standard library only: the host runs it too)
from host_side import CHUNK, MANIFEST, AirgapError  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
AIRGAP = ROOT / "build" / "airgap"
# vLLM's CUDA build with lvllm's other needs (requirements/cuda.txt), the tools that build lk
# (requirements/build.txt) and the test tools tests/gpu uses.
DEFAULT_REQUIREMENTS = ("-r", str(ROOT / "requirements" / "cuda.txt"), "-r", str(ROOT / "requirements" / "build.txt"),
                        "pytest", "requests", "psutil")
# A transfer carries the working tree (about 2 MiB) beside its part, 64 MiB in all.
DEFAULT_PART_MIB = 60
# Packages that hold CUDA's own shared libraries (cuBLAS, cuDNN, NCCL, ...): hundreds of MB
# each, and what a CUDA host already has in its system or beside its torch. Python packages
# of NVIDIA's (nvidia-ml-py, cuda-bindings, the CUTLASS DSL) are not among them.
CUDA_LIBRARY_PACKAGE = re.compile(
    r"^(cuda-toolkit|nvidia-(cublas|cuda-(runtime|nvrtc|cupti|cccl|crt|nvcc)|cudnn-cu\d+|cufft|cufile|curand"
    r"|cusolver|cusparse|cusparselt-cu\d+|nccl-cu\d+|nvjitlink|nvshmem-cu\d+|nvtx|nvvm))$")
CUDA_MAJOR_SUFFIX = re.compile(r"-cu(\d+)$")
# Any version the host has builds lk and runs the tests.
BUILD_TOOLS = frozenset({"setuptools", "wheel", "cmake", "ninja", "pybind11", "pytest"})
# vLLM 0.32 requires these but imports them only for what a text MoE model served with lk does
# not use; vLLM checks for each before it imports it (find_spec or an import inside the feature).
TEXT_SERVING_UNUSED = {
    "tokenspeed-mla": "MLA attention kernels (DeepSeek-style models on Blackwell)",
    "tokenspeed-triton": "tokenspeed-mla's Triton fork",
    "tilelang": "kernels of a few quantized and sparse-attention models",
    "z3-solver": "tilelang's solver",
    "flashinfer-python": "the FlashInfer attention and sampler backends (vLLM's sampler imports it "
                         "unless VLLM_USE_FLASHINFER_SAMPLER=0, which host.sh sets)",
    "nccl-extensions": "FlashInfer's multi-GPU communication",
    "nccl4py": "FlashInfer's multi-GPU communication",
    "cuda-tile": "FlashInfer's tile kernels",
    "cuda-python": "FlashInfer's CUDA bindings",
    "opencv-python-headless": "image and video inputs of multimodal models",
    "pynvvideocodec": "video decoding for multimodal models",
    "torchcodec": "audio and video decoding for multimodal models",
    "instanttensor": "an optional weight loader (--load-format instanttensor)",
    "fastsafetensors": "an optional weight loader (--load-format fastsafetensors)",
    "humming-kernels": "kernels of an optional quantization method",
    "numba": "n-gram speculative decoding",
    "nvidia-cudnn-cu13": "cuDNN: convolutions; torch checks its version only when it would run one",
    "llvmlite": "numba's compiler",
}
# xz -6 of the wheels' files against the wheels, measured on the documented host's set (the
# test of the part budget counts with it; `build` prints the ratio of each build).
EXPECTED_XZ_RATIO = 0.75
LEGACY_MANYLINUX = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
# The lease plan's times, measured on the first host (H100, 16 cores, 2026-11-26): a machine
# started in 28 s; a call carrying one part took 3.5-4.5 s; lk built in about 40 s; the
# follower unpacked and installed 152 wheels in 101 s, so it outlasts the transfers.
MACHINE_START_S = 30
LK_BUILD_S = 40
FINISH_S = {"the unpacking's rest": 45, "lvllm installed": 10, "versions": 15, "tests/gpu": 20,
            "e2e checks (--lean)": 400}


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pip_list(path: Path) -> dict[str, str | None]:
    """{normalized name: version} from `pip list --format=freeze` output; a bare name is a
    package the host has at a version not known (None)."""
    installed = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:(?:===?|@)\s*(\S+))?$", line)
        if match is None:
            raise AirgapError(f"{path}: cannot read {line!r}; expected `pip list --format=freeze` lines (name==version)")
        installed[normalized(match.group(1))] = match.group(2)
    return installed


def requirements_on(report: list[dict], python: str) -> dict[str, list[str]]:
    """name -> every version specifier the resolved packages put on it (markers evaluated for
    the host; a requirement behind any extra counts, which can only ship more)."""
    from packaging.requirements import Requirement

    environment = {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux",
                   "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
                   "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    specifiers: dict[str, list[str]] = {}
    for item in report:
        metadata = item["metadata"]
        for text in metadata.get("requires_dist") or []:
            requirement = Requirement(text)
            extras = [""] + list(metadata.get("provides_extra") or [])
            if requirement.marker is None or any(requirement.marker.evaluate({**environment, "extra": e})
                                                 for e in extras):
                specifiers.setdefault(normalized(requirement.name), []).append(str(requirement.specifier))
    return specifiers


def satisfies(version: str, specifiers: list[str]) -> bool:
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        public = Version(Version(version).public)
    except InvalidVersion:
        return False
    return all(public in SpecifierSet(s, prereleases=True) for s in specifiers)


def cuda_library_serves(theirs: str | None, version: str) -> bool:
    """Whether the host's copy of a CUDA library package serves: one it does not list comes
    with its CUDA install; one it lists must be of the same major.minor (torch 2.13 calls NCCL
    2.29's functions, which 2.28 lacks; a patch release adds none)."""
    return theirs is None or theirs.split(".")[:2] == version.split(".")[:2]


def left_out(packages: dict[str, str], host: dict[str, str | None], cuda_major: int, with_cuda_libraries: bool,
             specifiers: dict[str, list[str]], keep: set[str] = frozenset()) -> dict[str, str]:
    """Why each resolved package (name -> version) is not shipped."""
    reasons = {}
    for name, version in packages.items():
        theirs = host.get(name)
        cuda = CUDA_MAJOR_SUFFIX.search(name)
        if theirs is not None and theirs.split("+")[0] == version:
            reasons[name] = f"the host has {version}"
        elif theirs is not None and specifiers.get(name) and satisfies(theirs, specifiers[name]):
            needs = ", ".join(sorted({s for s in specifiers[name] if s})) or "any version"
            reasons[name] = f"the host's {theirs} meets every requirement ({needs})"
        elif name in BUILD_TOOLS and name in host:
            reasons[name] = f"the host's {theirs or 'version'} builds lk and runs the tests"
        elif CUDA_LIBRARY_PACKAGE.match(name) and not with_cuda_libraries and cuda_library_serves(theirs, version):
            reasons[name] = (f"a CUDA library package the host has at {theirs}" if theirs else
                             "a CUDA library package: the host's own libraries serve") + " (finish checks)"
        elif cuda and int(cuda.group(1)) != cuda_major:
            reasons[name] = f"built for CUDA {cuda.group(1)}; the host runs CUDA {cuda_major}"
        elif name in TEXT_SERVING_UNUSED and name not in keep:
            reasons[name] = f"not imported for a text MoE model: {TEXT_SERVING_UNUSED[name]}"
    return reasons


# ----------------------------------------------------------------------------------------
# resolving and downloading (a machine with network)
# ----------------------------------------------------------------------------------------

def compatible_platforms(platform: str) -> list[str]:
    """``platform`` and every older manylinux level a machine of that glibc runs: pip takes
    only the platforms it is given, and most wheels name an older level."""
    match = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", platform)
    if match is None:
        return [platform]
    glibc, arch = int(match.group(1)), match.group(2)
    platforms = []
    for minor in range(glibc, 4, -1):
        platforms.append(f"manylinux_2_{minor}_{arch}")
        if minor in LEGACY_MANYLINUX:
            platforms.append(f"{LEGACY_MANYLINUX[minor]}_{arch}")
    return platforms


def platform_args(python: str, platform: str) -> list[str]:
    """pip's arguments for wheels of another machine."""
    digits = python.replace(".", "")
    platforms = [arg for p in compatible_platforms(platform) for arg in ("--platform", p)]
    return ["--only-binary", ":all:", *platforms, "--python-version", python,
            "--implementation", "cp", "--abi", f"cp{digits}", "--abi", "abi3", "--abi", "none"]


def resolve(requirements: list[str], python: str, platform: str, pip: list[str]) -> list[dict]:
    """pip's own resolution of ``requirements`` on that Python and platform (a dry run that
    downloads metadata, not wheels): its report's install items."""
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.json"
        command = [*pip, "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
                   "--target", str(Path(scratch) / "target"), *platform_args(python, platform), *requirements]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise AirgapError(f"pip could not resolve {' '.join(requirements)} for Python {python} on {platform}:\n"
                              f"{done.stderr[-3000:]}")
        return json.loads(report.read_text())["install"]


def download(packages: dict[str, str], python: str, platform: str, pip: list[str], dest: Path,
             pip_args: list[str]) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={version}" for name, version in sorted(packages.items())]
    command = [*pip, "download", "--no-deps", "--quiet", "--dest", str(dest), *platform_args(python, platform),
               *pip_args, *pins]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise AirgapError(f"pip download failed:\n{done.stderr[-3000:]}")


# ----------------------------------------------------------------------------------------
# packing
# ----------------------------------------------------------------------------------------

def write_stream(wheels: list[Path], sink) -> None:
    """Every wheel's files as one tar stream, members named <wheel>/<path>, the mode kept."""
    with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as archive:
                for entry in archive.infolist():
                    if entry.is_dir():
                        continue
                    info = tarfile.TarInfo(f"{wheel.name}/{entry.filename}")
                    info.size, info.mode = entry.file_size, (entry.external_attr >> 16) & 0o777 or 0o644
                    info.mtime = 315532800   # zip's epoch: the same bytes on every build
                    with archive.open(entry) as source:
                        tar.addfile(info, source)


def transfer_folder(out: Path, index: int) -> Path:
    return out / f"transfer-{index + 1:02d}"


class PartWriter:
    """A file to write the compressed stream to: cut into parts of ``part_bytes``, each in its
    own transfer folder under ``out``."""

    def __init__(self, out: Path, part_bytes: int):
        self.out, self.part_bytes, self.parts, self.pending = out, part_bytes, [], bytearray()

    def write(self, data: bytes) -> int:
        self.pending += data
        while len(self.pending) >= self.part_bytes:
            self._part(bytes(self.pending[:self.part_bytes]))
            del self.pending[:self.part_bytes]
        return len(data)

    def close(self) -> None:
        if self.pending:
            self._part(bytes(self.pending))
            self.pending.clear()

    def _part(self, block: bytes) -> None:
        name = f"part-{len(self.parts):04d}"
        folder = transfer_folder(self.out, len(self.parts))
        folder.mkdir()
        (folder / name).write_bytes(block)
        self.parts.append({"name": name, "bytes": len(block), "sha256": hashlib.sha256(block).hexdigest()})


def compress(wheels: list[Path], preset: int, sink: PartWriter) -> None:
    """The wheels' stream, xz-compressed into ``sink``: by xz on every core where it is
    installed, else by Python's lzma on one."""
    xz = shutil.which("xz")
    if xz is None:
        with lzma.LZMAFile(sink, "w", preset=preset) as compressed:
            write_stream(wheels, compressed)
    else:
        process = subprocess.Popen([xz, f"-{preset}", "-T0", "-c"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        writer = threading.Thread(target=lambda: (write_stream(wheels, process.stdin), process.stdin.close()))
        writer.start()
        while chunk := process.stdout.read(CHUNK):
            sink.write(chunk)
        writer.join()
        if process.wait() != 0:
            raise AirgapError(f"xz exited with {process.returncode}")
    sink.close()


def pack(wheels_dir: Path, out: Path, part_bytes: int, preset: int, extra: dict) -> dict:
    """Compress the wheels into parts of at most part_bytes, one per transfer folder; the
    manifest travels with the first."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    wheels = sorted(wheels_dir.glob("*.whl"), key=lambda w: (-w.stat().st_size, w.name))
    if not wheels:
        raise AirgapError(f"no wheels in {wheels_dir}")
    sink = PartWriter(out, part_bytes)
    compress(wheels, preset, sink)
    manifest = {"format": f"tar.xz -{preset}", "parts": sink.parts,
                "wheels": [{"name": w.name, "bytes": w.stat().st_size} for w in wheels], **extra}
    (transfer_folder(out, 0) / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def lease_plan(manifest: dict, out: Path, transfer_s: float) -> str:
    """The calls of one lease, in order, with the time each is expected to take."""
    parts = manifest["parts"]
    wheel_mib = sum(w["bytes"] for w in manifest["wheels"]) / 2**20
    xz_mib = sum(p["bytes"] for p in parts) / 2**20
    lines = [f"{len(parts)} parts, {len(parts) + 1} device calls: {len(manifest['wheels'])} wheels, "
             f"{wheel_mib:.0f} MiB as wheels, {xz_mib:.0f} MiB as {manifest['format']} "
             f"({xz_mib / wheel_mib:.2f}x)",
             f"Lease plan (as measured on the first host: a machine starts in {MACHINE_START_S} s, a call "
             f"carrying one part takes {transfer_s:.0f} s). Each call right after the last (30 s idle ends it):"]
    folder = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    for index, part in enumerate(parts):
        carried = transfer_folder(folder, index)
        seconds, extra = (transfer_s + LK_BUILD_S, " (with the manifest; starts the unpacking in the "
                          "background, builds lk)") if index == 0 else (transfer_s, "")
        lines.append(f"  call {index + 1:2d}  carry {carried}  run: bash tools/airgap/host.sh receive {carried}"
                     f"   ~{seconds:.0f} s{extra}")
    finish = sum(FINISH_S.values())
    lines.append(f"  call {len(parts) + 1:2d}  run: bash tools/airgap/host.sh finish $OUT   ~{finish} s: "
                 + ", ".join(f"{what} {s} s" for what, s in FINISH_S.items()))
    total = MACHINE_START_S + LK_BUILD_S + len(parts) * transfer_s + finish
    lines.append(f"Expected in all: {total / 60:.1f} min of the 15-minute lease.")
    return "\n".join(lines)


def build(args) -> None:
    host = read_pip_list(args.target_pip_list)
    pip = [sys.executable, "-m", "pip"]
    requirements = args.requirements or list(DEFAULT_REQUIREMENTS)
    report = resolve(requirements + args.pip_args.split(), args.python, args.platform, pip)
    packages = {normalized(item["metadata"]["name"]): item["metadata"]["version"] for item in report}
    skipped = left_out(packages, host, args.cuda_major, args.with_cuda_libraries,
                       requirements_on(report, args.python), set(map(normalized, args.keep)))
    shipped = {name: version for name, version in packages.items() if name not in skipped}
    print(f"resolved {len(packages)} packages; shipping {len(shipped)}, leaving out {len(skipped)}")
    for name, why in sorted(skipped.items()):
        print(f"  left out {name}: {why}")
    wheels = args.work / "wheels"
    if wheels.exists():
        shutil.rmtree(wheels)
    download(shipped, args.python, args.platform, pip, wheels, args.pip_args.split())
    extra = {"shipped": shipped, "left_out": skipped,
             "target": {"python": args.python, "platform": args.platform, "cuda": args.cuda_major,
                        "requirements": requirements}}
    manifest = pack(wheels, args.out, int(args.part_mib * 2**20), args.xz_preset, extra)
    print(lease_plan(manifest, args.out, args.transfer_seconds))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    b = commands.add_parser("build", help="on a machine with network: resolve, download, pack, split")
    b.add_argument("--target-pip-list", type=Path, required=True,
                   help="`pip list --format=freeze` of the host's python, as a file (bare names: version unknown)")
    b.add_argument("--python", required=True, help="the host's Python version, e.g. 3.12")
    b.add_argument("--platform", default="manylinux_2_35_x86_64",
                   help="the host's glibc level (`ldd --version`: 2.35 -> manylinux_2_35_x86_64)")
    b.add_argument("--cuda-major", type=int, default=13, help="the host's CUDA major version (nvidia-smi)")
    b.add_argument("--requirements", nargs="*", metavar="SPEC",
                   help="what to ship (default: requirements/cuda.txt and build.txt, pytest, requests, psutil)")
    b.add_argument("--keep", nargs="*", default=[], metavar="NAME",
                   help="ship these although a text MoE model does not import them")
    b.add_argument("--pip-args", default="", help="more pip arguments, e.g. '--index-url URL' for a mirror")
    b.add_argument("--with-cuda-libraries", action="store_true",
                   help="ship the nvidia-* CUDA library packages too (the host lacks them)")
    b.add_argument("--part-mib", type=float, default=DEFAULT_PART_MIB)
    b.add_argument("--xz-preset", type=int, default=6, choices=range(10))
    b.add_argument("--transfer-seconds", type=float, default=5, help="the lease plan's time for one call")
    b.add_argument("--work", type=Path, default=AIRGAP / "work")
    b.add_argument("--out", type=Path, default=AIRGAP / "outgoing")
    p = commands.add_parser("plan", help="print the lease plan of a built wheelhouse")
    p.add_argument("--out", type=Path, default=AIRGAP / "outgoing")
    p.add_argument("--transfer-seconds", type=float, default=5)
    r = commands.add_parser("receive", help="on the host: move a transfer's part aside, checking it")
    r.add_argument("incoming", type=Path, help="the folder the transfer brought")
    f = commands.add_parser("follow", help="on the host: unpack and install the parts as they arrive")
    f.add_argument("--python", default=sys.executable, help="the host's python (the one with torch)")
    f.add_argument("--wait", type=float, default=900, help="seconds to wait for each part")
    w = commands.add_parser("wait", help="on the host: wait for `follow` to finish, check CUDA libraries")
    w.add_argument("--wait", type=float, default=300)
    for sub in (r, f, w):
        sub.add_argument("--dir", type=Path, default=AIRGAP, help="the airgap folder (default build/airgap)")
    args = parser.parse_args(argv)
    try:
        return run(parser, args)
    except AirgapError as error:
        print(f"wheelhouse {args.command}: {error}", file=sys.stderr)
        return 1


def run(parser, args) -> int:
    if args.command == "build":
        if not 0 < args.part_mib <= 60:
            parser.error("--part-mib must be above 0 and at most 60 (a transfer takes 64 MiB with the tree)")
        build(args)
    elif args.command == "plan":
        print(lease_plan(host_side.load_manifest(transfer_folder(args.out, 0)), args.out, args.transfer_seconds))
    elif args.command == "receive":
        missing = host_side.receive(args.incoming, args.dir / "parts")
        print("every part is there" if not missing else
              f"{len(missing)} part(s) still to come: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    elif args.command == "follow":
        state = host_side.follow(args.dir, args.python, args.wait)
        print(f"installed {state['installed']} wheels in {state['seconds']} s")
    else:
        state = host_side.wait_followed(args.dir, args.wait)
        if state["status"] != "done":
            raise AirgapError(f"unpacking {state['status']}: {state.get('error', 'still running')}")
        missing = host_side.missing_cuda_libraries(args.dir / "venv")
        if missing:
            raise AirgapError(f"torch needs CUDA libraries this host does not provide: {', '.join(missing)}. "
                              "Rebuild the wheelhouse with --with-cuda-libraries, or add their directory to "
                              "LD_LIBRARY_PATH.")
        print(f"{state['installed']} wheels installed in {state['seconds']} s, CUDA libraries found")
    return 0


if __name__ == "__main__":
    sys.exit(main())
