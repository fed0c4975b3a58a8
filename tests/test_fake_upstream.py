"""The fake upstream, driven directly by the real OpenAI and Anthropic SDKs.

If these pass, the fake speaks the wire formats well enough for the SDKs to parse every
body, stream and usage field; its faults behave as its docstring says; its records
match what the client received; and its bodies have the recorded APIs' structure.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import subprocess
import sys
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
from multidict import CIMultiDictProxy

from tests.fake_upstream import FakeUpstream

FIXTURES = Path("/work/shared/fixtures/provider-wire")
CHAT_BODY: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "Say hello."}],
}
MESSAGES_BODY: dict[str, Any] = {
    "model": "claude-haiku-4-5",
    "max_tokens": 1024,
    "messages": [{"role": "user", "content": "Say hello."}],
}


# --------------------------------------------------------------------------- helpers


@pytest.fixture
async def oai(fake: FakeUpstream) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=fake.url + "/v1", api_key="sk-test", max_retries=0
    ) as client:
        yield client


@pytest.fixture
async def claude(fake: FakeUpstream) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(
        base_url=fake.url, api_key="sk-ant-test", max_retries=0
    ) as client:
        yield client


async def post(
    fake: FakeUpstream,
    path: str,
    body: dict[str, Any] | bytes,
    headers: dict[str, str] | None = None,
    *,
    decompress: bool = True,
) -> tuple[int, CIMultiDictProxy[str], bytes]:
    """POST to the fake with a plain aiohttp client; returns status, headers, raw body."""
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    headers = {"Content-Type": "application/json", **(headers or {})}
    async with (
        aiohttp.ClientSession(auto_decompress=decompress) as session,
        session.post(fake.url + path, data=data, headers=headers) as response,
    ):
        return response.status, response.headers, await response.read()


def sse_events(raw: bytes) -> list[tuple[str | None, bytes]]:
    """Split an SSE body into (event name, data) pairs."""
    events = []
    for block in raw.split(b"\n\n"):
        if not block.strip():
            continue
        name, data = None, []
        for line in block.split(b"\n"):
            if line.startswith(b"event: "):
                name = line[7:].decode()
            elif line.startswith(b"data: "):
                data.append(line[6:])
        events.append((name, b"\n".join(data)))
    return events


def sse_json(raw: bytes) -> list[tuple[str | None, Any]]:
    """SSE events with their data parsed (``[DONE]`` kept as a string)."""
    return [(n, d.decode() if d == b"[DONE]" else json.loads(d)) for n, d in sse_events(raw)]


def shape(value: Any) -> Any:
    """A JSON value's structure: keys in order, recursively; scalar values ignored."""
    if isinstance(value, dict):
        return [(key, shape(item)) for key, item in value.items()]
    if isinstance(value, list):
        return [shape(item) for item in value]
    return "*"


def collapse(items: list[Any]) -> list[Any]:
    """Drop consecutive repeats (a run of content deltas counts once)."""
    return [item for i, item in enumerate(items) if i == 0 or item != items[i - 1]]


def fixture(name: str) -> bytes:
    path = FIXTURES / name
    if not path.exists():
        pytest.skip(f"fixture {name} is not available at {FIXTURES}")
    return path.read_bytes()


# --------------------------------------------------------------------------- OpenAI


async def test_chat_usage_with_cached_and_reasoning_tokens(
    fake: FakeUpstream, oai: openai.AsyncOpenAI
) -> None:
    raw = await oai.chat.completions.with_raw_response.create(
        **CHAT_BODY,
        extra_headers={"X-Fake-Cached": "100", "X-Fake-Reasoning": "50", "X-Fake-Output": "7"},
    )
    completion = raw.parse()
    usage = completion.usage
    assert usage is not None
    sent = fake.requests[-1].body
    assert completion.model == "gpt-4o-mini-2024-07-18"
    assert completion.choices[0].message.content == " the cat sat on a mat and"
    assert completion.choices[0].finish_reason == "stop"
    assert usage.prompt_tokens == len(sent) // 4 + 100
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 100
    assert usage.completion_tokens == 57
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 50
    assert usage.total_tokens == usage.prompt_tokens + 57

    record = fake.record_for(raw.headers["x-request-id"])
    assert record["usage"] == usage.to_dict()
    assert record["tokens"] == {
        "input": usage.prompt_tokens,
        "cached_input": 100,
        "cache_write": None,
        "cache_write_1h": None,
        "output": 57,
        "reasoning": 50,
    }
    assert record["completed"] and not record["stream"] and record["status"] == 200
    assert raw.headers["content-type"] == "application/json"
    assert raw.headers["openai-processing-ms"].isdigit()
    assert raw.headers["x-ratelimit-remaining-requests"]


