"""Budgets: which ones apply to a request, their period windows, and reservations.

A budget (:class:`BudgetSpec`) caps spend in USD per calendar period and/or limits
requests and tokens per minute for the requests its scope matches. Budgets come from
the config's ``budgets:`` list (:func:`parse_budgets`) and are applied to requests by
:class:`proxy.budget_gate.BudgetGate`, which reserves before forwarding and settles
after (the guarantees and their limits are documented there).

Periods are computed here, from the caller's clock, and travel to the store inside
the budget key (:func:`budget_key`: ``<name>:<period id>``), so a new period is a new
key that starts at zero, with no job to run, and tests can roll periods by passing
``now``. The store's own clock is used only for reservation expiry and rate windows.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, Final, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from proxy.pricing import TOKENS_PER_RATE_UNIT, Price
from proxy.store.base import MAX_NANOS, BudgetState
from proxy.usage import Usage

__all__ = [
    "BudgetConfigError",
    "BudgetSpec",
    "BudgetStatus",
    "PeriodWindow",
    "RequestFacts",
    "Reservation",
    "budget_key",
    "matches",
    "parse_budget",
    "parse_budgets",
    "period_window",
    "rate_key",
    "worst_case_nanos",
]

Period = Literal["day", "week", "month", "total"]
PERIODS: Final = ("day", "week", "month", "total")
ENFORCE: Final = ("hard", "soft")
SCOPE_FIELDS: Final = ("key", "user", "team", "tag", "model")
_NANOS_PER_USD: Final = 1_000_000_000
_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_FIELDS: Final = frozenset(
    {"name", "scope", "limit_usd", "period", "timezone", "enforce"}
    | {"requests_per_minute", "tokens_per_minute"}
)


class BudgetConfigError(ValueError):
    """A budget in the configuration is invalid; the message names the field."""


@dataclass(frozen=True, slots=True)
class BudgetSpec:
    """One configured budget. ``scope`` maps fields of :data:`SCOPE_FIELDS` to the value
    a request must have (all must match; ``{}`` matches every request).
    ``limit_nanos`` None means no spend cap (a rate-limit-only budget)."""

    name: str
    scope: Mapping[str, str] = field(default_factory=dict)
    limit_nanos: int | None = None
    period: Period = "month"
    timezone: ZoneInfo = field(default_factory=lambda: ZoneInfo("UTC"))
    enforce: Literal["hard", "soft"] = "hard"
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What a scope can match: the caller's key name, user, team, tags, and the model
    as requested and as the catalog resolved it (either one matches)."""

    key: str
    user: str | None = None
    team: str | None = None
    tags: tuple[str, ...] = ()
    model: str | None = None
    canonical_model: str | None = None


@dataclass(frozen=True, slots=True)
class PeriodWindow:
    """A calendar period, ``start <= t < end``, and the id that names it in store keys.

    ``start`` and ``end`` are the local midnights of the budget's timezone given as
    UTC instants: subtracting two aware datetimes of one zoneinfo zone would compute
    wall-clock time and get DST days wrong. ``.astimezone(spec.timezone)`` shows them
    in local time. ``total`` has neither start nor end."""

    period_id: str
    start: datetime | None
    end: datetime | None


@dataclass(slots=True)
class Reservation:
    """Money held for one request; settle or release it exactly once.

    ``store_held`` is False when nothing is held in the store: no budget applied, or
    the store was unreachable and the policy let the request through (fail-open).
    ``soft_exceeded`` names the soft budgets this request takes over their limit.
    """

    id: str
    keys: tuple[str, ...]
    amount_nanos: int
    tokens: int
    created: float
    store_held: bool
    has_rates: bool = False
    soft_exceeded: tuple[str, ...] = ()
    done: bool = False


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    """One budget's current period, for ``metergate budgets list`` and the admin API."""

    spec: BudgetSpec
    window: PeriodWindow
    key: str
    state: BudgetState


def matches(spec: BudgetSpec, facts: RequestFacts) -> bool:
    """True when every field of the spec's scope matches the request."""
    for what, want in spec.scope.items():
        if what == "key":
            ok = facts.key == want
        elif what == "user":
            ok = facts.user == want
        elif what == "team":
            ok = facts.team == want
        elif what == "tag":
            ok = want in facts.tags
        else:  # model: case-insensitive, like the catalog's resolution
            names = {m.lower() for m in (facts.model, facts.canonical_model) if m}
            ok = want.lower() in names
        if not ok:
            return False
    return True


