"""One contract, every store backend.

The ``store`` fixture runs each test on every backend in :data:`BACKENDS`: memory,
SQLite, a real Redis and a real 3-node Redis Cluster (started by
:mod:`tests.redis_servers`; the Redis tests fail, never skip, without
``redis-server``). A new backend joins the suite by adding one factory there; the
budget contract (``tests/test_budget_contract.py``) runs on the same factories.
Backend-specific tests (SQLite durability, URL parsing) follow the contract tests.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from proxy.errors import StoreUnavailable
from proxy.ledger import LedgerRecord, LedgerWriter
from proxy.store import (
    GROUP_COLUMNS,
    MemoryStore,
    SqliteStore,
    Store,
    aggregate,
    known_schemes,
    open_store,
    register_store,
)
from proxy.store.aggregate import NONE_LABEL, day_of
from proxy.store.redis import RedisStore
from proxy.store.sqlite import SCHEMA_VERSION
from tests.redis_servers import (  # the fixtures are used by name
    RedisClusterServers,
    RedisServer,
    redis_cluster,  # noqa: F401
    redis_server,  # noqa: F401
)

DAY_MS = 86_400_000
REPO_ROOT = Path(__file__).resolve().parents[1]
BASE_MS = 20_400 * DAY_MS  # 2025-11-08T00:00Z, a midnight, to test day edges

# -- backends ----------------------------------------------------------------------------


async def _memory(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    return open_store("memory://")


async def _sqlite(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    return open_store(f"sqlite:///{tmp_path}/ledger.db")


def fresh_namespace() -> str:
    """A namespace no other test uses: each test sees an empty Redis store."""
    return "t" + uuid.uuid4().hex[:12]


async def _redis(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    server: RedisServer = request.getfixturevalue("redis_server")
    return open_store(f"{server.url}/0?namespace={fresh_namespace()}")


async def _redis_cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
    return open_store(f"{cluster.url}?namespace={fresh_namespace()}")


StoreFactory = Callable[[pytest.FixtureRequest, Path], Awaitable[Store]]

BACKENDS: dict[str, StoreFactory] = {
    "memory": _memory,
    "sqlite": _sqlite,
    "redis": _redis,
    "redis-cluster": _redis_cluster,
}
"""Each factory returns an unopened store; the fixture opens and closes it. The Redis
servers start only when a Redis test runs (``request.getfixturevalue``)."""


@pytest.fixture(params=list(BACKENDS))
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    backend = await BACKENDS[request.param](request, tmp_path)
    await backend.open()
    yield backend
    await backend.close()


# -- data --------------------------------------------------------------------------------


def make_record(i: int, rng: random.Random | None = None) -> LedgerRecord:
    """A record with every field varied: None values, odd text, several tags, day edges."""
    rng = rng or random.Random(i)
    ts_choices = (
        BASE_MS + rng.randrange(5 * DAY_MS),
        BASE_MS + rng.randrange(5) * DAY_MS,  # exactly midnight
        BASE_MS + rng.randrange(1, 5) * DAY_MS - 1,  # the last millisecond of a day
    )
    tags = rng.choice([(), ("a",), ("a", "b"), ("b", "a", "b"), ("prod",), ("ünï", "o'k")])
    return LedgerRecord(
        id=f"req-{i:05d}",
        ts_ms=rng.choice(ts_choices),
        key_name=rng.choice(["app-a", "app-b", "batch"]),
        team=rng.choice([None, "search", "support", "o'brien"]),
        user=rng.choice([None, "alice", "bob", "ünïcode"]),
        end_user=rng.choice([None, "cust-1", "cust-2"]),
        tags=tags,
        upstream=rng.choice(["openai", "anthropic"]),
        endpoint=rng.choice(["chat/completions", "responses", "messages"]),
        model=rng.choice(["gpt-4o", "gpt-4o-mini", "claude-sonnet-4"]),
        stream=rng.random() < 0.5,
        status=rng.choice([200, 200, 200, 400, 402, 429, 502]),
        input_tokens=rng.randrange(100_000),
        cached_input_tokens=rng.randrange(1_000),
        cache_write_tokens=rng.randrange(1_000),
        output_tokens=rng.randrange(10_000),
        reasoning_tokens=rng.randrange(1_000),
        # Mostly small, some large enough that a float sum would lose nano-dollars.
        cost_nanos=rng.choice([0, rng.randrange(10**9), rng.randrange(10**15)]),
        exact=rng.random() < 0.8,
        latency_ms=rng.random() * 5_000,
        error=rng.choice([None, "client_disconnect", "stream_incomplete"]),
        extra=rng.choice([{}, {"finish": "stop"}, {"quote": '"x"', "ü": "ß"}]),
    )


def make_records(n: int, seed: int = 7) -> list[LedgerRecord]:
    rng = random.Random(seed)
    return [make_record(i, rng) for i in range(n)]


RECORDS = make_records(400)


def in_range(
    records: list[LedgerRecord], since_ms: int | None, until_ms: int | None
) -> list[LedgerRecord]:
    selected = [
        r
        for r in records
        if (since_ms is None or r.ts_ms >= since_ms) and (until_ms is None or r.ts_ms < until_ms)
    ]
    return sorted(selected, key=lambda r: (r.ts_ms, r.id))


RANGES = [
    (None, None),
    (BASE_MS + DAY_MS, None),
    (None, BASE_MS + 2 * DAY_MS),
    (BASE_MS + DAY_MS, BASE_MS + 3 * DAY_MS),
    (BASE_MS + DAY_MS - 1, BASE_MS + DAY_MS + 1),  # straddles midnight
    (BASE_MS + 10 * DAY_MS, None),  # nothing
]

GROUPINGS: list[tuple[str, ...]] = [
    (),
    *((c,) for c in GROUP_COLUMNS),
    ("team", "model"),
    ("tag", "day"),
    ("day", "tag", "status"),
    ("user", "end_user", "key"),
]

# -- the contract ------------------------------------------------------------------------


async def test_round_trip_preserves_every_field(store: Store) -> None:
    await store.append_ledger(RECORDS)
    for record in RECORDS:
        assert await store.get_ledger_record(record.id) == record
    assert await store.get_ledger_record("no-such-id") is None


async def test_append_is_idempotent_by_id(store: Store) -> None:
    await store.append_ledger(RECORDS[:10])
    replay = [replace(r, cost_nanos=r.cost_nanos + 1) for r in RECORDS[:10]]
    await store.append_ledger(replay + RECORDS[:10])
    assert await store.ledger_records() == in_range(RECORDS[:10], None, None)


async def test_duplicates_within_one_batch_keep_the_first(store: Store) -> None:
    first = RECORDS[0]
    await store.append_ledger([first, replace(first, model="other")])
    assert await store.get_ledger_record(first.id) == first


async def test_empty_append_and_empty_store(store: Store) -> None:
    await store.append_ledger([])
    assert await store.ledger_records() == []
    for grouping in GROUPINGS:
        assert await store.report(grouping) == []


@pytest.mark.parametrize(("since_ms", "until_ms"), RANGES)
async def test_range_queries_are_half_open_and_ordered(
    store: Store, since_ms: int | None, until_ms: int | None
) -> None:
    await store.append_ledger(RECORDS)
    assert await store.ledger_records(since_ms, until_ms) == in_range(RECORDS, since_ms, until_ms)


@pytest.mark.parametrize("group_by", GROUPINGS, ids=lambda g: ",".join(g) or "total")
async def test_report_equals_the_pure_aggregate(store: Store, group_by: tuple[str, ...]) -> None:
    await store.append_ledger(RECORDS)
    for since_ms, until_ms in RANGES:
        expected = aggregate(in_range(RECORDS, since_ms, until_ms), group_by)
        assert await store.report(group_by, since_ms, until_ms) == expected


async def test_report_rejects_unknown_columns(store: Store) -> None:
    with pytest.raises(ValueError, match=r"'cost'.*Valid columns are: team, key"):
        await store.report(["team", "cost"])


async def test_tags_expand_and_untagged_counts_as_none(store: Store) -> None:
    base = RECORDS[0]
    await store.append_ledger(
        [
            replace(base, id="1", tags=("a", "b"), cost_nanos=10, exact=True),
            replace(base, id="2", tags=("a", "a"), cost_nanos=5, exact=False),
            replace(base, id="3", tags=(), cost_nanos=1, exact=True),
        ]
    )
    rows = {
        row.group: (row.requests, row.estimated, row.cost_nanos)
        for row in await store.report(["tag"])
    }
    assert rows == {("a",): (2, 1, 15), ("b",): (1, 0, 10), (NONE_LABEL,): (1, 0, 1)}


async def test_costs_sum_exactly(store: Store) -> None:
    await store.append_ledger(RECORDS)
    exact_total = sum(r.cost_nanos for r in RECORDS)
    (total,) = await store.report([])
    assert total.cost_nanos == exact_total
    assert total.requests == len(RECORDS)
    for column in ("team", "model", "day", "status"):
        assert sum(row.cost_nanos for row in await store.report([column])) == exact_total


async def test_report_sorted_by_cost_then_group(store: Store) -> None:
    await store.append_ledger(RECORDS)
    rows = await store.report(["team", "model"])
    assert rows == sorted(rows, key=lambda r: (-r.cost_nanos, r.group))


async def test_concurrent_writes_through_the_writer_land_exactly_once(store: Store) -> None:
    records = make_records(2_000, seed=11)
    writer = LedgerWriter(store)
    await writer.start()
    # Every record twice, concurrently: replays must not create duplicates.
    await asyncio.gather(*(writer.write(r) for r in records + records))
    await writer.close()
    stored = await store.ledger_records()
    assert len(stored) == len(records)
    assert {r.id for r in stored} == {r.id for r in records}
    # Group commit: far fewer store calls than writes.
    assert writer.records == 4_000
    assert writer.batches < 100


async def test_closed_store_refuses_calls(store: Store) -> None:
    await store.close()
    with pytest.raises(RuntimeError, match="not open"):
        await store.ledger_records()
    await store.open()  # so the fixture's close() has something to close


# -- aggregate ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ts_ms", "day"),
    [
        (0, "1970-01-01"),
        (DAY_MS - 1, "1970-01-01"),
        (DAY_MS, "1970-01-02"),
        (-1, "1969-12-31"),
        (1_793_836_800_000, "2026-11-05"),
    ],
)
def test_day_is_the_utc_date(ts_ms: int, day: str) -> None:
    assert day_of(ts_ms) == day


@pytest.mark.parametrize(
    ("group_by", "message"),
    [
        (["nope"], r"'nope'.*Valid columns"),
        (["team", "team"], "listed twice"),
        ("team", "not the string"),
    ],
)
def test_aggregate_validates_group_by(group_by: list[str] | str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        aggregate([], group_by)


# -- the registry ------------------------------------------------------------------------


def test_open_store_by_url() -> None:
    assert isinstance(open_store("memory://"), MemoryStore)
    relative = open_store("sqlite:///data/ledger.db")
    assert isinstance(relative, SqliteStore)
    assert relative.path == "data/ledger.db"
    assert relative.synchronous == "normal"
    absolute = open_store("sqlite:////var/lib/mg.db?synchronous=FULL")
    assert isinstance(absolute, SqliteStore)
    assert (absolute.path, absolute.synchronous) == ("/var/lib/mg.db", "full")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            "postgres://db/x",
            r"No store backend handles postgres://.*memory://, redis://.*sqlite://",
        ),
        ("ledger.db", "has no scheme"),
        ("sqlite://host/ledger.db", "names a host"),
        ("sqlite:///", "no file path"),
        ("sqlite:///x.db?synchronous=off", "synchronous='off' is not allowed"),
        ("sqlite:///x.db?cache=shared", "Unknown SQLite URL option"),
        ("memory://somewhere", "takes no path"),
    ],
)
def test_bad_urls_are_explained(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        open_store(url)


def test_redis_urls() -> None:
    plain = open_store("redis://:secret@127.0.0.1:6390/2?socket_timeout=0.5")
    assert isinstance(plain, RedisStore)
    assert (plain.cluster, plain.namespace) == (False, "mg")
    cluster = open_store("redis+cluster://10.0.0.1:7000?namespace=prod-eu&retention_s=60")
    assert isinstance(cluster, RedisStore)
    assert (cluster.cluster, cluster.namespace, cluster.settled_retention_s) == (
        True,
        "prod-eu",
        60.0,
    )
    for scheme in ("rediss", "rediss+cluster"):
        assert isinstance(open_store(f"{scheme}://h:1"), RedisStore)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://h:1?namespace=a{b}", "namespace 'a{b}' is not valid"),
        ("redis://h:1?retention_s=soon", "retention_s='soon' is not a number"),
        ("redis:///0", "names no host"),
    ],
)
def test_bad_redis_urls_are_explained(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        open_store(url)


def test_registry_is_open_for_new_backends() -> None:
    class FakeRedis(MemoryStore):
        pass

    register_store("fakeredis", lambda url: FakeRedis())
    try:
        assert isinstance(open_store("fakeredis://localhost:6379/0"), FakeRedis)
        assert "fakeredis" in known_schemes()
        with pytest.raises(ValueError, match="already registered"):
            register_store("fakeredis", lambda url: MemoryStore())
    finally:
        from proxy.store import _REGISTRY

        _REGISTRY.pop("fakeredis", None)


# -- SQLite durability -------------------------------------------------------------------


async def test_sqlite_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "ledger.db"  # parent directories are created
    first = SqliteStore(path)
    await first.open()
    await first.append_ledger(RECORDS)
    await first.close()

    second = SqliteStore(path)
    await second.open()
    try:
        assert await second.ledger_records() == in_range(RECORDS, None, None)
    finally:
        await second.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


async def test_sqlite_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    store = SqliteStore(path)
    with pytest.raises(StoreUnavailable, match="upgrade Metergate"):
        await store.open()


async def test_sqlite_failures_become_store_unavailable(tmp_path: Path) -> None:
    (tmp_path / "is-a-directory.db").mkdir()
    store = SqliteStore(tmp_path / "is-a-directory.db")
    with pytest.raises(StoreUnavailable, match=r"is-a-directory\.db failed"):
        await store.open()


_KILL_CHILD = """
import asyncio, sys
from proxy.ledger import LedgerRecord, LedgerWriter
from proxy.store.sqlite import SqliteStore

