"""lvllm.envs: parsing, errors that name the variable, and the documented table."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lvllm import envs, envs_table

TABLE_DOC = Path(__file__).resolve().parents[1] / envs_table.TABLE_DOC


def test_documented_table_matches_the_declarations():
    text = TABLE_DOC.read_text(encoding="utf-8")
    assert envs_table.TABLE_BEGIN in text and envs_table.TABLE_END in text, \
        f"{envs_table.TABLE_DOC} lacks the generated env table"
    assert envs_table.with_table(text) == text, \
        f"{envs_table.TABLE_DOC}'s table is stale: run python -m lvllm.envs_table --update {envs_table.TABLE_DOC}"


def test_setup_py_can_load_it_by_path_before_the_package_exists(tmp_path):
    """setup.py reads envs.py by path while lvllm is being built: no import of the package at
    its top (a Python without site-packages, outside the source tree, stands for that)."""
    loader = ("import importlib.util, sys\n"
              f"spec = importlib.util.spec_from_file_location('_envs', {str(Path(envs.__file__))!r})\n"
              "module = importlib.util.module_from_spec(spec); sys.modules['_envs'] = module\n"
              "spec.loader.exec_module(module); print(module.get('LVLLM_MOE_NUMA_ENABLED'))")
    done = subprocess.run([sys.executable, "-S", "-c", loader], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, env={"PATH": os.environ.get("PATH", "")})
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr


def test_every_variable_read_in_the_package_is_declared():
    package = Path(envs.__file__).parent
    used = set()
    for path in package.rglob("*.py"):
        used.update(re.findall(r"""envs\.get\(\s*["']([A-Z0-9_]+)["']""", path.read_text(encoding="utf-8")))
    assert used <= set(envs.VARIABLES), f"undeclared: {used - set(envs.VARIABLES)}"


@pytest.mark.parametrize(
    "name, raw, expected",
    [
        ("LVLLM_MOE_NUMA_ENABLED", "1", True),
        ("LVLLM_MOE_NUMA_ENABLED", "off", False),
        ("LVLLM_GPU_RESIDENT_MOE_LAYERS", "0-2,5, 8-9", frozenset({0, 1, 2, 5, 8, 9})),
        ("LVLLM_GPU_RESIDENT_MOE_LAYERS", "", frozenset()),
        ("LK_THREADS", "", None),
        ("LK_THREADS", "3", 3),
        ("LK_THREAD_BINDING", "numa_node", "NUMA_NODE"),
        ("LVLLM_MOE_USE_WEIGHT", "to_dtype", "TO_DTYPE"),
        ("LVLLM_MOE_USE_WEIGHT", "int4", "INT4"),
        ("LVLLM_MOE_QUANT_GROUP_SIZE", "32", 32),
        ("LVLLM_MOE_QUANT_GROUP_SIZE", "", None),
        ("LVLLM_MOE_QUANT_ON_GPU", "1", True),
        ("LVLLM_DENSE_USE_WEIGHT", "int8", "INT8"),
        ("LVLLM_DENSE_QUANT_GROUP_SIZE", "64", 64),
    ],
)
def test_parsing(monkeypatch, name, raw, expected):
    monkeypatch.setenv(name, raw)
    assert envs.get(name) == expected


@pytest.mark.parametrize(
    "name, raw",
    [
        ("LVLLM_MOE_NUMA_ENABLED", "2"),
        ("LVLLM_GPU_RESIDENT_MOE_LAYERS", "3-1"),
        ("LVLLM_GPU_RESIDENT_MOE_LAYERS", "a-b"),
        ("LVLLM_GPU_RESIDENT_MOE_LAYERS", "-1"),
        ("LVLLM_GPU_PREFETCH_WINDOW", "0"),
        ("LVLLM_MOE_USE_WEIGHT", "FP4"),
        ("LVLLM_MOE_QUANT_GROUP_SIZE", "24"),
        ("LVLLM_MOE_QUANT_GROUP_SIZE", "0"),
        ("LVLLM_DENSE_USE_WEIGHT", "KEEP"),
        ("LVLLM_DENSE_QUANT_GROUP_SIZE", "100"),
    ],
)
def test_bad_values_name_variable_and_valid_form(monkeypatch, name, raw):
    monkeypatch.setenv(name, raw)
    with pytest.raises(envs.EnvError) as error:
        envs.get(name)
    assert name in str(error.value) and envs.VARIABLES[name].valid in str(error.value)


def test_quantized_dense_layers_need_lk_to_hold_them(monkeypatch):
    from lvllm.settings import Settings

    monkeypatch.setenv("LVLLM_DENSE_USE_WEIGHT", "INT4")
    assert Settings.from_env().dense_weight_mode == "INT4"
    monkeypatch.setenv("LVLLM_DENSE_ON_LK", "OFF")
    with pytest.raises(envs.EnvError, match="LVLLM_DENSE_USE_WEIGHT=INT4.*LVLLM_DENSE_ON_LK=OFF"):
        Settings.from_env()


def test_defaults_when_unset(monkeypatch):
    for name in envs.VARIABLES:
        monkeypatch.delenv(name, raising=False)
    envs.validate_all()
    assert envs.get("LVLLM_MOE_NUMA_ENABLED") is False


@pytest.mark.parametrize(
    "name, raw, bound",
    [
        ("LK_THREADS", "100000", f"is above {4 * envs.usable_cpus()} (4 x the {envs.usable_cpus()} CPU(s)"),
        ("LK_NUMA_NODES", "1000", f"is above {max(8, envs.usable_cpus())}"),
        ("LVLLM_GPU_PREFETCH_WINDOW", "65", "is above 64"),
        ("LVLLM_MOE_QUANT_GROUP_SIZE", "16384", "is above 8192"),
    ],
)
def test_counts_have_a_bound_the_message_states(monkeypatch, name, raw, bound):
    monkeypatch.setenv(name, raw)
    with pytest.raises(envs.EnvError, match=re.escape(f"{name}={raw!r} is not valid: {raw} {bound}")):
        envs.get(name)


def test_the_largest_accepted_thread_count(monkeypatch):
    monkeypatch.setenv("LK_THREADS", str(4 * envs.usable_cpus()))
    assert envs.get("LK_THREADS") == 4 * envs.usable_cpus()


@pytest.mark.parametrize(
    "typed, meant",
    [("LVLM_MOE_NUMA_ENABLED", "LVLLM_MOE_NUMA_ENABLED"), ("lvllm_moe_numa_enabled", "LVLLM_MOE_NUMA_ENABLED"),
     ("LVLLM_MOE_USE_WEIGTH", "LVLLM_MOE_USE_WEIGHT"), ("LK_THREAD", "LK_THREADS"), ("Lk_Isa", "LK_ISA"),
     ("LKISA", "LK_ISA")],
)
def test_near_misses_are_refused_with_the_name_meant(monkeypatch, typed, meant):
    monkeypatch.setenv(typed, "1")
    with pytest.raises(envs.EnvError, match=re.escape(f"{typed} (did you mean {meant}?)")):
        envs.validate_all()


def test_other_programs_variables_are_left_alone(monkeypatch):
    # VLLM_TARGET_DEVICE is vLLM's own, one edit from LVLLM_TARGET_DEVICE.
    for name in ("VLLM_TARGET_DEVICE", "LC_ALL", "LANG", "OMP_NUM_THREADS", "KMP_AFFINITY", "VLLM_CPU_KVCACHE_SPACE"):
        monkeypatch.setenv(name, "1")
    envs.validate_all()