async def test_chat_stream_with_include_usage(fake: FakeUpstream, oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(
        **CHAT_BODY,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"X-Fake-Cached": "64", "X-Fake-Chunks": "4", "X-Fake-Output": "10"},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) == 1 + 4 + 1 + 1  # role, content ×4, finish, usage
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == []
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 64
    assert usage.completion_tokens == 10
    assert len(text.split()) == 10

    record = fake.records[-1]
    assert record["stream"] and record["include_usage"] and record["completed"]
    assert record["usage"] == usage.to_dict()
    assert record["chunks_planned"] == record["chunks_sent"] == 4
    assert record["output_tokens_sent"] == 10


async def test_chat_stream_wire_format(fake: FakeUpstream) -> None:
    """Exactly like the real API: ``"usage":null`` on every chunk with include_usage,
    and no usage key at all without it."""
    body = {**CHAT_BODY, "stream": True, "stream_options": {"include_usage": True}}
    status, headers, raw = await post(fake, "/v1/chat/completions", body)
    assert status == 200 and headers["Content-Type"] == "text/event-stream; charset=utf-8"
    blocks = raw.split(b"\n\n")
    assert blocks[-2:] == [b"data: [DONE]", b""]
    assert all(b.startswith(b"data: {") for b in blocks[:-2])
    assert all(b'"usage":null' in b for b in blocks[:-3])
    assert b'"choices":[],"usage":{"prompt_tokens":' in blocks[-3]

    _, _, raw = await post(fake, "/v1/chat/completions", {**CHAT_BODY, "stream": True})
    assert b"usage" not in raw and raw.endswith(b"data: [DONE]\n\n")
    record = fake.records[-1]
    assert record["usage"] is None and record["completed"] and record["include_usage"] is False
    assert record["tokens"]["output"] == record["output_tokens_sent"]


async def test_max_tokens_caps_output(fake: FakeUpstream, oai: openai.AsyncOpenAI) -> None:
    completion = await oai.chat.completions.create(**CHAT_BODY, max_completion_tokens=3)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 3

    response = await oai.responses.create(model="gpt-4.1-nano", input="hi", max_output_tokens=4)
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"


async def test_responses_usage_and_stream(fake: FakeUpstream, oai: openai.AsyncOpenAI) -> None:
    knobs = {"X-Fake-Cached": "32", "X-Fake-Reasoning": "64", "X-Fake-Output": "5"}
    response = await oai.responses.create(model="gpt-5-nano", input="hi", extra_headers=knobs)
    assert response.model == "gpt-5-nano-2025-08-07"
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.output_text == " the cat sat on a"
    assert response.usage is not None
    assert response.usage.input_tokens_details.cached_tokens == 32
    assert response.usage.output_tokens_details.reasoning_tokens == 64
    assert response.usage.output_tokens == 69
    assert fake.records[-1]["usage"] == response.usage.to_dict()

    stream = await oai.responses.create(
        model="gpt-5-nano", input="hi", stream=True, extra_headers=knobs
    )
    events = [event async for event in stream]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created"
    assert events[-1].type == "response.completed"
    completed = events[-1].response
    assert completed.usage is not None
    assert completed.usage.output_tokens_details.reasoning_tokens == 64
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == " the cat sat on a"
    record = fake.records[-1]
    assert record["completed"] and record["usage"] == completed.usage.to_dict()
    assert record["chunks_sent"] == 5


