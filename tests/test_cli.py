"""The ``metergate`` command as a user runs it: a real ``serve`` process, ``kill -9``,
restart, and the report, ledger and prices commands."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import yaml

from proxy.store import open_store
from tests.conftest import KEY_A, KEY_B, base_config
from tests.fake_upstream import FakeUpstream

METERGATE = [sys.executable, "-m", "proxy.cli"]
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*METERGATE, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


class Served:
    """A ``metergate serve`` child process."""

    def __init__(self, config: Path, port: int) -> None:
        self.config, self.port = config, port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        # Popen returns at once; the readiness wait below is the async part.
        self.proc = subprocess.Popen(
            [*METERGATE, "serve", "--config", str(self.config), "--log-level", "WARNING"],
            cwd=self.config.parent,
        )
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession() as s:
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, "metergate serve exited during start-up"
                try:
                    async with s.get(f"{self.url}/readyz") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise AssertionError("metergate serve did not become ready in 30 s")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)


@pytest.fixture
async def served(fake: FakeUpstream, tmp_path: Path) -> AsyncIterator[Served]:
    config = base_config(fake.url, f"sqlite:///{tmp_path}/ledger.db")
    config["server"]["port"] = _free_port()
    path = tmp_path / "metergate.yaml"
    path.write_text(yaml.safe_dump(config))
    server = Served(path, config["server"]["port"])
    await server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


async def _post(s: aiohttp.ClientSession, url: str, key: str, tags: str = "") -> str:
    headers = {"Authorization": f"Bearer {key}"}
    if tags:
        headers["X-Metergate-Tags"] = tags
    async with s.post(f"{url}/openai/v1/chat/completions", json=CHAT, headers=headers) as r:
        await r.read()
        assert r.status == 200
        return r.headers["X-Metergate-Request-Id"]


async def test_kill_9_loses_no_completed_request_and_restart_keeps_the_ledger(
    served: Served, tmp_path: Path
) -> None:
    completed: list[str] = []
    stop = asyncio.Event()
    enough = asyncio.Event()

    async def client() -> None:
        async with aiohttp.ClientSession() as s:
            while not stop.is_set():
                try:
                    completed.append(await _post(s, served.url, KEY_A))
                    if len(completed) >= 300:
                        enough.set()
                except (aiohttp.ClientError, AssertionError):
                    return  # the server died under us: that request did not complete

    tasks = [asyncio.create_task(client()) for _ in range(16)]
    await asyncio.wait_for(enough.wait(), timeout=60)
    served.kill(signal.SIGKILL)
    stop.set()
    await asyncio.gather(*tasks)

    store = open_store(f"sqlite:///{tmp_path}/ledger.db")
    await store.open()
    try:
        ids = {r.id for r in await store.ledger_records()}
    finally:
        await store.close()
    missing = [rid for rid in completed if rid not in ids]
    assert not missing, f"{len(missing)} completed requests are missing from the ledger"

    # The restarted proxy serves on the same file, and the ledger keeps growing.
    await served.start()
    async with aiohttp.ClientSession() as s:
        new_id = await _post(s, served.url, KEY_B)
    served.kill(signal.SIGTERM)
    result = _run("ledger", "show", new_id, "--config", str(served.config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["key_name"] == "app-b"


async def test_report_groups_and_totals_exactly(served: Served, tmp_path: Path) -> None:
    async with aiohttp.ClientSession() as s:
        for i in range(6):
            await _post(s, served.url, KEY_A if i % 2 else KEY_B, tags="exp-1" if i < 3 else "")
    served.kill(signal.SIGTERM)

    table = _run(
        "report", "--config", str(served.config), "--by", "team", "--since", "1h", cwd=tmp_path
    )
    assert table.returncode == 0, table.stderr
    assert "search" in table.stdout and "support" in table.stdout and "TOTAL" in table.stdout

    as_json = _run(
        "report",
        "--config",
        str(served.config),
        "--by",
        "team,model",
        "--format",
        "json",
        cwd=tmp_path,
    )
    data = json.loads(as_json.stdout)
    assert sum(r["cost_nanos"] for r in data["rows"]) == data["total"]["cost_nanos"] > 0
    assert sum(r["requests"] for r in data["rows"]) == 6

    by_tag = _run(
        "report", "--config", str(served.config), "--by", "tag", "--format", "csv", cwd=tmp_path
    )
    lines = by_tag.stdout.strip().splitlines()
    assert lines[0].startswith("tag,")
    assert {line.split(",")[0] for line in lines[1:]} == {"exp-1", "batch", "(none)"}

    listed = _run("ledger", "list", "--config", str(served.config), cwd=tmp_path)
    records = [json.loads(line) for line in listed.stdout.splitlines()]
    assert len(records) == 6
    assert sum(r["cost_nanos"] for r in records) == data["total"]["cost_nanos"]

    bad = _run("report", "--config", str(served.config), "--by", "colour", cwd=tmp_path)
    assert bad.returncode == 2 and "colour" in bad.stderr


def test_prices_check(workdir: Path) -> None:
    ok = _run("prices", "check", "gpt-4o-2024-08-06", cwd=workdir)
    assert ok.returncode == 0, ok.stderr
    assert "gpt-4o" in ok.stdout
    missing = _run("prices", "check", "no-such-model-xyz", cwd=workdir)
    assert missing.returncode == 1 and "no price" in missing.stderr


def test_serve_refuses_a_bad_config_naming_the_field(workdir: Path) -> None:
    path = workdir / "bad.yaml"
    path.write_text("upstreams: {openai: {url: 'ftp://nope'}}\n")
    result = _run("serve", "--config", str(path), cwd=workdir)
    assert result.returncode == 2
    assert "upstreams.openai.url" in result.stderr


def test_example_config_serves_on_a_fresh_machine(tmp_path: Path) -> None:
    """The README's run command: the example config starts with no environment set."""
    port = _free_port()
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    proc = subprocess.Popen(
        [
            *METERGATE,
            "serve",
            "--config",
            str(repo / "config/metergate.example.yaml"),
            "--port",
            str(port),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                time.sleep(0.05)
        else:
            raise AssertionError("the example config did not start listening in 30 s")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert (tmp_path / "metergate.db").exists()
