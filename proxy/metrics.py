"""Every Prometheus metric the proxy exports, defined once against an injected registry.

Label values are bounded: ``upstream`` comes from the config, ``model`` is the
catalog's canonical name or ``other``, ``team`` from configured keys (``none`` for
passthrough callers), ``status`` is a status class (``2xx`` ...) or ``refused_budget``,
``refused_rate``, ``error``; ``budget`` is a configured budget name. Money is counted
internally in integer nano-dollars; the counter exports dollars because that is what
dashboards want.

Budget gauges (``metergate_budget_*_usd{budget}``) are read from the store, not counted
in this process, so every replica reports the shared truth. prometheus-client collectors
are synchronous and the store is async, so the ``/metrics`` handler first awaits
:meth:`Metrics.refresh_budgets` (one ``budget_states`` call, bounded by
:data:`BUDGET_REFRESH_TIMEOUT_S`) and :class:`BudgetCollector` then yields from that
snapshot. When the store does not answer in time the last snapshot is served and
``metergate_budget_scrape_errors_total`` counts the miss; ``metergate_budget_snapshot_age_seconds``
tells how old the served values are.

How many series
---------------
Per (upstream, model, team): ``requests`` x statuses seen (typically 2-4),
``tokens`` x kinds used (typically 2-3 of 5), ``cost`` x 1. Models are per upstream in
practice (OpenAI models only appear on the OpenAI upstream). Per (upstream, model):
``estimated`` x 1. Per upstream: two latency histograms of 18 series each
(15 buckets + ``+Inf`` + ``_sum`` + ``_count``). Per budget with a limit: 5 gauges.
Fixed: the overhead and event-loop lag histograms (13 each), store errors (2
pre-created ops), alert deliveries (4 pre-created channel/result pairs), a few more.

A typical deployment (2 upstreams, 10 models in use, 5 teams, 10 budgets) exports about
10*5*(3 + 3 + 1) + 10 + 2*2*18 + 10*5 + 40 ~= 520 series per replica, plus one
``_created`` series per counter and histogram label set (~400 more) unless
prometheus-client's created series are turned off (``PROMETHEUS_DISABLE_CREATED_SERIES=True``).
The worst case is bounded by the catalog (65 models) and the configured teams: about
65*T*(4 + 5 + 1) series for T teams, 3,250 for 5 teams.

Opt-in ``key`` and ``user`` labels (config ``metrics: {labels: [key, user],
max_label_values: N}``) go on ``requests``, ``tokens`` and ``cost`` only, and multiply
their series by the number of distinct values seen, at most N + 1 per label (N values,
first come first served in each process, then ``other`` for every later one; a caller
with no user is ``none``). The combinations actually seen are what count: in practice a
key belongs to one team and usually one user, so ``[key]`` with K keys turns the 7 series
per (model, team) above into about 7 per (model, key), i.e. 10*K*7 for 10 models:
7,000 for K = 100. Both labels together rarely add more than ``[key]`` alone, for the
same reason. Each process (replica, or worker of ``serve --workers``) picks its own first
N, so two replicas may put different values into ``other``; with ``--workers`` the
multiprocess exposition sums them per label value as they are.

Worker processes
----------------
``metergate serve --workers N`` runs prometheus-client in multiprocess mode: every
counter and histogram value lives in a memory-mapped file per process under a directory
the supervisor creates (``PROMETHEUS_MULTIPROC_DIR``), and ``/metrics`` on any worker
sums all of them (:meth:`Metrics.render`). The budget gauges are not per-process values:
each worker serves the snapshot it read from the shared store, as a single process does.
The loop-lag and overhead histograms are summed over the workers' loops. There are no
``_created`` series in this mode.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from proxy.usage import Usage

if TYPE_CHECKING:
    from proxy.budget_gate import BudgetGate

log = logging.getLogger("metergate.metrics")

#: Buckets for whole-request and time-to-first-byte latencies (seconds).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
#: Buckets for the proxy's own overhead, which should be well under a millisecond.
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
#: Buckets for how late a periodic timer on the event loop fires (seconds).
LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
NANOS_PER_USD = 1_000_000_000
#: How long a scrape waits for the store before serving the last budget snapshot: well
#: under Prometheus's default scrape timeout (10 s), so a slow store never fails a scrape.
BUDGET_REFRESH_TIMEOUT_S = 1.0
#: How often the event-loop lag timer fires.
LOOP_LAG_INTERVAL_S = 0.5
#: Operations whose store errors are counted (pre-created at zero, so that dashboards
#: and alerts see a series before the first error).
STORE_OPS = ("ledger_write", "budget")
#: Alert channels and results pre-created at zero, for the same reason.
ALERT_CHANNELS = ("slack", "webhook")
ALERT_RESULTS = ("ok", "failed")
#: Labels a config may add to the request, token and cost counters (``metrics.labels``).
OPTIONAL_LABELS = ("key", "user")
#: Distinct values an optional label takes per process before the rest become ``other``.
DEFAULT_MAX_LABEL_VALUES = 100
OTHER = "other"


def status_class(status: int) -> str:
    """``2xx``, ``4xx`` ... for a status code."""
    return f"{status // 100}xx"


@dataclass(frozen=True, slots=True)
class BudgetSample:
    """One budget's values at the last refresh, in dollars (end: Unix seconds or None)."""

    budget: str
    spent_usd: float
    reserved_usd: float
    limit_usd: float
    period_start: float | None
    period_end: float | None


