"""The Anthropic translator against recorded wire bodies and small inline cases."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.errors import BadRequest
from proxy.providers.anthropic import AnthropicProvider
from proxy.providers.base import ParsedRequest, Provider, StreamMeter
from proxy.usage import Usage

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "provider-wire"

PROVIDER = AnthropicProvider()
PARSED = ParsedRequest("messages", True, "claude", True, 1024, None, b"{}")


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def run(meter: StreamMeter, chunks: list[bytes]) -> bytes:
    return b"".join(meter.feed(c) for c in chunks) + meter.flush()


def event(kind: str, **fields: Any) -> bytes:
    return (
        b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **fields}) + b"\n\n"
    )


def test_satisfies_the_provider_protocol() -> None:
    provider: Provider = PROVIDER
    meter: StreamMeter = PROVIDER.stream_meter(PARSED)
    assert provider.name == "anthropic"
    assert meter.usage is None and not meter.completed and meter.malformed == 0


def test_upstream_auth_headers() -> None:
    assert PROVIDER.upstream_auth_headers("sk-ant-x") == {"x-api-key": "sk-ant-x"}


# --- parse_request -------------------------------------------------------------------------

BODY = b'{"model":"claude-sonnet-4-5","max_tokens":100,"messages":[]}'


@pytest.mark.parametrize("path", ["v1/messages", "/v1/messages", "messages", "/v1/messages/"])
def test_messages_path(path: str) -> None:
    p = PROVIDER.parse_request(path, BODY)
    assert p == ParsedRequest("messages", True, "claude-sonnet-4-5", False, 100, None, BODY)
    assert p.body is BODY


@pytest.mark.parametrize(
    ("path", "endpoint"),
    [
        ("v1/messages/count_tokens", "count_tokens"),
        ("/v1/messages/count_tokens", "count_tokens"),
        ("v1/models", "other"),
        ("v1/messages/batches", "other"),
        ("v1/complete", "other"),
        ("", "other"),
    ],
)
@pytest.mark.parametrize("body", [b"", b"{not json", BODY])
def test_unmetered_paths_are_not_parsed(path: str, endpoint: str, body: bytes) -> None:
    p = PROVIDER.parse_request(path, body)
    assert p == ParsedRequest(endpoint, False, None, False, None, None, body)
    assert p.body is body


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"", "invalid_json"),
        (b"{", "invalid_json"),
        (b"[]", "invalid_json"),
        (b"\xef\xbb\xbf{}", "invalid_json"),
        (b'{"max_tokens": 10}', "missing_model"),
        (b'{"model": null}', "missing_model"),
        (b'{"model": ""}', "invalid_model"),
        (b'{"model": 1.5}', "invalid_model"),
    ],
)
def test_bad_bodies_are_refused(body: bytes, code: str) -> None:
    with pytest.raises(BadRequest) as info:
        PROVIDER.parse_request("v1/messages", body)
    assert info.value.code == code
    assert info.value.message.rstrip().endswith(".")
    rendered = orjson.loads(info.value.render("anthropic"))
    assert rendered["type"] == "error" and rendered["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, (False, None, None)),
        ({"stream": True, "max_tokens": 8192}, (True, 8192, None)),
        ({"stream": "yes", "max_tokens": "8192"}, (False, None, None)),
        ({"metadata": {"user_id": "u-42"}}, (False, None, "u-42")),
        ({"metadata": {"user_id": 42}}, (False, None, None)),
        ({"metadata": "u-42"}, (False, None, None)),
        (
            {"max_tokens": 2048, "thinking": {"type": "enabled", "budget_tokens": 1024}},
            (False, 2048, None),
        ),
    ],
)
def test_request_facts(
    fields: dict[str, Any], expected: tuple[bool, int | None, str | None]
) -> None:
    body = orjson.dumps({"model": "claude-haiku-4-5", **fields})
    p = PROVIDER.parse_request("v1/messages", body)
    assert (p.stream, p.max_output_tokens, p.end_user) == expected
    assert p.body is body and not p.strip_usage_chunk


@pytest.mark.parametrize(
    ("name", "model", "stream", "max_tokens"),
    [
        ("anthropic-messages-cache.request.json", "claude-3-5-sonnet-20240620", False, 1024),
        ("anthropic-messages-stream.request.json", "claude-sonnet-4-5", True, 8192),
        (
            "anthropic-messages-stream-thinking.request.json",
            "claude-haiku-4-5-20251001",
            True,
            8192,
        ),
    ],
)
def test_recorded_requests(name: str, model: str, stream: bool, max_tokens: int) -> None:
    body = fixture(name)
    p = PROVIDER.parse_request("v1/messages", body)
    assert (p.endpoint, p.metered, p.model, p.stream, p.max_output_tokens) == (
        "messages",
        True,
        model,
        stream,
        max_tokens,
    )
    assert p.body is body


# --- usage from complete bodies --------------------------------------------------------------

BODY_CASES: list[tuple[str, Usage | None, str | None]] = [
    (
        "anthropic-messages.json",
        Usage(input=13, output=5, cached_input=0, cache_write=0, cache_write_1h=0),
        "claude-sonnet-4-20250514",
    ),
    (
        # 4 uncached + 1163 read from the cache; the older shape has no cache_creation object.
        "anthropic-messages-cache-read.json",
        Usage(input=1167, output=202, cached_input=1163, cache_write=0),
        "claude-3-5-sonnet-20240620",
    ),
    (
        "anthropic-messages-cache-write.json",
        Usage(input=1167, output=187, cached_input=0, cache_write=1163),
        "claude-3-5-sonnet-20240620",
    ),
    ("anthropic-error-404-not-found.json", None, None),
    ("anthropic-error-400-invalid-request.json", None, None),
]


@pytest.mark.parametrize(("name", "usage", "model"), BODY_CASES, ids=[c[0] for c in BODY_CASES])
def test_usage_from_recorded_bodies(name: str, usage: Usage | None, model: str | None) -> None:
    assert PROVIDER.usage_from_body("messages", fixture(name)) == (usage, model)


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        ({"input_tokens": 10, "output_tokens": 3}, Usage(input=10, output=3)),
        (
            {
                "input_tokens": 10,
                "cache_read_input_tokens": 100,
                "cache_creation_input_tokens": 50,
                "cache_creation": {
                    "ephemeral_5m_input_tokens": 20,
                    "ephemeral_1h_input_tokens": 30,
                },
                "output_tokens": 7,
            },
            Usage(input=160, output=7, cached_input=100, cache_write=50, cache_write_1h=30),
        ),
        ({"output_tokens": 7}, Usage(output=7)),
        # Cache counts without input_tokens: the total prompt is unknown, not partial.
        ({"cache_read_input_tokens": 5, "output_tokens": 1}, Usage(output=1, cached_input=5)),
        ({"input_tokens": "10", "output_tokens": None}, None),
        ({}, None),
    ],
)
def test_usage_normalisation(usage: dict[str, Any], expected: Usage | None) -> None:
    body = orjson.dumps({"model": "c", "usage": usage})
    assert PROVIDER.usage_from_body("messages", body) == (expected, "c")


@pytest.mark.parametrize("body", [b"", b"nope", b"[]", b'{"usage": []}', b'{"model": ["x"]}'])
def test_usage_from_garbage_never_raises(body: bytes) -> None:
    assert PROVIDER.usage_from_body("messages", body) == (None, None)


def test_output_text_from_body() -> None:
    assert (
        PROVIDER.output_text_from_body("messages", fixture("anthropic-messages.json")) == "Hello!"
    )
    body = orjson.dumps(
        {
            "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                {"type": "text", "text": "ok"},
                {"type": "tool_use", "id": "t", "name": "f", "input": {"a": 1}},
            ]
        }
    )
    assert PROVIDER.output_text_from_body("messages", body) == 'hmmokf{"a":1}'


# --- streams ---------------------------------------------------------------------------------

STREAM_CASES: list[tuple[str, Usage, str, str]] = [
    (
        "anthropic-messages-stream.sse",
        Usage(input=17, output=10, cached_input=0, cache_write=0, cache_write_1h=0),
        "claude-sonnet-4-5-20250929",
        "- Captain\n- Scoop",
    ),
    (
        "anthropic-messages-stream-thinking.sse",
        Usage(input=46, output=133, cached_input=0, cache_write=0, cache_write_1h=0),
        "claude-haiku-4-5-20251001",
        "The user wants two names for a pet pelican, and they want me to be brief. I'll suggest "
        "two names that would suit a pelican well.\n\nSome good options:\n- Pelé (play on "
        "pelican)\n- Pouch (referencing their bill pouch)\n- Captain Beak\n- Squirt\n- Scoop\n"
        "- Wing\n\nLet me give two brief, catchy names:1. **Pouch** - references their iconic "
        'bill pouch\n2. **Pelé** - playful take on "pelican"',
    ),
    (
        "anthropic-messages-stream-tool-use.sse",
        Usage(input=543, output=40, cached_input=0, cache_write=0, cache_write_1h=0),
        "claude-haiku-4-5-20251001",
        "pelican_name_generator",
    ),
    (
        # 13 uncached + 3913 written with the 1-hour TTL.
        "anthropic-messages-stream-cache-write-1h.sse",
        Usage(input=3926, output=4, cached_input=0, cache_write=3913, cache_write_1h=3913),
        "claude-sonnet-4-6",
        "Django",
    ),
]
STREAM_IDS = [c[0] for c in STREAM_CASES]


@pytest.mark.parametrize(("name", "usage", "model", "text"), STREAM_CASES, ids=STREAM_IDS)
def test_recorded_streams(name: str, usage: Usage, model: str, text: str) -> None:
    stream = fixture(name)
    meter = PROVIDER.stream_meter(PARSED)
    assert meter.feed(stream) is stream
    assert meter.flush() == b""
    assert (meter.usage, meter.model, meter.completed, meter.malformed) == (usage, model, True, 0)
    assert meter.output_text() == text


@pytest.mark.parametrize(("name", "usage", "model", "text"), STREAM_CASES, ids=STREAM_IDS)
def test_recorded_streams_under_any_chunking(
    name: str, usage: Usage, model: str, text: str
) -> None:
    stream = fixture(name)
    rng = random.Random(name)
    chunkings = [[stream[:i], stream[i:]] for i in range(len(stream) + 1)]
    chunkings.append([stream[i : i + 1] for i in range(len(stream))])
    for _ in range(30):
        cuts = sorted(rng.randrange(len(stream) + 1) for _ in range(10))
        chunkings.append(
            [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
        )
    for chunks in chunkings:
        meter = PROVIDER.stream_meter(PARSED)
        out = b"".join(meter.feed(c) for c in chunks) + meter.flush()
        assert out == stream
        assert (meter.usage, meter.model, meter.completed) == (usage, model, True)
        assert meter.output_text() == text


def test_stream_cut_before_message_stop_is_not_completed() -> None:
    stream = fixture("anthropic-messages-stream.sse")
    cut = stream[: stream.index(b"event: message_stop")]
    meter = PROVIDER.stream_meter(PARSED)
    run(meter, [cut])
    assert not meter.completed
    assert meter.usage == Usage(
        input=17, output=10, cached_input=0, cache_write=0, cache_write_1h=0
    )


def test_stream_cut_after_message_start_has_input_only_usage() -> None:
    stream = fixture("anthropic-messages-stream-cache-write-1h.sse")
    cut = stream[: stream.index(b"event: content_block_start")]
    meter = PROVIDER.stream_meter(PARSED)
    run(meter, [cut])
    assert not meter.completed
    assert meter.usage == Usage(
        input=3926, output=1, cached_input=0, cache_write=3913, cache_write_1h=3913
    )


START = event(
    "message_start",
    message={
        "model": "claude-x",
        "usage": {"input_tokens": 20, "cache_read_input_tokens": 5, "output_tokens": 1},
    },
)
STOP = event("message_stop")


@pytest.mark.parametrize(
    ("stream", "usage", "completed", "malformed"),
    [
        # Older API: message_delta reports output only; input comes from message_start.
        (
            START + event("message_delta", delta={}, usage={"output_tokens": 42}) + STOP,
            Usage(input=25, output=42, cached_input=5),
            True,
            0,
        ),
        # An error event inside a 200 stream: never completed, whatever follows.
        (
            START
            + event("error", error={"type": "overloaded_error", "message": "Overloaded"})
            + STOP,
            Usage(input=25, output=1, cached_input=5),
            False,
            0,
        ),
        (
            START + b'event: ping\ndata: {"type": "ping"}\n\n' + STOP,
            Usage(input=25, output=1, cached_input=5),
            True,
            0,
        ),
        (
            START + b"data: {oops\n\ndata: 7\n\n" + STOP,
            Usage(input=25, output=1, cached_input=5),
            True,
            2,
        ),
        (event("message_delta", usage={"output_tokens": "x"}) + STOP, None, True, 0),
        (
            START.replace(b"\n", b"\r\n") + STOP.replace(b"\n", b"\r\n"),
            Usage(input=25, output=1, cached_input=5),
            True,
            0,
        ),
        (START + STOP.rstrip(b"\n"), Usage(input=25, output=1, cached_input=5), True, 0),
    ],
    ids=[
        "output-only delta",
        "error event",
        "ping",
        "malformed",
        "bad usage",
        "crlf",
        "unterminated stop",
    ],
)
def test_stream_events(stream: bytes, usage: Usage | None, completed: bool, malformed: int) -> None:
    for chunks in ([stream], [stream[i : i + 1] for i in range(len(stream))]):
        meter = PROVIDER.stream_meter(PARSED)
        assert run(meter, chunks) == stream
        assert (meter.usage, meter.completed, meter.malformed) == (usage, completed, malformed)


def test_stream_text_of_every_delta_kind() -> None:
    stream = (
        START
        + event("content_block_start", index=0, content_block={"type": "thinking", "thinking": ""})
        + event("content_block_delta", index=0, delta={"type": "thinking_delta", "thinking": "T"})
        + event("content_block_delta", index=0, delta={"type": "signature_delta", "signature": "S"})
        + event("content_block_delta", index=1, delta={"type": "text_delta", "text": "X"})
        + event(
            "content_block_start",
            index=2,
            content_block={"type": "tool_use", "name": "f", "input": {}},
        )
        + event(
            "content_block_delta",
            index=2,
            delta={"type": "input_json_delta", "partial_json": '{"a":'},
        )
        + event(
            "content_block_delta", index=2, delta={"type": "input_json_delta", "partial_json": "1}"}
        )
        + STOP
    )
    meter = PROVIDER.stream_meter(PARSED)
    run(meter, [stream])
    assert meter.output_text() == 'TXf{"a":1}'
    assert meter.model == "claude-x"


# --- prompt text -------------------------------------------------------------------------------


def test_prompt_text() -> None:
    body = orjson.dumps(
        {
            "model": "c",
            "system": [{"type": "text", "text": "SYS", "cache_control": {"type": "ephemeral"}}],
            "messages": [
                {"role": "user", "content": "Q1"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "tool_use", "id": "t", "name": "lookup", "input": {"k": "v"}}
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "t",
                            "content": [{"type": "text", "text": "R"}],
                        },
                        {"type": "image", "source": {"type": "base64", "data": "AAAA"}},
                        {
                            "type": "document",
                            "source": {"type": "text", "media_type": "text/plain", "data": "DOC"},
                        },
                    ],
                },
            ],
            "tools": [{"name": "lookup", "input_schema": {"type": "object"}}],
        }
    )
    text = PROVIDER.prompt_text(body)
    for piece in ("SYS", "Q1", "lookup", '{"k":"v"}', "R", "DOC", '"input_schema"'):
        assert piece in text
    assert "AAAA" not in text


def test_prompt_text_of_recorded_request() -> None:
    text = PROVIDER.prompt_text(fixture("anthropic-messages-cache.request.json"))
    assert text.startswith("You help generate concise summaries")  # the system prompt
    assert "test_anthropic_prompt_caching <- IGNORE THIS." in text
    assert "What's your take on unit testing?" in text


@pytest.mark.parametrize(
    "body", [b"", b"{", b"[1]", b'{"messages": [1, {"content": 5}], "system": 3}']
)
def test_text_helpers_never_raise(body: bytes) -> None:
    assert PROVIDER.prompt_text(body) == ""
    assert PROVIDER.output_text_from_body("messages", body) == ""
