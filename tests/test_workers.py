"""``metergate serve --workers 2``: two processes on one port, one set of metrics.

The proxy runs as a real subprocess (the console entry point, through ``python -m``),
with a config file, in front of the in-process fake upstream. Requests go through the
OpenAI SDK, each on a new connection so that SO_REUSEPORT spreads them over both
workers; ``/metrics`` (answered by whichever worker accepts the scrape) must count all
of them, and SIGTERM to the supervisor must end every worker.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import openai
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import KEY_A, base_config
from tests.fake_upstream import FakeUpstream

REPO = Path(__file__).resolve().parents[1]
N_REQUESTS = 24
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        out |= {int(c) for c in (task / "children").read_text().split()}
    return out


def _exists(path: str) -> bool:
    return Path(path).exists()


def _text(path: Path) -> str:
    return path.read_text()


def _counter_file_pids(metrics_dir: str) -> set[int]:
    """Pids of the processes that wrote counter values (files ``counter_<pid>.db``)."""
    return {int(p.stem.split("_")[1]) for p in Path(metrics_dir).glob("counter_*.db")}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


async def _wait_for(predicate, timeout_s: float, what: str, log: Path) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; log:\n{_text(log)}")
        await asyncio.sleep(0.1)


def _requests_total(text: str) -> float:
    total = 0.0
    for fam in text_string_to_metric_families(text):
        if fam.name == "metergate_requests":
            total += sum(s.value for s in fam.samples if s.name == "metergate_requests_total")
    return total


async def test_two_workers_share_a_port_and_their_metrics(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    port = _free_port()
    config = base_config(fake.url, f"sqlite:///{tmp_path}/ledger.db")
    config["server"]["port"] = port
    config["server"]["shutdown_grace_s"] = 5
    cfg = tmp_path / "metergate.yaml"
    cfg.write_text(yaml.safe_dump(config))
    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "serve", "--config", str(cfg), "--workers", "2"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    workers: set[int] = set()
    try:
        await _wait_for(
            lambda: _text(log).count("listening on") >= 2, START_TIMEOUT_S, "2 workers", log
        )
        workers = _children(proc.pid)
        assert len(workers) == 2, workers

        for i in range(N_REQUESTS):
            # A new client each time: a new connection, which the kernel may give to
            # either worker.
            async with openai.AsyncOpenAI(
                base_url=f"http://127.0.0.1:{port}/openai/v1", api_key=KEY_A, max_retries=0
            ) as client:
                reply = await client.chat.completions.with_raw_response.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": f"hi {i}"}]
                )
                assert reply.headers["x-metergate-cost-usd"]

        # Both workers took a share: each has its own value files in the metrics dir.
        match = re.search(r"metrics in (\S+)", _text(log))
        assert match, _text(log)
        assert _counter_file_pids(match.group(1)) == workers

        # Whichever worker answers, /metrics counts every request.
        async with aiohttp.ClientSession() as session:
            for _ in range(6):
                async with session.get(
                    f"http://127.0.0.1:{port}/metrics", headers={"Connection": "close"}
                ) as resp:
                    assert resp.status == 200
                    assert _requests_total(await resp.text()) == N_REQUESTS
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.to_thread(proc.wait, STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    assert code == 0, _text(log)
    assert workers and not any(_alive(pid) for pid in workers), _text(log)
    assert not _exists(match.group(1))  # the supervisor removed its metrics dir
