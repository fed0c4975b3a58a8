"""A fake OpenAI + Anthropic upstream at the network edge, for tests and benchmarks.

The bodies, stream events, framing and headers follow recordings of the real APIs
(``/work/shared/fixtures/provider-wire/``): key order, OpenAI's ``data: …`` framing with
``data: [DONE]``, Anthropic's ``event:``/``data:`` pairs with whitespace padding inside
the JSON, ``"usage":null`` on every chat chunk when ``stream_options.include_usage`` is
set, dated model snapshots, ``x-request-id`` / ``request-id`` and rate-limit headers.

Use it in-process::

    async with FakeUpstream() as fake:
        client = AsyncOpenAI(base_url=fake.url + "/v1", api_key="sk-test")
        ...
        assert fake.records[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 100

or as its own process (the benchmark does this; ``--workers N`` shares the port through
``SO_REUSEPORT``, and then each worker keeps its own records)::

    python tests/fake_upstream.py --port 9000 [--gzip] [--require-key sk-upstream]

Routes
------
OpenAI: ``POST /v1/chat/completions``, ``/v1/responses``, ``/v1/completions``,
``/v1/embeddings``; ``GET /v1/models`` (Anthropic's shape when the request carries
``anthropic-version``). Anthropic: ``POST /v1/messages``, ``/v1/messages/count_tokens``.
Chat, responses, completions and messages stream when the body has ``"stream": true``.
Any other path answers 404 in the provider's error shape. Test control:
``GET /_fake/records``, ``GET /_fake/requests``, ``POST /_fake/reset``, ``GET /_fake/health``.

Token usage (deterministic)
---------------------------
``B = len(request body) // 4`` (at least 1) is the uncached prompt; ``D = 8 + len % 25``
is the default visible output. Unless ``X-Fake-Output`` is given, ``reasoning + D`` is
capped by the request's max tokens (``max_completion_tokens``/``max_tokens``,
``max_output_tokens``, Anthropic ``max_tokens``; legacy completions default to 16), and
a capped answer ends with ``length`` / ``max_tokens`` / Responses ``incomplete``.

- OpenAI chat/responses: prompt = ``B + cached``; completion = visible + reasoning.
- Legacy completions: prompt/completion/total only. Embeddings: prompt = total = ``B``.
- Anthropic: ``input_tokens = B`` (the uncached part, as Anthropic reports it),
  ``cache_read_input_tokens = cached``, ``cache_creation_input_tokens = 5m + 1h`` writes,
  ``output_tokens`` = visible + reasoning (thinking is billed as output; a thinking block
  is emitted when reasoning > 0). ``count_tokens`` answers ``{"input_tokens": B}``.

Knobs (request headers, case-insensitive; the SDKs send them with ``extra_headers=``)
---------------------------------------------------------------------------------------
============================  ==========================================================
``X-Fake-Input: N``           uncached prompt tokens instead of ``B``
``X-Fake-Output: N``          visible output tokens (never capped by max tokens)
``X-Fake-Cached: N``          cache reads: OpenAI ``prompt_tokens_details.cached_tokens`` /
                              Responses ``input_tokens_details.cached_tokens``, Anthropic
                              ``cache_read_input_tokens``
``X-Fake-Cache-Write: N``     Anthropic 5-minute cache writes
                              (``cache_creation.ephemeral_5m_input_tokens``); on OpenAI it
                              adds ``prompt_tokens_details.cache_write_tokens``
``X-Fake-Cache-Write-1h: N``  Anthropic 1-hour cache writes (``ephemeral_1h_input_tokens``)
``X-Fake-Reasoning: N``       reasoning tokens: chat ``completion_tokens_details.
                              reasoning_tokens``, Responses ``output_tokens_details.
                              reasoning_tokens`` (plus a reasoning output item),
                              Anthropic: added to ``output_tokens`` with a thinking block
``X-Fake-Chunks: N``          content deltas in a stream (default 5, at least 1; the
                              visible tokens are spread over them, so some may be empty;
                              each token is a common word that is exactly one tiktoken
                              token in cl100k and o200k)
``X-Fake-Chunk-Delay-Ms: N``  pause between content deltas
``X-Fake-Split: 1``           write every stream event in two halves, 5 ms apart
``X-Fake-Delay-Ms: N``        pause before the response starts; with ``timeout`` /
                              ``stall`` it is the length of that fault's sleep
                              (default 120000)
``X-Fake-Fault-After: K``     content deltas sent before ``cut`` / ``error-event`` /
                              ``stall`` strikes (default ``chunks // 2``)
``X-Fake-Retry-After: N``     ``retry-after`` seconds on 429/503/529 (default 1)
``X-Fake-Gzip: 1``            gzip the response when ``Accept-Encoding`` allows it
``X-Fake-Fault: MODE``        one of the fault modes below
============================  ==========================================================

Fault modes (``X-Fake-Fault``)
------------------------------
``reset``          read the request, then abort the TCP connection (RST) with no response.
``html``           502 with a Cloudflare-style HTML page; ``html:NNN`` picks the status
                   (``html:200`` is a 200 whose body is HTML, not JSON).
``timeout``        sleep ``X-Fake-Delay-Ms`` (default 120 s) before answering normally;
                   the sleep ends early if the client goes away.
``stall``          streams: send ``K`` deltas, then sleep ``X-Fake-Delay-Ms``, then finish;
                   non-streamed: send the headers, sleep, then the body (read timeouts).
``malformed-sse``  streams: after every content delta add a garbage block (truncated
                   JSON, ``data: {not json}``, a line without a field name, invalid UTF-8);
                   usage and the terminator still arrive. Non-streamed: a 200 whose body
                   is not valid JSON.
``cut``            streams: send ``K`` deltas, then close the connection mid-stream: no
                   terminator, no final usage, no end of the chunked body. Non-streamed:
                   announce the full Content-Length, send half the body, close.
``error-event``    streams: after ``K`` deltas send the provider's mid-stream error, then
                   end the HTTP response cleanly without the terminator. Anthropic:
                   ``event: error`` with ``overloaded_error``; chat/completions:
                   ``data: {"error": {... "server_error"}}``; Responses:
                   ``event: error``. Ignored for non-streamed requests.
``status:NNN``     answer NNN with the provider's real error body (OpenAI
                   ``{"error": {message, type, param, code}}``, Anthropic
                   ``{"type":"error","error":{type,message},"request_id"}``); known shapes for
                   400, 401, 403, 404, 413, 429 (with ``retry-after``), 500, 503, 529.

Constructor: ``FakeUpstream(require_key="sk-upstream")`` answers 401 in the provider's
shape unless ``Authorization: Bearer <key>`` or ``x-api-key: <key>`` carries that key;
``gzip=True`` compresses every response whose request accepts gzip.

Record format
-------------
``fake.records`` (and ``GET /_fake/records``) holds one dict per metered request
(chat, responses, completions, embeddings, messages, count_tokens), appended as soon as
the request arrives and updated in place while the response is written. A record is
updated *before* each write, so it is current when the client sees the bytes; after a
client disconnect, ``await fake.wait_idle()`` waits until every handler has finished.
``fake.record_for(request_id)`` finds one record; ``fake.reset()`` forgets everything.

``request_id``       the ``x-request-id`` (OpenAI) / ``request-id`` (Anthropic) sent back
``provider``         ``"openai"`` or ``"anthropic"``
``endpoint``         path after ``/v1/``: ``chat/completions``, ``responses``, …
``request_model``    ``model`` as sent; ``model`` is the one echoed (snapshot form)
``stream``           whether the response was an SSE stream
``include_usage``    chat/completions streams: ``stream_options.include_usage``
``status``           HTTP status sent, or None (``reset``, or not answered yet)
``fault``            the fault mode applied, or None
``usage``            the provider-shaped usage object exactly as last sent on the wire
                     (Anthropic streams: ``message_delta``'s, or ``message_start``'s if
                     the stream broke before it); None when none was sent
``tokens``           what a complete response reports, normalised like
                     ``proxy.usage.Usage``: ``input`` (all prompt tokens, cached and
                     written included), ``cached_input``, ``cache_write``,
                     ``cache_write_1h``, ``output`` (reasoning included), ``reasoning``;
                     None for a kind the wire format does not report
``chunks_planned``   content deltas the stream would have had
``chunks_sent``      content deltas written to the socket before the stream ended
``output_tokens_sent`` visible output tokens in those deltas
``malformed_events`` garbage blocks written (``malformed-sse``)
``completed``        the whole response, terminator included, was written
``disconnected``     the client went away (write failure or handler cancellation)
``duration_ms``      time from reading the request to the end of the response

``fake.requests`` is a bounded deque of :class:`RecordedRequest` (method, path, query,
headers, raw body bytes, which auth header arrived and its value), for every request
except ``/_fake/*``; ``GET /_fake/requests`` serves the same as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import json
import math
import multiprocessing
import os
import random
import signal
import socket
import struct
import sys
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

Json = dict[str, Any]

DEFAULT_CHUNKS: Final = 5
DEFAULT_FAULT_DELAY_MS: Final = 120_000
DEFAULT_MAX_REQUESTS: Final = 1_000
DEFAULT_MAX_RECORDS: Final = 100_000
DEFAULT_CLIENT_MAX_SIZE: Final = 64 * 1024 * 1024
SPLIT_PAUSE_S: Final = 0.005

JSON_TYPE: Final = "application/json"
SSE_TYPE: Final = "text/event-stream; charset=utf-8"

OPENAI_SNAPSHOTS: Final[Mapping[str, str]] = {
    "gpt-3.5-turbo": "gpt-3.5-turbo-0125",
    "gpt-3.5-turbo-instruct": "gpt-3.5-turbo-instruct:20230824-v2",
    "gpt-4o": "gpt-4o-2024-08-06",
    "gpt-4o-mini": "gpt-4o-mini-2024-07-18",
    "gpt-4.1": "gpt-4.1-2025-04-14",
    "gpt-4.1-mini": "gpt-4.1-mini-2025-04-14",
    "gpt-4.1-nano": "gpt-4.1-nano-2025-04-14",
    "gpt-5": "gpt-5-2025-08-07",
    "gpt-5-mini": "gpt-5-mini-2025-08-07",
    "gpt-5-nano": "gpt-5-nano-2025-08-07",
    "o1": "o1-2024-12-17",
    "o3": "o3-2025-04-16",
    "o3-mini": "o3-mini-2025-01-31",
    "o4-mini": "o4-mini-2025-04-16",
    "davinci-002": "davinci:2023-07-21-v2",
    "babbage-002": "babbage:2023-07-21-v2",
    "text-embedding-ada-002": "text-embedding-ada-002-v2",
}
"""OpenAI aliases and the dated snapshot the real API echoes for them."""

ANTHROPIC_SNAPSHOTS: Final[Mapping[str, str]] = {
    "claude-sonnet-4-5": "claude-sonnet-4-5-20250929",
    "claude-haiku-4-5": "claude-haiku-4-5-20251001",
    "claude-opus-4-1": "claude-opus-4-1-20250805",
    "claude-sonnet-4-0": "claude-sonnet-4-20250514",
    "claude-opus-4-0": "claude-opus-4-20250514",
    "claude-3-7-sonnet-latest": "claude-3-7-sonnet-20250219",
    "claude-3-5-haiku-latest": "claude-3-5-haiku-20241022",
}
"""Anthropic aliases that resolve to a dated model (``claude-sonnet-4-6`` has none)."""

# Each word is one token in the cl100k and o200k encodings (checked with tiktoken) and
# words never merge across the leading space, so a client that counts the streamed text
# with tiktoken gets exactly ``output_tokens_sent``.
_WORDS: Final = (" the", " cat", " sat", " on", " a", " mat", " and", " it", " was", " good")
_B64_TO_ALNUM: Final = bytes.maketrans(b"+/=", b"Qz7")
_OBFUSCATION: Final = tuple(("xK3pQ9zL2mW7vR4tY8nB5"[: 1 + (i * 7) % 16]) for i in range(16))
_FINGERPRINT: Final = "fp_560af6e559"
_THINKING: Final = ("Let me think", " about this briefly before answering.")
_SIGNATURE: Final = "EqQBCkYIBxgCKkBm" + "Zg" * 40 + "=="


class KnobError(ValueError):
    """A ``X-Fake-*`` header that cannot be understood; answered with a 400."""


# --------------------------------------------------------------------------- knobs


def _int_header(headers: Mapping[str, str], name: str, default: int | None) -> int | None:
    raw = headers.get(name)
    if raw is None:
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise KnobError(f"{name} must be a whole number, got {raw!r}.") from None
    if value < 0:
        raise KnobError(f"{name} must not be negative, got {value}.")
    return value


@dataclass(frozen=True, slots=True)
class Knobs:
    """The ``X-Fake-*`` test knobs of one request (see the module docstring)."""

    input: int | None = None
    output: int | None = None
    cached: int = 0
    cache_write: int = 0
    cache_write_1h: int = 0
    reasoning: int = 0
    chunks: int = DEFAULT_CHUNKS
    chunk_delay: float = 0.0
    delay: float | None = None
    fault: str | None = None
    fault_status: int | None = None
    fault_after: int | None = None
    retry_after: int = 1
    gzip: bool = False
    split: bool = False

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> Knobs:
        """Parse the knobs; raises :class:`KnobError` for a value that makes no sense."""
        knobs = tuple((k.lower(), v) for k, v in headers.items() if k[:7].lower() == "x-fake-")
        return _knobs(knobs) if knobs else _NO_KNOBS

    @classmethod
    def from_items(cls, items: tuple[tuple[str, str], ...]) -> Knobs:
        """Parse the knobs from ``(lower-case name, value)`` pairs."""
        headers = CIMultiDict(items)

        def number(name: str, default: int) -> int:
            value = _int_header(headers, name, default)
            assert value is not None
            return value

        chunks = number("X-Fake-Chunks", DEFAULT_CHUNKS)
        if chunks < 1:
            raise KnobError("X-Fake-Chunks must be at least 1.")
        delay_ms = _int_header(headers, "X-Fake-Delay-Ms", None)
        fault, status = _parse_fault(headers.get("X-Fake-Fault"))
        return cls(
            input=_int_header(headers, "X-Fake-Input", None),
            output=_int_header(headers, "X-Fake-Output", None),
            cached=number("X-Fake-Cached", 0),
            cache_write=number("X-Fake-Cache-Write", 0),
            cache_write_1h=number("X-Fake-Cache-Write-1h", 0),
            reasoning=number("X-Fake-Reasoning", 0),
            chunks=chunks,
            chunk_delay=number("X-Fake-Chunk-Delay-Ms", 0) / 1000,
            delay=None if delay_ms is None else delay_ms / 1000,
            fault=fault,
            fault_status=status,
            fault_after=_int_header(headers, "X-Fake-Fault-After", None),
            retry_after=number("X-Fake-Retry-After", 1),
            gzip=headers.get("X-Fake-Gzip", "").strip().lower() in ("1", "true", "yes"),
            split=headers.get("X-Fake-Split", "").strip().lower() in ("1", "true", "yes"),
        )

    @property
    def fault_delay(self) -> float:
        """How long ``timeout`` and ``stall`` sleep, in seconds."""
        return self.delay if self.delay is not None else DEFAULT_FAULT_DELAY_MS / 1000


_NO_KNOBS: Final = Knobs()


@functools.lru_cache(maxsize=1024)
def _knobs(items: tuple[tuple[str, str], ...]) -> Knobs:
    # Benchmarks repeat the same few knob sets; parse each once.
    return Knobs.from_items(items)


_SIMPLE_FAULTS: Final = frozenset(
    {"reset", "timeout", "stall", "malformed-sse", "cut", "error-event"}
)


def _parse_fault(raw: str | None) -> tuple[str | None, int | None]:
    if raw is None or not raw.strip():
        return None, None
    value = raw.strip().lower()
    if value in _SIMPLE_FAULTS:
        return value, None
    if value == "html":
        return "html", 502
    name, _, code = value.partition(":")
    if name in ("status", "html") and code.isdigit() and 100 <= int(code) <= 599:
        return name, int(code)
    raise KnobError(
        f"X-Fake-Fault {raw!r} is not a fault mode; use one of reset, html, html:NNN, "
        "timeout, stall, malformed-sse, cut, error-event or status:NNN."
    )


# --------------------------------------------------------------------------- plan


@functools.lru_cache(maxsize=4096)
def _words(start: int, count: int) -> str:
    return "".join(_WORDS[(start + i) % len(_WORDS)] for i in range(count))


@dataclass(frozen=True, slots=True)
class Plan:
    """The token counts and streamed text of one response, fixed before it is sent."""

    input: int
    cached: int
    cache_write_5m: int
    cache_write_1h: int
    visible: int
    reasoning: int
    truncated: bool
    chunk_texts: tuple[str, ...]
    chunk_tokens: tuple[int, ...]

    @property
    def output(self) -> int:
        """All generated tokens, reasoning included."""
        return self.visible + self.reasoning

    @property
    def cache_write(self) -> int:
        """Cache writes of every TTL."""
        return self.cache_write_5m + self.cache_write_1h

    @property
    def text(self) -> str:
        """The whole visible answer."""
        return "".join(self.chunk_texts)


_CAP_FIELDS: Final[Mapping[str, tuple[str, ...]]] = {
    "chat/completions": ("max_completion_tokens", "max_tokens"),
    "responses": ("max_output_tokens",),
    "completions": ("max_tokens",),
    "messages": ("max_tokens",),
}


def _max_tokens(endpoint: str, req: Json) -> int | None:
    for name in _CAP_FIELDS.get(endpoint, ()):
        value = req.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return 16 if endpoint == "completions" else None


def make_plan(endpoint: str, body_len: int, req: Json, knobs: Knobs) -> Plan:
    """Decide the usage of a response from the request size, its max tokens and knobs."""
    return _plan(endpoint, body_len, _max_tokens(endpoint, req), knobs)


@functools.lru_cache(maxsize=4096)
def _plan(endpoint: str, body_len: int, cap: int | None, knobs: Knobs) -> Plan:
    visible = knobs.output if knobs.output is not None else 8 + body_len % 25
    truncated = False
    if knobs.output is None and cap is not None and knobs.reasoning + visible > cap:
        visible, truncated = max(0, cap - knobs.reasoning), True
    n = knobs.chunks
    per, extra = divmod(visible, n)
    tokens = tuple(per + (1 if i < extra else 0) for i in range(n))
    texts, start = [], 0
    for count in tokens:
        texts.append(_words(start % len(_WORDS), count))
        start += count
    return Plan(
        input=knobs.input if knobs.input is not None else max(1, body_len // 4),
        cached=knobs.cached,
        cache_write_5m=knobs.cache_write,
        cache_write_1h=knobs.cache_write_1h,
        visible=visible,
        reasoning=knobs.reasoning,
        truncated=truncated,
        chunk_texts=tuple(texts),
        chunk_tokens=tokens,
    )


# --------------------------------------------------------------------------- ids


def _rand(n: int) -> str:
    """``n`` random letters and digits (the alphabet of OpenAI/Anthropic ids)."""
    return base64.b64encode(os.urandom(n)).translate(_B64_TO_ALNUM)[:n].decode()


def _hex(n: int) -> str:
    return f"{random.getrandbits(n * 4):0{n}x}"


def _request_id(provider: str) -> str:
    return f"req_{_hex(32)}" if provider == "openai" else f"req_011C{_rand(20)}"


def served_model(provider: str, model: str) -> str:
    """The model name the provider echoes for a requested ``model``."""
    table = OPENAI_SNAPSHOTS if provider == "openai" else ANTHROPIC_SNAPSHOTS
    return table.get(model, model)


# --------------------------------------------------------------------------- context


@dataclass(frozen=True, slots=True)
class Event:
    """One SSE event, already framed, with what it means for the record."""

    data: bytes
    content_tokens: int | None = None
    """Visible tokens when this is a content delta, else None."""
    usage: Json | None = None
    """The usage object this event carries, if any."""
    terminal: bool = False
    """The stream's terminator (``[DONE]``, ``message_stop``, ``response.completed``)."""


