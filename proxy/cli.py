"""The ``metergate`` command: ``serve``, ``report``, ``ledger``, ``budgets``, ``prices``.

``report``, ``ledger`` and ``budgets`` work on the store named in the config directly
(the embedded SQLite file, or Redis), so they work whether or not a proxy is running.
``budgets`` lives in :mod:`proxy.cli_budgets`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

import orjson
from aiohttp import web

from proxy.access_log import configure_logging
from proxy.app import build_app
from proxy.cli_budgets import add_budget_commands
from proxy.cli_keys import add_key_commands
from proxy.ledger import LedgerRecord
from proxy.pricing import Catalog, describe
from proxy.report import format_report, nanos_to_usd_str, parse_period
from proxy.settings import ConfigError, load_settings
from proxy.store import open_store
from proxy.store.base import GROUP_COLUMNS
from proxy.workers import Supervisor

DEFAULT_CONFIG = "metergate.yaml"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``metergate`` console script; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"metergate: configuration error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"metergate: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="metergate", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the proxy")
    _config_arg(serve)
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=int, help="override server.port")
    serve.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="proxy processes sharing the port (SO_REUSEPORT; default 1); see proxy/workers.py",
    )
    # Set by the --workers supervisor on the processes it starts.
    serve.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    serve.add_argument("--metrics-dir", default=None, help=argparse.SUPPRESS)
    serve.set_defaults(func=_serve)

    report = sub.add_parser("report", help="spend and tokens, grouped")
    _config_arg(report)
    report.add_argument(
        "--by",
        default="team",
        help=f"comma-separated columns to group by: {', '.join(GROUP_COLUMNS)} (default team)",
    )
    report.add_argument("--since", help="a period back from now: 30m, 24h, 7d, 2w")
    report.add_argument("--from", dest="from_", help="start: 2026-11-01 or an ISO datetime (UTC)")
    report.add_argument("--to", help="end (exclusive): 2026-12-01 or an ISO datetime (UTC)")
    report.add_argument("--format", choices=("table", "csv", "json"), default="table")
    report.set_defaults(func=_report)

    ledger = sub.add_parser("ledger", help="read request records")
    ledger_sub = ledger.add_subparsers(required=True, metavar="ACTION")
    show = ledger_sub.add_parser("show", help="one request's record, by request id")
    _config_arg(show)
    show.add_argument("request_id")
    show.set_defaults(func=_ledger_show)
    lst = ledger_sub.add_parser("list", help="records of a period, as JSON lines")
    _config_arg(lst)
    lst.add_argument("--since", help="a period back from now (default 1h, unless --from)")
    lst.add_argument("--from", dest="from_")
    lst.add_argument("--to")
    lst.set_defaults(func=_ledger_list)

    add_budget_commands(sub, DEFAULT_CONFIG)
    add_key_commands(sub, DEFAULT_CONFIG)

    prices = sub.add_parser("prices", help="the price catalog")
    prices_sub = prices.add_subparsers(required=True, metavar="ACTION")
    check = prices_sub.add_parser("check", help="how a model resolves and what it costs")
    check.add_argument("model")
    check.add_argument("--config", help="a config whose prices file overrides the catalog")
    check.set_defaults(func=_prices_check)
    plist = prices_sub.add_parser("list", help="every model in the catalog")
    plist.add_argument("--config", help="a config whose prices file overrides the catalog")
    plist.set_defaults(func=_prices_list)
    return p


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", "-c", default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})"
    )


def _serve(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    configure_logging(getattr(logging, str(args.log_level).upper(), logging.INFO))
    host = args.host or settings.server.host
    port = settings.server.port if args.port is None else args.port
    if args.workers > 1 and args.worker_index is None:
        if port == 0 or settings.store.startswith("memory:"):
            raise ValueError(
                "--workers needs a fixed port (not 0) and a store the processes can share "
                "(sqlite:///path or redis://), not memory://."
            )
        argv = ["--config", args.config, "--host", host, "--port", str(port)]
        argv += ["--log-level", args.log_level, "--workers", str(args.workers)]
        return Supervisor(argv, args.workers, settings.server.shutdown_grace_s).run()
    is_worker = args.worker_index is not None
    app = build_app(settings, multiprocess_dir=args.metrics_dir, reuse_port=is_worker)
    loop = _new_loop()
    web.run_app(
        app,
        host=host,
        port=port,
        reuse_port=is_worker,
        access_log=None,  # our own structured access log replaces aiohttp's
        shutdown_timeout=settings.server.shutdown_grace_s,
        loop=loop,
        print=lambda msg: logging.getLogger("metergate").info(
            "listening on http://%s:%s", host, port
        ),
    )
    return 0


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _report(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    group_by = [c.strip() for c in args.by.split(",") if c.strip()]
    since_ms, until_ms = parse_period(args.since, args.from_, args.to, time.time_ns() // 1_000_000)

    async def run() -> str:
        store = open_store(settings.store)
        await store.open()
        try:
            rows = await store.report(group_by, since_ms, until_ms)
        finally:
            await store.close()
        return format_report(rows, group_by, args.format)

    print(asyncio.run(run()))
    return 0


def _ledger_show(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)

    async def run() -> int:
        store = open_store(settings.store)
        await store.open()
        try:
            record = await store.get_ledger_record(args.request_id)
        finally:
            await store.close()
        if record is None:
            print(f"metergate: no record with id {args.request_id}", file=sys.stderr)
            return 1
        print(orjson.dumps(_record_json(record), option=orjson.OPT_INDENT_2).decode())
        return 0

    return asyncio.run(run())


def _ledger_list(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    since = args.since or (None if args.from_ else "1h")
    since_ms, until_ms = parse_period(since, args.from_, args.to, time.time_ns() // 1_000_000)

    async def run() -> None:
        store = open_store(settings.store)
        await store.open()
        try:
            records = await store.ledger_records(since_ms, until_ms)
        finally:
            await store.close()
        out = sys.stdout
        for record in records:
            out.write(orjson.dumps(_record_json(record)).decode() + "\n")

    asyncio.run(run())
    return 0


def _record_json(record: LedgerRecord) -> dict[str, Any]:
    data = record.to_dict()
    data["cost_usd"] = nanos_to_usd_str(record.cost_nanos)
    return data


def _catalog(config: str | None) -> Catalog:
    return Catalog.load(load_settings(config).prices if config else None)


def _prices_check(args: argparse.Namespace) -> int:
    catalog = _catalog(args.config)
    price = catalog.resolve(args.model)
    if price is None:
        print(
            f"{args.model}: no price in the catalog. Requests for it are refused "
            "(unknown_model: reject) or charged at the fallback price (charge_fallback).",
            file=sys.stderr,
        )
        return 1
    print(describe(price, args.model))
    return 0


def _prices_list(args: argparse.Namespace) -> int:
    catalog = _catalog(args.config)
    for model in sorted(catalog.models()):
        print(model)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
