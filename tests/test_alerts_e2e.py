"""Budget alerts end to end: real proxies, real Redis, the openai SDK, a real receiver.

- Two proxies on one Redis, traffic crossing 50, 80 and 100% of a budget: the Slack and
  webhook receivers get each threshold's alert exactly once, signed, readable.
- A receiver that is down (connection refused, then 503s) still gets the alert after
  retries, while requests through the proxy keep succeeding.
- A fast burn raises a forecast alert; a slow one does not.

No timing assertions: waits are bounded polls (``wait_for``), and "no duplicate" is
checked after several more check intervals have passed.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from aiohttp import web

from proxy.budget import budget_key, period_window
from tests.conftest import KEY_A, KEY_B, ProxyFactory, RunningProxy
from tests.e2e_support import metric_sum, wait_for
from tests.redis_servers import RedisServer, free_port, redis_server  # noqa: F401
from tests.test_store_contract import fresh_namespace

SECRET = "whsec-test-0123456789abcdef"
CHECK_S = 0.05
BUDGET = "search-monthly"


@dataclass
class Receiver:
    """A local aiohttp app standing in for Slack and a webhook endpoint. It refuses
    (503) the first ``fail_first`` requests, and records the ones it accepted."""

    fail_first: int = 0
    accepted: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    refused: int = 0
    runner: web.AppRunner | None = None
    url: str = ""

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.refused < self.fail_first:
            self.refused += 1
            return web.Response(status=503, text="down for maintenance")
        self.accepted.append((request.path, dict(request.headers), body))
        return web.Response(text="ok")

    async def start(self, port: int = 0) -> str:
        app = web.Application()
        app.router.add_post("/{name}", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self.url

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def ids(self, path: str | None = None) -> list[str]:
        return [h["X-Metergate-Alert-Id"] for p, h, _ in self.accepted if path in (None, p)]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    recv = Receiver()
    await recv.start()
    yield recv
    await recv.stop()


def alert_overrides(
    slack_url: str, hook_url: str, *, limit_usd: str = "0.01", **alerts: Any
) -> dict[str, Any]:
    return {
        "budgets": [
            {"name": BUDGET, "scope": {"team": "search"}, "limit_usd": limit_usd, "enforce": "soft"}
        ],
        "alerts": {
            "channels": [
                {"type": "slack", "url": slack_url},
                {"type": "webhook", "url": hook_url, "secret": SECRET},
            ],
            "forecast": False,
            "check_interval_s": CHECK_S,
            "delivery": {
                "poll_interval_s": CHECK_S,
                "retry_initial_s": 0.05,
                "retry_max_s": 0.2,
                "timeout_s": 2,
            },
            **alerts,
        },
    }


async def one_request(proxy: RunningProxy, key: str = KEY_A) -> None:
    """One chat completion through the SDK (raises unless it succeeds); ~0.0006 USD."""
    client = proxy.openai(key)
    try:
        await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Spend a little."}],
            max_tokens=5,
            extra_headers={"X-Fake-Output": "1000"},
        )
    finally:
        await client.close()


async def spent_and_limit(proxy: RunningProxy) -> tuple[int, int]:
    spec = next(s for s in proxy.settings.budgets if s.name == BUDGET)
    state = await proxy.store.budget_state(budget_key(spec, period_window(spec)))
    assert spec.limit_nanos is not None
    return state.spent_nanos, spec.limit_nanos


async def spend_past(percent: int, proxies: list[RunningProxy]) -> None:
    """Requests, alternating between the proxies, until spend reaches ``percent``."""
    for i in range(200):
        spent, limit = await spent_and_limit(proxies[0])
        if spent * 100 >= percent * limit:
            return
        await one_request(proxies[i % len(proxies)])
    raise AssertionError(f"200 requests did not reach {percent}% of the budget")


def verify_hmac(headers: dict[str, str], body: bytes) -> bool:
    """The receiver's side of the signature, written from the documentation."""
    fields = dict(part.split("=", 1) for part in headers["X-Metergate-Signature"].split(","))
    mac = hmac.new(SECRET.encode(), fields["t"].encode() + b"." + body, hashlib.sha256)
    fresh = abs(time.time() - int(fields["t"])) < 300
    return fresh and hmac.compare_digest(mac.hexdigest(), fields["v1"])


