"""The reserve/settle algorithm in pure Python: the reference every backend follows.

The memory and SQLite stores run these functions inside their one critical section (a
synchronous block, a ``BEGIN IMMEDIATE`` transaction) over a :class:`BudgetTx`, the
small accessor each backend implements. The Redis script (``lua/budget_v2.lua``) is
the twin of :func:`reserve`, :func:`settle` and :func:`release`, applied to a batch of
them one after the other in one atomic step; the contract suite checks that all
backends answer alike.

Every step is read all, check all, write all: nothing is written before every check
has passed, so a refusal leaves no trace.

Units: money in integer nano-USD; time in integer microseconds of the store's clock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

from proxy.store.base import BudgetState, RateItem, ReserveItem, ReserveResult

__all__ = [
    "RATE_WINDOW_US",
    "SWEEP_LIMIT",
    "BudgetTx",
    "Held",
    "release",
    "reserve",
    "settle",
    "states",
    "sweep",
]

RATE_WINDOW_US: Final = 60_000_000
"""A rate limit's bucket holds one minute's worth of units."""

SWEEP_LIMIT: Final = 64
"""Expired reservations released per call: bounds the work (and, on Redis, the time the
server is blocked) of one call; a backlog is worked off over the next calls."""


@dataclass(slots=True)
class Held:
    """A reservation in flight: what it holds on each budget and rate limit."""

    budgets: dict[str, int]  # budget key -> nano-USD held
    rates: dict[str, tuple[int, int, bool]] = field(default_factory=dict)
    # rate key -> (units taken, per_minute, adjustable)
    expires_us: int = 0


class BudgetTx(Protocol):
    """State access inside one atomic section of a backend."""

    def budget(self, key: str) -> BudgetState:
        """Counters of a key, zeros when unknown."""

    def add(self, key: str, spent: int, reserved: int) -> None:
        """Add (possibly negative) amounts to a key's counters."""

    def reset(self, key: str) -> None:
        """Set a key's ``spent`` to zero."""

    def held(self, rid: str) -> Held | None:
        """The reservation in flight under this id, if any."""

    def hold(self, rid: str, held: Held) -> None:
        """Remember a reservation until ``held.expires_us``."""

    def drop(self, rid: str) -> None:
        """Forget a reservation."""

    def expired(self, now_us: int, limit: int) -> list[tuple[str, Held]]:
        """Up to ``limit`` reservations whose expiry is at or before ``now_us``."""

    def is_done(self, rid: str, now_us: int) -> bool:
        """True when the id was settled or released and is still remembered."""

    def mark_done(self, rid: str, until_us: int) -> None:
        """Remember that the id was settled or released, until ``until_us``."""

    def prune_done(self, now_us: int, limit: int) -> None:
        """Forget up to ``limit`` done ids whose retention has passed."""

    def tat(self, key: str) -> int | None:
        """A rate limit's theoretical arrival time (GCRA), or None when unknown."""

    def set_tat(self, key: str, tat_us: int) -> None:
        """Store a rate limit's theoretical arrival time."""


