"""Transparency: what crosses the proxy is what the client and the provider sent.

Driven with a raw aiohttp client, so every byte is visible:

- request bodies reach the upstream byte for byte; the one exception is the
  ``stream_options.include_usage`` the proxy adds to OpenAI chat/completions streams;
- response bodies (and streams) reach the client as the upstream sent them, apart from
  the per-call ids and clocks the fake draws fresh for every answer, and the usage-only
  chunk the proxy itself asked for;
- ``X-Metergate-*`` and hop-by-hop headers (RFC 9110 §7.6.1, including those listed in
  ``Connection``) are not forwarded in either direction;
- the caller's Metergate key never reaches the upstream, the upstream key does
  (passthrough mode forwards the caller's own key instead);
- gzip from the upstream is relayed as the very same compressed bytes, and still
  metered exactly; a plain upstream likewise;
- a stream is relayed chunk by chunk, as it is produced.
"""

from __future__ import annotations

import gzip
import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
import pytest_asyncio
import yarl
from aiohttp import web

from tests.conftest import (
    KEY_A,
    UPSTREAM_KEY_ANTHROPIC,
    UPSTREAM_KEY_OPENAI,
    ProxyFactory,
    RunningProxy,
)
from tests.e2e_support import (
    assert_tokens_equal,
    expected_cost,
    fake_and_proxy,
    ledger_for,
    raw_post,
    scrub_bytes,
)
from tests.fake_upstream import FakeUpstream, _Gzip

module_loop = pytest.mark.asyncio(loop_scope="module")

# Deliberately unusual JSON: odd whitespace, escapes, float spellings, key order and a
# big integer. Any re-serialisation by the proxy would change these bytes.
CHAT_BODY = (
    b'{ "messages" : [ {"role":"user", "content":"caf\\u00e9 \xe2\x98\x95 \\"q\\" 1.50e3"} ],\n'
    b'\t"model":"gpt-4o-mini", "temperature": 0.70, "top_p":1.0E0,'
    b' "logit_bias": {"50256": -100}, "seed": 18446744073709551615 }'
)
CHAT_STREAM_BODY = CHAT_BODY[:-1] + b', "stream" :true, "stream_options": {"include_usage":true}}'
CHAT_STREAM_NO_USAGE = CHAT_BODY[:-1] + b', "stream":  true }'
RESPONSES_BODY = b'{"model": "o4-mini",  "input": "Say \\u0068i.", "stream": %s}'
COMPLETIONS_BODY = b'{"model":"gpt-3.5-turbo-instruct","prompt":"Once", "max_tokens": 9%s}'
EMBEDDINGS_BODY = b'{"model":"text-embedding-3-small","input":["a", "b"],"encoding_format":"float"}'
MESSAGES_BODY = (
    b'{"model":"claude-haiku-4-5","max_tokens":64,'
    b'"messages":[{"role":"user","content":"Hi \\ud83d\\ude00"}]%s}'
)
INJECTED_MEMBER = b'"stream_options":{"include_usage":true},'
FIXED = {"X-Fake-Input": "30", "X-Fake-Output": "10"}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[FakeUpstream, RunningProxy]]:
    async with fake_and_proxy(tmp_path_factory.mktemp("transparency")) as pair:
        yield pair


def _path(provider: str, endpoint: str) -> str:
    return f"/{provider}/v1/{endpoint}"


