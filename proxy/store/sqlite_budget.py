"""Budget tables of the embedded SQLite store, and their :class:`BudgetTx` accessor.

:class:`~proxy.store.sqlite.SqliteStore` runs each budget call as one ``BEGIN
IMMEDIATE`` transaction: IMMEDIATE takes the database's write lock before the first
read, so two processes (two replicas on one host sharing the file) serialise their
read-check-write steps exactly like Redis serialises scripts. The algorithm itself is
:mod:`proxy.store.budget_engine`, shared with the memory store.
"""

from __future__ import annotations

import sqlite3
import time
from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, TypeVar

import orjson

from proxy.errors import StoreUnavailable
from proxy.store import budget_engine as engine
from proxy.store.base import (
    BudgetState,
    RateItem,
    ReserveCall,
    ReserveItem,
    ReserveResult,
    SettleCall,
    Store,
    decode_spec_docs,
    encode_spec_doc,
    validate_reserve,
    validate_settle,
)
from proxy.store.budget_engine import Held

__all__ = ["BUDGET_DDL", "SPECS_DDL", "SqliteBudgetMethods", "SqliteBudgets"]

_T = TypeVar("_T")
_NOT_RUN: Final = ReserveResult(ok=False)  # a batch slot until its transaction ran

# Appended to the store's migrations as one step. Amounts are INTEGER (64-bit, exact).
BUDGET_DDL: Final = (
    """CREATE TABLE budget (
        key      TEXT    PRIMARY KEY,
        spent    INTEGER NOT NULL DEFAULT 0,
        reserved INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID""",
    # held: JSON {"b": {budget key: nanos}, "r": {rate key: [units, per_minute, adj]}}
    """CREATE TABLE reservation (
        id         TEXT    PRIMARY KEY,
        expires_us INTEGER NOT NULL,
        held       TEXT    NOT NULL
    )""",
    "CREATE INDEX reservation_expires ON reservation (expires_us)",
    "CREATE TABLE settled (id TEXT PRIMARY KEY, until_us INTEGER NOT NULL)",
    "CREATE INDEX settled_until ON settled (until_us)",
    "CREATE TABLE rate (key TEXT PRIMARY KEY, tat_us INTEGER NOT NULL) WITHOUT ROWID",
)


# Migration 3: run-time budget specs. One row per budget name (the JSON document), and a
# single-row version counter that every write bumps in the same transaction.
SPECS_DDL: Final = (
    "CREATE TABLE budget_spec (name TEXT PRIMARY KEY, doc TEXT NOT NULL) WITHOUT ROWID",
    """CREATE TABLE budget_spec_version (
        id      INTEGER PRIMARY KEY CHECK (id = 1),
        version INTEGER NOT NULL
    )""",
    "INSERT INTO budget_spec_version (id, version) VALUES (1, 0)",
)
_BUMP: Final = "UPDATE budget_spec_version SET version = version + 1 WHERE id = 1"


def _encode(held: Held) -> str:
    rates = {k: [u, pm, int(adj)] for k, (u, pm, adj) in held.rates.items()}
    return orjson.dumps({"b": held.budgets, "r": rates}).decode()


def _decode(text: str, expires_us: int) -> Held:
    data = orjson.loads(text)
    rates = {k: (int(u), int(pm), bool(adj)) for k, (u, pm, adj) in data["r"].items()}
    return Held(budgets=dict(data["b"]), rates=rates, expires_us=expires_us)