@dataclass(frozen=True, slots=True)
class Ctx:
    """Everything the body and event builders need for one response."""

    endpoint: str
    req: Json
    plan: Plan
    model: str
    created: int
    include_usage: bool
    request_id: str


@dataclass(frozen=True, slots=True)
class Endpoint:
    """How one metered route builds its answer."""

    name: str
    provider: str
    body: Callable[[Ctx], tuple[bytes, Json]]
    events: Callable[[Ctx], list[Event]] | None
    tokens: Callable[[Plan], Json]


def _dump_openai(obj: Json) -> bytes:
    """OpenAI's non-streamed bodies are pretty-printed with two spaces and a newline."""
    return orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE)


def _sse(obj: Json) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _named_sse(name: str, obj: Json, pad: int = 0) -> bytes:
    data = orjson.dumps(obj)
    if pad:  # Anthropic pads its JSON with spaces before the closing brace.
        data = data[:-1] + b" " * pad + b"}"
    return b"event: " + name.encode() + b"\ndata: " + data + b"\n\n"


_DONE: Final = Event(b"data: [DONE]\n\n", terminal=True)


def _tokens(plan: Plan, *, input: int, cached: bool, cache_write: bool, reasoning: bool) -> Json:
    return {
        "input": input,
        "cached_input": plan.cached if cached else None,
        "cache_write": plan.cache_write if cache_write else None,
        "cache_write_1h": plan.cache_write_1h if cache_write else None,
        "output": plan.output,
        "reasoning": plan.reasoning if reasoning else None,
    }


