"""What every wire-format translator provides to the pipeline.

A provider is pure: it turns request bytes into the facts metering needs, response
bytes (or stream chunks) into :class:`~proxy.usage.Usage`, and knows how its upstream
expects to be authenticated. It never performs I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

from proxy.usage import Usage


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """The facts about one request that metering needs.

    ``endpoint`` is one of ``chat``, ``responses``, ``completions``, ``embeddings``,
    ``messages``, ``count_tokens`` or ``other``; only ``metered`` endpoints are priced.
    ``body`` is what goes upstream: the original bytes, except when the proxy injected
    ``stream_options.include_usage`` (then ``strip_usage_chunk`` is True, and the extra
    usage-only chunk is removed from the stream on the way back).
    """

    endpoint: str
    metered: bool
    model: str | None
    stream: bool
    max_output_tokens: int | None
    end_user: str | None
    body: bytes
    strip_usage_chunk: bool = False


class Prompt(NamedTuple):
    """The text of a request's prompt, for estimating its input tokens, and the tokens
    the provider's format adds around it (``framing``: message delimiters, roles, the
    rendering of tool definitions), which counting the text alone would miss."""

    text: str
    framing: int = 0


class StreamMeter(Protocol):
    """Reads an SSE response as it is relayed; one per streamed response."""

    usage: Usage | None
    """Usage reported so far (``exact=True``), or None when none was seen."""
    completed: bool
    """True once the stream's terminator was seen (``[DONE]``, ``response.completed``,
    ``message_stop``); a stream that ends without it is broken."""
    model: str | None
    """The model the stream says served it, when it says so."""
    malformed: int
    """How many events could not be parsed (skipped, never fatal)."""

    def feed(self, chunk: bytes) -> bytes:
        """Take the next raw chunk; return the bytes to relay to the client now."""
        ...

    def flush(self) -> bytes:
        """At end of stream: any bytes still held back, to relay as they are."""
        ...

    def output_text(self) -> str:
        """The generated text seen so far (for estimating output tokens)."""
        ...


class Provider(Protocol):
    """One wire format (``openai`` or ``anthropic``)."""

    name: str

    def parse_request(self, path: str, body: bytes) -> ParsedRequest:
        """Parse a request to ``path`` (relative to the upstream base, e.g.
        ``v1/chat/completions``). Raises :class:`proxy.errors.BadRequest` for a metered
        endpoint whose body is not a JSON object with a string ``model``."""
        ...

    def usage_from_body(self, endpoint: str, body: bytes) -> tuple[Usage | None, str | None]:
        """Usage and served model from a complete (decoded) JSON response body."""
        ...

    def stream_meter(self, parsed: ParsedRequest) -> StreamMeter:
        """A fresh meter for a streamed response to ``parsed``."""
        ...

    def prompt(self, body: bytes, endpoint: str | None = None) -> Prompt:
        """All prompt text in a request body (to ``endpoint``, as ``ParsedRequest``
        names it) and its framing, for estimating input tokens. Never raises."""
        ...

    def prompt_text(self, body: bytes) -> str:
        """``prompt(body).text``."""
        ...

    def output_text_from_body(self, endpoint: str, body: bytes) -> str:
        """The generated text in a complete response body, for estimating output."""
        ...

    def upstream_auth_headers(self, api_key: str) -> dict[str, str]:
        """The header(s) that carry ``api_key`` to this provider."""
        ...
