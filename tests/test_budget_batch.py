"""Batched budget calls (group commit), on every store backend, and the gate that sends them.

:meth:`Store.budget_batch` runs settles, then reservations, each on its own and in
order, in one step (one script call on Redis): a cap stays exact inside a batch, a
malformed call fails alone, ids of any bytes work. The gate puts the reserves and
settles of concurrent requests into one such call, journals the settles of a failed
batch exactly once, and gives back the hold of a caller that left while its reserve
was in flight.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest

from proxy.budget import BudgetSpec, RequestFacts
from proxy.budget_gate import BudgetGate
from proxy.journal import Journal
from proxy.store import BudgetState, RateItem, ReserveResult, Store
from proxy.store.base import ReserveCall, SettleCall
from tests.redis_servers import (  # the fixtures are used by name
    redis_cluster,  # noqa: F401
    redis_server,  # noqa: F401
)
from tests.test_budget_contract import hard, store  # noqa: F401 (the fixture)
from tests.test_budget_gate import FlakyStore

TTL = 60.0
USD = 1_000_000_000


# -- the store: one batch -------------------------------------------------------------------


async def test_a_batch_admits_in_order_exactly_what_fits(store: Store) -> None:
    amount, fits = 1_000_003, 6
    limit = fits * amount + amount - 1
    calls = [
        ReserveCall(f"r{i}", [hard("team", limit, amount), hard("all", None, amount)], TTL)
        for i in range(10)
    ]
    reserved, settled = await store.budget_batch(calls, [])
    assert settled == []
    assert [isinstance(r, ReserveResult) and r.ok for r in reserved] == [True] * 6 + [False] * 4
    refusal = reserved[6]
    assert isinstance(refusal, ReserveResult)
    assert (refusal.kind, refusal.key, refusal.state) == (
        "budget",
        "team",
        BudgetState(0, 6 * amount),
    )
    # All or nothing per call: the refused ones held nothing on the uncapped budget.
    assert await store.budget_states(["team", "all"]) == {
        "team": BudgetState(0, 6 * amount),
        "all": BudgetState(0, 6 * amount),
    }


async def test_settles_run_before_the_reservations_of_their_batch(store: Store) -> None:
    assert (await store.reserve("old", [hard("k", 100, 100)], TTL)).ok
    settles = [SettleCall("old", {"k": 30})]
    reserves = [ReserveCall("new", [hard("k", 100, 70)], TTL)]  # fits once old settled
    reserved, settled = await store.budget_batch(reserves, settles)
    assert settled == [True]
    assert isinstance(reserved[0], ReserveResult) and reserved[0].ok
    assert await store.budget_state("k") == BudgetState(30, 70)


async def test_a_malformed_call_fails_alone(store: Store) -> None:
    reserves = [
        ReserveCall("good", [hard("k", None, 5)], TTL),
        ReserveCall("bad", [hard("k", None, -1)], TTL),
    ]
    settles = [
        SettleCall("unknown", 1.5),  # type: ignore[arg-type]
        SettleCall("late", {"k": 7}),
    ]
    reserved, settled = await store.budget_batch(reserves, settles)
    assert isinstance(reserved[0], ReserveResult) and reserved[0].ok
    assert isinstance(reserved[1], ValueError) and "between 0 and" in str(reserved[1])
    assert isinstance(settled[0], TypeError) and settled[1] is True
    assert await store.budget_state("k") == BudgetState(7, 5)


async def test_ids_of_any_characters_and_repeats_within_a_batch(store: Store) -> None:
    ids = ["a b", "tab\there", "ünï-1", "new\nline", "ünï-1"]  # the last repeats the third
    calls = [ReserveCall(rid, [hard("k", None, 10)], TTL) for rid in ids]
    reserved = await store.reserve_many(calls)
    assert all(isinstance(r, ReserveResult) and r.ok for r in reserved)
    assert await store.budget_state("k") == BudgetState(0, 40)  # the repeat held once
    settled = await store.settle_many(
        [SettleCall(rid, 3) for rid in ids[:4]] + [SettleCall("ünï-1", 3), SettleCall("a b", 3)]
    )
    assert settled == [True, True, True, True, False, False]  # exactly once, per id
    assert await store.budget_state("k") == BudgetState(12, 0)
    again = await store.reserve_many([ReserveCall("tab\there", [hard("k", None, 1)], TTL)])
    assert isinstance(again[0], ReserveResult) and again[0].kind == "duplicate"


async def test_rate_limits_and_releases_in_a_batch(store: Store) -> None:
    rpm = RateItem("alice:rpm", 3, 1)
    calls = [ReserveCall(f"q{i}", [], TTL, [rpm]) for i in range(5)]
    reserved = await store.reserve_many(calls)
    kinds = [r.kind if isinstance(r, ReserveResult) else r for r in reserved]
    assert kinds == [None, None, None, "rate", "rate"]
    # Two releases give their units back within one batch; a third release is a no-op.
    settled = await store.settle_many(
        [
            SettleCall("q0", release=True),
            SettleCall("q1", release=True),
            SettleCall("q0", release=True),
        ]
    )
    assert settled == [True, True, False]
    reserved = await store.reserve_many(calls[3:])
    assert all(isinstance(r, ReserveResult) and r.ok for r in reserved)


# -- the gate: group commit -------------------------------------------------------------------


class BatchCountingStore(FlakyStore):
    """A real store behind a counter of batch calls, which can also hold them back."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.batches: list[tuple[int, int]] = []  # (reserves, settles) per call
        self.held_back: asyncio.Event | None = None
        self.called = asyncio.Event()

    async def budget_batch(
        self, reserves: Sequence[ReserveCall], settles: Sequence[SettleCall]
    ) -> tuple[list[ReserveResult | Exception], list[bool | Exception]]:
        self.batches.append((len(reserves), len(settles)))
        self.called.set()
        if self.held_back is not None:
            await self.held_back.wait()
        await self._gate()
        return await self.inner.budget_batch(reserves, settles)


