"""The admin HTTP API: budgets, for the same views and changes as ``metergate budgets``.

::

    GET    /admin/budgets                 {"budgets": [view...], "hidden": [...], "invalid": [...]}
    GET    /admin/budgets/{name}          view (fields: proxy.budget_ops)
    PUT    /admin/budgets/{name}          JSON body: any of scope, limit_usd, period,
                                          timezone, enforce, requests_per_minute,
                                          tokens_per_minute (null removes a field);
                                          201 + view when created, 200 + view when changed
    DELETE /admin/budgets/{name}          {"name", "outcome": "deleted" | "hidden", "message"}
    POST   /admin/budgets/{name}/reset    {"before": view, "after": view}
    POST   /admin/budgets/{name}/revert   {"name", "message"}

Also registered from here: ``/admin/spend`` and ``/admin/ledger`` (proxy.admin_spend),
``/admin/keys`` (proxy.admin_keys), ``/admin/openapi.json`` (proxy.admin_openapi,
describing all of them) and the ``/ui`` page (proxy.ui). Credentials are checked by
proxy.admin_auth; ``GET /admin/budgets`` and ``GET /admin/spend`` also take the /ui
session cookie.

The API is off (404 on every ``/admin/`` path) unless the config sets ``admin_token``;
each request must then carry ``Authorization: Bearer <admin_token>``, else 401. Errors
are ``{"error": {"message", "code"}}``. Changes go to the store, so every replica
applies them (see :class:`proxy.budget_specs.SpecWatcher`); the replica that served
the request applies them at once.

Register the routes before the proxy's catch-all ``/{upstream}/{path}`` route.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from proxy.admin_auth import AdminAuth, Handler, error_response, ok_response
from proxy.admin_keys import KeyRoutes, setup_admin_keys
from proxy.admin_openapi import setup_openapi
from proxy.admin_spend import setup_admin_spend
from proxy.budget import BudgetSpec
from proxy.budget_gate import BudgetGate
from proxy.budget_ops import (
    BudgetAdminError,
    delete_budget,
    list_budgets,
    load_budgets,
    reset_budget,
    revert_budget,
    set_budget,
    show_budget,
)
from proxy.errors import StoreUnavailable
from proxy.store.base import Store
from proxy.ui import setup_ui

__all__ = ["setup_admin"]

# The shared helpers live in proxy.admin_auth; these names are kept for older imports.
_error = error_response
_ok = ok_response


class _Admin:
    """The admin handlers, bound to one app's resources (no module state)."""

    def __init__(
        self,
        auth: AdminAuth,
        get_gate: Callable[[], BudgetGate | None],
        get_store: Callable[[], Store | None],
        config_specs: tuple[BudgetSpec, ...],
    ) -> None:
        self._auth = auth
        self._get_gate = get_gate
        self._get_store = get_store
        self._config_specs = config_specs

    def guarded(
        self,
        handler: Callable[[web.Request, Store], Awaitable[web.Response]],
        *,
        read_only: bool = False,
    ) -> Handler:
        """``handler`` behind the credential check (see :mod:`proxy.admin_auth`;
        ``read_only`` also accepts the /ui session), with the store and errors handled."""

        async def wrapped(request: web.Request) -> web.StreamResponse:
            store = self._get_store()
            if store is None:
                return _error(
                    503, "not_ready", "The proxy is starting or stopping; try again shortly."
                )
            try:
                return await handler(request, store)
            except BudgetAdminError as exc:
                return _error(exc.status, exc.code, exc.message)
            except StoreUnavailable as exc:
                return _error(503, "store_unavailable", exc.message)

        return self._auth.guard(wrapped, read_only=read_only)

    async def _apply_here(self, store: Store) -> None:
        """Give this replica's gate the change now, rather than at its next poll."""
        gate = self._get_gate()
        if gate is not None:
            gate.replace_specs((await load_budgets(store, self._config_specs)).specs)

    async def list_all(self, request: web.Request, store: Store) -> web.Response:
        """``GET /admin/budgets``."""
        return _ok(await list_budgets(store, self._config_specs))

    async def show(self, request: web.Request, store: Store) -> web.Response:
        """``GET /admin/budgets/{name}``."""
        return _ok(await show_budget(store, self._config_specs, request.match_info["name"]))

    async def put(self, request: web.Request, store: Store) -> web.Response:
        """``PUT /admin/budgets/{name}``: create, or change the given fields."""
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            raise BudgetAdminError(
                "The request body must be a JSON object of budget fields, such as "
                '{"limit_usd": "100", "scope": {"team": "search"}}.',
                code="invalid_json",
                status=400,
            )
        name = request.match_info["name"]
        result = await set_budget(store, self._config_specs, name, body)
        await self._apply_here(store)
        return _ok(result.view, status=201 if result.created else 200)

    async def delete(self, request: web.Request, store: Store) -> web.Response:
        """``DELETE /admin/budgets/{name}``."""
        name = request.match_info["name"]
        outcome, message = await delete_budget(store, self._config_specs, name)
        await self._apply_here(store)
        return _ok({"name": name, "outcome": outcome, "message": message})

    async def reset(self, request: web.Request, store: Store) -> web.Response:
        """``POST /admin/budgets/{name}/reset``: zero the current period's spend."""
        return _ok(await reset_budget(store, self._config_specs, request.match_info["name"]))

    async def revert(self, request: web.Request, store: Store) -> web.Response:
        """``POST /admin/budgets/{name}/revert``: back to the config entry."""
        name = request.match_info["name"]
        message = await revert_budget(store, self._config_specs, name)
        await self._apply_here(store)
        return _ok({"name": name, "message": message})

    async def unknown(self, request: web.Request, store: Store) -> web.Response:
        """Any other ``/admin/`` path or method."""
        return _error(
            404,
            "not_found",
            f"There is no admin endpoint {request.method} {request.path}; see the README "
            "for the admin API.",
        )