# --------------------------------------------------------------------------- chat


def _chat_usage(plan: Plan) -> Json:
    prompt = plan.input + plan.cached
    prompt_details: Json = {"cached_tokens": plan.cached, "audio_tokens": 0}
    if plan.cache_write:
        prompt_details["cache_write_tokens"] = plan.cache_write
    return {
        "prompt_tokens": prompt,
        "completion_tokens": plan.output,
        "total_tokens": prompt + plan.output,
        "prompt_tokens_details": prompt_details,
        "completion_tokens_details": {
            "reasoning_tokens": plan.reasoning,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _chat_tokens(plan: Plan) -> Json:
    return _tokens(
        plan,
        input=plan.input + plan.cached,
        cached=True,
        cache_write=bool(plan.cache_write),
        reasoning=True,
    )


def _service_tier(req: Json) -> str:
    tier = req.get("service_tier")
    return tier if tier in ("flex", "priority", "scale") else "default"


def _chat_body(ctx: Ctx) -> tuple[bytes, Json]:
    usage = _chat_usage(ctx.plan)
    body = {
        "id": f"chatcmpl-{_rand(29)}",
        "object": "chat.completion",
        "created": ctx.created,
        "model": ctx.model,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": ctx.plan.text,
                    "refusal": None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": "length" if ctx.plan.truncated else "stop",
            }
        ],
        "usage": usage,
        "service_tier": _service_tier(ctx.req),
        "system_fingerprint": _FINGERPRINT,
    }
    return _dump_openai(body), usage


def _chat_events(ctx: Ctx) -> list[Event]:
    head = orjson.dumps(
        {
            "id": f"chatcmpl-{_rand(29)}",
            "object": "chat.completion.chunk",
            "created": ctx.created,
            "model": ctx.model,
            "service_tier": _service_tier(ctx.req),
            "system_fingerprint": _FINGERPRINT,
        }
    )[:-1]
    usage_null = b',"usage":null' if ctx.include_usage else b""

    def chunk(choices: list[Json], i: int, usage: bytes = usage_null) -> bytes:
        obfuscation = _OBFUSCATION[i % len(_OBFUSCATION)].encode()
        return (
            b"data: "
            + head
            + b',"choices":'
            + orjson.dumps(choices)
            + usage
            + b',"obfuscation":"'
            + obfuscation
            + b'"}\n\n'
        )

    def choice(delta: Json, finish: str | None = None) -> list[Json]:
        return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]

    plan = ctx.plan
    events = [Event(chunk(choice({"role": "assistant", "content": "", "refusal": None}), 0))]
    for i, (text, tokens) in enumerate(zip(plan.chunk_texts, plan.chunk_tokens, strict=True)):
        events.append(Event(chunk(choice({"content": text}), i + 1), content_tokens=tokens))
    finish = "length" if plan.truncated else "stop"
    events.append(Event(chunk(choice({}, finish), len(events))))
    if ctx.include_usage:
        usage = _chat_usage(plan)
        usage_bytes = b',"usage":' + orjson.dumps(usage)
        events.append(Event(chunk([], len(events), usage_bytes), usage=usage))
    events.append(_DONE)
    return events


# --------------------------------------------------------------------------- completions