def _caller_headers(provider: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    auth = {"Authorization": f"Bearer {KEY_A}"} if provider == "openai" else {"x-api-key": KEY_A}
    if provider == "anthropic":
        auth["anthropic-version"] = "2023-06-01"
    return {"Content-Type": "application/json", **auth, **FIXED, **(extra or {})}


_PER_HOP = frozenset({"date", "content-length", "transfer-encoding", "connection", "keep-alive"})
_PER_ANSWER = frozenset({"x-request-id", "request-id", "openai-processing-ms"})


def _comparable_headers(headers: Any) -> dict[str, str]:
    """Response headers minus per-hop framing, the proxy's own, and per-answer values
    (masked, not dropped: they must still be there)."""
    out: dict[str, str] = {}
    for name, value in headers.items():
        lower = name.lower()
        if lower in _PER_HOP or lower.startswith("x-metergate-"):
            continue
        if lower in _PER_ANSWER or lower.endswith("-reset"):
            value = "*"
        out[lower] = value
    return out


# One row per metered endpoint: (provider, endpoint, body).
ENDPOINT_BODIES = [
    ("openai", "chat/completions", CHAT_BODY),
    ("openai", "chat/completions", CHAT_STREAM_BODY),
    ("openai", "responses", RESPONSES_BODY % b"false"),
    ("openai", "responses", RESPONSES_BODY % b"true"),
    ("openai", "completions", COMPLETIONS_BODY % b""),
    (
        "openai",
        "completions",
        COMPLETIONS_BODY % b', "stream":true,"stream_options":{"include_usage":true}',
    ),
    ("openai", "embeddings", EMBEDDINGS_BODY),
    ("anthropic", "messages", MESSAGES_BODY % b""),
    ("anthropic", "messages", MESSAGES_BODY % b',"stream":true'),
]
_IDS = [
    f"{e.replace('/', '-')}-{'stream' if b'true' in body else 'body'}"
    for _, e, body in ENDPOINT_BODIES
]


# --------------------------------------------------------------------------- bodies


@module_loop
@pytest.mark.parametrize(("provider", "endpoint", "body"), ENDPOINT_BODIES, ids=_IDS)
async def test_request_and_response_bytes_are_relayed_unchanged(
    env: tuple[FakeUpstream, RunningProxy], provider: str, endpoint: str, body: bytes
) -> None:
    fake, proxy = env
    status, headers, got = await raw_post(
        proxy.url + _path(provider, endpoint), body, _caller_headers(provider)
    )
    assert status == 200, got
    sent = fake.requests[-1]
    assert sent.body == body  # byte for byte, including the big integer and escapes
    assert sent.path == f"/v1/{endpoint}"
    upstream_id = headers["x-request-id" if provider == "openai" else "request-id"]
    record = fake.record_for(upstream_id)

    # The same request straight to the fake: the same bytes, ids and clocks aside.
    direct_headers = {**_caller_headers(provider), "Authorization": "Bearer sk-direct"}
    if provider == "anthropic":
        direct_headers["x-api-key"] = "sk-direct"
    d_status, d_headers, direct = await raw_post(fake.url + f"/v1/{endpoint}", body, direct_headers)
    assert d_status == 200
    assert scrub_bytes(got) == scrub_bytes(direct)
    if endpoint != "embeddings":  # (embeddings carry no per-call ids)
        assert got != scrub_bytes(got)  # the scrub did hide per-call values (sanity)
    # The provider's headers arrive too, plus the proxy's own; framing headers are per
    # hop, and a few values change from one answer to the next.
    assert _comparable_headers(headers) == _comparable_headers(d_headers)
    assert headers["X-Metergate-Request-Id"].startswith("mgr_")
    assert ("X-Metergate-Cost-USD" in headers) is (b"data: " not in got)

    led = await ledger_for(proxy, upstream_id)
    assert_tokens_equal(led, record)
    assert led.exact and led.cost_nanos == expected_cost(proxy, record)


@module_loop
async def test_injected_include_usage_is_the_only_change(
    env: tuple[FakeUpstream, RunningProxy],
) -> None:
    """A chat stream without include_usage: the upstream body is the client's with one
    member spliced in; the client's stream is the upstream's minus the usage chunk."""
    fake, proxy = env
    status, _, got = await raw_post(
        proxy.url + _path("openai", "chat/completions"),
        CHAT_STREAM_NO_USAGE,
        _caller_headers("openai"),
    )
    assert status == 200
    upstream_body = fake.requests[-1].body
    assert upstream_body != CHAT_STREAM_NO_USAGE
    assert upstream_body.replace(INJECTED_MEMBER, b"", 1) == CHAT_STREAM_NO_USAGE
    assert orjson.loads(upstream_body) == {
        **orjson.loads(CHAT_STREAM_NO_USAGE),
        "stream_options": {"include_usage": True},
    }
    record = fake.records[-1]

    # What the upstream sent for exactly that body, with the usage chunk taken out.
    _, _, direct = await raw_post(
        fake.url + "/v1/chat/completions",
        upstream_body,
        {"Content-Type": "application/json", **FIXED},
    )
    blocks = direct.split(b"\n\n")
    usage_blocks = [b for b in blocks if b'"choices":[]' in b]
    assert len(usage_blocks) == 1
    expected = b"\n\n".join(b for b in blocks if b not in usage_blocks)
    assert scrub_bytes(got) == scrub_bytes(expected)
    assert got.endswith(b"data: [DONE]\n\n")

    led = await ledger_for(proxy, record["request_id"])
    assert_tokens_equal(led, record)
    assert led.exact and led.cost_nanos == expected_cost(proxy, record)


@module_loop
@pytest.mark.parametrize(
    "options",
    [b'"stream_options": null', b'"stream_options": {"include_usage": false}'],
    ids=["null", "false"],
)
async def test_injected_include_usage_with_stream_options_present(
    env: tuple[FakeUpstream, RunningProxy], options: bytes
) -> None:
    """``stream_options`` present without include_usage: the proxy rewrites that one
    member (semantically the client's request plus include_usage) and hides the chunk."""
    fake, proxy = env
    body = CHAT_BODY[:-1] + b', "stream": true, ' + options + b"}"
    status, _, got = await raw_post(
        proxy.url + _path("openai", "chat/completions"), body, _caller_headers("openai")
    )
    assert status == 200
    assert orjson.loads(fake.requests[-1].body) == {
        **orjson.loads(body),
        "stream_options": {"include_usage": True},
    }
    assert b'"choices":[]' not in got and got.endswith(b"data: [DONE]\n\n")
    record = fake.records[-1]
    led = await ledger_for(proxy, record["request_id"])
    assert_tokens_equal(led, record)
    assert led.exact


@module_loop
async def test_query_string_and_provider_errors_pass_through(
    env: tuple[FakeUpstream, RunningProxy],
) -> None:
    fake, proxy = env
    url = proxy.url + "/openai/v1/chat/completions?api-version=2024-10-21&x=%20y&x=2"
    status, headers, got = await raw_post(
        url, CHAT_BODY, _caller_headers("openai", {"X-Fake-Fault": "status:429"})
    )
    assert status == 429
    assert fake.requests[-1].query == "api-version=2024-10-21&x= y&x=2"  # (decoded by aiohttp)
    assert headers["retry-after"] == "1"
    error = orjson.loads(got)
    assert error["error"]["code"] == "rate_limit_exceeded"
    # Byte for byte what the provider said (OpenAI's 4-space indented error body).
    _, _, direct = await raw_post(
        fake.url + "/v1/chat/completions",
        CHAT_BODY,
        {"Content-Type": "application/json", "X-Fake-Fault": "status:429"},
    )
    assert got == direct
    led = await ledger_for(proxy, headers["x-request-id"])
    assert led.status == 429 and led.cost_nanos == 0

    status, headers, got = await raw_post(
        proxy.url + "/anthropic/v1/messages",
        MESSAGES_BODY % b"",
        _caller_headers("anthropic", {"X-Fake-Fault": "status:529"}),
    )
    assert status == 529
    body = orjson.loads(got)
    assert body["type"] == "error" and body["error"]["type"] == "overloaded_error"
    assert body["request_id"] == headers["request-id"]


# --------------------------------------------------------------------------- headers


@module_loop
async def test_metergate_and_hop_by_hop_headers_are_not_forwarded(
    env: tuple[FakeUpstream, RunningProxy],
) -> None:
    fake, proxy = env
    extra = {
        "X-Metergate-Tags": "proj:x",
        "X-Metergate-Anything": "secret-ish",
        "x-metergate-lower": "1",
        "Connection": "keep-alive, X-Listed-Hop, x-other-listed",
        "X-Listed-Hop": "1",
        "X-Other-Listed": "1",
        "Keep-Alive": "timeout=5",
        "Proxy-Authorization": "Basic Zm9vOmJhcg==",
        "Proxy-Connection": "keep-alive",
        "TE": "trailers",
        "Trailer": "X-Checksum",
        "X-End-To-End": "kept",
        "OpenAI-Organization": "org-kept",
    }
    status, headers, _ = await raw_post(
        proxy.url + _path("openai", "chat/completions"),
        CHAT_BODY,
        _caller_headers("openai", extra),
    )
    assert status == 200
    received = fake.requests[-1].headers
    for name in (
        "X-Metergate-Tags",
        "X-Metergate-Anything",
        "x-metergate-lower",
        "X-Listed-Hop",
        "X-Other-Listed",
        "Keep-Alive",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
    ):
        assert name not in received, name
    assert not any(k.lower().startswith("x-metergate-") for k in received)
    assert received.get("Connection", "").lower() in ("", "keep-alive", "close")
    assert received["X-End-To-End"] == "kept"
    assert received["OpenAI-Organization"] == "org-kept"
    led = await ledger_for(proxy, headers["x-request-id"])
    assert "proj:x" in led.tags


async def test_hop_by_hop_response_headers_are_not_relayed(make_proxy: ProxyFactory) -> None:
    """An upstream's hop-by-hop response headers (and the ones its ``Connection`` lists)
    stay on its side of the proxy; end-to-end ones arrive."""

    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.raw_path)
        return web.Response(
            body=b'{"ok": true}',
            content_type="application/json",
            headers={
                "Connection": "keep-alive, X-Upstream-Hop",
                "X-Upstream-Hop": "1",
                "Keep-Alive": "timeout=5",
                "Proxy-Authenticate": 'Basic realm="x"',
                "X-Upstream-Kept": "1",
                "x-request-id": "req_hop",
            },
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        proxy = await make_proxy(upstream_url=f"http://127.0.0.1:{runner.addresses[0][1]}")
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                proxy.url + "/openai/v1/models", headers={"Authorization": f"Bearer {KEY_A}"}
            ) as resp,
        ):
            assert resp.status == 200
            assert await resp.read() == b'{"ok": true}'
            assert resp.headers["X-Upstream-Kept"] == "1"
            for name in ("X-Upstream-Hop", "Keep-Alive", "Proxy-Authenticate"):
                assert name not in resp.headers, name
        # The path and query reach the upstream exactly as encoded by the client
        # (encoded '/', '.' and spaces in the query are ordinary query data).
        query = "?after=file%2Fabc&name=a%2Eb&q=%20x%2B&e=%C3%A9"
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                yarl.URL(proxy.url + "/openai/v1/models" + query, encoded=True),
                headers={"Authorization": f"Bearer {KEY_A}"},
            ) as resp,
        ):
            assert resp.status == 200, await resp.text()
        assert seen[-1] == "/v1/models" + query
    finally:
        await runner.cleanup()


