"""The OpenAI translator against recorded wire bodies and small inline cases."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.errors import BadRequest
from proxy.providers.base import ParsedRequest, Provider, StreamMeter
from proxy.providers.openai import OpenAIProvider
from proxy.usage import Usage

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "provider-wire"

PROVIDER = OpenAIProvider()


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def parsed(endpoint: str, *, stream: bool = True, strip: bool = False) -> ParsedRequest:
    return ParsedRequest(endpoint, True, "m", stream, None, None, b"{}", strip)


def run(meter: StreamMeter, chunks: list[bytes]) -> bytes:
    return b"".join(meter.feed(c) for c in chunks) + meter.flush()


def usage_event(stream: bytes) -> bytes:
    """The include_usage chunk's exact bytes, found without the parser under test."""
    matches = re.findall(rb'data: \{[^\n]*"choices":\[\],[^\n]*"usage":\{[^\n]*\n\n', stream)
    assert len(matches) == 1
    return bytes(matches[0])


def test_satisfies_the_provider_protocol() -> None:
    provider: Provider = PROVIDER
    meter: StreamMeter = PROVIDER.stream_meter(parsed("chat"))
    assert provider.name == "openai"
    assert meter.usage is None and not meter.completed and meter.malformed == 0


def test_upstream_auth_headers() -> None:
    assert PROVIDER.upstream_auth_headers("sk-x") == {"Authorization": "Bearer sk-x"}


# --- parse_request -----------------------------------------------------------------------

BODY = b'{"model":"gpt-4o-mini","messages":[]}'


@pytest.mark.parametrize(
    ("path", "endpoint"),
    [
        ("v1/chat/completions", "chat"),
        ("/v1/chat/completions", "chat"),
        ("chat/completions", "chat"),
        ("/chat/completions/", "chat"),
        ("v1/chat/completions?api-version=1", "chat"),
        ("v1/responses", "responses"),
        ("responses", "responses"),
        ("v1/completions", "completions"),
        ("v1/embeddings", "embeddings"),
    ],
)
def test_metered_paths(path: str, endpoint: str) -> None:
    p = PROVIDER.parse_request(path, BODY)
    assert (p.endpoint, p.metered, p.model) == (endpoint, True, "gpt-4o-mini")
    assert p.body is BODY


@pytest.mark.parametrize(
    "path",
    [
        "v1/models",
        "v1/files",
        "v1/chat/completions/chatcmpl-1",
        "v1/responses/resp_1",
        "v1/responses/resp_1/cancel",
        "v1/audio/speech",
        "",
        "/",
        "v1",
        "v2/chat/completions",
    ],
)
@pytest.mark.parametrize("body", [b"", b"not json", b"\xff\xfe", BODY])
def test_other_paths_pass_through_unparsed(path: str, body: bytes) -> None:
    p = PROVIDER.parse_request(path, body)
    assert p == ParsedRequest("other", False, None, False, None, None, body)
    assert p.body is body


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"", "invalid_json"),
        (b"not json", "invalid_json"),
        (b'{"model": "x",}', "invalid_json"),
        (b"\xff\xfe{}", "invalid_json"),
        (b'{"model": "\xff"}', "invalid_json"),
        (b"[1, 2]", "invalid_json"),
        (b'"gpt-4o"', "invalid_json"),
        (b"null", "invalid_json"),
        (b"{}", "missing_model"),
        (b'{"model": null}', "missing_model"),
        (b'{"model": ""}', "invalid_model"),
        (b'{"model": "   "}', "invalid_model"),
        (b'{"model": 4}', "invalid_model"),
        (b'{"model": ["gpt-4o"]}', "invalid_model"),
        (b'{"model": {"id": "gpt-4o"}}', "invalid_model"),
    ],
)
@pytest.mark.parametrize(
    "path", ["v1/chat/completions", "v1/responses", "v1/completions", "v1/embeddings"]
)
def test_bad_bodies_are_refused_with_a_sentence(path: str, body: bytes, code: str) -> None:
    with pytest.raises(BadRequest) as info:
        PROVIDER.parse_request(path, body)
    err = info.value
    assert err.code == code and err.status == 400
    assert err.message[0].isupper() and err.message.rstrip().endswith(".")
    assert "model" in err.message or "JSON" in err.message
    assert orjson.loads(err.render("openai"))["error"]["code"] == code


