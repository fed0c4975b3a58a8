"""Budget alert outbox of the embedded SQLite store: two tables, one transaction per call.

Each call is one ``BEGIN IMMEDIATE`` transaction on the store's connection thread, so
two processes sharing the file (replicas on one host) serialise their check-and-write
steps like Redis serialises scripts: an alert is enqueued once, and a lease hands an
entry to one caller. Time is this host's wall clock, in milliseconds.
"""

from __future__ import annotations

import sqlite3
import time
from abc import abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeVar

from proxy.store.base import AlertEntry, Store, alert_entry_id, validate_enqueue_alert

__all__ = ["ALERTS_DDL", "SqliteAlertMethods"]

_T = TypeVar("_T")

# One migration step. until_ms NULL: the marker never expires ("total" budgets).
ALERTS_DDL: Final = (
    "CREATE TABLE alert_mark (key TEXT PRIMARY KEY, until_ms INTEGER) WITHOUT ROWID",
    """CREATE TABLE alert_outbox (
        id         TEXT    PRIMARY KEY,
        payload    TEXT    NOT NULL,
        due_ms     INTEGER NOT NULL,
        attempts   INTEGER NOT NULL DEFAULT 0,
        created_ms INTEGER NOT NULL
    )""",
    "CREATE INDEX alert_outbox_due ON alert_outbox (due_ms)",
)
_PRUNE_LIMIT: Final = 100  # expired markers removed per enqueue


class SqliteAlertMethods(Store):
    """The alert half of :class:`~proxy.store.sqlite.SqliteStore`."""

    @abstractmethod
    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn`` on the connection's thread (provided by the store)."""

    @abstractmethod
    def _connection(self) -> sqlite3.Connection:
        """The open connection (provided by the store)."""

    async def enqueue_alert(
        self, dedup_key: str, payloads: Mapping[str, str], dedup_ttl_s: float | None
    ) -> bool:
        """See :meth:`Store.enqueue_alert`; one transaction."""
        validate_enqueue_alert(dedup_key, payloads, dedup_ttl_s)
        rows = [(alert_entry_id(dedup_key, ch), payload) for ch, payload in payloads.items()]

        def step(conn: sqlite3.Connection, now: int) -> bool:
            conn.execute(
                "DELETE FROM alert_mark WHERE key IN (SELECT key FROM alert_mark "
                "WHERE until_ms IS NOT NULL AND until_ms <= ? LIMIT ?)",
                (now, _PRUNE_LIMIT),
            )
            if conn.execute("SELECT 1 FROM alert_mark WHERE key = ?", (dedup_key,)).fetchone():
                return False
            until = None if dedup_ttl_s is None else now + round(dedup_ttl_s * 1000)
            conn.execute("INSERT INTO alert_mark (key, until_ms) VALUES (?, ?)", (dedup_key, until))
            conn.executemany(
                "INSERT OR REPLACE INTO alert_outbox (id, payload, due_ms, attempts, created_ms) "
                "VALUES (?, ?, ?, 0, ?)",
                [(entry_id, payload, now, now) for entry_id, payload in rows],
            )
            return True

        return await self._run(self._alert_tx, step)

    async def alert_marked(self, dedup_key: str) -> bool:
        """See :meth:`Store.alert_marked`: one read, no write lock."""

        def read() -> bool:
            row = (
                self._connection()
                .execute(
                    "SELECT 1 FROM alert_mark WHERE key = ? AND (until_ms IS NULL OR until_ms > ?)",
                    (dedup_key, _now_ms()),
                )
                .fetchone()
            )
            return row is not None

        return await self._run(read)

    async def lease_alerts(self, limit: int, lease_s: float) -> list[AlertEntry]:
        """See :meth:`Store.lease_alerts`; one transaction."""
        lease_ms = round(lease_s * 1000)

        def step(conn: sqlite3.Connection, now: int) -> list[AlertEntry]:
            rows = conn.execute(
                "SELECT id, payload, attempts, created_ms FROM alert_outbox WHERE due_ms <= ? "
                "ORDER BY due_ms, id LIMIT ?",
                (now, max(0, limit)),
            ).fetchall()
            conn.executemany(
                "UPDATE alert_outbox SET due_ms = ?, attempts = attempts + 1 WHERE id = ?",
                [(now + lease_ms, row[0]) for row in rows],
            )
            return [AlertEntry(str(i), str(p), int(n) + 1, int(c)) for i, p, n, c in rows]

        return await self._run(self._alert_tx, step)

    async def ack_alert(self, entry_id: str) -> bool:
        """See :meth:`Store.ack_alert`; one transaction."""

        def step(conn: sqlite3.Connection, now: int) -> bool:
            return conn.execute("DELETE FROM alert_outbox WHERE id = ?", (entry_id,)).rowcount > 0

        return await self._run(self._alert_tx, step)

    async def retry_alert(self, entry_id: str, delay_s: float) -> bool:
        """See :meth:`Store.retry_alert`; one transaction."""
        delay_ms = round(max(0.0, delay_s) * 1000)

        def step(conn: sqlite3.Connection, now: int) -> bool:
            cursor = conn.execute(
                "UPDATE alert_outbox SET due_ms = ? WHERE id = ?", (now + delay_ms, entry_id)
            )
            return cursor.rowcount > 0

        return await self._run(self._alert_tx, step)

    def _alert_tx(self, step: Callable[[sqlite3.Connection, int], _T]) -> _T:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Read the clock under the write lock, as the budget transactions do.
            result = step(conn, _now_ms())
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
