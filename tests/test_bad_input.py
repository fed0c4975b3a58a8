"""Bad input never crashes or wedges the proxy, and is answered in the provider's shape.

Two halves:

- Refusals by the proxy (malformed JSON, a body that is not an object, non-UTF-8,
  missing or non-string ``model``, a body over ``server.max_body_bytes`` with or
  without a Content-Length, a corrupt compressed body, an unknown upstream, an unknown
  or missing key, bad tags, an unpriced model under ``reject``), on the OpenAI and the
  Anthropic routes: the exact status and error shape, the SDK's usual exception class,
  nothing sent upstream, and the proxy still serving afterwards.
- Upstream faults (the fake's ``X-Fake-Fault``): a reset is a 502, a silent upstream a
  504, an HTML page passes through with its status, malformed SSE is relayed with exact
  usage and counted, a stream cut short or stalled is charged an estimate of at least
  what was generated.
"""

from __future__ import annotations

import gzip
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
import pytest_asyncio

from proxy.pricing import Catalog, cost_nanos
from proxy.usage import Usage
from tests.conftest import KEY_A, ProxyFactory, RunningProxy
from tests.e2e_support import (
    assert_tokens_equal,
    expected_cost,
    fake_and_proxy,
    fake_usage,
    ledger_for,
    metric_sum,
    raw_post,
    scrub_bytes,
)
from tests.fake_upstream import FakeUpstream

module_loop = pytest.mark.asyncio(loop_scope="module")

MAX_BODY = 64 * 1024
READ_TIMEOUT_S = 1.0
PATHS = {"openai": "/openai/v1/chat/completions", "anthropic": "/anthropic/v1/messages"}
GOOD = {
    "openai": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}]},
    "anthropic": {
        "model": "claude-haiku-4-5",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "hello there"}],
    },
}
MODEL = {"openai": "gpt-4o-mini", "anthropic": "claude-haiku-4-5"}
PROVIDERS = ["openai", "anthropic"]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[FakeUpstream, RunningProxy]]:
    overrides = {
        "server": {"max_body_bytes": MAX_BODY},
        "upstreams": {
            "openai": {"read_timeout_s": READ_TIMEOUT_S},
            "anthropic": {"read_timeout_s": READ_TIMEOUT_S},
        },
    }
    async with fake_and_proxy(tmp_path_factory.mktemp("bad"), overrides) as pair:
        yield pair


def _headers(provider: str, key: str | None = KEY_A, **extra: str) -> dict[str, str]:
    headers = {"Content-Type": "application/json", **extra}
    if key is not None:
        headers["Authorization" if provider == "openai" else "x-api-key"] = (
            f"Bearer {key}" if provider == "openai" else key
        )
    if provider == "anthropic":
        headers["anthropic-version"] = "2023-06-01"
    return headers


def _good_body(provider: str, **extra: Any) -> bytes:
    return orjson.dumps({**GOOD[provider], **extra})


def assert_error_shape(provider: str, body: bytes, code: str) -> dict[str, Any]:
    """The provider's own error shape, exactly, with our code (OpenAI) or the type
    Anthropic uses for that status."""
    obj = orjson.loads(body)
    if provider == "openai":
        assert set(obj) == {"error"}
        assert set(obj["error"]) == {"message", "type", "param", "code"}
        assert obj["error"]["code"] == code
        assert obj["error"]["param"] is None
        err = obj["error"]
    else:
        assert set(obj) == {"type", "error"}
        assert obj["type"] == "error"
        assert set(obj["error"]) == {"type", "message"}
        err = obj["error"]
    assert isinstance(err["message"], str) and len(err["message"]) > 20
    return err  # type: ignore[no-any-return]


ANTHROPIC_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "request_too_large",
    502: "api_error",
    504: "timeout_error",
}
OPENAI_TYPE = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    502: "api_error",
    504: "api_error",
}
SDK_ERROR = {
    ("openai", 400): openai.BadRequestError,
    ("openai", 401): openai.AuthenticationError,
    ("openai", 404): openai.NotFoundError,
    ("openai", 413): openai.APIStatusError,
    ("openai", 502): openai.InternalServerError,
    ("openai", 504): openai.InternalServerError,
    ("anthropic", 400): anthropic.BadRequestError,
    ("anthropic", 401): anthropic.AuthenticationError,
    ("anthropic", 404): anthropic.NotFoundError,
    ("anthropic", 413): anthropic.ContentTooLargeError,
    ("anthropic", 502): anthropic.InternalServerError,
    ("anthropic", 504): anthropic.InternalServerError,
}