@pytest.mark.parametrize(
    ("path", "fields", "expected"),
    [
        ("v1/chat/completions", {}, None),
        ("v1/chat/completions", {"max_tokens": 100}, 100),
        ("v1/chat/completions", {"max_completion_tokens": 50}, 50),
        ("v1/chat/completions", {"max_completion_tokens": 50, "max_tokens": 80}, 80),
        ("v1/chat/completions", {"max_completion_tokens": 0}, 0),
        ("v1/chat/completions", {"max_tokens": 100, "n": 3}, 300),
        ("v1/chat/completions", {"max_tokens": "100"}, None),
        ("v1/chat/completions", {"max_tokens": -1}, None),
        ("v1/chat/completions", {"max_tokens": True}, None),
        ("v1/chat/completions", {"max_tokens": 10.0}, None),
        ("v1/chat/completions", {"max_output_tokens": 10}, None),  # not a chat field
        ("v1/completions", {}, 16),  # the API's documented default
        ("v1/completions", {"max_tokens": 30, "n": 2, "best_of": 5}, 150),
        ("v1/completions", {"max_tokens": 30, "prompt": ["a", "b"]}, 60),
        ("v1/completions", {"max_tokens": 30, "prompt": [1, 2, 3]}, 30),
        ("v1/completions", {"max_tokens": 30, "prompt": [[1], [2]], "n": 2}, 120),
        ("v1/responses", {"max_output_tokens": 500}, 500),
        ("v1/responses", {"max_output_tokens": 500, "n": 4}, 500),
        ("v1/responses", {"max_tokens": 500}, None),
        ("v1/embeddings", {"input": "hi"}, 0),
    ],
)
def test_max_output_tokens(path: str, fields: dict[str, Any], expected: int | None) -> None:
    body = orjson.dumps({"model": "m", **fields})
    assert PROVIDER.parse_request(path, body).max_output_tokens == expected


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, None),
        ({"user": "u-1"}, "u-1"),
        ({"safety_identifier": "s-1"}, "s-1"),
        ({"user": "u-1", "safety_identifier": "s-1"}, "u-1"),
        ({"user": "", "safety_identifier": "s-1"}, "s-1"),
        ({"user": 5}, None),
    ],
)
@pytest.mark.parametrize("path", ["v1/chat/completions", "v1/responses"])
def test_end_user(path: str, fields: dict[str, Any], expected: str | None) -> None:
    body = orjson.dumps({"model": "m", **fields})
    assert PROVIDER.parse_request(path, body).end_user == expected


@pytest.mark.parametrize(
    ("path", "stream_value", "expected"),
    [
        ("v1/chat/completions", True, True),
        ("v1/chat/completions", False, False),
        ("v1/chat/completions", "true", False),
        ("v1/chat/completions", 1, False),
        ("v1/responses", True, True),
        ("v1/embeddings", True, False),
    ],
)
def test_stream_flag(path: str, stream_value: object, expected: bool) -> None:
    body = orjson.dumps({"model": "m", "stream": stream_value})
    assert PROVIDER.parse_request(path, body).stream is expected


# --- include_usage injection -------------------------------------------------------------

