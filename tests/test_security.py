"""The request path against hostile clients: no request can make the proxy call a host
other than its configured upstreams (SSRF), request smuggling and header abuse are
refused, and the proxy keeps serving after every one of them.

The attacks are sent as raw bytes over a socket (an HTTP client library would refuse
to send most of them). A second server, ``evil``, stands for any host an attacker
would like the proxy to reach; it must receive nothing, whatever the trick.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import orjson
import pytest
from aiohttp import web

from tests.conftest import KEY_A, ProxyFactory, RunningProxy
from tests.fake_upstream import FakeUpstream

CHAT = orjson.dumps(
    {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
)


@dataclass
class Evil:
    """A server that must never be reached."""

    url: str
    port: int
    hits: list[str] = field(default_factory=list)


@pytest.fixture
async def evil() -> AsyncIterator[Evil]:
    box: list[Evil] = []

    async def record(request: web.Request) -> web.Response:
        box[0].hits.append(f"{request.method} {request.raw_path}")
        return web.json_response({"pwned": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    box.append(Evil(f"http://127.0.0.1:{port}", port))
    try:
        yield box[0]
    finally:
        await runner.cleanup()


@dataclass
class RawAnswer:
    status: int
    head: str
    body: bytes


async def raw_exchange(proxy: RunningProxy, data: bytes, *, within: float = 10) -> RawAnswer:
    """Send ``data`` as it is on a fresh connection and read until the proxy closes it
    (each request asks for ``Connection: close``, or is refused and closed)."""
    host, port = proxy.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(within):
            raw = await reader.read()
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    status = int(status_line.split()[1]) if status_line.startswith("HTTP/") else 0
    return RawAnswer(status, head.decode("latin-1"), body)


def request_bytes(
    target: str,
    *,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = CHAT,
    host: str = "127.0.0.1",
) -> bytes:
    lines = [f"POST {target} HTTP/1.1", f"Host: {host}"]
    all_headers = [
        ("Authorization", f"Bearer {KEY_A}"),
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
    ]
    for name, value in headers or []:
        all_headers = [h for h in all_headers if h[0].lower() != name.lower()] + [(name, value)]
    lines += [f"{n}: {v}" for n, v in all_headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def still_serves(proxy: RunningProxy) -> None:
    client = proxy.openai()
    try:
        done = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=5
        )
        assert done.usage is not None
    finally:
        await client.close()


# ───────────────────────────────────────────── SSRF ─────────────────────────────────────────────


async def test_no_path_host_or_header_trick_reaches_another_host(
    fake: FakeUpstream, proxy: RunningProxy, evil: Evil
) -> None:
    e = f"127.0.0.1:{evil.port}"
    tricks: list[tuple[str, bytes]] = [
        # Absolute-form target naming the evil host: its host is ignored.
        ("absolute-form", request_bytes(f"{evil.url}/openai/v1/chat/completions", host=e)),
        ("Host header", request_bytes("/openai/v1/chat/completions", host=e)),
        (
            "forwarding headers",
            request_bytes(
                "/openai/v1/chat/completions",
                headers=[
                    ("X-Forwarded-Host", e),
                    ("Forwarded", f"host={e};proto=http"),
                    ("X-Original-URL", f"{evil.url}/x"),
                    ("X-Rewrite-URL", f"{evil.url}/x"),
                ],
            ),
        ),
        ("double slash", request_bytes(f"/openai//{e}/v1/chat/completions")),
        ("userinfo", request_bytes(f"/openai/@{e}/v1/chat/completions")),
        ("scheme in path", request_bytes(f"/openai/http://{e}/v1/chat/completions")),
        ("encoded scheme", request_bytes(f"/openai/http:%2F%2F{e}/v1/chat/completions")),
        ("encoded traversal", request_bytes(f"/openai/..%2F..%2F{e}/v1/chat/completions")),
        ("dot segments", request_bytes(f"/openai/v1/../../{e}/chat/completions")),
        ("encoded dots", request_bytes("/openai/%2e%2e/%2E%2E/admin")),
        ("backslash", request_bytes(f"/openai/..\\..\\{e}/x")),
        ("network-path reference", request_bytes(f"//{e}/openai/v1/chat/completions")),
        ("upstream name is a host", request_bytes(f"/{e}/v1/chat/completions")),
    ]
    answers = {name: await raw_exchange(proxy, data) for name, data in tricks}
    assert evil.hits == []
    # Whatever reached the fake went to its own host; requests that named the path
    # properly were served (the host the client named is not used for anything).
    for name in ("absolute-form", "Host header", "forwarding headers"):
        assert answers[name].status == 200, (name, answers[name].head)
    assert fake.requests[0].path == "/v1/chat/completions"
    for name in ("encoded traversal", "encoded dots", "backslash", "encoded scheme"):
        assert answers[name].status == 400, (name, answers[name].head)
        assert orjson.loads(answers[name].body)["error"]["code"] == "invalid_path", name
    # Unroutable targets get a JSON error an SDK can parse, never a plain-text page.
    for name in ("network-path reference", "upstream name is a host"):
        assert answers[name].status == 404, (name, answers[name].head)
        assert "message" in orjson.loads(answers[name].body)["error"], name
    await still_serves(proxy)
    assert evil.hits == []


async def test_upstream_redirects_are_relayed_never_followed(
    make_proxy: ProxyFactory, evil: Evil
) -> None:
    """An upstream that answers 307/302 to the evil host: the proxy does not follow (no
    request reaches evil), it relays the redirect to the client as it is, and charges
    nothing for it."""

    async def redirect(request: web.Request) -> web.Response:
        await request.read()
        code = 302 if "found" in request.path else 307
        return web.Response(status=code, headers={"Location": f"{evil.url}/steal"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", redirect)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        proxy = await make_proxy(upstream_url=f"http://127.0.0.1:{runner.addresses[0][1]}")
        for path in ("/openai/v1/chat/completions", "/openai/v1/found/chat/completions"):
            answer = await raw_exchange(proxy, request_bytes(path))
            assert answer.status in (302, 307), answer.head
            assert f"Location: {evil.url}/steal" in answer.head
        assert evil.hits == []
        records = await proxy.store.ledger_records()
        assert [r.cost_nanos for r in records] == [0, 0]
    finally:
        await runner.cleanup()


# ────────────────────────────── smuggling and headers ──────────────────────────────


def _smuggle_cl_te() -> bytes:
    smuggled = b"GET /openai/v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
    chunked = b"0\r\n\r\n" + smuggled
    return (
        b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Authorization: Bearer " + KEY_A.encode() + b"\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: " + str(len(chunked)).encode() + b"\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + chunked
    )


def _header_block(*extra: bytes, body: bytes = CHAT, length: bytes | None = None) -> bytes:
    return (
        b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Authorization: Bearer " + KEY_A.encode() + b"\r\n"
        b"Content-Type: application/json\r\nConnection: close\r\n"
        + b"".join(h + b"\r\n" for h in extra)
        + (b"Content-Length: " + (length or str(len(body)).encode()) + b"\r\n")
        + b"\r\n"
        + body
    )


SMUGGLING: dict[str, bytes] = {
    "Content-Length with Transfer-Encoding": _smuggle_cl_te(),
    "two different Content-Lengths": _header_block(b"Content-Length: 3"),
    "Transfer-Encoding other than chunked": (
        b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"
    ),
    "negative Content-Length": _header_block(length=b"-1"),
    "Content-Length with a sign": _header_block(length=b"+" + str(len(CHAT)).encode()),
    "obsolete line folding": _header_block(b"X-Metergate-Tags: a,\r\n b"),
    "CR inside a header value": _header_block(b"X-Metergate-Tags: a\rX-Injected: 1"),
    "NUL inside a header value": _header_block(b"X-Metergate-Tags: a\x00b"),
    "space before the colon": _header_block(b"Transfer-Encoding : chunked"),
    "header over 16 KiB": _header_block(b"X-Big: " + b"a" * 20_000),
    "200 headers": _header_block(*(b"X-H%d: 1" % i for i in range(200))),
}


@pytest.mark.parametrize("attack", list(SMUGGLING))
async def test_smuggling_and_malformed_headers_are_refused(
    fake: FakeUpstream, proxy: RunningProxy, attack: str
) -> None:
    answer = await raw_exchange(proxy, SMUGGLING[attack])
    assert 400 <= answer.status < 500, (attack, answer.head)
    # Nothing was forwarded: neither the request nor a request smuggled inside it.
    assert not fake.requests
    await still_serves(proxy)
    assert len(fake.requests) == 1


TAG_ABUSE: dict[str, str] = {
    "thousands of tags": ",".join(f"t{i}" for i in range(2500)),  # 14 KB: under the header cap
    "17 distinct tags": ",".join(f"t{i}" for i in range(17)),
    "a tag over 64 characters": "a" * 65,
    "markup": "<script>alert(1)</script>",
    "spaces inside a tag": "cost center",
    "a tab": "a\tb",
    "a quote": 'a"b',
    "a semicolon": "a;b",
    "non-ASCII": "caf\u00e9",
}


@pytest.mark.parametrize("abuse", list(TAG_ABUSE))
async def test_tag_abuse_is_refused_in_the_providers_shape(
    fake: FakeUpstream, proxy: RunningProxy, abuse: str
) -> None:
    data = request_bytes(
        "/openai/v1/chat/completions", headers=[("X-Metergate-Tags", TAG_ABUSE[abuse])]
    )
    answer = await raw_exchange(proxy, data)
    assert answer.status == 400, (abuse, answer.head)
    error = orjson.loads(answer.body)["error"]
    assert error["code"] == "invalid_tags"
    assert error["type"] == "invalid_request_error"
    # The refused value is not echoed into a header, and at most a bounded excerpt of it
    # into the message.
    assert "X-Injected" not in answer.head
    assert len(error["message"]) < 300
    assert not fake.requests
    await still_serves(proxy)


async def test_valid_tags_are_counted_and_never_forwarded(
    fake: FakeUpstream, proxy: RunningProxy
) -> None:
    tags = "project:alpha,env=prod,cost-center/42,project:alpha"
    data = request_bytes("/openai/v1/chat/completions", headers=[("X-Metergate-Tags", tags)])
    answer = await raw_exchange(proxy, data)
    assert answer.status == 200, answer.head
    assert not any(k.lower().startswith("x-metergate") for k in fake.requests[0].headers)
    (record,) = await proxy.store.ledger_records()
    assert record.tags == ("project:alpha", "env=prod", "cost-center/42")
