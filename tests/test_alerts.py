"""Budget alerts without a network: when an alert fires, what it says, the config.

The evaluator runs against a real memory store and a real :class:`BudgetGate`, with
spend charged through the store and time given by an injected clock; the end-to-end
tests (two proxies, one Redis, a real receiver) are in ``tests/test_alerts_e2e.py``.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import pytest

from proxy.alert_config import AlertSettings, BudgetAlertRule, parse_alerts
from proxy.alert_delivery import backoff_s, render, sign, slack_message, verify_signature
from proxy.alerts import (
    AlertEvaluator,
    alert_document,
    burn_rate,
    crossed_thresholds,
    forecast_exhaustion,
)
from proxy.budget import BudgetSpec, budget_key, parse_budgets, period_window
from proxy.budget_gate import BudgetGate
from proxy.settings import ConfigError, parse_settings
from proxy.store import open_store
from proxy.store.base import AlertEntry, Store

NANOS = 1_000_000_000
D = Decimal


# ── thresholds ────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("spent", "limit", "expected"),
    [
        (0, 100, []),
        (49, 100, []),
        (50, 100, [50]),
        (79_999_999, 100_000_000, [50]),
        (80_000_000, 100_000_000, [50, 80]),
        (100, 100, [50, 80, 100]),
        (250, 100, [50, 80, 100]),
        (1, 0, []),  # a zero limit has no percentages
    ],
)
def test_crossed_thresholds_compare_exactly(spent: int, limit: int, expected: list[int]) -> None:
    got = crossed_thresholds([D(100), D(50), D(80)], spent, limit)
    assert got == [D(x) for x in expected]


def test_fractional_threshold_is_exact() -> None:
    # 33.33% of 3 USD is 0.9999 USD: one nano-dollar below is not crossed.
    limit = 3 * NANOS
    assert crossed_thresholds([D("33.33")], 999_899_999, limit) == []
    assert crossed_thresholds([D("33.33")], 999_900_000, limit) == [D("33.33")]


# ── forecast ─────────────────────────────────────────────────────────────────────────


def test_burn_rate_needs_a_minimum_span_and_growth() -> None:
    assert burn_rate([], 10) is None
    assert burn_rate([(0.0, 0)], 10) is None
    assert burn_rate([(0.0, 0), (5.0, 100)], 10) is None  # too short to judge
    assert burn_rate([(0.0, 100), (20.0, 100)], 10) is None  # no growth
    assert burn_rate([(0.0, 0), (7.0, 50), (20.0, 200)], 10) == 10.0


def test_forecast_fires_only_when_the_limit_falls_before_the_period_end() -> None:
    now = 1_000_000.0
    end = datetime.fromtimestamp(now + 3_600, UTC)
    # 10 nano-USD/s with 1,000 left: exhausted in 100 s, well before the end.
    fast = forecast_exhaustion(9_000, 10_000, 10.0, now, end)
    assert fast is not None
    assert fast.exhausted_at == datetime.fromtimestamp(now + 100, UTC)
    # 0.1 nano-USD/s: 10,000 s, after the end.
    assert forecast_exhaustion(9_000, 10_000, 0.1, now, end) is None
    assert forecast_exhaustion(10_000, 10_000, 10.0, now, end) is None  # already reached
    assert forecast_exhaustion(9_000, 10_000, None, now, end) is None
    assert forecast_exhaustion(9_000, 10_000, 10.0, now, None) is None  # total budget


# ── the evaluator, on a real memory store ────────────────────────────────────────────


def _settings(**kw: Any) -> AlertSettings:
    raw = {
        "channels": [
            {"type": "slack", "url": "http://127.0.0.1:9/slack"},
            {"type": "webhook", "url": "http://127.0.0.1:9/hook"},
        ],
        **kw,
    }
    settings = parse_alerts(raw)
    assert settings is not None
    return settings


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def _setup(
    settings: AlertSettings, budgets: list[dict[str, Any]]
) -> tuple[Store, BudgetGate, AlertEvaluator, Clock]:
    store = open_store("memory://")
    await store.open()
    gate = BudgetGate(store, parse_budgets(budgets))
    clock = Clock()
    return store, gate, AlertEvaluator(store, gate, settings, replica="r1", clock=clock), clock


async def _charge(store: Store, spec: BudgetSpec, nanos: int) -> None:
    key = budget_key(spec, period_window(spec))
    await store.settle(f"charge-{time.monotonic_ns()}", nanos, keys=[key])


async def _outbox(store: Store) -> dict[str, dict[str, Any]]:
    """Every due entry, by id (leased for a long time, so each is seen once)."""
    return {e.id: orjson.loads(e.payload) for e in await store.lease_alerts(100, 3_600)}


async def test_each_threshold_is_enqueued_once_per_channel() -> None:
    settings = _settings(forecast=False)
    store, gate, evaluator, _ = await _setup(
        settings, [{"name": "b", "scope": {}, "limit_usd": 10, "enforce": "soft"}]
    )
    spec = gate.specs[0]
    period = period_window(spec).period_id
    assert await evaluator.check() == []
    await _charge(store, spec, 5 * NANOS)
    assert await evaluator.check() == [f"b:{period}:t50"]
    assert await evaluator.check() == []  # already fired: no second alert
    await _charge(store, spec, 6 * NANOS)  # 110%: crosses 80 and 100 at once
    assert await evaluator.check() == [f"b:{period}:t80", f"b:{period}:t100"]
    entries = await _outbox(store)
    assert sorted(entries) == sorted(
        f"b:{period}:t{t}@{ch}" for t in (50, 80, 100) for ch in ("slack", "webhook")
    )
    alert = entries[f"b:{period}:t80@webhook"]["alert"]
    assert alert["kind"] == "threshold"
    assert alert["threshold_percent"] == "80"
    assert alert["spent_nanos"] == 11 * NANOS and alert["spent_usd"] == "11.00"
    assert alert["limit_nanos"] == 10 * NANOS and alert["percent"] == 110.0

    # A second replica (a fresh evaluator on the same store) finds everything done.
    other = AlertEvaluator(store, gate, settings, replica="r2")
    assert await other.check() == []
    await store.close()


async def test_per_budget_thresholds_override_the_defaults() -> None:
    settings = _settings(forecast=False, budgets={"b": {"thresholds": [90]}})
    assert settings.rule_for("b") == BudgetAlertRule((D(90),), False)
    assert settings.rule_for("other").thresholds == (D(50), D(80), D(100))
    store, gate, evaluator, _ = await _setup(
        settings, [{"name": "b", "scope": {}, "limit_usd": 10, "enforce": "soft"}]
    )
    await _charge(store, gate.specs[0], 85 * NANOS // 10)
    assert await evaluator.check() == []
    await _charge(store, gate.specs[0], 1 * NANOS)
    assert [k.rsplit(":", 1)[1] for k in await evaluator.check()] == ["t90"]
    await store.close()


async def test_forecast_fires_for_a_fast_burn_and_not_for_a_slow_one() -> None:
    settings = _settings(
        thresholds=[1000], forecast={"enabled": True, "window_s": 3600, "min_span_s": 600}
    )
    budgets = [
        {"name": "fast", "scope": {"team": "a"}, "limit_usd": 100, "enforce": "soft"},
        {"name": "slow", "scope": {"team": "b"}, "limit_usd": 100, "enforce": "soft"},
    ]
    store, gate, evaluator, clock = await _setup(settings, budgets)
    fast, slow = gate.specs
    assert await evaluator.check() == []  # first samples
    clock.now += 300
    await _charge(store, fast, 50 * NANOS)
    await _charge(store, slow, 1_000)
    assert await evaluator.check() == []  # samples span 300 s < min_span_s
    clock.now += 400
    await _charge(store, fast, 40 * NANOS)  # 90 USD in 700 s: 10 left, gone in ~78 s
    await _charge(store, slow, 1_000)  # 2 micro-USD in 700 s: decades to go
    fired = await evaluator.check()
    assert fired == [f"fast:{period_window(fast).period_id}:forecast"]
    clock.now += 60
    await _charge(store, slow, 1_000)
    assert await evaluator.check() == []  # fast fired once; slow never
    entry = (await _outbox(store))[f"{fired[0]}@webhook"]["alert"]
    assert entry["kind"] == "forecast" and entry["threshold_percent"] is None
    exhausted = datetime.fromisoformat(entry["forecast"]["exhausted_at"])
    assert exhausted < datetime.fromtimestamp(clock.now, UTC) + timedelta(minutes=5)
    await store.close()


async def test_a_reset_budget_starts_its_forecast_over() -> None:
    settings = _settings(thresholds=[1000], forecast={"window_s": 3600, "min_span_s": 600})
    store, gate, evaluator, clock = await _setup(
        settings, [{"name": "b", "scope": {}, "limit_usd": 100, "enforce": "soft"}]
    )
    spec = gate.specs[0]
    await _charge(store, spec, 80 * NANOS)
    await evaluator.check()
    await store.reset_budget(budget_key(spec, period_window(spec)))
    clock.now += 700
    await evaluator.check()  # spent went down: the old samples are dropped
    clock.now += 100
    await _charge(store, spec, 1 * NANOS)
    assert await evaluator.check() == []  # 100 s of samples is under min_span_s
    await store.close()


async def test_top_contributors_follow_the_budget_scope() -> None:
    from proxy.ledger import LedgerRecord

    settings = _settings(forecast=False, top_contributors=2)
    store, gate, evaluator, _ = await _setup(
        settings, [{"name": "b", "scope": {"team": "search"}, "limit_usd": 1}]
    )
    now_ms = int(time.time() * 1000)

    def rec(i: int, key: str, team: str, cost: int) -> LedgerRecord:
        return LedgerRecord(
            id=f"r{i}", ts_ms=now_ms, key_name=key, team=team, user=None, end_user=None,
            tags=(), upstream="openai", endpoint="chat/completions", model="gpt-4o-mini",
            stream=False, status=200, input_tokens=1, cached_input_tokens=0,
            cache_write_tokens=0, output_tokens=1, reasoning_tokens=0, cost_nanos=cost,
            exact=True, latency_ms=1.0,
        )  # fmt: skip

    await store.append_ledger(
        [
            rec(1, "app-a", "search", 300),
            rec(2, "app-a", "search", 300),
            rec(3, "app-b", "search", 500),
            rec(4, "app-c", "search", 100),
            rec(5, "app-x", "support", 10_000),  # outside the scope
        ]
    )
    await _charge(store, gate.specs[0], NANOS // 2)
    [key] = await evaluator.check()
    alert = (await _outbox(store))[f"{key}@slack"]["alert"]
    assert [(c["key"], c["cost_nanos"], c["requests"]) for c in alert["top_contributors"]] == [
        ("app-a", 600, 2),
        ("app-b", 500, 1),
    ]
    assert alert["top_contributors"][0]["team"] == "search"
    assert alert["top_contributors"][0]["user"] is None
    await store.close()


# ── messages, signatures, backoff ────────────────────────────────────────────────────


def _sample_alert() -> dict[str, Any]:
    from proxy.budget import BudgetStatus
    from proxy.store.base import BudgetState

    spec = parse_budgets([{"name": "search-monthly", "scope": {}, "limit_usd": 100}])[0]
    window = period_window(spec, datetime(2026, 11, 22, tzinfo=UTC))
    status = BudgetStatus(spec, window, budget_key(spec, window), BudgetState(82 * NANOS, 0))
    contributors = [
        {"key": "app-<a>", "team": "search", "user": "alice", "cost_usd": "50.00",
         "cost_nanos": 50 * NANOS, "requests": 120},
    ]  # fmt: skip
    doc = alert_document(
        status, "threshold", threshold=D(80), forecast=None, contributors=contributors,
        replica="host:1", now=1_795_000_000.0,
    )  # fmt: skip
    return doc


def test_slack_message_is_readable() -> None:
    message = slack_message(_sample_alert())
    text = message["text"]
    for part in ("search-monthly", "80%", "$82.00", "$100.00", "82.0%", "2026-12-01T00:00:00"):
        assert part in text, part
    assert "app-&lt;a&gt;" in text and "$50.00" in text and "120 requests" in text
    assert message["blocks"] and all("type" in block for block in message["blocks"])


def test_webhook_body_is_signed_and_verifiable() -> None:
    settings = _settings()
    hook = settings.channel("webhook")
    assert hook is not None
    from dataclasses import replace

    hook = replace(hook, secret="s" * 32)
    entry = AlertEntry("b:2026-11:t80@webhook", "{}", 3, 0)
    body, headers = render(hook, entry, _sample_alert(), 1_795_000_123.0)
    doc = orjson.loads(body)
    assert doc["id"] == entry.id == headers["X-Metergate-Alert-Id"]
    assert doc["attempt"] == 3 and doc["schema"] == "metergate.budget_alert.v1"
    assert doc["spent_usd"] == "82.00" and doc["spent_nanos"] == 82 * NANOS
    header = headers["X-Metergate-Signature"]
    # Verify the way a receiver would, without our helper.
    t, v1 = (part.split("=", 1)[1] for part in header.split(","))
    expected = hmac.new(b"s" * 32, t.encode() + b"." + body, hashlib.sha256).hexdigest()
    assert t == "1795000123" and hmac.compare_digest(v1, expected)
    assert verify_signature("s" * 32, body, header, now=1_795_000_200)
    assert not verify_signature("s" * 32, body + b" ", header, now=1_795_000_200)
    assert not verify_signature("x" * 32, body, header, now=1_795_000_200)
    assert not verify_signature("s" * 32, body, header, now=1_795_009_999)  # stale
    assert sign("k", b"{}", 5).startswith("t=5,v1=")


def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    assert backoff_s(1, 1.0, 300.0, lambda: 1.0) == 1.0
    assert backoff_s(1, 1.0, 300.0, lambda: 0.0) == 0.5
    assert backoff_s(4, 1.0, 300.0, lambda: 1.0) == 8.0
    assert backoff_s(40, 1.0, 300.0, lambda: 1.0) == 300.0
    assert backoff_s(10_000, 1.0, 300.0, lambda: 0.0) == 150.0


# ── configuration ────────────────────────────────────────────────────────────────────


def _config(alerts: Any) -> dict[str, Any]:
    return {"upstreams": {"openai": {"url": "https://api.openai.com"}}, "alerts": alerts}


def test_alerts_config_defaults_and_env_secrets() -> None:
    raw = _config(
        {
            "channels": [
                {"type": "slack", "url": "${SLACK_URL}"},
                {"type": "webhook", "name": "fin", "url": "https://h.example/x", "secret": "${S}"},
            ]
        }
    )
    settings = parse_settings(
        raw, {"SLACK_URL": "https://hooks.slack.com/services/T/B/SECRET", "S": "k" * 20}
    )
    alerts = settings.alerts
    assert alerts is not None
    assert alerts.thresholds == (D(50), D(80), D(100))
    assert alerts.forecast is True and alerts.check_interval_s == 5.0
    assert [c.name for c in alerts.channels] == ["slack", "fin"]
    assert alerts.channels[1].secret == "k" * 20
    # Secrets (and a Slack URL is one) never show in a repr or a log line of settings.
    assert "SECRET" not in repr(settings) and "k" * 20 not in repr(settings)
    assert parse_settings(_config(None), {}).alerts is None


SLACK = [{"type": "slack", "url": "https://a"}]


@pytest.mark.parametrize(
    ("alerts", "field"),
    [
        ({"channels": []}, "alerts.channels"),
        ({"channels": [{"type": "email", "url": "https://x"}]}, "alerts.channels[0].type"),
        ({"channels": [{"type": "slack", "url": "ftp://x"}]}, "alerts.channels[0].url"),
        (
            {
                "channels": [
                    {"type": "slack", "url": "https://a"},
                    {"type": "slack", "url": "https://b"},
                ]
            },
            "alerts.channels[1].name",
        ),
        (
            {"channels": [{"type": "webhook", "url": "https://a", "secret": "short"}]},
            "alerts.channels[0].secret",
        ),
        ({"channels": SLACK, "thresholds": [0]}, "alerts.thresholds[0]"),
        ({"channels": SLACK, "thresholds": ["x"]}, "alerts.thresholds[0]"),
        ({"channels": SLACK, "colour": 1}, "alerts.colour"),
        (
            {"channels": SLACK, "budgets": {"b": {"thresholds": []}}},
            "alerts.budgets.b.thresholds",
        ),
        (
            {"channels": SLACK, "delivery": {"timeout_s": 30, "lease_s": 20}},
            "alerts.delivery.lease_s",
        ),
        (
            {"channels": SLACK, "forecast": {"window_s": 60, "min_span_s": 120}},
            "alerts.forecast.min_span_s",
        ),
    ],
)
def test_alerts_config_errors_name_the_field(alerts: Any, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(_config(alerts), {})
    assert str(info.value).startswith(field + ":"), str(info.value)


def test_a_bad_url_is_never_echoed() -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(_config({"channels": [{"type": "slack", "url": "hooks/T0/SECRET"}]}), {})
    assert "SECRET" not in str(info.value)
