"""Reconciliation under load: every request the upstream served is in the ledger once,
with its exact tokens, and the money adds up to the nano-dollar everywhere.

1,200 mixed requests (every metered endpoint, streamed and not, both SDKs, some sync
clients in threads, three keys and their teams, tags, cached / reasoning / cache-write
knobs) run 50 at a time through one proxy. Then, independently of the pipeline:

- each fake record has exactly one ledger record, with equal token counts, exact;
- the ledger's cost total equals the sum of ``cost_nanos(catalog price, reported
  usage)`` computed from the fake's records;
- ``store.report(["team"])`` totals the same, and so do its per-team rows;
- the ``metergate_cost_usd_total`` counter sums to the same in dollars (float), and
  the token counters to the same integers.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, defaultdict
from typing import Any

import pytest

from proxy.metrics import NANOS_PER_USD
from tests.conftest import KEY_A, KEY_B, ProxyFactory, RunningProxy
from tests.e2e_support import (
    assert_tokens_equal,
    expected_cost,
    ledger_by_upstream_id,
    metric_sum,
)
from tests.fake_upstream import FakeUpstream

N_REQUESTS = 1200
CONCURRENCY = 50
KEY_C = "mg-test-app-c-0123456789"
KEYS = [
    {"key": KEY_A, "name": "app-a", "team": "search", "user": "alice"},
    {"key": KEY_B, "name": "app-b", "team": "support", "user": "bob", "tags": ["batch"]},
    {"key": KEY_C, "name": "app-c", "team": "research", "user": "carol"},
]
TEAM_OF = {KEY_A: "search", KEY_B: "support", KEY_C: "research"}
TAG_SETS = ["", "exp:a", "exp:b,proj-x", "proj-x"]
OPENAI_MODELS = {
    "chat": ["gpt-4o-mini", "gpt-4.1-nano", "o4-mini", "gpt-5-mini"],
    "responses": ["o4-mini", "gpt-5-nano", "gpt-4o"],
    "completions": ["gpt-3.5-turbo-instruct", "davinci-002"],
    "embeddings": ["text-embedding-3-small", "text-embedding-3-large"],
}
ANTHROPIC_MODELS = ["claude-haiku-4-5", "claude-sonnet-4-6", "claude-opus-4-1"]


def _plan(rng: random.Random, i: int) -> dict[str, Any]:
    """One request's shape, drawn deterministically."""
    endpoint = rng.choice(["chat", "chat", "responses", "completions", "embeddings", "messages"])
    knobs: dict[str, str] = {"X-Fake-Chunks": str(rng.randint(1, 6))}
    if rng.random() < 0.5:
        knobs["X-Fake-Output"] = str(rng.randint(0, 40))
    if endpoint in ("chat", "responses", "messages") and rng.random() < 0.4:
        knobs["X-Fake-Cached"] = str(rng.randint(1, 500))
    if endpoint in ("chat", "responses", "messages") and rng.random() < 0.3:
        knobs["X-Fake-Reasoning"] = str(rng.randint(1, 300))
    if endpoint == "messages" and rng.random() < 0.4:
        knobs["X-Fake-Cache-Write"] = str(rng.randint(1, 400))
    if endpoint == "messages" and rng.random() < 0.3:
        knobs["X-Fake-Cache-Write-1h"] = str(rng.randint(1, 400))
    if rng.random() < 0.2:
        knobs["X-Fake-Split"] = "1"
    tags = rng.choice(TAG_SETS)
    if tags:
        knobs["X-Metergate-Tags"] = tags
    return {
        "endpoint": endpoint,
        "stream": endpoint != "embeddings" and rng.random() < 0.5,
        "include_usage": rng.random() < 0.5,
        "key": rng.choice([KEY_A, KEY_B, KEY_C]),
        "model": rng.choice(
            ANTHROPIC_MODELS if endpoint == "messages" else OPENAI_MODELS[endpoint]
        ),
        "sync": rng.random() < 0.1,
        "prompt": f"Request {i}: " + "lorem ipsum " * rng.randint(0, 60),
        "knobs": knobs,
    }


