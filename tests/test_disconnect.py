"""A client that leaves mid-stream: the upstream request is cancelled, and the tokens
generated so far are charged once, as an estimate.

"Generated so far" is bounded on both sides by what can be observed: the proxy counts
the output it received from the upstream (whether or not it could still relay it), so
the charged output lies between what the client had received when it left and what
the fake had sent (``output_tokens_sent``; every streamed word is exactly one tiktoken
token, so the two are comparable). The input is the request's, counted by the proxy
(OpenAI) or reported in ``message_start`` (Anthropic).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
import pytest_asyncio

from proxy.ledger import LedgerRecord
from proxy.pricing import cost_nanos
from proxy.usage import Usage
from tests.conftest import KEY_A, RunningProxy
from tests.e2e_support import (
    catalog_price,
    fake_and_proxy,
    ledger_by_upstream_id,
    metric_sum,
    wait_for,
)
from tests.fake_upstream import FakeUpstream

pytestmark = pytest.mark.asyncio(loop_scope="module")

PROVIDERS = ["openai", "anthropic"]
PATHS = {"openai": "/openai/v1/chat/completions", "anthropic": "/anthropic/v1/messages"}
BODIES = {
    "openai": {
        "model": "gpt-4o-mini",
        "stream": True,
        "messages": [{"role": "user", "content": "Tell me a long story about a cat."}],
    },
    "anthropic": {
        "model": "claude-haiku-4-5",
        "max_tokens": 1024,
        "stream": True,
        "messages": [{"role": "user", "content": "Tell me a long story about a cat."}],
    },
}
ID_HEADER = {"openai": "x-request-id", "anthropic": "request-id"}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[FakeUpstream, RunningProxy]]:
    async with fake_and_proxy(tmp_path_factory.mktemp("disconnect")) as pair:
        yield pair


def _headers(provider: str, knobs: dict[str, str]) -> dict[str, str]:
    auth = {"Authorization": f"Bearer {KEY_A}"} if provider == "openai" else {"x-api-key": KEY_A}
    return {"Content-Type": "application/json", "anthropic-version": "2023-06-01", **auth, **knobs}


def _delta_text(provider: str, data: bytes) -> str:
    """The generated text in one SSE data line ("" for other events)."""
    if data == b"[DONE]":
        return ""
    obj = orjson.loads(data)
    if provider == "openai":
        choices = obj.get("choices") or []
        return "".join((c.get("delta") or {}).get("content") or "" for c in choices)
    if obj.get("type") == "content_block_delta":
        return str(obj["delta"].get("text", ""))
    return ""


def _tokens(text: str) -> int:
    # The fake's words (" the", " cat", ...) are one token each.
    return len(text.split())


async def _settled(
    fake: FakeUpstream,
    proxy: RunningProxy,
    upstream_id: str,
    t_close: float,
    *,
    linger: float = 0.3,
) -> tuple[dict[str, Any], LedgerRecord, float]:
    """Wait until the fake saw the disconnect and the proxy recorded the request;
    returns the fake's record, the one ledger record, and how long the fake took to
    see the upstream connection closed after the client left."""
    record = fake.record_for(upstream_id)
    await wait_for(lambda: record["disconnected"], within=10, what="upstream disconnect")
    seen_after = time.perf_counter() - t_close
    await fake.wait_idle()

    async def one_record() -> bool:
        return len((await ledger_by_upstream_id(proxy)).get(upstream_id, [])) >= 1

    await wait_for(one_record, within=5, what="the ledger record")
    await asyncio.sleep(linger)  # would a second record for it appear?
    found = (await ledger_by_upstream_id(proxy))[upstream_id]
    assert len(found) == 1, f"{len(found)} ledger records for one request"
    return record, found[0], seen_after


def _assert_charged_so_far(
    proxy: RunningProxy, provider: str, record: dict[str, Any], led: LedgerRecord, received: int
) -> None:
    assert not record["completed"]
    assert led.error == "client_disconnect"
    assert led.exact is False
    assert led.status == 200 and led.stream
    assert led.input_tokens > 0
    if provider == "anthropic":
        assert led.input_tokens == record["tokens"]["input"]  # from message_start
    # Output: at least what the client got, at most what the upstream produced.
    assert received <= led.output_tokens <= record["output_tokens_sent"], (
        received,
        led.output_tokens,
        record["output_tokens_sent"],
    )
    price = catalog_price(proxy, record)
    usage = Usage(input=led.input_tokens, output=led.output_tokens, exact=False)
    assert led.cost_nanos == cost_nanos(price, usage) > 0


async def _read_then_close(
    proxy: RunningProxy, provider: str, knobs: dict[str, str], deltas_wanted: int
) -> tuple[str, int, float]:
    """Read a stream with a raw client until ``deltas_wanted`` content deltas arrived,
    then drop the connection. Returns the upstream id, the tokens received, and when
    the connection was closed."""
    received = ""
    deltas = 0
    session = aiohttp.ClientSession()
    resp = await session.post(
        proxy.url + PATHS[provider],
        data=orjson.dumps(BODIES[provider]),
        headers=_headers(provider, knobs),
    )
    assert resp.status == 200
    upstream_id = resp.headers[ID_HEADER[provider]]
    async for line in resp.content:
        if line.startswith(b"data: "):
            text = _delta_text(provider, line[6:].strip())
            if text:
                received += text
                deltas += 1
                if deltas == deltas_wanted:
                    break
    resp.close()  # drops the connection: the body was not read to the end
    await session.close()
    return upstream_id, _tokens(received), time.perf_counter()


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_raw_client_leaves_a_slow_stream(
    env: tuple[FakeUpstream, RunningProxy], provider: str
) -> None:
    fake, proxy = env
    estimated_before = metric_sum(proxy, "metergate_estimated_requests_total", upstream=provider)
    n_records = len(await proxy.store.ledger_records())
    knobs = {"X-Fake-Chunks": "20", "X-Fake-Output": "40", "X-Fake-Chunk-Delay-Ms": "100"}
    upstream_id, received, t_close = await _read_then_close(proxy, provider, knobs, 3)
    assert received == 6

    record, led, seen_after = await _settled(fake, proxy, upstream_id, t_close)
    assert seen_after < 1.0, f"the upstream stayed connected {seen_after:.2f} s"
    assert record["chunks_sent"] < record["chunks_planned"]
    _assert_charged_so_far(proxy, provider, record, led, received)
    assert len(await proxy.store.ledger_records()) == n_records + 1
    estimated = metric_sum(proxy, "metergate_estimated_requests_total", upstream=provider)
    assert estimated == estimated_before + 1


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_client_leaving_during_a_long_pause_cancels_the_upstream_promptly(
    env: tuple[FakeUpstream, RunningProxy], provider: str
) -> None:
    """A reasoning model can think for a long time between two events, and is billed for
    it. The proxy must notice the client left without waiting for the next event."""
    fake, proxy = env
    knobs = {"X-Fake-Chunks": "3", "X-Fake-Output": "6", "X-Fake-Chunk-Delay-Ms": "4000"}
    upstream_id, received, t_close = await _read_then_close(proxy, provider, knobs, 1)
    assert received == 2
    record, led, seen_after = await _settled(fake, proxy, upstream_id, t_close)
    assert seen_after < 2.0, f"the upstream stayed connected {seen_after:.2f} s"
    assert record["chunks_sent"] == 1
    _assert_charged_so_far(proxy, provider, record, led, received)


async def _sdk_reads_then_closes(
    proxy: RunningProxy, provider: str, sync: bool, knobs: dict[str, str]
) -> tuple[str, int, float]:
    """The official SDK opens a stream, reads three content deltas, closes it."""
    kwargs = {**BODIES[provider], "extra_headers": knobs}

    def text_of(event: Any) -> str:
        if provider == "openai":
            return "".join(c.delta.content or "" for c in event.choices)
        if event.type == "content_block_delta" and event.delta.type == "text_delta":
            return str(event.delta.text)
        return ""

    if sync:

        def run() -> tuple[str, int, float]:
            client = proxy.openai_sync() if provider == "openai" else proxy.anthropic_sync()
            create = (
                client.chat.completions.with_raw_response.create
                if provider == "openai"
                else client.messages.with_raw_response.create
            )
            raw = create(**kwargs)
            stream = raw.parse()
            text, deltas = "", 0
            for event in stream:
                piece = text_of(event)
                if piece:
                    text, deltas = text + piece, deltas + 1
                    if deltas == 3:
                        break
            stream.close()
            t_close = time.perf_counter()
            client.close()
            return raw.headers[ID_HEADER[provider]], _tokens(text), t_close

        return await asyncio.to_thread(run)

    aclient: Any = proxy.openai() if provider == "openai" else proxy.anthropic()
    acreate = (
        aclient.chat.completions.with_raw_response.create
        if provider == "openai"
        else aclient.messages.with_raw_response.create
    )
    raw = await acreate(**kwargs)
    astream = raw.parse()
    if asyncio.iscoroutine(astream):
        astream = await astream
    text, deltas = "", 0
    async for event in astream:
        piece = text_of(event)
        if piece:
            text, deltas = text + piece, deltas + 1
            if deltas == 3:
                break
    await astream.close()
    t_close = time.perf_counter()
    await aclient.close()
    return raw.headers[ID_HEADER[provider]], _tokens(text), t_close


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
@pytest.mark.parametrize("provider", PROVIDERS)
async def test_sdk_closes_a_stream_early(
    env: tuple[FakeUpstream, RunningProxy], provider: str, sync: bool
) -> None:
    fake, proxy = env
    knobs = {"X-Fake-Chunks": "20", "X-Fake-Output": "60", "X-Fake-Chunk-Delay-Ms": "80"}
    upstream_id, received, t_close = await _sdk_reads_then_closes(proxy, provider, sync, knobs)
    assert received == 9
    record, led, seen_after = await _settled(fake, proxy, upstream_id, t_close)
    assert seen_after < 1.0, f"the upstream stayed connected {seen_after:.2f} s"
    _assert_charged_so_far(proxy, provider, record, led, received)


async def test_proxy_keeps_serving_after_disconnects(
    env: tuple[FakeUpstream, RunningProxy],
) -> None:
    """Many clients leaving at once leave nothing behind: every request is recorded
    exactly once, and a normal request still works."""
    fake, proxy = env
    knobs = {"X-Fake-Chunks": "10", "X-Fake-Output": "20", "X-Fake-Chunk-Delay-Ms": "50"}
    results = await asyncio.gather(
        *(_read_then_close(proxy, PROVIDERS[i % 2], knobs, 1 + i % 3) for i in range(20))
    )
    for upstream_id, received, t_close in results:
        record, led, _ = await _settled(fake, proxy, upstream_id, t_close, linger=0)
        _assert_charged_so_far(proxy, record["provider"], record, led, received)
    await asyncio.sleep(0.3)
    by_id = await ledger_by_upstream_id(proxy)
    assert all(len(by_id[upstream_id]) == 1 for upstream_id, _, _ in results)
    client = proxy.openai()
    completion = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "still there?"}]
    )
    assert completion.choices[0].message.content
    await client.close()
