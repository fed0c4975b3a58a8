"""JSON helpers both translators share, so that OpenAI and Anthropic requests are
validated with the same rules and the same error codes."""

from __future__ import annotations

from typing import Any

import orjson

from proxy.errors import BadRequest


def normalise_path(path: str) -> str:
    """``/v1/chat/completions?x=1`` -> ``chat/completions``: no slashes, no ``v1/``."""
    p = path.split("?", 1)[0].strip("/")
    if p.startswith("v1/"):
        return p[3:].strip("/")
    return "" if p == "v1" else p


def load_request_object(body: bytes, example_model: str) -> dict[str, Any]:
    """Parse a request body that must be a JSON object, or raise ``invalid_json``."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(
            f"The request body could not be parsed as JSON ({exc}). Send a UTF-8 JSON "
            f'object, for example {{"model": "{example_model}", ...}}.',
            code="invalid_json",
        ) from None
    if not isinstance(obj, dict):
        raise BadRequest(
            f"The request body must be a JSON object, not a JSON {_json_kind(obj)}. Send an "
            f'object, for example {{"model": "{example_model}", ...}}.',
            code="invalid_json",
        )
    return obj


def require_model(obj: dict[str, Any], example_model: str) -> str:
    """The request's ``model``, or raise ``missing_model`` / ``invalid_model``."""
    model = obj.get("model")
    if model is None:
        raise BadRequest(
            f'The request has no "model" field. Add the model to use, for example '
            f'"model": "{example_model}".',
            code="missing_model",
        )
    if not isinstance(model, str) or not model.strip():
        raise BadRequest(
            f'The "model" field must be a non-empty string naming the model, for example '
            f'"model": "{example_model}"; got {_json_kind(model)} {short(model)}.',
            code="invalid_model",
        )
    return model


def token_count(value: object) -> int | None:
    """``value`` if it is a usable token count (a non-negative JSON integer), else None.

    ``bool`` is excluded explicitly because it is an ``int`` subclass in Python.
    """
    if type(value) is int and value >= 0:
        return value
    return None


def nonempty_str(value: object) -> str | None:
    """``value`` if it is a non-empty string, else None."""
    return value if isinstance(value, str) and value else None


def json_text(value: object) -> str:
    """``value`` as compact JSON text, or "" when orjson cannot render it.

    orjson loads nesting up to 1024 levels deep but refuses to dump more than 254, so
    re-serialising a parsed request can fail; text extraction must not.
    """
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        return ""


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def short(value: object) -> str:
    text = repr(value) if isinstance(value, str) else json_text(value)
    return text if len(text) <= 40 else text[:37] + "..."


def loads_object(body: bytes) -> dict[str, Any] | None:
    """The JSON object in ``body``, or None when it is not one (never raises)."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None
