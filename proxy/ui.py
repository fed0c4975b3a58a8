"""``/ui``: a small read-only spend page for people without Grafana.

::

    GET  /ui                 the page when signed in, else a sign-in form
    POST /ui/login           form field ``token`` (the admin token): sets the session
                             cookie and redirects to /ui (401 + the form when wrong)
    POST /ui/logout          clears the cookie, redirects to /ui
    GET  /ui/ui.js, ui.css   the page's script and style (package data, no secrets)

The page draws spend by team and by model over time (inline SVG, drawn by
``ui.js``), the totals, and every budget with its spend, holds, limit and reset time.
It reads ``GET /admin/spend`` and ``GET /admin/budgets`` with the session cookie; see
:mod:`proxy.admin_auth` for why the cookie is not the token and can only read. The
whole page is off (404) when the config sets no ``admin_token``.

Nothing is loaded from elsewhere (the proxy may have no internet), and the headers
forbid it anyway: a Content-Security-Policy without inline script or style, framing
denied, nothing cached (the page shows spend), no referrer to other sites.
"""

from __future__ import annotations

import html
from importlib import resources
from typing import Final
from urllib.parse import urlsplit

from aiohttp import web

from proxy.admin_auth import AdminAuth, error_response

__all__ = ["SECURITY_HEADERS", "setup_ui"]

SECURITY_HEADERS: Final[dict[str, str]] = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    # Not no-referrer: with it, Chromium sends "Origin: null" on the sign-in form, which
    # the same-origin check below must refuse.
    "Referrer-Policy": "same-origin",
}

_CONTENT_TYPES: Final = {
    "html": "text/html",
    "js": "text/javascript",
    "css": "text/css",
    "svg": "image/svg+xml",
}
_ERROR_SLOT: Final = "<!--error-->"


def _load(name: str) -> str:
    return resources.files("proxy").joinpath("data", "ui", name).read_text(encoding="utf-8")


def _page(text: str, kind: str, status: int = 200) -> web.Response:
    return web.Response(
        text=text,
        status=status,
        content_type=_CONTENT_TYPES[kind],
        charset="utf-8",
        headers=SECURITY_HEADERS,
    )


def _same_origin(request: web.Request) -> bool:
    """A form post from another site is refused (SameSite already keeps the cookie
    away; this also stops a foreign page from signing the browser in or out)."""
    origin = request.headers.get("Origin")
    if origin is None or origin == "null":
        return origin is None
    return urlsplit(origin).netloc == request.host


def _see_ui() -> web.Response:
    """303 to /ui: after a form post, the browser GETs the page (no re-post on reload)."""
    return web.Response(status=303, headers={**SECURITY_HEADERS, "Location": "/ui"})


class _Ui:
    """The ``/ui`` handlers for one app."""

    def __init__(self, auth: AdminAuth) -> None:
        self._auth = auth
        self._index = _load("index.html")
        self._login = _load("login.html")
        self._static = {name: _load(name) for name in ("ui.js", "ui.css", "favicon.svg")}

    def _login_page(self, error: str | None = None, status: int = 200) -> web.Response:
        slot = "" if error is None else f'<p class="error" role="alert">{html.escape(error)}</p>'
        return _page(self._login.replace(_ERROR_SLOT, slot), "html", status)

    async def index(self, request: web.Request) -> web.StreamResponse:
        if self._auth.allowed(request, read_only=True):
            return _page(self._index, "html")
        return self._login_page()

    async def login(self, request: web.Request) -> web.StreamResponse:
        if not _same_origin(request):
            return error_response(403, "cross_origin", "Sign in from the /ui page itself.")
        form = await request.post()
        token = form.get("token")
        if not isinstance(token, str) or not self._auth.token_matches(token):
            return self._login_page("That is not the admin token.", status=401)
        response = _see_ui()
        self._auth.set_session_cookie(request, response)
        return response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        if not _same_origin(request):
            return error_response(403, "cross_origin", "Sign out from the /ui page itself.")
        response = _see_ui()
        self._auth.clear_session_cookie(response)
        return response

    async def static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        return _page(self._static[name], name.rpartition(".")[2])


async def _to_ui(request: web.Request) -> web.StreamResponse:
    return _see_ui()


async def _off(request: web.Request) -> web.StreamResponse:
    return error_response(
        404,
        "ui_disabled",
        "The /ui page is off; set admin_token in the proxy's config to turn it on.",
    )


def setup_ui(app: web.Application, auth: AdminAuth | None) -> None:
    """Register ``/ui`` (before the proxy's catch-all route); ``auth`` None: off (404)."""
    router = app.router
    if auth is None:
        router.add_route("*", "/ui", _off)
        router.add_route("*", "/ui/{tail:.*}", _off)
        return
    ui = _Ui(auth)
    router.add_get("/ui", ui.index)
    router.add_get("/ui/", _to_ui)
    router.add_post("/ui/login", ui.login)
    router.add_post("/ui/logout", ui.logout)
    router.add_get("/ui/{name:ui\\.js|ui\\.css|favicon\\.svg}", ui.static)
    # Anything else under /ui must not fall through to the proxy's /{upstream}/ route.
    router.add_route("*", "/ui/{tail:.*}", _off_path)


async def _off_path(request: web.Request) -> web.StreamResponse:
    return error_response(404, "not_found", f"There is no page {request.method} {request.path}.")
