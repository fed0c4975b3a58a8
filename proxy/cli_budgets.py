"""``metergate budgets list|show|set|delete|revert|reset``: budgets at run time.

The commands read the config (``--config``) for the store URL and the config budgets,
and work on the store directly (see :mod:`proxy.budget_ops`); every proxy replica on
that store applies a change within about a second, without a restart.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson

from proxy.budget import BudgetSpec
from proxy.budget_ops import (
    BudgetAdminError,
    delete_budget,
    list_budgets,
    reset_budget,
    revert_budget,
    set_budget,
    show_budget,
)
from proxy.errors import StoreUnavailable
from proxy.settings import load_settings
from proxy.store import open_store
from proxy.store.base import Store

__all__ = ["add_budget_commands", "format_table", "parse_scope"]

_T = TypeVar("_T")
_SubParsers = argparse._SubParsersAction  # argparse has no public name for it
_PER_PROCESS = "memory"  # a store private to each process: run-time changes cannot reach it


def add_budget_commands(sub: _SubParsers[argparse.ArgumentParser], config_default: str) -> None:
    """Register ``metergate budgets ...`` on the top-level subparsers."""
    budgets = sub.add_parser("budgets", help="list budgets; change them at run time")
    actions = budgets.add_subparsers(required=True, metavar="ACTION")

    def action(name: str, help_text: str, func: Callable[[argparse.Namespace], int]) -> Any:
        p = actions.add_parser(name, help=help_text)
        p.add_argument(
            "--config", "-c", default=config_default, help=f"config file (default {config_default})"
        )
        p.set_defaults(func=func)
        return p

    lst = action("list", "every budget: spent, reserved, limit, period reset", _list)
    lst.add_argument("--format", choices=("table", "json"), default="table")
    show = action("show", "one budget, with where it comes from", _show)
    show.add_argument("name")
    show.add_argument("--format", choices=("table", "json"), default="table")
    st = action("set", "create a run-time budget, or change fields of one", _set)
    st.add_argument("name")
    st.add_argument(
        "--limit-usd", help="spend cap in USD per period, e.g. 100 or 12.50 (none removes it)"
    )
    st.add_argument(
        "--scope",
        action="append",
        metavar="FIELD=VALUE",
        help="key, user, team, tag or model; repeat to require several; all: every request",
    )
    st.add_argument("--period", choices=("day", "week", "month", "total"))
    st.add_argument("--timezone", help="IANA name for the period boundaries, e.g. Europe/Berlin")
    st.add_argument("--enforce", choices=("hard", "soft"))
    st.add_argument("--rpm", help="requests per minute (none removes the limit)")
    st.add_argument("--tpm", help="tokens per minute (none removes the limit)")
    dl = action("delete", "delete a run-time budget (a config one is hidden)", _delete)
    dl.add_argument("name")
    rv = action("revert", "drop the run-time change of a config budget", _revert)
    rv.add_argument("name")
    rs = action("reset", "zero the spend of a budget's current period", _reset)
    rs.add_argument("name")
    rs.add_argument("--yes", action="store_true", help="confirm the reset")


# -- plumbing ------------------------------------------------------------------------------


def _run(
    args: argparse.Namespace,
    op: Callable[[Store, tuple[BudgetSpec, ...]], Awaitable[_T]],
    *,
    writes: bool,
) -> _T | None:
    """Open the config's store, run ``op(store, config budgets)``, close the store.
    Prints operational errors (exit status 1) and returns None for them; invalid input
    is raised as ValueError (exit status 2)."""
    settings = load_settings(args.config)
    scheme = settings.store.split("://", 1)[0].lower()
    if scheme == _PER_PROCESS:
        message = "The store is memory://, which lives inside each proxy process; " + (
            "run-time budget changes need a shared store (sqlite:///... or redis://...)."
            if writes
            else "the counters shown here are this command's own, always zero."
        )
        print(f"metergate: {message}", file=sys.stderr)
        if writes:
            return None

    return run_on_store(settings.store, lambda store: op(store, settings.budgets))


def run_on_store(store_url: str, op: Callable[[Store], Awaitable[_T]]) -> _T | None:
    """Open the store, run ``op(store)``, close the store (the CLI's ``budgets`` and
    ``keys`` commands). Operational errors (a :class:`BudgetAdminError`, which key errors
    are too, or an unreachable store) are printed and give None (exit status 1); invalid
    input (status 400) is raised as ValueError (exit status 2)."""

    async def run() -> _T:
        store = open_store(store_url)
        await store.open()
        try:
            return await op(store)
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except BudgetAdminError as exc:
        if exc.status == 400:  # bad input: main() prints it and exits with status 2
            raise ValueError(exc.message) from None
        print(f"metergate: {exc.message}", file=sys.stderr)
    except StoreUnavailable as exc:
        print(f"metergate: {exc.message}", file=sys.stderr)
    return None


def dumps_json(value: Any) -> str:
    """Indented JSON, as ``--json`` prints it."""
    return orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()


def parse_scope(values: list[str]) -> dict[str, str]:
    """``["team=search", "tag=x"]`` as a scope mapping; ``["all"]`` is ``{}``."""
    if values == ["all"]:
        return {}
    scope: dict[str, str] = {}
    for item in values:
        field, sep, value = item.partition("=")
        if not sep or not field.strip() or not value.strip():
            raise ValueError(
                f"--scope {item!r} is not FIELD=VALUE; write e.g. --scope team=search, "
                "or --scope all to match every request."
            )
        if field.strip() in scope:
            raise ValueError(f"--scope names {field.strip()!r} twice; give each field once.")
        scope[field.strip()] = value.strip()
    return scope


def _optional_int(text: str | None, flag: str) -> int | None:
    if text is None or text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{flag} must be a whole number or none, not {text!r}.") from None


def _changes(args: argparse.Namespace) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    if args.limit_usd is not None:
        changes["limit_usd"] = None if args.limit_usd.lower() == "none" else args.limit_usd
    if args.scope is not None:
        changes["scope"] = parse_scope(args.scope)
    for flag, field in (("period", "period"), ("timezone", "timezone"), ("enforce", "enforce")):
        if getattr(args, flag) is not None:
            changes[field] = getattr(args, flag)
    if args.rpm is not None:
        changes["requests_per_minute"] = _optional_int(args.rpm, "--rpm")
    if args.tpm is not None:
        changes["tokens_per_minute"] = _optional_int(args.tpm, "--tpm")
    return changes


# -- output --------------------------------------------------------------------------------


def _scope_text(scope: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in scope.items()) or "(all)"


def _when(iso: str | None) -> str:
    # 2026-12-01T00:00:00+01:00 -> 2026-12-01 00:00+01:00: short, still unambiguous.
    return "-" if iso is None else iso[:10] + " " + iso[11:16] + iso[19:]


def _dash(value: Any) -> str:
    return "-" if value is None else str(value)


_COLUMNS = ("NAME", "SOURCE", "SCOPE", "PERIOD", "ENFORCE", "LIMIT $", "SPENT $", "RESERVED $",
            "SPENT %", "STARTED", "RESETS", "RPM", "TPM")  # fmt: skip


def format_table(listing: dict[str, Any]) -> str:
    """The table ``metergate budgets list`` prints, with notes on hidden and invalid
    run-time budgets below it."""
    rows = [
        (
            v["name"],
            v["source"],
            _scope_text(v["scope"]),
            v["period"] + (f" {v['period_id']}" if v["period_id"] else ""),
            v["enforce"] if v["limit_usd"] is not None else "-",
            _dash(v["limit_usd"]),
            _dash(v["spent_usd"]),
            _dash(v["reserved_usd"]),
            _dash(v["percent_spent"]),
            _when(v["period_start"]),
            _when(v["period_reset"]),
            _dash(v["requests_per_minute"]),
            _dash(v["tokens_per_minute"]),
        )
        for v in listing["budgets"]
    ]
    lines: list[str] = []
    if rows:
        widths = [max(len(str(c)) for c in col) for col in zip(_COLUMNS, *rows, strict=True)]
        for row in (_COLUMNS, *rows):
            lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    else:
        lines.append("No budgets: none in the config, none set at run time.")
    if listing["hidden"]:
        lines.append(
            "Deleted at run time (config budgets): " + ", ".join(listing["hidden"])
            + "; `metergate budgets revert NAME` brings one back."
        )  # fmt: skip
    for bad in listing["invalid"]:
        lines.append(f"Ignored, not valid: {bad['name']}: {bad['error']}")
    return "\n".join(line.rstrip() for line in lines)


def _format_one(view: dict[str, Any]) -> str:
    source = {
        "config": "config",
        "run-time": "run-time (set with `metergate budgets set`)",
        "override": "config, overridden at run time (`metergate budgets revert` undoes it)",
    }[view["source"]]
    pairs = [
        ("name", view["name"]), ("source", source), ("scope", _scope_text(view["scope"])),
        ("period", view["period"]), ("timezone", view["timezone"]), ("enforce", view["enforce"]),
        ("limit", _usd(view["limit_usd"])), ("spent", _usd(view["spent_usd"])),
        ("reserved", _usd(view["reserved_usd"])), ("remaining", _usd(view["remaining_usd"])),
        ("spent %", _dash(view["percent_spent"])), ("period id", _dash(view["period_id"])),
        ("period start", _dash(view["period_start"])),
        ("period reset", _dash(view["period_reset"])),
        ("requests/min", _dash(view["requests_per_minute"])),
        ("tokens/min", _dash(view["tokens_per_minute"])),
    ]  # fmt: skip
    return "\n".join(f"{label + ':':<14}{value}" for label, value in pairs)


def _usd(text: str | None) -> str:
    return "-" if text is None else f"${text}"


# -- commands ------------------------------------------------------------------------------


def _list(args: argparse.Namespace) -> int:
    listing = _run(args, list_budgets, writes=False)
    if listing is None:
        return 1
    print(dumps_json(listing) if args.format == "json" else format_table(listing))
    return 0


def _show(args: argparse.Namespace) -> int:
    view = _run(args, lambda s, c: show_budget(s, c, args.name), writes=False)
    if view is None:
        return 1
    print(dumps_json(view) if args.format == "json" else _format_one(view))
    return 0


def _set(args: argparse.Namespace) -> int:
    changes = _changes(args)
    result = _run(args, lambda s, c: set_budget(s, c, args.name, changes), writes=True)
    if result is None:
        return 1
    verb = "Created" if result.created else "Changed"
    print(f"{verb} the budget {args.name!r}; every replica applies it within a second.")
    print(_format_one(result.view))
    return 0


def _delete(args: argparse.Namespace) -> int:
    done = _run(args, lambda s, c: delete_budget(s, c, args.name), writes=True)
    if done is None:
        return 1
    print(done[1])
    return 0


def _revert(args: argparse.Namespace) -> int:
    message = _run(args, lambda s, c: revert_budget(s, c, args.name), writes=True)
    if message is None:
        return 1
    print(message)
    return 0


def _reset(args: argparse.Namespace) -> int:
    if not args.yes:
        view = _run(args, lambda s, c: show_budget(s, c, args.name), writes=False)
        if view is None:
            return 1
        if view["limit_usd"] is None:
            print(
                f"metergate: The budget {args.name!r} has no spend limit (it only limits "
                "rates), so there is no spend to reset.",
                file=sys.stderr,
            )
            return 1
        print(
            f"This sets the spend of {args.name!r} in its current period "
            f"({_dash(view['period_id'])}, {_usd(view['spent_usd'])} spent) back to zero, "
            "for every replica. Run the command again with --yes to do it.",
            file=sys.stderr,
        )
        return 1
    done = _run(args, lambda s, c: reset_budget(s, c, args.name), writes=True)
    if done is None:
        return 1
    before, after = done["before"], done["after"]
    print(
        f"Reset the budget {args.name!r} for period {before['period_id']}: spent "
        f"${before['spent_usd']} -> ${after['spent_usd']}; ${after['reserved_usd']} held by "
        "requests in flight stays held."
    )
    return 0
