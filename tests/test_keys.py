"""Issued keys, below HTTP: the key format and digest, the operations of
:mod:`proxy.key_ops`, and each replica's table (:class:`proxy.key_watcher.IssuedKeys`):
expiry, rotation (with and without grace), revocation, refusing to start with keys
it cannot read, and surviving a store outage. End-to-end tests with the SDKs, two
replicas on Redis, the admin API and the CLI are in ``tests/test_keys_e2e.py``."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from proxy.budget_ops import show_budget
from proxy.callers import KeyRing
from proxy.errors import StoreUnavailable, Unauthorized
from proxy.key_ops import (
    KeyAdminError,
    KeyConfig,
    create_key,
    find_key,
    list_keys,
    revoke_key,
    rotate_key,
    show_key,
)
from proxy.key_watcher import IssuedKeys
from proxy.keys import IssuedKey, KeyHasher, new_key, new_key_id
from proxy.settings import ConfigError, KeySettings, parse_settings
from proxy.store import MemoryStore

SECRET = "s3cret-" + "x" * 40
OTHER_SECRET = "other-" + "y" * 40
CFG = KeyConfig(SECRET, config_key_names=frozenset({"config-app"}))
T0_MS = 1_800_000_000_000  # a fixed "now" for the operations


@dataclass
class Clock:
    """Epoch seconds, moved by the test."""

    now_s: float = T0_MS / 1000

    def __call__(self) -> float:
        return self.now_s


class CountingStore(MemoryStore):
    """A memory store that counts key-version reads and can be taken down."""

    down = False
    version_reads = 0

    async def api_keys_version(self) -> int:
        self.version_reads += 1
        if self.down:
            raise StoreUnavailable("The test store is down.")
        return await super().api_keys_version()


@pytest.fixture
async def store() -> AsyncIterator[CountingStore]:
    s = CountingStore()
    await s.open()
    yield s
    await s.close()


def headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# -- format and digest ---------------------------------------------------------------------


def test_key_format_and_ids() -> None:
    keys = {new_key() for _ in range(100)}
    assert len(keys) == 100
    assert all(re.fullmatch(r"mg-[A-Za-z0-9_-]{43}", k) for k in keys)
    assert re.fullmatch(r"key_[0-9a-f]{16}", new_key_id())


def test_the_digest_is_keyed_by_the_secret_and_never_shows_it() -> None:
    key = new_key()
    a, b = KeyHasher(SECRET), KeyHasher(OTHER_SECRET)
    assert a.digest(key) == KeyHasher(SECRET).digest(key)
    assert a.digest(key) != b.digest(key) and len(a.digest(key)) == 32
    assert a.secret_id != b.secret_id and len(a.secret_id) == 16
    assert SECRET not in repr(a)


def test_settings_validate_the_secret_and_keep_it_out_of_repr() -> None:
    base: dict[str, Any] = {"upstreams": {"openai": {"url": "http://127.0.0.1:9"}}}
    settings = parse_settings({**base, "key_secret": "${S}"}, {"S": SECRET})
    assert settings.key_secret == SECRET
    assert SECRET not in repr(settings)
    with pytest.raises(ConfigError, match=r"^key_secret: must be at least 32 characters"):
        parse_settings({**base, "key_secret": "short"}, {})


def test_a_record_round_trips_and_bad_documents_are_refused() -> None:
    record = IssuedKey(
        id="key_0123456789abcdef",
        name="app-a",
        digest="ab" * 32,
        secret_id="0" * 16,
        prefix="mg-abcdef...",
        created_ms=T0_MS,
        team="search",
        tags=("x", "y"),
        expires_ms=T0_MS + 1,
    )
    assert IssuedKey.from_doc(record.id, record.to_doc()) == record
    assert "id" not in record.to_doc() and "rev" not in record.to_doc()
    for bad in ({**record.to_doc(), "digest": "nothex"}, {"name": "x"}, {"oops": 1}):
        with pytest.raises(ValueError):
            IssuedKey.from_doc(record.id, bad)


# -- operations ----------------------------------------------------------------------------


async def test_create_validates_before_writing(store: CountingStore) -> None:
    cases = [
        ({"name": "bad name"}, 400, "name"),
        ({"name": "a", "expires": "soon"}, 400, "expires"),
        ({"name": "a", "expires": "99999w"}, 400, "at most"),
        ({"name": "a", "period": "day"}, 400, "budget_usd"),
        ({"name": "a", "budget_usd": "-1"}, 400, "limit_usd"),
        ({"name": "a", "tags": "x"}, 400, "tags"),
        ({"name": "a", "colour": "red"}, 400, "unknown field"),
        ({"name": "config-app"}, 409, "config file"),
    ]
    for body, status, words in cases:
        with pytest.raises(KeyAdminError) as info:
            await create_key(store, CFG, body)
        assert info.value.status == status and words in info.value.message, body
    assert await store.api_keys() == {}  # nothing was written by any of them
    with pytest.raises(KeyAdminError, match="key_secret") as info:
        await create_key(store, KeyConfig(None), {"name": "a"})
    assert info.value.status == 409


async def test_create_list_show_rotate_revoke(store: CountingStore) -> None:
    body = {"name": "app-a", "team": "search", "user": "alice", "tags": ["t1"]}
    issued = await create_key(store, CFG, {**body, "budget_usd": "50", "period": "day"})
    assert issued.value.startswith("mg-") and issued.key.budget == "key-app-a"
    assert issued.budget is not None and issued.budget["scope"] == {"key": "app-a"}
    budget = await show_budget(store, (), "key-app-a")
    assert (budget["limit_usd"], budget["period"], budget["enforce"]) == ("50.00", "day", "hard")
    with pytest.raises(KeyAdminError, match="already named 'app-a'"):
        await create_key(store, CFG, body)

    listing = await list_keys(store)
    assert [v["name"] for v in listing] == ["app-a"]
    assert issued.value not in repr(listing) and issued.key.digest not in repr(listing)
    shown = await show_key(store, CFG, "app-a")
    assert shown["id"] == issued.key.id and shown["spend"]["requests"] == 0
    assert shown["budget_view"]["name"] == "key-app-a"
    assert (await find_key(store, issued.key.id)).name == "app-a"

    rotated = await rotate_key(store, CFG, issued.key.id)
    assert rotated.value != issued.value and rotated.key.id == issued.key.id
    assert rotated.key.previous_digest == issued.key.digest

    revoked = await revoke_key(store, "app-a")
    assert revoked.revoked_ms is not None
    assert await list_keys(store) == []
    assert [v["state"] for v in await list_keys(store, include_revoked=True)] == ["revoked"]
    with pytest.raises(KeyAdminError, match="no active key"):
        await revoke_key(store, "app-a")
    with pytest.raises(KeyAdminError, match="already revoked"):
        await rotate_key(store, CFG, issued.key.id)
    # The name is free again, for a new key with a new id.
    again = await create_key(store, CFG, body)
    assert again.key.id != issued.key.id


# -- the replica's table -------------------------------------------------------------------


async def test_lookup_follows_expiry_rotation_and_revocation(store: CountingStore) -> None:
    clock = Clock()
    table = IssuedKeys(store, SECRET, clock=clock)
    ring = KeyRing([], passthrough=False, issued=table)
    forever = await create_key(store, CFG, {"name": "forever", "team": "t"}, now_ms=T0_MS)
    brief = await create_key(store, CFG, {"name": "brief", "expires": "1h"}, now_ms=T0_MS)
    assert await table.refresh()
    caller, upstream_key = await ring.resolve(headers(forever.value))
    assert (caller.key_name, caller.team, upstream_key) == ("forever", "t", None)
    assert table.lookup(brief.value) is not None
    assert table.lookup(new_key()) is None  # unknown: not an issued key

    clock.now_s += 3600  # the expiry is compared at lookup time, not cached
    with pytest.raises(Unauthorized, match="expired") as info:
        table.lookup(brief.value)
    assert info.value.code == "key_expired"

    # Rotation with a grace period: both values work until it ends.
    now_ms = int(clock.now_s * 1000)
    graced = await rotate_key(store, CFG, "forever", grace="10m", now_ms=now_ms)
    assert await table.refresh()
    assert table.lookup(forever.value) is not None and table.lookup(graced.value) is not None
    clock.now_s += 600
    with pytest.raises(Unauthorized, match="rotated") as info:
        table.lookup(forever.value)
    assert info.value.code == "key_rotated"
    # Rotation without grace: the previous value stops at once.
    sharp = await rotate_key(store, CFG, "forever", now_ms=int(clock.now_s * 1000))
    assert await table.refresh()
    with pytest.raises(Unauthorized, match="rotated"):
        table.lookup(graced.value)
    assert table.lookup(sharp.value) is not None

    await revoke_key(store, "forever")
    assert await table.refresh()
    for value in (sharp.value, graced.value):
        with pytest.raises(Unauthorized, match="revoked"):
            await ring.resolve(headers(value))


async def test_an_unknown_key_checks_the_store_once_then_is_refused(
    store: CountingStore,
) -> None:
    table = IssuedKeys(store, SECRET, miss_interval_s=60.0)
    ring = KeyRing([], passthrough=False, issued=table)
    await table.refresh()
    # Created after the table was loaded (by the CLI or another replica): the miss
    # makes the table look again, so the key works at once.
    fresh = await create_key(store, CFG, {"name": "fresh"})
    reads = store.version_reads
    assert (await ring.resolve(headers(fresh.value)))[0].key_name == "fresh"
    assert store.version_reads == reads + 1
    # A made-up key within the rate limit: refused without reading the store again.
    with pytest.raises(Unauthorized, match="not known") as info:
        await ring.resolve(headers(new_key()))
    assert info.value.code == "invalid_api_key"
    assert store.version_reads == reads + 1


async def test_start_refuses_keys_it_cannot_read(store: CountingStore) -> None:
    key = await create_key(store, CFG, {"name": "app-a"})
    for secret, words in ((None, "has no key_secret"), (OTHER_SECRET, "another key_secret")):
        table = IssuedKeys(store, secret)
        with pytest.raises(ConfigError, match=words):
            await table.start()
        await table.stop()
    # Once the keys are revoked, a replica without the secret may start.
    await revoke_key(store, key.key.id)
    table = IssuedKeys(store, None)
    await table.start()
    await table.stop()


async def test_a_store_outage_keeps_the_last_table(
    store: CountingStore, caplog: pytest.LogCaptureFixture
) -> None:
    key = await create_key(store, CFG, {"name": "app-a"})
    table = IssuedKeys(store, SECRET, interval_s=0.01)
    await table.start()
    try:
        store.down = True
        await revoke_key(store, "app-a")  # written, but no replica can read it now
        with caplog.at_level(logging.WARNING, logger="metergate.keys"):
            while store.version_reads < 20:
                await _tick()
        assert table.lookup(key.value) is not None
        warnings = [r for r in caplog.records if "keeping the last" in r.getMessage()]
        assert len(warnings) == 1  # once per outage
        store.down = False
        reads = store.version_reads
        while store.version_reads < reads + 3:
            await _tick()
        with pytest.raises(Unauthorized, match="revoked"):
            table.lookup(key.value)
    finally:
        await table.stop()


async def test_config_keys_still_come_first(store: CountingStore) -> None:
    table = IssuedKeys(store, SECRET)
    ring = KeyRing(
        [KeySettings(key="mg-config-key-0123", name="config-app")], passthrough=True, issued=table
    )
    assert (await ring.resolve(headers("mg-config-key-0123")))[0].key_name == "config-app"
    # An unknown mg- key never passes through to the provider.
    with pytest.raises(Unauthorized):
        await ring.resolve(headers(new_key()))
    caller, forwarded = await ring.resolve(headers("sk-provider-key"))
    assert caller.passthrough and forwarded == "sk-provider-key"


async def _tick() -> None:
    await asyncio.sleep(0.005)
