"""The OpenAI wire format: Chat Completions, Responses, legacy Completions, Embeddings.

Usage shapes read here::

    chat, completions, embeddings   usage.prompt_tokens / completion_tokens,
                                    prompt_tokens_details.cached_tokens,
                                    completion_tokens_details.reasoning_tokens
    responses                       usage.input_tokens / output_tokens,
                                    input_tokens_details.cached_tokens,
                                    output_tokens_details.reasoning_tokens

OpenAI's counts already follow :class:`~proxy.usage.Usage`'s convention (input includes
cached tokens, output includes reasoning), so they are copied as they are.
"""

from __future__ import annotations

from typing import Any, Final, TypeGuard

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
from proxy.providers.sse import ReadOnlyMeter, SSEEvent, SSEParser
from proxy.usage import Usage

# --- request side ---------------------------------------------------------------------

_EXAMPLE_MODEL: Final = "gpt-4o-mini"

_ENDPOINTS: Final = {
    "chat/completions": "chat",
    "responses": "responses",
    "completions": "completions",
    "embeddings": "embeddings",
}

_MAX_TOKEN_FIELDS: Final[dict[str, tuple[str, ...]]] = {
    "chat": ("max_completion_tokens", "max_tokens"),
    "completions": ("max_tokens",),
    "responses": ("max_output_tokens",),
}

_COMPLETIONS_DEFAULT_MAX_TOKENS: Final = 16
"""The legacy Completions API generates at most 16 tokens when ``max_tokens`` is absent."""

_INCLUDE_USAGE_MEMBER: Final = b'"stream_options":{"include_usage":true},'

_MISSING: Final = object()


def _max_output_tokens(endpoint: str, obj: dict[str, Any]) -> int | None:
    """The most tokens this request can generate in total, when the request caps it.

    The per-choice cap is multiplied by the number of choices (``n``; for Completions
    also ``best_of`` and the number of prompts), because every choice is billed: the
    pipeline reserves on this upper bound.
    """
    if endpoint == "embeddings":
        return 0
    fields = _MAX_TOKEN_FIELDS.get(endpoint, ())
    caps = [c for f in fields if (c := token_count(obj.get(f))) is not None]
    cap: int | None
    if caps:
        cap = max(caps)  # both given (chat): the larger one is the safe upper bound
    elif endpoint == "completions":
        cap = _COMPLETIONS_DEFAULT_MAX_TOKENS
    else:
        cap = None
    if cap is None or endpoint == "responses":
        return cap
    choices = token_count(obj.get("n")) or 1
    if endpoint == "completions":
        choices = max(choices, token_count(obj.get("best_of")) or 1)
        prompt = obj.get("prompt")
        # A list of strings (or of token-id lists) is a batch: each one gets n choices.
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            choices *= len(prompt)
    return cap * choices


def _with_include_usage(body: bytes, obj: dict[str, Any]) -> bytes | None:
    """``body`` asking for the final usage chunk, or None when it already does (or when
    ``stream_options`` is malformed, which the upstream should reject as sent)."""
    opts = obj.get("stream_options", _MISSING)
    if opts is _MISSING:
        # Splice one member in after the opening brace, so every other byte of the
        # request stays as the client sent it (no float or big-integer re-rendering).
        # The body parsed as an object with a "model", so its first "{" opens it and
        # at least one member follows, which makes the trailing comma valid.
        i = body.find(b"{") + 1
        return body[:i] + _INCLUDE_USAGE_MEMBER + body[i:]
    if opts is None:
        new_opts: dict[str, Any] = {}
    elif isinstance(opts, dict):
        if opts.get("include_usage") is True:
            return None
        new_opts = dict(opts)
    else:
        return None
    new_opts["include_usage"] = True
    # Rare (the client sent stream_options without include_usage): re-serialise.
    try:
        return orjson.dumps({**obj, "stream_options": new_opts})
    except orjson.JSONEncodeError:
        return None  # too deeply nested for orjson to write: relay it as sent


