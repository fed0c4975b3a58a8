"""An incremental Server-Sent Events parser that keeps every byte accountable.

The proxy relays a stream chunk by chunk and reads it on the way. :class:`SSEParser`
turns chunks into :class:`SSEEvent`s, each carrying the exact bytes it was made from
(``raw``, including its terminating blank line). Concatenating the ``raw`` of every
event returned by :meth:`SSEParser.feed` and :meth:`SSEParser.flush` gives back the
input, byte for byte; that is what lets a meter drop one whole event (OpenAI's injected
usage chunk) and relay everything else untouched.

Framing follows the WHATWG EventSource rules: lines end in ``\\r\\n``, ``\\n`` or ``\\r``;
a blank line ends an event; ``:`` starts a comment; the space after ``field:`` is
optional. Two differences, both so that no byte goes missing:

* a block with no ``data`` line (a comment, a stray blank line) is still returned, with
  ``data == b""``; consumers skip such events;
* an event longer than ``max_event_bytes`` is not buffered: its bytes come back as
  data-less events flagged ``oversized`` as they arrive, and it counts once in
  :attr:`SSEParser.malformed`.
"""

from __future__ import annotations

from typing import NamedTuple

from proxy.usage import Usage

DEFAULT_MAX_EVENT_BYTES = 8 * 1024 * 1024
"""Largest event kept for parsing (8 MiB); real provider events are a few KiB at most."""

_LF = 0x0A
_COLON = 0x3A
_SPACE = 0x20
_BOM = b"\xef\xbb\xbf"


class SSEEvent(NamedTuple):
    """One event (or one piece of an oversized event) read from a stream.

    ``event`` is the ``event:`` field (None when absent), ``data`` the ``data:`` lines
    joined by ``\\n``, and ``raw`` the exact bytes of the event, terminator included.
    A NamedTuple rather than a dataclass because one is built per streamed event.
    """

    event: str | None
    data: bytes
    raw: bytes
    oversized: bool = False


