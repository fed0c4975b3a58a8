"""The budget gate and the fail-open journal, on every store backend.

Period roll-over (``now`` injected, no sleeping), refusals shaped for the pipeline,
fail-open and fail-closed when the store is down or slow, and a journal that
replays exactly once, even when a replay is repeated after a crash.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from proxy.budget import BudgetSpec, RequestFacts
from proxy.budget_gate import BudgetGate
from proxy.errors import BudgetExceeded, RateLimited, StoreUnavailable
from proxy.journal import Journal
from proxy.ledger import LedgerRecord
from proxy.store import BudgetState, RateItem, ReserveItem, ReserveResult, Store
from proxy.store.base import AlertEntry
from tests.redis_servers import (  # the fixtures are used by name
    redis_cluster,  # noqa: F401
    redis_server,  # noqa: F401
)
from tests.test_store_contract import BACKENDS, RECORDS

USD = 1_000_000_000
ALICE = RequestFacts(key="app-a", user="alice", team="search", model="gpt-4o")
MONTHLY = BudgetSpec(
    "search-monthly",
    scope={"team": "search"},
    limit_nanos=1 * USD,
    period="month",
    timezone=ZoneInfo("Europe/Berlin"),
)
NOV = datetime(2026, 11, 30, 22, 30, tzinfo=UTC)  # 23:30 in Berlin, still November
DEC = datetime(2026, 11, 30, 23, 10, tzinfo=UTC)  # 00:10 on 1 December in Berlin


@pytest.fixture(params=list(BACKENDS))
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    backend = await BACKENDS[request.param](request, tmp_path)
    await backend.open()
    yield backend
    await backend.close()


class FlakyStore(Store):
    """Delegates to a real store, but fails (``down``) or stalls (``delay_s``) on demand."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.down = False
        self.delay_s = 0.0

    async def _gate(self) -> None:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.down:
            raise StoreUnavailable("The test store is down.")

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    async def append_ledger(self, records: Sequence[LedgerRecord]) -> None:
        await self._gate()
        await self.inner.append_ledger(records)

    async def get_ledger_record(self, request_id: str) -> LedgerRecord | None:
        return await self.inner.get_ledger_record(request_id)

    async def ledger_records(
        self, since_ms: int | None = None, until_ms: int | None = None
    ) -> list[LedgerRecord]:
        return await self.inner.ledger_records(since_ms, until_ms)

    async def reserve(
        self,
        reservation_id: str,
        items: Sequence[ReserveItem],
        ttl_s: float,
        *,
        rates: Sequence[RateItem] = (),
    ) -> ReserveResult:
        await self._gate()
        return await self.inner.reserve(reservation_id, items, ttl_s, rates=rates)

    async def settle(
        self,
        reservation_id: str,
        actual: int | Mapping[str, int],
        *,
        keys: Sequence[str] = (),
        tokens: int | None = None,
    ) -> bool:
        await self._gate()
        return await self.inner.settle(reservation_id, actual, keys=keys, tokens=tokens)

    async def release(self, reservation_id: str) -> bool:
        await self._gate()
        return await self.inner.release(reservation_id)

    async def budget_states(self, keys: Sequence[str]) -> dict[str, BudgetState]:
        return await self.inner.budget_states(keys)

    async def reset_budget(self, key: str) -> None:
        await self.inner.reset_budget(key)

    async def enqueue_alert(
        self, dedup_key: str, payloads: Mapping[str, str], dedup_ttl_s: float | None
    ) -> bool:
        await self._gate()
        return await self.inner.enqueue_alert(dedup_key, payloads, dedup_ttl_s)

    async def alert_marked(self, dedup_key: str) -> bool:
        return await self.inner.alert_marked(dedup_key)

    async def lease_alerts(self, limit: int, lease_s: float) -> list[AlertEntry]:
        await self._gate()
        return await self.inner.lease_alerts(limit, lease_s)

    async def ack_alert(self, entry_id: str) -> bool:
        return await self.inner.ack_alert(entry_id)

    async def retry_alert(self, entry_id: str, delay_s: float) -> bool:
        return await self.inner.retry_alert(entry_id, delay_s)

    async def put_budget_spec(self, name: str, doc: Mapping[str, Any]) -> None:
        await self._gate()
        await self.inner.put_budget_spec(name, doc)

    async def delete_budget_spec(self, name: str) -> bool:
        await self._gate()
        return await self.inner.delete_budget_spec(name)

    async def budget_specs(self) -> dict[str, dict[str, Any]]:
        await self._gate()
        return await self.inner.budget_specs()

    async def budget_specs_version(self) -> int:
        await self._gate()
        return await self.inner.budget_specs_version()


# -- periods and refusals ------------------------------------------------------------------


