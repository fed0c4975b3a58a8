"""The metric names and labels issue 4 lists, on a fresh registry per test; bounded
labels; the budget gauges read from the store at scrape time; the event-loop timer."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import METRICS, RUNNING
from proxy.metrics import BudgetSample, Metrics, measure_loop_lag
from proxy.usage import Usage
from tests.conftest import KEY_A, ProxyFactory

#: name -> label names, exactly as issue 4 lists them (counters with their _total).
ISSUE_4_METRICS: dict[str, tuple[str, list[str]]] = {
    "metergate_requests": ("counter", ["upstream", "model", "team", "status"]),
    "metergate_tokens": ("counter", ["upstream", "model", "team", "kind"]),
    "metergate_cost_usd": ("counter", ["upstream", "model", "team"]),
    "metergate_estimated_requests": ("counter", ["upstream", "model"]),
    "metergate_budget_spent_usd": ("gauge", ["budget"]),
    "metergate_budget_limit_usd": ("gauge", ["budget"]),
    "metergate_budget_reserved_usd": ("gauge", ["budget"]),
    "metergate_request_duration_seconds": ("histogram", ["upstream"]),
    "metergate_upstream_ttfb_seconds": ("histogram", ["upstream"]),
    "metergate_overhead_seconds": ("histogram", []),
    "metergate_store_errors": ("counter", ["op"]),
    "metergate_alerts_sent": ("counter", ["channel", "result"]),
}


def families(registry: CollectorRegistry) -> dict[str, Any]:
    text = generate_latest(registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()  # fresh per test


def test_every_metric_of_issue_4_is_registered_with_its_type(registry: CollectorRegistry) -> None:
    Metrics(registry, known_models=["gpt-4o"])
    described = {m.name: m.type for m in registry.collect()}
    for name, (kind, _labels) in ISSUE_4_METRICS.items():
        assert described.get(name) == kind, name
    assert described["metergate_event_loop_lag_seconds"] == "histogram"


def test_the_label_names_are_exactly_those_of_issue_4(registry: CollectorRegistry) -> None:
    metrics = Metrics(registry, known_models=["gpt-4o"])
    metrics.observe_request(
        upstream="openai",
        model="gpt-4o",
        team="search",
        outcome="2xx",
        usage=Usage(input=10, output=5, cached_input=2, reasoning=1, exact=False),
        cost_nanos=1_500_000_000,
    )
    metrics.duration.labels("openai").observe(0.2)
    metrics.ttfb.labels("openai").observe(0.1)
    metrics.overhead.observe(0.0002)
    metrics.budgets.samples = (BudgetSample("monthly", 1.5, 0.25, 100.0, None, None),)
    fams = families(registry)
    for name, (_kind, labels) in ISSUE_4_METRICS.items():
        fam = fams[name]
        samples = [s for s in fam.samples if not s.name.endswith(("_created",))]
        assert samples, name
        for s in samples:
            assert sorted(k for k in s.labels if k != "le") == sorted(labels), (name, s)
    assert registry.get_sample_value(
        "metergate_cost_usd_total", {"upstream": "openai", "model": "gpt-4o", "team": "search"}
    ) == pytest.approx(1.5)
    kinds = {s.labels["kind"] for s in fams["metergate_tokens"].samples if "kind" in s.labels}
    assert kinds == {"input", "output", "cached_input", "reasoning"}
    assert (
        registry.get_sample_value(
            "metergate_estimated_requests_total", {"upstream": "openai", "model": "gpt-4o"}
        )
        == 1
    )
    assert registry.get_sample_value("metergate_budget_spent_usd", {"budget": "monthly"}) == 1.5
    assert registry.get_sample_value("metergate_budget_limit_usd", {"budget": "monthly"}) == 100
    assert registry.get_sample_value("metergate_budget_reserved_usd", {"budget": "monthly"}) == 0.25


def test_two_registries_do_not_share_anything() -> None:
    a, b = CollectorRegistry(), CollectorRegistry()
    Metrics(a).store_errors.labels("budget").inc()
    Metrics(b)
    assert a.get_sample_value("metergate_store_errors_total", {"op": "budget"}) == 1
    assert b.get_sample_value("metergate_store_errors_total", {"op": "budget"}) == 0


def test_models_outside_the_catalog_are_other(registry: CollectorRegistry) -> None:
    metrics = Metrics(registry, known_models=["gpt-4o", "claude-haiku-4-5"])
    assert metrics.model_label("gpt-4o") == "gpt-4o"
    for name in ("my-own-model", "GPT-4O-2099", "", None):
        assert metrics.model_label(name) == "other"


def test_store_errors_and_alert_deliveries_exist_before_the_first_one(
    registry: CollectorRegistry,
) -> None:
    Metrics(registry)
    assert registry.get_sample_value("metergate_store_errors_total", {"op": "budget"}) == 0
    assert registry.get_sample_value("metergate_store_errors_total", {"op": "ledger_write"}) == 0
    assert (
        registry.get_sample_value(
            "metergate_alerts_sent_total", {"channel": "webhook", "result": "failed"}
        )
        == 0
    )


async def test_loop_lag_timer_observes_a_blocked_loop(registry: CollectorRegistry) -> None:
    metrics = Metrics(registry)
    task = asyncio.create_task(measure_loop_lag(metrics.loop_lag.observe, interval_s=0.01))
    await asyncio.sleep(0.03)
    time.sleep(0.1)  # noqa: ASYNC251 - blocking the loop is the point
    await asyncio.sleep(0.03)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert registry.get_sample_value("metergate_event_loop_lag_seconds_count", {}) >= 2  # type: ignore[operator]
    assert registry.get_sample_value("metergate_event_loop_lag_seconds_sum", {}) >= 0.08  # type: ignore[operator]


BUDGETS = {
    "budgets": [
        {"name": "search-daily", "scope": {"team": "search"}, "limit_usd": "0.50", "period": "day"},
        {"name": "forever", "scope": {}, "limit_usd": 1000, "period": "total"},
        {"name": "alice-rpm", "scope": {"user": "alice"}, "requests_per_minute": 1000},
    ]
}


async def test_budget_gauges_are_read_from_the_store_at_scrape_time(
    make_proxy: ProxyFactory,
) -> None:
    """Two replicas on one store: spend through replica A shows on replica B's /metrics,
    which never served a request (the shared truth, not a per-process count)."""
    a = await make_proxy(BUDGETS)
    b = await make_proxy(BUDGETS)
    await a.openai(KEY_A).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    async with aiohttp.ClientSession() as s, s.get(f"{b.url}/metrics") as resp:
        text = await resp.text()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    spent = {s.labels["budget"]: s.value for s in fams["metergate_budget_spent_usd"].samples}
    limit = {s.labels["budget"]: s.value for s in fams["metergate_budget_limit_usd"].samples}
    reserved = {s.labels["budget"]: s.value for s in fams["metergate_budget_reserved_usd"].samples}
    # Only budgets with a limit; a rate-only budget has nothing to report.
    assert set(limit) == {"search-daily", "forever"}
    assert limit == {"search-daily": 0.5, "forever": 1000.0}
    assert spent["search-daily"] > 0
    assert spent["search-daily"] == spent["forever"]
    assert reserved == {"search-daily": 0.0, "forever": 0.0}
    ends = {
        s.labels["budget"]: s.value
        for s in fams["metergate_budget_period_end_timestamp_seconds"].samples
    }
    assert set(ends) == {"search-daily"}  # a total budget never resets
    assert (
        b.metric(
            "metergate_requests_total",
            {"upstream": "openai", "model": "gpt-4o-mini", "team": "search", "status": "2xx"},
        )
        == 0
    )
    assert a.metric("metergate_budget_snapshot_age_seconds") == 0  # a never scraped: no value


async def test_a_store_that_fails_at_scrape_time_keeps_the_last_values(
    make_proxy: ProxyFactory,
) -> None:
    proxy = await make_proxy(BUDGETS)
    metrics = proxy.app[METRICS]
    await metrics.refresh_budgets(proxy.app[RUNNING].gate)
    before = metrics.budgets.samples
    assert {s.budget for s in before} == {"search-daily", "forever"}

    class Broken:
        store_errors = 3
        admitted_unchecked = 2
        lost_settles = 0

        async def status(self) -> list[Any]:
            raise ConnectionError("store down")

    await metrics.refresh_budgets(Broken())  # type: ignore[arg-type]
    assert metrics.budgets.samples == before
    assert proxy.metric("metergate_budget_scrape_errors_total") == 1
    # The gate's own counts are carried into counters at scrape time.
    assert proxy.metric("metergate_store_errors_total", {"op": "budget"}) == 3
    assert proxy.metric("metergate_budget_unchecked_requests_total") == 2
    assert proxy.metric("metergate_budget_settles_lost_total") == 0

    class Slow:
        store_errors = 3
        admitted_unchecked = 2
        lost_settles = 0

        async def status(self) -> list[Any]:
            await asyncio.sleep(5)
            return []

    await metrics.refresh_budgets(Slow(), timeout_s=0.05)  # type: ignore[arg-type]
    assert metrics.budgets.samples == before
    assert proxy.metric("metergate_budget_scrape_errors_total") == 2
