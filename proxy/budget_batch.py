"""Group commit for the budget gate's store calls: many requests, one store call.

Under load, reserves (and settles) of many requests are due at the same moment. Sent
one by one, each pays a round trip, a script call and the client library's overhead
per call. :class:`GroupCommit` queues them instead and hands them to the store as one
batch: while a batch is in flight, the calls that arrive queue up, and the next batch
takes them all. When the proxy is idle a call goes out in the next turn of the event
loop, with no timer to wait for, so the latency cost is at most one batch in flight.

No task per call: callers wait on a plain future; one flusher task runs while there
is work and ends when the queue is empty (the next call starts a new one).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Final, Generic, TypeVar

__all__ = ["DEFAULT_MAX_BATCH", "GroupCommit"]

DEFAULT_MAX_BATCH: Final = 512
"""Calls per batch; the Redis store splits a batch further (``BATCH_LIMIT``)."""

_C = TypeVar("_C")
_R = TypeVar("_R")


class GroupCommit(Generic[_C, _R]):
    """Queues calls and passes them to ``flush`` in batches, one batch at a time.

    ``flush(batch)`` gets a list of ``(call, future)`` and must complete every future
    that is not done yet (cancelled: its caller is gone, but the call may still have
    to run, as a settle must). Should ``flush`` raise, the futures it left pending get
    that exception. Callers await the future that :meth:`submit` returns.
    """

    def __init__(
        self,
        flush: Callable[[list[tuple[_C, asyncio.Future[_R]]]], Awaitable[None]],
        *,
        name: str,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}.")
        self._flush = flush
        self._name = name
        self._max_batch = max_batch
        self._pending: list[tuple[_C, asyncio.Future[_R]]] = []
        self._task: asyncio.Task[None] | None = None
        self.batches = 0  # flushes, for tests and metrics
        self.calls = 0

    @property
    def busy(self) -> bool:
        """True while calls are queued or a batch is in flight."""
        return self._task is not None or bool(self._pending)

    def submit(self, call: _C) -> asyncio.Future[_R]:
        """Queue ``call``; the future completes with its result once its batch ran."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_R] = loop.create_future()
        self._pending.append((call, future))
        if self._task is None or self._task.done():
            # Its first step runs in the next turn of the loop: every call submitted in
            # this turn joins the first batch.
            self._task = loop.create_task(self._run(), name=self._name)
        return future

    async def drain(self) -> None:
        """Wait until every call submitted so far has run (at shutdown, or in tests)."""
        while (task := self._task) is not None:
            await asyncio.wait((task,))  # neither raises its error nor cancels it
            if self._task is task:  # cancelled before its first step: no finally ran
                self._task = None

    async def _run(self) -> None:
        batch: list[tuple[_C, asyncio.Future[_R]]] = []
        try:
            while True:
                while self._pending:
                    batch = self._pending[: self._max_batch]
                    del self._pending[: self._max_batch]
                    self.batches += 1
                    self.calls += len(batch)
                    try:
                        await self._flush(batch)
                    except Exception as exc:  # handed to the callers, who decide
                        _fail(batch, exc)
                    batch = []
                # One more turn of the loop before ending: under load the next calls
                # arrive in it, and reuse this task instead of starting another.
                await asyncio.sleep(0)
                if not self._pending:
                    return
        except BaseException as exc:
            # Cancelled (the loop is shutting down): nothing will run the queued calls,
            # so fail their futures rather than leave their callers waiting forever.
            stopped = RuntimeError(f"{self._name} stopped before this call ran.")
            stopped.__cause__ = exc
            _fail([*batch, *self._pending], stopped)
            self._pending.clear()
            raise
        finally:
            self._task = None


def _fail(batch: list[tuple[_C, asyncio.Future[_R]]], exc: BaseException) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(exc)
