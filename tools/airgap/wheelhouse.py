#!/usr/bin/env python3
"""Bring vLLM's CUDA build and lvllm to a GPU host without network, in parts of <= 60 MiB.

On a machine with network (any OS, no GPU needed):

    python tools/airgap/wheelhouse.py build --target-pip-list host-pip-list.txt --python 3.12

resolves vLLM (and the torch it pins) for the host's Python and platform, leaves out what the
host already has (`pip list --format=freeze` of the host's python, given as a file) and, by
default, the NVIDIA CUDA library packages (the host's own CUDA libraries serve where their
sonames match; `install` checks), downloads the rest, packs the wheels into one tar, splits it
into parts of at most --part-mib MiB under build/airgap/outgoing with a manifest of SHA-256
sums, and prints the command sequence for the host.

On the host, in a copy of this repository (only the standard library is needed):

    python3 tools/airgap/wheelhouse.py receive     # after each transfer into build/airgap/incoming
    python3 tools/airgap/wheelhouse.py assemble    # once every part is there: hashes, tar, wheels
    python3 tools/airgap/wheelhouse.py install     # a venv over the host's python, --no-deps

`receive` moves every arrived part aside into build/airgap/parts (checking its hash), so the
incoming folder can take the next one; `assemble` checks that all parts are there and sound,
rebuilds the tar, checks its hash and unpacks the wheels; `install` makes build/airgap/venv
with the host's site-packages visible, installs the wheels without resolving (--no-deps
--no-index) and reports which CUDA libraries torch needs that neither the venv nor the host
provides. tools/airgap/host.sh runs the three and builds lk.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
AIRGAP = ROOT / "build" / "airgap"
MANIFEST = "manifest.json"
TAR = "wheelhouse.tar"
# vLLM's CUDA build with lvllm's other needs (requirements/cuda.txt), the tools that build lk
# (requirements/build.txt) and the test tools tests/gpu uses.
DEFAULT_REQUIREMENTS = ("-r", str(ROOT / "requirements" / "cuda.txt"), "-r", str(ROOT / "requirements" / "build.txt"),
                        "pytest", "requests", "psutil")
DEFAULT_PART_MIB = 60
# Packages that hold CUDA's own shared libraries (cuBLAS, cuDNN, NCCL, ...): hundreds of MB
# each, and what a CUDA host already has in its system or beside its torch. Python packages
# of NVIDIA's (nvidia-ml-py, cuda-bindings, the CUTLASS DSL) are not among them.
CUDA_LIBRARY_PACKAGE = re.compile(
    r"^(cuda-toolkit|nvidia-(cublas|cuda-(runtime|nvrtc|cupti|cccl|crt|nvcc)|cudnn-cu\d+|cufft|cufile|curand"
    r"|cusolver|cusparse|cusparselt-cu\d+|nccl-cu\d+|nvjitlink|nvshmem-cu\d+|nvtx|nvvm))$")
CHUNK = 1 << 20


class AirgapError(Exception):
    """A step that cannot go on; the message says what is missing or wrong."""


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def read_pip_list(path: Path) -> dict[str, str]:
    """{normalized name: version} from `pip list --format=freeze` (or `pip freeze`) output."""
    installed = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:===?|@)\s*(\S+)$", line)
        if match is None:
            raise AirgapError(f"{path}: cannot read {line!r}; expected `pip list --format=freeze` lines (name==version)")
        installed[normalized(match.group(1))] = match.group(2)
    return installed


def left_out(packages: dict[str, str], host: dict[str, str], with_cuda_libraries: bool) -> dict[str, str]:
    """Why each resolved package (name -> version) is not shipped: the host has that version,
    or it is a CUDA library package the host provides."""
    reasons = {}
    for name, version in packages.items():
        if host.get(name) == version or host.get(name, "").split("+")[0] == version:
            reasons[name] = f"the host has {version}"
        elif CUDA_LIBRARY_PACKAGE.match(name) and not with_cuda_libraries:
            reasons[name] = "a CUDA library package: the host's own libraries serve (install checks)"
    return reasons


# ----------------------------------------------------------------------------------------
# build (a machine with network)
# ----------------------------------------------------------------------------------------

LEGACY_MANYLINUX = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}


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


def resolve(requirements: list[str], python: str, platform: str, pip: list[str]) -> dict[str, str]:
    """name -> version of everything `requirements` installs on that Python and platform,
    from pip's own resolver (a dry run that downloads metadata, not wheels)."""
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.json"
        command = [*pip, "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
                   "--target", str(Path(scratch) / "target"), *platform_args(python, platform), *requirements]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise AirgapError(f"pip could not resolve {' '.join(requirements)} for Python {python} on {platform}:\n"
                              f"{done.stderr[-3000:]}")
        items = json.loads(report.read_text())["install"]
    return {normalized(item["metadata"]["name"]): item["metadata"]["version"] for item in items}


