"""The spend ledger: one record per request, written durably before the client sees
the end of its response."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    # Only for annotations: proxy.store imports this module at run time.
    from proxy.journal import AppendFile
    from proxy.ledger_spool import LedgerSpool
    from proxy.store.base import Store

log = logging.getLogger("metergate.ledger")
#: Retry pauses for spooled records the store refused (seconds; doubles up to the max).
SPOOL_RETRY_S = 0.05
SPOOL_RETRY_MAX_S = 2.0
#: At close, how many failed attempts before spooled records are left to the spool
#: file (replayed at the next start).
CLOSE_ATTEMPTS = 3
#: Spooled records go to the store this long after the first of them (or sooner: when
#: SUBMIT_BATCH have gathered, or a store call is about to run, see below).
SUBMIT_DELAY_S = 0.01
SUBMIT_BATCH = 256

__all__ = ["LedgerRecord", "LedgerWriter", "encode_record"]


@dataclass(frozen=True, slots=True)
class LedgerRecord:
    """What one request cost, and who made it.

    Money is integer nano-dollars (1e-9 USD). Token counts follow
    :mod:`proxy.usage` (``input`` includes cached and cache-write tokens, ``output``
    includes reasoning tokens). ``exact`` is False when any count was estimated by us.
    ``error`` names why a request ended abnormally (``client_disconnect``,
    ``upstream_reset``, ``upstream_timeout``, ``stream_incomplete``, a refusal code),
    or is None.
    """

    id: str
    ts_ms: int
    key_name: str
    team: str | None
    user: str | None
    end_user: str | None
    tags: tuple[str, ...]
    upstream: str
    endpoint: str
    model: str
    stream: bool
    status: int
    input_tokens: int
    cached_input_tokens: int
    cache_write_tokens: int
    output_tokens: int
    reasoning_tokens: int
    cost_nanos: int
    exact: bool
    latency_ms: float
    error: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Every field by name (tags as a list), for JSON output and logs."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["tags"] = list(self.tags)
        return out


def encode_record(record: LedgerRecord) -> bytes:
    """One JSON line ``{"t": "ledger", "record": {...}}``: the format of the journal
    and of the ledger spool (:mod:`proxy.journal`, :mod:`proxy.ledger_spool`)."""
    # orjson serializes the dataclass itself (in C), as to_dict() gives it: the same
    # fields in the same order, tags as a list; twice as fast as going through to_dict().
    return orjson.dumps({"t": "ledger", "record": record}) + b"\n"


#: A queued record, the future its writer waits on, and the spool file it is in. The
#: future is None once the record is spooled: its writer has been answered, only the
#: store's copy is still to be made.
_Pending = tuple[LedgerRecord, "asyncio.Future[None] | None", "AppendFile | None"]


class LedgerWriter:
    """Writes ledger records to a store with group commit.

    ``await write(record)`` returns once the record is durably stored, so the pipeline
    can hold back the last bytes of a response until then: if a client saw a complete
    response, the ledger has it.

    One background task does the writing. While it writes a batch, new records queue
    up; the next batch takes everything queued (up to ``max_batch``). Under load, N
    concurrent requests therefore cost one store transaction (one fsync, one round trip)
    instead of N, and when idle a record is written at once, with no timer to wait for.

    A failing store call fails exactly the writes of that batch, with the store's
    exception (or ``bound``'s TimeoutError); the writer keeps running and the next batch
    tries again. The queue is not bounded here: each ``write()`` caller is a request in
    flight, so concurrency limits elsewhere bound it; ``write_nowait`` callers must
    bound themselves.

    With a :class:`~proxy.ledger_spool.LedgerSpool` (the SQLite store), a record is
    durable once the spool has it: records queued during one loop iteration are written
    to the spool file with one ``write`` at its end, their futures complete then, and
    the same batch is queued on the store's thread at once (so a read asked for later
    sees it). A store failure then fails nobody: the background task retries those
    records (backoff up to 2 s), and they stay in the spool file until the store has
    them. If the spool cannot be written (disk full), those records wait for the store
    as without one.

    Counters, for metrics: ``batches`` (store calls that succeeded), ``records``
    (records in them, including idempotent replays), ``failed_batches``.
    """

    def __init__(
        self,
        store: Store,
        *,
        max_batch: int = 512,
        spool: LedgerSpool | None = None,
        bound: Callable[[Awaitable[None]], Awaitable[None]] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}.")
        self._store = store
        self._max_batch = max_batch
        self._spool = spool
        # Wraps each store call, e.g. to give up on a store that stopped answering (the
        # app passes budget_gate.wait_for_store): one timer per batch, not per record.
        self._bound = bound
        self._spooling: list[_Pending] = []
        self._submitted: set[asyncio.Future[None]] = set()  # spooled batches in the store
        self._unsubmitted: list[LedgerRecord] = []  # spooled, not yet handed to the store
        self._unsubmitted_file: AppendFile | None = None
        self._submit_timer: asyncio.TimerHandle | None = None
        if spool is not None:
            # Whatever the store is asked next (a report, an admin query, a budget
            # step) runs after the spooled records: reads see every finished request.
            spool.before_store_call(self.submit_spooled)
        self._pending: deque[_Pending] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.batches = 0
        self.records = 0
        self.failed_batches = 0

    @property
    def pending(self) -> int:
        """Records queued and not yet handed to the store."""
        return len(self._pending)

    async def start(self) -> None:
        """Start the background task on the running loop."""
        if self._task is not None or self._closing:
            raise RuntimeError("A LedgerWriter can be started only once.")
        self._task = asyncio.create_task(self._run(), name="metergate-ledger-writer")

    def write_nowait(self, record: LedgerRecord) -> asyncio.Future[None]:
        """Queue a record; the returned future completes when it is stored.

        The record is written even if nobody awaits the future or the future is
        cancelled. A failed write sets the store's exception on the future; a caller
        that drops the future will see asyncio log "exception was never retrieved".
        """
        if self._task is None:
            raise RuntimeError("The LedgerWriter is not started; call `await start()` first.")
        if self._closing:
            raise RuntimeError("The LedgerWriter is closed; no more records are accepted.")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        if self._spool is not None:
            if not self._spooling:
                loop.call_soon(self._write_spool)
            self._spooling.append((record, future, None))
            return future
        self._pending.append((record, future, None))
        self._wakeup.set()
        return future

    @property
    def spooled(self) -> bool:
        """True when writes complete at the spool, not at the store."""
        return self._spool is not None

    def _write_spool(self) -> None:
        """Write the records queued in this loop iteration to the spool (one write),
        answer their writers, and queue them on the store's thread."""
        batch, self._spooling = self._spooling, []
        if not batch:
            return
        assert self._spool is not None
        records = [record for record, _, _ in batch]
        try:
            file = self._spool.append_records(records)
        except OSError as exc:
            # No spool: these writers wait for the store, as they would without one.
            log.error("ledger spool write failed (%s); waiting for the store instead", exc)
            self._pending.extend(batch)
            self._wakeup.set()
            return
        for _, future, _ in batch:
            if future is not None and not future.done():
                future.set_result(None)
        if file is not self._unsubmitted_file:
            self.submit_spooled()  # one file per store batch
            self._unsubmitted_file = file
        self._unsubmitted.extend(records)
        if len(self._unsubmitted) >= SUBMIT_BATCH:
            self.submit_spooled()
        elif self._submit_timer is None:
            # Not at once: at a low rate every record would cost the store's thread a
            # wake-up and a transaction of its own, and the loop a wake-up back.
            loop = asyncio.get_running_loop()
            self._submit_timer = loop.call_later(SUBMIT_DELAY_S, self.submit_spooled)

    def submit_spooled(self) -> None:
        """Hand the spooled records gathered so far to the store's thread, now."""
        if self._submit_timer is not None:
            self._submit_timer.cancel()
            self._submit_timer = None
        records, file = self._unsubmitted, self._unsubmitted_file
        if not records or file is None:
            return
        self._unsubmitted = []
        assert self._spool is not None
        stored = self._spool.submit(records)
        self._submitted.add(stored)
        stored.add_done_callback(lambda done: self._store_done(done, records, file))

    def _store_done(
        self, done: asyncio.Future[None], records: list[LedgerRecord], file: AppendFile
    ) -> None:
        self._submitted.discard(done)
        assert self._spool is not None
        if done.cancelled() or done.exception() is not None:
            self.failed_batches += 1
            log.warning(
                "ledger: the store refused %d spooled records (%s); retrying",
                len(records),
                "cancelled" if done.cancelled() else done.exception(),
            )
            self._pending.extend((record, None, file) for record in records)
        else:
            self.batches += 1
            self.records += len(records)
            self._spool.stored(file, len(records))
        self._wakeup.set()

    async def write(self, record: LedgerRecord) -> None:
        """Store a record; return once it is durable, or raise the store's exception.

        Cancelling the caller does not withdraw the record: it is written anyway, so a
        client that disconnects at the last moment is still billed.
        """
        # No shield needed: cancelling the caller cancels only this future, and the
        # queued record does not depend on it.
        await self.write_nowait(record)

    async def close(self) -> None:
        """Stop accepting records, write everything queued, stop the task.

        Does not close the store, which the caller owns.
        """
        self._closing = True
        if self._task is None:
            return
        self._write_spool()  # records of this very iteration, not spooled yet
        self.submit_spooled()
        if self._submitted:  # their failures come back to the task as retries
            await asyncio.gather(*self._submitted, return_exceptions=True)
        self._wakeup.set()
        try:
            # Shielded: a cancelled close() must not abandon the records still queued.
            await asyncio.shield(self._task)
        except asyncio.CancelledError:
            if not self._task.cancelled():
                raise  # close() itself was cancelled
            # Someone cancelled the task; it has already failed the queued futures.

    async def _run(self) -> None:
        batch: list[_Pending] = []
        failures = 0
        try:
            while True:
                if not self._pending:
                    if self._closing and not self._submitted:
                        return
                    # No record can arrive between this check and wait(): both run
                    # without yielding to the loop, so no wake-up is lost.
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                take = min(len(self._pending), self._max_batch)
                batch = [self._pending.popleft() for _ in range(take)]
                try:
                    call = self._store.append_ledger([record for record, _, _ in batch])
                    await (call if self._bound is None else self._bound(call))
                except Exception as exc:  # handed to the callers, who decide
                    self.failed_batches += 1
                    failures += 1
                    _settle(batch, exc)
                    # Spooled records have no caller left to decide: retry them, oldest
                    # first, until the store takes them (or, at close, leave them to
                    # the spool file, which the next start replays).
                    spooled = [item for item in batch if item[2] is not None]
                    batch = []
                    if spooled:
                        if self._closing and failures >= CLOSE_ATTEMPTS:
                            log.error(
                                "ledger: the store refused %d spooled records at shutdown "
                                "(%s); they stay in the spool and are stored at the next "
                                "start",
                                len(spooled) + sum(1 for *_, f in self._pending if f),
                                exc,
                            )
                            _settle(self._pending, exc)
                            self._pending.clear()
                            return
                        self._pending.extendleft(reversed(spooled))
                        await asyncio.sleep(
                            min(SPOOL_RETRY_MAX_S, SPOOL_RETRY_S * 2 ** (failures - 1))
                        )
                else:
                    failures = 0
                    self.batches += 1
                    self.records += len(batch)
                    _settle(batch, None)
                    if self._spool is not None:
                        for _, _, file in batch:
                            if file is not None:
                                self._spool.stored(file, 1)
                batch = []
        except BaseException as exc:
            # Cancelled (or worse) mid-flight: nothing will write the queued records,
            # so fail their futures rather than leave their callers waiting forever
            # (spooled ones stay in the spool file for the next start).
            self._closing = True
            stopped = RuntimeError("The ledger writer stopped before this record was stored.")
            stopped.__cause__ = exc
            _settle([*batch, *self._pending], stopped)
            self._pending.clear()
            raise


def _settle(batch: Iterable[_Pending], exc: BaseException | None) -> None:
    """Complete each still-waiting future of a batch with success or ``exc``."""
    for _, future, _ in batch:
        if future is None or future.done():  # spooled, or cancelled: nobody to tell
            continue
        if exc is None:
            future.set_result(None)
        else:
            future.set_exception(exc)
