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

One round trip per batch. Budget operations are ``EVALSHA`` calls of versioned Lua
scripts kept as package data (``lua/budget_v2.lua`` for reserves, settles, releases and
budget reads; ``lua/specs_v1.lua``...; their headers document the key layout). The
budget gate (:mod:`proxy.budget_batch`) groups the reserves and settles of concurrent
requests, and :meth:`RedisStore.budget_batch` sends a whole group as one script call
(each reservation all or nothing on its own, in order), so under load a request costs
a fraction of a round trip. Script calls go over one pipelined connection of their
own (:class:`~proxy.store.redis_scripts.ScriptPipe`, packed in C, written once per turn
of the event loop) rather than through redis-py's pool, whose per-call overhead cost
more proxy CPU than the batch itself; other commands, TLS, Unix sockets and Redis
Cluster keep redis-py. On ``NOSCRIPT`` (a restarted or failed-over server) the
same call is sent once as ``EVAL``, which also caches the script again. Scripts read
the server's ``TIME`` for expiry and rate windows, so replica clocks never matter.

Hash slots. Every budget key carries the namespace's hash tag (``{mg}:b:...``), so all
budgets of one request, the reservation, its expiry index and its done marker sit in
one slot, and one script can check and write all of them atomically on a cluster.
The trade-off: all budget traffic of a deployment goes to the one node that owns the
slot (a "hot slot"), so a cluster adds capacity for the ledger (its own tag,
``{mg:ledger}``) and other tenants, not for budget operations. In batches, one Redis
core applies a reservation or a settle in about 20 µs (measured with bench/run.py
--budgets: ~320-390 µs per script call of ~10 of each), i.e. over ten thousand
budgeted requests per second, far above what one proxy fleet's upstream calls need; a
deployment that outgrows it can split budgets over several namespaces (one slot each)
as long as no request needs budgets from two of them.
Sharding budgets by key instead would need a cross-slot two-phase protocol and would
lose the one-step all-or-nothing check that makes the cap exact.

``open()`` does not contact Redis: a proxy starts while Redis is down and serves under
its ``on_store_error`` policy. Every redis-py failure is translated once, here, into
:class:`~proxy.errors.StoreUnavailable`.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError

from proxy.errors import StoreUnavailable
from proxy.ledger import LedgerRecord
from proxy.store.base import (
    BudgetState,
    RateItem,
    ReserveCall,
    ReserveItem,
    ReserveResult,
    SettleCall,
    validate_reserve,
    validate_settle,
)
from proxy.store.budget_engine import SWEEP_LIMIT
from proxy.store.redis_alerts import RedisAlertMethods
from proxy.store.redis_keys import RedisKeyMethods
from proxy.store.redis_scripts import LuaScript, ScriptPipe, text
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


