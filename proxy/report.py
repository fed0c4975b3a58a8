"""Spend reports for ``metergate report``: reading the period, rendering the rows.

Money stays integer nano-dollars until the moment it is printed, and is printed
exactly (:func:`nanos_to_usd_str`); totals are integer sums of the printed rows, so a
TOTAL line always equals the sum of the lines above it.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from proxy.store.aggregate import ReportRow, validate_group_by

__all__ = [
    "FORMATS",
    "format_report",
    "nanos_to_usd_str",
    "parse_period",
    "sum_rows",
]

NANOS_PER_USD = 1_000_000_000

FORMATS = ("table", "csv", "json")
"""The output formats :func:`format_report` accepts."""

# (csv/json field name, table heading), in ReportRow order; cost is handled apart.
_METRICS: tuple[tuple[str, str], ...] = (
    ("requests", "requests"),
    ("estimated", "estimated"),
    ("input_tokens", "input"),
    ("cached_input_tokens", "cached"),
    ("cache_write_tokens", "cache_write"),
    ("output_tokens", "output"),
    ("reasoning_tokens", "reasoning"),
)

_DURATION = re.compile(r"(\d+)([mhdw])")
_UNIT_MS = {"m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 7 * 86_400_000}


def nanos_to_usd_str(nanos: int) -> str:
    """Nano-dollars as exact decimal US dollars, without floats.

    Trailing zeros are trimmed but at least two decimals are kept: 1234567 gives
    ``"0.001234567"``, 1_500_000_000 gives ``"1.50"``, 0 gives ``"0.00"``, -5 gives
    ``"-0.000000005"``. Used for reports and the ``X-Metergate-Cost-USD`` header.
    """
    if isinstance(nanos, bool) or not isinstance(nanos, int):
        # A float here means money was computed with floats somewhere upstream.
        raise TypeError(f"nanos must be an int, not {type(nanos).__name__}.")
    sign = "-" if nanos < 0 else ""
    whole, fraction = divmod(abs(nanos), NANOS_PER_USD)
    decimals = f"{fraction:09d}".rstrip("0").ljust(2, "0")
    return f"{sign}{whole}.{decimals}"


# -- periods -----------------------------------------------------------------------------


def _epoch_ms(moment: datetime) -> int:
    # Integer arithmetic on the timedelta: exact to the microsecond, unlike timestamp().
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def _parse_instant(text: str, option: str, now_ms: int) -> int:
    """One bound of a period as epoch milliseconds; a bare date is 00:00 UTC that day."""
    value = text.strip()
    duration = _DURATION.fullmatch(value)
    if duration is not None:
        amount = int(duration.group(1))
        if amount == 0:
            raise ValueError(f"{option} {text!r} is an empty duration; use e.g. 7d or 24h.")
        return now_ms - amount * _UNIT_MS[duration.group(2)]
    try:
        moment = datetime.fromisoformat(value)  # a bare date gives its midnight
    except ValueError:
        pass  # fall through to the one error message that says what is accepted
    else:
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return _epoch_ms(moment)
    raise ValueError(
        f"Cannot read {option} {text!r}. Use a duration back from now (30m, 24h, 7d, 2w), "
        "a date (2026-11-01), or a date and time (2026-11-01T09:30, UTC unless it carries "
        "an offset such as +02:00 or Z)."
    )


def parse_period(
    since: str | None, from_: str | None, to: str | None, now_ms: int
) -> tuple[int | None, int | None]:
    """The ``(since_ms, until_ms)`` window of ``--since`` / ``--from`` / ``--to``.

    ``since_ms`` is inclusive, ``until_ms`` exclusive, None means unbounded: like the
    store's ranges, ``--from 2026-11-01 --to 2026-12-01`` is November. Each option takes
    a duration back from ``now_ms`` (``30m``, ``24h``, ``7d``, ``2w``), an ISO date
    (00:00 UTC that day) or an ISO date-time (UTC unless an offset is given).
    ``--since`` and ``--from`` are synonyms; giving both, or a window that ends before
    it starts, is a ValueError.
    """
    if since is not None and from_ is not None:
        raise ValueError("Give either --since or --from, not both: they both set the start.")
    start_text, start_option = (since, "--since") if since is not None else (from_, "--from")
    since_ms = None if start_text is None else _parse_instant(start_text, start_option, now_ms)
    until_ms = None if to is None else _parse_instant(to, "--to", now_ms)
    if since_ms is not None and until_ms is not None and since_ms >= until_ms:
        raise ValueError(
            f"The report period is empty: {start_option} {start_text!r} is not before --to {to!r}."
        )
    return since_ms, until_ms


# -- rendering ---------------------------------------------------------------------------


def sum_rows(rows: Sequence[ReportRow]) -> ReportRow:
    """The integer sums of ``rows``, with an empty group.

    In a report grouped by ``tag``, a request with several tags is in several rows, so
    this sum can exceed the spend of the period; it is still the sum of the rows.
    """
    sums = [0] * 8
    for row in rows:
        for i, value in enumerate(_values(row)):
            sums[i] += value
    return ReportRow((), *sums)


def _values(row: ReportRow) -> tuple[int, ...]:
    return (
        row.requests,
        row.estimated,
        row.input_tokens,
        row.cached_input_tokens,
        row.cache_write_tokens,
        row.output_tokens,
        row.reasoning_tokens,
        row.cost_nanos,
    )


def format_report(rows: Sequence[ReportRow], group_by: Sequence[str], fmt: str = "table") -> str:
    """Render report rows as ``table``, ``csv`` or ``json`` text.

    - ``table``: aligned columns, costs in exact USD, then a TOTAL line.
    - ``csv``: a header and one line per row, with ``cost_usd`` and ``cost_nanos``; no
      total line, so that a spreadsheet SUM over a column is not doubled.
    - ``json``: ``{"group_by": [...], "rows": [...], "total": {...}}``; each row holds
      its group columns, the counts, ``cost_usd`` (exact decimal string) and
      ``cost_nanos`` (int); ``total`` holds the same sums without group columns.
    """
    columns = validate_group_by(group_by)
    for row in rows:
        if len(row.group) != len(columns):
            raise ValueError(
                f"A report row has {len(row.group)} group value(s) but group_by names "
                f"{len(columns)} column(s); format rows with the group_by that made them."
            )
    if fmt == "table":
        return _table(rows, columns)
    if fmt == "csv":
        return _csv(rows, columns)
    if fmt == "json":
        return _json(rows, columns)
    raise ValueError(f"Unknown report format {fmt!r}; use one of {', '.join(FORMATS)}.")


def _table(rows: Sequence[ReportRow], columns: tuple[str, ...]) -> str:
    # An ungrouped report still needs a column to carry the TOTAL label.
    labels = columns or ("scope",)
    headings = [*labels, *(heading for _, heading in _METRICS), "cost_usd"]
    right_aligned = [False] * len(labels) + [True] * (len(_METRICS) + 1)

    def cells(group: Sequence[str], row: ReportRow) -> list[str]:
        counts = [str(v) for v in _values(row)[:-1]]
        return [*group, *counts, nanos_to_usd_str(row.cost_nanos)]

    body = [cells(row.group or ("all",), row) for row in rows]
    total_label = ["TOTAL", *([""] * (len(labels) - 1))]
    total = cells(total_label, sum_rows(rows))
    # Costs keep their own number of decimals; padding them on the right lines up
    # the decimal points of the right-aligned column.
    decimals = max(len(line[-1].partition(".")[2]) for line in [*body, total])
    for line in [*body, total]:
        line[-1] += " " * (decimals - len(line[-1].partition(".")[2]))
    widths = [max(len(line[i]) for line in [headings, *body, total]) for i in range(len(headings))]

    def render(line: Sequence[str]) -> str:
        padded = (
            cell.rjust(width) if right else cell.ljust(width)
            for cell, width, right in zip(line, widths, right_aligned, strict=True)
        )
        return "  ".join(padded).rstrip()

    rule = "  ".join("-" * width for width in widths)
    lines = [render(headings), rule, *(render(line) for line in body), rule, render(total)]
    if "tag" in columns:
        lines.append("(a request with several tags counts under each, so TOTAL may exceed spend)")
    return "\n".join(lines) + "\n"


def _csv(rows: Sequence[ReportRow], columns: tuple[str, ...]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*columns, *(name for name, _ in _METRICS), "cost_usd", "cost_nanos"])
    for row in rows:
        values = _values(row)
        writer.writerow([*row.group, *values[:-1], nanos_to_usd_str(row.cost_nanos), values[-1]])
    return out.getvalue()


def _metrics_object(row: ReportRow) -> dict[str, Any]:
    values = _values(row)
    obj: dict[str, Any] = {name: v for (name, _), v in zip(_METRICS, values, strict=False)}
    obj["cost_usd"] = nanos_to_usd_str(row.cost_nanos)
    obj["cost_nanos"] = row.cost_nanos
    return obj


def _json(rows: Sequence[ReportRow], columns: tuple[str, ...]) -> str:
    document = {
        "group_by": list(columns),
        "rows": [
            {**dict(zip(columns, row.group, strict=True)), **_metrics_object(row)} for row in rows
        ],
        "total": _metrics_object(sum_rows(rows)),
    }
    return orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n"
