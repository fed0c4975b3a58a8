"""The admin read API for spend: ``metergate report`` and ``metergate ledger`` over HTTP.

::

    GET /admin/spend              grouped sums, optionally filtered and bucketed in time
    GET /admin/ledger             the newest records of a period (bounded by ``limit``)
    GET /admin/ledger/{id}        one record by request id (404 when unknown)

``/admin/spend`` query parameters:

- ``group_by``: comma list of :data:`proxy.store.aggregate.GROUP_COLUMNS` (default
  ``team``, as ``metergate report``; empty for one row of totals).
- ``since`` (or ``from``) and ``until``: as the CLI's ``--since``/``--from``/``--to``
  (:func:`proxy.report.parse_period`): ``24h``, ``7d``, ``2026-11-01``,
  ``2026-11-01T09:30Z``. ``since`` is inclusive, ``until`` exclusive.
- filters ``team``, ``model``, ``upstream``, ``key``, ``user``, ``tag``, ``endpoint``,
  ``status``: repeat a parameter for "any of" (``team=a&team=b``); ``(none)`` matches
  a missing value. A request matches ``tag=x`` when x is one of its tags.
- ``bucket``: ``5m``, ``1h``, ``1d``... (units s, m, h, d, w); each row then carries
  ``series``, one point per bucket of the period (zeros included), buckets aligned on
  multiples of the bucket length since the epoch (UTC). At most
  :data:`MAX_BUCKETS` buckets, and :data:`MAX_POINTS` groups times buckets, per answer.

Amounts are given twice: ``cost_usd`` (exact decimal text) and ``cost_nanos`` (int).
Rows and totals equal ``metergate report --format json`` for the same period.

The OpenAPI fragment of these endpoints is in :mod:`proxy.admin_spend_openapi`.

Cost of a query: without filters or bucket the store aggregates (in SQL on SQLite);
with them, the records of the period are read and summed here, so give a ``since``
on a large ledger. The ledger listing is read the same way and then cut to ``limit``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from aiohttp import web
from multidict import MultiMapping

from proxy.admin_auth import Handler, error_response, ok_response
from proxy.ledger import LedgerRecord
from proxy.report import nanos_to_usd_str, parse_period, sum_rows
from proxy.store.aggregate import (
    NONE_LABEL,
    ReportRow,
    aggregate,
    validate_group_by,
)
from proxy.store.base import Store

__all__ = [
    "DEFAULT_LEDGER_LIMIT",
    "FILTERS",
    "MAX_BUCKETS",
    "MAX_LEDGER_LIMIT",
    "MAX_POINTS",
    "SUMS",
    "record_json",
    "setup_admin_spend",
]

Guard = Callable[..., Handler]  # proxy.admin._Admin.guarded(handler, read_only=...)

MAX_BUCKETS: Final = 2_000
"""The most time buckets one ``/admin/spend`` answer holds (a year of 5-hour buckets)."""

MAX_POINTS: Final = 50_000
"""The most points (groups times buckets) one answer holds: about 12 MB of JSON."""

DEFAULT_LEDGER_LIMIT: Final = 100
MAX_LEDGER_LIMIT: Final = 1_000

DEFAULT_LEDGER_SINCE: Final = "1h"
"""The listing's period when no ``since`` is given, as ``metergate ledger list``."""

