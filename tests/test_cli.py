"""lvllm's `vllm` command: a served model that is a path to nothing is refused before vLLM
would take it for a Hugging Face repo id."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lvllm._vllm_cli import command_line, looks_like_path, refuse_missing_model, served_model

from tests.helpers import serve_arguments


@pytest.mark.parametrize(
    "argv, model",
    [
        (["vllm", "serve", "Qwen/Qwen3-30B-A3B", "--port", "8001"], "Qwen/Qwen3-30B-A3B"),
        (["vllm", "serve", "--port", "8001", "--model", "/data/m"], "/data/m"),
        (["vllm", "serve", "--model=/data/m"], "/data/m"),
        (["vllm", "serve", "/data/a", "--model", "/data/b"], "/data/a"),
        (["vllm", "bench", "serve", "--model", "x"], None),
        (["vllm", "serve"], None),
    ],
)
def test_the_served_model_from_the_command_line(argv, model):
    assert served_model(argv) == model


def test_the_served_model_from_the_config_file(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("model: /data/from-file\nport: 8000\n")
    assert served_model(["vllm", "serve", "--config", str(config)]) == "/data/from-file"
    assert served_model(["vllm", "serve", "/data/cli", "--config", str(config)]) == "/data/cli"


def test_paths_and_repo_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "build").mkdir()
    for path in ("/abs/model", "./model", "../model", "~/model", "model/", "a/b/c", "build/tiny-model"):
        assert looks_like_path(path), path
    for repo in ("Qwen/Qwen3-30B-A3B", "gpt2", "org/name"):
        assert not looks_like_path(repo), repo


def test_a_missing_directory_is_named_and_an_existing_one_passes(tmp_path):
    missing = tmp_path / "no-such-model"
    message = refuse_missing_model(["vllm", "serve", str(missing)])
    assert f"'{missing}'" in message and "looks like a path" in message, message
    assert f"{missing} does not exist" in message, message
    missing.mkdir()
    assert refuse_missing_model(["vllm", "serve", str(missing)]) is None
    assert refuse_missing_model(["vllm", "serve", "Qwen/Qwen3-30B-A3B"]) is None


def test_the_command_stops_with_the_message(tmp_path):
    done = subprocess.run([*command_line(), "serve", str(tmp_path / "absent")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert "looks like a path" in done.stderr and "Repo id" not in done.stderr


def test_importing_the_command_changes_nothing():
    """The command's hooks are installed by its main(), not by importing it: a script that
    imports it (for command_line) keeps vLLM, logging and importlib.metadata as they were."""
    probe = ("import importlib.metadata, logging, sys\n"
             "version = importlib.metadata.version\n"
             "import lvllm._vllm_cli\n"
             "from lvllm.vllm.command import TRITON_WITHOUT_CPU_BACKEND\n"
             "print(sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')),"
             " importlib.metadata.version is version,"
             " sum(len(logging.getLogger(n).filters) for n, _ in TRITON_WITHOUT_CPU_BACKEND))\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]", "True", "0"]


def test_triton_messages_become_one_explanation(capsys):
    """vLLM's three messages about Triton's missing CPU backend are dropped wherever they are
    logged; the command's own process explains once. The e2e server tests check the log."""
    import logging

    from lvllm.vllm import command

    command.quiet_triton_messages(explain=False)
    command.quiet_triton_messages(explain=True)   # idempotent: one filter per logger
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    for name, start in command.TRITON_WITHOUT_CPU_BACKEND:
        logger = logging.getLogger(name)
        assert sum(isinstance(f, command.TritonMessageFilter) for f in logger.filters) == 1
        logger.addHandler(handler)
    try:
        for name, start in command.TRITON_WITHOUT_CPU_BACKEND * 2:
            logging.getLogger(name).warning(start + " and the rest of vLLM's sentence.")
        logging.getLogger("vllm.platforms.cpu").warning("an unrelated warning")
    finally:
        for name, _ in command.TRITON_WITHOUT_CPU_BACKEND:
            logging.getLogger(name).removeHandler(handler)
    assert [r.getMessage() for r in records] == ["an unrelated warning"]
    assert capsys.readouterr().err.count(command.TRITON_EXPLANATION) == 1


def test_warnings_quieted_for_vllms_processes(monkeypatch):
    from lvllm.vllm.command import QUIET_WARNINGS, quiet_warnings

    monkeypatch.setenv("PYTHONWARNINGS", "error::DeprecationWarning")
    quiet_warnings()
    quiet_warnings()
    assert os.environ["PYTHONWARNINGS"].split(",") == ["error::DeprecationWarning", *QUIET_WARNINGS]


@pytest.mark.parametrize("text, cli, expected", [
    ("model: /m\nenable-prefix-caching: false\n", (), False),
    ("model: /m\nenable_prefix_caching: false\n", (), False),
    ("model: /m\nenable-prefix-caching: true\n", (), True),
    ("model: /m\n", (), None),
    ("model: /m\nenable-prefix-caching: false\n", ("--enable-prefix-caching",), True),
])
def test_a_config_files_false_turns_the_flag_off(tmp_path, text, cli, expected):
    """vLLM 0.32 drops `false` from a config file (its top-level parser knows no --no-...)."""
    from lvllm.vllm import command

    command.install_config_file_booleans()
    args = serve_arguments(text, tmp_path, *cli)
    assert args.model == "/m" or args.model_tag == "/m"
    assert args.enable_prefix_caching is expected