def download(packages: dict[str, str], python: str, platform: str, pip: list[str], dest: Path,
             pip_args: list[str]) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={version}" for name, version in sorted(packages.items())]
    command = [*pip, "download", "--no-deps", "--quiet", "--dest", str(dest), *platform_args(python, platform),
               *pip_args, *pins]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise AirgapError(f"pip download failed:\n{done.stderr[-3000:]}")


def pack(wheels: Path, out: Path, part_bytes: int, shipped: dict[str, str], skipped: dict[str, str],
         target: dict) -> dict:
    """Tar the wheels, split the tar into parts of at most part_bytes, write the manifest."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    files = sorted(wheels.glob("*.whl"))
    if not files:
        raise AirgapError(f"no wheels in {wheels}")
    tar_path = out.parent / f".{TAR}.tmp"
    with tarfile.open(tar_path, "w") as tar:
        for wheel in files:
            tar.add(wheel, arcname=wheel.name)
    parts = []
    with tar_path.open("rb") as source:
        while block := source.read(part_bytes):
            name = f"part-{len(parts):04d}"
            (out / name).write_bytes(block)
            parts.append({"name": name, "bytes": len(block), "sha256": hashlib.sha256(block).hexdigest()})
    manifest = {
        "tar": {"bytes": tar_path.stat().st_size, "sha256": sha256(tar_path)},
        "parts": parts,
        "wheels": [{"name": w.name, "sha256": sha256(w)} for w in files],
        "shipped": shipped, "left_out": skipped, "target": target,
    }
    tar_path.unlink()
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def host_commands(manifest: dict, out: Path) -> str:
    incoming = AIRGAP.relative_to(ROOT) / "incoming"
    lines = [f"# {len(manifest['parts'])} parts, {manifest['tar']['bytes'] / 2**20:.0f} MiB in all, "
             f"{len(manifest['wheels'])} wheels. On the host, in a copy of this repository:",
             f"#  1. put {out / MANIFEST} and {out / manifest['parts'][0]['name']} into {incoming}/, then"]
    lines.append("       python3 tools/airgap/wheelhouse.py receive")
    lines.append(f"#  2. the same for each further part ({manifest['parts'][-1]['name']} last), "
                 "one or more at a time, each followed by `receive`")
    lines.append("#  3. when `receive` says every part is there:")
    lines.append("       bash tools/airgap/host.sh OUT_DIR     # assemble, install, build lk")
    return "\n".join(lines)


def build(args) -> None:
    host = read_pip_list(args.target_pip_list)
    pip = [sys.executable, "-m", "pip"]
    args.requirements = args.requirements or list(DEFAULT_REQUIREMENTS)
    packages = resolve(args.requirements + args.pip_args.split(), args.python, args.platform, pip)
    skipped = left_out(packages, host, args.with_cuda_libraries)
    shipped = {name: version for name, version in packages.items() if name not in skipped}
    print(f"resolved {len(packages)} packages; shipping {len(shipped)}, leaving out {len(skipped)}")
    for name, why in sorted(skipped.items()):
        print(f"  left out {name}: {why}")
    wheels = args.work / "wheels"
    if wheels.exists():
        shutil.rmtree(wheels)
    download(shipped, args.python, args.platform, pip, wheels, args.pip_args.split())
    target = {"python": args.python, "platform": args.platform, "requirements": args.requirements}
    manifest = pack(wheels, args.out, int(args.part_mib * 2**20), shipped, skipped, target)
    print(host_commands(manifest, args.out))


# ----------------------------------------------------------------------------------------
# the host (no network, standard library only)
# ----------------------------------------------------------------------------------------

def load_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    if not path.exists():
        raise AirgapError(f"no {MANIFEST} in {directory}: transfer it with the first part")
    return json.loads(path.read_text())


def receive(incoming: Path, parts: Path) -> list[str]:
    """Move every arrived part (and the manifest) from ``incoming`` into ``parts``, checking
    each part's hash on arrival; returns the parts still missing."""
    parts.mkdir(parents=True, exist_ok=True)
    incoming.mkdir(parents=True, exist_ok=True)
    if (incoming / MANIFEST).exists():
        shutil.move(str(incoming / MANIFEST), str(parts / MANIFEST))
    manifest = load_manifest(parts)
    expected = {p["name"]: p for p in manifest["parts"]}
    for arrived in sorted(incoming.iterdir()):
        part = expected.get(arrived.name)
        if part is None:
            raise AirgapError(f"{arrived} is not a part of this wheelhouse (its parts: part-0000 .. "
                              f"{manifest['parts'][-1]['name']})")
        if arrived.stat().st_size != part["bytes"] or sha256(arrived) != part["sha256"]:
            arrived.unlink()
            raise AirgapError(f"{arrived.name} arrived damaged (size or SHA-256 differs); deleted: send it again")
        shutil.move(str(arrived), str(parts / arrived.name))
    return [name for name in expected if not (parts / name).exists()]


