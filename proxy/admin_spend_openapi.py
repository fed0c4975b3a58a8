"""The OpenAPI fragment of ``/admin/spend`` and ``/admin/ledger`` (handlers in
:mod:`proxy.admin_spend`), assembled into one document by :mod:`proxy.admin_openapi`."""

from __future__ import annotations

from typing import Any

from proxy.admin_spend import (
    DEFAULT_LEDGER_LIMIT,
    FILTERS,
    MAX_BUCKETS,
    MAX_LEDGER_LIMIT,
    MAX_POINTS,
    SUMS,
)
from proxy.store.aggregate import GROUP_COLUMNS, NONE_LABEL

__all__ = ["OPENAPI_PATHS", "OPENAPI_SCHEMAS"]


_REF = "#/components/schemas/"


def _query(name: str, description: str, example: Any = None, **schema: Any) -> dict[str, Any]:
    param = {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema or {"type": "string"},
    }
    if example is not None:
        param["example"] = example
    return param


_PERIOD_PARAMS = [
    _query(
        "since",
        "Start (inclusive): a duration back from now (30m, 24h, 7d, 2w), a date "
        "(2026-11-01, 00:00 UTC) or an ISO date-time (UTC unless it has an offset).",
        example="7d",
    ),
    _query("from", "A synonym of since; give one of them."),
    _query("until", "End (exclusive), in the same forms as since."),
]
_FILTER_PARAMS = [
    _query(
        name,
        f"Only records whose {name} is one of the given values (repeat the parameter); "
        f"'{NONE_LABEL}' matches a missing value.",
        type="array",
        items={"type": "string"},
    )
    for name in FILTERS
]


def _errors(*statuses: int) -> dict[str, Any]:
    words = {
        400: "A query parameter cannot be used.",
        401: "Missing or wrong admin token.",
        404: "Not found.",
        503: "The proxy is starting or stopping, or the store does not answer.",
    }
    return {
        str(s): {
            "description": words[s],
            "content": {"application/json": {"schema": {"$ref": _REF + "Error"}}},
        }
        for s in statuses
    }


def _json(description: str, schema_name: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": _REF + schema_name}}},
    }


_SUMS_PROPERTIES: dict[str, Any] = {
    **{name: {"type": "integer", "minimum": 0} for name in SUMS},
    "cost_usd": {"type": "string", "description": "Exact decimal US dollars."},
    "cost_nanos": {"type": "integer", "description": "The same amount in nano-USD."},
}

