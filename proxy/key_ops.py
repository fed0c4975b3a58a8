"""Issued-key administration shared by ``metergate keys`` and the admin API.

Every operation works on the store named in the config directly, so it works whether
or not a proxy runs; every replica on that store applies the result within about a
second (:mod:`proxy.key_watcher`). A key's value exists only in the result of
:func:`create_key` and :func:`rotate_key` (:class:`Issued`); everything else sees the
view of :meth:`proxy.keys.IssuedKey.view`, which has no key and no digest.

A key is named in commands by its id (``key_...``) or by the name of its active key.
A key created with ``budget_usd`` gets a budget scoped to its name (``key-<name>``),
made through :func:`proxy.budget_ops.set_budget` like any run-time budget.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

from proxy.budget import BudgetConfigError, BudgetSpec
from proxy.budget_ops import BudgetAdminError, set_budget, show_budget
from proxy.budget_specs import apply_changes
from proxy.errors import StoreUnavailable
from proxy.keys import (
    KEY_ID_PREFIX,
    IssuedKey,
    KeyHasher,
    display_prefix,
    iso_ms,
    new_key,
    new_key_id,
)
from proxy.report import nanos_to_usd_str
from proxy.settings import Settings
from proxy.store.base import Store

__all__ = [
    "MAX_EXPIRES_MS",
    "MAX_GRACE_MS",
    "NEW_KEY_FIELDS",
    "Issued",
    "KeyAdminError",
    "KeyConfig",
    "create_key",
    "find_key",
    "list_keys",
    "parse_duration",
    "revoke_key",
    "rotate_key",
    "show_key",
]

NEW_KEY_FIELDS: Final = ("name", "team", "user", "tags", "expires", "budget_usd", "period")
_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,59}$")
_TAG_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/=-]{0,63}$")
_DURATION_RE: Final = re.compile(r"^(\d{1,6})([smhdw])$")
_UNIT_MS: Final = {"s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_MAX_TAGS: Final = 16
MAX_EXPIRES_MS: Final = 3_660 * 86_400_000
"""The longest ``expires``: about ten years (an expiry is a promise to rotate)."""
MAX_GRACE_MS: Final = 30 * 86_400_000
"""The longest rotation ``grace``: 30 days."""
_RETRIES: Final = 5  # compare-and-set attempts before giving up on a busy record


class KeyAdminError(BudgetAdminError):
    """A key operation that cannot be done; ``code`` and ``status`` are what the admin
    API answers (the CLI prints the message). A :class:`BudgetAdminError`, so the
    admin API's error handling covers both."""


