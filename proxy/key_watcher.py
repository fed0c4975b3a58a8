"""Each replica's copy of the issued-key table, and the watcher that keeps it current.

The request path never waits on the store to identify a caller: :meth:`IssuedKeys.
lookup` is one HMAC and one dict lookup in memory. The table is reloaded from the
store whenever the store's key version moves, which a background task checks every
``interval_s`` (0.5 s: one cheap read). So a revocation, rotation or new key written
by any replica, the CLI or the admin API is in force on every replica within about
half a second plus one store read; the replica that made the change applies it at
once (:meth:`IssuedKeys.refresh`).

Two more paths keep "within a second" true where polling alone would not:

- an ``mg-`` key that is not in the table may have been created a moment ago, so
  before the 401 the table checks the store's version once (:meth:`IssuedKeys.
  refresh_on_miss`). That check is shared by concurrent misses and runs at most
  every ``miss_interval_s``, so a flood of made-up keys costs the store at most ten
  reads a second, not one per request;
- expiry and the end of a rotation's grace period are compared with the clock at
  each lookup, never cached.

Timing. The lookup is a dict lookup by ``HMAC(secret, presented key)``. Its timing
can depend on the digest of what was presented, but that digest is keyed by a
secret the caller does not have, so timings reveal nothing about which digests, or
keys, exist: there is no byte-by-byte comparison of a guess with a stored value for
an attacker to steer.

A store that cannot be read keeps the last table (revocations cannot arrive then
anyway; issued keys keep working); the outage is logged once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from proxy.background import STORE_ERRORS, BackgroundTask, OutageLog, poll_forever, poll_once
from proxy.callers import Caller
from proxy.errors import Unauthorized
from proxy.keys import IssuedKey, KeyHasher
from proxy.settings import ConfigError
from proxy.store.base import Store

__all__ = ["DEFAULT_MISS_INTERVAL_S", "DEFAULT_POLL_INTERVAL_S", "IssuedKeys"]

log = logging.getLogger("metergate.keys")

DEFAULT_POLL_INTERVAL_S: Final = 0.5
DEFAULT_MISS_INTERVAL_S: Final = 0.1
MISS_TIMEOUT_S: Final = 0.5
"""How long a request with an unknown key waits for the store before its 401: short,
so that a store outage does not make every made-up key hang."""

_ENDED: Final = {
    "expired": "This Metergate key has expired. Ask your administrator for a new key.",
    "rotated": "This Metergate key was replaced by a new one (rotated). Use the new key.",
    "revoked": "This Metergate key was revoked. Ask your administrator for a new key.",
}


@dataclass(frozen=True, slots=True)
class _Entry:
    caller: Caller
    until_ms: int | None  # stops working at this moment (None: no end)
    ends_as: str  # "expired" or "rotated": what to tell a caller after until_ms
    revoked: bool


class IssuedKeys:
    """The issued-key table of one replica (see the module docstring).

    ``secret`` None (no ``key_secret`` configured) leaves the table empty; ``start``
    then refuses to run when the store holds active issued keys, which this replica
    could not recognise. ``clock`` returns epoch seconds (injected for tests).
    """

    def __init__(
        self,
        store: Store,
        secret: str | None,
        *,
        interval_s: float = DEFAULT_POLL_INTERVAL_S,
        miss_interval_s: float = DEFAULT_MISS_INTERVAL_S,
        timeout_s: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"The key poll interval must be positive, not {interval_s}.")
        self.store = store
        self.hasher = KeyHasher(secret) if secret else None
        self.interval_s = interval_s
        self.miss_interval_s = miss_interval_s
        self.timeout_s = timeout_s
        self._clock = clock
        self._table: dict[bytes, _Entry] = {}
        self.version: int | None = None  # of the table held; None: never loaded
        self.reloads = 0
        self._lock = asyncio.Lock()
        self._outage = OutageLog(log, "issued keys")
        self._last_miss = -1e9
        self._miss: asyncio.Future[bool] | None = None
        self._task = BackgroundTask("key watcher")
        self._reported: set[tuple[str, int]] = set()  # (problem, version) logged once
        self._strict = False  # True during start(): unusable keys are a config error

    def __len__(self) -> int:
        return len(self._table)

    # -- the request path ------------------------------------------------------------

    def lookup(self, key: str) -> Caller | None:
        """The caller ``key`` names, or None when it is not an issued key. Raises
        :class:`Unauthorized` for a key that was revoked, has expired, or was
        replaced by a rotation (after its grace period)."""
        if self.hasher is None:
            return None
        entry = self._table.get(self.hasher.digest(key))
        if entry is None:
            return None
        if entry.revoked:
            raise Unauthorized(_ENDED["revoked"], code="key_revoked")
        if entry.until_ms is not None and self._clock() * 1000 >= entry.until_ms:
            raise Unauthorized(_ENDED[entry.ends_as], code="key_" + entry.ends_as)
        return entry.caller

    async def refresh_on_miss(self) -> bool:
        """Check the store once for keys this table does not have yet; True when the
        table changed. Shared by concurrent callers, at most every ``miss_interval_s``."""
        if self.hasher is None:
            return False
        pending = self._miss
        if pending is None:
            now = time.monotonic()
            if now - self._last_miss < self.miss_interval_s:
                return False
            self._last_miss = now
            pending = self._miss = asyncio.ensure_future(self._miss_refresh())
            pending.add_done_callback(lambda _: setattr(self, "_miss", None))
        # shield: a client that hangs up must not cancel the check others wait for.
        return await asyncio.shield(pending)

    async def _miss_refresh(self) -> bool:
        # Compared with the version before, not refresh()'s answer: a reload by the
        # poller while this one waited for the lock counts too.
        before = self.version
        with contextlib.suppress(*STORE_ERRORS):
            async with asyncio.timeout(MISS_TIMEOUT_S):
                await self.refresh()
        return self.version != before

    # -- following the store -----------------------------------------------------------

    async def refresh(self) -> bool:
        """Reload the table when the store's key version moved; True when it did.
        Store errors propagate (the poller tolerates them). Serialised, so that an
        older read can never replace a newer table."""
        async with self._lock:
            # The version is read BEFORE the documents: a change landing in between is
            # seen again at the next poll, never missed.
            async with asyncio.timeout(self.timeout_s):
                version = await self.store.api_keys_version()
            if version == self.version:
                return False
            async with asyncio.timeout(self.timeout_s):
                docs = await self.store.api_keys()
            self._table = self._build(docs, version)
            self.version = version
            self.reloads += 1
            log.info("issued keys reloaded from the store (key version %d)", version)
            return True

    def _build(self, docs: Mapping[str, dict[str, Any]], version: int) -> dict[bytes, _Entry]:
        table: dict[bytes, _Entry] = {}
        now_ms = int(self._clock() * 1000)
        unusable = 0  # active keys this replica cannot recognise
        for key_id, doc in docs.items():
            try:
                record = IssuedKey.from_doc(key_id, doc)
            except ValueError as exc:
                self._report(
                    "invalid:" + key_id, version, "ignoring the stored key %s: %s", key_id, exc
                )
                continue
            active = record.state(now_ms) == "active"
            if self.hasher is None or record.secret_id != self.hasher.secret_id:
                unusable += active
                continue
            caller = Caller(
                key_name=record.name, team=record.team, user=record.user, tags=record.tags
            )
            revoked = record.revoked_ms is not None
            table[bytes.fromhex(record.digest)] = _Entry(
                caller, record.expires_ms, "expired", revoked
            )
            if record.previous_digest is not None:
                until = record.previous_until_ms or record.rotated_ms or record.created_ms
                if record.expires_ms is not None and record.expires_ms < until:
                    until = record.expires_ms
                ends_as = "expired" if until == record.expires_ms else "rotated"
                table[bytes.fromhex(record.previous_digest)] = _Entry(
                    caller, until, ends_as, revoked
                )
        if unusable:
            problem = self._secret_problem(unusable)
            if self._strict:  # at start: refuse, rather than 401 every such key
                raise ConfigError(problem)
            self._report("secret", version, "%s", problem)
        return table

    def _secret_problem(self, count: int) -> str:
        if self.hasher is None:
            return (
                f"key_secret: the store holds {count} active issued key(s), but this proxy "
                "has no key_secret, so it cannot recognise them. Set key_secret (e.g. "
                "key_secret: ${METERGATE_KEY_SECRET}) to the secret the keys were issued "
                "with, or revoke them with `metergate keys revoke`."
            )
        return (
            f"key_secret: {count} active issued key(s) in the store were issued with "
            "another key_secret, so this proxy cannot recognise them. Give every replica "
            "and the CLI the same key_secret; keys issued under a secret that is gone "
            "must be revoked and issued again."
        )

    def _report(self, what: str, version: int, message: str, *args: Any) -> None:
        if (what, version) not in self._reported:  # once per problem and version
            self._reported.add((what, version))
            log.error(message, *args)

    async def _poll(self) -> None:
        await poll_once(self.refresh, self._outage)

    async def run(self) -> None:
        """Poll until cancelled, keeping the last good table through store errors."""
        await poll_forever(self.refresh, self._outage, self.interval_s)

    async def start(self) -> None:
        """Load once now (raising :class:`ConfigError` when the store holds active keys
        this replica cannot recognise), then poll in a background task. A store that
        is down at start leaves the table empty until it answers."""
        if self._task.running:
            raise RuntimeError("The key watcher is already running.")
        self._strict = True
        try:
            await self._poll()
        finally:
            self._strict = False
        self._task.start(self.run())

    async def stop(self) -> None:
        """Stop polling (and a store check for an unknown key); call before closing the
        store."""
        await self._task.stop()
        if (pending := self._miss) is not None:
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pending