@module_loop
@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_caller_key_is_replaced_by_the_upstream_key(
    env: tuple[FakeUpstream, RunningProxy], provider: str
) -> None:
    fake, proxy = env
    endpoint, body = (
        ("chat/completions", CHAT_BODY)
        if provider == "openai"
        else ("messages", MESSAGES_BODY % b"")
    )
    # Both credential headers at once: neither may leak.
    headers = _caller_headers(provider, {"Authorization": f"Bearer {KEY_A}", "x-api-key": KEY_A})
    status, _, _ = await raw_post(proxy.url + _path(provider, endpoint), body, headers)
    assert status == 200
    sent = fake.requests[-1]
    everything = " ".join(f"{k}: {v}" for k, v in sent.headers.items()).encode() + sent.body
    assert KEY_A.encode() not in everything
    if provider == "openai":
        assert sent.headers["Authorization"] == f"Bearer {UPSTREAM_KEY_OPENAI}"
        assert "x-api-key" not in sent.headers
    else:
        assert sent.headers["x-api-key"] == UPSTREAM_KEY_ANTHROPIC
        assert "Authorization" not in sent.headers


async def test_passthrough_forwards_the_callers_own_key(
    make_proxy: ProxyFactory, fake: FakeUpstream
) -> None:
    proxy = await make_proxy({"passthrough_keys": True})
    own_openai, own_anthropic = "sk-callers-own-openai-key", "sk-ant-callers-own-key"
    client = proxy.openai(key=own_openai)
    await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    assert fake.requests[-1].headers["Authorization"] == f"Bearer {own_openai}"
    led_o = await ledger_for(proxy, fake.records[-1]["request_id"])
    claude = proxy.anthropic(key=own_anthropic)
    await claude.messages.create(
        model="claude-haiku-4-5", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
    )
    assert fake.requests[-1].headers["x-api-key"] == own_anthropic
    led_a = await ledger_for(proxy, fake.records[-1]["request_id"])
    assert led_o.key_name.startswith("passthrough:") and led_a.key_name.startswith("passthrough:")
    assert led_o.key_name != led_a.key_name
    assert own_openai not in led_o.key_name
    # A Metergate key is still swapped for the upstream key in passthrough mode.
    await proxy.openai().chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    assert fake.requests[-1].headers["Authorization"] == f"Bearer {UPSTREAM_KEY_OPENAI}"
    await client.close()
    await claude.close()