class SSEParser:
    """Splits a byte stream into :class:`SSEEvent`s, whatever the chunk boundaries.

    The common case (one or more whole ``\\n\\n``-framed events per chunk, nothing
    buffered) costs one ``bytes.find`` per event and copies nothing but the events.
    Scanning resumes where it stopped, so an event arriving in many small chunks is
    still read in linear time.
    """

    __slots__ = (
        "_block_start",
        "_buf",
        "_first_block",
        "_line_start",
        "_search_from",
        "_skipping",
        "malformed",
        "max_event_bytes",
    )

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self.max_event_bytes = max_event_bytes
        self.malformed = 0
        """Events dropped unparsed because they were over ``max_event_bytes``."""
        # Bytes not yet returned; always begins at the start of a block, or (while
        # skipping an oversized event) with a tiny synthetic context, see _skip().
        self._buf = bytearray()
        # Offset in _buf where the bytes still to be returned begin.
        self._block_start = 0
        # Start of the current, unfinished line, and where to resume looking for its
        # terminator: _buf[_line_start:_search_from] holds no CR or LF.
        self._line_start = 0
        self._search_from = 0
        self._skipping = False
        self._first_block = True

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Take the next chunk; return the events it completed, in order."""
        if not chunk:
            return []
        if self._buf:
            self._buf += chunk
            return self._drain(self._buf, final=False)
        data = self.single_data(chunk)
        if data is not None:
            return [SSEEvent(None, data, chunk)]
        # Hot path: nothing held back, so scan the chunk itself without copying it.
        return self._drain(chunk, final=False)

    def single_data(self, chunk: bytes) -> bytes | None:
        """The hottest path: when nothing is held back and ``chunk`` is exactly one
        LF-framed ``data: X\n\n`` event (how OpenAI's chat streams arrive, one event a
        chunk), take it and return its data ``X``, with no event built around it;
        otherwise take nothing and return None (then call :meth:`feed`)."""
        n = len(chunk)
        if (
            chunk.startswith(b"data: ")
            and chunk.find(b"\n") == n - 2
            and chunk[-1] == _LF
            and not self._buf
            and not self._first_block
            and n <= self.max_event_bytes
            and b"\r" not in chunk
        ):
            return chunk[6:-2]
        return None

    def flush(self) -> list[SSEEvent]:
        """At end of stream: the events still held, the last one possibly unterminated."""
        if not self._buf:
            return []
        return self._drain(self._buf, final=True)

    @property
    def buffered(self) -> int:
        """How many bytes are held back, waiting for the end of their event."""
        return len(self._buf) - self._block_start

    def _drain(self, data: bytes | bytearray, *, final: bool) -> list[SSEEvent]:
        ends = self._block_ends(data, final)
        events: list[SSEEvent] = []
        start = self._block_start
        tail: bytes | bytearray
        if ends:
            # One copy of a held-back buffer, then cheap slices of immutable bytes.
            view = data if isinstance(data, bytes) else bytes(data)
            for end in ends:
                events.append(self._complete(view[start:end]))
                start = end
            tail = view[start:]
        else:
            tail = data[start:] if start else data
        consumed = start
        n = len(data)
        if final:
            if start < n:
                events.append(self._complete(bytes(tail)))
            self._reset()
            return events
        if start == n and not self._skipping:
            # Everything consumed (the common case): drop scan state, keep no buffer.
            self._line_start = self._search_from = self._block_start = 0
            if self._buf:
                self._buf = bytearray()
            return events
        self._line_start -= consumed
        self._search_from -= consumed
        self._block_start = 0
        if self._skipping or n - start > self.max_event_bytes:
            if not self._skipping:
                self._skipping = True
                self.malformed += 1
            piece = self._skip(tail)
            if piece.raw:
                events.append(piece)
        elif tail is not self._buf:
            # (When tail *is* _buf, it already holds exactly the unfinished block.)
            self._buf = bytearray(tail)
        return events

    def _complete(self, raw: bytes) -> SSEEvent:
        """The event for one finished block (or the last piece of an oversized one)."""
        first = self._first_block
        self._first_block = False
        if self._skipping:
            self._skipping = False
            return SSEEvent(None, b"", raw, True)
        if len(raw) > self.max_event_bytes:
            # It arrived whole in one chunk, but is over the limit all the same: treat
            # it like one that had to be skipped, so results do not depend on chunking.
            self.malformed += 1
            return SSEEvent(None, b"", raw, True)
        return self._parse_block(raw, first)

    def _skip(self, tail: bytes | bytearray) -> SSEEvent:
        """Return the scanned part of an oversized event and keep only a line state.

        Everything before ``_search_from`` is passed on; at most one unscanned byte (a
        CR whose LF may follow) is kept. A two-byte synthetic prefix, never returned,
        stands for "inside a non-empty line" (``x``) or "just after a line end"
        (``x\\n``), which is all the scanner needs to find the event's end later.
        """
        cut = self._search_from
        piece = bytes(tail[:cut])
        rest = bytes(tail[cut:])
        if self._line_start == cut:
            context, line_start, search_from = b"x\n", 2, 2
        else:
            context, line_start, search_from = b"x", 0, 1
        self._buf = bytearray(context + rest)
        self._block_start = len(context)
        self._line_start = line_start
        self._search_from = search_from
        return SSEEvent(None, b"", piece, True)

    def _reset(self) -> None:
        self._skipping = False
        self._buf = bytearray()
        self._block_start = 0
        self._line_start = 0
        self._search_from = 0

    def _block_ends(self, data: bytes | bytearray, final: bool) -> list[int]:
        """Offsets just past each block terminator found from the saved scan state.

        A block ends at its first empty line. Leaves ``_line_start``/``_search_from``
        describing the unfinished tail. A CR as the very last byte is left unscanned
        unless ``final``: it may be the first half of a CRLF split across chunks.
        """
        n = len(data)
        ls = self._line_start
        sf = self._search_from
        ends: list[int] = []
        cr = data.find(b"\r", sf)
        if cr < 0:
            # LF-only framing, by far the common case: one find per block.
            while sf < n:
                if sf == ls and data[sf] == _LF:
                    end = sf + 1  # an empty line right at a line start
                else:
                    idx = data.find(b"\n\n", sf)
                    if idx < 0:
                        last = data.rfind(b"\n", sf)
                        if last >= 0:
                            ls = last + 1
                        sf = n
                        break
                    end = idx + 2
                ends.append(end)
                ls = sf = end
        else:
            # Mixed or CR framing: walk line ends, caching both searches so that a
            # long run of one kind of line end does not rescan for the other.
            lf = data.find(b"\n", sf)
            while True:
                if 0 <= cr < sf:
                    cr = data.find(b"\r", sf)
                if 0 <= lf < sf:
                    lf = data.find(b"\n", sf)
                if cr < 0 and lf < 0:
                    sf = n
                    break
                i = lf if cr < 0 else cr if lf < 0 else min(cr, lf)
                if i == cr:
                    if i + 1 == n:
                        if not final:
                            sf = i
                            break
                        term = i + 1
                    else:
                        term = i + 2 if data[i + 1] == _LF else i + 1
                else:
                    term = i + 1
                if i == ls:
                    ends.append(term)
                ls = sf = term
        self._line_start = ls
        self._search_from = sf
        return ends

    @staticmethod
    def _parse_block(raw: bytes, first: bool) -> SSEEvent:
        # Fast paths for what providers actually send, LF-framed:
        # "data: X\n\n" (OpenAI chat) and "event: E\ndata: X\n\n" (Anthropic, Responses).
        if not first and raw.endswith(b"\n\n") and b"\r" not in raw:
            end = len(raw) - 2
            nl = raw.find(b"\n")
            if raw.startswith(b"data: "):
                if nl == end:
                    return SSEEvent(None, raw[6:end], raw)
            elif (
                raw.startswith(b"event: ")
                and raw.startswith(b"data: ", nl + 1)
                and raw.find(b"\n", nl + 1) == end
            ):
                return SSEEvent(
                    raw[7:nl].decode("utf-8", "replace") or None, raw[nl + 7 : end], raw
                )
        event: str | None = None
        data_lines: list[bytes] = []
        lines = raw.splitlines()  # bytes.splitlines breaks on CRLF, LF and CR only
        if first and lines and lines[0].startswith(_BOM):
            lines[0] = lines[0][len(_BOM) :]  # a stream may open with a UTF-8 BOM
        for line in lines:
            if not line or line[0] == _COLON:
                continue  # the terminating blank line, or a comment
            colon = line.find(b":")
            if colon < 0:
                name, value = line, b""
            else:
                name = line[:colon]
                # One optional space after the colon is framing, not value.
                skip = 2 if colon + 1 < len(line) and line[colon + 1] == _SPACE else 1
                value = line[colon + skip :]
            if name == b"data":
                data_lines.append(value)
            elif name == b"event":
                event = value.decode("utf-8", "replace") or None
            # id and retry are not needed for metering; unknown fields are ignored.
        if len(data_lines) == 1:
            data = data_lines[0]
        else:
            data = b"\n".join(data_lines)
        return SSEEvent(event, data, raw)


class ReadOnlyMeter:
    """The part of a stream meter shared by formats the proxy never edits (Anthropic
    Messages, OpenAI Responses): parse every event as it passes, relay every chunk as
    it is. Subclasses implement :meth:`_read` for one event's data."""

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self.completed = False
        self.model: str | None = None
        self.malformed = 0
        self._parser = SSEParser()
        self._bad_events = 0
        self._failed = False
        self._text: list[str] = []

    def feed(self, chunk: bytes) -> bytes:
        """Read ``chunk``; return it unchanged."""
        for event in self._parser.feed(chunk):
            if event.data:
                self._read(event.data)
        self.malformed = self._bad_events + self._parser.malformed
        return chunk

    def flush(self) -> bytes:
        """Read a final unterminated event, if any; nothing is ever held back."""
        for event in self._parser.flush():
            if event.data:
                self._read(event.data)
        self.malformed = self._bad_events + self._parser.malformed
        return b""

    def output_text(self) -> str:
        """The generated text seen so far."""
        return "".join(self._text)

    def _read(self, data: bytes) -> None:
        raise NotImplementedError