async def test_two_replicas_deliver_each_threshold_exactly_once(
    make_proxy: ProxyFactory, redis_server: RedisServer, receiver: Receiver
) -> None:
    store = f"{redis_server.url}/0?namespace={fresh_namespace()}"
    overrides = alert_overrides(f"{receiver.url}/slack", f"{receiver.url}/hook")
    proxies = [await make_proxy(overrides, store=store) for _ in range(2)]
    period = period_window(proxies[0].settings.budgets[0]).period_id

    def alert_id(threshold: int, channel: str) -> str:
        return f"{BUDGET}:{period}:t{threshold}@{channel}"

    for threshold in (50, 80, 100):
        await spend_past(threshold, proxies)
        wanted = {alert_id(threshold, "slack"), alert_id(threshold, "webhook")}
        await wait_for(
            lambda w=wanted: w <= set(receiver.ids()), within=15, what=f"the {threshold}% alerts"
        )
        if threshold == 50:  # spend is between 50 and 80%: nothing more has fired
            assert set(receiver.ids()) == wanted

    await asyncio.sleep(20 * CHECK_S)  # many more checks on both replicas: no duplicates
    counts = collections.Counter(receiver.ids())
    assert counts == {alert_id(t, ch): 1 for t in (50, 80, 100) for ch in ("slack", "webhook")}
    for channel in ("slack", "webhook"):
        sent = sum(
            metric_sum(p, "metergate_alerts_sent_total", channel=channel, result="ok")
            for p in proxies
        )
        assert sent == 3

    hooks = [(h, b) for p, h, b in receiver.accepted if p == "/hook"]
    assert all(verify_hmac(h, b) for h, b in hooks)
    docs = {orjson.loads(b)["threshold_percent"]: orjson.loads(b) for _, b in hooks}
    doc = docs["80"]
    spent, limit = doc["spent_nanos"], doc["limit_nanos"]
    assert limit == 10_000_000 and spent * 100 >= 80 * limit
    assert doc["schema"] == "metergate.budget_alert.v1" and doc["kind"] == "threshold"
    assert doc["id"] == alert_id(80, "webhook") and doc["budget"] == BUDGET
    assert doc["limit_usd"] == "0.01" and doc["period"]["id"] == period
    assert doc["top_contributors"][0]["key"] == "app-a"
    assert doc["top_contributors"][0]["team"] == "search"

    slack = {h["X-Metergate-Alert-Id"]: orjson.loads(b) for p, h, b in receiver.accepted}
    text = slack[alert_id(80, "slack")]["text"]
    end = doc["period"]["end"]
    for part in (BUDGET, "80%", f"${doc['spent_usd']}", "$0.01", f"{doc['percent']}%", end):
        assert part in text, (part, text)
    assert "app-a" in text and "alice" in text  # the top contributor


