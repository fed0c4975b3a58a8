"""Budgets end to end, through the real SDKs and in-process proxies (``make_proxy``):
refusal shapes, soft budgets, rate limits, scopes, periods, run-time changes across
replicas, and how every way a request can end settles its reservation.

Budgets here have period ``total`` unless the test is about periods, so their store key
is ``<name>:total`` whatever the date.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import anthropic
import openai
import pytest

from proxy.budget import worst_case_nanos
from proxy.pricing import Catalog
from proxy.store import BudgetState
from tests.conftest import KEY_A, KEY_B, ProxyFactory, RunningProxy
from tests.fake_upstream import FakeUpstream
from tests.redis_servers import (  # the fixtures are used by name
    RedisServer,
    free_port,
    redis_server,  # noqa: F401
)
from tests.test_budget_replicas import namespace

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello budgets"}]}
CLAUDE = {
    "model": "claude-haiku-4-5",
    "max_tokens": 50,
    "messages": [{"role": "user", "content": "hello budgets"}],
}
TINY = "0.000001"  # 1,000 nano-USD: less than any request's worst case
ADMIN = "admin-token-0123456789"


def budget(name: str, scope: dict[str, str], limit: str = "1000", **kw: Any) -> dict[str, Any]:
    return {"name": name, "scope": scope, "limit_usd": limit, "period": "total", **kw}


async def state(proxy: RunningProxy, name: str) -> BudgetState:
    return await proxy.store.budget_state(f"{name}:total")


async def cost_of(proxy: RunningProxy, request_id: str) -> int:
    record = await proxy.store.get_ledger_record(request_id)
    assert record is not None, request_id
    return record.cost_nanos


# ───────────────────────────────── refusals: 402 and 429 ─────────────────────────────────


async def test_402_has_each_providers_shape_and_never_reaches_the_upstream(
    make_proxy: ProxyFactory, fake: FakeUpstream
) -> None:
    proxy = await make_proxy({"budgets": [budget("tight", {"team": "search"}, TINY)]})
    oa, an = proxy.openai(KEY_A), proxy.anthropic(KEY_A)
    try:
        with pytest.raises(openai.APIStatusError) as oerr:
            await oa.chat.completions.create(**CHAT, max_tokens=10)
        with pytest.raises(anthropic.APIStatusError) as aerr:
            await an.messages.create(**CLAUDE)
        # Another team's requests are not this budget's business.
        ok = await proxy.openai(KEY_B).chat.completions.create(**CHAT, max_tokens=10)
        assert ok.usage is not None
    finally:
        await oa.close()
        await an.close()

    o = oerr.value
    assert o.status_code == 402
    body = o.response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == "budget_exceeded" == o.code
    assert body["error"]["type"] == "insufficient_quota"
    assert "'tight'" in body["error"]["message"] and "does not reset" in body["error"]["message"]
    assert o.response.headers["X-Metergate-Budget"] == "tight"
    assert o.response.headers["X-Metergate-Budget-Reset"] == "never"

    a = aerr.value
    assert a.status_code == 402
    raw = a.response.json()
    assert raw["type"] == "error" and raw["error"]["type"] == "billing_error"
    assert "'tight'" in raw["error"]["message"]
    assert a.response.headers["X-Metergate-Budget"] == "tight"
    assert a.response.headers["X-Metergate-Budget-Reset"] == "never"

    # Only B's request reached the fake; the refusals are on record at zero cost.
    assert [r["provider"] for r in fake.records] == ["openai"]
    refused = [r for r in await proxy.store.ledger_records() if r.status == 402]
    assert len(refused) == 2
    assert all(r.error == "budget_exceeded" and r.cost_nanos == 0 for r in refused)
    assert await state(proxy, "tight") == BudgetState(0, 0)


async def test_a_day_budget_in_berlin_resets_at_berlin_midnight(
    make_proxy: ProxyFactory, fake: FakeUpstream
) -> None:
    berlin = ZoneInfo("Europe/Berlin")
    day = {"name": "daily", "scope": {}, "limit_usd": TINY, "period": "day"}
    proxy = await make_proxy({"budgets": [{**day, "timezone": "Europe/Berlin"}]})
    client = proxy.openai()
    before = datetime.now(berlin).date()
    try:
        with pytest.raises(openai.APIStatusError) as err:
            await client.chat.completions.create(**CHAT, max_tokens=10)
    finally:
        await client.close()
    after = datetime.now(berlin).date()
    # The next local midnight, with Berlin's offset on that day (+01:00 or +02:00).
    expected = {
        datetime(d.year, d.month, d.day, tzinfo=berlin).isoformat()
        for d in (before + timedelta(days=1), after + timedelta(days=1))
    }
    reset = err.value.response.headers["X-Metergate-Budget-Reset"]
    assert reset in expected, (reset, expected)
    assert reset.endswith(("+01:00", "+02:00"))
    assert f"It resets at {reset}." in err.value.response.json()["error"]["message"]
    reset_at = datetime.fromisoformat(reset)
    assert timedelta(0) < reset_at - datetime.now(UTC) <= timedelta(hours=25)
    assert not fake.records


async def test_requests_per_minute_answer_429_with_retry_after(
    make_proxy: ProxyFactory, fake: FakeUpstream
) -> None:
    rpm = {"name": "alice-rpm", "scope": {"user": "alice"}, "requests_per_minute": 2}
    proxy = await make_proxy({"budgets": [rpm]})
    oa, an = proxy.openai(KEY_A), proxy.anthropic(KEY_A)
    try:
        await oa.chat.completions.create(**CHAT, max_tokens=5)
        await an.messages.create(**CLAUDE)
        with pytest.raises(openai.RateLimitError) as oerr:
            await oa.chat.completions.create(**CHAT, max_tokens=5)
        with pytest.raises(anthropic.RateLimitError) as aerr:
            await an.messages.create(**CLAUDE)
        # bob is not alice: his requests are not limited.
        await proxy.openai(KEY_B).chat.completions.create(**CHAT, max_tokens=5)
    finally:
        await oa.close()
        await an.close()
    o, a = oerr.value, aerr.value
    assert o.status_code == 429 and o.code == "rate_limit_exceeded"
    assert "'alice-rpm'" in o.message
    # A bucket of 2 per minute refills one request every 30 s.
    assert 1 <= int(o.response.headers["Retry-After"]) <= 30
    assert a.response.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(a.response.headers["Retry-After"]) <= 30
    assert len(fake.records) == 3  # the two refusals reached no upstream


async def test_tokens_per_minute_hold_the_bound_and_settle_to_the_count(
    make_proxy: ProxyFactory, fake: FakeUpstream
) -> None:
    tpm = {"name": "tpm", "scope": {}, "tokens_per_minute": 600}
    proxy = await make_proxy({"budgets": [tpm]})
    client = proxy.openai()
    try:
        # Each request holds (body bytes + max_tokens) ~ 400 tokens and uses ~ 60: three
        # in a row pass only because each settle gives back what it did not use.
        for _ in range(3):
            await client.chat.completions.create(**CHAT, max_tokens=300)
        # One that can never fit the bucket: a 429 without Retry-After.
        with pytest.raises(openai.RateLimitError) as never:
            await client.chat.completions.create(**CHAT, max_tokens=1000)
        assert "Retry-After" not in never.value.response.headers
        assert "can never be admitted" in never.value.response.json()["error"]["message"]
        # Now really use up the tokens: the bucket is empty and says when to retry.
        await client.chat.completions.create(
            **CHAT, max_tokens=300, extra_headers={"X-Fake-Output": "300", "X-Fake-Input": "200"}
        )
        with pytest.raises(openai.RateLimitError) as later:
            await client.chat.completions.create(**CHAT, max_tokens=300)
        assert int(later.value.response.headers["Retry-After"]) >= 1
    finally:
        await client.close()
    assert len(fake.records) == 4


# ─────────────────────────────────────── soft budgets ───────────────────────────────────────


async def test_a_soft_budget_lets_requests_past_its_limit_and_logs_it(
    make_proxy: ProxyFactory, fake: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = await make_proxy({"budgets": [budget("soft", {}, TINY, enforce="soft")]})
    client = proxy.openai()
    caplog.set_level(logging.WARNING, logger="metergate")
    try:
        first = await client.chat.completions.with_raw_response.create(**CHAT, max_tokens=10)
        second = await client.chat.completions.with_raw_response.create(**CHAT, max_tokens=10)
    finally:
        await client.close()
    ids = [first.headers["X-Metergate-Request-Id"], second.headers["X-Metergate-Request-Id"]]
    spent = sum([await cost_of(proxy, i) for i in ids])
    assert await state(proxy, "soft") == BudgetState(spent, 0)
    assert spent > 1_000  # past the limit of 1,000 nano-USD
    warned = [r.getMessage() for r in caplog.records if "soft budget" in r.getMessage()]
    assert len(warned) == 2 and all("'soft'" in m for m in warned)
    assert all(i in " ".join(warned) for i in ids)


# ─────────────────────────────────────────── scopes ─────────────────────────────────────────


async def test_each_request_charges_every_budget_whose_scope_matches(
    make_proxy: ProxyFactory, fake: FakeUpstream
) -> None:
    budgets = [
        budget("by-key", {"key": "app-a"}),
        budget("by-user", {"user": "bob"}),
        budget("by-team", {"team": "search"}),
        budget("by-tag", {"tag": "experiment"}),
        budget("by-model", {"model": "gpt-4o-mini"}),
        budget("everything", {}),
        budget("support-claude", {"team": "support", "model": "claude-haiku-4-5"}),
        budget("nobody", {"user": "carol"}),
    ]
    proxy = await make_proxy({"budgets": budgets})
    a, b, b_claude = proxy.openai(KEY_A), proxy.openai(KEY_B), proxy.anthropic(KEY_B)
    ids: dict[str, str] = {}
    try:
        raw = await a.chat.completions.with_raw_response.create(
            **CHAT, max_tokens=10, extra_headers={"X-Metergate-Tags": "experiment"}
        )
        ids["a-mini-tagged"] = raw.headers["X-Metergate-Request-Id"]
        # The dated snapshot matches {model: gpt-4o-mini} through the catalog.
        snap = {**CHAT, "model": "gpt-4o-mini-2024-07-18"}
        raw = await a.chat.completions.with_raw_response.create(**snap, max_tokens=10)
        ids["a-snapshot"] = raw.headers["X-Metergate-Request-Id"]
        raw = await b.chat.completions.with_raw_response.create(
            **{**CHAT, "model": "gpt-4o"}, max_tokens=10
        )
        ids["b-4o"] = raw.headers["X-Metergate-Request-Id"]
        raw_msg = await b_claude.messages.with_raw_response.create(**CLAUDE)
        ids["b-claude"] = raw_msg.headers["X-Metergate-Request-Id"]
    finally:
        for client in (a, b, b_claude):
            await client.close()
    cost = {name: await cost_of(proxy, rid) for name, rid in ids.items()}
    assert all(cost.values())
    expected = {
        "by-key": ["a-mini-tagged", "a-snapshot"],
        "by-user": ["b-4o", "b-claude"],
        "by-team": ["a-mini-tagged", "a-snapshot"],
        "by-tag": ["a-mini-tagged"],
        "by-model": ["a-mini-tagged", "a-snapshot"],
        "everything": list(ids),
        "support-claude": ["b-claude"],
        "nobody": [],
    }
    got = {name: await state(proxy, name) for name in expected}
    want = {name: BudgetState(sum(cost[r] for r in reqs), 0) for name, reqs in expected.items()}
    assert got == want


# ──────────────────────────────── run-time changes, replicas ────────────────────────────────


async def test_an_admin_change_reaches_a_second_replica_within_a_second(
    make_proxy: ProxyFactory, fake: FakeUpstream, redis_server: RedisServer
) -> None:
    store = f"{redis_server.url}/0?namespace={namespace()}"
    config = {"budgets": [budget("team-cap", {"team": "search"})], "admin_token": ADMIN}
    first = await make_proxy(config, store=store)
    second = await make_proxy(config, store=store)
    client = second.openai()
    auth = {"Authorization": f"Bearer {ADMIN}"}

    async def refused() -> bool:
        try:
            await client.chat.completions.create(**CHAT, max_tokens=5)
        except openai.APIStatusError as exc:
            assert exc.status_code == 402 and exc.code == "budget_exceeded"
            return True
        return False

    async def put(limit: str) -> None:
        async with aiohttp.ClientSession() as s:
            async with s.put(
                f"{first.url}/admin/budgets/team-cap", json={"limit_usd": limit}, headers=auth
            ) as r:
                assert r.status == 200, await r.text()
                assert Decimal((await r.json())["limit_usd"]) == Decimal(limit)

    async def seconds_until(want_refused: bool) -> float:
        t0 = time.monotonic()
        while await refused() != want_refused:
            assert time.monotonic() - t0 < 3, "the change never reached the second replica"
            await asyncio.sleep(0.02)
        return time.monotonic() - t0

    try:
        assert not await refused()
        await put(TINY)
        lowered = await seconds_until(True)
        await put("1000")
        raised = await seconds_until(False)
    finally:
        await client.close()
    print(f"\nthe second replica applied the change after {lowered:.2f} s and {raised:.2f} s")
    assert lowered < 1.0 and raised < 1.0


# ───────────────────────────── every ending settles its reservation ─────────────────────────────


async def test_a_client_that_disconnects_mid_stream_is_settled(
    make_proxy: ProxyFactory, fake: FakeUpstream
) -> None:
    proxy = await make_proxy({"budgets": [budget("all", {})]})
    client = proxy.openai()
    knobs = {"X-Fake-Chunks": "40", "X-Fake-Chunk-Delay-Ms": "50", "X-Fake-Output": "200"}
    try:
        stream = await client.chat.completions.create(
            **CHAT, max_tokens=300, stream=True, extra_headers=knobs
        )
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 5:
                break
        await stream.close()  # the client goes away mid-stream
    finally:
        await client.close()

    async def settled() -> bool:
        return (await state(proxy, "all")).reserved_nanos == 0 and bool(
            await proxy.store.ledger_records()
        )

    deadline = time.monotonic() + 5
    while not await settled():
        assert time.monotonic() < deadline, await state(proxy, "all")
        await asyncio.sleep(0.05)
    [record] = await proxy.store.ledger_records()
    assert record.error == "client_disconnect" and not record.exact
    # The hold was the worst case of the body the upstream got (include_usage added).
    price = Catalog.load(None).resolve("gpt-4o-mini")
    assert price is not None
    await fake.wait_idle()
    hold = worst_case_nanos(price, len(fake.requests[-1].body), 300)
    spent = (await state(proxy, "all")).spent_nanos
    assert spent >= record.cost_nanos > 0
    assert spent == max(hold, record.cost_nanos)  # estimated usage keeps at least the hold


@pytest.mark.parametrize("fault", ["status:400", "status:429", "status:500"])
async def test_an_upstream_error_refunds_the_hold(
    fault: str, make_proxy: ProxyFactory, fake: FakeUpstream
) -> None:
    proxy = await make_proxy({"budgets": [budget("all", {})]})
    client = proxy.openai()
    try:
        with pytest.raises(openai.APIStatusError) as err:
            await client.chat.completions.create(
                **CHAT, max_tokens=10, extra_headers={"X-Fake-Fault": fault}
            )
    finally:
        await client.close()
    assert err.value.status_code == int(fault.split(":")[1])
    assert await state(proxy, "all") == BudgetState(0, 0)
    [record] = await proxy.store.ledger_records()
    assert record.cost_nanos == 0


async def test_an_unreachable_upstream_releases_the_hold(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(
        {"budgets": [budget("all", {})]}, upstream_url=f"http://127.0.0.1:{free_port()}"
    )
    client = proxy.openai()
    try:
        with pytest.raises(openai.APIStatusError) as err:
            await client.chat.completions.create(**CHAT, max_tokens=10)
    finally:
        await client.close()
    assert err.value.status_code == 502 and err.value.code == "upstream_unavailable"
    assert await state(proxy, "all") == BudgetState(0, 0)