# --- usage and text extraction ---------------------------------------------------------


def _detail(usage: dict[str, Any], details_key: str, key: str) -> int | None:
    details = usage.get(details_key)
    return token_count(details.get(key)) if isinstance(details, dict) else None


def usage_from_openai(usage: dict[str, Any], *, embeddings: bool = False) -> Usage | None:
    """Normalise one OpenAI ``usage`` object (either naming scheme), or None if empty."""
    if "input_tokens" in usage or "output_tokens" in usage:  # Responses naming
        result = Usage(
            input=token_count(usage.get("input_tokens")),
            output=token_count(usage.get("output_tokens")),
            cached_input=_detail(usage, "input_tokens_details", "cached_tokens"),
            reasoning=_detail(usage, "output_tokens_details", "reasoning_tokens"),
        )
    else:
        output = token_count(usage.get("completion_tokens"))
        if output is None and embeddings:
            output = 0  # embeddings report only prompt_tokens: nothing is generated
        result = Usage(
            input=token_count(usage.get("prompt_tokens")),
            output=output,
            cached_input=_detail(usage, "prompt_tokens_details", "cached_tokens"),
            reasoning=_detail(usage, "completion_tokens_details", "reasoning_tokens"),
        )
    if result.input is None and result.output is None:
        return None
    return result


def _add_content(content: object, out: list[str]) -> None:
    """Text of a message ``content``: a string, or a list of parts that carry ``text``."""
    if isinstance(content, str):
        out.append(content)
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict):
                for key in ("text", "refusal"):
                    if isinstance(value := part.get(key), str):
                        out.append(value)


def _add_function(call: object, out: list[str]) -> None:
    if isinstance(call, dict):
        for key in ("name", "arguments"):
            if isinstance(value := call.get(key), str):
                out.append(value)


def _add_tool_calls(tool_calls: object, out: list[str]) -> None:
    if isinstance(tool_calls, list):
        for call in tool_calls:
            if isinstance(call, dict):
                _add_function(call.get("function"), out)
                if isinstance(custom := call.get("custom"), dict):
                    if isinstance(value := custom.get("input"), str):
                        out.append(value)


def _add_message(message: object, out: list[str]) -> None:
    """Text of a chat message or delta: content, refusal, reasoning, tool calls."""
    if not isinstance(message, dict):
        return
    content = message.get("content")
    if type(content) is str and len(message) == 1:
        out.append(content)  # the usual stream delta, {"content": "..."}: nothing else
        return
    _add_content(content, out)
    for key in ("refusal", "reasoning_content"):
        if isinstance(value := message.get(key), str):
            out.append(value)
    _add_tool_calls(message.get("tool_calls"), out)
    _add_function(message.get("function_call"), out)


def _add_response_item(item: object, out: list[str]) -> None:
    """Text of one Responses ``input`` or ``output`` item."""
    if isinstance(item, str):
        out.append(item)
        return
    if not isinstance(item, dict):
        return
    _add_content(item.get("content"), out)
    _add_content(item.get("summary"), out)  # reasoning items: [{"type", "text"}]
    for key in ("arguments", "input", "name"):  # function, custom and MCP tool calls
        if isinstance(value := item.get(key), str):
            out.append(value)
    output = item.get("output")  # function_call_output: a string or content parts
    _add_content(output, out)


def _add_json(value: object, out: list[str]) -> None:
    """Tool and schema definitions are billed as prompt tokens: count their JSON."""
    if value is not None:
        out.append(json_text(value))