INJECTION_CASES: list[tuple[str, dict[str, Any], dict[str, Any] | None]] = [
    # (name, request fields besides model, expected stream_options after; None = untouched)
    ("absent", {"stream": True}, {"include_usage": True}),
    ("null", {"stream": True, "stream_options": None}, {"include_usage": True}),
    ("empty", {"stream": True, "stream_options": {}}, {"include_usage": True}),
    (
        "false",
        {"stream": True, "stream_options": {"include_usage": False}},
        {"include_usage": True},
    ),
    (
        "other fields kept",
        {"stream": True, "stream_options": {"include_obfuscation": False}},
        {"include_obfuscation": False, "include_usage": True},
    ),
    ("already true", {"stream": True, "stream_options": {"include_usage": True}}, None),
    ("not streaming", {"stream": False}, None),
    ("stream absent", {}, None),
    ("malformed options", {"stream": True, "stream_options": "yes"}, None),
]


@pytest.mark.parametrize("path", ["v1/chat/completions", "v1/completions"])
@pytest.mark.parametrize(
    ("fields", "expected"), [c[1:] for c in INJECTION_CASES], ids=[c[0] for c in INJECTION_CASES]
)
def test_include_usage_injection(
    path: str, fields: dict[str, Any], expected: dict[str, Any] | None
) -> None:
    original = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hé"}],
        "temperature": 0.7,
        **fields,
    }
    body = orjson.dumps(original)
    p = PROVIDER.parse_request(path, body)
    if expected is None:
        assert p.body is body and not p.strip_usage_chunk
        return
    assert p.strip_usage_chunk and p.stream
    assert orjson.loads(p.body) == {**original, "stream_options": expected}


def test_injection_keeps_every_other_byte_of_the_request() -> None:
    # Spacing, key order, float spelling and a 20-digit integer all survive untouched.
    body = (
        b' {"model": "gpt-4o-mini",  "seed": 123456789012345678901, "top_p": 1.0e0, "stream": true}'
    )
    p = PROVIDER.parse_request("v1/chat/completions", body)
    assert p.strip_usage_chunk
    assert p.body.replace(b'"stream_options":{"include_usage":true},', b"", 1) == body
    assert orjson.loads(p.body)["stream_options"] == {"include_usage": True}


def test_responses_streams_are_never_rewritten() -> None:
    body = fixture("openai-responses-stream.request.json")
    p = PROVIDER.parse_request("v1/responses", body)
    assert (p.endpoint, p.stream, p.model, p.strip_usage_chunk) == (
        "responses",
        True,
        "gpt-4.1-nano",
        False,
    )
    assert p.body is body


@pytest.mark.parametrize(
    ("name", "path", "model", "stream"),
    [
        ("openai-chat-cached-tokens.request.json", "v1/chat/completions", "gpt-4o-mini", False),
        ("openai-chat-tool-calls.request.json", "v1/chat/completions", "gpt-3.5-turbo", False),
        (
            "openai-chat-stream-include-usage.request.json",
            "v1/chat/completions",
            "gpt-4o-mini",
            True,
        ),
        ("openai-responses-stream.request.json", "v1/responses", "gpt-4.1-nano", True),
    ],
)
def test_recorded_requests(name: str, path: str, model: str, stream: bool) -> None:
    body = fixture(name)
    p = PROVIDER.parse_request(path, body)
    assert (p.model, p.stream, p.max_output_tokens) == (model, stream, None)
    # The recorded streamed chat request already asks for usage: nothing to inject.
    assert p.body is body and not p.strip_usage_chunk


def test_stream_without_usage_request_gets_injected() -> None:
    body = (
        b'{"messages":[{"role":"user","content":"Tell me a joke about opentelemetry"}],'
        b'"model":"gpt-3.5-turbo","stream":true}'
    )
    p = PROVIDER.parse_request("v1/chat/completions", body)
    assert p.strip_usage_chunk
    assert orjson.loads(p.body) == {**orjson.loads(body), "stream_options": {"include_usage": True}}


# --- usage from complete bodies ----------------------------------------------------------

