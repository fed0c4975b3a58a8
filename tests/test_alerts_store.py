"""The alert outbox contract, on every store backend: memory, SQLite, Redis, Redis Cluster.

An alert is enqueued once per dedup key however many callers race (also from two
store objects, i.e. two replicas, on SQLite and Redis); a lease hands each entry to
one caller and it comes back when the lease runs out; retry reschedules, ack removes,
and neither brings back an entry that is gone; a dedup marker expires with its ttl.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import orjson
import pytest

from proxy.store import Store, open_store
from proxy.store.base import AlertEntry, alert_entry_id
from tests.redis_servers import (  # the fixtures are used by name
    RedisServer,
    redis_cluster,  # noqa: F401
    redis_server,  # noqa: F401
)
from tests.test_store_contract import BACKENDS, fresh_namespace

T = TypeVar("T")

PAYLOADS = {"slack": '{"channel": "slack"}', "webhook": '{"channel": "webhook"}'}


async def wait_until(probe: Callable[[], Awaitable[T]], *, within: float, what: str) -> T:
    """Call ``probe`` until it returns something truthy; that value."""
    deadline = time.monotonic() + within
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture(params=list(BACKENDS))
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    backend = await BACKENDS[request.param](request, tmp_path)
    await backend.open()
    yield backend
    await backend.close()


async def test_an_alert_is_enqueued_once(store: Store) -> None:
    assert not await store.alert_marked("b:2026-11:t50")
    assert await store.enqueue_alert("b:2026-11:t50", PAYLOADS, 3_600)
    assert await store.alert_marked("b:2026-11:t50")
    assert not await store.enqueue_alert("b:2026-11:t50", {"slack": "{}"}, 3_600)
    entries = await store.lease_alerts(10, 60)
    assert sorted(e.id for e in entries) == [
        alert_entry_id("b:2026-11:t50", "slack"),
        alert_entry_id("b:2026-11:t50", "webhook"),
    ]
    assert {e.payload for e in entries} == set(PAYLOADS.values())
    assert all(e.attempts == 1 and e.created_ms > 0 for e in entries)
    assert await store.lease_alerts(10, 60) == []  # leased: nobody else gets them


async def test_concurrent_enqueues_of_one_key_write_one_alert(store: Store) -> None:
    results = await asyncio.gather(
        *(store.enqueue_alert("b:2026-11:t80", {"slack": f'{{"n": {i}}}'}, 60) for i in range(20))
    )
    assert sum(results) == 1
    entries = await store.lease_alerts(100, 60)
    assert len(entries) == 1
    assert entries[0].payload == f'{{"n": {results.index(True)}}}'


async def test_concurrent_leases_hand_out_each_entry_once(store: Store) -> None:
    for i in range(12):
        assert await store.enqueue_alert(f"b:p:t{i}", {"hook": f'"{i}"'}, 60)
    batches = await asyncio.gather(*(store.lease_alerts(5, 60) for _ in range(6)))
    ids = [e.id for batch in batches for e in batch]
    assert len(ids) == len(set(ids)) == 12


async def test_an_expired_lease_comes_back_with_its_attempts_counted(store: Store) -> None:
    await store.enqueue_alert("b:p:t100", {"hook": "{}"}, 60)
    [first] = await store.lease_alerts(10, 0.2)
    assert first.attempts == 1

    async def leased_again() -> list[AlertEntry]:
        return await store.lease_alerts(10, 60)

    again = await wait_until(leased_again, within=5, what="the lease to run out")
    [second] = again
    assert second.id == first.id and second.attempts == 2
    assert second.created_ms == first.created_ms and second.payload == first.payload


async def test_retry_reschedules_and_ack_removes(store: Store) -> None:
    await store.enqueue_alert("b:p:t50", {"hook": "{}"}, 60)
    [entry] = await store.lease_alerts(10, 60)
    assert await store.retry_alert(entry.id, 3_600)
    assert await store.lease_alerts(10, 60) == []  # due in an hour
    assert await store.retry_alert(entry.id, 0)
    [again] = await store.lease_alerts(10, 60)
    assert again.id == entry.id and again.attempts == 2
    assert await store.ack_alert(entry.id)
    assert not await store.ack_alert(entry.id)
    assert not await store.retry_alert(entry.id, 0)  # a retry never resurrects an entry
    assert await store.lease_alerts(10, 0) == []
    assert not await store.retry_alert("nobody@hook", 0)
    # The marker outlives the entry: the alert does not fire again.
    assert not await store.enqueue_alert("b:p:t50", {"hook": "{}"}, 60)


async def test_a_marker_expires_with_its_ttl(store: Store) -> None:
    assert await store.enqueue_alert("b:p:t80", {"hook": "1"}, 0.2)
    assert await store.enqueue_alert("b:p:forever", {"hook": "2"}, None)

    async def fires_again() -> bool:
        return await store.enqueue_alert("b:p:t80", {"hook": "3"}, 60)

    await wait_until(fires_again, within=5, what="the marker to expire")
    assert await store.alert_marked("b:p:forever")
    assert not await store.enqueue_alert("b:p:forever", {"hook": "4"}, None)


async def test_payloads_come_back_unchanged(store: Store) -> None:
    payload = orjson.dumps(
        {"alert": {"budget": "b", "spent_nanos": 2**53 - 1, "note": 'é ✓ "quoted" \n'}}
    ).decode()
    await store.enqueue_alert("b:p:t1", {"hook": payload}, 60)
    [entry] = await store.lease_alerts(1, 60)
    assert entry.payload == payload


async def test_lease_respects_its_limit(store: Store) -> None:
    for i in range(5):
        await store.enqueue_alert(f"k{i}", {"hook": "{}"}, 60)
    assert len(await store.lease_alerts(2, 60)) == 2
    assert len(await store.lease_alerts(0, 60)) == 0
    assert len(await store.lease_alerts(10, 60)) == 3


async def test_malformed_enqueues_are_refused(store: Store) -> None:
    with pytest.raises(ValueError):
        await store.enqueue_alert("", {"hook": "{}"}, 60)
    with pytest.raises(ValueError):
        await store.enqueue_alert("k", {}, 60)
    with pytest.raises(ValueError):
        await store.enqueue_alert("k", {"hook": "{}"}, 0)
    assert not await store.alert_marked("k")


# ── two store objects on one database: two replicas ──────────────────────────────────


@pytest.fixture(params=["sqlite", "redis"])
async def two_stores(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[Store, Store]]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/shared.db"
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        url = f"{server.url}/0?namespace={fresh_namespace()}"
    a, b = open_store(url), open_store(url)
    await a.open()
    await b.open()
    yield a, b
    await a.close()
    await b.close()


async def test_two_replicas_enqueue_once_and_lease_apart(two_stores: tuple[Store, Store]) -> None:
    a, b = two_stores
    results = await asyncio.gather(
        *(s.enqueue_alert(f"b:p:t{t}", PAYLOADS, 60) for t in (50, 80) for s in (a, b) * 5)
    )
    assert sum(results) == 2
    leased = await asyncio.gather(*(s.lease_alerts(1, 60) for s in (a, b) * 4))
    ids = [e.id for batch in leased for e in batch]
    assert len(ids) == len(set(ids)) == 4