async def test_legacy_completions(fake: FakeUpstream, oai: openai.AsyncOpenAI) -> None:
    completion = await oai.completions.create(model="davinci-002", prompt="Tell me a joke")
    assert completion.model == "davinci:2023-07-21-v2"
    assert completion.usage is not None and completion.usage.completion_tokens <= 16

    stream = await oai.completions.create(
        model="gpt-3.5-turbo-instruct",
        prompt="Tell me a joke",
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"X-Fake-Output": "6"},
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices).split() == (
        "the cat sat on a mat".split()
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    assert fake.records[-1]["usage"] == chunks[-1].usage.to_dict()


async def test_embeddings(fake: FakeUpstream, oai: openai.AsyncOpenAI) -> None:
    result = await oai.embeddings.create(model="text-embedding-ada-002", input=["a", "b"])
    assert result.model == "text-embedding-ada-002-v2"
    assert [len(d.embedding) for d in result.data] == [1536, 1536]
    assert fake.requests[-1].json()["encoding_format"] == "base64"  # the SDK's default
    assert result.usage.prompt_tokens == result.usage.total_tokens
    assert fake.records[-1]["usage"] == result.usage.to_dict()
    assert fake.records[-1]["tokens"]["output"] is None

    floats = await oai.embeddings.create(
        model="text-embedding-3-small", input="a", dimensions=8, encoding_format="float"
    )
    assert len(floats.data[0].embedding) == 8


async def test_models_lists(oai: openai.AsyncOpenAI, claude: anthropic.AsyncAnthropic) -> None:
    assert "gpt-4o-mini" in {m.id async for m in oai.models.list()}
    assert "claude-haiku-4-5-20251001" in {m.id async for m in claude.models.list()}


# --------------------------------------------------------------------------- Anthropic


async def test_messages_cache_usage(fake: FakeUpstream, claude: anthropic.AsyncAnthropic) -> None:
    raw = await claude.messages.with_raw_response.create(
        **MESSAGES_BODY,
        extra_headers={
            "X-Fake-Cached": "1163",
            "X-Fake-Cache-Write": "30",
            "X-Fake-Cache-Write-1h": "10",
            "X-Fake-Output": "4",
        },
    )
    message = await raw.parse()
    usage = message.usage
    assert message.model == "claude-haiku-4-5-20251001"
    assert message.stop_reason == "end_turn"
    assert usage.input_tokens == len(fake.requests[-1].body) // 4
    assert usage.cache_read_input_tokens == 1163
    assert usage.cache_creation_input_tokens == 40
    assert usage.cache_creation is not None
    assert usage.cache_creation.ephemeral_5m_input_tokens == 30
    assert usage.cache_creation.ephemeral_1h_input_tokens == 10
    assert usage.output_tokens == 4
    record = fake.record_for(raw.headers["request-id"])
    assert record["usage"] == usage.to_dict()
    assert record["tokens"] == {
        "input": usage.input_tokens + 1163 + 40,
        "cached_input": 1163,
        "cache_write": 40,
        "cache_write_1h": 10,
        "output": 4,
        "reasoning": None,
    }
    assert raw.headers["anthropic-ratelimit-requests-remaining"]


async def test_messages_stream(fake: FakeUpstream, claude: anthropic.AsyncAnthropic) -> None:
    knobs = {"X-Fake-Cache-Write-1h": "3913", "X-Fake-Reasoning": "20", "X-Fake-Output": "9"}
    async with claude.messages.stream(**MESSAGES_BODY, extra_headers=knobs) as stream:
        text = "".join([piece async for piece in stream.text_stream])
        final = await stream.get_final_message()
    assert text == " the cat sat on a mat and it was"
    assert [block.type for block in final.content] == ["thinking", "text"]
    assert final.usage.output_tokens == 29
    assert final.usage.cache_creation_input_tokens == 3913
    record = fake.records[-1]
    assert record["completed"] and record["usage"]["output_tokens"] == 29
    assert record["output_tokens_sent"] == 9 and record["tokens"]["output"] == 29


async def test_messages_stream_wire_format(fake: FakeUpstream) -> None:
    status, headers, raw = await post(fake, "/v1/messages", {**MESSAGES_BODY, "stream": True})
    assert status == 200 and headers["Content-Type"] == "text/event-stream; charset=utf-8"
    names = [name for name, _ in sse_events(raw)]
    assert collapse(names) == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert names.count("content_block_delta") == 5
    assert raw.endswith(b"}\n\n") and b" }\n\n" in raw  # Anthropic's whitespace padding


async def test_count_tokens(fake: FakeUpstream, claude: anthropic.AsyncAnthropic) -> None:
    result = await claude.messages.count_tokens(
        model="claude-sonnet-4-5", messages=[{"role": "user", "content": "hi"}]
    )
    assert result.input_tokens == len(fake.requests[-1].body) // 4
    assert fake.records[-1]["endpoint"] == "messages/count_tokens"
    assert fake.records[-1]["usage"] == {"input_tokens": result.input_tokens}


# --------------------------------------------------------------------------- faults


async def test_fault_reset(fake: FakeUpstream, oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.APIConnectionError):
        await oai.chat.completions.create(**CHAT_BODY, extra_headers={"X-Fake-Fault": "reset"})
    with pytest.raises(aiohttp.ClientError):
        await post(fake, "/v1/messages", MESSAGES_BODY, {"X-Fake-Fault": "reset"})
    await fake.wait_idle()
    assert [r["status"] for r in fake.records] == [None, None]
    assert not any(r["completed"] for r in fake.records)
    assert fake.records[0]["fault"] == "reset"


async def test_fault_html(fake: FakeUpstream, oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        await oai.chat.completions.create(**CHAT_BODY, extra_headers={"X-Fake-Fault": "html"})
    assert info.value.status_code == 502
    status, headers, raw = await post(
        fake, "/v1/messages", MESSAGES_BODY, {"X-Fake-Fault": "html:200"}
    )
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert raw.startswith(b"<html>")


async def test_fault_timeout(fake: FakeUpstream) -> None:
    async with openai.AsyncOpenAI(
        base_url=fake.url + "/v1", api_key="sk", max_retries=0, timeout=0.3
    ) as client:
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(
                **CHAT_BODY, extra_headers={"X-Fake-Fault": "timeout"}
            )
    await fake.wait_idle()  # the 120 s sleep ended when the client went away
    assert fake.records[-1]["disconnected"] and not fake.records[-1]["completed"]

    loop = asyncio.get_running_loop()
    started = loop.time()
    knobs = {"X-Fake-Fault": "timeout", "X-Fake-Delay-Ms": "200"}
    status, _, _ = await post(fake, "/v1/chat/completions", CHAT_BODY, knobs)
    assert status == 200 and loop.time() - started >= 0.2


async def test_fault_stall(fake: FakeUpstream) -> None:
    body = orjson.dumps({**CHAT_BODY, "stream": True})
    knobs = {"X-Fake-Fault": "stall", "X-Fake-Fault-After": "2", "X-Fake-Delay-Ms": "5000"}
    received = b""
    timeout = aiohttp.ClientTimeout(sock_read=0.3)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.post(fake.url + "/v1/chat/completions", data=body, headers=knobs) as r:
            with pytest.raises(asyncio.TimeoutError):
                async for piece in r.content.iter_any():
                    received += piece
    assert received.count(b'"delta":{"content"') == 2
    await fake.wait_idle()
    record = fake.records[-1]
    assert record["chunks_sent"] == 2 and record["disconnected"]


@pytest.mark.parametrize(
    ("path", "body", "terminator"),
    [
        (
            "/v1/chat/completions",
            {**CHAT_BODY, "stream_options": {"include_usage": True}},
            b"data: [DONE]\n\n",
        ),
        ("/v1/messages", MESSAGES_BODY, b"event: message_stop\n"),
    ],
)
async def test_fault_malformed_sse(
    fake: FakeUpstream, path: str, body: dict[str, Any], terminator: bytes
) -> None:
    knobs = {"X-Fake-Fault": "malformed-sse"}
    status, _, raw = await post(fake, path, {**body, "stream": True}, knobs)
    assert status == 200
    assert b"data: {not json}" in raw and b"\xff\xfe" in raw
    assert terminator in raw
    assert b'"output_tokens":' in raw or b'"completion_tokens":' in raw
    record = fake.records[-1]
    assert record["malformed_events"] == 5 and record["completed"]
    assert record["usage"] is not None


async def test_fault_cut(fake: FakeUpstream, oai: openai.AsyncOpenAI) -> None:
    body = {**CHAT_BODY, "stream": True, "stream_options": {"include_usage": True}}
    received = b""
    async with aiohttp.ClientSession() as session:
        async with session.post(
            fake.url + "/v1/chat/completions",
            json=body,
            headers={"X-Fake-Fault": "cut", "X-Fake-Chunks": "6"},
        ) as response:
            with pytest.raises(aiohttp.ClientPayloadError):
                async for piece in response.content.iter_any():
                    received += piece
    assert received.count(b'"delta":{"content"') == 3
    assert b"[DONE]" not in received and b'"usage":{' not in received
    await fake.wait_idle()
    record = fake.records[-1]
    assert record["chunks_sent"] == 3 and record["chunks_planned"] == 6
    assert record["usage"] is None and not record["completed"]
    assert 0 < record["output_tokens_sent"] < record["tokens"]["output"]

    with pytest.raises(openai.APIConnectionError):
        stream = await oai.chat.completions.create(
            **CHAT_BODY, stream=True, extra_headers={"X-Fake-Fault": "cut"}
        )
        async for _ in stream:
            pass

    with pytest.raises(aiohttp.ClientPayloadError):
        await post(fake, "/v1/messages", MESSAGES_BODY, {"X-Fake-Fault": "cut"})


async def test_fault_cut_anthropic_keeps_message_start_usage(fake: FakeUpstream) -> None:
    with pytest.raises(aiohttp.ClientPayloadError):
        await post(
            fake,
            "/v1/messages",
            {**MESSAGES_BODY, "stream": True},
            {"X-Fake-Fault": "cut", "X-Fake-Fault-After": "1", "X-Fake-Cached": "7"},
        )
    await fake.wait_idle()
    record = fake.records[-1]
    assert record["chunks_sent"] == 1 and not record["completed"]
    assert record["usage"]["cache_read_input_tokens"] == 7
    assert record["usage"]["output_tokens"] == 1  # message_start's, not the final count


async def test_fault_error_event(
    fake: FakeUpstream, oai: openai.AsyncOpenAI, claude: anthropic.AsyncAnthropic
) -> None:
    with pytest.raises(anthropic.APIStatusError) as info:
        async with claude.messages.stream(
            **MESSAGES_BODY, extra_headers={"X-Fake-Fault": "error-event"}
        ) as stream:
            await stream.get_final_message()
    assert "overloaded_error" in str(info.value)
    record = fake.records[-1]
    assert record["chunks_sent"] == 2 and not record["completed"] and not record["disconnected"]

    with pytest.raises(openai.APIError, match="server had an error"):
        stream = await oai.chat.completions.create(
            **CHAT_BODY, stream=True, extra_headers={"X-Fake-Fault": "error-event"}
        )
        async for _ in stream:
            pass

    _, _, raw = await post(
        fake,
        "/v1/responses",
        {"model": "gpt-4.1", "input": "hi", "stream": True},
        {"X-Fake-Fault": "error-event"},
    )
    assert sse_events(raw)[-1][0] == "error" and b"response.completed" not in raw


async def test_client_disconnect_mid_stream(fake: FakeUpstream) -> None:
    knobs = {"X-Fake-Chunks": "20", "X-Fake-Chunk-Delay-Ms": "50", "X-Fake-Output": "40"}
    received = b""
    async with aiohttp.ClientSession() as session:
        async with session.post(
            fake.url + "/v1/messages", json={**MESSAGES_BODY, "stream": True}, headers=knobs
        ) as response:
            async for piece in response.content.iter_any():
                received += piece
                if received.count(b"text_delta") >= 3:
                    break
    await fake.wait_idle()
    record = fake.records[-1]
    assert record["disconnected"] and not record["completed"]
    assert 3 <= record["chunks_sent"] <= 5
    assert record["output_tokens_sent"] == 2 * record["chunks_sent"]


@pytest.mark.parametrize("status", [400, 401, 403, 404, 429, 500, 503])
async def test_fault_status_openai(oai: openai.AsyncOpenAI, status: int) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        await oai.chat.completions.create(
            **CHAT_BODY, extra_headers={"X-Fake-Fault": f"status:{status}"}
        )
    error = info.value
    assert error.status_code == status
    assert isinstance(error.body, dict) and set(error.body) == {"message", "type", "param", "code"}
    if status == 429:
        assert isinstance(error, openai.RateLimitError)
        assert error.response.headers["retry-after"] == "1"


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 429, 500, 529])
async def test_fault_status_anthropic(claude: anthropic.AsyncAnthropic, status: int) -> None:
    with pytest.raises(anthropic.APIStatusError) as info:
        await claude.messages.create(
            **MESSAGES_BODY, extra_headers={"X-Fake-Fault": f"status:{status}"}
        )
    error = info.value
    assert error.status_code == status
    assert isinstance(error.body, dict) and list(error.body) == ["type", "error", "request_id"]
    assert error.body["request_id"] == error.response.headers["request-id"]
    if status == 529:
        assert isinstance(error, anthropic.OverloadedError)
        assert error.body["error"]["type"] == "overloaded_error"


