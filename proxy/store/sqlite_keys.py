"""Issued keys in the embedded SQLite store: one table, one transaction per write.

A partial unique index keeps names unique among active keys, so the check and the
write of :meth:`create_api_key` are one statement; updates compare-and-set on the
revision column. Writes are ``BEGIN IMMEDIATE`` transactions on the store's
connection thread, so processes sharing the file (replicas on one host, the CLI)
serialise them like Redis serialises scripts.
"""

from __future__ import annotations

import sqlite3
from abc import abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeVar

from proxy.store.base import Store
from proxy.store.keys_common import decode_key_docs, encode_key_doc

__all__ = ["KEYS_DDL", "SqliteKeyMethods"]

_T = TypeVar("_T")

# One migration step: the key documents, and a single-row version counter that every
# write bumps in the same transaction.
KEYS_DDL: Final = (
    """CREATE TABLE api_key (
        id     TEXT    PRIMARY KEY,
        name   TEXT    NOT NULL,
        active INTEGER NOT NULL,
        rev    INTEGER NOT NULL,
        doc    TEXT    NOT NULL
    ) WITHOUT ROWID""",
    "CREATE UNIQUE INDEX api_key_active_name ON api_key (name) WHERE active = 1",
    """CREATE TABLE api_key_version (
        id      INTEGER PRIMARY KEY CHECK (id = 1),
        version INTEGER NOT NULL
    )""",
    "INSERT INTO api_key_version (id, version) VALUES (1, 0)",
)
_BUMP: Final = "UPDATE api_key_version SET version = version + 1 WHERE id = 1"


class SqliteKeyMethods(Store):
    """The issued-key half of :class:`~proxy.store.sqlite.SqliteStore`."""

    @abstractmethod
    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn`` on the connection's thread (provided by the store)."""

    @abstractmethod
    def _connection(self) -> sqlite3.Connection:
        """The open connection (provided by the store)."""

    def _keys_tx(self, step: Callable[[sqlite3.Connection], _T]) -> _T:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = step(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result

    async def create_api_key(self, key_id: str, doc: Mapping[str, Any]) -> bool:
        """See :meth:`Store.create_api_key`; one transaction."""
        name, text = encode_key_doc(key_id, doc)

        def create(conn: sqlite3.Connection) -> bool:
            if conn.execute("SELECT 1 FROM api_key WHERE id = ?", (key_id,)).fetchone():
                raise ValueError(f"The key id {key_id!r} is already stored.")
            taken = conn.execute(
                "SELECT 1 FROM api_key WHERE name = ? AND active = 1", (name,)
            ).fetchone()
            if taken:
                return False
            conn.execute(
                "INSERT INTO api_key (id, name, active, rev, doc) VALUES (?, ?, 1, 1, ?)",
                (key_id, name, text),
            )
            conn.execute(_BUMP)
            return True

        return await self._run(self._keys_tx, create)

    async def update_api_key(
        self, key_id: str, doc: Mapping[str, Any], *, rev: int, active: bool
    ) -> bool:
        """See :meth:`Store.update_api_key`; one transaction."""
        _, text = encode_key_doc(key_id, doc)

        def update(conn: sqlite3.Connection) -> bool:
            # active only ever goes from 1 to 0: a released name is not claimed back.
            changed = conn.execute(
                "UPDATE api_key SET doc = ?, rev = rev + 1, active = active AND ? "
                "WHERE id = ? AND rev = ?",
                (text, int(active), key_id, rev),
            ).rowcount
            if changed:
                conn.execute(_BUMP)
            return bool(changed)

        return await self._run(self._keys_tx, update)

    async def api_keys(self) -> dict[str, dict[str, Any]]:
        """See :meth:`Store.api_keys`."""
        rows = await self._run(self._keys_read, "SELECT id, doc, rev FROM api_key ORDER BY id")
        return decode_key_docs((str(i), str(doc), int(rev)) for i, doc, rev in rows)

    async def api_keys_version(self) -> int:
        """See :meth:`Store.api_keys_version`: one indexed read, no write lock."""
        rows = await self._run(self._keys_read, "SELECT version FROM api_key_version")
        return int(rows[0][0]) if rows else 0

    def _keys_read(self, sql: str) -> list[Any]:
        return self._connection().execute(sql).fetchall()
