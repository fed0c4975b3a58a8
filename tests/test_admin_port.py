"""``server.admin_port``: /admin, /ui and /metrics on a listener of their own, so the
proxy port can face apps while the admin port stays on an internal network."""

from __future__ import annotations

import aiohttp
import orjson
import pytest

from proxy.app import RUNNING
from proxy.settings import ConfigError, parse_settings
from tests.conftest import ProxyFactory

TOKEN = "admin-port-token-0123456789"


async def _get(url: str, token: str | None = TOKEN) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers) as r:
        return r.status, await r.read()


async def test_admin_ui_and_metrics_move_to_the_admin_port(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy({"admin_token": TOKEN, "server": {"admin_port": 0}})
    admin_url = proxy.app[RUNNING].admin_url
    assert admin_url is not None and admin_url != proxy.url

    # Apps still get their answers on the proxy port ...
    client = proxy.openai()
    try:
        done = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=5
        )
        assert done.usage is not None
    finally:
        await client.close()
    # ... where the admin surface does not exist, even with the right token.
    for path in ("/admin/budgets", "/admin/openapi.json", "/ui", "/metrics"):
        status, body = await _get(proxy.url + path)
        assert status == 404, path
        assert "error" in orjson.loads(body), path
    # Health checks answer on both listeners (for a load balancer on either).
    for base in (proxy.url, admin_url):
        assert (await _get(base + "/healthz", None))[0] == 200
        assert (await _get(base + "/readyz", None))[0] == 200

    # The admin port serves it all, with the usual token rule; never the proxy routes.
    status, body = await _get(admin_url + "/admin/budgets")
    assert status == 200 and "budgets" in orjson.loads(body)
    assert (await _get(admin_url + "/admin/budgets", None))[0] == 401
    status, body = await _get(admin_url + "/metrics", None)
    assert status == 200
    assert b'metergate_requests_total{model="gpt-4o-mini"' in body
    status, _ = await _get(admin_url + "/ui", None)
    assert status == 200  # the sign-in form
    status, body = await _get(admin_url + "/openai/v1/models")
    assert status == 404


def test_admin_port_must_differ_from_the_proxy_port() -> None:
    with pytest.raises(ConfigError, match=r"server\.admin_port"):
        parse_settings(
            {
                "server": {"port": 8080, "admin_port": 8080},
                "upstreams": {"openai": {"url": "http://127.0.0.1:1", "format": "openai"}},
            },
            {},
        )