# --------------------------------------------------------------------------- compression


def _regzip_events(plain: bytes) -> bytes:
    """What the fake's gzip encoder writes for this SSE body (one flush per event)."""
    encoder = _Gzip()
    events = [e + b"\n\n" for e in plain.split(b"\n\n") if e]
    return b"".join(encoder.chunk(e) for e in events) + encoder.finish()


def _regzip_body(plain: bytes) -> bytes:
    encoder = _Gzip()
    return encoder.chunk(plain) + encoder.finish()


@module_loop
@pytest.mark.parametrize(("provider", "endpoint", "body"), ENDPOINT_BODIES, ids=_IDS)
async def test_gzip_upstream_is_relayed_compressed_and_metered_exactly(
    env: tuple[FakeUpstream, RunningProxy], provider: str, endpoint: str, body: bytes
) -> None:
    fake, proxy = env
    headers = _caller_headers(provider, {"X-Fake-Gzip": "1", "Accept-Encoding": "gzip"})
    status, resp_headers, got = await raw_post(proxy.url + _path(provider, endpoint), body, headers)
    assert status == 200
    assert fake.requests[-1].headers["Accept-Encoding"] == "gzip"
    assert resp_headers["Content-Encoding"] == "gzip"
    plain = gzip.decompress(got)
    # The very bytes the fake compressed, not a re-compression by the proxy.
    stream = b"text/event-stream" in resp_headers["Content-Type"].encode()
    assert got == (_regzip_events(plain) if stream else _regzip_body(plain))
    if not stream:
        assert int(resp_headers["Content-Length"]) == len(got)
    # And the same content as an uncompressed answer.
    _, _, direct = await raw_post(
        fake.url + f"/v1/{endpoint}", body, {"Content-Type": "application/json", **FIXED}
    )
    assert scrub_bytes(plain) == scrub_bytes(direct)

    record = fake.record_for(resp_headers["x-request-id" if provider == "openai" else "request-id"])
    led = await ledger_for(proxy, record["request_id"])
    assert_tokens_equal(led, record)
    assert led.exact and led.cost_nanos == expected_cost(proxy, record)


