"""Two hosts for real: `vllm serve` as vLLM launches a two-node pipeline, one node in each of two
network namespaces joined by a veth pair (each with its own address), lk on in both.

The head (node rank 0) serves the API and pipeline stage 0; the headless node 1 holds stage 1.
Checked: the answers equal one node's with lk off (tiny float32 model, greedy), each node's lk
holds and logs only its own stage's layers, each stage writes its own routing statistics
(LVLLM_EXPERT_STATS) into one file, SIGTERM on the head ends both nodes within
SHUTDOWN_BOUND seconds with status 0, and killing node 1 makes the head exit with a failing
status within NODE_LOST_BOUND seconds; no process outlives either. Needs root (namespaces);
traffic stays inside the namespaces and their loopback; the namespaces go whatever happens.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from e2e_common import BASE_ENV, CPUS, MAX_TOKENS, PROMPTS
from server_common import STARTUP_TIMEOUT, free_port

from lvllm import expert_stats
from lvllm._vllm_cli import command_line

psutil = pytest.importorskip("psutil")

SHUTDOWN_BOUND = 10.0
NODE_LOST_BOUND = 30.0
SUBNET = "10.77.0"
PORT = 8000   # the API port inside the head's namespace
# Waits for /health once, or posts a completion: prints the HTTP status and the JSON body.
CLIENT = """
import json, sys, urllib.request
url, body = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None
request = urllib.request.Request(url, data=body and body.encode(), headers={"Content-Type": "application/json"})
try:
    with urllib.request.urlopen(request, timeout=120) as response:
        print(response.status, response.read().decode())
except OSError as error:
    print(0, json.dumps(str(error)))
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


class Namespaces:
    """Two network namespaces, ``names[i]`` holding veth ``links[i]`` at ``addresses[i]``."""

    def __init__(self):
        tag = f"lv{os.getpid() % 100000}"
        self.names = (f"{tag}n0", f"{tag}n1")
        self.links = (f"{tag}v0", f"{tag}v1")
        self.addresses = (f"{SUBNET}.1", f"{SUBNET}.2")

    def create(self) -> None:
        for name in self.names:
            _ip("netns", "add", name)
        _ip("link", "add", self.links[0], "type", "veth", "peer", "name", self.links[1])
        for name, link, address in zip(self.names, self.links, self.addresses):
            _ip("link", "set", link, "netns", name)
            _ip("-n", name, "addr", "add", f"{address}/24", "dev", link)
            _ip("-n", name, "link", "set", link, "up")
            _ip("-n", name, "link", "set", "lo", "up")

    def remove(self) -> None:
        for name in self.names:
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, timeout=30)
            for pid in pids.stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=30)

    def run(self, node: int, *argv: str, **popen) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.names[node], *argv], **popen)


@pytest.fixture(scope="module")
def namespaces():
    if os.geteuid() != 0:
        pytest.skip("needs root: creates two network namespaces")
    if shutil.which("ip") is None:
        pytest.skip("needs the `ip` command (iproute2) to create network namespaces")
    spaces = Namespaces()
    try:
        spaces.create()
    except subprocess.CalledProcessError as error:
        spaces.remove()
        pytest.skip(f"cannot create network namespaces here: {error.stderr.strip()}")
    yield spaces
    spaces.remove()


