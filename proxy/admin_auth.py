"""Who may call the admin API, and how: the admin token, and the ``/ui`` session cookie.

Two credentials are accepted:

- ``Authorization: Bearer <admin_token>``: every ``/admin/`` endpoint.
- The ``/ui`` session cookie (:data:`SESSION_COOKIE`), set by ``POST /ui/login`` after
  the browser posted the admin token. Only the read-only endpoints the page itself
  uses accept it (``GET /admin/spend``, ``GET /admin/budgets``), so a stolen cookie
  can read spend but never change a budget, and it expires (:data:`SESSION_TTL_S`).

The cookie holds ``<issued epoch seconds>.<HMAC-SHA256(key=derived, issued)>`` where
the key is itself an HMAC of the admin token under a fixed label: never the token, and
nothing from which the token can be recovered. Being derived from the token alone, a
session made on one replica is valid on every replica with the same config, and
changing the admin token ends every session. Cookie flags: ``HttpOnly`` (no script can
read it), ``SameSite=Strict`` (no cross-site request carries it, which also stops
CSRF), ``Secure`` when the request came over TLS, ``Path=/``.

Errors are ``{"error": {"message", "code"}}``: see :func:`error_response`.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import orjson
from aiohttp import web

__all__ = [
    "SESSION_COOKIE",
    "SESSION_TTL_S",
    "AdminAuth",
    "Handler",
    "error_response",
    "ok_response",
]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SESSION_COOKIE: Final = "metergate_ui"
"""The name of the ``/ui`` session cookie."""

SESSION_TTL_S: Final = 12 * 3600
"""How long a ``/ui`` session lasts: a working day, then the token is asked again."""

_SESSION_LABEL: Final = b"metergate-ui-session-v1"


def error_response(status: int, code: str, message: str, **headers: str) -> web.Response:
    """An admin API error: ``{"error": {"message", "code"}}`` with ``status``."""
    return web.json_response(
        {"error": {"message": message, "code": code}},
        status=status,
        headers=headers or None,
        dumps=lambda v: orjson.dumps(v).decode(),
    )


def ok_response(body: Any, status: int = 200) -> web.Response:
    """An admin API answer: ``body`` as JSON (orjson, so ints stay exact)."""
    return web.json_response(body, status=status, dumps=lambda v: orjson.dumps(v).decode())


def unauthorized(read_only: bool) -> web.Response:
    """The 401 answer, saying which credentials would have worked."""
    also = " (or the /ui session cookie)" if read_only else ""
    return error_response(
        401,
        "unauthorized",
        "The admin API needs the header 'Authorization: Bearer <admin_token>' with the "
        f"admin_token from the proxy's config{also}.",
        **{"WWW-Authenticate": 'Bearer realm="metergate-admin"'},
    )


class AdminAuth:
    """Checks admin credentials for one app; built from the config's admin token.

    ``clock`` returns epoch seconds (injected so that tests need not wait 12 hours).
    """

    def __init__(self, token: str, *, clock: Callable[[], float] = time.time) -> None:
        if not token:
            raise ValueError(
                "The admin token must not be empty; leave it unset to turn the API off."
            )
        self._token = token.encode()
        # A key of its own for sessions, so the cookie's MAC is never keyed by the token.
        self._session_key = hmac.new(self._token, _SESSION_LABEL, hashlib.sha256).digest()
        self._clock = clock

    def token_matches(self, given: str) -> bool:
        """Whether ``given`` is the admin token, in constant time (so the token cannot be
        guessed byte by byte from response timings)."""
        return hmac.compare_digest(given.strip().encode(), self._token)

    def bearer_ok(self, request: web.Request) -> bool:
        """Whether the request carries ``Authorization: Bearer <admin_token>``."""
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and self.token_matches(given)

    def _mac(self, issued: str) -> str:
        return hmac.new(self._session_key, issued.encode(), hashlib.sha256).hexdigest()

    def new_session(self) -> str:
        """A fresh session cookie value: ``<issued>.<mac>``."""
        issued = str(int(self._clock()))
        return f"{issued}.{self._mac(issued)}"

    def session_ok(self, request: web.Request) -> bool:
        """Whether the request carries a valid, unexpired ``/ui`` session cookie."""
        value = request.cookies.get(SESSION_COOKIE, "")
        issued, _, mac = value.partition(".")
        if not (0 < len(issued) <= 12 and issued.isascii() and issued.isdigit()):
            return False
        if not hmac.compare_digest(mac.encode(), self._mac(issued).encode()):
            return False
        age = self._clock() - int(issued)
        return -60 <= age < SESSION_TTL_S  # a minute of clock skew between replicas

    def set_session_cookie(self, request: web.Request, response: web.StreamResponse) -> None:
        """Start a session: set the cookie on ``response`` (flags in the module doc)."""
        response.set_cookie(
            SESSION_COOKIE,
            self.new_session(),
            max_age=SESSION_TTL_S,
            path="/",
            httponly=True,
            samesite="Strict",
            secure=request.secure,
        )

    @staticmethod
    def clear_session_cookie(response: web.StreamResponse) -> None:
        """End a session in this browser."""
        response.del_cookie(SESSION_COOKIE, path="/")

    def allowed(self, request: web.Request, *, read_only: bool) -> bool:
        """The bearer token always; the session cookie only for a read-only GET."""
        if self.bearer_ok(request):
            return True
        return read_only and request.method in ("GET", "HEAD") and self.session_ok(request)

    def guard(self, handler: Handler, *, read_only: bool = False) -> Handler:
        """``handler`` behind the credential check (401 with the error shape)."""

        async def wrapped(request: web.Request) -> web.StreamResponse:
            if not self.allowed(request, read_only=read_only):
                return unauthorized(read_only)
            return await handler(request)

        return wrapped