@dataclass(frozen=True)
class Refusal:
    """A request the proxy must refuse itself."""

    name: str
    body: Any  # bytes, or a callable of the provider giving bytes
    status: int
    code: str
    headers: dict[str, str] | None = None
    key: str | None = KEY_A
    path: str | None = None  # None: the provider's metered path
    encoding: str | None = None

    def body_for(self, provider: str) -> bytes:
        return self.body(provider) if callable(self.body) else self.body  # type: ignore[no-any-return]


def _too_large(provider: str) -> bytes:
    return (
        _good_body(provider, metadata={"pad": "x" * (MAX_BODY + 10)})
        if provider == "anthropic"
        else _good_body(provider, user="x" * (MAX_BODY + 10))
    )


REFUSALS = [
    Refusal("malformed-json", b'{"model": "gpt-4o-mini", "messages": [', 400, "invalid_json"),
    Refusal("not-an-object", b'["model", "gpt-4o-mini"]', 400, "invalid_json"),
    Refusal("empty-body", b"", 400, "invalid_json"),
    Refusal(
        "non-utf8",
        b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "\xff\xfe\x80"}]}',
        400,
        "invalid_json",
    ),
    Refusal("missing-model", b'{"messages": [], "max_tokens": 5}', 400, "missing_model"),
    Refusal("null-model", b'{"model": null, "max_tokens": 5}', 400, "missing_model"),
    Refusal("number-model", b'{"model": 42, "max_tokens": 5}', 400, "invalid_model"),
    Refusal("list-model", b'{"model": ["gpt-4o"], "max_tokens": 5}', 400, "invalid_model"),
    Refusal("empty-model", b'{"model": "  ", "max_tokens": 5}', 400, "invalid_model"),
    Refusal(
        "unpriced-model",
        lambda p: _good_body(p, model="no-such-model-9000"),
        400,
        "unknown_model_price",
    ),
    Refusal(
        "bad-tags",
        lambda p: _good_body(p),
        400,
        "invalid_tags",
        headers={"X-Metergate-Tags": "ok,not ok!"},
    ),
    Refusal("too-large", _too_large, 413, "request_too_large"),
    Refusal("unknown-key", lambda p: _good_body(p), 401, "invalid_api_key", key="mg-nobody-123456"),
    Refusal("no-key", lambda p: _good_body(p), 401, "invalid_api_key", key=None),
    Refusal(
        "corrupt-gzip",
        b"this is not gzip at all",
        400,
        "invalid_body",
        encoding="gzip",
    ),
]


async def _good_request_succeeds(fake: FakeUpstream, proxy: RunningProxy, provider: str) -> None:
    n = len(fake.requests)
    status, headers, body = await raw_post(
        proxy.url + PATHS[provider], _good_body(provider), _headers(provider)
    )
    assert status == 200, body
    assert len(fake.requests) == n + 1
    led = await ledger_for(proxy, headers["x-request-id" if provider == "openai" else "request-id"])
    assert led.exact and led.cost_nanos > 0


@module_loop
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", REFUSALS, ids=lambda c: c.name)
async def test_refusal_raw(
    env: tuple[FakeUpstream, RunningProxy], case: Refusal, provider: str
) -> None:
    fake, proxy = env
    n_requests = len(fake.requests)
    headers = _headers(provider, case.key, **(case.headers or {}))
    if case.encoding:
        headers["Content-Encoding"] = case.encoding
    status, resp_headers, body = await raw_post(
        proxy.url + (case.path or PATHS[provider]), case.body_for(provider), headers
    )
    assert status == case.status, body
    err = assert_error_shape(provider, body, case.code)
    assert err["type"] == (ANTHROPIC_TYPE if provider == "anthropic" else OPENAI_TYPE)[case.status]
    assert resp_headers["Content-Type"].startswith("application/json")
    assert resp_headers["X-Metergate-Request-Id"].startswith("mgr_")
    assert len(fake.requests) == n_requests  # refused before the upstream
    if case.key == KEY_A:
        # An identified caller's refusal is on record, at no cost.
        led = await proxy.store.get_ledger_record(resp_headers["X-Metergate-Request-Id"])
        assert led is not None
        assert (led.status, led.error, led.cost_nanos) == (case.status, case.code, 0)
    await _good_request_succeeds(fake, proxy, provider)


