"""The issued-key store contract, on every backend: memory, SQLite, Redis, Redis Cluster.

Names are unique among active keys under any concurrency; updates compare-and-set on
the revision; every change moves the version; a revoked key frees its name; what is
stored is a document with a digest, never a key.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from proxy.store import SqliteStore, Store
from proxy.store.sqlite import _MIGRATIONS
from tests.redis_servers import (  # the fixtures are used by name
    redis_cluster,  # noqa: F401
    redis_server,  # noqa: F401
)
from tests.test_store_contract import BACKENDS


@pytest.fixture(params=list(BACKENDS))
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    backend = await BACKENDS[request.param](request, tmp_path)
    await backend.open()
    yield backend
    await backend.close()


def doc(name: str, **more: Any) -> dict[str, Any]:
    return {"name": name, "digest": "ab" * 32, "team": "search", **more}


async def test_create_read_and_the_version(store: Store) -> None:
    assert await store.api_keys_version() == 0
    assert await store.api_keys() == {}
    assert await store.create_api_key("key_1", doc("app-a", tags=["x"]))
    version = await store.api_keys_version()
    assert version != 0
    assert await store.api_keys() == {"key_1": {**doc("app-a", tags=["x"]), "rev": 1}}
    assert await store.create_api_key("key_2", doc("app-b"))
    assert await store.api_keys_version() != version
    assert sorted(await store.api_keys()) == ["key_1", "key_2"]


async def test_an_active_name_is_taken_until_the_key_is_revoked(store: Store) -> None:
    assert await store.create_api_key("key_1", doc("app-a"))
    version = await store.api_keys_version()
    assert not await store.create_api_key("key_2", doc("app-a"))
    assert await store.api_keys_version() == version  # a refusal changes nothing
    assert "key_2" not in await store.api_keys()
    # An update that keeps the key active keeps the name.
    assert await store.update_api_key("key_1", doc("app-a", v=2), rev=1, active=True)
    assert not await store.create_api_key("key_2", doc("app-a"))
    # Revoked: the name is free; the old record stays.
    assert await store.update_api_key("key_1", doc("app-a", revoked=1), rev=2, active=False)
    assert await store.create_api_key("key_2", doc("app-a"))
    keys = await store.api_keys()
    assert keys["key_1"] == {**doc("app-a", revoked=1), "rev": 3}
    assert keys["key_2"]["rev"] == 1
    # A later update of the revoked record does not take the name back from key_2.
    assert await store.update_api_key("key_1", doc("app-a", x=1), rev=3, active=False)
    assert not await store.create_api_key("key_3", doc("app-a"))


async def test_updates_compare_and_set_on_the_revision(store: Store) -> None:
    assert await store.create_api_key("key_1", doc("app-a"))
    assert await store.update_api_key("key_1", doc("app-a", step=1), rev=1, active=True)
    version = await store.api_keys_version()
    # A writer that read revision 1 lost the race: nothing changes.
    assert not await store.update_api_key("key_1", doc("app-a", step="stale"), rev=1, active=True)
    assert not await store.update_api_key("key_9", doc("app-z"), rev=1, active=True)
    assert await store.api_keys_version() == version
    assert (await store.api_keys())["key_1"] == {**doc("app-a", step=1), "rev": 2}


async def test_concurrent_creates_of_one_name_admit_exactly_one(store: Store) -> None:
    results = await asyncio.gather(
        *(store.create_api_key(f"key_{i}", doc("contended")) for i in range(20))
    )
    assert results.count(True) == 1
    assert len(await store.api_keys()) == 1


async def test_concurrent_updates_of_one_revision_admit_exactly_one(store: Store) -> None:
    assert await store.create_api_key("key_1", doc("app-a"))
    results = await asyncio.gather(
        *(store.update_api_key("key_1", doc("app-a", w=i), rev=1, active=True) for i in range(20))
    )
    assert results.count(True) == 1
    assert (await store.api_keys())["key_1"]["rev"] == 2


async def test_malformed_calls_are_refused_alike(store: Store) -> None:
    assert await store.create_api_key("key_1", doc("app-a"))
    with pytest.raises(ValueError, match="already stored"):
        await store.create_api_key("key_1", doc("app-b"))
    with pytest.raises(ValueError, match="non-empty 'name'"):
        await store.create_api_key("key_2", {"digest": "x"})
    with pytest.raises(ValueError, match="non-empty id"):
        await store.create_api_key("", doc("app-c"))
    with pytest.raises(ValueError, match="cannot be stored as JSON"):
        await store.create_api_key("key_3", doc("app-d", bad=object()))
    # A rev member in the document is the store's business, not the caller's.
    assert await store.update_api_key("key_1", {**doc("app-a"), "rev": 99}, rev=1, active=True)
    assert (await store.api_keys())["key_1"]["rev"] == 2


async def test_sqlite_schema_4_migrates_to_keys_keeping_specs(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    keys_step = next(i for i, step in enumerate(_MIGRATIONS) if any("api_key" in s for s in step))
    with sqlite3.connect(path) as conn:  # a database written before issued keys
        for statements in _MIGRATIONS[:keys_step]:
            for statement in statements:
                conn.execute(statement)
        conn.execute("INSERT INTO budget_spec (name, doc) VALUES ('b', '{\"scope\": {}}')")
        conn.execute(f"PRAGMA user_version = {keys_step}")
    store = SqliteStore(path)
    await store.open()
    try:
        assert await store.budget_specs() == {"b": {"scope": {}}}
        assert await store.api_keys_version() == 0
        assert await store.create_api_key("key_1", doc("app-a"))
        assert (await store.api_keys())["key_1"]["rev"] == 1
    finally:
        await store.close()
