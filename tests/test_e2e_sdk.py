"""The official SDKs through the proxy, exactly as against the provider.

A matrix over endpoint (chat, responses, completions, embeddings, Anthropic messages)
× streamed / not × sync client (in a thread) / async client. Each case sends the same
request twice, once through the proxy and once straight to the fake upstream, and
checks that:

- the SDK's parsed result (every event of a stream) is the same both ways, apart from
  the ids and timestamps the fake draws fresh for each response;
- the proxy wrote exactly one ledger record for it, tied to the fake's record by the
  upstream request id, with the fake's token counts kind by kind (cached, reasoning,
  Anthropic 5-minute and 1-hour cache writes), marked exact;
- its cost is ``cost_nanos(catalog price, reported usage)`` to the nano-dollar;
- the caller, team, tags (``X-Metergate-Tags``) and end user are on the record;
- ``X-Metergate-Request-Id`` names the record, ``X-Metergate-Cost-USD`` (non-streamed
  only) is its cost.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anthropic
import openai
import pytest
import pytest_asyncio

from proxy.report import nanos_to_usd_str
from tests.conftest import KEY_A, KEY_B, RunningProxy
from tests.e2e_support import (
    assert_tokens_equal,
    expected_cost,
    fake_and_proxy,
    ledger_for,
    scrub,
)
from tests.fake_upstream import FakeUpstream

# One fake and one proxy for the whole module (records are found by request id, so
# tests do not see each other's), on one module-wide event loop.
pytestmark = pytest.mark.asyncio(loop_scope="module")

PROMPT = "Write one short sentence about a cat."


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[FakeUpstream, RunningProxy]]:
    async with fake_and_proxy(tmp_path_factory.mktemp("e2e")) as pair:
        yield pair


@pytest.fixture
def fake(env: tuple[FakeUpstream, RunningProxy]) -> FakeUpstream:
    return env[0]


@pytest.fixture
def proxy(env: tuple[FakeUpstream, RunningProxy]) -> RunningProxy:
    return env[1]


@dataclass(frozen=True)
class Case:
    """One endpoint call: how to make it with an SDK client, and what to expect."""

    name: str
    provider: str  # "openai" | "anthropic"
    stream: bool
    knobs: dict[str, str] = field(default_factory=dict)
    kwargs: dict[str, Any] = field(default_factory=dict)
    end_user: str | None = None
    key: str = KEY_A

    def create(self, client: Any) -> Callable[..., Any]:
        """The SDK's ``with_raw_response.create`` for this endpoint."""
        if self.name.startswith("chat"):
            return client.chat.completions.with_raw_response.create  # type: ignore[no-any-return]
        if self.name.startswith("responses"):
            return client.responses.with_raw_response.create  # type: ignore[no-any-return]
        if self.name.startswith("completions"):
            return client.completions.with_raw_response.create  # type: ignore[no-any-return]
        if self.name.startswith("embeddings"):
            return client.embeddings.with_raw_response.create  # type: ignore[no-any-return]
        return client.messages.with_raw_response.create  # type: ignore[no-any-return]

    def call_kwargs(self, tags: str | None) -> dict[str, Any]:
        # Fixed sizes: the fake derives default counts from the body length, and a chat
        # stream's body grows by the include_usage the proxy injects.
        headers = {"X-Fake-Input": "40", "X-Fake-Output": "12", **self.knobs}
        if tags:
            headers["X-Metergate-Tags"] = tags
        kw = dict(self.kwargs)
        if self.stream:
            kw["stream"] = True
        return {**kw, "extra_headers": headers}


CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": PROMPT}]}
RESPONSES = {"model": "o4-mini", "input": PROMPT}
COMPLETIONS = {"model": "gpt-3.5-turbo-instruct", "prompt": PROMPT}
EMBEDDINGS = {"model": "text-embedding-3-small", "input": [PROMPT, "and a dog"]}
MESSAGES = {
    "model": "claude-haiku-4-5",
    "max_tokens": 256,
    "messages": [{"role": "user", "content": PROMPT}],
}