# --- prompt framing ----------------------------------------------------------------------
# What OpenAI's chat format adds around the text, per OpenAI's cookbook ("How to count
# tokens with tiktoken"): <|start|>{role}<|message|>{content}<|end|> is 3 tokens a message
# plus its role (one token for every chat role in cl100k_base and o200k_base), one more
# for a ``name``, and the reply is primed with 3. Function tools reach the model as a
# TypeScript-like namespace (the rendering and its constants as reverse-engineered by
# hmarr/openai-chat-tokens); checked against the prompt_tokens OpenAI reported for the
# recorded requests in tests/test_tokens.py.
_TOKENS_PER_MESSAGE: Final = 3 + 1
_TOKENS_PER_NAME: Final = 1
_TOKENS_REPLY_PRIMING: Final = 3
_FUNCTIONS_TOKENS: Final = 9
_FUNCTIONS_SYSTEM_SHARED: Final = 4  # the tools share the system message's framing


def chat_framing_tokens(messages: int, names: int = 0) -> int:
    """Tokens OpenAI's chat format adds around ``messages`` messages, ``names`` of which
    carry a ``name`` (whose text is counted with the content); 0 without messages."""
    if messages < 0 or not 0 <= names <= messages:
        raise ValueError(f"need 0 <= names <= messages, got {names}, {messages}.")
    if messages == 0:
        return 0
    return _TOKENS_PER_MESSAGE * messages + _TOKENS_PER_NAME * names + _TOKENS_REPLY_PRIMING


def _split_tools(tools: object, functions: object) -> tuple[list[dict[str, Any]], list[Any]]:
    """Function definitions (Chat ``tools[].function``, Responses' flat function tools,
    legacy ``functions``) apart from every other tool, which is counted as JSON."""
    found: list[dict[str, Any]] = []
    others: list[Any] = []
    for group in (tools, functions):
        if not isinstance(group, list):
            if group is not None:
                others.append(group)
            continue
        for tool in group:
            # {"type": "function", "function": {...}}, {"type": "function", "name": ...}
            # or a legacy function; "custom" and built-in tools have other types
            if isinstance(tool, dict) and tool.get("type") in (None, "function"):
                fn = tool.get("function", tool)
                if isinstance(fn, dict) and isinstance(fn.get("name"), str):
                    found.append(fn)
                    continue
            others.append(tool)
    return found, others


def function_tools_text(functions: list[dict[str, Any]]) -> str:
    """Function definitions as the model reads them::

    namespace functions {

    // Get the weather
    type get_weather = (_: {
    // The city
    location: string,
    unit?: "c" | "f",
    }) => any;

    } // namespace functions
    """
    lines = ["namespace functions {", ""]
    for fn in functions:
        if isinstance(description := fn.get("description"), str) and description:
            lines.append(f"// {description}")
        params = fn.get("parameters")
        if (
            isinstance(params, dict)
            and isinstance(params.get("properties"), dict)
            and params["properties"]
        ):
            lines += [f"type {fn['name']} = (_: {{", _ts_properties(params, 0), "}) => any;"]
        else:
            lines.append(f"type {fn['name']} = () => any;")
        lines.append("")
    lines.append("} // namespace functions")
    return "\n".join(lines)


_TS_MAX_DEPTH: Final = 32
"""Nesting rendered in a tool schema; deeper parts count as nothing (a request may nest
JSON 1,024 levels deep, more than Python's recursion allows)."""


def _ts_properties(schema: dict[str, Any], indent: int, depth: int = 0) -> str:
    required = schema.get("required")
    required = required if isinstance(required, list) else []
    properties = schema.get("properties")
    lines: list[str] = []
    for name, prop in properties.items() if isinstance(properties, dict) else ():
        if indent < 2 and isinstance(prop, dict):
            if isinstance(about := prop.get("description"), str) and about:
                lines.append(f"// {about}")
        mark = "" if name in required else "?"
        lines.append(f"{name}{mark}: {_ts_type(prop, indent, depth + 1)},")
    return "\n".join(" " * indent + line for line in lines)