_BUDGET = LuaScript.load("budget_v2.lua")
BATCH_LIMIT: Final = 128
"""Reservations or settles per script call: bounds the time one call blocks Redis
(about 5 µs each); a larger batch is sent as several calls."""
_HELD: Final = ReserveResult(ok=True)
# Placeholder of a reserve_many slot until its chunk answers (never returned).
_NOT_RUN: Final = ReserveResult(ok=False)
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
        # Script calls (budgets, ledger...) on one pipelined connection of their own,
        # when the client is a plain TCP one (see ScriptPipe); else through redis-py.
        self._pipe: ScriptPipe | None = None
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
            # One immediate retry, on a new connection, when a connection fails (never on
            # a timeout: a slow server is not asked twice). A pooled connection can be
            # stale after Redis restarted: its first command then fails although the
            # server is back. Batching keeps few connections busy, so after an outage
            # most of the pool is such connections. Every script is idempotent on retry
            # (done markers, SET NX, already-held reservations).
            options = {"retry": Retry(NoBackoff(), 1, (RedisConnectionError,)), **self._options}
            self._client = aioredis.Redis.from_url(self._url, **options)
            pool = self._client.connection_pool
            self._pipe = ScriptPipe.for_client(pool.connection_class, pool.connection_kwargs)

    async def close(self) -> None:
        """Close every connection; further calls raise RuntimeError."""
        client, self._client = self._client, None
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            pipe.close()
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
            raise self._unavailable(exc) from exc

    def _unavailable(self, exc: RedisError) -> StoreUnavailable:
        return StoreUnavailable(
            f"The {self._where()} failed: {type(exc).__name__}: {exc}. Check that "
            "Redis is running and reachable from this host."
        )

    async def _eval(self, script: LuaScript, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """EVALSHA, falling back to EVAL once when the server lost its script cache."""
        pipe = self._pipe
        if pipe is not None:
            try:
                try:
                    return await pipe.call("EVALSHA", script.sha, len(keys), *keys, *args)
                except NoScriptError:
                    return await pipe.call("EVAL", script.source, len(keys), *keys, *args)
            except RedisError as exc:
                raise self._unavailable(exc) from exc
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
            args += [orjson.dumps(record) for record in chunk]  # = to_dict(), in C
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

    # -- budgets: one script call per batch --------------------------------------------

    async def reserve(
        self,
        reservation_id: str,
        items: Sequence[ReserveItem],
        ttl_s: float,
        *,
        rates: Sequence[RateItem] = (),
    ) -> ReserveResult:
        """See :meth:`Store.reserve`; one ``budget_v2.lua`` call (a batch of one)."""
        (result,) = await self.reserve_many([ReserveCall(reservation_id, items, ttl_s, rates)])
        if isinstance(result, Exception):
            raise result
        return result

    async def settle(
        self,
        reservation_id: str,
        actual: int | Mapping[str, int],
        *,
        keys: Sequence[str] = (),
        tokens: int | None = None,
    ) -> bool:
        """See :meth:`Store.settle`; one ``budget_v2.lua`` call (a batch of one)."""
        (result,) = await self.settle_many([SettleCall(reservation_id, actual, keys, tokens)])
        if isinstance(result, Exception):
            raise result
        return result

    async def release(self, reservation_id: str) -> bool:
        """See :meth:`Store.release`; one ``budget_v2.lua`` call (a batch of one)."""
        (result,) = await self.settle_many([SettleCall(reservation_id, release=True)])
        if isinstance(result, Exception):
            raise result
        return result

    async def reserve_many(self, calls: Sequence[ReserveCall]) -> list[ReserveResult | Exception]:
        """See :meth:`Store.reserve_many`; see :meth:`budget_batch`."""
        return (await self.budget_batch(calls, ()))[0]

    async def settle_many(self, calls: Sequence[SettleCall]) -> list[bool | Exception]:
        """See :meth:`Store.settle_many`; see :meth:`budget_batch`."""
        return (await self.budget_batch((), calls))[1]

    async def budget_batch(
        self, reserves: Sequence[ReserveCall], settles: Sequence[SettleCall]
    ) -> tuple[list[ReserveResult | Exception], list[bool | Exception]]:
        """See :meth:`Store.budget_batch`: one ``budget_v2.lua`` call per
        :data:`BATCH_LIMIT` reserves and as many settles."""
        reserved: list[ReserveResult | Exception] = [_NOT_RUN] * len(reserves)
        settled: list[bool | Exception] = [False] * len(settles)
        valid_reserves: list[int] = []
        for i, call in enumerate(reserves):
            try:
                validate_reserve(call.reservation_id, call.items, call.rates, call.ttl_s)
            except (ValueError, TypeError) as exc:
                reserved[i] = exc
            else:
                valid_reserves.append(i)
        valid_settles: list[int] = []
        for i, settle in enumerate(settles):
            try:
                if settle.release:
                    if not settle.reservation_id:
                        raise ValueError("A release needs the reservation's id.")
                else:
                    validate_settle(settle.reservation_id, settle.actual, settle.keys)
            except (ValueError, TypeError) as exc:
                settled[i] = exc
            else:
                valid_settles.append(i)
        for start in range(0, max(len(valid_reserves), len(valid_settles)), BATCH_LIMIT):
            r_chunk = valid_reserves[start : start + BATCH_LIMIT]
            s_chunk = valid_settles[start : start + BATCH_LIMIT]
            keys, args = self._batch_args(
                [settles[i] for i in s_chunk], [reserves[i] for i in r_chunk]
            )
            try:
                replies = await self._eval(_BUDGET, keys, args)
            except StoreUnavailable as exc:
                for i in r_chunk:
                    reserved[i] = exc
                for i in s_chunk:
                    settled[i] = exc
                continue
            for i, reply in zip(s_chunk, replies, strict=False):
                settled[i] = bool(int(reply))
            for i, reply in zip(r_chunk, replies[len(s_chunk) :], strict=True):
                reserved[i] = self._reserve_result(reply)
        return reserved, settled

    def _batch_args(
        self, settles: Sequence[SettleCall], reserves: Sequence[ReserveCall]
    ) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of one ``budget_v2.lua`` batch (see its header). The numbers go
        as one space-separated argument and the ids as another: one argument per number
        (16 per reservation) would cost more to pack than the script's own work. Each
        entry's numbers are formatted as one string (this runs for every reserve and
        settle under load, so it avoids per-number tuples and conversions)."""
        shared: dict[str, int] = {}  # redis key -> its KEYS index (1-based, as in Lua)
        parts: list[str] = []
        budget_prefix, rate_prefix = self._budget_prefix, self._rate_prefix
        for rid, actual, keys, tokens, release in settles:
            id_len = _byte_len(rid)
            if release:
                parts.append(f"{id_len} 0 -1 0")
                continue
            token_arg = -1 if tokens is None else max(0, int(tokens))
            if isinstance(actual, Mapping):
                charges: Iterable[tuple[str, int]] = actual.items()
            elif keys:
                charges = ((key, actual) for key in keys)
            else:
                parts.append(f"{id_len} 1 {token_arg} -1 {actual}")  # to each budget held
                continue
            pairs: list[str] = []
            for key, amount in charges:
                redis_key = budget_prefix + key
                index = shared.get(redis_key)
                if index is None:
                    index = shared[redis_key] = len(shared) + 2
                pairs.append(f"{index} {amount}")
            parts.append(f"{id_len} 1 {token_arg} {len(pairs)} {' '.join(pairs)}")
        ttls: dict[float, int] = {}
        for rid, items, ttl_s, rates in reserves:
            ttl_us = ttls.get(ttl_s)
            if ttl_us is None:
                ttl_us = ttls[ttl_s] = max(1, round(ttl_s * 1e6))
            id_len = _byte_len(rid)
            parts.append(f"{id_len} {ttl_us} {len(items)} {len(rates)}")
            for key, limit, amount, hard in items:
                redis_key = budget_prefix + key
                index = shared.get(redis_key)
                if index is None:
                    index = shared[redis_key] = len(shared) + 2
                limit_arg = -1 if limit is None else limit
                parts.append(f"{index} {limit_arg} {amount} {1 if hard else 0}")
            for key, per_minute, units, adjustable in rates:
                redis_key = rate_prefix + key
                index = shared.get(redis_key)
                if index is None:
                    index = shared[redis_key] = len(shared) + 2
                parts.append(f"{index} {per_minute} {units} {1 if adjustable else 0}")
        args: list[Any] = [
            "batch",
            self._res_prefix,
            SWEEP_LIMIT,
            self._done_prefix,
            max(1, round(self.settled_retention_s * 1000)),
            len(settles),
            len(reserves),
            " ".join(parts),
            "".join([*(s.reservation_id for s in settles), *(r.reservation_id for r in reserves)]),
        ]
        return [self._expiry_key, *shared], args

    def _reserve_result(self, reply: Any) -> ReserveResult:
        if not isinstance(reply, list):
            return _HELD  # 1: held
        if int(reply[0]):
            soft = tuple(text(k).removeprefix(self._budget_prefix) for k in reply[1:])
            return ReserveResult(ok=True, soft_exceeded=soft)
        kind = text(reply[1])
        if kind == "budget":
            return ReserveResult(
                ok=False,
                kind="budget",
                key=text(reply[2]).removeprefix(self._budget_prefix),
                state=BudgetState(int(reply[3]), int(reply[4])),
            )
        if kind == "rate":
            retry_us = int(reply[3])
            return ReserveResult(
                ok=False,
                kind="rate",
                key=text(reply[2]).removeprefix(self._rate_prefix),
                retry_after_s=None if retry_us < 0 else retry_us / 1e6,
            )
        return ReserveResult(ok=False, kind="duplicate")

    def _state_keys(self, keys: Sequence[str]) -> list[str]:
        return [self._expiry_key, *(self._budget_prefix + key for key in keys)]

    async def budget_states(self, keys: Sequence[str]) -> dict[str, BudgetState]:
        """See :meth:`Store.budget_states`; one ``budget_v2.lua`` call."""
        reply = await self._eval(
            _BUDGET, self._state_keys(keys), ["state", self._res_prefix, SWEEP_LIMIT]
        )
        return {
            key: BudgetState(int(reply[2 * i]), int(reply[2 * i + 1])) for i, key in enumerate(keys)
        }

    async def reset_budget(self, key: str) -> None:
        """See :meth:`Store.reset_budget`."""
        await self._eval(_BUDGET, self._state_keys([key]), ["reset", self._res_prefix, SWEEP_LIMIT])


def _byte_len(text: str) -> int:
    """The length of ``text`` in UTF-8 bytes, as Lua's string.sub counts."""
    return len(text) if text.isascii() else len(text.encode())


def _decode_record(raw: bytes | str) -> LedgerRecord:
    values = orjson.loads(raw)
    values["tags"] = tuple(values["tags"])
    return LedgerRecord(**values)