def _sdk(provider: str, proxy: RunningProxy, key: str, base: str | None = None) -> Any:
    if provider == "openai":
        return openai.AsyncOpenAI(
            base_url=base or f"{proxy.url}/openai/v1", api_key=key, max_retries=0
        )
    return anthropic.AsyncAnthropic(
        base_url=base or f"{proxy.url}/anthropic", api_key=key, max_retries=0
    )


async def _sdk_post(client: Any, provider: str, body: bytes, headers: dict[str, str]) -> Any:
    """The SDK's own request machinery with a raw body (how an app would send bytes
    the SDK's typed methods cannot produce)."""
    path = "/chat/completions" if provider == "openai" else "/v1/messages"
    return await client.post(
        path,
        cast_to=object,
        content=body,
        options={"headers": {"Content-Type": "application/json", **headers}},
    )


@module_loop
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize(
    "case",
    [c for c in REFUSALS if c.key is not None],
    ids=lambda c: c.name,
)
async def test_refusal_raises_the_sdks_usual_exception(
    env: tuple[FakeUpstream, RunningProxy], case: Refusal, provider: str
) -> None:
    fake, proxy = env
    n_requests = len(fake.requests)
    client = _sdk(provider, proxy, case.key or KEY_A)
    headers = dict(case.headers or {})
    if case.encoding:
        headers["Content-Encoding"] = case.encoding
    expected = SDK_ERROR[(provider, case.status)]
    with pytest.raises(expected) as info:
        await _sdk_post(client, provider, case.body_for(provider), headers)
    exc = info.value
    assert type(exc) is expected
    assert exc.status_code == case.status
    if provider == "openai":
        assert exc.code == case.code
    else:
        assert exc.body["error"]["type"] == ANTHROPIC_TYPE[case.status]
    assert len(fake.requests) == n_requests
    await client.close()


@module_loop
@pytest.mark.parametrize("provider", PROVIDERS)
async def test_sdk_typed_calls_get_refusals(
    env: tuple[FakeUpstream, RunningProxy], provider: str
) -> None:
    """The typed SDK methods themselves: unknown key, unknown upstream, non-string model,
    an oversized prompt."""
    fake, proxy = env
    n_requests = len(fake.requests)

    async def create(client: Any, **kw: Any) -> Any:
        if provider == "openai":
            return await client.chat.completions.create(**{**GOOD[provider], **kw})
        return await client.messages.create(**{**GOOD[provider], **kw})

    bad_key = _sdk(provider, proxy, "mg-unknown-key-000000")
    auth_error = (
        openai.AuthenticationError if provider == "openai" else anthropic.AuthenticationError
    )
    with pytest.raises(auth_error):
        await create(bad_key)

    nowhere = _sdk(
        provider,
        proxy,
        KEY_A,
        base=f"{proxy.url}/nope/v1" if provider == "openai" else f"{proxy.url}/nope",
    )
    not_found = openai.NotFoundError if provider == "openai" else anthropic.NotFoundError
    with pytest.raises(not_found) as info:
        await create(nowhere)
    assert "no upstream named 'nope'" in str(info.value)

    client = _sdk(provider, proxy, KEY_A)
    bad_request = openai.BadRequestError if provider == "openai" else anthropic.BadRequestError
    with pytest.raises(bad_request):
        await create(client, model=123)
    too_large = SDK_ERROR[(provider, 413)]
    with pytest.raises(too_large) as large:
        await create(client, messages=[{"role": "user", "content": "y" * (MAX_BODY + 1)}])
    assert large.value.status_code == 413
    assert len(fake.requests) == n_requests
    for c in (bad_key, nowhere, client):
        await c.close()
    await _good_request_succeeds(fake, proxy, provider)


