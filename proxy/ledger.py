"""The spend ledger: one record per request, written durably before the client sees
the end of its response."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # Only for annotations: proxy.store imports this module at run time.
    from proxy.store.base import Store

__all__ = ["LedgerRecord", "LedgerWriter"]


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


_Pending = tuple[LedgerRecord, "asyncio.Future[None]"]


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
    exception; the writer keeps running and the next batch tries again. The queue is
    not bounded here: each ``write()`` caller is a request in flight, so concurrency
    limits elsewhere bound it; ``write_nowait`` callers must bound themselves.

    Counters, for metrics: ``batches`` (store calls that succeeded), ``records``
    (records in them, including idempotent replays), ``failed_batches``.
    """

    def __init__(self, store: Store, *, max_batch: int = 512) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}.")
        self._store = store
        self._max_batch = max_batch
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
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((record, future))
        self._wakeup.set()
        return future

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
        try:
            while True:
                if not self._pending:
                    if self._closing:
                        return
                    # No record can arrive between this check and wait(): both run
                    # without yielding to the loop, so no wake-up is lost.
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                take = min(len(self._pending), self._max_batch)
                batch = [self._pending.popleft() for _ in range(take)]
                try:
                    await self._store.append_ledger([record for record, _ in batch])
                except Exception as exc:  # handed to the callers, who decide
                    self.failed_batches += 1
                    _settle(batch, exc)
                else:
                    self.batches += 1
                    self.records += len(batch)
                    _settle(batch, None)
                batch = []
        except BaseException as exc:
            # Cancelled (or worse) mid-flight: nothing will write the queued records,
            # so fail their futures rather than leave their callers waiting forever.
            self._closing = True
            stopped = RuntimeError("The ledger writer stopped before this record was stored.")
            stopped.__cause__ = exc
            _settle([*batch, *self._pending], stopped)
            self._pending.clear()
            raise


def _settle(batch: Iterable[_Pending], exc: BaseException | None) -> None:
    """Complete each still-waiting future of a batch with success or ``exc``."""
    for _, future in batch:
        if future.done():  # cancelled: its caller is gone, nobody to tell
            continue
        if exc is None:
            future.set_result(None)
        else:
            future.set_exception(exc)