def _increment_us(units: int, per_minute: int) -> int:
    """Bucket time that ``units`` occupy, rounded away from zero (a refund rounds down)."""
    magnitude = -(-abs(units) * RATE_WINDOW_US // per_minute)
    return magnitude if units >= 0 else -(abs(units) * RATE_WINDOW_US // per_minute)


def sweep(tx: BudgetTx, now_us: int) -> int:
    """Release reservations whose ttl has passed; return how many.

    The expired reservation's id is *not* marked done: its request may still settle
    late, and that settle must charge its actual cost.
    """
    expired = tx.expired(now_us, SWEEP_LIMIT)
    for rid, held in expired:
        for key, amount in held.budgets.items():
            tx.add(key, 0, -amount)
        tx.drop(rid)
    tx.prune_done(now_us, SWEEP_LIMIT)
    return len(expired)


def reserve(
    tx: BudgetTx,
    rid: str,
    items: Sequence[ReserveItem],
    rates: Sequence[RateItem],
    ttl_us: int,
    now_us: int,
) -> ReserveResult:
    """Check every budget and rate limit, then hold on all of them or on none."""
    sweep(tx, now_us)
    if tx.held(rid) is not None:
        return ReserveResult(ok=True)  # a retried call: already held, hold nothing more
    if tx.is_done(rid, now_us):
        return ReserveResult(ok=False, kind="duplicate")
    # Read all, check all.
    soft: list[str] = []
    for item in items:
        state = tx.budget(item.key)
        if item.limit_nanos is None:
            continue
        if state.spent_nanos + state.reserved_nanos + item.amount_nanos > item.limit_nanos:
            if item.hard:
                return ReserveResult(ok=False, kind="budget", key=item.key, state=state)
            soft.append(item.key)
    new_tats: list[tuple[str, int]] = []
    for rate in rates:
        increment = _increment_us(rate.units, rate.per_minute)
        tat = max(tx.tat(rate.key) or now_us, now_us)
        new_tat = tat + increment
        if new_tat - now_us > RATE_WINDOW_US:
            never = increment > RATE_WINDOW_US
            retry = None if never else (new_tat - RATE_WINDOW_US - now_us) / 1e6
            return ReserveResult(ok=False, kind="rate", key=rate.key, retry_after_s=retry)
        new_tats.append((rate.key, new_tat))
    # Write all.
    for item in items:
        tx.add(item.key, 0, item.amount_nanos)
    for key, new_tat in new_tats:
        tx.set_tat(key, new_tat)
    tx.hold(
        rid,
        Held(
            budgets={item.key: item.amount_nanos for item in items},
            rates={r.key: (r.units, r.per_minute, r.adjustable) for r in rates},
            expires_us=now_us + ttl_us,
        ),
    )
    return ReserveResult(ok=True, soft_exceeded=tuple(soft))


def _adjust_rates(tx: BudgetTx, held: Held, now_us: int, units_of: dict[str, int]) -> None:
    """Move each rate limit's bucket by ``new units - units taken``."""
    for key, (units, per_minute, _) in held.rates.items():
        delta = units_of.get(key, units) - units
        if delta:
            tat = max(tx.tat(key) or now_us, now_us)
            tx.set_tat(key, tat + _increment_us(delta, per_minute))


def settle(
    tx: BudgetTx,
    rid: str,
    actual: int | Mapping[str, int],
    keys: Sequence[str],
    tokens: int | None,
    now_us: int,
    retention_us: int,
) -> bool:
    """Drop the holds of ``rid`` and charge the actual cost, unless ``rid`` is done."""
    sweep(tx, now_us)
    if tx.is_done(rid, now_us):
        return False
    held = tx.held(rid)
    if isinstance(actual, Mapping):
        charges = dict(actual)
    else:
        targets = keys or (tuple(held.budgets) if held is not None else ())
        charges = dict.fromkeys(targets, actual)
    if held is not None:
        for key, amount in held.budgets.items():
            tx.add(key, 0, -amount)
        if tokens is not None:
            _adjust_rates(
                tx, held, now_us, {k: tokens for k, (_, _, adj) in held.rates.items() if adj}
            )
        tx.drop(rid)
    for key, amount in charges.items():
        tx.add(key, amount, 0)
    tx.mark_done(rid, now_us + retention_us)
    return True


def release(tx: BudgetTx, rid: str, now_us: int, retention_us: int) -> bool:
    """Drop the holds of ``rid`` and give its rate units back; mark it done."""
    sweep(tx, now_us)
    if tx.is_done(rid, now_us):
        return False
    held = tx.held(rid)
    tx.mark_done(rid, now_us + retention_us)
    if held is None:
        return False
    for key, amount in held.budgets.items():
        tx.add(key, 0, -amount)
    _adjust_rates(tx, held, now_us, dict.fromkeys(held.rates, 0))
    tx.drop(rid)
    return True


def states(tx: BudgetTx, keys: Sequence[str], now_us: int) -> dict[str, BudgetState]:
    """Counters of each key after sweeping expired reservations."""
    sweep(tx, now_us)
    return {key: tx.budget(key) for key in keys}
