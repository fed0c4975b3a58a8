"""An in-process store: for tests and throwaway runs. Nothing survives the process."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from proxy.ledger import LedgerRecord
from proxy.store.base import Store

__all__ = ["MemoryStore"]


class MemoryStore(Store):
    """Keeps the ledger in a dict keyed by request id.

    Every method runs without awaiting anything, so each call is atomic with respect
    to the event loop; that is what makes concurrent use from one loop safe.
    """

    def __init__(self) -> None:
        self._ledger: dict[str, LedgerRecord] = {}
        self._open = False

    @classmethod
    def from_url(cls, url: str) -> MemoryStore:
        """Build from ``memory://``; nothing may follow the scheme."""
        if url.partition("://")[2]:
            raise ValueError(
                f"The memory store takes no path or options; write 'memory://', not {url!r}."
            )
        return cls()

    async def open(self) -> None:
        """Mark the store usable. Data kept before a ``close()`` is still there."""
        self._open = True

    async def close(self) -> None:
        """Mark the store closed; further calls raise RuntimeError."""
        self._open = False

    def _check_open(self) -> None:
        if not self._open:
            raise RuntimeError("The memory store is not open; call `await store.open()` first.")

    async def append_ledger(self, records: Sequence[LedgerRecord]) -> None:
        """Store records whose id is not yet known; a known id is left untouched."""
        self._check_open()
        for record in records:
            if record.id not in self._ledger:
                # Copy the one mutable field so a caller mutating its dict afterwards
                # cannot rewrite history.
                self._ledger[record.id] = replace(record, extra=dict(record.extra))

    async def get_ledger_record(self, request_id: str) -> LedgerRecord | None:
        """The record with this request id, or None."""
        self._check_open()
        record = self._ledger.get(request_id)
        return None if record is None else replace(record, extra=dict(record.extra))

    async def ledger_records(
        self, since_ms: int | None = None, until_ms: int | None = None
    ) -> list[LedgerRecord]:
        """Records with ``since_ms <= ts_ms < until_ms``, ordered by (ts_ms, id)."""
        self._check_open()
        selected = [
            replace(r, extra=dict(r.extra))
            for r in self._ledger.values()
            if (since_ms is None or r.ts_ms >= since_ms)
            and (until_ms is None or r.ts_ms < until_ms)
        ]
        selected.sort(key=lambda r: (r.ts_ms, r.id))
        return selected