@module_loop
@pytest.mark.parametrize("provider", PROVIDERS)
async def test_body_size_limit_is_exact_and_holds_without_content_length(
    env: tuple[FakeUpstream, RunningProxy], provider: str
) -> None:
    fake, proxy = env
    base = _good_body(provider)
    # Pad with JSON whitespace to exactly the limit: accepted and forwarded as is.
    at_limit = base[:-1] + b" " * (MAX_BODY - len(base)) + b"}"
    assert len(at_limit) == MAX_BODY
    status, _, body = await raw_post(proxy.url + PATHS[provider], at_limit, _headers(provider))
    assert status == 200, body
    assert fake.requests[-1].body == at_limit
    over = base[:-1] + b" " * (MAX_BODY + 1 - len(base)) + b"}"
    status, _, body = await raw_post(proxy.url + PATHS[provider], over, _headers(provider))
    assert status == 413
    assert_error_shape(provider, body, "request_too_large")

    # Chunked (no Content-Length): the limit is enforced while reading.
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b" " * (MAX_BODY // 2)

    n_requests = len(fake.requests)
    async with (
        aiohttp.ClientSession() as session,
        session.post(proxy.url + PATHS[provider], data=chunks(), headers=_headers(provider)) as r,
    ):
        assert r.status == 413
        assert "Content-Length" not in r.request_info.headers
        assert_error_shape(provider, await r.read(), "request_too_large")
    assert len(fake.requests) == n_requests
    await _good_request_succeeds(fake, proxy, provider)


@module_loop
async def test_compressed_request_body_is_forwarded_decoded(
    env: tuple[FakeUpstream, RunningProxy],
) -> None:
    """A gzip request body is decoded by the server; the proxy forwards the decoded bytes
    without the Content-Encoding that no longer applies to them."""
    fake, proxy = env
    body = _good_body("openai")
    headers = _headers("openai", **{"Content-Encoding": "gzip"})
    status, _, resp = await raw_post(proxy.url + PATHS["openai"], gzip.compress(body), headers)
    assert status == 200, resp
    assert fake.requests[-1].body == body
    assert "Content-Encoding" not in fake.requests[-1].headers


@module_loop
@pytest.mark.parametrize("provider", PROVIDERS)
async def test_unknown_upstream_and_path_tricks(
    env: tuple[FakeUpstream, RunningProxy], provider: str
) -> None:
    fake, proxy = env
    n_requests = len(fake.requests)
    status, _, body = await raw_post(
        proxy.url + "/nope/v1/chat/completions", _good_body(provider), _headers(provider)
    )
    assert status == 404
    assert_error_shape("openai", body, "not_found")  # no upstream, so no provider: OpenAI's
    for path in (f"/{provider}/v1/%2e%2e/admin", f"/{provider}/v1/a%2Fb"):
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                aiohttp.client.URL(proxy.url + path, encoded=True),
                data=_good_body(provider),
                headers=_headers(provider),
            ) as r,
        ):
            assert r.status == 400
            assert_error_shape(provider, await r.read(), "invalid_path")
    assert len(fake.requests) == n_requests
    await _good_request_succeeds(fake, proxy, provider)


# --------------------------------------------------------------------------- upstream faults


def _stream_body(provider: str) -> bytes:
    return _good_body(provider, stream=True)


@module_loop
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("stream", [False, True], ids=["body", "stream"])
async def test_upstream_reset_is_502(
    env: tuple[FakeUpstream, RunningProxy], provider: str, stream: bool
) -> None:
    fake, proxy = env
    body = _stream_body(provider) if stream else _good_body(provider)
    status, headers, resp = await raw_post(
        proxy.url + PATHS[provider], body, _headers(provider, **{"X-Fake-Fault": "reset"})
    )
    assert status == 502
    err = assert_error_shape(provider, resp, "upstream_unavailable")
    assert err["type"] == "api_error"
    led = await proxy.store.get_ledger_record(headers["X-Metergate-Request-Id"])
    assert led is not None and led.status == 502 and led.cost_nanos == 0
    assert led.error == "upstream_unavailable"
    client = _sdk(provider, proxy, KEY_A)
    with pytest.raises(SDK_ERROR[(provider, 502)]):
        await _sdk_post(client, provider, body, {"X-Fake-Fault": "reset"})
    await client.close()
    await _good_request_succeeds(fake, proxy, provider)


