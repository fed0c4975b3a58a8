"""Issued keys end to end: the admin API and the CLI issue, rotate and revoke keys on a
running proxy, the official SDKs call through it, and two replicas on one real Redis
agree within a second. A key's value appears in exactly one answer (its creation or
rotation), and never in logs, metrics, the ledger, error bodies, other admin answers
or what the upstream receives."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
import yaml

from proxy.cli import main
from proxy.key_ops import KeyConfig, create_key
from proxy.keys import KeyHasher
from tests.conftest import ProxyFactory, RunningProxy
from tests.e2e_support import wait_for
from tests.fake_upstream import FakeUpstream
from tests.redis_servers import RedisServer, redis_server  # noqa: F401 (fixture by name)
from tests.test_store_contract import fresh_namespace

SECRET = "e2e-key-secret-" + "k" * 40
TOKEN = "admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
OVERRIDES: dict[str, Any] = {"key_secret": SECRET, "admin_token": TOKEN}
CHAT: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "Say hi."}],
    "extra_headers": {"X-Fake-Input": "20", "X-Fake-Output": "5"},
}
MESSAGES: dict[str, Any] = {
    "model": "claude-haiku-4-5",
    "max_tokens": 64,
    "messages": [{"role": "user", "content": "Say hi."}],
}


@dataclass
class Admin:
    """Calls one proxy's admin API and keeps every answer for the secret grep."""

    url: str
    session: aiohttp.ClientSession
    answers: list[str] = field(default_factory=list)

    async def call(
        self, method: str, path: str, body: Any = None, *, token: str | None = TOKEN
    ) -> tuple[int, Any, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.session.request(
            method, self.url + path, json=body, headers=headers
        ) as resp:
            raw = await resp.read()
            self.answers.append(f"{resp.status} {dict(resp.headers)} {raw.decode()}")
            return resp.status, orjson.loads(raw), resp.headers


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def chat(proxy: RunningProxy, key: str) -> Any:
    client = proxy.openai(key)
    try:
        return await client.chat.completions.create(**CHAT)
    finally:
        await client.close()


async def message(proxy: RunningProxy, key: str) -> Any:
    client = proxy.anthropic(key)
    try:
        return await client.messages.create(**MESSAGES)
    finally:
        await client.close()


async def refused(proxy: RunningProxy, key: str) -> str | None:
    """The 401 message an OpenAI call with ``key`` gets, or None when it is served."""
    try:
        await chat(proxy, key)
    except openai.AuthenticationError as exc:
        return str(exc.body["message"]) if isinstance(exc.body, dict) else str(exc)
    return None


def assert_secret_free(key: str, *texts: str) -> None:
    """Neither the key nor its stored digest is in any of ``texts``."""
    digest = KeyHasher(SECRET).digest(key).hex()
    for text in texts:
        assert key not in text and key[3:] not in text
        assert digest not in text


async def test_an_issued_key_works_with_both_sdks_and_is_shown_only_once(
    make_proxy: ProxyFactory,
    fake: FakeUpstream,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    proxy = await make_proxy(OVERRIDES)
    admin = Admin(proxy.url, http)
    body = {"name": "app-x", "team": "search", "user": "carol", "tags": ["t1"]}
    status, issued, headers = await admin.call("POST", "/admin/keys", body)
    assert status == 201 and headers["Cache-Control"] == "no-store"
    key = issued["key"]
    assert key.startswith("mg-") and issued["prefix"] == key[:9] + "..."
    creation = admin.answers.pop()  # the one answer allowed to hold the key

    completion = await chat(proxy, key)
    reply = await message(proxy, key)
    assert completion.usage is not None and reply.usage.output_tokens > 0
    records = await proxy.store.ledger_records()
    assert [(r.key_name, r.team, r.user, r.tags) for r in records] == [
        ("app-x", "search", "carol", ("t1",))
    ] * 2
    # The upstream got the provider key, never ours.
    assert [r.auth_header for r in list(fake.requests)[-2:]] == ["authorization", "x-api-key"]

    status, listing, _ = await admin.call("GET", "/admin/keys")
    assert status == 200 and [k["name"] for k in listing["keys"]] == ["app-x"]
    assert "key" not in listing["keys"][0]
    for ref in (issued["id"], "app-x"):
        status, shown, _ = await admin.call("GET", f"/admin/keys/{ref}")
        assert status == 200 and shown["id"] == issued["id"] and "key" not in shown
        assert shown["spend"]["requests"] == 2
        assert shown["spend"]["cost_nanos"] == sum(r.cost_nanos for r in records) > 0
    status, error, _ = await admin.call("POST", "/admin/keys", body)
    assert (status, error["error"]["code"]) == (409, "name_taken")
    wrong = await refused(proxy, key[:-2] + "zz")
    assert wrong is not None and "not known" in wrong

    async with http.get(proxy.url + "/metrics") as resp:
        metrics_text = await resp.text()
    ledger_text = orjson.dumps([r.to_dict() for r in await proxy.store.ledger_records()]).decode()
    upstream_text = orjson.dumps([r.to_dict() for r in fake.requests]).decode()
    assert "app-x" in ledger_text  # the ledger names the key by its name
    assert_secret_free(
        key, caplog.text, metrics_text, ledger_text, upstream_text, wrong, *admin.answers
    )
    assert key in creation


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/admin/keys"),
        ("POST", "/admin/keys"),
        ("GET", "/admin/keys/app-x"),
        ("DELETE", "/admin/keys/app-x"),
        ("POST", "/admin/keys/app-x/rotate"),
    ],
)
async def test_admin_calls_without_the_token_get_401(
    make_proxy: ProxyFactory, http: aiohttp.ClientSession, method: str, path: str
) -> None:
    proxy = await make_proxy(OVERRIDES)
    admin = Admin(proxy.url, http)
    for token in (None, "wrong-token"):
        status, body, headers = await admin.call(method, path, {"name": "app-x"}, token=token)
        assert status == 401 and body["error"]["code"] == "unauthorized"
        assert headers["WWW-Authenticate"].startswith("Bearer")
    assert await proxy.store.api_keys() == {}


