"""A real Prometheus (Debian package ``prometheus``) on a loopback port, for tests.

:func:`start_prometheus` writes a temporary config that scrapes the given targets
every second and loads the given rule files (evaluated every second), starts
``prometheus`` with its TSDB in a temp directory, and waits until it is ready.
:meth:`PromServer.stop` ends that one process, by its PID. A missing binary is an
error, never a skip: install the Debian package ``prometheus``.

The API helpers are async (aiohttp): the proxy under test runs on the test's own event
loop, so a blocking HTTP call here would stall the very scrapes being waited for.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

PROMETHEUS = "prometheus"
PROMTOOL = "promtool"
INSTALL_HINT = "Install the Debian package `prometheus` (apt-get install -y prometheus)."


def binary(name: str) -> str:
    """The path of ``name`` on PATH; fails the test (not skips) when it is missing."""
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed. {INSTALL_HINT}")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PromServer:
    """A running Prometheus; ``url`` is its HTTP API root."""

    url: str
    proc: subprocess.Popen[bytes]
    workdir: Path

    async def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """Evaluate an instant query; raises with Prometheus's error when it fails."""
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = at
        return (await self.api("/api/v1/query", params))["result"]  # type: ignore[no-any-return]

    async def query_range(self, expr: str, start: float, end: float, step: float) -> list[Any]:
        """Evaluate a range query (as a Grafana time-series panel does)."""
        params = {"query": expr, "start": start, "end": end, "step": step}
        return (await self.api("/api/v1/query_range", params))["result"]  # type: ignore[no-any-return]

    async def label_values(self, label: str, match: str) -> list[str]:
        """What a Grafana ``label_values(match, label)`` variable query returns."""
        return await self.api(f"/api/v1/label/{label}/values", {"match[]": match})  # type: ignore[no-any-return]

    async def api(self, path: str, params: dict[str, Any] | None = None) -> Any:
        """GET an API path; the ``data`` of a successful answer, else AssertionError."""
        query = {k: str(v) for k, v in (params or {}).items()}
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
            session.get(self.url + path, params=query) as resp,
        ):
            body = await resp.json(content_type=None)
        if resp.status != 200 or body.get("status") != "success":
            raise AssertionError(
                f"Prometheus answered {resp.status} to {path} {params}: "
                f"{body.get('errorType')}: {body.get('error')}"
            )
        return body["data"]

    def stop(self) -> None:
        """Stop this Prometheus (SIGTERM, then SIGKILL), by its PID."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)


async def start_prometheus(
    workdir: Path,
    targets: Sequence[str],
    *,
    rule_files: Sequence[Path] = (),
    job: str = "metergate",
    interval_s: int = 1,
) -> PromServer:
    """Start Prometheus scraping ``targets`` (``host:port``) as job ``job`` and wait
    until it is ready (at most 20 s)."""
    server = await asyncio.to_thread(
        launch_prometheus, workdir, targets, rule_files=rule_files, job=job, interval_s=interval_s
    )
    proc = server.proc
    deadline = time.monotonic() + 20
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as session:
        while True:
            if proc.poll() is not None:
                log = await asyncio.to_thread((workdir / "prometheus.log").read_text)
                raise RuntimeError(f"prometheus exited with {proc.returncode}: {log[-2000:]}")
            try:
                async with session.get(server.url + "/-/ready") as resp:
                    if resp.status == 200:
                        return server
            except (aiohttp.ClientError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError("prometheus did not become ready within 20 s")
            await asyncio.sleep(0.1)


def launch_prometheus(
    workdir: Path,
    targets: Sequence[str],
    *,
    rule_files: Sequence[Path] = (),
    job: str = "metergate",
    interval_s: int = 1,
) -> PromServer:
    """Write the config and start the process (without waiting for it to be ready)."""
    exe = binary(PROMETHEUS)
    workdir.mkdir(parents=True, exist_ok=True)
    config = {
        "global": {"scrape_interval": f"{interval_s}s", "evaluation_interval": f"{interval_s}s"},
        "rule_files": [str(p.resolve()) for p in rule_files],
        "scrape_configs": [
            {
                "job_name": job,
                "scrape_timeout": f"{interval_s}s",
                "static_configs": [{"targets": list(targets)}],
            }
        ],
    }
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    with (workdir / "prometheus.log").open("wb") as log:  # the child keeps its own copy
        proc = subprocess.Popen(
            [
                exe,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return PromServer(f"http://127.0.0.1:{port}", proc, workdir)