class SqliteBudgets:
    """Budget state access on one connection, inside a transaction the caller opened."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def budget(self, key: str) -> BudgetState:
        row = self._conn.execute(
            "SELECT spent, reserved FROM budget WHERE key = ?", (key,)
        ).fetchone()
        return BudgetState(0, 0) if row is None else BudgetState(int(row[0]), int(row[1]))

    def add(self, key: str, spent: int, reserved: int) -> None:
        self._conn.execute(
            "INSERT INTO budget (key, spent, reserved) VALUES (?, ?, ?) "
            "ON CONFLICT (key) DO UPDATE SET spent = spent + excluded.spent, "
            "reserved = reserved + excluded.reserved",
            (key, spent, reserved),
        )

    def reset(self, key: str) -> None:
        self._conn.execute("UPDATE budget SET spent = 0 WHERE key = ?", (key,))

    def held(self, rid: str) -> Held | None:
        row = self._conn.execute(
            "SELECT held, expires_us FROM reservation WHERE id = ?", (rid,)
        ).fetchone()
        return None if row is None else _decode(row[0], int(row[1]))

    def hold(self, rid: str, held: Held) -> None:
        self._conn.execute(
            "INSERT INTO reservation (id, expires_us, held) VALUES (?, ?, ?)",
            (rid, held.expires_us, _encode(held)),
        )

    def drop(self, rid: str) -> None:
        self._conn.execute("DELETE FROM reservation WHERE id = ?", (rid,))

    def expired(self, now_us: int, limit: int) -> list[tuple[str, Held]]:
        rows = self._conn.execute(
            "SELECT id, held, expires_us FROM reservation WHERE expires_us <= ? "
            "ORDER BY expires_us LIMIT ?",
            (now_us, limit),
        ).fetchall()
        return [(str(rid), _decode(text, int(exp))) for rid, text, exp in rows]

    def is_done(self, rid: str, now_us: int) -> bool:
        row = self._conn.execute(
            "SELECT 1 FROM settled WHERE id = ? AND until_us > ?", (rid, now_us)
        ).fetchone()
        return row is not None

    def mark_done(self, rid: str, until_us: int) -> None:
        self._conn.execute(
            "INSERT OR REPLACE INTO settled (id, until_us) VALUES (?, ?)", (rid, until_us)
        )

    def prune_done(self, now_us: int, limit: int) -> None:
        self._conn.execute(
            "DELETE FROM settled WHERE id IN "
            "(SELECT id FROM settled WHERE until_us <= ? ORDER BY until_us LIMIT ?)",
            (now_us, limit),
        )

    def tat(self, key: str) -> int | None:
        row = self._conn.execute("SELECT tat_us FROM rate WHERE key = ?", (key,)).fetchone()
        return None if row is None else int(row[0])

    def set_tat(self, key: str, tat_us: int) -> None:
        self._conn.execute("INSERT OR REPLACE INTO rate (key, tat_us) VALUES (?, ?)", (key, tat_us))


class SqliteBudgetMethods(Store):
    """The budget half of :class:`~proxy.store.sqlite.SqliteStore`: one ``BEGIN
    IMMEDIATE`` transaction per call, on the store's connection thread."""

    @abstractmethod
    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn`` on the connection's thread (provided by the store)."""

    @abstractmethod
    def _connection(self) -> sqlite3.Connection:
        """The open connection (provided by the store)."""

    async def reserve(
        self,
        reservation_id: str,
        items: Sequence[ReserveItem],
        ttl_s: float,
        *,
        rates: Sequence[RateItem] = (),
    ) -> ReserveResult:
        """See :meth:`Store.reserve`."""
        validate_reserve(reservation_id, items, rates, ttl_s)
        ttl_us = max(1, round(ttl_s * 1e6))
        return await self._run(
            self._budget_sync,
            lambda tx, now: engine.reserve(tx, reservation_id, items, rates, ttl_us, now),
        )

    async def settle(
        self,
        reservation_id: str,
        actual: int | Mapping[str, int],
        *,
        keys: Sequence[str] = (),
        tokens: int | None = None,
    ) -> bool:
        """See :meth:`Store.settle`."""
        validate_settle(reservation_id, actual, keys)
        retention_us = round(self.settled_retention_s * 1e6)
        return await self._run(
            self._budget_sync,
            lambda tx, now: engine.settle(
                tx, reservation_id, actual, keys, tokens, now, retention_us
            ),
        )

    async def release(self, reservation_id: str) -> bool:
        """See :meth:`Store.release`."""
        retention_us = round(self.settled_retention_s * 1e6)
        return await self._run(
            self._budget_sync,
            lambda tx, now: engine.release(tx, reservation_id, now, retention_us),
        )

    async def budget_batch(
        self, reserves: Sequence[ReserveCall], settles: Sequence[SettleCall]
    ) -> tuple[list[ReserveResult | Exception], list[bool | Exception]]:
        """See :meth:`Store.budget_batch`: one ``BEGIN IMMEDIATE`` transaction for the
        whole batch (settles first), instead of one per call."""
        reserved: list[ReserveResult | Exception] = []
        settled: list[bool | Exception] = []
        ready_reserves: list[tuple[int, ReserveCall, int]] = []  # (slot, call, ttl_us)
        for call in reserves:
            try:
                validate_reserve(call.reservation_id, call.items, call.rates, call.ttl_s)
            except (ValueError, TypeError) as exc:
                reserved.append(exc)
                continue
            ready_reserves.append((len(reserved), call, max(1, round(call.ttl_s * 1e6))))
            reserved.append(_NOT_RUN)
        ready_settles: list[tuple[int, SettleCall]] = []
        for settle in settles:
            try:
                if not settle.release:
                    validate_settle(settle.reservation_id, settle.actual, settle.keys)
                elif not settle.reservation_id:
                    raise ValueError("A release needs the reservation's id.")
            except (ValueError, TypeError) as exc:
                settled.append(exc)
                continue
            ready_settles.append((len(settled), settle))
            settled.append(False)
        if not ready_reserves and not ready_settles:
            return reserved, settled
        retention_us = round(self.settled_retention_s * 1e6)

        def step(tx: SqliteBudgets, now: int) -> None:
            for slot, s in ready_settles:
                if s.release:
                    settled[slot] = engine.release(tx, s.reservation_id, now, retention_us)
                else:
                    settled[slot] = engine.settle(
                        tx, s.reservation_id, s.actual, s.keys, s.tokens, now, retention_us
                    )
            for slot, r, ttl_us in ready_reserves:
                reserved[slot] = engine.reserve(tx, r.reservation_id, r.items, r.rates, ttl_us, now)

        try:
            await self._run(self._budget_sync, step)
        except StoreUnavailable as exc:  # the transaction was rolled back: nothing applied
            for slot, _, _ in ready_reserves:
                reserved[slot] = exc
            for slot, _ in ready_settles:
                settled[slot] = exc
        return reserved, settled

    async def budget_states(self, keys: Sequence[str]) -> dict[str, BudgetState]:
        """See :meth:`Store.budget_states`."""
        return await self._run(
            self._budget_sync, lambda tx, now: engine.states(tx, list(keys), now)
        )

    async def reset_budget(self, key: str) -> None:
        """See :meth:`Store.reset_budget`."""
        await self._run(self._budget_sync, lambda tx, now: tx.reset(key))

    # -- run-time budget specs ---------------------------------------------------------

    async def put_budget_spec(self, name: str, doc: Mapping[str, Any]) -> None:
        """See :meth:`Store.put_budget_spec`; one transaction."""
        text = encode_spec_doc(name, doc)

        def put(tx: SqliteBudgets, now: int) -> None:
            conn = self._connection()
            conn.execute(
                "INSERT OR REPLACE INTO budget_spec (name, doc) VALUES (?, ?)", (name, text)
            )
            conn.execute(_BUMP)

        await self._run(self._budget_sync, put)

    async def delete_budget_spec(self, name: str) -> bool:
        """See :meth:`Store.delete_budget_spec`; one transaction."""

        def delete(tx: SqliteBudgets, now: int) -> bool:
            conn = self._connection()
            removed = conn.execute("DELETE FROM budget_spec WHERE name = ?", (name,)).rowcount
            if removed:
                conn.execute(_BUMP)
            return bool(removed)

        return await self._run(self._budget_sync, delete)

    async def budget_specs(self) -> dict[str, dict[str, Any]]:
        """See :meth:`Store.budget_specs`."""
        rows = await self._run(self._read_sync, "SELECT name, doc FROM budget_spec ORDER BY name")
        return decode_spec_docs((str(name), str(doc)) for name, doc in rows)

    async def budget_specs_version(self) -> int:
        """See :meth:`Store.budget_specs_version`: one indexed read, no write lock."""
        rows = await self._run(self._read_sync, "SELECT version FROM budget_spec_version")
        return int(rows[0][0]) if rows else 0

    def _read_sync(self, sql: str) -> list[Any]:
        return self._connection().execute(sql).fetchall()

    def _budget_sync(self, step: Callable[[SqliteBudgets, int], _T]) -> _T:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            # The clock is read under the write lock, so the transactions of every
            # process on this file see time move forward in commit order.
            result = step(SqliteBudgets(conn), time.time_ns() // 1_000)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result
