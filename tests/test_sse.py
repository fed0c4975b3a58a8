"""The incremental SSE parser: framing, chunk independence, byte accounting, limits."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from proxy.providers.sse import SSEEvent, SSEParser

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "provider-wire"
SSE_FIXTURES = sorted(FIXTURES.glob("*.sse"))


def parse(
    chunks: list[bytes], max_event_bytes: int | None = None
) -> tuple[list[SSEEvent], SSEParser]:
    parser = SSEParser() if max_event_bytes is None else SSEParser(max_event_bytes)
    events: list[SSEEvent] = []
    for chunk in chunks:
        events += parser.feed(chunk)
    events += parser.flush()
    return events, parser


def fields(events: list[SSEEvent]) -> list[tuple[str | None, bytes]]:
    """(event, data) of the events that carry data, as an EventSource would dispatch."""
    return [(e.event, e.data) for e in events if e.data]


def every_split(data: bytes) -> list[list[bytes]]:
    return [[data[:i], data[i:]] for i in range(len(data) + 1)]


def fixed_size(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def random_chunks(data: bytes, rng: random.Random, pieces: int = 12) -> list[bytes]:
    cuts = sorted(rng.randrange(len(data) + 1) for _ in range(pieces))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


# --- framing, table-driven ------------------------------------------------------------

FRAMING_CASES: list[tuple[str, bytes, list[tuple[str | None, bytes]]]] = [
    ("lf", b"data: a\n\n", [(None, b"a")]),
    ("crlf", b"data: a\r\n\r\n", [(None, b"a")]),
    ("cr", b"data: a\r\r", [(None, b"a")]),
    (
        "mixed endings",
        b"data: a\r\n\ndata: b\n\r\ndata: c\r\r\n",
        [(None, b"a"), (None, b"b"), (None, b"c")],
    ),
    ("event name", b"event: ping\ndata: {}\n\n", [("ping", b"{}")]),
    ("no space after colon", b"event:x\ndata:{}\n\n", [("x", b"{}")]),
    ("only one space is stripped", b"data:  two\n\n", [(None, b" two")]),
    ("multi-line data", b"data: a\ndata: b\ndata:\n\n", [(None, b"a\nb\n")]),
    ("comment skipped", b": keep-alive\ndata: x\n\n", [(None, b"x")]),
    ("comment-only block", b": hi\n\ndata: x\n\n", [(None, b"x")]),
    ("field without colon", b"data\n\n", []),
    ("unknown fields ignored", b"id: 7\nretry: 10\nfoo: bar\ndata: x\n\n", [(None, b"x")]),
    ("colon in value", b'data: {"a":"b:c"}\n\n', [(None, b'{"a":"b:c"}')]),
    ("leading blank lines", b"\n\r\ndata: x\n\n", [(None, b"x")]),
    ("unterminated last event", b"data: a\n\ndata: b", [(None, b"a"), (None, b"b")]),
    ("unterminated last line ending", b"data: a\n", [(None, b"a")]),
    ("bom at stream start", b"\xef\xbb\xbfdata: x\n\n", [(None, b"x")]),
    ("empty event name is none", b"event:\ndata: x\n\n", [(None, b"x")]),
    ("invalid utf-8 in event name", b"event: \xff\ndata: x\n\n", [("\ufffd", b"x")]),
    ("empty input", b"", []),
]


@pytest.mark.parametrize(
    ("stream", "expected"), [c[1:] for c in FRAMING_CASES], ids=[c[0] for c in FRAMING_CASES]
)
def test_framing(stream: bytes, expected: list[tuple[str | None, bytes]]) -> None:
    events, _ = parse([stream])
    assert fields(events) == expected
    assert b"".join(e.raw for e in events) == stream
    for chunks in every_split(stream):
        assert parse(chunks)[0] == events
    assert parse(fixed_size(stream, 1))[0] == events


def test_raw_includes_terminator_and_each_block_separately() -> None:
    events, _ = parse([b"data: a\r\n\r\n: c\n\ndata: b\n\n"])
    assert [e.raw for e in events] == [b"data: a\r\n\r\n", b": c\n\n", b"data: b\n\n"]
    assert [e.data for e in events] == [b"a", b"", b"b"]


def test_cr_at_chunk_end_waits_for_next_byte() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r\n\r") == []  # the blank line may be "\r" or "\r\n"
    events = parser.feed(b"\ndata: b\r\n\r\n")
    assert [e.raw for e in events] == [b"data: a\r\n\r\n", b"data: b\r\n\r\n"]


def test_flush_after_whole_events_returns_nothing() -> None:
    parser = SSEParser()
    assert len(parser.feed(b"data: a\n\n")) == 1
    assert parser.buffered == 0
    assert parser.flush() == []


def test_hot_path_many_events_in_one_chunk() -> None:
    stream = b"".join(b"data: %d\n\n" % i for i in range(100))
    events, _ = parse([stream])
    assert [e.data for e in events] == [b"%d" % i for i in range(100)]


# --- recorded streams --------------------------------------------------------------------


@pytest.mark.parametrize("path", SSE_FIXTURES, ids=lambda p: p.name)
def test_fixture_streams_parse_the_same_under_any_chunking(path: Path) -> None:
    stream = path.read_bytes()
    events, parser = parse([stream])
    assert b"".join(e.raw for e in events) == stream
    assert parser.malformed == 0
    assert all(e.raw.endswith(b"\n\n") for e in events)
    for chunks in every_split(stream):
        assert parse(chunks)[0] == events
    for size in (1, 2, 3, 7, 64, 1000):
        assert parse(fixed_size(stream, size))[0] == events
    rng = random.Random(path.name)
    for _ in range(50):
        assert parse(random_chunks(stream, rng))[0] == events


@pytest.mark.parametrize("path", SSE_FIXTURES, ids=lambda p: p.name)
def test_fixture_streams_one_event_per_chunk(path: Path) -> None:
    """How providers usually send: each event its own chunk (the parser's hottest path,
    which skips the scanner), with an oversized limit checked on that path too."""
    stream = path.read_bytes()
    events, _ = parse([stream])
    assert parse([e.raw for e in events])[0] == events
    biggest = max(len(e.raw) for e in events)
    parser = SSEParser(max_event_bytes=biggest - 1)
    one_by_one = [ev for e in events for ev in parser.feed(e.raw)] + parser.flush()
    assert b"".join(e.raw for e in one_by_one) == stream
    assert parser.malformed == sum(len(e.raw) == biggest for e in events)


@pytest.mark.parametrize("path", SSE_FIXTURES, ids=lambda p: p.name)
@pytest.mark.parametrize("ending", [b"\r\n", b"\r"], ids=["crlf", "cr"])
def test_fixture_streams_with_other_line_endings(path: Path, ending: bytes) -> None:
    original = path.read_bytes()
    stream = original.replace(b"\n", ending)
    expected = fields(parse([original])[0])
    events, _ = parse([stream])
    assert fields(events) == expected
    assert b"".join(e.raw for e in events) == stream
    for size in (1, 2, 5, 333):
        assert parse(fixed_size(stream, size))[0] == events


def test_anthropic_event_names_and_padding_survive() -> None:
    events, _ = parse([(FIXTURES / "anthropic-messages-stream.sse").read_bytes()])
    named = [e.event for e in events if e.data]
    assert named[:3] == ["message_start", "content_block_start", "ping"]
    assert named[-1] == "message_stop"
    assert events[-1].data == b'{"type":"message_stop" }'  # padding inside the JSON is kept


# --- size limit --------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 10, 100, 999, 5000, 100_000])
def test_oversized_event_is_dropped_but_its_bytes_still_flow(size: int) -> None:
    big = b"data: " + b"x" * 5000 + b"\n\n"
    stream = b"data: a\n\n" + big + b"data: b\n\n"
    events, parser = parse(fixed_size(stream, size), max_event_bytes=1000)
    assert parser.malformed == 1
    assert fields(events) == [(None, b"a"), (None, b"b")]
    assert b"".join(e.raw for e in events) == stream
    assert b"".join(e.raw for e in events if e.oversized) == big


@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b"\r"])
def test_oversized_event_ends_at_the_right_place_with_split_terminators(ending: bytes) -> None:
    big = b"data: " + b"y" * 3000 + ending + ending
    stream = big + b"data: after" + ending + ending
    for size in (1, 2, 3, 500):
        events, parser = parse(fixed_size(stream, size), max_event_bytes=100)
        assert parser.malformed == 1
        assert fields(events) == [(None, b"after")]
        assert b"".join(e.raw for e in events) == stream


def test_buffer_stays_bounded_while_skipping() -> None:
    parser = SSEParser(max_event_bytes=1000)
    parser.feed(b"data: ")
    for _ in range(1000):
        parser.feed(b"z" * 1000)
        assert parser.buffered <= 1001
    assert parser.malformed == 1
    events = parser.feed(b"\n\ndata: ok\n\n")
    assert fields(events) == [(None, b"ok")]


def test_unterminated_oversized_event_at_flush() -> None:
    stream = b"data: " + b"q" * 500
    events, parser = parse(fixed_size(stream, 50), max_event_bytes=100)
    assert parser.malformed == 1
    assert fields(events) == []
    assert b"".join(e.raw for e in events) == stream