def _completion_usage(plan: Plan) -> Json:
    prompt = plan.input + plan.cached
    return {
        "prompt_tokens": prompt,
        "completion_tokens": plan.output,
        "total_tokens": prompt + plan.output,
    }


def _completion_tokens(plan: Plan) -> Json:
    return _tokens(
        plan, input=plan.input + plan.cached, cached=False, cache_write=False, reasoning=False
    )


def _completions_body(ctx: Ctx) -> tuple[bytes, Json]:
    usage = _completion_usage(ctx.plan)
    body = {
        "id": f"cmpl-{_rand(29)}",
        "object": "text_completion",
        "created": ctx.created,
        "model": ctx.model,
        "choices": [
            {
                "text": ctx.plan.text,
                "index": 0,
                "logprobs": None,
                "finish_reason": "length" if ctx.plan.truncated else "stop",
            }
        ],
        "usage": usage,
    }
    return _dump_openai(body), usage


def _completions_events(ctx: Ctx) -> list[Event]:
    response_id = f"cmpl-{_rand(29)}"

    def chunk(choices: list[Json], usage: Json | None = None) -> bytes:
        body: Json = {
            "id": response_id,
            "object": "text_completion",
            "created": ctx.created,
            "choices": choices,
            "model": ctx.model,
        }
        if ctx.include_usage:
            body["usage"] = usage
        return _sse(body)

    def choice(text: str, finish: str | None = None) -> list[Json]:
        return [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]

    plan = ctx.plan
    events = [
        Event(chunk(choice(text)), content_tokens=tokens)
        for text, tokens in zip(plan.chunk_texts, plan.chunk_tokens, strict=True)
    ]
    events.append(Event(chunk(choice("", "length" if plan.truncated else "stop"))))
    if ctx.include_usage:
        usage = _completion_usage(plan)
        events.append(Event(chunk([], usage), usage=usage))
    events.append(_DONE)
    return events


# --------------------------------------------------------------------------- embeddings


@functools.lru_cache(maxsize=32)
def _embedding(dims: int, base64_format: bool) -> str | list[float]:
    values = [round(math.sin(i * 0.37) * 0.05, 8) for i in range(dims)]
    if base64_format:
        return base64.b64encode(struct.pack(f"<{dims}f", *values)).decode()
    return values


def _embedding_inputs(raw: Any) -> int:
    if isinstance(raw, list) and raw and not all(isinstance(x, int) for x in raw):
        return len(raw)
    return 1


def _embeddings_body(ctx: Ctx) -> tuple[bytes, Json]:
    dims = ctx.req.get("dimensions")
    if not isinstance(dims, int) or isinstance(dims, bool) or not 1 <= dims <= 8192:
        dims = 3072 if "large" in ctx.model else 1536
    vector = _embedding(dims, ctx.req.get("encoding_format") == "base64")
    count = _embedding_inputs(ctx.req.get("input"))
    usage = {"prompt_tokens": ctx.plan.input, "total_tokens": ctx.plan.input}
    body = {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": vector} for i in range(count)],
        "model": ctx.model,
        "usage": usage,
    }
    return _dump_openai(body), usage


def _input_only_tokens(plan: Plan) -> Json:
    return {
        "input": plan.input,
        "cached_input": None,
        "cache_write": None,
        "cache_write_1h": None,
        "output": None,
        "reasoning": None,
    }


# --------------------------------------------------------------------------- responses


def _responses_usage(plan: Plan) -> Json:
    prompt = plan.input + plan.cached
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": plan.cached},
        "output_tokens": plan.output,
        "output_tokens_details": {"reasoning_tokens": plan.reasoning},
        "total_tokens": prompt + plan.output,
    }


def _responses_tokens(plan: Plan) -> Json:
    return _tokens(
        plan, input=plan.input + plan.cached, cached=True, cache_write=False, reasoning=True
    )


@dataclass(frozen=True, slots=True)
class _ResponsesIds:
    response: str
    reasoning: str
    message: str


def _responses_ids() -> _ResponsesIds:
    base = _hex(24)
    return _ResponsesIds(f"resp_{base}{_hex(26)}", f"rs_{base}{_hex(26)}", f"msg_{base}{_hex(26)}")


def _responses_object(
    ctx: Ctx,
    ids: _ResponsesIds,
    *,
    status: str,
    output: list[Json],
    usage: Json | None,
    billing: bool,
) -> Json:
    req = ctx.req
    reasoning = req.get("reasoning")
    if not isinstance(reasoning, dict):
        reasoning = {"effort": None, "summary": None}
    obj: Json = {
        "id": ids.response,
        "object": "response",
        "created_at": ctx.created,
        "status": status,
        "background": bool(req.get("background", False)),
    }
    if billing:
        obj["billing"] = {"payer": "developer"}
    obj.update(
        {
            "completed_at": ctx.created + 1 if status != "in_progress" else None,
            "error": None,
            "frequency_penalty": 0.0,
            "incomplete_details": (
                {"reason": "max_output_tokens"} if status == "incomplete" else None
            ),
            "instructions": req.get("instructions"),
            "max_output_tokens": req.get("max_output_tokens"),
            "max_tool_calls": req.get("max_tool_calls"),
            "model": ctx.model,
            "output": output,
            "parallel_tool_calls": req.get("parallel_tool_calls", True),
            "presence_penalty": 0.0,
            "previous_response_id": req.get("previous_response_id"),
            "prompt_cache_key": req.get("prompt_cache_key"),
            "prompt_cache_retention": None,
            "reasoning": reasoning,
            "safety_identifier": req.get("safety_identifier"),
            "service_tier": _service_tier(req) if status != "in_progress" else "auto",
            "store": req.get("store", True),
            "temperature": req.get("temperature", 1.0),
            "text": {"format": {"type": "text"}, "verbosity": "medium"},
            "tool_choice": req.get("tool_choice", "auto"),
            "tools": req.get("tools", []),
            "top_logprobs": 0,
            "top_p": req.get("top_p", 1.0),
            "truncation": "disabled",
            "usage": usage,
            "user": None,
            "metadata": req.get("metadata") or {},
        }
    )
    return obj


def _responses_message(ids: _ResponsesIds, text: str, status: str) -> Json:
    return {
        "id": ids.message,
        "type": "message",
        "status": status,
        "content": [{"type": "output_text", "annotations": [], "logprobs": [], "text": text}],
        "role": "assistant",
    }


def _responses_output(ctx: Ctx, ids: _ResponsesIds) -> list[Json]:
    status = "incomplete" if ctx.plan.truncated else "completed"
    output: list[Json] = []
    if ctx.plan.reasoning:
        output.append({"id": ids.reasoning, "type": "reasoning", "summary": []})
    output.append(_responses_message(ids, ctx.plan.text, status))
    return output


def _responses_body(ctx: Ctx) -> tuple[bytes, Json]:
    ids = _responses_ids()
    usage = _responses_usage(ctx.plan)
    status = "incomplete" if ctx.plan.truncated else "completed"
    body = _responses_object(
        ctx, ids, status=status, output=_responses_output(ctx, ids), usage=usage, billing=True
    )
    # The Responses endpoint pretty-prints without a trailing newline.
    return orjson.dumps(body, option=orjson.OPT_INDENT_2), usage


