"""A real Prometheus (Debian package ``prometheus``) and a real Alertmanager (Debian
package ``prometheus-alertmanager``) on loopback ports, for tests.

:func:`start_prometheus` writes a temporary config that scrapes the given targets
every second and loads the given rule files (evaluated every second), optionally sends
alerts to given Alertmanagers, starts ``prometheus`` with its TSDB in a temp directory,
and waits until it is ready. :func:`start_alertmanager` does the same for an
Alertmanager config (clustering off). ``stop()`` ends that one process, by its PID. A
missing binary is an error, never a skip: install the Debian packages.

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
ALERTMANAGER = "prometheus-alertmanager"  # Debian's name; upstream calls it `alertmanager`
AMTOOL = "amtool"
INSTALL_HINT = (
    "Install the Debian packages `prometheus` and `prometheus-alertmanager` "
    "(apt-get install -y prometheus prometheus-alertmanager)."
)


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
        _stop(self.proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop one process we started (SIGTERM, then SIGKILL), by its PID."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


async def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, what: str) -> None:
    """Poll ``url``/-/ready until it answers 200 (at most 20 s); on failure, stop
    ``proc`` and raise with the tail of its ``log``."""
    deadline = time.monotonic() + 20
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as session:
        while True:
            if proc.poll() is not None:
                text = await asyncio.to_thread(log.read_text)
                raise RuntimeError(f"{what} exited with {proc.returncode}: {text[-2000:]}")
            try:
                async with session.get(url + "/-/ready") as resp:
                    if resp.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                _stop(proc)
                raise RuntimeError(f"{what} did not become ready within 20 s")
            await asyncio.sleep(0.1)


async def start_prometheus(
    workdir: Path,
    targets: Sequence[str],
    *,
    rule_files: Sequence[Path] = (),
    job: str = "metergate",
    interval_s: int = 1,
    alertmanagers: Sequence[str] = (),
) -> PromServer:
    """Start Prometheus scraping ``targets`` (``host:port``) as job ``job`` and wait
    until it is ready (at most 20 s). Alerts go to ``alertmanagers`` (``host:port``)."""
    server = await asyncio.to_thread(
        launch_prometheus,
        workdir,
        targets,
        rule_files=rule_files,
        job=job,
        interval_s=interval_s,
        alertmanagers=alertmanagers,
    )
    await _wait_ready(server.url, server.proc, workdir / "prometheus.log", "prometheus")
    return server


def launch_prometheus(
    workdir: Path,
    targets: Sequence[str],
    *,
    rule_files: Sequence[Path] = (),
    job: str = "metergate",
    interval_s: int = 1,
    alertmanagers: Sequence[str] = (),
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
    if alertmanagers:
        config["alerting"] = {
            "alertmanagers": [{"static_configs": [{"targets": list(alertmanagers)}]}]
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


@dataclass
class AlertmanagerServer:
    """A running Alertmanager; ``url`` is its HTTP root, ``address`` its ``host:port``
    (what a Prometheus ``alertmanagers`` target wants)."""

    url: str
    proc: subprocess.Popen[bytes]
    workdir: Path

    @property
    def address(self) -> str:
        return self.url.removeprefix("http://")

    def stop(self) -> None:
        """Stop this Alertmanager (SIGTERM, then SIGKILL), by its PID."""
        _stop(self.proc)


async def start_alertmanager(workdir: Path, config: dict[str, Any]) -> AlertmanagerServer:
    """Start Alertmanager with ``config`` (written to ``workdir``) on a loopback port,
    clustering off, and wait until it is ready (at most 20 s)."""
    server = await asyncio.to_thread(launch_alertmanager, workdir, config)
    await _wait_ready(server.url, server.proc, workdir / "alertmanager.log", "alertmanager")
    return server


def launch_alertmanager(workdir: Path, config: dict[str, Any]) -> AlertmanagerServer:
    """Write the config and start the process (without waiting for it to be ready)."""
    exe = binary(ALERTMANAGER)
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "alertmanager.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    with (workdir / "alertmanager.log").open("wb") as log:  # the child keeps its own copy
        proc = subprocess.Popen(
            [
                exe,
                f"--config.file={config_path}",
                f"--storage.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--cluster.listen-address=",  # no gossip port on 0.0.0.0:9094
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return AlertmanagerServer(f"http://127.0.0.1:{port}", proc, workdir)