async def _off(request: web.Request) -> web.StreamResponse:
    return _error(
        404,
        "admin_disabled",
        "The admin API is off; set admin_token in the proxy's config to turn it on.",
    )


def setup_admin(
    app: web.Application,
    *,
    token: str | None,
    get_gate: Callable[[], BudgetGate | None],
    get_store: Callable[[], Store | None],
    config_specs: tuple[BudgetSpec, ...],
    keys: KeyRoutes | None = None,
) -> None:
    """Register the admin routes on ``app`` (before the proxy's catch-all route).

    ``token`` None turns the API off (404). ``get_gate`` and ``get_store`` return the
    running app's gate and store, or None while it starts or stops; ``config_specs``
    are the config's budgets (the base that run-time changes apply to). ``keys``
    adds ``/admin/keys`` (:mod:`proxy.admin_keys`).
    """
    router = app.router
    if token is None:
        router.add_route("*", "/admin", _off)
        router.add_route("*", "/admin/{tail:.*}", _off)
        setup_ui(app, None)
        return
    auth = AdminAuth(token)
    admin = _Admin(auth, get_gate, get_store, config_specs)
    router.add_get("/admin/budgets", admin.guarded(admin.list_all, read_only=True))
    router.add_get("/admin/budgets/{name}", admin.guarded(admin.show))
    router.add_put("/admin/budgets/{name}", admin.guarded(admin.put))
    router.add_delete("/admin/budgets/{name}", admin.guarded(admin.delete))
    router.add_post("/admin/budgets/{name}/reset", admin.guarded(admin.reset))
    router.add_post("/admin/budgets/{name}/revert", admin.guarded(admin.revert))
    setup_admin_spend(router, admin.guarded)  # /admin/spend, /admin/ledger
    if keys is not None:
        setup_admin_keys(router, admin.guarded, keys)  # /admin/keys
    setup_openapi(router, auth)  # /admin/openapi.json
    setup_ui(app, auth)  # /ui
    router.add_route("*", "/admin", admin.guarded(admin.unknown))
    router.add_route("*", "/admin/{tail:.*}", admin.guarded(admin.unknown))
