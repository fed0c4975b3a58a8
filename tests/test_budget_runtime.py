"""Budgets changed at run time: merge rules, the spec watcher across replicas on a real
Redis, and the admin API. The store contract for specs is in
``tests/test_budget_contract.py``; the CLI in ``tests/test_budget_cli.py``."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.admin import setup_admin
from proxy.budget import BudgetConfigError, BudgetSpec, RequestFacts
from proxy.budget_gate import BudgetGate
from proxy.budget_ops import set_budget
from proxy.budget_specs import (
    SpecWatcher,
    apply_changes,
    merge_budgets,
    merge_specs,
    spec_to_doc,
)
from proxy.errors import BudgetExceeded, StoreUnavailable
from proxy.store import MemoryStore, SqliteStore, Store, open_store
from proxy.store.sqlite import _MIGRATIONS
from tests.redis_servers import (  # the fixtures are used by name
    RedisClusterServers,
    RedisServer,
    redis_cluster,  # noqa: F401
    redis_server,  # noqa: F401
)
from tests.test_store_contract import fresh_namespace

USD = 1_000_000_000
SEARCH = BudgetSpec(
    "search-monthly",
    scope={"team": "search"},
    limit_nanos=100 * USD,
    timezone=ZoneInfo("Europe/Berlin"),
)
ALICE_RPM = BudgetSpec("alice-rpm", scope={"user": "alice"}, requests_per_minute=60)
CONFIG = (SEARCH, ALICE_RPM)
ALICE = RequestFacts(key="app-a", user="alice", team="search", model="gpt-4o")


def names(specs: tuple[BudgetSpec, ...]) -> list[str]:
    return [spec.name for spec in specs]


# -- merge rules ---------------------------------------------------------------------------


def test_without_stored_documents_the_config_applies() -> None:
    merged = merge_budgets(CONFIG, {})
    assert merged.specs == CONFIG
    assert merged.sources == {"search-monthly": "config", "alice-rpm": "config"}


def test_a_stored_document_overrides_in_place_or_adds() -> None:
    docs: dict[str, dict[str, Any]] = {
        "zeta": {"name": "zeta", "scope": {"tag": "batch"}, "limit_usd": "5"},
        "search-monthly": {"scope": {"team": "search"}, "limit_usd": "7.25", "period": "day"},
        "alpha": {"scope": {}, "tokens_per_minute": 1000},
    }
    merged = merge_budgets(CONFIG, docs)
    # Config order first (the override in place), then run-time budgets by name.
    assert names(merged.specs) == ["search-monthly", "alice-rpm", "alpha", "zeta"]
    search = merged.specs[0]
    # The override is the whole entry: the config's Europe/Berlin is not inherited.
    assert (search.limit_nanos, search.period, str(search.timezone)) == (
        7_250_000_000,
        "day",
        "UTC",
    )
    assert merged.sources == {
        "search-monthly": "override",
        "alice-rpm": "config",
        "alpha": "run-time",
        "zeta": "run-time",
    }


def test_a_tombstone_hides_a_config_budget_and_nothing_else() -> None:
    merged = merge_budgets(CONFIG, {"search-monthly": {"deleted": True}, "x": {"deleted": True}})
    assert names(merged.specs) == ["alice-rpm"]
    assert merged.hidden == ("search-monthly",)
    assert merge_specs(CONFIG, {"search-monthly": {"deleted": True}}) == (ALICE_RPM,)


def test_an_invalid_document_is_logged_and_skipped(caplog: pytest.LogCaptureFixture) -> None:
    docs: dict[str, dict[str, Any]] = {
        "search-monthly": {"scope": {"team": "search"}, "limit_usd": "-3"},
        "typo": {"scope": {}, "limit_usd": 1, "perod": "day"},
        "renamed": {"name": "other", "scope": {}, "limit_usd": 1},
        "half-tombstone": {"deleted": True, "limit_usd": 1},
        "fine": {"scope": {}, "limit_usd": 1},
    }
    with caplog.at_level(logging.ERROR, logger="metergate.budget"):
        merged = merge_budgets(CONFIG, docs)
    # The config entry of a bad override stays in force; a bad new budget is absent.
    assert merged.specs == (SEARCH, ALICE_RPM, merged.specs[2])
    assert names(merged.specs) == ["search-monthly", "alice-rpm", "fine"]
    assert sorted(merged.invalid) == ["half-tombstone", "renamed", "search-monthly", "typo"]
    assert (
        "budgets.search-monthly.limit_usd: must be zero or more USD"
        in merged.invalid["search-monthly"]
    )
    assert "unknown field(s) perod" in merged.invalid["typo"]
    assert "names the budget 'other'" in merged.invalid["renamed"]
    assert len([r for r in caplog.records if "not valid" in r.getMessage()]) == 4


def test_apply_changes_changes_only_the_given_fields() -> None:
    doc, spec = apply_changes("search-monthly", SEARCH, {"limit_usd": "0.000000001"})
    assert spec == BudgetSpec(
        "search-monthly", {"team": "search"}, 1, "month", ZoneInfo("Europe/Berlin"), "hard"
    )
    assert doc["limit_usd"] == "0.000000001" and doc["timezone"] == "Europe/Berlin"
    # None removes a field: a capped budget becomes a rate-limit-only one.
    changes = {"limit_usd": None, "requests_per_minute": 5}
    _, rates_only = apply_changes("search-monthly", SEARCH, changes)
    assert (rates_only.limit_nanos, rates_only.requests_per_minute) == (None, 5)
    # The stored document parses back to the same spec, exactly.
    assert apply_changes("search-monthly", spec, {})[1] == spec
    assert spec_to_doc(SEARCH)["limit_usd"] == "100.00"


def test_apply_changes_refuses_with_the_field_named() -> None:
    with pytest.raises(BudgetConfigError, match=r"budgets\.new\.scope: the new budget 'new'"):
        apply_changes("new", None, {"limit_usd": "5"})
    with pytest.raises(BudgetConfigError, match="cannot change 'name'"):
        apply_changes("search-monthly", SEARCH, {"name": "other"})
    with pytest.raises(BudgetConfigError, match=r"budgets\.search-monthly\.timezone"):
        apply_changes("search-monthly", SEARCH, {"timezone": "Mars/Olympus"})
    with pytest.raises(BudgetConfigError, match="sets no limit"):
        apply_changes("alice-rpm", ALICE_RPM, {"requests_per_minute": None})


# -- the watcher ---------------------------------------------------------------------------


class DownableStore(MemoryStore):
    """A memory store whose spec reads fail while ``down``."""

    down = False

    async def budget_specs_version(self) -> int:
        if self.down:
            raise StoreUnavailable("The test store is down.")
        return await super().budget_specs_version()


@pytest.fixture
async def memory() -> AsyncIterator[DownableStore]:
    store = DownableStore()
    await store.open()
    yield store
    await store.close()


async def test_the_watcher_reloads_only_when_the_version_moves(memory: DownableStore) -> None:
    gate = BudgetGate(memory, CONFIG)
    watcher = SpecWatcher(memory, gate, CONFIG)
    assert await watcher.refresh() is True  # the first load
    assert await watcher.refresh() is False
    await set_budget(memory, CONFIG, "search-monthly", {"limit_usd": "1"})
    assert await watcher.refresh() is True
    assert gate.specs[0].limit_nanos == USD
    assert watcher.reloads == 2


async def test_the_watcher_keeps_the_last_specs_through_store_errors(
    memory: DownableStore, caplog: pytest.LogCaptureFixture
) -> None:
    gate = BudgetGate(memory, CONFIG)
    await memory.put_budget_spec("extra", {"scope": {}, "limit_usd": "3"})
    watcher = SpecWatcher(memory, gate, CONFIG, interval_s=0.02)
    await watcher.start()
    try:
        assert names(gate.specs) == ["search-monthly", "alice-rpm", "extra"]
        memory.down = True
        await memory.put_budget_spec("later", {"scope": {}, "limit_usd": "3"})
        with caplog.at_level(logging.WARNING, logger="metergate.budget"):
            await asyncio.sleep(0.2)
        assert names(gate.specs) == ["search-monthly", "alice-rpm", "extra"]
        # Warned once for the outage, not once per poll.
        assert len([r for r in caplog.records if "keeping the last" in r.getMessage()]) == 1
        memory.down = False
        await asyncio.sleep(0.1)
        assert names(gate.specs) == ["search-monthly", "alice-rpm", "extra", "later"]
    finally:
        await watcher.stop()


async def test_a_bad_document_never_breaks_the_gate(memory: DownableStore) -> None:
    gate = BudgetGate(memory, CONFIG)
    watcher = SpecWatcher(memory, gate, CONFIG)
    await memory.put_budget_spec("search-monthly", {"scope": "everything", "limit_usd": 1})
    await memory.put_budget_spec("ok", {"scope": {}, "limit_usd": "2"})
    assert await watcher.refresh()
    assert names(gate.specs) == ["search-monthly", "alice-rpm", "ok"]
    assert gate.specs[0] == SEARCH


async def _redis_url(request: pytest.FixtureRequest, backend: str, namespace: str) -> str:
    if backend == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        return f"{server.url}/0?namespace={namespace}"
    cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
    return f"{cluster.url}?namespace={namespace}"


async def _until(condition: Any, timeout_s: float = 3.0) -> float:
    """Seconds until ``condition()`` holds; fails after ``timeout_s``."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, "the change never arrived"
        await asyncio.sleep(0.01)
    return time.monotonic() - start