class BudgetCollector(Collector):
    """Yields the budget gauges from the snapshot taken by :meth:`Metrics.refresh_budgets`.

    Synchronous by necessity (prometheus-client calls ``collect`` from
    ``generate_latest``); it never touches the store itself."""

    def __init__(self) -> None:
        self.samples: tuple[BudgetSample, ...] = ()
        self.taken_at: float | None = None  # time.time() of the last good refresh

    def collect(self) -> Iterator[GaugeMetricFamily]:
        spent = GaugeMetricFamily(
            "metergate_budget_spent_usd",
            "Spend charged to the budget in its current period (from the shared store).",
            labels=["budget"],
        )
        reserved = GaugeMetricFamily(
            "metergate_budget_reserved_usd",
            "Money held on the budget by requests in flight (from the shared store).",
            labels=["budget"],
        )
        limit = GaugeMetricFamily(
            "metergate_budget_limit_usd", "The budget's spend limit per period.", labels=["budget"]
        )
        start = GaugeMetricFamily(
            "metergate_budget_period_start_timestamp_seconds",
            "Start of the budget's current period (Unix time); absent for period total.",
            labels=["budget"],
        )
        end = GaugeMetricFamily(
            "metergate_budget_period_end_timestamp_seconds",
            "End of the budget's current period, when it resets (Unix time); absent for "
            "period total.",
            labels=["budget"],
        )
        for s in self.samples:
            spent.add_metric([s.budget], s.spent_usd)
            reserved.add_metric([s.budget], s.reserved_usd)
            limit.add_metric([s.budget], s.limit_usd)
            if s.period_start is not None:
                start.add_metric([s.budget], s.period_start)
            if s.period_end is not None:
                end.add_metric([s.budget], s.period_end)
        age = GaugeMetricFamily(
            "metergate_budget_snapshot_age_seconds",
            "Age of the budget values served by this scrape (0 when read just now).",
        )
        if self.taken_at is not None:
            age.add_metric([], max(0.0, time.time() - self.taken_at))
        yield from (spent, reserved, limit, start, end, age)


class LabelCap:
    """Bounds one label's values: the first ``limit`` distinct values pass, later ones
    become ``other``. First come, first served, per process."""

    __slots__ = ("_seen", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str | None) -> str:
        value = value or "none"
        if value in self._seen:
            return value
        if len(self._seen) < self.limit:
            self._seen.add(value)
            return value
        return OTHER


