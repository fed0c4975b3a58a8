"""The admin HTTP API for issued keys: the same operations as ``metergate keys``.

::

    GET    /admin/keys                 {"keys": [view...]}; ?all=1 includes revoked keys
    POST   /admin/keys                 JSON {name, team, user, tags, expires, budget_usd,
                                       period} -> 201 {"key": "mg-...", ...view,
                                       "budget_view"}: the only time the key is shown
    GET    /admin/keys/{ref}           view + "spend" (+ "budget_view")
    DELETE /admin/keys/{ref}           revoke -> view
    POST   /admin/keys/{ref}/rotate    JSON {grace} (optional) -> {"key": "mg-...", ...view}

``{ref}`` is a key id (``key_...``) or the name of an active key. Views and their
fields: :meth:`proxy.keys.IssuedKey.view`; the operations: :mod:`proxy.key_ops`. The
routes sit behind the admin token like every ``/admin/`` route (:mod:`proxy.admin`);
answers that carry a key are sent with ``Cache-Control: no-store``. A change is applied
on the replica that made it at once, and on the others within about a second.
The OpenAPI fragment (``OPENAPI_PATHS``, ``OPENAPI_SCHEMAS``) is in
:mod:`proxy.admin_keys_openapi`, re-exported here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from proxy.admin_auth import Handler, ok_response
from proxy.admin_keys_openapi import OPENAPI_PATHS, OPENAPI_SCHEMAS
from proxy.errors import StoreUnavailable
from proxy.key_ops import (
    KeyAdminError,
    KeyConfig,
    create_key,
    list_keys,
    revoke_key,
    rotate_key,
    show_key,
)
from proxy.key_watcher import IssuedKeys
from proxy.store.base import Store

__all__ = ["OPENAPI_PATHS", "OPENAPI_SCHEMAS", "KeyRoutes", "setup_admin_keys"]

StoreHandler = Callable[[web.Request, Store], Awaitable[web.Response]]
Guard = Callable[..., Handler]  # proxy.admin._Admin.guarded(handler, read_only=...)


@dataclass(frozen=True, slots=True)
class KeyRoutes:
    """What the key routes need: the key configuration, and this replica's key table
    (None while the app starts or stops), to apply a change here at once."""

    config: KeyConfig
    get_keys: Callable[[], IssuedKeys | None] = lambda: None


def _secret_response(body: Any, status: int) -> web.Response:
    """An answer that carries a key: never stored by a cache or a browser."""
    return web.json_response(
        body,
        status=status,
        headers={"Cache-Control": "no-store"},
        dumps=lambda v: orjson.dumps(v).decode(),
    )


async def _json_object(request: web.Request, *, optional: bool) -> dict[str, Any]:
    raw = await request.read()
    if optional and not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        raise KeyAdminError(
            'The request body must be a JSON object, such as {"name": "app-a", "team": "search"}.',
            code="invalid_json",
            status=400,
        )
    return body


class _KeyHandlers:
    def __init__(self, routes: KeyRoutes) -> None:
        self._cfg = routes.config
        self._get_keys = routes.get_keys

    async def _apply_here(self) -> None:
        """Give this replica's key table the change now, rather than at its next poll."""
        keys = self._get_keys()
        if keys is not None:
            with contextlib.suppress(StoreUnavailable, TimeoutError):
                await keys.refresh()

    async def list_all(self, request: web.Request, store: Store) -> web.Response:
        """``GET /admin/keys``."""
        include = request.query.get("all", "").lower() in ("1", "true", "yes")
        return ok_response({"keys": await list_keys(store, include_revoked=include)})

    async def create(self, request: web.Request, store: Store) -> web.Response:
        """``POST /admin/keys``: issue a key; the answer holds it, once."""
        body = await _json_object(request, optional=False)
        issued = await create_key(store, self._cfg, body)
        await self._apply_here()
        return _secret_response(issued.view(issued.key.created_ms), 201)

    async def show(self, request: web.Request, store: Store) -> web.Response:
        """``GET /admin/keys/{ref}``: the view with spend so far."""
        return ok_response(await show_key(store, self._cfg, request.match_info["ref"]))

    async def revoke(self, request: web.Request, store: Store) -> web.Response:
        """``DELETE /admin/keys/{ref}``."""
        key = await revoke_key(store, request.match_info["ref"])
        await self._apply_here()
        assert key.revoked_ms is not None
        return ok_response(key.view(key.revoked_ms))

    async def rotate(self, request: web.Request, store: Store) -> web.Response:
        """``POST /admin/keys/{ref}/rotate``: a new value; the answer holds it, once."""
        body = await _json_object(request, optional=True)
        unknown = sorted(set(body) - {"grace"})
        if unknown:
            raise KeyAdminError(
                f"{unknown[0]}: unknown field; the only field is grace (a duration).",
                code="invalid_key",
                status=400,
            )
        issued = await rotate_key(store, self._cfg, request.match_info["ref"], body.get("grace"))
        await self._apply_here()
        assert issued.key.rotated_ms is not None
        return _secret_response(issued.view(issued.key.rotated_ms), 200)


def setup_admin_keys(router: web.UrlDispatcher, guard: Guard, routes: KeyRoutes) -> None:
    """Register the ``/admin/keys`` routes (before the admin catch-all route)."""
    h = _KeyHandlers(routes)
    router.add_get("/admin/keys", guard(h.list_all))
    router.add_post("/admin/keys", guard(h.create))
    router.add_get("/admin/keys/{ref}", guard(h.show))
    router.add_delete("/admin/keys/{ref}", guard(h.revoke))
    router.add_post("/admin/keys/{ref}/rotate", guard(h.rotate))
