"""The background loops of one replica (the budget-spec and key watchers, the alert
evaluator and the alert worker): each is one named task that keeps going through store
outages and ends when stopped.

Two small pieces they share:

- :class:`BackgroundTask` starts a coroutine once and stops it by cancelling it, waiting
  until it has really ended (call ``stop`` before closing what the loop uses);
- :class:`OutageLog` logs the first failure of a store outage and the recovery, not
  every retry, so a loop polling twice a second does not flood the log while Redis is
  down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final

from proxy.errors import StoreUnavailable

__all__ = ["STORE_ERRORS", "BackgroundTask", "OutageLog", "poll_forever", "poll_once"]

STORE_ERRORS: Final = (StoreUnavailable, TimeoutError, OSError)
"""What a store call raises when the store is down or slow: a loop retries these and
lets anything else (a bug) end it loudly."""


class BackgroundTask:
    """One named task, started at most once at a time."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None

    def start(self, coro: Coroutine[Any, Any, None]) -> None:
        if self._task is not None:
            coro.close()
            raise RuntimeError(f"The {self.name} is already running.")
        self._task = asyncio.get_running_loop().create_task(coro, name=f"metergate-{self.name}")

    async def stop(self) -> None:
        """Cancel the task and wait until it has ended."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class OutageLog:
    """Logs "``what``: <message>" once when a store outage begins, and once when it ends."""

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self._log = logger
        self.what = what
        self.failing = False

    def failed(self, message: str, exc: BaseException) -> None:
        if not self.failing:
            self._log.warning("%s: %s: %s", self.what, message, exc)
        self.failing = True

    def recovered(self) -> None:
        if self.failing:
            self._log.info("%s: the store answers again", self.what)
        self.failing = False


async def poll_once(refresh: Callable[[], Awaitable[object]], outage: OutageLog) -> None:
    """Call ``refresh`` once; a store error keeps the last state and is logged once per
    outage (anything else propagates)."""
    try:
        await refresh()
    except STORE_ERRORS as exc:
        outage.failed("cannot read them, keeping the last ones", exc)
    else:
        outage.recovered()


async def poll_forever(
    refresh: Callable[[], Awaitable[object]], outage: OutageLog, interval_s: float
) -> None:
    """:func:`poll_once` every ``interval_s`` until cancelled."""
    while True:
        await poll_once(refresh, outage)
        await asyncio.sleep(interval_s)