class Metrics:
    """The proxy's metrics. One instance per registry; tests pass a fresh registry.

    ``labels`` adds the opt-in ``key`` and/or ``user`` labels (each capped at
    ``max_label_values`` distinct values) to the request, token and cost counters.
    ``multiprocess_dir`` is set in the workers of ``serve --workers``, where
    prometheus-client already runs in multiprocess mode (see the module docstring).

    Labelled children are cached per label tuple: ``Counter.labels`` validates and locks
    on every call, and the hot path makes four or five such calls per request."""

    def __init__(
        self,
        registry: CollectorRegistry,
        known_models: Iterable[str] = (),
        *,
        labels: Iterable[str] = (),
        max_label_values: int = DEFAULT_MAX_LABEL_VALUES,
        multiprocess_dir: str | None = None,
    ) -> None:
        self.registry = registry
        self._known_models = frozenset(known_models)
        opted = tuple(labels)
        unknown = [name for name in opted if name not in OPTIONAL_LABELS]
        if unknown:
            raise ValueError(f"Unknown optional metric labels {unknown}; use {OPTIONAL_LABELS}.")
        self.extra_labels = tuple(name for name in OPTIONAL_LABELS if name in opted)
        self._caps = {name: LabelCap(max_label_values) for name in self.extra_labels}
        who = ["upstream", "model", "team", *self.extra_labels]
        self.requests = Counter(
            "metergate_requests",
            "Requests through the proxy, by outcome (status class or refusal).",
            [*who, "status"],
            registry=registry,
        )
        self.tokens = Counter(
            "metergate_tokens",
            "Tokens used, by kind (cached_input and cache_write are part of input; "
            "reasoning is part of output).",
            [*who, "kind"],
            registry=registry,
        )
        self.cost = Counter(
            "metergate_cost_usd",
            "Spend in US dollars.",
            who,
            registry=registry,
        )
        self.estimated = Counter(
            "metergate_estimated_requests",
            "Requests whose usage was counted by the proxy, not reported by the provider.",
            ["upstream", "model"],
            registry=registry,
        )
        self.unpriced = Counter(
            "metergate_unpriced_requests",
            "Requests for a model with no catalog price, charged at the fallback price.",
            ["upstream"],
            registry=registry,
        )
        self.sse_malformed = Counter(
            "metergate_sse_malformed_events",
            "Stream events from an upstream that could not be parsed (skipped).",
            ["upstream"],
            registry=registry,
        )
        self.store_errors = Counter(
            "metergate_store_errors",
            "Failed store operations, by operation.",
            ["op"],
            registry=registry,
        )
        self.alerts_sent = Counter(
            "metergate_alerts_sent",
            "Budget alert deliveries, by channel and result.",
            ["channel", "result"],
            registry=registry,
        )
        self.duration = Histogram(
            "metergate_request_duration_seconds",
            "Whole request duration as the client sees it.",
            ["upstream"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.ttfb = Histogram(
            "metergate_upstream_ttfb_seconds",
            "Time from sending a request upstream to its response headers.",
            ["upstream"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.overhead = Histogram(
            "metergate_overhead_seconds",
            "Time spent in the proxy itself, excluding time waiting on the upstream.",
            buckets=OVERHEAD_BUCKETS,
            registry=registry,
        )
        self.loop_lag = Histogram(
            "metergate_event_loop_lag_seconds",
            f"How late a {LOOP_LAG_INTERVAL_S:g} s timer on the event loop fires: time the "
            "loop was busy with something that did not yield.",
            buckets=LOOP_LAG_BUCKETS,
            registry=registry,
        )
        self.budget_unchecked = Counter(
            "metergate_budget_unchecked_requests",
            "Requests admitted without a budget check because the store did not answer "
            "(on_store_error: fail_open): caps and rate limits were not enforced for them.",
            registry=registry,
        )
        self.budget_settles_lost = Counter(
            "metergate_budget_settles_lost",
            "Budget charges neither the store nor the local journal could take: spend "
            "missing from the budget (the ledger still has it). Should stay at 0.",
            registry=registry,
        )
        self.budget_scrape_errors = Counter(
            "metergate_budget_scrape_errors",
            "Scrapes that served the previous budget snapshot because the store failed or "
            "did not answer in time.",
            registry=registry,
        )
        for op in STORE_OPS:
            self.store_errors.labels(op)
        for channel in ALERT_CHANNELS:
            for result in ALERT_RESULTS:
                self.alerts_sent.labels(channel, result)
        self.budgets = BudgetCollector()
        registry.register(self.budgets)
        self._gate_seen: dict[str, int] = {}
        self._children: dict[tuple[Any, ...], Any] = {}
        self._exposition = registry
        if multiprocess_dir is not None:
            # Values live in per-process files; /metrics sums every worker's files, and
            # adds the budget gauges, which are this process's snapshot of the store.
            self._exposition = CollectorRegistry()
            MultiProcessCollector(self._exposition, path=multiprocess_dir)  # type: ignore[no-untyped-call]
            self._exposition.register(self.budgets)

    def render(self) -> bytes:
        """The text exposition for ``/metrics`` (every worker's values in multiprocess
        mode)."""
        return generate_latest(self._exposition)

    def _child(self, metric: Any, values: tuple[str, ...]) -> Any:
        """``metric.labels(*values)``, cached: label sets are bounded by design."""
        key = (id(metric), *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def observe_ttfb(self, upstream: str, seconds: float) -> None:
        """Time to the upstream's response headers."""
        self._child(self.ttfb, (upstream,)).observe(seconds)

    def observe_done(self, upstream: str, duration_s: float, overhead_s: float) -> None:
        """A finished request's duration and the proxy's own share of it."""
        self._child(self.duration, (upstream,)).observe(duration_s)
        self.overhead.observe(overhead_s)

    async def refresh_budgets(
        self, gate: BudgetGate | None, timeout_s: float = BUDGET_REFRESH_TIMEOUT_S
    ) -> None:
        """Read every capped budget from the store into the snapshot the collector serves.

        Call it in the ``/metrics`` handler before ``generate_latest``. Never raises: on
        a store failure or timeout the previous snapshot stays (its age is exported)."""
        if gate is None:
            return  # starting or stopping: keep what we had
        # The gate counts its own events as plain ints (no metric call on its hot path);
        # their increase is carried into the counters here, at scrape time. Its store
        # failures (reserve/settle/release) join the one store-errors metric.
        for attr, counter in (
            ("store_errors", self.store_errors.labels("budget")),
            ("admitted_unchecked", self.budget_unchecked),
            ("lost_settles", self.budget_settles_lost),
        ):
            value, seen = getattr(gate, attr), self._gate_seen.get(attr, 0)
            if value > seen:
                counter.inc(value - seen)
            self._gate_seen[attr] = value
        try:
            async with asyncio.timeout(timeout_s):  # not wait_for: see budget_specs.refresh
                statuses = await gate.status()
        except Exception as exc:
            # Deliberately broad: a timeout or any store's own error (redis, sqlite)
            # must not fail the scrape, which also carries every other metric.
            self.budget_scrape_errors.inc()
            log.warning("budget gauges not refreshed (serving the last values): %r", exc)
            return
        self.budgets.samples = tuple(
            BudgetSample(
                budget=st.spec.name,
                spent_usd=st.state.spent_nanos / NANOS_PER_USD,
                reserved_usd=st.state.reserved_nanos / NANOS_PER_USD,
                limit_usd=(st.spec.limit_nanos or 0) / NANOS_PER_USD,
                period_start=st.window.start.timestamp() if st.window.start else None,
                period_end=st.window.end.timestamp() if st.window.end else None,
            )
            for st in statuses
        )
        self.budgets.taken_at = time.time()

    def loop_lag_ctx(self, _app: Any) -> AsyncIterator[None]:
        """An aiohttp ``cleanup_ctx`` that runs the event-loop lag timer while the app runs."""
        return _loop_lag_ctx(self.loop_lag.observe)

    def alert_sent(self, channel: str, result: str) -> None:
        """Count one alert delivery *attempt* (``channel`` is the channel type, ``result``
        ``ok`` or ``failed``; see :mod:`proxy.alert_delivery`)."""
        self.alerts_sent.labels(channel, result).inc()

    def model_label(self, canonical: str | None) -> str:
        """A bounded model label: a catalog name, or ``other``."""
        return canonical if canonical in self._known_models else "other"

    def observe_request(
        self,
        *,
        upstream: str,
        model: str,
        team: str,
        outcome: str,
        usage: Usage | None,
        cost_nanos: int,
        key: str | None = None,
        user: str | None = None,
    ) -> None:
        """Count one finished (or refused) request. ``key`` and ``user`` are used only
        when the config opted into those labels."""
        who: tuple[str, ...] = (upstream, model, team)
        if self.extra_labels:
            given = {"key": key, "user": user}
            who += tuple(self._caps[name](given[name]) for name in self.extra_labels)
        child = self._child
        child(self.requests, (*who, outcome)).inc()
        if usage is not None:
            for kind, n in usage.tokens_by_kind().items():
                if n:
                    child(self.tokens, (*who, kind)).inc(n)
            if not usage.exact:
                child(self.estimated, (upstream, model)).inc()
        if cost_nanos:
            child(self.cost, who).inc(cost_nanos / NANOS_PER_USD)


async def _loop_lag_ctx(observe: Callable[[float], None]) -> AsyncIterator[None]:
    task = asyncio.get_running_loop().create_task(measure_loop_lag(observe))
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def measure_loop_lag(
    observe: Callable[[float], None], interval_s: float = LOOP_LAG_INTERVAL_S
) -> None:
    """Sleep ``interval_s`` forever and observe how much later than asked each wake-up
    comes: one timer per process, so it costs nothing measurable."""
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        await asyncio.sleep(interval_s)
        observe(max(0.0, loop.time() - started - interval_s))