async def test_error_bodies_match_recordings(fake: FakeUpstream) -> None:
    """Given the recorded request's model, the error body is the recorded one."""
    knobs = {"X-Fake-Fault": "status:404"}
    body = {**CHAT_BODY, "model": "gpt-4.1-nano-wrong"}
    status, headers, raw = await post(fake, "/v1/chat/completions", body, knobs)
    assert (status, raw) == (404, fixture("openai-chat-error-404-model-not-found.json"))
    assert headers["Content-Type"] == "application/json; charset=utf-8"

    body = {"model": "this-model-does-not-exist", "input": "Hello"}
    status, _, raw = await post(fake, "/v1/responses", body, {"X-Fake-Fault": "status:400"})
    assert (status, raw) == (400, fixture("openai-responses-error-400-model-not-found.json"))

    body = {**MESSAGES_BODY, "model": "invalid-model-name"}
    status, _, raw = await post(fake, "/v1/messages", body, knobs)
    recorded = json.loads(fixture("anthropic-error-404-not-found.json"))
    got = json.loads(raw)
    assert status == 404 and shape(got) == shape(recorded)
    assert got["error"] == recorded["error"]


async def test_bad_requests(fake: FakeUpstream) -> None:
    status, _, raw = await post(fake, "/v1/chat/completions", b"{not json")
    assert status == 400 and json.loads(raw)["error"]["type"] == "invalid_request_error"
    status, _, raw = await post(fake, "/v1/messages", {"max_tokens": 5})
    assert status == 400 and json.loads(raw)["error"]["message"] == "model: Field required"
    status, _, raw = await post(fake, "/v1/chat/completions", CHAT_BODY, {"X-Fake-Fault": "nope"})
    assert status == 400 and b"X-Fake-Fault" in raw
    status, _, raw = await post(fake, "/v1/files", CHAT_BODY)
    assert status == 404 and json.loads(raw)["error"]["message"] == "Invalid URL (POST /v1/files)"


