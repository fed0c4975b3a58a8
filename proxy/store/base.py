"""The store contract: where the ledger and the budget counters live.

Backends are chosen by URL through :func:`proxy.store.open_store`. Every backend must
pass the same contract suites: ``tests/test_store_contract.py`` (ledger) and
``tests/test_budget_contract.py`` (reservations, settles, expiry, rate limits).

Budgets: reserve, then settle
-----------------------------
A budget is a counter pair under a *budget key* that the caller chooses (the budget's
name and period id, see :func:`proxy.budget.budget_key`), so a new period is simply a
new key that starts at zero::

    spent     nano-USD settled in this period
    reserved  nano-USD held by reservations not yet settled

:meth:`Store.reserve` checks and holds an upper bound on every matching budget at once,
all or nothing; :meth:`Store.settle` replaces the hold by the actual cost, exactly once
per reservation id; :meth:`Store.release` drops a hold that will cost nothing. A hard
cap holds because the check ``spent + reserved + amount <= limit`` and the write happen
in one atomic step, and because every admitted request holds its worst case until it
settles. A settle may charge more than was reserved (spend is never dropped), so
``spent`` can exceed the limit only by what the estimates under-counted.

Reservations expire: one not settled within its ``ttl_s`` is released by the next
store call that sweeps (reserve, settle, release, state), so a crashed replica cannot
hold budget forever. Its spend, unknown to everyone once the replica is gone, is then
not charged; see :mod:`proxy.budget` for that trade-off. A settle arriving after its
reservation expired still charges its actual cost.

Rate limits (requests or tokens per minute) are GCRA token buckets checked in the same
atomic step; see :class:`RateItem`. Time for expiry and rate limits is the store's own
clock (Redis ``TIME``), never the caller's.

Run-time budget specs
---------------------
Budgets changed at run time (``metergate budgets set``, ``PUT /admin/budgets/NAME``)
live in the store, so every replica sharing it sees them: one JSON document per budget
name, in the shape of a config ``budgets:`` entry, plus a *version* that every write
bumps. Replicas poll the version (one cheap read) and reload the documents only when it
changed; see :class:`proxy.budget_specs.SpecWatcher`. The store does not interpret the
documents; :func:`proxy.budget_specs.merge_specs` validates them.

Budget alerts: a deduplicated outbox
------------------------------------
Alerts (:mod:`proxy.alerts`) fire once per budget, threshold and period however many
replicas notice the crossing. :meth:`Store.enqueue_alert` writes a *dedup marker* and
one outbox entry per channel in one atomic step, and only when the marker is absent;
the marker lives until the period ends (plus a margin), so a replica that restarts
does not fire again. Delivery workers (:mod:`proxy.alert_delivery`) take due entries
with :meth:`Store.lease_alerts`, which pushes each entry's due time forward by the
lease: one replica works on an entry at a time, and the entry of a replica that died
mid-delivery becomes due again when its lease runs out. A delivered entry is removed
(:meth:`Store.ack_alert`); a failed one is rescheduled (:meth:`Store.retry_alert`).
Due times are store time (Redis ``TIME``), in milliseconds.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, NamedTuple

import orjson

from proxy.errors import StoreUnavailable
from proxy.ledger import LedgerRecord
from proxy.store.aggregate import GROUP_COLUMNS, ReportRow, aggregate

__all__ = [
    "DEFAULT_SETTLED_RETENTION_S",
    "GROUP_COLUMNS",
    "MAX_NANOS",
    "AlertEntry",
    "BudgetState",
    "RateItem",
    "ReportRow",
    "ReserveCall",
    "ReserveItem",
    "ReserveResult",
    "SettleCall",
    "Store",
    "alert_entry_id",
    "decode_spec_docs",
    "encode_spec_doc",
    "validate_enqueue_alert",
    "validate_reserve",
    "validate_settle",
]

log = logging.getLogger("metergate.store")

MAX_NANOS: Final = 2**53 - 1
"""The largest amount or limit a store accepts: about 9 million USD in nano-USD.

Redis scripts compute in Lua numbers (IEEE doubles), exact for integers up to 2**53;
every backend refuses larger values so that all of them give the same answers."""

DEFAULT_SETTLED_RETENTION_S: Final = 3_600
"""How long a store remembers that a reservation id was settled or released, so that a
replayed settle (journal, client retry) is a no-op. A replay older than this would be
charged again.

