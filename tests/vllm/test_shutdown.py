"""Stopping a served model the way operators do, with lvllm's `vllm` command and lk on.

SIGTERM (a service manager) or SIGINT to the process group (Ctrl-C in a terminal) with 4 to 8
streams open: the server ends every stream with a terminal event the client sees (an error
event, then [DONE]), exits with status 0 within SHUTDOWN_BOUND seconds, leaving no process
behind, and its log holds no traceback and none of the noise lvllm quiets; the routing
statistics (LVLLM_EXPERT_STATS) it counted are in their file; `--sigterms N`
sets how many servers are stopped so (CI: 4). A worker or the engine process killed with
SIGKILL: the server exits with a failing status.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from server_common import completion, start_healthy, stop

from lvllm import expert_stats

requests = pytest.importorskip("requests")
psutil = pytest.importorskip("psutil")

SHUTDOWN_BOUND = 10.0
# Long enough to be running when the signal comes, within examples/tiny/config.yaml's
# max-model-len (512) with the prompt.
STREAM_TOKENS = 400
# The process layout users get (the suite's default keeps the worker inside EngineCore).
PROCESSES = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}


class Stream:
    """One streaming completion read to its end in a thread; records how it ended."""

    def __init__(self, base: str, started: threading.Semaphore):
        self.base, self.started = base, started
        self.chunks, self.ending, self.ended_at = 0, None, None

    def run(self) -> None:
        try:
            response = completion(self.base, "each core splits two experts again.", stream=True,
                                  max_tokens=STREAM_TOKENS)
            if response.status_code != 200:   # refused: no stream to end
                self.ending = f"HTTP {response.status_code}: {response.text[:300]}"
                self.started.release()
                return
            for line in response.iter_lines():
                if not line:
                    continue
                data = line.decode().removeprefix("data: ")
                if data == "[DONE]":
                    self.ending = self.ending or "done"
                    break
                if "error" in json.loads(data):
                    self.ending = "error event"
                self.chunks += 1
                if self.chunks == 1:
                    self.started.release()
            else:
                self.ending = self.ending or "closed without [DONE]"
        except (requests.RequestException, ValueError) as error:
            self.ending = f"broken: {error}"
        self.ended_at = time.monotonic()
        if self.chunks == 0:
            self.started.release()


def family(proc) -> list:
    try:
        return [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


QUIETED = ("Traceback", "nanobind: leaked", "Triton is installed, but", "Triton is not installed",
           "resource_tracker", "FutureWarning")


def interrupt(proc, attempt: int) -> None:
    """SIGTERM to the server, or every other time SIGINT to its process group, as Ctrl-C does."""
    if attempt % 2:
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)


def test_sigterm_ends_every_open_stream_and_exits_in_time(tiny_model, tmp_path, sigterms):
    model = tiny_model("qwen3_moe")
    for attempt in range(sigterms):
        count = 4 + attempt % 5
        (tmp_path / f"run{attempt}").mkdir()
        stats = tmp_path / f"run{attempt}" / "stats.json"
        server = start_healthy(model, tmp_path / f"run{attempt}", **PROCESSES, LVLLM_EXPERT_STATS=str(stats),
                               LVLLM_EXPERT_STATS_INTERVAL="0")
        proc, processes = server["proc"], family(server["proc"])
        started = threading.Semaphore(0)
        streams = [Stream(server["base"], started) for _ in range(count)]
        with ThreadPoolExecutor(count) as pool:
            for stream in streams:
                pool.submit(stream.run)
            for _ in streams:
                assert started.acquire(timeout=120), f"attempt {attempt}: a stream never started"
            sent = time.monotonic()
            interrupt(proc, attempt)
            try:
                proc.wait(SHUTDOWN_BOUND + 20)
            finally:
                survivors = stop(proc)
            exited = time.monotonic() - sent
        full_log = server["log"].read_text()
        log = full_log[-3000:]
        assert not [noise for noise in QUIETED if noise in full_log], (attempt, full_log[-6000:])
        assert full_log.count("the installed Triton has no CPU backend") <= 1
        assert exited <= SHUTDOWN_BOUND, f"attempt {attempt}: exited {exited:.1f} s after SIGTERM\n{log}"
        assert proc.returncode == 0, f"attempt {attempt}: status {proc.returncode}\n{log}"
        for stream in streams:
            assert stream.chunks > 0 and stream.ending in ("error event", "done"), (attempt, stream.ending, log)
            assert stream.ended_at - sent <= SHUTDOWN_BOUND, (attempt, stream.ended_at - sent)
        _, left = psutil.wait_procs([p for p in processes if p.is_running()], timeout=5)   # the resource tracker takes a moment
        left = [p for p in left if p.is_running() and p.status() != "zombie"]
        assert survivors == [] and not left, (attempt, [(p.pid, p.cmdline()) for p in left])
        # The routing statistics, written only at shutdown here, survived it: every token the
        # streams ran went through each of the 4 layers, 2 picks a token.
        totals = expert_stats.layer_totals(json.loads(stats.read_text()))
        assert sorted(totals) == [0, 1, 2, 3] and len({sum(c) for c in totals.values()}) == 1, totals
        assert sum(totals[0]) > 0 and sum(totals[0]) % 2 == 0, totals
        assert "lvllm: routing statistics of 4 MoE layer(s)" in full_log


@pytest.mark.parametrize("victim", ["VLLM::Worker", "VLLM::EngineCore"])
def test_a_killed_engine_gives_a_failing_status(tiny_model, tmp_path, victim):
    server = start_healthy(tiny_model("qwen3_moe"), tmp_path, **PROCESSES)
    proc = server["proc"]
    try:
        targets = [p for p in family(proc)[1:] if victim in " ".join(p.cmdline()) or p.name() == victim]
        assert targets, f"no {victim} process among {[p.name() for p in family(proc)]}"
        targets[0].kill()
        proc.wait(60)
    finally:
        survivors = stop(proc)
    assert proc.returncode not in (0, None), server["log"].read_text()[-3000:]
    assert "the engine died" in server["log"].read_text()
    assert survivors == []
