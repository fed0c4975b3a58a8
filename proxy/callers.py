"""Who is calling: keys to callers, and the cost-attribution tags they send.

A caller presents a key the way its SDK does: ``Authorization: Bearer KEY`` (both the
OpenAI and the Anthropic SDK) or ``x-api-key: KEY``. A key the proxy knows names a
caller and is replaced by the upstream's real key, so apps never hold provider keys.
With ``passthrough_keys`` on, an unknown key is taken for the caller's own provider key:
it is forwarded, and the caller is known only by a hash of it.

Keys are looked up by their SHA-256 digest, never compared as strings, so the lookup
time does not depend on how much of a guessed key is right. Keys issued at run time
(``metergate keys create``) are looked up the same way, by an HMAC under the server's
secret, in each replica's copy of the store's key table (:mod:`proxy.key_watcher`).
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from proxy.errors import BadRequest, Unauthorized
from proxy.settings import KeySettings

_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/=-]*$")


@dataclass(frozen=True, slots=True)
class Caller:
    """The identity a request is charged to."""

    key_name: str
    team: str | None = None
    user: str | None = None
    tags: tuple[str, ...] = ()
    passthrough: bool = False


@functools.lru_cache(maxsize=1024)
def key_digest(key: str) -> bytes:
    """The digest a key is looked up by (remembered for the last 1,024 keys seen: a
    request's key is hashed once per process, not once per request)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key in ``Authorization: Bearer`` or ``x-api-key``, whichever is set.

    When both are set and differ, a Metergate key (``mg-``) wins: a client may keep a
    dummy provider key in one header while authenticating to us with the other.
    """
    bearer = None
    auth = headers.get("Authorization")
    if auth:
        scheme, _, value = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            bearer = value.strip()
    api_key = (headers.get("x-api-key") or "").strip() or None
    if bearer and api_key and bearer != api_key:
        return api_key if api_key.startswith("mg-") and not bearer.startswith("mg-") else bearer
    return bearer or api_key


class IssuedKeyLookup(Protocol):
    """Keys issued at run time (implemented by :class:`proxy.key_watcher.IssuedKeys`)."""

    def lookup(self, key: str) -> Caller | None:
        """The caller, None when unknown; raises Unauthorized for an ended key."""

    async def refresh_on_miss(self) -> bool:
        """Check the store for new keys (rate-limited); True when the table changed."""


class KeyRing:
    """Maps presented keys to callers: config keys first, then issued keys."""

    def __init__(
        self,
        keys: Iterable[KeySettings],
        *,
        passthrough: bool,
        issued: IssuedKeyLookup | None = None,
    ) -> None:
        self._by_digest: dict[bytes, Caller] = {
            key_digest(k.key): Caller(key_name=k.name, team=k.team, user=k.user, tags=k.tags)
            for k in keys
        }
        self.passthrough = passthrough
        self.issued = issued

    async def resolve(self, headers: Mapping[str, str]) -> tuple[Caller, str | None]:
        """:meth:`identify`, but an unknown ``mg-`` key first makes the issued-key table
        check the store (once, shared and rate-limited), so that a key created a moment
        ago on another replica or by the CLI works at once."""
        try:
            return self.identify(headers)
        except Unauthorized as exc:
            key = presented_key(headers)
            if (
                exc.code != Unauthorized.default_code
                or self.issued is None
                or key is None
                or not key.startswith("mg-")
            ):
                raise
            await self.issued.refresh_on_miss()
        # Looked up again whatever the check found: the poller may have loaded it meanwhile.
        return self.identify(headers)

    def identify(self, headers: Mapping[str, str]) -> tuple[Caller, str | None]:
        """The caller, and the key to send upstream (None: use the upstream's own key).

        Raises :class:`Unauthorized` for a missing key, or an unknown one when
        passthrough is off.
        """
        key = presented_key(headers)
        if key is None:
            raise Unauthorized(
                "No API key was sent. Send your Metergate key as 'Authorization: Bearer KEY' "
                "or 'x-api-key: KEY'."
            )
        digest = key_digest(key)
        caller = self._by_digest.get(digest)
        if caller is not None:
            return caller, None
        if self.issued is not None and key.startswith("mg-"):
            caller = self.issued.lookup(key)
            if caller is not None:
                return caller, None
        if self.passthrough and not key.startswith("mg-"):
            return Caller(key_name="passthrough:" + digest.hex()[:12], passthrough=True), key
        raise Unauthorized(
            "The API key is not known to this Metergate proxy. Check the key, or ask your "
            "administrator for one."
        )


def parse_tags(value: str | None, *, max_count: int, max_len: int) -> tuple[str, ...]:
    """Validate an ``X-Metergate-Tags: a,b`` header into a tuple of distinct tags."""
    if not value:
        return ()
    tags: list[str] = []
    for raw in value.split(","):
        tag = raw.strip()
        if not tag:
            continue
        if len(tag) > max_len or not _TAG_RE.match(tag):
            raise BadRequest(
                f"The tag {tag[:80]!r} in X-Metergate-Tags is not valid: tags are at most "
                f"{max_len} characters of letters, digits and _ . : / = -.",
                code="invalid_tags",
            )
        if tag not in tags:
            tags.append(tag)
        if len(tags) > max_count:
            raise BadRequest(
                f"X-Metergate-Tags has more than {max_count} tags; send at most {max_count}.",
                code="invalid_tags",
            )
    return tuple(tags)
