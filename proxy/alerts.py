"""Budget alerts: when one fires, what it says, and the service that runs them.

Off the request path. Each replica runs an :class:`AlertEvaluator` task that every
``check_interval_s`` reads the budgets in force (:meth:`BudgetGate.status`, one store
call) and, for each capped budget:

- **thresholds**: every configured percentage ``t`` with ``spent * 100 >= t * limit``
  (integers and Decimals, no floats) is crossed. Only settled spend counts, not holds
  of requests in flight. A jump past several thresholds fires each of them.
- **forecast**: the evaluator keeps its own samples ``(time, spent)`` of the period for
  ``forecast.window_s``; once they span ``forecast.min_span_s``, the burn rate is the
  slope between the oldest and newest sample, and the alert fires when ``now + (limit
  - spent) / rate`` falls before the period ends (never for ``total`` budgets, and not
  once the limit is reached: the 100% threshold says that).

A crossing becomes an alert through the store (:meth:`Store.enqueue_alert`): the dedup
key ``<budget>:<period id>:t<percent>`` (or ``...:forecast``) is written with one
outbox entry per channel, atomically and only once, so an alert fires once per budget,
threshold and period however many replicas see it, across restarts too. The marker
lives until the period ends plus :data:`DEDUP_MARGIN_S`. A limit changed mid-period
does not re-arm a threshold that already fired in that period.

Before building an alert (which reads the ledger for the top contributors) the
evaluator asks :meth:`Store.alert_marked`, so replicas that lose the race mostly skip
that work, and it remembers what it has seen per period so a crossed threshold costs
no store call on later checks. Delivery is :class:`proxy.alert_delivery.AlertWorker`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final, Literal

import orjson

from proxy.alert_config import AlertSettings, percent_text
from proxy.alert_delivery import AlertWorker
from proxy.background import STORE_ERRORS, BackgroundTask, OutageLog
from proxy.budget import BudgetSpec, BudgetStatus, PeriodWindow
from proxy.report import nanos_to_usd_str
from proxy.store.aggregate import NONE_LABEL
from proxy.store.base import Store

if TYPE_CHECKING:
    from proxy.budget_gate import BudgetGate
    from proxy.metrics import Metrics

__all__ = [
    "DEDUP_MARGIN_S",
    "SCHEMA",
    "AlertEvaluator",
    "AlertService",
    "Forecast",
    "burn_rate",
    "crossed_thresholds",
    "forecast_exhaustion",
    "top_contributors",
]

log = logging.getLogger("metergate.alerts")

SCHEMA: Final = "metergate.budget_alert.v1"
#: How long a dedup marker outlives its period: a replica whose clock lags, or that
#: evaluates just after midnight, must still see the previous period as alerted.
DEDUP_MARGIN_S: Final = 86_400.0
#: The longest one check waits for the store (status, marker, report, enqueue each).
STORE_TIMEOUT_S: Final = 10.0
Kind = Literal["threshold", "forecast"]
Sample = tuple[float, int]  # (unix seconds, spent nano-USD)


# ─────────────────────────────── decisions (pure functions) ──────────────────────────


def crossed_thresholds(
    thresholds: Sequence[Decimal], spent_nanos: int, limit_nanos: int
) -> list[Decimal]:
    """The thresholds (percent of the limit) that ``spent`` has reached, ascending.
    A zero limit has no percentages: nothing is crossed."""
    if limit_nanos <= 0:
        return []
    return sorted(t for t in thresholds if spent_nanos * 100 >= t * limit_nanos)


def burn_rate(samples: Sequence[Sample], min_span_s: float) -> float | None:
    """Nano-USD per second between the oldest and newest sample, or None when they
    span less than ``min_span_s`` or spend did not grow. A float: it only predicts."""
    if len(samples) < 2:
        return None
    (t0, s0), (t1, s1) = samples[0], samples[-1]
    if t1 - t0 < min_span_s or s1 <= s0:
        return None
    return (s1 - s0) / (t1 - t0)


@dataclass(frozen=True, slots=True)
class Forecast:
    """A predicted exhaustion: the burn rate and when the limit would be reached."""

    rate_nanos_per_s: float
    exhausted_at: datetime


def forecast_exhaustion(
    spent_nanos: int, limit_nanos: int, rate: float | None, now: float, period_end: datetime | None
) -> Forecast | None:
    """A :class:`Forecast` when spending at ``rate`` from ``now`` (unix seconds) reaches
    the limit before ``period_end``; None otherwise, or when the limit is already
    reached, or the period never ends."""
    if rate is None or rate <= 0 or period_end is None or spent_nanos >= limit_nanos:
        return None
    at = now + (limit_nanos - spent_nanos) / rate
    if at >= period_end.timestamp():
        return None
    return Forecast(rate, datetime.fromtimestamp(at, UTC))


# ─────────────────────────────── what an alert says ─────────────────────────────────


def _row_matches(scope: dict[str, str], row: dict[str, str]) -> bool:
    for what, want in scope.items():
        if what == "model":  # the ledger keeps the requested model; compare like matches()
            if row["model"].lower() != want.lower():
                return False
        elif row[what] != want:
            return False
    return True


async def top_contributors(
    store: Store, spec: BudgetSpec, window: PeriodWindow, limit: int
) -> list[dict[str, Any]]:
    """The callers (key, team, user) that spent most in the budget's period, among the
    ledger records its scope matches; one :meth:`Store.report` call. Scopes on a model
    match the model as requested (the ledger does not keep the catalog's name)."""
    if limit <= 0:
        return []
    group = ["key", "team", "user", *(f for f in ("model", "tag") if f in spec.scope)]
    since = None if window.start is None else int(window.start.timestamp() * 1000)
    until = None if window.end is None else int(window.end.timestamp() * 1000)
    sums: dict[tuple[str, str, str], list[int]] = {}
    for row in await store.report(group, since, until):
        values = dict(zip(group, row.group, strict=True))
        if row.cost_nanos <= 0 or not _row_matches(dict(spec.scope), values):
            continue
        acc = sums.setdefault((values["key"], values["team"], values["user"]), [0, 0])
        acc[0] += row.cost_nanos
        acc[1] += row.requests
    ranked = sorted(sums.items(), key=lambda kv: (-kv[1][0], kv[0]))[:limit]
    return [
        {
            "key": key,
            "team": None if team == NONE_LABEL else team,
            "user": None if user == NONE_LABEL else user,
            "cost_usd": nanos_to_usd_str(cost),
            "cost_nanos": cost,
            "requests": requests,
        }
        for (key, team, user), (cost, requests) in ranked
    ]


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat()


def alert_document(
    status: BudgetStatus,
    kind: Kind,
    *,
    threshold: Decimal | None,
    forecast: Forecast | None,
    contributors: list[dict[str, Any]],
    replica: str,
    now: float,
) -> dict[str, Any]:
    """The alert as the generic webhook receives it (minus ``id``, ``sent_at`` and
    ``attempt``, which the worker adds per delivery); schema in the README."""
    spec, window, spent = status.spec, status.window, status.state.spent_nanos
    limit = spec.limit_nanos or 0
    return {
        "schema": SCHEMA,
        "kind": kind,
        "budget": spec.name,
        "scope": dict(spec.scope),
        "enforce": spec.enforce,
        "threshold_percent": None if threshold is None else percent_text(threshold),
        "spent_usd": nanos_to_usd_str(spent),
        "spent_nanos": spent,
        "reserved_nanos": status.state.reserved_nanos,
        "limit_usd": nanos_to_usd_str(limit),
        "limit_nanos": limit,
        "percent": round(spent * 100 / limit, 2) if limit else None,
        "period": {
            "id": window.period_id,
            "kind": spec.period,
            "timezone": str(spec.timezone),
            "start": _iso(window.start),
            "end": _iso(window.end),
        },
        "forecast": None
        if forecast is None
        else {
            "burn_rate_usd_per_hour": nanos_to_usd_str(round(forecast.rate_nanos_per_s * 3600)),
            "exhausted_at": _iso(forecast.exhausted_at),
        },
        "top_contributors": contributors,
        "replica": replica,
        "detected_at": _iso(datetime.fromtimestamp(now, UTC)),
    }


# ─────────────────────────────────── the evaluator ──────────────────────────────────


class AlertEvaluator:
    """Turns budget crossings into deduplicated outbox entries (module docstring)."""

    def __init__(
        self,
        store: Store,
        gate: BudgetGate,
        settings: AlertSettings,
        *,
        replica: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.gate = gate
        self.settings = settings
        self.replica = replica
        self.clock = clock
        self.enqueued = 0  # alerts this replica put in the outbox (tests, debugging)
        self._samples: dict[str, deque[Sample]] = {}  # budget key -> samples
        self._seen: dict[str, set[str]] = {}  # budget key -> dedup keys known to be done
        self._outage = OutageLog(log, "budget alerts")
        self._task = BackgroundTask("alert evaluator")

    async def check(self) -> list[str]:
        """Evaluate every capped budget once; returns the dedup keys this call enqueued.
        Store errors propagate (:meth:`run` tolerates them)."""
        async with asyncio.timeout(STORE_TIMEOUT_S):
            statuses = await self.gate.status()
        now = self.clock()
        enqueued: list[str] = []
        live = {st.key for st in statuses}
        for stale in set(self._samples) - live:  # a period ended or a budget went away
            self._samples.pop(stale, None)
            self._seen.pop(stale, None)
        for status in statuses:
            enqueued += await self._check_budget(status, now)
        return enqueued

    async def _check_budget(self, status: BudgetStatus, now: float) -> list[str]:
        spec, spent = status.spec, status.state.spent_nanos
        limit = spec.limit_nanos
        if not limit:
            return []
        rule = self.settings.rule_for(spec.name)
        samples = self._samples.setdefault(status.key, deque())
        if samples and spent < samples[-1][1]:
            samples.clear()  # the budget was reset: the old slope means nothing
        samples.append((now, spent))
        while samples and samples[0][0] < now - self.settings.forecast_window_s:
            samples.popleft()
        wanted: list[tuple[str, Kind, Decimal | None, Forecast | None]] = [
            (f"{status.key}:t{percent_text(t)}", "threshold", t, None)
            for t in crossed_thresholds(rule.thresholds, spent, limit)
        ]
        if rule.forecast and self.settings.forecast:
            rate = burn_rate(samples, self.settings.forecast_min_span_s)
            forecast = forecast_exhaustion(spent, limit, rate, now, status.window.end)
            if forecast is not None:
                wanted.append((f"{status.key}:forecast", "forecast", None, forecast))
        seen = self._seen.setdefault(status.key, set())
        done: list[str] = []
        for dedup_key, kind, threshold, forecast in wanted:
            if dedup_key in seen:
                continue
            if await self._enqueue(status, dedup_key, kind, threshold, forecast, now):
                done.append(dedup_key)
            seen.add(dedup_key)
        return done

    async def _enqueue(
        self,
        status: BudgetStatus,
        dedup_key: str,
        kind: Kind,
        threshold: Decimal | None,
        forecast: Forecast | None,
        now: float,
    ) -> bool:
        async with asyncio.timeout(STORE_TIMEOUT_S):
            if await self.store.alert_marked(dedup_key):
                return False
        try:
            async with asyncio.timeout(STORE_TIMEOUT_S):
                contributors = await top_contributors(
                    self.store, status.spec, status.window, self.settings.top_contributors
                )
        except STORE_ERRORS as exc:
            # An alert without its contributors beats no alert.
            log.warning("top contributors of %s unavailable: %s", status.spec.name, exc)
            contributors = []
        doc = alert_document(
            status,
            kind,
            threshold=threshold,
            forecast=forecast,
            contributors=contributors,
            replica=self.replica,
            now=now,
        )
        payloads = {
            ch.name: orjson.dumps({"channel": ch.name, "alert": doc}).decode()
            for ch in self.settings.channels
        }
        end = status.window.end
        ttl = None if end is None else max(1.0, end.timestamp() - now) + DEDUP_MARGIN_S
        async with asyncio.timeout(STORE_TIMEOUT_S):
            fired = await self.store.enqueue_alert(dedup_key, payloads, ttl)
        if fired:
            self.enqueued += 1
            log.info("budget alert %s queued for %d channel(s)", dedup_key, len(payloads))
        return fired

    async def run(self) -> None:
        """Check every ``check_interval_s`` until cancelled; store errors are logged
        once per outage and retried at the next check."""
        while True:
            try:
                await self.check()
            except STORE_ERRORS as exc:
                self._outage.failed("not evaluated (store unavailable)", exc)
            else:
                self._outage.recovered()
            await asyncio.sleep(self.settings.check_interval_s)

    def start(self) -> None:
        """Run :meth:`run` in a background task."""
        self._task.start(self.run())

    async def stop(self) -> None:
        """Cancel the task and wait for it."""
        await self._task.stop()


class AlertService:
    """The evaluator and the delivery worker of one replica, started and stopped
    together by the app (after the spec watcher, before the store closes)."""

    def __init__(
        self,
        settings: AlertSettings,
        store: Store,
        gate: BudgetGate,
        metrics: Metrics | None,
        *,
        replica: str | None = None,
    ) -> None:
        replica = replica or f"{socket.gethostname()}:{os.getpid()}"
        self.evaluator = AlertEvaluator(store, gate, settings, replica=replica)
        self.worker = AlertWorker(store, settings, metrics)

    async def start(self) -> None:
        """Start delivering, then evaluating."""
        await self.worker.start()
        self.evaluator.start()

    async def stop(self) -> None:
        """Stop evaluating, then delivering; an alert being posted is abandoned and
        becomes due again when its lease runs out (another replica, or the next start,
        sends it)."""
        await self.evaluator.stop()
        await self.worker.stop()