@module_loop
async def test_accept_encoding_is_narrowed_and_plain_upstream_is_plain(
    env: tuple[FakeUpstream, RunningProxy],
) -> None:
    fake, proxy = env
    # zstd is not decodable by the proxy: not offered upstream.
    headers = _caller_headers("openai", {"Accept-Encoding": "zstd, gzip;q=0.5"})
    status, resp_headers, got = await raw_post(
        proxy.url + _path("openai", "chat/completions"), CHAT_BODY, headers
    )
    assert status == 200
    assert fake.requests[-1].headers["Accept-Encoding"] == "gzip;q=0.5"
    assert "Content-Encoding" not in resp_headers  # the fake did not compress
    assert orjson.loads(got)["object"] == "chat.completion"

    # A stream whose usage chunk must be removed is asked for uncompressed.
    headers = _caller_headers("openai", {"Accept-Encoding": "gzip", "X-Fake-Gzip": "1"})
    status, resp_headers, got = await raw_post(
        proxy.url + _path("openai", "chat/completions"), CHAT_STREAM_NO_USAGE, headers
    )
    assert status == 200
    assert fake.requests[-1].headers["Accept-Encoding"] == "identity"
    assert "Content-Encoding" not in resp_headers
    assert b'"choices":[]' not in got
    record = fake.records[-1]
    led = await ledger_for(proxy, record["request_id"])
    assert_tokens_equal(led, record)
    assert led.exact