async def test_a_receiver_that_is_down_gets_the_alert_after_retries(
    make_proxy: ProxyFactory, redis_server: RedisServer
) -> None:
    hook_port = free_port()  # nothing listens here yet: connections are refused
    slack = Receiver(fail_first=3)  # up, but answers 503 three times
    hook = Receiver()
    await slack.start()
    store = f"{redis_server.url}/0?namespace={fresh_namespace()}"
    try:
        proxy = await make_proxy(
            alert_overrides(f"{slack.url}/slack", f"http://127.0.0.1:{hook_port}/hook",
                            thresholds=[50]),
            store=store,
        )  # fmt: skip
        await spend_past(50, [proxy])

        def failed(channel: str) -> float:
            return metric_sum(
                proxy, "metergate_alerts_sent_total", channel=channel, result="failed"
            )

        # Requests keep succeeding (one_request raises otherwise) while deliveries fail.
        served = 0
        for _ in range(500):
            if failed("webhook") >= 3 and failed("slack") >= 3:
                break
            await one_request(proxy)
            served += 1
        assert failed("webhook") >= 3 and failed("slack") == 3
        assert hook.accepted == []

        await hook.start(hook_port)  # the receiver comes back
        for _ in range(500):
            if hook.accepted and slack.accepted:
                break
            await one_request(proxy)
            served += 1
        await wait_for(lambda: hook.accepted and slack.accepted, within=15, what="delivery")
        await asyncio.sleep(20 * CHECK_S)
        assert len(hook.accepted) == 1 and len(slack.accepted) == 1
        _, headers, body = hook.accepted[0]
        assert verify_hmac(headers, body)
        assert orjson.loads(body)["attempt"] >= 4  # three refusals at least, then this one
        for channel in ("slack", "webhook"):
            ok = metric_sum(proxy, "metergate_alerts_sent_total", channel=channel, result="ok")
            assert ok == 1
        assert served > 0
    finally:
        await slack.stop()
        await hook.stop()


async def test_forecast_fires_for_a_fast_burn_and_not_a_slow_one(
    make_proxy: ProxyFactory, receiver: Receiver
) -> None:
    overrides = alert_overrides(
        f"{receiver.url}/slack",
        f"{receiver.url}/hook",
        limit_usd="1",
        thresholds=[1000],  # only forecasts in this test
        forecast={"enabled": True, "window_s": 30, "min_span_s": 0.3},
    )
    # A second budget that burns at the same pace but has a million dollars to burn.
    overrides["budgets"].append(
        {"name": "support-slow", "scope": {"team": "support"}, "limit_usd": 1_000_000}
    )
    proxy = await make_proxy(overrides, store="memory://")
    period = period_window(proxy.settings.budgets[0]).period_id
    fast_id = f"{BUDGET}:{period}:forecast@webhook"

    for _ in range(400):  # ~0.0006 USD per request on each budget, for at least 0.3 s
        if fast_id in receiver.ids():
            break
        await asyncio.gather(one_request(proxy, KEY_A), one_request(proxy, KEY_B))
    await wait_for(lambda: fast_id in receiver.ids(), within=15, what="the forecast alert")
    await asyncio.sleep(20 * CHECK_S)
    assert sorted(receiver.ids()) == sorted([fast_id, fast_id.replace("@webhook", "@slack")])
    doc = next(orjson.loads(b) for p, _, b in receiver.accepted if p == "/hook")
    assert doc["kind"] == "forecast" and doc["threshold_percent"] is None
    assert doc["forecast"]["exhausted_at"] < doc["period"]["end"]
    slack_text = next(orjson.loads(b)["text"] for p, _, b in receiver.accepted if p == "/slack")
    assert "will run out before its period ends" in slack_text


async def test_an_undeliverable_alert_is_given_up_and_secrets_stay_out_of_logs(
    make_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    closed = free_port()  # nothing ever listens here
    slack_url = f"http://127.0.0.1:{closed}/services/T000/B000/SLACKSECRETPATH"
    overrides = alert_overrides(slack_url, f"http://127.0.0.1:{closed}/hook", thresholds=[50])
    overrides["alerts"]["delivery"]["give_up_after_s"] = 0.5
    proxy = await make_proxy(overrides, store="memory://")
    await spend_past(50, [proxy])

    def gave_up() -> int:
        return sum("giving up on alert" in r.getMessage() for r in caplog.records)

    await wait_for(lambda: gave_up() == 2, within=15, what="both channels to give up")
    failed = metric_sum(proxy, "metergate_alerts_sent_total", result="failed")
    assert failed >= 2
    await asyncio.sleep(20 * CHECK_S)
    # Dropped for good: no further attempts, and nothing was ever delivered.
    assert metric_sum(proxy, "metergate_alerts_sent_total", result="failed") == failed
    assert metric_sum(proxy, "metergate_alerts_sent_total", result="ok") == 0
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "SLACKSECRETPATH" not in logged and SECRET not in logged