def _call_args(plan: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(SDK method path, keyword arguments) for a plan."""
    ep, model, prompt = plan["endpoint"], plan["model"], plan["prompt"]
    kw: dict[str, Any] = {"model": model, "extra_headers": plan["knobs"]}
    if plan["stream"]:
        kw["stream"] = True
    if ep == "chat":
        kw["messages"] = [{"role": "user", "content": prompt}]
        if plan["stream"] and plan["include_usage"]:
            kw["stream_options"] = {"include_usage": True}
        return "chat.completions.create", kw
    if ep == "responses":
        kw["input"] = prompt
        return "responses.create", kw
    if ep == "completions":
        kw["prompt"] = prompt
        kw["max_tokens"] = 64
        if plan["stream"] and plan["include_usage"]:
            kw["stream_options"] = {"include_usage": True}
        return "completions.create", kw
    if ep == "embeddings":
        kw["input"] = [prompt, prompt[::-1]]
        return "embeddings.create", kw
    kw["messages"] = [{"role": "user", "content": prompt}]
    kw["max_tokens"] = 2048
    kw["metadata"] = {"user_id": f"end-user-{len(prompt) % 7}"}
    return "messages.create", kw


def _method(client: Any, path: str) -> Any:
    for part in path.split("."):
        client = getattr(client, part)
    return client


def _consume_sync(result: Any, stream: bool) -> None:
    if stream:
        with result:
            for _ in result:
                pass


async def _consume_async(result: Any, stream: bool) -> None:
    if stream:
        async for _ in result:
            pass


async def test_thousand_mixed_requests_reconcile_to_the_nano_dollar(
    make_proxy: ProxyFactory, fake: FakeUpstream
) -> None:
    proxy: RunningProxy = await make_proxy({"keys": KEYS})
    rng = random.Random(20261122)
    plans = [_plan(rng, i) for i in range(N_REQUESTS)]
    async_clients = {
        (key, provider): proxy.openai(key) if provider == "openai" else proxy.anthropic(key)
        for key in TEAM_OF
        for provider in ("openai", "anthropic")
    }
    sync_clients = {
        (key, provider): proxy.openai_sync(key)
        if provider == "openai"
        else proxy.anthropic_sync(key)
        for key in TEAM_OF
        for provider in ("openai", "anthropic")
    }
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(plan: dict[str, Any]) -> None:
        provider = "anthropic" if plan["endpoint"] == "messages" else "openai"
        path, kw = _call_args(plan)
        async with gate:
            if plan["sync"]:
                client = sync_clients[(plan["key"], provider)]

                def run() -> None:
                    _consume_sync(_method(client, path)(**kw), plan["stream"])

                await asyncio.to_thread(run)
            else:
                client = async_clients[(plan["key"], provider)]
                await _consume_async(await _method(client, path)(**kw), plan["stream"])

    started = time.perf_counter()
    await asyncio.gather(*(one(p) for p in plans))
    elapsed = time.perf_counter() - started
    for c in async_clients.values():
        await c.close()
    for s in sync_clients.values():
        s.close()
    assert elapsed < 60, f"{N_REQUESTS} requests took {elapsed:.1f} s"

    # Every request the fake served, and nothing else, is in the ledger exactly once.
    records = list(fake.records)
    assert len(records) == N_REQUESTS
    assert all(r["completed"] and r["status"] == 200 for r in records)
    ledger = await proxy.store.ledger_records()
    assert len(ledger) == N_REQUESTS
    by_id = await ledger_by_upstream_id(proxy)
    assert len(by_id) == N_REQUESTS
    expected_total = 0
    expected_by_team: dict[str, int] = defaultdict(int)
    kinds: Counter[str] = Counter()
    for record in records:
        found = by_id.get(record["request_id"], [])
        assert len(found) == 1, f"{len(found)} ledger records for {record['request_id']}"
        led = found[0]
        assert_tokens_equal(led, record)
        assert led.exact and led.error is None and led.status == 200
        cost = expected_cost(proxy, record)
        assert led.cost_nanos == cost
        expected_total += cost
        assert led.team is not None
        expected_by_team[led.team] += cost
        kinds.update(
            {
                "input": led.input_tokens,
                "cached_input": led.cached_input_tokens,
                "cache_write": led.cache_write_tokens,
                "output": led.output_tokens,
                "reasoning": led.reasoning_tokens,
            }
        )
    # The mix did exercise what it was meant to.
    assert {r.endpoint for r in ledger} == {
        "chat",
        "responses",
        "completions",
        "embeddings",
        "messages",
    }
    assert {r.stream for r in ledger} == {True, False}
    assert set(expected_by_team) == {"search", "support", "research"}
    assert all(kinds[k] > 0 for k in ("cached_input", "cache_write", "reasoning"))

    # Money: ledger, report and metrics agree with the independent computation.
    assert sum(r.cost_nanos for r in ledger) == expected_total
    rows = await proxy.store.report(["team"])
    assert sum(row.cost_nanos for row in rows) == expected_total
    assert {row.group[0]: row.cost_nanos for row in rows} == dict(expected_by_team)
    assert sum(row.requests for row in rows) == N_REQUESTS
    assert sum(row.estimated for row in rows) == 0
    cost_usd = metric_sum(proxy, "metergate_cost_usd_total")
    assert cost_usd == pytest.approx(expected_total / NANOS_PER_USD, rel=1e-9, abs=1e-9)
    for kind, total in kinds.items():
        assert metric_sum(proxy, "metergate_tokens_total", kind=kind) == total, kind
    assert metric_sum(proxy, "metergate_requests_total", status="2xx") == N_REQUESTS
    assert metric_sum(proxy, "metergate_estimated_requests_total") == 0
