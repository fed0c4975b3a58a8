"""Budget alert outbox of the memory store: dicts, one synchronous section per call.

Like the rest of :class:`~proxy.store.memory.MemoryStore`, every method runs without
awaiting anything, so each call is atomic with respect to the event loop; it is not
shared between processes. The outbox is small (a few entries per budget and period),
so a lease scans it instead of keeping a heap.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field

from proxy.store.base import AlertEntry, Store, alert_entry_id, validate_enqueue_alert

__all__ = ["MemoryAlertMethods", "MemoryOutbox"]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(slots=True)
class _Entry:
    payload: str
    due_ms: int
    attempts: int
    created_ms: int


@dataclass(slots=True)
class MemoryOutbox:
    """Dedup markers (key -> kept until, ms; None: forever) and outbox entries."""

    marks: dict[str, int | None] = field(default_factory=dict)
    entries: dict[str, _Entry] = field(default_factory=dict)

    def marked(self, key: str, now_ms: int) -> bool:
        if key not in self.marks:
            return False
        until = self.marks[key]
        if until is not None and until <= now_ms:
            del self.marks[key]
            return False
        return True


class MemoryAlertMethods(Store):
    """Implements the alert methods of :class:`~proxy.store.base.Store` for the memory
    store, which provides ``_alerts`` (a :class:`MemoryOutbox`) and ``_check_open``."""

    _alerts: MemoryOutbox

    @abstractmethod
    def _check_open(self) -> None:
        """Raise when the store is closed (provided by the store)."""

    async def enqueue_alert(
        self, dedup_key: str, payloads: Mapping[str, str], dedup_ttl_s: float | None
    ) -> bool:
        """See :meth:`Store.enqueue_alert`."""
        self._check_open()
        validate_enqueue_alert(dedup_key, payloads, dedup_ttl_s)
        now = _now_ms()
        box = self._alerts
        if box.marked(dedup_key, now):
            return False
        box.marks[dedup_key] = None if dedup_ttl_s is None else now + round(dedup_ttl_s * 1000)
        for channel, payload in payloads.items():
            box.entries[alert_entry_id(dedup_key, channel)] = _Entry(payload, now, 0, now)
        return True

    async def alert_marked(self, dedup_key: str) -> bool:
        """See :meth:`Store.alert_marked`."""
        self._check_open()
        return self._alerts.marked(dedup_key, _now_ms())

    async def lease_alerts(self, limit: int, lease_s: float) -> list[AlertEntry]:
        """See :meth:`Store.lease_alerts`."""
        self._check_open()
        now = _now_ms()
        due = sorted(
            (e.due_ms, entry_id) for entry_id, e in self._alerts.entries.items() if e.due_ms <= now
        )[: max(0, limit)]
        out: list[AlertEntry] = []
        for _, entry_id in due:
            entry = self._alerts.entries[entry_id]
            entry.due_ms = now + round(lease_s * 1000)
            entry.attempts += 1
            out.append(AlertEntry(entry_id, entry.payload, entry.attempts, entry.created_ms))
        return out

    async def ack_alert(self, entry_id: str) -> bool:
        """See :meth:`Store.ack_alert`."""
        self._check_open()
        return self._alerts.entries.pop(entry_id, None) is not None

    async def retry_alert(self, entry_id: str, delay_s: float) -> bool:
        """See :meth:`Store.retry_alert`."""
        self._check_open()
        entry = self._alerts.entries.get(entry_id)
        if entry is None:
            return False
        entry.due_ms = _now_ms() + round(max(0.0, delay_s) * 1000)
        return True
