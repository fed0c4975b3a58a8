"""LedgerWriter: group commit, durability before return, errors, shutdown.

The store edge is a MemoryStore subclass that records each call's batch size and can
hold a call open (``gate``) so batches form deterministically, without sleeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace

import pytest

from proxy.ledger import LedgerRecord, LedgerWriter
from proxy.store.memory import MemoryStore

TEMPLATE = LedgerRecord(
    id="r",
    ts_ms=1_790_000_000_000,
    key_name="app",
    team="t",
    user=None,
    end_user=None,
    tags=(),
    upstream="openai",
    endpoint="chat/completions",
    model="gpt-4o",
    stream=False,
    status=200,
    input_tokens=10,
    cached_input_tokens=0,
    cache_write_tokens=0,
    output_tokens=5,
    reasoning_tokens=0,
    cost_nanos=1234,
    exact=True,
    latency_ms=12.5,
)


def rec(i: int) -> LedgerRecord:
    return replace(TEMPLATE, id=f"r-{i}", cost_nanos=i)


class DiskFull(Exception):
    """What the failing store raises."""


class RecordingStore(MemoryStore):
    """Counts store calls; can hold them open and fail the next one."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[str]] = []
        self.entered = asyncio.Event()  # set when a call starts
        self.gate = asyncio.Event()  # calls wait for this
        self.gate.set()
        self.fail_next: Exception | None = None

    async def append_ledger(self, records: Sequence[LedgerRecord]) -> None:
        self.calls.append([r.id for r in records])
        self.entered.set()
        await self.gate.wait()
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        await super().append_ledger(records)

    def hold(self) -> None:
        """Make the next call block until :meth:`release`."""
        self.entered.clear()
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()


@pytest.fixture
async def store() -> AsyncIterator[RecordingStore]:
    s = RecordingStore()
    await s.open()
    yield s
    await s.close()


@pytest.fixture
async def writer(store: RecordingStore) -> AsyncIterator[LedgerWriter]:
    w = LedgerWriter(store, max_batch=10)
    await w.start()
    yield w
    await w.close()


async def test_an_idle_write_is_one_call_and_durable_on_return(
    writer: LedgerWriter, store: RecordingStore
) -> None:
    await writer.write(rec(1))
    assert store.calls == [["r-1"]]
    assert await store.get_ledger_record("r-1") == rec(1)


async def test_write_waits_for_the_store(writer: LedgerWriter, store: RecordingStore) -> None:
    store.hold()
    pending = asyncio.create_task(writer.write(rec(1)))
    await store.entered.wait()
    assert not pending.done()
    store.release()
    await pending
    assert await store.get_ledger_record("r-1") is not None


async def test_records_queued_during_a_write_share_the_next_batches(
    writer: LedgerWriter, store: RecordingStore
) -> None:
    store.hold()
    first = writer.write_nowait(rec(0))
    await store.entered.wait()  # the writer is inside the first call
    rest = [writer.write_nowait(rec(i)) for i in range(1, 26)]
    assert writer.pending == 25
    store.release()
    await asyncio.gather(first, *rest)
    # max_batch=10: everything queued goes out in the fewest batches, in order.
    assert [len(call) for call in store.calls] == [1, 10, 10, 5]
    assert [i for call in store.calls for i in call] == [f"r-{i}" for i in range(26)]
    assert (writer.batches, writer.records) == (4, 26)


async def test_a_store_error_reaches_exactly_that_batch_and_the_writer_goes_on(
    writer: LedgerWriter, store: RecordingStore
) -> None:
    store.hold()
    store.fail_next = DiskFull("no space left")
    failing = writer.write_nowait(rec(0))
    await store.entered.wait()
    later = [writer.write_nowait(rec(i)) for i in range(1, 4)]
    store.release()
    with pytest.raises(DiskFull, match="no space left"):
        await failing
    await asyncio.gather(*later)
    await writer.write(rec(9))
    assert await store.get_ledger_record("r-0") is None
    assert {r.id for r in await store.ledger_records()} == {"r-1", "r-2", "r-3", "r-9"}
    assert writer.failed_batches == 1


async def test_a_cancelled_write_is_still_stored(
    writer: LedgerWriter, store: RecordingStore
) -> None:
    store.hold()
    caller = asyncio.create_task(writer.write(rec(1)))
    await store.entered.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    store.release()
    await writer.close()
    assert await store.get_ledger_record("r-1") == rec(1)


async def test_close_flushes_everything_queued(store: RecordingStore) -> None:
    writer = LedgerWriter(store, max_batch=7)
    await writer.start()
    store.hold()
    futures = [writer.write_nowait(rec(i)) for i in range(50)]
    await store.entered.wait()
    closing = asyncio.create_task(writer.close())
    store.release()
    await closing
    assert all(f.done() and f.exception() is None for f in futures)
    assert len(await store.ledger_records()) == 50
    with pytest.raises(RuntimeError, match="closed"):
        writer.write_nowait(rec(99))
    await writer.close()  # closing twice is harmless


async def test_a_cancelled_writer_task_fails_its_waiters(store: RecordingStore) -> None:
    writer = LedgerWriter(store)
    await writer.start()
    store.hold()
    in_flight = writer.write_nowait(rec(0))
    await store.entered.wait()
    queued = writer.write_nowait(rec(1))
    assert writer._task is not None
    writer._task.cancel()  # what a careless shutdown does
    for future in (in_flight, queued):
        with pytest.raises(RuntimeError, match="stopped before this record was stored"):
            await future
    await writer.close()  # nothing left to flush, and no error to report again
    with pytest.raises(RuntimeError, match="closed"):
        writer.write_nowait(rec(2))


async def test_misuse_is_refused(store: RecordingStore) -> None:
    writer = LedgerWriter(store)
    with pytest.raises(RuntimeError, match="not started"):
        writer.write_nowait(rec(1))
    await writer.start()
    with pytest.raises(RuntimeError, match="only once"):
        await writer.start()
    await writer.close()
    with pytest.raises(ValueError, match="at least 1"):
        LedgerWriter(store, max_batch=0)
