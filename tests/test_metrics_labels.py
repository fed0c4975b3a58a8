"""Opt-in ``key`` / ``user`` metric labels (issue 4): absent unless configured, capped
at ``max_label_values`` distinct values per process, the rest counted as ``other``."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from proxy.metrics import Metrics
from proxy.usage import Usage
from tests.conftest import KEY_A, KEY_B, ProxyFactory
from tests.fake_upstream import FakeUpstream


def _observe(metrics: Metrics, key: str | None, user: str | None) -> None:
    metrics.observe_request(
        upstream="openai",
        model="gpt-4o",
        team="search",
        outcome="2xx",
        usage=Usage(input=10, output=5),
        cost_nanos=1_000,
        key=key,
        user=user,
    )


def _label_names(registry: CollectorRegistry, family: str) -> set[str]:
    for fam in registry.collect():
        if fam.name == family:
            return {k for s in fam.samples for k in s.labels if k != "le"}
    raise AssertionError(f"{family} not registered")


def test_no_key_or_user_label_unless_configured() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, known_models=["gpt-4o"])
    _observe(metrics, "app-a", "alice")
    for family in ("metergate_requests", "metergate_tokens", "metergate_cost_usd"):
        assert not {"key", "user"} & _label_names(registry, family), family


def test_opted_in_labels_are_capped_first_come_first_served() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, known_models=["gpt-4o"], labels=["user", "key"], max_label_values=2)
    for key, user in [("k1", "u1"), ("k2", None), ("k3", "u3"), ("k1", "u4"), ("k4", "u1")]:
        _observe(metrics, key, user)
    assert metrics.extra_labels == ("key", "user")  # canonical order, whatever the config's
    for family in ("metergate_requests", "metergate_tokens", "metergate_cost_usd"):
        assert {"key", "user"} <= _label_names(registry, family), family
    # estimated requests and the histograms keep their own, smaller label sets
    assert not {"key", "user"} & _label_names(registry, "metergate_estimated_requests")

    def requests(key: str, user: str) -> float:
        labels = {"upstream": "openai", "model": "gpt-4o", "team": "search"}
        value = registry.get_sample_value(
            "metergate_requests_total", {**labels, "key": key, "user": user, "status": "2xx"}
        )
        return value or 0.0

    # keys: k1, k2 admitted, k3 and k4 are "other"; users: u1 and "none" (no user) are
    # the first two, u3 and u4 are "other".
    assert requests("k1", "u1") == 1
    assert requests("k2", "none") == 1
    assert requests("other", "other") == 1  # k3/u3
    assert requests("k1", "other") == 1  # k1/u4
    assert requests("other", "u1") == 1  # k4/u1
    total = sum(
        s.value
        for fam in registry.collect()
        if fam.name == "metergate_requests"
        for s in fam.samples
        if s.name == "metergate_requests_total"
    )
    assert total == 5
    assert registry.get_sample_value(
        "metergate_tokens_total",
        {
            "upstream": "openai",
            "model": "gpt-4o",
            "team": "search",
            "key": "other",
            "user": "u1",
            "kind": "input",
        },
    ) == pytest.approx(10)


def test_an_unknown_optional_label_is_refused() -> None:
    with pytest.raises(ValueError, match="team"):
        Metrics(CollectorRegistry(), labels=["team"])


async def test_key_label_through_the_proxy(make_proxy: ProxyFactory, fake: FakeUpstream) -> None:
    proxy = await make_proxy({"metrics": {"labels": ["key"], "max_label_values": 1}})
    for key in (KEY_A, KEY_B, KEY_A):
        async with proxy.openai(key) as client:
            await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
            )
    base = {"upstream": "openai", "model": "gpt-4o-mini", "status": "2xx"}
    assert proxy.metric("metergate_requests_total", {**base, "team": "search", "key": "app-a"}) == 2
    # app-b came second with a cap of 1: counted, under "other"
    assert (
        proxy.metric("metergate_requests_total", {**base, "team": "support", "key": "other"}) == 1
    )
    labels = {"upstream": "openai", "model": "gpt-4o-mini", "team": "search", "key": "app-a"}
    assert proxy.metric("metergate_cost_usd_total", labels) > 0
