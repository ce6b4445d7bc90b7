"""The link between the nodes of one multi-node ``vllm serve``, so that no node outlives the others.

vLLM's multi-node launch (``--nnodes N --node-rank R --master-addr HOST``) leaves each node on its
own: a node whose head stops (or dies) keeps waiting for work that never comes, and a head whose
node died notices only when a request hangs. Here the head (node rank 0) listens on
``master_port + 1``; every other node connects, says who it is, and holds the connection open:

- the head stopping as asked (SIGTERM, Ctrl-C) sends ``stop`` to each node, which stops too (status 0);
- a node's connection closing without that (process killed, host lost) stops the head with status 1;
- the head's connection closing without ``stop`` stops the node with status 1.

A lost host (no FIN, no RST) is found by TCP keepalive within about 11 s.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Callable

PORT_OFFSET = 1   # the link's port: vLLM's --master-port plus this
HELLO = "lvllm-node"
STOP = b"stop\n"
CONNECT_RETRY_S = 1.0


def link_port(master_port: int) -> int:
    return master_port + PORT_OFFSET


def _keepalive(sock: socket.socket) -> None:
    """Probe an idle peer after 5 s, every 2 s, 3 times: a vanished host is found in ~11 s."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def _closed_or_line(conn: socket.socket) -> bytes:
    """The next line the peer sends, or b"" once the connection is closed or broken."""
    data = b""
    while not data.endswith(b"\n"):
        try:
            chunk = conn.recv(64)
        except OSError:
            return b""
        if not chunk:
            return b""
        data += chunk
    return data


class HeadLink:
    """The head's side: accepts the other nodes, tells them to stop, reports one that vanished
    through ``on_lost(description)``, called at most once."""

    def __init__(self, port: int, nnodes: int, on_lost: Callable[[str], None]):
        self.nnodes, self.on_lost = nnodes, on_lost
        self.stopping = False
        self.nodes: list[socket.socket] = []
        self._lock = threading.Lock()
        self._server = socket.create_server(("", port), reuse_port=False)
        threading.Thread(target=self._accept, name="lvllm-head-link", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, address = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._watch, args=(conn, address[0]), daemon=True).start()

    def _watch(self, conn: socket.socket, address: str) -> None:
        hello = _closed_or_line(conn).decode(errors="replace").split()
        if len(hello) != 3 or hello[0] != HELLO or hello[2] != str(self.nnodes):
            conn.close()   # not one of this launch's nodes
            return
        _keepalive(conn)
        with self._lock:
            if self.stopping:
                conn.sendall(STOP)
                return
            self.nodes.append(conn)
        while _closed_or_line(conn):
            pass
        with self._lock:
            lost, self.stopping = not self.stopping, True
        if lost:
            self.on_lost(f"node {hello[1]} ({address}) disconnected")

    def stop_nodes(self) -> None:
        """Tell every connected node to stop; nodes connecting later are told at once."""
        with self._lock:
            self.stopping = True
            nodes, self.nodes = self.nodes, []
        for conn in nodes:
            try:
                conn.sendall(STOP)
            except OSError:
                pass


class NodeLink:
    """A node's side: connects to the head (retrying until it listens), then calls
    ``on_stop()`` when asked to stop or ``on_lost(description)`` when the head vanished."""

    def __init__(self, host: str, port: int, node_rank: int, nnodes: int,
                 on_stop: Callable[[], None], on_lost: Callable[[str], None]):
        self.host, self.port = host, port
        self.hello = f"{HELLO} {node_rank} {nnodes}\n".encode()
        self.on_stop, self.on_lost = on_stop, on_lost
        threading.Thread(target=self._run, name="lvllm-node-link", daemon=True).start()

    def _connect(self) -> socket.socket:
        while True:
            try:
                conn = socket.create_connection((self.host, self.port), timeout=5)
                conn.settimeout(None)
                _keepalive(conn)
                conn.sendall(self.hello)
                return conn
            except OSError:
                time.sleep(CONNECT_RETRY_S)

    def _run(self) -> None:
        conn = self._connect()
        if _closed_or_line(conn) == STOP:
            self.on_stop()
        else:
            self.on_lost(f"the head node {self.host} disconnected without asking this node to stop")