Why one hour: on Redis each remembered id costs about 160 bytes (measured with 32-hex
ids), i.e. about 56 MB at 100 requests/s for an hour, 1.3 GB for a day. Only one kind
of replay can come late: a settle that timed out *after* the store applied it, was
journaled, and is replayed when an outage that began right then ends. Such settles
are at most the ones in flight when the store became unreachable, and they are charged
twice only if that outage lasts longer than the retention. Raise ``retention_s`` (a
Redis URL option) when longer outages must not over-count, at that memory cost."""


class ReserveItem(NamedTuple):
    """One budget a reservation holds money on.

    ``limit_nanos`` None means "no cap, just count". ``hard`` False (a soft budget)
    never refuses; the result reports it in ``soft_exceeded`` instead.
    """

    key: str
    limit_nanos: int | None
    amount_nanos: int
    hard: bool


class RateItem(NamedTuple):
    """One rate limit a reservation takes ``units`` from (1 request, or N tokens).

    A GCRA token bucket: it holds ``per_minute`` units, starts full, and refills at
    ``per_minute / 60`` units per second. This is a sliding window that allows a burst
    of a full minute's worth and then a steady rate, and it needs one stored number
    per limit. ``adjustable`` marks a token limit: the settle replaces the estimated
    units by the actual count (a refund when the request used fewer tokens).
    """

    key: str
    per_minute: int
    units: int
    adjustable: bool = False


RefusalKind = Literal["budget", "rate", "duplicate"]


class BudgetState(NamedTuple):
    """The counters of one budget key, in nano-USD."""

    spent_nanos: int
    reserved_nanos: int


@dataclass(frozen=True, slots=True)
class ReserveResult:
    """What :meth:`Store.reserve` decided.

    When refused, ``kind`` says why: ``budget`` (``key`` is the first hard budget that
    would be exceeded, ``state`` its counters), ``rate`` (``key`` is the rate limit,
    ``retry_after_s`` when it will have room, or None when the request is larger than
    the whole limit and never fits), ``duplicate`` (the id was already settled).
    ``soft_exceeded`` lists the soft budgets this reservation takes over their limit.
    """

    ok: bool
    kind: RefusalKind | None = None
    key: str | None = None
    state: BudgetState | None = None
    retry_after_s: float | None = None
    soft_exceeded: tuple[str, ...] = ()


class ReserveCall(NamedTuple):
    """The arguments of one :meth:`Store.reserve`, for :meth:`Store.reserve_many`."""

    reservation_id: str
    items: Sequence[ReserveItem]
    ttl_s: float
    rates: Sequence[RateItem] = ()


class SettleCall(NamedTuple):
    """The arguments of one :meth:`Store.settle` (or, with ``release`` True, of one
    :meth:`Store.release`, which ignores the other fields), for
    :meth:`Store.settle_many`."""

    reservation_id: str
    actual: int | Mapping[str, int] = 0
    keys: Sequence[str] = ()
    tokens: int | None = None
    release: bool = False


def _plain_amount(value: object) -> bool:
    """True for a plain int in range: the common case, checked without building the
    message that :func:`_check_amount` needs only when it refuses."""
    return type(value) is int and 0 <= value <= MAX_NANOS


def _check_amount(value: int, what: str) -> None:
    # bool is an int; a True amount is a caller bug, not one nano-dollar.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int of nano-USD, not {type(value).__name__}.")
    if not 0 <= value <= MAX_NANOS:
        raise ValueError(f"{what} is {value}; it must be between 0 and {MAX_NANOS} nano-USD.")


def validate_reserve(
    reservation_id: str, items: Sequence[ReserveItem], rates: Sequence[RateItem], ttl_s: float
) -> None:
    """Refuse malformed reserve arguments the same way on every backend."""
    if not reservation_id:
        raise ValueError("A reservation needs a non-empty id.")
    if not ttl_s > 0:
        raise ValueError(f"A reservation's ttl_s must be positive, not {ttl_s}.")
    keys = [item.key for item in items]
    if len(set(keys)) != len(keys):
        raise ValueError(f"A reservation lists a budget key twice: {sorted(keys)}.")
    rate_keys = [rate.key for rate in rates]
    if len(set(rate_keys)) != len(rate_keys):
        raise ValueError(f"A reservation lists a rate limit twice: {sorted(rate_keys)}.")
    for item in items:
        if not item.key:
            raise ValueError("A budget key must be a non-empty string.")
        if not _plain_amount(item.amount_nanos):
            _check_amount(item.amount_nanos, f"The amount reserved on {item.key!r}")
        if item.limit_nanos is not None and not _plain_amount(item.limit_nanos):
            _check_amount(item.limit_nanos, f"The limit of {item.key!r}")
    for rate in rates:
        if not rate.key:
            raise ValueError("A rate limit key must be a non-empty string.")
        if rate.per_minute < 1 or rate.units < 0:
            raise ValueError(
                f"The rate limit {rate.key!r} needs per_minute >= 1 and units >= 0, "
                f"not {rate.per_minute} and {rate.units}."
            )


def validate_settle(
    reservation_id: str, actual: int | Mapping[str, int], keys: Sequence[str]
) -> None:
    """Refuse malformed settle arguments the same way on every backend."""
    if not reservation_id:
        raise ValueError("A settle needs the reservation's id.")
    if isinstance(actual, Mapping):
        if keys:
            raise ValueError("Pass keys only with a single actual amount, not with a mapping.")
        for key, amount in actual.items():
            if not _plain_amount(amount):
                _check_amount(amount, f"The actual cost charged to {key!r}")
    elif not _plain_amount(actual):
        _check_amount(actual, "The actual cost")


def encode_spec_doc(name: str, doc: Mapping[str, Any]) -> str:
    """The JSON text a store keeps for a run-time budget spec; refuses what no backend
    could give back unchanged (an empty name, a document that is not a JSON object)."""
    if not isinstance(name, str) or not name:
        raise ValueError("A budget spec needs a non-empty name.")
    if not isinstance(doc, Mapping):
        raise TypeError(f"The spec of budget {name!r} must be a mapping, not {type(doc).__name__}.")
    try:
        return orjson.dumps(dict(doc)).decode()
    except TypeError as exc:
        raise ValueError(f"The spec of budget {name!r} cannot be stored as JSON: {exc}.") from None


def decode_spec_docs(rows: Iterable[tuple[str | bytes, str | bytes]]) -> dict[str, dict[str, Any]]:
    """Stored (name, JSON text) pairs as documents. A document that is not a JSON object
    (written around Metergate, e.g. with redis-cli) is logged and left out, so that one
    bad entry cannot hide every other budget."""
    docs: dict[str, dict[str, Any]] = {}
    for raw_name, raw_doc in rows:
        name = raw_name.decode() if isinstance(raw_name, bytes) else raw_name
        try:
            doc = orjson.loads(raw_doc)
        except orjson.JSONDecodeError:
            doc = None
        if not isinstance(doc, dict):
            log.warning("the stored spec of budget %r is not a JSON object; ignoring it", name)
            continue
        docs[name] = doc
    return docs


class AlertEntry(NamedTuple):
    """One outbox entry handed out by :meth:`Store.lease_alerts`.

    ``attempts`` counts the leases of this entry so far, this one included (1 on the
    first try); ``created_ms`` is the store time of the enqueue, for giving up."""

    id: str
    payload: str
    attempts: int
    created_ms: int


def alert_entry_id(dedup_key: str, channel: str) -> str:
    """The outbox id of one alert on one channel: stable, so receivers can use it to
    drop a duplicate delivery."""
    return f"{dedup_key}@{channel}"


def validate_enqueue_alert(
    dedup_key: str, payloads: Mapping[str, str], dedup_ttl_s: float | None
) -> None:
    """Refuse malformed enqueue arguments the same way on every backend."""
    if not dedup_key:
        raise ValueError("An alert needs a non-empty dedup key.")
    if not payloads:
        raise ValueError("An alert needs at least one channel payload.")
    for channel, payload in payloads.items():
        if not channel or not isinstance(payload, str):
            raise ValueError("Alert payloads must map non-empty channel names to JSON text.")
    if dedup_ttl_s is not None and not dedup_ttl_s > 0:
        raise ValueError(f"An alert's dedup_ttl_s must be positive or None, not {dedup_ttl_s}.")


class Store(ABC):
    """A storage backend. All methods are safe to call concurrently from one event loop."""

    settled_retention_s: float = DEFAULT_SETTLED_RETENTION_S

    @abstractmethod
    async def open(self) -> None:
        """Connect and create what is missing (tables, scripts)."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections; further calls are errors."""

    @abstractmethod
    async def append_ledger(self, records: Sequence[LedgerRecord]) -> None:
        """Write records; when this returns they survive a crash of this process.
        Writing a record whose id is already stored is a no-op (idempotent replay)."""

    @abstractmethod
    async def get_ledger_record(self, request_id: str) -> LedgerRecord | None:
        """One record by request id."""

    @abstractmethod
    async def ledger_records(
        self, since_ms: int | None = None, until_ms: int | None = None
    ) -> list[LedgerRecord]:
        """Records with ``since_ms <= ts_ms < until_ms``, oldest first (ties by id)."""

    async def report(
        self,
        group_by: Sequence[str],
        since_ms: int | None = None,
        until_ms: int | None = None,
    ) -> list[ReportRow]:
        """Sums grouped by ``group_by`` (names from :data:`GROUP_COLUMNS`), largest cost
        first. The default aggregates :meth:`ledger_records`; SQL backends override it."""
        return aggregate(await self.ledger_records(since_ms, until_ms), group_by)

    # -- budgets -----------------------------------------------------------------------

    @abstractmethod
    async def reserve(
        self,
        reservation_id: str,
        items: Sequence[ReserveItem],
        ttl_s: float,
        *,
        rates: Sequence[RateItem] = (),
    ) -> ReserveResult:
        """Hold ``amount_nanos`` on every budget of ``items`` and take ``units`` from
        every rate limit, atomically and all or nothing.

        Refused (nothing written) when, for any hard item, ``spent + reserved + amount >
        limit``, or when any rate limit lacks room. Reserving an id that is already held
        is a no-op that succeeds (a retried call); reserving an id that was already
        settled or released is refused as ``duplicate``. The hold is released on its own
        when not settled within ``ttl_s`` seconds of store time.
        """

    @abstractmethod
    async def settle(
        self,
        reservation_id: str,
        actual: int | Mapping[str, int],
        *,
        keys: Sequence[str] = (),
        tokens: int | None = None,
    ) -> bool:
        """Replace the reservation's holds by the actual cost, exactly once per id.

        ``actual`` is either one amount, charged to each of ``keys`` (or, when ``keys``
        is empty, to each budget the reservation holds), or an amount per budget key.
        The actual may exceed what was reserved: it is charged in full. ``tokens``, when
        given, replaces the estimated units of the reservation's adjustable rate items.
        Settling an expired or unknown id still charges ``actual`` (pass ``keys``, as
        the store no longer knows them). Returns False, changing nothing, when this id
        was already settled or released within :attr:`settled_retention_s`.
        """

    @abstractmethod
    async def release(self, reservation_id: str) -> bool:
        """Drop the reservation's holds and give back its rate units: the request cost
        nothing (refused, or failed before reaching the upstream). A later settle of
        the id is a no-op. Returns False when there was nothing held to release."""

    # -- batches: what the budget gate sends under load (group commit) --------------

    async def reserve_many(self, calls: Sequence[ReserveCall]) -> list[ReserveResult | Exception]:
        """Run each call as :meth:`reserve` would, in order, each all or nothing on its
        own: a refusal refuses that call only, and a later call sees the holds of the
        earlier ones. One result per call; a call's exception (ValueError or TypeError
        for malformed arguments, StoreUnavailable when the store failed, in which case
        the call may or may not have been applied, as when :meth:`reserve` raises) is
        returned in its place, not raised.

        This default runs the calls one by one; backends with a cheaper way (one Redis
        script, one transaction) override it."""
        results: list[ReserveResult | Exception] = []
        for call in calls:
            try:
                result = await self.reserve(
                    call.reservation_id, call.items, call.ttl_s, rates=call.rates
                )
            except (ValueError, TypeError, StoreUnavailable) as exc:
                results.append(exc)
            else:
                results.append(result)
        return results

    async def settle_many(self, calls: Sequence[SettleCall]) -> list[bool | Exception]:
        """Run each call as :meth:`settle` (or :meth:`release`) would, in order; one
        result per call, exceptions returned in place as in :meth:`reserve_many`."""
        results: list[bool | Exception] = []
        for call in calls:
            try:
                if call.release:
                    done = await self.release(call.reservation_id)
                else:
                    done = await self.settle(
                        call.reservation_id, call.actual, keys=call.keys, tokens=call.tokens
                    )
            except (ValueError, TypeError, StoreUnavailable) as exc:
                results.append(exc)
            else:
                results.append(done)
        return results

    async def budget_batch(
        self, reserves: Sequence[ReserveCall], settles: Sequence[SettleCall]
    ) -> tuple[list[ReserveResult | Exception], list[bool | Exception]]:
        """:meth:`settle_many` of ``settles``, then :meth:`reserve_many` of ``reserves``,
        with their results: what the budget gate sends per batch. Backends may run both
        in one step (Redis: one script call)."""
        settled = await self.settle_many(settles) if settles else []
        reserved = await self.reserve_many(reserves) if reserves else []
        return reserved, settled

    @abstractmethod
    async def budget_states(self, keys: Sequence[str]) -> dict[str, BudgetState]:
        """Current counters of each key (zeros for a key never used), after sweeping
        expired reservations."""

    async def budget_state(self, key: str) -> BudgetState:
        """Current counters of one budget key; see :meth:`budget_states`."""
        return (await self.budget_states([key]))[key]

    @abstractmethod
    async def reset_budget(self, key: str) -> None:
        """Set ``spent`` of a budget key back to zero (``metergate budgets reset``).
        Holds of reservations in flight stay, so their settles still balance."""

    # -- run-time budget specs (see the module docstring) ------------------------------

    @abstractmethod
    async def put_budget_spec(self, name: str, doc: Mapping[str, Any]) -> None:
        """Store ``doc`` (a config ``budgets:`` entry, kept as JSON) under ``name``,
        replacing any document of that name, and bump :meth:`budget_specs_version`."""

    @abstractmethod
    async def delete_budget_spec(self, name: str) -> bool:
        """Remove the document of ``name``; bump the version and return True when there
        was one, else change nothing and return False."""

    @abstractmethod
    async def budget_specs(self) -> dict[str, dict[str, Any]]:
        """Every stored document by name (see :func:`decode_spec_docs`)."""

    @abstractmethod
    async def budget_specs_version(self) -> int:
        """The count of changes: 0 for a store that never had a spec, +1 on every put
        and on every delete that removed something. Compare it for inequality, not
        order: a Redis restarted without persistence starts again at 0."""

    # -- budget alerts: dedup marker and outbox (see the module docstring) -------------

    @abstractmethod
    async def enqueue_alert(
        self, dedup_key: str, payloads: Mapping[str, str], dedup_ttl_s: float | None
    ) -> bool:
        """Atomically: when no marker ``dedup_key`` exists, write it (kept for
        ``dedup_ttl_s`` seconds, forever when None) and one outbox entry per channel,
        id :func:`alert_entry_id`, due now, with ``payloads[channel]`` as its payload;
        return True. When the marker exists, change nothing and return False."""

    @abstractmethod
    async def alert_marked(self, dedup_key: str) -> bool:
        """True when the marker ``dedup_key`` exists: a cheap check before building an
        alert that another replica has already enqueued."""

    @abstractmethod
    async def lease_alerts(self, limit: int, lease_s: float) -> list[AlertEntry]:
        """Up to ``limit`` entries due now (oldest due first); each one's due time moves
        ``lease_s`` seconds ahead and its attempts count goes up by one, in one atomic
        step, so no other caller gets it until the lease runs out."""

    @abstractmethod
    async def ack_alert(self, entry_id: str) -> bool:
        """Remove a delivered (or abandoned) entry; False when it was not there."""

    @abstractmethod
    async def retry_alert(self, entry_id: str, delay_s: float) -> bool:
        """Make an entry due again ``delay_s`` seconds from now; False (changing
        nothing) when it is not there any more."""

    # -- issued Metergate keys (see proxy.store.keys_common) ---------------------------
    # Not abstract: a backend registered from outside (register_store) that predates
    # issued keys keeps working with config keys, and simply holds no issued keys.

    async def create_api_key(self, key_id: str, doc: Mapping[str, Any]) -> bool:
        """Store a new key's document at revision 1 and claim its ``name`` among active
        keys, atomically. Returns False, writing nothing, when an active key holds the
        name; raises ValueError when ``key_id`` is already stored. Bumps
        :meth:`api_keys_version`."""
        raise NotImplementedError(
            f"The {type(self).__name__} store cannot keep issued keys; use sqlite:// or "
            "redis:// to issue keys at run time."
        )

    async def update_api_key(
        self, key_id: str, doc: Mapping[str, Any], *, rev: int, active: bool
    ) -> bool:
        """Replace the document of ``key_id`` when its revision is still ``rev``
        (compare-and-set), making it ``rev + 1``; ``active`` False releases its name
        for a new key (a released name is never claimed back). Returns False, writing
        nothing, when the id is unknown or its revision moved. The name must not
        change. Bumps :meth:`api_keys_version`."""
        raise NotImplementedError(
            f"The {type(self).__name__} store cannot keep issued keys; use sqlite:// or "
            "redis:// to issue keys at run time."
        )

    async def api_keys(self) -> dict[str, dict[str, Any]]:
        """Every stored key document by id, each with its revision as ``rev`` (see
        :func:`proxy.store.keys_common.decode_key_docs`)."""
        return {}

    async def api_keys_version(self) -> int:
        """The count of key changes (0 for a store that never had one); compare it for
        inequality, not order, as :meth:`budget_specs_version`."""
        return 0