_BUCKET = re.compile(r"([0-9]{1,12})([smhdw])")
_MAX_BUCKET_MS: Final = 366 * 86_400_000
_DIGITS = re.compile(r"[0-9]{1,9}")
# Instants the API can show as ISO 8601: the years 1 to 9999.
_MIN_MS: Final = -62_135_596_800_000
_MAX_MS: Final = 253_402_300_799_999
_BUCKET_MS = {"s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}

SUMS: Final = (
    "requests",
    "estimated",
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
)
"""The integer sums of every row and point (with ``cost_usd`` and ``cost_nanos``)."""


def _label(value: str | None) -> str:
    return NONE_LABEL if value is None else value


# How a filter reads a record: the set of values the record has for that column (the
# same labels a report groups by, so a value seen in a report can be used as a filter).
_FILTER_VALUES: dict[str, Callable[[LedgerRecord], set[str]]] = {
    "team": lambda r: {_label(r.team)},
    "model": lambda r: {r.model},
    "upstream": lambda r: {r.upstream},
    "key": lambda r: {r.key_name},
    "user": lambda r: {_label(r.user)},
    "end_user": lambda r: {_label(r.end_user)},
    "endpoint": lambda r: {r.endpoint},
    "status": lambda r: {str(r.status)},
    "tag": lambda r: set(r.tags) or {NONE_LABEL},
}
FILTERS: Final = tuple(_FILTER_VALUES)
"""The query parameters that filter records."""


class QueryError(ValueError):
    """A query parameter that cannot be used; answered with 400 ``invalid_query``."""


# -- parsing --------------------------------------------------------------------------


def _period(
    query: MultiMapping[str], now_ms: int, default_since: str | None
) -> tuple[int | None, int | None]:
    since, from_, until = query.get("since"), query.get("from"), query.get("until")
    if since is None and from_ is None:
        since = default_since
    try:
        since_ms, until_ms = parse_period(since, from_, until, now_ms)
    except (ValueError, OverflowError) as exc:
        # The CLI's messages name its options; name this API's parameters instead.
        message = str(exc).replace("--since", "since").replace("--from", "from")
        raise QueryError(message.replace("--to", "until")) from None
    for bound in (since_ms, until_ms):
        if bound is not None and not _MIN_MS <= bound <= _MAX_MS:
            raise QueryError("since and until must fall within the years 1 to 9999.")
    return since_ms, until_ms


def _group_by(query: MultiMapping[str]) -> tuple[str, ...]:
    text = query.get("group_by", "team")
    try:
        return validate_group_by([c.strip() for c in text.split(",") if c.strip()])
    except ValueError as exc:
        raise QueryError(str(exc)) from None


def _filters(query: MultiMapping[str]) -> dict[str, frozenset[str]]:
    return {name: frozenset(query.getall(name)) for name in FILTERS if name in query}


def _bucket_ms(query: MultiMapping[str]) -> int | None:
    text = query.get("bucket")
    if text is None or text == "":
        return None
    match = _BUCKET.fullmatch(text.strip())
    if match is None or int(match.group(1)) == 0:
        raise QueryError(
            f"Cannot read bucket {text!r}: use a length such as 5m, 1h or 1d (units s, m, h, d, w)."
        )
    return int(match.group(1)) * _BUCKET_MS[match.group(2)]


def _int_param(query: MultiMapping[str], name: str, default: int, most: int) -> int:
    text = query.get(name)
    if text is None:
        return default
    if _DIGITS.fullmatch(text) is None or not 1 <= int(text) <= most:
        raise QueryError(f"{name} must be a whole number from 1 to {most}, not {text!r}.")
    return int(text)


# -- rendering --------------------------------------------------------------------------


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
    return moment.isoformat().replace("+00:00", "Z")


def _sums(row: ReportRow) -> dict[str, Any]:
    out: dict[str, Any] = {name: getattr(row, name) for name in SUMS}
    out["cost_usd"] = nanos_to_usd_str(row.cost_nanos)
    out["cost_nanos"] = row.cost_nanos
    return out


def record_json(record: LedgerRecord) -> dict[str, Any]:
    """One ledger record as JSON: every field, ``cost_usd`` and the time in ISO 8601
    (the same fields as ``metergate ledger show``, plus ``time``)."""
    data = record.to_dict()
    data["cost_usd"] = nanos_to_usd_str(record.cost_nanos)
    data["time"] = _iso(record.ts_ms)
    return data


def _matches(record: LedgerRecord, filters: dict[str, frozenset[str]]) -> bool:
    return all(_FILTER_VALUES[name](record) & wanted for name, wanted in filters.items())


def _bucket_starts(
    records: Sequence[LedgerRecord],
    since_ms: int | None,
    until_ms: int | None,
    size: int,
    now_ms: int,
) -> list[int]:
    """Every bucket start of the period, oldest first (the records' span when the
    period is open); empty when there is nothing to show."""
    if since_ms is None and not records:
        return []
    first = since_ms if since_ms is not None else records[0].ts_ms
    if until_ms is not None:
        end = until_ms
    else:
        end = max(now_ms, records[-1].ts_ms + 1) if records else now_ms
    # Floor, also for times before 1970; kept within what ISO 8601 text can show.
    start = max(first - first % size, _MIN_MS)
    count = -(-(end - start) // size)
    if count > MAX_BUCKETS:
        raise QueryError(
            f"The period holds {count} buckets; the most is {MAX_BUCKETS}. "
            "Use a longer bucket or a shorter period (since/until)."
        )
    return [start + i * size for i in range(max(count, 0))]


def _series(
    records: Sequence[LedgerRecord],
    group_by: tuple[str, ...],
    starts: list[int],
    size: int,
) -> dict[tuple[str, ...], list[dict[str, Any]]]:
    """Per group, one point per bucket: the same sums as the rows, split in time."""
    by_bucket: dict[int, list[LedgerRecord]] = {}
    first = starts[0] if starts else 0
    for record in records:
        by_bucket.setdefault(first + (record.ts_ms - first) // size * size, []).append(record)
    per_bucket = {
        start: {row.group: row for row in aggregate(rs, group_by)}
        for start, rs in by_bucket.items()
    }
    groups = {group for rows in per_bucket.values() for group in rows}
    if len(groups) * len(starts) > MAX_POINTS:
        raise QueryError(
            f"The answer would hold {len(groups)} groups of {len(starts)} buckets; the most "
            f"is {MAX_POINTS} points. Use a longer bucket, a shorter period or a filter."
        )
    zero = ReportRow((), 0, 0, 0, 0, 0, 0, 0, 0)
    labels = [(start, _iso(start)) for start in starts]
    return {
        group: [
            {"start_ms": start, "start": text, **_sums(per_bucket.get(start, {}).get(group, zero))}
            for start, text in labels
        ]
        for group in groups
    }


# -- handlers ---------------------------------------------------------------------------


async def spend(request: web.Request, store: Store) -> web.Response:
    """``GET /admin/spend``: see the module docstring."""
    query = request.query
    now_ms = time.time_ns() // 1_000_000
    try:
        group_by = _group_by(query)
        since_ms, until_ms = _period(query, now_ms, None)
        filters = _filters(query)
        size = _bucket_ms(query)
        if not filters and size is None:
            rows = await store.report(group_by, since_ms, until_ms)
            series = None
            starts: list[int] = []
        else:
            records = [
                r for r in await store.ledger_records(since_ms, until_ms) if _matches(r, filters)
            ]
            rows = aggregate(records, group_by)
            if size is not None:
                starts = _bucket_starts(records, since_ms, until_ms, size, now_ms)
                series = _series(records, group_by, starts, size)
            else:
                series, starts = None, []
    except QueryError as exc:
        return error_response(400, "invalid_query", str(exc))
    body: dict[str, Any] = {
        "group_by": list(group_by),
        "since": _iso(since_ms),
        "until": _iso(until_ms),
        "since_ms": since_ms,
        "until_ms": until_ms,
        "filters": {name: sorted(values) for name, values in filters.items()},
        "bucket_ms": size,
        "buckets": starts if size is not None else None,
        "rows": [],
        "total": _sums(sum_rows(rows)),
    }
    for row in rows:
        item: dict[str, Any] = {**dict(zip(group_by, row.group, strict=True)), **_sums(row)}
        if series is not None:
            item["series"] = series[row.group]
        body["rows"].append(item)
    return ok_response(body)


async def ledger_list(request: web.Request, store: Store) -> web.Response:
    """``GET /admin/ledger``: the newest ``limit`` records of the period, newest first."""
    query = request.query
    try:
        since_ms, until_ms = _period(query, time.time_ns() // 1_000_000, DEFAULT_LEDGER_SINCE)
        limit = _int_param(query, "limit", DEFAULT_LEDGER_LIMIT, MAX_LEDGER_LIMIT)
        filters = _filters(query)
    except QueryError as exc:
        return error_response(400, "invalid_query", str(exc))
    records = [r for r in await store.ledger_records(since_ms, until_ms) if _matches(r, filters)]
    newest = records[::-1][:limit]
    return ok_response(
        {
            "since": _iso(since_ms),
            "until": _iso(until_ms),
            "limit": limit,
            "matched": len(records),
            "truncated": len(records) > limit,
            "records": [record_json(r) for r in newest],
        }
    )


async def ledger_show(request: web.Request, store: Store) -> web.Response:
    """``GET /admin/ledger/{request_id}``."""
    request_id = request.match_info["request_id"]
    record = await store.get_ledger_record(request_id)
    if record is None:
        return error_response(
            404,
            "not_found",
            f"There is no ledger record with the request id {request_id!r}; the id is the "
            "X-Metergate-Request-Id header of the response.",
        )
    return ok_response(record_json(record))


def setup_admin_spend(router: web.UrlDispatcher, guarded: Guard) -> None:
    """Register the spend and ledger routes; ``guarded`` is the admin API's decorator
    (credentials, store, store errors). ``/admin/spend`` is read by ``/ui``, so it also
    accepts the /ui session; the ledger, which names callers, needs the token."""
    router.add_get("/admin/spend", guarded(spend, read_only=True))
    router.add_get("/admin/ledger", guarded(ledger_list))
    router.add_get("/admin/ledger/{request_id}", guarded(ledger_show))