def _responses_events(ctx: Ctx) -> list[Event]:
    ids = _responses_ids()
    plan = ctx.plan
    events: list[Event] = []

    def emit(obj: Json, *, tail: Json | None = None, **meta: Any) -> None:
        obj["sequence_number"] = len(events)
        if tail:  # a few events carry fields after their sequence number
            obj.update(tail)
        events.append(Event(_named_sse(obj["type"], obj), **meta))

    initial = _responses_object(
        ctx, ids, status="in_progress", output=[], usage=None, billing=False
    )
    emit({"type": "response.created", "response": initial})
    emit({"type": "response.in_progress", "response": initial})
    index = 0
    if plan.reasoning:
        item = {"id": ids.reasoning, "type": "reasoning", "summary": []}
        emit({"type": "response.output_item.added", "item": item, "output_index": 0})
        emit({"type": "response.output_item.done", "item": item, "output_index": 0})
        index = 1
    common = {"content_index": 0, "item_id": ids.message}
    empty_part = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
    emit(
        {
            "type": "response.output_item.added",
            "item": {
                "id": ids.message,
                "type": "message",
                "status": "in_progress",
                "content": [],
                "role": "assistant",
            },
            "output_index": index,
        }
    )
    emit(
        {"type": "response.content_part.added", **common, "output_index": index, "part": empty_part}
    )
    for i, (text, tokens) in enumerate(zip(plan.chunk_texts, plan.chunk_tokens, strict=True)):
        emit(
            {
                "type": "response.output_text.delta",
                "content_index": 0,
                "delta": text,
                "item_id": ids.message,
                "logprobs": [],
                "obfuscation": _OBFUSCATION[i % len(_OBFUSCATION)],
                "output_index": index,
            },
            content_tokens=tokens,
        )
    status = "incomplete" if plan.truncated else "completed"
    text = plan.text
    emit(
        {"type": "response.output_text.done", **common, "logprobs": [], "output_index": index},
        tail={"text": text},
    )
    emit(
        {
            "type": "response.content_part.done",
            **common,
            "output_index": index,
            "part": {**empty_part, "text": text},
        }
    )
    emit(
        {
            "type": "response.output_item.done",
            "item": _responses_message(ids, text, status),
            "output_index": index,
        }
    )
    usage = _responses_usage(plan)
    final = _responses_object(
        ctx, ids, status=status, output=_responses_output(ctx, ids), usage=usage, billing=False
    )
    emit(
        {"type": f"response.{status}", "response": final},
        usage=usage,
        terminal=True,
    )
    return events


# --------------------------------------------------------------------------- anthropic


def _anthropic_usage(plan: Plan) -> Json:
    return {
        "input_tokens": plan.input,
        "cache_creation_input_tokens": plan.cache_write,
        "cache_read_input_tokens": plan.cached,
        "cache_creation": {
            "ephemeral_5m_input_tokens": plan.cache_write_5m,
            "ephemeral_1h_input_tokens": plan.cache_write_1h,
        },
        "output_tokens": plan.output,
        "service_tier": "standard",
        "inference_geo": "not_available",
    }


def _anthropic_tokens(plan: Plan) -> Json:
    return _tokens(
        plan,
        input=plan.input + plan.cached + plan.cache_write,
        cached=True,
        cache_write=True,
        reasoning=False,
    )


def _message_id() -> str:
    return f"msg_01{_rand(22)}"


def _messages_body(ctx: Ctx) -> tuple[bytes, Json]:
    plan = ctx.plan
    content: list[Json] = []
    if plan.reasoning:
        content.append(
            {"type": "thinking", "thinking": "".join(_THINKING), "signature": _SIGNATURE}
        )
    content.append({"type": "text", "text": plan.text})
    usage = _anthropic_usage(plan)
    body = {
        "model": ctx.model,
        "id": _message_id(),
        "type": "message",
        "role": "assistant",
        "content": content,
        "stop_reason": "max_tokens" if plan.truncated else "end_turn",
        "stop_sequence": None,
        "usage": usage,
    }
    return orjson.dumps(body), usage


def _messages_events(ctx: Ctx) -> list[Event]:
    plan = ctx.plan
    events: list[Event] = []

    def emit(obj: Json, **meta: Any) -> None:
        events.append(Event(_named_sse(obj["type"], obj, pad=1 + (len(events) * 5) % 15), **meta))

    start_usage = _anthropic_usage(plan)
    start_usage["output_tokens"] = min(1, plan.output)
    message: Json = {
        "model": ctx.model,
        "id": _message_id(),
        "type": "message",
        "role": "assistant",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": start_usage,
    }
    emit({"type": "message_start", "message": message}, usage=start_usage)
    index = 0
    if plan.reasoning:
        emit(
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "thinking", "thinking": "", "signature": ""},
            }
        )
        events.append(Event(b'event: ping\ndata: {"type": "ping"}\n\n'))
        for piece in _THINKING:
            delta = {"type": "thinking_delta", "thinking": piece}
            emit({"type": "content_block_delta", "index": 0, "delta": delta})
        delta = {"type": "signature_delta", "signature": _SIGNATURE}
        emit({"type": "content_block_delta", "index": 0, "delta": delta})
        emit({"type": "content_block_stop", "index": 0})
        index = 1
    emit(
        {
            "type": "content_block_start",
            "index": index,
            "content_block": {"type": "text", "text": ""},
        }
    )
    if not plan.reasoning:
        events.append(Event(b'event: ping\ndata: {"type": "ping"}\n\n'))
    for text, tokens in zip(plan.chunk_texts, plan.chunk_tokens, strict=True):
        delta = {"type": "text_delta", "text": text}
        emit({"type": "content_block_delta", "index": index, "delta": delta}, content_tokens=tokens)
    emit({"type": "content_block_stop", "index": index})
    final_usage = {
        "input_tokens": plan.input,
        "cache_creation_input_tokens": plan.cache_write,
        "cache_read_input_tokens": plan.cached,
        "output_tokens": plan.output,
    }
    stop = "max_tokens" if plan.truncated else "end_turn"
    emit(
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop, "stop_sequence": None},
            "usage": final_usage,
        },
        usage=final_usage,
    )
    emit({"type": "message_stop"}, terminal=True)
    return events


def _count_tokens_body(ctx: Ctx) -> tuple[bytes, Json]:
    usage = {"input_tokens": ctx.plan.input}
    return orjson.dumps(usage), usage


ENDPOINTS: Final[Mapping[str, Endpoint]] = {
    "chat/completions": Endpoint(
        "chat/completions", "openai", _chat_body, _chat_events, _chat_tokens
    ),
    "responses": Endpoint(
        "responses",
        "openai",
        _responses_body,
        _responses_events,
        _responses_tokens,
    ),
    "completions": Endpoint(
        "completions", "openai", _completions_body, _completions_events, _completion_tokens
    ),
    "embeddings": Endpoint("embeddings", "openai", _embeddings_body, None, _input_only_tokens),
    "messages": Endpoint(
        "messages", "anthropic", _messages_body, _messages_events, _anthropic_tokens
    ),
    "messages/count_tokens": Endpoint(
        "messages/count_tokens", "anthropic", _count_tokens_body, None, _input_only_tokens
    ),
}
"""Metered routes, keyed by their path after ``/v1/``."""


# --------------------------------------------------------------------------- errors

_OPENAI_ERRORS: Final[Mapping[int, tuple[str, str | None, str]]] = {
    400: ("invalid_request_error", None, "Invalid request: the fake upstream was told to fail."),
    401: (
        "invalid_request_error",
        "invalid_api_key",
        "Incorrect API key provided: {key}. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
    ),
    403: (
        "invalid_request_error",
        "unsupported_country_region_territory",
        "Country, region, or territory not supported",
    ),
    404: (
        "invalid_request_error",
        "model_not_found",
        "The model `{model}` does not exist or you do not have access to it.",
    ),
    413: ("invalid_request_error", None, "Request too large."),
    429: (
        "requests",
        "rate_limit_exceeded",
        "Rate limit reached for {model} in organization org-fake on requests per min (RPM): "
        "Limit 500, Used 500, Requested 1. Please try again in 120ms. Visit "
        "https://platform.openai.com/account/rate-limits to learn more.",
    ),
    500: (
        "server_error",
        None,
        "The server had an error while processing your request. Sorry about that!",
    ),
    503: ("server_error", None, "The server is overloaded or not ready yet."),
}

_ANTHROPIC_ERRORS: Final[Mapping[int, tuple[str, str]]] = {
    400: ("invalid_request_error", "Invalid request: the fake upstream was told to fail."),
    401: ("authentication_error", "invalid x-api-key"),
    403: (
        "permission_error",
        "Your API key does not have permission to use the specified resource.",
    ),
    404: ("not_found_error", "model: {model}"),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: (
        "rate_limit_error",
        "This request would exceed the rate limit for your organization of 50 requests "
        "per minute. For details, refer to: https://docs.claude.com/en/api/rate-limits.",
    ),
    500: ("api_error", "Internal server error"),
    529: ("overloaded_error", "Overloaded"),
}


