"""The embedded store: one SQLite file, the default when no Redis is configured.

Durability. The database runs in WAL mode with ``synchronous=NORMAL``: a transaction
is in the write-ahead log, in the operating system's page cache, when COMMIT returns.
A crash of *this process* (``kill -9``, OOM kill, segfault) therefore loses nothing
that was committed. Only an operating-system crash or a power loss can lose the last
transactions, the ones not yet checkpointed or synced to disk; the database itself
stays consistent either way. Add ``?synchronous=full`` to the URL to fsync the log on
every commit and survive those too, at the price of one fsync per transaction (the
ledger writer's group commit keeps that to one per batch, not one per request).

Threads. The sqlite3 module blocks, so one connection is owned by one dedicated
thread (a single-worker ThreadPoolExecutor) and every method hops there. A single
owner means no locking inside the process, no "database is locked" between our own
calls, and an event loop that never waits on the disk. Other processes (``metergate
report``, another replica on the same host) may open the same file; WAL lets them
read while we write, and ``busy_timeout`` makes writers queue instead of failing.

Budgets. Each budget call (reserve, settle, release, state) is one ``BEGIN IMMEDIATE``
transaction running :mod:`proxy.store.budget_engine` over the tables of
:mod:`proxy.store.sqlite_budget`, expired reservations swept inside it; IMMEDIATE makes
that safe across processes sharing the file. Time is this host's wall clock.

Schema versions live in ``PRAGMA user_version``; :data:`_MIGRATIONS` lists the steps,
each applied once, in order, inside one transaction.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from os import PathLike
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import orjson

from proxy.errors import StoreUnavailable
from proxy.ledger import LedgerRecord
from proxy.store.aggregate import NONE_LABEL, ReportRow, report_sort_key, validate_group_by
from proxy.store.sqlite_alerts import ALERTS_DDL, SqliteAlertMethods
from proxy.store.sqlite_budget import BUDGET_DDL, SPECS_DDL, SqliteBudgetMethods
from proxy.store.sqlite_checkpoint import (
    WAL_AUTOCHECKPOINT_PAGES,
    WAL_SIZE_LIMIT_BYTES,
    Checkpointer,
)
from proxy.store.sqlite_keys import KEYS_DDL, SqliteKeyMethods

__all__ = ["SCHEMA_VERSION", "SqliteStore"]

_T = TypeVar("_T")

# How long a write waits for another process holding the write lock before failing.
_BUSY_TIMEOUT_MS = 5_000

_SYNCHRONOUS_MODES = ("normal", "full", "extra")

# One column per LedgerRecord field, same names and order. ``tags`` and ``extra`` are
# JSON text (TEXT, not BLOB, so that json_each() can read tags); booleans are 0/1.
_LEDGER_DDL = """
CREATE TABLE ledger (
    id                  TEXT    PRIMARY KEY,
    ts_ms               INTEGER NOT NULL,
    key_name            TEXT    NOT NULL,
    team                TEXT,
    "user"              TEXT,
    end_user            TEXT,
    tags                TEXT    NOT NULL,
    upstream            TEXT    NOT NULL,
    endpoint            TEXT    NOT NULL,
    model               TEXT    NOT NULL,
    stream              INTEGER NOT NULL,
    status              INTEGER NOT NULL,
    input_tokens        INTEGER NOT NULL,
    cached_input_tokens INTEGER NOT NULL,
    cache_write_tokens  INTEGER NOT NULL,
    output_tokens       INTEGER NOT NULL,
    reasoning_tokens    INTEGER NOT NULL,
    cost_nanos          INTEGER NOT NULL,
    exact               INTEGER NOT NULL,
    latency_ms          REAL    NOT NULL,
    error               TEXT,
    extra               TEXT    NOT NULL
)
"""

# Migration N (1-based) takes the schema from version N-1 to N. Append, never edit.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (_LEDGER_DDL, "CREATE INDEX ledger_ts_ms ON ledger (ts_ms)"),
    BUDGET_DDL,
    SPECS_DDL,
    ALERTS_DDL,
    KEYS_DDL,
)
SCHEMA_VERSION = len(_MIGRATIONS)
"""The schema version this code writes; a database with a higher one is refused."""

_COLUMNS = tuple(f.name for f in dataclasses.fields(LedgerRecord))
_COLUMN_LIST = ", ".join(f'"{c}"' for c in _COLUMNS)
_INSERT = f"INSERT OR IGNORE INTO ledger ({_COLUMN_LIST}) VALUES ({', '.join('?' * len(_COLUMNS))})"
_SELECT = f"SELECT {_COLUMN_LIST} FROM ledger"


def _sql_text(value: str) -> str:
    """A SQL string literal (for constants only; user values are always bound)."""
    return "'" + value.replace("'", "''") + "'"


_NONE = _sql_text(NONE_LABEL)

# The SQL twin of aggregate._EXTRACTORS; ``l`` is the ledger, ``t`` the tag expansion.
# date() of fractional seconds floors to the day exactly like aggregate.day_of (SQLite
# rounds the epoch value to the millisecond first), also before 1970.
_GROUP_SQL: dict[str, str] = {
    "team": f"COALESCE(l.team, {_NONE})",
    "key": "l.key_name",
    "user": f'COALESCE(l."user", {_NONE})',
    "end_user": f"COALESCE(l.end_user, {_NONE})",
    "model": "l.model",
    "upstream": "l.upstream",
    "endpoint": "l.endpoint",
    "tag": "t.tag",
    "day": "date(l.ts_ms / 1000.0, 'unixepoch')",
    "status": "CAST(l.status AS TEXT)",
}

_SUMS_SQL = (
    "COUNT(*), SUM(1 - l.exact), SUM(l.input_tokens), SUM(l.cached_input_tokens), "
    "SUM(l.cache_write_tokens), SUM(l.output_tokens), SUM(l.reasoning_tokens), "
    "SUM(l.cost_nanos)"
)


def _encode(r: LedgerRecord) -> tuple[Any, ...]:
    # Order must match _COLUMNS (the LedgerRecord field order).
    return (
        r.id,
        r.ts_ms,
        r.key_name,
        r.team,
        r.user,
        r.end_user,
        orjson.dumps(list(r.tags)).decode(),
        r.upstream,
        r.endpoint,
        r.model,
        int(r.stream),
        r.status,
        r.input_tokens,
        r.cached_input_tokens,
        r.cache_write_tokens,
        r.output_tokens,
        r.reasoning_tokens,
        r.cost_nanos,
        int(r.exact),
        r.latency_ms,
        r.error,
        orjson.dumps(r.extra).decode(),
    )


def _decode(row: Sequence[Any]) -> LedgerRecord:
    values = dict(zip(_COLUMNS, row, strict=True))
    values["tags"] = tuple(orjson.loads(values["tags"]))
    values["extra"] = orjson.loads(values["extra"])
    values["stream"] = bool(values["stream"])
    values["exact"] = bool(values["exact"])
    return LedgerRecord(**values)


def _range_clause(since_ms: int | None, until_ms: int | None) -> tuple[str, list[int]]:
    """A WHERE clause on ``l.ts_ms``; built per call so that the ts_ms index is used."""
    conditions: list[str] = []
    params: list[int] = []
    if since_ms is not None:
        conditions.append("l.ts_ms >= ?")
        params.append(since_ms)
    if until_ms is not None:
        conditions.append("l.ts_ms < ?")
        params.append(until_ms)
    return (" WHERE " + " AND ".join(conditions) if conditions else ""), params


class SqliteStore(SqliteKeyMethods, SqliteAlertMethods, SqliteBudgetMethods):
    """The ledger and the budgets in one SQLite file (see the module docstring)."""

    def __init__(self, path: str | PathLike[str], *, synchronous: str = "normal") -> None:
        mode = synchronous.lower()
        if mode not in _SYNCHRONOUS_MODES:
            raise ValueError(
                f"SQLite synchronous={synchronous!r} is not allowed; use one of "
                f"{', '.join(_SYNCHRONOUS_MODES)} (lower modes could lose committed "
                "ledger records)."
            )
        self.path = str(path)
        self.synchronous = mode
        #: Run (on the loop) before each call: the ledger spool's writer hands over the
        #: records it is gathering, so every call sees them (proxy.ledger_spool).
        self.before_call: Callable[[], None] | None = None
        self._checkpointer: Checkpointer | None = None
        self._executor: ThreadPoolExecutor | None = None
        # Touched only on the executor's thread.
        self._conn: sqlite3.Connection | None = None

    @classmethod
    def from_url(cls, url: str) -> SqliteStore:
        """Build from ``sqlite:///relative/path`` or ``sqlite:////absolute/path``.

        The only option is ``?synchronous=normal|full|extra`` (default ``normal``).
        ``sqlite:///:memory:`` gives a private in-memory database, for tests.
        """
        parts = urlsplit(url)
        usage = "write sqlite:///relative/path.db or sqlite:////absolute/path.db"
        if parts.scheme.lower() != "sqlite":
            raise ValueError(f"{url!r} is not a sqlite:// URL; {usage}.")
        if parts.netloc:
            raise ValueError(
                f"The SQLite URL {url!r} names a host ({parts.netloc!r}); SQLite files are "
                f"local: {usage} (three slashes before the path)."
            )
        path = unquote(parts.path)[1:]  # drop the slash that ends "sqlite://"
        if not path:
            raise ValueError(f"The SQLite URL {url!r} has no file path; {usage}.")
        options: dict[str, str] = {}
        if parts.query:
            try:
                options = dict(parse_qsl(parts.query, strict_parsing=True))
            except ValueError as exc:
                raise ValueError(f"Cannot parse the options of the SQLite URL {url!r}.") from exc
        unknown = sorted(set(options) - {"synchronous"})
        if unknown:
            raise ValueError(
                f"Unknown SQLite URL option(s) {', '.join(unknown)} in {url!r}; "
                "the only option is synchronous=normal|full|extra."
            )
        return cls(path, synchronous=options.get("synchronous", "normal"))

    # -- thread plumbing ---------------------------------------------------------------

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn`` on the connection's thread; translate SQLite failures once, here."""
        if self._executor is None:
            raise RuntimeError("The SQLite store is not open; call `await store.open()` first.")
        if self.before_call is not None:
            self.before_call()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except sqlite3.Error as exc:
            raise StoreUnavailable(
                f"The SQLite store at {self.path} failed: {exc}. Check that the disk has "
                "space and the file is writable by this process."
            ) from exc

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:  # only after a failed open()
            raise RuntimeError("The SQLite store is not open; call `await store.open()` first.")
        return self._conn

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def ledger_spool_dir(self) -> str | None:
        """Where a proxy spools this database's ledger records (see
        :mod:`proxy.ledger_spool`): ``<db>.ledger-spool``, at ``synchronous=normal`` on
        a file; None otherwise."""
        if self.synchronous != "normal" or self.path == ":memory:":
            return None
        return self.path + ".ledger-spool"

    async def open(self) -> None:
        """Create the file (and its directory) if missing, set WAL, migrate the schema,
        and store the records a crashed proxy left in its ledger spool."""
        if self._executor is not None:
            raise RuntimeError("The SQLite store is already open.")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metergate-sqlite")
        try:
            await self._run(self._open_sync)
            spool_dir = self.ledger_spool_dir
            if spool_dir is not None and await self._run(os.path.isdir, spool_dir):
                from proxy.ledger_spool import LedgerSpool  # (it imports this module)

                await LedgerSpool(spool_dir, self).replay(self)
        except BaseException:
            await self._shutdown()
            raise

    def _open_sync(self) -> None:
        in_memory = self.path == ":memory:"
        if not in_memory:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: no implicit transactions; we BEGIN/COMMIT ourselves.
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
        try:
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
            if not in_memory and str(mode).lower() != "wal":
                raise StoreUnavailable(
                    f"SQLite could not put {self.path} in WAL mode (it stays in {mode!r}); "
                    "put the database on a local file system."
                )
            conn.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
            if not in_memory:
                # WAL checkpoints (and their syncs) run on a thread of their own; this
                # connection's own checkpoint is the rarely reached last resort (see
                # proxy.store.sqlite_checkpoint).
                conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
                conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT_BYTES}")
            self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        if not in_memory:
            self._checkpointer = Checkpointer(self.path, self.synchronous, _BUSY_TIMEOUT_MS)
            self._checkpointer.start()

    def _migrate(self, conn: sqlite3.Connection) -> None:
        def version() -> int:
            return int(conn.execute("PRAGMA user_version").fetchone()[0])

        if version() == SCHEMA_VERSION:
            return  # the common case takes no write lock
        # IMMEDIATE takes the write lock now, so two processes starting together
        # cannot both apply the same migration; re-read the version under the lock.
        conn.execute("BEGIN IMMEDIATE")
        try:
            current = version()
            if current > SCHEMA_VERSION:
                raise StoreUnavailable(
                    f"The SQLite database {self.path} has schema version {current}, newer "
                    f"than this Metergate understands ({SCHEMA_VERSION}); upgrade Metergate."
                )
            for statements in _MIGRATIONS[current:]:
                for statement in statements:
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    async def close(self) -> None:
        """Wait for calls already started, close the connection and stop the thread."""
        if self._executor is None:
            return
        try:
            await self._run(self._close_sync)
        finally:
            await self._shutdown()

    def _close_sync(self) -> None:
        checkpointer, self._checkpointer = self._checkpointer, None
        if checkpointer is not None:
            checkpointer.stop()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _shutdown(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            # The worker is idle by now; wait=False just avoids blocking the loop on join.
            executor.shutdown(wait=False)

    # -- ledger ------------------------------------------------------------------------

    async def append_ledger(self, records: Sequence[LedgerRecord]) -> None:
        """Insert records in one transaction; ids already stored are skipped."""
        if not records:
            return
        await self._run(self._append_sync, list(records))

    def submit_ledger(self, records: Sequence[LedgerRecord]) -> Future[None]:
        """:meth:`append_ledger` queued on the store's thread now, not when a task
        first runs: a call made after this one sees the records. For the ledger
        spool (:mod:`proxy.ledger_spool`); errors are sqlite3's own."""
        if self._executor is None:
            raise RuntimeError("The SQLite store is not open; call `await store.open()` first.")
        return self._executor.submit(self._append_sync, list(records))

    def _append_sync(self, records: list[LedgerRecord]) -> None:
        conn = self._connection()
        rows = [_encode(r) for r in records]
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(_INSERT, rows)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    async def get_ledger_record(self, request_id: str) -> LedgerRecord | None:
        """The record with this request id, or None."""
        return await self._run(self._get_sync, request_id)

    def _get_sync(self, request_id: str) -> LedgerRecord | None:
        row = self._connection().execute(f"{_SELECT} WHERE id = ?", (request_id,)).fetchone()
        return None if row is None else _decode(row)

    async def ledger_records(
        self, since_ms: int | None = None, until_ms: int | None = None
    ) -> list[LedgerRecord]:
        """Records with ``since_ms <= ts_ms < until_ms``, ordered by (ts_ms, id)."""
        return await self._run(self._records_sync, since_ms, until_ms)

    def _records_sync(self, since_ms: int | None, until_ms: int | None) -> list[LedgerRecord]:
        where, params = _range_clause(since_ms, until_ms)
        sql = f"{_SELECT} AS l{where} ORDER BY l.ts_ms, l.id"
        return [_decode(row) for row in self._connection().execute(sql, params)]

    async def report(
        self,
        group_by: Sequence[str],
        since_ms: int | None = None,
        until_ms: int | None = None,
    ) -> list[ReportRow]:
        """The same rows as :func:`proxy.store.aggregate.aggregate`, summed by SQLite."""
        columns = validate_group_by(group_by)
        return await self._run(self._report_sync, columns, since_ms, until_ms)

    def _report_sync(
        self, columns: tuple[str, ...], since_ms: int | None, until_ms: int | None
    ) -> list[ReportRow]:
        where, params = _range_clause(since_ms, until_ms)
        source = "ledger AS l"
        all_params: list[int] = list(params)
        if "tag" in columns:
            # One row per distinct tag of each request (NONE_LABEL when untagged),
            # joined back to its request: a request tagged a,b counts under both.
            source = (
                "ledger AS l JOIN ("
                f"SELECT DISTINCT l.id AS id, COALESCE(j.value, {_NONE}) AS tag "
                f"FROM ledger AS l LEFT JOIN json_each(l.tags) AS j{where}"
                ") AS t ON t.id = l.id"
            )
            all_params = params + params
        select = ", ".join([*(_GROUP_SQL[c] for c in columns), _SUMS_SQL])
        sql = f"SELECT {select} FROM {source}{where}"
        if columns:
            sql += " GROUP BY " + ", ".join(str(i) for i in range(1, len(columns) + 1))
        n = len(columns)
        rows = [
            ReportRow(tuple(str(v) for v in row[:n]), *(int(v) for v in row[n:]))
            for row in self._connection().execute(sql, all_params)
            # Without GROUP BY, SQL returns one all-NULL row even for no records.
            if row[n] > 0
        ]
        # Sorting here rather than in SQL guarantees the same tie order as aggregate().
        rows.sort(key=report_sort_key)
        return rows
