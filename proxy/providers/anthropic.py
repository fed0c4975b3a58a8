"""The Anthropic wire format: the Messages API.

Anthropic's ``input_tokens`` *excludes* the prompt tokens read from or written to the
cache, while :class:`~proxy.usage.Usage` counts every prompt token in ``input``. So::

    Usage.input          = input_tokens + cache_read_input_tokens
                                        + cache_creation_input_tokens
    Usage.cached_input   = cache_read_input_tokens
    Usage.cache_write    = cache_creation_input_tokens
    Usage.cache_write_1h = cache_creation.ephemeral_1h_input_tokens (when reported)
    Usage.output         = output_tokens (thinking included; Anthropic reports no split,
                                          so ``reasoning`` stays None)

Streams report usage twice: ``message_start`` carries the input side (and a token or
so of output), ``message_delta`` the cumulative output (and, in newer API versions, the
input side again). The two are merged field by field, keeping the larger value.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from proxy.providers._json import (
    json_text,
    load_request_object,
    loads_object,
    nonempty_str,
    normalise_path,
    require_model,
    token_count,
)
from proxy.providers.base import ParsedRequest, Prompt
from proxy.providers.sse import ReadOnlyMeter
from proxy.usage import Usage

_EXAMPLE_MODEL: Final = "claude-sonnet-4-5"


def usage_from_anthropic(usage: dict[str, Any]) -> Usage | None:
    """Normalise one Anthropic ``usage`` object (see the module docstring), or None."""
    base = token_count(usage.get("input_tokens"))
    read = token_count(usage.get("cache_read_input_tokens"))
    write = token_count(usage.get("cache_creation_input_tokens"))
    output = token_count(usage.get("output_tokens"))
    write_1h = None
    if isinstance(creation := usage.get("cache_creation"), dict):
        write_1h = token_count(creation.get("ephemeral_1h_input_tokens"))
    if base is None and output is None:
        return None
    return Usage(
        # Without input_tokens the cache counts alone would understate the prompt, so
        # the total stays unknown rather than partial.
        input=None if base is None else base + (read or 0) + (write or 0),
        output=output,
        cached_input=read,
        cache_write=write,
        cache_write_1h=write_1h,
        reasoning=None,
    )


def _add_blocks(content: object, out: list[str], *, nested: bool = False) -> None:
    """Text of a ``content`` (or ``system``) value: a string or a list of blocks."""
    if isinstance(content, str):
        out.append(content)
        return
    if not isinstance(content, list):
        return
    for block in content:
        if not isinstance(block, dict):
            continue
        for key in ("text", "thinking"):
            if isinstance(value := block.get(key), str):
                out.append(value)
        kind = block.get("type")
        if kind in ("tool_use", "server_tool_use"):
            if isinstance(name := block.get("name"), str):
                out.append(name)
            if "input" in block:
                out.append(json_text(block["input"]))
        elif kind == "tool_result" and not nested:
            # One level only: tool results hold text and images, never more results,
            # and this keeps the walk's depth independent of the request.
            _add_blocks(block.get("content"), out, nested=True)
        elif kind == "document" and isinstance(source := block.get("source"), dict):
            if source.get("type") == "text" and isinstance(data := source.get("data"), str):
                out.append(data)


class AnthropicStreamMeter(ReadOnlyMeter):
    """Meters a Messages stream: usage from ``message_start`` and ``message_delta``,
    completion at ``message_stop``; an ``error`` event means the stream did not
    complete. Never changes the bytes: :meth:`feed` returns each chunk as is."""

    def _merge(self, usage: object) -> None:
        if isinstance(usage, dict) and (reported := usage_from_anthropic(usage)):
            self.usage = reported if self.usage is None else self.usage.merge(reported)

    def _read(self, data: bytes) -> None:
        try:
            obj = orjson.loads(data)  # JSON whitespace padding is legal and ignored
        except orjson.JSONDecodeError:
            self._bad_events += 1
            return
        if not isinstance(obj, dict):
            self._bad_events += 1
            return
        kind = obj.get("type")
        if kind == "content_block_delta":  # the bulk of a stream, so checked first
            delta = obj.get("delta")
            if isinstance(delta, dict):
                for key in ("text", "thinking", "partial_json"):
                    if isinstance(value := delta.get(key), str):
                        self._text.append(value)
        elif kind == "message_start":
            message = obj.get("message")
            if isinstance(message, dict):
                if isinstance(model := message.get("model"), str) and model:
                    self.model = model
                self._merge(message.get("usage"))
        elif kind == "message_delta":
            self._merge(obj.get("usage"))
        elif kind == "message_stop":
            self.completed = not self._failed
        elif kind == "content_block_start":
            block = obj.get("content_block")
            if isinstance(block, dict):
                # Text blocks start empty; a tool call's name is generated output too.
                for key in ("text", "thinking", "name"):
                    if isinstance(value := block.get(key), str) and value:
                        self._text.append(value)
        elif kind == "error":
            # e.g. overloaded_error inside a 200 stream: the response is broken.
            self._failed = True
            self.completed = False
        # ping, content_block_stop and unknown future events carry nothing to meter.


class AnthropicProvider:
    """Translator for the Anthropic Messages wire format."""

    name = "anthropic"

    def parse_request(self, path: str, body: bytes) -> ParsedRequest:
        """Facts for metering a ``v1/messages`` call; other paths pass unparsed.

        ``v1/messages/count_tokens`` is free, so it is not metered and not parsed. The
        body always goes upstream as the very same bytes object.
        """
        route = normalise_path(path)
        if route == "messages/count_tokens":
            return ParsedRequest("count_tokens", False, None, False, None, None, body)
        if route != "messages":
            return ParsedRequest("other", False, None, False, None, None, body)
        obj = load_request_object(body, _EXAMPLE_MODEL)
        model = require_model(obj, _EXAMPLE_MODEL)
        metadata = obj.get("metadata")
        end_user = nonempty_str(metadata.get("user_id")) if isinstance(metadata, dict) else None
        return ParsedRequest(
            endpoint="messages",
            metered=True,
            model=model,
            stream=obj.get("stream") is True,
            # Includes any extended-thinking budget, which must fit under max_tokens.
            max_output_tokens=token_count(obj.get("max_tokens")),
            end_user=end_user,
            body=body,
        )

    def usage_from_body(self, endpoint: str, body: bytes) -> tuple[Usage | None, str | None]:
        """Usage and served model from a complete Message body; (None, None) on garbage."""
        obj = loads_object(body)
        if obj is None:
            return None, None
        model = nonempty_str(obj.get("model"))
        usage = obj.get("usage")
        return (usage_from_anthropic(usage) if isinstance(usage, dict) else None), model

    def stream_meter(self, parsed: ParsedRequest) -> AnthropicStreamMeter:
        """A fresh meter for a streamed Messages response."""
        return AnthropicStreamMeter()

    def prompt(self, body: bytes, endpoint: str | None = None) -> Prompt:
        """The prompt text, with no framing counted: Claude's tokenizer is only
        approximated by tiktoken, and the estimate's margin covers its framing."""
        return Prompt(self.prompt_text(body))

    def prompt_text(self, body: bytes) -> str:
        """System, message and tool-result text, tool inputs and tool definitions.

        Images and base64 documents are not represented. Never raises.
        """
        obj = loads_object(body)
        if obj is None:
            return ""
        out: list[str] = []
        _add_blocks(obj.get("system"), out)
        if isinstance(messages := obj.get("messages"), list):
            for message in messages:
                if isinstance(message, dict):
                    _add_blocks(message.get("content"), out)
        if (tools := obj.get("tools")) is not None:
            out.append(json_text(tools))  # tool definitions are billed input
        return "\n".join(out)

    def output_text_from_body(self, endpoint: str, body: bytes) -> str:
        """Text, thinking and tool-use input in a complete Message body."""
        obj = loads_object(body)
        if obj is None:
            return ""
        out: list[str] = []
        _add_blocks(obj.get("content"), out)
        return "".join(out)

    def upstream_auth_headers(self, api_key: str) -> dict[str, str]:
        """Anthropic takes the key in ``x-api-key``."""
        return {"x-api-key": api_key}