async def main(path: str, workers: int) -> None:
    store = SqliteStore(path)
    await store.open()
    writer = LedgerWriter(store)
    await writer.start()
    ids = iter(range(10**9))

    async def worker() -> None:
        for i in ids:
            record = LedgerRecord(
                id=f"k-{i}", ts_ms=i, key_name="k", team=None, user=None, end_user=None,
                tags=("t",), upstream="u", endpoint="e", model="m", stream=False, status=200,
                input_tokens=i, cached_input_tokens=0, cache_write_tokens=0,
                output_tokens=0, reasoning_tokens=0, cost_nanos=i * 7, exact=True,
                latency_ms=1.0,
            )
            await writer.write(record)
            print(f"written {i}", flush=True)

    await asyncio.gather(*(worker() for _ in range(workers)))

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


async def test_sqlite_kill_9_loses_no_acknowledged_write(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _KILL_CHILD,
        str(path),
        "16",
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdout is not None
    acknowledged: list[int] = []

    async def read_until(count: int) -> None:
        while len(acknowledged) < count:
            line = await child.stdout.readline()  # type: ignore[union-attr]
            assert line, "the child exited before it was killed"
            acknowledged.append(int(line.split()[1]))

    try:
        await asyncio.wait_for(read_until(2_000), timeout=60)
        # Land the kill at a varying point of the child's write/commit/print cycle.
        await asyncio.sleep(random.uniform(0, 0.005))
    finally:
        os.kill(child.pid, signal.SIGKILL)
        await child.wait()
    # Lines the child printed before it died are still in the pipe.
    for line in (await child.stdout.read()).splitlines(keepends=True):
        if line.endswith(b"\n"):
            acknowledged.append(int(line.split()[1]))

    store = SqliteStore(path)
    await store.open()
    try:
        for i in acknowledged:
            record = await store.get_ledger_record(f"k-{i}")
            assert record is not None, f"record {i} was acknowledged but is lost"
            assert record.cost_nanos == i * 7
    finally:
        await store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