def _ts_type(prop: object, indent: int, depth: int) -> str:
    if not isinstance(prop, dict) or depth > _TS_MAX_DEPTH:
        return ""
    kind = prop.get("type")
    enum = prop.get("enum")
    if kind == "string":
        return " | ".join(f'"{v}"' for v in enum) if isinstance(enum, list) else "string"
    if kind in ("number", "integer"):
        return " | ".join(str(v) for v in enum) if isinstance(enum, list) else "number"
    if kind == "boolean" or kind == "null":
        return str(kind)
    if kind == "object":
        return "\n".join(("{", _ts_properties(prop, indent + 2, depth + 1), "}"))
    if kind == "array":
        items = prop.get("items")
        return f"{_ts_type(items, indent, depth + 1)}[]" if isinstance(items, dict) else "any[]"
    return ""


def _is_token_ids(value: object) -> TypeGuard[list[int]]:
    return isinstance(value, list) and bool(value) and all(type(x) is int for x in value)


# --- stream meters ---------------------------------------------------------------------


class OpenAIChatStreamMeter:
    """Meters a Chat Completions or Completions stream (``data: {...}`` ... ``[DONE]``).

    With ``strip_usage_chunk`` it removes the usage-only chunk (``"choices": []`` and a
    ``usage`` object) that the proxy asked for on the client's behalf, holding back at
    most one unfinished event to do so; otherwise :meth:`feed` returns each chunk as is.
    """

    def __init__(self, *, strip_usage_chunk: bool = False) -> None:
        self.usage: Usage | None = None
        self.completed = False
        self.model: str | None = None
        self.malformed = 0
        self._strip = strip_usage_chunk
        self._parser = SSEParser()
        self._bad_events = 0
        self._failed = False
        self._text: list[str] = []

    def feed(self, chunk: bytes) -> bytes:
        """Read ``chunk``; return what to relay now (``chunk`` itself unless stripping)."""
        data = self._parser.single_data(chunk)
        if data is not None:  # one whole event, the usual chunk: no event objects
            usage_only = bool(data) and self._read(data)
            self.malformed = self._bad_events + self._parser.malformed
            return b"" if usage_only and self._strip else chunk
        events = self._parser.feed(chunk)
        if not self._strip:
            for event in events:
                if event.data:
                    self._read(event.data)
            self.malformed = self._bad_events + self._parser.malformed
            return chunk
        return self._relay(events)

    def flush(self) -> bytes:
        """Relay whatever the parser still holds, reading a final unterminated event."""
        events = self._parser.flush()
        if not self._strip:
            for event in events:
                if event.data:
                    self._read(event.data)
            self.malformed = self._bad_events + self._parser.malformed
            return b""
        return self._relay(events)

    def output_text(self) -> str:
        """Content, reasoning, refusal and tool-call text generated so far."""
        return "".join(self._text)

    def _relay(self, events: list[SSEEvent]) -> bytes:
        kept = [e.raw for e in events if not (e.data and self._read(e.data))]
        self.malformed = self._bad_events + self._parser.malformed
        return kept[0] if len(kept) == 1 else b"".join(kept)

    def _read(self, data: bytes) -> bool:
        """Account for one event; True if it is the usage-only chunk."""
        if data == b"[DONE]":
            self.completed = not self._failed
            return False
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            if data.strip() == b"[DONE]":  # tolerate padding around the terminator
                self.completed = not self._failed
            else:
                self._bad_events += 1
            return False
        if not isinstance(obj, dict):
            self._bad_events += 1
            return False
        if isinstance(model := obj.get("model"), str) and model:
            self.model = model
        if isinstance(obj.get("error"), dict):
            # An error mid-stream: whatever follows, this response did not finish.
            self._failed = True
            self.completed = False
        choices = obj.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict):
                    _add_message(choice.get("delta"), self._text)
                    if isinstance(text := choice.get("text"), str):
                        self._text.append(text)  # legacy Completions
        usage = obj.get("usage")
        if not isinstance(usage, dict):
            return False
        reported = usage_from_openai(usage)
        if reported is not None:
            self.usage = reported if self.usage is None else self.usage.merge(reported)
        return choices == []


