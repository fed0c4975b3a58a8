"""Reports: reading the period, exact money text, and the three output formats."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.report import format_report, nanos_to_usd_str, parse_period, sum_rows
from proxy.store.aggregate import ReportRow

NOW = datetime(2026, 11, 15, 12, 0, tzinfo=UTC)
NOW_MS = int(NOW.timestamp()) * 1000
MIN = 60_000
HOUR = 60 * MIN
DAY = 24 * HOUR


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp() * 1000)


# -- money -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nanos", "text"),
    [
        (0, "0.00"),
        (1, "0.000000001"),
        (1_234_567, "0.001234567"),
        (10_000_000, "0.01"),
        (1_000_000_000, "1.00"),
        (1_500_000_000, "1.50"),
        (123_456_789_012, "123.456789012"),
        (-5, "-0.000000005"),
        (-1_500_000_000, "-1.50"),
        (10**30 + 1, "1000000000000000000000.000000001"),
    ],
)
def test_nanos_to_usd_str(nanos: int, text: str) -> None:
    assert nanos_to_usd_str(nanos) == text


@given(st.integers(min_value=-(10**20), max_value=10**20))
def test_nanos_to_usd_str_is_exact(nanos: int) -> None:
    text = nanos_to_usd_str(nanos)
    assert Decimal(text) * 10**9 == nanos
    assert 2 <= len(text.split(".")[1]) <= 9


@pytest.mark.parametrize("bad", [1.5, True, Decimal("1")])
def test_nanos_to_usd_str_refuses_non_integers(bad: object) -> None:
    with pytest.raises(TypeError, match="must be an int"):
        nanos_to_usd_str(bad)  # type: ignore[arg-type]


# -- periods -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("since", "from_", "to", "expected"),
    [
        (None, None, None, (None, None)),
        ("7d", None, None, (NOW_MS - 7 * DAY, None)),
        ("24h", None, None, (NOW_MS - 24 * HOUR, None)),
        ("30m", None, None, (NOW_MS - 30 * MIN, None)),
        ("2w", None, None, (NOW_MS - 14 * DAY, None)),
        (" 7d ", None, None, (NOW_MS - 7 * DAY, None)),
        (None, "2026-11-01", None, (ms("2026-11-01T00:00+00:00"), None)),
        # Half-open, like the store's ranges: this is November.
        (None, "2026-11-01", "2026-12-01", (ms("2026-11-01T00:00Z"), ms("2026-12-01T00:00Z"))),
        (None, "2026-11-01T09:30", None, (ms("2026-11-01T09:30Z"), None)),
        (None, "2026-11-01 09:30:15.250", None, (ms("2026-11-01T09:30:15.250Z"), None)),
        (None, "2026-11-01T09:30+02:00", None, (ms("2026-11-01T07:30Z"), None)),
        (None, "2026-11-01T09:30Z", None, (ms("2026-11-01T09:30Z"), None)),
        (None, None, "2026-11-10T00:00", (None, ms("2026-11-10T00:00Z"))),
        ("2w", None, "1d", (NOW_MS - 14 * DAY, NOW_MS - DAY)),
        ("2026-11-01", None, None, (ms("2026-11-01T00:00Z"), None)),
    ],
)
def test_parse_period(
    since: str | None,
    from_: str | None,
    to: str | None,
    expected: tuple[int | None, int | None],
) -> None:
    assert parse_period(since, from_, to, NOW_MS) == expected


@pytest.mark.parametrize(
    ("since", "from_", "to", "message"),
    [
        ("7x", None, None, r"Cannot read --since '7x'\. Use a duration back from now"),
        ("", None, None, "Cannot read --since ''"),
        ("-7d", None, None, "Cannot read --since"),
        ("7 d", None, None, "Cannot read --since"),
        ("0d", None, None, "empty duration"),
        (None, "2026-13-01", None, "Cannot read --from '2026-13-01'"),
        (None, None, "yesterday", "Cannot read --to 'yesterday'"),
        ("7d", "2026-11-01", None, "either --since or --from"),
        (None, "2026-11-10", "2026-11-09", "period is empty"),
        (None, "2026-11-10", "2026-11-10", "period is empty"),
        (None, "2026-11-10T00:00", "2026-11-10T00:00", "period is empty"),
    ],
)
def test_parse_period_errors(
    since: str | None, from_: str | None, to: str | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        parse_period(since, from_, to, NOW_MS)


# -- formats -----------------------------------------------------------------------------

ROWS = [
    ReportRow(("search", "gpt-4o"), 1200, 3, 5_000_000, 100, 0, 200_000, 0, 12_345_678_901),
    ReportRow(("(none)", "claude-sonnet-4"), 7, 0, 9_000, 0, 4_000, 300, 12, 1_234_567),
    ReportRow(("support", "gpt-4o-mini"), 42, 42, 10, 0, 0, 1, 0, 0),
]
GROUP_BY = ("team", "model")


def test_table() -> None:
    # Numbers right-aligned, cost decimal points lined up, TOTAL = exact column sums.
    assert format_report(ROWS, GROUP_BY, "table") == (
        "team     model            requests  estimated    input  cached  cache_write"
        "  output  reasoning      cost_usd\n"
        "-------  ---------------  --------  ---------  -------  ------  -----------"
        "  ------  ---------  ------------\n"
        "search   gpt-4o               1200          3  5000000     100            0"
        "  200000          0  12.345678901\n"
        "(none)   claude-sonnet-4         7          0     9000       0         4000"
        "     300         12   0.001234567\n"
        "support  gpt-4o-mini            42         42       10       0            0"
        "       1          0   0.00\n"
        "-------  ---------------  --------  ---------  -------  ------  -----------"
        "  ------  ---------  ------------\n"
        "TOTAL                         1249         45  5009010     100         4000"
        "  200301         12  12.346913468\n"
    )


def test_table_without_groups_and_with_tags() -> None:
    total = sum_rows(ROWS)
    text = format_report([total], [], "table")
    assert text.splitlines()[0].startswith("scope  requests")
    assert text.splitlines()[2].startswith("all        1249")
    assert text.splitlines()[-1].startswith("TOTAL      1249")
    tagged = format_report([ReportRow(("a",), *[1] * 8)], ["tag"], "table")
    assert "counts under each" in tagged.splitlines()[-1]


def test_empty_table_has_a_zero_total() -> None:
    lines = format_report([], ["team"], "table").splitlines()
    assert len(lines) == 4
    assert lines[-1].split() == ["TOTAL", "0", "0", "0", "0", "0", "0", "0", "0.00"]


def test_csv_has_exact_costs_and_no_total_row() -> None:
    text = format_report(ROWS, GROUP_BY, "csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == [
        "team",
        "model",
        "requests",
        "estimated",
        "input_tokens",
        "cached_input_tokens",
        "cache_write_tokens",
        "output_tokens",
        "reasoning_tokens",
        "cost_usd",
        "cost_nanos",
    ]
    assert len(rows) == len(ROWS)
    assert rows[1]["team"] == "(none)"
    assert rows[1]["cost_usd"] == "0.001234567"
    assert sum(int(r["cost_nanos"]) for r in rows) == sum(r.cost_nanos for r in ROWS)


def test_csv_quotes_awkward_group_values() -> None:
    text = format_report([ReportRow(('a,"b"',), *[0] * 8)], ["tag"], "csv")
    assert next(csv.reader(io.StringIO(text.splitlines()[1])))[0] == 'a,"b"'


def test_json_rows_and_totals() -> None:
    document = json.loads(format_report(ROWS, GROUP_BY, "json"))
    assert document["group_by"] == ["team", "model"]
    assert document["rows"][0] == {
        "team": "search",
        "model": "gpt-4o",
        "requests": 1200,
        "estimated": 3,
        "input_tokens": 5_000_000,
        "cached_input_tokens": 100,
        "cache_write_tokens": 0,
        "output_tokens": 200_000,
        "reasoning_tokens": 0,
        "cost_usd": "12.345678901",
        "cost_nanos": 12_345_678_901,
    }
    assert document["total"]["cost_nanos"] == 12_346_913_468
    assert document["total"]["cost_usd"] == "12.346913468"
    assert document["total"]["requests"] == 1249


@given(
    st.lists(
        st.integers(min_value=0, max_value=10**17).map(
            lambda c: ReportRow(("g",), 1, 0, 0, 0, 0, 0, 0, c)
        ),
        max_size=50,
    )
)
def test_totals_are_the_exact_sum_of_the_rows(rows: list[ReportRow]) -> None:
    exact = sum(r.cost_nanos for r in rows)
    assert json.loads(format_report(rows, ["tag"], "json"))["total"]["cost_nanos"] == exact
    total_line = format_report(rows, ["tag"], "table").splitlines()[-2]
    assert total_line.split()[-1] == nanos_to_usd_str(exact)


def test_format_errors() -> None:
    with pytest.raises(ValueError, match="Unknown report format 'xml'; use one of table, csv"):
        format_report(ROWS, GROUP_BY, "xml")
    with pytest.raises(ValueError, match="has 2 group value"):
        format_report(ROWS, ["team"], "csv")
    with pytest.raises(ValueError, match="Valid columns"):
        format_report(ROWS, ["team", "colour"], "csv")
