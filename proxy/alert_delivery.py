"""Delivering budget alerts: the outbox worker, the two message formats, signatures.

:class:`AlertWorker` runs in a background task on every replica, never on the request
path. It leases due entries from the store's outbox (:meth:`Store.lease_alerts`; one
replica owns an entry for ``delivery.lease_s``), POSTs each with its own aiohttp
session (``delivery.timeout_s`` per POST, no redirects followed), and then:

- 2xx: removes the entry (:meth:`Store.ack_alert`) and counts
  ``metergate_alerts_sent_total{channel=<type>, result="ok"}``;
- anything else (a status, a refused connection, a timeout): counts ``result="failed"``
  and reschedules it after an exponential backoff with jitter, ``retry_initial_s *
  2**(attempt-1)`` capped at ``retry_max_s`` and drawn from its upper half (or the
  receiver's ``Retry-After``, when longer, up to the cap). An alert older than
  ``give_up_after_s`` is dropped with an error log.

So the counter counts *attempts*: ``ok`` once per delivered alert and channel,
``failed`` once per failed try, which shows a receiver that is down while it is down.
Delivery is at least once: a POST slower than its lease, or a replica that dies after
the receiver answered but before the ack, can deliver twice. Each request carries the
same ``X-Metergate-Alert-Id`` (also ``id`` in the JSON body) every time, so a receiver
can drop the duplicate.

Formats. A ``slack`` channel gets ``{"text", "blocks"}`` for an incoming webhook. A
``webhook`` channel gets the alert document (:func:`proxy.alerts.alert_document`) plus
``id``, ``sent_at`` and ``attempt``; with a ``secret`` it is signed like Stripe's and
Slack's own webhooks::

    X-Metergate-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>

A receiver recomputes the HMAC over the timestamp, a dot and the raw body bytes,
compares in constant time, and refuses timestamps more than a few minutes old
(replays). :func:`verify_signature` does exactly that.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import random
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import aiohttp
import orjson

from proxy.background import STORE_ERRORS, BackgroundTask, OutageLog
from proxy.store.base import AlertEntry, Store

if TYPE_CHECKING:
    from proxy.alert_config import AlertChannel, AlertSettings
    from proxy.metrics import Metrics

__all__ = [
    "SIGNATURE_HEADER",
    "AlertWorker",
    "backoff_s",
    "render",
    "sign",
    "slack_message",
    "verify_signature",
]

log = logging.getLogger("metergate.alerts")

SIGNATURE_HEADER: Final = "X-Metergate-Signature"
ID_HEADER: Final = "X-Metergate-Alert-Id"
USER_AGENT: Final = "metergate-alerts/1"
#: How stale a signed timestamp :func:`verify_signature` accepts by default.
SIGNATURE_TOLERANCE_S: Final = 300


def backoff_s(attempt: int, initial_s: float, max_s: float, rand: Callable[[], float]) -> float:
    """The wait before try ``attempt + 1``: exponential, capped, with jitter from the
    upper half (so retries of many alerts spread out, yet never come much sooner)."""
    ceiling: float = min(max_s, initial_s * 2.0 ** min(max(attempt - 1, 0), 60))
    return ceiling * (0.5 + 0.5 * rand())


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The ``X-Metergate-Signature`` value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify_signature(
    secret: str,
    body: bytes,
    header: str,
    *,
    now: float | None = None,
    tolerance_s: float = SIGNATURE_TOLERANCE_S,
) -> bool:
    """What a receiver does: True when ``header`` signs ``body`` with ``secret`` and its
    timestamp is within ``tolerance_s`` of ``now``."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    expected = sign(secret, body, timestamp).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


