"""Shared helpers of the tests that serve the tiny model with `vllm serve --config ...`
(lvllm's `vllm` command, lk on): start a server and wait until it is healthy, ask it for a
completion, stop it as a service manager does and make sure no process is left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from e2e_common import BASE_ENV, ROOT

from tests.helpers import free_port

from lvllm._vllm_cli import command_line

requests = pytest.importorskip("requests")
psutil = pytest.importorskip("psutil")

STARTUP_TIMEOUT = 300


def write_config(path: Path, model: Path, port: int, extra: tuple[str, ...] = ()) -> Path:
    """examples/tiny/config.yaml with ``model`` and ``port`` (and ``extra`` lines)."""
    lines = list(extra)
    for line in (ROOT / "examples" / "tiny" / "config.yaml").read_text().splitlines():
        if line.startswith("model:"):
            line = f"model: {model}"
        elif line.startswith("port:"):
            line = f"port: {port}"
        lines.append(line)
    path.write_text("\n".join(lines) + "\n")
    return path


def server_env(**overrides) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LVLLM_", "LK_"))}
    env.update(BASE_ENV)
    env.update(overrides)
    return env


def start_server(config: Path, log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [*command_line(), "serve", "--config", str(config)],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=str(ROOT),
        start_new_session=True,
    )


def stop(proc: subprocess.Popen, timeout: float = 60) -> list[int]:
    """SIGTERM (what a service manager sends), wait; returns pids that survived."""
    family = [proc.pid]
    try:
        family += [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        pass
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    deadline = time.time() + 30
    alive = family
    while time.time() < deadline:
        alive = [p for p in family if psutil.pid_exists(p)
                 and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            break
        time.sleep(0.5)
    for pid in alive:  # do not leave strays behind for the rest of the suite
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return alive


def start_healthy(model: Path, tmp: Path, extra: tuple[str, ...] = (), **env) -> dict:
    """`vllm serve` of ``model`` with lk on (``extra`` config lines, ``env``), once /health
    answers: {"base", "proc", "log"}."""
    port = free_port()
    config = write_config(tmp / "config.yaml", model, port, extra)
    log = tmp / "server.log"
    proc = start_server(config, log, server_env(LVLLM_MOE_NUMA_ENABLED="1", **env))
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + STARTUP_TIMEOUT
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if requests.get(f"{base}/health", timeout=2).status_code == 200:
                return {"base": base, "proc": proc, "log": log}
        except requests.ConnectionError:
            pass
        if time.time() > deadline:
            stop(proc)
            pytest.fail(f"server not healthy in {STARTUP_TIMEOUT}s:\n{log.read_text()[-4000:]}")
        time.sleep(1)


def completion(base: str, prompt: str, stream: bool = False, max_tokens: int = 8):
    body = {"model": "tiny-moe", "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": stream}
    return requests.post(f"{base}/v1/completions", json=body, timeout=120, stream=stream)
