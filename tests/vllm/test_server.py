"""A real `vllm serve --config ...` with lk on: endpoints, streaming, concurrency, shutdown;
and bad LVLLM_* / LK_* values refused at start-up."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from server_common import (STARTUP_TIMEOUT, completion, free_port, server_env, start_healthy, start_server, stop,
                           write_config)

requests = pytest.importorskip("requests")


@pytest.fixture(scope="session")
def server(tiny_model, tmp_path_factory):
    info = {**start_healthy(tiny_model("qwen3_moe"), tmp_path_factory.mktemp("server")), "stopped": False}
    yield info
    if not info["stopped"]:
        stop(info["proc"])


def test_health_and_models(server):
    assert requests.get(f"{server['base']}/health", timeout=10).status_code == 200
    models = requests.get(f"{server['base']}/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == ["tiny-moe"]


def test_lk_loaded_in_worker(server):
    text = server["log"].read_text()
    assert "lvllm: 4 MoE layer(s) on lk [0-3]" in text, text[-4000:]


def read_stream(response) -> list[dict]:
    chunks = []
    for line in response.iter_lines():
        if not line:
            continue
        data = line.decode().removeprefix("data: ")
        if data == "[DONE]":
            chunks.append({"done": True})
            break
        chunks.append(json.loads(data))
    return chunks


def test_completions(server):
    out = completion(server["base"], "the model reads").json()
    text = out["choices"][0]["text"]
    assert out["usage"]["completion_tokens"] == 8 and text

    chunks = read_stream(completion(server["base"], "the model reads", stream=True))
    assert chunks[-1] == {"done": True}
    streamed = "".join(c["choices"][0]["text"] for c in chunks[:-1] if c.get("choices"))
    assert streamed == text


def test_chat_completions(server):
    body = {"model": "tiny-moe", "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 6, "temperature": 0}
    out = requests.post(f"{server['base']}/v1/chat/completions", json=body, timeout=120)
    assert out.status_code == 200, out.text
    message = out.json()["choices"][0]["message"]
    assert message["role"] == "assistant"

    body["stream"] = True
    response = requests.post(f"{server['base']}/v1/chat/completions", json=body,
                             timeout=120, stream=True)
    chunks = read_stream(response)
    assert chunks[-1] == {"done": True}
    streamed = "".join(c["choices"][0]["delta"].get("content") or ""
                       for c in chunks[:-1] if c.get("choices"))
    assert streamed == (message["content"] or "")


def test_eight_concurrent_clients(server):
    prompts = [f"Question {i}: what reads the weights" for i in range(8)]
    alone = [completion(server["base"], p).json()["choices"][0]["text"] for p in prompts[:2]]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda p: completion(server["base"], p).json(), prompts))
    assert all(r["usage"]["completion_tokens"] == 8 for r in results)
    # Batched with others, greedy answers are the ones given alone.
    assert [r["choices"][0]["text"] for r in results[:2]] == alone


def test_clean_shutdown(server):
    """Runs last in this module: SIGTERM leaves no process behind, the status is 0 and the log
    has no traceback nor Triton's leak report."""
    survivors = stop(server["proc"])
    server["stopped"] = True
    assert survivors == []
    assert server["proc"].returncode == 0
    log = server["log"].read_text()
    for noise in ("Traceback", "nanobind: leaked", "Triton is installed, but"):
        assert noise not in log, log[-4000:]


def failed_startup(config: Path, log: Path, env: dict) -> str:
    """Start a server that must stop by itself: its log, once it exited non-zero and left
    no process behind."""
    proc = start_server(config, log, env)
    try:
        proc.wait(STARTUP_TIMEOUT)
    finally:
        survivors = stop(proc)
    text = log.read_text()
    assert proc.returncode != 0, text[-3000:]
    assert survivors == []
    return text


# traceback: whether vLLM's processes print tracebacks around the message. The variables are
# checked in the API server before vLLM starts, with the message alone; layer indices only
# where the model is built, in the worker, whose failure vLLM reports with tracebacks.
@pytest.mark.parametrize("name, value, needle, traceback", [
    ("LVLLM_GPU_RESIDENT_MOE_LAYERS", "3-1", "layer indices and ranges", False),
    ("LVLLM_GPU_RESIDENT_MOE_LAYERS", "0,99", "valid indices 0-3", True),
    ("LK_THREADS", "zero", "integer from 1 to", False),
    ("LK_THREADS", "100000", "is above", False),
    ("LVLM_MOE_NUMA_ENABLED", "1", "did you mean LVLLM_MOE_NUMA_ENABLED?", False),
])
def test_bad_values_stop_startup(tiny_model, tmp_path, name, value, needle, traceback):
    config = write_config(tmp_path / "config.yaml", tiny_model("qwen3_moe"), free_port())
    text = failed_startup(config, tmp_path / "server.log",
                          server_env(LVLLM_MOE_NUMA_ENABLED="1", **{name: value}))
    assert name in text and needle in text, text[-3000:]
    assert traceback or "Traceback" not in text, text[-3000:]


def test_expert_parallel_is_served(tiny_model, tmp_path):
    """--enable-expert-parallel with lk on, as a user serves it: each of the two ranks logs
    its lk layers, a completion answers in full, SIGTERM ends every process."""
    info = start_healthy(tiny_model("qwen3_moe"), tmp_path,
                         ("tensor-parallel-size: 2", "enable-expert-parallel: true"),
                         VLLM_CPU_OMP_THREADS_BIND="0|1")
    try:
        answer = completion(info["base"], "Hello", max_tokens=8).json()
        assert answer["usage"]["completion_tokens"] == 8, answer
    finally:
        survivors = stop(info["proc"])
    text = info["log"].read_text()
    assert text.count("lvllm: 4 MoE layer(s) on lk [0-3]") == 2, text[-4000:]
    assert survivors == [] and info["proc"].returncode == 0, text[-3000:]
