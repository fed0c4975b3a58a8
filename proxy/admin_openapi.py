"""``GET /admin/openapi.json``: the OpenAPI 3.1 document of every ``/admin/`` endpoint.

The document is assembled from fragments: each admin module exports ``OPENAPI_PATHS``
(a ``paths`` mapping) and, when it needs them, ``OPENAPI_SCHEMAS`` (named
``components/schemas``). To describe a new admin module, import its fragment and add
it to :data:`FRAGMENTS`. The budgets fragment lives here because ``proxy.admin`` was
written before this document. Shared pieces every fragment may reference:
``#/components/schemas/Error`` and the security schemes ``bearer`` (the admin token)
and ``uiSession`` (the ``/ui`` cookie, accepted only where an operation says so).

Operations that omit a 401 response get one added, since every admin endpoint answers
401 without credentials. ``tests/test_admin_openapi.py`` validates the document and
runs schemathesis against a real proxy with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

import orjson
from aiohttp import web

from proxy import __version__
from proxy.admin_auth import SESSION_COOKIE, AdminAuth
from proxy.admin_keys_openapi import OPENAPI_PATHS as KEY_PATHS
from proxy.admin_keys_openapi import OPENAPI_SCHEMAS as KEY_SCHEMAS
from proxy.admin_spend_openapi import OPENAPI_PATHS as SPEND_PATHS
from proxy.admin_spend_openapi import OPENAPI_SCHEMAS as SPEND_SCHEMAS
from proxy.budget import PERIODS, SCOPE_FIELDS
from proxy.budget_specs import CHANGEABLE_FIELDS

__all__ = ["FRAGMENTS", "build_openapi", "setup_openapi"]

Fragment = tuple[Mapping[str, Any], Mapping[str, Any]]
"""``(paths, schemas)`` of one admin module."""

_REF = "#/components/schemas/"


def _json(description: str, schema: Mapping[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF + name}


def _error(description: str) -> dict[str, Any]:
    return _json(description, _ref("Error"))


_BASE_SCHEMAS: Final[dict[str, Any]] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "code"],
                "properties": {
                    "message": {
                        "type": "string",
                        "description": "What went wrong, and what to do.",
                    },
                    "code": {"type": "string", "description": "A stable machine-readable code."},
                },
            }
        },
    },
}

# -- budgets (proxy.admin, proxy.budget_ops) ----------------------------------------------

_USD = {"type": ["string", "null"], "description": "Exact decimal US dollars."}
_NANOS = {"type": ["integer", "null"], "description": "nano-USD."}
_ISO = {"type": ["string", "null"], "format": "date-time"}

_BUDGET_SCHEMAS: Final[dict[str, Any]] = {
    "Scope": {
        "type": "object",
        "description": "What a budget matches; {} matches every request.",
        "propertyNames": {"enum": list(SCOPE_FIELDS)},
        "additionalProperties": {"type": "string", "minLength": 1},
    },
    "Budget": {
        "type": "object",
        "description": "A budget and its current period (proxy.budget_ops.budget_view). "
        "Amounts and period fields are null for a budget that only limits rates.",
        "required": ["name", "source", "scope", "period", "enforce", "limit_usd", "spent_usd"],
        "properties": {
            "name": {"type": "string"},
            "source": {"enum": ["config", "run-time", "override"]},
            "scope": _ref("Scope"),
            "period": {"enum": list(PERIODS)},
            "timezone": {"type": "string"},
            "enforce": {"enum": ["hard", "soft"]},
            "limit_usd": _USD,
            "spent_usd": _USD,
            "reserved_usd": {**_USD, "description": "Held by requests in flight."},
            "remaining_usd": _USD,
            "percent_spent": {"type": ["number", "null"]},
            "period_id": {"type": ["string", "null"]},
            "period_start": _ISO,
            "period_reset": {**_ISO, "description": "When the period ends; null for total."},
            "limit_nanos": _NANOS,
            "spent_nanos": _NANOS,
            "reserved_nanos": _NANOS,
            "requests_per_minute": {"type": ["integer", "null"]},
            "tokens_per_minute": {"type": ["integer", "null"]},
        },
    },
    "BudgetList": {
        "type": "object",
        "required": ["budgets", "hidden", "invalid"],
        "properties": {
            "budgets": {"type": "array", "items": _ref("Budget")},
            "hidden": {
                "type": "array",
                "items": {"type": "string"},
                "description": "Config budgets deleted at run time.",
            },
            "invalid": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name", "error"],
                    "properties": {"name": {"type": "string"}, "error": {"type": "string"}},
                },
            },
        },
    },
    "BudgetChanges": {
        "type": "object",
        "description": "The fields to set; null removes a field. A new budget needs scope.",
        "minProperties": 1,
        "additionalProperties": False,
        "properties": {
            "scope": _ref("Scope"),
            "limit_usd": {"type": ["string", "number", "null"], "examples": ["100", "12.50"]},
            "period": {"enum": [*PERIODS, None]},
            "timezone": {"type": ["string", "null"], "examples": ["UTC", "Europe/Berlin"]},
            "enforce": {"enum": ["hard", "soft", None]},
            "requests_per_minute": {"type": ["integer", "null"], "minimum": 1},
            "tokens_per_minute": {"type": ["integer", "null"], "minimum": 1},
        },
    },
    "BudgetMessage": {
        "type": "object",
        "required": ["name", "message"],
        "properties": {
            "name": {"type": "string"},
            "outcome": {"enum": ["deleted", "hidden"]},
            "message": {"type": "string"},
        },
    },
    "BudgetReset": {
        "type": "object",
        "required": ["before", "after"],
        "properties": {"before": _ref("Budget"), "after": _ref("Budget")},
    },
}
assert set(_BUDGET_SCHEMAS["BudgetChanges"]["properties"]) == set(CHANGEABLE_FIELDS)

_NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "description": "The budget's name.",
    "schema": {"type": "string"},
    "example": "search-monthly",
}
_STORE_DOWN = {"503": _error("The proxy is starting or stopping, or the store does not answer.")}


def _op(op_id: str, summary: str, responses: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {
        "operationId": op_id,
        "tags": ["budgets"],
        "summary": summary,
        # Every budget path can answer 404: an unknown name, or a name that does not fit
        # one path segment (the /admin/ catch-all answers then).
        "responses": {"404": _error("No such budget."), **responses, **_STORE_DOWN},
        **more,
    }


_BUDGET_PATHS: Final[dict[str, Any]] = {
    "/admin/budgets": {
        "get": _op(
            "listBudgets",
            "Every budget in force, with its current period's spend",
            {"200": _json("The budgets.", _ref("BudgetList"))},
            description="Also accepts the /ui session cookie.",
            security=[{"bearer": []}, {"uiSession": []}],
        )
    },
    "/admin/budgets/{name}": {
        "parameters": [_NAME],
        "get": _op(
            "getBudget",
            "One budget",
            {"200": _json("The budget.", _ref("Budget")), "404": _error("No such budget.")},
        ),
        "put": _op(
            "putBudget",
            "Create a run-time budget, or change fields of the budget in force",
            {
                "200": _json("Changed.", _ref("Budget")),
                "201": _json("Created.", _ref("Budget")),
                "400": _error("The body is not JSON, or the budget would not be valid."),
            },
            requestBody={
                "required": True,
                "content": {
                    "application/json": {
                        "schema": _ref("BudgetChanges"),
                        "example": {"limit_usd": "100", "scope": {"team": "search"}},
                    }
                },
            },
        ),
        "delete": _op(
            "deleteBudget",
            "Delete a run-time budget, or hide a config budget",
            {
                "200": _json("Done.", _ref("BudgetMessage")),
                "404": _error("No such budget, or already deleted."),
            },
        ),
    },
    "/admin/budgets/{name}/reset": {
        "parameters": [_NAME],
        "post": _op(
            "resetBudget",
            "Zero the spend of the budget's current period",
            {
                "200": _json("The budget before and after.", _ref("BudgetReset")),
                "404": _error("No such budget."),
                "409": _error("The budget has no spend limit."),
            },
        ),
    },
    "/admin/budgets/{name}/revert": {
        "parameters": [_NAME],
        "post": _op(
            "revertBudget",
            "Drop the run-time change of a config budget",
            {
                "200": _json("Reverted.", _ref("BudgetMessage")),
                "409": _error("Not a config budget, or nothing to revert."),
            },
        ),
    },
}

_OPENAPI_PATHS: Final[dict[str, Any]] = {
    "/admin/openapi.json": {
        "get": {
            "operationId": "getOpenApi",
            "tags": ["meta"],
            "summary": "This document",
            "responses": {"200": _json("OpenAPI 3.1.", {"type": "object"})},
        }
    }
}

FRAGMENTS: Final[tuple[Fragment, ...]] = (
    (_BUDGET_PATHS, _BUDGET_SCHEMAS),
    (SPEND_PATHS, SPEND_SCHEMAS),
    (KEY_PATHS, KEY_SCHEMAS),
    # Further admin modules: (module.OPENAPI_PATHS, getattr(module, "OPENAPI_SCHEMAS", {})).
    (_OPENAPI_PATHS, {}),
)
"""Every admin module's ``(paths, schemas)``, in document order."""