def assemble(parts: Path, wheels: Path) -> list[Path]:
    """Check every part, rebuild the tar, check it, unpack the wheels and check each."""
    manifest = load_manifest(parts)
    missing = [p["name"] for p in manifest["parts"] if not (parts / p["name"]).exists()]
    if missing:
        raise AirgapError(f"{len(missing)} part(s) missing in {parts}: {', '.join(missing)}")
    bad = [p["name"] for p in manifest["parts"] if sha256(parts / p["name"]) != p["sha256"]]
    if bad:
        raise AirgapError(f"part(s) with a wrong SHA-256: {', '.join(bad)}; send them again")
    tar_path = parts.parent / TAR
    with tar_path.open("wb") as tar:
        for part in manifest["parts"]:
            with (parts / part["name"]).open("rb") as source:
                shutil.copyfileobj(source, tar, CHUNK)
    if sha256(tar_path) != manifest["tar"]["sha256"]:
        raise AirgapError(f"the reassembled {tar_path} does not match the manifest's SHA-256")
    if wheels.exists():
        shutil.rmtree(wheels)
    wheels.mkdir(parents=True)
    with tarfile.open(tar_path) as tar:
        names = tar.getnames()
        if any(Path(n).name != n or not n.endswith(".whl") for n in names):
            raise AirgapError(f"{tar_path} holds something other than wheels at its top level")
        tar.extractall(wheels, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    tar_path.unlink()
    for wheel in manifest["wheels"]:
        if sha256(wheels / wheel["name"]) != wheel["sha256"]:
            raise AirgapError(f"{wheel['name']} unpacked with a wrong SHA-256")
    return sorted(wheels.glob("*.whl"))


def install_command(venv: Path, wheels: list[Path]) -> list[str]:
    return [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet",
            *map(str, wheels)]


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
    python = str(venv / "bin" / "python")
    probe = ("import importlib.util, pathlib, sys\n"
             "spec = importlib.util.find_spec('torch')\n"
             "print(pathlib.Path(spec.origin).parent / 'lib' / 'libtorch_cuda.so' if spec else '-')\n"
             "for d in sys.path:\n"
             "    print(d)\n")
    lines = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True).stdout.splitlines()
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