BODY_CASES: list[tuple[str, str, Usage | None, str | None]] = [
    (
        "openai-chat-cached-tokens.json",
        "chat",
        Usage(input=1149, output=353, cached_input=1024, reasoning=0),
        "gpt-4o-mini-2024-07-18",
    ),
    (
        "openai-chat-reasoning.json",
        "chat",
        Usage(input=11, output=202, cached_input=0, reasoning=192),
        "gpt-5-nano-2025-08-07",
    ),
    (
        "openai-chat-tool-calls.json",
        "chat",
        Usage(input=70, output=46, cached_input=0, reasoning=0),
        "gpt-3.5-turbo-0125",
    ),
    ("openai-completions.json", "completions", Usage(input=8, output=16), "davinci:2023-07-21-v2"),
    ("openai-embeddings.json", "embeddings", Usage(input=8, output=0), "text-embedding-ada-002-v2"),
    (
        "openai-responses.json",
        "responses",
        Usage(input=11, output=131, cached_input=0, reasoning=64),
        "gpt-5-nano-2025-08-07",
    ),
    ("openai-chat-error-404-model-not-found.json", "chat", None, None),
    ("openai-responses-error-400-model-not-found.json", "responses", None, None),
]


@pytest.mark.parametrize(
    ("name", "endpoint", "usage", "model"), BODY_CASES, ids=[c[0] for c in BODY_CASES]
)
def test_usage_from_recorded_bodies(
    name: str, endpoint: str, usage: Usage | None, model: str | None
) -> None:
    assert PROVIDER.usage_from_body(endpoint, fixture(name)) == (usage, model)


@pytest.mark.parametrize(
    ("endpoint", "body", "expected"),
    [
        ("chat", b"", (None, None)),
        ("chat", b"garbage", (None, None)),
        ("chat", b"[1]", (None, None)),
        ("chat", b'{"model": "m"}', (None, "m")),
        (
            "chat",
            b'{"model": 3, "usage": {"prompt_tokens": 1, "completion_tokens": 2}}',
            (Usage(input=1, output=2), None),
        ),
        ("chat", b'{"usage": {"prompt_tokens": 5}}', (Usage(input=5), None)),
        ("chat", b'{"usage": {"prompt_tokens": true, "completion_tokens": -3}}', (None, None)),
        (
            "chat",
            b'{"usage": {"prompt_tokens": 1, "completion_tokens": 2, '
            b'"prompt_tokens_details": null}}',
            (Usage(input=1, output=2), None),
        ),
        ("chat", b'{"usage": "lots"}', (None, None)),
        (
            "embeddings",
            b'{"usage": {"prompt_tokens": 9, "total_tokens": 9}}',
            (Usage(input=9, output=0), None),
        ),
        (
            "responses",
            b'{"usage": {"input_tokens": 3, "output_tokens": 4, '
            b'"output_tokens_details": {"reasoning_tokens": 1}}}',
            (Usage(input=3, output=4, reasoning=1), None),
        ),
    ],
)
def test_usage_from_inline_bodies(
    endpoint: str, body: bytes, expected: tuple[Usage | None, str | None]
) -> None:
    assert PROVIDER.usage_from_body(endpoint, body) == expected


@pytest.mark.parametrize(
    ("name", "endpoint", "text"),
    [
        ("openai-chat-reasoning.json", "chat", "3"),
        (
            "openai-completions.json",
            "completions",
            '?" I have to explain what is opentelemetry. Then, this joke was',
        ),
        ("openai-responses.json", "responses", "3"),
        ("openai-embeddings.json", "embeddings", ""),
    ],
)
def test_output_text_from_recorded_bodies(name: str, endpoint: str, text: str) -> None:
    assert PROVIDER.output_text_from_body(endpoint, fixture(name)) == text


def test_output_text_includes_tool_call_arguments() -> None:
    text = PROVIDER.output_text_from_body("chat", fixture("openai-chat-tool-calls.json"))
    assert '{"location": "San Francisco"}' in text and '{"location": "Boston"}' in text


# --- streams -------------------------------------------------------------------------------