# --------------------------------------------------------------------------- gzip, auth


async def test_gzip_body_and_stream(fake: FakeUpstream) -> None:
    knobs = {"X-Fake-Gzip": "1", "Accept-Encoding": "gzip"}
    status, headers, raw = await post(
        fake, "/v1/chat/completions", CHAT_BODY, knobs, decompress=False
    )
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    assert json.loads(gzip.decompress(raw))["usage"] == fake.records[-1]["usage"]

    # Each event is flushed, so the first one decodes before the stream has ended.
    stream_knobs = {**knobs, "X-Fake-Chunk-Delay-Ms": "100"}
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        async with session.post(
            fake.url + "/v1/messages", json={**MESSAGES_BODY, "stream": True}, headers=stream_knobs
        ) as response:
            assert response.headers["Content-Encoding"] == "gzip"
            decoder = zlib.decompressobj(31)
            first = decoder.decompress(await response.content.readany())
            assert first.startswith(b"event: message_start\n") and first.endswith(b"\n\n")
            rest = decoder.decompress(await response.read())
    assert (first + rest).endswith(b"event: message_stop\ndata: " + rest.rsplit(b"data: ", 1)[1])
    assert decoder.eof

    _, headers, _ = await post(
        fake, "/v1/chat/completions", CHAT_BODY, {"X-Fake-Gzip": "1", "Accept-Encoding": "identity"}
    )
    assert "Content-Encoding" not in headers