OPENAPI_SCHEMAS: dict[str, Any] = {
    "SpendSums": {
        "type": "object",
        "required": list(_SUMS_PROPERTIES),
        "properties": _SUMS_PROPERTIES,
    },
    "SpendPoint": {
        "allOf": [
            {"$ref": _REF + "SpendSums"},
            {
                "type": "object",
                "required": ["start_ms", "start"],
                "properties": {
                    "start_ms": {"type": "integer"},
                    "start": {"type": "string", "format": "date-time"},
                },
            },
        ]
    },
    "SpendRow": {
        "description": "The sums of one group; its group columns are properties too "
        f"(any of {', '.join(GROUP_COLUMNS)}), and series when bucket was given.",
        "allOf": [
            {"$ref": _REF + "SpendSums"},
            {
                "type": "object",
                "properties": {
                    "series": {"type": "array", "items": {"$ref": _REF + "SpendPoint"}},
                    **{column: {"type": "string"} for column in GROUP_COLUMNS},
                },
            },
        ],
    },
    "Spend": {
        "type": "object",
        "required": ["group_by", "since", "until", "filters", "rows", "total"],
        "properties": {
            "group_by": {"type": "array", "items": {"enum": list(GROUP_COLUMNS)}},
            "since": {"type": ["string", "null"], "format": "date-time"},
            "until": {"type": ["string", "null"], "format": "date-time"},
            "since_ms": {"type": ["integer", "null"]},
            "until_ms": {"type": ["integer", "null"]},
            "filters": {
                "type": "object",
                "additionalProperties": {"type": "array", "items": {"type": "string"}},
            },
            "bucket_ms": {"type": ["integer", "null"]},
            "buckets": {"type": ["array", "null"], "items": {"type": "integer"}},
            "rows": {"type": "array", "items": {"$ref": _REF + "SpendRow"}},
            "total": {"$ref": _REF + "SpendSums"},
        },
    },
    "LedgerRecord": {
        "type": "object",
        "required": ["id", "ts_ms", "time", "model", "cost_nanos", "cost_usd", "exact"],
        "properties": {
            "id": {"type": "string"},
            "ts_ms": {"type": "integer"},
            "time": {"type": "string", "format": "date-time"},
            "key_name": {"type": "string"},
            "team": {"type": ["string", "null"]},
            "user": {"type": ["string", "null"]},
            "end_user": {"type": ["string", "null"]},
            "tags": {"type": "array", "items": {"type": "string"}},
            "upstream": {"type": "string"},
            "endpoint": {"type": "string"},
            "model": {"type": "string"},
            "stream": {"type": "boolean"},
            "status": {"type": "integer"},
            **{
                f"{kind}_tokens": {"type": "integer"}
                for kind in ("input", "cached_input", "cache_write", "output", "reasoning")
            },
            "cost_nanos": {"type": "integer"},
            "cost_usd": {"type": "string"},
            "exact": {"type": "boolean"},
            "latency_ms": {"type": "number"},
            "error": {"type": ["string", "null"]},
            "extra": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    },
    "LedgerList": {
        "type": "object",
        "required": ["limit", "matched", "truncated", "records"],
        "properties": {
            "since": {"type": ["string", "null"], "format": "date-time"},
            "until": {"type": ["string", "null"], "format": "date-time"},
            "limit": {"type": "integer"},
            "matched": {"type": "integer", "description": "Records in the period and filters."},
            "truncated": {"type": "boolean", "description": "More matched than limit."},
            "records": {"type": "array", "items": {"$ref": _REF + "LedgerRecord"}},
        },
    },
}

OPENAPI_PATHS: dict[str, Any] = {
    "/admin/spend": {
        "get": {
            "operationId": "getSpend",
            "tags": ["spend"],
            "summary": "Spend and tokens, grouped, filtered, optionally as a time series",
            "description": "The rows of `metergate report` for a period. Also accepts the "
            "/ui session cookie.",
            "security": [{"bearer": []}, {"uiSession": []}],
            "parameters": [
                _query(
                    "group_by",
                    f"Comma list of {', '.join(GROUP_COLUMNS)}; default team; empty for totals.",
                    example="team,model",
                ),
                *_PERIOD_PARAMS,
                *_FILTER_PARAMS,
                _query(
                    "bucket",
                    f"Time bucket length (5m, 1h, 1d; units s m h d w); at most "
                    f"{MAX_BUCKETS} buckets and {MAX_POINTS} points (groups times buckets).",
                    example="1h",
                    type="string",
                    pattern="^[0-9]+[smhdw]$",
                ),
            ],
            "responses": {"200": _json("The sums.", "Spend"), **_errors(400, 401, 503)},
        }
    },
    "/admin/ledger": {
        "get": {
            "operationId": "listLedger",
            "tags": ["ledger"],
            "summary": "The newest ledger records of a period (default the last hour)",
            "parameters": [
                *_PERIOD_PARAMS,
                _query(
                    "limit",
                    f"At most this many records (default {DEFAULT_LEDGER_LIMIT}).",
                    type="integer",
                    minimum=1,
                    maximum=MAX_LEDGER_LIMIT,
                ),
                *_FILTER_PARAMS,
            ],
            "responses": {"200": _json("Newest first.", "LedgerList"), **_errors(400, 401, 503)},
        }
    },
    "/admin/ledger/{request_id}": {
        "get": {
            "operationId": "getLedgerRecord",
            "tags": ["ledger"],
            "summary": "One request's ledger record",
            "parameters": [
                {
                    "name": "request_id",
                    "in": "path",
                    "required": True,
                    "description": "The X-Metergate-Request-Id of the response.",
                    "schema": {"type": "string"},
                }
            ],
            "responses": {"200": _json("The record.", "LedgerRecord"), **_errors(401, 404, 503)},
        }
    },
}
