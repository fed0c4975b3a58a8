"""``metergate keys create|list|show|rotate|revoke``: Metergate keys issued at run time.

The commands read the config (``--config``) for the store URL, the ``key_secret`` and
the config's keys and budgets, and work on the store directly (see
:mod:`proxy.key_ops`), with or without a running proxy; every replica on that store
applies a change within about a second, without a restart. ``create`` and ``rotate``
print the key once; nothing can show it again.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from proxy.cli_budgets import dumps_json, run_on_store
from proxy.key_ops import (
    Issued,
    KeyConfig,
    create_key,
    describe,
    list_keys,
    revoke_key,
    rotate_key,
    show_key,
)
from proxy.settings import load_settings
from proxy.store.base import Store

__all__ = ["add_key_commands"]

_T = TypeVar("_T")
_SubParsers = argparse._SubParsersAction  # argparse has no public name for it
_ONCE = (
    "This is the only time the key is shown: store it now (in a secret manager, not in "
    "code). If it is lost, rotate the key to get a new value."
)


def add_key_commands(sub: _SubParsers[argparse.ArgumentParser], config_default: str) -> None:
    """Register ``metergate keys ...`` on the top-level subparsers."""
    keys = sub.add_parser("keys", help="issue, list, rotate and revoke Metergate keys")
    actions = keys.add_subparsers(required=True, metavar="ACTION")

    def action(name: str, help_text: str, func: Callable[[argparse.Namespace], int]) -> Any:
        p = actions.add_parser(name, help=help_text)
        p.add_argument(
            "--config", "-c", default=config_default, help=f"config file (default {config_default})"
        )
        p.add_argument("--json", action="store_true", help="print JSON")
        p.set_defaults(func=func)
        return p

    create = action("create", "issue a key (printed once)", _create)
    create.add_argument("--name", required=True, help="the key name the ledger records")
    create.add_argument("--team")
    create.add_argument("--user")
    create.add_argument("--tag", action="append", help="a cost-attribution tag; repeatable")
    create.add_argument("--expires", help="lifetime, e.g. 90d, 12h (default: no expiry)")
    create.add_argument("--budget-usd", help="a hard spend cap for this key, e.g. 50")
    create.add_argument("--period", choices=("day", "week", "month", "total"))
    lst = action("list", "issued keys (never the keys themselves)", _list)
    lst.add_argument("--all", action="store_true", help="include revoked keys")
    show = action("show", "one key, with its spend so far", _show)
    show.add_argument("ref", metavar="ID_OR_NAME")
    rotate = action("rotate", "give a key a new value (printed once)", _rotate)
    rotate.add_argument("ref", metavar="ID_OR_NAME")
    rotate.add_argument("--grace", help="keep the old value working this long, e.g. 10m")
    revoke = action("revoke", "revoke a key on every replica", _revoke)
    revoke.add_argument("ref", metavar="ID_OR_NAME")


def _run(args: argparse.Namespace, op: Callable[[Store, KeyConfig], Awaitable[_T]]) -> _T | None:
    """Open the config's store, run ``op``, close it. Operational errors are printed
    (exit status 1, None returned); invalid input is raised as ValueError (status 2)."""
    settings = load_settings(args.config)
    if settings.store.split("://", 1)[0].lower() == "memory":
        print(
            "metergate: The store is memory://, which lives inside each proxy process; "
            "issued keys need a shared store (sqlite:///... or redis://...).",
            file=sys.stderr,
        )
        return None
    cfg = KeyConfig.from_settings(settings)

    return run_on_store(settings.store, lambda store: op(store, cfg))


def _dash(value: Any) -> str:
    return "-" if value is None or value == [] else str(value)


def _details(view: dict[str, Any]) -> str:
    pairs = [
        ("id", view["id"]), ("name", view["name"]), ("team", _dash(view["team"])),
        ("user", _dash(view["user"])), ("tags", ",".join(view["tags"]) or "-"),
        ("key", view["prefix"]), ("state", view["state"]), ("created", view["created_at"]),
        ("expires", _dash(view["expires_at"])), ("rotated", _dash(view["rotated_at"])),
        ("revoked", _dash(view["revoked_at"])), ("budget", _dash(view["budget"])),
    ]  # fmt: skip
    if view.get("previous_valid_until"):
        pairs.append(("old value ok", view["previous_valid_until"]))
    spend = view.get("spend")
    if spend is not None:
        pairs.append(("spent", f"${spend['cost_usd']} in {spend['requests']} request(s)"))
    budget = view.get("budget_view")
    if budget is not None and budget.get("limit_usd") is not None:
        pairs.append(
            (
                "budget spent",
                f"${budget['spent_usd']} of ${budget['limit_usd']} this {budget['period']} "
                f"({budget['enforce']})",
            )
        )
    return "\n".join(f"{label + ':':<14}{value}" for label, value in pairs)


def _print_issued(args: argparse.Namespace, issued: Issued, verb: str) -> None:
    key = issued.key
    view = issued.view(time.time_ns() // 1_000_000)
    if args.json:
        print(dumps_json(view))
    else:
        print(f"{verb} the key {key.id} ({key.name}); every replica accepts it within a second.")
        print(_details(view))
        print()
        print(issued.value)
        print()
    print(_ONCE, file=sys.stderr)


# -- commands ------------------------------------------------------------------------------


def _create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"name": args.name}
    for field in ("team", "user", "expires", "budget_usd", "period"):
        if getattr(args, field) is not None:
            body[field] = getattr(args, field)
    if args.tag:
        body["tags"] = args.tag
    issued = _run(args, lambda store, cfg: create_key(store, cfg, body))
    if issued is None:
        return 1
    _print_issued(args, issued, "Issued")
    return 0


def _list(args: argparse.Namespace) -> int:
    views = _run(args, lambda store, cfg: list_keys(store, include_revoked=args.all))
    if views is None:
        return 1
    if args.json:
        print(dumps_json({"keys": views}))
        return 0
    if not views:
        print("No issued keys" + ("." if args.all else " (--all shows revoked ones)."))
        return 0
    header = ["ID", "NAME", "TEAM", "USER", "KEY", "STATE", "CREATED", "EXPIRES", "BUDGET"]
    rows = [header, *describe(views)]
    widths = [max(len(c) for c in col) for col in zip(*rows, strict=True)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _show(args: argparse.Namespace) -> int:
    view = _run(args, lambda store, cfg: show_key(store, cfg, args.ref))
    if view is None:
        return 1
    print(dumps_json(view) if args.json else _details(view))
    return 0


def _rotate(args: argparse.Namespace) -> int:
    issued = _run(args, lambda store, cfg: rotate_key(store, cfg, args.ref, args.grace))
    if issued is None:
        return 1
    _print_issued(args, issued, "Rotated")
    if args.grace:
        print(f"The old value keeps working for {args.grace}.", file=sys.stderr)
    return 0


def _revoke(args: argparse.Namespace) -> int:
    key = _run(args, lambda store, cfg: revoke_key(store, args.ref))
    if key is None:
        return 1
    assert key.revoked_ms is not None
    if args.json:
        print(dumps_json(key.view(key.revoked_ms)))
    else:
        print(
            f"Revoked the key {key.id} ({key.name}); every replica refuses it within a "
            "second. Its ledger records and budget stay."
        )
    return 0
