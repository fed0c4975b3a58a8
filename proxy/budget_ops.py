"""Budget administration shared by ``metergate budgets`` and the admin API.

Every operation reads the store named in the config directly, so it works whether or
not a proxy runs, and its result is what every replica applies within a second (see
:class:`proxy.budget_specs.SpecWatcher`). :func:`budget_view` is the one JSON view of
a budget's status; the CLI prints it as a table or as JSON, the admin API returns it.

View fields: ``name``, ``source`` (``config``, ``run-time`` or ``override``: a config
budget changed at run time), ``scope``, ``period``, ``timezone``, ``enforce``,
``limit_usd``, ``spent_usd``, ``reserved_usd`` (held by requests in flight),
``remaining_usd``, ``percent_spent``, ``period_id``, ``period_start`` and
``period_reset`` (ISO 8601 in the budget's timezone; null for ``total``), the same
amounts in nano-USD (``*_nanos``), ``requests_per_minute``, ``tokens_per_minute``.
Amounts are exact decimal text. A budget without ``limit_usd`` only limits rates: its
amounts and period fields are null.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Literal

from proxy.budget import BudgetConfigError, BudgetSpec, PeriodWindow, budget_key, period_window
from proxy.budget_specs import (
    TOMBSTONE,
    MergedBudgets,
    Source,
    apply_changes,
    is_tombstone,
    merge_budgets,
)
from proxy.report import nanos_to_usd_str
from proxy.store.base import BudgetState, Store

__all__ = [
    "BudgetAdminError",
    "budget_view",
    "delete_budget",
    "list_budgets",
    "load_budgets",
    "reset_budget",
    "revert_budget",
    "set_budget",
    "show_budget",
]


class BudgetAdminError(Exception):
    """A budget operation that cannot be done; ``code`` and ``status`` are what the
    admin API answers (the CLI prints the message)."""

    def __init__(self, message: str, *, code: str, status: int) -> None:
        super().__init__(message)
        self.message, self.code, self.status = message, code, status


def _invalid(name: str, exc: BudgetConfigError) -> BudgetAdminError:
    # The parser's message starts with the field path (budgets.NAME.field: ...).
    return BudgetAdminError(
        f"The budget {name!r} was not changed. {exc}", code="invalid_budget", status=400
    )


def budget_view(
    spec: BudgetSpec, source: Source, window: PeriodWindow | None, state: BudgetState | None
) -> dict[str, Any]:
    """The JSON view of one budget (fields in the module docstring). ``window`` and
    ``state`` are None for a budget without a spend limit."""
    limit = spec.limit_nanos
    capped = limit is not None and window is not None and state is not None
    view: dict[str, Any] = {
        "name": spec.name,
        "source": source,
        "scope": dict(spec.scope),
        "period": spec.period,
        "timezone": str(spec.timezone),
        "enforce": spec.enforce,
        "limit_usd": None if limit is None else nanos_to_usd_str(limit),
        "spent_usd": None,
        "reserved_usd": None,
        "remaining_usd": None,
        "percent_spent": None,
        "period_id": None,
        "period_start": None,
        "period_reset": None,
        "limit_nanos": limit,
        "spent_nanos": None,
        "reserved_nanos": None,
        "requests_per_minute": spec.requests_per_minute,
        "tokens_per_minute": spec.tokens_per_minute,
    }
    if capped:
        assert limit is not None and window is not None and state is not None
        spent, reserved = state.spent_nanos, state.reserved_nanos
        percent = None
        if limit > 0:
            ratio = Decimal(spent * 100) / Decimal(limit)
            percent = float(ratio.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))
        tz = spec.timezone
        view.update(
            spent_usd=nanos_to_usd_str(spent),
            reserved_usd=nanos_to_usd_str(reserved),
            remaining_usd=nanos_to_usd_str(max(0, limit - spent - reserved)),
            percent_spent=percent,
            period_id=window.period_id,
            period_start=None if window.start is None else window.start.astimezone(tz).isoformat(),
            period_reset=None if window.end is None else window.end.astimezone(tz).isoformat(),
            spent_nanos=spent,
            reserved_nanos=reserved,
        )
    return view


async def _views(
    store: Store, merged: MergedBudgets, specs: Sequence[BudgetSpec], now: datetime | None
) -> list[dict[str, Any]]:
    """Views of ``specs`` with their counters, read in one store call."""
    windows = {s.name: period_window(s, now) for s in specs if s.limit_nanos is not None}
    keys = {s.name: budget_key(s, windows[s.name]) for s in specs if s.name in windows}
    states = await store.budget_states(list(keys.values())) if keys else {}
    return [
        budget_view(
            spec,
            merged.sources[spec.name],
            windows.get(spec.name),
            states.get(keys[spec.name]) if spec.name in keys else None,
        )
        for spec in specs
    ]


async def load_budgets(store: Store, config_specs: Sequence[BudgetSpec]) -> MergedBudgets:
    """The budgets in force now: the config merged with the store's documents."""
    return merge_budgets(config_specs, await store.budget_specs())


async def list_budgets(
    store: Store, config_specs: Sequence[BudgetSpec], now: datetime | None = None
) -> dict[str, Any]:
    """``{"budgets": [view...], "hidden": [name...], "invalid": [{"name", "error"}...]}``:
    every budget in force, the config budgets deleted at run time, and stored documents
    that were skipped because they do not validate."""
    merged = await load_budgets(store, config_specs)
    return {
        "budgets": await _views(store, merged, merged.specs, now),
        "hidden": list(merged.hidden),
        "invalid": [{"name": n, "error": e} for n, e in sorted(merged.invalid.items())],
    }