async def test_gzip_through_the_sdks() -> None:
    async with FakeUpstream(gzip=True) as fake:
        async with openai.AsyncOpenAI(base_url=fake.url + "/v1", api_key="sk") as client:
            raw = await client.chat.completions.with_raw_response.create(
                **CHAT_BODY, extra_headers={"X-Fake-Reasoning": "3"}
            )
            assert raw.headers["content-encoding"] == "gzip"
            completion = raw.parse()
            assert completion.usage is not None
            assert completion.usage.completion_tokens_details is not None
            assert completion.usage.completion_tokens_details.reasoning_tokens == 3
        async with anthropic.AsyncAnthropic(base_url=fake.url, api_key="sk") as claude_client:
            async with claude_client.messages.stream(**MESSAGES_BODY) as stream:
                final = await stream.get_final_message()
            assert final.usage.output_tokens == fake.records[-1]["usage"]["output_tokens"]


async def test_required_key_and_auth_recording() -> None:
    async with FakeUpstream(require_key="sk-upstream") as fake:
        async with openai.AsyncOpenAI(
            base_url=fake.url + "/v1", api_key="sk-wrong-key-123", max_retries=0
        ) as client:
            with pytest.raises(openai.AuthenticationError) as info:
                await client.chat.completions.create(**CHAT_BODY)
        assert isinstance(info.value.body, dict) and info.value.body["code"] == "invalid_api_key"
        assert fake.requests[-1].auth_header == "authorization"
        assert fake.requests[-1].auth_value == "Bearer sk-wrong-key-123"

        async with openai.AsyncOpenAI(base_url=fake.url + "/v1", api_key="sk-upstream") as client:
            await client.chat.completions.create(**CHAT_BODY)
        assert fake.records[-1]["status"] == 200

        async with anthropic.AsyncAnthropic(
            base_url=fake.url, api_key="sk-ant-wrong", max_retries=0
        ) as claude_client:
            with pytest.raises(anthropic.AuthenticationError) as a_info:
                await claude_client.messages.create(**MESSAGES_BODY)
        assert isinstance(a_info.value.body, dict)
        assert a_info.value.body["error"]["type"] == "authentication_error"
        # This SDK sends its key as a Bearer token, not as x-api-key.
        assert fake.requests[-1].auth_header == "authorization"
        assert fake.requests[-1].api_key == "sk-ant-wrong"

        status, _, _ = await post(fake, "/v1/messages", MESSAGES_BODY, {"x-api-key": "sk-upstream"})
        assert status == 200
        assert fake.requests[-1].auth_header == "x-api-key"
        assert fake.requests[-1].auth_value == "sk-upstream"

        async with anthropic.AsyncAnthropic(base_url=fake.url, api_key="sk-upstream") as ok:
            await ok.messages.create(**MESSAGES_BODY)
        assert fake.records[-1]["status"] == 200