_RESPONSES_TEXT_DELTAS: Final = frozenset(
    {
        "response.output_text.delta",
        "response.refusal.delta",
        "response.function_call_arguments.delta",
        "response.custom_tool_call_input.delta",
        "response.mcp_call_arguments.delta",
        "response.code_interpreter_call_code.delta",
        "response.reasoning_text.delta",
        "response.reasoning_summary_text.delta",
        "response.output_audio_transcript.delta",
    }
)
_RESPONSES_TERMINAL: Final = frozenset(
    {"response.completed", "response.incomplete", "response.failed"}
)


class OpenAIResponsesStreamMeter(ReadOnlyMeter):
    """Meters a Responses API stream (typed events, no ``[DONE]``).

    Usage comes from the terminal event (``response.completed``, ``.incomplete`` or
    ``.failed``), whose ``response`` object carries the final ``usage``. Never strips.
    """

    def _read(self, data: bytes) -> None:
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            self._bad_events += 1
            return
        if not isinstance(obj, dict):
            self._bad_events += 1
            return
        kind = obj.get("type")
        if not isinstance(kind, str):
            kind = ""  # (a list here would not even be hashable for the set lookups)
        if kind in _RESPONSES_TEXT_DELTAS:
            if isinstance(delta := obj.get("delta"), str):
                self._text.append(delta)
            return
        if kind == "error":
            self._failed = True
            self.completed = False
            return
        response = obj.get("response")
        if not isinstance(response, dict):
            return
        if isinstance(model := response.get("model"), str) and model:
            self.model = model
        if kind in _RESPONSES_TERMINAL:
            usage = response.get("usage")
            if isinstance(usage, dict) and (reported := usage_from_openai(usage)):
                self.usage = reported if self.usage is None else self.usage.merge(reported)
            self.completed = not self._failed


# --- the provider ----------------------------------------------------------------------