STREAM_CASES: list[tuple[str, str, Usage | None, str, str]] = [
    (
        "openai-chat-stream-include-usage.sse",
        "chat",
        Usage(input=78, output=9, cached_input=0, reasoning=0),
        "gpt-4o-mini-2024-07-18",
        "The capital of the UK is London.",
    ),
    (
        "openai-chat-stream-include-usage-reasoning.sse",
        "chat",
        Usage(input=12, output=100, cached_input=0, reasoning=100),
        "gpt-5-nano-2025-08-07",
        "",
    ),
    (
        "openai-chat-stream.sse",
        "chat",
        None,
        "gpt-3.5-turbo-0125",
        "Why did the Opentelemetry developer break up with their debugger? "
        "Because it couldn't handle their tracing behavior!",
    ),
    (
        "openai-responses-stream.sse",
        "responses",
        Usage(input=14, output=9, cached_input=0, reasoning=0),
        "gpt-4.1-nano-2025-04-14",
        "2 + 2 equals 4.",
    ),
    (
        "openai-responses-stream-reasoning-function-call.sse",
        "responses",
        Usage(input=53, output=469, cached_input=0, reasoning=448),
        "gpt-5-2025-08-07",
        '{"result":6666}',
    ),
]
STREAM_IDS = [c[0] for c in STREAM_CASES]


@pytest.mark.parametrize(
    ("name", "endpoint", "usage", "model", "text"), STREAM_CASES, ids=STREAM_IDS
)
def test_recorded_streams(
    name: str, endpoint: str, usage: Usage | None, model: str, text: str
) -> None:
    stream = fixture(name)
    meter = PROVIDER.stream_meter(parsed(endpoint))
    out = meter.feed(stream)
    assert out is stream  # not stripping: the very same object, nothing held back
    assert meter.flush() == b""
    assert (meter.usage, meter.model, meter.completed, meter.malformed) == (usage, model, True, 0)
    assert meter.output_text() == text