async def test_period_rolls_over_at_local_midnight(store: Store) -> None:
    gate = BudgetGate(store, [MONTHLY], store_timeout_s=5)
    first = await gate.reserve("n1", ALICE, USD * 4 // 10, 100, now=NOV)
    await gate.reserve("n2", ALICE, USD * 4 // 10, 100, now=NOV)
    with pytest.raises(BudgetExceeded) as refused:
        await gate.reserve("n3", ALICE, USD * 4 // 10, 100, now=NOV)
    assert refused.value.headers == {
        "X-Metergate-Budget": "search-monthly",
        "X-Metergate-Budget-Reset": "2026-12-01T00:00:00+01:00",
    }
    assert "$0.80 is held" in refused.value.message
    # Forty minutes later it is December in Berlin (still November in UTC).
    december = await gate.reserve("d1", ALICE, USD * 4 // 10, 100, now=DEC)
    assert december.keys == ("search-monthly:2026-12",)
    # A November request that settles in December is charged to November.
    await gate.settle(first, USD // 10)
    await gate.settle(december, USD // 5)
    (nov,) = await gate.status(now=NOV)
    (dec,) = await gate.status(now=DEC)
    assert (nov.key, nov.state) == ("search-monthly:2026-11", BudgetState(USD // 10, USD * 4 // 10))
    assert (dec.key, dec.state) == ("search-monthly:2026-12", BudgetState(USD // 5, 0))


async def test_only_matching_budgets_apply_and_unmatched_requests_cost_no_call(
    store: Store,
) -> None:
    flaky = FlakyStore(store)
    gate = BudgetGate(flaky, [MONTHLY], store_timeout_s=5)
    flaky.down = True  # any store call would fail
    bob = RequestFacts(key="app-b", user="bob", team="support")
    reservation = await gate.reserve("b1", bob, USD, 10, now=NOV)
    assert (reservation.keys, reservation.store_held) == ((), False)
    await gate.settle(reservation, USD)


async def test_soft_budgets_admit_and_report(store: Store) -> None:
    soft = replace(MONTHLY, name="soft", enforce="soft")
    gate = BudgetGate(store, [soft], store_timeout_s=5)
    await gate.reserve("s1", ALICE, USD, 1, now=NOV)
    over = await gate.reserve("s2", ALICE, USD, 1, now=NOV)
    assert over.store_held and over.soft_exceeded == ("soft",)


async def test_rate_limits_become_429_with_retry_after(store: Store) -> None:
    rpm = BudgetSpec("alice-rpm", scope={"user": "alice"}, requests_per_minute=2)
    tpm = BudgetSpec("alice-tpm", scope={"user": "alice"}, tokens_per_minute=1_000)
    gate = BudgetGate(store, [rpm, tpm], store_timeout_s=5)
    first = await gate.reserve("r1", ALICE, 5, 400)
    await gate.reserve("r2", ALICE, 5, 400)
    with pytest.raises(RateLimited) as limited:
        await gate.reserve("r3", ALICE, 5, 100)
    assert 25 <= int(limited.value.headers["Retry-After"]) <= 30  # one request per 30 s
    await gate.release(first)  # never reached the upstream: its request is given back
    await gate.reserve("r4", ALICE, 5, 100)
    with pytest.raises(RateLimited, match="can never be admitted"):
        await BudgetGate(store, [tpm], store_timeout_s=5).reserve("r5", ALICE, 5, 5_000)


# -- store trouble -----------------------------------------------------------------------


async def test_fail_open_journals_and_replays_exactly_once(store: Store, tmp_path: Path) -> None:
    flaky = FlakyStore(store)
    journal = Journal(tmp_path / "journal")
    await journal.open()
    gate = BudgetGate(flaky, [MONTHLY], journal=journal, store_timeout_s=5)
    held = await gate.reserve("h1", ALICE, USD // 2, 10, now=NOV)
    flaky.down = True
    unchecked = await gate.reserve("u1", ALICE, USD // 2, 10, now=NOV)  # admitted unchecked
    assert unchecked.store_held is False
    await gate.settle(held, 300)
    await gate.settle(unchecked, 200)
    assert journal.written == 2 and journal.has_pending()
    key = "search-monthly:2026-11"
    assert await store.budget_state(key) == BudgetState(0, USD // 2)

    flaky.down = False
    report = await journal.replay(flaky)
    assert (report.applied, report.duplicates, report.interrupted) == (2, 0, False)
    assert await store.budget_state(key) == BudgetState(500, 0)
    assert not journal.has_pending()
    await journal.close()


async def test_fail_closed_refuses_with_503(store: Store) -> None:
    flaky = FlakyStore(store)
    flaky.down = True
    gate = BudgetGate(flaky, [MONTHLY], on_store_error="fail_closed", store_timeout_s=5)
    with pytest.raises(StoreUnavailable) as refused:
        await gate.reserve("c1", ALICE, 1, 1, now=NOV)
    assert refused.value.status == 503


async def test_a_slow_store_does_not_stall_the_request(store: Store, tmp_path: Path) -> None:
    flaky = FlakyStore(store)
    flaky.delay_s = 2.0
    journal = Journal(tmp_path / "journal")
    gate = BudgetGate(flaky, [MONTHLY], journal=journal, store_timeout_s=0.05)
    started = time.perf_counter()
    reservation = await gate.reserve("slow", ALICE, 10, 1, now=NOV)
    await gate.settle(reservation, 7)  # times out too: journaled
    assert time.perf_counter() - started < 1.0
    assert gate.store_errors == 2 and journal.written == 1
    flaky.delay_s = 0
    assert (await journal.replay(flaky)).applied == 1
    assert await store.budget_state("search-monthly:2026-11") == BudgetState(7, 0)
    await journal.close()


async def test_a_cancelled_caller_does_not_cancel_its_charge(store: Store) -> None:
    flaky = FlakyStore(store)
    gate = BudgetGate(flaky, [MONTHLY], store_timeout_s=5)
    reservation = await gate.reserve("c1", ALICE, 100, 1, now=NOV)
    flaky.delay_s = 0.2
    caller = asyncio.create_task(gate.settle(reservation, 60))
    await asyncio.sleep(0.05)
    caller.cancel()  # the client disconnected while the proxy was settling
    with pytest.raises(asyncio.CancelledError):
        await caller
    await gate.drain()
    assert await store.budget_state("search-monthly:2026-11") == BudgetState(60, 0)
    await gate.settle(reservation, 60)  # a second settle of the same reservation: no-op
    assert await store.budget_state("search-monthly:2026-11") == BudgetState(60, 0)


async def test_release_gives_the_hold_back(store: Store) -> None:
    gate = BudgetGate(store, [MONTHLY], store_timeout_s=5)
    reservation = await gate.reserve("r1", ALICE, 100, 1, now=NOV)
    await gate.release(reservation)
    await gate.settle(reservation, 100)  # already done: ignored
    assert await store.budget_state("search-monthly:2026-11") == BudgetState(0, 0)


# -- the journal ---------------------------------------------------------------------------


async def test_journal_replay_is_idempotent(store: Store, tmp_path: Path) -> None:
    directory = tmp_path / "journal"
    journal = Journal(directory)
    await journal.open()
    assert (await store.reserve("held", [ReserveItem("k", None, 100, True)], 60)).ok
    await journal.record_settle("held", {"k": 70}, None)
    await asyncio.gather(*(journal.record_settle(f"j{i}", {"k": i}, None) for i in range(100)))
    await journal.record_ledger(RECORDS[:50])
    expected = BudgetState(70 + sum(range(100)), 0)

    # A replay that crashed after applying everything, before deleting its file:
    saved = tmp_path / "saved"
    shutil.copytree(directory, saved)
    first = await journal.replay(store)
    assert (first.applied, first.duplicates, first.files) == (151, 0, 1)
    assert await store.budget_state("k") == expected
    assert list(directory.glob("journal-*")) == []

    # ... is replayed again from the copy: nothing changes. A torn last line is skipped.
    for path in saved.glob("journal-*.jsonl"):
        with path.open("ab") as file:
            file.write(b'{"t": "settle", "id": "torn", "char')
        shutil.copy(path, directory / path.name)
    second = await journal.replay(store)
    assert (second.applied, second.duplicates, second.bad_lines) == (50, 101, 1)
    assert await store.budget_state("k") == expected
    assert len(await store.ledger_records()) == 50  # ledger entries were idempotent too
    await journal.close()


async def test_journal_replay_stops_when_the_store_fails_again(
    store: Store, tmp_path: Path
) -> None:
    flaky = FlakyStore(store)
    journal = Journal(tmp_path / "journal")
    await journal.open()
    await journal.record_settle("a", {"k": 5}, None)
    flaky.down = True
    report = await journal.replay(flaky)
    assert report.interrupted and report.files == 0
    assert journal.has_pending()  # the rotated file waits for the next replay
    await journal.record_settle("b", {"k": 6}, None)
    flaky.down = False
    report = await journal.replay(flaky)
    assert (report.applied, report.files, report.interrupted) == (2, 2, False)
    assert await store.budget_state("k") == BudgetState(11, 0)
    await journal.close()


async def test_replay_leaves_live_files_alone_and_adopts_dead_ones(
    store: Store, tmp_path: Path
) -> None:
    directory = tmp_path / "journal"
    live, other = Journal(directory), Journal(directory)  # two replicas on one host
    await live.record_settle("a", {"k": 5}, None)
    report = await other.replay(store)  # the live replica's file is locked: skipped
    assert report.files == 0 and await store.budget_state("k") == BudgetState(0, 0)
    await live.close()  # as if that replica died: its lock is gone
    assert other.has_pending()
    report = await other.replay(store)
    assert (report.applied, report.files) == (1, 1)
    assert await store.budget_state("k") == BudgetState(5, 0)
    await other.close()
