"""Report aggregation in pure Python: the reference every backend's ``report()`` must match.

A report groups ledger records by some of :data:`GROUP_COLUMNS` and sums their
requests, tokens and cost. SQL backends push the same computation into the database;
the contract suite (``tests/test_store_contract.py``) checks that they return exactly
what :func:`aggregate` returns for the same records.

Grouping rules, which every backend follows:

- a missing value (``None``) is shown as :data:`NONE_LABEL`;
- ``key`` is the record's ``key_name``; ``status`` is the HTTP status as text;
- ``day`` is the UTC calendar date of ``ts_ms``, ``YYYY-MM-DD``;
- ``tag`` expands a record into one group per *distinct* tag, so a request tagged
  ``a,b`` counts under both ``a`` and ``b`` (the sums of a tag report can therefore
  exceed the grand total); an untagged request counts under :data:`NONE_LABEL`;
- rows are sorted by cost, largest first, then by group values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import product

from proxy.ledger import LedgerRecord

__all__ = [
    "GROUP_COLUMNS",
    "NONE_LABEL",
    "ReportRow",
    "aggregate",
    "day_of",
    "report_sort_key",
    "validate_group_by",
]

GROUP_COLUMNS: tuple[str, ...] = (
    "team",
    "key",
    "user",
    "end_user",
    "model",
    "upstream",
    "endpoint",
    "tag",
    "day",
    "status",
)
"""The names a report can be grouped by."""

NONE_LABEL = "(none)"
"""How a missing value (no team, no user, no tag...) appears in a report group."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class ReportRow:
    """The sums for one group of a report.

    ``group`` holds one value per requested group column, in the requested order.
    ``estimated`` counts requests whose usage was not exact. Token counts follow
    :class:`proxy.ledger.LedgerRecord`; ``cost_nanos`` is integer nano-dollars.
    """

    group: tuple[str, ...]
    requests: int
    estimated: int
    input_tokens: int
    cached_input_tokens: int
    cache_write_tokens: int
    output_tokens: int
    reasoning_tokens: int
    cost_nanos: int


def validate_group_by(group_by: Sequence[str]) -> tuple[str, ...]:
    """Check that ``group_by`` names known columns, each once; return it as a tuple.

    Raises ValueError naming the bad column and the valid ones.
    """
    if isinstance(group_by, str):
        # A bare string is a sequence of characters; grouping by "t", "e", "a", "m"
        # is never what the caller meant.
        raise ValueError(
            f"group_by must be a sequence of column names, not the string {group_by!r}; "
            f"pass ({group_by!r},) instead."
        )
    seen: set[str] = set()
    for column in group_by:
        if column not in GROUP_COLUMNS:
            raise ValueError(
                f"Cannot group a report by {column!r}: it is not a report column. "
                f"Valid columns are: {', '.join(GROUP_COLUMNS)}."
            )
        if column in seen:
            raise ValueError(f"The report column {column!r} is listed twice in group_by.")
        seen.add(column)
    return tuple(group_by)


def day_of(ts_ms: int) -> str:
    """The UTC date ``YYYY-MM-DD`` of a millisecond timestamp.

    Integer timedelta arithmetic floors correctly for every millisecond, including
    the last one of a day and times before 1970, as SQLite's ``date()`` does.
    """
    return (_EPOCH + timedelta(milliseconds=ts_ms)).date().isoformat()


def _label(value: str | None) -> str:
    return NONE_LABEL if value is None else value


def _distinct_tags(record: LedgerRecord) -> tuple[str, ...]:
    # A request counts once per tag even if the caller repeated a tag.
    return tuple(dict.fromkeys(record.tags)) or (NONE_LABEL,)


# How each column is read from a record: always a tuple of values, because ``tag``
# may give several (or, for an untagged request, just NONE_LABEL).
_EXTRACTORS: dict[str, Callable[[LedgerRecord], tuple[str, ...]]] = {
    "team": lambda r: (_label(r.team),),
    "key": lambda r: (r.key_name,),
    "user": lambda r: (_label(r.user),),
    "end_user": lambda r: (_label(r.end_user),),
    "model": lambda r: (r.model,),
    "upstream": lambda r: (r.upstream,),
    "endpoint": lambda r: (r.endpoint,),
    "tag": _distinct_tags,
    "day": lambda r: (day_of(r.ts_ms),),
    "status": lambda r: (str(r.status),),
}
assert tuple(_EXTRACTORS) == GROUP_COLUMNS


def report_sort_key(row: ReportRow) -> tuple[int, tuple[str, ...]]:
    """Largest cost first; ties broken by the group values so output is deterministic."""
    return (-row.cost_nanos, row.group)


def aggregate(records: Iterable[LedgerRecord], group_by: Sequence[str]) -> list[ReportRow]:
    """Group ``records`` by the ``group_by`` columns and sum each group.

    See the module docstring for the grouping rules. An empty ``group_by`` gives a
    single row of grand totals (or no row when there are no records).
    """
    columns = validate_group_by(group_by)
    extractors = [_EXTRACTORS[c] for c in columns]
    # Per group: requests, estimated, input, cached, cache_write, output, reasoning, cost.
    sums: dict[tuple[str, ...], list[int]] = {}
    for record in records:
        values = (
            record.input_tokens,
            record.cached_input_tokens,
            record.cache_write_tokens,
            record.output_tokens,
            record.reasoning_tokens,
            record.cost_nanos,
        )
        for group in product(*(extract(record) for extract in extractors)):
            acc = sums.get(group)
            if acc is None:
                acc = sums[group] = [0] * 8
            acc[0] += 1
            acc[1] += 0 if record.exact else 1
            for i, value in enumerate(values, start=2):
                acc[i] += value
    rows = [ReportRow(group, *acc) for group, acc in sums.items()]
    rows.sort(key=report_sort_key)
    return rows
