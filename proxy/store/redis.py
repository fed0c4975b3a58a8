"""The Redis store: budgets shared by every replica, on one Redis or a Redis Cluster.

URLs (registered in :mod:`proxy.store`)::

    redis://[user:password@]host:6379/0         one server (or a Sentinel-fronted primary)
    rediss://...                                the same over TLS
    redis+cluster://host:7000                   Redis Cluster; one seed node is enough,
    rediss+cluster://host:7000                  the others are discovered

Options in the query string:

- ``namespace=mg``: the key prefix and hash tag (letters, digits, ``_.-``); give each
  deployment that shares a server its own;
- ``retention_s=3600``: how long settled ids are remembered (see
  :data:`~proxy.store.base.DEFAULT_SETTLED_RETENTION_S`);
- ``max_connections=100``: connections per process; calls beyond it wait for a free
  connection instead of failing, as redis-py alone would;
- anything else (``socket_timeout=0.5``...) goes to redis-py as it is.

A cluster is named by its own scheme rather than a ``?cluster=1`` flag because a
cluster client and a single-server client are different things: the scheme says
which one is built, and settings can validate it.

One round trip per phase. Each budget operation is one ``EVALSHA`` of a versioned Lua
script kept as package data (``lua/reserve_v1.lua``, ``lua/settle_v1.lua``,
``lua/specs_v1.lua``; their headers document the key layout); on ``NOSCRIPT`` (a
restarted or failed-over server) the same call is sent once as ``EVAL``, which also
caches the script again. Scripts read the server's ``TIME`` for expiry and rate
windows, so replica clocks never matter.

Hash slots. Every budget key carries the namespace's hash tag (``{mg}:b:...``), so all
budgets of one request, the reservation, its expiry index and its done marker sit in
one slot, and one script can check and write all of them atomically on a cluster.
The trade-off: all budget traffic of a deployment goes to the one node that owns the
slot (a "hot slot"), so a cluster adds capacity for the ledger (its own tag,
``{mg:ledger}``) and other tenants, not for budget operations. One Redis core runs
tens of thousands of these scripts per second, far above what one proxy fleet's
upstream calls need; a deployment that outgrows it can split budgets over several
namespaces (one slot each) as long as no request needs budgets from two of them.
Sharding budgets by key instead would need a cross-slot two-phase protocol and would
lose the one-step all-or-nothing check that makes the cap exact.

``open()`` does not contact Redis: a proxy starts while Redis is down and serves under
its ``on_store_error`` policy. Every redis-py failure is translated once, here, into
:class:`~proxy.errors.StoreUnavailable`.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, RedisError, ResponseError

from proxy.errors import StoreUnavailable
from proxy.ledger import LedgerRecord
from proxy.store.base import (
    BudgetState,
    RateItem,
    ReserveItem,
    ReserveResult,
    validate_reserve,
    validate_settle,
)
from proxy.store.budget_engine import SWEEP_LIMIT
from proxy.store.redis_alerts import RedisAlertMethods
from proxy.store.redis_keys import RedisKeyMethods
from proxy.store.redis_scripts import LuaScript, text
from proxy.store.redis_specs import RedisSpecMethods

__all__ = ["SCHEMES", "RedisStore"]

SCHEMES: Final = ("redis", "rediss", "redis+cluster", "rediss+cluster")
DEFAULT_NAMESPACE: Final = "mg"
# Defaults for redis-py; the URL may override them. A budget call that waits longer
# than the pipeline's own store timeout is abandoned by the pipeline anyway.
_CLIENT_DEFAULTS: Final = {"socket_connect_timeout": 2.0, "socket_timeout": 2.0}
DEFAULT_MAX_CONNECTIONS: Final = 100
_NAMESPACE_RE: Final = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_CHUNK: Final = 1_000  # ledger ids per MGET / records per script call


_RESERVE = LuaScript.load("reserve_v1.lua")
_SETTLE = LuaScript.load("settle_v1.lua")
_LEDGER = LuaScript.load("ledger_v1.lua")


class RedisStore(RedisKeyMethods, RedisAlertMethods, RedisSpecMethods):
    """Ledger, budgets, run-time budget specs (:mod:`proxy.store.redis_specs`), the
    alert outbox (:mod:`proxy.store.redis_alerts`) and issued keys
    (:mod:`proxy.store.redis_keys`) in Redis or Redis Cluster (see the module
    docstring)."""

    def __init__(
        self,
        url: str,
        *,
        cluster: bool = False,
        namespace: str = DEFAULT_NAMESPACE,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        client_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not _NAMESPACE_RE.match(namespace):
            raise ValueError(
                f"The Redis namespace {namespace!r} is not valid; use 1 to 64 letters, "
                "digits, '_', '.' or '-'."
            )
        self._url = url  # redis-py's own URL: plain redis:// or rediss://
        self.cluster = cluster
        self.namespace = namespace
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {max_connections}.")
        self.max_connections = max_connections
        self._options = {
            **_CLIENT_DEFAULTS,
            **(client_options or {}),
            "max_connections": max_connections,
        }
        self._client: aioredis.Redis | RedisCluster | None = None
        # redis-py raises MaxConnectionsError past its pool size (the cluster client has
        # no blocking pool); callers queue here instead, so a burst waits, not fails.
        self._slots = asyncio.Semaphore(max_connections)
        # The cluster client learns the slot map lazily, on its first command. redis-py
        # 8.1 breaks connections that concurrent callers are opening meanwhile
        # (AttributeError on a closed writer), so one caller initialises it while the
        # others wait, at start and again after any failure.
        self._cluster_ready = False
        self._init_lock = asyncio.Lock()
        tag = "{" + namespace + "}"
        self._budget_prefix = f"{tag}:b:"
        self._rate_prefix = f"{tag}:q:"
        self._res_prefix = f"{tag}:r:"
        self._done_prefix = f"{tag}:d:"
        self._expiry_key = f"{tag}:rx"
        ledger_tag = "{" + namespace + ":ledger}"
        self._record_prefix = f"{ledger_tag}:l:"
        self._ledger_index = f"{ledger_tag}:lt"

    @classmethod
    def from_url(cls, url: str) -> RedisStore:
        """Build from a ``redis://``, ``rediss://``, ``redis+cluster://`` or
        ``rediss+cluster://`` URL (see the module docstring for the options)."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in SCHEMES:
            raise ValueError(
                f"The Redis store handles {', '.join(s + '://' for s in SCHEMES)} URLs, "
                f"not {scheme}://."
            )
        if not parts.hostname:
            raise ValueError(
                f"The Redis URL for {scheme}:// names no host; write it like "
                f"{scheme}://localhost:6379."
            )
        try:
            options = dict(parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True))
        except ValueError as exc:
            raise ValueError(f"Cannot parse the options of the {scheme}:// store URL.") from exc
        namespace = options.pop("namespace", DEFAULT_NAMESPACE)
        retention = options.pop("retention_s", None)
        connections = options.pop("max_connections", str(DEFAULT_MAX_CONNECTIONS))
        if not connections.isdigit():
            raise ValueError(
                f"The Redis URL option max_connections={connections!r} is not a whole number."
            )
        cluster = scheme.endswith("+cluster")
        plain = urlunsplit(
            (scheme.removesuffix("+cluster"), parts.netloc, parts.path, urlencode(options), "")
        )
        store = cls(plain, cluster=cluster, namespace=namespace, max_connections=int(connections))
        if retention is not None:
            try:
                store.settled_retention_s = float(retention)
            except ValueError:
                raise ValueError(
                    f"The Redis URL option retention_s={retention!r} is not a number of seconds."
                ) from None
            if not store.settled_retention_s > 0:
                raise ValueError("The Redis URL option retention_s must be positive.")
        return store

    # -- plumbing ----------------------------------------------------------------------

    async def open(self) -> None:
        """Build the client. No connection is made until the first call."""
        if self._client is not None:
            raise RuntimeError("The Redis store is already open.")
        if self.cluster:
            self._client = RedisCluster.from_url(self._url, **self._options)
        else:
            self._client = aioredis.Redis.from_url(self._url, **self._options)

    async def close(self) -> None:
        """Close every connection; further calls raise RuntimeError."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def _where(self) -> str:
        # Never the URL itself: it may carry a password.
        parts = urlsplit(self._url)
        kind = "Redis Cluster" if self.cluster else "Redis"
        return f"{kind} at {parts.hostname}:{parts.port or 6379}"

    async def _command(self, *args: Any) -> Any:
        client = self._client
        if client is None:
            raise RuntimeError("The Redis store is not open; call `await store.open()` first.")
        try:
            if isinstance(client, RedisCluster) and not self._cluster_ready:
                async with self._init_lock:
                    if not self._cluster_ready:
                        await client.initialize()
                        self._cluster_ready = True
            async with self._slots:
                return await client.execute_command(*args)
        except RedisError as exc:
            if not isinstance(exc, ResponseError):
                self._cluster_ready = False  # the topology may have changed
            raise StoreUnavailable(
                f"The {self._where()} failed: {type(exc).__name__}: {exc}. Check that "
                "Redis is running and reachable from this host."
            ) from exc

    async def _eval(self, script: LuaScript, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """EVALSHA, falling back to EVAL once when the server lost its script cache."""
        try:
            return await self._command("EVALSHA", script.sha, len(keys), *keys, *args)
        except StoreUnavailable as exc:
            if not isinstance(exc.__cause__, NoScriptError):
                raise
        return await self._command("EVAL", script.source, len(keys), *keys, *args)

    # -- ledger ------------------------------------------------------------------------

    async def append_ledger(self, records: Sequence[LedgerRecord]) -> None:
        """Store records in one script call per chunk; a known id is left untouched."""
        for start in range(0, len(records), _CHUNK):
            chunk = records[start : start + _CHUNK]
            keys = [self._ledger_index, *(self._record_prefix + r.id for r in chunk)]
            args: list[Any] = []
            for record in chunk:
                args += [record.id, record.ts_ms]
            args += [orjson.dumps(record.to_dict()) for record in chunk]
            await self._eval(_LEDGER, keys, args)

    async def get_ledger_record(self, request_id: str) -> LedgerRecord | None:
        """The record with this request id, or None."""
        raw = await self._command("GET", self._record_prefix + request_id)
        return None if raw is None else _decode_record(raw)

    async def ledger_records(
        self, since_ms: int | None = None, until_ms: int | None = None
    ) -> list[LedgerRecord]:
        """Records with ``since_ms <= ts_ms < until_ms``, ordered by (ts_ms, id)."""
        low = "-inf" if since_ms is None else str(since_ms)
        high = "+inf" if until_ms is None else f"({until_ms}"
        ids = await self._command("ZRANGEBYSCORE", self._ledger_index, low, high)
        records: list[LedgerRecord] = []
        for start in range(0, len(ids), _CHUNK):
            keys = [self._record_prefix + text(i) for i in ids[start : start + _CHUNK]]
            records += [_decode_record(raw) for raw in await self._command("MGET", *keys)]
        records.sort(key=lambda r: (r.ts_ms, r.id))
        return records

    # -- budgets: one script call each ------------------------------------------------

    async def reserve(
        self,
        reservation_id: str,
        items: Sequence[ReserveItem],
        ttl_s: float,
        *,
        rates: Sequence[RateItem] = (),
    ) -> ReserveResult:
        """See :meth:`Store.reserve`; one ``reserve_v1.lua`` call."""
        validate_reserve(reservation_id, items, rates, ttl_s)
        keys = [
            self._expiry_key,
            self._res_prefix + reservation_id,
            self._done_prefix + reservation_id,
            *(self._budget_prefix + item.key for item in items),
            *(self._rate_prefix + rate.key for rate in rates),
        ]
        args: list[Any] = [
            reservation_id,
            max(1, round(ttl_s * 1e6)),
            len(items),
            len(rates),
            self._res_prefix,
            SWEEP_LIMIT,
        ]
        for item in items:
            limit = "" if item.limit_nanos is None else item.limit_nanos
            args += [limit, item.amount_nanos, int(item.hard)]
        for rate in rates:
            args += [rate.per_minute, rate.units, int(rate.adjustable)]
        reply = await self._eval(_RESERVE, keys, args)
        ok, kind, key, spent, reserved, retry_us = reply[:6]
        if int(ok):
            soft = tuple(self._user_key(text(k), self._budget_prefix) for k in reply[6:])
            return ReserveResult(ok=True, soft_exceeded=soft)
        kind = text(kind)
        if kind == "budget":
            return ReserveResult(
                ok=False,
                kind="budget",
                key=self._user_key(text(key), self._budget_prefix),
                state=BudgetState(int(spent), int(reserved)),
            )
        if kind == "rate":
            retry = None if int(retry_us) < 0 else int(retry_us) / 1e6
            return ReserveResult(
                ok=False,
                kind="rate",
                key=self._user_key(text(key), self._rate_prefix),
                retry_after_s=retry,
            )
        return ReserveResult(ok=False, kind="duplicate")

    @staticmethod
    def _user_key(redis_key: str, prefix: str) -> str:
        return redis_key.removeprefix(prefix)

    def _settle_keys(self, reservation_id: str, budget_keys: Sequence[str]) -> list[str]:
        return [
            self._expiry_key,
            self._res_prefix + reservation_id,
            self._done_prefix + reservation_id,
            *(self._budget_prefix + key for key in budget_keys),
        ]

    def _settle_head(self, op: str, reservation_id: str) -> list[Any]:
        retention_ms = max(1, round(self.settled_retention_s * 1000))
        return [op, reservation_id, self._res_prefix, SWEEP_LIMIT, retention_ms]

    async def settle(
        self,
        reservation_id: str,
        actual: int | Mapping[str, int],
        *,
        keys: Sequence[str] = (),
        tokens: int | None = None,
    ) -> bool:
        """See :meth:`Store.settle`; one ``settle_v1.lua`` call."""
        validate_settle(reservation_id, actual, keys)
        head = self._settle_head("settle", reservation_id)
        token_arg = "" if tokens is None else max(0, int(tokens))
        if isinstance(actual, Mapping):
            charges = dict(actual)
        elif keys:
            charges = dict.fromkeys(keys, actual)
        else:
            reply = await self._eval(
                _SETTLE, self._settle_keys(reservation_id, ()), [*head, token_arg, "held", actual]
            )
            return bool(int(reply))
        reply = await self._eval(
            _SETTLE,
            self._settle_keys(reservation_id, list(charges)),
            [*head, token_arg, "keys", *charges.values()],
        )
        return bool(int(reply))

    async def release(self, reservation_id: str) -> bool:
        """See :meth:`Store.release`; one ``settle_v1.lua`` call."""
        if not reservation_id:
            raise ValueError("A release needs the reservation's id.")
        reply = await self._eval(
            _SETTLE,
            self._settle_keys(reservation_id, ()),
            self._settle_head("release", reservation_id),
        )
        return bool(int(reply))

    async def budget_states(self, keys: Sequence[str]) -> dict[str, BudgetState]:
        """See :meth:`Store.budget_states`; one ``settle_v1.lua`` call."""
        # The reservation slots of KEYS are unused placeholders in the same hash slot.
        reply = await self._eval(
            _SETTLE, self._settle_keys("-", keys), self._settle_head("state", "-")
        )
        return {
            key: BudgetState(int(reply[2 * i]), int(reply[2 * i + 1])) for i, key in enumerate(keys)
        }

    async def reset_budget(self, key: str) -> None:
        """See :meth:`Store.reset_budget`."""
        await self._eval(_SETTLE, self._settle_keys("-", [key]), self._settle_head("reset", "-"))


def _decode_record(raw: bytes | str) -> LedgerRecord:
    values = orjson.loads(raw)
    values["tags"] = tuple(values["tags"])
    return LedgerRecord(**values)
