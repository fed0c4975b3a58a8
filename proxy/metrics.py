"""Every Prometheus metric the proxy exports, defined once against an injected registry.

Label values are bounded: ``upstream`` comes from the config, ``model`` is the
catalog's canonical name or ``other``, ``team`` from configured keys (``none`` for
passthrough callers). Money is counted internally in integer nano-dollars; the counter
exports dollars because that is what dashboards want.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram

from proxy.usage import Usage

#: Buckets for whole-request and time-to-first-byte latencies (seconds).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
#: Buckets for the proxy's own overhead, which should be well under a millisecond.
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
NANOS_PER_USD = 1_000_000_000


def status_class(status: int) -> str:
    """``2xx``, ``4xx`` ... for a status code."""
    return f"{status // 100}xx"


class Metrics:
    """The proxy's metrics. One instance per registry; tests pass a fresh registry."""

    def __init__(self, registry: CollectorRegistry, known_models: Iterable[str] = ()) -> None:
        self.registry = registry
        self._known_models = frozenset(known_models)
        self.requests = Counter(
            "metergate_requests",
            "Requests through the proxy, by outcome (status class or refusal).",
            ["upstream", "model", "team", "status"],
            registry=registry,
        )
        self.tokens = Counter(
            "metergate_tokens",
            "Tokens used, by kind (cached_input and cache_write are part of input; "
            "reasoning is part of output).",
            ["upstream", "model", "team", "kind"],
            registry=registry,
        )
        self.cost = Counter(
            "metergate_cost_usd",
            "Spend in US dollars.",
            ["upstream", "model", "team"],
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
    ) -> None:
        """Count one finished (or refused) request."""
        self.requests.labels(upstream, model, team, outcome).inc()
        if usage is not None:
            for kind, n in usage.tokens_by_kind().items():
                if n:
                    self.tokens.labels(upstream, model, team, kind).inc(n)
            if not usage.exact:
                self.estimated.labels(upstream, model).inc()
        if cost_nanos:
            self.cost.labels(upstream, model, team).inc(cost_nanos / NANOS_PER_USD)
