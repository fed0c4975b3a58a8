"""The budget hot path: the Redis store's pipelined script connection (ScriptPipe), the
task-free store wait, and the gate's cached plans. The contract suites cover what a
store and the gate promise; these tests pin what the fast path must not change."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from proxy.budget import BudgetSpec, RequestFacts
from proxy.budget_gate import BudgetGate
from proxy.errors import StoreUnavailable
from proxy.store import ReserveItem, open_store
from proxy.store.redis import RedisStore
from proxy.store.redis_scripts import (
    KEEPALIVE_IDLE_S,
    KEEPALIVE_INTERVAL_S,
    KEEPALIVE_PROBES,
    ScriptPipe,
)
from tests.redis_servers import (  # the fixtures are used by name
    RedisServer,
    redis_server,  # noqa: F401
)


def _url(server: RedisServer, **options: str) -> str:
    query = "&".join(
        f"{k}={v}" for k, v in {"namespace": "f" + uuid.uuid4().hex[:10], **options}.items()
    )
    return f"{server.url}/0?{query}"


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    s = open_store(_url(redis_server))
    assert isinstance(s, RedisStore)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def test_a_plain_tcp_store_sends_its_scripts_over_one_pipelined_connection(
    store: RedisStore,
) -> None:
    assert store._pipe is not None
    results = await asyncio.gather(
        *(store.reserve(f"r{i}", [ReserveItem("b", 100, 10, True)], 60) for i in range(15))
    )
    # Ten fit under the cap, in the order the calls were made.
    assert [r.ok for r in results] == [True] * 10 + [False] * 5
    assert store._pipe.connections == 1
    assert await store.budget_state("b") == (0, 100)


async def test_the_pipe_connection_keeps_itself_alive(store: RedisStore) -> None:
    """TCP keepalive on the script connection: an idle connection to a Redis that went
    away is found by the kernel, not by the next budget call timing out on it."""
    assert await store.budget_state("k") == (0, 0)  # connected
    pipe = store._pipe
    assert pipe is not None and pipe._conn is not None and pipe._conn.transport is not None
    sock = pipe._conn.transport.get_extra_info("socket")
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == KEEPALIVE_IDLE_S
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == KEEPALIVE_INTERVAL_S
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == KEEPALIVE_PROBES


async def test_a_caller_that_stops_waiting_leaves_the_connection_usable(
    store: RedisStore,
) -> None:
    """A cancelled call's reply is read and dropped; the calls behind it keep their
    order and their own replies (redis-py would have to drop the connection)."""
    assert await store.budget_state("c") == (0, 0)  # connected
    first = asyncio.ensure_future(store.reserve("gone", [ReserveItem("c", 100, 30, True)], 60))
    for _ in range(3):
        await asyncio.sleep(0)  # sent, not answered yet
    assert not first.done()
    first.cancel()
    second = await store.reserve("kept", [ReserveItem("c", 100, 30, True)], 60)
    assert second.ok
    assert store._pipe is not None and store._pipe.connections == 1
    # The cancelled reserve still ran, in order: both holds are there.
    assert await store.budget_state("c") == (0, 60)
    assert await store.release("gone") and await store.release("kept")


async def test_options_the_pipe_cannot_honour_keep_redis_py(redis_server: RedisServer) -> None:
    for url in (
        _url(redis_server, client_name="metergate"),
        f"rediss://127.0.0.1:{redis_server.port}/0",
        f"redis+cluster://127.0.0.1:{redis_server.port}",
    ):
        s = open_store(url)
        assert isinstance(s, RedisStore)
        await s.open()
        try:
            assert s._pipe is None, url
        finally:
            await s.close()


async def _silent_server(seen: list[bytes]) -> asyncio.Server:
    """Accepts connections, records what it gets, never answers."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            seen.append(data)
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def test_a_silent_server_fails_the_calls_after_the_reply_timeout() -> None:
    seen: list[bytes] = []
    server = await _silent_server(seen)
    port = server.sockets[0].getsockname()[1]
    s = open_store(f"redis://127.0.0.1:{port}/0?socket_timeout=0.2")
    await s.open()
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(StoreUnavailable, match="Timeout"):
            await s.reserve("x", [ReserveItem("b", 100, 10, True)], 60)
        assert 0.15 < loop.time() - started < 1.5
        assert b"EVALSHA" in b"".join(seen)
    finally:
        await s.close()
        server.close()
        await server.wait_closed()


async def test_the_handshake_authenticates_and_selects_the_database_first() -> None:
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            seen.append(data)
            writer.write(b"+OK\r\n" * data.count(b"*"))  # one reply per command

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pipe = ScriptPipe("127.0.0.1", port, db=3, username="app", password="s3cret")
    try:
        assert await pipe.call("PING") == b"OK"
        sent = b"".join(seen)
        assert sent.index(b"AUTH") < sent.index(b"SELECT") < sent.index(b"PING")
        assert b"app" in sent and b"s3cret" in sent
    finally:
        pipe.close()
        server.close()
        await server.wait_closed()


async def test_a_refused_connection_is_store_unavailable_and_the_next_call_retries() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    s = open_store(f"redis://127.0.0.1:{port}/0")
    await s.open()
    try:
        for _ in range(2):
            with pytest.raises(StoreUnavailable):
                await s.reserve("x", [ReserveItem("b", 100, 10, True)], 60)
    finally:
        await s.close()


async def test_the_gate_reuses_its_plan_and_drops_it_with_the_specs(store: RedisStore) -> None:
    spec = BudgetSpec("team", {"team": "a"}, limit_nanos=1_000, period="day")
    rate = BudgetSpec("rate", {}, requests_per_minute=100)
    gate = BudgetGate(store, [spec, rate])
    facts = RequestFacts(key="k", team="a")
    assert gate.applicable(facts) is gate.applicable(RequestFacts(key="k", team="a"))
    first = await gate.reserve("p1", facts, 100, 10)
    second = await gate.reserve("p2", facts, 100, 10)
    assert first.keys == second.keys and len(gate._plans) == 1
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    assert first.keys == (f"team:{day}",) and first.has_rates
    # An explicit time is a period of its own, not the cached one.
    then = await gate.reserve("p3", facts, 100, 10, now=datetime(2020, 1, 2, tzinfo=UTC))
    assert then.keys == ("team:2020-01-02",)
    await gate.settle(first, 50)
    await gate.settle(second, 50)
    await gate.release(then)
    assert await store.budget_state(f"team:{day}") == (100, 0)
    gate.replace_specs([rate])
    assert not gate._plans and gate.applicable(facts) == (rate,)
    only_rate = await gate.reserve("p4", facts, 100, 10)
    assert only_rate.keys == () and only_rate.store_held
    await gate.release(only_rate)
