"""``metergate budgets`` as a user runs it: a subprocess against a SQLite store and
against a real Redis and Redis Cluster, with a replica's spec watcher following the
changes it makes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.budget import budget_key, period_window
from proxy.budget_gate import BudgetGate
from proxy.budget_specs import SpecWatcher
from proxy.settings import load_settings
from proxy.store import open_store
from tests.conftest import base_config
from tests.redis_servers import (  # the fixtures are used by name
    RedisClusterServers,
    RedisServer,
    redis_cluster,  # noqa: F401
    redis_server,  # noqa: F401
)
from tests.test_budget_runtime import ALICE
from tests.test_store_contract import fresh_namespace

METERGATE = [sys.executable, "-m", "proxy.cli"]
REPO = Path(__file__).resolve().parents[1]
BUDGETS = [
    {
        "name": "search-monthly",
        "scope": {"team": "search"},
        "limit_usd": 100,
        "period": "month",
        "timezone": "Europe/Berlin",
    },
    {"name": "alice-rpm", "scope": {"user": "alice"}, "requests_per_minute": 60},
]


def write_config(directory: Path, store: str) -> Path:
    config = base_config("http://127.0.0.1:9", store)
    config["budgets"] = BUDGETS
    path = directory / "metergate.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*METERGATE, "budgets", *args, "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def ok(config: Path, *args: str) -> str:
    done = cli(config, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def show(config: Path, name: str) -> dict[str, Any]:
    view: dict[str, Any] = json.loads(ok(config, "show", name, "--format", "json"))
    return view


async def charge(config: Path, name: str, nanos: int) -> None:
    """Settle ``nanos`` on the current period of a config budget, as a proxy would."""
    settings = load_settings(config)
    spec = next(s for s in settings.budgets if s.name == name)
    store = open_store(settings.store)
    await store.open()
    try:
        key = budget_key(spec, period_window(spec))
        assert await store.settle(f"seed-{nanos}", nanos, keys=[key])
    finally:
        await store.close()


@pytest.fixture
def sqlite_config(tmp_path: Path) -> Path:
    return write_config(tmp_path, f"sqlite:///{tmp_path}/metergate.db")


def test_list_and_show_every_budget(sqlite_config: Path) -> None:
    asyncio.run(charge(sqlite_config, "search-monthly", 1_500_000_001))
    listing = json.loads(ok(sqlite_config, "list", "--format", "json"))
    assert (listing["hidden"], listing["invalid"]) == ([], [])
    search, rpm = listing["budgets"]
    assert search["name"] == "search-monthly" and search["source"] == "config"
    assert (search["limit_usd"], search["spent_usd"], search["reserved_usd"]) == (
        "100.00",
        "1.500000001",
        "0.00",
    )
    assert search["percent_spent"] == 1.5
    assert search["period_start"][8:19] == "01T00:00:00"  # local midnight on the 1st
    assert search["period_reset"].endswith(("+01:00", "+02:00"))  # Berlin time
    assert (rpm["requests_per_minute"], rpm["limit_usd"], rpm["spent_usd"]) == (60, None, None)
    table = ok(sqlite_config, "list")
    header, first, second = table.splitlines()
    assert header.split()[:5] == ["NAME", "SOURCE", "SCOPE", "PERIOD", "ENFORCE"]
    assert first.split()[:3] == ["search-monthly", "config", "team=search"]
    assert "1.500000001" in first and "user=alice" in second
    text = ok(sqlite_config, "show", "alice-rpm")
    assert "requests/min: 60" in text and "source:       config" in text


def test_set_changes_only_the_given_fields_and_creates_budgets(sqlite_config: Path) -> None:
    out = ok(sqlite_config, "set", "search-monthly", "--limit-usd", "50.25")
    assert out.startswith("Changed the budget 'search-monthly'")
    view = show(sqlite_config, "search-monthly")
    assert (view["source"], view["limit_usd"], view["timezone"], view["scope"]) == (
        "override",
        "50.25",
        "Europe/Berlin",
        {"team": "search"},
    )
    args = ["--scope", "tag=batch", "--scope", "team=support", "--limit-usd", "5", "--rpm", "10"]
    args += ["--period", "day", "--timezone", "America/New_York", "--enforce", "soft"]
    assert ok(sqlite_config, "set", "batch", *args).startswith("Created the budget 'batch'")
    view = show(sqlite_config, "batch")
    assert {k: view[k] for k in ("source", "scope", "period", "timezone", "enforce")} == {
        "source": "run-time",
        "scope": {"tag": "batch", "team": "support"},
        "period": "day",
        "timezone": "America/New_York",
        "enforce": "soft",
    }
    assert (view["limit_usd"], view["requests_per_minute"], view["tokens_per_minute"]) == (
        "5.00",
        10,
        None,
    )
    ok(sqlite_config, "set", "batch", "--rpm", "none", "--tpm", "5000")
    view = show(sqlite_config, "batch")
    assert (view["requests_per_minute"], view["tokens_per_minute"]) == (None, 5000)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["set", "new", "--limit-usd", "5"], "needs a scope"),
        (["set", "x", "--scope", "bogus"], "is not FIELD=VALUE"),
        (["set", "x", "--scope", "all", "--limit-usd", "-1"], "must be zero or more USD"),
        (["set", "search-monthly", "--timezone", "Mars/Base"], "not a known timezone"),
        (["set", "search-monthly"], "Nothing to change"),
    ],
)
def test_invalid_input_exits_2_with_a_sentence(
    sqlite_config: Path, args: list[str], message: str
) -> None:
    done = cli(sqlite_config, *args)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("metergate: ") and message in done.stderr
    assert done.stderr.rstrip().endswith(".")


def test_delete_revert_and_reset(sqlite_config: Path) -> None:
    out = ok(sqlite_config, "delete", "search-monthly")
    assert "declared in the config file" in out and "budgets revert search-monthly" in out
    assert "Deleted at run time (config budgets): search-monthly" in ok(sqlite_config, "list")
    hidden = cli(sqlite_config, "show", "search-monthly")
    assert hidden.returncode == 1 and "deleted at run time" in hidden.stderr
    assert "back to its config entry" in ok(sqlite_config, "revert", "search-monthly")
    assert show(sqlite_config, "search-monthly")["source"] == "config"

    asyncio.run(charge(sqlite_config, "search-monthly", 2 * 10**9))
    unconfirmed = cli(sqlite_config, "reset", "search-monthly")
    assert unconfirmed.returncode == 1 and "--yes" in unconfirmed.stderr
    assert "$2.00 spent" in unconfirmed.stderr
    assert show(sqlite_config, "search-monthly")["spent_usd"] == "2.00"
    out = ok(sqlite_config, "reset", "search-monthly", "--yes")
    assert "spent $2.00 -> $0.00" in out
    assert show(sqlite_config, "search-monthly")["spent_usd"] == "0.00"

    ok(sqlite_config, "set", "tmp", "--scope", "all", "--limit-usd", "1")
    assert "deleted on every replica" in ok(sqlite_config, "delete", "tmp")
    again = cli(sqlite_config, "delete", "tmp")
    assert again.returncode == 1 and "no budget named 'tmp'" in again.stderr


def test_a_memory_store_refuses_run_time_changes(tmp_path: Path) -> None:
    config = write_config(tmp_path, "memory://")
    done = cli(config, "set", "x", "--scope", "all", "--limit-usd", "1")
    assert done.returncode == 1 and "need a shared store" in done.stderr


@pytest.mark.parametrize("backend", ["redis", "redis-cluster"])
async def test_the_cli_on_redis_reaches_a_running_replica(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str
) -> None:
    namespace = fresh_namespace()
    if backend == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        url = f"{server.url}/0?namespace={namespace}"
    else:
        cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
        url = f"{cluster.url}?namespace={namespace}"
    config = write_config(tmp_path, url)
    settings = load_settings(config)
    store = open_store(url)
    await store.open()
    gate = BudgetGate(store, settings.budgets, store_timeout_s=2.0)
    watcher = SpecWatcher(store, gate, settings.budgets)
    await watcher.start()
    try:
        await asyncio.to_thread(ok, config, "set", "search-monthly", "--limit-usd", "7")
        await asyncio.sleep(0.8)  # one poll interval and a read, with room to spare
        assert gate.specs[0].limit_nanos == 7 * 10**9
        reservation = await gate.reserve("r1", ALICE, 10**9, 10)
        await gate.settle(reservation, 250_000_000)
        listing = json.loads(await asyncio.to_thread(ok, config, "list", "--format", "json"))
        search = listing["budgets"][0]
        assert (search["source"], search["limit_usd"], search["spent_usd"]) == (
            "override",
            "7.00",
            "0.25",
        )
    finally:
        await watcher.stop()
        await store.close()