# --------------------------------------------------------------------------- recording


async def test_requests_are_recorded_byte_for_byte(fake: FakeUpstream) -> None:
    raw = b'{ "model" :"gpt-4o-mini",\n  "messages": [ ] }'
    headers = {"X-Metergate-Tags": "a,b", "Authorization": "Bearer sk-x"}
    await post(fake, "/v1/chat/completions?api-version=1", raw, headers)
    request = fake.requests[-1]
    assert request.body == raw and request.query == "api-version=1"
    assert request.headers["x-metergate-tags"] == "a,b"
    assert request.method == "POST" and request.path == "/v1/chat/completions"


async def test_http_control_endpoints(fake: FakeUpstream) -> None:
    await post(fake, "/v1/messages", MESSAGES_BODY, {"X-Fake-Output": "2"})
    async with aiohttp.ClientSession() as session:
        async with session.get(fake.url + "/_fake/records") as response:
            records = await response.json()
        async with session.get(fake.url + "/_fake/requests") as response:
            requests = await response.json()
        assert records == json.loads(orjson.dumps(fake.records))
        assert records[0]["tokens"]["output"] == 2
        assert requests[0]["body"] == orjson.dumps(MESSAGES_BODY).decode()
        async with session.post(fake.url + "/_fake/reset") as response:
            assert response.status == 200
    assert fake.records == [] and len(fake.requests) == 0


