"""The store contract: where the ledger (and, later, budgets) live.

Backends are chosen by URL through :func:`proxy.store.open_store`. Every backend must
pass the same contract suite in ``tests/test_store_contract.py``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from proxy.ledger import LedgerRecord
from proxy.store.aggregate import GROUP_COLUMNS, ReportRow, aggregate

__all__ = ["GROUP_COLUMNS", "ReportRow", "Store"]


class Store(ABC):
    """A storage backend. All methods are safe to call concurrently from one event loop."""

    @abstractmethod
    async def open(self) -> None:
        """Connect and create what is missing (tables, scripts)."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections; further calls are errors."""

    @abstractmethod
    async def append_ledger(self, records: Sequence[LedgerRecord]) -> None:
        """Write records; when this returns they survive a crash of this process.
        Writing a record whose id is already stored is a no-op (idempotent replay)."""

    @abstractmethod
    async def get_ledger_record(self, request_id: str) -> LedgerRecord | None:
        """One record by request id."""

    @abstractmethod
    async def ledger_records(
        self, since_ms: int | None = None, until_ms: int | None = None
    ) -> list[LedgerRecord]:
        """Records with ``since_ms <= ts_ms < until_ms``, oldest first (ties by id)."""

    async def report(
        self,
        group_by: Sequence[str],
        since_ms: int | None = None,
        until_ms: int | None = None,
    ) -> list[ReportRow]:
        """Sums grouped by ``group_by`` (names from :data:`GROUP_COLUMNS`), largest cost
        first. The default aggregates :meth:`ledger_records`; SQL backends override it."""
        return aggregate(await self.ledger_records(since_ms, until_ms), group_by)