@pytest.mark.parametrize(
    ("name", "endpoint", "usage", "model", "text"), STREAM_CASES, ids=STREAM_IDS
)
def test_recorded_streams_under_any_chunking(
    name: str, endpoint: str, usage: Usage | None, model: str, text: str
) -> None:
    stream = fixture(name)
    strip = endpoint == "chat"
    expected_out = stream.replace(usage_event(stream), b"") if usage and strip else stream
    rng = random.Random(name)
    chunkings = [
        [stream[:i], stream[i:]] for i in range(0, len(stream) + 1, 1 if len(stream) < 8000 else 7)
    ]
    chunkings.append([stream[i : i + 1] for i in range(len(stream))])
    for _ in range(30):
        cuts = sorted(rng.randrange(len(stream) + 1) for _ in range(10))
        chunkings.append(
            [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
        )
    for chunks in chunkings:
        meter = PROVIDER.stream_meter(parsed(endpoint, strip=strip))
        assert run(meter, chunks) == expected_out
        assert (meter.usage, meter.model, meter.completed, meter.malformed) == (
            usage,
            model,
            True,
            0,
        )
        assert meter.output_text() == text


@pytest.mark.parametrize(
    "name",
    ["openai-chat-stream-include-usage.sse", "openai-chat-stream-include-usage-reasoning.sse"],
)
def test_strip_removes_exactly_the_usage_event(name: str) -> None:
    stream = fixture(name)
    event = usage_event(stream)
    meter = PROVIDER.stream_meter(parsed("chat", strip=True))
    out = run(meter, [stream])
    assert out == stream.replace(event, b"")
    assert len(out) == len(stream) - len(event)
    assert out.endswith(b"data: [DONE]\n\n")
    assert b'"choices":[]' not in out
    assert meter.usage is not None and meter.completed


def test_strip_holds_back_only_the_unfinished_event() -> None:
    meter = PROVIDER.stream_meter(parsed("chat", strip=True))
    first = b'data: {"choices":[{"index":0,"delta":{"content":"a"}}],"usage":null}\n\n'
    assert meter.feed(first + b"data: {") == first
    assert meter.feed(b'"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}\n\n') == b""
    assert meter.feed(b"data: [DONE]\n") == b""
    assert meter.flush() == b"data: [DONE]\n"
    assert meter.usage == Usage(input=1, output=2) and meter.completed


@pytest.mark.parametrize("strip", [False, True])
def test_one_event_per_chunk_as_the_fixture_arrives(strip: bool) -> None:
    """The usual shape, one whole event per chunk (the meter's fast path), relays and
    meters exactly like the same bytes in one piece; an empty data event is no error."""
    stream = b"data: \n\n" + fixture("openai-chat-stream-include-usage.sse")
    events = [e + b"\n\n" for e in stream.split(b"\n\n") if e]
    assert b"".join(events) == stream
    whole = PROVIDER.stream_meter(parsed("chat", strip=strip))
    piecewise = PROVIDER.stream_meter(parsed("chat", strip=strip))
    out = b"".join(piecewise.feed(e) for e in events) + piecewise.flush()
    assert out == run(whole, [stream])
    for attr in ("usage", "completed", "model", "malformed"):
        assert getattr(piecewise, attr) == getattr(whole, attr), attr
    assert piecewise.output_text() == whole.output_text() and piecewise.malformed == 0


def test_strip_keeps_usage_chunks_that_still_have_choices() -> None:
    # Some OpenAI-compatible servers put usage on the last content chunk: keep it.
    event = (
        b'data: {"choices":[{"index":0,"delta":{"content":"x"}}],'
        b'"usage":{"prompt_tokens":1,"completion_tokens":1}}\n\n'
    )
    meter = PROVIDER.stream_meter(parsed("chat", strip=True))
    assert run(meter, [event, b"data: [DONE]\n\n"]) == event + b"data: [DONE]\n\n"
    assert meter.usage == Usage(input=1, output=1)


CHAT_EVENT_CASES: list[tuple[str, bytes, dict[str, Any]]] = [
    ("no done", b'data: {"model":"m","choices":[]}\n\n', {"completed": False, "model": "m"}),
    ("done only", b"data: [DONE]\n\n", {"completed": True}),
    ("padded done", b"data:  [DONE] \n\n", {"completed": True}),
    (
        "crlf framing",
        b'data: {"choices":[{"delta":{"content":"hi"}}]}\r\n\r\ndata: [DONE]\r\n\r\n',
        {"completed": True, "text": "hi"},
    ),
    (
        "malformed json",
        b"data: {nope\n\ndata: [1,2]\n\ndata: [DONE]\n\n",
        {"completed": True, "malformed": 2},
    ),
    (
        "error mid-stream",
        b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
        b'data: {"error":{"message":"boom","type":"server_error"}}\n\n'
        b"data: [DONE]\n\n",
        {"completed": False, "text": "a"},
    ),
    (
        "comments and pings",
        b": keep-alive\n\nevent: ping\ndata: {}\n\ndata: [DONE]\n\n",
        {"completed": True},
    ),
    (
        "tool call arguments",
        b'data: {"choices":[{"delta":{"tool_calls":[{"index":0,'
        b'"function":{"name":"f","arguments":"{\\"a\\""}}]}}]}\n\n'
        b'data: {"choices":[{"delta":{"tool_calls":[{"index":0,'
        b'"function":{"arguments":":1}"}}]}}]}\n\n',
        {"text": 'f{"a":1}'},
    ),
    (
        "reasoning content",
        b'data: {"choices":[{"delta":{"reasoning_content":"think","content":"say"}}]}\n\n',
        {"text": "saythink"},
    ),
    (
        "legacy completions text",
        b'data: {"choices":[{"text":"one","index":0}]}\n\ndata: {"choices":[{"text":" two"}]}\n\n',
        {"text": "one two"},
    ),
    (
        "usage reported twice keeps the larger",
        b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":1}}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":7}}\n\n',
        {"usage": Usage(input=5, output=7), "stripped": b""},
    ),
    (
        "garbage usage ignored",
        b'data: {"choices":[],"usage":{"prompt_tokens":"5"}}\n\n',
        {"stripped": b""},
    ),
    ("unterminated final event", b"data: [DONE]", {"completed": True}),
]


