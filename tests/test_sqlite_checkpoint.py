"""The embedded store's WAL checkpointer (proxy/store/sqlite_checkpoint.py).

It must copy committed WAL frames into the database file from its own thread and
connection, without blocking the writer, keep going through failures, and stop
promptly; the store starts it with the database and stops it on close.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.store.sqlite import SqliteStore
from proxy.store.sqlite_checkpoint import Checkpointer


def _wal_database(path: Path) -> sqlite3.Connection:
    """A writer connection in WAL mode that never checkpoints by itself."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
    return conn


def _wait(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_committed_frames_reach_the_database_file(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    writer = _wal_database(db)
    size_before = db.stat().st_size
    with writer:
        writer.executemany("INSERT INTO t (v) VALUES (?)", [(b"x" * 1000,) for _ in range(500)])
    assert db.stat().st_size == size_before  # still only in the WAL
    cp = Checkpointer(str(db), "normal", busy_timeout_ms=1000, interval_s=0.02)
    cp.start()
    try:
        assert _wait(lambda: db.stat().st_size > 400_000), "the pages never left the WAL"
        # The writer keeps writing meanwhile: PASSIVE never blocks it.
        t0 = time.monotonic()
        for _ in range(50):
            writer.execute("INSERT INTO t (v) VALUES (?)", (b"y" * 1000,))
        assert time.monotonic() - t0 < 2.0
        assert _wait(lambda: cp.checkpoints >= 3)
    finally:
        t0 = time.monotonic()
        cp.stop()
        assert time.monotonic() - t0 < 1.0  # at most one checkpoint to finish
    check = sqlite3.connect(db)
    assert check.execute("SELECT count(*) FROM t").fetchone()[0] == 550
    check.close()
    writer.close()


def test_a_failing_checkpoint_is_logged_once_and_the_thread_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "store.db"
    writer = _wal_database(db)
    # An exclusive lock makes every checkpoint attempt fail with "database is locked".
    writer.execute("PRAGMA locking_mode = EXCLUSIVE")
    writer.execute("INSERT INTO t (v) VALUES (x'00')")
    cp = Checkpointer(str(db), "normal", busy_timeout_ms=1, interval_s=0.02)
    with caplog.at_level(logging.WARNING, logger="metergate.store"):
        cp.start()
        time.sleep(0.3)
        warnings = [r for r in caplog.records if "checkpoint" in r.getMessage()]
        assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
        writer.execute("PRAGMA locking_mode = NORMAL")
        writer.execute("INSERT INTO t (v) VALUES (x'01')")  # releases the exclusive lock
        assert _wait(lambda: cp.checkpoints >= 1), "it never recovered"
        cp.stop()
    writer.close()


def test_an_unopenable_database_is_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cp = Checkpointer(str(tmp_path / "missing" / "store.db"), "normal", 100, interval_s=0.01)
    with caplog.at_level(logging.WARNING, logger="metergate.store"):
        cp.start()
        assert _wait(lambda: any("could not start" in r.getMessage() for r in caplog.records))
    cp.stop()


async def test_the_store_runs_it_while_open(tmp_path: Path) -> None:
    def running() -> bool:
        return any(t.name == "metergate-sqlite-checkpoint" for t in threading.enumerate())

    assert not running()
    store = SqliteStore(str(tmp_path / "ledger.db"))
    await store.open()
    try:
        assert running()
    finally:
        await store.close()
    assert not running()
