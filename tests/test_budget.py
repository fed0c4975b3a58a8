"""Budgets without a store: config parsing, scope matching, calendar windows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from proxy.budget import (
    BudgetConfigError,
    BudgetSpec,
    RequestFacts,
    budget_key,
    matches,
    parse_budgets,
    period_window,
    rate_key,
    worst_case_nanos,
)
from proxy.pricing import Catalog, cost_nanos
from proxy.usage import Usage

ISSUE_EXAMPLE: list[dict[str, Any]] = [
    {
        "name": "search-monthly",
        "scope": {"team": "search"},
        "limit_usd": 100,
        "period": "month",
        "timezone": "Europe/Berlin",
        "enforce": "hard",
    },
    {"name": "alice-rpm", "scope": {"user": "alice"}, "requests_per_minute": 60},
]


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


# -- parsing ---------------------------------------------------------------------------


def test_the_issue_example_parses() -> None:
    monthly, rpm = parse_budgets(ISSUE_EXAMPLE)
    assert monthly == BudgetSpec(
        name="search-monthly",
        scope={"team": "search"},
        limit_nanos=100_000_000_000,
        period="month",
        timezone=ZoneInfo("Europe/Berlin"),
        enforce="hard",
    )
    assert (rpm.limit_nanos, rpm.requests_per_minute, rpm.period, rpm.timezone.key) == (
        None,
        60,
        "month",
        "UTC",
    )


@pytest.mark.parametrize(
    ("value", "nanos"),
    [(100, 100 * 10**9), ("12.50", 12_500_000_000), (0.1, 100_000_000), ("0.000000001", 1)],
)
def test_limits_convert_exactly(value: object, nanos: int) -> None:
    (spec,) = parse_budgets([{"name": "b", "scope": {}, "limit_usd": value}])
    assert spec.limit_nanos == nanos


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"limit_usd": "lots"}, r"^budgets\[0\]\.limit_usd: 'lots' is not an amount in USD\."),
        ({"limit_usd": -1}, r"^budgets\[0\]\.limit_usd: must be zero or more USD"),
        ({"limit_usd": "0.0000000001"}, r"^budgets\[0\]\.limit_usd: .* finer than a nano-dollar"),
        ({"limit_usd": 10**7}, r"^budgets\[0\]\.limit_usd: .* over the largest budget"),
        ({"limit_usd": True}, r"^budgets\[0\]\.limit_usd: must be an amount"),
        ({"period": "year"}, r"^budgets\[0\]\.period: must be one of day, week, month, total"),
        ({"enforce": "maybe"}, r"^budgets\[0\]\.enforce: must be one of hard, soft"),
        ({"timezone": "Mars/Olympus"}, r"^budgets\[0\]\.timezone: 'Mars/Olympus' is not a known"),
        ({"scope": {"org": "x"}}, r"^budgets\[0\]\.scope: cannot match on 'org'"),
        ({"scope": {"team": 3}}, r"^budgets\[0\]\.scope\.team: must be a non-empty string"),
        ({"scope": None}, r"^budgets\[0\]\.scope: required"),
        ({"name": "has space"}, r"^budgets\[0\]\.name: required, 1 to 64"),
        ({"requests_per_minute": 0}, r"^budgets\[0\]\.requests_per_minute: must be a whole"),
        ({"limits": 5}, r"^budgets\[0\]: unknown field\(s\) limits"),
    ],
)
def test_errors_name_the_field(change: dict[str, Any], message: str) -> None:
    entry = {"name": "b", "scope": {}, "limit_usd": 1, **change}
    with pytest.raises(BudgetConfigError, match=message):
        parse_budgets([entry])


def test_more_config_errors() -> None:
    with pytest.raises(BudgetConfigError, match=r"^budgets\[1\]\.name: .*'b' is used twice"):
        parse_budgets([{"name": "b", "scope": {}, "limit_usd": 1}] * 2)
    with pytest.raises(BudgetConfigError, match=r"^budgets\[0\]: sets no limit"):
        parse_budgets([{"name": "b", "scope": {}}])
    with pytest.raises(BudgetConfigError, match="must be a list"):
        parse_budgets({"name": "b"})
    assert parse_budgets(None) == ()


# -- scopes ----------------------------------------------------------------------------


FACTS = RequestFacts(
    key="app-a",
    user="alice",
    team="search",
    tags=("batch", "eu"),
    model="GPT-4o-2024-08-06",
    canonical_model="gpt-4o",
)


@pytest.mark.parametrize(
    ("scope", "expected"),
    [
        ({}, True),
        ({"team": "search"}, True),
        ({"team": "support"}, False),
        ({"key": "app-a", "user": "alice"}, True),
        ({"key": "app-a", "user": "bob"}, False),
        ({"tag": "eu"}, True),
        ({"tag": "us"}, False),
        ({"model": "gpt-4o"}, True),  # the catalog's name
        ({"model": "gpt-4o-2024-08-06"}, True),  # the requested name, any case
        ({"model": "gpt-4o-mini"}, False),
    ],
)
def test_scope_matching(scope: dict[str, str], expected: bool) -> None:
    assert matches(BudgetSpec("b", scope=scope, limit_nanos=1), FACTS) is expected


def test_a_caller_without_team_matches_no_team_scope() -> None:
    assert not matches(BudgetSpec("b", scope={"team": "x"}), RequestFacts(key="k"))


# -- calendar windows ------------------------------------------------------------------


def spec(period: str, tz: str = "UTC") -> BudgetSpec:
    return BudgetSpec("b", limit_nanos=1, period=period, timezone=ZoneInfo(tz))  # type: ignore[arg-type]


def test_month_in_berlin_starts_at_local_midnight() -> None:
    # 23:30 UTC on 30 November is already 1 December in Berlin.
    window = period_window(spec("month", "Europe/Berlin"), utc(2026, 11, 30, 23, 30))
    assert window.period_id == "2026-12"
    assert window.start == utc(2026, 11, 30, 23)
    assert window.end == utc(2026, 12, 31, 23)
    assert window.start is not None
    assert window.start.astimezone(ZoneInfo("Europe/Berlin")).isoformat() == (
        "2026-12-01T00:00:00+01:00"
    )
    assert budget_key(spec("month", "Europe/Berlin"), window) == "b:2026-12"


def test_dst_makes_days_and_months_shorter_or_longer() -> None:
    berlin = spec("day", "Europe/Berlin")
    spring = period_window(berlin, utc(2026, 3, 29, 12))
    autumn = period_window(berlin, utc(2026, 10, 25, 12))
    assert spring.start is not None and spring.end is not None
    assert autumn.start is not None and autumn.end is not None
    assert spring.end - spring.start == timedelta(hours=23)
    assert autumn.end - autumn.start == timedelta(hours=25)
    march = period_window(spec("month", "Europe/Berlin"), utc(2026, 3, 15))
    assert march.start is not None and march.end is not None
    assert march.end - march.start == timedelta(days=31, hours=-1)
    assert march.end.astimezone(ZoneInfo("Europe/Berlin")).isoformat() == (
        "2026-04-01T00:00:00+02:00"
    )


def test_a_day_whose_midnight_does_not_exist_starts_at_the_transition() -> None:
    # Santiago skips from 00:00 to 01:00 on 6 September 2026.
    window = period_window(spec("day", "America/Santiago"), utc(2026, 9, 6, 12))
    assert window.start is not None
    local_start = window.start.astimezone(ZoneInfo("America/Santiago"))
    assert local_start.isoformat() == "2026-09-06T01:00:00-03:00"
    previous = period_window(spec("day", "America/Santiago"), utc(2026, 9, 5, 12))
    assert previous.end == window.start  # no gap, no overlap


@pytest.mark.parametrize(
    ("now", "period_id", "monday"),
    [
        (utc(2026, 11, 22, 12), "2026-W47", "2026-11-16"),  # a Sunday
        (utc(2026, 11, 23, 0), "2026-W48", "2026-11-23"),  # Monday, midnight
        (utc(2026, 12, 31, 12), "2026-W53", "2026-12-28"),
        (utc(2027, 1, 3, 12), "2026-W53", "2026-12-28"),  # ISO year differs
        (utc(2027, 1, 4, 12), "2027-W01", "2027-01-04"),
    ],
)
def test_weeks_start_on_monday_with_iso_ids(now: datetime, period_id: str, monday: str) -> None:
    window = period_window(spec("week"), now)
    assert window.period_id == period_id
    assert window.start is not None and window.start.date().isoformat() == monday  # UTC zone
    assert window.end == window.start + timedelta(days=7)


def test_day_and_total_ids() -> None:
    assert period_window(spec("day", "Asia/Tokyo"), utc(2026, 11, 21, 15)).period_id == "2026-11-22"
    total = period_window(spec("total"), utc(2026, 1, 1))
    assert (total.period_id, total.start, total.end) == ("total", None, None)


def test_windows_need_an_aware_time_and_default_to_now() -> None:
    with pytest.raises(ValueError, match="aware datetime"):
        period_window(spec("day"), datetime(2026, 1, 1))
    window = period_window(spec("day"))
    assert window.start is not None and window.end is not None
    assert window.start <= datetime.now(UTC) < window.end


def test_rate_keys() -> None:
    assert rate_key(spec("day"), "rpm") == "b:rpm"
    assert rate_key(spec("day"), "tpm") == "b:tpm"


# -- the amount to reserve -----------------------------------------------------------


def test_worst_case_covers_every_way_the_tokens_can_be_billed() -> None:
    catalog = Catalog.load()
    for model in ("gpt-4o", "claude-sonnet-4-5-20250929", "o3", "gpt-4o-mini"):
        price = catalog.resolve(model)
        assert price is not None, model
        bound = worst_case_nanos(price, 1_000, 500)
        for usage in (
            Usage(input=1_000, output=500),
            Usage(input=1_000, output=500, reasoning=500),
            Usage(input=1_000, output=500, cached_input=1_000),
            Usage(input=1_000, output=500, cache_write=1_000),
            Usage(input=1_000, output=500, cache_write=1_000, cache_write_1h=1_000),
        ):
            assert cost_nanos(price, usage) <= bound, (model, usage)
    claude = catalog.resolve("claude-sonnet-4-5-20250929")
    assert claude is not None
    # Anthropic cache writes cost more than plain input: the bound uses them.
    assert worst_case_nanos(claude, 1_000, 0) > cost_nanos(claude, Usage(input=1_000, output=0))
