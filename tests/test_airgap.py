"""tools/airgap/wheelhouse.py, dry run on this machine: resolve against a local index, leave
out what the host has, split into parts, receive them one transfer at a time (a damaged one
refused), reassemble, check every hash and install into a venv over this Python."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import zipfile
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


@pytest.fixture(scope="module")
def outgoing(tmp_path_factory) -> Path:
    """`build` against a local index (3 packages, the host already has one), parts of 2 KiB."""
    tmp = tmp_path_factory.mktemp("airgap")
    index = tmp / "index"
    index.mkdir()
    make_wheel(index, "alpha", "1.0", payload=6000)
    make_wheel(index, "beta", "2.0")
    make_wheel(index, "gamma", "0.1", requires=("alpha>=1.0", "beta"))
    host_list = tmp / "host-pip-list.txt"
    host_list.write_text("beta==2.0\ntorch==2.11.0+cu130\n")
    out = tmp / "outgoing"
    done = wheelhouse("build", "--target-pip-list", str(host_list), "--python", f"{sys.version_info.major}."
                      f"{sys.version_info.minor}", "--requirements", "gamma", "--pip-args",
                      f"--no-index --find-links {index}", "--part-mib", str(2048 / 2**20),
                      "--work", str(tmp / "work"), "--out", str(out))
    assert "resolved 3 packages; shipping 2, leaving out 1" in done.stdout
    assert "left out beta: the host has 2.0" in done.stdout
    assert "python3 tools/airgap/wheelhouse.py receive" in done.stdout
    return out


def test_parts_and_manifest(outgoing):
    manifest = json.loads((outgoing / "manifest.json").read_text())
    parts = sorted(outgoing.glob("part-*"))
    assert [p.name for p in parts] == [p["name"] for p in manifest["parts"]] and len(parts) >= 3
    assert all(p.stat().st_size <= 2048 for p in parts)
    assert sum(p.stat().st_size for p in parts) == manifest["tar"]["bytes"]
    assert sorted(w["name"] for w in manifest["wheels"]) == ["alpha-1.0-py3-none-any.whl",
                                                             "gamma-0.1-py3-none-any.whl"]
    assert manifest["shipped"] == {"alpha": "1.0", "gamma": "0.1"}


def test_the_host_side_from_transfers_to_a_venv(outgoing, tmp_path):
    airgap = tmp_path / "airgap"
    incoming = airgap / "incoming"
    incoming.mkdir(parents=True)
    manifest = json.loads((outgoing / "manifest.json").read_text())
    names = [p["name"] for p in manifest["parts"]]

    # A part that arrives damaged is deleted and named; the others wait for it.
    (incoming / "manifest.json").write_bytes((outgoing / "manifest.json").read_bytes())
    (incoming / names[0]).write_bytes(b"x" + (outgoing / names[0]).read_bytes()[1:])
    done = wheelhouse("receive", "--dir", str(airgap), check=False)
    assert done.returncode == 1 and f"{names[0]} arrived damaged" in done.stderr
    assert not (incoming / names[0]).exists()

    # One transfer per part, the last one missing at first: assemble refuses, naming it.
    for name in names[:-1]:
        (incoming / name).write_bytes((outgoing / name).read_bytes())
        done = wheelhouse("receive", "--dir", str(airgap))
        assert "still to come" in done.stdout and not (incoming / name).exists()
    done = wheelhouse("assemble", "--dir", str(airgap), check=False)
    assert done.returncode == 1 and "1 part(s) missing" in done.stderr and names[-1] in done.stderr
    (incoming / names[-1]).write_bytes((outgoing / names[-1]).read_bytes())
    assert "every part is there" in wheelhouse("receive", "--dir", str(airgap)).stdout

    assert "2 wheels in" in wheelhouse("assemble", "--dir", str(airgap)).stdout
    assert not (airgap / "wheelhouse.tar").exists()
    wheelhouse("install", "--dir", str(airgap), "--python", sys.executable)
    venv_python = airgap / "venv" / "bin" / "python"
    probe = "import alpha, gamma, lvllm; print(alpha.VERSION, gamma.VERSION)"
    assert subprocess.run([str(venv_python), "-c", probe], capture_output=True, text=True,
                          check=True).stdout.split() == ["1.0", "0.1"]   # and this Python's packages stay visible


def test_a_pip_list_that_is_not_one_is_refused(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("Package    Version\n---------- -------\n")
    done = wheelhouse("build", "--target-pip-list", str(listing), "--python", "3.12", check=False)
    assert done.returncode == 1 and "expected `pip list --format=freeze` lines" in done.stderr


def test_older_manylinux_levels_and_what_the_host_provides():
    sys.path.insert(0, str(WHEELHOUSE.parent))
    import wheelhouse as w

    levels = w.compatible_platforms("manylinux_2_28_x86_64")
    assert levels[:2] == ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64"]
    assert "manylinux2014_x86_64" in levels and levels[-1] == "manylinux1_x86_64"
    assert w.compatible_platforms("macosx_14_0_arm64") == ["macosx_14_0_arm64"]
    resolved = {"nvidia-cublas": "13.1.0", "nvidia-nccl-cu13": "2.28", "nvidia-ml-py": "13.580",
                "cuda-bindings": "13.0", "torch": "2.13.0", "numpy": "2.3.0"}
    host = {"numpy": "2.3.0", "torch": "2.11.0+cu130"}
    assert sorted(w.left_out(resolved, host, with_cuda_libraries=False)) == ["numpy", "nvidia-cublas",
                                                                            "nvidia-nccl-cu13"]
    assert sorted(w.left_out(resolved, host, with_cuda_libraries=True)) == ["numpy"]