_METHODS = ("get", "put", "post", "delete", "patch", "head", "options")


def build_openapi(fragments: Sequence[Fragment] = FRAGMENTS) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``fragments``. A path or schema name defined by two
    fragments is a ValueError (one module would silently hide the other's)."""
    paths: dict[str, Any] = {}
    schemas: dict[str, Any] = dict(_BASE_SCHEMAS)
    for frag_paths, frag_schemas in fragments:
        for name, schema in frag_schemas.items():
            if name in schemas:
                raise ValueError(f"Two admin modules define the OpenAPI schema {name!r}.")
            schemas[name] = schema
        for path, item in frag_paths.items():
            if path in paths:
                raise ValueError(f"Two admin modules define the OpenAPI path {path!r}.")
            paths[path] = {**item}
            for method in _METHODS:
                if method in item:
                    op = {**item[method]}
                    op["responses"] = {
                        "401": _error("Missing or wrong admin token."),
                        **op["responses"],
                    }
                    paths[path][method] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Metergate admin API",
            "version": __version__,
            "description": "Budgets, spend and ledger of a Metergate proxy. Off (404) unless "
            "the config sets admin_token; every request needs "
            '\'Authorization: Bearer <admin_token>\'. Errors are {"error": {"message", '
            '"code"}}. Money is exact: decimal USD text and integer nano-USD.',
        },
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The admin_token from the proxy's config.",
                },
                "uiSession": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": SESSION_COOKIE,
                    "description": "Set by POST /ui/login; read-only endpoints the /ui page "
                    "uses accept it.",
                },
            },
        },
    }


def _served(document: dict[str, Any], router: web.UrlDispatcher) -> dict[str, Any]:
    """``document`` without the operations ``router`` does not serve (a module that is
    off in this config, such as ``/admin/keys`` without issued keys)."""
    routes = {
        (route.method.lower(), resource.canonical)
        for resource in router.resources()
        for route in resource
    }
    paths: dict[str, Any] = {}
    for path, item in document["paths"].items():
        kept = {k: v for k, v in item.items() if k not in _METHODS or (k, path) in routes}
        if any(k in _METHODS for k in kept):
            paths[path] = kept
    return {**document, "paths": paths}


def setup_openapi(router: web.UrlDispatcher, auth: AdminAuth) -> None:
    """Register ``GET /admin/openapi.json`` (admin token required). Call it after the
    other admin routes: the document describes the operations registered by then."""
    body: list[bytes] = []  # filled below, once this route is registered too

    async def openapi(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body[0], content_type="application/json")

    router.add_get("/admin/openapi.json", auth.guard(openapi))
    body.append(orjson.dumps(_served(build_openapi(), router)))  # static: built once
