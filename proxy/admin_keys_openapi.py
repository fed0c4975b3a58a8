"""The OpenAPI 3.1 fragment of ``/admin/keys`` (handlers in :mod:`proxy.admin_keys`),
for the document :mod:`proxy.admin_openapi` assembles. References
``#/components/schemas/Error`` and ``Budget``, which that document defines."""

from __future__ import annotations

from typing import Any, Final

from proxy.key_ops import MAX_EXPIRES_MS, MAX_GRACE_MS, NEW_KEY_FIELDS

__all__ = ["OPENAPI_PATHS", "OPENAPI_SCHEMAS"]

_REF = "#/components/schemas/"
_DAY_MS = 86_400_000


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF + name}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(description, _ref("Error"))


_TIME = {"type": "string", "format": "date-time"}
_OPT_TIME = {"type": ["string", "null"], "format": "date-time"}
_OPT_TEXT = {"type": ["string", "null"]}
_DURATION = {"type": "string", "pattern": r"^\d{1,6}[smhdw]$"}
_KEY_VALUE = {
    "type": "string",
    "pattern": "^mg-[A-Za-z0-9_-]{43}$",
    "description": "The key. Shown in this answer only; it cannot be recovered later.",
}

_VIEW_FIELDS: dict[str, Any] = {
    "id": {"type": "string", "pattern": "^key_[0-9a-f]{16}$", "description": "Not secret."},
    "name": {"type": "string", "description": "The key name the ledger records."},
    "team": _OPT_TEXT,
    "user": _OPT_TEXT,
    "tags": {"type": "array", "items": {"type": "string"}},
    "prefix": {"type": "string", "description": "The first characters of the key, then '...'."},
    "state": {"enum": ["active", "expired", "revoked"]},
    "created_at": _TIME,
    "expires_at": _OPT_TIME,
    "rotated_at": _OPT_TIME,
    "previous_valid_until": {
        **_OPT_TIME,
        "description": "Until when the value replaced by the last rotation still works.",
    },
    "revoked_at": _OPT_TIME,
    "budget": {**_OPT_TEXT, "description": "The name of the key's budget, if any."},
}
_BUDGET_VIEW = {"oneOf": [_ref("Budget"), {"type": "null"}]}

OPENAPI_SCHEMAS: Final[dict[str, Any]] = {
    "Key": {
        "type": "object",
        "description": "An issued key: never the key itself, nor its digest.",
        "required": list(_VIEW_FIELDS),
        "properties": _VIEW_FIELDS,
    },
    "KeyList": {
        "type": "object",
        "required": ["keys"],
        "properties": {"keys": {"type": "array", "items": _ref("Key")}},
    },
    "KeyDetail": {
        "allOf": [
            _ref("Key"),
            {
                "type": "object",
                "required": ["spend", "budget_view"],
                "properties": {
                    "spend": {
                        "type": "object",
                        "description": "Charged to the key's name from its creation until "
                        "now, or until it was revoked.",
                        "required": ["since", "until", "requests", "cost_usd", "cost_nanos"],
                        "properties": {
                            "since": _TIME,
                            "until": _OPT_TIME,
                            "requests": {"type": "integer", "minimum": 0},
                            "cost_usd": {"type": "string"},
                            "cost_nanos": {"type": "integer", "minimum": 0},
                        },
                    },
                    "budget_view": _BUDGET_VIEW,
                },
            },
        ]
    },
    "IssuedKey": {
        "description": "A key just created or rotated, with its value: shown once.",
        "allOf": [
            _ref("Key"),
            {
                "type": "object",
                "required": ["key", "budget_view"],
                "properties": {"key": _KEY_VALUE, "budget_view": _BUDGET_VIEW},
            },
        ],
    },
    "NewKey": {
        "type": "object",
        "required": ["name"],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,59}$"},
            "team": {"type": ["string", "null"], "maxLength": 128},
            "user": {"type": ["string", "null"], "maxLength": 128},
            "tags": {"type": "array", "maxItems": 16, "items": {"type": "string"}},
            "expires": {
                **_DURATION,
                "description": "Lifetime, like 90d (at most "
                f"{MAX_EXPIRES_MS // _DAY_MS} days); none: no expiry.",
            },
            "budget_usd": {
                "type": ["string", "number"],
                "description": "A hard spend cap for this key, in USD per period.",
            },
            "period": {"enum": ["day", "week", "month", "total"], "default": "month"},
        },
    },
    "Rotation": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "grace": {
                **_DURATION,
                "description": "How long the old value keeps working (at most "
                f"{MAX_GRACE_MS // _DAY_MS} days); none: it stops at once.",
            }
        },
    },
}
assert set(OPENAPI_SCHEMAS["NewKey"]["properties"]) == set(NEW_KEY_FIELDS)

_REFP = {
    "name": "ref",
    "in": "path",
    "required": True,
    "description": "A key id (key_...) or the name of an active key.",
    "schema": {"type": "string"},
}
_COMMON = {
    "404": _error("No such key (or a reference that does not fit one path segment)."),
    "503": _error("The proxy is starting or stopping, or the store does not answer."),
}
_SECRET_MISSING = "No key_secret in the config, an active key has the name, or the key ended."


def _op(op_id: str, summary: str, responses: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {
        "operationId": op_id,
        "tags": ["keys"],
        "summary": summary,
        "responses": {**_COMMON, **responses},
        **more,
    }


OPENAPI_PATHS: Final[dict[str, Any]] = {
    "/admin/keys": {
        "get": _op(
            "listKeys",
            "Issued keys (not revoked ones unless all=1)",
            {"200": _json("The keys.", _ref("KeyList"))},
            parameters=[
                {
                    "name": "all",
                    "in": "query",
                    "required": False,
                    "description": "1 or true: include revoked keys.",
                    "schema": {"type": "string"},
                }
            ],
        ),
        "post": _op(
            "createKey",
            "Issue a key; the answer is the only time it is shown",
            {
                "201": _json("Issued.", _ref("IssuedKey")),
                "400": _error("The body is not JSON, or a field is not valid."),
                "409": _error(_SECRET_MISSING),
            },
            requestBody={
                "required": True,
                "content": {"application/json": {"schema": _ref("NewKey")}},
            },
        ),
    },
    "/admin/keys/{ref}": {
        "parameters": [_REFP],
        "get": _op(
            "getKey",
            "One key, with its spend so far and its budget",
            {"200": _json("The key.", _ref("KeyDetail"))},
        ),
        "delete": _op(
            "revokeKey",
            "Revoke a key on every replica (within a second)",
            {
                "200": _json("Revoked.", _ref("Key")),
                "409": _error("Already revoked, or changed concurrently."),
            },
        ),
    },
    "/admin/keys/{ref}/rotate": {
        "parameters": [_REFP],
        "post": _op(
            "rotateKey",
            "Give a key a new value; the old one stops working (after the grace period)",
            {
                "200": _json("Rotated.", _ref("IssuedKey")),
                "400": _error("The body is not a JSON object, or grace is not valid."),
                "409": _error(_SECRET_MISSING),
            },
            requestBody={
                "required": False,
                "content": {"application/json": {"schema": _ref("Rotation")}},
            },
        ),
    },
}
