"""Budget alert outbox on Redis: the alert half of :class:`~proxy.store.redis.RedisStore`.

Key layout (the namespace's hash tag ``{ns}``, the same slot as the budgets)::

    {ns}:al:q          ZSET    outbox entry id -> due time, ms of the server's TIME
    {ns}:al:p          HASH    entry id -> payload (JSON text)
    {ns}:al:m          HASH    entry id -> "attempts:created_ms"
    {ns}:al:d:<dedup>  STRING  dedup marker, PEXPIRE at the end of the alert's period

Each operation is one ``alerts_v1.lua`` call (its header documents the arguments), so
the marker check and the outbox writes of an enqueue, and the read and push-forward of
a lease, are atomic across replicas; :meth:`alert_marked` is one ``EXISTS``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from proxy.store.base import AlertEntry, alert_entry_id, validate_enqueue_alert
from proxy.store.redis_scripts import LuaScript, RedisPlumbing, text

__all__ = ["RedisAlertMethods"]

_ALERTS: Final = LuaScript.load("alerts_v1.lua")


class RedisAlertMethods(RedisPlumbing):
    """Implements the alert methods of :class:`~proxy.store.base.Store` for
    :class:`~proxy.store.redis.RedisStore`, which provides the plumbing below."""

    def _alert_keys(self) -> list[str]:
        tag = self._tag
        return [f"{tag}:al:q", f"{tag}:al:p", f"{tag}:al:m"]

    def _alert_mark_key(self, dedup_key: str) -> str:
        return "{" + self.namespace + "}:al:d:" + dedup_key

    async def enqueue_alert(
        self, dedup_key: str, payloads: Mapping[str, str], dedup_ttl_s: float | None
    ) -> bool:
        """See :meth:`Store.enqueue_alert`; one ``alerts_v1.lua`` call."""
        validate_enqueue_alert(dedup_key, payloads, dedup_ttl_s)
        ttl = "" if dedup_ttl_s is None else max(1, round(dedup_ttl_s * 1000))
        args: list[Any] = ["enqueue", ttl]
        for channel, payload in payloads.items():
            args += [alert_entry_id(dedup_key, channel), payload]
        keys = [*self._alert_keys(), self._alert_mark_key(dedup_key)]
        return int(await self._eval(_ALERTS, keys, args)) == 1

    async def alert_marked(self, dedup_key: str) -> bool:
        """See :meth:`Store.alert_marked`; one ``EXISTS``."""
        return int(await self._command("EXISTS", self._alert_mark_key(dedup_key))) == 1

    async def lease_alerts(self, limit: int, lease_s: float) -> list[AlertEntry]:
        """See :meth:`Store.lease_alerts`; one ``alerts_v1.lua`` call."""
        if limit < 1:
            return []
        lease_ms = max(1, round(lease_s * 1000))
        reply = await self._eval(_ALERTS, self._alert_keys(), ["lease", limit, lease_ms])
        flat = list(reply or [])
        return [
            AlertEntry(text(flat[i]), text(flat[i + 1]), int(flat[i + 2]), int(flat[i + 3]))
            for i in range(0, len(flat), 4)
        ]

    async def ack_alert(self, entry_id: str) -> bool:
        """See :meth:`Store.ack_alert`; one ``alerts_v1.lua`` call."""
        return int(await self._eval(_ALERTS, self._alert_keys(), ["ack", entry_id])) == 1

    async def retry_alert(self, entry_id: str, delay_s: float) -> bool:
        """See :meth:`Store.retry_alert`; one ``alerts_v1.lua`` call."""
        delay_ms = max(0, round(delay_s * 1000))
        reply = await self._eval(_ALERTS, self._alert_keys(), ["retry", entry_id, delay_ms])
        return int(reply) == 1