@pytest.mark.parametrize(
    ("stream", "expected"), [c[1:] for c in CHAT_EVENT_CASES], ids=[c[0] for c in CHAT_EVENT_CASES]
)
@pytest.mark.parametrize("strip", [False, True])
def test_chat_stream_events(stream: bytes, expected: dict[str, Any], strip: bool) -> None:
    for chunks in ([stream], [stream[i : i + 1] for i in range(len(stream))]):
        meter = PROVIDER.stream_meter(parsed("chat", strip=strip))
        out = run(meter, chunks)
        assert out == (expected.get("stripped", stream) if strip else stream)
        assert meter.completed is expected.get("completed", False)
        assert meter.model == expected.get("model")
        assert meter.malformed == expected.get("malformed", 0)
        assert meter.output_text() == expected.get("text", "")
        assert meter.usage == expected.get("usage")


def responses_event(kind: str, **fields: Any) -> bytes:
    return (
        b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **fields}) + b"\n\n"
    )


RESPONSE_USAGE = {
    "input_tokens": 10,
    "output_tokens": 20,
    "output_tokens_details": {"reasoning_tokens": 5},
}


@pytest.mark.parametrize(
    ("stream", "usage", "completed", "text"),
    [
        (
            responses_event(
                "response.incomplete", response={"model": "g", "usage": RESPONSE_USAGE}
            ),
            Usage(input=10, output=20, reasoning=5),
            True,
            "",
        ),
        (
            responses_event("response.failed", response={"model": "g", "usage": None}),
            None,
            True,
            "",
        ),
        (
            responses_event("response.output_text.delta", delta="par")
            + responses_event("error", code="server_error", message="boom"),
            None,
            False,
            "par",
        ),
        (
            responses_event("response.reasoning_summary_text.delta", delta="why ")
            + responses_event("response.output_text.delta", delta="what")
            + responses_event("response.output_text.done", text="what"),
            None,
            False,
            "why what",
        ),
    ],
)
def test_responses_stream_events(
    stream: bytes, usage: Usage | None, completed: bool, text: str
) -> None:
    meter = PROVIDER.stream_meter(parsed("responses", strip=True))  # strip never applies here
    assert run(meter, [stream]) == stream
    assert (meter.usage, meter.completed, meter.output_text()) == (usage, completed, text)


# --- prompt text -----------------------------------------------------------------------------


def test_prompt_text_of_chat_messages_and_tools() -> None:
    body = orjson.dumps(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "look"},
                        {"type": "image_url", "image_url": {"url": "data:"}},
                    ],
                },
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"type": "function", "function": {"name": "get", "arguments": '{"q":1}'}}
                    ],
                },
                {"role": "tool", "tool_call_id": "c", "content": "result!"},
            ],
            "tools": [{"type": "function", "function": {"name": "get"}}],
        }
    )
    text = PROVIDER.prompt_text(body)
    for piece in ("be brief", "look", "get", '{"q":1}', "result!", "type get = () => any;"):
        assert piece in text
    assert "data:" not in text
    # 4 messages (4 tokens each), priming 3, function tools 9 less 4 shared with the system
    assert PROVIDER.prompt(body, "chat").framing == 4 * 4 + 3 + 9 - 4


def test_function_tools_rendered_as_the_model_reads_them() -> None:
    body = orjson.dumps(
        {
            "model": "m",
            "input": "hi",
            "tools": [
                {
                    "type": "function",
                    "name": "get_weather",
                    "description": "Get the weather",
                    "parameters": {
                        "type": "object",
                        "properties": {
                            "location": {"type": "string", "description": "The city"},
                            "unit": {"type": "string", "enum": ["c", "f"]},
                            "days": {"type": "array", "items": {"type": "integer"}},
                            "opts": {
                                "type": "object",
                                "properties": {"raw": {"type": "boolean", "description": "x"}},
                                "required": ["raw"],
                            },
                        },
                        "required": ["location"],
                    },
                },
                {"type": "web_search"},
            ],
        }
    )
    prompt = PROVIDER.prompt(body, "responses")
    assert (
        "namespace functions {\n\n// Get the weather\ntype get_weather = (_: {\n"
        '// The city\nlocation: string,\nunit?: "c" | "f",\ndays?: number[],\n'
        "opts?: {\n  raw: boolean,\n},\n}) => any;\n\n} // namespace functions"
    ) in prompt.text
    assert '[{"type":"web_search"}]' in prompt.text  # other tools: their JSON
    assert prompt.framing == 4 + 3 + 9  # one message ("input"), priming, functions


