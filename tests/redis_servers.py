"""Real Redis servers for the tests: one throwaway server and one 3-node Redis Cluster.

Both run on free loopback ports with no persistence (``--save "" --appendonly no``),
start once per test session, and are stopped by PID at its end. Without a
``redis-server`` binary the tests that need one FAIL with instructions; they never
skip, so a green run always means the Redis backends were tested.

Use the fixtures :func:`redis_server` and :func:`redis_cluster` (import them into a
test module, or list this module in ``pytest_plugins``). A server can be stopped and
started again on the same port (:meth:`RedisServer.stop`, :meth:`RedisServer.start`)
to test what happens while Redis is down.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

__all__ = [
    "RedisClusterServers",
    "RedisServer",
    "free_port",
    "redis_cluster",
    "redis_server",
    "require_redis_binaries",
    "start_cluster",
    "start_standalone",
]

_START_TIMEOUT_S = 15.0


def require_redis_binaries() -> tuple[str, str]:
    """Paths of ``redis-server`` and ``redis-cli``; fails the test when either is missing."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        pytest.fail(
            "redis-server and redis-cli are needed to test the Redis store but are not on "
            "PATH. Install them (Debian/Ubuntu: `apt-get install redis-server`), or run "
            "`bash scripts/test.sh`, which installs them.",
            pytrace=False,
        )
    return server, cli


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(*, with_bus: bool = False) -> int:
    """A loopback port that is free now; with ``with_bus``, ``port + 10000`` is free too
    (Redis Cluster's bus port)."""
    for _ in range(200):
        port = random.randrange(20_000, 40_000)
        if _port_is_free(port) and (not with_bus or _port_is_free(port + 10_000)):
            return port
    raise RuntimeError("Found no free loopback port for a test Redis server.")


@dataclass
class RedisServer:
    """One ``redis-server`` process on 127.0.0.1."""

    port: int
    directory: Path
    cluster: bool = False
    extra_args: tuple[str, ...] = ()  # e.g. ("--appendonly", "yes") to survive a kill
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the server (again) on its port and wait until it answers PING."""
        server, _ = require_redis_binaries()
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            server,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        args += self.extra_args
        if self.cluster:
            args += [
                "--cluster-enabled", "yes",
                "--cluster-config-file", f"nodes-{self.port}.conf",
                "--cluster-node-timeout", "5000",
            ]  # fmt: skip
        # Start-up errors (a bad option) go to stderr before the log file is open.
        with open(self.directory / "stderr.log", "ab") as stderr:
            self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + _START_TIMEOUT_S
        client = redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1)
        try:
            while True:
                if self.process.poll() is not None:
                    detail = "".join(
                        path.read_text(errors="replace")
                        for path in (self.directory / "stderr.log", self.directory / "redis.log")
                        if path.exists()
                    )
                    raise RuntimeError(
                        f"redis-server on port {self.port} exited at start-up: {detail[-2000:]}"
                    )
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {self.port} did not start.")
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        """Stop the server by its PID (SIGTERM, then SIGKILL after 10 s)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@dataclass
class RedisClusterServers:
    """A Redis Cluster of masters with no replicas, every slot assigned."""

    nodes: list[RedisServer]

    @property
    def url(self) -> str:
        """A seed URL for ``redis+cluster://``; the client discovers the other nodes."""
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def start_standalone(directory: Path, *extra_args: str) -> RedisServer:
    """Start one server on a free port; retried when the port was taken meanwhile.
    ``extra_args`` go to ``redis-server`` after the defaults (and override them)."""
    for attempt in range(3):
        server = RedisServer(free_port(), directory / f"try{attempt}", extra_args=extra_args)
        try:
            server.start()
        except RuntimeError:
            server.stop()
            if attempt == 2:
                raise
            continue
        return server
    raise AssertionError("unreachable")


def start_cluster(directory: Path, size: int = 3) -> RedisClusterServers:
    """Start ``size`` cluster-enabled servers and join them with ``redis-cli --cluster``."""
    _, cli = require_redis_binaries()
    nodes = [
        RedisServer(port, directory / f"node-{port}", cluster=True)
        for port in (free_port(with_bus=True) for _ in range(size))
    ]
    cluster = RedisClusterServers(nodes)
    try:
        for node in nodes:
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in nodes]
        subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        _wait_cluster_ok(nodes)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait_cluster_ok(nodes: list[RedisServer]) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    for node in nodes:
        client = redis.Redis(port=node.port, socket_timeout=1, decode_responses=True)
        try:
            while client.cluster("INFO").get("cluster_state") != "ok":
                if time.monotonic() > deadline:
                    raise RuntimeError(f"The test Redis Cluster on {node.port} is not ok.")
                time.sleep(0.05)
        finally:
            client.close()


# Shared across modules that import the fixtures: one server per session, whichever
# module asked first; that module's fixture instance stops it at the end.
_STANDALONE: list[RedisServer] = []
_CLUSTER: list[RedisClusterServers] = []


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A throwaway ``redis-server`` for the whole session."""
    if _STANDALONE:
        yield _STANDALONE[0]
        return
    server = start_standalone(tmp_path_factory.mktemp("redis"))
    _STANDALONE.append(server)
    try:
        yield server
    finally:
        _STANDALONE.clear()
        server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    """A real 3-node Redis Cluster on loopback for the whole session."""
    if _CLUSTER:
        yield _CLUSTER[0]
        return
    cluster = start_cluster(tmp_path_factory.mktemp("redis-cluster"))
    _CLUSTER.append(cluster)
    try:
        yield cluster
    finally:
        _CLUSTER.clear()
        cluster.stop()