@dataclass(frozen=True, slots=True)
class KeyConfig:
    """What key operations need from the config: the secret, the names of config keys
    (an issued key may not take one), and the config budgets (for key budgets)."""

    secret: str | None
    config_key_names: frozenset[str] = frozenset()
    config_budgets: tuple[BudgetSpec, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyConfig:
        """The key configuration of ``settings``."""
        return cls(settings.key_secret, frozenset(k.name for k in settings.keys), settings.budgets)

    def hasher(self) -> KeyHasher:
        """The digest keys are stored by; refuses when no secret is configured."""
        if not self.secret:
            raise KeyAdminError(
                "Issuing keys needs key_secret in the config (at least 32 characters, e.g. "
                "key_secret: ${METERGATE_KEY_SECRET}), the same on every replica and the CLI.",
                code="key_secret_missing",
                status=409,
            )
        return KeyHasher(self.secret)


@dataclass(frozen=True, slots=True)
class Issued:
    """A key just created or rotated: the record, the key value (shown this once) and
    the view of the key's budget, if one was set."""

    key: IssuedKey
    value: str
    budget: dict[str, Any] | None = None

    def view(self, now_ms: int) -> dict[str, Any]:
        """The one view that holds the key itself."""
        return {"key": self.value, **self.key.view(now_ms), "budget_view": self.budget}


def _bad(message: str, code: str = "invalid_key") -> KeyAdminError:
    return KeyAdminError(message, code=code, status=400)


def parse_duration(text: Any, field: str, max_ms: int) -> int:
    """``30m``, ``12h``, ``90d``, ``2w`` (units s, m, h, d, w) in milliseconds, from 1 s
    to ``max_ms``."""
    match = _DURATION_RE.match(text.strip()) if isinstance(text, str) else None
    if not match or int(match.group(1)) == 0:
        raise _bad(f"{field}: write a duration like 90d, 12h or 30m, not {text!r}.")
    ms = int(match.group(1)) * _UNIT_MS[match.group(2)]
    if ms > max_ms:
        raise _bad(f"{field}: at most {max_ms // 86_400_000} days.")
    return ms


def _opt_text(body: Mapping[str, Any], field: str) -> str | None:
    value = body.get(field)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > 128 or not value.isprintable():
        raise _bad(f"{field}: must be text of at most 128 printable characters.")
    return value


def _tags(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise _bad('tags: must be a list of strings, like ["batch", "eval"].')
    if len(value) > _MAX_TAGS or not all(_TAG_RE.match(t) for t in value):
        raise _bad(f"tags: at most {_MAX_TAGS} tags of at most 64 letters, digits and _ . : / = -.")
    return tuple(dict.fromkeys(value))


def _budget_changes(name: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
    """The budget to set with a new key, validated now, before the key exists."""
    limit, period = body.get("budget_usd"), body.get("period")
    if limit is None:
        if period is not None:
            raise _bad("period: give budget_usd too; the period is the budget's.")
        return None
    changes = {"scope": {"key": name}, "limit_usd": limit, "period": period or "month"}
    try:
        apply_changes(f"key-{name}", None, changes)
    except BudgetConfigError as exc:
        raise _bad(f"The key's budget is not valid: {exc}", code="invalid_budget") from None
    return changes


async def _records(store: Store) -> list[IssuedKey]:
    out: list[IssuedKey] = []
    for key_id, doc in (await store.api_keys()).items():
        try:
            out.append(IssuedKey.from_doc(key_id, doc))
        except ValueError:
            continue  # the watcher logs it; an admin listing shows what is usable
    out.sort(key=lambda k: (k.created_ms, k.id))
    return out


def _now_ms(now_ms: int | None) -> int:
    return time.time_ns() // 1_000_000 if now_ms is None else now_ms


async def create_key(
    store: Store, cfg: KeyConfig, body: Mapping[str, Any], now_ms: int | None = None
) -> Issued:
    """Issue a key from ``body`` (fields :data:`NEW_KEY_FIELDS`: ``name`` required;
    ``expires`` a duration; ``budget_usd`` and ``period`` make a key budget)."""
    hasher = cfg.hasher()
    unknown = sorted(set(body) - set(NEW_KEY_FIELDS))
    if unknown:
        raise _bad(f"{unknown[0]}: unknown field; the fields are {', '.join(NEW_KEY_FIELDS)}.")
    name = body.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise _bad("name: required; 1 to 60 letters, digits, '-', '_' or '.'.")
    if name in cfg.config_key_names:
        raise KeyAdminError(
            f"The name {name!r} belongs to a key in the config file; choose another name.",
            code="name_taken",
            status=409,
        )
    now = _now_ms(now_ms)
    expires = body.get("expires")
    budget = _budget_changes(name, body)
    value = new_key()
    record = IssuedKey(
        id=new_key_id(),
        name=name,
        digest=hasher.digest(value).hex(),
        secret_id=hasher.secret_id,
        prefix=display_prefix(value),
        created_ms=now,
        team=_opt_text(body, "team"),
        user=_opt_text(body, "user"),
        tags=_tags(body.get("tags")),
        expires_ms=None
        if expires is None
        else now + parse_duration(expires, "expires", MAX_EXPIRES_MS),
        budget=None if budget is None else f"key-{name}",
    )
    if not await store.create_api_key(record.id, record.to_doc()):
        raise KeyAdminError(
            f"An active key is already named {name!r}; revoke it first, or choose another name.",
            code="name_taken",
            status=409,
        )
    record = replace(record, rev=1)
    if budget is None:
        return Issued(record, value)
    try:
        result = await set_budget(store, cfg.config_budgets, f"key-{name}", budget)
    except (BudgetAdminError, StoreUnavailable):
        # Without its budget the key must not exist: its value was never shown. (When
        # the store is down this fails too; the key is then unusable all the same.)
        with contextlib.suppress(StoreUnavailable):
            await store.update_api_key(
                record.id, replace(record, revoked_ms=now).to_doc(), rev=1, active=False
            )
        raise
    return Issued(record, value, result.view)


async def list_keys(
    store: Store, *, include_revoked: bool = False, now_ms: int | None = None
) -> list[dict[str, Any]]:
    """Views of the issued keys, oldest first; revoked ones only when asked."""
    now = _now_ms(now_ms)
    return [
        key.view(now) for key in await _records(store) if include_revoked or key.revoked_ms is None
    ]


async def find_key(store: Store, ref: str, *, active_only: bool = False) -> IssuedKey:
    """The key with id ``ref``, else the active key named ``ref``, else (unless
    ``active_only``) the latest revoked key of that name."""
    records = await _records(store)
    if ref.startswith(KEY_ID_PREFIX):
        for key in records:
            if key.id == ref:
                if active_only and key.revoked_ms is not None:
                    raise KeyAdminError(
                        f"The key {ref} is already revoked.", code="key_revoked", status=409
                    )
                return key
    named = [k for k in records if k.name == ref]
    live = [k for k in named if k.revoked_ms is None]
    if live:
        return live[-1]
    if named and not active_only:
        return named[-1]
    raise KeyAdminError(
        f"There is no {'active ' if active_only else ''}key with the id or name {ref!r}; "
        "`metergate keys list --all` shows them all.",
        code="not_found",
        status=404,
    )


async def show_key(
    store: Store, cfg: KeyConfig, ref: str, now_ms: int | None = None
) -> dict[str, Any]:
    """The key's view, with ``spend``: requests and cost charged to its name from its
    creation until now (or its revocation), and ``budget_view`` when it has a budget."""
    key = await find_key(store, ref)
    now = _now_ms(now_ms)
    rows = await store.report(["key"], key.created_ms, key.revoked_ms)
    row = next((r for r in rows if r.group == (key.name,)), None)
    cost = row.cost_nanos if row else 0
    view = key.view(now)
    view["spend"] = {
        "since": iso_ms(key.created_ms),
        "until": iso_ms(key.revoked_ms),
        "requests": row.requests if row else 0,
        "cost_usd": nanos_to_usd_str(cost),
        "cost_nanos": cost,
    }
    view["budget_view"] = None
    if key.budget is not None:
        try:
            view["budget_view"] = await show_budget(store, cfg.config_budgets, key.budget)
        except BudgetAdminError:
            pass  # the budget was deleted since: the key simply has none now
    return view


async def _update(
    store: Store, ref: str, change: Any, *, active: bool
) -> tuple[IssuedKey, IssuedKey]:
    """Apply ``change(record) -> new record`` with compare-and-set, retrying when
    another writer got there first. Returns (before, after)."""
    for _ in range(_RETRIES):
        key = await find_key(store, ref, active_only=True)
        new = change(key)
        if await store.update_api_key(key.id, new.to_doc(), rev=key.rev, active=active):
            return key, replace(new, rev=key.rev + 1)
    raise KeyAdminError(
        f"The key {ref!r} is being changed by someone else right now; try again.",
        code="conflict",
        status=409,
    )


async def rotate_key(
    store: Store,
    cfg: KeyConfig,
    ref: str,
    grace: str | None = None,
    now_ms: int | None = None,
) -> Issued:
    """Give the key a new value; the old one stops working now, or after ``grace``
    (a duration). Same id, name, caller and budget."""
    hasher = cfg.hasher()
    now = _now_ms(now_ms)
    grace_ms = 0 if grace is None else parse_duration(grace, "grace", MAX_GRACE_MS)
    value = new_key()

    def change(key: IssuedKey) -> IssuedKey:
        if key.state(now) == "expired":
            raise KeyAdminError(
                f"The key {key.id} ({key.name}) has expired; revoke it and create a new one.",
                code="key_expired",
                status=409,
            )
        return replace(
            key,
            digest=hasher.digest(value).hex(),
            secret_id=hasher.secret_id,
            prefix=display_prefix(value),
            rotated_ms=now,
            previous_digest=key.digest,
            previous_until_ms=now + grace_ms,
        )

    _, after = await _update(store, ref, change, active=True)
    return Issued(after, value)


async def revoke_key(store: Store, ref: str, now_ms: int | None = None) -> IssuedKey:
    """Revoke the key (and a rotated-out value still in its grace period) for good;
    its name is free for a new key. Its budget and ledger records stay."""
    now = _now_ms(now_ms)
    _, after = await _update(store, ref, lambda k: replace(k, revoked_ms=now), active=False)
    return after


def describe(views: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """Rows for a table of key views (CLI ``list``)."""
    return [
        [
            v["id"],
            v["name"],
            v["team"] or "-",
            v["user"] or "-",
            v["prefix"],
            v["state"],
            v["created_at"] or "-",
            v["expires_at"] or "-",
            v["budget"] or "-",
        ]
        for v in views
    ]