def _escape(text: Any) -> str:
    """Slack mrkdwn treats &, < and > as control characters."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_message(alert: Mapping[str, Any]) -> dict[str, Any]:
    """A readable Slack incoming-webhook message: budget, spent, limit, percent, period
    end and top contributors, as plain ``text`` (notifications) and ``blocks``."""
    name = _escape(alert["budget"])
    period_end = alert["period"]["end"] or "never (total budget)"
    if alert["kind"] == "forecast":
        fc = alert["forecast"]
        headline = (
            f"Budget {name} will run out before its period ends: at "
            f"${fc['burn_rate_usd_per_hour']}/hour it reaches its limit at {fc['exhausted_at']}."
        )
    else:
        headline = f"Budget {name} has reached {alert['threshold_percent']}% of its limit."
    summary = (
        f"{headline} Spent ${alert['spent_usd']} of ${alert['limit_usd']} "
        f"({alert['percent']}%); the period ends {period_end}."
    )
    lines = [
        f"• {_escape(c['key'])} (team {_escape(c['team'] or '-')}, user "
        f"{_escape(c['user'] or '-')}): ${c['cost_usd']} in {c['requests']} requests"
        for c in alert["top_contributors"]
    ]
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": f"*Metergate:* {headline}"}},
        {
            "type": "section",
            "fields": [
                {"type": "mrkdwn", "text": f"*Budget*\n{name}"},
                {"type": "mrkdwn", "text": f"*Spent*\n${alert['spent_usd']}"},
                {"type": "mrkdwn", "text": f"*Limit*\n${alert['limit_usd']}"},
                {"type": "mrkdwn", "text": f"*Percent*\n{alert['percent']}%"},
                {"type": "mrkdwn", "text": f"*Period end*\n{period_end}"},
                {"type": "mrkdwn", "text": f"*Enforcement*\n{alert['enforce']}"},
            ],
        },
        {
            "type": "section",
            "text": {
                "type": "mrkdwn",
                "text": "*Top contributors*\n" + ("\n".join(lines) or "none recorded"),
            },
        },
        {
            "type": "context",
            "elements": [
                {"type": "mrkdwn", "text": f"period {alert['period']['id']} · {alert['replica']}"}
            ],
        },
    ]
    text = summary + ("\nTop contributors:\n" + "\n".join(lines) if lines else "")
    return {"text": text, "blocks": blocks}


def render(
    channel: AlertChannel, entry: AlertEntry, alert: Mapping[str, Any], now: float
) -> tuple[bytes, dict[str, str]]:
    """The body and headers of one delivery attempt of ``entry`` to ``channel``."""
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, ID_HEADER: entry.id}
    if channel.type == "slack":
        return orjson.dumps(slack_message(alert)), headers
    sent_at = datetime.fromtimestamp(now, UTC).isoformat()
    body = orjson.dumps({**alert, "id": entry.id, "sent_at": sent_at, "attempt": entry.attempts})
    if channel.secret:
        headers[SIGNATURE_HEADER] = sign(channel.secret, body, int(now))
    return body, headers


class AlertWorker:
    """Delivers the outbox (see the module docstring). ``start()``/``stop()``."""

    def __init__(
        self,
        store: Store,
        settings: AlertSettings,
        metrics: Metrics | None = None,
        *,
        rand: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.settings = settings
        self.delivery = settings.delivery
        self.metrics = metrics
        self.rand = rand
        self.clock = clock
        self.delivered = 0  # counters for tests and debugging
        self.failed_attempts = 0
        self.dropped = 0
        self._session: aiohttp.ClientSession | None = None
        self._task = BackgroundTask("alert worker")
        self._outage = OutageLog(log, "alert outbox")

    async def start(self) -> None:
        """Open the worker's own HTTP session and start polling the outbox."""
        if self._task.running:
            raise RuntimeError("The alert worker is already running.")
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.delivery.timeout_s),
            # Alerts must not share, or wait behind, the upstream connection pool.
            connector=aiohttp.TCPConnector(limit=32),
        )
        self._task.start(self.run())

    async def stop(self) -> None:
        """Stop polling, abandon POSTs in flight (their leases expire), close the session."""
        await self._task.stop()
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def run(self) -> None:
        """Deliver until cancelled; a store error is logged once per outage."""
        while True:
            try:
                busy = await self.run_once()
            except STORE_ERRORS as exc:
                self._outage.failed("unreadable (store unavailable)", exc)
                busy = 0
            else:
                self._outage.recovered()
            if busy < self.delivery.batch:
                await asyncio.sleep(self.delivery.poll_interval_s)

    async def run_once(self) -> int:
        """Lease one batch of due entries and try each once, concurrently; returns
        how many were leased."""
        async with asyncio.timeout(self.delivery.timeout_s):
            entries = await self.store.lease_alerts(self.delivery.batch, self.delivery.lease_s)
        # Every attempt runs to its end even when another one's ack or retry fails;
        # then the first failure is raised (an entry left as it is comes back after
        # its lease).
        results = await asyncio.gather(
            *(self._deliver(entry) for entry in entries), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return len(entries)

    async def _deliver(self, entry: AlertEntry) -> None:
        try:
            envelope = orjson.loads(entry.payload)
            channel = self.settings.channel(envelope["channel"])
            if channel is not None:
                body, headers = render(channel, entry, envelope["alert"], self.clock())
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            # Not an alert this version can read (written around Metergate, or by a
            # release with another schema): retrying would never succeed.
            log.error("dropping the malformed alert outbox entry %s", entry.id)
            await self._ack(entry)
            return
        if channel is None:
            # Written by a replica with another config (a deploy in progress): keep it
            # for a replica that knows the channel, until it is too old.
            log.warning("alert %s names a channel this replica lacks", entry.id)
            await self._failed(entry, None, "unknown channel", count=False)
            return
        ok, detail, retry_after = await self._post(channel.url, body, headers)
        if ok:
            self.delivered += 1
            self._count(channel.type, "ok")
            log.info("alert %s delivered to %s", entry.id, channel.name)
            await self._ack(entry)
            return
        self._count(channel.type, "failed")
        self.failed_attempts += 1
        await self._failed(entry, channel, detail, retry_after=retry_after)

    async def _post(
        self, url: str, body: bytes, headers: Mapping[str, str]
    ) -> tuple[bool, str, float | None]:
        """One POST: (delivered, what happened, Retry-After seconds)."""
        assert self._session is not None
        try:
            async with self._session.post(
                url, data=body, headers=headers, allow_redirects=False
            ) as resp:
                await resp.read()
                if 200 <= resp.status < 300:
                    return True, str(resp.status), None
                retry_after = resp.headers.get("Retry-After", "")
                wait = float(retry_after) if retry_after.isdigit() else None
                return False, f"HTTP {resp.status}", wait
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            # The exception text, never the URL (a Slack webhook URL is a secret); aiohttp
            # puts the host, not the path, in connection errors.
            return False, type(exc).__name__, None

    async def _failed(
        self,
        entry: AlertEntry,
        channel: AlertChannel | None,
        detail: str,
        *,
        retry_after: float | None = None,
        count: bool = True,
    ) -> None:
        age_s = self.clock() - entry.created_ms / 1000
        where = channel.name if channel else "?"
        if age_s >= self.delivery.give_up_after_s:
            self.dropped += 1
            log.error(
                "giving up on alert %s to %s after %d attempts over %.0f s (last: %s)",
                entry.id,
                where,
                entry.attempts,
                age_s,
                detail,
            )
            await self._ack(entry)
            return
        delay = backoff_s(
            entry.attempts, self.delivery.retry_initial_s, self.delivery.retry_max_s, self.rand
        )
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.delivery.retry_max_s))
        if count:
            log.warning(
                "alert %s to %s failed (attempt %d: %s); retrying in %.1f s",
                entry.id,
                where,
                entry.attempts,
                detail,
                delay,
            )
        async with asyncio.timeout(self.delivery.timeout_s):
            await self.store.retry_alert(entry.id, delay)

    async def _ack(self, entry: AlertEntry) -> None:
        async with asyncio.timeout(self.delivery.timeout_s):
            await self.store.ack_alert(entry.id)

    def _count(self, channel_type: str, result: str) -> None:
        if self.metrics is not None:
            self.metrics.alert_sent(channel_type, result)