@module_loop
@pytest.mark.parametrize("provider", PROVIDERS)
async def test_upstream_timeout_is_504(
    env: tuple[FakeUpstream, RunningProxy], provider: str
) -> None:
    fake, proxy = env
    knobs = {"X-Fake-Fault": "timeout", "X-Fake-Delay-Ms": "5000"}
    status, headers, resp = await raw_post(
        proxy.url + PATHS[provider], _good_body(provider), _headers(provider, **knobs)
    )
    assert status == 504
    err = assert_error_shape(provider, resp, "upstream_timeout")
    assert err["type"] == ("timeout_error" if provider == "anthropic" else "api_error")
    assert "read timeout 1 s" in err["message"]
    led = await proxy.store.get_ledger_record(headers["X-Metergate-Request-Id"])
    assert led is not None and (led.status, led.error) == (504, "upstream_timeout")
    await fake.wait_idle()  # the fake noticed the proxy gave up
    assert fake.records[-1]["disconnected"]
    await _good_request_succeeds(fake, proxy, provider)


@module_loop
@pytest.mark.parametrize("provider", PROVIDERS)
async def test_stalled_body_is_504_and_charged_an_estimate(
    env: tuple[FakeUpstream, RunningProxy], provider: str
) -> None:
    """Headers arrive, then the body stalls past the read timeout: 504, and since the
    provider answered 200 (and bills it), the input is charged as an estimate."""
    _, proxy = env
    knobs = {"X-Fake-Fault": "stall", "X-Fake-Delay-Ms": "5000"}
    status, headers, resp = await raw_post(
        proxy.url + PATHS[provider], _good_body(provider), _headers(provider, **knobs)
    )
    assert status == 504
    assert_error_shape(provider, resp, "upstream_timeout")
    led = await proxy.store.get_ledger_record(headers["X-Metergate-Request-Id"])
    assert led is not None
    assert (led.status, led.error, led.exact) == (504, "upstream_timeout", False)
    assert led.input_tokens > 0 and led.cost_nanos > 0


@module_loop
@pytest.mark.parametrize("provider", PROVIDERS)
async def test_cut_body_is_502_and_charged_an_estimate(
    env: tuple[FakeUpstream, RunningProxy], provider: str
) -> None:
    fake, proxy = env
    status, headers, resp = await raw_post(
        proxy.url + PATHS[provider],
        _good_body(provider),
        _headers(provider, **{"X-Fake-Fault": "cut"}),
    )
    assert status == 502
    assert_error_shape(provider, resp, "upstream_unavailable")
    led = await proxy.store.get_ledger_record(headers["X-Metergate-Request-Id"])
    assert led is not None
    assert (led.error, led.exact) == ("upstream_reset", False)
    assert led.input_tokens > 0 and led.cost_nanos > 0
    await _good_request_succeeds(fake, proxy, provider)


@module_loop
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("status_code", [502, 200, 503])
async def test_html_answer_passes_through_with_its_status(
    env: tuple[FakeUpstream, RunningProxy], provider: str, status_code: int
) -> None:
    fake, proxy = env
    knobs = {"X-Fake-Fault": f"html:{status_code}"}
    status, headers, resp = await raw_post(
        proxy.url + PATHS[provider], _good_body(provider), _headers(provider, **knobs)
    )
    _, d_headers, direct = await raw_post(
        fake.url + ("/v1/chat/completions" if provider == "openai" else "/v1/messages"),
        _good_body(provider),
        _headers(provider, **knobs),
    )
    assert status == status_code
    assert resp == direct and resp.startswith(b"<html>")
    assert headers["Content-Type"] == d_headers["Content-Type"] == "text/html; charset=UTF-8"
    upstream_id = headers["x-request-id" if provider == "openai" else "request-id"]
    led = await ledger_for(proxy, upstream_id)
    assert led.status == status_code
    if status_code == 200:
        # A 200 without usage: the provider billed it, the proxy estimates it.
        assert not led.exact and led.input_tokens > 0 and led.cost_nanos > 0
    else:
        assert led.cost_nanos == 0
    if status_code >= 500:
        client = _sdk(provider, proxy, KEY_A)
        with pytest.raises(SDK_ERROR[(provider, 502)]) as info:
            await _sdk_post(client, provider, _good_body(provider), knobs)
        assert info.value.status_code == status_code
        await client.close()