@pytest.mark.parametrize("backend", ["redis", "redis-cluster"])
async def test_a_change_reaches_every_replica_within_a_second(
    request: pytest.FixtureRequest, backend: str
) -> None:
    url = await _redis_url(request, backend, fresh_namespace())
    stores: list[Store] = [open_store(url) for _ in range(3)]  # two replicas and the CLI
    for store in stores:
        await store.open()
    gates = [BudgetGate(store, CONFIG, store_timeout_s=2.0) for store in stores[:2]]
    watchers = [SpecWatcher(s, g, CONFIG) for s, g in zip(stores, gates, strict=False)]
    admin = stores[2]
    try:
        for watcher in watchers:
            await watcher.start()
        await set_budget(admin, CONFIG, "search-monthly", {"limit_usd": "0.000001"})
        elapsed = await _until(lambda: all(g.specs[0].limit_nanos == 1_000 for g in gates))
        assert elapsed < 1.0
        # Replica B enforces the lowered cap that was set from elsewhere.
        with pytest.raises(BudgetExceeded):
            await gates[1].reserve("r1", ALICE, 2_000, 10)
        await set_budget(admin, CONFIG, "everything", {"scope": {}, "limit_usd": "50"})
        assert await _until(lambda: all(len(g.specs) == 3 for g in gates)) < 1.0
        await admin.put_budget_spec("search-monthly", {"deleted": True})
        assert await _until(lambda: all(names(g.specs)[0] == "alice-rpm" for g in gates)) < 1.0
    finally:
        for watcher in watchers:
            await watcher.stop()
        for store in stores:
            await store.close()


