"""The budget contract, on every store backend: memory, SQLite, Redis, Redis Cluster.

Reservations are all or nothing, a cap admits exactly what fits under any
concurrency, reserve/settle never drifts, settles apply exactly once, abandoned
reservations expire, periods roll over, rate limits refuse with a retry time, and a
journal replays exactly once. Cross-process tests follow at the end.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.store import BudgetState, RateItem, ReserveItem, Store
from tests.redis_servers import (  # the fixtures are used by name
    redis_cluster,  # noqa: F401
    redis_server,  # noqa: F401
)
from tests.test_store_contract import BACKENDS

TTL = 60.0


@pytest.fixture(params=list(BACKENDS))
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    backend = await BACKENDS[request.param](request, tmp_path)
    await backend.open()
    yield backend
    await backend.close()


def hard(key: str, limit: int | None, amount: int) -> ReserveItem:
    return ReserveItem(key, limit, amount, True)


# -- caps under concurrency ----------------------------------------------------------------


async def test_200_concurrent_reservations_admit_exactly_what_fits(store: Store) -> None:
    amount, fits = 1_234_567, 37
    limit = fits * amount + amount - 1  # room for 37 and most of a 38th: not enough
    results = await asyncio.gather(
        *(
            store.reserve(
                f"r{i}",
                [hard("team:2026-11", limit, amount), hard("everything:2026-11", None, amount)],
                TTL,
            )
            for i in range(200)
        )
    )
    admitted = [i for i, r in enumerate(results) if r.ok]
    assert len(admitted) == fits
    refused = [r for r in results if not r.ok]
    assert {(r.kind, r.key) for r in refused} == {("budget", "team:2026-11")}
    # All or nothing: refused requests left no hold on the uncapped budget either.
    assert await store.budget_states(["team:2026-11", "everything:2026-11"]) == {
        "team:2026-11": BudgetState(0, fits * amount),
        "everything:2026-11": BudgetState(0, fits * amount),
    }
    await asyncio.gather(*(store.settle(f"r{i}", amount) for i in admitted))
    assert await store.budget_state("team:2026-11") == BudgetState(fits * amount, 0)


async def test_the_cap_counts_spent_and_reserved(store: Store) -> None:
    assert (await store.reserve("a", [hard("b", 100, 60)], TTL)).ok
    refused = await store.reserve("b", [hard("b", 100, 41)], TTL)
    assert (refused.ok, refused.kind, refused.key, refused.state) == (
        False,
        "budget",
        "b",
        BudgetState(0, 60),
    )
    assert (await store.reserve("c", [hard("b", 100, 40)], TTL)).ok  # exactly the limit
    assert await store.settle("a", 10)  # settles below the hold: room comes back
    assert (await store.reserve("d", [hard("b", 100, 50)], TTL)).ok
    assert await store.budget_state("b") == BudgetState(10, 90)


async def test_interleaved_reserve_and_settle_never_drift(store: Store) -> None:
    rng = random.Random(5)
    charged: list[int] = []

    async def request(i: int) -> None:
        amount = rng.randrange(1, 10**9)
        result = await store.reserve(
            f"i{i}", [hard("a", None, amount), hard("b", None, amount)], TTL
        )
        assert result.ok
        await asyncio.sleep(rng.random() / 100)
        if i % 5 == 0:
            assert await store.release(f"i{i}")
            return
        actual = rng.choice([0, amount // 3, amount, amount * 2])  # may exceed the hold
        charged.append(actual)
        assert await store.settle(f"i{i}", actual)

    await asyncio.gather(*(request(i) for i in range(300)))
    total = sum(charged)
    assert await store.budget_states(["a", "b"]) == {
        "a": BudgetState(total, 0),
        "b": BudgetState(total, 0),
    }


# -- exactly once ----------------------------------------------------------------------------


async def test_settle_applies_exactly_once(store: Store) -> None:
    assert (await store.reserve("x", [hard("k", 1000, 100)], TTL)).ok
    assert (await store.reserve("x", [hard("k", 1000, 100)], TTL)).ok  # a retry holds once
    assert await store.budget_state("k") == BudgetState(0, 100)
    assert await store.settle("x", 70) is True
    assert await store.settle("x", 70) is False
    assert await store.budget_state("k") == BudgetState(70, 0)
    again = await store.reserve("x", [hard("k", 1000, 100)], TTL)
    assert (again.ok, again.kind) == (False, "duplicate")
    assert await store.release("x") is False
    assert await store.budget_state("k") == BudgetState(70, 0)


async def test_release_then_settle_charges_nothing(store: Store) -> None:
    assert (await store.reserve("x", [hard("k", None, 100)], TTL)).ok
    assert await store.release("x") is True
    assert await store.settle("x", 50, keys=["k"]) is False
    assert await store.budget_state("k") == BudgetState(0, 0)


async def test_settle_per_key_and_of_unknown_ids(store: Store) -> None:
    assert (await store.reserve("x", [hard("a", None, 10), hard("b", None, 10)], TTL)).ok
    assert await store.settle("x", {"a": 7, "b": 12})
    # An id the store never saw (reserved while it was down): charged to the given keys.
    assert await store.settle("y", 5, keys=["a", "c"])
    assert await store.budget_states(["a", "b", "c"]) == {
        "a": BudgetState(12, 0),
        "b": BudgetState(12, 0),
        "c": BudgetState(5, 0),
    }


async def test_malformed_calls_are_refused_alike(store: Store) -> None:
    with pytest.raises(ValueError, match="between 0 and"):
        await store.reserve("x", [hard("a", None, -1)], TTL)
    with pytest.raises(ValueError, match="twice"):
        await store.reserve("x", [hard("a", None, 1), hard("a", None, 1)], TTL)
    with pytest.raises(TypeError, match="must be an int"):
        await store.settle("x", 1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="between 0 and"):
        await store.reserve("x", [hard("a", 2**53, 1)], TTL)


async def test_large_amounts_stay_exact(store: Store) -> None:
    top = 2**53 - 1
    assert (await store.reserve("x", [hard("a", top, top - 1)], TTL)).ok
    assert not (await store.reserve("y", [hard("a", top, 2)], TTL)).ok
    assert await store.settle("x", top - 3)
    assert await store.budget_state("a") == BudgetState(top - 3, 0)


# -- expiry ----------------------------------------------------------------------------------


async def test_abandoned_reservations_expire_and_late_settles_still_charge(store: Store) -> None:
    assert (await store.reserve("crashed", [hard("k", 100, 80)], 1.0)).ok
    assert not (await store.reserve("blocked", [hard("k", 100, 80)], TTL)).ok
    await asyncio.sleep(1.3)
    assert await store.budget_state("k") == BudgetState(0, 0)  # swept
    assert (await store.reserve("next", [hard("k", 100, 80)], TTL)).ok
    # The replica was only slow: its late settle is charged in full, exactly once.
    assert await store.settle("crashed", 30, keys=["k"])
    assert not await store.settle("crashed", 30, keys=["k"])
    assert await store.budget_state("k") == BudgetState(30, 80)


async def test_many_expired_reservations_are_worked_off(store: Store) -> None:
    await asyncio.gather(*(store.reserve(f"e{i}", [hard("k", None, 1)], 0.2) for i in range(150)))
    await asyncio.sleep(0.4)
    for _ in range(4):  # each call sweeps a bounded number
        await store.budget_states(["k"])
    assert await store.budget_state("k") == BudgetState(0, 0)


# -- soft budgets ----------------------------------------------------------------------------


async def test_soft_budgets_never_refuse_but_report(store: Store) -> None:
    soft = ReserveItem("soft", 100, 80, False)
    assert (await store.reserve("a", [soft], TTL)).soft_exceeded == ()
    result = await store.reserve("b", [soft, hard("other", None, 80)], TTL)
    assert (result.ok, result.soft_exceeded) == (True, ("soft",))
    assert await store.budget_state("soft") == BudgetState(0, 160)


# -- rate limits -----------------------------------------------------------------------------


async def test_requests_per_minute(store: Store) -> None:
    rpm = RateItem("alice:rpm", 5, 1)
    for i in range(5):
        assert (await store.reserve(f"r{i}", [], TTL, rates=[rpm])).ok
    refused = await store.reserve("r5", [], TTL, rates=[rpm])
    assert (refused.ok, refused.kind, refused.key) == (False, "rate", "alice:rpm")
    # The bucket refills one request every 12 s; less the time the test took so far.
    assert refused.retry_after_s is not None and 6.0 < refused.retry_after_s <= 12.0
    # A request that never reached the upstream gives its unit back.
    assert await store.release("r0")
    assert (await store.reserve("r6", [], TTL, rates=[rpm])).ok


async def test_tokens_per_minute_settle_to_the_actual_count(store: Store) -> None:
    tpm = RateItem("t:tpm", 1000, 600, adjustable=True)
    assert (await store.reserve("a", [], TTL, rates=[tpm])).ok
    assert not (await store.reserve("b", [], TTL, rates=[tpm])).ok
    assert await store.settle("a", {}, tokens=100)  # used 100 of the 600 estimated
    assert (await store.reserve("c", [], TTL, rates=[tpm])).ok
    never = await store.reserve("d", [], TTL, rates=[RateItem("t:tpm", 1000, 1001, True)])
    assert (never.ok, never.kind, never.retry_after_s) == (False, "rate", None)


async def test_a_rate_refusal_holds_no_budget(store: Store) -> None:
    rpm = RateItem("k:rpm", 1, 1)
    assert (await store.reserve("a", [hard("b", None, 5)], TTL, rates=[rpm])).ok
    refused = await store.reserve("c", [hard("b", None, 5)], TTL, rates=[rpm])
    assert refused.kind == "rate"
    assert await store.budget_state("b") == BudgetState(0, 5)


async def test_reset_budget_keeps_holds(store: Store) -> None:
    assert (await store.reserve("a", [hard("k", None, 5)], TTL)).ok
    assert await store.settle("a", 5)
    assert (await store.reserve("b", [hard("k", None, 7)], TTL)).ok
    await store.reset_budget("k")
    assert await store.budget_state("k") == BudgetState(0, 7)


# -- run-time budget specs -------------------------------------------------------------------


async def test_budget_specs_round_trip_and_bump_the_version(store: Store) -> None:
    assert await store.budget_specs() == {}
    assert await store.budget_specs_version() == 0
    doc = {
        "name": "search-monthly",
        "scope": {"team": "search", "tag": "ünï o'k"},
        "limit_usd": "100.50",
        "period": "month",
        "timezone": "Europe/Berlin",
        "enforce": "hard",
        "requests_per_minute": 60,
    }
    await store.put_budget_spec("search-monthly", doc)
    v1 = await store.budget_specs_version()
    assert v1 != 0
    await store.put_budget_spec("gone", {"deleted": True})
    v2 = await store.budget_specs_version()
    assert v2 not in (0, v1)
    assert await store.budget_specs() == {"search-monthly": doc, "gone": {"deleted": True}}
    # A put of the same name replaces the document, and still bumps.
    await store.put_budget_spec("gone", {"name": "gone", "scope": {}, "limit_usd": 1})
    v3 = await store.budget_specs_version()
    assert v3 not in (0, v1, v2)
    assert (await store.budget_specs())["gone"] == {"name": "gone", "scope": {}, "limit_usd": 1}
    assert await store.delete_budget_spec("gone") is True
    v4 = await store.budget_specs_version()
    assert v4 not in (0, v1, v2, v3)
    # Deleting what is not there changes nothing, not even the version.
    assert await store.delete_budget_spec("gone") is False
    assert await store.budget_specs_version() == v4
    assert await store.budget_specs() == {"search-monthly": doc}


async def test_concurrent_spec_writes_each_bump_the_version(store: Store) -> None:
    await asyncio.gather(*(store.put_budget_spec(f"b{i % 7}", {"i": i}) for i in range(60)))
    assert await store.budget_specs_version() == 60
    specs = await store.budget_specs()
    assert sorted(specs) == [f"b{i}" for i in range(7)]
    assert all(doc["i"] % 7 == int(name[1:]) for name, doc in specs.items())


async def test_malformed_spec_writes_are_refused_alike(store: Store) -> None:
    with pytest.raises(ValueError, match="non-empty name"):
        await store.put_budget_spec("", {"scope": {}})
    with pytest.raises(TypeError, match="must be a mapping"):
        await store.put_budget_spec("x", ["not", "a", "mapping"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cannot be stored as JSON"):
        await store.put_budget_spec("x", {"limit_usd": object()})
    assert await store.budget_specs_version() == 0