CASES = [
    Case(
        "chat",
        "openai",
        False,
        {"X-Fake-Cached": "10", "X-Fake-Reasoning": "5"},
        {**CHAT, "user": "end-user-chat"},
        end_user="end-user-chat",
    ),
    Case(
        "chat-include-usage",
        "openai",
        True,
        {"X-Fake-Cached": "7", "X-Fake-Reasoning": "3"},
        {**CHAT, "stream_options": {"include_usage": True}, "safety_identifier": "si-7"},
        end_user="si-7",
    ),
    # The client did not ask for usage: the proxy injects include_usage and must hide
    # the extra usage chunk, so the SDK sees the same events as straight from the fake.
    Case("chat-injected", "openai", True, {"X-Fake-Cached": "4"}, CHAT, key=KEY_B),
    Case(
        "responses",
        "openai",
        False,
        {"X-Fake-Cached": "6", "X-Fake-Reasoning": "9"},
        {**RESPONSES, "safety_identifier": "si-resp"},
        end_user="si-resp",
    ),
    Case("responses", "openai", True, {"X-Fake-Cached": "2", "X-Fake-Reasoning": "4"}, RESPONSES),
    Case("completions", "openai", False, {}, {**COMPLETIONS, "user": "u-c"}, end_user="u-c"),
    Case("completions-injected", "openai", True, {}, COMPLETIONS, key=KEY_B),
    Case("embeddings", "openai", False, {}, EMBEDDINGS),
    Case(
        "messages",
        "anthropic",
        False,
        {"X-Fake-Cached": "11", "X-Fake-Cache-Write": "5", "X-Fake-Cache-Write-1h": "3"},
        {**MESSAGES, "metadata": {"user_id": "end-user-claude"}},
        end_user="end-user-claude",
    ),
    Case(
        "messages",
        "anthropic",
        True,
        {
            "X-Fake-Cached": "2",
            "X-Fake-Cache-Write": "4",
            "X-Fake-Cache-Write-1h": "6",
            "X-Fake-Reasoning": "5",
        },
        {**MESSAGES, "metadata": {"user_id": "end-user-claude-s"}},
        end_user="end-user-claude-s",
    ),
]


def _case_id(case: Case) -> str:
    return f"{case.name}-{'stream' if case.stream else 'body'}"


@dataclass
class Outcome:
    """What an SDK call returned: response headers and the scrubbed parsed result
    (one dict for a body, one per event for a stream)."""

    headers: dict[str, str]
    events: list[Any]


def _sync_call(client: Any, case: Case, tags: str | None) -> Outcome:
    raw = case.create(client)(**case.call_kwargs(tags))
    headers = {k.lower(): v for k, v in raw.headers.items()}
    parsed = raw.parse()
    if case.stream:
        with parsed:
            events = [scrub(e.model_dump()) for e in parsed]
    else:
        events = [scrub(parsed.model_dump())]
    client.close()
    return Outcome(headers, events)


async def _async_call(client: Any, case: Case, tags: str | None) -> Outcome:
    raw = await case.create(client)(**case.call_kwargs(tags))
    headers = {k.lower(): v for k, v in raw.headers.items()}
    parsed = raw.parse()
    if inspect.isawaitable(parsed):  # anthropic's async raw response parses async
        parsed = await parsed
    if case.stream:
        events = [scrub(e.model_dump()) async for e in parsed]
        await parsed.close()
    else:
        events = [scrub(parsed.model_dump())]
    await client.close()
    return Outcome(headers, events)


def _client(case: Case, base_url: str, key: str, sync: bool) -> Any:
    if case.provider == "openai":
        cls: Any = openai.OpenAI if sync else openai.AsyncOpenAI
        return cls(base_url=base_url + "/v1", api_key=key, max_retries=0)
    cls = anthropic.Anthropic if sync else anthropic.AsyncAnthropic
    return cls(base_url=base_url, api_key=key, max_retries=0)


async def _call(case: Case, base_url: str, key: str, sync: bool, tags: str | None) -> Outcome:
    client = _client(case, base_url, key, sync)
    if sync:
        return await asyncio.to_thread(_sync_call, client, case, tags)
    return await _async_call(client, case, tags)


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
async def test_sdk_through_proxy_matches_direct_and_ledger(
    proxy: RunningProxy, fake: FakeUpstream, case: Case, sync: bool
) -> None:
    # Routes: /openai/v1/... and /anthropic/v1/... on the proxy, /v1/... on the fake.
    via = await _call(case, f"{proxy.url}/{case.provider}", case.key, sync, "proj:alpha,exp-1")
    n_records = len(fake.records)
    direct = await _call(case, fake.url, "sk-direct", sync, tags=None)
    assert len(fake.records) == n_records + 1

    # 1. The SDK result is what the SDK gets from the provider itself.
    assert via.events == direct.events
    assert len(via.events) > (3 if case.stream else 0)

    # 2. The ledger record of this request, through the fake's own request id.
    upstream_id = via.headers["x-request-id" if case.provider == "openai" else "request-id"]
    record = fake.record_for(upstream_id)
    assert record["completed"] and record["status"] == 200
    led = await ledger_for(proxy, upstream_id)
    assert via.headers["x-metergate-request-id"] == led.id
    assert_tokens_equal(led, record)
    assert led.exact is True
    assert led.error is None
    assert led.status == 200
    assert led.stream is case.stream
    assert led.cost_nanos == expected_cost(proxy, record)
    assert led.cost_nanos > 0

    # 3. Attribution: caller, team, tags (the key's own first), end user.
    if case.key == KEY_A:
        assert (led.key_name, led.team, led.user) == ("app-a", "search", "alice")
        assert led.tags == ("proj:alpha", "exp-1")
    else:
        assert (led.key_name, led.team, led.user) == ("app-b", "support", "bob")
        assert led.tags == ("batch", "proj:alpha", "exp-1")
    assert led.end_user == case.end_user

    # 4. The cost header is on bodies only; the request id header always.
    if case.stream:
        assert "x-metergate-cost-usd" not in via.headers
    else:
        assert via.headers["x-metergate-cost-usd"] == nanos_to_usd_str(led.cost_nanos)
    assert "x-metergate-request-id" not in direct.headers


