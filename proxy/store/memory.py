"""An in-process store: for tests and throwaway runs. Nothing survives the process.

Budgets follow :mod:`proxy.store.budget_engine` exactly. Each budget call is one
synchronous critical section with no ``await`` inside, so it is atomic with respect to
the event loop without any lock; it is *not* shared between processes (use SQLite or
Redis for that).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from proxy.ledger import LedgerRecord
from proxy.store import budget_engine as engine
from proxy.store.base import (
    BudgetState,
    RateItem,
    ReserveItem,
    ReserveResult,
    Store,
    decode_spec_docs,
    encode_spec_doc,
    validate_reserve,
    validate_settle,
)
from proxy.store.budget_engine import Held
from proxy.store.memory_alerts import MemoryAlertMethods, MemoryOutbox
from proxy.store.memory_keys import MemoryKeyMethods, MemoryKeyTable

__all__ = ["MemoryStore"]


def _now_us() -> int:
    return time.time_ns() // 1_000


class _MemoryBudgets:
    """The :class:`~proxy.store.budget_engine.BudgetTx` of the memory store: plain dicts,
    plus heaps ordered by expiry whose stale entries are skipped when popped."""

    def __init__(self) -> None:
        self.counters: dict[str, list[int]] = {}  # key -> [spent, reserved]
        self.holds: dict[str, Held] = {}
        self.expiries: list[tuple[int, str]] = []
        self.done: dict[str, int] = {}  # id -> remembered until (us)
        self.done_expiries: list[tuple[int, str]] = []
        self.tats: dict[str, int] = {}

    def budget(self, key: str) -> BudgetState:
        spent, reserved = self.counters.get(key, (0, 0))
        return BudgetState(spent, reserved)

    def add(self, key: str, spent: int, reserved: int) -> None:
        counter = self.counters.setdefault(key, [0, 0])
        counter[0] += spent
        counter[1] += reserved

    def reset(self, key: str) -> None:
        if key in self.counters:
            self.counters[key][0] = 0

    def held(self, rid: str) -> Held | None:
        return self.holds.get(rid)

    def hold(self, rid: str, held: Held) -> None:
        self.holds[rid] = held
        heapq.heappush(self.expiries, (held.expires_us, rid))

    def drop(self, rid: str) -> None:
        self.holds.pop(rid, None)

    def expired(self, now_us: int, limit: int) -> list[tuple[str, Held]]:
        out: list[tuple[str, Held]] = []
        while self.expiries and self.expiries[0][0] <= now_us and len(out) < limit:
            expires_us, rid = heapq.heappop(self.expiries)
            held = self.holds.get(rid)
            # Skip heap entries of reservations already settled or released.
            if held is not None and held.expires_us == expires_us:
                out.append((rid, held))
        return out

    def is_done(self, rid: str, now_us: int) -> bool:
        return self.done.get(rid, 0) > now_us

    def mark_done(self, rid: str, until_us: int) -> None:
        self.done[rid] = until_us
        heapq.heappush(self.done_expiries, (until_us, rid))

    def prune_done(self, now_us: int, limit: int) -> None:
        for _ in range(limit):
            if not self.done_expiries or self.done_expiries[0][0] > now_us:
                return
            until_us, rid = heapq.heappop(self.done_expiries)
            if self.done.get(rid) == until_us:
                del self.done[rid]

    def tat(self, key: str) -> int | None:
        return self.tats.get(key)

    def set_tat(self, key: str, tat_us: int) -> None:
        self.tats[key] = tat_us


class MemoryStore(MemoryKeyMethods, MemoryAlertMethods, Store):
    """Keeps the ledger in a dict keyed by request id.

    Every method runs without awaiting anything, so each call is atomic with respect
    to the event loop; that is what makes concurrent use from one loop safe.
    """

    def __init__(self) -> None:
        self._ledger: dict[str, LedgerRecord] = {}
        self._budgets = _MemoryBudgets()
        self._specs: dict[str, str] = {}  # name -> JSON text, as the other backends keep it
        self._specs_version = 0
        self._alerts = MemoryOutbox()  # budget alerts: see proxy.store.memory_alerts
        self._keys = MemoryKeyTable()  # issued keys: see proxy.store.memory_keys
        self._open = False

    @classmethod
    def from_url(cls, url: str) -> MemoryStore:
        """Build from ``memory://``; nothing may follow the scheme."""
        if url.partition("://")[2]:
            raise ValueError(
                f"The memory store takes no path or options; write 'memory://', not {url!r}."
            )
        return cls()

    async def open(self) -> None:
        """Mark the store usable. Data kept before a ``close()`` is still there."""
        self._open = True

    async def close(self) -> None:
        """Mark the store closed; further calls raise RuntimeError."""
        self._open = False

    def _check_open(self) -> None:
        if not self._open:
            raise RuntimeError("The memory store is not open; call `await store.open()` first.")

    async def append_ledger(self, records: Sequence[LedgerRecord]) -> None:
        """Store records whose id is not yet known; a known id is left untouched."""
        self._check_open()
        for record in records:
            if record.id not in self._ledger:
                # Copy the one mutable field so a caller mutating its dict afterwards
                # cannot rewrite history.
                self._ledger[record.id] = replace(record, extra=dict(record.extra))

    async def get_ledger_record(self, request_id: str) -> LedgerRecord | None:
        """The record with this request id, or None."""
        self._check_open()
        record = self._ledger.get(request_id)
        return None if record is None else replace(record, extra=dict(record.extra))

    async def ledger_records(
        self, since_ms: int | None = None, until_ms: int | None = None
    ) -> list[LedgerRecord]:
        """Records with ``since_ms <= ts_ms < until_ms``, ordered by (ts_ms, id)."""
        self._check_open()
        selected = [
            replace(r, extra=dict(r.extra))
            for r in self._ledger.values()
            if (since_ms is None or r.ts_ms >= since_ms)
            and (until_ms is None or r.ts_ms < until_ms)
        ]
        selected.sort(key=lambda r: (r.ts_ms, r.id))
        return selected

    # -- budgets: each call is one synchronous section, no await inside ---------------

    async def reserve(
        self,
        reservation_id: str,
        items: Sequence[ReserveItem],
        ttl_s: float,
        *,
        rates: Sequence[RateItem] = (),
    ) -> ReserveResult:
        """See :meth:`Store.reserve`."""
        self._check_open()
        validate_reserve(reservation_id, items, rates, ttl_s)
        ttl_us = max(1, round(ttl_s * 1e6))
        return engine.reserve(self._budgets, reservation_id, items, rates, ttl_us, _now_us())

    async def settle(
        self,
        reservation_id: str,
        actual: int | Mapping[str, int],
        *,
        keys: Sequence[str] = (),
        tokens: int | None = None,
    ) -> bool:
        """See :meth:`Store.settle`."""
        self._check_open()
        validate_settle(reservation_id, actual, keys)
        retention_us = round(self.settled_retention_s * 1e6)
        return engine.settle(
            self._budgets, reservation_id, actual, keys, tokens, _now_us(), retention_us
        )

    async def release(self, reservation_id: str) -> bool:
        """See :meth:`Store.release`."""
        self._check_open()
        retention_us = round(self.settled_retention_s * 1e6)
        return engine.release(self._budgets, reservation_id, _now_us(), retention_us)

    async def budget_states(self, keys: Sequence[str]) -> dict[str, BudgetState]:
        """See :meth:`Store.budget_states`."""
        self._check_open()
        return engine.states(self._budgets, keys, _now_us())

    async def reset_budget(self, key: str) -> None:
        """See :meth:`Store.reset_budget`."""
        self._check_open()
        self._budgets.reset(key)

    # -- run-time budget specs ---------------------------------------------------------

    async def put_budget_spec(self, name: str, doc: Mapping[str, Any]) -> None:
        """See :meth:`Store.put_budget_spec`."""
        self._check_open()
        self._specs[name] = encode_spec_doc(name, doc)
        self._specs_version += 1

    async def delete_budget_spec(self, name: str) -> bool:
        """See :meth:`Store.delete_budget_spec`."""
        self._check_open()
        if self._specs.pop(name, None) is None:
            return False
        self._specs_version += 1
        return True

    async def budget_specs(self) -> dict[str, dict[str, Any]]:
        """See :meth:`Store.budget_specs`."""
        self._check_open()
        return decode_spec_docs(self._specs.items())

    async def budget_specs_version(self) -> int:
        """See :meth:`Store.budget_specs_version`."""
        self._check_open()
        return self._specs_version