async def test_sqlite_schema_2_migrates_to_specs_keeping_budgets(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:  # a database written before run-time specs
        for statements in _MIGRATIONS[:2]:
            for statement in statements:
                conn.execute(statement)
        conn.execute("INSERT INTO budget (key, spent, reserved) VALUES ('b:2026-11', 7, 0)")
        conn.execute("PRAGMA user_version = 2")
    store = SqliteStore(path)
    await store.open()
    try:
        assert (await store.budget_state("b:2026-11")).spent_nanos == 7
        assert await store.budget_specs_version() == 0
        await store.put_budget_spec("b", {"scope": {}, "limit_usd": "1"})
        assert await store.budget_specs() == {"b": {"scope": {}, "limit_usd": "1"}}
    finally:
        await store.close()


# -- the admin API -------------------------------------------------------------------------

TOKEN = "admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def admin(memory: DownableStore) -> AsyncIterator[tuple[TestClient[Any, Any], BudgetGate]]:
    gate = BudgetGate(memory, CONFIG)
    app = web.Application()
    setup_admin(
        app, token=TOKEN, get_gate=lambda: gate, get_store=lambda: memory, config_specs=CONFIG
    )
    async with TestClient(TestServer(app)) as client:
        yield client, gate


async def test_the_admin_api_is_off_without_a_token(memory: DownableStore) -> None:
    app = web.Application()
    setup_admin(app, token=None, get_gate=lambda: None, get_store=lambda: memory, config_specs=())
    async with TestClient(TestServer(app)) as client:
        for path in ("/admin/budgets", "/admin"):
            response = await client.get(path, headers=AUTH)
            assert response.status == 404
            assert (await response.json())["error"]["code"] == "admin_disabled"


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"x-api-key": TOKEN}],
)
async def test_the_admin_api_needs_the_token(
    admin: tuple[TestClient[Any, Any], BudgetGate], headers: dict[str, str]
) -> None:
    client, _ = admin
    for method, path in (("GET", "/admin/budgets"), ("PUT", "/admin/budgets/x")):
        response = await client.request(method, path, headers=headers, json={"limit_usd": 1})
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        error = (await response.json())["error"]
        assert error["code"] == "unauthorized" and error["message"].endswith(".")