async def test_injected_usage_chunk_is_hidden_and_still_metered(
    proxy: RunningProxy, fake: FakeUpstream
) -> None:
    """A chat stream without include_usage: the upstream was asked for usage (so the
    record is exact), the client never sees the usage-only chunk."""
    client = proxy.openai()
    stream = await client.chat.completions.create(
        **CHAT, stream=True, extra_headers={"X-Fake-Cached": "3"}
    )
    chunks = [c async for c in stream]
    record = fake.records[-1]
    assert record["include_usage"] is True  # what the upstream was asked
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)  # no "choices": [] chunk reached the client
    led = await ledger_for(proxy, record["request_id"])
    assert_tokens_equal(led, record)
    assert led.exact and led.cost_nanos == expected_cost(proxy, record)


async def test_anthropic_bearer_auth_token(proxy: RunningProxy, fake: FakeUpstream) -> None:
    """The Anthropic SDK with ``auth_token=`` sends ``Authorization: Bearer``; the proxy
    accepts it and still sends the upstream its key in ``x-api-key``."""
    client = anthropic.AsyncAnthropic(
        base_url=f"{proxy.url}/anthropic", auth_token=KEY_B, max_retries=0
    )
    message = await client.messages.create(**MESSAGES)
    await client.close()
    sent = fake.requests[-1]
    assert sent.auth_header == "x-api-key"
    assert "authorization" not in sent.headers
    led = await ledger_for(proxy, fake.records[-1]["request_id"])
    assert led.key_name == "app-b"
    assert led.output_tokens == message.usage.output_tokens


async def test_sdk_helpers_stream_and_parse(proxy: RunningProxy, fake: FakeUpstream) -> None:
    """The SDKs' higher-level helpers (Anthropic ``messages.stream``, OpenAI
    ``responses.stream``) work through the proxy and agree with the ledger."""
    claude = proxy.anthropic()
    async with claude.messages.stream(
        **MESSAGES, extra_headers={"X-Fake-Cache-Write-1h": "9"}
    ) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == final.content[0].text  # type: ignore[union-attr]
    record = fake.records[-1]
    led = await ledger_for(proxy, record["request_id"])
    assert led.output_tokens == final.usage.output_tokens
    assert led.cache_write_tokens == 9
    assert led.cost_nanos == expected_cost(proxy, record)

    oai = proxy.openai()
    async with oai.responses.stream(model="gpt-5-mini", input=PROMPT) as rstream:
        async for _ in rstream:
            pass
        response = await rstream.get_final_response()
    record = fake.records[-1]
    led = await ledger_for(proxy, record["request_id"])
    assert response.usage is not None
    assert led.input_tokens == response.usage.input_tokens
    assert led.output_tokens == response.usage.output_tokens
    assert led.cost_nanos == expected_cost(proxy, record)
    await claude.close()
    await oai.close()


async def test_count_tokens_and_other_paths_are_free(
    proxy: RunningProxy, fake: FakeUpstream
) -> None:
    """``messages/count_tokens`` and unmetered paths (``GET /v1/models``) are relayed and
    recorded at no cost."""
    claude = proxy.anthropic()
    counted = await claude.messages.count_tokens(
        model="claude-haiku-4-5", messages=[{"role": "user", "content": PROMPT}]
    )
    assert counted.input_tokens > 0
    oai = proxy.openai()
    models = await oai.models.list()
    assert any(m.id == "gpt-4o-mini" for m in models.data)
    count_led = await ledger_for(proxy, fake.records[-1]["request_id"])
    models_led = await ledger_for(proxy, fake.requests[-1].request_id)
    assert (count_led.endpoint, models_led.endpoint) == ("count_tokens", "other")
    for led in (count_led, models_led):
        assert led.cost_nanos == 0 and led.status == 200 and led.key_name == "app-a"
    await claude.close()
    await oai.close()