async def test_an_expired_key_is_refused(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(OVERRIDES)
    long_ago = time.time_ns() // 1_000_000 - 3_600_000
    # Issued an hour ago for one minute, straight into the store (as the CLI would).
    issued = await create_key(
        proxy.store, KeyConfig(SECRET), {"name": "brief", "expires": "1m"}, now_ms=long_ago
    )
    message_text = await refused(proxy, issued.value)
    assert message_text is not None and "expired" in message_text
    with pytest.raises(anthropic.AuthenticationError, match="expired"):
        await message(proxy, issued.value)
    assert await proxy.store.ledger_records() == []  # a refusal costs nothing


async def test_rotation_stops_the_old_value(
    make_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(OVERRIDES)
    admin = Admin(proxy.url, http)
    _, issued, _ = await admin.call("POST", "/admin/keys", {"name": "rot"})
    first = issued["key"]
    await chat(proxy, first)
    status, rotated, headers = await admin.call("POST", f"/admin/keys/{issued['id']}/rotate")
    assert status == 200 and headers["Cache-Control"] == "no-store"
    second = rotated["key"]
    assert rotated["id"] == issued["id"] and second != first
    # No poll needed on the replica that rotated: the old value is refused at once.
    old = await refused(proxy, first)
    assert old is not None and "rotated" in old
    await chat(proxy, second)
    # With a grace period the value being replaced keeps working until it ends.
    _, third, _ = await admin.call("POST", "/admin/keys/rot/rotate", {"grace": "10m"})
    assert third["previous_valid_until"] is not None
    await chat(proxy, second)
    await message(proxy, third["key"])
    status, error, _ = await admin.call("POST", "/admin/keys/rot/rotate", {"grace": "forever"})
    assert (status, error["error"]["code"]) == (400, "invalid_key")
    records = await proxy.store.ledger_records()
    assert {r.key_name for r in records} == {"rot"} and len(records) == 4


async def test_revoked_on_one_replica_is_refused_on_another_within_a_second(
    make_proxy: ProxyFactory,
    http: aiohttp.ClientSession,
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    url = f"{redis_server.url}/0?namespace={fresh_namespace()}"
    config = {**OVERRIDES, "journal_dir": str(tmp_path / "journal")}
    replica_a = await make_proxy(config, store=url)
    replica_b = await make_proxy(config, store=url)
    admin_a = Admin(replica_a.url, http)
    _, issued, _ = await admin_a.call("POST", "/admin/keys", {"name": "shared", "team": "ops"})
    key = issued["key"]
    # Created on A a moment ago, it already works on B (B checks the store on a miss).
    await chat(replica_b, key)
    await message(replica_b, key)
    status, _, _ = await admin_a.call("DELETE", f"/admin/keys/{issued['id']}")
    assert status == 200
    assert await refused(replica_a, key) is not None  # A applied it at once

    async def refused_on_b() -> bool:
        return await refused(replica_b, key) is not None

    await wait_for(refused_on_b, within=1.0, what="replica B refusing the revoked key")
    with pytest.raises(anthropic.AuthenticationError, match="revoked"):
        await message(replica_b, key)
    status, shown, _ = await Admin(replica_b.url, http).call("GET", "/admin/keys/shared")
    assert status == 200 and shown["state"] == "revoked" and shown["spend"]["requests"] == 2


async def test_the_cli_issues_rotates_and_revokes_on_a_running_proxy(
    make_proxy: ProxyFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    proxy = await make_proxy({"key_secret": SECRET})  # store: sqlite in tmp_path
    config = tmp_path / "metergate.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "store": proxy.settings.store,
                "key_secret": "${METERGATE_KEY_SECRET}",
                "upstreams": {"openai": {"url": "http://127.0.0.1:9", "format": "openai"}},
            }
        )
    )
    monkeypatch.setenv("METERGATE_KEY_SECRET", SECRET)
    outputs: list[str] = []

    async def cli(*args: str) -> tuple[int, str, str]:
        code = await asyncio.to_thread(main, ["keys", *args, "-c", str(config)])
        out, err = capsys.readouterr()
        outputs.append(out + err)
        return code, out, err

    code, out, err = await cli(
        "create", "--name", "cli-app", "--team", "search", "--user", "alice",
        "--expires", "90d", "--budget-usd", "50", "--period", "month", "--json",
    )  # fmt: skip
    assert code == 0 and "only time the key is shown" in err
    issued = orjson.loads(out)
    key, key_id = issued["key"], issued["id"]
    assert issued["budget_view"]["limit_usd"] == "50.00"
    creation = outputs.pop()
    await chat(proxy, key)  # works at once: the proxy looks on a miss

    code, out, _ = await cli("list", "--json")
    assert code == 0 and [k["id"] for k in orjson.loads(out)["keys"]] == [key_id]
    code, out, _ = await cli("show", "cli-app")
    assert code == 0 and "spent:        $0.0" in out and "1 request(s)" in out
    assert "budget spent: $0.0" in out and "of $50.00 this month (hard)" in out
    code, out, _ = await cli("create", "--name", "bad name")
    assert code == 2

    code, out, _ = await cli("rotate", "cli-app")
    assert code == 0
    new_key = next(line for line in out.splitlines() if line.startswith("mg-"))
    outputs.pop()  # the rotation's output holds the new key

    async def old_refused() -> bool:
        return await refused(proxy, key) is not None

    await wait_for(old_refused, within=1.0, what="the rotated-out key being refused")
    await chat(proxy, new_key)
    code, out, _ = await cli("revoke", key_id)
    assert code == 0 and "Revoked" in out

    async def new_refused() -> bool:
        return await refused(proxy, new_key) is not None

    await wait_for(new_refused, within=1.0, what="the revoked key being refused")
    code, out, _ = await cli("list")
    assert "No issued keys" in out
    code, _, err = await cli("revoke", key_id)
    assert code == 1 and "already revoked" in err
    assert key in creation
    for value in (key, new_key):
        assert_secret_free(value, caplog.text, *outputs)
