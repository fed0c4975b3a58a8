"""Metergate keys issued at run time: their format, their salted digest, their record.

A key is ``mg-`` followed by 43 URL-safe characters (32 random bytes). It is shown
once, when it is created or rotated, and never stored: the store keeps an
HMAC-SHA256 of it under the server's ``key_secret`` (:class:`KeyHasher`), so a copy
of the store (a backup, a Redis dump, a curious operator) does not let anyone call
the proxy, and the digests cannot be brute-forced offline without the secret either.

An issued key has a short, non-secret id (``key_`` + 16 hex digits) by which it is
listed, shown, rotated and revoked, and a display prefix (``mg-`` and 6 characters
of the key) that helps a person tell keys apart in a listing: 36 of the key's 256
random bits, not enough to matter.

The record (:class:`IssuedKey`) names the caller (key name, team, user, tags, as a
config ``keys:`` entry does) and holds the key's life: created, expires, rotated,
revoked, in epoch milliseconds of the clock of whoever wrote them (a replica checks
expiry with its own clock; seconds of skew do not matter for expiries of days).
Rotating gives the same record a new value; the previous value's digest is kept,
with the moment it stops working (at once, or after a grace period), so that a
caller still using it is told it was rotated rather than that it is unknown.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from typing import Any, Final, Literal

__all__ = [
    "KEY_ID_PREFIX",
    "KEY_PREFIX",
    "IssuedKey",
    "KeyHasher",
    "KeyState",
    "display_prefix",
    "iso_ms",
    "new_key",
    "new_key_id",
]

KEY_PREFIX: Final = "mg-"
KEY_BYTES: Final = 32
KEY_ID_PREFIX: Final = "key_"
SHOWN_CHARS: Final = 6
"""Characters of the key after ``mg-`` that listings show."""

_SECRET_ID_LABEL: Final = b"metergate-key-secret-id-v1"

KeyState = Literal["active", "expired", "revoked"]


def new_key() -> str:
    """A fresh key value: ``mg-`` and 32 random bytes, URL-safe base64 (43 characters)."""
    return KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)


def new_key_id() -> str:
    """A fresh key id: ``key_`` and 16 hex digits (not secret; 64 random bits make a
    collision between two keys of one deployment practically impossible)."""
    return KEY_ID_PREFIX + secrets.token_hex(8)


def display_prefix(key: str) -> str:
    """What listings show of a key: its first characters, then ``...``."""
    return key[: len(KEY_PREFIX) + SHOWN_CHARS] + "..."


def iso_ms(ms: int | None) -> str | None:
    """Epoch milliseconds as an ISO 8601 UTC time (None stays None)."""
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


class KeyHasher:
    """The salted digest keys are stored and looked up by: HMAC-SHA256 under the
    server's ``key_secret``.

    ``secret_id`` names the secret without revealing it (an HMAC of a fixed label,
    which no key can equal because keys start with ``mg-``): records carry the id of
    the secret they were made with, so a replica started with another secret can say
    so instead of refusing every issued key as unknown.
    """

    __slots__ = ("_secret", "secret_id")

    def __init__(self, secret: str) -> None:
        if not secret:
            raise ValueError("The key secret must not be empty.")
        self._secret = secret.encode("utf-8")
        self.secret_id = hmac.new(self._secret, _SECRET_ID_LABEL, hashlib.sha256).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"KeyHasher(secret_id={self.secret_id!r})"

    def digest(self, key: str) -> bytes:
        """The 32-byte digest of ``key``."""
        return hmac.new(self._secret, key.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()


def _opt_int(doc: dict[str, Any], name: str) -> int | None:
    value = doc.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer of epoch milliseconds")
    return value


def _opt_str(doc: dict[str, Any], name: str) -> str | None:
    value = doc.get(name)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{name} must be a string")
    return value


def _hex_digest(doc: dict[str, Any], name: str, *, required: bool) -> str | None:
    value = _opt_str(doc, name)
    if value is None:
        if required:
            raise ValueError(f"{name} is missing")
        return None
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ValueError(f"{name} must be 64 lowercase hex digits")
    return value


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """One issued key as stored: who it names and its life. Never the key itself.

    ``digest`` and ``previous_digest`` are hex HMACs (:class:`KeyHasher`); they are
    not secrets, but they never leave the store and this process either (views omit
    them). ``previous_until_ms`` is when the value replaced by the last rotation
    stops working. ``budget`` names the budget created with the key, if any. ``rev``
    is the store's revision of the record (compare-and-set for updates).
    """

    id: str
    name: str
    digest: str
    secret_id: str
    prefix: str
    created_ms: int
    team: str | None = None
    user: str | None = None
    tags: tuple[str, ...] = ()
    expires_ms: int | None = None
    revoked_ms: int | None = None
    rotated_ms: int | None = None
    previous_digest: str | None = None
    previous_until_ms: int | None = None
    budget: str | None = None
    rev: int = 0

    def to_doc(self) -> dict[str, Any]:
        """The JSON document the store keeps (``rev`` is kept by the store itself)."""
        doc = asdict(self)
        doc["tags"] = list(self.tags)
        del doc["id"], doc["rev"]
        return doc

    @classmethod
    def from_doc(cls, key_id: str, doc: dict[str, Any]) -> IssuedKey:
        """Parse a stored document; ValueError says what is wrong with it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)}")
        name = _opt_str(doc, "name")
        secret_id = _opt_str(doc, "secret_id")
        prefix = _opt_str(doc, "prefix")
        created = _opt_int(doc, "created_ms")
        if not name or not secret_id or prefix is None or created is None:
            raise ValueError("name, secret_id, prefix and created_ms are required")
        tags = doc.get("tags") or []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ValueError("tags must be a list of strings")
        digest = _hex_digest(doc, "digest", required=True)
        assert digest is not None
        rev = doc.get("rev", 0)
        return cls(
            id=key_id,
            name=name,
            digest=digest,
            secret_id=secret_id,
            prefix=prefix,
            created_ms=created,
            team=_opt_str(doc, "team"),
            user=_opt_str(doc, "user"),
            tags=tuple(tags),
            expires_ms=_opt_int(doc, "expires_ms"),
            revoked_ms=_opt_int(doc, "revoked_ms"),
            rotated_ms=_opt_int(doc, "rotated_ms"),
            previous_digest=_hex_digest(doc, "previous_digest", required=False),
            previous_until_ms=_opt_int(doc, "previous_until_ms"),
            budget=_opt_str(doc, "budget"),
            rev=rev if isinstance(rev, int) and not isinstance(rev, bool) else 0,
        )

    def state(self, now_ms: int) -> KeyState:
        """``revoked`` beats ``expired`` beats ``active``."""
        if self.revoked_ms is not None:
            return "revoked"
        if self.expires_ms is not None and now_ms >= self.expires_ms:
            return "expired"
        return "active"

    def view(self, now_ms: int) -> dict[str, Any]:
        """The public JSON view (CLI ``--json``, admin API): no key, no digest."""
        previous_until = self.previous_until_ms
        return {
            "id": self.id,
            "name": self.name,
            "team": self.team,
            "user": self.user,
            "tags": list(self.tags),
            "prefix": self.prefix,
            "state": self.state(now_ms),
            "created_at": iso_ms(self.created_ms),
            "expires_at": iso_ms(self.expires_ms),
            "rotated_at": iso_ms(self.rotated_ms),
            "previous_valid_until": (
                iso_ms(previous_until)
                if previous_until is not None and previous_until > now_ms
                else None
            ),
            "revoked_at": iso_ms(self.revoked_ms),
            "budget": self.budget,
        }