@module_loop
@pytest.mark.parametrize(
    ("provider", "include_usage"),
    [("openai", False), ("openai", True), ("anthropic", False)],
    ids=["openai-injected", "openai-include-usage", "anthropic"],
)
async def test_malformed_sse_is_relayed_metered_exactly_and_counted(
    env: tuple[FakeUpstream, RunningProxy], provider: str, include_usage: bool
) -> None:
    fake, proxy = env
    before = proxy.metric("metergate_sse_malformed_events_total", {"upstream": provider})
    # 4 content deltas, each followed by one of the fake's 4 kinds of garbage block
    # (truncated JSON, a line that is no SSE field, invalid UTF-8, "{not json}").
    knobs = {"X-Fake-Fault": "malformed-sse", "X-Fake-Chunks": "4", "X-Fake-Output": "12"}
    extra = {"stream_options": {"include_usage": True}} if include_usage else {}
    body = _good_body(provider, stream=True, **extra)
    status, headers, got = await raw_post(
        proxy.url + PATHS[provider], body, _headers(provider, **knobs)
    )
    assert status == 200
    upstream_id = headers["x-request-id" if provider == "openai" else "request-id"]
    record = fake.record_for(upstream_id)
    assert record["malformed_events"] == 4 and record["completed"]

    # The garbage reached the client as the upstream sent it: the client's bytes are
    # the fake's for the body the proxy sent, minus only the usage chunk the proxy
    # asked for itself (ids and clocks aside).
    upstream_body = fake.requests[-1].body
    _, _, direct = await raw_post(
        fake.url + ("/v1/chat/completions" if provider == "openai" else "/v1/messages"),
        upstream_body,
        _headers(provider, **knobs),
    )
    if provider == "openai" and not include_usage:
        direct = b"\n\n".join(b for b in direct.split(b"\n\n") if b'"choices":[]' not in b)
    assert scrub_bytes(got) == scrub_bytes(direct)
    assert b"\xff\xfe" in got and b"{not json}" in got

    led = await ledger_for(proxy, upstream_id)
    if provider == "openai":
        assert record["include_usage"] is True  # injected when the client did not ask
    assert_tokens_equal(led, record)
    assert led.exact and led.cost_nanos == expected_cost(proxy, record)
    # Truncated JSON, invalid UTF-8 and "{not json}" are malformed events; a bare line
    # without a colon is, per the SSE spec, a field with an empty value, ignored.
    counted = proxy.metric("metergate_sse_malformed_events_total", {"upstream": provider}) - before
    assert counted == 3


@module_loop
@pytest.mark.parametrize("provider", PROVIDERS)
async def test_cut_stream_is_estimated_and_charged_for_what_was_sent(
    env: tuple[FakeUpstream, RunningProxy], provider: str
) -> None:
    fake, proxy = env
    knobs = {"X-Fake-Fault": "cut", "X-Fake-Chunks": "6", "X-Fake-Output": "30"}
    estimated_before = metric_sum(proxy, "metergate_estimated_requests_total", upstream=provider)
    received = b""
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            proxy.url + PATHS[provider],
            data=_stream_body(provider),
            headers=_headers(provider, **knobs),
        ) as resp,
    ):
        assert resp.status == 200
        # The client sees the break as the provider's own client would: the chunked
        # body never ends.
        with pytest.raises(aiohttp.ClientPayloadError):
            async for chunk in resp.content.iter_any():
                received += chunk
        upstream_id = resp.headers["x-request-id" if provider == "openai" else "request-id"]
    record = fake.record_for(upstream_id)
    assert not record["completed"] and record["output_tokens_sent"] == 15
    assert received  # what was relayed before the cut
    led = await ledger_for(proxy, upstream_id)
    assert led.exact is False
    assert led.error == "upstream_reset"
    assert led.input_tokens > 0
    assert led.output_tokens >= record["output_tokens_sent"]
    price = Catalog.load(None).resolve(MODEL[provider])
    assert price is not None
    floor = cost_nanos(price, Usage(input=led.input_tokens, output=record["output_tokens_sent"]))
    assert led.cost_nanos >= floor > 0
    if provider == "anthropic":
        # message_start reported the input exactly; only the output is estimated.
        assert led.input_tokens == record["tokens"]["input"]
    estimated = metric_sum(proxy, "metergate_estimated_requests_total", upstream=provider)
    assert estimated == estimated_before + 1

    # The SDK sees the break as it would from the provider: the same exception as when
    # it reads the same cut stream straight from the fake.
    async def sdk_failure(client: Any) -> type[BaseException]:
        try:
            if provider == "openai":
                stream = await client.chat.completions.create(
                    **GOOD[provider], stream=True, extra_headers=knobs
                )
            else:
                stream = await client.messages.create(
                    **GOOD[provider], stream=True, extra_headers=knobs
                )
            async for _ in stream:
                pass
        except Exception as exc:
            return type(exc)
        finally:
            await client.close()
        raise AssertionError("the SDK took a cut stream for a complete one")

    direct_base = fake.url + ("/v1" if provider == "openai" else "")
    via = await sdk_failure(_sdk(provider, proxy, KEY_A))
    direct = await sdk_failure(_sdk(provider, proxy, "sk-direct", base=direct_base))
    assert via is direct
    await _good_request_succeeds(fake, proxy, provider)


