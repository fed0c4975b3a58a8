"""Graceful shutdown of ``metergate serve``: SIGTERM while 50 streams are in flight.

The process must stop accepting connections at once, let every stream in flight run to
its end within ``server.shutdown_grace_s``, settle every reservation and commit every
ledger record, and exit 0. The ledger then reconciles exactly with the fake upstream's
own record of the usage it reported, and no budget money is left held.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from proxy.budget import budget_key, parse_budget, period_window
from proxy.store import open_store
from tests.fake_upstream import FakeUpstream
from tests.test_budget_replicas import (
    MESSAGES,
    MODEL,
    ReplicaFactory,
    independent_cost,
    replica_config,
    replicas,  # noqa: F401  (the fixture is used by name)
)

STREAMS = 50
CHUNKS = 30
CHUNK_DELAY_MS = 100  # each stream lasts about 3 s, well past the SIGTERM
GRACE_S = 20
BUDGET = {"name": "all", "scope": {}, "limit_usd": "1000", "period": "month"}


@pytest.mark.timeout(120)
async def test_sigterm_lets_50_streams_finish_and_settles_everything(
    fake: FakeUpstream, replicas: ReplicaFactory, tmp_path: Path
) -> None:
    store_url = f"sqlite:///{tmp_path}/ledger.db"
    config = replica_config(fake.url, store_url, [BUDGET], tmp_path)
    config["server"]["shutdown_grace_s"] = GRACE_S
    (replica,) = await replicas(config, 1)
    client = replica.openai()
    started = 0
    all_started = asyncio.Event()
    headers = {
        "X-Fake-Chunks": str(CHUNKS),
        "X-Fake-Chunk-Delay-Ms": str(CHUNK_DELAY_MS),
        "X-Fake-Input": "120",
        "X-Fake-Output": str(CHUNKS),
    }

    async def one_stream() -> tuple[int, int | None]:
        nonlocal started
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=100,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=headers,
        )
        content_chunks, completion_tokens, first = 0, None, True
        async for chunk in stream:
            if first:
                first = False
                started += 1
                if started == STREAMS:
                    all_started.set()
            if chunk.choices and chunk.choices[0].delta.content:
                content_chunks += 1
            if chunk.usage is not None:
                completion_tokens = chunk.usage.completion_tokens
        return content_chunks, completion_tokens

    try:
        runs = asyncio.gather(*(one_stream() for _ in range(STREAMS)))
        async with asyncio.timeout(30):
            await all_started.wait()
        assert replica.proc is not None
        proc = replica.proc
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()

        # It stops accepting: a new connection is refused while the streams still run.
        refused = False
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                try:
                    async with session.get(f"{replica.url}/healthz") as r:
                        await r.read()
                except aiohttp.ClientConnectionError:
                    refused = True
                    break
                await asyncio.sleep(0.02)
        assert refused, "the proxy kept accepting connections after SIGTERM"

        results = await asyncio.wait_for(runs, GRACE_S)
    finally:
        await client.close()
    # Every stream ran to its end: all content chunks and the final usage.
    assert results == [(CHUNKS, CHUNKS)] * STREAMS
    exit_code = await asyncio.to_thread(proc.wait, GRACE_S + 10)
    assert exit_code == 0, replica.log()
    assert time.monotonic() - signalled < GRACE_S + 10
    log = replica.log(None)
    assert "Traceback" not in log, log

    await fake.wait_idle()
    assert len(fake.records) == STREAMS
    assert all(r["status"] == 200 and r["completed"] for r in fake.records)
    expected = [independent_cost(r) for r in fake.records]

    store = open_store(store_url)
    await store.open()
    try:
        records = await store.ledger_records()
        assert len(records) == STREAMS
        assert all(r.status == 200 and r.exact for r in records)
        assert sorted(r.cost_nanos for r in records) == sorted(expected)
        assert sorted(r.output_tokens for r in records) == [CHUNKS] * STREAMS
        spec = parse_budget(BUDGET, "budgets[0]")
        state = await store.budget_state(budget_key(spec, period_window(spec)))
        assert state.reserved_nanos == 0  # every reservation settled before exit
        assert state.spent_nanos == sum(expected)
    finally:
        await store.close()
