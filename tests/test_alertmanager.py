"""Budget alerts delivered end to end: proxy → Prometheus → Alertmanager → webhook.

A real proxy with a hard daily budget for team ``search`` takes real OpenAI and Anthropic
SDK traffic until the budget is past 80 % spent. A real Prometheus scrapes it every
second and evaluates the repository's own ``config/prometheus/rules.yml`` (unchanged:
the budget threshold alerts have no ``for:``, so they fire on the first evaluation that
sees the spend, as they do in production). It sends alerts to a real Alertmanager whose
config is the repository's example ``config/prometheus/alertmanager.yml`` with two
test-only changes: every webhook URL points at an aiohttp receiver inside this test, and
the group waits are 1 s instead of 30 s / 5 m. The receiver must get the
``MetergateBudget80Percent`` alert for that budget, firing, in Alertmanager's webhook
format (version 4), through the example's route and receiver.

Also: the example ``alertmanager.yml`` passes ``amtool check-config``.

Needs the Debian packages ``prometheus`` and ``prometheus-alertmanager`` (which ships
``amtool``); fails, never skips, without them.
"""

from __future__ import annotations

import asyncio
import copy
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from tests.conftest import KEY_A, ProxyFactory, RunningProxy
from tests.e2e_support import metric_sum
from tests.prom_server import AMTOOL, binary, start_alertmanager, start_prometheus

ROOT = Path(__file__).resolve().parents[1]
PROM_CONFIG = ROOT / "config" / "prometheus"
EXAMPLE_ALERTMANAGER = PROM_CONFIG / "alertmanager.yml"
RULES = PROM_CONFIG / "rules.yml"

BUDGET = "search-daily"
LIMIT_USD = 0.01
# A gpt-4o request below costs about $0.0002 and reserves at most about $0.0005, so the
# hard cap refuses nothing before ~95 % and 80 % is reached in about 40 requests.
BUDGETS = {
    "budgets": [
        {"name": BUDGET, "scope": {"team": "search"}, "limit_usd": LIMIT_USD, "period": "day"}
    ]
}
MAX_REQUESTS = 400
DELIVERY_TIMEOUT_S = 40

pytestmark = pytest.mark.timeout(120)


class WebhookReceiver:
    """An aiohttp app on a loopback port that keeps every Alertmanager webhook POST."""

    def __init__(self) -> None:
        self.posts: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> WebhookReceiver:
        app = web.Application()
        app.router.add_post("/alertmanager", self._post)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/alertmanager"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _post(self, request: web.Request) -> web.Response:
        await self.posts.put(await request.json())
        return web.Response(text="ok")


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    async with WebhookReceiver() as r:
        yield r


def config_for(webhook_url: str) -> dict[str, Any]:
    """The example Alertmanager config with its webhooks sent to ``webhook_url`` and
    group waits of 1 s (the example waits 30 s before a group's first notification)."""
    config = copy.deepcopy(yaml.safe_load(EXAMPLE_ALERTMANAGER.read_text()))
    route = config["route"]
    route["group_wait"] = "1s"
    route["group_interval"] = "1s"
    hooks = [h for r in config["receivers"] for h in r.get("webhook_configs", [])]
    assert hooks, "the example alertmanager.yml has no webhook receiver"
    for hook in hooks:
        hook["url"] = webhook_url
    return config