@module_loop
@pytest.mark.parametrize("provider", PROVIDERS)
async def test_stalled_stream_is_estimated(
    env: tuple[FakeUpstream, RunningProxy], provider: str
) -> None:
    fake, proxy = env
    knobs = {"X-Fake-Fault": "stall", "X-Fake-Delay-Ms": "5000", "X-Fake-Chunks": "4"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            proxy.url + PATHS[provider],
            data=_stream_body(provider),
            headers=_headers(provider, **knobs),
        ) as resp,
    ):
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
        upstream_id = resp.headers["x-request-id" if provider == "openai" else "request-id"]
    record = fake.record_for(upstream_id)
    led = await ledger_for(proxy, upstream_id)
    assert (led.error, led.exact) == ("upstream_timeout", False)
    assert led.output_tokens >= record["output_tokens_sent"] > 0
    assert led.cost_nanos > 0


@module_loop
@pytest.mark.parametrize("provider", PROVIDERS)
async def test_error_event_mid_stream_is_relayed_and_estimated(
    env: tuple[FakeUpstream, RunningProxy], provider: str
) -> None:
    fake, proxy = env
    knobs = {"X-Fake-Fault": "error-event", "X-Fake-Chunks": "4"}
    status, headers, got = await raw_post(
        proxy.url + PATHS[provider], _stream_body(provider), _headers(provider, **knobs)
    )
    assert status == 200
    assert (b"overloaded_error" if provider == "anthropic" else b"server_error") in got
    upstream_id = headers["x-request-id" if provider == "openai" else "request-id"]
    record = fake.record_for(upstream_id)
    led = await ledger_for(proxy, upstream_id)
    assert (led.error, led.exact) == ("stream_incomplete", False)
    assert led.output_tokens >= record["output_tokens_sent"] > 0


# --------------------------------------------------------------------------- price policy


async def test_unpriced_model_with_charge_fallback(
    make_proxy: ProxyFactory, fake: FakeUpstream
) -> None:
    proxy = await make_proxy(
        {
            "unknown_model": "charge_fallback",
            "fallback_price": {"input": "2.50", "output": "7.50"},
        }
    )
    for provider in PROVIDERS:
        status, headers, body = await raw_post(
            proxy.url + PATHS[provider],
            _good_body(provider, model="mystery-model-1"),
            _headers(provider, **{"X-Fake-Cached": "0"}),
        )
        assert status == 200, body
        record = fake.record_for(headers["x-request-id" if provider == "openai" else "request-id"])
        led = await ledger_for(proxy, record["request_id"])
        fallback = Catalog.fallback({"input": "2.50", "output": "7.50"})
        assert led.cost_nanos == cost_nanos(fallback, fake_usage(record)) > 0
        assert led.exact and led.extra.get("priced_by") == "fallback"
        assert proxy.metric("metergate_unpriced_requests_total", {"upstream": provider}) == 1