def openai_error_body(
    status: int, endpoint: str, *, model: str = "", key: str = "", message: str | None = None
) -> bytes:
    """OpenAI's error body for ``status``: 4-space indent with a newline, except on
    ``/v1/responses`` (2-space, no newline, model errors are 400 with ``param``)."""
    error: dict[str, str | None]
    if endpoint == "responses" and status in (400, 404) and message is None:
        error = {
            "message": f"The requested model '{model}' does not exist.",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    else:
        kind, code, template = _OPENAI_ERRORS.get(
            status,
            (
                "server_error" if status >= 500 else "invalid_request_error",
                None,
                f"The fake upstream answered {status}.",
            ),
        )
        masked = f"{key[:3]}***{key[-4:]}" if len(key) > 8 else "***"
        error = {
            "message": message or template.format(model=model, key=masked),
            "type": kind,
            "param": None,
            "code": code,
        }
    if endpoint == "responses":
        return json.dumps({"error": error}, indent=2).encode()
    return json.dumps({"error": error}, indent=4).encode() + b"\n"


def anthropic_error_body(
    status: int, request_id: str, *, model: str = "", message: str | None = None
) -> bytes:
    """Anthropic's compact error body for ``status``, with its ``request_id``."""
    kind, template = _ANTHROPIC_ERRORS.get(
        status,
        ("api_error" if status >= 500 else "invalid_request_error", f"Fake status {status}."),
    )
    error = {"type": kind, "message": message or template.format(model=model)}
    return orjson.dumps({"type": "error", "error": error, "request_id": request_id})


_HTML_502: Final = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>cloudflare</center>\r\n"
    b"</body>\r\n</html>\r\n"
)

_GARBAGE: Final[Mapping[str, tuple[bytes, ...]]] = {
    "openai": (
        b'data: {"id":"chatcmpl-garbage","object":"chat.completion.chunk","choi\n\n',
        b"this line is not server-sent events at all\n\n",
        b"data: \xff\xfe not utf-8 \x80\n\n",
        b"data: {not json}\n\n",
    ),
    "anthropic": (
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta"\n\n',
        b"garbage without a field name\n\n",
        b"event: ???\ndata: \xff\xfe \x80\n\n",
        b"data: {not json}\n\n",
    ),
}