def _not_found(merged: MergedBudgets, name: str) -> BudgetAdminError:
    if name in merged.hidden:
        return BudgetAdminError(
            f"The budget {name!r} is declared in the config but was deleted at run time; "
            f"`metergate budgets revert {name}` brings it back.",
            code="budget_deleted",
            status=404,
        )
    if name in merged.invalid:
        return BudgetAdminError(
            f"The run-time budget {name!r} is not valid and is ignored: "
            f"{merged.invalid[name]} Set it again, or delete it.",
            code="budget_invalid",
            status=404,
        )
    return BudgetAdminError(
        f"There is no budget named {name!r}; `metergate budgets list` shows them all.",
        code="not_found",
        status=404,
    )


async def show_budget(
    store: Store, config_specs: Sequence[BudgetSpec], name: str, now: datetime | None = None
) -> dict[str, Any]:
    """The view of one budget in force; raises :class:`BudgetAdminError` (404)."""
    merged = await load_budgets(store, config_specs)
    spec = merged.get(name)
    if spec is None:
        raise _not_found(merged, name)
    return (await _views(store, merged, [spec], now))[0]


@dataclass(frozen=True, slots=True)
class SetResult:
    """What :func:`set_budget` did: the budget's view after, and whether it is new."""

    view: dict[str, Any]
    created: bool


async def set_budget(
    store: Store,
    config_specs: Sequence[BudgetSpec],
    name: str,
    changes: Mapping[str, Any],
    now: datetime | None = None,
) -> SetResult:
    """Create a run-time budget, or change the given fields of the budget in force (a
    config budget deleted at run time starts again from its config entry).

    Concurrent ``set`` calls on one name are last-writer-wins over the whole document.
    """
    if not changes:
        raise BudgetAdminError(
            f"Nothing to change for {name!r}: give at least one field, such as limit_usd.",
            code="invalid_budget",
            status=400,
        )
    merged = await load_budgets(store, config_specs)
    current = merged.get(name) or next((s for s in config_specs if s.name == name), None)
    try:
        doc, _ = apply_changes(name, current, changes)
    except BudgetConfigError as exc:
        raise _invalid(name, exc) from None
    await store.put_budget_spec(name, doc)
    return SetResult(await show_budget(store, config_specs, name, now), created=current is None)


async def delete_budget(
    store: Store, config_specs: Sequence[BudgetSpec], name: str
) -> tuple[Literal["deleted", "hidden"], str]:
    """Delete a run-time budget, or hide a config budget with a tombstone. Returns
    what was done and a sentence saying so."""
    if any(spec.name == name for spec in config_specs):
        docs = await store.budget_specs()
        if name in docs and is_tombstone(docs[name]):
            raise BudgetAdminError(
                f"The config budget {name!r} is already deleted at run time.",
                code="budget_deleted",
                status=404,
            )
        await store.put_budget_spec(name, TOMBSTONE)
        return "hidden", (
            f"The budget {name!r} is declared in the config file, so it was hidden on every "
            "replica with a tombstone in the store. Remove it from the config to delete it "
            f"for good, or run `metergate budgets revert {name}` to bring it back."
        )
    if await store.delete_budget_spec(name):
        return "deleted", f"The run-time budget {name!r} was deleted on every replica."
    raise BudgetAdminError(
        f"There is no budget named {name!r}; `metergate budgets list` shows them all.",
        code="not_found",
        status=404,
    )


async def revert_budget(store: Store, config_specs: Sequence[BudgetSpec], name: str) -> str:
    """Drop the run-time change (override or tombstone) of a config budget, so that its
    config entry applies again. Returns a sentence saying what happened."""
    if not any(spec.name == name for spec in config_specs):
        raise BudgetAdminError(
            f"The budget {name!r} is not in the config, so there is nothing to revert to; "
            f"`metergate budgets delete {name}` deletes a run-time budget.",
            code="not_in_config",
            status=409,
        )
    if not await store.delete_budget_spec(name):
        raise BudgetAdminError(
            f"The budget {name!r} has no run-time change; it is already as in the config.",
            code="not_changed",
            status=409,
        )
    return f"The budget {name!r} is back to its config entry on every replica."


async def reset_budget(
    store: Store, config_specs: Sequence[BudgetSpec], name: str, now: datetime | None = None
) -> dict[str, Any]:
    """Zero the spend of the budget's current period. Holds of requests in flight stay
    (their settles still balance). Returns ``{"before": view, "after": view}``."""
    merged = await load_budgets(store, config_specs)
    spec = merged.get(name)
    if spec is None:
        raise _not_found(merged, name)
    if spec.limit_nanos is None:
        raise BudgetAdminError(
            f"The budget {name!r} has no spend limit (it only limits rates), so there is "
            "no spend to reset.",
            code="no_spend_limit",
            status=409,
        )
    window = period_window(spec, now)
    (before,) = await _views(store, merged, [spec], now)
    await store.reset_budget(budget_key(spec, window))
    (after,) = await _views(store, merged, [spec], now)
    return {"before": before, "after": after}