async def test_split_events_still_parse(fake: FakeUpstream, oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(
        **CHAT_BODY,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"X-Fake-Split": "1", "X-Fake-Output": "5"},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


async def test_standalone_script() -> None:
    script = Path(__file__).with_name("fake_upstream.py")
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(script), "--port", "0", stdout=subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 20)
        url = line.decode().rsplit(" ", 1)[1].strip()
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="sk") as client:
            completion = await client.chat.completions.create(**CHAT_BODY)
        async with aiohttp.ClientSession() as session:
            async with session.get(url + "/_fake/records") as response:
                records = await response.json()
        assert completion.usage is not None
        assert records[-1]["usage"]["prompt_tokens"] == completion.usage.prompt_tokens
    finally:
        process.terminate()
        await process.wait()


# --------------------------------------------------------------------------- structure


async def test_bodies_have_the_recorded_structure(fake: FakeUpstream) -> None:
    cases = [
        ("/v1/chat/completions", CHAT_BODY, {}, "openai-chat-cached-tokens.json"),
        (
            "/v1/responses",
            {"model": "gpt-5-nano", "input": "hi"},
            {"X-Fake-Reasoning": "64"},
            "openai-responses.json",
        ),
        (
            "/v1/completions",
            {"model": "davinci-002", "prompt": "hi"},
            {},
            "openai-completions.json",
        ),
        (
            "/v1/embeddings",
            {"model": "text-embedding-ada-002", "input": "hi", "encoding_format": "base64"},
            {},
            "openai-embeddings.json",
        ),
        ("/v1/messages", MESSAGES_BODY, {}, "anthropic-messages.json"),
    ]
    for path, body, knobs, name in cases:
        recorded = fixture(name)
        _, _, raw = await post(fake, path, body, knobs)
        assert shape(json.loads(raw)) == shape(json.loads(recorded)), name
        # Same layout: OpenAI pretty-prints (chat etc. with a final newline), Anthropic not.
        assert raw[:2] == recorded[:2] and raw.endswith(b"\n") == recorded.endswith(b"\n"), name


@pytest.mark.parametrize(
    ("path", "body", "knobs", "name"),
    [
        (
            "/v1/chat/completions",
            {**CHAT_BODY, "stream_options": {"include_usage": True}},
            {},
            "openai-chat-stream-include-usage.sse",
        ),
        ("/v1/chat/completions", CHAT_BODY, {}, "openai-chat-stream.sse"),
        (
            "/v1/responses",
            {"model": "gpt-4.1-nano", "input": "hi"},
            {},
            "openai-responses-stream.sse",
        ),
        ("/v1/messages", MESSAGES_BODY, {}, "anthropic-messages-stream.sse"),
    ],
)
async def test_streams_have_the_recorded_structure(
    fake: FakeUpstream, path: str, body: dict[str, Any], knobs: dict[str, str], name: str
) -> None:
    recorded = fixture(name)
    _, _, raw = await post(fake, path, {**body, "stream": True}, knobs)

    def outline(data: bytes) -> list[Any]:
        return collapse([(n, shape(d)) for n, d in sse_json(data)])

    assert outline(raw) == outline(recorded)
    # Framing: every block is (event line +) data line, separated by a blank line.
    for ours, theirs in zip(sse_events(raw), sse_events(recorded), strict=False):
        assert (ours[0] is None) == (theirs[0] is None)
