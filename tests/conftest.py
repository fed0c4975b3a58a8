"""Shared fixtures: a fake upstream at the network edge, and the real proxy in front of it.

The proxy runs in-process on an ephemeral loopback port with its real app, store and
client session; tests talk to it with the official SDKs over real sockets.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.app import RUNNING, build_app
from proxy.settings import Settings, parse_settings
from proxy.store.base import Store
from tests.fake_upstream import FakeUpstream

KEY_A = "mg-test-app-a-0123456789"
KEY_B = "mg-test-app-b-0123456789"
UPSTREAM_KEY_OPENAI = "sk-upstream-openai-secret"
UPSTREAM_KEY_ANTHROPIC = "sk-ant-upstream-secret"
FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "provider-wire"


@dataclass
class RunningProxy:
    """A proxy started by :func:`make_proxy`."""

    url: str
    app: web.Application
    settings: Settings
    registry: CollectorRegistry

    @property
    def store(self) -> Store:
        store = self.app[RUNNING].store
        assert store is not None
        return store

    def openai(self, key: str = KEY_A, **kw: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=f"{self.url}/openai/v1", api_key=key, max_retries=0, **kw
        )

    def openai_sync(self, key: str = KEY_A, **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/openai/v1", api_key=key, max_retries=0, **kw)

    def anthropic(self, key: str = KEY_A, **kw: Any) -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(
            base_url=f"{self.url}/anthropic", api_key=key, max_retries=0, **kw
        )

    def anthropic_sync(self, key: str = KEY_A, **kw: Any) -> anthropic.Anthropic:
        return anthropic.Anthropic(
            base_url=f"{self.url}/anthropic", api_key=key, max_retries=0, **kw
        )

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value


def base_config(fake_url: str, store: str) -> dict[str, Any]:
    """A config dict pointing both upstreams at the fake."""
    return {
        "server": {"host": "127.0.0.1", "port": 0},
        "store": store,
        "unknown_model": "reject",
        "upstreams": {
            "openai": {
                "url": fake_url,
                "format": "openai",
                "api_key": UPSTREAM_KEY_OPENAI,
                "read_timeout_s": 5,
            },
            "anthropic": {
                "url": fake_url,
                "format": "anthropic",
                "api_key": UPSTREAM_KEY_ANTHROPIC,
                "read_timeout_s": 5,
            },
        },
        "keys": [
            {"key": KEY_A, "name": "app-a", "team": "search", "user": "alice"},
            {"key": KEY_B, "name": "app-b", "team": "support", "user": "bob", "tags": ["batch"]},
        ],
    }


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


async def start_proxy(config: dict[str, Any]) -> tuple[RunningProxy, web.AppRunner]:
    settings = parse_settings(config, environ={})
    registry = CollectorRegistry()
    app = build_app(settings, registry=registry)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return RunningProxy(f"http://127.0.0.1:{port}", app, settings, registry), runner


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as f:
        yield f


ProxyFactory = Callable[..., Awaitable[RunningProxy]]


@pytest.fixture
async def make_proxy(fake: FakeUpstream, tmp_path: Path) -> AsyncIterator[ProxyFactory]:
    runners: list[web.AppRunner] = []

    async def factory(
        overrides: dict[str, Any] | None = None,
        *,
        store: str | None = None,
        upstream_url: str | None = None,
    ) -> RunningProxy:
        config = deep_merge(
            base_config(upstream_url or fake.url, store or f"sqlite:///{tmp_path}/ledger.db"),
            overrides or {},
        )
        proxy, runner = await start_proxy(config)
        runners.append(runner)
        return proxy

    yield factory
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def proxy(make_proxy: ProxyFactory) -> RunningProxy:
    return await make_proxy()