def test_the_example_alertmanager_config_is_valid() -> None:
    done = subprocess.run(
        [binary(AMTOOL), "check-config", str(EXAMPLE_ALERTMANAGER)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0 and "SUCCESS" in out, out
    config = yaml.safe_load(EXAMPLE_ALERTMANAGER.read_text())
    receivers = {r["name"]: r for r in config["receivers"]}
    # Every route, the default one included, ends at a webhook.
    routes = [config["route"], *config["route"].get("routes", [])]
    for route in routes:
        assert receivers[route.get("receiver", config["route"]["receiver"])]["webhook_configs"]


async def _spend_past(proxy: RunningProxy, ratio: float) -> int:
    """Send real SDK requests (OpenAI and Anthropic, plain and streamed) for team search
    until its spend is at least ``ratio`` of the budget; returns how many were sent."""
    oa, an = proxy.openai(KEY_A), proxy.anthropic(KEY_A)
    hello: Any = [{"role": "user", "content": "Hello there, how are you?"}]
    for sent in range(MAX_REQUESTS):
        spent = metric_sum(proxy, "metergate_cost_usd_total", team="search")
        if spent >= ratio * LIMIT_USD:
            assert spent < LIMIT_USD, f"spent {spent} is past the whole budget"
            return sent
        match sent % 3:
            case 0:
                await oa.chat.completions.create(model="gpt-4o", messages=hello, max_tokens=20)
            case 1:
                stream = await oa.chat.completions.create(
                    model="gpt-4o", messages=hello, max_tokens=20, stream=True
                )
                async for _ in stream:
                    pass
            case _:
                await an.messages.create(model="claude-sonnet-4-6", max_tokens=20, messages=hello)
    raise AssertionError(f"{MAX_REQUESTS} requests did not spend {ratio:.0%} of ${LIMIT_USD}")


async def _wait_for_alert(
    receiver: WebhookReceiver, alertname: str, seen: list[dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The first webhook POST carrying a firing ``alertname`` for the budget, and that
    alert; every POST read is appended to ``seen``."""
    deadline = time.monotonic() + DELIVERY_TIMEOUT_S
    while (left := deadline - time.monotonic()) > 0:
        try:
            post = await asyncio.wait_for(receiver.posts.get(), timeout=left)
        except TimeoutError:
            break
        seen.append(post)
        for alert in post.get("alerts", []):
            labels = alert.get("labels", {})
            if (
                labels.get("alertname") == alertname
                and labels.get("budget") == BUDGET
                and alert.get("status") == "firing"
            ):
                return post, alert
    raise TimeoutError


async def test_a_budget_alert_reaches_the_webhook_through_alertmanager(
    make_proxy: ProxyFactory, receiver: WebhookReceiver, tmp_path: Path
) -> None:
    am = await start_alertmanager(tmp_path / "alertmanager", config_for(receiver.url))
    prom = None
    try:
        proxy = await make_proxy(BUDGETS)
        prom = await start_prometheus(
            tmp_path / "prometheus",
            [proxy.url.removeprefix("http://")],
            rule_files=[RULES],  # the repository's rules, unchanged
            alertmanagers=[am.address],
        )
        sent = await _spend_past(proxy, 0.8)
        assert sent > 1

        seen: list[dict[str, Any]] = []
        try:
            post, alert = await _wait_for_alert(receiver, "MetergateBudget80Percent", seen)
        except TimeoutError:
            firing = (await prom.api("/api/v1/alerts"))["alerts"]
            rules = (await prom.api("/api/v1/rules"))["groups"]
            bad = [
                (r["name"], r.get("lastError"))
                for g in rules
                for r in g["rules"]
                if r["health"] != "ok"
            ]
            pytest.fail(
                f"no firing MetergateBudget80Percent for {BUDGET} within "
                f"{DELIVERY_TIMEOUT_S} s.\nwebhook posts: {seen}\n"
                f"Prometheus alerts: {firing}\nunhealthy rules: {bad}"
            )

        # Alertmanager's webhook format, through the example's route and receiver.
        assert post["version"] == "4"
        assert post["receiver"] == "metergate-webhook"
        assert post["status"] == "firing"
        assert post["groupLabels"]["alertname"] == "MetergateBudget80Percent"
        assert post["groupLabels"]["budget"] == BUDGET
        labels = alert["labels"]
        assert labels["severity"] == "warning"
        assert alert["annotations"]["summary"].startswith(f"Budget {BUDGET} is ")
        assert alert["annotations"]["summary"].endswith("% spent.")
        assert alert["startsAt"] and "/graph?" in alert["generatorURL"]
    finally:
        if prom is not None:
            prom.stop()
        am.stop()