def site_packages(python: str) -> list[str]:
    code = "import site, sys; print('\\n'.join([*site.getsitepackages(), site.getusersitepackages()]))"
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line and Path(line).is_dir()]


def see_host_packages(venv: Path, python: str) -> None:
    """Make the host python's packages (torch, its CUDA libraries) visible in ``venv``, after
    the venv's own. A .pth file rather than --system-site-packages, which would reach only the
    base interpreter's packages when the host's python is itself a venv."""
    own = site_packages(str(venv / "bin" / "python"))[0]
    (Path(own) / "airgap_host_packages.pth").write_text("\n".join(site_packages(python)) + "\n")


def install(wheels: Path, venv: Path, python: str) -> None:
    files = sorted(wheels.glob("*.whl"))
    if not files:
        raise AirgapError(f"no wheels in {wheels}: run `assemble` first")
    if not (venv / "bin" / "python").exists():
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
        see_host_packages(venv, python)
    subprocess.run(install_command(venv, files), check=True)
    missing = missing_cuda_libraries(venv)
    if missing:
        raise AirgapError(f"torch needs CUDA libraries this host does not provide: {', '.join(missing)}. "
                          "Rebuild the wheelhouse with --with-cuda-libraries, or add their directory to "
                          "LD_LIBRARY_PATH.")
    print(f"installed {len(files)} wheels into {venv}")


# ----------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    b = commands.add_parser("build", help="on a machine with network: resolve, download, pack, split")
    b.add_argument("--target-pip-list", type=Path, required=True,
                   help="`pip list --format=freeze` of the host's python, as a file")
    b.add_argument("--python", required=True, help="the host's Python version, e.g. 3.12")
    b.add_argument("--platform", default="manylinux_2_35_x86_64",
                   help="the host's glibc level (`ldd --version`: 2.35 -> manylinux_2_35_x86_64)")
    b.add_argument("--requirements", nargs="*", metavar="SPEC",
                   help="what to ship (default: requirements/cuda.txt and build.txt, pytest, requests, psutil)")
    b.add_argument("--pip-args", default="", help="more pip arguments, e.g. '--index-url URL' for a mirror")
    b.add_argument("--with-cuda-libraries", action="store_true",
                   help="ship the nvidia-* CUDA library packages too (the host lacks them)")
    b.add_argument("--part-mib", type=float, default=DEFAULT_PART_MIB)
    b.add_argument("--work", type=Path, default=AIRGAP / "work")
    b.add_argument("--out", type=Path, default=AIRGAP / "outgoing")
    r = commands.add_parser("receive", help="on the host: move arrived parts aside, checking each")
    a = commands.add_parser("assemble", help="on the host: check every part, reassemble, unpack")
    i = commands.add_parser("install", help="on the host: a venv over the host's python, --no-deps")
    i.add_argument("--python", default=sys.executable, help="the host's python (the one with torch)")
    for sub in (r, a, i):
        sub.add_argument("--dir", type=Path, default=AIRGAP, help="the airgap folder (default build/airgap)")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            if not 0 < args.part_mib <= 60:
                parser.error("--part-mib must be above 0 and at most 60 (the transfers take about 60 MiB)")
            build(args)
        elif args.command == "receive":
            missing = receive(args.dir / "incoming", args.dir / "parts")
            print("every part is there: run `assemble`" if not missing else
                  f"{len(missing)} part(s) still to come: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        elif args.command == "assemble":
            wheels = assemble(args.dir / "parts", args.dir / "wheels")
            print(f"{len(wheels)} wheels in {args.dir / 'wheels'}")
        else:
            install(args.dir / "wheels", args.dir / "venv", args.python)
    except AirgapError as error:
        print(f"wheelhouse {args.command}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
