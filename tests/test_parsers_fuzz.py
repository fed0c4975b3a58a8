"""Property tests: the parsers never raise on hostile input and never depend on chunking."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.errors import BadRequest
from proxy.providers.anthropic import AnthropicProvider
from proxy.providers.base import ParsedRequest, StreamMeter
from proxy.providers.openai import OpenAIProvider
from proxy.providers.sse import SSEEvent, SSEParser
from proxy.usage import Usage

FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])

OPENAI = OpenAIProvider()
ANTHROPIC = AnthropicProvider()

# Byte soup, and byte soup made of the pieces SSE framing is built from (which finds
# framing edge cases far faster than uniform random bytes do).
FRAGMENTS = st.sampled_from(
    [
        b"data:",
        b"data: ",
        b"event: ",
        b"event:x",
        b"id: 1",
        b":",
        b" ",
        b"\n",
        b"\r",
        b"\r\n",
        b"\n\n",
        b"{}",
        b"[DONE]",
        b"x",
        b"\xef\xbb\xbf",
        b"\xff",
        b'{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}',
        b'{"type":"message_stop"}',
    ]
)
SSE_BYTES = st.one_of(st.binary(max_size=400), st.lists(FRAGMENTS, max_size=80).map(b"".join))


@st.composite
def chunked(
    draw: st.DrawFn, data: st.SearchStrategy[bytes] = SSE_BYTES
) -> tuple[bytes, list[bytes]]:
    """Some bytes, and the same bytes cut at arbitrary points."""
    blob = draw(data)
    cuts = sorted(draw(st.lists(st.integers(0, len(blob)), max_size=12)))
    return blob, [blob[a:b] for a, b in zip([0, *cuts], [*cuts, len(blob)], strict=True)]


def parse(chunks: list[bytes], limit: int | None = None) -> tuple[list[SSEEvent], int]:
    parser = SSEParser() if limit is None else SSEParser(limit)
    events: list[SSEEvent] = []
    for chunk in chunks:
        events += parser.feed(chunk)
    events += parser.flush()
    return events, parser.malformed


# --- SSE parser ------------------------------------------------------------------------------


@FUZZ
@given(chunked())
def test_sse_chunking_never_changes_the_events(case: tuple[bytes, list[bytes]]) -> None:
    blob, chunks = case
    whole, _ = parse([blob])
    split, _ = parse(chunks)
    assert split == whole
    assert b"".join(e.raw for e in whole) == blob


@FUZZ
@given(chunked(), st.integers(1, 40))
def test_sse_size_limit_keeps_bytes_and_is_chunking_independent(
    case: tuple[bytes, list[bytes]], limit: int
) -> None:
    blob, chunks = case
    whole, whole_bad = parse([blob], limit)
    split, split_bad = parse(chunks, limit)
    assert b"".join(e.raw for e in split) == blob
    assert split_bad == whole_bad
    assert [e for e in split if not e.oversized] == [e for e in whole if not e.oversized]
    assert all(len(e.raw) <= limit for e in split if not e.oversized)


@FUZZ
@given(SSE_BYTES)
def test_sse_fast_paths_agree_with_the_general_field_parser(blob: bytes) -> None:
    # first=True (the stream's opening block, which may carry a BOM) always takes the
    # general line-by-line path; blocks without a BOM must parse the same either way.
    for event in parse([blob])[0]:
        if not event.raw.startswith(b"\xef\xbb\xbf"):
            assert SSEParser._parse_block(event.raw, True) == SSEParser._parse_block(
                event.raw, False
            )
    for raw in (
        b"data: x\n\n",
        b"event: e\ndata: x\n\n",
        b"event: \ndata: \n\n",
        b"data: a\ndata: b\n\n",
    ):
        assert SSEParser._parse_block(raw, True) == SSEParser._parse_block(raw, False)


# --- parse_request -------------------------------------------------------------------------------

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
JSON = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=16,
)
REQUEST_OBJECTS = st.fixed_dictionaries(
    {},
    optional={
        "model": st.text(max_size=12) | JSON,
        "stream": st.booleans() | JSON,
        "stream_options": st.none()
        | st.fixed_dictionaries({}, optional={"include_usage": st.booleans() | JSON, "x": JSON})
        | JSON,
        "max_tokens": st.integers(-5, 10**6) | JSON,
        "max_completion_tokens": st.integers(-5, 10**6) | JSON,
        "max_output_tokens": st.integers(-5, 10**6) | JSON,
        "n": st.integers(-1, 8) | JSON,
        "best_of": st.integers(-1, 8) | JSON,
        "prompt": JSON,
        "messages": JSON,
        "user": JSON,
        "safety_identifier": JSON,
        "metadata": st.fixed_dictionaries({}, optional={"user_id": JSON}) | JSON,
    },
)
BODIES = st.one_of(
    st.binary(max_size=200),
    JSON.map(orjson.dumps),
    REQUEST_OBJECTS.map(orjson.dumps),
    REQUEST_OBJECTS.map(lambda o: b" \n" + orjson.dumps(o, option=orjson.OPT_INDENT_2)),
)
PATHS = st.sampled_from(
    [
        "v1/chat/completions",
        "/v1/chat/completions",
        "v1/responses",
        "v1/completions",
        "embeddings",
        "v1/messages",
        "v1/messages/count_tokens",
        "v1/models",
        "",
    ]
) | st.text(max_size=30)


@FUZZ
@given(PATHS, BODIES)
def test_parse_request_only_ever_raises_bad_request(path: str, body: bytes) -> None:
    for provider in (OPENAI, ANTHROPIC):
        try:
            parsed = provider.parse_request(path, body)
        except BadRequest as exc:
            assert exc.code in {"invalid_json", "missing_model", "invalid_model"}
            continue
        if not parsed.metered:
            assert parsed.body is body and parsed.model is None
            continue
        assert isinstance(parsed.model, str) and parsed.model.strip()
        assert parsed.max_output_tokens is None or parsed.max_output_tokens >= 0
        if parsed.strip_usage_chunk:
            original = orjson.loads(body)
            rewritten = orjson.loads(parsed.body)
            options = original.get("stream_options")
            assert rewritten == {
                **original,
                "stream_options": {**(options or {}), "include_usage": True},
            }
        else:
            assert parsed.body is body


# --- meters -------------------------------------------------------------------------------------


def meters() -> list[StreamMeter]:
    def request(endpoint: str, strip: bool = False) -> ParsedRequest:
        return ParsedRequest(endpoint, True, "m", True, None, None, b"{}", strip)

    return [
        OPENAI.stream_meter(request("chat")),
        OPENAI.stream_meter(request("completions")),
        OPENAI.stream_meter(request("responses")),
        OPENAI.stream_meter(request("other")),
        ANTHROPIC.stream_meter(request("messages")),
    ]


@FUZZ
@given(chunked())
def test_meters_never_raise_and_relay_chunks_unchanged(case: tuple[bytes, list[bytes]]) -> None:
    _, chunks = case
    for meter in meters():
        for chunk in chunks:
            assert meter.feed(chunk) is chunk
        assert meter.flush() == b""
        assert isinstance(meter.output_text(), str)
        assert meter.malformed >= 0


@FUZZ
@given(chunked())
def test_stripping_meter_is_chunking_independent(case: tuple[bytes, list[bytes]]) -> None:
    blob, chunks = case
    request = ParsedRequest("chat", True, "m", True, None, None, b"{}", True)
    whole = OPENAI.stream_meter(request)
    expected = whole.feed(blob) + whole.flush()
    meter = OPENAI.stream_meter(request)
    assert b"".join(meter.feed(c) for c in chunks) + meter.flush() == expected
    assert (meter.usage, meter.completed, meter.malformed) == (
        whole.usage,
        whole.completed,
        whole.malformed,
    )
    if b"choices" not in blob:
        assert expected == blob


USAGE_CHUNK = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}'
CHAT_EVENTS = st.sampled_from(
    [
        b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null}',
        b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}',
        b": keep-alive",
        b"event: ping\ndata: {}",
        b"data: {broken",
        b"data: [1, 2]",
        b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\ndata: ',
        USAGE_CHUNK,
    ]
)
ENDINGS = st.sampled_from([b"\n", b"\r\n", b"\r"])


@st.composite
def chat_stream(draw: st.DrawFn) -> tuple[list[bytes], bool]:
    """Whole events with mixed line endings, and whether [DONE] ends the stream."""
    events = []
    for template in draw(st.lists(CHAT_EVENTS, max_size=10)):
        ending = draw(ENDINGS)
        events.append(template.replace(b"\n", ending) + ending + ending)
    done = draw(st.booleans())
    if done:
        ending = draw(ENDINGS)
        events.append(b"data: [DONE]" + ending + ending)
    return events, done


@FUZZ
@given(chat_stream(), st.data())
def test_strip_removes_exactly_the_usage_events(
    case: tuple[list[bytes], bool], data: st.DataObject
) -> None:
    events, done = case
    blob = b"".join(events)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(blob)), max_size=12)))
    chunks = [blob[a:b] for a, b in zip([0, *cuts], [*cuts, len(blob)], strict=True)]
    meter = OPENAI.stream_meter(ParsedRequest("chat", True, "m", True, None, None, b"{}", True))
    out = b"".join(meter.feed(c) for c in chunks) + meter.flush()
    assert out == b"".join(e for e in events if not e.startswith(USAGE_CHUNK))
    has_usage = any(e.startswith(USAGE_CHUNK) for e in events)
    assert meter.usage == (Usage(input=3, output=4) if has_usage else None)
    assert meter.completed is done


DEEP = b"[" * 1000 + b"]" * 1000  # loads fine; orjson cannot dump past 254 levels


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": ' + DEEP + b"}",
        b'{"model": "m", "stream": true, "stream_options": {}, "messages": ' + DEEP + b"}",
        b'{"model": "m", "tools": ' + DEEP + b', "messages": [{"content": [{"type": "tool_use", '
        b'"input": ' + DEEP + b"}]}]}",
    ],
)
def test_deeply_nested_json_is_handled(body: bytes) -> None:
    for provider in (OPENAI, ANTHROPIC):
        for path in ("v1/chat/completions", "v1/messages"):
            try:
                parsed = provider.parse_request(path, body)
            except BadRequest:
                continue
            assert parsed.body is body  # could not re-serialise: relayed as sent
        assert isinstance(provider.prompt_text(body), str)


# --- body readers ------------------------------------------------------------------------------

RESPONSE_OBJECTS = st.fixed_dictionaries(
    {},
    optional={
        key: JSON
        for key in (
            "model",
            "usage",
            "choices",
            "output",
            "content",
            "messages",
            "input",
            "system",
            "tools",
        )
    },
)


@FUZZ
@given(
    st.one_of(st.binary(max_size=200), JSON.map(orjson.dumps), RESPONSE_OBJECTS.map(orjson.dumps))
)
def test_body_readers_never_raise(body: bytes) -> None:
    for endpoint in ("chat", "responses", "completions", "embeddings", "messages"):
        for provider in (OPENAI, ANTHROPIC):
            usage, model = provider.usage_from_body(endpoint, body)
            assert usage is None or isinstance(usage, Usage)
            assert model is None or isinstance(model, str)
            assert isinstance(provider.output_text_from_body(endpoint, body), str)
    for provider in (OPENAI, ANTHROPIC):
        assert isinstance(provider.prompt_text(body), str)
    assert OPENAI.prompt_token_ids_count(body) >= 0


def _object(**fields: Any) -> bytes:
    return orjson.dumps(fields)


EVENT_TYPES = st.sampled_from(
    [
        "message_start",
        "message_delta",
        "message_stop",
        "content_block_start",
        "content_block_delta",
        "error",
        "response.completed",
        "response.output_text.delta",
    ]
)


@FUZZ
@given(st.lists(st.tuples(EVENT_TYPES | JSON, JSON), max_size=6))
def test_meters_never_raise_on_json_events_of_any_shape(values: list[tuple[Any, Any]]) -> None:
    stream = b"".join(
        b"data: "
        + _object(type=t, message=v, usage=v, delta=v, response=v, choices=v, error=v, model=v)
        + b"\n\n"
        for t, v in values
    )
    for meter in meters():
        assert meter.feed(stream) is stream
        meter.flush()
        assert isinstance(meter.output_text(), str)