async def test_put_then_get_and_the_gate_applies_it_at_once(
    admin: tuple[TestClient[Any, Any], BudgetGate],
) -> None:
    client, gate = admin
    body = {"scope": {"tag": "batch"}, "limit_usd": "12.5", "period": "day", "enforce": "soft"}
    created = await client.put("/admin/budgets/batch-daily", headers=AUTH, json=body)
    assert created.status == 201
    view = await created.json()
    assert (view["name"], view["source"], view["limit_usd"], view["spent_usd"]) == (
        "batch-daily",
        "run-time",
        "12.50",
        "0.00",
    )
    assert "batch-daily" in names(gate.specs)  # no poll needed on this replica
    changed = await client.put("/admin/budgets/search-monthly", headers=AUTH, json={"rpm": 1})
    assert changed.status == 400
    assert "cannot change 'rpm'" in (await changed.json())["error"]["message"]
    changed = await client.put(
        "/admin/budgets/search-monthly", headers=AUTH, json={"limit_usd": "1"}
    )
    assert changed.status == 200
    view = await (await client.get("/admin/budgets/search-monthly", headers=AUTH)).json()
    assert (view["source"], view["limit_usd"], view["timezone"]) == (
        "override",
        "1.00",
        "Europe/Berlin",
    )
    assert view["period_reset"].endswith(("+01:00", "+02:00"))
    listing = await (await client.get("/admin/budgets", headers=AUTH)).json()
    assert [v["name"] for v in listing["budgets"]] == ["search-monthly", "alice-rpm", "batch-daily"]
    assert listing["budgets"][1]["limit_usd"] is None  # rates only


async def test_admin_errors_are_json_sentences(
    admin: tuple[TestClient[Any, Any], BudgetGate],
) -> None:
    client, _ = admin
    cases = [
        ("GET", "/admin/budgets/nope", None, 404, "not_found"),
        ("PUT", "/admin/budgets/new", {"limit_usd": "1"}, 400, "invalid_budget"),
        ("PUT", "/admin/budgets/new", None, 400, "invalid_json"),
        ("PUT", "/admin/budgets/new", {"scope": {}, "limit_usd": "x"}, 400, "invalid_budget"),
        ("POST", "/admin/budgets/alice-rpm/reset", None, 409, "no_spend_limit"),
        ("POST", "/admin/budgets/nope/revert", None, 409, "not_in_config"),
        ("GET", "/admin/nothing-here", None, 404, "not_found"),
    ]
    for method, path, body, status, code in cases:
        kwargs: dict[str, Any] = {"json": body} if body is not None else {"data": b"{not json"}
        response = await client.request(method, path, headers=AUTH, **kwargs)
        error = (await response.json())["error"]
        assert (response.status, error["code"]) == (status, code), (path, error)
        assert error["message"][0].isupper() and error["message"].endswith("."), error


async def test_delete_revert_and_reset_over_http(
    admin: tuple[TestClient[Any, Any], BudgetGate], memory: DownableStore
) -> None:
    client, gate = admin
    deleted = await (await client.delete("/admin/budgets/search-monthly", headers=AUTH)).json()
    assert deleted["outcome"] == "hidden" and "revert" in deleted["message"]
    assert names(gate.specs) == ["alice-rpm"]
    hidden = await client.get("/admin/budgets/search-monthly", headers=AUTH)
    assert (await hidden.json())["error"]["code"] == "budget_deleted"
    reverted = await client.post("/admin/budgets/search-monthly/revert", headers=AUTH)
    assert reverted.status == 200 and names(gate.specs) == ["search-monthly", "alice-rpm"]
    view = await (await client.get("/admin/budgets/search-monthly", headers=AUTH)).json()
    key = f"search-monthly:{view['period_id']}"
    assert await memory.settle("spent-before", 3 * USD, keys=[key])
    reset = await (await client.post("/admin/budgets/search-monthly/reset", headers=AUTH)).json()
    assert (reset["before"]["spent_usd"], reset["after"]["spent_usd"]) == ("3.00", "0.00")
    await client.put("/admin/budgets/tmp", headers=AUTH, json={"scope": {}, "limit_usd": 1})
    gone = await (await client.delete("/admin/budgets/tmp", headers=AUTH)).json()
    assert gone["outcome"] == "deleted" and "tmp" not in names(gate.specs)