class Cluster:
    """`vllm serve` of ``model`` on two nodes (stage 0 on the head, stage 1 on node 1)."""

    def __init__(self, spaces: Namespaces, model, tmp):
        self.spaces, self.tmp = spaces, tmp
        master_port = free_port()
        self.logs = (tmp / "head.log", tmp / "node1.log")
        self.procs = []
        for node in (1, 0):   # the headless node first: it waits for the head
            argv = [*command_line(), "serve", str(model), "--served-model-name", "tiny-moe",
                    "--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "4",
                    "--seed", "0", "--no-enable-prefix-caching", "--disable-log-stats",
                    "--pipeline-parallel-size", "2", "--nnodes", "2", "--node-rank", str(node),
                    "--master-addr", spaces.addresses[0], "--master-port", str(master_port)]
            argv += ["--headless"] if node else ["--host", "127.0.0.1", "--port", str(PORT)]
            self.procs.insert(0, spaces.run(node, *argv, env=self._env(node), cwd=str(tmp),
                                            stdout=self.logs[node].open("w"),
                                            stderr=subprocess.STDOUT, start_new_session=True))

    def _env(self, node: int) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LVLLM_", "LK_"))}
        env.update(BASE_ENV)
        env.update({"LVLLM_MOE_NUMA_ENABLED": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
                    # one file, as on a shared disk: each stage writes its own entry
                    "LVLLM_EXPERT_STATS": str(self.tmp / "stats.json"), "LVLLM_EXPERT_STATS_INTERVAL": "0",
                    "VLLM_CPU_OMP_THREADS_BIND": str(CPUS[node % len(CPUS)]),
                    # gloo and vLLM would take the address the hostname resolves to (loopback here)
                    "GLOO_SOCKET_IFNAME": self.spaces.links[node],
                    "VLLM_HOST_IP": self.spaces.addresses[node]})
        return env

    def client(self, path: str, body: dict | None = None) -> tuple[int, object]:
        argv = [sys.executable, "-c", CLIENT, f"http://127.0.0.1:{PORT}{path}"]
        if body is not None:
            argv.append(json.dumps(body))
        out = subprocess.run(["ip", "netns", "exec", self.spaces.names[0], *argv],
                             capture_output=True, text=True, timeout=180).stdout
        status, _, text = out.partition(" ")
        return int(status or 0), json.loads(text) if text.strip() else None

    def log(self, node: int) -> str:
        return self.logs[node].read_text(errors="replace")

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while self.client("/health")[0] != 200:
            for node, proc in enumerate(self.procs):
                if proc.poll() is not None:
                    pytest.fail(f"node {node} exited with {proc.returncode}:\n{self.log(node)[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"head not healthy in {STARTUP_TIMEOUT}s:\n{self.log(0)[-3000:]}\n"
                            f"node 1:\n{self.log(1)[-3000:]}")
            time.sleep(2)

    def wait_exit(self, node: int, bound: float) -> int | None:
        try:
            return self.procs[node].wait(bound)
        except subprocess.TimeoutExpired:
            return None

    def survivors(self) -> list[str]:
        """Processes left in either node's process group (zombies aside)."""
        groups = {proc.pid for proc in self.procs}
        left = []
        for process in psutil.process_iter(["pid", "name", "status"]):
            try:
                if os.getpgid(process.pid) in groups and process.info["status"] != psutil.STATUS_ZOMBIE:
                    left.append(f"{process.pid} {process.info['name']}")
            except (ProcessLookupError, psutil.Error):
                pass
        return left

    def settle(self) -> list[str]:
        """The survivors once given SHUTDOWN_BOUND seconds; kills them (and the nodes) after."""
        deadline = time.monotonic() + SHUTDOWN_BOUND
        while self.survivors() and time.monotonic() < deadline:
            time.sleep(0.5)
        left = self.survivors()
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(30)
        return left


@pytest.fixture
def cluster(namespaces, tiny_model, tmp_path):
    started = Cluster(namespaces, tiny_model("qwen3_moe"), tmp_path)
    try:
        started.wait_healthy()
        yield started
    finally:
        started.settle()


def test_two_nodes_answer_as_one_and_stop_together(cluster, llm_runs):
    """Same tokens as one node with lk off; each node's lk holds its own stage; SIGTERM on the
    head stops both with status 0, each stage's routing statistics written."""
    one_node = llm_runs("qwen3_moe", lk=False)
    status, answer = cluster.client("/v1/completions", {
        "model": "tiny-moe", "prompt": PROMPTS, "max_tokens": MAX_TOKENS, "temperature": 0,
        "ignore_eos": True, "return_token_ids": True})
    assert status == 200, answer
    tokens = [choice["token_ids"] for choice in sorted(answer["choices"], key=lambda c: c["index"])]
    assert tokens == one_node.tokens
    for node, layers in ((0, "0-1"), (1, "2-3")):
        assert f"stage {node} of 2 (model layers {layers})" in cluster.log(node), cluster.log(node)[-3000:]
        assert f"MoE layer(s) on lk [{layers}]" in cluster.log(node), cluster.log(node)[-3000:]

    sent = time.monotonic()
    cluster.procs[0].send_signal(signal.SIGTERM)
    statuses = [cluster.wait_exit(node, SHUTDOWN_BOUND) for node in (0, 1)]
    took = time.monotonic() - sent
    assert statuses == [0, 0], (statuses, took, cluster.log(0)[-2000:], cluster.log(1)[-2000:])
    assert took < SHUTDOWN_BOUND
    assert cluster.settle() == []
    assert "Traceback" not in cluster.log(0) + cluster.log(1)
    # Each stage's routing statistics, fetched from both nodes before the head stopped: the
    # same tokens went through every layer, 2 picks a token.
    data = json.loads((cluster.tmp / "stats.json").read_text())
    assert {w: sorted(e["layers"]) for w, e in data["writers"].items()} == {"dp0-pp0": ["0", "1"],
                                                                           "dp0-pp1": ["2", "3"]}
    tokens = sum(len(p) + len(g) - 1 for p, g in zip(one_node.prompt_token_ids, one_node.tokens))
    assert {sum(c) for c in expert_stats.layer_totals(data).values()} == {2 * tokens}, data


def test_head_fails_when_node_1_dies(cluster):
    """Node 1 killed (its whole process group, as a crashed host): the head exits with a failing
    status within NODE_LOST_BOUND seconds, saying which node it lost; nothing is left running."""
    killed = time.monotonic()
    os.killpg(cluster.procs[1].pid, signal.SIGKILL)
    status = cluster.wait_exit(0, NODE_LOST_BOUND)
    assert status not in (None, 0), (status, cluster.log(0)[-3000:])
    assert time.monotonic() - killed < NODE_LOST_BOUND
    assert f"node 1 ({cluster.spaces.addresses[1]}) disconnected" in cluster.log(0)
    assert cluster.settle() == []