ALL = BudgetSpec("all", scope={}, limit_nanos=USD, period="total")
RPM = BudgetSpec("rpm", scope={}, requests_per_minute=1_000_000)
FACTS = RequestFacts(key="app", user="alice", team="search")


async def test_concurrent_requests_share_one_store_call_per_phase(store: Store) -> None:
    counting = BatchCountingStore(store)
    gate = BudgetGate(counting, [ALL, RPM], store_timeout_s=5)
    amount, fits = USD // 40, 40
    reservations = await asyncio.gather(
        *(gate.reserve(f"g{i}", FACTS, amount, 10) for i in range(50)), return_exceptions=True
    )
    assert counting.batches == [(50, 0)]
    held = [r for r in reservations if not isinstance(r, BaseException)]
    assert len(held) == fits  # the cap is exact inside one batch
    await asyncio.gather(*(gate.settle(r, amount // 2) for r in held))
    assert counting.batches == [(50, 0), (0, fits)]
    assert await store.budget_state("all:total") == BudgetState(fits * amount // 2, 0)


async def test_a_failed_batch_journals_each_settle_once(store: Store, tmp_path: Path) -> None:
    counting = BatchCountingStore(store)
    journal = Journal(tmp_path / "journal")
    await journal.open()
    gate = BudgetGate(counting, [ALL], journal=journal, store_timeout_s=5)
    held = await asyncio.gather(*(gate.reserve(f"f{i}", FACTS, 100, 1) for i in range(20)))
    counting.down = True
    await asyncio.gather(*(gate.settle(r, 40) for r in held))
    assert len(counting.batches) == 2 and journal.written == 20 and gate.lost_settles == 0
    counting.down = False
    report = await journal.replay(counting)
    assert (report.applied, report.duplicates) == (20, 0)
    assert await store.budget_state("all:total") == BudgetState(20 * 40, 0)
    await journal.close()


async def test_a_caller_gone_while_its_reserve_is_in_flight_gets_no_hold(store: Store) -> None:
    counting = BatchCountingStore(store)
    gate = BudgetGate(counting, [ALL], store_timeout_s=5)
    counting.held_back = asyncio.Event()
    caller = asyncio.create_task(gate.reserve("gone", FACTS, 500, 1))
    await counting.called.wait()  # the batch is sent, and held back
    caller.cancel()  # the client disconnected
    with pytest.raises(asyncio.CancelledError):
        await caller
    counting.held_back.set()
    await gate.drain()  # the reserve landed; the gate released it
    assert counting.batches == [(1, 0), (0, 1)]
    assert await store.budget_state("all:total") == BudgetState(0, 0)