# --------------------------------------------------------------------------- streaming


async def _event_times(
    url: str, body: bytes, headers: dict[str, str]
) -> tuple[float, list[tuple[float, bytes]]]:
    """POST and read an SSE response line by line: (start, [(arrival, data line)])."""
    arrivals: list[tuple[float, bytes]] = []
    async with aiohttp.ClientSession() as session:
        t0 = time.perf_counter()
        async with session.post(url, data=body, headers=headers) as resp:
            assert resp.status == 200
            async for line in resp.content:
                if line.startswith(b"data: "):
                    arrivals.append((time.perf_counter(), line))
    return t0, arrivals


@module_loop
@pytest.mark.parametrize(
    ("provider", "endpoint", "body", "content_marker"),
    [
        ("openai", "chat/completions", CHAT_STREAM_NO_USAGE, b'"content":" '),
        ("openai", "responses", RESPONSES_BODY % b"true", b"output_text.delta"),
        ("anthropic", "messages", MESSAGES_BODY % b',"stream":true', b"text_delta"),
    ],
    ids=["chat", "responses", "messages"],
)
async def test_stream_is_relayed_chunk_by_chunk(
    env: tuple[FakeUpstream, RunningProxy],
    provider: str,
    endpoint: str,
    body: bytes,
    content_marker: bytes,
) -> None:
    """With 150 ms between content deltas, each delta reaches the client about when the
    fake writes it, not all at the end."""
    fake, proxy = env
    delay = 0.15
    headers = _caller_headers(
        provider, {"X-Fake-Chunks": "5", "X-Fake-Chunk-Delay-Ms": str(int(delay * 1000))}
    )
    _, arrivals = await _event_times(proxy.url + _path(provider, endpoint), body, headers)
    content = [t for t, line in arrivals if content_marker in line]
    assert len(content) == 5
    last_event = arrivals[-1][0]
    # The first delta is in the client's hands long before the stream ends (4 more
    # delays), and consecutive deltas arrive spread out as they were produced.
    assert last_event - content[0] >= 3.5 * delay
    gaps = [b - a for a, b in itertools.pairwise(content)]
    # (one pair may bunch up if this shared machine pauses the process at a bad moment)
    assert sum(g >= 0.5 * delay for g in gaps) >= len(gaps) - 1, gaps
    record = fake.records[-1]
    assert record["completed"]
    led = await ledger_for(proxy, record["request_id"])
    assert_tokens_equal(led, record)
