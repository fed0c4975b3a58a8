"""The ledger spool in front of a real SQLite store: durable before the commit,
stored in the end, read-your-writes, failures retried, crashes replayed.

The only double is at the store's edge (``FlakyStore`` makes SQLite's insert fail on
demand, as a full disk would); everything else is the real writer, spool and store.
"""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from proxy.ledger import LedgerRecord, LedgerWriter
from proxy.ledger_spool import LedgerSpool, spool_for
from proxy.store import open_store
from proxy.store.sqlite import SqliteStore
from tests.test_ledger_writer import TEMPLATE


def rec(i: int) -> LedgerRecord:
    return replace(TEMPLATE, id=f"s-{i:05d}", cost_nanos=i)


class FlakyStore(SqliteStore):
    """SQLite whose ledger inserts fail while ``failures`` is above zero."""

    failures = 0

    def _append_sync(self, records: list[LedgerRecord]) -> None:
        if self.failures:
            self.failures -= 1
            raise sqlite3.OperationalError("database or disk is full")
        super()._append_sync(records)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[FlakyStore]:
    s = FlakyStore(tmp_path / "ledger.db")
    await s.open()
    yield s
    await s.close()


async def started(store: SqliteStore, **spool_args: int) -> tuple[LedgerWriter, LedgerSpool]:
    spool = spool_for(store)
    assert spool is not None
    if spool_args:
        spool = LedgerSpool(spool.directory, store, **spool_args)
    spool.open()
    writer = LedgerWriter(store, spool=spool)
    await writer.start()
    return writer, spool


async def stored_ids(store: SqliteStore) -> set[str]:
    return {r.id for r in await store.ledger_records()}


def spool_files(store: SqliteStore) -> list[Path]:
    assert store.ledger_spool_dir is not None
    return sorted(Path(store.ledger_spool_dir).glob("spool-*.jsonl"))


def test_only_a_file_at_synchronous_normal_spools(tmp_path: Path) -> None:
    assert spool_for(open_store(f"sqlite:///{tmp_path}/a.db")) is not None
    assert spool_for(open_store(f"sqlite:///{tmp_path}/a.db?synchronous=full")) is None
    assert spool_for(open_store("sqlite:///:memory:")) is None
    assert spool_for(open_store("memory://")) is None


async def test_a_read_after_the_write_returns_sees_the_record(store: FlakyStore) -> None:
    writer, spool = await started(store)
    for i in range(50):
        await writer.write(rec(i))
        # Queued on the store's one thread before this read: no window where the
        # client has its answer and a report does not show the request.
        assert rec(i).id in await stored_ids(store)
    await writer.close()
    spool.close()
    assert spool.spooled == 50
    assert spool_files(store) == []  # everything stored: the spool is gone


async def test_rotated_files_are_deleted_once_stored(store: FlakyStore) -> None:
    writer, spool = await started(store, rotate_bytes=2_000)
    for i in range(40):
        await writer.write(rec(i))
    await writer.close()
    assert spool.pending == 0
    spool.close()
    assert spool_files(store) == []
    assert await stored_ids(store) == {rec(i).id for i in range(40)}


async def test_a_failing_store_loses_nothing_and_delays_no_writer(store: FlakyStore) -> None:
    writer, spool = await started(store)
    store.failures = 3
    for i in range(20):
        await writer.write(rec(i))  # answered by the spool while the store fails
    files = spool_files(store)
    assert len(files) == 1
    spooled = files[0].read_text()
    assert all(rec(i).id in spooled for i in range(20))
    await writer.close()  # retries until the store takes them
    assert writer.failed_batches >= 1
    assert await stored_ids(store) == {rec(i).id for i in range(20)}
    spool.close()
    assert spool_files(store) == []


async def test_a_shutdown_while_the_store_fails_leaves_the_spool_for_the_next_start(
    tmp_path: Path,
) -> None:
    store = FlakyStore(tmp_path / "ledger.db")
    await store.open()
    writer, spool = await started(store)
    store.failures = 10**6
    for i in range(5):
        await writer.write(rec(i))
    await writer.close()  # gives up after a few attempts instead of hanging
    spool.close()
    await store.close()
    assert len(spool_files(store)) == 1  # (a kill -9: tests/test_cli.py)
    reopened = open_store(f"sqlite:///{tmp_path}/ledger.db")
    await reopened.open()  # as the CLI or a restarted proxy does
    try:
        assert await stored_ids(reopened) == {rec(i).id for i in range(5)}
    finally:
        await reopened.close()
    assert spool_files(store) == []


async def test_without_a_spool_file_writers_wait_for_the_store(store: FlakyStore) -> None:
    writer, spool = await started(store)
    shutil.rmtree(spool.directory)  # the spool cannot be written any more
    for i in range(5):
        await writer.write(rec(i))
        assert rec(i).id in await stored_ids(store)
    assert spool.spooled == 0
    await writer.close()
    spool.close()