def _stream_error(ctx: Ctx, endpoint: Endpoint, sequence: int) -> bytes:
    if endpoint.provider == "anthropic":
        error = {"type": "overloaded_error", "message": "Overloaded"}
        body = {"type": "error", "error": error, "request_id": ctx.request_id}
        return _named_sse("error", body)
    message = "The server had an error while processing your request. Sorry about that!"
    if endpoint.name == "responses":
        return _named_sse(
            "error",
            {
                "type": "error",
                "code": "server_error",
                "message": message,
                "param": None,
                "sequence_number": sequence,
            },
        )
    return _sse(
        {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
    )


# --------------------------------------------------------------------------- recording


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request as it reached the fake: headers as sent, body byte for byte."""

    method: str
    path: str
    query: str
    headers: CIMultiDictProxy[str]
    body: bytes
    auth_header: str | None
    """``"x-api-key"`` or ``"authorization"`` (x-api-key wins when both came), or None."""
    auth_value: str | None
    """That header's value as received (``"Bearer sk-…"`` for Authorization)."""
    api_key: str | None
    """The key itself, with any ``Bearer`` prefix removed."""
    request_id: str

    def json(self) -> Any:
        """The body parsed as JSON."""
        return orjson.loads(self.body)

    def to_dict(self) -> Json:
        """A JSON-safe form, for ``GET /_fake/requests``."""
        return {
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": [[k, v] for k, v in self.headers.items()],
            "body": self.body.decode("utf-8", "replace"),
            "body_b64": base64.b64encode(self.body).decode(),
            "auth_header": self.auth_header,
            "auth_value": self.auth_value,
            "api_key": self.api_key,
            "request_id": self.request_id,
        }


def _auth(headers: Mapping[str, str]) -> tuple[str | None, str | None, str | None]:
    if (value := headers.get("x-api-key")) is not None:
        return "x-api-key", value, value
    if (value := headers.get("authorization")) is not None:
        scheme, _, rest = value.partition(" ")
        return "authorization", value, rest.strip() if scheme.lower() == "bearer" else value
    return None, None, None


class _Gzip:
    """Incremental gzip: each chunk is flushed so the client can decode it at once."""

    def __init__(self) -> None:
        self._z = zlib.compressobj(6, zlib.DEFLATED, 31)

    def chunk(self, data: bytes) -> bytes:
        return self._z.compress(data) + self._z.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        return self._z.flush(zlib.Z_FINISH)


# --------------------------------------------------------------------------- server


class FakeUpstream:
    """A realistic OpenAI + Anthropic server on 127.0.0.1 for tests and benchmarks.

    ``async with FakeUpstream() as fake:`` starts it on an ephemeral port (``fake.url``);
    ``fake.records`` holds what each response reported and ``fake.requests`` what each
    request carried (see the module docstring for both formats and for the knobs).
    """

    def __init__(
        self,
        *,
        require_key: str | None = None,
        gzip: bool = False,
        max_requests: int = DEFAULT_MAX_REQUESTS,
        max_records: int = DEFAULT_MAX_RECORDS,
        client_max_size: int = DEFAULT_CLIENT_MAX_SIZE,
    ) -> None:
        self.require_key = require_key
        self.gzip = gzip
        self.max_records = max_records
        self.records: list[Json] = []
        self.requests: deque[RecordedRequest] = deque(maxlen=max_requests)
        self.app = web.Application(client_max_size=client_max_size)
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._host = "127.0.0.1"
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._routes()

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``, without a trailing slash or ``/v1``."""
        if self._port is None:
            raise RuntimeError("The fake upstream is not running; use 'async with' or start().")
        return f"http://{self._host}:{self._port}"

    @property
    def port(self) -> int:
        """The TCP port it listens on."""
        if self._port is None:
            raise RuntimeError("The fake upstream is not running; use 'async with' or start().")
        return self._port

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, *, reuse_port: bool = False
    ) -> None:
        """Listen on ``host:port`` (0 picks a free port)."""
        # handler_cancellation: a client that goes away cancels its handler, which is
        # how a sleeping ``timeout`` or a slow stream learns about the disconnect.
        self._runner = web.AppRunner(
            self.app, access_log=None, handler_cancellation=True, shutdown_timeout=0.2
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_port=reuse_port or None)
        await site.start()
        self._host = host
        self._port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        """Stop listening and cancel whatever is still being answered."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeUpstream:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ test helpers

    def reset(self) -> None:
        """Forget every record and request."""
        self.records.clear()
        self.requests.clear()

    async def wait_idle(self, max_wait: float = 5.0) -> None:
        """Wait until no response is being written (a cut or abandoned stream has
        updated its record by then)."""
        await asyncio.sleep(0)
        async with asyncio.timeout(max_wait):
            while self._inflight:
                await self._idle.wait()
                await asyncio.sleep(0)

    def record_for(self, request_id: str) -> Json:
        """The record whose ``request_id`` is ``request_id``."""
        for record in reversed(self.records):
            if record["request_id"] == request_id:
                return record
        raise KeyError(f"No record with request_id {request_id!r}.")

    # ------------------------------------------------------------------ routes

    def _routes(self) -> None:
        router = self.app.router
        for name, endpoint in ENDPOINTS.items():
            router.add_post(f"/v1/{name}", self._metered_handler(endpoint))
        router.add_get("/v1/models", self._models)
        router.add_get("/_fake/records", self._http_records)
        router.add_get("/_fake/requests", self._http_requests)
        router.add_post("/_fake/reset", self._http_reset)
        router.add_get("/_fake/health", self._http_health)
        router.add_route("*", "/{tail:.*}", self._not_found)

    def _metered_handler(
        self, endpoint: Endpoint
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            return await self._metered(request, endpoint)

        return handler

    async def _remember(self, request: web.Request, request_id: str) -> RecordedRequest:
        body = await request.read()
        auth_header, auth_value, api_key = _auth(request.headers)
        recorded = RecordedRequest(
            method=request.method,
            path=request.path,
            query=request.query_string,
            headers=request.headers,
            body=body,
            auth_header=auth_header,
            auth_value=auth_value,
            api_key=api_key,
            request_id=request_id,
        )
        self.requests.append(recorded)
        return recorded

    # ------------------------------------------------------------------ metered

    async def _metered(self, request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
        started = time.monotonic()
        request_id = _request_id(endpoint.provider)
        self._inflight += 1
        self._idle.clear()
        record: Json = {
            "request_id": request_id,
            "provider": endpoint.provider,
            "endpoint": endpoint.name,
            "request_model": None,
            "model": None,
            "stream": False,
            "include_usage": None,
            "status": None,
            "fault": None,
            "usage": None,
            "tokens": None,
            "chunks_planned": 0,
            "chunks_sent": 0,
            "output_tokens_sent": 0,
            "malformed_events": 0,
            "completed": False,
            "disconnected": False,
            "duration_ms": None,
        }
        self.records.append(record)
        if len(self.records) > self.max_records:
            del self.records[: max(1, self.max_records // 10)]
        try:
            recorded = await self._remember(request, request_id)
            return await self._answer(request, endpoint, recorded, record, started)
        except asyncio.CancelledError:
            record["disconnected"] = True
            record["completed"] = False
            raise
        finally:
            record["duration_ms"] = round((time.monotonic() - started) * 1000, 3)
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()

    async def _answer(
        self,
        request: web.Request,
        endpoint: Endpoint,
        recorded: RecordedRequest,
        record: Json,
        started: float,
    ) -> web.StreamResponse:
        provider, request_id = endpoint.provider, record["request_id"]
        raw = recorded.body

        def fail(
            status: int, message: str | None = None, model: str = ""
        ) -> Awaitable[web.StreamResponse]:
            return self._error(
                request, endpoint, record, started, status, model=model, message=message
            )

        try:
            knobs = Knobs.from_headers(request.headers)
        except KnobError as exc:
            return await fail(400, str(exc))
        record["fault"] = knobs.fault if knobs.fault != "status" else f"status:{knobs.fault_status}"
        if self.require_key is not None and recorded.api_key != self.require_key:
            return await self._error(
                request, endpoint, record, started, 401, key=recorded.api_key or ""
            )
        try:
            req = orjson.loads(raw)
        except orjson.JSONDecodeError:
            req = None
        if not isinstance(req, dict):
            return await fail(400, _bad_json_message(provider))
        model = req.get("model")
        if not isinstance(model, str) or not model:
            return await fail(
                400,
                "you must provide a model parameter"
                if provider == "openai"
                else "model: Field required",
            )
        record["request_model"] = model
        record["model"] = served = served_model(provider, model)
        streamable = endpoint.events is not None
        stream = streamable and req.get("stream") is True
        record["stream"] = stream
        include_usage = False
        if stream and endpoint.name in ("chat/completions", "completions"):
            options = req.get("stream_options")
            include_usage = isinstance(options, dict) and options.get("include_usage") is True
            record["include_usage"] = include_usage

        fault = knobs.fault
        if fault == "reset":
            _reset(request)
            return web.Response()
        if fault == "timeout":
            await asyncio.sleep(knobs.fault_delay)
        elif knobs.delay and fault != "stall":
            await asyncio.sleep(knobs.delay)
        if fault == "status":
            assert knobs.fault_status is not None
            return await self._error(
                request, endpoint, record, started, knobs.fault_status, model=model, knobs=knobs
            )
        gz = (self.gzip or knobs.gzip) and "gzip" in request.headers.get("Accept-Encoding", "")
        if fault == "html":
            assert knobs.fault_status is not None
            headers = self._headers(provider, request_id, started, "text/html; charset=UTF-8")
            return await self._send(request, record, knobs.fault_status, _HTML_502, headers, gz)

        plan = make_plan(endpoint.name, len(raw), req, knobs)
        ctx = Ctx(
            endpoint=endpoint.name,
            req=req,
            plan=plan,
            model=served,
            created=int(time.time()),
            include_usage=include_usage,
            request_id=request_id,
        )
        record["tokens"] = endpoint.tokens(plan)
        if stream:
            assert endpoint.events is not None
            record["chunks_planned"] = len(plan.chunk_texts)
            events = endpoint.events(ctx)
            headers = self._headers(provider, request_id, started, SSE_TYPE)
            return await self._stream(request, endpoint, ctx, events, knobs, record, headers, gz)

        body, usage = endpoint.body(ctx)
        headers = self._headers(provider, request_id, started, JSON_TYPE)
        if fault == "malformed-sse":
            record["malformed_events"] = 1
            return await self._send(request, record, 200, body[: len(body) // 2], headers, gz)
        if fault in ("cut", "stall"):
            return await self._send_broken(request, record, body, headers, knobs)
        record["usage"] = usage
        return await self._send(request, record, 200, body, headers, gz)

    # ------------------------------------------------------------------ writers

    def _headers(
        self, provider: str, request_id: str, started: float, content_type: str
    ) -> dict[str, str]:
        headers = {
            "Content-Type": content_type,
            "Server": "cloudflare",
            "cf-cache-status": "DYNAMIC",
        }
        if provider == "openai":
            headers.update(_OPENAI_HEADERS)
            headers["x-request-id"] = request_id
            headers["openai-processing-ms"] = str(int((time.monotonic() - started) * 1000))
        else:
            headers.update(_anthropic_ratelimit_headers())
            headers["request-id"] = request_id
        if content_type == SSE_TYPE:
            headers["Cache-Control"] = "no-cache"
        return headers

    async def _send(
        self,
        request: web.Request,
        record: Json,
        status: int,
        body: bytes,
        headers: dict[str, str],
        gz: bool,
    ) -> web.StreamResponse:
        if gz:
            encoder = _Gzip()
            body = encoder.chunk(body) + encoder.finish()
            headers["Content-Encoding"] = "gzip"
        response = web.Response(status=status, body=body, headers=headers)
        record["status"] = status
        # Set before writing: a client may read the response before this task resumes.
        record["completed"] = True
        try:
            await response.prepare(request)
            await response.write_eof()
        except ConnectionError:
            record["completed"] = False
            record["disconnected"] = True
        return response

    async def _send_broken(
        self,
        request: web.Request,
        record: Json,
        body: bytes,
        headers: dict[str, str],
        knobs: Knobs,
    ) -> web.StreamResponse:
        """A non-streamed ``cut`` (half the body, then close) or ``stall`` (headers,
        a sleep, then the body)."""
        response = web.StreamResponse(status=200, headers=headers)
        response.content_length = len(body)
        record["status"] = 200
        try:
            await response.prepare(request)
            if knobs.fault == "cut":
                await response.write(body[: len(body) // 2])
                _close(request)
                return response
            await asyncio.sleep(knobs.fault_delay)
            record["completed"] = True
            await response.write(body)
            await response.write_eof()
        except ConnectionError:
            record["completed"] = False
            record["disconnected"] = True
        return response

    async def _stream(
        self,
        request: web.Request,
        endpoint: Endpoint,
        ctx: Ctx,
        events: list[Event],
        knobs: Knobs,
        record: Json,
        headers: dict[str, str],
        gz: bool,
    ) -> web.StreamResponse:
        encoder = _Gzip() if gz else None
        if encoder is not None:
            headers["Content-Encoding"] = "gzip"
        response = web.StreamResponse(status=200, headers=headers)
        record["status"] = 200
        fault = knobs.fault
        strike = _strike_index(events, knobs)
        garbage = _GARBAGE[endpoint.provider]

        async def write(data: bytes) -> None:
            if knobs.split and len(data) > 1:
                half = len(data) // 2
                await write(data[:half])
                await asyncio.sleep(SPLIT_PAUSE_S)
                data = data[half:]
            await response.write(encoder.chunk(data) if encoder is not None else data)

        content_sent = 0
        try:
            await response.prepare(request)
            for i, event in enumerate(events):
                if i == strike:
                    if fault == "cut":
                        _close(request)
                        return response
                    if fault == "error-event":
                        await write(_stream_error(ctx, endpoint, i))
                        break
                    if fault == "stall":
                        await asyncio.sleep(knobs.fault_delay)
                if event.content_tokens is not None and content_sent and knobs.chunk_delay:
                    await asyncio.sleep(knobs.chunk_delay)
                await self._write_event(write, event, record)
                if event.content_tokens is not None:
                    content_sent += 1
                    if fault == "malformed-sse":
                        record["malformed_events"] += 1
                        await write(garbage[(content_sent - 1) % len(garbage)])
            if encoder is not None:
                await response.write(encoder.finish())
            await response.write_eof()
        except ConnectionError:
            record["completed"] = False
            record["disconnected"] = True
        return response

    @staticmethod
    async def _write_event(
        write: Callable[[bytes], Awaitable[None]], event: Event, record: Json
    ) -> None:
        """Write one event, updating the record first (a client may act on the event
        before this task resumes) and undoing that if the write fails."""
        before = (record["chunks_sent"], record["output_tokens_sent"], record["usage"])
        if event.content_tokens is not None:
            record["chunks_sent"] += 1
            record["output_tokens_sent"] += event.content_tokens
        if event.usage is not None:
            record["usage"] = event.usage
        if event.terminal:
            record["completed"] = True
        try:
            await write(event.data)
        except BaseException:
            record["chunks_sent"], record["output_tokens_sent"], record["usage"] = before
            record["completed"] = False
            raise

    async def _error(
        self,
        request: web.Request,
        endpoint: Endpoint,
        record: Json,
        started: float,
        status: int,
        *,
        model: str = "",
        key: str = "",
        message: str | None = None,
        knobs: Knobs | None = None,
    ) -> web.StreamResponse:
        provider, request_id = endpoint.provider, record["request_id"]
        if provider == "openai":
            body = openai_error_body(status, endpoint.name, model=model, key=key, message=message)
            content_type = (
                "application/json; charset=utf-8" if endpoint.name != "responses" else JSON_TYPE
            )
        else:
            body = anthropic_error_body(status, request_id, model=model, message=message)
            content_type = JSON_TYPE
        headers = self._headers(provider, request_id, started, content_type)
        if status in (429, 529, 503):
            headers["retry-after"] = str(knobs.retry_after if knobs else 1)
        if provider == "anthropic" and status >= 500:
            headers["x-should-retry"] = "true"
        gz = knobs is not None and (self.gzip or knobs.gzip)
        gz = gz and "gzip" in request.headers.get("Accept-Encoding", "")
        return await self._send(request, record, status, body, headers, gz)

    # ------------------------------------------------------------------ other routes

    async def _models(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        anthropic = "anthropic-version" in request.headers
        provider = "anthropic" if anthropic else "openai"
        request_id = _request_id(provider)
        await self._remember(request, request_id)
        body = _ANTHROPIC_MODELS if anthropic else _OPENAI_MODELS
        headers = self._headers(provider, request_id, started, JSON_TYPE)
        return web.Response(body=body, headers=headers)

    async def _not_found(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        anthropic = "anthropic-version" in request.headers or request.path.startswith(
            "/v1/messages"
        )
        provider = "anthropic" if anthropic else "openai"
        request_id = _request_id(provider)
        await self._remember(request, request_id)
        if anthropic:
            body = anthropic_error_body(404, request_id, message="Not Found")
            content_type = JSON_TYPE
        else:
            message = f"Invalid URL ({request.method} {request.path})"
            body = openai_error_body(404, "other", message=message)
            body = body.replace(b'"model_not_found"', b"null")
            content_type = "application/json; charset=utf-8"
        headers = self._headers(provider, request_id, started, content_type)
        return web.Response(status=404, body=body, headers=headers)

    async def _http_records(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=orjson.dumps(self.records), content_type=JSON_TYPE)

    async def _http_requests(self, request: web.Request) -> web.StreamResponse:
        body = orjson.dumps([r.to_dict() for r in self.requests])
        return web.Response(body=body, content_type=JSON_TYPE)

    async def _http_reset(self, request: web.Request) -> web.StreamResponse:
        self.reset()
        return web.Response(body=b'{"ok":true}', content_type=JSON_TYPE)

    async def _http_health(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=b'{"ok":true}', content_type=JSON_TYPE)


def _bad_json_message(provider: str) -> str:
    if provider == "openai":
        return (
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, "
            "but what was sent was not valid JSON.)"
        )
    return "There was an issue with your request body: the body is not valid JSON."


def _strike_index(events: list[Event], knobs: Knobs) -> int | None:
    """The event index at which ``cut``/``error-event``/``stall`` strikes: just before
    the (K+1)-th content delta, or after the last one when K reaches past the end."""
    if knobs.fault not in ("cut", "error-event", "stall"):
        return None
    content = [i for i, e in enumerate(events) if e.content_tokens is not None]
    after = knobs.fault_after if knobs.fault_after is not None else len(content) // 2
    if after < len(content):
        return content[after]
    return content[-1] + 1 if content else 1


def _close(request: web.Request) -> None:
    """Close the connection after what is buffered (no end of the chunked body)."""
    if request.transport is not None:
        request.transport.close()


def _reset(request: web.Request) -> None:
    """Abort the connection with a TCP RST and no response."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


_OPENAI_HEADERS: Final[Mapping[str, str]] = {
    "openai-organization": "user-fake-upstream",
    "openai-project": "proj_fakeUpstream",
    "openai-version": "2020-10-01",
    "x-ratelimit-limit-requests": "10000",
    "x-ratelimit-limit-tokens": "10000000",
    "x-ratelimit-remaining-requests": "9999",
    "x-ratelimit-remaining-tokens": "9999980",
    "x-ratelimit-reset-requests": "6ms",
    "x-ratelimit-reset-tokens": "0s",
    "strict-transport-security": "max-age=31536000; includeSubDomains; preload",
    "x-content-type-options": "nosniff",
}

_ratelimit_cache: dict[int, dict[str, str]] = {}


def _anthropic_ratelimit_headers() -> dict[str, str]:
    """Anthropic's rate-limit headers; the reset times change once a second."""
    now = int(time.time())
    cached = _ratelimit_cache.get(now)
    if cached is None:
        reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 1))
        cached = {"anthropic-organization-id": "00000000-0000-4000-8000-00000000fa4e"}
        for kind, limit in (
            ("requests", 4000),
            ("input-tokens", 2000000),
            ("output-tokens", 400000),
            ("tokens", 2400000),
        ):
            cached[f"anthropic-ratelimit-{kind}-limit"] = str(limit)
            cached[f"anthropic-ratelimit-{kind}-remaining"] = str(limit - 1)
            cached[f"anthropic-ratelimit-{kind}-reset"] = reset
        cached["via"] = "1.1 google"
        cached["x-robots-tag"] = "none"
        _ratelimit_cache.clear()
        _ratelimit_cache[now] = cached
    return cached


_OPENAI_MODELS: Final = orjson.dumps(
    {
        "object": "list",
        "data": [
            {"id": m, "object": "model", "created": 1715367049, "owned_by": "system"}
            for m in sorted({*OPENAI_SNAPSHOTS, *OPENAI_SNAPSHOTS.values()})
        ],
    },
    option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE,
)

_ANTHROPIC_MODELS: Final = orjson.dumps(
    {
        "data": [
            {
                "type": "model",
                "id": m,
                "display_name": m.replace("-", " ").title(),
                "created_at": "2025-05-14T00:00:00Z",
            }
            for m in sorted(ANTHROPIC_SNAPSHOTS.values())
        ],
        "has_more": False,
        "first_id": min(ANTHROPIC_SNAPSHOTS.values()),
        "last_id": max(ANTHROPIC_SNAPSHOTS.values()),
    }
)


# --------------------------------------------------------------------------- script


def _serve(host: str, port: int, require_key: str | None, gzip: bool, reuse_port: bool) -> None:
    async def run() -> None:
        fake = FakeUpstream(require_key=require_key, gzip=gzip)
        await fake.start(host, port, reuse_port=reuse_port)
        print(f"fake upstream listening on {fake.url}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await fake.stop()

    try:
        import uvloop
    except ImportError:
        runner: Callable[[Any], None] = asyncio.run
    else:
        runner = uvloop.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(run())


def main(argv: list[str] | None = None) -> None:
    """Run the fake as its own process: ``python tests/fake_upstream.py --port 9000``."""
    parser = argparse.ArgumentParser(description="Fake OpenAI + Anthropic upstream.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000, help="0 picks a free port")
    parser.add_argument("--gzip", action="store_true", help="gzip when the client accepts it")
    parser.add_argument("--require-key", default=None, help="answer 401 to any other key")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes sharing the port through SO_REUSEPORT (each keeps its own records)",
    )
    args = parser.parse_args(argv)
    if args.workers <= 1:
        _serve(args.host, args.port, args.require_key, args.gzip, False)
        return
    if args.port == 0:
        parser.error("--workers needs a fixed --port.")
    workers = [
        multiprocessing.Process(
            target=_serve, args=(args.host, args.port, args.require_key, args.gzip, True)
        )
        for _ in range(args.workers)
    ]
    for worker in workers:
        worker.start()
    # SIGTERM to the parent (how a benchmark stops it) must take the workers down too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        for worker in workers:
            worker.join()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.join()


if __name__ == "__main__":
    main()