def _midnight(day: date, tz: ZoneInfo) -> datetime:
    """The first instant of ``day`` in ``tz``, in UTC. Where midnight falls in a DST
    gap, the wall time with fold=0 maps to the transition instant, i.e. the day's real
    start (01:00 local); an ambiguous midnight takes its first occurrence."""
    return datetime(day.year, day.month, day.day, tzinfo=tz).astimezone(UTC)


def period_window(spec: BudgetSpec, now: datetime | None = None) -> PeriodWindow:
    """The period of ``spec`` that contains ``now`` (aware; default: the current time).

    Ids: ``2026-11-22`` (day), ``2026-W47`` (ISO week, starting Monday; the ISO year
    can differ from the calendar year around New Year), ``2026-11`` (month),
    ``total``. Boundaries are local midnights, so a day can last 23 or 25 hours.
    """
    if spec.period == "total":
        return PeriodWindow("total", None, None)
    instant = datetime.now(UTC) if now is None else now
    if instant.tzinfo is None:
        raise ValueError("period_window needs an aware datetime; attach a timezone to now.")
    local = instant.astimezone(spec.timezone).date()
    if spec.period == "day":
        first, after, period_id = local, local + timedelta(days=1), local.isoformat()
    elif spec.period == "week":
        first = local - timedelta(days=local.weekday())
        after = first + timedelta(days=7)
        iso = local.isocalendar()
        period_id = f"{iso.year}-W{iso.week:02d}"
    else:
        first = local.replace(day=1)
        after = date(first.year + first.month // 12, first.month % 12 + 1, 1)
        period_id = f"{first.year:04d}-{first.month:02d}"
    return PeriodWindow(period_id, _midnight(first, spec.timezone), _midnight(after, spec.timezone))


def budget_key(spec: BudgetSpec, window: PeriodWindow) -> str:
    """The store key of a budget's period: ``<name>:<period id>``."""
    return f"{spec.name}:{window.period_id}"


def rate_key(spec: BudgetSpec, kind: Literal["rpm", "tpm"]) -> str:
    """The store key of a budget's rate limit: ``<name>:rpm`` or ``<name>:tpm``."""
    return f"{spec.name}:{kind}"


def worst_case_nanos(price: Price, input_tokens: int, output_tokens: int) -> int:
    """An upper bound of what a request can cost: the amount to reserve.

    Every input token at the dearest input-side rate (plain, 5-minute or 1-hour cache
    write: Anthropic's cache writes cost more than input) and every output token at
    the dearer of output and reasoning, in the price tier ``input_tokens`` selects.
    ``output_tokens`` is the request's max_tokens, or the model's output limit.
    """
    i, o = max(input_tokens, 0), max(output_tokens, 0)
    # The same as the largest cost_nanos over "no / all 5-minute / all 1-hour cache
    # writes" x "no / all reasoning" (the input and output choices are independent and
    # rounding up is monotonic), in one product per side instead of six costings.
    rates = price.rates_for(Usage(input=i))  # the tier depends on the input alone
    total = i * max(rates.input, rates.cache_write, rates.cache_write_1h) + o * max(
        rates.output, rates.reasoning
    )
    return (total + TOKENS_PER_RATE_UNIT - 1) // TOKENS_PER_RATE_UNIT


# ─────────────────────────────────── configuration ───────────────────────────────────


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BudgetConfigError(f"{where}: must be a whole number of at least 1, not {value!r}.")
    return value


def _limit_nanos(value: Any, where: str) -> int:
    """USD text or number to nano-USD, exactly (a YAML float goes through its text)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise BudgetConfigError(f"{where}: must be an amount in USD such as 100 or 12.50.")
    try:
        usd = Decimal(str(value).strip())
    except InvalidOperation:
        raise BudgetConfigError(f"{where}: {value!r} is not an amount in USD.") from None
    if not usd.is_finite() or usd < 0:
        raise BudgetConfigError(f"{where}: must be zero or more USD, not {value!r}.")
    nanos = usd * _NANOS_PER_USD
    if nanos != nanos.to_integral_value():
        raise BudgetConfigError(f"{where}: {value!r} is finer than a nano-dollar (9 decimals).")
    if nanos > MAX_NANOS:
        raise BudgetConfigError(f"{where}: {value!r} is over the largest budget, 9,007,199 USD.")
    return int(nanos)


def _choice(
    entry: Mapping[str, Any], name: str, choices: Sequence[str], default: str, where: str
) -> str:
    value = entry.get(name, default)
    if value not in choices:
        raise BudgetConfigError(
            f"{where}.{name}: must be one of {', '.join(choices)}, not {value!r}."
        )
    return str(value)


def _parse_one(entry: Any, where: str) -> BudgetSpec:
    if not isinstance(entry, Mapping):
        raise BudgetConfigError(f"{where}: must be a mapping with name, scope and limits.")
    unknown = sorted(set(entry) - _FIELDS)
    if unknown:
        raise BudgetConfigError(
            f"{where}: unknown field(s) {', '.join(map(str, unknown))}; allowed are "
            f"{', '.join(sorted(_FIELDS))}."
        )
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise BudgetConfigError(
            f"{where}.name: required, 1 to 64 letters, digits, '_', '.' or '-', not {name!r}."
        )
    scope = entry.get("scope")
    if not isinstance(scope, Mapping):
        raise BudgetConfigError(
            f"{where}.scope: required, e.g. {{team: search}}, or {{}} for every request."
        )
    for what, value in scope.items():
        if what not in SCOPE_FIELDS:
            raise BudgetConfigError(
                f"{where}.scope: cannot match on {what!r}; use {', '.join(SCOPE_FIELDS)}."
            )
        if not isinstance(value, str) or not value:
            raise BudgetConfigError(f"{where}.scope.{what}: must be a non-empty string.")
    tz_name = entry.get("timezone", "UTC")
    try:
        tz = ZoneInfo(str(tz_name))
    except (ZoneInfoNotFoundError, ValueError):
        raise BudgetConfigError(
            f"{where}.timezone: {tz_name!r} is not a known timezone; use a name such as "
            "UTC or Europe/Berlin."
        ) from None
    limit = entry.get("limit_usd")
    rpm, tpm = entry.get("requests_per_minute"), entry.get("tokens_per_minute")
    if limit is None and rpm is None and tpm is None:
        raise BudgetConfigError(
            f"{where}: sets no limit; give limit_usd, requests_per_minute or tokens_per_minute."
        )
    return BudgetSpec(
        name=name,
        scope=dict(scope),
        limit_nanos=None if limit is None else _limit_nanos(limit, f"{where}.limit_usd"),
        period=_choice(entry, "period", PERIODS, "month", where),  # type: ignore[arg-type]
        timezone=tz,
        enforce=_choice(entry, "enforce", ENFORCE, "hard", where),  # type: ignore[arg-type]
        requests_per_minute=None
        if rpm is None
        else _positive_int(rpm, f"{where}.requests_per_minute"),
        tokens_per_minute=None if tpm is None else _positive_int(tpm, f"{where}.tokens_per_minute"),
    )


def parse_budget(entry: Any, where: str) -> BudgetSpec:
    """One budget entry (a mapping as in the config's ``budgets:`` list); errors start
    with ``where``, e.g. ``budgets.search-monthly.limit_usd: ...``. Used for budgets
    changed at run time (:mod:`proxy.budget_specs`)."""
    return _parse_one(entry, where)


def parse_budgets(value: Any, where: str = "budgets") -> tuple[BudgetSpec, ...]:
    """Budgets from the config's ``budgets:`` list; errors name the field, e.g.
    ``budgets[0].limit_usd: ...``. Names must be unique."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise BudgetConfigError(f"{where}: must be a list of budgets.")
    specs = [_parse_one(entry, f"{where}[{i}]") for i, entry in enumerate(value)]
    seen: set[str] = set()
    for i, spec in enumerate(specs):
        if spec.name in seen:
            raise BudgetConfigError(f"{where}[{i}].name: the name {spec.name!r} is used twice.")
        seen.add(spec.name)
    return tuple(specs)