def test_deeply_nested_tool_schema_does_not_recurse_without_end() -> None:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(200):
        schema = {"type": "array", "items": schema}
    body = orjson.dumps(
        {
            "model": "m",
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {"type": "object", "properties": {"deep": schema}},
                    },
                }
            ],
        }
    )
    assert "deep?: " in PROVIDER.prompt_text(body)


@pytest.mark.parametrize(
    ("body", "endpoint", "framing"),
    [
        (b'{"model":"m","prompt":"once"}', "completions", 0),
        (b'{"model":"m","input":"once"}', "embeddings", 0),
        (b'{"model":"m","input":"once"}', "responses", 4 + 3),
        (
            b'{"model":"m","instructions":"be","input":[{"role":"user","content":"x"}]}',
            "responses",
            8 + 3,
        ),
        (
            b'{"model":"m","messages":[{"role":"user","name":"ann","content":"x"}]}',
            "chat",
            4 + 1 + 3,
        ),
        (b'{"model":"m","messages":[]}', "chat", 0),
    ],
)
def test_prompt_framing_by_endpoint(body: bytes, endpoint: str, framing: int) -> None:
    assert PROVIDER.prompt(body, endpoint).framing == framing


def test_prompt_text_of_recorded_requests() -> None:
    text = PROVIDER.prompt_text(fixture("openai-chat-stream-include-usage.request.json"))
    assert "What is the capital of the UK?" in text and "London" in text and "get_capital" in text
    assert PROVIDER.prompt_text(fixture("openai-responses-stream.request.json")) == "What is 2+2?"


@pytest.mark.parametrize(
    ("fields", "pieces"),
    [
        ({"prompt": "once upon"}, ["once upon"]),
        ({"prompt": ["a", "b"]}, ["a", "b"]),
        ({"input": ["x", "y"]}, ["x", "y"]),
        (
            {
                "instructions": "sys",
                "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
            },
            ["sys", "hi"],
        ),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": "42"}]}, ["42"]),
        ({"text": {"format": {"type": "json_schema", "name": "s"}}}, ['"json_schema"']),
    ],
)
def test_prompt_text_of_other_shapes(fields: dict[str, Any], pieces: list[str]) -> None:
    text = PROVIDER.prompt_text(orjson.dumps({"model": "m", **fields}))
    for piece in pieces:
        assert piece in text


@pytest.mark.parametrize(
    ("fields", "count"),
    [
        ({"prompt": "text"}, 0),
        ({"prompt": [1, 2, 3]}, 3),
        ({"prompt": [[1, 2], [3]]}, 3),
        ({"input": [[1, 2], "text"]}, 2),
        ({"input": [True, False]}, 0),
    ],
)
def test_prompt_token_ids_count(fields: dict[str, Any], count: int) -> None:
    assert PROVIDER.prompt_token_ids_count(orjson.dumps({"model": "m", **fields})) == count


@pytest.mark.parametrize(
    "body", [b"", b"{", b"[]", b'{"messages": 5, "input": {"a": 1}, "tools": null}']
)
def test_text_helpers_never_raise(body: bytes) -> None:
    assert isinstance(PROVIDER.prompt_text(body), str)
    assert isinstance(PROVIDER.output_text_from_body("chat", body), str)
    assert PROVIDER.prompt_token_ids_count(body) == 0
