"""The link between the nodes of a multi-node `vllm serve` (lvllm/node_watch.py), over loopback:
who is told to stop, who is reported lost, and what is ignored. (Two real nodes in two network
namespaces: tests/vllm/test_two_nodes.py.)"""

from __future__ import annotations

import socket
import threading
import time
from types import SimpleNamespace

import pytest

from lvllm.node_watch import HeadLink, NodeLink, link_port

from tests.helpers import free_port

WAIT_S = 10.0


class Events:
    """Callbacks that record what they were called with, and wake a waiter."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.happened = threading.Event()

    def stop(self) -> None:
        self.calls.append(("stop",))
        self.happened.set()

    def lost(self, why: str) -> None:
        self.calls.append(("lost", why))
        self.happened.set()

    def wait(self) -> list[tuple]:
        assert self.happened.wait(WAIT_S), "no callback in time"
        return self.calls


def connected(head: HeadLink, count: int) -> None:
    for _ in range(int(WAIT_S / 0.05)):
        with head._lock:
            if len(head.nodes) == count:
                return
        time.sleep(0.05)
    pytest.fail(f"{count} node(s) not connected in {WAIT_S}s")


def test_a_head_asked_to_stop_stops_its_nodes_and_reports_nothing():
    port, head_events = free_port(), Events()
    head = HeadLink(port, 3, on_lost=head_events.lost)
    nodes = [Events(), Events()]
    for rank, events in enumerate(nodes, start=1):
        NodeLink("127.0.0.1", port, rank, 3, on_stop=events.stop, on_lost=events.lost)
    connected(head, 2)
    head.stop_nodes()
    assert [events.wait() for events in nodes] == [[("stop",)], [("stop",)]]
    assert not head_events.happened.wait(0.5)   # the nodes leaving as asked is no loss


def test_a_node_that_vanishes_stops_the_head_once_naming_it():
    port, head_events = free_port(), Events()
    head = HeadLink(port, 2, on_lost=head_events.lost)
    node = socket.create_connection(("127.0.0.1", port))
    node.sendall(b"lvllm-node 1 2\n")
    connected(head, 1)
    node.close()   # what the kernel does for a killed process
    assert head_events.wait() == [("lost", "node 1 (127.0.0.1) disconnected")]


def test_a_node_whose_head_vanishes_is_told_why():
    server = socket.create_server(("127.0.0.1", 0))
    events = Events()
    NodeLink("127.0.0.1", server.getsockname()[1], 1, 2, on_stop=events.stop, on_lost=events.lost)
    conn, _ = server.accept()
    assert conn.recv(64) == b"lvllm-node 1 2\n"
    conn.close()
    assert events.wait() == [("lost", "the head node 127.0.0.1 disconnected without asking this node to stop")]


def test_a_node_started_before_its_head_waits_for_it():
    port, events = free_port(), Events()
    NodeLink("127.0.0.1", port, 1, 2, on_stop=events.stop, on_lost=events.lost)
    assert not events.happened.wait(1.5)   # nobody listens yet: it keeps trying, quietly
    head = HeadLink(port, 2, on_lost=Events().lost)
    connected(head, 1)
    head.stop_nodes()
    assert events.wait() == [("stop",)]


def test_strangers_are_not_nodes():
    """A connection that does not introduce itself as a node of this launch (another launch's
    node count, a port scanner) is closed, and its going is no loss."""
    port, head_events = free_port(), Events()
    head = HeadLink(port, 2, on_lost=head_events.lost)
    for hello in (b"lvllm-node 1 4\n", b"GET / HTTP/1.0\r\n\r\n", b""):
        stranger = socket.create_connection(("127.0.0.1", port))
        stranger.sendall(hello)
        stranger.shutdown(socket.SHUT_WR)
        assert stranger.recv(64) == b""   # closed by the head
        stranger.close()
    assert head.nodes == []
    assert not head_events.happened.wait(0.5)


def test_a_busy_port_stops_the_head_naming_the_master_port():
    from lvllm.vllm.command import link_nodes

    with socket.create_server(("", 0)) as taken:
        busy = taken.getsockname()[1]
        args = SimpleNamespace(nnodes=2, node_rank=0, master_addr="127.0.0.1", master_port=busy - 1)
        assert link_port(args.master_port) == busy
        with pytest.raises(SystemExit, match=rf"port {busy} \(--master-port {busy - 1} plus 1\)"):
            link_nodes(args)