class OpenAIProvider:
    """Translator for the OpenAI wire format (also OpenAI-compatible upstreams)."""

    name = "openai"

    def parse_request(self, path: str, body: bytes) -> ParsedRequest:
        """Facts for metering; injects ``stream_options.include_usage`` when needed.

        Unmetered paths are not parsed at all, so any body passes through. For metered
        ones, one ``orjson.loads``; the body is returned as the very same object unless
        include_usage was injected into a streamed Chat Completions or Completions call.
        """
        endpoint = _ENDPOINTS.get(normalise_path(path))
        if endpoint is None:
            return ParsedRequest("other", False, None, False, None, None, body)
        obj = load_request_object(body, _EXAMPLE_MODEL)
        model = require_model(obj, _EXAMPLE_MODEL)
        stream = obj.get("stream") is True and endpoint != "embeddings"
        end_user = nonempty_str(obj.get("user")) or nonempty_str(obj.get("safety_identifier"))
        upstream_body = body
        strip = False
        if stream and endpoint in ("chat", "completions"):
            injected = _with_include_usage(body, obj)
            if injected is not None:
                upstream_body, strip = injected, True
        return ParsedRequest(
            endpoint=endpoint,
            metered=True,
            model=model,
            stream=stream,
            max_output_tokens=_max_output_tokens(endpoint, obj),
            end_user=end_user,
            body=upstream_body,
            strip_usage_chunk=strip,
        )

    def usage_from_body(self, endpoint: str, body: bytes) -> tuple[Usage | None, str | None]:
        """Usage and served model from a complete response body; (None, None) on garbage."""
        obj = loads_object(body)
        if obj is None:
            return None, None
        model = nonempty_str(obj.get("model"))
        usage = obj.get("usage")
        if not isinstance(usage, dict):
            return None, model
        return usage_from_openai(usage, embeddings=endpoint == "embeddings"), model

    def stream_meter(
        self, parsed: ParsedRequest
    ) -> OpenAIChatStreamMeter | OpenAIResponsesStreamMeter:
        """A Responses meter for ``responses``, else a Chat/Completions meter."""
        if parsed.endpoint == "responses":
            return OpenAIResponsesStreamMeter()
        return OpenAIChatStreamMeter(strip_usage_chunk=parsed.strip_usage_chunk)

    def prompt(self, body: bytes, endpoint: str | None = None) -> Prompt:
        """Messages, prompt, input, instructions, tool and schema text, joined by
        newlines, and the tokens OpenAI's format adds around them (see
        :func:`chat_framing_tokens`): framing for Chat ``messages`` and, on the Responses
        ``endpoint``, for its ``instructions``, a string ``input`` and each input item
        with a ``role`` (each is a message to the model). Completions and Embeddings
        inputs have none. Function tools are rendered as the model sees them
        (:func:`function_tools_text`), other tools and schemas as JSON.

        Token-id prompts are not text; count them with :meth:`prompt_token_ids_count`.
        Images, audio and files are not represented. Never raises.
        """
        obj = loads_object(body)
        if obj is None:
            return Prompt("")
        out: list[str] = []
        messages = names = 0
        has_system = False
        if isinstance(instructions := obj.get("instructions"), str):
            out.append(instructions)
            messages += 1
            has_system = True
        if isinstance(chat := obj.get("messages"), list):
            for message in chat:
                if isinstance(message, dict):
                    messages += 1
                    has_system = has_system or message.get("role") in ("system", "developer")
                    if isinstance(name := message.get("name"), str):
                        out.append(name)
                        names += 1
                _add_message(message, out)
        if isinstance(prompt := obj.get("prompt"), str):
            out.append(prompt)
        elif isinstance(prompt, list):
            for item in prompt:
                _add_response_item(item, out)
        responses = endpoint == "responses"
        if isinstance(value := obj.get("input"), str):
            out.append(value)
            messages += responses
        elif isinstance(value, list):
            for item in value:
                messages += responses and (
                    isinstance(item, str) or (isinstance(item, dict) and "role" in item)
                )
                _add_response_item(item, out)
        framing = chat_framing_tokens(messages, names)
        functions, others = _split_tools(obj.get("tools"), obj.get("functions"))
        if functions:
            out.append(function_tools_text(functions))
            framing += _FUNCTIONS_TOKENS - (_FUNCTIONS_SYSTEM_SHARED if has_system else 0)
        _add_json(others or None, out)
        _add_json(obj.get("response_format"), out)
        if isinstance(text := obj.get("text"), dict):  # Responses structured output
            _add_json(text.get("format"), out)
        return Prompt("\n".join(out), max(0, framing))

    def prompt_text(self, body: bytes) -> str:
        return self.prompt(body).text

    def prompt_token_ids_count(self, body: bytes) -> int:
        """How many prompt tokens are given as token ids (Completions ``prompt``,
        Embeddings ``input``: an array of ints or an array of such arrays)."""
        obj = loads_object(body)
        if obj is None:
            return 0
        total = 0
        for key in ("prompt", "input"):
            value = obj.get(key)
            if _is_token_ids(value):
                total += len(value)
            elif isinstance(value, list):
                total += sum(len(v) for v in value if _is_token_ids(v))
        return total

    def output_text_from_body(self, endpoint: str, body: bytes) -> str:
        """Generated text in a complete body (choices or Responses output items)."""
        obj = loads_object(body)
        if obj is None:
            return ""
        out: list[str] = []
        if isinstance(choices := obj.get("choices"), list):
            for choice in choices:
                if isinstance(choice, dict):
                    _add_message(choice.get("message"), out)
                    if isinstance(text := choice.get("text"), str):
                        out.append(text)
        if isinstance(output := obj.get("output"), list):
            for item in output:
                _add_response_item(item, out)
        return "".join(out)

    def upstream_auth_headers(self, api_key: str) -> dict[str, str]:
        """OpenAI takes the key as a bearer token."""
        return {"Authorization": f"Bearer {api_key}"}
