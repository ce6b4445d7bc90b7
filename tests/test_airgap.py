"""tools/airgap/wheelhouse.py, dry run on this machine: resolve against a local index, leave
out what the host has, split into parts, receive them one transfer at a time (a damaged one
refused), reassemble, check every hash and install into a venv over this Python."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WHEELHOUSE = ROOT / "tools" / "airgap" / "wheelhouse.py"


def make_wheel(directory: Path, name: str, version: str, requires: tuple[str, ...] = (), payload: int = 0) -> Path:
    """A pure-Python wheel written by hand: a package with one module and ``payload`` random bytes."""
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"VERSION = {version!r}\n".encode(),
        f"{name}/payload.bin": os.urandom(payload),
        f"{info}/METADATA": (f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                             + "".join(f"Requires-Dist: {r}\n" for r in requires)).encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test_airgap\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return wheel


def wheelhouse(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(WHEELHOUSE), *args], capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def add_executable(wheel: Path, path: str, data: bytes) -> None:
    """A file with its exec bit set, as triton's ptxas is in its wheel (RECORD left as is: pip
    does not check it)."""
    with zipfile.ZipFile(wheel, "a") as archive:
        info = zipfile.ZipInfo(path)
        info.external_attr = 0o100755 << 16
        archive.writestr(info, data)


@pytest.fixture(scope="module")
def outgoing(tmp_path_factory) -> Path:
    """`build` against a local index: four packages; the host has one at the same version and
    one at a version that meets every requirement on it; parts of 2 KiB."""
    tmp = tmp_path_factory.mktemp("airgap")
    index = tmp / "index"
    index.mkdir()
    add_executable(make_wheel(index, "alpha", "1.0", payload=6000), "alpha/tool", b"#!/bin/sh\necho tool\n")
    make_wheel(index, "beta", "2.0")
    make_wheel(index, "delta", "3.1")
    make_wheel(index, "gamma", "0.1", requires=("alpha>=1.0", "beta", "delta>=3"))
    host_list = tmp / "host-pip-list.txt"
    host_list.write_text("# a comment\nbeta==2.0\ndelta==3.0\ntorch==2.11.0+cu130\ncmake\n")
    out = tmp / "outgoing"
    done = wheelhouse("build", "--target-pip-list", str(host_list), "--python", f"{sys.version_info.major}."
                      f"{sys.version_info.minor}", "--requirements", "gamma", "--pip-args",
                      f"--no-index --find-links {index}", "--part-mib", str(2048 / 2**20),
                      "--work", str(tmp / "work"), "--out", str(out))
    assert "resolved 4 packages; shipping 2, leaving out 2" in done.stdout
    assert "left out beta: the host has 2.0" in done.stdout
    assert "left out delta: the host's 3.0 meets every requirement (>=3)" in done.stdout
    return out


def test_parts_one_per_transfer_and_the_lease_plan(outgoing):
    sys.path.insert(0, str(WHEELHOUSE.parent))
    import wheelhouse as w

    manifest = json.loads((outgoing / "transfer-01" / "manifest.json").read_text())
    folders = sorted(outgoing.iterdir())
    assert [f.name for f in folders] == [f"transfer-{i + 1:02d}" for i in range(len(manifest["parts"]))]
    assert len(folders) >= 2
    for folder, part in zip(folders, manifest["parts"]):
        carried = sorted(p.name for p in folder.iterdir() if p.name != "manifest.json")
        assert carried == [part["name"]] and (folder / part["name"]).stat().st_size == part["bytes"] <= 2048
    assert sorted(w["name"] for w in manifest["wheels"]) == ["alpha-1.0-py3-none-any.whl",
                                                             "gamma-0.1-py3-none-any.whl"]
    assert manifest["shipped"] == {"alpha": "1.0", "gamma": "0.1"}
    plan = wheelhouse("plan", "--out", str(outgoing), "--transfer-seconds", "20").stdout
    calls = [line for line in plan.splitlines() if line.strip().startswith("call ")]
    assert len(calls) == len(folders) + 1
    assert f"carry {folders[0]}  run: bash tools/airgap/host.sh receive {folders[0]}" in calls[0]
    assert "host.sh finish $OUT" in calls[-1]
    expected = (w.MACHINE_START_S + w.LK_BUILD_S + 20 * len(folders) + sum(w.FINISH_S.values())) / 60
    assert f"{len(folders)} parts, {len(folders) + 1} device calls" in plan
    assert f"Expected in all: {expected:.1f} min" in plan


def test_the_host_unpacks_while_parts_arrive(outgoing, tmp_path):
    """The follower starts before any part is there and installs the wheels as they arrive;
    a damaged part is refused and sent again."""
    airgap = tmp_path / "airgap"
    folders = sorted(outgoing.iterdir())
    follower = subprocess.Popen([sys.executable, str(WHEELHOUSE), "follow", "--dir", str(airgap),
                                 "--python", sys.executable, "--wait", "120"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        damaged = tmp_path / "damaged"
        shutil.copytree(folders[0], damaged)
        part = next(p for p in damaged.iterdir() if p.name.startswith("part-"))
        part.write_bytes(b"x" + part.read_bytes()[1:])
        done = wheelhouse("receive", str(damaged), "--dir", str(airgap), check=False)
        assert done.returncode == 1 and f"{part.name} arrived damaged" in done.stderr
        assert not (airgap / "parts" / part.name).exists()
        for folder in folders[:-1]:
            assert "still to come" in wheelhouse("receive", str(folder), "--dir", str(airgap)).stdout
        assert follower.poll() is None, follower.communicate()  # waiting for the last part
        assert "every part is there" in wheelhouse("receive", str(folders[-1]), "--dir", str(airgap)).stdout
        out, err = follower.communicate(timeout=300)
    finally:
        follower.kill()
    assert follower.returncode == 0, out + err
    assert "installed 2 wheels" in out
    assert "2 wheels installed" in wheelhouse("wait", "--dir", str(airgap), "--wait", "5").stdout
    venv_python = airgap / "venv" / "bin" / "python"
    probe = ("import alpha, gamma, lvllm, os; print(alpha.VERSION, gamma.VERSION, "
             "os.access(os.path.join(os.path.dirname(alpha.__file__), 'tool'), os.X_OK))")
    assert subprocess.run([str(venv_python), "-c", probe], capture_output=True, text=True,
                          check=True).stdout.split() == ["1.0", "0.1", "True"]   # this Python's packages stay visible


def test_without_xz_python_compresses_the_same_stream(tmp_path, monkeypatch):
    """Where no xz is installed lzma writes the stream: other bytes, the same wheels' files."""
    import lzma
    import tarfile

    sys.path.insert(0, str(WHEELHOUSE.parent))
    import wheelhouse as w

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    add_executable(make_wheel(wheels, "alpha", "1.0", payload=50_000), "alpha/tool", b"#!/bin/sh\n")
    make_wheel(wheels, "beta", "2.0")

    def members(out: Path, manifest: dict) -> list[tuple[str, int, bytes]]:
        data = b"".join((w.transfer_folder(out, i) / p["name"]).read_bytes() for i, p in enumerate(manifest["parts"]))
        with tarfile.open(fileobj=io.BytesIO(lzma.decompress(data))) as tar:
            return [(m.name, m.mode, tar.extractfile(m).read()) for m in tar.getmembers()]

    streams = {}
    for name, which in (("xz", shutil.which), ("lzma", lambda program: None)):
        monkeypatch.setattr(w.shutil, "which", which)
        out = tmp_path / name
        manifest = w.pack(wheels, out, 4096, 1, {})
        assert all(p["bytes"] <= 4096 for p in manifest["parts"]) and len(manifest["parts"]) >= 2
        streams[name] = members(out, manifest)
    assert streams["lzma"] == streams["xz"]
    assert ("alpha-1.0-py3-none-any.whl/alpha/tool", 0o755, b"#!/bin/sh\n") in streams["xz"]


def test_waiting_on_a_follower_that_failed(tmp_path):
    (tmp_path / "follow.json").write_text(json.dumps({"status": "failed", "error": "part-0003 did not arrive"}))
    done = wheelhouse("wait", "--dir", str(tmp_path), "--wait", "1", check=False)
    assert done.returncode == 1 and "unpacking failed: part-0003 did not arrive" in done.stderr


def test_a_pip_list_that_is_not_one_is_refused(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("Package    Version\n---------- -------\n")
    done = wheelhouse("build", "--target-pip-list", str(listing), "--python", "3.12", check=False)
    assert done.returncode == 1 and "expected `pip list --format=freeze` lines" in done.stderr


def test_what_is_left_out_and_why():
    sys.path.insert(0, str(WHEELHOUSE.parent))
    import wheelhouse as w

    levels = w.compatible_platforms("manylinux_2_28_x86_64")
    assert levels[:2] == ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64"]
    assert "manylinux2014_x86_64" in levels and levels[-1] == "manylinux1_x86_64"
    assert w.compatible_platforms("macosx_14_0_arm64") == ["macosx_14_0_arm64"]
    resolved = {"nvidia-cublas": "13.1.0", "nvidia-nccl-cu13": "2.28", "nvidia-ml-py": "13.580",
                "cuda-bindings": "13.0", "torch": "2.13.0", "numpy": "2.3.0", "transformers": "5.19.0",
                "nvidia-cutlass-dsl-libs-cu12": "4.8", "nvidia-cutlass-dsl-libs-cu13": "4.8",
                "opencv-python-headless": "5.0", "cmake": "4.4", "pydantic": "2.14"}
    host = {"numpy": "2.3.0", "torch": "2.11.0+cu130", "transformers": "5.17.0", "cmake": None, "pydantic": None}
    needs = {"transformers": [">=5.16.1,<5.20", ""], "torch": ["==2.13.0"], "pydantic": [">=2.12"]}
    reasons = w.left_out(resolved, host, 13, False, needs)
    assert sorted(reasons) == ["cmake", "numpy", "nvidia-cublas", "nvidia-cutlass-dsl-libs-cu12",
                               "nvidia-nccl-cu13", "opencv-python-headless", "transformers"]
    assert reasons["transformers"].startswith("the host's 5.17.0 meets every requirement")
    assert "CUDA 12" in reasons["nvidia-cutlass-dsl-libs-cu12"]
    assert sorted(w.left_out(resolved, host, 13, True, needs, keep={"opencv-python-headless"})) == [
        "cmake", "numpy", "nvidia-cutlass-dsl-libs-cu12", "transformers"]
    assert not w.satisfies("5.21.0", [">=5.16.1,<5.20"]) and w.satisfies("2.11.0+cu130", [">=2.11"])
    # A CUDA library the host lists serves at the same major.minor only (NCCL 2.28 lacks 2.29's calls).
    libraries = {"nvidia-cublas": "13.1.1.3", "nvidia-nccl-cu13": "2.29.7"}
    listed = {"nvidia-cublas": "13.1.0.3", "nvidia-nccl-cu13": "2.28.9"}
    pins = {"nvidia-cublas": ["==13.1.1.3"], "nvidia-nccl-cu13": ["==2.29.7"]}
    assert sorted(w.left_out(libraries, listed, 13, False, pins)) == ["nvidia-cublas"]


PART_BUDGET = 18


@pytest.mark.timeout(900)
def test_the_documented_host_fits_the_part_budget(tmp_path):
    """The real resolution for the documented GPU host (registry only: pip's index), the
    wheels' sizes read with HEAD requests: what is shipped must fit PART_BUDGET parts at the xz
    ratio the build measured on this set (docs/gpu-path.md), so the wheelhouse cannot grow back
    silently."""
    sys.path.insert(0, str(WHEELHOUSE.parent))
    import wheelhouse as w

    try:
        urllib.request.urlopen("https://pypi.org/simple/vllm/", timeout=10).close()
    except OSError as error:
        pytest.skip(f"the package registry is unreachable here: {error}")
    pip = [sys.executable, "-m", "pip"]
    report = w.resolve(list(w.DEFAULT_REQUIREMENTS), "3.12", "manylinux_2_35_x86_64", pip)
    packages = {w.normalized(i["metadata"]["name"]): i["metadata"]["version"] for i in report}
    host = w.read_pip_list(ROOT / "tools" / "airgap" / "hosts" / "cuda-image.txt")
    skipped = w.left_out(packages, host, 13, False, w.requirements_on(report, "3.12"))
    def size(item) -> int:
        request = urllib.request.Request(item["download_info"]["url"], method="HEAD")
        with urllib.request.urlopen(request, timeout=60) as response:
            return int(response.headers["Content-Length"])

    shipped = {w.normalized(i["metadata"]["name"]): i for i in report
               if w.normalized(i["metadata"]["name"]) not in skipped}
    with ThreadPoolExecutor(16) as pool:   # a HEAD request each, at once
        sizes = dict(zip(shipped, pool.map(size, shipped.values())))
    wheel_mib = sum(sizes.values()) / 2**20
    parts = math.ceil(wheel_mib * w.EXPECTED_XZ_RATIO / w.DEFAULT_PART_MIB)
    biggest = sorted(sizes, key=sizes.get, reverse=True)[:6]
    assert parts <= PART_BUDGET, (f"{wheel_mib:.0f} MiB of wheels, about {parts} parts; the biggest: "
                                  + ", ".join(f"{n} {sizes[n] / 2**20:.0f} MiB" for n in biggest))
